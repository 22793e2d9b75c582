"""Relevance targets for the IMD relevance network (paper Sec. 4.2.3, Fig. 2, Table 4).

For every video and audio window the target is the overlap between

* ``P``: the frozen audio model's top-``Ya`` predicted labels for that window (from the logits
  in ``audio.zarr``; ties broken by the lower label index), and
* ``D``: the top-``K`` SAVLD audio labels of the video's class (``K <= k`` of the dictionary),

measured by IoU (default) or Dice, then normalised into [0, 1] by the largest overlap that K
and Ya allow. With ``c = |P & D|`` and ``m = min(K, Ya)`` (the largest possible ``c``):

* IoU  ``c / (K + Ya - c)``, at most ``m / max(K, Ya)``;
* Dice ``2c / (K + Ya)``,    at most ``2m / (K + Ya)``;
* target = raw overlap / its maximum, so a window whose predictions contain all K dictionary
  labels (or all Ya predictions are dictionary labels) gets 1 even when K != Ya.

A data or hybrid dictionary (``build-savld --source``) can give a class fewer than K labels: its
targets use the entry's own size for K, and an empty entry (no sound relevant) gives 0.

A video without an audio track (done in audio.zarr with ``has_audio`` False) gets target 0 and
count 0 in every window; a video the audio stage failed on is a failure here too. A window whose
``window_start_s`` is NaN (a window the audio stage did not fill) is also 0.

``relevance.zarr`` (stage ``relevance``) is a per-video store: ``target`` float32 (N, W) and
``overlap_count`` int16 (N, W), with ``done``/``error``; settings K, Ya, overlap, the SAVLD's
content hash and the audio store's model, so a target is never mixed with another dictionary.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imdpipe.contract import AUDIO, RELEVANCE, SAVLD, open_stage
from imdpipe.pipeline.store import ArraySpec, Partition, StageStore, Summary, run_stage

OVERLAPS = ("iou", "dice")


# ---------------------------------------------------------------------------------------------
# The overlap, pure functions
# ---------------------------------------------------------------------------------------------
def max_overlap(*, K: int, Ya: int, overlap: str = "iou") -> float:
    """The largest raw IoU or Dice two sets of sizes K and Ya can reach."""
    _check_overlap(overlap)
    if K < 1 or Ya < 1:
        raise ValueError(f"K and Ya must be >= 1, got K={K}, Ya={Ya}")
    m = min(K, Ya)
    return m / max(K, Ya) if overlap == "iou" else 2 * m / (K + Ya)


def normalized_overlap(count, *, K, Ya: int, overlap: str = "iou"):
    """Target in [0, 1] from the intersection size(s) ``count`` (scalar or array).

    ``K`` is the dictionary entry's size: a scalar, or an array broadcast against ``count`` when
    entries differ (a data/hybrid dictionary's entry can be shorter than K). An empty entry
    (K = 0) gives 0.
    """
    _check_overlap(overlap)
    c = np.asarray(count, dtype=np.float64)
    k = np.asarray(K, dtype=np.float64)
    if Ya < 1 or (k < 0).any():
        raise ValueError(f"K must be >= 0 and Ya >= 1, got K={K}, Ya={Ya}")
    m = np.minimum(k, Ya)
    if overlap == "iou":
        raw, best = c / np.maximum(k + Ya - c, 1), m / np.maximum(k, Ya)
    else:
        raw, best = 2 * c / (k + Ya), 2 * m / (k + Ya)
    out = np.divide(raw, best, out=np.zeros(np.broadcast_shapes(raw.shape, best.shape)), where=best > 0)
    return float(out) if out.ndim == 0 else out.astype(np.float32)


def overlap_score(pred_top: Iterable[int] | np.ndarray, dict_top: Iterable[int] | np.ndarray, *, K: int,
                  Ya: int, overlap: str = "iou") -> tuple[float, int]:
    """Normalised overlap of the audio model's top-Ya labels and the dictionary's top-K labels.

    Args:
        pred_top: the Ya predicted label indices (or names) of one window.
        dict_top: the K dictionary label indices (or names) of the video's class.
        K, Ya: the set sizes (checked against the inputs).
        overlap: ``iou`` or ``dice``.

    Returns:
        ``(target in [0, 1], intersection size)``.
    """
    _check_overlap(overlap)
    p = set(np.asarray(list(pred_top)).tolist())
    d = set(np.asarray(list(dict_top)).tolist())
    if len(p) != Ya:
        raise ValueError(f"pred_top must hold Ya={Ya} distinct labels, got {len(p)}")
    if len(d) != K:
        raise ValueError(f"dict_top must hold K={K} distinct labels, got {len(d)}")
    c = len(p & d)
    return normalized_overlap(c, K=K, Ya=Ya, overlap=overlap), c


def top_predictions(logits: np.ndarray, ya: int) -> np.ndarray:
    """Indices of the ``ya`` largest logits along the last axis, best first, ties -> lower index."""
    logits = np.asarray(logits, dtype=np.float32)
    return np.argsort(-logits, axis=-1, kind="stable")[..., :ya]


def window_counts(logits: np.ndarray, dict_member: np.ndarray, *, ya: int) -> np.ndarray:
    """Intersection sizes for a block of windows.

    Args:
        logits: (..., C) audio logits of the windows.
        dict_member: (..., C) bool, True for the K dictionary labels of each window's class
            (broadcast against ``logits``).
        ya: predictions kept per window.

    Returns:
        (...,) int intersection sizes.
    """
    top = top_predictions(logits, ya)  # (..., Ya)
    member = np.broadcast_to(dict_member, logits.shape)
    return np.take_along_axis(member, top, axis=-1).sum(-1)


def _check_overlap(overlap: str) -> None:
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {', '.join(OVERLAPS)}, got {overlap!r}")


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
@dataclass
class ClassRow:
    """Per-class statistics of a relevance store."""

    label: str
    videos: int
    with_audio: int
    mean_target: float
    share_at_alpha: float  # share of (video, window) clips with target >= alpha


@dataclass
class RelevanceResult:
    """What :func:`build_relevance` did, plus the per-class table."""

    summary: Summary
    path: Path
    K: int
    ya: int
    overlap: str
    alpha: float
    classes: list[ClassRow] = field(default_factory=list)
    mean_target: float = 0.0
    share_at_alpha: float = 0.0


def audio_store_finished(cache: str | Path) -> tuple[bool, str]:
    """Whether ``cache/audio.zarr`` exists and every eligible video was attempted (done or error)."""
    from imdpipe.pipeline.manifest import read_manifest

    manifest = read_manifest(cache)
    try:
        store = StageStore(AUDIO.path(cache), open_stage(cache, AUDIO, n_videos=len(manifest)))
    except (FileNotFoundError, ValueError) as e:
        return False, str(e)
    ok = np.asarray(manifest.ok_indices(), dtype=int)
    done, err = store.done_mask(), store.errors()
    pending = [i for i in ok if not done[i] and not err[i]]
    if pending:
        return False, f"{store.path} has {len(pending)} video(s) not yet processed (rerun extract-audio)"
    return True, ""


def _class_rows(savld, manifest) -> np.ndarray:
    """SAVLD row of each manifest video's class (-1 for videos the manifest marks bad)."""
    rows = np.full(len(manifest), -1, dtype=np.int64)
    missing = set()
    cache_rows: dict[str, int] = {}
    for rec in manifest.records:
        name = rec.label_name or (manifest.labels[rec.label] if 0 <= rec.label < len(manifest.labels) else "")
        if name not in cache_rows:
            try:
                cache_rows[name] = savld.row_of(name)
            except KeyError:
                cache_rows[name] = -1
                if rec.ok:
                    missing.add(name)
        rows[rec.index] = cache_rows[name]
    if missing:
        raise ValueError(f"the SAVLD has no row for video class(es) {sorted(missing)[:5]} of this cache "
                         f"({len(missing)} in all): rebuild it from the cache's labels "
                         f"(`imdpipe build-savld --cache DIR`, without --video-labels)")
    return rows


def build_relevance_when_audio_done(*, cache: str | Path, console=None, **kwargs) -> RelevanceResult | None:
    """:func:`build_relevance` once ``audio.zarr`` is finished (what ``build-savld --cache`` runs).

    Returns None, after printing why and what to rerun, while the audio stage is missing or has
    videos left; ``kwargs`` are :func:`build_relevance`'s.
    """
    from rich.console import Console

    finished, why = audio_store_finished(cache)
    if not finished:
        (console or Console(stderr=True)).print(f"relevance targets not built: {why}. "
                                                f"Rerun build-savld --cache {cache} afterwards.")
        return None
    return build_relevance(cache=cache, console=console, **kwargs)


@dataclass
class _Inputs:
    """What both the stage and the in-memory rebuild read: the manifest, the dictionary, audio.zarr."""

    manifest: object
    savld: object
    audio: StageStore
    class_row: np.ndarray  # (N,) SAVLD row of each video's class
    C: int
    W: int


def _open_inputs(cache: Path, savld, K: int, ya: int, overlap: str) -> _Inputs:
    """Read and check the manifest, the SAVLD and audio.zarr for relevance targets (see build_relevance)."""
    from imdpipe.pipeline.manifest import read_manifest
    from imdpipe.pipeline.savld import Savld, load_savld

    _check_overlap(overlap)
    manifest = read_manifest(cache)
    if savld is None:
        savld = SAVLD.path(cache)
    if not isinstance(savld, Savld):
        savld = load_savld(savld)
    audio = StageStore(AUDIO.path(cache), open_stage(cache, AUDIO, manifest_sha256=manifest.sha256,
                                                     n_videos=len(manifest)))
    a_attrs = audio.attrs
    audio_labels = a_attrs.get("audio_labels")
    if not audio_labels:
        raise ValueError(f"{audio.path} has no root attr 'audio_labels' (the audio model's id2label); "
                         f"rebuild it with `imdpipe extract-audio --overwrite`")
    audio_labels = list(audio_labels)
    if list(savld.audio_labels) != audio_labels:
        diff = next((i for i, (a, b) in enumerate(zip(savld.audio_labels, audio_labels)) if a != b),
                    min(len(savld.audio_labels), len(audio_labels)))
        raise ValueError(
            f"label spaces differ: the SAVLD maps into {len(savld.audio_labels)} audio labels but "
            f"{audio.path} predicts {len(audio_labels)} (first difference at index {diff}). "
            f"Rebuild the SAVLD against the audio model's labels: `imdpipe build-savld --cache {cache}` "
            f"(without --audio-labels) or `--audio-labels <the audio model directory>`.")
    C = len(audio_labels)
    if not 1 <= K <= savld.k:
        raise ValueError(f"K (--relevance-k) must be in [1, {savld.k}] (the SAVLD's k), got {K}")
    if not 1 <= ya <= C:
        raise ValueError(f"Ya (--ya) must be in [1, {C}] (the audio model's label count), got {ya}")
    logits_arr = audio["logits"]
    W = int(logits_arr.shape[1])
    if int(logits_arr.shape[2]) != C:
        raise ValueError(f"{audio.path}: logits have {logits_arr.shape[2]} labels, audio_labels {C}")
    return _Inputs(manifest=manifest, savld=savld, audio=audio, class_row=_class_rows(savld, manifest), C=C, W=W)


@dataclass
class Targets:
    """Relevance targets rebuilt in memory (:func:`relevance_targets`), as relevance.zarr would hold them."""

    target: np.ndarray  # (N, W) float32
    overlap_count: np.ndarray  # (N, W) int
    done: np.ndarray  # (N,) bool: the audio stage has a result for the video
    K: int
    ya: int
    overlap: str
    savld_sha256: str


def relevance_targets(*, cache: str | Path, savld=None, K: int = 10, ya: int = 20, overlap: str = "iou",
                      block: int = 4096) -> Targets:
    """Every video's relevance targets for one K / Ya / overlap, in memory (nothing is written).

    The same computation as :func:`build_relevance` (same checks, same functions: each class's
    entry and its own size from :func:`dictionary_members`, so text, data and hybrid dictionaries
    are all honoured), for ablation sweeps that try several K / Ya / overlap without a store per
    setting. Videos the audio stage has no result for (or the manifest marks bad) are not ``done``
    and hold 0.
    """
    cache = Path(cache)
    inputs = _open_inputs(cache, savld, K, ya, overlap)
    n, W = len(inputs.manifest), inputs.W
    member, entry_size = dictionary_members(inputs.savld.topk_index, inputs.C, K)
    done = inputs.audio.done_mask()
    done[[r.index for r in inputs.manifest.records if not r.ok]] = False
    target = np.zeros((n, W), dtype=np.float32)
    counts = np.zeros((n, W), dtype=np.int64)
    for s in range(0, n, block):
        e = min(s + block, n)
        logits, audible = read_audio_block(inputs.audio, s, e)
        rows = np.maximum(inputs.class_row[s:e], 0)  # bad videos (-1) are not done: zeroed below
        t, c = clip_targets(logits, audible, member[rows], entry_size[rows], ya=ya, overlap=overlap)
        target[s:e], counts[s:e] = np.where(done[s:e, None], t, 0), np.where(done[s:e, None], c, 0)
    return Targets(target=target, overlap_count=counts, done=done, K=K, ya=ya, overlap=overlap,
                   savld_sha256=inputs.savld.sha256)


def build_relevance(*, cache: str | Path, savld=None, K: int = 10, ya: int = 20, overlap: str = "iou",
                    alpha: float = 0.25, overwrite: bool = False, part: Partition | None = None,
                    console=None, show_progress: bool = True) -> RelevanceResult:
    """Write ``cache/relevance.zarr``: the relevance target of every video and audio window.

    Args:
        cache: cache root holding manifest.csv and a finished audio.zarr.
        savld: a :class:`~imdpipe.pipeline.savld.Savld`, a path to savld.zarr, or None for
            ``cache/savld.zarr``.
        K: dictionary labels per class (paper best: 10); at most the dictionary's k.
        ya: audio predictions per window (paper best: 20).
        overlap: ``iou`` (paper default) or ``dice``.
        alpha: relevance threshold, only for the per-class table (paper best: 0.25).
        overwrite: rebuild an existing relevance store made with other settings.
        part: which shards this process writes (default: all).
        console: rich console; show_progress: draw a progress bar.

    Raises:
        ValueError: K/Ya out of range, label spaces that differ, or classes the SAVLD lacks.
        SettingsMismatch: an existing relevance store with other settings (without overwrite).
    """
    cache = Path(cache)
    inputs = _open_inputs(cache, savld, K, ya, overlap)
    manifest, savld, audio, W, n = inputs.manifest, inputs.savld, inputs.audio, inputs.W, len(inputs.manifest)
    a_attrs = audio.attrs
    class_row = inputs.class_row
    member, entry_size = dictionary_members(savld.topk_index, inputs.C, K)
    audio_settings = audio.settings
    settings = {"K": K, "Ya": ya, "overlap": overlap, "savld_sha256": savld.sha256,
                "audio_model": audio_settings.get("model", a_attrs.get("model")),
                "audio_windows": W}
    store = StageStore.open(
        RELEVANCE.path(cache), stage=RELEVANCE.stage, settings=settings, manifest_sha256=manifest.sha256, n_items=n,
        arrays=[ArraySpec("target", (W,), "float32", ("window",),
                          attrs={"description": "normalised overlap in [0, 1]", "overlap": overlap,
                                 "normalization": _NORMALIZATION[overlap]}),
                ArraySpec("overlap_count", (W,), "int16", ("window",),
                          attrs={"description": "|top-Ya predictions & top-K SAVLD labels|"})],
        videos_per_shard=audio.videos_per_shard, overwrite=overwrite,
        attrs={"K": K, "Ya": ya, "overlap": overlap, "savld_sha256": savld.sha256,
               "savld_k": savld.k, "savld_metric": savld.metric, "savld_encoder": savld.attrs.get("encoder"),
               "savld_source": savld.source,
               "empty_entries": [v for v, n in zip(savld.video_labels, entry_size) if n == 0]})

    has_audio_arr = audio["has_audio"]
    audio_done, audio_err = audio.done_mask(), audio.errors()

    def produce(pending: list[int]):
        # read the audio store one contiguous run of pending indices at a time (a shard or less)
        for s, e in _runs(pending, audio.videos_per_shard):
            logits, audible = read_audio_block(audio, s, e)
            a_done, a_err = audio_done[s:e], audio_err[s:e]
            rows = class_row[s:e]
            targets, counts = clip_targets(logits, audible, member[rows], entry_size[rows], ya=ya, overlap=overlap)
            for j, i in enumerate(range(s, e)):
                if not a_done[j]:
                    why = a_err[j] or "not processed yet"
                    yield i, RuntimeError(f"the audio stage has no result for this video ({why}); "
                                          f"fix it and rerun extract-audio, then build-savld")
                    continue
                yield i, {"target": targets[j].astype(np.float32),
                          "overlap_count": counts[j].astype(np.int16)}

    summary = run_stage(store, produce, eligible=manifest.ok_indices(), names=manifest.paths,
                        part=part or Partition(), description="relevance", console=console,
                        show_progress=show_progress)
    result = RelevanceResult(summary=summary, path=store.path, K=K, ya=ya, overlap=overlap, alpha=alpha)
    _fill_table(result, store, manifest, has_audio=np.asarray(has_audio_arr[:], dtype=bool))
    return result


def read_audio_block(audio: StageStore, s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (b, W, C) float32, audible (b, W) bool)`` of videos ``[s, e)`` of an audio store.

    A window is audible when the audio stage finished its video, the video has an audio track and
    the window was filled (``window_start_s`` not NaN); other windows predict nothing.
    """
    logits = np.asarray(audio["logits"][s:e], dtype=np.float32)
    has = np.asarray(audio["has_audio"][s:e], dtype=bool) & np.asarray(audio["done"][s:e], dtype=bool)
    audible = np.repeat(has[:, None], logits.shape[1], axis=1)
    if "window_start_s" in audio.group:
        audible &= ~np.isnan(np.asarray(audio["window_start_s"][s:e], dtype=np.float32))
    return logits, audible


def clip_targets(logits: np.ndarray, audible: np.ndarray, member: np.ndarray, entry_size: np.ndarray, *,
                 ya: int, overlap: str = "iou") -> tuple[np.ndarray, np.ndarray]:
    """``(target (b, W) float32, overlap count (b, W))`` of a block of videos.

    Args:
        logits: (b, W, C); audible: (b, W) bool (silent windows get 0);
        member: (b, C) bool, each video's class entry; entry_size: (b,) its size (K or fewer).
        ya, overlap: as in :func:`build_relevance`.
    """
    counts = np.where(audible, window_counts(logits, member[:, None, :], ya=ya), 0)
    return normalized_overlap(counts, K=entry_size[:, None], Ya=ya, overlap=overlap), counts


def dictionary_members(topk_index: np.ndarray, num_audio_labels: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """``(member (Uv, C) bool, entry size (Uv,) int)``: each class's first K dictionary labels.

    A data/hybrid entry can hold fewer than K labels (``-1`` padding in ``topk_index``); its
    targets are normalised by its own size, and an empty entry gives target 0.
    """
    idx = np.asarray(topk_index[:, :K], dtype=np.int64)
    member = np.zeros((idx.shape[0], num_audio_labels), dtype=bool)
    rows, cols = np.nonzero(idx >= 0)
    member[rows, idx[rows, cols]] = True
    return member, member.sum(1)


_NORMALIZATION = {
    "iou": "target = (c / (K + Ya - c)) / (min(K, Ya) / max(K, Ya)), c = overlap_count, K = the class's "
           "entry size (at most --relevance-k; 0 gives 0)",
    "dice": "target = (2c / (K + Ya)) / (2 min(K, Ya) / (K + Ya)) = c / min(K, Ya), c = overlap_count, K = the "
            "class's entry size (at most --relevance-k; 0 gives 0)",
}


def _runs(indices: list[int], block: int) -> list[tuple[int, int]]:
    """Contiguous [s, e) spans covering ``indices``, never crossing a multiple of ``block``."""
    spans: list[tuple[int, int]] = []
    for i in sorted(indices):
        if spans and spans[-1][1] == i and i % block != 0:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def _fill_table(result: RelevanceResult, store: StageStore, manifest, *, has_audio: np.ndarray) -> None:
    done = store.done_mask()
    target = np.asarray(store["target"][:], dtype=np.float32)  # (N, W)
    by_class: dict[str, list[int]] = {}
    for rec in manifest.records:
        if done[rec.index]:
            by_class.setdefault(rec.label_name, []).append(rec.index)
    rows = []
    for label in [*manifest.labels, *sorted(set(by_class) - set(manifest.labels))]:
        idx = by_class.get(label)
        if not idx:
            continue
        t = target[idx]
        rows.append(ClassRow(label=label, videos=len(idx), with_audio=int(has_audio[idx].sum()),
                             mean_target=float(t.mean()), share_at_alpha=float((t >= result.alpha).mean())))
    result.classes = rows
    if done.any():
        t = target[done]
        result.mean_target = float(t.mean())
        result.share_at_alpha = float((t >= result.alpha).mean())


def print_relevance_table(result: RelevanceResult, console=None) -> None:
    """The per-class table: videos, with audio, mean relevance, share of clips >= alpha."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title=f"relevance targets ({result.overlap.upper()}, K={result.K}, Ya={result.ya})")
    table.add_column("class")
    for col in ("videos", "with audio", "mean relevance", f"clips >= {result.alpha:g}"):
        table.add_column(col, justify="right")
    for r in result.classes:
        table.add_row(r.label, str(r.videos), str(r.with_audio), f"{r.mean_target:.3f}",
                      f"{100 * r.share_at_alpha:.1f}%")
    if result.classes:
        table.add_section()
        table.add_row("all", str(sum(r.videos for r in result.classes)),
                      str(sum(r.with_audio for r in result.classes)), f"{result.mean_target:.3f}",
                      f"{100 * result.share_at_alpha:.1f}%")
    console.print(table)
