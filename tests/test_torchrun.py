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
from train_fixtures import make_cache as make_train_cache
from train_fixtures import tiny_config

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


# ---------------------------------------------------------------------------------------------
# Training validation and evaluate, sharded over 2 ranks, against one process
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_cache(tmp_path_factory) -> Path:
    # 9 test videos (3 x 3): parts of 5 and 4; one training video failed flow
    return make_train_cache(tmp_path_factory.mktemp("tr") / "cache", classes=3, train_per_class=8,
                            test_per_class=3, failed_flow=1)


def _config_file(path: Path, **changes) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(tiny_config(**changes).to_dict()))
    return path


def test_two_rank_evaluate_writes_the_one_process_metrics(train_cache, tmp_path):
    import json

    from imdpipe.train.evaluate import evaluate
    from imdpipe.train.loop import train

    run = tmp_path / "run"
    train(cache=train_cache, out=run, config=tiny_config(epochs=1), show_progress=False)
    one = evaluate(run=run, cache=train_cache, split="test", clips=2, crops=3, out=tmp_path / "one",
                   show_progress=False)
    out = torchrun("evaluate", "--run-dir", str(run), "--cache", str(train_cache), "--split", "test", "--clips", "2",
                   "--crops", "3", "--out", str(tmp_path / "two"), "--dist-timeout", "5", "--quiet")
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert out.count("evaluation on test") == 1  # rank 0 alone prints and writes
    assert (tmp_path / "two" / "confusion.png").is_file()
    assert one["world_size"] == 1 and one["videos_per_rank"] == [9]
    assert two["world_size"] == 2 and two["videos_per_rank"] == [5, 4]  # disjoint contiguous parts of the split
    for key in ("top1", "top5", "per_class", "num_clips", "videos", "confusion", "audio_dropped", "relevance_auc_n"):
        assert two[key] == one[key], key
    assert two["relevance_auc"] == pytest.approx(one["relevance_auc"], abs=1e-12)


def test_two_rank_training_validates_on_both_ranks_like_one_process(train_cache, tmp_path):
    """Each epoch's validation is scored by both ranks (parts adding up to the hold-out) and equals
    one process scoring the checkpoint saved at that epoch on the same hold-out."""
    import json

    import torch
    from torch.utils.data import DataLoader

    from imdpipe.train.config import TrainConfig
    from imdpipe.train.data import ClipDataset, open_cache, select_videos
    from imdpipe.train.loop import resolve_val_split, validation_sums
    from imdpipe.train.runtime import load_checkpoint, model_from_checkpoint

    run = tmp_path / "run"
    cfg = _config_file(tmp_path / "c.yaml", epochs=2, fusion="imd")
    torchrun("train", "--cache", str(train_cache), "--out", str(run), "--config", str(cfg), "--dist-timeout", "5",
             "--quiet")
    config = TrainConfig.from_dict(load_checkpoint(run / "checkpoint-last.pt")["config"])
    info = open_cache(train_cache, audio=True, relevance=True)
    _, holdout, selected_on = resolve_val_split(config, info.manifest, select_videos(info, "train").indices)
    assert selected_on == "holdout" and len(holdout) == 5  # 2 of each class's 8, minus the failed video
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in x]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for rec in epochs:
        assert rec["val_videos_per_rank"] == [3, 2]  # both ranks scored, disjoint parts of the 5
    ds = ClipDataset(info, holdout, mode="eval", clips=1, crops=1, clip=config.clip, modalities=config.modalities,
                     relevance=True, seed=config.seed)
    checked = set()
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        ckpt = load_checkpoint(run / name)
        model = model_from_checkpoint(ckpt, torch.device("cpu"))
        correct, nll, n = validation_sums(model, DataLoader(ds, batch_size=5), modalities=config.modalities,
                                          device=torch.device("cpu"), amp=False, flow_bound=info.flow_bound)
        rec = epochs[ckpt["epoch"]]
        assert n == 5 and rec["val_top1"] == 100 * correct / n, name
        assert rec["val_loss"] == pytest.approx(nll / n, rel=1e-5), name  # other batches: float rounding only
        checked.add(ckpt["epoch"])
    assert 1 in checked
