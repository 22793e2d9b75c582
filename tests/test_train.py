"""The head trainer on tiny caches: learning, data pipeline, augmentation, resume, DDP, CLI."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from train_fixtures import make_cache, tiny_config
from typer.testing import CliRunner

from imdpipe.train.config import TrainConfig, load_config
from imdpipe.train.data import (
    ClipDataset,
    clip_centre_time,
    eval_boxes,
    eval_starts,
    flow_pixels,
    flow_to_input,
    nearest_window,
    open_cache,
    select_videos,
)
from imdpipe.train.loop import lr_factor, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("train") / "cache", failed_flow=1, failed_index=1)


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoint-last.pt", map_location="cpu", weights_only=False)["model"]


# ---------------------------------------------------------------------------------------------
# End to end (through the CLI) and the run directory
# ---------------------------------------------------------------------------------------------
def test_cli_train_learns_and_writes_run_dir(cache, tmp_path):
    from imdpipe.cli.main import app

    run = tmp_path / "run"
    cfg = tiny_config(epochs=3, lr=0.03)
    cfg_path = tmp_path / "start.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    result = CliRunner().invoke(app, ["train", "--cache", str(cache), "--out", str(run), "--config", str(cfg_path),
                                      "--fusion", "imd", "--quiet"])
    assert result.exit_code == 0, result.output
    # failed videos are counted and named, never silently dropped
    assert "2 left out" in result.output and "flow stage not done" in result.output
    assert "index failed" in result.output
    for name in ("config.yaml", "checkpoint-last.pt", "checkpoint-best.pt", "metrics.jsonl", "training-curves.png"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["train_ce"] < epochs[0]["train_ce"]
    assert max(r["val_top1"] for r in epochs) > 100 / 3 + 20  # 3 classes: chance is 33%
    assert any(r["kind"] == "step" for r in records)
    # the resolved config records the relevance store's K / Ya and replays to the same settings
    replay = load_config(run / "config.yaml")
    assert replay.relevance == {"K": 10, "Ya": 20, "overlap": "iou"}
    assert replay.replace(relevance={}) == cfg.replace(fusion="imd")
    ckpt = torch.load(run / "checkpoint-best.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"] == replay.to_dict()
    assert ckpt["model_config"]["size"] == "tiny" and ckpt["model_config"]["audio_dim"] == 16
    prov = ckpt["provenance"]
    assert prov["labels"] == ["class_0", "class_1", "class_2"]
    assert prov["stores"]["frames.zarr"]["settings"]["frames"] == 6
    assert prov["stores"]["relevance.zarr"]["K"] == 10
    assert len(prov["manifest_sha256"]) == 64
    # an existing run is not overwritten without --resume
    again = CliRunner().invoke(app, ["train", "--cache", str(cache), "--out", str(run), "--config", str(cfg_path)])
    assert again.exit_code == 2 and "--resume" in again.output


def test_help_documents_every_option_with_paper_default():
    from imdpipe.cli.main import app

    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--lr", "--weight-decay", "--batch-size", "--epochs", "--alpha", "--scheme", "--fusion",
                 "--size", "--cross-modal-p", "--init-checkpoint", "--resume", "--config", "--optimizer"):
        assert flag in out, flag
    assert "paper: 0.005 with SGD" in out and "paper: 64" in out and "paper: 15" in out and "paper: 1e-4" in out
    assert "paper: 0.25" in out
    assert "--dist-timeout" in out and "(ours: 30; NCCL's own default: 10)" in out


def test_config_validation_and_yaml_errors(tmp_path):
    with pytest.raises(ValueError, match="crop_size"):
        TrainConfig(crop_size=100)
    with pytest.raises(ValueError, match="fusion 'none' needs visual"):
        TrainConfig(fusion="none")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(bad)


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, total=10, warmup=2, min_ratio=0.1) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0)
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(f[1:], f[2:]))


# ---------------------------------------------------------------------------------------------
# Data pipeline
# ---------------------------------------------------------------------------------------------
def test_left_out_videos_counted(cache):
    info = open_cache(cache, audio=True, relevance=True)
    sel = select_videos(info, "train")
    assert len(sel.indices) == 22 and sel.n_left_out == 2
    assert sel.left_out == {"index failed (manifest status error)": 1, "flow stage not done (frames.zarr)": 1}


def test_flip_negates_flow_x_and_resize_scales_pixels():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, size=(2, 8, 12, 2)).astype(np.uint8)
    plain = flow_to_input(q, 8, False, 20.0)
    flipped = flow_to_input(q, 8, True, 20.0)
    assert torch.allclose(flipped[:, 0], -plain[:, 0].flip(-1), atol=1e-5)
    assert torch.equal(flipped[:, 1], plain[:, 1].flip(-1))
    # a uniform 3 px motion right, 1 px down in a 12x8 crop resized to 24x24: x * 2, y * 3
    from imdpipe.pipeline.flow_utils import dequantize, quantize

    u = quantize(np.broadcast_to(np.array([3.0, 1.0], np.float32), (1, 8, 12, 2)))
    v = dequantize(u[0, 0, 0])
    out = flow_to_input(u, 24, False, 20.0)
    assert torch.allclose(out[0, 0], torch.full((24, 24), float(v[0]) * 2), atol=1e-4)
    assert torch.allclose(out[0, 1], torch.full((24, 24), float(v[1]) * 3), atol=1e-4)


def test_train_item_flip_matches_stored_flow(cache):
    """A train item's flow is the stored crop, dequantized, resized, and (when flipped) mirrored with x negated."""
    info = open_cache(cache, audio=True, relevance=True)
    idx = select_videos(info, "train").indices
    ds = ClipDataset(info, idx, mode="train", num_frames=4, frame_stride=1, crop_size=32, crop_scale=(1.0, 1.0),
                     hflip=True, seed=3)
    fx = {}
    for item in (ds[i] for i in range(len(ds))):
        # fixture: flow x is +3 px for even labels, -3 for odd; a flip turns the sign
        assert item["flow"].dtype == torch.uint8 and item["rgb"].dtype == torch.uint8
        flow = flow_pixels(item["flow"][None], item["flow_scale"][None], 20.0)[0]
        fx[item["index"]] = (item["label"], float(flow[:, 0].mean()))
    signs = {np.sign(v) * (1 if lbl % 2 == 0 else -1) for lbl, v in fx.values()}
    assert signs == {1.0, -1.0}  # some flipped, some not
    for _lbl, v in fx.values():
        assert 2.0 < abs(v) < 3.5  # 3 px scaled by 32/44 (or 32/36), never lost


