"""Cached visual embeddings (visual.zarr), head-only training and ablation sweeps, at toy sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from train_fixtures import make_cache, tiny_config
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.pipeline.store import Partition, SettingsMismatch
from imdpipe.train.data import ClipDataset, open_cache, prepare_inputs
from imdpipe.train.evaluate import evaluate
from imdpipe.train.loop import train
from imdpipe.train.runtime import load_checkpoint, model_from_checkpoint, state_sha256
from imdpipe.train.visual_cache import extract_visual

torch.set_num_threads(1)
AUDIO_LABELS = ["Guitar", "Drum", "Applause", "Speech"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny cache, a tiny trained run and its visual.zarr (3 training views per video)."""
    root = tmp_path_factory.mktemp("head")
    cache = make_cache(root / "cache", classes=3, train_per_class=6, test_per_class=3)
    zarr.open_group(cache / "audio.zarr", mode="r+").attrs["audio_labels"] = AUDIO_LABELS
    run = root / "run"
    train(cache=cache, out=run, config=tiny_config(epochs=2, batch_size=6), show_progress=False)
    res = extract_visual(cache=cache, run=run, train_views=3, videos_per_shard=4, show_progress=False)
    return cache, run, res


def test_visual_store_round_trip(setup):
    cache, run, res = setup
    assert res.summary.ok == 27 and res.summary.failed == 0
    g = zarr.open_group(cache / "visual.zarr", mode="r")
    ckpt = load_checkpoint(run / "checkpoint-best.pt")
    model = model_from_checkpoint(ckpt, torch.device("cpu"))
    s = g.attrs["settings"]
    assert s["streams_sha256"] == state_sha256(model.visual.state_dict())
    assert (s["clips"], s["crops"], s["train_views"], s["seed"], s["crop_size"]) == (4, 3, 3, 0, 32)
    assert s["frames"]["backend"] == "synthetic-test" and g.attrs["streams"]["kind"] == "run"
    assert g["test_embedding"].shape == (27, 12, 96) and g["train_embedding"].shape == (27, 3, 96)
    assert g["test_embedding"].attrs["_ARRAY_DIMENSIONS"] == ["video", "view", "feature"]
    assert g["done"][:].all()
    # the stored embeddings are the streams' output on evaluate's views and the trainer's epoch-k clips
    info = open_cache(cache, audio=False, relevance=False)
    kw = dict(modalities=("rgb", "flow"), relevance=False, num_frames=4, frame_stride=1, crop_size=32, seed=0)
    test = ClipDataset(info, [5, 20], mode="eval", clips=4, crops=3, **kw)
    tr = ClipDataset(info, [5, 20], mode="train", crop_scale=(0.5, 1.0), **kw)
    with torch.no_grad():
        for j, i in enumerate([5, 20]):
            item = test[j]
            rgb, flow, _ = prepare_inputs({k: v[None] for k, v in item.items() if torch.is_tensor(v)},
                                          ("rgb", "flow"), torch.device("cpu"), flow_bound=20.0, flatten_views=True)
            want = model.visual(rgb, flow).numpy()
            np.testing.assert_allclose(g["test_embedding"][i], want, rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(g["test_clip_time_s"][i], item["clip_time_s"].numpy(), rtol=1e-6)
            tr.set_epoch(2)
            item = tr[j]
            rgb, flow, _ = prepare_inputs({k: torch.as_tensor(v)[None] for k, v in item.items()
                                           if k in ("rgb", "flow", "flow_scale")},
                                          ("rgb", "flow"), torch.device("cpu"), flow_bound=20.0)
            np.testing.assert_allclose(g["train_embedding"][i, 2], model.visual(rgb, flow)[0].numpy(),
                                       rtol=2e-3, atol=2e-3)
    # a rerun has nothing to do
    again = extract_visual(cache=cache, run=run, train_views=3, videos_per_shard=4, show_progress=False)
    assert again.summary.ok == 0 and again.summary.already_done == 27


def test_visual_store_refuses_other_streams_and_settings_and_resumes_by_shard(setup, tmp_path):
    cache, run, _ = setup
    other = tmp_path / "other"  # another run: the same checkpoint with one stream weight changed
    other.mkdir()
    ckpt = load_checkpoint(run / "checkpoint-best.pt")
    ckpt["model"]["visual.fuse.0.bias"] = ckpt["model"]["visual.fuse.0.bias"] + 0.01
    torch.save(ckpt, other / "checkpoint-best.pt")
    with pytest.raises(SettingsMismatch, match="streams_sha256"):
        extract_visual(cache=cache, run=other, train_views=3, videos_per_shard=4, show_progress=False)
    with pytest.raises(SettingsMismatch, match="train_views"):
        extract_visual(cache=cache, run=run, train_views=2, videos_per_shard=4, show_progress=False)
    # shards: two writers fill a fresh store (another cache dir so the module's store stays)
    cache2 = make_cache(tmp_path / "cache2", classes=3, train_per_class=6, test_per_class=3)
    first = extract_visual(cache=cache2, run=run, train_views=1, videos_per_shard=4, part=Partition(0, 2),
                           show_progress=False)
    assert 0 < first.summary.ok < 27 and first.summary.not_mine == 27 - first.summary.ok
    rest = extract_visual(cache=cache2, run=run, train_views=1, videos_per_shard=4, show_progress=False)
    assert rest.summary.already_done == first.summary.ok and rest.summary.ok == 27 - first.summary.ok
    # a run trained on frames made with other settings is refused
    cache3 = make_cache(tmp_path / "cache3", classes=3, train_per_class=6, test_per_class=3,
                        frames_settings={"backend": "other"})
    with pytest.raises(ValueError, match="backend"):
        extract_visual(cache=cache3, run=run, train_views=1, show_progress=False)


def test_cached_scoring_equals_the_full_evaluate(setup, tmp_path):
    """The run's own head, put on the cached views, scores what evaluate scores end to end."""
    cache, run, _ = setup
    ckpt = load_checkpoint(run / "checkpoint-best.pt")
    head = dict(ckpt, model={k: v for k, v in ckpt["model"].items() if not k.startswith("visual.")},
                streams={"visual_store": str(cache / "visual.zarr"),
                         "streams_sha256": zarr.open_group(cache / "visual.zarr").attrs["settings"]["streams_sha256"]})
    torch.save(head, tmp_path / "head.pt")
    full = evaluate(run=run, cache=cache, out=tmp_path / "full", num_workers=0, show_progress=False)
    cached = evaluate(run=tmp_path / "head.pt", cache=cache, out=tmp_path / "cached", show_progress=False)
    assert cached["top1"] == full["top1"] and cached["confusion"] == full["confusion"]
    assert cached["audio_dropped"]["overall"] == pytest.approx(full["audio_dropped"]["overall"], abs=0.02)
    assert cached["relevance_auc"] == pytest.approx(full["relevance_auc"], abs=0.05)
    # and a head-only checkpoint put back on its streams is the full model
    model = model_from_checkpoint(head, torch.device("cpu"))
    ref = model_from_checkpoint(ckpt, torch.device("cpu"))
    assert state_sha256(model.state_dict()) == state_sha256(ref.state_dict())


def test_head_only_cli_writes_the_run_contract(setup, tmp_path):
    cache, run, _ = setup
    out = tmp_path / "head"
    result = CliRunner().invoke(app, ["train", "--head-only", "--cache", str(cache), "--out", str(out),
                                      "--config", str(run / "config.yaml"), "--epochs", "4", "--lr", "0.01",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "checkpoint-best.pt", "checkpoint-last.pt", "metrics.jsonl", "training-curves.png"):
        assert (out / name).is_file(), name
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["head_only"] is True and cfg["crop_size"] == 32 and cfg["relevance"]["K"] == 10
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["kind"] == "epoch"]
    # the default --val-split holdout keeps some of the 18 training videos out: 2 batches of 6 per epoch
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3] and epochs[-1]["step"] == 4 * 2
    assert load_checkpoint(out / "checkpoint-best.pt")["selection"]["selected_on"] == "holdout"
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    ckpt = load_checkpoint(out / "checkpoint-last.pt")
    assert not any(k.startswith("visual.") for k in ckpt["model"])
    # evaluate scores the cached views and writes the same metrics.json contract as a full run
    result = CliRunner().invoke(app, ["evaluate", "--run-dir", str(out), "--cache", str(cache), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    full = evaluate(run=run, cache=cache, out=tmp_path / "full", num_workers=0, show_progress=False)
    assert set(metrics) == set(full) - {"metrics_path"}
    assert metrics["views"] == 12 and metrics["num_clips"] == 9 and metrics["fusion"] == "imd"
    assert metrics["top1"] >= 100 * 2 / 3  # the tiny cache's classes are easy once the streams are trained
    # the head goes back onto the run's streams for predict / a full evaluate
    model = model_from_checkpoint(ckpt, torch.device("cpu"))
    assert model.visual is not None
    assert state_sha256(model.visual.state_dict()) == ckpt["streams"]["streams_sha256"]
    # an existing run is not overwritten
    result = CliRunner().invoke(app, ["train", "--head-only", "--cache", str(cache), "--out", str(out),
                                      "--quiet"])
    assert result.exit_code == 2 and "already holds a run" in result.output


def test_sweep_two_by_two_writes_its_table(setup, tmp_path):
    from imdpipe.pipeline.relevance import relevance_targets
    from imdpipe.pipeline.savld import Savld, write_savld

    cache, run, _ = setup
    sim = np.random.default_rng(0).normal(size=(3, len(AUDIO_LABELS)))
    write_savld(Savld.from_similarity(["class_0", "class_1", "class_2"], AUDIO_LABELS, sim, k=3), cache,
                settings={"k": 3}, overwrite=True)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", "--cache", str(cache), "--out", str(out), "--epochs", "2",
                                      "--workers", "1", "--grid", "alpha=0.25,0.5", "k=1,2", "ya=2",
                                      "seeds=0,1", "--quiet"])
    assert result.exit_code == 0, result.output
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Top-1" not in line]
    assert len(rows) == 4 and all("| 2 |" in r for r in rows)  # 4 cells, 2 seeds each
    import csv

    with (out / "table.csv").open() as f:
        recs = list(csv.DictReader(f))
    assert [(r["alpha"], r["k"]) for r in recs] == [("0.25", "1"), ("0.25", "2"), ("0.5", "1"), ("0.5", "2")]
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()][1:]
    assert len(results) == 8
    for r in recs:  # the table's mean is the mean of its seeds' results
        tops = [x["top1"] for x in results if x["alpha"] == float(r["alpha"]) and x["k"] == int(r["k"])]
        assert float(r["top1"]) == pytest.approx(np.mean(tops))
        assert float(r["top1_lo"]) <= float(r["top1"]) <= float(r["top1_hi"])
    assert (out / "table.png").stat().st_size > 0
    # the targets the sweep trained on differ between K=1 and K=2 (so the grid did change them)
    t1 = relevance_targets(cache=cache, K=1, ya=2).target
    t2 = relevance_targets(cache=cache, K=2, ya=2).target
    assert not np.array_equal(t1, t2)
    # a rerun finds every run done; another grid in the same directory is refused
    again = CliRunner().invoke(app, ["sweep", "--cache", str(cache), "--out", str(out), "--epochs", "2",
                                     "--workers", "1", "--grid", "alpha=0.25,0.5", "k=1,2", "ya=2", "seeds=0,1",
                                     "--quiet"])
    assert again.exit_code == 0 and "8 already in" in again.output.replace("\n", " ")
    other = CliRunner().invoke(app, ["sweep", "--cache", str(cache), "--out", str(out), "--grid", "alpha=0.1"])
    assert other.exit_code == 2 and "other settings" in other.output


