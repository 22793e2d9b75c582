"""The training configuration: one typed dataclass, written as ``config.yaml`` into every run.

Defaults follow the paper (section 4.1: 8-frame 224x224 clips, global batch 64, 15 epochs, SGD
with initial learning rate 0.005 and weight decay 1e-4; test with 3 spatial crops x 4 temporal
clips) and Table 4 (alpha 0.25, masking scheme M). Settings the paper does not state (warmup,
cosine decay, loss weight, clipping, augmentation probability) are marked "paper: not stated" in
:data:`FIELD_HELP`, which the CLI reuses as its ``--help`` text.

The relevance settings K / Ya / overlap are not options: they come from ``relevance.zarr`` and
are recorded in ``relevance`` when a run starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from imdpipe.heads.names import FUSIONS, SIZES

OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("auto", "cpu", "cuda")

# One line per field: what it does and the paper's value. Shown by `imdpipe train --help`.
FIELD_HELP: dict[str, str] = {
    # model
    "size": f"visual transformer size, one of {', '.join(SIZES)} (paper: base = ViT-B/16, 12 blocks)",
    "fusion": f"fusion head, one of {', '.join(FUSIONS)} (paper: imd)",
    "modalities": "modalities used, a subset of rgb, flow, audio (paper: rgb flow audio)",
    "alpha": "IMD threshold: audio dropped when rev < alpha (paper: 0.25, Table 4)",
    "scheme": "IMD scheme: M masks the audio by delta, W weights it by rev (paper: M)",
    "drop_rate": "dropout in the transformer and fusion MLPs (paper: not stated; 0)",
    "drop_path_rate": "stochastic depth of the transformer blocks (paper: not stated; 0)",
    "patch_size": "side of the square patches of both visual streams; crop_size must be a multiple of it "
                  "(paper: 16, ViT-B/16; ImageNet init needs 16)",
    "flow_scale": "flow (pixels) is divided by this before the flow stream's patch embedding (default: the "
                  "cache's flow bound, 20, which maps it to [-1, 1]; paper: not stated)",
    "init_checkpoint": "timm ViT weights (.pth/.safetensors/.npz file) for the visual streams "
                       "(paper: ImageNet ViT; default: random init)",
    # data
    "num_frames": "frames per clip (paper: 8)",
    "frame_stride": "step between the clip's frames, in cached positions (paper: not stated; 2)",
    "crop_size": "side of the square crop fed to the model, a multiple of 16 (paper: 224)",
    "crop_scale": "area range of the random resized crop, as a share of the frame (paper: not stated; 0.25 1.0)",
    "hflip": "random horizontal flip, negating flow x (paper: not stated; on)",
    "cross_modal_p": "probability of intra-class cross-modality augmentation: the audio comes from another "
                     "training video of the same class (paper: used, section 3.6, probability not stated; 0)",
    "train_split": "manifest split trained on (paper: the dataset's train split)",
    "head_only": "train only the audio bottleneck, the fusion and the classifier on cached visual embeddings "
                 "(visual.zarr, `imdpipe extract-visual`): an ablation tool, not the paper's end-to-end training "
                 "(ours; off)",
    "val_split": "split scored (1 centre view) after each epoch to pick checkpoint-best.pt: a split name, "
                 "'auto' (val if present, else test) or 'none' (best = lowest train loss)",
    # optimisation
    "optimizer": "sgd (momentum) or adamw (paper: sgd)",
    "lr": "initial learning rate for the global batch (paper: 0.005 with SGD)",
    "momentum": "SGD momentum (paper: not stated; 0.9)",
    "weight_decay": "weight decay (paper: 1e-4)",
    "batch_size": "global batch size, split over DDP processes (paper: 64)",
    "epochs": "training epochs (paper: 15)",
    "warmup_epochs": "linear warmup before cosine decay, in epochs (paper: not stated; 1)",
    "min_lr_ratio": "final learning rate of the cosine decay, as a share of lr (paper: not stated; 0)",
    "label_smoothing": "label smoothing of the cross-entropy (paper: not stated; 0)",
    "relevance_weight": "lambda: weight of BCE(rev, relevance target) added to the cross-entropy "
                        "(paper: weighted, value not stated; 1.0)",
    "grad_clip": "clip the gradient norm to this value, 0 = off (paper: not stated; 1.0)",
    # system
    "device": "auto (cuda when available), cpu or cuda",
    "amp": "bf16 autocast on CUDA (always off on CPU)",
    "compile": "torch.compile the model",
    "num_workers": "DataLoader worker processes per training process (ours): -1 = the CPU cores / LOCAL_WORLD_SIZE, "
                   "0 = the main process; persistent, one thread each",
    "threads": "torch CPU threads per process, 0 = leave torch's default",
    "seed": "random seed (data order, augmentation, init)",
    "log_every": "steps between metric lines in metrics.jsonl",
    "eval_batch_size": "videos per forward pass when scoring the validation split",
}


@dataclass(frozen=True)
class ClipSpec:
    """What one clip of a video is: its frames, their spacing and the crop fed to the model.

    Shared by training, evaluation and prediction (:class:`TrainConfig` holds one as flat
    fields, :attr:`TrainConfig.clip` returns it). ``crop_scale`` and ``hflip`` only affect
    training clips; test views are fixed crops.
    """

    num_frames: int = 8
    frame_stride: int = 2
    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.25, 1.0)
    hflip: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_scale", tuple(float(x) for x in self.crop_scale))
        if self.crop_size < 16 or self.crop_size % 16:
            raise ValueError(f"crop_size should be a positive multiple of 16 (the patch size), got {self.crop_size}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale should be two numbers 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("num_frames", "frame_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} should be >= 1, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    """Every setting of a training run (see :data:`FIELD_HELP` for each field's paper value)."""

    # model
    size: str = "base"
    fusion: str = "imd"
    modalities: tuple[str, ...] = ("rgb", "flow", "audio")
    alpha: float = 0.25
    scheme: str = "M"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    flow_scale: float | None = None
    patch_size: int = 16
    init_checkpoint: str | None = None
    # data (the clip: see ClipSpec)
    num_frames: int = ClipSpec.num_frames
    frame_stride: int = ClipSpec.frame_stride
    crop_size: int = ClipSpec.crop_size
    crop_scale: tuple[float, float] = ClipSpec.crop_scale
    hflip: bool = ClipSpec.hflip
    cross_modal_p: float = 0.0
    train_split: str = "train"
    val_split: str = "auto"
    head_only: bool = False
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    epochs: int = 15
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    relevance_weight: float = 1.0
    grad_clip: float = 1.0
    # system
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    num_workers: int = -1
    threads: int = 0
    seed: int = 0
    log_every: int = 10
    eval_batch_size: int = 4
    # recorded from the caches when a run starts (not options)
    relevance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        self.crop_scale = self.clip.crop_scale  # validates the clip fields
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer should be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device should be one of {DEVICES}, got {self.device!r}")
        for name in ("batch_size", "epochs", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} should be >= 1, got {getattr(self, name)}")
        for name in ("cross_modal_p", "label_smoothing", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} should be in [0, 1], got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "warmup_epochs", "relevance_weight", "grad_clip", "momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} should be >= 0, got {getattr(self, name)}")
        if self.flow_scale is not None and self.flow_scale <= 0:
            raise ValueError(f"flow_scale should be > 0, got {self.flow_scale}")
        if self.num_workers < -1 or self.threads < 0:
            raise ValueError("num_workers should be >= -1 (-1 = auto) and threads >= 0")
        self.model_config(num_classes=1)  # validates size, fusion, modalities, alpha and scheme together

    def model_config(self, *, num_classes: int, audio_dim: int = 768, flow_bound: float | None = None):
        """The :class:`imdpipe.heads.ModelConfig` this run trains (``flow_bound``: the cache's)."""
        from imdpipe.heads import ModelConfig

        divisor = self.flow_scale if self.flow_scale is not None else flow_bound
        extra = {} if divisor is None else {"flow_bound": divisor}
        return ModelConfig(num_classes=num_classes, size=self.size, fusion=self.fusion,
                           modalities=self.modalities, alpha=self.alpha, scheme=self.scheme,
                           audio_dim=audio_dim, num_frames=self.num_frames, img_size=self.crop_size,
                           drop_rate=self.drop_rate, drop_path_rate=self.drop_path_rate,
                           patch_size=self.patch_size, **extra)

    @property
    def clip(self) -> ClipSpec:
        """The clip this run trains and tests on."""
        return ClipSpec(num_frames=self.num_frames, frame_stride=self.frame_stride, crop_size=self.crop_size,
                        crop_scale=self.crop_scale, hflip=self.hflip)

    @property
    def uses_audio(self) -> bool:
        return "audio" in self.modalities

    @property
    def uses_relevance(self) -> bool:
        return self.fusion == "imd"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        d["crop_scale"] = list(self.crop_scale)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config.yaml`` (write, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def load_config(path: str | Path) -> TrainConfig:
    """Read a ``config.yaml`` written by a run (or by hand) into a :class:`TrainConfig`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (pass the config.yaml of a run directory)")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a mapping of settings, got {type(data).__name__}")
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
