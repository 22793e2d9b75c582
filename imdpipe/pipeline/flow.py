"""The flow stage: one decode pass per video -> sampled RGB frames + optical flow in ``frames.zarr``.

For each video the stage samples ``T`` positions uniformly over the whole video (TSN-style
segment centres, :func:`sample_positions`) and stores, at each position ``t``:

* ``rgb[t]``: source frame ``frame_index[t]``, resized to the store size with ``cv2.INTER_AREA``;
* ``flow[t]``: the optical flow from source frame ``frame_index[t]`` to ``frame_index[t] + 1``
  (consecutive frames at the original frame rate), computed on the resized frames, so it is in
  pixels of the stored frame. The last frame of a video has no successor: it gets the flow of the
  pair (last - 1 -> last), i.e. the motion that ends at it, with the same sign convention.

A video with fewer than ``T`` frames repeats positions; its ``repeated`` flag is set. The paper
consumes 8-frame RGB and 2-channel flow clips with the same sampling; the trainer takes its clips
and the 4x3 test views from these ``T`` positions.

Backends: OpenCV DIS (default on CPU, presets below), Farneback, TV-L1 (opencv-contrib only) and
torchvision RAFT (default on CUDA when weights are available; runs on CPU too, never by default).
CPU backends run whole shards in a process pool: a worker computes every pending video of its
shard and stores their data itself (:func:`extract_shard`), so frames never cross a process
boundary; the main process writes the done/error flags after it. RAFT decodes in DataLoader
workers, batches frame pairs from several videos on the device, quantizes there, and whole
shards are written from a background thread while the device computes the next batches, both
through :func:`imdpipe.pipeline.store.run_stage`.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from imdpipe.contract import FLOW_BOUND, FRAMES, video_path
from imdpipe.launch import cores_per_process
from imdpipe.pipeline.flow_utils import DEQUANT_FORMULA, QUANT_FORMULA, quantize
from imdpipe.pipeline.media import VideoError, decode_frames, frame_count

CPU_BACKENDS = ("dis", "farneback", "tvl1")
BACKENDS = ("auto", "raft", *CPU_BACKENDS)
DEFAULT_CPU_BACKEND = "dis"

# DIS parameters per preset: (finest_scale, patch_size, patch_stride, gradient_descent_iterations,
# variational_refinement_iterations). ultrafast/fast/medium are OpenCV's presets; "balanced" is
# ours (stride 6 instead of medium's 3, 8 gradient-descent iterations, 1 refinement iteration: 3
# refinement iterations cost 30% more time for no EPE gain in a grid over these five parameters).
# It is the default: on the known-motion clips of benchmarks/bench_flow.py, end to end, within 2%
# of Farneback's end-point error at 3.6x its speed, and 2x medium's speed (the README's flow
# benchmark, which also gives the limits of that claim).
DIS_PRESETS: dict[str, dict[str, int]] = {
    "ultrafast": {"finest_scale": 2, "patch_size": 8, "patch_stride": 4, "gd_iters": 12, "vr_iters": 0},
    "fast": {"finest_scale": 2, "patch_size": 8, "patch_stride": 4, "gd_iters": 16, "vr_iters": 5},
    "balanced": {"finest_scale": 1, "patch_size": 8, "patch_stride": 6, "gd_iters": 8, "vr_iters": 1},
    "medium": {"finest_scale": 1, "patch_size": 8, "patch_stride": 3, "gd_iters": 25, "vr_iters": 5},
}
DEFAULT_DIS_PRESET = "balanced"
# mmaction2's tools/misc/flow_extraction.py: calcOpticalFlowFarneback(prev, next, None, 0.5, 3, 15, 3, 5, 1.2, 0)
FARNEBACK_PARAMS = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2,
                    "flags": 0}
RAFT_VARIANTS = ("large", "small")
RAFT_MIN_SIZE = 128
# How rgb and flow chunks are stored (one position of one video per chunk, see store_arrays):
# zstd = lossless (bytes + zstd level 1); jpeg = one libjpeg-turbo JPEG per frame (rgb) or per
# flow component plane (flow), at the given quality. Defaults chosen by benchmarks/bench_storage.py.
CODECS = ("jpeg", "zstd")
DEFAULT_RGB_CODEC, DEFAULT_RGB_QUALITY = "jpeg", 95
DEFAULT_FLOW_CODEC, DEFAULT_FLOW_QUALITY = "jpeg", 95


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowSettings:
    """Everything that changes the content of ``frames.zarr``.

    Attributes:
        frames: T, positions sampled per video (the trainer cuts 8-frame clips from them).
        size: stored (H, W); TSN/mmaction2 store 256x340.
        backend: a concrete backend: dis, farneback, tvl1 or raft (``auto`` is resolved before).
        preset: DIS preset (ultrafast, fast, balanced, medium); only used by ``dis``.
        raft_variant: ``large`` or ``small`` (torchvision); only used by ``raft``.
        raft_iters: RAFT recurrent updates (torchvision's default 12).
        raft_weights: id of the RAFT weights (``sha256:<hex>`` of a state_dict file or
            ``torchvision:<enum>``); recorded so stores built with other weights are refused.
        bound: flow quantization bound in pixels.
        rgb_codec, flow_codec: ``jpeg`` (lossy, compact) or ``zstd`` (lossless) for each array.
        rgb_quality, flow_quality: JPEG quality 1-100 (used with ``jpeg`` only).
    """

    frames: int = 32
    size: tuple[int, int] = (256, 340)
    backend: str = DEFAULT_CPU_BACKEND
    preset: str = DEFAULT_DIS_PRESET
    raft_variant: str = "large"
    raft_iters: int = 12
    raft_weights: str = ""
    bound: float = FLOW_BOUND
    rgb_codec: str = DEFAULT_RGB_CODEC
    rgb_quality: int = DEFAULT_RGB_QUALITY
    flow_codec: str = DEFAULT_FLOW_CODEC
    flow_quality: int = DEFAULT_FLOW_QUALITY

    def __post_init__(self):
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        for name in ("rgb", "flow"):
            codec, quality = getattr(self, f"{name}_codec"), getattr(self, f"{name}_quality")
            if codec not in CODECS:
                raise ValueError(f"--{name}-codec must be one of {CODECS}, got {codec!r}")
            if not 1 <= int(quality) <= 100:
                raise ValueError(f"--{name}-quality must be in 1..100, got {quality}")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if len(self.size) != 2 or min(self.size) < 8:
            raise ValueError(f"size must be (H, W) with both >= 8, got {self.size}")
        if self.backend not in BACKENDS[1:]:
            raise ValueError(f"backend must be one of {BACKENDS[1:]} (auto is resolved first), got {self.backend!r}")
        if self.preset not in DIS_PRESETS:
            raise ValueError(f"DIS preset must be one of {tuple(DIS_PRESETS)}, got {self.preset!r}")
        if self.raft_variant not in RAFT_VARIANTS:
            raise ValueError(f"raft variant must be one of {RAFT_VARIANTS}, got {self.raft_variant!r}")

    def to_store(self) -> dict:
        """The settings recorded in ``frames.zarr`` (only the parameters of the chosen backend)."""
        out: dict[str, Any] = {"frames": self.frames, "size": list(self.size), "backend": self.backend,
                               "decoder": "pyav", "orientation": "display matrix applied",
                               "resize": "cv2.INTER_AREA", "positions": "segment-centres",
                               "chunk": "one position of one video"}
        for name in ("rgb", "flow"):
            codec = getattr(self, f"{name}_codec")
            out[f"{name}_codec"] = codec
            if codec == "jpeg":
                out[f"{name}_quality"] = int(getattr(self, f"{name}_quality"))
        if self.backend == "dis":
            out["preset"] = self.preset
            out["dis_params"] = dict(DIS_PRESETS[self.preset])
        elif self.backend == "farneback":
            out["farneback_params"] = dict(FARNEBACK_PARAMS)
        elif self.backend == "tvl1":
            out["tvl1_params"] = "opencv-defaults"
        elif self.backend == "raft":
            out.update(raft_variant=self.raft_variant, raft_iters=self.raft_iters, raft_weights=self.raft_weights)
        return out

    @classmethod
    def from_store_attrs(cls, attrs: dict) -> FlowSettings:
        """Rebuild the settings of a ``frames.zarr`` from its root attrs (or its ``settings`` dict).

        The bound is recorded once, in the ``flow`` array's attrs: pass it as ``attrs["flow_bound"]``
        (stores written before that kept it in ``settings``).
        """
        s = attrs.get("settings", attrs)
        if s.get("backend") not in BACKENDS[1:]:
            raise ValueError(f"not frames.zarr settings (backend {s.get('backend')!r})")
        if s.get("backend") == "dis" and s.get("dis_params") not in (None, DIS_PRESETS.get(s.get("preset"))):
            raise ValueError(f"the store's DIS parameters {s.get('dis_params')} differ from preset "
                             f"{s.get('preset')!r} of this imdpipe version")
        return cls(frames=int(s["frames"]), size=tuple(s["size"]), backend=s["backend"],
                   preset=s.get("preset", DEFAULT_DIS_PRESET), raft_variant=s.get("raft_variant", "large"),
                   raft_iters=int(s.get("raft_iters", 12)), raft_weights=s.get("raft_weights", ""),
                   bound=float(attrs.get("flow_bound", s.get("flow_bound", FLOW_BOUND))),
                   # stores from before the codec settings were lossless zstd
                   rgb_codec=s.get("rgb_codec", "zstd"), rgb_quality=int(s.get("rgb_quality", DEFAULT_RGB_QUALITY)),
                   flow_codec=s.get("flow_codec", "zstd"),
                   flow_quality=int(s.get("flow_quality", DEFAULT_FLOW_QUALITY)))

    def describe_codecs(self) -> str:
        def one(name):
            codec = getattr(self, f"{name}_codec")
            return f"{name} {codec}" + (f" q{getattr(self, f'{name}_quality')}" if codec == "jpeg" else "")
        return ", ".join(one(name) for name in ("rgb", "flow"))

    def describe(self) -> str:
        if self.backend == "dis":
            return f"dis (preset {self.preset})"
        if self.backend == "raft":
            return f"raft_{self.raft_variant} ({self.raft_iters} updates, weights {self.raft_weights or '?'})"
        return self.backend


# ---------------------------------------------------------------------------------------------
# Sampling and decoding
# ---------------------------------------------------------------------------------------------
def sample_positions(n_frames: int, frames: int) -> np.ndarray:
    """``frames`` source frame indices spread uniformly over ``n_frames`` (segment centres).

    Position t is ``floor((t + 0.5) * n / T)``: in range, non-decreasing, distinct when
    ``n >= T``, and repeating frames when the video is shorter than T.
    """
    if n_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {n_frames}")
    t = np.arange(frames, dtype=np.float64)
    return np.minimum(np.floor((t + 0.5) * n_frames / frames), n_frames - 1).astype(np.int32)


def flow_pair(position: int, n_frames: int) -> tuple[int, int]:
    """The (from, to) source frames whose flow is stored at ``position``."""
    if n_frames < 2:
        raise ValueError("flow needs at least 2 frames")
    return (position, position + 1) if position + 1 < n_frames else (position - 1, position)


@dataclass
class DecodedVideo:
    """What one decode pass keeps: the sampled positions and every frame their flow pairs need."""

    n_frames: int
    frame_index: np.ndarray  # (T,) int32
    images: dict[int, np.ndarray] = field(repr=False)  # source index -> (H, W, 3) uint8 RGB, store size
    rotation: int = 0  # degrees clockwise the frames were turned to stand upright (display matrix)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Distinct (from, to) pairs in order of first use."""
        return list(dict.fromkeys(flow_pair(int(p), self.n_frames) for p in self.frame_index))

    @property
    def rgb(self) -> np.ndarray:
        return np.stack([self.images[int(p)] for p in self.frame_index])


_frame_count_hint = frame_count  # a module name, so a test can fake a lying container header


def _wanted(n: int, frames: int) -> tuple[np.ndarray, set[int]]:
    positions = sample_positions(n, frames)
    if n < 2:
        return positions, set(positions.tolist())
    return positions, {i for p in positions.tolist() for i in flow_pair(p, n)}


def decode_video_frames(path: str | Path, size: tuple[int, int], *, frames: int = 32,
                        threads: int = 0) -> DecodedVideo:
    """Decode a video once with PyAV, keeping the sampled frames and their flow partners.

    The positions come from the container's frame count; if decoding ends cleanly with another
    count (a lying header) they are resampled for the true count, with a second pass only when
    frames it needs were not kept. Decoding that stops with an error before the container's count
    (a damaged stream) is an error when it loses more than
    :data:`~imdpipe.pipeline.media.MAX_LOST_FRAMES` of the frames. Frames are turned upright by the
    stream's display matrix (phone clips), then resized (both in :func:`decode_frames`).

    Args:
        path: the video file.
        size: store (H, W); frames are resized with ``cv2.INTER_AREA`` (skipped when equal).
        frames: T, positions to sample.
        threads: decoder threads (0 = FFmpeg's choice; 1 inside pool workers).

    Raises:
        VideoError: unreadable file, no video stream, fewer than 2 frames, or a stream that stops
            decoding well before the container's frame count.
    """
    path = Path(path)
    hint = max(_frame_count_hint(path), 2)
    positions, wanted = _wanted(hint, frames)
    images, n, rotation = decode_frames(path, wanted, size, threads=threads, expected=hint)
    if n < 2:
        raise VideoError(f"{path} has {n} decodable frame(s); optical flow needs at least 2")
    if n != hint:
        positions, wanted = _wanted(n, frames)
        if not wanted <= images.keys():
            images, n2, _ = decode_frames(path, wanted, size, threads=threads)
            if n2 != n:
                raise VideoError(f"{path}: the frame count changes between decode passes ({n} then {n2})")
    return DecodedVideo(n_frames=n, frame_index=positions, images={i: images[i] for i in sorted(wanted)},
                        rotation=rotation)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
def tvl1_available() -> bool:
    return hasattr(cv2, "optflow") and hasattr(cv2.optflow, "DualTVL1OpticalFlow_create")


def available_backends() -> list[str]:
    """Backends that can run here (RAFT always can; on CPU it is slow and never the default)."""
    out = ["dis", "farneback"]
    if tvl1_available():
        out.append("tvl1")
    return [*out, "raft"]


_CPU_FLOW_CACHE: dict[tuple, Any] = {}


def _cpu_flow_fn(settings: FlowSettings):
    """A function (gray0, gray1) -> (H, W, 2) float32 flow for a CPU backend (cached per process)."""
    key = (settings.backend, settings.preset, settings.size)
    fn = _CPU_FLOW_CACHE.get(key)
    if fn is not None:
        return fn
    if settings.backend == "dis":
        p = DIS_PRESETS[settings.preset]
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        dis.setFinestScale(p["finest_scale"])
        dis.setPatchSize(p["patch_size"])
        dis.setPatchStride(p["patch_stride"])
        dis.setGradientDescentIterations(p["gd_iters"])
        dis.setVariationalRefinementIterations(p["vr_iters"])
        # OpenCV's DIS gives a (slightly) different answer on its very first call than on every later
        # call at the same size (buffer initialisation); one warm-up call on a blank pair makes each
        # pair's flow independent of what the process computed before, so reruns are bit-identical.
        blank = np.zeros(settings.size, np.uint8)
        dis.calc(blank, blank, None)

        def fn(a, b):
            return dis.calc(a, b, None)
    elif settings.backend == "farneback":
        fp = FARNEBACK_PARAMS

        def fn(a, b):
            return cv2.calcOpticalFlowFarneback(a, b, None, fp["pyr_scale"], fp["levels"], fp["winsize"],
                                                fp["iterations"], fp["poly_n"], fp["poly_sigma"], fp["flags"])
    elif settings.backend == "tvl1":
        if not tvl1_available():
            raise ValueError("backend tvl1 needs OpenCV's contrib module: pip install 'imdpipe[tvl1]' "
                             "(opencv-contrib-python-headless), or use --backend dis")
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()

        def fn(a, b):
            return tvl1.calc(a, b, None)
    else:
        raise ValueError(f"{settings.backend!r} is not a CPU backend")
    _CPU_FLOW_CACHE[key] = fn
    return fn


def _gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def build_raft(variant: str = "large", *, weights: str | Path | None = None, device="cpu"):
    """A torchvision RAFT in eval mode, and the id of its weights.

    Args:
        variant: ``large`` or ``small``.
        weights: a ``state_dict`` file (``torch.save(model.state_dict(), path)``); None uses
            torchvision's default weights (downloaded once when online, then cached).
        device: where the model lives.

    Returns:
        ``(model, weights_id)`` with weights_id ``sha256:<hex>`` or ``torchvision:<enum>``.
    """
    import torch
    from torchvision.models import optical_flow as of

    if variant not in RAFT_VARIANTS:
        raise ValueError(f"raft variant must be one of {RAFT_VARIANTS}, got {variant!r}")
    ctor = of.raft_large if variant == "large" else of.raft_small
    enum = of.Raft_Large_Weights.DEFAULT if variant == "large" else of.Raft_Small_Weights.DEFAULT
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--flow-weights {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        model = ctor(weights=None)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path} is not a raft_{variant} state_dict ({str(e).splitlines()[0]}); "
                             f"check --raft-variant") from None
        wid = "sha256:" + _file_sha256(path)
    else:
        try:
            model = ctor(weights=enum)
        except Exception as e:  # noqa: BLE001 - report, keep going
            raise RuntimeError(
                f"cannot load torchvision's {enum} RAFT weights ({type(e).__name__}: {e}). Offline, pass "
                f"--flow-weights PATH (a raft_{variant} state_dict file) or use a CPU backend "
                f"(--backend dis).") from None
        wid = f"torchvision:{enum}"
    return model.eval().to(device), wid


