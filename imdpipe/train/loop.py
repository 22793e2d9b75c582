"""The training loop: ``train(cache=..., out=..., config=...)`` writes a run directory.

Run directory (cache_layout.md, "Run directory")::

    RUN/config.yaml          the resolved TrainConfig (replay with --config RUN/config.yaml)
    RUN/checkpoint-last.pt   model, optimizer, scheduler, RNG states, config, cache provenance
    RUN/checkpoint-best.pt   the same, at the epoch with the best validation top-1 (not with --val-split last)
    RUN/metrics.jsonl        one JSON line per logged step and per epoch
    RUN/events.out.tfevents.*  the same numbers for TensorBoard (tensorboard --logdir RUN)
    RUN/training-curves.png  loss, accuracy and learning rate

Loss: ``CE(logits, label) + lambda * BCE(rev, relevance target)`` (paper 3.5; the BCE term only
exists for the IMD fusion). Optimizer: SGD (momentum) or AdamW; learning rate per iteration from
the recipe's schedule (TimeSformer's step decay, or linear warmup then cosine decay). Model
selection (:func:`resolve_val_split`): a seeded, class-stratified hold-out of the training split
by default, never the split that gets reported. Exact resume: the data order comes from the
sampler's ``seed + epoch``, each clip's randomness from ``(seed, epoch, video)``, and torch's RNG
is reseeded from ``(seed, epoch, rank)`` at every epoch start, so a run resumed from
``checkpoint-last.pt`` ends with the same weights as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from imdpipe.train.config import VAL_HOLDOUT, VAL_LAST, TrainConfig, save_config
from imdpipe.train.data import (
    ClipDataset,
    EpochSampler,
    clip_fit_warnings,
    loader_kwargs,
    loader_workers,
    open_cache,
    prepare_inputs,
    relevance_settings,
    report_selection,
    select_videos,
)
from imdpipe.train.evaluate import score_views
from imdpipe.train.events import EventWriter
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


def step_lr_factor(step: int, *, steps_per_epoch: int, milestones, gamma: float, warmup: int = 0) -> float:
    """TimeSformer's step schedule: ``gamma`` to the number of milestones (epoch indices) reached.

    Epoch ``e`` (0-based) runs at ``gamma ** #{m in milestones: e >= m}``: with milestones (11, 14)
    and 15 epochs, 11 epochs at lr, 3 at lr/10, 1 at lr/100 (TimeSformer's ``steps_with_relative_lrs``
    with steps [0, 11, 14] and lrs [1, 0.1, 0.01]). An optional linear warmup over the first steps.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    epoch = step // steps_per_epoch
    return gamma ** sum(epoch >= m for m in milestones)


def schedule(config: TrainConfig, steps_per_epoch: int):
    """The per-step learning-rate factor of ``config.lr_schedule`` (for ``LambdaLR``)."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "step":
        return lambda s: step_lr_factor(s, steps_per_epoch=steps_per_epoch, milestones=config.lr_milestones,
                                        gamma=config.lr_gamma, warmup=warmup)
    total = steps_per_epoch * config.epochs
    return lambda s: lr_factor(s, total=total, warmup=warmup, min_ratio=config.min_lr_ratio)


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


def loss_terms(logits, rev_logit, labels, targets, config: TrainConfig):
    """``(loss, ce, bce)``; bce is 0 without a relevance logit (fusions other than IMD).

    The BCE takes IMD's float32 relevance logit (``binary_cross_entropy_with_logits``): the
    same value as the BCE of ``rev = sigmoid(logit)`` in float32, with a gradient that does
    not vanish where a bf16 sigmoid rounds to 1.
    """
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
    if rev_logit is None or config.relevance_weight == 0 or targets is None:
        return ce, ce.detach(), torch.zeros((), device=ce.device)
    bce = F.binary_cross_entropy_with_logits(rev_logit.float(), targets.float())
    return ce + config.relevance_weight * bce, ce.detach(), bce.detach()


def init_source(spec: str) -> str:
    """What ``--init-checkpoint`` names, as :func:`imdpipe.heads.init_model` takes it: a run
    directory becomes its checkpoint-best.pt (the selected epoch), else its checkpoint-last.pt."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return spec
    for name in (CHECKPOINT_BEST, CHECKPOINT_LAST):
        if (path / name).is_file():
            return str(path / name)
    raise FileNotFoundError(f"--init-checkpoint {spec}: the directory holds neither {CHECKPOINT_BEST} nor "
                            f"{CHECKPOINT_LAST} (is it a run directory written by `imdpipe train`?)")


