"""``imdpipe train`` / ``evaluate`` / ``predict``: parse options, call :mod:`imdpipe.train`.

Every training option defaults to "not given" so that ``--config run.yaml`` can replay a run and
the flags given on the command line override it; the help of each option shows its default and
the paper's value (from :data:`imdpipe.train.config.FIELD_HELP`).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer

from imdpipe.cli.options import CacheOpt
from imdpipe.train.config import FIELD_HELP, TrainConfig

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name != "relevance"}


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _h(name: str) -> str:
    return f"{FIELD_HELP[name]}. Default: {_fmt(_DEFAULTS[name])}."


def _opt(name: str, *flags: str, **kw):
    return typer.Option(*(flags or (f"--{name.replace('_', '-')}",)), help=_h(name), show_default=False, **kw)


def train_cmd(
    cache: CacheOpt,
    out: Annotated[Path, typer.Option("--out", help="Run directory to write (config.yaml, checkpoints, "
                                      "metrics.jsonl, training-curves.png).")],
    config: Annotated[Optional[Path], typer.Option("--config", help="A run's config.yaml to replay; "
                                                   "flags given here override its values.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its "
                                         "checkpoint-last.pt (with the settings it started with).")] = False,
    size: Annotated[Optional[str], _opt("size")] = None,
    fusion: Annotated[Optional[str], _opt("fusion")] = None,
    modalities: Annotated[Optional[str], typer.Option("--modalities", show_default=False,
                                       help=FIELD_HELP["modalities"] + ", comma separated. Default: rgb,flow,audio.")
                          ] = None,
    alpha: Annotated[Optional[float], _opt("alpha")] = None,
    scheme: Annotated[Optional[str], _opt("scheme")] = None,
    drop_rate: Annotated[Optional[float], _opt("drop_rate")] = None,
    drop_path_rate: Annotated[Optional[float], _opt("drop_path_rate")] = None,
    init_checkpoint: Annotated[Optional[str], _opt("init_checkpoint")] = None,
    num_frames: Annotated[Optional[int], _opt("num_frames")] = None,
    frame_stride: Annotated[Optional[int], _opt("frame_stride")] = None,
    crop_size: Annotated[Optional[int], _opt("crop_size")] = None,
    crop_scale: Annotated[Optional[str], typer.Option("--crop-scale", show_default=False,
                                                      help=FIELD_HELP["crop_scale"] + ", as LO,HI. Default: 0.25,1.0.")
                          ] = None,
    hflip: Annotated[Optional[bool], _opt("hflip", "--hflip/--no-hflip")] = None,
    cross_modal_p: Annotated[Optional[float], _opt("cross_modal_p")] = None,
    train_split: Annotated[Optional[str], _opt("train_split")] = None,
    val_split: Annotated[Optional[str], _opt("val_split")] = None,
    optimizer: Annotated[Optional[str], _opt("optimizer")] = None,
    lr: Annotated[Optional[float], _opt("lr")] = None,
    momentum: Annotated[Optional[float], _opt("momentum")] = None,
    weight_decay: Annotated[Optional[float], _opt("weight_decay")] = None,
    batch_size: Annotated[Optional[int], _opt("batch_size")] = None,
    epochs: Annotated[Optional[int], _opt("epochs")] = None,
    warmup_epochs: Annotated[Optional[float], _opt("warmup_epochs")] = None,
    min_lr_ratio: Annotated[Optional[float], _opt("min_lr_ratio")] = None,
    label_smoothing: Annotated[Optional[float], _opt("label_smoothing")] = None,
    relevance_weight: Annotated[Optional[float], _opt("relevance_weight", "--relevance-weight", "--lambda")] = None,
    grad_clip: Annotated[Optional[float], _opt("grad_clip")] = None,
    device: Annotated[Optional[str], _opt("device")] = None,
    amp: Annotated[Optional[bool], _opt("amp", "--amp/--no-amp")] = None,
    compile_: Annotated[Optional[bool], _opt("compile", "--compile/--no-compile")] = None,
    num_workers: Annotated[Optional[int], _opt("num_workers", "--workers", "--num-workers")] = None,
    threads: Annotated[Optional[int], _opt("threads")] = None,
    seed: Annotated[Optional[int], _opt("seed")] = None,
    log_every: Annotated[Optional[int], _opt("log_every")] = None,
    eval_batch_size: Annotated[Optional[int], _opt("eval_batch_size")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
):
    """Train a head (visual transformer + audio bottleneck + fusion) on a cache's stored features.

    Run under torchrun for several processes/GPUs: `torchrun --nproc_per_node 2 -m imdpipe train ...`
    (DDP: NCCL on GPU, gloo on CPU; --batch-size is the global batch).
    """
    from imdpipe.train.config import load_config
    from imdpipe.train.loop import train

    given = dict(size=size, fusion=fusion, alpha=alpha, scheme=scheme, drop_rate=drop_rate,
                 drop_path_rate=drop_path_rate, init_checkpoint=init_checkpoint, num_frames=num_frames,
                 frame_stride=frame_stride, crop_size=crop_size, hflip=hflip, cross_modal_p=cross_modal_p,
                 train_split=train_split, val_split=val_split, optimizer=optimizer, lr=lr, momentum=momentum,
                 weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, warmup_epochs=warmup_epochs,
                 min_lr_ratio=min_lr_ratio, label_smoothing=label_smoothing, relevance_weight=relevance_weight,
                 grad_clip=grad_clip, device=device, amp=amp, compile=compile_, num_workers=num_workers,
                 threads=threads, seed=seed, log_every=log_every, eval_batch_size=eval_batch_size)
    if modalities is not None:
        given["modalities"] = tuple(m.strip() for m in modalities.split(",") if m.strip())
    if crop_scale is not None:
        try:
            given["crop_scale"] = tuple(float(x) for x in crop_scale.split(","))
        except ValueError:
            raise typer.BadParameter(f"expected LO,HI such as 0.25,1.0, got {crop_scale!r}",
                                     param_hint="--crop-scale") from None
    overrides = {k: v for k, v in given.items() if v is not None}
    if resume:
        if overrides or config is not None:
            typer.echo(f"--resume continues {out} with the settings it started with; ignoring "
                       f"{', '.join(sorted(overrides)) or '--config'}.", err=True)
        cfg = None
    else:
        try:
            base = load_config(config) if config is not None else TrainConfig()
            cfg = base.replace(**overrides)
        except (ValueError, FileNotFoundError) as e:
            raise typer.BadParameter(str(e)) from None
    try:
        train(cache=cache, out=out, config=cfg, resume=resume, show_progress=not quiet)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None


def evaluate_cmd(
    run: Annotated[Path, typer.Option(
        "--run", help="Run directory written by `imdpipe train` (or a checkpoint file).")],
    cache: CacheOpt,
    split: Annotated[str, typer.Option("--split", help="Manifest split to score.")] = "test",
    crops: Annotated[int, typer.Option("--crops", min=1, help="Spatial crops per clip: left/centre/right of the "
                                       "short side (paper: 3).")] = 3,
    clips: Annotated[int, typer.Option("--clips", min=1, help="Temporal clips per video, evenly spaced "
                                       "(paper: 4).")] = 4,
    ground_truth: Annotated[Optional[Path], typer.Option(
        "--ground-truth", help="CSV with video_id,relevant for the relevance AUC. Default: ground_truth.csv "
                               "found next to the cache or above its videos (the synthetic data writes one).")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last.")] = "best",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Videos per forward pass "
                                                      "(default: the run's eval_batch_size).")] = None,
    num_workers: Annotated[Optional[int], typer.Option("--workers", help="DataLoader workers (default: "
                                                       "the run's).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda (default: the run's).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write metrics.json and confusion.png "
                                                "(default: the run directory).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Score a trained run on a split with multi-view testing; write metrics.json and confusion.png."""
    from imdpipe.train.evaluate import evaluate

    try:
        evaluate(run=run, cache=cache, split=split, crops=crops, clips=clips, ground_truth=ground_truth,
                 checkpoint=checkpoint, batch_size=batch_size, num_workers=num_workers, device=device, out=out,
                 show_progress=not quiet)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None


def predict_cmd(
    videos: Annotated[list[Path], typer.Argument(help="Video files to classify.")],
    run: Annotated[Path, typer.Option(
        "--run", help="Run directory written by `imdpipe train` (or a checkpoint file).")],
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last.")] = "best",
    clips: Annotated[int, typer.Option("--clips", min=1, help="Temporal clips per video (paper: 4).")] = 4,
    crops: Annotated[int, typer.Option("--crops", min=1, help="Spatial crops per clip (paper: 3).")] = 3,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes printed per video.")] = 5,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda (default: the run's).")] = None,
    flow_weights: Annotated[Optional[Path], typer.Option(
        "--flow-weights",
        help="RAFT state_dict file, when the run's frames.zarr was built by RAFT from a file.")] = None,
):
    """Classify raw videos: frames, flow and AST embedding with the settings the run's caches recorded,
    then the model; prints the top classes, rev and whether the audio was used."""
    from imdpipe.train.predict import predict

    try:
        results = predict(run=run, videos=videos, checkpoint=checkpoint, clips=clips, crops=crops, top_k=top_k,
                          device=device, flow_weights=flow_weights)
    except (FileNotFoundError, ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    if any("error" in r for r in results):
        raise typer.Exit(code=1)
