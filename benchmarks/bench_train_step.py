"""Training steps/s: host syncs after every step (the loop before #15) vs running sums on the device.

Both variants run the same step on the same batches, model and optimizer settings (the real
:func:`imdpipe.train.loop.train_step` pieces: prepare_inputs, the model, loss_terms, backward,
clipping, SGD):

* ``sync``: the old loop body: five ``.item()`` reads per step (loss, ce, bce, correct clips for
  the epoch totals, the loss again for the progress bar), the normalization constants sent to the
  device every step, blocking label copies;
* ``sums``: :func:`~imdpipe.train.loop.train_step` with :class:`~imdpipe.train.loop.StepSums`:
  nothing read back until ``--log-every`` steps (one ``.tolist()``).

Rounds of the two alternate, so load from other jobs hits both alike; the ratio of the medians is
printed, not a time. On CPU a ``.item()`` only reads memory (kernels run synchronously), so the
ratio is expected near 1. On CUDA each ``.item()`` waits until the GPU has finished every queued
kernel, emptying the launch queue the host had filled ahead; the effect grows as the step gets
shorter relative to Python overhead. That has not been measured here (no GPU); run this with
``--device cuda`` on one. Usage::

    .venv/bin/python benchmarks/bench_train_step.py [--device cpu] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from imdpipe.heads import build_model
from imdpipe.train import data
from imdpipe.train.config import TrainConfig
from imdpipe.train.loop import StepSums, build_optimizer, loss_terms, train_step
from imdpipe.train.runtime import Dist, autocast_context, select_device


def batches(n: int, *, batch: int, frames: int, size: int, audio_dim: int, classes: int, seed: int = 0) -> list:
    """Collated batches as the training loader hands them out (uint8 frames; pinned on CUDA)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {"rgb": torch.randint(0, 256, (batch, frames, 3, size, size), generator=g, dtype=torch.uint8),
             "flow": torch.randint(0, 256, (batch, frames, 2, size, size), generator=g, dtype=torch.uint8),
             "flow_scale": torch.ones(batch, 2), "audio": torch.randn(batch, audio_dim, generator=g),
             "label": torch.randint(0, classes, (batch,), generator=g),
             "target": torch.rand(batch, generator=g, dtype=torch.float64)}
        out.append({k: v.pin_memory() if torch.cuda.is_available() else v for k, v in b.items()})
    return out


def sync_step(model, optimizer, batch: dict, totals: list, *, config: TrainConfig, device) -> None:
    """The training step as the loop ran it before: host reads every step."""
    x = {k: batch[k].to(device) for k in ("rgb", "flow", "audio")}
    rgb = (x["rgb"].float() - data._MEAN.to(device)) / data._STD.to(device)  # constants re-sent each step
    flow = data.flow_pixels(x["flow"], batch["flow_scale"].to(device), 20.0)
    labels, targets = batch["label"].to(device), batch["target"].to(device)
    with autocast_context(device, config.amp):
        logits, rev, rev_logit = model(rgb, flow, x["audio"].float(), rev_logit=True)
    loss, ce, bce = loss_terms(logits, rev_logit, labels, targets, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    n = labels.shape[0]
    totals[0] += loss.item() * n
    totals[1] += ce.item() * n
    totals[2] += bce.item() * n
    totals[3] += (logits.argmax(-1) == labels).sum().item()
    totals[4] = loss.item()  # the progress bar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per variant, alternating")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    cfg = TrainConfig(size=args.size, crop_size=args.crop, num_frames=args.frames, frame_stride=1,
                      batch_size=args.batch, grad_clip=1.0, from_scratch=True, device=device.type)
    torch.manual_seed(0)
    model = build_model(cfg.model_config(num_classes=10, audio_dim=768, flow_bound=20.0)).to(device).train()
    optimizer = build_optimizer(model, cfg)
    data_ = batches(args.steps, batch=args.batch, frames=args.frames, size=args.crop, audio_dim=768, classes=10)

    def run_sync() -> None:
        totals = [0.0] * 5
        for b in data_:
            sync_step(model, optimizer, b, totals, config=cfg, device=device)

    def run_sums() -> None:
        sums = StepSums(device)
        for step, b in enumerate(data_, 1):
            loss, ce, bce, _ = train_step(model, optimizer, b, sums, config=cfg, device=device, flow_bound=20.0)
            if step % args.log_every == 0:
                torch.stack([loss, ce, bce]).tolist()
        sums.totals(Dist(), device)

    run_sync()  # warm-up: allocator, per-device constants
    run_sums()
    rates = {"sync": [], "sums": []}
    for _ in range(args.rounds):
        for name, fn in (("sync", run_sync), ("sums", run_sums)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates[name].append(args.steps / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.size} model, {args.frames}x{args.crop} px, batch {args.batch}, {device}: {args.rounds} rounds of "
          f"{args.steps} steps per variant")
    for name in ("sync", "sums"):
        print(f"  {name}: median {med[name]:.2f} steps/s (rounds: {', '.join(f'{r:.2f}' for r in rates[name])})")
    print(f"  sums / sync = {med['sums'] / med['sync']:.3f}")

if __name__ == "__main__":
    main()
