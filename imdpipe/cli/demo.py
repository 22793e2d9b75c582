"""`imdpipe demo`: the whole pipeline on synthetic data, on a CPU, with no downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imdpipe.cli.options import QuietOpt


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Working directory: data, cache, tagger, runs, report.md, "
                                      "results.json. Reused on a rerun (only training is repeated).")] = Path("demo"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic draw and of every training run "
                                      "(another seed is another draw of the same design).")] = 0,
    quiet: QuietOpt = False,
):
    """The whole IMD pipeline on synthetic data, no downloads, minutes on a CPU; prints a Table-5-style comparison.

    Runs synth -> train-tagger -> index -> extract-flow -> extract-audio -> build-savld -> train +
    evaluate for visual only, late concat, GMU, IMD and IMD with intra-class cross-modality
    augmentation, then writes OUT/results.json and OUT/report.md (with the pictures).
    """
    from imdpipe.demo import run_demo

    run_demo(out=out, seed=seed, show_progress=not quiet)