def resolve_val_split(config: TrainConfig, manifest, usable: list[int]) -> tuple[list[int], list[int] | None, str]:
    """What the run trains on and selects on: ``(train indices, validation indices or None, selected_on)``.

    * ``holdout``: a class-stratified, seeded ``val_fraction`` of the training split's manifest
      rows (:func:`imdpipe.pipeline.splits.stratified_split`, keyed by video id, so the hold-out
      does not move when a video's extraction fails or is repaired); never trained on.
    * ``last``: no selection; ``selected_on`` is ``last``.
    * a split name: that split (not the training one) picks checkpoint-best.pt; evaluate then
      refuses to report it.

    ``usable`` are the training split's videos every needed stage finished.
    """
    from imdpipe.pipeline.splits import stratified_split

    name = config.val_split
    if name == VAL_LAST:
        return usable, None, VAL_LAST
    if name == VAL_HOLDOUT:
        rows = [r for r in manifest.records if r.split == config.train_split]
        groups = stratified_split([r.video_id for r in rows], [r.label for r in rows],
                                  (1 - config.val_fraction, config.val_fraction), config.seed)
        held = {r.index for r, g in zip(rows, groups) if g == 1}
        val = [i for i in usable if i in held]
        if not val:
            raise ValueError(f"a --val-fraction {config.val_fraction} hold-out of the {len(rows)} training videos "
                             f"holds none (each class keeps round(fraction x its videos)); raise --val-fraction, "
                             f"name a validation split with --val-split, or pass --val-split last (no selection)")
        return [i for i in usable if i not in held], val, VAL_HOLDOUT
    splits = {r.split for r in manifest.records}
    if name not in splits:
        raise ValueError(f"val_split {name!r} is not a split of the manifest (splits: {sorted(splits)}); use "
                         f"{VAL_HOLDOUT!r}, {VAL_LAST!r} or a split name")
    if name == config.train_split:
        raise ValueError(f"val_split {name!r} is the training split; use {VAL_HOLDOUT!r} to hold out part of it")
    return usable, None, name


