"""Benchmark: one head-only cell on a UCF-101-sized cache (13,320 videos, base-size embeddings).

Builds (once, in ``--workdir``) a synthetic cache with the shapes of UCF-101 split 1 under the
paper's base model: 9,537 training and 3,783 test videos of 101 classes, ``visual.zarr`` with
12 test views and 8 training views of 768-wide fused embeddings, ``audio.zarr`` with one 768-wide
AST embedding (and 527 logits) per video, ``relevance.zarr``. The embeddings are random with a
class signal (so the head learns something); only their shapes matter for the timing.

Then, in one process and one run (ratios against baselines measured in the same run), each with
its wall time, its CPU time (``time.process_time``: the honest figure on a shared machine) and the
load average:

* reading the cache into memory (``load_head_data``: whole arrays, one pass per shard file,
  chunks checksummed) against baseline 0, the same arrays through zarr's own ``arr[...]``;
* the cell exactly as ``imdpipe sweep`` runs one (``sweep._run_cell``: select, head-only training
  with the given recipe, scoring 12 cached test views per test video), training and scoring apart;
* baseline 1, the bare head: the same number of optimizer steps of forward + backward + step on
  pre-made tensors of the same batch (what the cell cannot go below on this CPU);
* baseline 2, the machine: a 1024^3 fp32 matmul's GFLOP/s per thread of CPU time;
* ``sweep`` itself on two cells (seeds 0 and 1) in two processes of one thread each, reading the
  cache included: what a grid costs per cell when the cores allow two at once.

Run: ``.venv/bin/python benchmarks/bench_head_only.py [--epochs 15] [--threads 1] [--no-sweep]``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

TRAIN, TEST, CLASSES, D, DA, C, VIEWS, TRAIN_VIEWS = 9537, 3783, 101, 768, 768, 527, 12, 8


def build_cache(root: Path, seed: int = 0) -> Path:
    """The synthetic UCF-101-sized cache (skipped when ``root/visual.zarr`` is complete)."""
    from imdpipe.pipeline.manifest import VideoRecord, write_manifest
    from imdpipe.pipeline.store import ArraySpec, StageStore, diff_settings
    from imdpipe.train.config import TrainConfig
    from imdpipe.train.visual_cache import CLIP_FIELDS

    clip = {name: getattr(TrainConfig(size="base"), name) for name in CLIP_FIELDS}  # the paper's clips
    settings = {"streams_sha256": "synthetic", **clip, "modalities": ["rgb", "flow"], "clips": 4, "crops": 3,
                "train_views": TRAIN_VIEWS, "seed": 0, "dtype": "float16", "frames": {"backend": "synthetic"}}
    if (root / "visual.zarr").exists():  # reused when complete and made with today's settings
        old = StageStore.open_existing(root / "visual.zarr")
        if old.done_mask().all() and not diff_settings(old.settings, {**old.settings, **settings}):
            return root
    rng = np.random.default_rng(seed)
    labels = [f"class_{c:03d}" for c in range(CLASSES)]
    records = []
    for split, n in (("train", TRAIN), ("test", TEST)):
        for k in range(n):
            c = k % CLASSES
            i = len(records)
            records.append(VideoRecord(index=i, video_id=f"{split}_{k:05d}", path=f"v/{labels[c]}/{split}_{k}.avi",
                                       label=c, label_name=labels[c], split=split, duration_s=7.0, fps=25.0,
                                       n_frames=175, width=320, height=240, has_audio=True))
    manifest = write_manifest(root, records, labels)
    N = len(records)
    proto_v = rng.normal(0, 1, (CLASSES, D)).astype(np.float32)
    proto_a = rng.normal(0, 1, (CLASSES, DA)).astype(np.float32)
    common = dict(manifest_sha256=manifest.sha256, n_items=N, videos_per_shard=64, overwrite=True)
    visual = StageStore.open(root / "visual.zarr", stage="visual", settings=settings,
        attrs={"streams": {"kind": "synthetic"}, "embed_dim": D, "labels": labels,
               "frames_provenance": {"stage": "flow", "settings": {"backend": "synthetic"}}},
        arrays=[ArraySpec("test_embedding", (VIEWS, D), "float16", ("view", "feature")),
                ArraySpec("test_clip_time_s", (VIEWS,), "float32", ("view",)),
                ArraySpec("train_embedding", (TRAIN_VIEWS, D), "float16", ("view", "feature")),
                ArraySpec("train_clip_time_s", (TRAIN_VIEWS,), "float32", ("view",))], **common)
    audio = StageStore.open(root / "audio.zarr", stage="audio", settings={"model": "synthetic", "windows": 1,
                                                                          "window_s": 10.24},
                            attrs={"audio_labels": [f"sound {j}" for j in range(C)]},
                            arrays=[ArraySpec("embedding", (1, DA), "float16", ("window", "feature")),
                                    ArraySpec("logits", (1, C), "float16", ("window", "audio_label")),
                                    ArraySpec("window_start_s", (1,), "float32", ("window",)),
                                    ArraySpec("has_audio", (), "bool", ())], **common)
    rel = StageStore.open(root / "relevance.zarr", stage="relevance", settings={"K": 10, "Ya": 20, "overlap": "iou"},
                          attrs={"K": 10, "Ya": 20, "overlap": "iou"},
                          arrays=[ArraySpec("target", (1,), "float32", ("window",)),
                                  ArraySpec("overlap_count", (1,), "int16", ("window",))], **common)
    label = np.array([r.label for r in records])
    for s, e in visual.shard_ranges():
        b, y = e - s, label[s:e]
        relevant = rng.random(b) < 0.5
        v_test = proto_v[y][:, None] + rng.normal(0, 3, (b, VIEWS, D))
        v_train = proto_v[y][:, None] + rng.normal(0, 3, (b, TRAIN_VIEWS, D))
        a = np.where(relevant[:, None], proto_a[y], 0) + rng.normal(0, 1, (b, DA))
        visual.write_block(s, e, {i: {"test_embedding": v_test[j], "test_clip_time_s": np.full(VIEWS, 3.5),
                                      "train_embedding": v_train[j], "train_clip_time_s": np.full(TRAIN_VIEWS, 3.5)}
                                  for j, i in enumerate(range(s, e))}, {})
        audio.write_block(s, e, {i: {"embedding": a[j][None], "logits": rng.normal(0, 1, (1, C)),
                                     "window_start_s": np.array([-1.62]), "has_audio": np.bool_(True)}
                                 for j, i in enumerate(range(s, e))}, {})
        rel.write_block(s, e, {i: {"target": np.array([0.8 if relevant[j] else 0.1]),
                                   "overlap_count": np.array([8 if relevant[j] else 1])}
                               for j, i in enumerate(range(s, e))}, {})
    return root


def bare_steps(config, steps: int) -> tuple[float, float]:
    """Wall and CPU seconds per optimizer step of the head alone on pre-made tensors (batch
    ``config.batch_size``, the trainer's fused optimizer): the floor of a cell's training steps."""
    import torch

    from imdpipe.heads.model import MultimodalActionModel
    from imdpipe.train.head_only import fused_optimizer
    from imdpipe.train.loop import build_optimizer, loss_terms

    model = MultimodalActionModel(config.model_config(num_classes=CLASSES, audio_dim=DA), streams=False)
    opt = fused_optimizer(build_optimizer(model, config))
    b = config.batch_size
    v, a = torch.randn(b, D), torch.randn(b, DA)
    y, t = torch.randint(0, CLASSES, (b,)), torch.rand(b)
    for warm in (True, False):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(3 if warm else steps):
            logits, _, rev_logit = model.forward_head(v, model.audio(a), rev_logit=True)
            loss, _, _ = loss_terms(logits, rev_logit, y, t, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def matmul_gflops(repeats: int = 10) -> float:
    """fp32 1024^3 matmul GFLOP/s of this process's CPU time (the machine's speed, whatever its load)."""
    import torch

    x = torch.randn(1024, 1024)
    x @ x
    c0 = time.process_time()
    for _ in range(repeats):
        x @ x
    return 2 * 1024**3 * repeats / (time.process_time() - c0) / 1e9


def zarr_baseline(cache: Path) -> tuple[float, float, int]:
    """Wall and CPU seconds of reading the same arrays with zarr's own ``arr[...]``, and the chunk count."""
    import zarr

    from imdpipe.train.head_only import _ARRAYS

    t0, c0, chunks = time.perf_counter(), time.process_time(), 0
    for store, names in _ARRAYS.items():
        group = zarr.open_group(cache / store, mode="r")
        for name in names:
            group[name][...]
            chunks += group[name].shape[0]
    return time.perf_counter() - t0, time.process_time() - c0, chunks


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} CPUs"


