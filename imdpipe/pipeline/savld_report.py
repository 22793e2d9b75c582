"""How well does the label dictionary match what the audio model hears? (``imdpipe savld-report``)

The paper evaluates its text-built SAVLD only through action-recognition accuracy and names a
direct evaluation as future work. This report sets each class's text top-K beside the audio
labels the audio model actually predicts on the class's **training** videos
(:mod:`imdpipe.pipeline.savld_data`: frequency among the top-Ya, lift over the training split):

* ``overlap``: ``|text top-K & data top-K| / K``, the data top-K being the K labels of highest lift
  among those the class's clips ever predict;
* ``rank_correlation``: Spearman's rho between text similarity and lift over the labels that
  matter for the class (its text top-K and every label predicted on its clips); None with fewer
  than 3 such labels or a constant side;
* ``relevant_share``: share of the class's training clips whose relevance target is >= alpha
  under the text, data and hybrid dictionaries (targets computed as ``build-savld`` does);
* flags: ``no relevant sound`` (the data dictionary's entry is empty: no label passes the
  thresholds), ``text unsupported`` (none of the text top-K passes them), and per class the
  text entries the data contradicts (``lift < 1``: the class hears the label no more often than
  the split at large, or never).

With ground truth (``ground_truth.csv``: ``video_id,relevant``, as ``imdpipe synth`` writes), the
ROC AUC of each dictionary's relevance targets (a video's score = its mean target over windows)
against it, per split: the test split is held out from the data statistics; the train split is
in-sample for the data and hybrid dictionaries and labelled so.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imdpipe.contract import AUDIO, SAVLD
from imdpipe.pipeline import savld_data as sd

REPORT_MD = "savld_report.md"
REPORT_JSON = "savld_report.json"
REPORT_HTML = "savld_report.html"
PLOT_AGREEMENT = "savld_report_agreement.png"
PLOT_WORST = "savld_report_worst.png"
DICTIONARIES = ("text", "data", "hybrid")
FLAG_EMPTY = "no relevant sound"
FLAG_UNSUPPORTED = "text unsupported"


@dataclass
class ClassReport:
    """One video class of the report."""

    label: str
    videos: int  # training videos
    clips: int  # training clips (video x window)
    audible_clips: int
    text_topk: list[dict]  # {label, similarity, frequency, lift}, text rank order
    data_topk: list[dict]  # {label, similarity, frequency, lift}, by lift among predicted labels
    data_entry: list[str]  # the data dictionary's entry (thresholded; may be empty)
    hybrid_entry: list[str]
    overlap: float
    rank_correlation: float | None
    relevant_share: dict[str, float]  # dictionary -> share of training clips with target >= alpha
    contradicted: list[str]  # text top-K labels with lift < 1
    flags: list[str] = field(default_factory=list)


@dataclass
class SavldReport:
    """What :func:`savld_report` measured (``as_dict`` is savld_report.json)."""

    cache: str
    savld: str
    settings: dict
    dictionary: dict
    classes: list[ClassReport]
    relevant_share: dict[str, float]
    auc: dict | None = None  # {"ground_truth": path, "splits": {split: {dictionary: {"auc", "n"}}}}
    files: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[ClassReport]:
        return [c for c in self.classes if c.flags]

    @property
    def mean_overlap(self) -> float:
        return float(np.mean([c.overlap for c in self.classes])) if self.classes else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = {"classes": len(self.classes), "mean_overlap": self.mean_overlap,
                        "mean_rank_correlation": _mean([c.rank_correlation for c in self.classes]),
                        "flagged": [c.label for c in self.flagged],
                        "empty_data_entries": [c.label for c in self.classes if not c.data_entry],
                        "relevant_share": self.relevant_share}
        return d


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def spearman(x, y) -> float | None:
    """Spearman's rho (scipy, average ranks for ties); None for fewer than 3 points or a constant side."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr(x, y).statistic
    return None if not np.isfinite(rho) else float(rho)


