"""Audio stage: frozen AST embeddings and AudioSet logits for every video (``audio.zarr``).

The paper keeps the AST frozen and trains only a small audio bottleneck on its pooled
embedding; the AST's multi-label predictions drive the relevance targets. So every clip's AST
output is computed once here and cached.

Pipeline per video:

1. :func:`decode_audio`: PyAV decode of the first audio track, resampled to 16 kHz with PyAV's
   ``AudioResampler`` *keeping the channel layout*, then mono = the plain mean of the channels
   (FFmpeg's own downmix scales by sqrt(2) and shifts normalised features). The result is placed
   on the container's timeline (sample 0 = time 0; a track that starts late is zero-filled,
   samples before 0 are dropped) and trimmed or zero-padded to the track's nominal duration:
   FFmpeg already drops the AAC priming samples via the mp4 edit list, but the last AAC frame
   is decoded whole (up to 1023 extra samples), so the tail is cut.
2. :func:`fbank`: the Kaldi-compatible log-mel filterbank of the whole waveform, computed by
   transformers' ``ASTFeatureExtractor`` (128 mel bins, 25 ms window, 10 ms hop, normalised
   with the AudioSet mean/std), one row per 10 ms frame.
3. :func:`window_starts` + :func:`crop_windows`: ``W`` windows of ``max_length`` frames
   (1024 frames = ``contract.AST_WINDOW_S`` for AudioSet ASTs), starts rounded to the 10 ms hop. Frames of a
   window that fall outside the audio are the extractor's own padding (zero in fbank space,
   i.e. ``-mean / (2 std)`` after normalisation), so a short video is zero-padded in fbank
   space as AST does, on both sides because its window is centred. Kaldi frames only depend
   on their own 400 samples, so a crop of the full fbank equals the extractor run on the
   window's samples (tested).
4. One forward of the frozen AST per batch of windows under ``torch.inference_mode`` (bf16
   autocast on CUDA by default): the pooled output (mean of the CLS and distillation tokens
   after the final LayerNorm) and the classifier logits come from the same pass.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imdpipe.contract import AST_WINDOW_S, AUDIO, video_path
from imdpipe.devices import autocast, select_device
from imdpipe.launch import cores_per_process
from imdpipe.pipeline.manifest import read_manifest
from imdpipe.pipeline.media import decode_audio_track, probe_duration  # noqa: F401  (probe_duration: API)
from imdpipe.pipeline.store import ArraySpec, Partition, StageStore, Summary, run_stage

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
SAMPLE_RATE = 16000
DTYPES = ("float32", "bfloat16")

# Kaldi fbank framing used by ASTFeatureExtractor (25 ms window, 10 ms hop at 16 kHz).
FRAME_LENGTH_S = 0.025
FRAME_SHIFT_S = 0.010


class ModelUnavailable(OSError):
    """The audio model could not be loaded (offline without a local copy, or a bad directory)."""


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
def decode_audio(path: str | Path, *, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, bool]:
    """Decode the first audio track of a media file to a mono float32 waveform (see
    :func:`imdpipe.pipeline.media.decode_audio_track`).

    Mono is the mean of the channels (after resampling each channel with PyAV's
    ``AudioResampler``, which keeps the layout). The waveform starts at the container's time 0
    and has exactly the track's nominal length at ``sample_rate`` (the AAC priming samples are
    dropped by FFmpeg through the mp4 edit list; the padded last AAC frame is trimmed here).

    Returns:
        ``(waveform, has_audio)``; a file without an audio track gives an empty array and False.

    Raises:
        VideoError / ValueError: unreadable file or undecodable audio.
    """
    wave, has_audio, _ = decode_audio_track(path, sample_rate)
    return wave, has_audio


# ---------------------------------------------------------------------------------------------
# Features and windows
# ---------------------------------------------------------------------------------------------
def frame_params(feature_extractor) -> tuple[int, int]:
    """(window length, hop) in samples of the extractor's Kaldi framing."""
    sr = int(feature_extractor.sampling_rate)
    return round(FRAME_LENGTH_S * sr), round(FRAME_SHIFT_S * sr)


