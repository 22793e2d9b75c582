"""Ablation sweeps on cached embeddings: ``run_sweep(cache=..., out=..., grid={...})``.

Each cell of the grid (paper Table 4: overlap IoU/Dice, K-Ya, alpha, masking M vs weighting W;
also fusion and the cross-modal augmentation probability) is trained head-only
(:mod:`imdpipe.train.head_only`) once per seed, on the same cached visual and audio embeddings.
Relevance targets for each K / Ya / overlap are rebuilt in memory from ``audio.zarr``'s logits
and the SAVLD by :func:`imdpipe.pipeline.relevance.relevance_targets` (the stage's own code), so
no store is written per setting. Each cell is scored on the cached test views of the test split
after its last epoch (no checkpoint selection, so nothing is selected on the split reported).

Outputs in ``out``: ``results.jsonl`` (one line per cell and seed, appended as they finish; a
rerun with the same settings skips those already there), ``table.md`` / ``table.csv`` (mean and
95% t-interval over seeds per cell) and ``table.png``.
"""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from imdpipe.launch import available_cores
from imdpipe.train.config import TrainConfig

#: grid keys -> (TrainConfig field or relevance setting, parser)
GRID_KEYS = {
    "alpha": float, "scheme": str, "k": int, "ya": int, "overlap": str, "fusion": str, "cross_modal_p": float,
    "seeds": int,
}
RELEVANCE_KEYS = ("k", "ya", "overlap")
RESULTS_NAME = "results.jsonl"


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["alpha=0.1,0.25", "scheme=M,W", "seeds=0,1,2"]`` -> ``{"alpha": [0.1, 0.25], ...}``."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        key = {"seed": "seeds", "k_ya": "k"}.get(key, key)
        if not sep or key not in GRID_KEYS:
            raise ValueError(f"grid entries look like key=v1,v2 with key one of {', '.join(GRID_KEYS)}, got {item!r}")
        try:
            vals = [GRID_KEYS[key](v.strip()) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"cannot read the values of {item!r} as {GRID_KEYS[key].__name__}") from None
        if not vals or len(set(vals)) != len(vals):
            raise ValueError(f"{item!r} needs distinct values")
        grid[key] = vals
    return grid


def cells(grid: dict[str, list]) -> list[dict]:
    """Every combination of the non-seed keys (in the grid's order)."""
    keys = [k for k in grid if k != "seeds"]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def cell_name(cell: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.items()) or "base"


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided t interval of the mean over seeds (NaN bounds with one value)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, mean - half, mean + half


# ---------------------------------------------------------------------------------------------
# One cell (runs in a worker process)
# ---------------------------------------------------------------------------------------------
_STATE: dict = {}


def _init_worker(data, targets: dict, threads: int) -> None:
    """Hold the sweep's data (read once by the parent, handed to each worker) in this process."""
    import torch

    torch.set_num_threads(threads)
    _STATE["data"] = data
    _STATE["targets"] = targets