# ---------------------------------------------------------------------------------------------
# Relevance targets of several dictionaries, in memory
# ---------------------------------------------------------------------------------------------
def dictionary_targets(cache: Path, manifest, savld, entries: dict[str, np.ndarray], *, K: int, ya: int,
                       overlap: str = "iou") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Relevance targets (N, W) float32 of every done video under each dictionary of ``entries``.

    Args:
        entries: ``{name: (Uv, >=K) int audio label indices, -1 padded}`` on ``savld``'s rows.

    Returns:
        ``({name: targets}, done (N,) bool)``; videos not done hold 0.
    """
    from imdpipe.pipeline.relevance import (
        _class_rows,
        clip_targets,
        dictionary_members,
        read_audio_block,
    )
    from imdpipe.pipeline.store import StageStore

    audio = StageStore.open_existing(AUDIO.path(cache), stage=AUDIO.stage)
    n, W = int(audio["logits"].shape[0]), int(audio["logits"].shape[1])
    class_row = _class_rows(savld, manifest)
    done = audio.done_mask() & (class_row >= 0)
    members = {name: dictionary_members(idx, len(savld.audio_labels), K) for name, idx in entries.items()}
    out = {name: np.zeros((n, W), np.float32) for name in entries}
    for s, e in audio.shard_ranges():
        sel = np.flatnonzero(done[s:e])
        if not len(sel):
            continue
        logits, audible = read_audio_block(audio, s, e)
        rows = class_row[s:e][sel]
        for name, (member, size) in members.items():
            t, _ = clip_targets(logits[sel], audible[sel], member[rows], size[rows], ya=ya, overlap=overlap)
            out[name][s + sel] = t
    return out, done


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def report_defaults(cache: Path, savld) -> dict:
    """K, Ya, overlap from the cache's relevance.zarr when it exists (else the paper's 10, 20, iou);
    min_lift, min_freq from a data/hybrid dictionary's settings (else ours: 2.0, 0.3)."""
    import zarr

    from imdpipe.contract import RELEVANCE

    out = {"K": 10, "ya": 20, "overlap": "iou", "min_lift": sd.DEFAULT_MIN_LIFT, "min_freq": sd.DEFAULT_MIN_FREQ}
    rel = RELEVANCE.path(cache)
    if rel.exists():
        attrs = zarr.open_group(rel, mode="r").attrs
        out.update(K=int(attrs.get("K", 10)), ya=int(attrs.get("Ya", 20)), overlap=attrs.get("overlap", "iou"))
    settings = savld.attrs.get("settings", {})
    for key in ("min_lift", "min_freq"):
        if key in settings:
            out[key] = float(settings[key])
    return out


