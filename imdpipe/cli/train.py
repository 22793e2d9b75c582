"""``imdpipe train`` / ``evaluate`` / ``predict``: parse options, call :mod:`imdpipe.train`.

``imdpipe train``'s options are derived from :class:`~imdpipe.train.config.TrainConfig`: every
field with a :data:`~imdpipe.train.config.FIELD_HELP` entry is an option named after it (a new
field and its help line are all it takes). Every such option defaults to "not given" so that
``--config run.yaml`` can replay a run and the flags given on the command line override it; the
help of each option shows its default and the paper's value.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer

from imdpipe.cli.options import CacheOpt, cli_errors
from imdpipe.train.config import DEFAULT_DIST_TIMEOUT_MIN, FIELD_HELP, RECIPE_FIELDS, TrainConfig

_FIELDS = [f for f in fields(TrainConfig) if f.name in FIELD_HELP]
_TYPES = typing.get_type_hints(TrainConfig)

# Flags other than --field-name (extra spellings kept for older command lines and scripts).
_FLAGS = {"relevance_weight": ("--relevance-weight", "--lambda"), "num_workers": ("--workers", "--num-workers")}
# How a tuple field is written on the command line.
_TUPLE_FORMS = {str: "comma separated", float: "as LO,HI", int: "comma separated"}


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _flags(name: str, kind) -> tuple[str, ...]:
    flag = f"--{name.replace('_', '-')}"
    if kind is bool:
        return (f"{flag}/--no-{flag[2:]}",)
    return _FLAGS.get(name, (flag,))


def _field_type(name: str):
    """A field's type without ``| None`` (recipe fields are None until the recipe fills them)."""
    kind = _TYPES[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) is not tuple and args else kind


def _config_option(f) -> inspect.Parameter:
    """The ``typer`` parameter of one TrainConfig field (tuples are read as comma-separated text)."""
    kind = _field_type(f.name)
    help_text = FIELD_HELP[f.name]
    if typing.get_origin(kind) is tuple:
        help_text += ", " + _TUPLE_FORMS[typing.get_args(kind)[0]]
        kind = str
    if f.name in RECIPE_FIELDS:
        default = "from --recipe"
    elif f.name == "recipe":
        default = "paper (cosine for --size tiny)"
    else:
        default = _fmt(f.default)
    option = typer.Option(*_flags(f.name, kind), help=f"{help_text}. Default: {default}.",
                          show_default=False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], option])


def _parse_tuple(name: str, text: str) -> tuple:
    """``"rgb,flow"`` -> ``("rgb", "flow")``; numbers for numeric tuple fields."""
    item = typing.get_args(_field_type(name))[0]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return tuple(item(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated {item.__name__} values such as "
                                 f"{_fmt(next(f.default for f in _FIELDS if f.name == name))}, got {text!r}",
                                 param_hint=_flags(name, str)[0]) from None


def config_overrides(given: dict) -> dict:
    """The TrainConfig fields given on the command line (None = not given), tuples parsed."""
    overrides = {}
    for name, value in given.items():
        if value is None:
            continue
        overrides[name] = _parse_tuple(name, value) if typing.get_origin(_field_type(name)) is tuple else value
    return overrides


def train_cmd(
    cache: CacheOpt,
    out: Annotated[Path, typer.Option("--out", help="Run directory to write (config.yaml, checkpoints, "
                                      "metrics.jsonl, training-curves.png).")],
    config: Annotated[Optional[Path], typer.Option("--config", help="A run's config.yaml to replay; "
                                                   "flags given here override its values.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its "
                                         "checkpoint-last.pt (with the settings it started with).")] = False,
    visual: Annotated[Optional[Path], typer.Option(
        "--visual", help="With --head-only: the store of cached visual embeddings (default: CACHE/visual.zarr, "
                         "written by `imdpipe extract-visual`).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    **given,
):
    """Train a head (visual transformer + audio bottleneck + fusion) on a cache's stored features.

    Run under torchrun for several processes/GPUs: `torchrun --nproc_per_node 2 -m imdpipe train ...`
    (DDP: NCCL on GPU, gloo on CPU; --batch-size is the global batch).
    """
    from imdpipe.train.config import load_config
    from imdpipe.train.loop import train

    overrides = config_overrides(given)
    if resume:
        if overrides or config is not None:
            typer.echo(f"--resume continues {out} with the settings it started with; ignoring "
                       f"{', '.join(sorted(overrides)) or '--config'}.", err=True)
        cfg = None
    else:
        try:
            # without --config the recipe (and its default for the size) resolves from the flags given
            cfg = load_config(config).replace(**overrides) if config is not None else TrainConfig(**overrides)
        except (ValueError, FileNotFoundError) as e:
            raise typer.BadParameter(str(e)) from None
    with cli_errors():
        from imdpipe.train.head_only import is_head_only_run, train_head_only

        if cfg.head_only if cfg is not None else is_head_only_run(out):
            train_head_only(cache=cache, out=out, config=cfg, visual=visual, resume=resume, show_progress=not quiet)
        else:
            train(cache=cache, out=out, config=cfg, resume=resume, show_progress=not quiet)


def _derive_signature(cmd) -> None:
    """Give ``cmd`` one keyword option per TrainConfig field, in field order, before ``--quiet``."""
    params = list(inspect.signature(cmd, eval_str=True).parameters.values())
    fixed = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    head = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in fixed if p.name != "quiet"]
    quiet = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in fixed if p.name == "quiet"]
    cmd.__signature__ = inspect.Signature(head + [_config_option(f) for f in _FIELDS] + quiet)
    cmd.__annotations__ = {p.name: p.annotation for p in cmd.__signature__.parameters.values()}


_derive_signature(train_cmd)


def evaluate_cmd(
    run: Annotated[Path, typer.Option(
        "--run-dir", help="Run directory written by `imdpipe train` (or a checkpoint file).")],
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
    allow_selection_leak: Annotated[bool, typer.Option(
        "--allow-selection-leak", help="Score a checkpoint that was selected on the split scored here (refused "
                                       "otherwise; metrics.json then records selection_leak: true).")] = False,
    dist_timeout: Annotated[float, typer.Option(
        "--dist-timeout", min=0.01, help="Under torchrun: minutes a collective waits for the slowest process "
                                          "(ours; NCCL's own default: 10).")] = DEFAULT_DIST_TIMEOUT_MIN,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Score a trained run on a split with multi-view testing; write metrics.json and confusion.png.

    Under torchrun (`torchrun --nproc_per_node 8 -m imdpipe evaluate ...`) every process scores a
    contiguous part of the split and rank 0 writes the files (metrics.json records world_size and
    videos_per_rank).
    """
    from imdpipe.train.evaluate import evaluate

    with cli_errors():
        evaluate(run=run, cache=cache, split=split, crops=crops, clips=clips, ground_truth=ground_truth,
                 checkpoint=checkpoint, batch_size=batch_size, num_workers=num_workers, device=device, out=out,
                 allow_selection_leak=allow_selection_leak, dist_timeout=dist_timeout, show_progress=not quiet)


def predict_cmd(
    videos: Annotated[list[Path], typer.Argument(help="Video files to classify.")],
    run: Annotated[Path, typer.Option(
        "--run-dir", help="Run directory written by `imdpipe train` (or a checkpoint file).")],
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

    with cli_errors(OSError):
        results = predict(run=run, videos=videos, checkpoint=checkpoint, clips=clips, crops=crops, top_k=top_k,
                          device=device, flow_weights=flow_weights)
    if any("error" in r for r in results):
        raise typer.Exit(code=1)
