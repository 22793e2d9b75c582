"""The end-to-end demo: the whole IMD pipeline on synthetic audio-visual data, on a laptop CPU.

Steps (each is the library function behind one CLI command, so the demo runs exactly what a
user would type):

1. ``synth``: a synthetic video dataset whose labels are visual and whose audio is relevant
   only sometimes, plus a labelled sound bank;
2. ``train-tagger``: a small AST (the real architecture) trained on the sound bank; it stands in
   for the AudioSet-pretrained AST, which cannot be downloaded here;
3. ``index``, ``extract-flow``, ``extract-audio`` (with that tagger), ``build-savld`` (offline
   MiniLM encoder, audio labels from the tagger), the relevance targets, and ``savld-report``
   (relevance AUC of the paper's text dictionary against the data-driven and hybrid ones);
4. ``train`` + ``evaluate`` of every row of :data:`METHODS` with one shared recipe, once per
   training seed;
5. a table in the style of the paper's Table 5 with 95% intervals (bootstrap over the test
   videos and the training seeds), paired comparisons with late concatenation, ``results.json``,
   ``table.md`` (the table and its reading, ready to paste) and ``report.md``.

Every number is a function of the seed: the synthetic videos are encoded deterministically,
every training run uses one torch thread in its own worker process with its data loaded in that
process (so its numbers do not depend on how many runs go at once), every run's randomness comes
from its seed, and the bootstrap draws from a generator seeded with the demo
seed, so two runs of ``imdpipe demo --seed N`` on one machine write the same ``results.json``
byte for byte.

Every stage reuses what an earlier run of the demo left in ``out`` (the stores resume and the
tagger is reused when its settings match), so a second run only repeats the training.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Method:
    """One row of the demo's table: a fusion trained and tested with the demo's shared recipe.

    Args:
        name: the row's name in the table.
        fusion: the fusion head (``imdpipe train --fusion``).
        modalities: the modalities it uses.
        cross_modal_p: probability of intra-class cross-modality augmentation.
        note: what the row is, for the report.
    """

    name: str
    fusion: str
    modalities: tuple[str, ...] = ("rgb", "flow", "audio")
    cross_modal_p: float = 0.0
    note: str = ""


#: The rows of the table, in order. Every row gets the same data, recipe, budget and seeds;
#: another row (another fusion, or a relevance built another way) is one more entry here.
METHODS: tuple[Method, ...] = (
    Method("visual only", "none", ("rgb", "flow"), note="RGB and flow streams, no audio"),
    Method("late concat", "late-concat", note="z = W [v; a] + b"),
    Method("GMU", "gmu", note="gated multimodal unit"),
    Method("IMD", "imd", note="learnable irrelevant modality dropout, alpha 0.25, masking"),
    Method("IMD*", "imd", cross_modal_p=0.5, note="IMD with intra-class cross-modality augmentation (p 0.5)"),
)
#: The row every other row is compared with (paired bootstrap of the difference).
BASELINE = "late concat"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and the training recipe of the demo: ours, not the paper's (which trains ViT-B from
    ImageNet weights for 15 epochs on Kinetics with SGD), chosen so that the tiny visual streams,
    trained from scratch, learn within minutes on 2 CPU cores. Every row of :data:`METHODS` gets
    this one recipe. Tuned with the visual-only row on the draw of seed 99, which is not a reported
    seed (the trials, their CPU seconds and top-1, are in the README, "How far vision gets"):

    * 64-px crops of 4 frames 2 cached positions apart (0.4 s apart, 1.2 s in all): a quarter of
      the tokens of 112-px 8-frame clips. Spreading the 4 frames over the whole 3 s (stride 5)
      did not help (45% against 50% test top-1 at 384 steps);
    * crops of 50-100% of the frame instead of 25-100% (a quarter crop can lose the moving shape);
    * flow divided by 2 instead of 20: the demo's flow has a standard deviation of 1.8 px, so /20
      fed the flow stream inputs ~0.09 wide beside unit-scale normalized RGB;
    * 48 videos per class, a third of them test videos: 256 training and 128 test videos (one
      test video is 0.8 points). The tiny ViT from scratch needs both training clips and
      videos: with 24 videos per class, 3072 clips (the previous recipe) left it at ~55% train
      and 50% test top-1; 9216 clips brought it to the 75% train ceiling but only 61% test;
      with 48 videos per class it tests at 61% after 6144 clips, 67% after 9216 and 62% after
      12288 (single runs a few points apart by chance: no gain past 9216);
    * batch 32, AdamW lr 1e-3 with 1 warmup epoch then cosine, weight decay 0.05, 36 epochs
      (288 steps, 9216 training clips): a batch of 32 costs ~20% less CPU per clip than 8 at the
      same accuracy per clip; lr 2e-3 (with or without gradient clipping) and 3e-4 were no better;
      a smaller transformer (64 wide, 2 blocks) saved a third of the CPU and lost 5 points.
    """

    # data
    videos_per_class: int = 48
    test_fraction: float = 1 / 3
    video_size: tuple[int, int] = (128, 160)
    duration_s: float = 3.0
    fps: float = 10
    soundbank_clips: int = 240
    tagger_epochs: int = 12
    frames: int = 16
    # the recipe, the same for every row
    crop_size: int = 64
    crop_scale: tuple[float, float] = (0.5, 1.0)
    num_frames: int = 4
    frame_stride: int = 2
    flow_scale: float = 2.0
    epochs: int = 36
    batch_size: int = 32
    lr: float = 1e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    train_seeds: int = 1
    # relevance
    relevance_k: int = 1
    ya: int = 2
    savld_k: int = 3
    alpha: float = 0.25
    # system and statistics
    threads: int = 2
    train_workers: int = 2
    bootstrap: int = 2000


