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
4. ``train`` + ``evaluate`` with the same seed and epochs for: visual only, late concat, GMU,
   IMD, and IMD with intra-class cross-modality augmentation;
5. a table in the style of the paper's Table 5, ``results.json`` and a markdown report.

Every stage reuses what an earlier run of the demo left in ``out`` (the stores resume and the
tagger is reused when its settings match), so a second run only repeats the training.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

#: The demo's methods: (name in the table, fusion, modalities, cross-modal augmentation p).
METHODS: tuple[tuple[str, str, tuple[str, ...], float], ...] = (
    ("visual only", "none", ("rgb", "flow"), 0.0),
    ("late concat", "late-concat", ("rgb", "flow", "audio"), 0.0),
    ("GMU", "gmu", ("rgb", "flow", "audio"), 0.0),
    ("IMD", "imd", ("rgb", "flow", "audio"), 0.0),
    ("IMD*", "imd", ("rgb", "flow", "audio"), 0.5),
)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo, chosen to finish in a few minutes on 2 CPU cores."""

    videos_per_class: int = 16
    video_size: tuple[int, int] = (128, 160)
    duration_s: float = 3.0
    fps: float = 10
    soundbank_clips: int = 240
    tagger_epochs: int = 12
    frames: int = 16
    crop_size: int = 112
    num_frames: int = 8
    frame_stride: int = 1
    epochs: int = 12
    batch_size: int = 16
    lr: float = 1e-3
    relevance_k: int = 1
    ya: int = 2
    savld_k: int = 3
    alpha: float = 0.25


def run_demo(*, out: str | Path = "demo", seed: int = 0, settings: DemoSettings | None = None,
             methods=METHODS, console=None, show_progress: bool = True) -> list[dict]:
    """Run the whole pipeline into ``out`` and return the rows of the results table.

    Args:
        out: working directory (data, cache, tagger, runs, report).
        seed: seed of the synthetic draw and of every training run.
        settings: demo sizes (default :class:`DemoSettings`).
        methods: which fusion methods to train (default :data:`METHODS`).
        console: a ``rich.console.Console``.
        show_progress: draw progress bars.
    """
    from rich.console import Console

    from imdpipe.contract import GROUND_TRUTH_NAME
    from imdpipe.datasets.synth import synth_dataset
    from imdpipe.pipeline.audio import extract_audio
    from imdpipe.pipeline.flow import extract_flow
    from imdpipe.pipeline.index import build_index
    from imdpipe.pipeline.relevance import build_relevance
    from imdpipe.pipeline.savld import build_savld
    from imdpipe.pipeline.store import print_summary
    from imdpipe.train.config import TrainConfig
    from imdpipe.train.evaluate import evaluate
    from imdpipe.train.loop import train
    from imdpipe.train.tagger import train_tagger

    console = console or Console(stderr=True)
    s = settings or DemoSettings()
    _quiet_transformers()
    out = Path(out)
    data, cache, tagger_dir, runs = out / "data", out / "cache", out / "tagger", out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    _check_seed(out, seed)
    timings: dict[str, float] = {}

    def step(name: str):
        console.rule(f"[bold]{name}")
        return _Timer(timings, name)

    with step("1. synthetic audio-visual data"):
        if not (data / "synth.json").exists():
            synth_dataset(data, seed=seed, videos_per_class=s.videos_per_class, size=s.video_size,
                          duration_s=s.duration_s, fps=s.fps, soundbank_clips=s.soundbank_clips,
                          console=console, show_progress=show_progress)
        else:
            console.print(f"reusing {data}")
    with step("2. audio tagger (small AST on the sound bank)"):
        from imdpipe.train.tagger import TaggerSettings

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
        dictionaries, _ = compare_dictionaries(cache, out, s, ground_truth=data / "ground_truth.csv",
                                               console=console, show_progress=show_progress)

    base = TrainConfig(size="tiny", alpha=s.alpha, num_frames=s.num_frames, frame_stride=s.frame_stride,
                       crop_size=s.crop_size, optimizer="adamw", lr=s.lr, weight_decay=0.05,
                       batch_size=s.batch_size, epochs=s.epochs, warmup_epochs=1.0, num_workers=0,
                       seed=seed, val_split="none")
    gt = data / GROUND_TRUTH_NAME
    rows = []
    for name, fusion, modalities, p in methods:
        run = runs / _slug(name)
        with step(f"7. train + evaluate: {name}"):
            if run.exists():
                shutil.rmtree(run)
            cfg = replace(base, fusion=fusion, modalities=modalities, cross_modal_p=p)
            train(cache=cache, out=run, config=cfg, console=console, show_progress=show_progress)
            m = evaluate(run=run, cache=cache, split="test", ground_truth=gt, checkpoint="last",
                         console=console, show_progress=show_progress)
        rows.append({"method": name, "top1": m["top1"], "top5": m["top5"],
                     "audio_dropped": (m["audio_dropped"] or {}).get("overall"),
                     "relevance_auc": m["relevance_auc"],
                     "run": str(run)})

    results = [{k: r[k] for k in ("method", "top1", "top5", "audio_dropped", "relevance_auc")} for r in rows]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_table(results)
    console.print(table)
    write_report(out, rows=rows, seed=seed, settings=s, timings=timings, cache=cache, dictionaries=dictionaries)
    console.print(f"report: {out / 'report.md'}   results: {out / 'results.json'}")
    return results


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


def _quiet_transformers() -> None:
    """The demo draws its own progress; transformers' per-load weight bars would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def format_table(results: list[dict]):
    """The results as a rich table in the style of the paper's Table 5."""
    from rich.table import Table

    table = Table(title="Fusion methods on the synthetic data (cf. paper Table 5)")
    for col in ("Fusion method", "Top-1 (%)", "Top-5 (%)", "audio dropped (%)", "AUC rev vs. truth"):
        table.add_column(col, justify="right" if col != "Fusion method" else "left")
    for r in results:
        table.add_row(r["method"], f"{r['top1']:.1f}", f"{r['top5']:.1f}", _pct(r["audio_dropped"]),
                      "-" if r["relevance_auc"] is None else f"{r['relevance_auc']:.3f}")
    return table


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_report(out: Path, *, rows: list[dict], seed: int, settings: DemoSettings, timings: dict,
                 cache: Path, dictionaries: dict | None = None) -> Path:
    """Write ``out/report.md`` with the table and the pictures beside it."""
    lines = [
        "# imdpipe demo report",
        "",
        f"Synthetic audio-visual data, seed {seed}. Every number below was measured by this run;",
        "nothing in the data or the code favours one method. The same seed and epochs were used for",
        "every method.",
        "",
        "| Fusion method | Top-1 (%) | Top-5 (%) | audio dropped (%) | AUC of rev vs. ground truth |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        auc = "-" if r["relevance_auc"] is None else f"{r['relevance_auc']:.3f}"
        lines.append(f"| {r['method']} | {r['top1']:.1f} | {r['top5']:.1f} | {_pct(r['audio_dropped'])} | {auc} |")
    lines += ["", "`audio dropped`: share of test clips whose relevance rev fell below alpha, so IMD masked",
              "their audio (only IMD has a relevance network). `AUC`: how well rev separates videos whose",
              "audio is relevant from the others, against the synthetic ground truth.", ""]
    if dictionaries:
        lines += [dictionary_table(dictionaries), "", f"Per class: `{(cache / 'savld_report.md').relative_to(out)}`.",
                  ""]
    plots = cache / "plots"
    for png in sorted(plots.glob("*.png")) if plots.exists() else []:
        lines += [f"![{png.stem}]({png.relative_to(out)})", ""]
    for r in rows:
        run = Path(r["run"])
        lines.append(f"## {r['method']}")
        lines.append("")
        for png in sorted(run.glob("*.png")):
            lines += [f"![{r['method']} {png.stem}]({png.relative_to(out)})", ""]
    lines += ["## Time per step", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", f"Demo settings: `{json.dumps(settings.__dict__)}`", ""]
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


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.t0
        return False
