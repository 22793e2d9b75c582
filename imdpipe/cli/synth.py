"""``imdpipe synth``: write the deterministic synthetic audio-visual dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imdpipe.cli.options import QuietOpt, WorkersOpt, cli_errors, parse_size


def synth_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder (videos/, splits/, soundbank/, ground_truth.csv, "
                                             "synth.json).")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed -> same frames, audio and files.")] = 0,
    videos_per_class: Annotated[int, typer.Option("--videos-per-class", min=1,
                                                  help="Videos per class (8 classes).")] = 16,
    size: Annotated[str, typer.Option("--size", help="Frame size HxW, both even.")] = "112x112",
    duration: Annotated[float, typer.Option("--duration", min=0.1, help="Video length in seconds.")] = 3.0,
    fps: Annotated[float, typer.Option("--fps", min=1.0, help="Frame rate.")] = 10.0,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.0, max=0.9,
                                                 help="Fraction of each class in testlist01.txt.")] = 0.25,
    soundbank_clips: Annotated[int, typer.Option("--soundbank-clips", min=0,
                                                 help="Multi-label 2 s wav clips in the sound bank "
                                                      "(to pretrain the demo's audio tagger).")] = 240,
    workers: WorkersOpt = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a synthetic dataset already in OUT "
                                            "(only its own files and folders are removed).")] = False,
    quiet: QuietOpt = False,
):
    """Write a synthetic audio-visual action dataset shaped like the IMD problem.

    Labels are visual; two pairs of classes share their visuals and differ only by their relevant sound;
    other videos carry irrelevant sounds or no audio track.

    Index it with: imdpipe index OUT/videos --splits OUT/splits --cache CACHE
    """
    from rich.console import Console
    from rich.table import Table

    from imdpipe.datasets.synth import synth_dataset

    console = Console(stderr=True)
    with cli_errors():
        s = synth_dataset(out, seed=seed, videos_per_class=videos_per_class, size=parse_size(size),
                          duration_s=duration, fps=fps, test_fraction=test_fraction,
                          soundbank_clips=soundbank_clips, workers=workers, overwrite=overwrite,
                          console=console, show_progress=not quiet)
    table = Table(title=f"synth summary (seed {seed})")
    for col in ("class", "visual", "relevant sound", "train", "test", "relevant", "irrelevant", "no audio"):
        table.add_column(col, justify="left" if col in ("class", "visual", "relevant sound") else "right")
    for r in s.per_class:
        table.add_row(r["class"], r["visual"], r["relevant_sound"] or "-", str(r["train"]), str(r["test"]),
                      str(r["relevant"]), str(r["irrelevant"]), str(r["silent"]))
    console.print(table)
    console.print(f"{s.n_videos} videos ({s.n_with_audio} with audio, {s.n_relevant} relevant), "
                  f"{s.n_soundbank} sound-bank clips in {s.seconds:.1f} s -> {s.out}")
