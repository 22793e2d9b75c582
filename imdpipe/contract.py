"""The cache contract: every name and default the stages and the trainer agree on, written once.

A cache directory (``--cache``) holds ``manifest.csv``, ``labels.txt`` and one Zarr store per
stage. This module names them, says which stage writes which store and which arrays it holds,
resolves the manifest's video paths, and checks a store before anything reads it
(:func:`open_stage`). ``cache_layout.md`` documents the same facts in prose; a test checks that the
two agree. Importable without torch (the CLI, ``heads`` and the stages all read it).

Where each per-store fact is recorded (once):

* the flow quantization bound: the ``flow`` array's ``bound`` attr in ``frames.zarr``;
* the audio window length: ``settings["window_s"]`` of ``audio.zarr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.csv"
LABELS_NAME = "labels.txt"
GROUND_TRUTH_NAME = "ground_truth.csv"  # video_id,relevant: written by `imdpipe synth`, read by evaluate

#: Optical flow is clipped to [-FLOW_BOUND, FLOW_BOUND] pixels before uint8 quantization.
FLOW_BOUND = 20.0
#: Length (s) of one AudioSet AST input: 1024 fbank frames of 10 ms.
AST_WINDOW_S = 10.24

#: Per-video flags every stage store holds beside its arrays.
FLAGS = ("done", "error")


@dataclass(frozen=True)
class Store:
    """One store of a cache directory: its file name, the stage that writes it and its arrays."""

    name: str
    stage: str
    command: str  # the command that builds it
    arrays: tuple[str, ...]
    per_video: bool = True  # indexed by manifest row (with FLAGS); savld.zarr is per label pair

    def path(self, cache: str | Path) -> Path:
        return Path(cache) / self.name


FRAMES = Store("frames.zarr", "flow", "imdpipe extract-flow",
               ("rgb", "flow", "frame_index", "n_frames", "repeated", "rotation"))
AUDIO = Store("audio.zarr", "audio", "imdpipe extract-audio", ("embedding", "logits", "window_start_s", "has_audio"))
SAVLD = Store("savld.zarr", "savld", "imdpipe build-savld",
              ("similarity", "topk_index", "topk_score", "lift", "frequency", "base_frequency"),
              per_video=False)  # the last three only with --source data|hybrid
RELEVANCE = Store("relevance.zarr", "relevance", "imdpipe build-savld", ("target", "overlap_count"))
#: Every store, in the order the stages build them.
VISUAL = Store("visual.zarr", "visual", "imdpipe extract-visual",
               ("test_embedding", "test_clip_time_s", "train_embedding", "train_clip_time_s"))

STORES = (FRAMES, AUDIO, SAVLD, RELEVANCE, VISUAL)


def video_path(cache: str | Path, path: str | Path) -> Path:
    """A manifest ``path`` on disk: absolute as written, relative to the cache root otherwise."""
    p = Path(path)
    return p if p.is_absolute() else Path(cache) / p


def open_stage(cache: str | Path, store: Store, *, manifest_sha256: str | None = None,
               n_videos: int | None = None, mode: str = "r"):
    """Open a store of ``cache`` written by an earlier stage, refusing one that does not fit.

    Refused (a message naming the store and the command that fixes it): a missing store, a store
    of another stage, one built for another ``manifest.csv`` (when ``manifest_sha256`` is given),
    or one holding another number of videos (when ``n_videos`` is given).

    Returns:
        The open ``zarr.Group``.

    Raises:
        FileNotFoundError: the store does not exist.
        SettingsMismatch: it does not fit (a ``ValueError``).
    """
    import zarr

    from imdpipe.pipeline.store import SettingsMismatch

    path = store.path(cache)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `{store.command} --cache {Path(cache)}` first.")
    group = zarr.open_group(path, mode=mode)
    attrs = dict(group.attrs)
    if attrs.get("stage") != store.stage:
        raise SettingsMismatch(f"{path} is a {attrs.get('stage')!r} store, expected {store.stage!r}")
    if manifest_sha256 is not None and attrs.get("manifest_sha256") not in (None, manifest_sha256):
        raise SettingsMismatch(f"{path} was built for another manifest.csv (the dataset was re-indexed since); "
                               f"rebuild it with `{store.command} --cache {Path(cache)} --overwrite`.")
    if n_videos is not None and store.per_video and group[FLAGS[0]].shape[0] != n_videos:
        raise SettingsMismatch(f"{path} holds {group[FLAGS[0]].shape[0]} videos but the manifest has {n_videos}; "
                               f"rebuild it with `{store.command} --cache {Path(cache)} --overwrite`.")
    return group
