"""The cache contract: names and defaults written once, cache_layout.md in step, open_stage's refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imdpipe import contract
from imdpipe.contract import AUDIO, FRAMES, RELEVANCE, STORES, open_stage, video_path
from imdpipe.pipeline.store import ArraySpec, SettingsMismatch, StageStore

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "imdpipe").rglob("*.py"))


def _code_lines(path: Path):
    """(line number, code) of a module, comments dropped (docstrings stay: they count as text)."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        yield n, line.split("#", 1)[0]


@pytest.mark.parametrize("store", STORES, ids=lambda s: s.name)
def test_store_name_written_once(store):
    hits = [f"{p.relative_to(REPO)}:{n}" for p in SOURCES for n, line in _code_lines(p)
            if f'"{store.name}"' in line or f"'{store.name}'" in line]
    assert hits == [f"imdpipe/contract.py:{_line_of(store.name)}"], hits


def _line_of(text: str) -> int:
    return next(n for n, line in _code_lines(REPO / "imdpipe" / "contract.py") if f'"{text}"' in line)


@pytest.mark.parametrize("literal,pattern", [("flow bound 20.0", r"(?<![\w.])20\.0\b"),
                                              ("AST window 10.24 s", r"(?<![\w.])10\.24\b")])
def test_defaults_written_once(literal, pattern):
    hits = [f"{p.relative_to(REPO)}:{n}" for p in SOURCES for n, line in _code_lines(p) if re.search(pattern, line)]
    assert [h.split(":")[0] for h in hits] == ["imdpipe/contract.py"], (literal, hits)


def test_defaults_are_the_contracts():
    from imdpipe.heads import ModelConfig
    from imdpipe.pipeline import audio, flow, flow_utils
    from imdpipe.train import data

    assert flow_utils.FLOW_BOUND is contract.FLOW_BOUND
    assert flow.FlowSettings().bound == contract.FLOW_BOUND
    assert ModelConfig(num_classes=2).flow_bound == contract.FLOW_BOUND
    assert audio.window_starts.__defaults__[-1] == contract.AST_WINDOW_S
    assert data.eval_views.__kwdefaults__["flow_bound"] == contract.FLOW_BOUND
    assert data.eval_views.__kwdefaults__["window_s"] == contract.AST_WINDOW_S


def test_frames_arrays_are_the_contracts():
    from imdpipe.pipeline.flow import FlowSettings, store_arrays

    assert tuple(spec.name for spec in store_arrays(FlowSettings(frames=2, size=(8, 8)))) == FRAMES.arrays


def _sections(text: str) -> dict[str, tuple[str, str]]:
    """``{store name: (heading, body)}`` of the ``## `x.zarr` ...`` sections of cache_layout.md."""
    out = {}
    parts = re.split(r"^(## .*)$", text, flags=re.M)
    for heading, body in zip(parts[1::2], parts[2::2]):
        m = re.match(r"## `([\w.]+\.zarr)`", heading)
        if m:
            out[m.group(1)] = (heading, body)
    return out


def _documented_arrays(body: str) -> set[str]:
    names, in_table = set(), False
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            in_table = False
        elif cells[0] == "array":
            in_table = True
        elif in_table and not set(cells[0]) <= set("-: "):
            names |= set(re.findall(r"`(\w+)`", cells[0]))
    return names


def test_cache_layout_matches_the_contract():
    sections = _sections((REPO / "cache_layout.md").read_text(encoding="utf-8"))
    assert sorted(sections) == sorted(s.name for s in STORES)
    for store in STORES:
        heading, body = sections[store.name]
        assert f"stage `{store.stage}`" in heading, heading
        assert f"`{store.command}" in heading, heading
        assert _documented_arrays(body) - set(contract.FLAGS) == set(store.arrays), store.name


def test_video_path_one_rule(tmp_path):
    assert video_path(tmp_path, "/abs/v.mp4") == Path("/abs/v.mp4")
    assert video_path(tmp_path, "videos/v.mp4") == tmp_path / "videos" / "v.mp4"
    assert video_path(str(tmp_path), Path("v.mp4")) == tmp_path / "v.mp4"


def _store(cache: Path, store, *, stage: str | None = None, manifest: str = "m" * 64, n: int = 3):
    StageStore.open(store.path(cache), stage=stage or store.stage, settings={}, manifest_sha256=manifest, n_items=n,
                    arrays=[ArraySpec(store.arrays[0], (2,), "float32", ("x",))], videos_per_shard=2)


def test_open_stage_refuses_what_does_not_fit(tmp_path):
    with pytest.raises(FileNotFoundError, match="imdpipe extract-audio --cache"):
        open_stage(tmp_path, AUDIO)
    _store(tmp_path, AUDIO)
    group = open_stage(tmp_path, AUDIO, manifest_sha256="m" * 64, n_videos=3)
    assert group.attrs["stage"] == "audio" and group["done"].shape == (3,)
    with pytest.raises(SettingsMismatch, match="another manifest.csv.*imdpipe extract-audio .*--overwrite"):
        open_stage(tmp_path, AUDIO, manifest_sha256="x" * 64)
    with pytest.raises(SettingsMismatch, match="holds 3 videos but the manifest has 4"):
        open_stage(tmp_path, AUDIO, n_videos=4)
    _store(tmp_path, RELEVANCE, stage="audio")
    with pytest.raises(SettingsMismatch, match="is a 'audio' store, expected 'relevance'"):
        open_stage(tmp_path, RELEVANCE)


def test_contract_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, imdpipe.contract; assert 'torch' not in sys.modules and 'zarr' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
