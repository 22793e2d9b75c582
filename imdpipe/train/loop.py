"""The training loop: ``train(cache=..., out=..., config=...)`` writes a run directory.

Run directory (see docs/_sections/train.md)::

    RUN/config.yaml          the resolved TrainConfig (replay with --config RUN/config.yaml)
    RUN/checkpoint-last.pt   model, optimizer, scheduler, RNG states, config, cache provenance
    RUN/checkpoint-best.pt   the same, at the epoch with the best validation top-1
    RUN/metrics.jsonl        one JSON line per logged step and per epoch
    RUN/training-curves.png  loss, accuracy and learning rate

Loss: ``CE(logits, label) + lambda * BCE(rev, relevance target)`` (paper 3.5; the BCE term only
exists for the IMD fusion). Optimizer: SGD (momentum) or AdamW, linear warmup then cosine decay,
stepped per iteration. Exact resume: the data order comes from the sampler's ``seed + epoch``,
each clip's randomness from ``(seed, epoch, video)``, and torch's RNG is reseeded from
``(seed, epoch, rank)`` at every epoch start, so a run resumed from ``checkpoint-last.pt`` ends
with the same weights as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from imdpipe.train.config import TrainConfig, save_config
from imdpipe.train.data import (
    ClipDataset,
    open_cache,
    prepare_inputs,
    relevance_settings,
    report_selection,
    select_videos,
)
from imdpipe.train.runtime import (
    CHECKPOINT_BEST,
    CHECKPOINT_LAST,
    Dist,
    autocast_context,
    derived_seed,
    init_distributed,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    seed_everything,
    set_rng_states,
    state_sha256,
)

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "training-curves.png"
CONFIG_NAME = "config.yaml"


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------
def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; no weight decay on biases, norms and embeddings of one axis."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def loss_terms(logits, rev, labels, targets, config: TrainConfig):
    """``(loss, ce, bce)``; bce is 0 without a rev (fusions other than IMD)."""
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
    if rev is None or config.relevance_weight == 0 or targets is None:
        return ce, ce.detach(), torch.zeros((), device=ce.device)
    bce = F.binary_cross_entropy(rev.float().clamp(1e-6, 1 - 1e-6), targets.float())
    return ce + config.relevance_weight * bce, ce.detach(), bce.detach()


def resolve_val_split(name: str, splits: set[str], train_split: str) -> str | None:
    if name == "none":
        return None
    if name == "auto":
        for cand in ("val", "validation", "test"):
            if cand in splits and cand != train_split:
                return cand
        return None
    if name not in splits:
        raise ValueError(f"val_split {name!r} is not a split of the manifest (splits: {sorted(splits)})")
    return name


@torch.no_grad()
def score_views(model, loader, *, modalities, device, amp: bool, flow_bound: float = 20.0, progress=None,
                task=None):
    """Forward every view of every video; returns per-video softmax averaged over views and per-view rev.

    Returns a dict of tensors: ``probs`` (N, C), ``labels`` (N,), ``indices`` (N,),
    ``rev`` (N, V) or None, ``target`` (N, V) or None, ``has_audio`` (N,) or None.
    """
    model.eval()
    probs, labels, indices, revs, targets, has_audio = [], [], [], [], [], []
    for batch in loader:
        b = batch["label"].shape[0]
        rgb, flow, audio = prepare_inputs(batch, modalities, device, flow_bound=flow_bound, flatten_views=True)
        with autocast_context(device, amp):
            logits, rev = model(rgb, flow, audio)
        p = logits.float().softmax(-1).view(b, -1, logits.shape[-1]).mean(1)  # average over views
        probs.append(p.cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
        if rev is not None:
            revs.append(rev.float().view(b, -1).cpu())
        if "target" in batch:
            targets.append(batch["target"].float())
        if "has_audio" in batch:
            has_audio.append(batch["has_audio"])
        if progress is not None:
            progress.advance(task, b)
    cat = (lambda xs: torch.cat(xs) if xs else None)
    return {"probs": cat(probs), "labels": cat(labels), "indices": cat(indices), "rev": cat(revs),
            "target": cat(targets), "has_audio": cat(has_audio)}


def _write_curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="loss (step)")
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="loss (epoch)")
        if any(r.get("train_bce") for r in epochs):
            ax.plot([r["step"] for r in epochs], [r["train_bce"] for r in epochs], "s--", label="BCE(rev)")
    ax.set_xlabel("step"), ax.set_title("training loss"), ax.legend(fontsize=8)
    ax = axes[1]
    if epochs:
        ax.plot([r["epoch"] for r in epochs], [r["train_top1"] for r in epochs], "o-", label="train top-1")
        val = [r for r in epochs if r.get("val_top1") is not None]
        if val:
            ax.plot([r["epoch"] for r in val], [r["val_top1"] for r in val], "s-", label="val top-1")
    ax.set_xlabel("epoch"), ax.set_ylabel("%"), ax.set_title("accuracy"), ax.legend(fontsize=8)
    ax = axes[2]
    if steps:
        ax.plot([r["step"] for r in steps], [r["lr"] for r in steps])
    ax.set_xlabel("step"), ax.set_title("learning rate")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def _progress(console, show: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:.1f} clips/s"), TextColumn("loss {task.fields[loss]:.4f}"),
                    TimeElapsedColumn(), console=console, disable=not show, transient=False)


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------
def train(*, cache: str | Path, out: str | Path, config: TrainConfig | None = None, resume: bool = False,
          console=None, show_progress: bool = True, stop_after_epoch: int | None = None) -> dict:
    """Train a head on a cache and write the run directory ``out``.

    Under torchrun (``WORLD_SIZE > 1``) every process calls this; the global batch is split
    over them (DistributedSampler) and only rank 0 writes files.

    Args:
        cache: the cache root (manifest.csv, frames.zarr, audio.zarr, relevance.zarr).
        out: the run directory (created; an existing run is only continued with ``resume``).
        config: the settings (default: paper defaults). Ignored with ``resume``: the
            checkpoint's settings are used.
        resume: continue from ``out/checkpoint-last.pt``.
        console: a ``rich.console.Console`` (default: stderr).
        show_progress: draw progress bars.
        stop_after_epoch: stop once this epoch (0-based) is checkpointed, as if killed there
            (for resume tests).

    Returns:
        A summary dict (epochs, steps, losses, best validation top-1, clips/s, weights hash, ...).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    out = Path(out)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out / CHECKPOINT_LAST)
        config = TrainConfig.from_dict(ckpt["config"])
    else:
        config = config or TrainConfig()
        if (out / CHECKPOINT_LAST).exists():
            raise FileExistsError(f"{out} already holds a run ({CHECKPOINT_LAST}); pass --resume to continue it "
                                  f"or choose another --out.")
    if config.threads:
        torch.set_num_threads(config.threads)
    ddp, device = init_distributed(config.device)
    try:
        return _train(cache=Path(cache), out=out, config=config, ckpt=ckpt, console=console, ddp=ddp,
                      device=device, show_progress=show_progress and ddp.main, stop_after_epoch=stop_after_epoch)
    finally:
        ddp.close()


