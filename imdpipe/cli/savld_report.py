"""``imdpipe savld-report``: the label dictionary set beside what the audio model hears on each class."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imdpipe.cli.options import CacheOpt, cli_errors


def savld_report_cmd(
    cache: CacheOpt,
    savld: Annotated[Path | None, typer.Option(
        "--savld", help="The dictionary (default: CACHE/savld.zarr); its stored text similarity gives the text "
                        "top-K whatever its --source.")] = None,
    relevance_k: Annotated[int | None, typer.Option(
        "--relevance-k", min=1, help="K: dictionary labels per class compared (default: the cache's "
                                     "relevance.zarr K, else the paper's 10).")] = None,
    ya: Annotated[int | None, typer.Option(
        "--ya", min=1, help="Ya: top audio predictions per clip counted (default: the cache's relevance.zarr "
                            "Ya, else the paper's 20).")] = None,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Relevance threshold for the share "
                                         "of clips marked relevant (paper best: 0.25).")] = 0.25,
    min_lift: Annotated[float | None, typer.Option(
        "--min-lift", min=1.0, help="Data support threshold (ours, not the paper's): lift of a label on the "
                                    "class over the training split. Default: the dictionary's, else 2.0.")] = None,
    min_freq: Annotated[float | None, typer.Option(
        "--min-freq", min=0.0, max=1.0, help="Data support threshold (ours): share of the class's training "
                                             "clips whose top-Ya holds the label. Default: the dictionary's, "
                                             "else 0.3.")] = None,
    ground_truth: Annotated[Path | None, typer.Option(
        "--ground-truth", help="CSV video_id,relevant for the relevance AUCs (default: ground_truth.csv next "
                               "to the cache or above its videos, as `imdpipe synth` writes).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Where savld_report.md/.json/.html and plots/ go (default: CACHE).")] = None,
    worst: Annotated[int, typer.Option("--worst", min=1, help="Classes shown side by side in the "
                                       "worst-agreement plot.")] = 4,
):
    """Measure the SAVLD against the data: per class, the audio labels the audio model predicts on the
    training videos (frequency, lift) beside the text dictionary's top-K, their agreement, the share of
    clips marked relevant, flags, and with ground truth the relevance AUC of text/data/hybrid dictionaries."""
    from rich.console import Console

    from imdpipe.pipeline import savld_report as sr

    console = Console(stderr=True)
    with cli_errors():
        report = sr.savld_report(cache=cache, savld=savld, K=relevance_k, ya=ya, alpha=alpha, min_lift=min_lift,
                                 min_freq=min_freq, ground_truth=ground_truth)
        paths = sr.write_report(report, out or cache, worst=worst)
    sr.print_report(report, console)
    flagged = report.flagged
    console.print(f"{len(flagged)} of {len(report.classes)} classes flagged"
                  + (f" ({', '.join(c.label for c in flagged)})" if flagged else "")
                  + f"; mean overlap {report.mean_overlap:.2f}")
    console.print("wrote " + ", ".join(str(p) for p in paths))
