"""``imdpipe extract-audio``, ``imdpipe export`` and ``imdpipe train-tagger``: parse, then call the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imdpipe.cli.options import (
    CacheOpt,
    OverwriteOpt,
    QuietOpt,
    ShardOpt,
    StrictOpt,
    VideosPerShardOpt,
    cli_errors,
    exit_for,
)
from imdpipe.contract import AST_WINDOW_S

MODEL_HELP = ("Audio model: a hub id or a local directory written by save_pretrained (config, weights, "
              "preprocessor_config.json), e.g. one made by `imdpipe train-tagger`. Paper: the frozen "
              "AudioSet AST MIT/ast-finetuned-audioset-10-10-0.4593. Offline, a hub id must already be "
              "in the local cache.")


def extract_audio_cmd(
        cache: CacheOpt,
        model: Annotated[str, typer.Option("--model", help=MODEL_HELP)] = "MIT/ast-finetuned-audioset-10-10-0.4593",
        windows: Annotated[int, typer.Option("--windows", min=1, help=(
            f"Windows of max_length frames ({AST_WINDOW_S} s for AudioSet ASTs) per video. 1 (paper) = one window "
            "centred on the video; W > 1 spreads W windows evenly over a longer video."))] = 1,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per model forward.")] = 8,
        workers: Annotated[int | None, typer.Option("--workers", min=0, help=(
            "DataLoader worker processes decoding audio and computing fbanks (0 = inline). Default: 0 on "
            "CPU (a worker competes with the model for the cores); on CUDA up to 4 within this process's "
            "share of the cores (cores / LOCAL_WORLD_SIZE under torchrun)."))] = None,
        dtype: Annotated[str | None, typer.Option("--dtype", help=(
            "float32 or bfloat16 (autocast). Default: bfloat16 on CUDA, float32 on CPU. Recorded in "
            "the store; a store built with another dtype is refused."))] = None,
        device: Annotated[str | None, typer.Option("--device", help=(
            "Torch device (default: cuda when available, else cpu). cuda means cuda:LOCAL_RANK under "
            "torchrun (one GPU per process)."))] = None,
        shard: ShardOpt = None,
        overwrite: OverwriteOpt = False,
        strict: StrictOpt = False,
        videos_per_shard: VideosPerShardOpt = 16,
        quiet: QuietOpt = False,
):
    """Cache the frozen AST's pooled embedding and AudioSet logits of every video (CACHE/audio.zarr).

    Audio is decoded with PyAV, mixed to mono by averaging channels, resampled to 16 kHz, turned
    into Kaldi fbanks by transformers' ASTFeatureExtractor and run through the AST once. Done
    videos are skipped on rerun; failures are recorded per video and the rest goes on.
    """
    from rich.console import Console

    from imdpipe.pipeline.audio import ModelUnavailable, extract_audio
    from imdpipe.pipeline.store import print_summary

    console = Console(stderr=True)
    with cli_errors(ModelUnavailable):
        summary = extract_audio(cache=cache, model=model, windows=windows, batch_size=batch_size,
                                workers=workers, dtype=dtype, device=device, shard=shard, overwrite=overwrite,
                                videos_per_shard=videos_per_shard, console=console, show_progress=not quiet)
    print_summary(summary, console)
    exit_for(summary, strict)


def export_cmd(
        store: Annotated[Path, typer.Argument(help="A store directory, e.g. CACHE/audio.zarr.")],
        out: Annotated[Path, typer.Argument(help="The HDF5 file to write, e.g. audio.h5.")],
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
        compression: Annotated[str | None, typer.Option("--compression", help=(
            "HDF5 compression of the datasets: gzip or lzf (default: none, fastest to read)."))] = None,
):
    """Copy a store's arrays and attrs into one HDF5 file (h5py), for tools that want one file.

    Dict-valued attrs are stored as JSON text and named in the object's `_json_attrs` attr.
    """
    from imdpipe.pipeline.export import export_store

    with cli_errors():
        path = export_store(store, out, overwrite=overwrite, compression=compression)
    typer.echo(f"wrote {path}")


def train_tagger_cmd(
        soundbank: Annotated[Path, typer.Option("--soundbank", help=(
            "Sound bank csv (columns path,labels; labels = AudioSet display names joined by ';'; "
            "paths relative to the csv), e.g. OUT/soundbank/soundbank.csv from `imdpipe synth`."))],
        out: Annotated[Path, typer.Option("--out", help=(
            "Tagger directory to write (save_pretrained files + tagger.json); pass it to "
            "`extract-audio --model`. Reused when it holds a tagger with the same settings and sound bank."))],
        epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training clips.")] = 12,
        hidden_size: Annotated[int, typer.Option("--hidden-size", min=8, help=(
            "Transformer width (AudioSet AST: 768; a sound bank tagger: 64-128)."))] = 96,
        layers: Annotated[int, typer.Option("--layers", min=1, help="Transformer blocks (AST: 12).")] = 3,
        heads: Annotated[int, typer.Option("--heads", min=1, help="Attention heads (AST: 12).")] = 4,
        patch_stride: Annotated[int, typer.Option("--patch-stride", min=1, max=16, help=(
            "Stride of the 16x16 patches in frequency and time (AST: 10; 16 = no overlap, fastest)."))] = 16,
        max_length: Annotated[int | None, typer.Option("--max-length", min=16, help=(
            f"Input frames of 10 ms (AST: 1024 = {AST_WINDOW_S} s). Default: the longest clip "
            "(at most 1024)."))] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Clips per step.")] = 16,
        lr: Annotated[float, typer.Option("--lr", help="AdamW peak learning rate.")] = 1e-3,
        seed: Annotated[int, typer.Option("--seed", help="Seeds the split, init and crops.")] = 0,
        val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=0.9, help=(
            "Share of clips held out for the mAP."))] = 0.2,
        device: Annotated[str | None, typer.Option("--device", help="Torch device (default: cuda when "
                                                                       "available, else cpu).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Retrain even when OUT holds a tagger "
                                                "(replaced only when training finishes).")] = False,
):
    """Pretrain a small AST audio tagger (multi-label BCE) on a sound bank.

    It stands in for the AudioSet-pretrained AST when that cannot be downloaded, or tags one's
    own sounds: the same transformers ASTForAudioClassification, tiny config, saved with
    save_pretrained together with its feature extractor.
    """
    from imdpipe.train.tagger import TaggerSettings, train_tagger

    with cli_errors():
        settings = TaggerSettings(epochs=epochs, hidden_size=hidden_size, layers=layers, heads=heads,
                                  patch_stride=patch_stride, max_length=max_length, batch_size=batch_size,
                                  lr=lr, seed=seed, val_fraction=val_fraction)
        train_tagger(soundbank, out, settings=settings, overwrite=overwrite, device=device)