def _train(*, cache: Path, out: Path, config: TrainConfig, ckpt: dict | None, console, ddp: Dist,
           device: torch.device, show_progress: bool, stop_after_epoch: int | None) -> dict:
    from imdpipe.heads import build_model
    from imdpipe.train.data import compare_provenance

    say = console.print if ddp.main else (lambda *a, **k: None)
    t_start = time.perf_counter()
    info = open_cache(cache, audio=config.uses_audio, relevance=config.uses_relevance)
    if ckpt is not None:
        problems, notes = compare_provenance(ckpt["provenance"], info.provenance)
        if problems or notes:
            raise ValueError(f"cannot resume {out} on {cache}: the cache differs from the one the run started on:\n  "
                             + "\n  ".join(problems + notes))
    config = config.replace(relevance=relevance_settings(info))
    splits = {r.split for r in info.manifest.records}
    if config.train_split not in splits:
        raise ValueError(f"train_split {config.train_split!r} is not a split of {cache}/manifest.csv "
                         f"(splits: {sorted(splits)})")
    val_split = resolve_val_split(config.val_split, splits, config.train_split)
    train_sel = select_videos(info, config.train_split)
    if ddp.main:
        report_selection(train_sel, config.train_split, console)
    if not train_sel.indices:
        raise ValueError(f"no usable training videos in {cache} (split {config.train_split!r})")
    if config.batch_size % ddp.world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {ddp.world} processes")
    per_rank = config.batch_size // ddp.world

    data_kw = dict(modalities=config.modalities, relevance=config.uses_relevance, num_frames=config.num_frames,
                   frame_stride=config.frame_stride, crop_size=config.crop_size, seed=config.seed)
    train_ds = ClipDataset(info, train_sel.indices, mode="train", crop_scale=config.crop_scale, hflip=config.hflip,
                           cross_modal_p=config.cross_modal_p, **data_kw)
    sampler = DistributedSampler(train_ds, num_replicas=ddp.world, rank=ddp.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_ds)} training videos do not fill one batch of {config.batch_size}; "
                         f"lower --batch-size")
    val_loader = None
    if val_split is not None and ddp.main:
        val_sel = select_videos(info, val_split)
        report_selection(val_sel, val_split, console)
        if val_sel.indices:
            val_ds = ClipDataset(info, val_sel.indices, mode="eval", clips=1, crops=1, **data_kw)
            val_loader = DataLoader(val_ds, batch_size=config.eval_batch_size, shuffle=False,
                                    num_workers=min(config.num_workers, 1))

    seed_everything(config.seed)
    model_cfg = config.model_config(num_classes=len(info.labels), audio_dim=info.audio_dim)
    raw_model = build_model(model_cfg, init_checkpoint=config.init_checkpoint if ckpt is None else None).to(device)
    optimizer = build_optimizer(raw_model, config)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=total_steps, warmup=warmup, min_ratio=config.min_lr_ratio))
    start_epoch, step, best = 0, 0, None
    history: list[dict] = []
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_states(ckpt["rng"])
        start_epoch, step, best = ckpt["epoch"] + 1, ckpt["step"], ckpt.get("best")
        history = [r for r in _read_metrics(out / METRICS_NAME) if r["epoch"] <= ckpt["epoch"]]
    model = raw_model
    if ddp.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)

    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / CONFIG_NAME)
        _write_metrics(out / METRICS_NAME, history)
        say(f"training {model_cfg.size} / {model_cfg.fusion} on {', '.join(model_cfg.modalities)}: "
            f"{len(train_ds)} videos, {len(info.labels)} classes, {steps_per_epoch} steps/epoch x {config.epochs} "
            f"epochs, batch {config.batch_size} ({ddp.world} process(es)), {device.type}"
            + (f", resuming after epoch {start_epoch}" if ckpt is not None else ""))

    loader_kw = dict(batch_size=per_rank, sampler=sampler, num_workers=config.num_workers, drop_last=True,
                     pin_memory=device.type == "cuda")
    seen_clips, train_seconds, last_epoch = 0, 0.0, start_epoch - 1
    last = {}
    with _progress(console, show_progress) as progress:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            train_ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            torch.manual_seed(derived_seed(config.seed, epoch, ddp.rank))  # dropout etc.: exact on resume
            loader = DataLoader(train_ds, **loader_kw)
            task = progress.add_task(f"epoch {epoch + 1}/{config.epochs}", total=steps_per_epoch, rate=0.0, loss=0.0)
            sums = [0.0] * 5  # loss, ce, bce, correct, clips (local)
            t0 = time.perf_counter()
            for batch in loader:
                rgb, flow, audio = prepare_inputs(batch, config.modalities, device, flow_bound=info.flow_bound)
                labels = batch["label"].to(device)
                targets = batch["target"].to(device) if "target" in batch else None
                with autocast_context(device, config.amp):
                    logits, rev = model(rgb, flow, audio)
                loss, ce, bce = loss_terms(logits, rev, labels, targets, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                n = labels.shape[0]
                correct = (logits.argmax(-1) == labels).sum().item()
                for k, v in enumerate((loss.item() * n, ce.item() * n, bce.item() * n, correct, n)):
                    sums[k] += v
                rate = sums[4] * ddp.world / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, advance=1, rate=rate, loss=loss.item())
                if ddp.main and step % config.log_every == 0:
                    rec = {"kind": "step", "epoch": epoch, "step": step, "loss": loss.item(), "ce": ce.item(),
                           "bce": bce.item(), "lr": scheduler.get_last_lr()[0], "clips_per_s": rate}
                    history.append(rec)
                    _append_metric(out / METRICS_NAME, rec)
            seconds = time.perf_counter() - t0
            sums = ddp.all_sum(sums, device)
            seen_clips += int(sums[4])
            train_seconds += seconds
            rec = {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": sums[0] / sums[4],
                   "train_ce": sums[1] / sums[4], "train_bce": sums[2] / sums[4],
                   "train_top1": 100 * sums[3] / sums[4], "lr": scheduler.get_last_lr()[0],
                   "clips_per_s": sums[4] / seconds, "seconds": seconds, "val_top1": None, "val_loss": None}
            if val_loader is not None:
                res = score_views(raw_model, val_loader, modalities=config.modalities, device=device, amp=config.amp,
                                  flow_bound=info.flow_bound)
                rec["val_top1"] = 100 * (res["probs"].argmax(-1) == res["labels"]).float().mean().item()
                rec["val_loss"] = F.nll_loss(res["probs"].clamp_min(1e-12).log(), res["labels"]).item()
            if ddp.main:
                key = (rec["val_top1"], -rec["val_loss"]) if rec["val_top1"] is not None else (-rec["train_loss"],)
                improved = best is None or tuple(key) > tuple(best["key"])
                if improved:
                    best = {"key": list(key), "epoch": epoch, "val_top1": rec["val_top1"],
                            "train_loss": rec["train_loss"]}
                history.append(rec)
                _append_metric(out / METRICS_NAME, rec)
                state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": rng_states(), "epoch": epoch, "step": step,
                         "best": best, "config": config.to_dict(), "model_config": _model_config_dict(model_cfg),
                         "provenance": info.provenance, "labels": list(info.labels), "metrics": rec}
                save_checkpoint(state, out / CHECKPOINT_LAST)
                if improved:
                    save_checkpoint(state, out / CHECKPOINT_BEST)
                _write_curves(history, out / CURVES_NAME)
                val = f", val top-1 {rec['val_top1']:.1f}%" if rec["val_top1"] is not None else ""
                say(f"epoch {epoch + 1}: loss {rec['train_loss']:.4f} (ce {rec['train_ce']:.4f}, "
                    f"bce {rec['train_bce']:.4f}), train top-1 {rec['train_top1']:.1f}%{val}, "
                    f"{rec['clips_per_s']:.1f} clips/s" + (" [best]" if improved else ""))
            ddp.barrier()
            last, last_epoch = rec, epoch
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break

    summary = {
        "run": str(out), "epochs_done": last_epoch + 1, "epochs": config.epochs, "steps": step,
        "train_videos": len(train_ds), "left_out": train_sel.n_left_out,
        "final_train_loss": last.get("train_loss"), "final_train_top1": last.get("train_top1"),
        "best_epoch": best["epoch"] if best else None, "best_val_top1": best["val_top1"] if best else None,
        "clips_per_s": seen_clips / train_seconds if train_seconds else None,
        "seconds": time.perf_counter() - t_start, "world_size": ddp.world, "per_rank_batch": per_rank,
        "device": str(device), "weights_sha256": state_sha256(raw_model.state_dict()),
    }
    if ddp.main:
        _print_summary(summary, console)
    return summary


def _model_config_dict(cfg) -> dict:
    from dataclasses import asdict

    d = asdict(cfg)
    d["modalities"] = list(cfg.modalities)
    return d


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_metrics(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def _append_metric(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _print_summary(summary: dict, console) -> None:
    from rich.table import Table

    table = Table(title="training summary", show_header=False)
    fmt = {"final_train_loss": "{:.4f}", "final_train_top1": "{:.1f}%", "best_val_top1": "{:.1f}%",
           "clips_per_s": "{:.1f}", "seconds": "{:.1f}"}
    for key in ("run", "epochs_done", "steps", "train_videos", "left_out", "final_train_loss", "final_train_top1",
                "best_epoch", "best_val_top1", "clips_per_s", "seconds", "world_size", "device"):
        value = summary[key]
        table.add_row(key.replace("_", " "), "-" if value is None else fmt.get(key, "{}").format(value))
    console.print(table)
