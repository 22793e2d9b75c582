"""Flow extraction speed and accuracy, end to end, against an mmaction2-style baseline (not a test).

On synthetic 256x340 known-motion videos (a smooth random colour texture translated by a
sub-pixel (dx, dy) per frame, or rotated + zoomed about the centre; H.264 at ``--crf``) this measures, in one run:

* for each available backend of ``imdpipe extract-flow``: frame pairs per second end to end
  (PyAV decode + resize + flow + quantize + Zarr write, ``--workers`` processes) with T equal to
  the video length so every consecutive pair is computed, as the baseline does; and the mean
  end-point error (EPE, px, 16 px border excluded) of the stored, dequantized flow;
* the baseline of mmaction2's CPU tool (tools/misc/flow_extraction.py): OpenCV decode, per-pair
  ``calcOpticalFlowFarneback(prev, next, None, 0.5, 3, 15, 3, 5, 1.2, 0)``, each flow written as
  two JPEGs (x and y, bound 20), in the same process pool; its EPE is read back from the JPEGs.
  TV-L1 likewise when opencv-contrib is installed.

* where one worker's CPU time goes per pair (decode, flow + quantize, Zarr write), for DIS
  balanced in one process, and the pairs/s that bounds on fully used cores.

Ratios are printed against the baseline. Usage: ``python benchmarks/bench_flow.py [--videos 6]
[--frames 48] [--workers 2] [--crf 18] [--raft]`` (``--raft`` adds random-weight RAFT-small on CPU, speed
only).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from imdpipe.pipeline.flow import DIS_PRESETS, extract_flow, tvl1_available
from imdpipe.pipeline.flow_utils import dequantize
from imdpipe.pipeline.manifest import VideoRecord, write_manifest
from imdpipe.pipeline.media import write_mp4

H, W = 256, 340
MARGIN = 16


def _texture(rng, h, w, sigma=1.5):
    """A colour texture in [0, 1], (h, w, 3): fine luma (blur ``sigma``) and smoother chroma.

    Colour, not grey: the store's compressor behaves differently on R = G = B frames (zstd finds
    3-byte repeats everywhere and runs ~2x slower than on colour frames).
    """
    def noise(s):
        t = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), s)
        return (t - t.min()) / (t.max() - t.min())

    y, u, v = noise(sigma), noise(4 * sigma) - 0.5, noise(4 * sigma) - 0.5
    img = np.stack([y + 0.6 * v, y - 0.2 * u - 0.3 * v, y + 0.8 * u], -1)
    return (img - img.min()) / (img.max() - img.min())


def _rgb(img):
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def make_videos(d: Path, count: int, n: int, seed: int = 0, crf: int = 18):
    """Half translations, half rotation+zoom; returns [(path, gt (H, W, 2) per-pair flow)]."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    c = np.array([(W - 1) / 2, (H - 1) / 2])
    for k in range(count):
        frames = []
        if k % 2 == 0:
            dx, dy = rng.uniform(-2.5, 2.5, size=2)
            big = _texture(rng, H + 2 * (n * 3 + 8), W + 2 * (n * 3 + 8))
            oy, ox = (big.shape[0] - H) // 2, (big.shape[1] - W) // 2
            for t in range(n):
                m = np.float32([[1, 0, dx * t], [0, 1, dy * t]])
                moved = cv2.warpAffine(big, m, big.shape[1::-1], flags=cv2.INTER_CUBIC,
                                       borderMode=cv2.BORDER_REFLECT)
                frames.append(_rgb(moved[oy:oy + H, ox:ox + W]))
            gt = np.broadcast_to(np.float32([dx, dy]), (H, W, 2))
        else:
            th, s = math.radians(rng.uniform(-1.0, 1.0)), rng.uniform(0.99, 1.01)
            a = s * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
            tex = _texture(rng, H, W)
            for t in range(n):
                at = np.linalg.matrix_power(a, t)
                m = np.hstack([at, (c - at @ c)[:, None]]).astype(np.float32)
                frames.append(_rgb(cv2.warpAffine(tex, m, (W, H), flags=cv2.INTER_CUBIC,
                                                  borderMode=cv2.BORDER_REFLECT)))
            px = np.stack([xx - c[0], yy - c[1]], -1)
            gt = (px @ a.T - px).astype(np.float32)
        path = write_mp4(d / f"v{k}.mp4", np.stack(frames), 25, crf=crf)
        out.append((path, gt))
    return out


def epe(flow, gt):
    d = flow - gt
    return float(np.hypot(d[..., 0], d[..., 1])[..., MARGIN:-MARGIN, MARGIN:-MARGIN].mean())


