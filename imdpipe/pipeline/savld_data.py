"""What the audio model actually hears on each class, and dictionaries built from it.

The paper's SAVLD (Sec. 3.1) comes from label text alone. This module measures the audio side on
the **training split** of a cache (``audio.zarr`` logits, ``manifest.csv`` splits) and builds
label dictionaries from it. For video class ``c`` and audio label ``l``:

* a *clip* is one (video, window) of a training video the audio stage finished; a video without
  an audio track, or a window the audio stage did not fill, is a clip that predicts nothing;
* ``frequency[c, l]``: share of c's training clips whose top-``Ya`` predictions contain ``l``;
* ``base_frequency[l]``: the same share over every training clip of every class;
* ``lift[c, l] = frequency[c, l] / base_frequency[l]`` (0 when ``l`` is never predicted).

Validation and test videos never enter these numbers, so a dictionary built from them can be
scored on held-out videos.

Dictionaries (``imdpipe build-savld --source``):

* ``data``: the labels with ``lift >= min_lift`` **and** ``frequency >= min_freq``, ranked by lift
  (ties: higher frequency, then lower label index), at most ``k``. A class none of whose labels
  passes gets an **empty entry**: no sound is relevant for it, its relevance targets are 0.
* ``hybrid``: the text proposes, the data disposes. A label of the class's text top-``k`` stays
  when the data does not contradict it (``lift >= 1``: the class hears it at least as often as
  the training split at large, and ``frequency >= min_freq``); a label outside the text top-k
  enters only with the data's full support (``lift >= min_lift``, ``frequency >= min_freq``).
  Kept labels are ranked by text similarity (text order within the text's proposals, which come
  first; data-only additions after them by lift), at most ``k``; an entry can be empty.

``min_lift`` (2.0) and ``min_freq`` (0.3) are ours, not the paper's: a sound is called relevant to
a class when the class's clips contain it at least twice as often as clips in general and in at
least three clips of ten. The frequency floor matters for small classes: a class whose audio is
never relevant still hears each background sound a little more often than the split at large
(the relevant classes keep theirs), so lift alone would pass noise. On the synthetic design
(12 training videos per class, 200 seeds, exact sound labels) a floor of 0.2 gave a
never-relevant class a non-empty entry in 14% of draws, 0.3 in 3.5%, and no relevant class
lost its sound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imdpipe.contract import RELEVANCE, SAVLD
from imdpipe.pipeline.store import SettingsMismatch, StageStore

SOURCES = ("text", "data", "hybrid")
DEFAULT_MIN_LIFT = 2.0  # ours: twice the split's base rate
DEFAULT_MIN_FREQ = 0.3  # ours: in at least three clips of ten
STATS_SPLIT = "train"
NO_LABEL = -1  # padding of a dictionary entry shorter than k


@dataclass
class LabelStats:
    """Top-Ya prediction statistics of one split, per video class (rows) and audio label (columns)."""

    video_labels: list[str]
    audio_labels: list[str]
    ya: int
    split: str
    counts: np.ndarray  # (Uv, Ua) int64: clips of the class whose top-Ya contains the label
    clips: np.ndarray  # (Uv,) int64: clips of the class (silent ones included)
    videos: np.ndarray  # (Uv,) int64: videos of the class
    audible_clips: np.ndarray  # (Uv,) int64: clips with an audio track and a filled window
    audio_model_sha256: str = ""
    manifest_sha256: str = ""

    @property
    def frequency(self) -> np.ndarray:
        """(Uv, Ua) float64 share of each class's clips whose top-Ya contains the label."""
        return self.counts / np.maximum(self.clips, 1)[:, None]

    @property
    def base_frequency(self) -> np.ndarray:
        """(Ua,) float64 share of all clips of the split whose top-Ya contains the label."""
        return self.counts.sum(0) / max(int(self.clips.sum()), 1)

    @property
    def lift(self) -> np.ndarray:
        """(Uv, Ua) float64 ``frequency / base_frequency``; 0 where the label is never predicted."""
        base = self.base_frequency
        return np.divide(self.frequency, base[None, :], out=np.zeros(self.counts.shape), where=base[None, :] > 0)

    def supported(self, *, min_lift: float = DEFAULT_MIN_LIFT, min_freq: float = DEFAULT_MIN_FREQ) -> np.ndarray:
        """(Uv, Ua) bool: the data calls the label relevant to the class (both thresholds met)."""
        return (self.lift >= min_lift) & (self.frequency >= min_freq) & (self.counts > 0)


