"""The training configuration: one typed dataclass, written as ``config.yaml`` into every run.

Defaults follow the paper (section 4.1: 8-frame 224x224 clips, global batch 64, 15 epochs, SGD
with initial learning rate 0.005 and weight decay 1e-4; test with 3 spatial crops x 4 temporal
clips) and Table 4 (alpha 0.25, masking scheme M). What the paper leaves open comes from a
named recipe (``recipe``, :data:`RECIPES`):

* ``paper``: TimeSformer's Kinetics-400 recipe, which the paper's stated values are (the
  supplementary says the implementation builds on TimeSformer's code): SGD momentum 0.9, the
  learning rate times 0.1 from epoch index 11 and again from 14 (no warmup), 8 frames spread
  over 256 source frames at 30 fps (8.53 s), the short side jittered in [256, 320] then a random
  224 crop and a flip, dropout 0.5 before the classifier, no gradient clipping. The default for
  small, base and large.
* ``cosine``: imdpipe's own recipe (ours): one warmup epoch then cosine decay, random resized
  crops over 25-100% of the frame, frames 2 cached positions apart, gradient norm clipped at 1.
  The default for tiny (the demo's size).

A recipe only fills the fields left unset (None); a value given explicitly always wins, and
``config.yaml`` records every resolved value with the recipe's name. Every field's help in
:data:`FIELD_HELP` (the CLI's ``--help``) says whether its default is the paper's, TimeSformer's
or ours.

The relevance settings K / Ya / overlap are not options: they come from ``relevance.zarr`` and
are recorded in ``relevance`` when a run starts; ``init`` records what ``init_checkpoint``
loaded (file and SHA-256).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from imdpipe.heads.names import FUSIONS, PAPER_INIT, SIZES

OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("step", "cosine")
TRAIN_CROPS = ("jitter", "resized")
#: Validation choices besides a split name: a class-stratified hold-out of the training split, or
#: no selection at all (the last epoch's weights are the result).
VAL_HOLDOUT, VAL_LAST = "holdout", "last"
LEGACY_VAL_SPLITS = {
    "auto": "'auto' picked the 'val' split, else 'test': checkpoints were chosen on the split that is then "
            "reported. Use 'holdout' (a seeded, stratified share of the training split, --val-fraction) or a "
            "split that is not reported",
    "none": "'none' chose checkpoint-best.pt by the lowest training loss; use 'last' (no selection)",
}

#: Minutes a collective waits for the slowest process under torchrun (ours; NCCL's own default is 10).
DEFAULT_DIST_TIMEOUT_MIN = 30.0

#: The clip span of TimeSformer's 8x32 sampling: 8 frames over 8 x 32 frames at its 30 fps reference.
TIMESFORMER_CLIP_SECONDS = 8 * 32 / 30

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "optimizer": "sgd", "lr": 0.005, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64, "epochs": 15,
        "lr_schedule": "step", "lr_milestones": (11, 14), "lr_gamma": 0.1, "warmup_epochs": 0.0,
        "min_lr_ratio": 0.0, "grad_clip": 0.0, "clip_seconds": TIMESFORMER_CLIP_SECONDS, "frame_stride": 0,
        "train_crop": "jitter", "jitter_scales": (256, 320), "crop_scale": (0.25, 1.0), "hflip": True,
        "head_drop_rate": 0.5,
    },
    "cosine": {
        "optimizer": "sgd", "lr": 0.005, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64, "epochs": 15,
        "lr_schedule": "cosine", "lr_milestones": (11, 14), "lr_gamma": 0.1, "warmup_epochs": 1.0,
        "min_lr_ratio": 0.0, "grad_clip": 1.0, "clip_seconds": 0.0, "frame_stride": 2,
        "train_crop": "resized", "jitter_scales": (256, 320), "crop_scale": (0.25, 1.0), "hflip": True,
        "head_drop_rate": 0.0,
    },
}
RECIPE_FIELDS = tuple(RECIPES["paper"])


def default_recipe(size: str) -> str:
    """``cosine`` for tiny (the demo's size), ``paper`` for the sizes the paper trains."""
    return "cosine" if size == "tiny" else "paper"


# One line per field: what it does and where its default comes from. Shown by `imdpipe train --help`.
FIELD_HELP: dict[str, str] = {
    # model
    "size": f"visual transformer size, one of {', '.join(SIZES)} (paper: base = ViT-B/16, 12 blocks)",
    "fusion": f"fusion head, one of {', '.join(FUSIONS)} (paper: imd)",
    "modalities": "modalities used, a subset of rgb, flow, audio (paper: rgb flow audio)",
    "alpha": "IMD threshold: audio dropped when rev < alpha (paper: 0.25, Table 4)",
    "scheme": "IMD scheme: M masks the audio by delta, W weights it by rev (paper: M)",
    "drop_rate": "dropout in the transformer and fusion MLPs (paper: not stated; ours: 0)",
    "head_drop_rate": "dropout on the classifier's input (paper: not stated; recipe paper: TimeSformer's 0.5; "
                      "recipe cosine: 0)",
    "drop_path_rate": "stochastic depth of the transformer blocks (paper: not stated; ours: 0)",
    "patch_size": "side of the square patches of both visual streams; crop_size must be a multiple of it "
                  "(paper: 16, ViT-B/16; ImageNet init needs 16)",
    "flow_scale": "flow (pixels) is divided by this before the flow stream's patch embedding (default: the "
                  "cache's flow bound, 20, which maps it to [-1, 1]; paper: not stated)",
    "init_checkpoint": "weights to start from: a timm pretrained name, a timm ViT file (.safetensors/.pth/.npz) or "
                       "an imdpipe run directory / checkpoint (Kinetics-pretrained finetuning: streams, and audio "
                       "bottleneck and fusion when their shapes match, are loaded; the classifier is new). Paper: "
                       "the size's ImageNet-21K ViT: "
                       + ", ".join(f"{s} {n}" for s, n in PAPER_INIT.items() if n)
                       + " (small: none is published). Required for small/base/large unless --from-scratch",
    "from_scratch": "train small/base/large from random weights (the paper never does; tiny always may)",
    # data
    "num_frames": "frames per clip (paper: 8)",
    "clip_seconds": "seconds from a clip's first to its last frame; each frame is the cached position nearest its "
                    "time, a clip longer than the video repeats the last position (recipe paper: TimeSformer's "
                    "8x32 sampling, 256 frames at 30 fps = 8.53; recipe cosine: 0 = use --frame-stride)",
    "frame_stride": "step between the clip's frames in cached positions, 0 = use --clip-seconds (recipe cosine, "
                    "ours: 2; recipe paper: 0)",
    "crop_size": "side of the square crop fed to the model, a multiple of 16 (paper: 224)",
    "train_crop": "training crop: 'jitter' resizes the short side to a random size in --jitter-scales then "
                  "crops --crop-size (recipe paper: TimeSformer's), 'resized' is a random resized crop over "
                  "--crop-scale of the frame (recipe cosine, ours)",
    "jitter_scales": "short-side range of the 'jitter' crop, in pixels at which --crop-size is cut "
                     "(recipe paper: TimeSformer's 256 320)",
    "crop_scale": "area range of the 'resized' crop, as a share of the frame (recipe cosine, ours: 0.25 1.0)",
    "hflip": "random horizontal flip, negating flow x (paper: not stated; both recipes: on)",
    "cross_modal_p": "probability of intra-class cross-modality augmentation: the audio comes from another "
                     "training video of the same class (paper: used, section 3.6, probability not stated; ours: 0)",
    "train_split": "manifest split trained on (paper: the dataset's train split)",
    "head_only": "train only the audio bottleneck, the fusion and the classifier on cached visual embeddings "
                 "(visual.zarr, `imdpipe extract-visual`): an ablation tool, not the paper's end-to-end training "
                 "(ours; off)",
    "val_split": "what picks checkpoint-best.pt (scored with 1 centre view after each epoch): 'holdout' = "
                 "--val-fraction of the training split, stratified by class and seeded, never trained on; "
                 "'last' = no selection (the last epoch is the result); or a split name (then never report that "
                 "split: evaluate refuses it) (paper: not stated; ours: holdout)",
    "val_fraction": "share of each class's training videos held out when --val-split is holdout (ours: 0.05)",
    # optimisation
    "recipe": "training recipe filling every setting not given: 'paper' (TimeSformer's Kinetics recipe, which "
              "the paper's stated values are: step decay, no warmup, 8x32 sampling, short-side jitter, dropout "
              "0.5) or 'cosine' (ours: warmup + cosine, random resized crops, frames 2 positions apart). "
              "Default: paper for small/base/large, cosine for tiny",
    "optimizer": "sgd (momentum) or adamw (paper: sgd)",
    "lr": "initial learning rate for the global batch (paper: 0.005 with SGD)",
    "momentum": "SGD momentum (paper: not stated; TimeSformer: 0.9)",
    "weight_decay": "weight decay (paper: 1e-4)",
    "batch_size": "global batch size, split over DDP processes (paper: 64)",
    "epochs": "training epochs (paper: 15)",
    "lr_schedule": "'step' multiplies the learning rate by --lr-gamma at each of --lr-milestones (recipe paper: "
                   "TimeSformer's), 'cosine' decays it to --min-lr-ratio after the warmup (recipe cosine, ours)",
    "lr_milestones": "epoch indices (0-based) from which the 'step' schedule multiplies the learning rate by "
                     "--lr-gamma (TimeSformer: 11 14, i.e. the 12th and 15th of 15 epochs)",
    "lr_gamma": "factor of each 'step' decay (TimeSformer: 0.1)",
    "warmup_epochs": "linear warmup, in epochs (recipe paper: TimeSformer's 0; recipe cosine, ours: 1)",
    "min_lr_ratio": "final learning rate of the cosine decay, as a share of lr (recipe cosine, ours: 0)",
    "label_smoothing": "label smoothing of the cross-entropy (paper: not stated; ours: 0)",
    "relevance_weight": "lambda: weight of BCE(rev, relevance target) added to the cross-entropy "
                        "(paper: weighted, value not stated; ours: 1.0)",
    "grad_clip": "clip the gradient norm to this value, 0 = off (recipe paper: TimeSformer's 0; recipe cosine, "
                 "ours: 1.0)",
    # system
    "device": "auto (cuda when available), cpu or cuda (ours: auto)",
    "amp": "bf16 autocast on CUDA, IMD's relevance logit and its BCE kept in float32 (always off on CPU) "
           "(paper: not stated; ours: on)",
    "compile": "torch.compile the model (ours: off; no speed-up measured yet, see README 'Running on GPUs')",
    "num_workers": "DataLoader worker processes per training process (ours): -1 = the CPU cores / LOCAL_WORLD_SIZE, "
                   "0 = the main process; persistent, one thread each",
    "threads": "torch CPU threads per process, 0 = leave torch's default (ours: 0)",
    "dist_timeout": "minutes a collective (all-reduce, barrier) under torchrun waits for the slowest process before "
                    "the run fails, e.g. while rank 0 writes a checkpoint (ours: 30; NCCL's own default: 10)",
    "seed": "random seed (data order, augmentation, init, the validation hold-out) (ours: 0)",
    "log_every": "steps between metric lines in metrics.jsonl, the only reads of device values between epoch ends "
                 "(ours: 10)",
    "eval_batch_size": "videos per forward pass when scoring the validation split (ours: 4)",
    "tensorboard": "write TensorBoard event files into the run directory (tensorboard --logdir RUN) (ours: on)",
}


@dataclass(frozen=True)
class ClipSpec:
    """What one clip of a video is: its frames, their spacing and the crop fed to the model.

    Shared by training, evaluation and prediction (:class:`TrainConfig` holds one as flat
    fields, :attr:`TrainConfig.clip` returns it). The frames are spaced either in cached
    positions (``frame_stride``) or in seconds (``clip_seconds``, the span from the first to the
    last frame), exactly one of them non-zero. ``train_crop``, ``jitter_scales``, ``crop_scale``
    and ``hflip`` only affect training clips; test views are fixed crops.
    """

    num_frames: int = 8
    frame_stride: int = 2
    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.25, 1.0)
    hflip: bool = True
    clip_seconds: float = 0.0
    train_crop: str = "resized"
    jitter_scales: tuple[int, int] = (256, 320)

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_scale", tuple(float(x) for x in self.crop_scale))
        object.__setattr__(self, "jitter_scales", tuple(int(x) for x in self.jitter_scales))
        if self.crop_size < 16 or self.crop_size % 16:
            raise ValueError(f"crop_size should be a positive multiple of 16 (the patch size), got {self.crop_size}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale should be two numbers 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.train_crop not in TRAIN_CROPS:
            raise ValueError(f"train_crop should be one of {TRAIN_CROPS}, got {self.train_crop!r}")
        if len(self.jitter_scales) != 2 or not self.crop_size <= self.jitter_scales[0] <= self.jitter_scales[1]:
            raise ValueError(f"jitter_scales should be two sizes crop_size={self.crop_size} <= lo <= hi, "
                             f"got {self.jitter_scales}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames should be >= 1, got {self.num_frames}")
        if self.frame_stride < 0 or self.clip_seconds < 0:
            raise ValueError(f"frame_stride and clip_seconds should be >= 0, got {self.frame_stride} and "
                             f"{self.clip_seconds}")
        if (self.frame_stride > 0) == (self.clip_seconds > 0):
            raise ValueError(f"give exactly one of frame_stride (cached positions) and clip_seconds (seconds), "
                             f"the other 0; got frame_stride={self.frame_stride}, clip_seconds={self.clip_seconds}")


@dataclass
class TrainConfig:
    """Every setting of a training run (see :data:`FIELD_HELP` for each field's origin).

    Fields whose default is None come from the recipe (:data:`RECIPES`) in ``__post_init__``.
    """

    # model
    size: str = "base"
    fusion: str = "imd"
    modalities: tuple[str, ...] = ("rgb", "flow", "audio")
    alpha: float = 0.25
    scheme: str = "M"
    drop_rate: float = 0.0
    head_drop_rate: float | None = None
    drop_path_rate: float = 0.0
    flow_scale: float | None = None
    patch_size: int = 16
    init_checkpoint: str | None = None
    from_scratch: bool = False
    # data
    num_frames: int = 8
    clip_seconds: float | None = None
    frame_stride: int | None = None
    crop_size: int = 224
    train_crop: str | None = None
    jitter_scales: tuple[int, int] | None = None
    crop_scale: tuple[float, float] | None = None
    hflip: bool | None = None
    cross_modal_p: float = 0.0
    train_split: str = "train"
    val_split: str = VAL_HOLDOUT
    val_fraction: float = 0.05
    head_only: bool = False
    # optimisation
    recipe: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    lr_schedule: str | None = None
    lr_milestones: tuple[int, ...] | None = None
    lr_gamma: float | None = None
    warmup_epochs: float | None = None
    min_lr_ratio: float | None = None
    label_smoothing: float = 0.0
    relevance_weight: float = 1.0
    grad_clip: float | None = None
    # system
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    num_workers: int = -1
    threads: int = 0
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_MIN
    seed: int = 0
    log_every: int = 10
    eval_batch_size: int = 4
    tensorboard: bool = True
    # recorded when a run starts (not options)
    relevance: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size should be one of {SIZES}, got {self.size!r}")
        self.recipe = self.recipe or default_recipe(self.size)
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe should be one of {tuple(RECIPES)}, got {self.recipe!r}")
        self._fill_from_recipe()
        self.modalities = tuple(self.modalities)
        self.lr_milestones = tuple(int(x) for x in self.lr_milestones)
        clip = self.clip  # validates the clip fields
        self.crop_scale, self.jitter_scales = clip.crop_scale, clip.jitter_scales
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer should be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device should be one of {DEVICES}, got {self.device!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule should be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if list(self.lr_milestones) != sorted(self.lr_milestones) or any(m < 1 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones should be increasing epoch indices >= 1, got {self.lr_milestones}")
        for name in ("batch_size", "epochs", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} should be >= 1, got {getattr(self, name)}")
        for name in ("cross_modal_p", "label_smoothing", "min_lr_ratio", "lr_gamma"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} should be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction should be in (0, 1), got {self.val_fraction}")
        for name in ("lr", "weight_decay", "warmup_epochs", "relevance_weight", "grad_clip", "momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} should be >= 0, got {getattr(self, name)}")
        if self.flow_scale is not None and self.flow_scale <= 0:
            raise ValueError(f"flow_scale should be > 0, got {self.flow_scale}")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout should be > 0 minutes, got {self.dist_timeout}")
        if self.num_workers < -1 or self.threads < 0:
            raise ValueError("num_workers should be >= -1 (-1 = auto) and threads >= 0")
        if self.from_scratch and self.init_checkpoint:
            raise ValueError(f"from_scratch and init_checkpoint {self.init_checkpoint!r} contradict each other; "
                             f"give one")
        self.model_config(num_classes=1)  # validates size, fusion, modalities, alpha and scheme together

    def _fill_from_recipe(self) -> None:
        """Unset (None) fields take the recipe's value; an explicit sampling or crop choice switches
        its companion off (an explicit frame_stride sets clip_seconds 0 and vice versa; an explicit
        crop_scale means the 'resized' crop, explicit jitter_scales the 'jitter' crop)."""
        recipe = RECIPES[self.recipe]
        given = {name for name in RECIPE_FIELDS if getattr(self, name) is not None}
        for name in RECIPE_FIELDS:
            if name not in given:
                setattr(self, name, recipe[name])
        if "frame_stride" in given and "clip_seconds" not in given and self.frame_stride > 0:
            self.clip_seconds = 0.0
        if "clip_seconds" in given and "frame_stride" not in given and self.clip_seconds > 0:
            self.frame_stride = 0
        if "train_crop" not in given:
            if "crop_scale" in given and "jitter_scales" not in given:
                self.train_crop = "resized"
            elif "jitter_scales" in given and "crop_scale" not in given:
                self.train_crop = "jitter"

    def recipe_deviations(self) -> dict[str, tuple[Any, Any]]:
        """``{field: (recipe's value, this run's value)}`` for every recipe field that differs."""
        recipe = RECIPES[self.recipe]
        out = {}
        for name in RECIPE_FIELDS:
            mine, theirs = getattr(self, name), recipe[name]
            if isinstance(theirs, tuple):
                mine = tuple(mine)
            if mine != theirs:
                out[name] = (theirs, mine)
        return out

    def check_init(self) -> None:
        """Refuse to train small/base/large from random weights unless asked to (the paper never does)."""
        if self.size == "tiny" or self.init_checkpoint or self.from_scratch:
            return
        name = PAPER_INIT.get(self.size)
        hint = (f"--init-checkpoint {name} (timm's ImageNet-21K ViT, from the hub cache) or a local file"
                if name else "--init-checkpoint /path/to/vit.safetensors (no ImageNet-21K ViT of this shape is "
                             "published)")
        raise ValueError(f"size {self.size!r} starts from pretrained weights in the paper, and a transformer of this "
                         f"size trained from random weights for {self.epochs} epochs falls far short of it. Pass "
                         f"{hint}, or an imdpipe run directory, or --from-scratch to train from random weights "
                         f"anyway.")

    def check_val_split(self) -> None:
        """Refuse the legacy validation choices that selected on the reported split."""
        if self.val_split in LEGACY_VAL_SPLITS:
            raise ValueError(f"val_split {LEGACY_VAL_SPLITS[self.val_split]}.")

    def model_config(self, *, num_classes: int, audio_dim: int = 768, flow_bound: float | None = None):
        """The :class:`imdpipe.heads.ModelConfig` this run trains (``flow_bound``: the cache's)."""
        from imdpipe.heads import ModelConfig

        divisor = self.flow_scale if self.flow_scale is not None else flow_bound
        extra = {} if divisor is None else {"flow_bound": divisor}
        return ModelConfig(num_classes=num_classes, size=self.size, fusion=self.fusion,
                           modalities=self.modalities, alpha=self.alpha, scheme=self.scheme,
                           audio_dim=audio_dim, num_frames=self.num_frames, img_size=self.crop_size,
                           drop_rate=self.drop_rate, head_drop_rate=self.head_drop_rate,
                           drop_path_rate=self.drop_path_rate, patch_size=self.patch_size, **extra)

    @property
    def clip(self) -> ClipSpec:
        """The clip this run trains and tests on."""
        return ClipSpec(num_frames=self.num_frames, frame_stride=self.frame_stride, crop_size=self.crop_size,
                        crop_scale=self.crop_scale, hflip=self.hflip, clip_seconds=self.clip_seconds,
                        train_crop=self.train_crop, jitter_scales=self.jitter_scales)

    @property
    def uses_audio(self) -> bool:
        return "audio" in self.modalities

    @property
    def uses_relevance(self) -> bool:
        return self.fusion == "imd"

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("modalities", "crop_scale", "jitter_scales", "lr_milestones"):
            d[name] = list(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes``. Changing ``recipe`` re-derives the recipe fields that still hold
        the old recipe's values (the ones set explicitly, or changed here, stay)."""
        data = self.to_dict()
        if changes.get("recipe", self.recipe) != self.recipe:
            deviations = self.recipe_deviations()
            for name in RECIPE_FIELDS:
                if name not in deviations and name not in changes:
                    data[name] = None
        return TrainConfig.from_dict({**data, **changes})


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