# ---------------------------------------------------------------------------------------------
# baseline: mmaction2's CPU flow tool (decode with OpenCV, Farneback/TV-L1 per pair, 2 JPEGs each)
# ---------------------------------------------------------------------------------------------
def _baseline_video(path: str, out_dir: str, method: str, bound: float = 20.0) -> int:
    cv2.setNumThreads(1)
    cap = cv2.VideoCapture(path)
    ok, prev = cap.read()
    prev = cv2.cvtColor(cv2.resize(prev, (W, H)), cv2.COLOR_BGR2GRAY)
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create() if method == "tvl1" else None
    i = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        cur = cv2.cvtColor(cv2.resize(frame, (W, H)), cv2.COLOR_BGR2GRAY)
        if tvl1 is not None:
            flow = tvl1.calc(prev, cur, None)
        else:
            flow = cv2.calcOpticalFlowFarneback(prev, cur, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        q = np.round((np.clip(flow, -bound, bound) + bound) * (255 / (2 * bound))).astype(np.uint8)
        stem = os.path.join(out_dir, f"{Path(path).stem}_{i:05d}")
        cv2.imwrite(stem + "_x.jpg", q[..., 0])
        cv2.imwrite(stem + "_y.jpg", q[..., 1])
        prev, i = cur, i + 1
    return i


def run_baseline(videos, method: str, workers: int, tmp: Path):
    out_dir = tmp / f"baseline_{method}"
    out_dir.mkdir()
    t0 = time.perf_counter()
    # forkserver, as in imdpipe: forking a parent whose OpenCV thread pool has run can deadlock
    with ProcessPoolExecutor(max_workers=max(workers, 1), mp_context=mp.get_context("forkserver")) as pool:
        pairs = sum(pool.map(_baseline_video, [str(p) for p, _ in videos], [str(out_dir)] * len(videos),
                             [method] * len(videos)))
    seconds = time.perf_counter() - t0
    errs = []
    for p, gt in videos:
        for i in range(0, 999999, 7):  # every 7th pair is enough for the EPE
            stem = out_dir / f"{p.stem}_{i:05d}"
            if not Path(str(stem) + "_x.jpg").exists():
                break
            q = np.stack([cv2.imread(str(stem) + s, cv2.IMREAD_GRAYSCALE) for s in ("_x.jpg", "_y.jpg")], -1)
            errs.append(epe(dequantize(q), gt))
    return pairs, seconds, float(np.mean(errs))


# ---------------------------------------------------------------------------------------------
# imdpipe extract-flow
# ---------------------------------------------------------------------------------------------
def run_imdpipe(videos, n: int, tmp: Path, name: str, workers: int, **kw):
    cache = tmp / f"cache_{name}"
    recs = [VideoRecord(index=i, video_id=p.stem, path=str(p), label=0, label_name="a", split="train")
            for i, (p, _) in enumerate(videos)]
    write_manifest(cache, recs, ["a"])
    from rich.console import Console

    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    t0 = time.perf_counter()
    summary = extract_flow(cache=cache, frames=n, size=(H, W), workers=workers, videos_per_shard=4,
                           show_progress=False, console=quiet, **kw)
    seconds = time.perf_counter() - t0
    assert summary.ok == len(videos), summary.errors
    import zarr

    g = zarr.open_group(cache / "frames.zarr", mode="r")
    errs = []
    for i, (_, gt) in enumerate(videos):
        flow = dequantize(g["flow"][i][: n - 1])  # the last position repeats pair n-2 -> n-1
        errs.append(np.mean([epe(f, gt) for f in flow[::7]]))
    return len(videos) * (n - 1), seconds, float(np.mean(errs))


def cost_breakdown(videos, n: int, tmp: Path, preset: str) -> dict[str, float]:
    """CPU ms per pair of each step of one worker (one process, DIS ``preset``): where the time goes."""
    from imdpipe.pipeline.flow import FlowSettings, decode_video_frames, flow_for_video, open_frames_store
    from imdpipe.pipeline.manifest import read_manifest

    cv2.setNumThreads(1)
    settings = FlowSettings(frames=n, size=(H, W), backend="dis", preset=preset)
    cache = tmp / f"cost_{preset}"
    recs = [VideoRecord(index=i, video_id=p.stem, path=str(p), label=0, label_name="a", split="train")
            for i, (p, _) in enumerate(videos)]
    write_manifest(cache, recs, ["a"])
    store = open_frames_store(cache, settings, read_manifest(cache), videos_per_shard=len(videos), overwrite=False)
    flow_for_video(decode_video_frames(videos[0][0], (H, W), frames=n, threads=1), settings)  # warm-up
    cost = {"decode (PyAV + RGB)": 0.0, "flow + quantize": 0.0, "Zarr write (zstd 1)": 0.0}
    rows = {}
    for i, (p, _) in enumerate(videos):
        t0 = time.process_time()
        video = decode_video_frames(p, (H, W), frames=n, threads=1)
        t1 = time.process_time()
        rows[i] = flow_for_video(video, settings)
        cost["decode (PyAV + RGB)"] += t1 - t0
        cost["flow + quantize"] += time.process_time() - t1
    t0 = time.process_time()
    store.write_rows(0, len(videos), rows)
    cost["Zarr write (zstd 1)"] = time.process_time() - t0
    return {k: 1000 * v / (len(videos) * (n - 1)) for k, v in cost.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--frames", type=int, default=48, help="frames per synthetic video (all pairs are computed)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--crf", type=int, default=18, help="H.264 quality of the synthetic videos (x264 default 23; "
                    "18 is visually lossless; lower = bigger files, slower decode)")
    ap.add_argument("--raft", action="store_true", help="also time random-weight RAFT-small on CPU")
    args = ap.parse_args(argv)
    n = args.frames
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"bench_flow: {args.videos} videos of {n} frames at {H}x{W} (crf {args.crf}), {args.workers} workers, "
          f"{os.cpu_count()} CPUs, load average at start {load:.2f}")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        videos = make_videos(tmp, args.videos, n, crf=args.crf)
        # decode alone (PyAV, every frame), for reference
        import av

        t0 = time.perf_counter()
        decoded = 0
        for p, _ in videos:
            with av.open(str(p)) as c:
                for f in c.decode(video=0):
                    f.to_ndarray(format="rgb24")
                    decoded += 1
        decode_fps = decoded / (time.perf_counter() - t0)
        rows = []
        pairs, sec, e = run_baseline(videos, "farneback", args.workers, tmp)
        rows.append(("baseline: mmaction2 Farneback + 2 JPEGs", pairs / sec, e))
        if tvl1_available():
            pairs, sec, e = run_baseline(videos, "tvl1", args.workers, tmp)
            rows.append(("baseline: mmaction2 TV-L1 + 2 JPEGs", pairs / sec, e))
        for preset in ("ultrafast", "fast", "balanced", "medium"):
            pairs, sec, e = run_imdpipe(videos, n, tmp, f"dis_{preset}", args.workers, backend="dis", preset=preset)
            label = f"imdpipe dis {preset}" + (" (default)" if preset == "balanced" else "")
            rows.append((label, pairs / sec, e))
        pairs, sec, e = run_imdpipe(videos, n, tmp, "farneback", args.workers, backend="farneback")
        rows.append(("imdpipe farneback", pairs / sec, e))
        if tvl1_available():
            pairs, sec, e = run_imdpipe(videos, n, tmp, "tvl1", args.workers, backend="tvl1")
            rows.append(("imdpipe tvl1", pairs / sec, e))
        if args.raft:
            import torch
            from torchvision.models.optical_flow import raft_small

            w = tmp / "raft_small_random.pth"
            torch.save(raft_small(weights=None).state_dict(), w)
            k = min(2, len(videos))
            pairs, sec, _ = run_imdpipe(videos[:k], n, tmp, "raft", 1, backend="raft", raft_variant="small",
                                        flow_weights=w, device="cpu", batch_size=16)
            rows.append(("imdpipe raft_small CPU, random weights (speed only)", pairs / sec, float("nan")))
        costs = cost_breakdown(videos[:4], n, tmp, "balanced")
    base_rate, base_epe = rows[0][1], rows[0][2]
    print(f"\nPyAV decode alone: {decode_fps:.0f} frames/s (1 process)\n")
    print(f"| {'method':52s} | {'pairs/s':>8s} | {'x baseline':>10s} | {'EPE px':>7s} | {'EPE / baseline':>14s} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 12}|{'-' * 9}|{'-' * 16}|")
    for name, rate, e in rows:
        print(f"| {name:52s} | {rate:8.1f} | {rate / base_rate:10.2f} | {e:7.3f} | {e / base_epe:14.2f} |")
    total = sum(costs.values())
    print("\nCPU per pair of one worker, DIS balanced, 1 process (4 videos): "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in costs.items())
          + f"; total {total:.2f} ms -> at most {args.workers * 1000 / total:.0f} pairs/s with {args.workers} "
          f"fully used cores")
    default = next(r for r in rows if "(default)" in r[0])
    print(f"\ndefault CPU backend: {default[1]:.0f} pairs/s end to end (target >= 300), "
          f"{default[1] / base_rate:.1f}x the Farneback+JPEG baseline (target >= 5x), "
          f"EPE {default[2]:.3f} vs Farneback baseline {base_epe:.3f} px. DIS presets: "
          + ", ".join(f"{k}={v}" for k, v in DIS_PRESETS.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