def torchvision_raft_cached(variant: str) -> bool:
    """Whether torchvision's default RAFT weights are already in the torch hub cache."""
    import torch
    from torchvision.models import optical_flow as of

    enum = of.Raft_Large_Weights.DEFAULT if variant == "large" else of.Raft_Small_Weights.DEFAULT
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)).is_file()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def raft_flow(model, first: np.ndarray, second: np.ndarray, *, iters: int = 12, device="cpu",
              bound: float | None = None):
    """RAFT flow for a batch of RGB uint8 pairs (B, H, W, 3) -> (B, H, W, 2) numpy.

    Frames are scaled to [-1, 1] (torchvision's Raft weights transforms) and replicate-padded,
    centred, to multiples of 8 and at least 128x128 (RAFT's 1/8-resolution features must survive
    its 4-level correlation pyramid); the flow is cropped back. With ``bound`` the flow is
    quantized on the device (:func:`~imdpipe.pipeline.flow_utils.quantize`, torch branch) and
    the uint8 codes come back: a quarter of the bytes to copy and no host-side quantize;
    without it, float32 pixels.
    """
    import torch
    import torch.nn.functional as F

    def prep(x):
        t = torch.as_tensor(np.ascontiguousarray(x)).to(device, non_blocking=True)
        return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)

    a, b = prep(first), prep(second)
    _, _, h, w = a.shape
    ph, pw = max((-h) % 8, RAFT_MIN_SIZE - h), max((-w) % 8, RAFT_MIN_SIZE - w)
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    if ph or pw:
        a, b = F.pad(a, pad, mode="replicate"), F.pad(b, pad, mode="replicate")
    with torch.inference_mode():
        flow = model(a, b, num_flow_updates=iters)[-1]  # (B, 2, H', W')
    flow = flow[:, :, pad[2]:pad[2] + h, pad[0]:pad[0] + w].permute(0, 2, 3, 1)
    flow = quantize(flow, bound) if bound is not None else flow.float()
    return flow.cpu().numpy()