def label_statistics(cache: str | Path, *, ya: int, video_labels: list[str] | None = None,
                     audio_labels: list[str] | None = None, split: str = STATS_SPLIT) -> LabelStats:
    """Count the audio model's top-``ya`` labels per class over one split (default: train).

    Args:
        cache: cache root with ``manifest.csv`` and a finished ``audio.zarr``.
        ya: predictions kept per clip (the relevance targets' Ya).
        video_labels: dictionary rows (default: the cache's labels.txt); every class of the split
            must have a row (matched by name, else by normalised text).
        audio_labels: the dictionary's audio labels; must equal the audio model's (checked).
        split: which manifest split to count (the dictionaries always use ``train``).

    Raises:
        FileNotFoundError: no ``audio.zarr``.
        ValueError: other label spaces, ``ya`` out of range, a class without a row, an empty split.
        SettingsMismatch: an ``audio.zarr`` built for another manifest.
    """
    from imdpipe.contract import AUDIO
    from imdpipe.pipeline.manifest import read_manifest
    from imdpipe.pipeline.relevance import read_audio_block, top_predictions
    from imdpipe.pipeline.savld import label_rows

    cache = Path(cache)
    manifest = read_manifest(cache)
    path = AUDIO.path(cache)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the data dictionary needs the audio model's "
                                f"predictions (run `imdpipe extract-audio --cache {cache}` first)")
    audio = StageStore.open_existing(path, stage="audio")
    if audio.attrs.get("manifest_sha256") not in (None, manifest.sha256):
        raise SettingsMismatch(f"{path} was built for another manifest.csv; rerun extract-audio with --overwrite")
    model_labels = list(audio.attrs.get("audio_labels") or [])
    if audio_labels is not None and list(audio_labels) != model_labels:
        raise ValueError(f"label spaces differ: the dictionary has {len(audio_labels)} audio labels, {path} "
                         f"predicts {len(model_labels)}; build the SAVLD from the cache (without --audio-labels)")
    C = len(model_labels)
    if not 1 <= ya <= C:
        raise ValueError(f"Ya (--ya) must be in [1, {C}] (the audio model's label count), got {ya}")
    video_labels = list(manifest.labels if video_labels is None else video_labels)
    idx = manifest.ok_indices(split)
    if not idx:
        raise ValueError(f"{cache}/manifest.csv has no readable video in split {split!r}: the data dictionary "
                         f"is built from the training split only")
    names = {manifest.records[i].label_name for i in idx}
    rows_of = label_rows(video_labels, names)
    missing = sorted(n for n, r in rows_of.items() if r < 0)
    if missing:
        raise ValueError(f"video class(es) {missing[:5]} of the {split} split have no row among the dictionary's "
                         f"video labels; build the SAVLD from the cache's labels (--cache, no --video-labels)")
    uv = len(video_labels)
    counts = np.zeros((uv, C), np.int64)
    clips, videos, audible_clips = (np.zeros(uv, np.int64) for _ in range(3))
    wanted = np.zeros(audio.n_items, bool)
    wanted[idx] = True
    wanted &= audio.done_mask()
    row = np.full(audio.n_items, -1, np.int64)
    for i in idx:
        row[i] = rows_of[manifest.records[i].label_name]
    for s, e in audio.shard_ranges():  # one shard at a time keeps memory flat on large datasets
        sel = np.flatnonzero(wanted[s:e])
        if not len(sel):
            continue
        logits, audible = read_audio_block(audio, s, e)
        logits, audible, r = logits[sel], audible[sel], row[s:e][sel]  # (b, W, C), (b, W), (b,)
        top = top_predictions(logits, ya)  # (b, W, Ya)
        np.add.at(counts, (np.broadcast_to(r[:, None, None], top.shape)[audible], top[audible]), 1)
        np.add.at(clips, r, audible.shape[1])
        np.add.at(videos, r, 1)
        np.add.at(audible_clips, r, audible.sum(1))
    return LabelStats(video_labels=video_labels, audio_labels=model_labels, ya=ya, split=split, counts=counts,
                      clips=clips, videos=videos, audible_clips=audible_clips,
                      audio_model_sha256=str(audio.settings.get("model_sha256") or audio.attrs.get("model", "")),
                      manifest_sha256=manifest.sha256)


# ---------------------------------------------------------------------------------------------
# Dictionaries from the statistics
# ---------------------------------------------------------------------------------------------
def _ranked(keep: np.ndarray, keys: tuple[np.ndarray, ...], k: int) -> np.ndarray:
    """Per row, the first ``k`` kept columns sorted by ``keys`` (most significant last, all descending;
    then the lower column index), as (Uv, k) int32 padded with ``NO_LABEL``."""
    uv, ua = keep.shape
    out = np.full((uv, k), NO_LABEL, np.int32)
    col = np.arange(ua)
    for i in range(uv):
        # lexsort: last key is primary; negate for descending, the column index breaks ties (ascending)
        order = np.lexsort((col, *(-key[i] for key in keys)))
        chosen = order[keep[i][order]][:k]
        out[i, : len(chosen)] = chosen
    return out


def data_topk(stats: LabelStats, *, k: int, min_lift: float = DEFAULT_MIN_LIFT,
              min_freq: float = DEFAULT_MIN_FREQ) -> tuple[np.ndarray, np.ndarray]:
    """The data dictionary: ``(index (Uv, k) int32, -1 padded; lift (Uv, k) float32, NaN padded)``."""
    _check_thresholds(k, min_lift, min_freq, len(stats.audio_labels))
    lift, freq = stats.lift, stats.frequency
    idx = _ranked(stats.supported(min_lift=min_lift, min_freq=min_freq), (freq, lift), k)
    return idx, _scores(lift, idx)


