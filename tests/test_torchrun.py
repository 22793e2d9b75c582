"""Commands launched by real torchrun (2 gloo processes on CPU) give what one process gives."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from audio_fixtures import make_cache as make_av_cache
from audio_fixtures import tiny_ast_dir, tone

from imdpipe.launch import available_cores

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> str:
    """``torchrun --standalone --nproc_per_node N -m imdpipe ARGS``; returns stdout + stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "imdpipe", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    return out


def _store(path: Path, names) -> dict:
    g = zarr.open_group(path, mode="r")
    return {k: g[k][:] for k in (*names, "done", "error")}


@pytest.fixture(scope="module")
def av_cache(tmp_path_factory) -> Path:
    clips = [(f"clip{i}", 1.0 + 0.2 * i, tone(300 + 150 * i, 1.0 + 0.2 * i, SR, 0.4) if i != 2 else None, SR)
             for i in range(4)]
    return make_av_cache(tmp_path_factory.mktemp("av") / "cache", clips)


def test_two_rank_stages_equal_one_process_and_split_the_cores(av_cache, tmp_path):
    from imdpipe.pipeline.audio import extract_audio
    from imdpipe.pipeline.flow import extract_flow

    tiny = tiny_ast_dir(tmp_path / "tiny_ast")
    one, two = tmp_path / "one", tmp_path / "two"
    for dst in (one, two):
        shutil.copytree(av_cache, dst)
    flow_kw = dict(backend="dis", frames=4, preset="ultrafast", videos_per_shard=2)
    extract_flow(cache=one, size=(32, 32), workers=0, show_progress=False, **flow_kw)
    extract_audio(cache=one, model=str(tiny), batch_size=1, workers=0, device="cpu", videos_per_shard=2,
                  show_progress=False)

    out = torchrun("extract-flow", "--cache", str(two), "--backend", "dis", "--frames", "4", "--size", "32x32",
                   "--preset", "ultrafast", "--videos-per-shard", "2", "--quiet")
    text = " ".join(out.split())
    per_rank = max(available_cores() // 2, 1)  # the default: cores / LOCAL_WORLD_SIZE
    for rank in (0, 1):
        assert f"shard {rank}/2, {per_rank} worker(s)" in text, text[-2000:]
    torchrun("extract-audio", "--cache", str(two), "--model", str(tiny), "--batch-size", "1",
             "--videos-per-shard", "2", "--device", "cpu", "--quiet")

    for store, names in (("frames.zarr", ("rgb", "flow", "frame_index")),
                         ("audio.zarr", ("embedding", "logits", "window_start_s", "has_audio"))):
        a, b = _store(one / store, names), _store(two / store, names)
        assert b["done"].all()
        for k in a:
            assert np.array_equal(a[k], b[k]), (store, k)
