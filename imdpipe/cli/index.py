"""``imdpipe index``: build a cache's manifest.csv and labels.txt from a dataset folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imdpipe.cli.options import CacheOpt, QuietOpt, StrictOpt, WorkersOpt, cli_errors


def index_cmd(
    root: Annotated[Path, typer.Argument(help="Dataset folder: class folders ROOT/<class>/<video> "
                                              "(UCF-101, HMDB51, `imdpipe synth` OUT/videos), or the folder "
                                              "Kinetics files <youtube_id>_<start:06d>_<end:06d>.mp4 live under.")],
    cache: CacheOpt,
    annotations: Annotated[list[Path] | None, typer.Option(
        "--annotations", help="Kinetics annotation CSV (label,youtube_id,time_start,time_end,split); "
                              "repeat for train/validate/test. Splits are taken from the CSV.")] = None,
    splits: Annotated[Path | None, typer.Option(
        "--splits", help="Folder with UCF-101 trainlist0N/testlist0N.txt (+ classInd.txt) or HMDB51 "
                         "<class>_test_splitN.txt files. Videos they do not use get split 'unused'. "
                         "Without it (and without --annotations or --split-fractions) every video gets split "
                         "'all'.")] = None,
    split_id: Annotated[int, typer.Option("--split-id", min=1, max=3,
                                          help="Official split number, 1-3 (the paper trains and evaluates on "
                                               "UCF-101's train/validation splits without naming one; split 1 is "
                                               "the usual choice).")] = 1,
    split_fractions: Annotated[str | None, typer.Option(
        "--split-fractions", help="For class folders without split files: draw splits train,val,test with these "
                                  "shares, e.g. 0.8,0.1,0.1, per class (stratified) and seeded; recorded in "
                                  "manifest.csv (ours: the paper uses the official splits).")] = None,
    split_seed: Annotated[int, typer.Option("--split-seed", help="Seed of the --split-fractions draw.")] = 0,
    labels: Annotated[str | None, typer.Option(
        "--labels", help="Label order: a built-in set (kinetics400, ucf101, hmdb51) or a text file with "
                         "one class a line. Default: classInd.txt, else the built-in set of the layout, "
                         "else class names sorted.")] = None,
    workers: WorkersOpt = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing manifest.csv that differs "
                                            "from the new index (stores built on the old one will then be "
                                            "refused as stale).")] = False,
    strict: StrictOpt = False,
    quiet: QuietOpt = False,
):
    """Probe every video with PyAV and write manifest.csv + labels.txt into --cache.

    Unreadable videos (empty, truncated, not a video) get status=error with a message; the run goes on.
    Duplicate video ids are refused.
    """
    from rich.console import Console

    from imdpipe.pipeline.index import print_index_summary, run_index

    console = Console(stderr=True)
    with cli_errors():
        manifest, summary = run_index(cache=cache, root=root, annotations=annotations or None, splits=splits,
                                      split_id=split_id, split_fractions=split_fractions,
                                      split_seed=split_seed, labels=labels, workers=workers, overwrite=overwrite,
                                      console=console, show_progress=not quiet)
    print_index_summary(manifest, summary, console)
    if strict and summary.failed:
        typer.echo(f"{summary.failed} video(s) could not be read (--strict).", err=True)
        raise typer.Exit(code=1)
