"""Tiny caches for the trainer tests, written through the real store helper and manifest writer.

``make_cache`` follows the cache contract exactly (manifest.csv + labels.txt, frames.zarr,
audio.zarr, relevance.zarr with their provenance attrs) with random content that carries a
class-dependent signal, so an easy split can be learned in a few steps:

* RGB: the frame is brighter in the colour channel ``label % 3``;
* flow: a uniform motion whose x component is +3 px for even labels and -3 px for odd ones;
* audio: the embedding holds ``+2`` at position ``label`` for relevant videos, noise otherwise.
  The relevance target is 0.9 for relevant videos, 0.1 otherwise; ``ground_truth.csv`` beside
  the manifest says which are relevant.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from imdpipe.pipeline.flow_utils import quantize
from imdpipe.pipeline.manifest import VideoRecord, write_manifest
from imdpipe.pipeline.store import ArraySpec, StageStore


def make_cache(root: Path, *, classes: int = 3, train_per_class: int = 8, test_per_class: int = 2, T: int = 6,
               size=(36, 44), windows: int = 2, audio_dim: int = 16, fps: float = 10.0, seed: int = 0,
               failed_flow: int = 0, failed_index: int = 0, frames_settings: dict | None = None) -> Path:
    """Write a tiny cache under ``root`` and return it.

    Args:
        failed_flow: this many training videos have ``done`` False in frames.zarr.
        failed_index: this many training videos have manifest status ``error``.
        frames_settings: overrides of the frames.zarr settings (provenance tests).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    H, W = size
    labels = [f"class_{c}" for c in range(classes)]
    records, relevant = [], []
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            for k in range(per):
                i = len(records)
                n_frames = 40
                records.append(VideoRecord(index=i, video_id=f"{split}_{c}_{k}",
                                           path=f"videos/{labels[c]}/{split}_{c}_{k}.mp4",
                                           label=c, label_name=labels[c], split=split, duration_s=n_frames / fps,
                                           fps=fps, n_frames=n_frames, width=W, height=H, has_audio=True))
                relevant.append(bool(rng.random() < 0.6))
    train_ids = [r.index for r in records if r.split == "train"]
    bad_index = set(train_ids[:failed_index])
    for i in bad_index:
        records[i].status, records[i].error = "error", "could not decode"
    manifest = write_manifest(root, records, labels)
    N = len(records)

    fs = {"frames": T, "size": [H, W], "backend": "synthetic-test", **(frames_settings or {})}
    frames = StageStore.open(root / "frames.zarr", stage="flow", settings=fs, manifest_sha256=manifest.sha256,
                             n_items=N, videos_per_shard=4, arrays=[
                                 ArraySpec("rgb", (T, H, W, 3), "uint8", ("time", "y", "x", "channel")),
                                 ArraySpec("flow", (T, H, W, 2), "uint8", ("time", "y", "x", "component"),
                                           attrs={"bound": 20.0}),
                                 ArraySpec("frame_index", (T,), "int32", ("time",))])
    audio = StageStore.open(root / "audio.zarr", stage="audio", manifest_sha256=manifest.sha256, n_items=N,
                            settings={"model": "synthetic-test", "windows": windows, "window_s": 10.24,
                                      "dtype": "float16"}, videos_per_shard=4, arrays=[
                                 ArraySpec("embedding", (windows, audio_dim), "float16", ("window", "feature")),
                                 ArraySpec("logits", (windows, 4), "float16", ("window", "audio_class")),
                                 ArraySpec("window_start_s", (windows,), "float32", ("window",)),
                                 ArraySpec("has_audio", (), "bool", ())])
    rel = StageStore.open(root / "relevance.zarr", stage="relevance", manifest_sha256=manifest.sha256, n_items=N,
                          settings={"K": 10, "Ya": 20, "overlap": "iou"}, videos_per_shard=4,
                          attrs={"K": 10, "Ya": 20, "overlap": "iou"}, arrays=[
                              ArraySpec("target", (windows,), "float32", ("window",)),
                              ArraySpec("overlap_count", (windows,), "int16", ("window",))])
    bad_flow = set(train_ids[failed_index:failed_index + failed_flow])
    for store, rows_of in ((frames, _frames_row), (audio, _audio_row), (rel, _rel_row)):
        for s, e in store.shard_ranges():
            rows, errs = {}, {}
            for i in range(s, e):
                if i in bad_index:
                    continue
                if store is frames and i in bad_flow:
                    errs[i] = "RuntimeError: flow failed"
                    continue
                rows[i] = rows_of(rng, records[i], relevant[i], T=T, H=H, W=W, windows=windows, D=audio_dim)
            store.write_block(s, e, rows, errs)
    with (root / "ground_truth.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "label_name", "relevant", "sound"])
        for r, rel_ in zip(records, relevant):
            w.writerow([r.video_id, r.label_name, int(rel_), "tone" if rel_ else "noise"])
    return root


def _frames_row(rng, rec, relevant, *, T, H, W, **_):
    rgb = rng.integers(40, 120, size=(T, H, W, 3)).astype(np.int16)
    rgb[..., rec.label % 3] += 100
    fx = 3.0 if rec.label % 2 == 0 else -3.0
    flow = np.stack([np.full((T, H, W), fx), np.full((T, H, W), 1.0)], -1) + rng.normal(0, 0.5, (T, H, W, 2))
    # frame_index: T positions evenly spread over the video's frames
    fi = np.linspace(0, rec.n_frames - 2, T).round().astype(np.int32)
    return {"rgb": rgb.clip(0, 255).astype(np.uint8), "flow": quantize(flow), "frame_index": fi}


def _audio_row(rng, rec, relevant, *, windows, D, **_):
    emb = rng.normal(0, 0.3, (windows, D))
    if relevant:
        emb[:, rec.label] += 2.0
    duration = rec.duration_s
    starts = np.linspace(-10.24 / 2 + duration / 2 - 2, duration / 2 - 10.24 / 2 + 2, windows)
    return {"embedding": emb.astype(np.float16), "logits": rng.normal(0, 1, (windows, 4)).astype(np.float16),
            "window_start_s": starts.astype(np.float32), "has_audio": np.bool_(True)}


def _rel_row(rng, rec, relevant, *, windows, **_):
    return {"target": np.full(windows, 0.9 if relevant else 0.1, np.float32),
            "overlap_count": np.full(windows, 9 if relevant else 1, np.int16)}


def tiny_config(**changes):
    """Training settings small enough for a 2-core CPU test."""
    from imdpipe.train.config import TrainConfig

    base = dict(size="tiny", crop_size=32, num_frames=4, frame_stride=1, batch_size=8, epochs=2, lr=0.05,
                warmup_epochs=0.5, num_workers=0, threads=1, log_every=2, eval_batch_size=4, device="cpu",
                crop_scale=(0.5, 1.0), val_fraction=0.25)  # a hold-out of 2 of each class's 8 training videos
    base.update(changes)
    return TrainConfig(**base)


def ddp_worker(rank: int, world: int, port: int, cache: str, out: str, result_dir: str, config: dict) -> None:
    """One process of a 2-process gloo run (used with torch.multiprocessing.spawn)."""
    import json

    import torch

    from imdpipe.train.config import TrainConfig
    from imdpipe.train.loop import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    summary = train(cache=cache, out=out, config=TrainConfig.from_dict(config), show_progress=False)
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(summary))