def run_demo(*, out: str | Path = "demo", seed: int = 0, settings: DemoSettings | None = None,
             methods: tuple[Method, ...] = METHODS, console=None, show_progress: bool = True) -> list[dict]:
    """Run the whole pipeline into ``out`` and return the rows of the results table.

    Args:
        out: working directory (data, cache, tagger, runs, report).
        seed: seed of the synthetic draw, of the training seeds and of the bootstrap.
        settings: demo sizes and recipe (default :class:`DemoSettings`).
        methods: the table's rows (default :data:`METHODS`).
        console: a ``rich.console.Console``.
        show_progress: draw progress bars.
    """
    # torch's OpenMP threads spin while they wait for the next kernel (libgomp's default, "active").
    # Beside other jobs on 2 cores, the two spinning threads then wait for each other's time slice:
    # 16 demo training steps took 174 s wall (43 s CPU) under a load of 4, 4 s (1.4 s CPU) with
    # passive waiting. libgomp reads the policy once, when torch is first imported (as by
    # `imdpipe demo`, which imports it here); the numbers do not depend on it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from rich.console import Console

    console = console or Console(stderr=True)
    s = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_seed(out, seed)
    _quiet_transformers()
    # A fixed thread count: torch's CPU kernels then split every reduction the same way on every
    # run (the demo is CPU only and loads its data in the main process).
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _run(out, seed, s, methods, console, show_progress)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, seed: int, s: DemoSettings, methods, console, show_progress) -> list[dict]:
    from imdpipe.contract import GROUND_TRUTH_NAME
    from imdpipe.datasets.synth import synth_dataset
    from imdpipe.pipeline.audio import extract_audio
    from imdpipe.pipeline.flow import extract_flow
    from imdpipe.pipeline.index import build_index
    from imdpipe.pipeline.relevance import build_relevance
    from imdpipe.pipeline.savld import build_savld
    from imdpipe.pipeline.store import print_summary
    from imdpipe.train.config import TrainConfig
    from imdpipe.train.tagger import TaggerSettings, train_tagger

    data, cache, tagger_dir, runs = out / "data", out / "cache", out / "tagger", out / "runs"
    timings: dict[str, float] = {}
    clock = _Clock()

    def step(name: str):
        console.rule(f"[bold]{name}")
        return _Timer(timings, name)

    with step("1. synthetic audio-visual data"):
        if not (data / "synth.json").exists():
            synth_dataset(data, seed=seed, videos_per_class=s.videos_per_class, size=s.video_size,
                          duration_s=s.duration_s, fps=s.fps, test_fraction=s.test_fraction,
                          soundbank_clips=s.soundbank_clips, workers=s.threads, console=console,
                          show_progress=show_progress)
        else:
            console.print(f"reusing {data}")
    with step("2. audio tagger (small AST on the sound bank)"):
        train_tagger(data / "soundbank" / "soundbank.csv", tagger_dir,
                     settings=TaggerSettings(epochs=s.tagger_epochs, seed=seed), console=console)
    with step("3. index"):
        if not (cache / "manifest.csv").exists():
            build_index(cache=cache, root=data / "videos", splits=data / "splits", console=console)
        else:
            console.print(f"reusing {cache / 'manifest.csv'}")
    with step("4. extract-flow"):
        print_summary(extract_flow(cache=cache, backend="auto", frames=s.frames, size=s.video_size,
                                   console=console, show_progress=show_progress), console)
    with step("5. extract-audio"):
        extract_audio(cache=cache, model=tagger_dir, console=console, show_progress=show_progress)
    with step("6. build-savld + relevance targets"):
        build_savld(cache=cache, k=s.savld_k, plot=True, console=console)
        build_relevance(cache=cache, K=s.relevance_k, ya=s.ya, alpha=s.alpha, console=console)
    with step("6b. savld-report: text vs data vs hybrid dictionaries"):
        dictionaries, _ = compare_dictionaries(cache, out, s, ground_truth=data / GROUND_TRUTH_NAME,
                                               console=console, show_progress=show_progress)

    recipe = TrainConfig(size="tiny", alpha=s.alpha, num_frames=s.num_frames, frame_stride=s.frame_stride,
                         crop_size=s.crop_size, crop_scale=s.crop_scale, flow_scale=s.flow_scale, optimizer="adamw",
                         lr=s.lr, weight_decay=s.weight_decay, batch_size=s.batch_size, epochs=s.epochs,
                         warmup_epochs=s.warmup_epochs, num_workers=0, threads=1, val_split="last")
    gt = data / GROUND_TRUTH_NAME
    seeds = train_seeds(seed, s.train_seeds)
    jobs = []
    for method in methods:
        for k, train_seed in enumerate(seeds):
            cfg = replace(recipe, fusion=method.fusion, modalities=method.modalities,
                          cross_modal_p=method.cross_modal_p, seed=train_seed)
            jobs.append((method.name, k, runs / f"{_slug(method.name)}-seed{k}", cfg))
    with step(f"7. train + evaluate: {len(methods)} rows x {len(seeds)} training seed(s), "
              f"{s.train_workers} at a time"):
        done = train_rows(jobs, cache=cache, ground_truth=gt, workers=s.train_workers, console=console)
    evaluations: dict[str, list[dict]] = {}
    for name, k, _, _ in jobs:
        m, seconds = done[(name, k)]
        timings[f"7. {name}, training seed {k + 1} (in a worker)"] = seconds["wall_s"]
        clock.worker_cpu += seconds["cpu_s"]
        evaluations.setdefault(name, []).append(m)

    results = summarize(evaluations, baseline=BASELINE, n_boot=s.bootstrap, seed=seed)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    console.print(format_table(results))
    table = markdown_table(results) + "\n\n" + reading(results, evaluations)
    (out / "table.md").write_text(table + "\n")
    write_report(out, table=table, results=results, evaluations=evaluations, seed=seed, settings=s,
                 timings=timings, usage=clock.usage(), cache=cache, dictionaries=dictionaries)
    console.print(f"report: {out / 'report.md'}   results: {out / 'results.json'}   table: {out / 'table.md'}")
    return results