def _write_curves(records: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
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
        config.check_init()  # before anything is opened or built
        config.check_val_split()
        if (out / CHECKPOINT_LAST).exists():
            raise FileExistsError(f"{out} already holds a run ({CHECKPOINT_LAST}); pass --resume to continue it "
                                  f"or choose another --out.")
    if config.threads:
        torch.set_num_threads(config.threads)
    ddp, device = init_distributed(config.device, timeout_min=config.dist_timeout)
    try:
        return _train(cache=Path(cache), out=out, config=config, ckpt=ckpt, console=console, ddp=ddp,
                      device=device, show_progress=show_progress and ddp.main, stop_after_epoch=stop_after_epoch)
    finally:
        ddp.close()


@dataclass
class EpochTotals:
    """Sums over one epoch's training steps, over every process (:meth:`StepSums.totals`)."""

    loss: float = 0.0  # sum over clips of the loss
    ce: float = 0.0
    bce: float = 0.0
    correct: float = 0.0  # clips whose arg-max is the label
    clips: float = 0.0
    rev: float = 0.0  # sum of IMD's rev over clips
    dropped: float = 0.0  # clips with rev < alpha (their audio masked)


class StepSums:
    """One process's running sums over an epoch's training steps, kept on the device.

    A step adds its numbers without reading anything back: ``.item()`` makes the host wait until
    the device has finished every queued kernel, which on CUDA drains the launch queue once per
    call. The sums are read once per epoch (:meth:`totals`); the step records read their own
    step's losses every ``log_every`` steps. The values equal host-side float64 accumulation of
    the same numbers (``loss * n`` in float64, in step order).
    """

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss x n, ce x n, bce x n, correct
        self.rev = torch.zeros(2, device=device)  # IMD: sum of rev, clips with rev < alpha (float32)
        self.clips = 0  # the batch sizes are known on the host

    def add(self, loss, ce, bce, logits, labels, rev, alpha: float) -> None:
        """One step: mean losses over its ``len(labels)`` clips, their logits and IMD's rev (or None)."""
        n = labels.shape[0]
        self.sums += torch.stack([loss.detach().double() * n, ce.double() * n, bce.double() * n,
                                  (logits.detach().argmax(-1) == labels).sum().double()])
        self.clips += n
        if rev is not None:
            self.rev += torch.stack([rev.sum(), (rev < alpha).sum()])

    def totals(self, ddp: Dist, device: torch.device) -> EpochTotals:
        """The sums over every process: one all-reduce, one read."""
        local = torch.cat([self.sums, self.sums.new_tensor([self.clips]), self.rev.double()])
        return EpochTotals(*ddp.all_sum(local, device))


def train_step(model, optimizer: torch.optim.Optimizer, batch: dict, sums: StepSums, *, config: TrainConfig,
               device: torch.device, flow_bound: float, raw_model: torch.nn.Module | None = None):
    """One optimizer step on a collated batch, added to ``sums``; reads nothing back to the host.

    Args:
        model: what the forward runs (maybe DDP-wrapped or compiled); ``raw_model`` (default:
            ``model``) holds the parameters clipped and IMD's threshold.

    Returns:
        ``(loss, ce, bce, rev)`` as detached device tensors (rev None without IMD).
    """
    raw_model = model if raw_model is None else raw_model
    rgb, flow, audio = prepare_inputs(batch, config.modalities, device, flow_bound=flow_bound)
    labels = batch["label"].to(device, non_blocking=True)
    targets = batch["target"].to(device, non_blocking=True) if "target" in batch else None
    with autocast_context(device, config.amp):
        logits, rev, rev_logit = model(rgb, flow, audio, rev_logit=True)
    loss, ce, bce = loss_terms(logits, rev_logit, labels, targets, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
    optimizer.step()
    rev = rev.detach().float() if rev is not None else None
    sums.add(loss, ce, bce, logits, labels, rev, raw_model.relevance_threshold)
    return loss.detach(), ce, bce, rev


@dataclass
class _Run:
    """What one training process holds between epochs (built by :func:`_setup`)."""

    config: TrainConfig
    info: object  # CacheInfo
    out: Path
    ddp: Dist
    device: torch.device
    say: object  # console.print on rank 0, a no-op elsewhere
    model_cfg: object  # heads.ModelConfig
    raw_model: torch.nn.Module
    model: torch.nn.Module  # raw_model, maybe wrapped in DDP / compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_sel: object  # Selection
    train_ds: ClipDataset
    sampler: DistributedSampler
    loader: DataLoader  # built once: persistent workers get each epoch through EpochSampler
    val_loader: DataLoader | None  # this process's part of the validation videos (Dist.part)
    per_rank: int
    steps_per_epoch: int
    start_epoch: int = 0
    step: int = 0
    best: dict | None = None
    history: list[dict] = field(default_factory=list)
    selected_on: str = VAL_LAST  # what picks checkpoint-best.pt: holdout, a split name, or last (nothing)
    val_videos: int = 0
    events: EventWriter | None = None  # TensorBoard, rank 0


def _train(*, cache: Path, out: Path, config: TrainConfig, ckpt: dict | None, console, ddp: Dist,
           device: torch.device, show_progress: bool, stop_after_epoch: int | None) -> dict:
    t_start = time.perf_counter()
    run = _setup(cache=cache, out=out, config=config, ckpt=ckpt, console=console, ddp=ddp, device=device)
    seen_clips, train_seconds, last_epoch, last = 0, 0.0, run.start_epoch - 1, {}
    with _progress(console, show_progress) as progress:
        for epoch in range(run.start_epoch, run.config.epochs):
            lr = run.scheduler.get_last_lr()[0]  # the epoch's first step's (the whole epoch's with the step schedule)
            totals, seconds = _train_epoch(run, epoch, progress)
            seen_clips += int(totals.clips)
            train_seconds += seconds
            rec = {"kind": "epoch", "epoch": epoch, "step": run.step, "train_loss": totals.loss / totals.clips,
                   "train_ce": totals.ce / totals.clips, "train_bce": totals.bce / totals.clips,
                   "train_top1": 100 * totals.correct / totals.clips, "lr": lr,
                   "clips_per_s": totals.clips / seconds, "seconds": seconds, "val_top1": None, "val_loss": None,
                   "val_videos_per_rank": None}
            if run.config.uses_relevance:  # IMD: mean rev and the share of clips whose audio it masked
                rec["rev_mean"], rec["audio_dropped"] = totals.rev / totals.clips, totals.dropped / totals.clips
            if run.val_loader is not None:
                rec["val_top1"], rec["val_loss"], rec["val_videos_per_rank"] = _validate(run)
            if ddp.main:
                _checkpoint(run, epoch, rec)
            ddp.barrier()
            last, last_epoch = rec, epoch
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
    if run.events is not None:
        run.events.close()

    best = run.best
    summary = {
        "run": str(out), "epochs_done": last_epoch + 1, "epochs": run.config.epochs, "steps": run.step,
        "train_videos": len(run.train_ds), "left_out": run.train_sel.n_left_out,
        "final_train_loss": last.get("train_loss"), "final_train_top1": last.get("train_top1"),
        "best_epoch": best["epoch"] if best else None, "best_val_top1": best["val_top1"] if best else None,
        "clips_per_s": seen_clips / train_seconds if train_seconds else None,
        "seconds": time.perf_counter() - t_start, "world_size": ddp.world, "per_rank_batch": run.per_rank,
        "device": str(device), "weights_sha256": state_sha256(run.raw_model.state_dict()),
    }
    if ddp.main:
        _print_summary(summary, console)
    return summary


def _setup(*, cache: Path, out: Path, config: TrainConfig, ckpt: dict | None, console, ddp: Dist,
           device: torch.device) -> _Run:
    """Open the cache, build the datasets, the model and its optimizer (restored from ``ckpt``), write config.yaml."""
    from imdpipe.heads import build_model
    from imdpipe.train.data import compare_provenance

    say = console.print if ddp.main else (lambda *a, **k: None)
    info = open_cache(cache, audio=config.uses_audio, relevance=config.uses_relevance)
    for warning in clip_fit_warnings(info, config.clip):
        say(f"[yellow]warning:[/yellow] {warning}")
    if ckpt is not None:
        problems, notes = compare_provenance(ckpt["provenance"], info.provenance)
        if problems or notes:
            raise ValueError(f"cannot resume {out} on {cache}: the cache differs from the one the run started on:\n  "
                             + "\n  ".join(problems + notes))
    config = config.replace(relevance=relevance_settings(info))
    splits = {r.split for r in info.manifest.records}
    if config.train_split not in splits:
        hint = (" (class folders without split files: draw splits with `imdpipe index ... --split-fractions "
                "0.8,0.1,0.1 --overwrite`)" if splits == {"all"} else "")
        raise ValueError(f"train_split {config.train_split!r} is not a split of {cache}/manifest.csv "
                         f"(splits: {sorted(splits)}){hint}")
    train_sel = select_videos(info, config.train_split)
    if ddp.main:
        report_selection(train_sel, config.train_split, console)
    if not train_sel.indices:
        raise ValueError(f"no usable training videos in {cache} (split {config.train_split!r})")
    train_indices, holdout, selected_on = resolve_val_split(config, info.manifest, train_sel.indices)
    if config.batch_size % ddp.world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {ddp.world} processes")
    per_rank = config.batch_size // ddp.world

    data_kw = dict(clip=config.clip, modalities=config.modalities, relevance=config.uses_relevance, seed=config.seed)
    train_ds = ClipDataset(info, train_indices, mode="train", cross_modal_p=config.cross_modal_p, **data_kw)
    sampler = DistributedSampler(train_ds, num_replicas=ddp.world, rank=ddp.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_ds)} training videos do not fill one batch of {config.batch_size}; "
                         f"lower --batch-size")
    loader = DataLoader(train_ds, batch_size=per_rank, sampler=EpochSampler(sampler), drop_last=True,
                        **loader_kwargs(loader_workers(config.num_workers), pin_memory=device.type == "cuda"))
    val_loader = None
    val_indices = holdout
    if selected_on not in (VAL_HOLDOUT, VAL_LAST):  # a named split
        val_sel = select_videos(info, selected_on)
        if ddp.main:
            report_selection(val_sel, selected_on, console)
        val_indices = val_sel.indices
        if not val_indices:
            raise ValueError(f"val_split {selected_on!r} has no usable video in {cache}; name another split, "
                             f"or use --val-split {VAL_HOLDOUT} or {VAL_LAST}")
    elif holdout is not None and ddp.main:
        console.print(f"validation: {len(holdout)} of the {len(train_sel.indices)} training videos held out "
                      f"({config.val_fraction:g} per class, seed {config.seed}), never trained on")
    if val_indices:  # every process scores its contiguous part; the counts are summed (_validate)
        val_ds = ClipDataset(info, ddp.part(val_indices), mode="eval", clips=1, crops=1, **data_kw)
        val_loader = DataLoader(val_ds, batch_size=config.eval_batch_size, shuffle=False, **loader_kwargs(
            min(loader_workers(config.num_workers), len(val_ds)), pin_memory=device.type == "cuda",
            persistent=False))

    seed_everything(config.seed)
    model_cfg = config.model_config(num_classes=len(info.labels), audio_dim=info.audio_dim, flow_bound=info.flow_bound)
    init = init_source(config.init_checkpoint) if ckpt is None and config.init_checkpoint else None
    raw_model = build_model(model_cfg, init_checkpoint=init).to(device)
    if raw_model.init_report is not None:
        config = config.replace(init=raw_model.init_report)
    optimizer = build_optimizer(raw_model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(config, steps_per_epoch))
    run = _Run(config=config, info=info, out=out, ddp=ddp, device=device, say=say, model_cfg=model_cfg,
               raw_model=raw_model, model=raw_model, optimizer=optimizer, scheduler=scheduler, train_sel=train_sel,
               train_ds=train_ds, sampler=sampler, loader=loader, val_loader=val_loader, per_rank=per_rank,
               steps_per_epoch=steps_per_epoch, selected_on=selected_on, val_videos=len(val_indices or []))
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_states(ckpt["rng"], device)
        run.start_epoch, run.step, run.best = ckpt["epoch"] + 1, ckpt["step"], ckpt.get("best")
        run.history = [r for r in _read_metrics(out / METRICS_NAME) if r["epoch"] <= ckpt["epoch"]]
    if ddp.enabled:
        run.model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        run.model = torch.compile(run.model)

    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / CONFIG_NAME)
        _write_metrics(out / METRICS_NAME, run.history)
        # a resumed run hides what a killed one logged after its checkpoint: steps > the checkpoint's
        # (the checkpointed epoch's own record sits at its step and stays)
        run.events = EventWriter(out, enabled=config.tensorboard,
                                 purge_step=run.step + 1 if ckpt is not None else None)
        deviations = config.recipe_deviations()
        say(f"recipe {config.recipe}" + (": as defined" if not deviations else ", except " + ", ".join(
            f"{k} {v[1]} (recipe: {v[0]})" for k, v in deviations.items())))
        if config.init:
            say(f"initialized from {config.init['source']} ({config.init['kind']}, sha256 "
                f"{(config.init['sha256'] or '?')[:12]}): loaded {', '.join(config.init['loaded'])}; new: "
                f"{', '.join(config.init['new'])}" + "".join(f"\n  note: {n}" for n in config.init["notes"]))
        say(f"training {model_cfg.size} / {model_cfg.fusion} on {', '.join(model_cfg.modalities)}: "
            f"{len(train_ds)} videos, {len(info.labels)} classes, {steps_per_epoch} steps/epoch x {config.epochs} "
            f"epochs, batch {config.batch_size} ({ddp.world} process(es)), {device.type}"
            + (f", resuming after epoch {run.start_epoch}" if ckpt is not None else ""))
    return run


