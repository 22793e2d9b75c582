"""Shared synthetic-dataset fixtures: a tiny real dataset from ``imdpipe synth`` and its index.

Import in another test file with ``from synth_fixtures import synth_tiny, synth_tiny_cache`` (the
same way as ``audio_fixtures``; tests/ has no ``__init__.py``), or, to keep ruff's F811 quiet, wrap
the builders in a local fixture: ``return build_synth(tmp_path_factory, videos_per_class=3)``.
Datasets are built once per test session and per settings, whichever module asks first; treat
them as read-only (copy before modifying).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imdpipe.datasets.synth import synth_dataset
from imdpipe.pipeline.index import build_index

#: 8 classes x 2 videos, 64x64, 1.5 s at 8 fps (12 frames), 16 one-second sound-bank clips.
TINY = {"seed": 0, "videos_per_class": 2, "size": (64, 64), "duration_s": 1.5, "fps": 8, "test_fraction": 0.5,
        "soundbank_clips": 16, "soundbank_duration_s": 1.0}

_BUILT: dict[tuple, Path] = {}


def build_synth(tmp_path_factory, **overrides) -> Path:
    """A synthetic dataset with ``TINY`` settings updated by ``overrides``, built once per session."""
    settings = {**TINY, **overrides}
    key = tuple(sorted((k, str(v)) for k, v in settings.items()))
    if key not in _BUILT:
        out = tmp_path_factory.mktemp("synth")
        synth_dataset(out, show_progress=False, **settings)
        _BUILT[key] = out
    return _BUILT[key]


def build_synth_cache(tmp_path_factory, **overrides) -> Path:
    """A cache directory holding the index (manifest.csv, labels.txt) of :func:`build_synth`'s dataset."""
    key = ("cache",) + tuple(sorted((k, str(v)) for k, v in {**TINY, **overrides}.items()))
    if key not in _BUILT:
        out = build_synth(tmp_path_factory, **overrides)
        cache = tmp_path_factory.mktemp("synth_cache")
        build_index(cache=cache, root=out / "videos", splits=out / "splits", show_progress=False)
        _BUILT[key] = cache
    return _BUILT[key]


@pytest.fixture(scope="session")
def synth_tiny(tmp_path_factory) -> Path:
    """OUT folder of the tiny synthetic dataset (videos/, splits/, soundbank/, ground_truth.csv, synth.json)."""
    return build_synth(tmp_path_factory)


@pytest.fixture(scope="session")
def synth_tiny_cache(tmp_path_factory) -> Path:
    """Cache folder with manifest.csv + labels.txt of ``synth_tiny`` (UCF-style split 1: train/test)."""
    return build_synth_cache(tmp_path_factory)
