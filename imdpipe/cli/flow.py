"""``imdpipe extract-flow``: sampled RGB frames + optical flow of every video into frames.zarr."""

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
    parse_size,
)


def extract_flow_cmd(
        cache: CacheOpt,
        backend: Annotated[str, typer.Option(
            "--backend", help="Flow method: auto (RAFT on CUDA when weights are available, else DIS), dis "
                              "(OpenCV DIS, the CPU default), farneback (OpenCV, as mmaction2's CPU tool), "
                              "tvl1 (needs opencv-contrib-python-headless, the tvl1 extra) or raft "
                              "(torchvision; slow on CPU). The choice and its reason are printed.")] = "auto",
        frames: Annotated[int, typer.Option(
            "--frames", min=1, help="T: positions sampled uniformly over each video; RGB and flow are "
                                    "stored at each. The trainer cuts the paper's 8-frame clips and "
                                    "4 temporal test views from them.")] = 32,
        size: Annotated[str, typer.Option(
            "--size", help="Stored frame size HxW (TSN/mmaction2 convention 256x340). Flow is computed "
                           "on the resized frames, in pixels of the stored frame.")] = "256x340",
        preset: Annotated[str, typer.Option(
            "--preset", help="DIS preset (backend dis): ultrafast, fast, balanced or medium. balanced "
                             "(default): Farneback's accuracy within ~2% at ~3.6x its speed end to end; ultrafast: "
                             "~1.6x balanced's speed at ~1.4x its end-point error.")] = "balanced",
        raft_variant: Annotated[str, typer.Option(
            "--raft-variant", help="RAFT size (backend raft): large (torchvision raft_large) or small.")] = "large",
        raft_iters: Annotated[int, typer.Option(
            "--raft-iters", min=1, help="RAFT recurrent refinement updates (torchvision's default).")] = 12,
        flow_weights: Annotated[Path | None, typer.Option(
            "--flow-weights", help="RAFT weights: a state_dict file saved with torch.save. Without it, "
                                   "torchvision's pretrained weights are used when cached or online.")] = None,
        device: Annotated[str | None, typer.Option(
            "--device", help="Torch device for RAFT (cuda, cuda:1, cpu). Default: cuda if available, else "
                             "cpu; cuda means cuda:LOCAL_RANK under torchrun (one GPU per process).")] = None,
        workers: Annotated[int | None, typer.Option(
            "--workers", min=0, show_default=False,
            help="CPU backends: processes each computing and writing a whole shard (--videos-per-shard "
                 "videos). RAFT: DataLoader workers decoding videos. 0 = in the main process. Default: "
                 "this process's share of the CPU cores (cores / LOCAL_WORLD_SIZE: under torchrun each "
                 "of the node's processes gets its share).")] = None,
        batch_size: Annotated[int, typer.Option(
            "--batch-size", min=1, help="RAFT: frame pairs per forward pass (pairs from several videos "
                                        "are batched). Lower it on out-of-memory.")] = 32,
        rgb_codec: Annotated[str, typer.Option(
            "--rgb-codec", help="How RGB frames are stored (ours; the paper does not say): jpeg (one "
                                "libjpeg-turbo JPEG per frame, ~6x smaller than zstd on real footage) or "
                                "zstd (lossless).")] = "jpeg",
        rgb_quality: Annotated[int, typer.Option(
            "--rgb-quality", min=1, max=100, help="JPEG quality of RGB frames (ours; 95 keeps every sample clip "
                                                  ">= 38 dB PSNR against the lossless store, 90 does not).")] = 95,
        flow_codec: Annotated[str, typer.Option(
            "--flow-codec", help="How the uint8 flow is stored (ours): jpeg (one grey JPEG per x / y "
                                 "plane) or zstd (lossless).")] = "jpeg",
        flow_quality: Annotated[int, typer.Option(
            "--flow-quality", min=1, max=100, help="JPEG quality of flow planes (ours; adds <= 0.02 px "
                                                    "end-point error against the lossless store).")] = 95,
        videos_per_shard: VideosPerShardOpt = 16,
        shard: ShardOpt = None,
        overwrite: OverwriteOpt = False,
        strict: StrictOpt = False,
        quiet: QuietOpt = False,
):
    """Decode each video once; store T sampled RGB frames and the flow to the next frame.

    Writes CACHE/frames.zarr: rgb uint8 (N, T, H, W, 3), flow uint8 (N, T, H, W, 2) quantized
    with bound 20 (one chunk per position; JPEG or lossless zstd), frame_index int32 (N, T).
    Resumable (done videos are skipped), shardable (--shard i/n or torchrun), per-video errors
    recorded and summarised.
    """
    from imdpipe.pipeline.flow import extract_flow
    from imdpipe.pipeline.store import print_summary

    with cli_errors(RuntimeError):
        summary = extract_flow(cache=cache, backend=backend, frames=frames, size=parse_size(size), preset=preset,
                               raft_variant=raft_variant, raft_iters=raft_iters, workers=workers,
                               batch_size=batch_size, device=device, flow_weights=flow_weights, shard=shard,
                               overwrite=overwrite, videos_per_shard=videos_per_shard,
                               rgb_codec=rgb_codec, rgb_quality=rgb_quality, flow_codec=flow_codec,
                               flow_quality=flow_quality, show_progress=not quiet)
    print_summary(summary)
    exit_for(summary, strict)