# ---------------------------------------------------------------------------------------------
# One video
# ---------------------------------------------------------------------------------------------
def _assemble(video: DecodedVideo, pair_codes: dict[tuple[int, int], np.ndarray]) -> dict:
    """The store row of one video from its quantized flow per (from, to) pair."""
    flows = np.stack([pair_codes[flow_pair(int(p), video.n_frames)] for p in video.frame_index])
    return {"rgb": video.rgb, "flow": flows,
            "frame_index": video.frame_index.astype(np.int32), "n_frames": np.int32(video.n_frames),
            "repeated": np.bool_(len(np.unique(video.frame_index)) < len(video.frame_index)),
            "rotation": np.int16(video.rotation)}


def flow_for_video(video: DecodedVideo, settings: FlowSettings, *, device="cpu", raft_model=None) -> dict:
    """Flow for the pairs of one decoded video; the per-video store row."""
    pairs = video.pairs
    if settings.backend == "raft":
        if raft_model is None:
            raise ValueError("backend raft needs raft_model (see build_raft)")
        codes = raft_flow(raft_model, np.stack([video.images[a] for a, _ in pairs]),
                          np.stack([video.images[b] for _, b in pairs]), iters=settings.raft_iters, device=device,
                          bound=settings.bound)
        pair_codes = dict(zip(pairs, codes))
    else:
        fn = _cpu_flow_fn(settings)
        gray = {i: _gray(im) for i, im in video.images.items()}
        # quantized pair by pair while the float flow is still in cache
        pair_codes = {(a, b): quantize(fn(gray[a], gray[b]), settings.bound) for a, b in pairs}
    return _assemble(video, pair_codes)