def hybrid_topk(stats: LabelStats, text_similarity: np.ndarray, *, k: int, min_lift: float = DEFAULT_MIN_LIFT,
                min_freq: float = DEFAULT_MIN_FREQ) -> tuple[np.ndarray, np.ndarray]:
    """The hybrid dictionary (text proposes, data disposes; see the module docstring).

    Returns ``(index (Uv, k) int32, -1 padded; text similarity (Uv, k) float32, NaN padded)``.
    """
    from imdpipe.pipeline.savld import topk

    sim = np.asarray(text_similarity, np.float64)
    if sim.shape != stats.counts.shape:
        raise ValueError(f"text similarity must be {stats.counts.shape}, got {sim.shape}")
    _check_thresholds(k, min_lift, min_freq, sim.shape[1])
    lift, freq = stats.lift, stats.frequency
    proposed = np.zeros(sim.shape, bool)
    np.put_along_axis(proposed, topk(sim, k)[0].astype(np.int64), True, axis=1)
    not_contradicted = proposed & (lift >= 1.0) & (freq >= min_freq) & (stats.counts > 0)
    added = ~proposed & stats.supported(min_lift=min_lift, min_freq=min_freq)
    # text proposals first in text order, then data-only additions by lift
    group = not_contradicted.astype(np.float64)
    within = np.where(not_contradicted, sim, lift)
    idx = _ranked(not_contradicted | added, (within, group), k)
    return idx, _scores(sim, idx)


def _scores(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    safe = np.where(idx >= 0, idx, 0).astype(np.int64)
    return np.where(idx >= 0, np.take_along_axis(values, safe, axis=1), np.nan).astype(np.float32)


def _check_thresholds(k: int, min_lift: float, min_freq: float, ua: int) -> None:
    if not 1 <= k <= ua:
        raise ValueError(f"k must be in [1, {ua}] (the number of audio labels), got {k}")
    if min_lift < 1.0:
        raise ValueError(f"min_lift (--min-lift) must be >= 1 (a lift below 1 means the class hears the label "
                         f"less often than the split at large), got {min_lift}")
    if not 0.0 <= min_freq <= 1.0:
        raise ValueError(f"min_freq (--min-freq) must be in [0, 1], got {min_freq}")


# ---------------------------------------------------------------------------------------------
# A cache that differs only in its dictionary
# ---------------------------------------------------------------------------------------------
#: What a dictionary variant builds for itself; everything else in the cache is shared by symlink.
OWN_FILES = (SAVLD.name, "savld.txt", RELEVANCE.name, "plots", "savld_report.md", "savld_report.html",
             "savld_report.json")


def cache_with_dictionary(cache: str | Path, out: str | Path, *, source: str, k: int, K: int, ya: int,
                          overlap: str = "iou", min_lift: float | None = None, min_freq: float | None = None,
                          text_model: str | Path | None = None, console=None, show_progress: bool = True) -> Path:
    """A cache directory sharing every store of ``cache`` but with its own dictionary and targets.

    ``out`` receives symlinks to ``cache``'s manifest, labels and stores (frames.zarr, audio.zarr,
    ...), and its own ``savld.zarr`` (built with ``source``) and ``relevance.zarr``. Training on
    ``out`` trains IMD with that dictionary and nothing else changed; a rerun reuses what exists.

    Args:
        cache: a cache with a finished audio.zarr.
        out: the variant's directory (created).
        source: ``text``, ``data`` or ``hybrid``.
        k, K, ya, overlap: dictionary size, relevance K, Ya and overlap (as in build-savld).
        min_lift, min_freq: data/hybrid thresholds (default ours: 2.0, 0.3).
        text_model: sentence encoder (default: the offline MiniLM).
        console, show_progress: messages and progress bars.

    Raises:
        FileExistsError: ``out`` holds a file of the same name that is not a link into ``cache``.
    """
    from imdpipe.pipeline.relevance import build_relevance
    from imdpipe.pipeline.savld import build_savld

    cache, out = Path(cache).resolve(), Path(out)
    if out.resolve() == cache:
        raise ValueError(f"the variant directory must differ from the cache ({cache})")
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(cache.iterdir()):
        if entry.name in OWN_FILES or entry.name.startswith(".") or entry.resolve() == out.resolve():
            continue
        link = out / entry.name
        if link.is_symlink() and link.resolve() == entry.resolve():
            continue
        if link.exists() or link.is_symlink():
            raise FileExistsError(f"{link} exists and is not a link to {entry}; remove it or pick another directory")
        link.symlink_to(entry, target_is_directory=entry.is_dir())
    build_savld(cache=out, k=k, text_model=text_model, source=source, ya=ya, min_lift=min_lift, min_freq=min_freq,
                console=console)
    build_relevance(cache=out, K=K, ya=ya, overlap=overlap, console=console, show_progress=show_progress)
    return out