def window_seconds(feature_extractor) -> float:
    """Length (s) of one model input: ``max_length`` frames of 10 ms (AST_WINDOW_S for 1024)."""
    _, hop = frame_params(feature_extractor)
    return int(feature_extractor.max_length) * hop / int(feature_extractor.sampling_rate)


def pad_value(feature_extractor) -> float:
    """The value of a padded frame: 0 in fbank space, normalised like the extractor does."""
    if getattr(feature_extractor, "do_normalize", True):
        return float(feature_extractor.normalize(np.zeros(1, np.float32))[0])
    return float(getattr(feature_extractor, "padding_value", 0.0))


def fbank(waveform: np.ndarray, feature_extractor) -> np.ndarray:
    """Normalised log-mel fbank of a whole mono waveform, (n_frames, n_mels) float32.

    ``n_frames = 1 + (len - 400) // 160`` (Kaldi ``snip_edges``); 0 frames for < 25 ms.
    """
    win, hop = frame_params(feature_extractor)
    n = len(waveform)
    n_frames = 0 if n < win else 1 + (n - win) // hop
    if n_frames == 0:
        return np.zeros((0, int(feature_extractor.num_mel_bins)), np.float32)
    fe = copy.copy(feature_extractor)
    fe.max_length = n_frames
    out = fe(np.asarray(waveform, np.float32), sampling_rate=fe.sampling_rate, return_tensors="np")
    return np.asarray(out["input_values"][0], dtype=np.float32)


def window_starts(duration_s: float, windows: int, window_s: float = AST_WINDOW_S) -> np.ndarray:
    """Start times (s) of ``windows`` windows of ``window_s`` over a video of ``duration_s``.

    One window is centred on the video (it starts before 0 when the video is shorter than a
    window, and the outside is padding). Several windows are spread evenly from 0 to
    ``duration_s - window_s`` on a longer video, and all centred on a shorter one.
    """
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    slack = float(duration_s) - float(window_s)
    if windows == 1 or slack <= 0:
        return np.full(windows, slack / 2.0, dtype=np.float64)
    return np.linspace(0.0, slack, windows)


def start_frames(starts_s: np.ndarray, feature_extractor) -> np.ndarray:
    """Window starts rounded to the fbank hop, as frame offsets (int64; may be negative)."""
    _, hop = frame_params(feature_extractor)
    return np.round(np.asarray(starts_s) * feature_extractor.sampling_rate / hop).astype(np.int64)


def crop_windows(features: np.ndarray, frames0: Sequence[int], length: int, fill: float) -> np.ndarray:
    """Cut ``length``-frame windows starting at ``frames0`` from a fbank; outside is ``fill``.

    Returns (W, length, n_mels) float32.
    """
    n, mels = features.shape
    out = np.full((len(frames0), length, mels), fill, dtype=np.float32)
    for w, f0 in enumerate(frames0):
        lo, hi = max(int(f0), 0), min(int(f0) + length, n)
        if hi > lo:
            out[w, lo - f0:hi - f0] = features[lo:hi]
    return out