def _train_epoch(run: _Run, epoch: int, progress) -> tuple[EpochTotals, float]:
    """One pass over the training split: returns the totals over every process and the seconds it took."""
    config, device, ddp = run.config, run.device, run.ddp
    run.model.train()
    run.sampler.set_epoch(epoch)  # the loader's EpochSampler hands this epoch to the workers with each index
    torch.manual_seed(derived_seed(config.seed, epoch, ddp.rank))  # dropout etc.: exact on resume
    task = progress.add_task(f"epoch {epoch + 1}/{config.epochs}", total=run.steps_per_epoch, rate=0.0, loss=0.0)
    sums = StepSums(device)
    revs: list[torch.Tensor] = []  # this epoch's rev values, on the device (TensorBoard histogram on rank 0)
    t0 = time.perf_counter()
    for batch in run.loader:
        loss, ce, bce, rev = train_step(run.model, run.optimizer, batch, sums, config=config, device=device,
                                        flow_bound=run.info.flow_bound, raw_model=run.raw_model)
        run.scheduler.step()
        run.step += 1
        if rev is not None:
            revs.append(rev)
        rate = sums.clips * ddp.world / max(time.perf_counter() - t0, 1e-9)
        if ddp.main and run.step % config.log_every == 0:  # the only read-back between epoch ends
            loss_v, ce_v, bce_v = torch.stack([loss, ce, bce]).tolist()
            progress.update(task, advance=1, rate=rate, loss=loss_v)
            rec = {"kind": "step", "epoch": epoch, "step": run.step, "loss": loss_v, "ce": ce_v,
                   "bce": bce_v, "lr": run.scheduler.get_last_lr()[0], "clips_per_s": rate}
            run.history.append(rec)
            _append_metric(run.out / METRICS_NAME, rec)
            run.events.record(rec)
        else:
            progress.update(task, advance=1, rate=rate)
    totals = sums.totals(ddp, device)
    seconds = time.perf_counter() - t0
    if ddp.main and revs:
        run.events.histogram("epoch/rev", torch.cat(revs).cpu(), run.step)
    return totals, seconds


