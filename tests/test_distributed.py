"""What a multi-GPU run relies on, checked on CPU: exact rank parts for scoring, a training step
that creates every tensor on its input's device, and running sums that equal the host's."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from imdpipe.train import data, loop
from imdpipe.train.config import TrainConfig
from imdpipe.train.loop import StepSums, build_optimizer, train_step
from imdpipe.train.runtime import Dist

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Dist.part: the validation / evaluate split over ranks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_parts_are_contiguous_disjoint_balanced_and_cover_in_order(world):
    for n in range(0, 20):
        items = [f"video{i}" for i in range(n)]
        parts = [Dist(rank=r, world=world).part(items) for r in range(world)]
        assert sum(parts, []) == items  # in rank order: the 1-process order, nothing twice or missing
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert Dist(rank=1, world=2).part(range(9)) == [5, 6, 7, 8]  # by hand: 5 + 4


# ---------------------------------------------------------------------------------------------
# Device placement of one real training step
# ---------------------------------------------------------------------------------------------
class DeviceLog(TorchDispatchMode):
    """Records every tensor an op takes or makes that is not on ``device`` (the batch's own tensors,
    which the step copies to the device, excepted)."""

    def __init__(self, device: torch.device, batch: dict):
        super().__init__()
        self.device, self.batch, self.strays = device, list(batch.values()), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.device != self.device and not any(t is b for b in self.batch):
                self.strays.append(f"{func} {t.device.type} {tuple(t.shape)}")
        return out


def _tiny(fusion: str = "imd"):
    from imdpipe.heads import build_model

    cfg = TrainConfig(size="tiny", fusion=fusion, crop_size=32, num_frames=2, frame_stride=1, batch_size=4,
                      device="cpu", grad_clip=1.0, relevance_weight=1.0)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model_config(num_classes=3, audio_dim=16, flow_bound=20.0))


def _batch(seed: int = 0, B: int = 4) -> dict:
    """A collated batch as the training loader hands it out (uint8 frames, CPU)."""
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randint(0, 256, (B, 2, 3, 32, 32), generator=g, dtype=torch.uint8),
            "flow": torch.randint(0, 256, (B, 2, 2, 32, 32), generator=g, dtype=torch.uint8),
            "flow_scale": torch.ones(B, 2), "audio": torch.randn(B, 16, generator=g),
            "label": torch.randint(0, 3, (B,), generator=g), "target": torch.rand(B, generator=g, dtype=torch.float64),
            "has_audio": torch.ones(B, dtype=torch.bool)}


def _meta_step_strays(monkeypatch=None) -> list[str]:
    """Strays of the second step (the first fills the per-device constant caches) on the meta device."""
    cfg, model = _tiny()
    meta = torch.device("meta")
    model = model.to(meta)
    opt = build_optimizer(model, cfg)
    sums = StepSums(meta)
    train_step(model, opt, _batch(0), sums, config=cfg, device=meta, flow_bound=20.0)
    batch = _batch(1)
    with DeviceLog(meta, batch) as log:
        loss, ce, bce, rev = train_step(model, opt, batch, sums, config=cfg, device=meta, flow_bound=20.0)
    assert loss.device == meta and rev is not None and rev.device == meta
    assert opt.state and all(s["momentum_buffer"].device == meta for s in opt.state.values())  # the step ran
    return log.strays


def test_training_step_creates_every_tensor_on_the_input_device():
    """Forward (IMD, both streams, audio), loss_terms, backward, clipping, SGD and the running sums
    on ``meta``: any tensor made on the CPU (a constant re-sent, a 0-dim CPU scalar mixed in, which
    CUDA accepts silently with a copy per step) shows up here."""
    assert _meta_step_strays() == []


def test_device_log_catches_a_cpu_tensor_in_the_step(monkeypatch):
    real = loop.loss_terms

    def with_cpu_scalar(*args, **kwargs):
        loss, ce, bce = real(*args, **kwargs)
        return loss + torch.tensor(0.0), ce, bce  # a 0-dim CPU tensor: legal on any device, a sync on CUDA

    monkeypatch.setattr(loop, "loss_terms", with_cpu_scalar)
    strays = _meta_step_strays()
    assert strays and all(" cpu " in s for s in strays), strays


def test_device_log_catches_constants_resent_every_step(monkeypatch):
    monkeypatch.setattr(data, "_rgb_stats", lambda device: (data._MEAN.to(device), data._STD.to(device)))
    strays = _meta_step_strays()
    assert any("_to_copy" in s and "(3, 1, 1)" in s for s in strays), strays


# ---------------------------------------------------------------------------------------------
# Running sums on the device equal the host-side accumulation they replace
# ---------------------------------------------------------------------------------------------
def test_step_sums_equal_per_step_item_accumulation():
    cfg, model = _tiny()
    opt = build_optimizer(model, cfg)
    sums, cpu = StepSums(torch.device("cpu")), torch.device("cpu")
    host = [0.0] * 7  # loss x n, ce x n, bce x n, correct, clips, rev, dropped: what .item() per step summed
    rev32 = torch.zeros(2)
    for step in range(4):
        batch = _batch(step, B=3 + step)
        loss, ce, bce, rev = train_step(model, opt, batch, sums, config=cfg, device=cpu, flow_bound=20.0)
        n = len(batch["label"])
        host[0] += loss.item() * n
        host[1] += ce.item() * n
        host[2] += bce.item() * n
        host[4] += n
        rev32 += torch.stack([rev.sum(), (rev < model.relevance_threshold).sum()])
        assert float(bce) > 0 and torch.isfinite(loss)
    totals = sums.totals(Dist(), cpu)
    assert [totals.loss, totals.ce, totals.bce, totals.clips] == [host[0], host[1], host[2], host[4]]  # bit for bit
    assert [totals.rev, totals.dropped] == rev32.tolist()
    assert 0 <= totals.correct <= totals.clips == 3 + 4 + 5 + 6


# ---------------------------------------------------------------------------------------------
# --dist-timeout reaches the process group
# ---------------------------------------------------------------------------------------------
class _Joined(Exception):
    pass


def test_dist_timeout_reaches_init_distributed_from_train_and_evaluate(monkeypatch, tmp_path):
    from datetime import timedelta

    from typer.testing import CliRunner

    from imdpipe.cli.main import app
    from imdpipe.train import evaluate as evaluate_mod
    from imdpipe.train import runtime

    seen = []

    def record(device_name="auto", *, timeout_min):
        seen.append(timeout_min)
        raise _Joined

    monkeypatch.setattr(loop, "init_distributed", record)
    with pytest.raises(_Joined):
        loop.train(cache=tmp_path, out=tmp_path / "run", config=TrainConfig(size="tiny", dist_timeout=7.5))
    # evaluate: a checkpoint with a config is all it reads before joining the group
    torch.save({"model": {}, "model_config": {}, "config": TrainConfig(size="tiny").to_dict()}, tmp_path / "c.pt")
    monkeypatch.setattr(evaluate_mod, "init_distributed", record)
    result = CliRunner().invoke(app, ["evaluate", "--run-dir", str(tmp_path / "c.pt"), "--cache", str(tmp_path),
                                      "--dist-timeout", "12"])
    assert isinstance(result.exception, _Joined), result.output
    assert seen == [7.5, 12.0]
    assert TrainConfig().dist_timeout == 30.0
    with pytest.raises(ValueError, match="dist_timeout"):
        TrainConfig(dist_timeout=0)
    # and init_distributed hands it to torch.distributed as a timedelta
    calls = {}
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda **kw: calls.update(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    ddp, device = runtime.init_distributed("cpu", timeout_min=12)
    assert calls["timeout"] == timedelta(minutes=12) and calls["backend"] == "gloo" and ddp.rank == 1
