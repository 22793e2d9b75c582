"""``imdpipe extract-visual``: cache the visual streams' embedding of every view (visual.zarr)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
from imdpipe.train.config import FIELD_HELP


def extract_visual_cmd(
    cache: CacheOpt,
    run: Annotated[Optional[Path], typer.Option(
        "--run-dir", help="Trained run (directory or checkpoint file) whose visual streams to cache; its clip "
                      "settings (size, frames, stride, crop) are used.")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last checkpoint of --run-dir.")] = "best",
    init_checkpoint: Annotated[Optional[str], typer.Option(
        "--init-checkpoint", help="Instead of --run-dir: a timm ViT checkpoint (.pth/.safetensors/.npz) for both "
                                  "streams; the two fusing FC layers keep their seeded random init (ours).")] = None,
    size: Annotated[str, typer.Option("--size", help="With --init-checkpoint: " + FIELD_HELP["size"])] = "base",
    modalities: Annotated[str, typer.Option("--modalities", help="With --init-checkpoint: visual streams, "
                                            "comma separated (paper: rgb,flow).")] = "rgb,flow",
    num_frames: Annotated[int, typer.Option("--num-frames", help="With --init-checkpoint: "
                                            + FIELD_HELP["num_frames"])] = 8,
    frame_stride: Annotated[int, typer.Option("--frame-stride", help="With --init-checkpoint: "
                                              + FIELD_HELP["frame_stride"])] = 2,
    crop_size: Annotated[int, typer.Option("--crop-size", help="With --init-checkpoint: "
                                           + FIELD_HELP["crop_size"])] = 224,
    train_views: Annotated[int, typer.Option(
        "--train-views", min=1, help="Augmented training clips cached per video; view k is the full trainer's "
                                     "epoch-k clip for the same seed (paper: not applicable; ours: 8).")] = 8,
    clips: Annotated[int, typer.Option("--clips", min=1, help="Temporal test clips per video (paper: 4).")] = 4,
    crops: Annotated[int, typer.Option("--crops", min=1, help="Spatial test crops per clip (paper: 3).")] = 3,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the training views. Default: the "
                                                "run's seed (0 with --init-checkpoint).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Views per forward pass.")] = 16,
    workers: Annotated[int, typer.Option("--workers", min=0, help="DataLoader processes cutting the views "
                                         "(0 = in the main process).")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu or cuda.")] = "auto",
    videos_per_shard: VideosPerShardOpt = 16,
    overwrite: OverwriteOpt = False,
    shard: ShardOpt = None,
    strict: StrictOpt = False,
    quiet: QuietOpt = False,
):
    """Run the visual streams once per view and store the fused embeddings in CACHE/visual.zarr,
    for head-only training (`imdpipe train --head-only`) and ablation sweeps (`imdpipe sweep`)."""
    from imdpipe.pipeline.store import Partition, print_summary
    from imdpipe.train.config import TrainConfig
    from imdpipe.train.visual_cache import extract_visual

    config = None
    with cli_errors():
        if init_checkpoint is not None:
            config = TrainConfig(size=size, fusion="none", num_frames=num_frames, frame_stride=frame_stride,
                                 crop_size=crop_size,
                                 modalities=tuple(m.strip() for m in modalities.split(",") if m.strip()))
        result = extract_visual(cache=cache, run=run, checkpoint=checkpoint, init_checkpoint=init_checkpoint,
                                config=config, train_views=train_views, clips=clips, crops=crops, seed=seed,
                                batch_size=batch_size, num_workers=workers, device=device,
                                videos_per_shard=videos_per_shard, overwrite=overwrite, part=Partition.parse(shard),
                                show_progress=not quiet)
    print_summary(result.summary)
    exit_for(result.summary, strict)