def validation_sums(model, loader, *, modalities, device, amp: bool, flow_bound: float) -> tuple[int, float, int]:
    """``(correct, NLL sum, videos)`` of ``loader``'s videos, one view each (0s for an empty loader).

    The NLL is of the softmax averaged over a video's views (clamped at 1e-12), summed in float64.
    """
    res = score_views(model, loader, modalities=modalities, device=device, amp=amp, flow_bound=flow_bound)
    if res["probs"] is None:
        return 0, 0.0, 0
    probs, labels = res["probs"], res["labels"]
    nll = -probs.clamp_min(1e-12).log().gather(1, labels[:, None]).double().sum()
    return int((probs.argmax(-1) == labels).sum()), float(nll), len(labels)


def _validate(run: _Run) -> tuple[float, float, list[int]]:
    """Top-1 (%), mean NLL and videos per rank on the validation videos, every rank scoring its part.

    One all-reduce sums the correct counts, NLL sums and each rank's video count (in its own
    slot), so the numbers are those of one process scoring every video.
    """
    ddp = run.ddp
    correct, nll, n = validation_sums(run.raw_model, run.val_loader, modalities=run.config.modalities,
                                      device=run.device, amp=run.config.amp, flow_bound=run.info.flow_bound)
    per_rank = [0.0] * ddp.world
    per_rank[ddp.rank] = n
    correct, nll, *per_rank = ddp.all_sum([correct, nll, *per_rank], run.device)
    videos = sum(per_rank)
    return 100 * correct / videos, nll / videos, [int(v) for v in per_rank]