def extract_video(path: str | Path, settings: FlowSettings, *, device="cpu", raft_model=None,
                  threads: int = 0) -> dict[str, np.ndarray]:
    """Decode one video and compute its store row.

    Returns:
        ``rgb`` (T, H, W, 3) uint8, ``flow`` (T, H, W, 2) uint8 (quantized), ``frame_index`` (T,)
        int32, ``n_frames`` int32 (decoded frames), ``repeated`` bool (positions repeat) and
        ``rotation`` int16 (clockwise degrees the frames were turned upright).
    """
    video = decode_video_frames(path, settings.size, frames=settings.frames, threads=threads)
    return flow_for_video(video, settings, device=device, raft_model=raft_model)


# ---------------------------------------------------------------------------------------------
# Producers (what run_stage drives)
# ---------------------------------------------------------------------------------------------
def _init_worker():
    cv2.setNumThreads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _extract_or_error(path: str, settings: FlowSettings):
    """A video's store row, or the VideoError that says why it has none."""
    try:
        return extract_video(path, settings, threads=1)
    except VideoError as e:
        return e
    except Exception as e:  # noqa: BLE001 - any other per-video failure must not stop the run
        return VideoError(f"{path}: {type(e).__name__}: {e}")


def extract_shard(store_path: str, start: int, stop: int, indices: Sequence[int], paths: Sequence[str],
                  settings: FlowSettings) -> dict[int, Any]:
    """Compute the pending videos ``indices`` of shard ``[start, stop)`` and store their data.

    Runs in a pool worker that owns the whole shard, so the frames never cross a process
    boundary (pickling them through a pipe cost ~1.6 ms of CPU per pair, a quarter of the 2-core
    budget). Returns ``{index: WRITTEN or VideoError}``; the caller writes the done/error flags.
    """
    from imdpipe.pipeline.store import WRITTEN, StageStore

    rows, out = {}, {}
    for i, path in zip(indices, paths):
        result = _extract_or_error(path, settings)
        if isinstance(result, BaseException):
            out[i] = result
        else:
            rows[i], out[i] = result, WRITTEN
    StageStore.open_existing(store_path, mode="r+").write_rows(start, stop, rows)
    return out