def savld_report(*, cache: str | Path, savld: str | Path | None = None, K: int | None = None,
                 ya: int | None = None, alpha: float = 0.25, overlap: str | None = None,
                 min_lift: float | None = None, min_freq: float | None = None,
                 ground_truth: str | Path | None = None) -> SavldReport:
    """Compare the text dictionary with the training split's audio predictions, per class.

    Args:
        cache: cache root with manifest.csv, a finished audio.zarr and savld.zarr.
        savld: the dictionary (default ``cache/savld.zarr``); its stored text similarity gives the
            text top-K whatever its ``source``.
        K, ya, overlap: relevance settings (default: the cache's relevance.zarr, else 10, 20, iou).
        alpha: relevance threshold for the shares (paper best: 0.25).
        min_lift, min_freq: data/hybrid thresholds (default: the dictionary's, else 2.0 and 0.3, ours).
        ground_truth: CSV ``video_id,relevant``; default: ``ground_truth.csv`` found next to the cache
            or above its videos (none: no AUC).

    Raises:
        FileNotFoundError: no savld.zarr or audio.zarr.
        ValueError: an unfinished audio store, K or Ya out of range, other label spaces.
    """
    from imdpipe.pipeline.manifest import read_manifest
    from imdpipe.pipeline.relevance import OVERLAPS, audio_store_finished
    from imdpipe.pipeline.savld import label_rows, load_savld, topk

    cache = Path(cache)
    manifest = read_manifest(cache)
    savld_path = Path(savld) if savld is not None else SAVLD.path(cache)
    d = load_savld(savld_path)
    finished, why = audio_store_finished(cache)
    if not finished:
        raise ValueError(f"the report needs the audio predictions of every video: {why}")
    defaults = report_defaults(cache, d)
    K = defaults["K"] if K is None else K
    ya = defaults["ya"] if ya is None else ya
    overlap = defaults["overlap"] if overlap is None else overlap
    min_lift = defaults["min_lift"] if min_lift is None else min_lift
    min_freq = defaults["min_freq"] if min_freq is None else min_freq
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {', '.join(OVERLAPS)}, got {overlap!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ua = len(d.audio_labels)
    if not 1 <= K <= ua:
        raise ValueError(f"K (--relevance-k) must be in [1, {ua}] (the number of audio labels), got {K}")

    stats = sd.label_statistics(cache, ya=ya, video_labels=d.video_labels, audio_labels=d.audio_labels)
    sim = np.asarray(d.similarity, np.float64)
    lift, freq = stats.lift, stats.frequency
    entries = {"text": topk(sim, K)[0],
               "data": sd.data_topk(stats, k=K, min_lift=min_lift, min_freq=min_freq)[0],
               "hybrid": sd.hybrid_topk(stats, sim, k=K, min_lift=min_lift, min_freq=min_freq)[0]}
    targets, done = dictionary_targets(cache, manifest, d, entries, K=K, ya=ya, overlap=overlap)
    supported = stats.supported(min_lift=min_lift, min_freq=min_freq)

    train = np.zeros(len(manifest), bool)
    train[[i for i in manifest.ok_indices(stats.split)]] = True
    train &= done
    rows_of = label_rows(d.video_labels, {r.label_name for r in manifest.records})
    video_row = np.array([rows_of.get(r.label_name, -1) for r in manifest.records], np.int64)

    def entry_dicts(idx) -> list[dict]:
        return [{"label": d.audio_labels[j], "similarity": float(sim[c, j]), "frequency": float(freq[c, j]),
                 "lift": float(lift[c, j])} for j in idx if j >= 0]

    classes = []
    for c, label in enumerate(d.video_labels):
        if stats.videos[c] == 0:
            continue  # a dictionary row without training videos: nothing to compare
        predicted = np.flatnonzero(stats.counts[c] > 0)
        by_lift = predicted[np.lexsort((predicted, -freq[c, predicted], -lift[c, predicted]))]
        text_idx = entries["text"][c]
        data_idx = by_lift[:K]
        mine = train & (video_row == c)
        shares = {name: float((targets[name][mine] >= alpha).mean()) if mine.any() else 0.0 for name in DICTIONARIES}
        union = np.union1d(text_idx, predicted)
        cr = ClassReport(
            label=label, videos=int(stats.videos[c]), clips=int(stats.clips[c]),
            audible_clips=int(stats.audible_clips[c]), text_topk=entry_dicts(text_idx), data_topk=entry_dicts(data_idx),
            data_entry=[d.audio_labels[j] for j in entries["data"][c] if j >= 0],
            hybrid_entry=[d.audio_labels[j] for j in entries["hybrid"][c] if j >= 0],
            overlap=len(set(text_idx.tolist()) & set(data_idx.tolist())) / K,
            rank_correlation=spearman(sim[c, union], lift[c, union]), relevant_share=shares,
            contradicted=[d.audio_labels[j] for j in text_idx if lift[c, j] < 1.0])
        if not cr.data_entry:
            cr.flags.append(FLAG_EMPTY)
        if not supported[c, text_idx].any():
            cr.flags.append(FLAG_UNSUPPORTED)
        classes.append(cr)

    overall = {name: float((targets[name][train] >= alpha).mean()) if train.any() else 0.0 for name in DICTIONARIES}
    settings = {"K": K, "Ya": ya, "overlap": overlap, "alpha": alpha, "min_lift": float(min_lift),
                "min_freq": float(min_freq), "statistics_split": stats.split,
                "audio_labels": ua, "video_labels": len(d.video_labels)}
    dictionary = {"source": d.source, "encoder": d.attrs.get("encoder"), "metric": d.metric, "k": d.k,
                  "savld_sha256": d.sha256}
    report = SavldReport(cache=str(cache), savld=str(savld_path), settings=settings, dictionary=dictionary,
                         classes=classes, relevant_share=overall)
    report.auc = _auc(cache, manifest, targets, done, ground_truth)
    return report


def _auc(cache: Path, manifest, targets: dict[str, np.ndarray], done: np.ndarray, ground_truth) -> dict | None:
    """ROC AUC of each dictionary's mean target per video against the ground truth, per split."""
    from imdpipe.train.evaluate import find_ground_truth, mann_whitney_auc, read_ground_truth

    path = Path(ground_truth) if ground_truth else find_ground_truth(cache, manifest.paths)
    if path is None:
        return None
    truth = read_ground_truth(path)
    splits: dict[str, dict] = {}
    for split in dict.fromkeys(r.split for r in manifest.records):
        idx = [r.index for r in manifest.records if r.split == split and r.ok and done[r.index]
               and r.video_id in truth]
        if not idx:
            continue
        labels = [truth[manifest.records[i].video_id] for i in idx]
        splits[split] = {name: {"auc": mann_whitney_auc(t[idx].mean(1), labels), "n": len(idx),
                                "relevant": int(sum(labels))} for name, t in targets.items()}
    return {"ground_truth": str(path), "splits": splits,
            "note": f"the data and hybrid dictionaries are built from the {sd.STATS_SPLIT} split: their "
                    f"{sd.STATS_SPLIT} AUC is in-sample; other splits are held out"}


# ---------------------------------------------------------------------------------------------
# Files: savld_report.json, .md, .html and two plots
# ---------------------------------------------------------------------------------------------
def worst_classes(report: SavldReport, n: int = 4) -> list[ClassReport]:
    """The ``n`` classes whose text and data agree least (overlap, then rank correlation, ascending)."""
    key = (lambda c: (c.overlap, -2.0 if c.rank_correlation is None else c.rank_correlation, c.label))
    return sorted(report.classes, key=key)[:n]


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _labels(entries: list[dict], with_lift: bool = True) -> str:
    if not entries:
        return "(none)"
    return "; ".join(f"{e['label']} ({e['lift']:.1f})" if with_lift else e["label"] for e in entries)


TABLE_COLUMNS = ("class", "train videos", "audible clips", "text top-K (lift)", "data top-K by lift (lift)",
                 "data entry", "hybrid entry", "overlap", "rank corr.", "text >= alpha", "data >= alpha",
                 "hybrid >= alpha", "contradicted text entries", "flags")


def table_rows(report: SavldReport) -> list[list[str]]:
    """The per-class table as strings, in :data:`TABLE_COLUMNS` order."""
    rows = []
    for c in report.classes:
        rows.append([c.label, str(c.videos), f"{c.audible_clips}/{c.clips}", _labels(c.text_topk),
                     _labels(c.data_topk), "; ".join(c.data_entry) or "(empty)",
                     "; ".join(c.hybrid_entry) or "(empty)", f"{c.overlap:.2f}", _fmt(c.rank_correlation),
                     *(f"{100 * c.relevant_share[n]:.0f}%" for n in DICTIONARIES),
                     "; ".join(c.contradicted) or "-", ", ".join(c.flags) or "-"])
    return rows


def auc_rows(report: SavldReport) -> list[list[str]]:
    """``[split, videos (relevant), text AUC, data AUC, hybrid AUC]`` per split with ground truth."""
    rows = []
    for split, by in (report.auc or {}).get("splits", {}).items():
        first = next(iter(by.values()))
        note = " (in-sample for data/hybrid)" if split == sd.STATS_SPLIT else " (held out)"
        rows.append([split + note, f"{first['n']} ({first['relevant']})",
                     *(_fmt(by[name]["auc"], ".3f") for name in DICTIONARIES)])
    return rows


def write_report(report: SavldReport, out: str | Path, *, worst: int = 4) -> list[Path]:
    """Write ``savld_report.json``, ``savld_report.md``, ``savld_report.html`` and the plots into ``out``."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots = [plot_agreement(report, out / "plots" / PLOT_AGREEMENT),
             plot_worst(report, out / "plots" / PLOT_WORST, n=worst)]
    paths = [out / REPORT_JSON, out / REPORT_MD, out / REPORT_HTML, *plots]
    report.files = [str(p) for p in paths]
    _atomic_write(out / REPORT_JSON, json.dumps(report.as_dict(), indent=1) + "\n")
    _atomic_write(out / REPORT_MD, _markdown(report, [p.relative_to(out) for p in plots]))
    _atomic_write(out / REPORT_HTML, _html(report, [p.relative_to(out) for p in plots]))
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _intro(report: SavldReport) -> list[str]:
    s, dct = report.settings, report.dictionary
    shares = report.relevant_share
    lines = [
        f"Cache `{report.cache}`, dictionary `{report.savld}` (source {dct['source']}, encoder {dct['encoder']}, "
        f"{dct['metric']}). K={s['K']}, Ya={s['Ya']}, {s['overlap']}, alpha={s['alpha']}; data thresholds "
        f"(ours): lift >= {s['min_lift']:g} and frequency >= {s['min_freq']:g}. Statistics from the "
        f"{s['statistics_split']} split only.",
        "",
        f"- mean overlap of the text and data top-{s['K']}: {report.mean_overlap:.2f}; mean rank correlation: "
        f"{_fmt(_mean([c.rank_correlation for c in report.classes]))}",
        f"- {len(report.flagged)} of {len(report.classes)} classes flagged; empty data entries (no sound relevant): "
        f"{', '.join(c.label for c in report.classes if not c.data_entry) or 'none'}",
        f"- training clips marked relevant (target >= alpha): text {100 * shares['text']:.1f}%, data "
        f"{100 * shares['data']:.1f}%, hybrid {100 * shares['hybrid']:.1f}%",
    ]
    return lines


def _markdown(report: SavldReport, plots: list[Path]) -> str:
    lines = ["# SAVLD report: the label dictionary against the audio model's predictions", "", *_intro(report), ""]
    if report.auc:
        lines += [f"## Relevance targets against the ground truth (`{report.auc['ground_truth']}`)", "",
                  "ROC AUC of each dictionary's targets (a video's mean over windows) against the videos "
                  "whose audio is truly relevant.", "",
                  "| split | videos (relevant) | text | data | hybrid |", "|---|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(r) + " |" for r in auc_rows(report)]
        lines += [""]
    lines += ["## Per class", "",
              "Lift = how much more often the class's training clips contain the label among the top-Ya than "
              "training clips in general. The HTML version (`savld_report.html`) sorts by any column.", "",
              "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in r) + " |" for r in table_rows(report)]
    lines += ["", f"Flags: `{FLAG_EMPTY}`: no audio label passes the data thresholds, so the data dictionary "
              f"gives the class an empty entry (relevance 0); `{FLAG_UNSUPPORTED}`: none of the text top-K "
              f"passes them. Contradicted: text entries with lift < 1.", ""]
    lines += [f"![{p.stem}]({p.as_posix()})" for p in plots] + [""]
    return "\n".join(lines)


_SORT_SCRIPT = """<script>
document.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], asc = th.dataset.asc !== '1';
  th.dataset.asc = asc ? '1' : '0';
  const key = td => { const t = td.textContent.trim(), n = parseFloat(t); return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => { const x = key(a.cells[col]), y = key(b.cells[col]);
    return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
</script>"""


def _html(report: SavldReport, plots: list[Path]) -> str:
    from html import escape

    head = "".join(f"<th title='click to sort'>{escape(c)}</th>" for c in TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in r) + "</tr>" for r in table_rows(report))
    auc = ""
    if report.auc:
        auc_body = "".join("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in r) + "</tr>" for r in auc_rows(report))
        auc = ("<h2>Relevance targets against the ground truth</h2><table><thead><tr><th>split</th>"
               "<th>videos (relevant)</th><th>text</th><th>data</th><th>hybrid</th></tr></thead>"
               f"<tbody>{auc_body}</tbody></table>")
    intro = "".join(f"<p>{escape(x.lstrip('- '))}</p>" for x in _intro(report) if x)
    imgs = "".join(f"<p><img src='{escape(p.as_posix())}' style='max-width:100%'></p>" for p in plots)
    style = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}th{cursor:pointer;background:#eee}</style>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>SAVLD report</title>{style}</head><body>"
            f"<h1>SAVLD report</h1>{intro}{auc}<h2>Per class (click a header to sort)</h2>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{imgs}{_SORT_SCRIPT}</body></html>\n")


def plot_agreement(report: SavldReport, path: Path) -> Path:
    """Per class: overlap of the two top-K lists and the rank correlation, flagged classes in red."""
    from matplotlib.figure import Figure

    classes = sorted(report.classes, key=lambda c: (c.overlap, c.label))
    n = len(classes)
    fig = Figure(figsize=(9, max(3.0, 0.32 * n + 1.5)), dpi=110)
    ax = fig.subplots()
    y = np.arange(n)
    ax.barh(y - 0.2, [c.overlap for c in classes], height=0.4, color="tab:blue", label="overlap of top-K")
    ax.barh(y + 0.2, [0.0 if c.rank_correlation is None else c.rank_correlation for c in classes], height=0.4,
            color="tab:orange", label="Spearman rho (text similarity vs lift)")
    ax.set_yticks(y, [c.label for c in classes], fontsize=8)
    for tick, c in zip(ax.get_yticklabels(), classes):
        if c.flags:
            tick.set_color("tab:red")
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel(f"agreement of the text dictionary with the training audio (K={report.settings['K']}, "
                  f"Ya={report.settings['Ya']}); red: flagged")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_worst(report: SavldReport, path: Path, *, n: int = 4) -> Path:
    """For the classes that agree least, the text top-K and the data top-K side by side, with their lifts."""
    from matplotlib.figure import Figure

    worst = worst_classes(report, n) or report.classes[:1]
    K = report.settings["K"]
    fig = Figure(figsize=(11, max(2.5, (0.3 * K + 1.0) * max(len(worst), 1))), dpi=110)
    axes = np.atleast_2d(fig.subplots(max(len(worst), 1), 2, squeeze=False))
    top = max([e["lift"] for c in worst for e in c.text_topk + c.data_topk] + [1.0])
    for row, c in zip(axes, worst):
        for ax, entries, title, colour in ((row[0], c.text_topk, "text top-K", "tab:blue"),
                                           (row[1], c.data_topk, "data top-K by lift", "tab:green")):
            labels = [e["label"] for e in entries]
            ax.barh(range(len(entries)), [e["lift"] for e in entries], color=colour)
            ax.set_yticks(range(len(entries)), [lab if len(lab) < 32 else lab[:30] + "..." for lab in labels],
                          fontsize=8)
            ax.set_ylim(max(K, 1) - 0.5, -0.5)
            ax.set_xlim(0, top * 1.1)
            ax.axvline(1.0, color="k", lw=0.6, ls=":")
            ax.set_title(f"{c.label}: {title}" + (f"  [{', '.join(c.flags)}]" if c.flags and colour == "tab:blue"
                                                   else ""), fontsize=9)
            if not entries:
                ax.text(0.5, 0.5, "(none predicted)", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[-1]:
        ax.set_xlabel("lift on the training split (dotted: 1 = as often as in general)")
    fig.tight_layout()
    fig.savefig(path)
    return path


def print_report(report: SavldReport, console=None) -> None:
    """The per-class summary and the AUCs as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    s = report.settings
    table = Table(title=f"SAVLD vs the training audio (K={s['K']}, Ya={s['Ya']}, alpha={s['alpha']:g})")
    for col in ("class", "text top-K", "data entry", "overlap", "rho", "text >= a", "data >= a", "flags"):
        table.add_column(col, justify="right" if col in ("overlap", "rho", "text >= a", "data >= a") else "left")
    for c in report.classes:
        table.add_row(c.label, _labels(c.text_topk), "; ".join(c.data_entry) or "(empty)", f"{c.overlap:.2f}",
                      _fmt(c.rank_correlation), f"{100 * c.relevant_share['text']:.0f}%",
                      f"{100 * c.relevant_share['data']:.0f}%", ", ".join(c.flags) or "-",
                      style="red" if c.flags else None)
    console.print(table)
    if report.auc:
        t = Table(title=f"relevance AUC vs ground truth ({report.auc['ground_truth']})")
        for col in ("split", "videos (relevant)", *DICTIONARIES):
            t.add_column(col, justify="left" if col == "split" else "right")
        for r in auc_rows(report):
            t.add_row(*r)
        console.print(t)
