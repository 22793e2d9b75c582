"""Options shared by several commands, defined once as ``Annotated`` aliases."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

CacheOpt = Annotated[Path, typer.Option("--cache", help="Cache root directory of one dataset "
                                        "(holds manifest.csv, labels.txt and the stage stores).")]
ShardOpt = Annotated[Optional[str], typer.Option(
    "--shard", help="Process only shard i of n (form i/n), for several machines or processes at once. "
                    "Default: torchrun's RANK/WORLD_SIZE when set, else a Slurm array task's SLURM_ARRAY_TASK_ID "
                    "(counted from SLURM_ARRAY_TASK_MIN) of SLURM_ARRAY_TASK_COUNT, else everything.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Rebuild the store from nothing "
                                            "(its current content is replaced). Without it, a store built "
                                            "with other settings is refused and done videos are skipped.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Worker processes for decoding/compute "
                                         "(0 = in the main process).")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit non-zero if any video failed "
                                         "(failures are always recorded in the store and printed).")]
VideosPerShardOpt = Annotated[int, typer.Option("--videos-per-shard", min=1, help="Videos per Zarr shard "
                                                "file; also the unit of work handed to one writer.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@contextmanager
def cli_errors(*also: type[BaseException]):
    """Print a library error the user can fix as one ``error: ...`` line and exit with status 2.

    Catches ``ValueError`` (bad settings, refused stores), ``FileNotFoundError``,
    ``FileExistsError`` and a full disk (:class:`~imdpipe.pipeline.store.DiskFull`), plus the
    exception types in ``also``; anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except Exception as e:
        from imdpipe.pipeline.store import DiskFull  # imported only when something failed: the CLI starts fast

        if not isinstance(e, (ValueError, FileNotFoundError, FileExistsError, DiskFull, *also)):
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None


def parse_size(text: str, option: str = "--size") -> tuple[int, int]:
    """``"256x340"`` -> ``(256, 340)`` (height x width)."""
    try:
        h, w = (int(p) for p in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise typer.BadParameter(f"{option} takes HxW, for example 256x340; got {text!r}") from None
    return h, w


def exit_for(summary, strict: bool) -> None:
    """Print a stage summary's verdict and exit non-zero under --strict when videos failed."""
    if strict and summary.failed:
        typer.echo(f"{summary.failed} video(s) failed (--strict).", err=True)
        raise typer.Exit(code=1)