def _mp_context():
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def cpu_producer(settings: FlowSettings, paths: Sequence[str], *, workers: int, store_path: str | Path,
                 videos_per_shard: int, task=extract_shard):
    """A run_stage producer for CPU backends: a pool worker computes and stores one whole shard.

    ``workers == 0`` runs the shards in this process. If a worker dies (a decoder crash), the
    videos of the shards it had in flight are rerun one at a time, each alone in a fresh
    process, so only a video that kills its process is blamed. ``task`` is
    :func:`extract_shard` (tests pass a wrapper).
    """
    store_path = str(store_path)

    def shard_tasks(pending: list[int]) -> list[tuple[int, int, list[int]]]:
        by_shard: dict[int, list[int]] = {}
        for i in pending:
            by_shard.setdefault(i - i % videos_per_shard, []).append(i)
        return [(s, min(s + videos_per_shard, len(paths)), idx) for s, idx in by_shard.items()]

    def submit(pool, start, stop, idx):
        return pool.submit(task, store_path, start, stop, idx, [paths[i] for i in idx], settings)

    def one_at_a_time(suspects):
        pool = None
        try:
            for start, stop, idx in suspects:
                for i in idx:
                    pool = pool or ProcessPoolExecutor(1, mp_context=_mp_context(), initializer=_init_worker)
                    try:
                        yield from submit(pool, start, stop, [i]).result().items()
                    except BrokenProcessPool:
                        pool.shutdown()
                        pool = None
                        yield i, VideoError(f"{paths[i]}: the worker process died while decoding it (a decoder "
                                            f"crash?). Re-encode the file or remove it from the manifest.")
        finally:
            if pool is not None:
                pool.shutdown()

    def produce(pending: list[int]) -> Iterator[tuple[int, Any]]:
        tasks = shard_tasks(pending)
        if workers == 0:
            _init_worker()
            for start, stop, idx in tasks:
                yield from task(store_path, start, stop, idx, [paths[i] for i in idx], settings).items()
            return
        todo = tasks[::-1]
        while todo:
            suspects: list = []
            with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(),
                                     initializer=_init_worker) as pool:
                running: dict = {}
                try:
                    while todo or running:
                        while todo and len(running) < workers + 1:
                            shard = todo.pop()
                            running[submit(pool, *shard)] = shard
                        finished, _ = wait(running, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            result = fut.result()
                            del running[fut]
                            yield from result.items()
                except BrokenProcessPool:
                    suspects = list(running.values())
            yield from one_at_a_time(suspects)
    return produce


class _DecodeDataset:
    """Map-style dataset for the RAFT path: decodes one video per item in a DataLoader worker."""

    def __init__(self, indices, paths, settings):
        self.indices, self.paths, self.settings = list(indices), list(paths), settings

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        try:
            return i, decode_video_frames(self.paths[i], self.settings.size, frames=self.settings.frames,
                                          threads=1)
        except VideoError as e:
            return i, e
        except Exception as e:  # noqa: BLE001 - report, keep going
            return i, VideoError(f"{self.paths[i]}: {type(e).__name__}: {e}")


def _dl_worker_init(_worker_id):
    _init_worker()


def _identity(x):
    return x


def raft_producer(settings: FlowSettings, paths: Sequence[str], *, model, device, workers: int,
                  batch_size: int):
    """A run_stage producer: DataLoader workers decode, the device runs RAFT on batches of pairs."""

    def produce(pending: list[int]) -> Iterator[tuple[int, Any]]:
        import torch
        from torch.utils.data import DataLoader

        loader = DataLoader(_DecodeDataset(pending, paths, settings), batch_size=None, shuffle=False,
                            num_workers=workers, collate_fn=_identity,
                            multiprocessing_context=_mp_context() if workers else None,
                            worker_init_fn=_dl_worker_init if workers else None,
                            prefetch_factor=4 if workers else None, persistent_workers=False)
        videos: dict[int, DecodedVideo] = {}
        flows: dict[int, dict] = {}
        queue: list[tuple[int, tuple[int, int]]] = []

        def run_batch(items):
            first = np.stack([videos[i].images[p[0]] for i, p in items])
            second = np.stack([videos[i].images[p[1]] for i, p in items])
            codes = raft_flow(model, first, second, iters=settings.raft_iters, device=device, bound=settings.bound)
            for (i, p), f in zip(items, codes):
                flows[i][p] = f

        def finished():
            for i in [i for i in videos if len(flows[i]) == len(videos[i].pairs)]:
                video = videos.pop(i)
                yield i, _assemble(video, flows.pop(i))

        for i, item in loader:
            if isinstance(item, BaseException):
                yield i, item
                continue
            videos[i], flows[i] = item, {}
            queue += [(i, p) for p in item.pairs]
            while len(queue) >= batch_size:
                batch, queue = queue[:batch_size], queue[batch_size:]
                try:
                    run_batch(batch)
                except torch.OutOfMemoryError as e:
                    raise RuntimeError(f"out of device memory at --batch-size {batch_size}: lower it") from e
                yield from finished()
        while queue:
            batch, queue = queue[:batch_size], queue[batch_size:]
            run_batch(batch)
        yield from finished()
    return produce


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def resolve_backend(backend: str, *, device: str | None, flow_weights: str | Path | None,
                    raft_variant: str = "large") -> tuple[str, str]:
    """Pick the backend for ``auto`` and say why. Returns ``(backend, reason)``."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "tvl1" and not tvl1_available():
            raise ValueError("backend tvl1 needs OpenCV's contrib module: pip install 'imdpipe[tvl1]' "
                             "(opencv-contrib-python-headless), or use --backend dis")
        return backend, "asked for with --backend"
    import torch

    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        if flow_weights is not None:
            return "raft", f"CUDA is available and --flow-weights {flow_weights} was given"
        if torchvision_raft_cached(raft_variant):
            return "raft", f"CUDA is available and torchvision's raft_{raft_variant} weights are cached"
        return DEFAULT_CPU_BACKEND, ("CUDA is available but no RAFT weights are (pass --flow-weights PATH or "
                                     "run once online with --backend raft); using the fastest accurate "
                                     "CPU backend")
    return DEFAULT_CPU_BACKEND, "no CUDA device: DIS is the fastest CPU backend with Farneback-level accuracy"


def _chunk_codec(codec: str, quality: int) -> dict:
    """ArraySpec codec keywords: a JPEG serializer, or None for the store's lossless default (zstd)."""
    if codec == "jpeg":
        from imdpipe.pipeline.zarr_jpeg import Jpeg, register

        register()
        return {"serializer": Jpeg(level=quality)}
    return {}


def store_arrays(settings: FlowSettings) -> list:
    """The per-video arrays of frames.zarr. ``rgb`` and ``flow`` have one chunk per position, so a
    clip reads (and decodes) only the positions it uses; JPEG flow is one grey plane per component."""
    from imdpipe.pipeline.store import ArraySpec

    t, (h, w) = settings.frames, settings.size
    flow_planes = 1 if settings.flow_codec == "jpeg" else 2
    quant = {"quantization": QUANT_FORMULA, "dequantization": DEQUANT_FORMULA, "bound": settings.bound,
             "units": "pixels of the stored frame", "components": ["x (right +)", "y (down +)"],
             "meaning": "flow[t] = flow from source frame frame_index[t] to frame_index[t]+1 "
                        "(the last frame: from its predecessor to it)"}
    return [
        ArraySpec("rgb", (t, h, w, 3), "uint8", ("time", "y", "x", "channel"),
                  attrs={"color": "RGB", "resize": "cv2.INTER_AREA"}, chunks=(1, h, w, 3),
                  **_chunk_codec(settings.rgb_codec, settings.rgb_quality)),
        ArraySpec("flow", (t, h, w, 2), "uint8", ("time", "y", "x", "component"), fill_value=128, attrs=quant,
                  chunks=(1, h, w, flow_planes), **_chunk_codec(settings.flow_codec, settings.flow_quality)),
        ArraySpec("frame_index", (t,), "int32", ("time",), fill_value=-1,
                  attrs={"meaning": "0-based index of the decoded source frame stored at each position"}),
        ArraySpec("n_frames", (), "int32", (), fill_value=0, attrs={"meaning": "frames decoded from the video"}),
        ArraySpec("repeated", (), "bool", (), fill_value=False,
                  attrs={"meaning": "True when the video has fewer frames than T, so positions repeat"}),
        ArraySpec("rotation", (), "int16", (), fill_value=0,
                  attrs={"meaning": "degrees clockwise the decoded frames were turned to stand upright "
                                    "(the stream's display matrix, e.g. 90 for a portrait phone clip)"}),
    ]


def as_stored(row: dict[str, np.ndarray], settings: FlowSettings) -> dict[str, np.ndarray]:
    """A video's row as frames.zarr returns it: ``rgb`` and ``flow`` through the store's codecs
    (an in-memory zarr array with the same chunks and codecs), so ``predict`` sees what training saw."""
    import zarr

    out = dict(row)
    for spec in store_arrays(settings):
        if spec.name in ("rgb", "flow"):
            arr = zarr.create_array(zarr.storage.MemoryStore(), shape=spec.shape, chunks=spec.chunks,
                                    dtype=spec.dtype, fill_value=spec.fill_value, **spec.codecs())
            arr[...] = row[spec.name]
            out[spec.name] = arr[...]
    return out


def open_frames_store(cache: str | Path, settings: FlowSettings, manifest, *, videos_per_shard: int,
                      overwrite: bool):
    """Create or reopen ``frames.zarr`` (concurrent ``--shard`` writers join the first one's store)."""
    from imdpipe.pipeline.store import StageStore

    return StageStore.open(FRAMES.path(cache), stage=FRAMES.stage, settings=settings.to_store(),
                           manifest_sha256=manifest.sha256, n_items=len(manifest), arrays=store_arrays(settings),
                           videos_per_shard=videos_per_shard, overwrite=overwrite,
                           attrs={"layout": "rgb/flow (video, time, y, x, channel)"})


def extract_flow(*, cache: str | Path, backend: str = "auto", frames: int = 32,
                 size: tuple[int, int] = (256, 340), preset: str = DEFAULT_DIS_PRESET,
                 raft_variant: str = "large", raft_iters: int = 12, workers: int | None = None,
                 batch_size: int = 32, device: str | None = None, flow_weights: str | Path | None = None,
                 shard=None, overwrite: bool = False, videos_per_shard: int = 16,
                 rgb_codec: str = DEFAULT_RGB_CODEC, rgb_quality: int = DEFAULT_RGB_QUALITY,
                 flow_codec: str = DEFAULT_FLOW_CODEC, flow_quality: int = DEFAULT_FLOW_QUALITY,
                 console=None, show_progress: bool = True):
    """Build (or resume) ``<cache>/frames.zarr``: sampled RGB frames and quantized flow per video.

    Args:
        cache: cache root with manifest.csv (from ``imdpipe index``).
        backend: auto, dis, farneback, tvl1 or raft.
        frames: T positions per video.
        size: stored (H, W).
        preset: DIS preset.
        raft_variant: large or small.
        raft_iters: RAFT recurrent updates.
        workers: CPU pool processes / RAFT DataLoader workers (None = this process's share of
            the cores: cores / LOCAL_WORLD_SIZE under torchrun; 0 = main process).
        batch_size: frame pairs per RAFT forward pass.
        device: torch device for RAFT (None: cuda if available, else cpu; ``cuda`` is
            ``cuda:LOCAL_RANK`` under torchrun, made the current device).
        flow_weights: RAFT state_dict file.
        shard: ``"i/n"`` or a Partition; None uses torchrun's RANK/WORLD_SIZE.
        overwrite: rebuild the store from nothing.
        videos_per_shard: videos per shard file (unit of work of one writer).
        rgb_codec, flow_codec: ``jpeg`` or ``zstd`` (lossless) per array.
        rgb_quality, flow_quality: JPEG quality (1-100).
        console: rich Console for messages (default stderr).
        show_progress: draw a progress bar.

    Returns:
        the run's :class:`imdpipe.pipeline.store.Summary`.
    """
    from rich.console import Console

    from imdpipe.pipeline.manifest import read_manifest
    from imdpipe.pipeline.store import Partition, run_stage

    console = console or Console(stderr=True)
    cache = Path(cache)
    manifest = read_manifest(cache)
    part = shard if isinstance(shard, Partition) else Partition.parse(shard)
    workers = cores_per_process() if workers is None else int(workers)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen, reason = resolve_backend(backend, device=device, flow_weights=flow_weights, raft_variant=raft_variant)
    settings = FlowSettings(frames=frames, size=tuple(size), backend=chosen, preset=preset,
                            raft_variant=raft_variant, raft_iters=raft_iters, rgb_codec=rgb_codec,
                            rgb_quality=rgb_quality, flow_codec=flow_codec, flow_quality=flow_quality)
    model = None
    if chosen == "raft":
        import torch

        from imdpipe.devices import select_device

        dev = select_device(device)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch but the last has one shape
        else:
            console.print("[yellow]RAFT on CPU is slow; for CPU runs prefer --backend dis[/yellow]")
        model, wid = build_raft(raft_variant, weights=flow_weights, device=dev)
        settings = replace(settings, raft_weights=wid)
        device = dev
    console.print(f"flow backend: [bold]{settings.describe()}[/bold] ({reason}); T={frames}, "
                  f"size {size[0]}x{size[1]}, {settings.describe_codecs()}, shard {part}, {workers} worker(s)"
                  + (f" on {device}" if chosen == "raft" else ""))
    store = open_frames_store(cache, settings, manifest, videos_per_shard=videos_per_shard, overwrite=overwrite)
    paths = [str(video_path(cache, r.path)) for r in manifest.records]
    if chosen == "raft":
        produce = raft_producer(settings, paths, model=model, device=device, workers=workers,
                                batch_size=batch_size)
    else:
        produce = cpu_producer(settings, paths, workers=workers, store_path=store.path,
                               videos_per_shard=store.videos_per_shard)
        todo = store.pending_by_shard(manifest.ok_indices(), part)
        if 0 < len(todo) < workers:
            console.print(f"[yellow]only {len(todo)} shard(s) of {store.videos_per_shard} videos to compute for "
                          f"{workers} workers (a worker takes a whole shard): a smaller --videos-per-shard "
                          f"would use every core (new stores only)[/yellow]")
    # RAFT: the main process feeds the device, so whole shards are written from a background thread
    summary = run_stage(store, produce, eligible=manifest.ok_indices(), names=paths, part=part,
                        description=f"flow [{settings.describe()}]", console=console,
                        show_progress=show_progress, shards_per_round=4 * max(workers, 1),
                        background_writes=chosen == "raft")
    return summary


__all__ = [
    "DIS_PRESETS",
    "FARNEBACK_PARAMS",
    "DecodedVideo",
    "FlowSettings",
    "VideoError",
    "as_stored",
    "available_backends",
    "build_raft",
    "decode_video_frames",
    "extract_flow",
    "extract_shard",
    "extract_video",
    "flow_for_video",
    "flow_pair",
    "raft_flow",
    "resolve_backend",
    "sample_positions",
]