# ---------------------------------------------------------------------------------------------
# Training the rows
# ---------------------------------------------------------------------------------------------
def train_rows(jobs: list[tuple], *, cache: Path, ground_truth: Path, workers: int, console) -> dict:
    """Train and score every ``(name, k, run, config)`` of ``jobs``, ``workers`` at a time.

    Each run trains on one torch thread in its own process (``workers`` 0: one after the other in
    this process), so its numbers do not depend on how many run beside it, and 2 runs on 2 cores
    use both where one run on 2 threads keeps the second mostly waiting (its kernels are small).

    Returns:
        ``{(name, k): (evaluate's metrics with "run", {"wall_s", "cpu_s"})}``.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results = {}
    if workers == 0:
        for name, k, run, cfg in jobs:
            results[(name, k)] = _train_row(run, cfg, cache, ground_truth)
            console.print(_row_line(name, k, *results[(name, k)]))
        return results
    methods = mp.get_all_start_methods()
    context = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_train_row, run, cfg, cache, ground_truth): (name, k) for name, k, run, cfg in jobs}
        console.print(f"training {len(jobs)} run(s) in {workers} worker process(es), 1 torch thread each; "
                      f"logs: {jobs[0][2].parent}/*.log" if jobs else "nothing to train")
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            console.print(_row_line(*futures[future], *results[futures[future]]))
    return results


def _row_line(name: str, k: int, m: dict, seconds: dict) -> str:
    return (f"{name}, training seed {k + 1}: test top-1 {m['top1']:.1f}% ({seconds['wall_s']:.0f} s wall, "
            f"{seconds['cpu_s']:.0f} s CPU)")


def _train_row(run: Path, cfg, cache: Path, ground_truth: Path) -> tuple[dict, dict]:
    """Train one row on one thread and score its last epoch on the test split (in a worker)."""
    import torch
    from rich.console import Console

    from imdpipe.train.evaluate import evaluate
    from imdpipe.train.loop import train

    t0, c0 = time.perf_counter(), _Clock._cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if run.exists():
        shutil.rmtree(run)
    run.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(run.with_suffix(".log"), "w") as log:
            console = Console(file=log, width=100)
            train(cache=cache, out=run, config=cfg, console=console, show_progress=False)
            # no checkpoint selection: the last epoch is scored (nothing is chosen on test)
            m = evaluate(run=run, cache=cache, split="test", ground_truth=ground_truth, checkpoint="last",
                         console=console, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    m["run"] = str(run)
    return m, {"wall_s": time.perf_counter() - t0, "cpu_s": _Clock._cpu() - c0}


# ---------------------------------------------------------------------------------------------
# Dictionaries: text (the paper's) vs data vs hybrid
# ---------------------------------------------------------------------------------------------
def compare_dictionaries(cache: Path, out: Path, s: DemoSettings, *, ground_truth: Path, sources=(),
                         console=None, show_progress: bool = True) -> tuple[dict, dict[str, Path]]:
    """The SAVLD report of the demo's cache (relevance AUC of the text, data and hybrid
    dictionaries against the ground truth, written to ``cache/savld_report.*``) and, for each
    source in ``sources`` other than text, a cache variant with that dictionary's relevance targets
    (``out/cache-<source>``: every other store shared by symlink) to train on.

    Returns:
        ``(savld_report.json's content, {source: cache to train on})``.
    """
    from imdpipe.pipeline.savld_data import cache_with_dictionary
    from imdpipe.pipeline.savld_report import print_report, savld_report, write_report

    report = savld_report(cache=cache, K=s.relevance_k, ya=s.ya, alpha=s.alpha, ground_truth=ground_truth)
    write_report(report, cache)
    if console is not None:
        print_report(report, console)
    caches = {"text": cache}
    for source in sorted(set(sources) - {"text"}):
        caches[source] = cache_with_dictionary(cache, out / f"cache-{source}", source=source, k=s.savld_k,
                                               K=s.relevance_k, ya=s.ya, console=console,
                                               show_progress=show_progress)
    return report.as_dict(), caches


def dictionary_table(report: dict) -> str:
    """The dictionaries' relevance AUCs and shares as a markdown table with one sentence of reading."""
    from imdpipe.pipeline.savld_report import DICTIONARIES

    splits = (report.get("auc") or {}).get("splits", {})
    test, train = splits.get("test", {}), splits.get("train", {})
    names = {"text": "text (the paper's)", "data": "data (training-split lift)", "hybrid": "hybrid"}
    lines = [f"Relevance targets of three dictionaries against the ground truth (`imdpipe savld-report`; "
             f"K={report['settings']['K']}, Ya={report['settings']['Ya']}; data thresholds ours: lift >= "
             f"{report['settings']['min_lift']:g}, frequency >= {report['settings']['min_freq']:g}; statistics "
             f"from the training split only, so the test AUC is held out):", "",
             "| dictionary | AUC test (held out) | AUC train | training clips marked relevant | empty entries |",
             "|---|---:|---:|---:|---|"]
    for name in DICTIONARIES:
        auc = [f"{d[name]['auc']:.3f}" if d.get(name) and d[name]["auc"] is not None else "-" for d in (test, train)]
        empty = "-" if name == "text" else ", ".join(c["label"] for c in report["classes"]
                                                       if not c[f"{name}_entry"]) or "none"
        lines.append(f"| {names[name]} | {auc[0]} | {auc[1]} | {100 * report['relevant_share'][name]:.1f}% | "
                     f"{empty} |")
    return "\n".join(lines)


def train_seeds(seed: int, n: int) -> list[int]:
    """The training seeds of demo seed ``seed``: ``1000 * seed + k`` (disjoint between demo seeds)."""
    return [1000 * seed + k for k in range(n)]


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def correct_matrix(evaluations: list[dict]) -> np.ndarray:
    """``(seeds, videos)`` booleans: was each test video's top-1 right, per training seed
    (videos in the order of the first evaluation; every evaluation must score the same videos)."""
    ids = evaluations[0]["videos"]["video_id"]
    rows = []
    for m in evaluations:
        v = m["videos"]
        if sorted(v["video_id"]) != sorted(ids):
            raise ValueError("evaluations of one table must score the same test videos")
        pos = {vid: k for k, vid in enumerate(v["video_id"])}
        order = [pos[vid] for vid in ids]
        rows.append(np.asarray(v["label"])[order] == np.asarray(v["predicted"])[order])
    return np.stack(rows)


def bootstrap_draws(n_seeds: int, n_videos: int, *, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-level bootstrap resamples: ``(n_boot, n_seeds)`` training seeds and ``(n_boot, n_videos)``
    test videos, each drawn with replacement (one seed alone is kept, not resampled)."""
    rng = np.random.default_rng([seed, 95])
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    videos = rng.integers(0, n_videos, size=(n_boot, n_videos))
    return seeds, videos


def bootstrap_top1(correct: np.ndarray, draws: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Top-1 (%) of every bootstrap resample of a ``(seeds, videos)`` correctness matrix."""
    seeds, videos = draws
    picked = correct[seeds[:, :, None], videos[:, None, :]]  # (n_boot, seeds, videos)
    return 100.0 * picked.mean(axis=(1, 2))


def interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval of bootstrap samples."""
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [round(float(lo), 2), round(float(hi), 2)]


def summarize(evaluations: dict[str, list[dict]], *, baseline: str | None = BASELINE, n_boot: int = 2000,
              seed: int = 0) -> list[dict]:
    """The rows of ``results.json``: mean top-1 over training seeds with its 95% interval, and
    the paired difference to ``baseline`` (same resampled seeds and videos for both rows)."""
    if not evaluations:
        return []
    correct = {name: correct_matrix(ms) for name, ms in evaluations.items()}
    n_seeds, n_videos = next(iter(correct.values())).shape
    draws = bootstrap_draws(n_seeds, n_videos, n_boot=n_boot, seed=seed)
    boot = {name: bootstrap_top1(c, draws) for name, c in correct.items()}
    rows = []
    for name, ms in evaluations.items():
        dropped = [(m["audio_dropped"] or {}).get("overall") for m in ms]
        aucs = [m["relevance_auc"] for m in ms]
        row = {
            "method": name,
            "top1": round(float(100.0 * correct[name].mean()), 2),
            "top1_ci95": interval(boot[name]),
            "top1_per_seed": [round(m["top1"], 2) for m in ms],
            "top5": round(float(np.mean([m["top5"] for m in ms])), 2),
            "audio_dropped": None if None in dropped else round(float(np.mean(dropped)), 4),
            "relevance_auc": None if None in aucs else round(float(np.mean(aucs)), 4),
            "vs_baseline": None,
        }
        if baseline in correct and name != baseline:
            diff = 100.0 * (correct[name].mean() - correct[baseline].mean())
            row["vs_baseline"] = {"baseline": baseline, "top1_diff": round(float(diff), 2),
                                  "ci95": interval(boot[name] - boot[baseline])}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Tables and report
# ---------------------------------------------------------------------------------------------
def _quiet_transformers() -> None:
    """The demo draws its own progress; transformers' per-load weight bars would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(ci) -> str:
    return f"{ci[0]:.1f} - {ci[1]:.1f}"


def _diff(row) -> str:
    d = row["vs_baseline"]
    return "-" if d is None else f"{d['top1_diff']:+.1f} ({d['ci95'][0]:+.1f} to {d['ci95'][1]:+.1f})"


def _columns(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    base = next((r["vs_baseline"]["baseline"] for r in results if r["vs_baseline"]), BASELINE)
    head = ["Fusion method", "Top-1 (%)", "95% interval", "Top-5 (%)", "audio dropped (%)",
            "AUC of rev vs. ground truth", f"Top-1 vs. {base} (95% interval)"]
    rows = [[r["method"], f"{r['top1']:.1f}", _ci(r["top1_ci95"]), f"{r['top5']:.1f}", _pct(r["audio_dropped"]),
             "-" if r["relevance_auc"] is None else f"{r['relevance_auc']:.3f}", _diff(r)] for r in results]
    return head, rows


def format_table(results: list[dict]):
    """The results as a rich table in the style of the paper's Table 5."""
    from rich.table import Table

    head, rows = _columns(results)
    table = Table(title="Fusion methods on the synthetic data (cf. paper Table 5)")
    for k, col in enumerate(head):
        table.add_column(col, justify="left" if k == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(results: list[dict]) -> str:
    """The results as a markdown table (what the README shows)."""
    head, rows = _columns(results)
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def reading(results: list[dict], evaluations: dict[str, list[dict]]) -> str:
    """The table's reading in words: which differences the intervals support and which not."""
    if not results:
        return ""
    first = next(iter(evaluations.values()))
    n_videos, n_seeds = len(first[0]["videos"]["video_id"]), len(first)
    if n_seeds > 1:
        what = (f"Top-1 is the mean over {n_seeds} training seeds of the accuracy on {n_videos} test videos "
                "(3 crops x 4 clips each). The intervals are 95% percentile intervals of a bootstrap that "
                "resamples the test videos and the training seeds")
    else:
        what = (f"Top-1 is the accuracy on {n_videos} test videos (3 crops x 4 clips each) of one training run "
                "per row. The intervals are 95% percentile intervals of a bootstrap over the test videos; with "
                "one training seed they leave out the spread between training seeds")
    lines = [f"{what}; one video is {100 / n_videos:.1f} points. A difference is supported when the interval "
             "of the paired difference (the same resampled videos and seeds for both rows) excludes 0."]
    for r in results:
        d = r["vs_baseline"]
        if d is None:
            continue
        lo, hi = d["ci95"]
        if lo > 0:
            verdict = "better: the data supports it"
        elif hi < 0:
            verdict = "worse: the data supports it"
        else:
            verdict = "no difference the data can tell apart"
        lines.append(f"- {r['method']} vs. {d['baseline']}: {d['top1_diff']:+.1f} points "
                     f"({lo:+.1f} to {hi:+.1f}), {verdict}.")
    by_name = {r["method"]: r for r in results}
    imd, base = by_name.get("IMD"), by_name.get(BASELINE)
    if imd is not None and base is not None and imd["vs_baseline"]["ci95"][0] <= 0:
        diff, (_, hi) = imd["vs_baseline"]["top1_diff"], imd["vs_baseline"]["ci95"]
        if hi < 0:
            head = f"IMD is worse than {BASELINE} here ({diff:+.1f} points)."
        elif diff > 0:
            head = (f"IMD scores {diff:+.1f} points above {BASELINE}, but the interval of the difference includes "
                    f"0: the data does not show that IMD beats {BASELINE} here.")
        else:
            head = f"IMD does not beat {BASELINE} here ({diff:+.1f} points)."
        lines.append(
            f"{head} The likely reason (a reading of the design, not a measurement): "
            "a video's audio is either its class's own sound or another class's sound (or none), and vision "
            "already tells which classes could carry which sound, so a classifier on [v; a] can learn to "
            "discount audio that vision contradicts, which is what IMD's mask does by design; and a relevant "
            "clip whose rev falls below alpha loses the only cue that separates the two classes of a visual "
            f"pair (IMD masked the audio of {_pct(imd['audio_dropped'])}% of the test views).")
    return "\n".join(lines)


def write_report(out: Path, *, table: str, results: list[dict], evaluations: dict[str, list[dict]], seed: int,
                 settings: DemoSettings, timings: dict, usage: dict, cache: Path,
                 dictionaries: dict | None = None) -> Path:
    """Write ``out/report.md``: the table and its reading, the pictures, the timings."""
    seeds = train_seeds(seed, settings.train_seeds)
    lines = [
        "# imdpipe demo report",
        "",
        f"Synthetic audio-visual data, seed {seed}; training seeds {seeds}. Every number below was measured "
        "by this run. Every row was trained with the same data, recipe, steps and seeds (settings at the end); "
        "the last epoch of every run is scored, so nothing is selected on the test split.",
        "",
        table,
        "",
        "`audio dropped`: share of test views whose relevance rev fell below alpha, so IMD masked their audio "
        "(only IMD has a relevance network). `AUC`: how well a video's mean rev separates videos whose audio "
        "is relevant from the others, against the synthetic ground truth. Per-seed top-1: "
        + "; ".join(f"{r['method']} {r['top1_per_seed']}" for r in results) + ".",
        "",
    ]
    if dictionaries:
        lines += [dictionary_table(dictionaries), "", f"Per class: `{(cache / 'savld_report.md').relative_to(out)}`.",
                  ""]
    plots = cache / "plots"
    for png in sorted(plots.glob("*.png")) if plots.exists() else []:
        lines += [f"![{png.stem}]({png.relative_to(out)})", ""]
    for name, ms in evaluations.items():
        run = Path(ms[0]["run"])
        lines += [f"## {name} (the first training run, seed {seeds[0]})", ""]
        for png in sorted(run.glob("*.png")):
            lines += [f"![{name} {png.stem}]({png.relative_to(out)})", ""]
    lines += ["## Time per step", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", f"Total: {usage['wall_s']:.0f} s wall, {usage['cpu_s']:.0f} s CPU (this process, its "
              f"finished children and the training workers), load average {usage['load']:.1f} at the end, "
              f"{os.cpu_count()} CPUs.", "",
              f"Demo settings: `{json.dumps(asdict(settings))}`", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _slug(name: str) -> str:
    name = name.lower().replace("*", " aug")
    return "-".join("".join(c if c.isalnum() else " " for c in name).split()) or "run"


def _check_seed(out: Path, seed: int) -> None:
    marker = out / "demo.json"
    if marker.exists():
        prev = json.loads(marker.read_text()).get("seed")
        if prev != seed:
            raise ValueError(f"{out} holds a demo made with seed {prev}; use another --out for seed {seed} "
                             f"(or delete {out}).")
    marker.write_text(json.dumps({"seed": seed}) + "\n")


class _Clock:
    """Wall and CPU time (this process and its finished children) since creation."""

    def __init__(self):
        self.t0, self.c0 = time.perf_counter(), self._cpu()
        self.worker_cpu = 0.0  # CPU seconds of training workers (reported by them: not our children)

    @staticmethod
    def _cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def usage(self) -> dict:
        return {"wall_s": time.perf_counter() - self.t0, "cpu_s": self._cpu() - self.c0 + self.worker_cpu,
                "load": os.getloadavg()[0]}


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.t0
        return False
