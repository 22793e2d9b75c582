"""`imdpipe demo`: the whole pipeline on synthetic data, on a CPU, with no downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imdpipe.cli.options import QuietOpt


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Working directory: data, cache, tagger, runs, report.md, "
                                      "results.json. Reused on a rerun (only training is repeated).")] = Path("demo"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic draw, of the training seeds "
                                      "(1000*seed + k) and of the bootstrap; the same seed gives the same "
                                      "results.json on one machine (another seed is another draw of the same "
                                      "design).")] = 0,
    quiet: QuietOpt = False,
):
    """The whole IMD pipeline on synthetic data, no downloads, minutes on a CPU; prints a Table-5-style comparison.

    Runs synth -> train-tagger -> index -> extract-flow -> extract-audio -> build-savld -> train +
    evaluate for visual only, late concat, GMU, IMD and IMD with intra-class cross-modality
    augmentation (one recipe for all, DemoSettings.train_seeds training seeds each, 2 rows at a time
    in worker processes), then writes OUT/results.json (top-1 with 95% bootstrap intervals over test
    videos and training seeds, paired differences with late concat), OUT/table.md (the table and its
    reading) and OUT/report.md (with the pictures).
    """
    from imdpipe.demo import run_demo

    run_demo(out=out, seed=seed, show_progress=not quiet)