def video_inputs(path: str | Path, *, feature_extractor, windows: int) -> dict[str, Any]:
    """Decode a video and build its model inputs: ``{"inputs": (W, T, F), "window_start_s": (W,),
    "has_audio": bool}`` (``inputs`` is None without an audio track)."""
    sr = int(feature_extractor.sampling_rate)
    wave, has_audio, duration = decode_audio_track(path, sr)
    if has_audio and duration <= 0:
        duration = len(wave) / sr
    f0 = start_frames(window_starts(duration, windows, window_seconds(feature_extractor)), feature_extractor)
    _, hop = frame_params(feature_extractor)
    starts = (f0 * hop / sr).astype(np.float32)
    if not has_audio:
        return {"inputs": None, "window_start_s": starts, "has_audio": False}
    feats = crop_windows(fbank(wave, feature_extractor), f0, int(feature_extractor.max_length),
                         pad_value(feature_extractor))
    return {"inputs": feats, "window_start_s": starts, "has_audio": True}


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def _files_sha256(directory: Path) -> str:
    """Hash of the files that define a local checkpoint (config, extractor config, weights)."""
    h = hashlib.sha256()
    names = sorted(p.name for p in directory.iterdir()
                   if p.suffix in (".json", ".safetensors", ".bin") and p.name != "tagger.json")
    for name in names:
        h.update(name.encode())
        with open(directory / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """``None`` means bf16 autocast on CUDA and float32 elsewhere."""
    if dtype is None or dtype == "":
        return "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def feature_extractor_params(feature_extractor) -> dict:
    """The extractor settings that change the model inputs (recorded in audio.zarr)."""
    return {
        "class": type(feature_extractor).__name__,
        "sampling_rate": int(feature_extractor.sampling_rate),
        "num_mel_bins": int(feature_extractor.num_mel_bins),
        "max_length": int(feature_extractor.max_length),
        "do_normalize": bool(feature_extractor.do_normalize),
        "mean": float(feature_extractor.mean),
        "std": float(feature_extractor.std),
        "frame_length_ms": 25.0,
        "frame_shift_ms": 10.0,
        "window_type": "hanning",
    }


def load_audio_model(model: str | Path = DEFAULT_MODEL, *, device=None, dtype: str | None = None):
    """Load a frozen AST classifier and its feature extractor.

    Args:
        model: a hub id (``MIT/ast-finetuned-audioset-10-10-0.4593``) or a local directory
            written by ``save_pretrained`` (config, weights and ``preprocessor_config.json``),
            such as one made by ``imdpipe train-tagger``.
        device: torch device (default: CUDA when available).
        dtype: ``"float32"`` or ``"bfloat16"`` (autocast); default bf16 on CUDA, fp32 on CPU.

    Returns:
        ``(model, feature_extractor, info)``; ``info`` holds ``model`` (the id, or the absolute
        path of a local dir), ``revision`` (hub commit), ``model_sha256`` (hash of a local
        dir's files, else the revision), ``labels`` (id2label in order), ``hidden_size``,
        ``num_labels``, ``device``, ``dtype`` and ``feature_extractor`` params.

    Raises:
        ModelUnavailable: the model is neither a local directory nor loadable from the hub
            cache (offline), with the fix in the message.
    """
    from transformers import ASTFeatureExtractor, ASTForAudioClassification

    dev = select_device(device)
    dtype = resolve_dtype(dtype, dev)
    src = str(model)
    local = Path(src).expanduser()
    is_local = local.is_dir()
    looks_local = is_local or local.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1
    if looks_local and not is_local:
        raise ModelUnavailable(f"--model {src}: no such directory. Pass a directory written by "
                               f"save_pretrained (config.json, model weights, preprocessor_config.json).")
    try:
        net, loading = ASTForAudioClassification.from_pretrained(
            str(local.resolve()) if is_local else src, output_loading_info=True)
        with warnings.catch_warnings():
            # 128 Kaldi mel bins over 257 FFT bins leave the lowest filter empty; the AudioSet AST
            # was trained with exactly this filterbank, so the warning is noise here.
            warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
            fe = ASTFeatureExtractor.from_pretrained(str(local.resolve()) if is_local else src)
    except Exception as e:
        where = f"the directory {local.resolve()}" if is_local else f"the hub id {src!r}"
        raise ModelUnavailable(
            f"could not load the audio model from {where}: {type(e).__name__}: {e}\n"
            f"Offline (HF_HUB_OFFLINE=1 or no network) a hub model must already be in the local "
            f"cache. Pass a local directory instead: --model /path/to/ast (made with "
            f"`save_pretrained`, e.g. by `huggingface-cli download {DEFAULT_MODEL} --local-dir DIR` "
            f"on a connected machine, or by `imdpipe train-tagger`)."
        ) from e
    missing = [k for k in loading.get("missing_keys", []) if k.startswith("classifier")]
    if missing:
        raise ModelUnavailable(f"{src} has no trained classification head (missing {missing[:3]}); "
                               f"extract-audio needs an ASTForAudioClassification checkpoint.")
    net.eval().requires_grad_(False).to(dev)
    cfg = net.config
    labels = [str(cfg.id2label[i]) for i in range(cfg.num_labels)]
    revision = getattr(cfg, "_commit_hash", None)
    info = {
        "model": str(local.resolve()) if is_local else src,
        "revision": None if is_local else revision,
        "model_sha256": _files_sha256(local.resolve()) if is_local else (revision or "unknown"),
        "labels": labels,
        "hidden_size": int(cfg.hidden_size),
        "num_labels": int(cfg.num_labels),
        "device": str(dev),
        "dtype": dtype,
        "feature_extractor": feature_extractor_params(fe),
    }
    return net, fe, info


def forward_windows(model, inputs: torch.Tensor, *, device, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """One forward of the frozen AST on (B, T, F) inputs: (pooled (B, D), logits (B, C)) float32.

    The transformer runs once; the classifier head is applied to its pooled output.
    """
    device = torch.device(device)
    with torch.inference_mode(), autocast(device, torch.bfloat16 if dtype == "bfloat16" else None):
        x = inputs.to(device, non_blocking=True)
        pooled = model.audio_spectrogram_transformer(x).pooler_output  # (B, D)
        logits = model.classifier(pooled)  # (B, C)
    return pooled.float().cpu().numpy(), logits.float().cpu().numpy()


def embed_video(path: str | Path, *, model, feature_extractor, settings: dict, device=None) -> dict:
    """AST outputs for one raw video, with the settings recorded in an ``audio.zarr``.

    Returns:
        ``{"embedding": (W, D), "logits": (W, C), "window_start_s": (W,), "has_audio": bool}``
        as float32 (zeros without an audio track).
    """
    _check_extractor(feature_extractor, settings)
    dev = select_device(device)
    windows = int(settings.get("windows", 1))
    item = video_inputs(path, feature_extractor=feature_extractor, windows=windows)
    d, c = int(model.config.hidden_size), int(model.config.num_labels)
    if not item["has_audio"]:
        return {"embedding": np.zeros((windows, d), np.float32), "logits": np.zeros((windows, c), np.float32),
                "window_start_s": item["window_start_s"], "has_audio": False}
    emb, logits = forward_windows(model, torch.from_numpy(item["inputs"]), device=dev,
                                  dtype=settings.get("dtype", "float32"))
    return {"embedding": emb, "logits": logits, "window_start_s": item["window_start_s"], "has_audio": True}


def _check_extractor(feature_extractor, settings: dict) -> None:
    want = settings.get("feature_extractor")
    if want is None:
        return
    have = feature_extractor_params(feature_extractor)
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
        raise ValueError(f"feature extractor differs from the one the store was built with in {diff}: "
                         f"store has {[want[k] for k in diff]}, loaded {[have.get(k) for k in diff]}")


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
class VideoAudioError(RuntimeError):
    """A video whose audio could not be decoded (the message keeps the original error type)."""


class _VideoDataset(torch.utils.data.Dataset):
    """Decoding + fbank of one video per item; runs in DataLoader workers."""

    def __init__(self, paths: Sequence[str], indices: Sequence[int], feature_extractor, windows: int):
        self.paths, self.indices = list(paths), list(indices)
        self.fe, self.windows = feature_extractor, windows

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        index = self.indices[k]
        try:
            item = video_inputs(self.paths[index], feature_extractor=self.fe, windows=self.windows)
        except Exception as e:  # noqa: BLE001 - every per-video failure is recorded, not raised
            return index, f"{type(e).__name__}: {e}"
        if item["inputs"] is not None:
            item["inputs"] = torch.from_numpy(item["inputs"])
        return index, item


def _identity(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)


def _produce(*, paths, net, fe, windows, batch_size, workers, device, dtype):
    """run_stage's producer: workers decode, the main process batches windows across videos."""
    d, c = int(net.config.hidden_size), int(net.config.num_labels)

    def produce(pending: list[int]):
        loader = torch.utils.data.DataLoader(
            _VideoDataset(paths, pending, fe, windows), batch_size=None, shuffle=False,
            num_workers=workers, collate_fn=_identity, worker_init_fn=_worker_init if workers else None,
            pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
            persistent_workers=False)
        queue: deque[tuple[int, dict]] = deque()  # videos in arrival order, awaiting their windows
        todo: list[tuple[int, int]] = []  # (queue position key, window) not yet forwarded
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def flush(n: int):
            nonlocal todo
            batch, todo = todo[:n], todo[n:]
            key = {idx: item for idx, item in queue}
            x = torch.stack([key[i]["inputs"][w] for i, w in batch])
            emb, logits = forward_windows(net, x, device=device, dtype=dtype)
            for (i, w), e, lg in zip(batch, emb, logits):
                results[i][0][w], results[i][1][w] = e, lg

        def ready():
            waiting = {i for i, _ in todo}
            out = []
            while queue and queue[0][0] not in waiting:  # videos complete in arrival order
                idx, item = queue.popleft()
                emb, logits = results.pop(idx)
                out.append((idx, {"embedding": emb, "logits": logits,
                                  "window_start_s": item["window_start_s"], "has_audio": True}))
            return out

        for index, item in loader:
            if isinstance(item, str):
                yield index, VideoAudioError(item)
                continue
            if not item["has_audio"]:
                yield index, {"embedding": np.zeros((windows, d), np.float32),
                              "logits": np.zeros((windows, c), np.float32),
                              "window_start_s": item["window_start_s"], "has_audio": False}
                continue
            queue.append((index, item))
            results[index] = (np.zeros((windows, d), np.float32), np.zeros((windows, c), np.float32))
            todo.extend((index, w) for w in range(windows))
            while len(todo) >= batch_size:
                flush(batch_size)
                yield from ready()
        while todo:
            flush(batch_size)
        yield from ready()
        assert not queue, "every queued video must have been emitted"

    return produce


def audio_settings(info: dict, *, windows: int) -> dict:
    """The settings recorded in (and compared against) ``audio.zarr``."""
    fe = info["feature_extractor"]
    return {
        "model": info["model"],
        "model_sha256": info["model_sha256"],
        "windows": int(windows),
        "window_s": round(fe["max_length"] * fe["frame_shift_ms"] / 1000.0, 6),
        "sample_rate": fe["sampling_rate"],
        "mono": "mean of channels",
        "dtype": info["dtype"],
        "feature_extractor": fe,
    }


def default_workers(device: torch.device) -> int:
    """Decoding workers: 0 on CPU (they would compete with the model), else up to 4 of this
    process's cores (cores / LOCAL_WORLD_SIZE under torchrun)."""
    return min(4, cores_per_process()) if device.type == "cuda" else 0


def extract_audio(*, cache: str | Path, model: str | Path = DEFAULT_MODEL, windows: int = 1,
                  batch_size: int = 8, workers: int | None = None, dtype: str | None = None, device=None,
                  shard: str | Partition | None = None, overwrite: bool = False,
                  videos_per_shard: int = 16, console=None, show_progress: bool = True) -> Summary:
    """Build ``CACHE/audio.zarr``: AST embeddings and logits of every ok video in the manifest.

    Args:
        cache: cache root holding ``manifest.csv``.
        model: hub id or local ``save_pretrained`` directory of an ASTForAudioClassification.
        windows: W windows of ``max_length`` frames per video (paper: 1, centred).
        batch_size: windows per model forward.
        workers: DataLoader worker processes decoding audio and computing fbanks (0 = inline).
            Default: 0 on CPU, where a worker competes with the model for the cores (2 cores,
            AST-base bf16: stage/bare forward 0.82 with 1 worker, 1.13 inline), and on CUDA up to
            4 within this process's share of the cores (cores / LOCAL_WORLD_SIZE under torchrun),
            where they keep the GPU fed.
        dtype: ``float32`` or ``bfloat16`` autocast (default: bf16 on CUDA, fp32 on CPU).
        device: torch device (default: CUDA when available). ``cuda`` means ``cuda:LOCAL_RANK``
            under torchrun, made the current device.
        shard: ``"i/n"`` or a Partition: process only this writer's shards.
        overwrite: rebuild the store from nothing.
        videos_per_shard: videos per Zarr shard file / unit of work.
        console: rich console for progress and messages.
        show_progress: draw a progress bar.

    Returns:
        The run's :class:`~imdpipe.pipeline.store.Summary`.
    """
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cache = Path(cache)
    manifest = read_manifest(cache)
    part = shard if isinstance(shard, Partition) else Partition.parse(shard)
    dev = select_device(device)
    workers = default_workers(dev) if workers is None else workers
    net, fe, info = load_audio_model(model, device=dev, dtype=dtype)
    settings = audio_settings(info, windows=windows)
    d, c = info["hidden_size"], info["num_labels"]
    arrays = [
        ArraySpec("embedding", (windows, d), "float16", ("window", "feature"),
                  attrs={"description": "AST pooled output: mean of CLS and distillation tokens after "
                                        "the final LayerNorm"}),
        ArraySpec("logits", (windows, c), "float16", ("window", "audio_label"),
                  attrs={"description": "AST classifier logits (multi-label: sigmoid gives probabilities)"}),
        ArraySpec("window_start_s", (windows,), "float32", ("window",),
                  attrs={"units": "s", "description": "start of each window in the video; negative "
                                                      "when a window is centred on a shorter video"}),
        ArraySpec("has_audio", (), "bool", (), fill_value=False),
    ]
    attrs = {"audio_labels": info["labels"], "model": info["model"], "model_revision": info["revision"],
             "model_sha256": info["model_sha256"], "feature_extractor": info["feature_extractor"],
             "embedding_dim": d, "num_audio_labels": c, "dtype": info["dtype"],
             "pooling": "mean of CLS and distillation tokens after the final LayerNorm"}
    store = StageStore.open(AUDIO.path(cache), stage=AUDIO.stage, settings=settings,
                            manifest_sha256=manifest.sha256, n_items=len(manifest), arrays=arrays,
                            videos_per_shard=videos_per_shard, overwrite=overwrite, attrs=attrs)
    paths = [str(video_path(cache, r.path)) for r in manifest.records]
    produce = _produce(paths=paths, net=net, fe=fe, windows=windows, batch_size=batch_size, workers=workers,
                       device=dev, dtype=info["dtype"])
    return run_stage(store, produce, eligible=manifest.ok_indices(), names=[r.path for r in manifest.records],
                     part=part, description="extract-audio", unit="clip", console=console,
                     show_progress=show_progress)


def load_store_model(store_path: str | Path, *, device=None):
    """Load the model an ``audio.zarr`` was built with, refusing a different checkpoint.

    Returns ``(model, feature_extractor, settings)`` ready for :func:`embed_video`.
    """
    store = StageStore.open_existing(store_path, stage=AUDIO.stage)
    settings = store.settings
    net, fe, info = load_audio_model(settings["model"], device=device, dtype=settings.get("dtype"))
    if info["model_sha256"] != settings.get("model_sha256"):
        raise ValueError(f"{settings['model']} is not the checkpoint {store_path} was built with "
                         f"(model_sha256 {info['model_sha256'][:12]} != {str(settings.get('model_sha256'))[:12]}).")
    _check_extractor(fe, settings)
    return net, fe, settings
