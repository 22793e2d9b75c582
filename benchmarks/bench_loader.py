"""Training clips/s: the cache loader vs decoding the same clips from the mp4s (flow on the fly).

Both loaders are the same :class:`imdpipe.train.data.ClipDataset` (same clip positions, crops,
flips, transforms, DataLoader workers and batch); only the source of the frames differs:

* cache: ``frames.zarr`` (uint8 RGB + quantized flow, one Zarr chunk per video);
* decode: PyAV decode of the mp4 (the frames.zarr sampling and resize) plus optical flow of the
  clip's frame pairs with the default CPU backend (DIS), computed for every clip.

Also reports the training speed (forward + backward + SGD step) of the tiny model at 112 px on
cache batches, which is what the demo runs. Usage::

    .venv/bin/python benchmarks/bench_loader.py [--videos 12] [--workers 2] [--batches 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from imdpipe.pipeline.flow import (
    DEFAULT_CPU_BACKEND,
    FlowSettings,
    _cpu_flow_fn,
    decode_video_frames,
    flow_pair,
)
from imdpipe.pipeline.flow_utils import quantize
from imdpipe.pipeline.manifest import VideoRecord, write_manifest
from imdpipe.pipeline.media import write_mp4
from imdpipe.train.data import ClipDataset, open_cache, prepare_inputs, select_videos


def make_videos(root: Path, n: int, seconds: float, fps: int, size: tuple[int, int]) -> Path:
    """``n`` real H.264 mp4s of moving textured content, a manifest, and frames.zarr."""
    from imdpipe.pipeline.flow import extract_flow

    rng = np.random.default_rng(0)
    H, W = size
    records = []
    yy, xx = np.mgrid[0:H, 0:W]
    for i in range(n):
        frames = []
        base = rng.integers(0, 255, size=(H // 8 + 1, W // 8 + 1, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)[:H, :W]
        for t in range(int(seconds * fps)):
            f = np.roll(base, shift=(t * (1 + i % 3), t * 2), axis=(0, 1)).copy()
            f[((yy - 20 - 3 * t) ** 2 + (xx - 40 - 5 * t) ** 2) < 400] = 255
            frames.append(f)
        rel = f"videos/c{i % 4}/v{i}.mp4"
        write_mp4(root / rel, np.stack(frames), fps)
        records.append(VideoRecord(index=i, video_id=f"v{i}", path=rel, label=i % 4, label_name=f"c{i % 4}",
                                   split="train", duration_s=seconds, fps=float(fps), n_frames=len(frames),
                                   width=W, height=H, has_audio=False))
    write_manifest(root, records, [f"c{k}" for k in range(4)])
    extract_flow(cache=root, backend=DEFAULT_CPU_BACKEND, frames=32, size=(256, 340), workers=0, show_progress=False)
    return root


class DecodeClipDataset(ClipDataset):
    """The same clips, decoded from the mp4 with flow computed on the fly (the baseline)."""

    def __init__(self, *args, paths: dict[int, str], settings: FlowSettings, **kw):
        super().__init__(*args, **kw)
        self.paths, self.settings = paths, settings
        self._video_of = None

    def _read(self, key, index, positions, box):
        if self._video_of is None or self._video_of[0] != index:
            video = decode_video_frames(self.paths[index], self.settings.size, frames=self.settings.frames, threads=1)
            self._video_of = (index, video)
        video = self._video_of[1]
        y0, x0, h, w = box
        if key == "rgb":
            block = np.stack([video.images[int(video.frame_index[p])] for p in positions])
        else:
            import cv2

            fn = _cpu_flow_fn(self.settings)
            flows = []
            for p in positions:
                a, b = flow_pair(int(video.frame_index[p]), video.n_frames)
                flows.append(fn(cv2.cvtColor(video.images[a], cv2.COLOR_RGB2GRAY),
                                cv2.cvtColor(video.images[b], cv2.COLOR_RGB2GRAY)))
            block = quantize(np.stack(flows), self.settings.bound)
        return block[:, y0:y0 + h, x0:x0 + w]


def clips_per_second(ds, *, workers: int, batch: int, batches: int) -> float:
    ds.set_epoch(0)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=batch * (batches + 1),
                                             generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up and first chunk reads are not timed
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += b["rgb"].shape[0]
    return n / (time.perf_counter() - t0)


def train_speed(ds, *, batch: int, steps: int, crop: int) -> float:
    from imdpipe.heads import ModelConfig, build_model

    model = build_model(ModelConfig(num_classes=4, size="tiny", fusion="none", modalities=("rgb", "flow"),
                                    img_size=crop))
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=1, drop_last=True)
    it = iter(loader)
    t0 = n = 0
    for s in range(steps + 1):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        if s == 1:
            t0, n = time.perf_counter(), 0
        rgb, flow, _ = prepare_inputs(b, ("rgb", "flow"), torch.device("cpu"), flow_bound=20.0)
        logits, _ = model(rgb, flow, None)
        loss = torch.nn.functional.cross_entropy(logits, b["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += b["rgb"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=None, help="reuse a cache made by an earlier run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory() if args.cache is None else None
    root = args.cache or Path(tmp.name)
    if not (root / "frames.zarr").exists():
        print(f"writing {args.videos} mp4s ({args.seconds:.0f} s, {args.fps} fps, 256x340) and frames.zarr ...")
        make_videos(root, args.videos, args.seconds, args.fps, (256, 340))
    info = open_cache(root, audio=False, relevance=False)
    idx = select_videos(info, "train").indices
    settings = FlowSettings.from_store_attrs(info.provenance["stores"]["frames.zarr"])
    kw = dict(mode="train", modalities=("rgb", "flow"), relevance=False, num_frames=8, frame_stride=2,
              crop_size=args.crop, seed=0)
    cache_ds = ClipDataset(info, idx, **kw)
    paths = {r.index: str(root / r.path) for r in info.manifest.records}
    decode_ds = DecodeClipDataset(info, idx, paths=paths, settings=settings, **kw)
    same = [cache_ds[i] for i in range(2)], [decode_ds[i] for i in range(2)]
    diff = max(int((a["rgb"].int() - b["rgb"].int()).abs().max()) for a, b in zip(*same))
    print(f"same clips from both loaders: max |rgb difference| = {diff} (uint8 levels)")
    cache_rate = clips_per_second(cache_ds, workers=args.workers, batch=args.batch, batches=args.batches * 4)
    decode_rate = clips_per_second(decode_ds, workers=args.workers, batch=args.batch, batches=args.batches)
    print(f"8-frame clips, crop {args.crop}, batch {args.batch}, {args.workers} workers, "
          f"{args.threads} torch thread(s), flow backend {settings.backend}")
    print(f"  cache loader   : {cache_rate:8.1f} clips/s")
    print(f"  decode + flow  : {decode_rate:8.1f} clips/s")
    print(f"  ratio          : {cache_rate / decode_rate:8.1f}x  (target >= 5x)")
    tiny_ds = ClipDataset(info, idx, **{**kw, "crop_size": 112})
    rate = train_speed(tiny_ds, batch=args.batch, steps=3, crop=112)
    print(f"train step, size tiny, rgb+flow, 112 px, 8 frames: {rate:.1f} clips/s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
