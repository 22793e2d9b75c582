"""Clips from the feature caches: ``frames.zarr`` (RGB + quantized flow), ``audio.zarr``, ``relevance.zarr``.

A training item is one random clip of ``num_frames`` cached positions of one video, either
``frame_stride`` positions apart or spread over ``clip_seconds`` (each frame the cached position
nearest its time: frames.zarr stores T positions at the centres of T equal segments of the video,
with their source frame in ``frame_index``, so seconds mean the same for a 10 s Kinetics clip and
a 4 s UCF-101 one), cropped by ``train_crop`` (TimeSformer's short-side jitter, or a random
resized crop) to ``crop_size`` and maybe flipped (a flip negates flow x), with the AST
embedding, ``has_audio`` flag and relevance target of the audio window nearest the clip's centre
time. With probability ``cross_modal_p`` those three come from another
training video of the same class instead (intra-class cross-modality augmentation, paper 3.6).

An evaluation item is one video with ``clips x crops`` views (paper 4.1: 4 x 3): temporal clips
evenly spaced over the cached positions (or, with ``clip_seconds``, over the video's time), and
left/centre/right squares of the frame's short side (the same as resizing the short side to the
crop size, then cropping: the usual three-crop test), each view with the audio window covering
its clip.

Resizing a flow field by a factor also scales its displacements by that factor, so flow stays in
pixels of the model's input. Randomness comes from ``(seed, epoch, video index)`` only, so a
clip is the same whatever the worker, the rank or a resumed run. Zarr handles are not fork-safe:
each process opens the stores itself on first use.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, Sampler

from imdpipe.contract import AST_WINDOW_S, AUDIO, FLOW_BOUND, FRAMES, RELEVANCE, STORES, open_stage
from imdpipe.pipeline.flow_utils import dequantize, hflip_flow
from imdpipe.pipeline.manifest import Manifest, read_manifest
from imdpipe.pipeline.shard_reader import ShardReader
from imdpipe.pipeline.store import DONE, StoreDamaged, normalize_settings
from imdpipe.train.config import ClipSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# The cache: which stores, their provenance, which videos are usable
# ---------------------------------------------------------------------------------------------
@dataclass
class CacheInfo:
    """What a run needs to know about one cache directory (read once, in the main process)."""

    root: Path
    manifest: Manifest
    stores: dict[str, Path]  # store file name -> path, only the stores this run reads
    frames_T: int
    frame_size: tuple[int, int]  # (H, W) of the cached frames
    flow_bound: float
    window_s: float
    audio_dim: int
    provenance: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels


def _store_provenance(group: zarr.Group) -> dict:
    attrs = dict(group.attrs)
    prov = {"stage": attrs.get("stage"), "settings": attrs.get("settings", {}),
            "manifest_sha256": attrs.get("manifest_sha256"), "imdpipe_version": attrs.get("imdpipe_version")}
    for key in ("model", "K", "Ya", "overlap", "savld_sha256", "savld_hash"):
        if key in attrs:
            prov[key] = attrs[key]
    return normalize_settings(prov)


def open_cache(cache: str | Path, *, audio: bool, relevance: bool) -> CacheInfo:
    """Check the stores a run needs exist and agree with the manifest; read their provenance.

    Args:
        cache: the cache root (holds manifest.csv and the stage stores).
        audio: the run uses the audio modality (needs ``audio.zarr``).
        relevance: the run trains or scores IMD's rev (needs ``relevance.zarr``).
    """
    root = Path(cache)
    manifest = read_manifest(root)
    wanted = [FRAMES] + ([AUDIO] if audio or relevance else []) + ([RELEVANCE] if relevance else [])
    stores, provenance, groups = {}, {}, {}
    for store in wanted:
        group = open_stage(root, store, manifest_sha256=manifest.sha256, n_videos=len(manifest))
        stores[store.name], groups[store.name] = store.path(root), group
        provenance[store.name] = _store_provenance(group)
        _check_integrity(store.path(root), group, f"{store.command} --cache {root}")
    frames = groups[FRAMES.name]
    n, T, H, W, _ = frames["rgb"].shape
    bound = float(frames["flow"].attrs.get("bound", FLOW_BOUND))
    provenance[FRAMES.name]["flow_bound"] = bound  # predict quantizes with it (recorded in checkpoints)
    window_s, audio_dim = AST_WINDOW_S, 768
    if AUDIO.name in groups:
        window_s = float(groups[AUDIO.name].attrs.get("settings", {}).get("window_s", AST_WINDOW_S))
        audio_dim = int(groups[AUDIO.name]["embedding"].shape[-1])
    prov = {"manifest_sha256": manifest.sha256, "labels": list(manifest.labels), "stores": provenance}
    return CacheInfo(root=root, manifest=manifest, stores=stores, frames_T=int(T), frame_size=(int(H), int(W)),
                     flow_bound=bound, window_s=window_s, audio_dim=audio_dim, provenance=prov)


def _check_integrity(path: Path, group: zarr.Group, rebuild: str) -> None:
    """Refuse a store whose chunks carry no checksum, or in which a chunk of a done video is missing
    (zarr would read it as the fill value, silently); cheap: shard indexes only."""
    from imdpipe.pipeline.integrity import check_done_chunks, has_checksum

    unchecked = sorted(n for n, a in group.arrays() if not has_checksum(a))
    if unchecked:
        raise ValueError(f"{path} was built without chunk checksums ({', '.join(unchecked)}), so a damaged "
                         f"chunk would be read as data; rebuild it with `{rebuild} --overwrite`.")
    check_done_chunks(path, group)


def clip_fit_warnings(info: CacheInfo, clip: ClipSpec) -> list[str]:
    """What a clip asks that the cached frames do not hold: repeated frames, upscaled crops.

    The trainer prints these once and goes on (a short cache is a legitimate choice, a silent
    one is not).
    """
    out = []
    span = clip_span(clip.num_frames, clip.frame_stride)
    if span > info.frames_T:
        out.append(f"--num-frames {clip.num_frames} with --frame-stride {clip.frame_stride} spans {span} cached "
                   f"positions but frames.zarr holds T={info.frames_T} per video: every clip repeats its last "
                   f"position {span - info.frames_T} time(s) (fewer distinct frames than asked). Rebuild the cache "
                   f"with a larger extract-flow --frames, or lower --num-frames / --frame-stride.")
    h, w = info.frame_size
    if clip.crop_size > min(h, w):
        out.append(f"--crop-size {clip.crop_size} is larger than the cached frames' short side ({h}x{w}): every "
                   f"crop is upscaled by at least {clip.crop_size / min(h, w):.2f}x. Rebuild the cache with a larger "
                   f"extract-flow --size, or lower --crop-size.")
    return out


def relevance_settings(info: CacheInfo) -> dict:
    """K, Ya and the overlap measure of ``relevance.zarr`` (recorded into the run config)."""
    prov = info.provenance["stores"].get(RELEVANCE.name)
    if prov is None:
        return {}
    settings = prov.get("settings", {})
    return {key: prov.get(key, settings.get(key)) for key in ("K", "Ya", "overlap")}


def compare_provenance(trained: dict, cache: dict) -> tuple[list[str], list[str]]:
    """Differences between a checkpoint's cache provenance and another cache's.

    Returns ``(problems, notes)``: problems make the caches incompatible (label list, settings
    of a store both use); notes are worth printing (another manifest, same settings).
    """
    problems, notes = [], []
    if list(trained.get("labels", [])) != list(cache.get("labels", [])):
        problems.append(f"labels: the run was trained on {len(trained.get('labels', []))} classes "
                        f"{trained.get('labels', [])[:5]}..., this cache has {len(cache.get('labels', []))} "
                        f"{cache.get('labels', [])[:5]}...")
    for name, prov in trained.get("stores", {}).items():
        other = cache.get("stores", {}).get(name)
        if other is None:
            continue
        for key in sorted(set(prov) - {"manifest_sha256", "imdpipe_version"}):
            if key == "settings":
                a, b = prov["settings"], other.get("settings", {})
                for sk in sorted(set(a) | set(b)):
                    if sk in ("videos_per_shard", "chunk_checksum"):
                        continue  # storage layout, not content
                    if a.get(sk) != b.get(sk):
                        problems.append(f"{name} setting {sk}: run has {a.get(sk)!r}, cache has {b.get(sk)!r}")
            elif prov.get(key) != other.get(key):
                problems.append(f"{name} {key}: run has {prov.get(key)!r}, cache has {other.get(key)!r}")
    if trained.get("manifest_sha256") != cache.get("manifest_sha256"):
        notes.append("this cache has another manifest.csv than the one the run was trained on "
                     "(same labels and store settings): make sure its test videos were not trained on")
    return problems, notes


@dataclass
class Selection:
    """The videos of one split that every needed stage finished, and the ones left out."""

    indices: list[int]
    left_out: dict[str, int]  # reason -> count
    examples: list[str]  # a few "video_id: reason" lines

    @property
    def n_left_out(self) -> int:
        return sum(self.left_out.values())


def select_videos(info: CacheInfo, split: str) -> Selection:
    """Videos of ``split`` usable for this run; failed ones are counted by reason, never dropped silently."""
    done = {name: np.asarray(zarr.open_group(path, mode="r")[DONE][:], dtype=bool)
            for name, path in info.stores.items()}
    return select_by_flags(info.manifest, split, done)


_STAGE_OF = {store.name: store.stage for store in STORES}


def select_by_flags(manifest: Manifest, split: str, done: dict[str, np.ndarray]) -> Selection:
    """Videos of ``split`` whose manifest row is ok and that every store in ``done`` (name -> flags) finished."""
    keep, reasons, examples = [], Counter(), []
    for r in manifest.records:
        if r.split != split:
            continue
        why = None
        if not r.ok:
            why = "index failed (manifest status error)"
        else:
            for name, mask in done.items():
                if not mask[r.index]:
                    why = f"{_STAGE_OF.get(name, name.removesuffix('.zarr'))} stage not done ({name})"
                    break
        if why is None:
            keep.append(r.index)
        else:
            reasons[why] += 1
            if len(examples) < 5:
                examples.append(f"{r.video_id}: {why}")
    return Selection(indices=keep, left_out=dict(reasons), examples=examples)


def report_selection(sel: Selection, split: str, console) -> None:
    """Print how many videos of a split are used and why the others are left out."""
    msg = f"split {split!r}: {len(sel.indices)} videos"
    if sel.n_left_out:
        msg += f", [yellow]{sel.n_left_out} left out[/yellow] (" + ", ".join(
            f"{n} {why}" for why, n in sel.left_out.items()) + ")"
    console.print(msg)
    for line in sel.examples if sel.n_left_out else []:
        console.print(f"  left out {line}")


# ---------------------------------------------------------------------------------------------
# Loader settings
# ---------------------------------------------------------------------------------------------
def loader_workers(requested: int) -> int:
    """DataLoader workers per training process: ``requested``, or for -1 this process's share of
    the cores (cores / torchrun's ``LOCAL_WORLD_SIZE``, at least 1)."""
    from imdpipe.launch import cores_per_process

    return cores_per_process() if requested < 0 else requested


def worker_init(_worker_id: int) -> None:
    """A DataLoader worker decodes and resizes on one thread: the workers are the parallelism
    (OpenCV's and torch's own thread pools in every worker oversubscribe the cores)."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def loader_kwargs(workers: int, *, pin_memory: bool = False, prefetch: int = 4, persistent: bool = True) -> dict:
    """DataLoader keywords: ``prefetch`` batches queued per worker, one thread per worker, and for a
    loader built once per run (``persistent``) workers started once, not per epoch. A scoring
    loader (validation, evaluate) passes ``persistent=False``: its workers exit between passes
    instead of idling beside the training loader's."""
    if workers == 0:
        return {"num_workers": 0, "pin_memory": pin_memory}
    return {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": persistent,
            "prefetch_factor": prefetch, "worker_init_fn": worker_init}


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` from a sampler with an ``epoch`` (``DistributedSampler``).

    Persistent workers keep the dataset copy they started with, so an epoch set on the dataset
    would never reach them; the epoch travels with each index instead, and each epoch's clips
    are drawn from ``(seed, epoch, video)`` whatever the worker (exact resume).
    """

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = int(getattr(self.sampler, "epoch", 0))
        return ((int(i), epoch) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


# ---------------------------------------------------------------------------------------------
# Geometry: clip positions, crops, windows
# ---------------------------------------------------------------------------------------------
def clip_positions(start: int, num_frames: int, stride: int, T: int) -> np.ndarray:
    """Cached positions of a clip starting at ``start``; positions past the end repeat the last one."""
    return np.minimum(start + stride * np.arange(num_frames), T - 1)


def clip_span(num_frames: int, stride: int) -> int:
    return (num_frames - 1) * stride + 1


def position_times(frame_index: np.ndarray, fps: float) -> np.ndarray:
    """Time (s) of each cached position: its source frame over the frame rate (30 fps when unknown,
    TimeSformer's reference rate)."""
    return np.asarray(frame_index, dtype=np.float64) / (fps if fps > 0 else 30.0)


def positions_at(times: np.ndarray, start_s: float, num_frames: int, clip_seconds: float) -> np.ndarray:
    """Cached positions nearest the times ``start_s + linspace(0, clip_seconds, num_frames)``.

    ``times`` (increasing) is :func:`position_times`; a clip longer than the cached span takes the
    last position for the times past its end (TimeSformer's sampler clamps frame indices alike).
    """
    targets = start_s + np.linspace(0.0, clip_seconds, num_frames)
    after = np.clip(np.searchsorted(times, targets), 0, len(times) - 1)
    before = np.clip(after - 1, 0, len(times) - 1)
    closer_before = np.abs(times[before] - targets) <= np.abs(times[after] - targets)
    return np.where(closer_before, before, after)


def train_positions(clip: ClipSpec, rng: np.random.Generator, T: int, times: np.ndarray) -> np.ndarray:
    """One random clip's cached positions: a random start, then ``frame_stride`` positions apart or
    spread over ``clip_seconds`` (the first random draw of the item either way)."""
    if clip.clip_seconds > 0:
        last_start = max(times[-1] - clip.clip_seconds, times[0])
        return positions_at(times, float(rng.uniform(times[0], last_start)), clip.num_frames, clip.clip_seconds)
    span = clip_span(clip.num_frames, clip.frame_stride)
    start = int(rng.integers(0, max(T - span, 0) + 1))
    return clip_positions(start, clip.num_frames, clip.frame_stride, T)


def eval_positions(clip: ClipSpec, clips: int, T: int, times: np.ndarray) -> list[np.ndarray]:
    """The cached positions of ``clips`` test clips evenly spaced over the video (1 clip: centred)."""
    if clip.clip_seconds > 0:
        first, last = times[0], max(times[-1] - clip.clip_seconds, times[0])
        starts = [(first + last) / 2] if clips == 1 else list(np.linspace(first, last, clips))
        return [positions_at(times, s, clip.num_frames, clip.clip_seconds) for s in starts]
    starts = eval_starts(T, clip.num_frames, clip.frame_stride, clips)
    return [clip_positions(s, clip.num_frames, clip.frame_stride, T) for s in starts]


def eval_starts(T: int, num_frames: int, stride: int, clips: int) -> list[int]:
    """Starts of ``clips`` temporal clips evenly spaced over ``T`` positions (1 clip: centred)."""
    last = max(T - clip_span(num_frames, stride), 0)
    if clips == 1:
        return [last // 2]
    return [int(round(x)) for x in np.linspace(0, last, clips)]


def eval_boxes(H: int, W: int, crops: int) -> list[tuple[int, int, int, int]]:
    """Square boxes ``(y0, x0, side, side)`` of the short side: left/centre/right (or top/centre/bottom)."""
    side = min(H, W)
    long_extent = max(H, W) - side
    offsets = [long_extent // 2] if crops == 1 else [int(round(x)) for x in np.linspace(0, long_extent, crops)]
    return [(o, 0, side, side) if H > W else (0, o, side, side) for o in offsets]


def random_resized_box(rng: np.random.Generator, H: int, W: int, scale: tuple[float, float],
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A random box ``(y0, x0, h, w)`` covering ``scale`` of the area with aspect in ``ratio``
    (the Inception-style crop of torchvision's RandomResizedCrop), falling back to the centre square."""
    area = H * W
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
    side = min(H, W)
    return (H - side) // 2, (W - side) // 2, side, side


def jitter_box(rng: np.random.Generator, H: int, W: int, scales: tuple[int, int],
               crop: int) -> tuple[int, int, int, int]:
    """A random square box ``(y0, x0, side, side)``: TimeSformer's training crop on a stored frame.

    The frame's short side is resized to a random integer ``s`` in ``scales`` (both included) and
    a random ``crop`` x ``crop`` square is cut; on the stored frame that square has side
    ``crop * short / s`` (then resized to ``crop``), so the geometry does not depend on the size
    the frames were cached at.
    """
    short = min(H, W)
    s = int(rng.integers(scales[0], scales[1] + 1))
    side = min(max(int(round(crop * short / s)), 1), short)
    return int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1)), side, side


def nearest_window(window_start_s: np.ndarray, window_s: float, t: float) -> int:
    """Index of the audio window whose centre is nearest time ``t`` (seconds)."""
    centres = np.asarray(window_start_s, dtype=np.float64) + window_s / 2
    return int(np.argmin(np.abs(centres - t)))


def clip_centre_time(frame_index: np.ndarray, positions: np.ndarray, fps: float) -> float:
    """Centre time (s) of a clip from the source frame indices of its first and last positions."""
    first, last = float(frame_index[positions[0]]), float(frame_index[positions[-1]])
    return (first + last) / 2 / fps if fps > 0 else 0.0


def read_positions(source, index: int, positions: np.ndarray, box=None) -> np.ndarray:
    """``source[index, positions]`` cropped to ``box = (y0, x0, h, w)``, reading only those positions' chunks.

    ``source`` is a zarr array of frames.zarr or a :class:`~imdpipe.pipeline.shard_reader.ShardReader`
    of one (keep one per array and process: it caches the shard indices). frames.zarr keeps one
    position per chunk, so a clip decodes the positions it uses and no others; repeated
    positions (a clip running past the last one) are read once.
    """
    reader = source if isinstance(source, ShardReader) else ShardReader(source)
    unique, inverse = np.unique(np.asarray(positions), return_inverse=True)
    ys, xs = (slice(None), slice(None)) if box is None else (slice(box[0], box[0] + box[2]),
                                                                slice(box[1], box[1] + box[3]))
    return reader.read(index, unique, ys, xs)[inverse.reshape(-1)]


# ---------------------------------------------------------------------------------------------
# Pixel transforms
# ---------------------------------------------------------------------------------------------
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


@functools.cache
def _rgb_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std (x255) on ``device``: sent there once per process, not once per batch."""
    return _MEAN.to(device), _STD.to(device)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(t, h, w, c)`` -> ``(t, size, size, c)`` with OpenCV (area when shrinking, bilinear else)."""
    t, h, w, c = frames.shape
    if (h, w) == (size, size):
        return frames
    interp = cv2.INTER_AREA if h * w > size * size else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (size, size), interpolation=interp).reshape(size, size, c) for f in frames])


def crop_rgb(rgb: np.ndarray, size: int, flip: bool) -> torch.Tensor:
    """uint8 ``(t, h, w, 3)`` crop -> uint8 ``(t, 3, size, size)``, mirrored when ``flip``.

    Pixels stay uint8 until :func:`prepare_inputs` (4x less to move out of DataLoader workers).
    """
    x = resize_frames(rgb, size)
    if flip:
        x = x[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def crop_flow(flow: np.ndarray, size: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized uint8 ``(t, h, w, 2)`` crop -> quantized ``(t, 2, size, size)`` and the ``(sx, sy)`` pixel scale.

    Resizing a flow field by a factor scales its displacements by that factor: x by ``size / w``,
    y by ``size / h`` (applied after dequantization, in :func:`prepare_inputs`). A flip mirrors
    the field and negates x, which on the quantized grid is ``q -> 255 - q`` (exact, see
    :func:`imdpipe.pipeline.flow_utils.hflip_flow`).
    """
    t, h, w, _ = flow.shape
    x = resize_frames(flow, size)
    if flip:
        x = hflip_flow(x)
    scale = torch.tensor([size / w, size / h], dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2), scale


def normalize_rgb(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` -> float, ImageNet mean/std normalized."""
    mean, std = _rgb_stats(x.device)
    return (x.float() - mean) / std


def flow_pixels(q: torch.Tensor, scale: torch.Tensor, bound: float) -> torch.Tensor:
    """Quantized ``(B, ..., 2, H, W)`` flow and per-item ``(B, 2)`` scales -> float flow in input pixels."""
    v = dequantize(q, bound)
    return v * scale.to(v.device, torch.float32).view(scale.shape[0], *([1] * (v.ndim - 4)), 2, 1, 1)


def rgb_to_input(rgb: np.ndarray, size: int, flip: bool) -> torch.Tensor:
    """uint8 ``(t, h, w, 3)`` crop -> the model's normalized float ``(t, 3, size, size)``."""
    return normalize_rgb(crop_rgb(rgb, size, flip))


def flow_to_input(flow: np.ndarray, size: int, flip: bool, bound: float) -> torch.Tensor:
    """Quantized uint8 ``(t, h, w, 2)`` crop -> float flow in pixels of the resized crop ``(t, 2, size, size)``."""
    q, scale = crop_flow(flow, size, flip)
    return flow_pixels(q[None], scale[None], bound)[0]


def prepare_inputs(batch: dict, modalities, device: torch.device, *, flow_bound: float,
                   flatten_views: bool = False):
    """A collated batch -> ``(rgb, flow, audio)`` float tensors on ``device`` (None when unused).

    Eval batches ``(B, V, ...)`` are flattened to ``(B * V, ...)`` when ``flatten_views``. The
    copies are asynchronous (``non_blocking``: from the loader's pinned memory on CUDA, the host
    goes on queuing work) and the normalization constants live on the device.
    """
    def get(key):
        x = batch.get(key) if key in modalities else None
        if x is None:
            return None
        x = x.to(device, non_blocking=True)
        return x.flatten(0, 1) if flatten_views else x

    rgb, flow, audio = get("rgb"), get("flow"), get("audio")
    if rgb is not None:
        rgb = normalize_rgb(rgb)
    if flow is not None:
        scale = batch["flow_scale"].to(device, non_blocking=True)
        flow = flow_pixels(flow, scale.flatten(0, 1) if flatten_views else scale, flow_bound)
    if audio is not None:
        audio = audio.float()
    return rgb, flow, audio


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------
class ClipDataset(Dataset):
    """Clips of cached videos for training (``mode="train"``) or multi-view scoring (``mode="eval"``).

    Args:
        info: the cache, from :func:`open_cache`.
        indices: manifest indices of the videos (see :func:`select_videos`).
        mode: ``"train"`` (one random clip) or ``"eval"`` (``clips x crops`` fixed views).
        clip: frames per clip, their stride, the crop size, and the train-time crop scale and
            flips (default: a :class:`ClipSpec` of the fields given as keywords, e.g.
            ``num_frames=4``).
        modalities: subset of rgb, flow, audio to read.
        relevance: read relevance targets.
        cross_modal_p: probability of taking audio, has_audio and target from another video
            of the same class among ``indices`` (train).
        clips, crops: temporal clips and spatial crops per video (eval).
        seed: base seed; item randomness is drawn from ``(seed, epoch, video index)``.
    """

    def __init__(self, info: CacheInfo, indices: list[int], *, mode: str = "train", clip: ClipSpec | None = None,
                 modalities=("rgb", "flow", "audio"), relevance: bool = True, cross_modal_p: float = 0.0,
                 clips: int = 4, crops: int = 3, seed: int = 0, **clip_fields):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode should be 'train' or 'eval', got {mode!r}")
        self.root = info.root
        self.stores = dict(info.stores)
        self.indices = [int(i) for i in indices]
        self.mode = mode
        self.modalities = tuple(modalities)
        self.read_audio = "audio" in self.modalities or relevance
        self.relevance = relevance
        self.clip = clip if clip is not None else ClipSpec(**clip_fields)
        self.cross_modal_p = cross_modal_p
        self.clips, self.crops = clips, crops
        self.seed, self.epoch = seed, 0
        self.T, (self.H, self.W) = info.frames_T, info.frame_size
        self.flow_bound, self.window_s = info.flow_bound, info.window_s
        self.audio_dim = info.audio_dim
        records = info.manifest.records
        self.video_ids = [r.video_id for r in records]
        self.fps = {i: records[i].fps for i in self.indices}
        self.labels = {i: records[i].label for i in self.indices}
        self.class_pool: dict[int, list[int]] = {}
        for i in self.indices:
            self.class_pool.setdefault(self.labels[i], []).append(i)
        if self.read_audio and AUDIO.name not in self.stores:
            raise ValueError("audio.zarr is needed for the audio modality or relevance targets")
        if relevance and RELEVANCE.name not in self.stores:
            raise ValueError("relevance.zarr is needed for relevance targets")
        self._pid = None
        self._arrays: dict[str, zarr.Array] = {}
        self._reading = ""  # the array read last, named when a chunk fails to decode

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's random clips (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    @property
    def views(self) -> int:
        return self.clips * self.crops if self.mode == "eval" else 1

    # -- lazily opened, per process ------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        if self._pid != os.getpid():  # first use in this process (or after a fork)
            self._arrays, self._pid = {}, os.getpid()
        self._reading = name
        arr = self._arrays.get(name)
        if arr is None:
            store, key = name.split("/")
            arr = zarr.open_group(self.stores[store], mode="r")[key]
            self._arrays[name] = arr
        return arr

    def _small(self, name: str) -> np.ndarray:
        """A small per-video array (a few numbers per video) read whole, once per process.

        Each zarr read costs milliseconds of overhead whatever its size, so the flags, window
        starts, targets and frame indices are read once instead of once per clip.
        """
        key = "small:" + name
        if self._pid != os.getpid() or key not in self._arrays:
            self._arrays[key] = np.asarray(self._array(name)[:])
        return self._arrays[key]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = {}, None  # handles never cross a process boundary
        return state

    # -- audio ---------------------------------------------------------------------------------
    def _audio(self, index: int, t: float) -> tuple[np.ndarray, bool, float, int]:
        """Embedding, has_audio, relevance target and window of the window nearest time ``t``."""
        starts = self._small(f"{AUDIO.name}/window_start_s")[index]
        w = nearest_window(starts, self.window_s, t)
        emb = np.asarray(self._array(f"{AUDIO.name}/embedding")[index, w], dtype=np.float32)
        has = bool(self._small(f"{AUDIO.name}/has_audio")[index])
        target = float(self._small(f"{RELEVANCE.name}/target")[index, w]) if self.relevance else float("nan")
        return emb, has, target, w

    # -- items ---------------------------------------------------------------------------------
    def __getitem__(self, item) -> dict:
        """``item`` is a position in ``indices``, or ``(position, epoch)`` from :class:`EpochSampler`."""
        item, epoch = item if isinstance(item, tuple) else (item, self.epoch)
        index = self.indices[item]
        try:
            return self._train_item(index, epoch) if self.mode == "train" else self._eval_item(index)
        except Exception as e:
            if not _raised_by_zarr(e):
                raise
            raise self._damaged(e, index) from e

    def _damaged(self, error: Exception, index: int) -> StoreDamaged:
        """A chunk failed to decode (checksum mismatch, truncated shard): name the store, array and videos."""
        from imdpipe.pipeline.integrity import Damage, damage_message

        name = self._reading
        store, key = name.split("/")
        arr = self._array(name)
        k = arr.shards[0] if arr.shards is not None else arr.chunks[0]
        bad = []
        try:
            arr[index]
        except Exception:  # noqa: BLE001 - this video's own chunk
            bad = [index]
        for s in range(0, arr.shape[0], k) if not bad else ():
            try:
                arr[s:s + k]
            except Exception:  # noqa: BLE001 - some video of this shard
                for v in range(s, min(s + k, arr.shape[0])):
                    try:
                        arr[v]
                    except Exception:  # noqa: BLE001
                        bad.append(v)
        detail = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        damage = [Damage(key, v, "corrupt", detail) for v in bad] or [Damage(key, index, "corrupt", detail)]
        return StoreDamaged(damage_message(self.stores[store], damage, video_ids=self.video_ids, cache=self.root))

    def _reader(self, key: str) -> ShardReader:
        name = f"reader:{FRAMES.name}/{key}"
        if self._pid != os.getpid() or name not in self._arrays:
            self._arrays[name] = ShardReader(self._array(f"{FRAMES.name}/{key}"))
        self._reading = f"{FRAMES.name}/{key}"
        return self._arrays[name]

    def _read(self, key: str, index: int, positions: np.ndarray, box) -> np.ndarray:
        return read_positions(self._reader(key), index, positions, box)

    def _train_item(self, index: int, epoch: int) -> dict:
        clip = self.clip
        rng = np.random.default_rng([self.seed, epoch, index])
        frame_index = self._small(f"{FRAMES.name}/frame_index")[index]
        positions = train_positions(clip, rng, self.T, position_times(frame_index, self.fps[index]))
        if clip.train_crop == "jitter":
            box = jitter_box(rng, self.H, self.W, clip.jitter_scales, clip.crop_size)
        else:
            box = random_resized_box(rng, self.H, self.W, clip.crop_scale)
        flip = bool(clip.hflip and rng.random() < 0.5)
        swap = self.cross_modal_p > 0 and rng.random() < self.cross_modal_p
        t = clip_centre_time(frame_index, positions, self.fps[index])
        out = {"label": self.labels[index], "index": index, "clip_time_s": t}
        if "rgb" in self.modalities:
            out["rgb"] = crop_rgb(self._read("rgb", index, positions, box), clip.crop_size, flip)
        if "flow" in self.modalities:
            out["flow"], out["flow_scale"] = crop_flow(self._read("flow", index, positions, box), clip.crop_size, flip)
        if self.read_audio:
            donor = index
            if swap:
                pool = [j for j in self.class_pool[self.labels[index]] if j != index]
                if pool:
                    donor = pool[int(rng.integers(len(pool)))]
            emb, has, target, _ = self._audio(donor, t)
            out.update(audio=torch.from_numpy(emb), has_audio=has, target=target, audio_source=donor)
        return out

    def _eval_item(self, index: int) -> dict:
        # only the positions some test clip uses are read (the others keep the fill value 0)
        nf, stride = self.clip.num_frames, self.clip.frame_stride
        used = np.unique(np.concatenate([clip_positions(s, nf, stride, self.T)
                                         for s in eval_starts(self.T, nf, stride, self.clips)]))
        frames = {}
        for key in ("rgb", "flow"):
            if key in self.modalities:
                reader = self._reader(key)
                frames[key] = np.zeros(reader.arr.shape[1:], reader.arr.dtype)
                frames[key][used] = read_positions(reader, index, used)
        fi = np.asarray(self._small(f"{FRAMES.name}/frame_index")[index])
        audio = None
        if self.read_audio:
            audio = {"embedding": np.asarray(self._array(f"{AUDIO.name}/embedding")[index], dtype=np.float32),
                     "window_start_s": self._small(f"{AUDIO.name}/window_start_s")[index],
                     "has_audio": bool(self._small(f"{AUDIO.name}/has_audio")[index])}
            if self.relevance:
                audio["target"] = np.asarray(self._small(f"{RELEVANCE.name}/target")[index], dtype=np.float32)
        out = eval_views(rgb=frames.get("rgb"), flow=frames.get("flow"), frame_index=fi, fps=self.fps[index],
                         audio=audio, clip=self.clip, clips=self.clips, crops=self.crops, flow_bound=self.flow_bound,
                         window_s=self.window_s)
        out.update(label=self.labels[index], index=index)
        return out


def _raised_by_zarr(error: BaseException) -> bool:
    """Whether an exception comes from decoding a chunk (zarr, its codecs), not from this module."""
    tb = error.__traceback__
    last = None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and any(f"{sep}{pkg}{sep}" in last for pkg in ("zarr", "numcodecs", "google_crc32c")
                                    for sep in ("/", "\\"))


def eval_views(*, rgb: np.ndarray | None, flow: np.ndarray | None, frame_index: np.ndarray, fps: float,
               audio: dict | None, clip: ClipSpec, clips: int, crops: int, flow_bound: float = FLOW_BOUND,
               window_s: float = AST_WINDOW_S) -> dict:
    """The ``clips x crops`` test views of one video's cached arrays (clip-major order).

    Args:
        rgb, flow: uint8 ``(T, H, W, 3)`` / ``(T, H, W, 2)`` as stored in frames.zarr (None: not used).
        frame_index: ``(T,)`` source frame of each position; ``fps`` converts it to seconds.
        audio: ``embedding`` (W, D), ``window_start_s`` (W,), ``has_audio`` and maybe ``target``
            (W,) as stored in audio.zarr / relevance.zarr, or None.
        clip: frames, stride and crop size of each view.

    Returns:
        uint8 ``rgb`` (V, t, 3, S, S), quantized ``flow`` (V, t, 2, S, S) with ``flow_scale``
        (V, 2), ``audio`` (V, D), ``has_audio``, ``target`` (V,) and ``window`` (V,) for what was
        given (turned into model inputs by :func:`prepare_inputs`), and each view's clip centre
        time ``clip_time_s`` (V,).
    """
    T = len(frame_index)
    H, W = (rgb if rgb is not None else flow).shape[1:3] if (rgb is not None or flow is not None) else (0, 0)
    boxes = eval_boxes(H, W, crops) if H else []
    clip_pos = eval_positions(clip, clips, T, position_times(frame_index, fps))
    per_view = max(len(boxes), 1) if (rgb is not None or flow is not None) else crops
    times = [clip_centre_time(frame_index, pos, fps) for pos in clip_pos]
    out: dict = {"clip_time_s": torch.tensor([t for t in times for _ in range(per_view)], dtype=torch.float64)}
    for key, frames in (("rgb", rgb), ("flow", flow)):
        if frames is None:
            continue
        views, scales = [], []
        for pos in clip_pos:
            seg = frames[pos]
            for y0, x0, h, w in boxes:
                crop = seg[:, y0:y0 + h, x0:x0 + w]
                if key == "rgb":
                    views.append(crop_rgb(crop, clip.crop_size, False))
                else:
                    q, scale = crop_flow(crop, clip.crop_size, False)
                    views.append(q)
                    scales.append(scale)
        out[key] = torch.stack(views)  # (V, t, C, S, S) uint8
        if scales:
            out["flow_scale"] = torch.stack(scales)  # (V, 2)
    if audio is not None:
        windows = []
        for t in times:
            windows += [nearest_window(audio["window_start_s"], window_s, t)] * per_view
        out["audio"] = torch.from_numpy(np.asarray(audio["embedding"], dtype=np.float32)[windows])
        out["has_audio"] = bool(audio["has_audio"])
        out["window"] = torch.tensor(windows)
        if "target" in audio:
            out["target"] = torch.from_numpy(np.asarray(audio["target"], dtype=np.float32)[windows])
    return out