def _checkpoint(run: _Run, epoch: int, rec: dict) -> None:
    """Rank 0 after an epoch: track the best epoch, log ``rec``, write the checkpoints and the curves.

    checkpoint-best.pt is the epoch with the best validation top-1 (then the lowest validation
    loss) on ``run.selected_on``; with ``last`` nothing is selected and it is not written.
    """
    improved = False
    if rec["val_top1"] is not None:
        key = (rec["val_top1"], -rec["val_loss"])
        improved = run.best is None or tuple(key) > tuple(run.best["key"])
        if improved:
            run.best = {"key": list(key), "epoch": epoch, "val_top1": rec["val_top1"],
                        "train_loss": rec["train_loss"]}
    run.history.append(rec)
    _append_metric(run.out / METRICS_NAME, rec)
    run.events.record(rec)
    run.events.flush()
    selection = {"val_split": run.config.val_split, "selected_on": run.selected_on,
                 "val_fraction": run.config.val_fraction if run.selected_on == VAL_HOLDOUT else None,
                 "val_videos": run.val_videos}
    state = {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "rng": rng_states(run.device), "epoch": epoch, "step": run.step,
             "best": run.best, "config": run.config.to_dict(), "model_config": _model_config_dict(run.model_cfg),
             "provenance": run.info.provenance, "labels": list(run.info.labels), "metrics": rec,
             "selection": selection}
    save_checkpoint(state, run.out / CHECKPOINT_LAST)
    if improved:
        save_checkpoint(state, run.out / CHECKPOINT_BEST)
    _write_curves(run.history, run.out / CURVES_NAME)
    val = f", val top-1 {rec['val_top1']:.1f}%" if rec["val_top1"] is not None else ""
    run.say(f"epoch {epoch + 1}: loss {rec['train_loss']:.4f} (ce {rec['train_ce']:.4f}, "
            f"bce {rec['train_bce']:.4f}), train top-1 {rec['train_top1']:.1f}%{val}, "
            f"{rec['clips_per_s']:.1f} clips/s" + (" [best]" if improved else ""))


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