def main() -> None:
    import shutil

    import torch

    from imdpipe.train import sweep
    from imdpipe.train.config import TrainConfig
    from imdpipe.train.head_only import load_head_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/imdpipe-bench-head-only"))
    ap.add_argument("--epochs", type=int, default=15, help="paper: 15")
    ap.add_argument("--batch-size", type=int, default=64, help="paper: 64")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the one-cell run (a sweep uses 1 per "
                                                          "process)")
    ap.add_argument("--bare-steps", type=int, default=40)
    ap.add_argument("--no-zarr-baseline", action="store_true", help="skip reading the arrays through zarr's arr[...]")
    ap.add_argument("--no-sweep", action="store_true", help="skip the 2-cell sweep (2 processes, 1 thread each)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"start: {load()}; one cell on {args.threads} thread(s)")
    t0 = time.perf_counter()
    cache = build_cache(args.workdir)
    print(f"synthetic cache ready in {time.perf_counter() - t0:.1f} s: {TRAIN + TEST} videos")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, threads=args.threads, device="cpu",
                         val_split="last")
    steps = (TRAIN // args.batch_size) * args.epochs
    gflops = matmul_gflops()

    before = load()
    t0, c0 = time.perf_counter(), time.process_time()
    data = load_head_data(cache)
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"load_head_data (whole arrays, one pass per shard file): {load_s:.1f} s wall, {load_cpu:.1f} s CPU "
          f"({before})")
    if not args.no_zarr_baseline:
        before = load()
        z_s, z_cpu, chunks = zarr_baseline(cache)
        print(f"the same arrays through zarr's arr[...]: {z_s:.1f} s wall, {z_cpu:.1f} s CPU for {chunks} chunks "
              f"({1000 * z_cpu / chunks:.2f} ms CPU per chunk; {before}); load_head_data is {z_cpu / load_cpu:.1f}x "
              f"less CPU (and also checks flags and provenance)")

    sweep._init_worker(data, {}, args.threads)
    job = {"config": config.to_dict(), "targets_key": None, "test_split": "test", "row": {"cell": "bench", "seed": 0}}
    before = load()
    c0 = time.process_time()
    row = sweep._run_cell(job)
    cell_cpu = time.process_time() - c0
    train_cpu = row["train_cpu_seconds"]
    print(f"one cell ({args.epochs} epochs, batch {args.batch_size}, {steps} steps, then {TEST} x {VIEWS} test views): "
          f"{row['seconds']:.1f} s wall ({row['train_seconds']:.1f} training + {row['score_seconds']:.1f} scoring), "
          f"{cell_cpu:.1f} s CPU ({train_cpu:.1f} training = {1000 * train_cpu / steps:.1f} ms per step, "
          f"{cell_cpu - train_cpu:.1f} scoring); test top-1 {row['top1']:.1f}% ({before} at its start, {load()} "
          f"at its end)")
    bare, bare_cpu = bare_steps(config, args.bare_steps)
    print(f"bare head, same steps on pre-made tensors: {bare * steps:.1f} s wall ({1000 * bare:.1f} ms/step), "
          f"{bare_cpu * steps:.1f} s CPU ({1000 * bare_cpu:.1f} ms/step); cell / bare = "
          f"{train_cpu / (bare_cpu * steps):.2f} in CPU (training); matmul fp32 {gflops:.0f} GFLOP/s per thread of "
          f"CPU time")
    if not args.no_sweep:
        out = args.workdir / "sweep"
        shutil.rmtree(out, ignore_errors=True)  # results.jsonl would make a rerun skip its cells
        before = load()
        t0, c0 = time.perf_counter(), time.process_time()
        sweep.run_sweep(cache=cache, out=out, grid={"seeds": [0, 1]}, config=config, workers=2, show_progress=False)
        wall = time.perf_counter() - t0
        import json

        rows = [json.loads(x) for x in (out / sweep.RESULTS_NAME).read_text().splitlines()[1:]]
        walls = ", ".join(f"{r['seconds']:.1f}" for r in rows)
        cpus = ", ".join(f"{r['cpu_seconds']:.1f}" for r in rows)
        print(f"sweep of 2 cells in 2 processes (1 thread each), reading the cache included: {wall:.1f} s wall, "
              f"{wall / 2:.1f} s per cell; cells {walls} s wall, {cpus} s CPU; parent "
              f"{time.process_time() - c0:.1f} s CPU ({before} at its start, {load()} at its end)")
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