def test_eval_geometry_by_hand():
    assert eval_starts(32, 8, 2, 4) == [0, 6, 11, 17]
    assert eval_starts(6, 4, 1, 1) == [1]
    assert eval_boxes(256, 340, 3) == [(0, 0, 256, 256), (0, 42, 256, 256), (0, 84, 256, 256)]
    assert eval_boxes(340, 256, 3)[2] == (84, 0, 256, 256)
    assert eval_boxes(36, 44, 1) == [(0, 4, 36, 36)]
    # window whose centre is nearest: windows of 10.24 s starting at -3 and 5 -> centres 2.12, 10.12
    assert nearest_window(np.array([-3.0, 5.0]), 10.24, 5.0) == 0
    assert nearest_window(np.array([-3.0, 5.0]), 10.24, 6.2) == 1
    assert clip_centre_time(np.array([0, 10, 20, 30]), np.array([1, 2, 3]), 10.0) == pytest.approx(2.0)


def test_cross_modal_augmentation_swaps_within_class_only(cache):
    info = open_cache(cache, audio=True, relevance=True)
    idx = select_videos(info, "train").indices
    ds = ClipDataset(info, idx, mode="train", num_frames=4, frame_stride=1, crop_size=16, cross_modal_p=1.0,
                     modalities=("audio",), seed=1)
    import zarr

    emb = zarr.open_group(cache / "audio.zarr", mode="r")["embedding"][:]
    target = zarr.open_group(cache / "relevance.zarr", mode="r")["target"][:]
    labels = {r.index: r.label for r in info.manifest.records}
    donors = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            src = item["audio_source"]
            assert src != item["index"] and labels[src] == labels[item["index"]] and src in idx
            windows = [w for w in range(emb.shape[1]) if np.array_equal(emb[src, w].astype(np.float32),
                                                                        item["audio"].numpy())]
            assert windows and item["target"] == pytest.approx(float(target[src, windows[0]]))
            donors.add((item["index"], src))
    assert len(donors) > len(idx)  # donors vary between epochs
    ds_off = ClipDataset(info, idx, mode="train", num_frames=4, frame_stride=1, crop_size=16, cross_modal_p=0.0,
                         modalities=("audio",), seed=1)
    assert all(ds_off[i]["audio_source"] == ds_off[i]["index"] for i in range(len(ds_off)))


def test_dataset_survives_pickling_to_workers(cache):
    info = open_cache(cache, audio=True, relevance=True)
    ds = ClipDataset(info, select_videos(info, "train").indices, num_frames=4, frame_stride=1, crop_size=16)
    first = ds[0]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork")
    batch = next(iter(loader))
    assert batch["rgb"].shape == (4, 4, 3, 16, 16) and batch["flow"].shape == (4, 4, 2, 16, 16)
    assert torch.equal(batch["rgb"][0], first["rgb"])  # same clip in a worker: randomness from (seed, epoch, video)


