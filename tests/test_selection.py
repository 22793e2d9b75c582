"""The reproduction protocol in the trainer: the paper recipe's learning rate, the validation
hold-out, what metrics.json says about selection, the leak refusal, Kinetics-style finetuning from
an imdpipe run onto another label set, the refusal to train base from random weights, TensorBoard."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from train_fixtures import make_cache, tiny_config
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.pipeline.manifest import read_manifest
from imdpipe.train.config import TrainConfig
from imdpipe.train.evaluate import evaluate
from imdpipe.train.events import read_scalars
from imdpipe.train.loop import resolve_val_split, schedule, step_lr_factor, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("sel") / "cache", classes=3, train_per_class=8, test_per_class=2,
                      failed_flow=1)


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_clips_in_seconds_and_the_jitter_crop():
    import numpy as np

    from imdpipe.train.config import ClipSpec
    from imdpipe.train.data import eval_positions, jitter_box, position_times, positions_at, train_positions

    # 32 positions at segment centres of a 10 s, 30 fps video: TimeSformer's 8.53 s span, no repeats
    fi = np.round((np.arange(32) + 0.5) * 300 / 32).astype(int)
    times = position_times(fi, 30.0)
    pos = positions_at(times, times[0], 8, 8 * 32 / 30)
    assert len(set(pos.tolist())) == 8 and pos[0] == 0
    targets = times[0] + np.linspace(0, 8 * 32 / 30, 8)
    assert np.abs(times[pos] - targets).max() <= (times[1] - times[0]) / 2 + 1e-9  # the nearest position
    # a 4 s video is shorter than the span: the clip covers it, later frames repeat the last position
    short = position_times(np.round((np.arange(32) + 0.5) * 120 / 32).astype(int), 30.0)
    pos = positions_at(short, short[0], 8, 8 * 32 / 30)
    assert pos[0] == 0 and pos[-1] == 31 and (pos[-3:] == 31).all() and (np.diff(pos) >= 0).all()
    clip = ClipSpec(num_frames=8, frame_stride=0, clip_seconds=8 * 32 / 30)
    starts = [times[p[0]] for p in eval_positions(clip, 4, 32, times)]
    assert starts[0] == times[0] and abs(starts[-1] - (times[-1] - 8 * 32 / 30)) < 0.2
    rng = np.random.default_rng(0)
    drawn = [train_positions(clip, rng, 32, times) for _ in range(50)]
    # starts uniform in [t_0, t_31 - 8.53 s] = [0.16 s, 1.31 s]: the first 5 positions
    assert all(len(set(p.tolist())) == 8 for p in drawn) and {int(p[0]) for p in drawn} == {0, 1, 2, 3, 4}
    # jitter: the short side resized to s in [256, 320], a 224 crop: 179..224 stored pixels of 256x340
    sides = [jitter_box(rng, 256, 340, (256, 320), 224) for _ in range(400)]
    assert {b[2] for b in sides} <= set(range(179, 225)) and min(b[2] for b in sides) < 185
    assert max(b[2] for b in sides) == 224 and all(b[2] == b[3] for b in sides)
    assert all(0 <= y and y + h <= 256 and 0 <= x and x + w <= 340 for y, x, h, w in sides)


def test_paper_recipe_learning_rate_at_each_epoch():
    cfg = TrainConfig()  # recipe paper: 0.005, x0.1 from epoch index 11, again from 14, 15 epochs
    factor = schedule(cfg, steps_per_epoch=4)
    per_epoch = [cfg.lr * factor(4 * e + k) for e in range(15) for k in range(4)]
    expected = [0.005] * 11 + [0.0005] * 3 + [0.00005]
    assert per_epoch == pytest.approx([lr for lr in expected for _ in range(4)], rel=1e-12)
    assert step_lr_factor(5, steps_per_epoch=2, milestones=(1, 2), gamma=0.5, warmup=2) == 0.25
    assert step_lr_factor(0, steps_per_epoch=2, milestones=(1, 2), gamma=0.5, warmup=2) == 0.5  # warmup 1/2


def test_holdout_is_stratified_seeded_and_disjoint_from_train_and_test(cache):
    from imdpipe.train.data import open_cache, select_videos

    info = open_cache(cache, audio=True, relevance=True)
    usable = select_videos(info, "train").indices
    cfg = tiny_config(val_fraction=0.25)
    train_idx, held, selected_on = resolve_val_split(cfg, info.manifest, usable)
    records = read_manifest(cache).records
    test = {r.index for r in records if r.split == "test"}
    assert selected_on == "holdout"
    assert not set(held) & set(train_idx) and not set(held) & test and not set(train_idx) & test
    assert set(held) | set(train_idx) == set(usable)
    # 2 of each class's 8 training videos (one training video whose flow failed is simply not usable)
    all_rows = [r for r in records if r.split == "train"]
    counts = Counter(records[i].label for i in held)
    assert sum(counts.values()) in (5, 6) and all(1 <= n <= 2 for n in counts.values()) and len(counts) == 3
    # the hold-out is drawn from the manifest rows, so it is the same whatever failed
    again = resolve_val_split(cfg, info.manifest, [r.index for r in all_rows])[1]
    assert set(held) <= set(again) and len(again) == 6
    assert resolve_val_split(cfg, info.manifest, usable)[1] == held  # seeded
    assert resolve_val_split(tiny_config(val_fraction=0.25, seed=1), info.manifest, usable)[1] != held
    assert resolve_val_split(tiny_config(val_split="last"), info.manifest, usable) == (usable, None, "last")
    with pytest.raises(ValueError, match="holds none"):
        resolve_val_split(tiny_config(val_fraction=0.01), info.manifest, usable)
    with pytest.raises(ValueError, match="is the training split"):
        resolve_val_split(tiny_config(val_split="train"), info.manifest, usable)


def test_metrics_say_what_was_scored_and_the_leak_is_refused(cache, tmp_path):
    held_run, test_run = tmp_path / "held", tmp_path / "on-test"
    # the paper recipe end to end: step decay, frames over seconds, short-side jitter, classifier dropout
    paper = tiny_config(epochs=2, recipe="paper", lr_milestones=(1,), val_fraction=0.25, frame_stride=0,
                        clip_seconds=2.0, train_crop="jitter", jitter_scales=(32, 40))
    assert paper.head_drop_rate == 0.5 and paper.lr_schedule == "step" and paper.warmup_epochs == 0.5
    train(cache=cache, out=held_run, config=paper, show_progress=False)
    m = evaluate(run=held_run, cache=cache, split="test", clips=1, crops=1, show_progress=False)
    assert m["checkpoint"] == str(held_run / "checkpoint-best.pt") and m["selected_on"] == "holdout"
    assert m["selection_leak"] is False
    written = json.loads((held_run / "metrics.json").read_text())
    assert written["checkpoint"] == m["checkpoint"] and written["selected_on"] == "holdout"
    assert _ckpt(held_run / "checkpoint-best.pt")["selection"]["val_videos"] == 5
    # the paper recipe's step decay shows in the epochs' learning rates (milestone at epoch index 1 here)
    epochs = [json.loads(line) for line in (held_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in epochs if r["kind"] == "epoch"] == pytest.approx([0.05, 0.005])

    train(cache=cache, out=test_run, config=tiny_config(epochs=1, val_split="test"), show_progress=False)
    with pytest.raises(ValueError, match="selected on split 'test'.*--allow-selection-leak"):
        evaluate(run=test_run, cache=cache, split="test", clips=1, crops=1, show_progress=False)
    leak = evaluate(run=test_run, cache=cache, split="test", clips=1, crops=1, allow_selection_leak=True,
                    show_progress=False)
    assert leak["selection_leak"] is True and leak["selected_on"] == "test"
    last = evaluate(run=test_run, cache=cache, split="test", clips=1, crops=1, checkpoint="last",
                    show_progress=False)
    assert last["selected_on"] == "last" and last["checkpoint"].endswith("checkpoint-last.pt")
    r = CliRunner().invoke(app, ["evaluate", "--run-dir", str(test_run), "--cache", str(cache), "--clips", "1",
                                 "--crops", "1", "--quiet"])
    assert r.exit_code == 2 and "--allow-selection-leak" in r.output

    # TensorBoard events beside metrics.jsonl: losses, top-1, lr, rev statistics, clips/s
    scalars = read_scalars(held_run)
    for tag in ("step/loss", "step/lr", "epoch/train_top1", "epoch/val_top1", "epoch/lr", "epoch/rev_mean",
                "epoch/audio_dropped", "epoch/clips_per_s"):
        assert tag in scalars, tag
    assert [v for _, v in scalars["epoch/lr"]] == pytest.approx([0.05, 0.005])


def test_finetune_from_an_imdpipe_run_onto_another_label_set(cache, tmp_path):
    source = tmp_path / "k400-like"
    train(cache=cache, out=source, config=tiny_config(epochs=1, val_split="last", tensorboard=False),
          show_progress=False)
    assert not list(source.glob("events.out.tfevents.*"))  # --no-tensorboard
    other = make_cache(tmp_path / "ucf-like", classes=4, train_per_class=4, test_per_class=1, seed=3)
    # lr 0: the finetuned run's weights are exactly what it started from
    run = tmp_path / "finetuned"
    train(cache=other, out=run, config=tiny_config(epochs=1, lr=0.0, val_split="last", init_checkpoint=str(source)),
          show_progress=False)
    src, got = _ckpt(source / "checkpoint-last.pt"), _ckpt(run / "checkpoint-last.pt")
    streams = [k for k in src["model"] if k.startswith(("visual.", "audio.", "fusion."))]
    assert streams and all(torch.equal(got["model"][k], src["model"][k]) for k in streams)
    assert src["model"]["head.fc2.weight"].shape[0] == 3 and got["model"]["head.fc2.weight"].shape[0] == 4
    assert got["labels"] == ["class_0", "class_1", "class_2", "class_3"]
    init = yaml.safe_load((run / "config.yaml").read_text())["init"]
    assert init["kind"] == "imdpipe" and init["file"] == str(source / "checkpoint-last.pt")
    import hashlib

    assert init["sha256"] == hashlib.sha256((source / "checkpoint-last.pt").read_bytes()).hexdigest()
    assert set(init["new"]) == {"head", "head_norm"}


def test_base_refuses_random_init_before_building_anything(cache, tmp_path):
    out = tmp_path / "base"
    with pytest.raises(ValueError, match="--init-checkpoint vit_base_patch16_224.augreg_in21k"):
        train(cache=cache, out=out, config=TrainConfig(size="base", device="cpu"), show_progress=False)
    assert not out.exists()
    r = CliRunner().invoke(app, ["train", "--cache", str(cache), "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "--from-scratch" in r.output and not out.exists()
    r = CliRunner().invoke(app, ["train", "--cache", str(cache), "--out", str(out), "--size", "tiny",
                                 "--val-split", "auto"])
    assert r.exit_code == 2 and "holdout" in r.output