def _run_cell(job: dict) -> dict:
    import torch

    from imdpipe.train.evaluate import top_k_correct
    from imdpipe.train.head_only import check_config, fit_head, score_cached, select

    data = _STATE["data"]
    t0, c0 = time.perf_counter(), time.process_time()
    config = TrainConfig.from_dict(job["config"])
    if config.uses_relevance and job["targets_key"] is not None:
        data = data.with_targets(_STATE["targets"][job["targets_key"]])
    config = check_config(config, data)
    stores = tuple(data.done)
    train = select(data, config.train_split, stores=stores).indices
    test = select(data, job["test_split"], stores=stores).indices
    model, history = fit_head(data, config, train_idx=train, device=torch.device("cpu"))
    t1, c1 = time.perf_counter(), time.process_time()
    res = score_cached(model, data, test, device=torch.device("cpu"))
    probs, y = res["probs"], res["labels"]
    last = [r for r in history if r["kind"] == "epoch"][-1]
    dropped = None if res["rev"] is None else float((res["rev"] < config.alpha).float().mean())
    return {**job["row"], "top1": 100 * float((probs.argmax(1) == y).float().mean()),
            "top5": 100 * float(top_k_correct(probs, y, 5).float().mean()), "audio_dropped": dropped,
            "train_top1": last["train_top1"], "train_videos": len(train), "test_videos": len(test),
            "seconds": time.perf_counter() - t0, "train_seconds": t1 - t0, "score_seconds": time.perf_counter() - t1,
            # this process's CPU time: the honest figure on a busy machine
            "cpu_seconds": time.process_time() - c0, "train_cpu_seconds": c1 - c0}


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
def run_sweep(*, cache: str | Path, out: str | Path, grid: dict[str, list], config: TrainConfig | None = None,
              visual: str | Path | None = None, savld: str | Path | None = None, test_split: str = "test",
              workers: int | None = None, console=None, show_progress: bool = True) -> list[dict]:
    """Train every cell x seed head-only, score it, and write the table.

    Args:
        cache: the cache (manifest.csv, visual.zarr, audio.zarr, savld.zarr and, unless the grid
            sets k / ya / overlap, relevance.zarr).
        out: directory for results.jsonl, table.md, table.csv and table.png.
        grid: ``{key: [values]}`` (:func:`parse_grid`); ``seeds`` are repeats, the others cells.
        config: settings shared by every cell (the grid overrides its fields).
        visual: the visual store (default ``cache/visual.zarr``).
        savld: the SAVLD for rebuilt targets (default ``cache/savld.zarr``).
        test_split: the split scored.
        workers: cells trained at once, one process and one thread each (default: the cores this
            process may use, ``imdpipe.launch.available_cores``: a Slurm or taskset limit counts).

    Returns:
        One row per cell (the table's rows).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from imdpipe.pipeline.relevance import relevance_targets

    console = console or Console(stderr=True)
    cache, out = Path(cache), Path(out)
    base = config or TrainConfig()
    seeds = grid.get("seeds", [base.seed])
    grid_cells = cells(grid)
    fields = {"alpha": "alpha", "scheme": "scheme", "fusion": "fusion", "cross_modal_p": "cross_modal_p"}
    # relevance targets per K / Ya / overlap, rebuilt in memory when the grid varies them
    targets: dict = {}
    rebuild = any(k in grid for k in RELEVANCE_KEYS)
    stored = _stored_relevance(cache) if rebuild else {}  # relevance.zarr's own K / Ya / overlap
    jobs = []
    for cell in grid_cells:
        cfg = base.replace(**{fields[k]: v for k, v in cell.items() if k in fields})
        key = None
        if rebuild and cfg.uses_relevance:
            K, ya = cell.get("k", stored.get("K")), cell.get("ya", stored.get("Ya"))
            overlap = cell.get("overlap", stored.get("overlap", "iou"))
            if K is None or ya is None:
                raise ValueError(f"the grid sets only some of k / ya / overlap and {cache}/relevance.zarr is "
                                 f"missing: give k= and ya= in the grid")
            key = f"K={K} Ya={ya} {overlap}"
            if key not in targets:
                targets[key] = relevance_targets(cache=cache, savld=savld, K=int(K), ya=int(ya), overlap=overlap)
        for seed in seeds:
            row = {"cell": cell_name(cell), **cell, "seed": seed}
            jobs.append({"config": cfg.replace(seed=seed, threads=1, device="cpu").to_dict(), "targets_key": key,
                         "test_split": test_split, "row": row})
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_NAME
    settings = {"grid": grid, "config": base.to_dict(), "visual": str(visual) if visual else None,
                "cache": str(cache.resolve()), "test_split": test_split}
    done_rows = _read_results(results_path, settings)
    todo = [j for j in jobs if (j["row"]["cell"], j["row"]["seed"]) not in done_rows]
    workers = max(1, min(workers or available_cores(), len(todo) or 1))
    console.print(f"sweep: {len(grid_cells)} cell(s) x {len(seeds)} seed(s) = {len(jobs)} head-only runs "
                  f"({len(jobs) - len(todo)} already in {results_path}), {workers} process(es)")
    configs = [TrainConfig.from_dict(j["config"]) for j in jobs]
    uses_rel = any(c.uses_relevance for c in configs)
    from imdpipe.train.head_only import load_head_data

    t0 = time.perf_counter()
    data = load_head_data(cache, visual=visual, audio=uses_rel or any(c.uses_audio for c in configs),
                          relevance=uses_rel and not targets)
    console.print(f"read the cached embeddings of {len(data.manifest)} videos in {time.perf_counter() - t0:.1f} s")
    init = (data, targets, 1)
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not show_progress) as bar:
        task = bar.add_task("sweep", total=len(todo))
        if workers == 1:
            _init_worker(*init)
            finished = (_run_cell(j) for j in todo)
            for row in finished:
                _append(results_path, row, done_rows)
                bar.advance(task)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                     initializer=_init_worker, initargs=init) as pool:
                for fut in as_completed([pool.submit(_run_cell, j) for j in todo]):
                    _append(results_path, fut.result(), done_rows)
                    bar.advance(task)
    seconds = time.perf_counter() - t0
    results = [done_rows[(j["row"]["cell"], j["row"]["seed"])] for j in jobs]
    rows = summarize(results, grid_cells)
    write_table(rows, out, title=f"head-only sweep on {cache} ({len(seeds)} seed(s) per cell, split {test_split})")
    console.print(f"sweep done in {seconds:.1f} s ({len(todo)} run(s)); table in {out / 'table.md'}")
    console.print((out / "table.md").read_text(encoding="utf-8"))
    return rows


def _stored_relevance(cache: Path) -> dict:
    import zarr

    from imdpipe.contract import RELEVANCE

    path = RELEVANCE.path(cache)
    if not path.exists():
        return {}
    attrs = dict(zarr.open_group(path, mode="r").attrs)
    return {k: attrs.get(k) for k in ("K", "Ya", "overlap")}


def _read_results(path: Path, settings: dict) -> dict:
    """Rows of an earlier run of the same sweep (a sweep with other settings is refused)."""
    header = {"kind": "settings", **json.loads(json.dumps(settings, default=str))}
    if not path.exists():
        path.write_text(json.dumps(header) + "\n", encoding="utf-8")
        return {}
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or lines[0] != header:
        raise ValueError(f"{path} holds a sweep with other settings (grid, config, cache or split); "
                         f"choose another --out or delete it")
    return {(r["cell"], r["seed"]): r for r in lines[1:]}


def _append(path: Path, row: dict, done_rows: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    done_rows[(row["cell"], row["seed"])] = row


def summarize(results: list[dict], grid_cells: list[dict]) -> list[dict]:
    """One row per cell: its settings, mean and 95% interval of top-1 / top-5 over seeds."""
    rows = []
    for cell in grid_cells:
        name = cell_name(cell)
        rs = [r for r in results if r["cell"] == name]
        row = {"cell": name, **cell, "seeds": len(rs)}
        for metric in ("top1", "top5"):
            row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"] = t_interval([r[metric] for r in rs])
        drops = [r["audio_dropped"] for r in rs if r["audio_dropped"] is not None]
        row["audio_dropped"] = float(np.mean(drops)) if drops else None
        row["seconds"] = float(np.mean([r["seconds"] for r in rs]))
        rows.append(row)
    return rows


_HEADERS = {"overlap": "Loss", "k": "K", "ya": "Ya", "alpha": "α", "scheme": "M/W", "fusion": "fusion",
            "cross_modal_p": "cross-modal p"}


def write_table(rows: list[dict], out: Path, *, title: str) -> None:
    """table.md (Table-4 style), table.csv and table.png (top-1 with its interval per cell)."""
    import csv

    keys = [k for k in _HEADERS if any(k in r for r in rows)]

    def fmt(m, lo, hi):
        return f"{m:.1f}" if np.isnan(lo) else f"{m:.1f} [{lo:.1f}, {hi:.1f}]"

    head = [_HEADERS[k] for k in keys] + ["Top-1 (%) [95% CI]", "Top-5 (%) [95% CI]", "audio dropped (%)",
                                          "seeds", "s per run"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        drop = "-" if r["audio_dropped"] is None else f"{100 * r['audio_dropped']:.1f}"
        cols = [str(r.get(k, "")).upper() if k == "overlap" else str(r.get(k, "")) for k in keys]
        cols += [fmt(r["top1"], r["top1_lo"], r["top1_hi"]), fmt(r["top5"], r["top5_lo"], r["top5_hi"]), drop,
                 str(r["seeds"]), f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cols) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (out / "table.csv").open("w", newline="", encoding="utf-8") as f:
        names = ["cell", *keys, "top1", "top1_lo", "top1_hi", "top5", "top5_lo", "top5_hi", "audio_dropped",
                 "seeds", "seconds"]
        w = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 0.5 * len(rows) + 2), 4))
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    top1 = np.array([r["top1"] for r in rows])
    lo = np.array([r["top1_lo"] for r in rows])
    hi = np.array([r["top1_hi"] for r in rows])
    err = np.where(np.isnan(lo), 0, np.stack([top1 - lo, hi - top1]))
    ax.bar(x, top1, yerr=err, capsize=3, color="tab:blue")
    ax.set_xticks(x, [r["cell"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("top-1 (%)"), ax.set_title("head-only sweep: mean and 95% interval over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "table.png", dpi=90)