# ---------------------------------------------------------------------------------------------
# Resume and DDP
# ---------------------------------------------------------------------------------------------
def test_resume_ends_with_same_weights(cache, tmp_path):
    cfg = tiny_config(epochs=2, fusion="gmu", cross_modal_p=0.5, drop_rate=0.1, val_split="last")
    full = train(cache=cache, out=tmp_path / "full", config=cfg, show_progress=False)
    part = train(cache=cache, out=tmp_path / "part", config=cfg, show_progress=False, stop_after_epoch=0)
    assert part["epochs_done"] == 1
    resumed = train(cache=cache, out=tmp_path / "part", resume=True, show_progress=False)
    assert resumed["steps"] == full["steps"]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["weights_sha256"] == full["weights_sha256"]
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines if '"epoch"' in x and '"kind": "epoch"' in x] == [0, 1]
    # TensorBoard: the resumed run purges only what came after its checkpoint; the checkpointed
    # epoch's own record (at the checkpoint's step) stays, so both runs show the same curve
    from imdpipe.train.events import read_scalars

    curves = [read_scalars(tmp_path / name)["epoch/train_loss"] for name in ("full", "part")]
    assert [s for s, _ in curves[1]] == [s for s, _ in curves[0]] and len(curves[0]) == 2
    assert [v for _, v in curves[1]] == pytest.approx([v for _, v in curves[0]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_trains_in_step(cache, tmp_path):
    import torch.multiprocessing as mp
    from train_fixtures import ddp_worker

    cfg = tiny_config(epochs=1, fusion="late-concat", val_split="last", grad_clip=0.0)
    mp.spawn(ddp_worker, args=(2, _free_port(), str(cache), str(tmp_path / "ddp"), str(tmp_path), cfg.to_dict()),
             nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["per_rank_batch"] == r1["per_rank_batch"] == cfg.batch_size // 2  # the global batch is split
    assert r0["weights_sha256"] == r1["weights_sha256"]  # identical replicas after every step
    assert r0["steps"] == r1["steps"] == 22 // 8
    # the same global batches in one process give the same weights (gradients averaged over ranks)
    train(cache=cache, out=tmp_path / "single", config=cfg, show_progress=False)
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_relevance_loss_with_logits_equals_bce_of_rev_in_float32():
    from imdpipe.train.loop import loss_terms

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    rev_logit = torch.tensor([-8.0, -2.0, -0.3, 0.0, 1.5, 9.0])
    targets = torch.tensor([0.1, 0.9, 0.1, 0.9, 0.5, 0.9])
    cfg = TrainConfig(relevance_weight=0.7, label_smoothing=0.0)
    loss, ce, bce = loss_terms(logits, rev_logit, labels, targets, cfg)
    rev = torch.sigmoid(rev_logit.double())
    by_hand = -(targets * rev.log() + (1 - targets) * (1 - rev).log()).mean()
    assert float(bce) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(bce) == pytest.approx(float(torch.nn.functional.binary_cross_entropy(
        torch.sigmoid(rev_logit), targets)), rel=1e-5)  # the float32 rev path it replaces (less exact)
    assert float(loss) == pytest.approx(float(ce) + 0.7 * float(bce), rel=1e-6)
    _, _, none = loss_terms(logits, None, labels, targets, cfg)
    assert float(none) == 0.0


def test_flow_scale_option_reaches_the_flow_stream():
    """--flow-scale s divides flow by s: flow f with s = 2 equals flow 10 f with s = 20 (same weights)."""
    from imdpipe.heads import build_model

    small, paper = (TrainConfig(size="tiny", fusion="none", modalities=("flow",), num_frames=2, crop_size=32,
                                flow_scale=s) for s in (2.0, 20.0))
    assert paper.to_dict()["flow_scale"] == 20.0 and TrainConfig.from_dict(small.to_dict()).flow_scale == 2.0
    torch.manual_seed(0)
    a = build_model(small.model_config(num_classes=3)).eval()
    b = build_model(paper.model_config(num_classes=3)).eval()
    b.load_state_dict(a.state_dict())
    flow = torch.randn(2, 2, 2, 32, 32)
    with torch.no_grad():
        assert torch.allclose(a(None, flow, None)[0], b(None, 10 * flow, None)[0], atol=1e-5)
        assert not torch.allclose(a(None, flow, None)[0], b(None, flow, None)[0], atol=1e-3)
    with pytest.raises(ValueError, match="flow_scale"):
        TrainConfig(flow_scale=0)


def test_patch_size_option_sets_the_token_grid():
    from imdpipe.heads import build_model

    cfg = TrainConfig(size="tiny", fusion="none", modalities=("rgb", "flow"), num_frames=2, crop_size=32, patch_size=8)
    model = build_model(cfg.model_config(num_classes=3))
    for stream in model.visual.streams.values():
        assert stream.patch_embed.num_patches == 16 and stream.pos_embed.shape[1] == 17  # (32 / 8)^2 + CLS
    logits, _ = model(torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 2, 32, 32))
    assert logits.shape == (2, 3)
    with pytest.raises(ValueError, match="multiple of the patch size 12"):
        TrainConfig(size="tiny", fusion="none", modalities=("rgb",), crop_size=32, patch_size=12)