def test_head_only_resume_ends_with_the_uninterrupted_weights(setup, tmp_path):
    """Killed after epoch 0 (stop_after_epoch) and resumed from the CLI: the same weights, bit for bit."""
    from imdpipe.train.head_only import train_head_only

    cache, _, _ = setup
    # dropout and the cross-modal swap draw random numbers, so each epoch's RNG must be restored
    cfg = tiny_config(epochs=3, batch_size=6, head_only=True, head_drop_rate=0.3, cross_modal_p=0.5,
                      optimizer="sgd", lr=0.05)
    full = train_head_only(cache=cache, out=tmp_path / "full", config=cfg, show_progress=False)
    part = train_head_only(cache=cache, out=tmp_path / "part", config=cfg, show_progress=False, stop_after_epoch=0)
    assert part["epochs_done"] == 1 and part["weights_sha256"] != full["weights_sha256"]
    again = CliRunner().invoke(app, ["train", "--head-only", "--cache", str(cache), "--out", str(tmp_path / "part"),
                                     "--quiet"])
    assert again.exit_code == 2 and "--resume" in again.output  # an existing run is not restarted
    result = CliRunner().invoke(app, ["train", "--resume", "--cache", str(cache), "--out", str(tmp_path / "part"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    resumed = load_checkpoint(tmp_path / "part" / "checkpoint-last.pt")
    uninterrupted = load_checkpoint(tmp_path / "full" / "checkpoint-last.pt")
    assert resumed["epoch"] == 2 and resumed["step"] == uninterrupted["step"]
    assert state_sha256(resumed["model"]) == state_sha256(uninterrupted["model"]) == full["weights_sha256"]
    # metrics.jsonl holds each epoch once, with the uninterrupted run's losses
    def epochs(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["epoch"], r["train_loss"]) for r in lines if r["kind"] == "epoch"]

    assert epochs(tmp_path / "part") == epochs(tmp_path / "full") and len(epochs(tmp_path / "full")) == 3
    from imdpipe.train.events import read_scalars

    assert [s for s, _ in read_scalars(tmp_path / "part")["epoch/train_loss"]] == [r["step"] for r in [
        json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()] if r["kind"] == "epoch"]
    # nothing to resume, or a full run: clear refusals
    with pytest.raises(FileNotFoundError, match="no checkpoint-last.pt to resume"):
        train_head_only(cache=cache, out=tmp_path / "none", resume=True, show_progress=False)
    _, run, _ = setup
    with pytest.raises(ValueError, match="is a full run"):
        train_head_only(cache=cache, out=run, resume=True, show_progress=False)


def test_head_only_refuses_a_damaged_visual_store(setup, tmp_path):
    """The whole-array read checks every chunk's CRC-32C: a flipped chunk of a done video stops the run."""
    import shutil

    from test_integrity import damage

    cache, _, _ = setup
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    damage(copy / "visual.zarr", "train_embedding", 7, "flip")
    result = CliRunner().invoke(app, ["train", "--head-only", "--cache", str(copy), "--out", str(tmp_path / "run"),
                                      "--epochs", "1", "--quiet"])
    assert result.exit_code != 0
    msg = " ".join(result.output.split())
    assert "visual.zarr/train_embedding: 1 done video(s) cannot be read: 7 (" in msg and "imdpipe verify" in msg
    assert not (tmp_path / "run" / "checkpoint-last.pt").exists()


def test_head_only_checkpoint_selected_on_the_scored_split_is_refused_before_scoring(setup, tmp_path):
    """As for a full run: checkpoint-best.pt chosen on test is not scored on test unless allowed (and then said)."""
    from imdpipe.train.head_only import train_head_only

    cache, _, _ = setup
    run = tmp_path / "picked-on-test"
    train_head_only(cache=cache, out=run, config=tiny_config(epochs=2, batch_size=6, head_only=True, val_split="test"),
                    show_progress=False)
    with pytest.raises(ValueError, match="selected on split 'test'"):
        evaluate(run=run, cache=cache, split="test", show_progress=False)
    assert not (run / "metrics.json").exists()
    m = evaluate(run=run, cache=cache, split="test", allow_selection_leak=True, show_progress=False)
    assert m["selection_leak"] is True and m["selected_on"] == "test"
