"""The whole IMD action-recognition model: two-stream transformer, audio bottleneck, fusion, classifier.

Data flow (paper Fig. 2, Eqs. 1-9)::

    rgb  (B, T, 3, H, W) -> RGB stream  -> cls (B, D) -+
                                                       +-> 2 x (FC + ReLU) -> v (B, D) -+
    flow (B, T, 2, H, W) -> flow stream -> cls (B, D) -+                                |
                                                                                         +-> fusion -> z, rev
    audio (B, 768) cached AST embedding -> audio bottleneck -> a (B, Da) ---------------+
    logits = MLP(LN(z))                                                   (Eq. 9, no softmax)

``fusion`` is one of ``FUSIONS``; ``"imd"`` is the paper's (Eqs. 4-8), the others are the
Table 5 baselines (see ``imdpipe.heads.fusion``). ``modalities`` is any subset of
``("rgb", "flow", "audio")`` compatible with the fusion (Table 3): ``"none"`` uses only visual
streams, ``"audio-only"`` only audio, every other fusion audio plus at least one visual stream.

Everything is built from one serializable :class:`ModelConfig`; ``dataclasses.asdict(cfg)``
round-trips through ``ModelConfig(**d)`` (lists from YAML are accepted for tuples). Pretrained
weights (an ImageNet ViT, or a trained imdpipe model) are loaded by :func:`build_model` /
:func:`init_model`, never in ``__init__``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp, resample_abs_pos_embed
from torch import nn

from imdpipe.contract import FLOW_BOUND

from .audio import AudioBottleneck
from .fusion import SCHEMES, IMDFusion, build_fusion
from .visual import VISUAL_SIZES, TwoStreamTransformer, VisualConfig, load_vit_checkpoint, load_vit_weights

__all__ = ["FUSIONS", "MODALITIES", "PAPER_INIT", "SIZES", "ModelConfig", "MultimodalActionModel", "build_model",
           "init_model"]

from .names import FUSIONS, MODALITIES, PAPER_INIT, SIZES  # noqa: E402  (torch-free, for the CLI)

assert SIZES == tuple(VISUAL_SIZES), "heads/names.py SIZES must list visual.VISUAL_SIZES"
VISUAL_MODALITIES = ("rgb", "flow")


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model (stored with every checkpoint)."""

    num_classes: int  # output classes
    size: str = "base"  # visual transformer size, one of SIZES
    fusion: str = "imd"  # one of FUSIONS
    modalities: tuple[str, ...] = MODALITIES  # subset of ("rgb", "flow", "audio")
    alpha: float = 0.25  # IMD threshold: audio dropped when rev < alpha (Eq. 5)
    scheme: str = "M"  # IMD scheme: "M" masks with delta (Eq. 5), "W" always weights by rev
    audio_dim: int = 768  # width of the cached AST embedding
    num_frames: int = 8  # T, frames per clip
    img_size: int = 224  # H = W of the frames (multiple of patch_size)
    patch_size: int = 16  # P, side of the square patches (ViT-B/16: 16)
    fusion_dim: int | None = None  # width of audio bottleneck output and fused embedding (None: visual width)
    hidden_dim: int | None = (
        None  # hidden width of the MLPs of Eqs. 4, 8, 9 and the bottleneck (None: fusion_dim)
    )
    drop_rate: float = 0.0  # dropout in the transformer projections and the fusion/head MLPs
    head_drop_rate: float = 0.0  # dropout on LN(z), the classifier's input (TimeSformer's recipe: 0.5)
    attn_drop_rate: float = 0.0  # dropout on attention weights
    drop_path_rate: float = 0.0  # stochastic depth of the transformer blocks
    flow_bound: float = FLOW_BOUND  # the cache's flow quantization bound: flow pixels are divided by it
    avc_dim: int = 128  # hidden width of the Look-Listen-Learn (avc) fusion
    nl_tokens: int = 8  # tokens per embedding for the nl-gate fusion

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if self.size not in SIZES:
            raise ValueError(f"size should be one of {SIZES}, got {self.size!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion should be one of {FUSIONS}, got {self.fusion!r}")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(
                f"modalities should be a non-empty subset of {MODALITIES} without repeats, "
                f"got {self.modalities}"
            )
        self.modalities = tuple(m for m in MODALITIES if m in self.modalities)  # canonical order
        has_audio = "audio" in self.modalities
        has_visual = any(m in self.modalities for m in VISUAL_MODALITIES)
        if self.fusion == "none" and (has_audio or not has_visual):
            raise ValueError(
                f"fusion 'none' needs visual modalities only (rgb and/or flow), got {self.modalities}"
            )
        if self.fusion == "audio-only" and self.modalities != ("audio",):
            raise ValueError(f"fusion 'audio-only' needs modalities ('audio',), got {self.modalities}")
        if self.fusion not in ("none", "audio-only") and not (has_audio and has_visual):
            raise ValueError(
                f"fusion {self.fusion!r} needs audio and at least one of rgb/flow, got {self.modalities}"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes should be >= 1, got {self.num_classes}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha should be in [0, 1], got {self.alpha}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme should be one of {SCHEMES}, got {self.scheme!r}")
        for name in ("audio_dim", "num_frames", "avc_dim", "nl_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} should be >= 1, got {getattr(self, name)}")
        for name in ("fusion_dim", "hidden_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} should be None or >= 1, got {getattr(self, name)}")
        if self.patch_size < 1 or self.img_size < self.patch_size or self.img_size % self.patch_size:
            raise ValueError(
                f"img_size should be a positive multiple of the patch size {self.patch_size}, got {self.img_size}"
            )
        for name in ("drop_rate", "head_drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} should be in [0, 1), got {getattr(self, name)}")
        if self.flow_bound <= 0:
            raise ValueError(f"flow_bound should be > 0, got {self.flow_bound}")
        if self.fusion == "nl-gate" and self.visual_dim % self.nl_tokens:
            raise ValueError(
                f"nl-gate needs the visual width {self.visual_dim} divisible by nl_tokens, "
                f"got {self.nl_tokens}"
            )

    @property
    def visual_streams(self) -> tuple[str, ...]:
        return tuple(m for m in self.modalities if m in VISUAL_MODALITIES)

    @property
    def visual_dim(self) -> int:
        return VISUAL_SIZES[self.size]["embed_dim"]

    def visual_config(self) -> VisualConfig:
        """The :class:`VisualConfig` of the visual streams (even when none is used)."""
        return VisualConfig(
            **VISUAL_SIZES[self.size],
            img_size=self.img_size,
            patch_size=self.patch_size,
            num_frames=self.num_frames,
            streams=self.visual_streams or VISUAL_MODALITIES,
            drop_rate=self.drop_rate,
            attn_drop_rate=self.attn_drop_rate,
            drop_path_rate=self.drop_path_rate,
            flow_bound=self.flow_bound,
        )


def _fusion_options(cfg: ModelConfig, hidden_dim: int) -> dict:
    """The ModelConfig fields the chosen fusion takes (each fusion accepts only its own)."""
    if cfg.fusion == "imd":
        return {"hidden_dim": hidden_dim, "alpha": cfg.alpha, "scheme": cfg.scheme, "drop": cfg.drop_rate}
    if cfg.fusion == "avc":
        return {"avc_dim": cfg.avc_dim}
    if cfg.fusion == "nl-gate":
        return {"num_tokens": cfg.nl_tokens}
    return {}


class MultimodalActionModel(nn.Module):
    """Streams, audio bottleneck, fusion, classifier: ``forward(rgb, flow, audio) -> (logits, rev)``.

    ``forward(..., rev_logit=True) -> (logits, rev, rev_logit)`` for the training loss.
    """

    def __init__(self, cfg: ModelConfig, device=None, dtype=None, *, streams: bool = True) -> None:
        """``streams=False`` builds the head alone (``visual`` None): it takes cached visual
        embeddings through :meth:`forward_head`; its state dict is the full model's minus ``visual.*``."""
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.config = cfg
        visual_dim = cfg.visual_dim
        fusion_dim = cfg.fusion_dim or visual_dim
        hidden_dim = cfg.hidden_dim or fusion_dim
        self.visual = TwoStreamTransformer(cfg.visual_config(), **dd) if cfg.visual_streams and streams else None
        self.audio = (
            AudioBottleneck(cfg.audio_dim, hidden_dim, fusion_dim, drop=cfg.drop_rate, **dd)
            if "audio" in cfg.modalities
            else None
        )
        self.fusion = build_fusion(cfg.fusion, visual_dim, fusion_dim, fusion_dim, **dd,
                                   **_fusion_options(cfg, hidden_dim))
        self.head_norm = nn.LayerNorm(self.fusion.out_dim, **dd)  # Eq. 9
        self.head_drop = nn.Dropout(cfg.head_drop_rate)
        self.head = Mlp(self.fusion.out_dim, hidden_dim, cfg.num_classes, drop=cfg.drop_rate, **dd)

    @property
    def relevance_threshold(self) -> float:
        """IMD's alpha: a clip's audio is dropped when ``rev < relevance_threshold``."""
        return self.config.alpha

    def forward_features(
        self,
        rgb: torch.Tensor | None,
        flow: torch.Tensor | None,
        audio: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Visual embedding ``(B, D)`` and audio embedding ``(B, Da)``; None for unused modalities.

        Inputs of modalities that are not in ``config.modalities`` are ignored.
        """
        mods = self.config.modalities
        given = {"rgb": rgb, "flow": flow, "audio": audio}
        missing = [m for m in mods if given[m] is None]
        if missing:
            raise ValueError(f"modalities {mods} need inputs, got None for {missing}")
        batch = {m: given[m].shape[0] for m in mods}
        if len(set(batch.values())) > 1:
            raise ValueError(f"inputs should share one batch size, got {batch}")
        v = (
            self.visual(rgb if "rgb" in mods else None, flow if "flow" in mods else None)
            if self.visual
            else None
        )
        a = self.audio(audio) if self.audio is not None else None
        return v, a

    def forward_head(
        self,
        v: torch.Tensor | None,
        a: torch.Tensor | None,
        *,
        rev_logit: bool = False,
    ) -> tuple:
        """Fusion then classifier: ``(logits (B, num_classes), rev (B,) or None)``.

        With ``rev_logit=True`` a third element: IMD's relevance logit (B,) in float32, the input
        of the relevance loss (binary cross-entropy with logits), or None for other fusions.
        """
        if isinstance(self.fusion, IMDFusion):
            z, rev, logit = self.fusion.forward_with_logit(v, a)
        else:
            (z, rev), logit = self.fusion(v, a), None
        logits = self.head(self.head_drop(self.head_norm(z)))
        return (logits, rev, logit) if rev_logit else (logits, rev)

    def forward(
        self,
        rgb: torch.Tensor | None = None,
        flow: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        *,
        rev_logit: bool = False,
    ) -> tuple:
        return self.forward_head(*self.forward_features(rgb, flow, audio), rev_logit=rev_logit)


def build_model(
    cfg: ModelConfig,
    init_checkpoint: str | os.PathLike | None = None,
    *,
    device=None,
    dtype=None,
) -> MultimodalActionModel:
    """Build the model; initialize it from pretrained weights when asked (see :func:`init_model`).

    Args:
        cfg: The model configuration.
        init_checkpoint: What :func:`init_model` takes (a timm ViT file or name, or an imdpipe
            checkpoint file), or None to keep the random init. What was loaded is left in
            ``model.init_report``.
        device: Device for the parameters (e.g. ``"meta"`` to count without allocating).
        dtype: Parameter dtype.
    """
    model = MultimodalActionModel(cfg, device=device, dtype=dtype)
    model.init_report = init_model(model, init_checkpoint) if init_checkpoint is not None else None
    return model


def init_model(model: MultimodalActionModel, checkpoint: str | os.PathLike) -> dict:
    """Load pretrained weights into a freshly built model; returns what was loaded.

    ``checkpoint`` is one of:

    * an ImageNet ViT: a timm pretrained name (``vit_base_patch16_224.augreg_in21k``, loaded by
      timm from its hub cache) or a local timm ``.pth``/``.safetensors``/``.npz`` file. Both
      visual streams start from it as TimeSformer starts from a ViT (see
      ``imdpipe.heads.visual.convert_vit_state_dict``); everything else keeps its fresh init.
    * an imdpipe checkpoint file (``checkpoint-*.pt`` of a run, e.g. trained on Kinetics-400):
      both visual streams and their fusion layers are loaded (a different clip length or crop
      size resamples the time and position embeddings); the audio bottleneck and the fusion
      are loaded when their shapes match; the classifier (``head_norm``, ``head``) is always
      new, so the label set may differ.

    Returns:
        ``{"source", "kind" ("timm" or "imdpipe"), "file", "sha256" (of the file), "loaded"
        (model parts), "new" (parts left at their fresh init), "notes"}``.
    """
    source = os.fspath(checkpoint)
    if model.visual is None:
        raise ValueError(f"init_checkpoint needs a visual modality, got modalities {model.config.modalities}")
    ckpt = _imdpipe_checkpoint(source)
    if ckpt is not None:
        loaded, notes = _load_imdpipe_weights(model, ckpt, source)
        kind, file = "imdpipe", source
    else:
        vit, file = load_vit_weights(source)
        load_vit_checkpoint(model.visual, vit)
        loaded = [f"visual.streams.{name}" for name in model.visual.streams]
        kind, notes = "timm", []
    new = sorted({_part(k) for k in model.state_dict()} - set(loaded))
    return {"source": source, "kind": kind, "file": file, "sha256": file_sha256(file) if file else None,
            "loaded": loaded, "new": new, "notes": notes}


def _part(key: str) -> str:
    """The model part a state-dict key belongs to: ``visual.streams.rgb``, ``visual.fuse``, ``audio``,
    ``fusion``, ``head_norm`` or ``head``."""
    parts = key.split(".")
    return ".".join(parts[:3] if key.startswith("visual.streams.") else parts[:2] if parts[0] == "visual"
                    else parts[:1])


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _imdpipe_checkpoint(path: str) -> dict | None:
    """The checkpoint dict when ``path`` is a file written by imdpipe's trainer, else None."""
    if not (os.path.isfile(path) and path.lower().endswith((".pt", ".pth", ".bin"))):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "model" in obj and "model_config" in obj:
        return obj
    return None


def _load_imdpipe_weights(model: MultimodalActionModel, ckpt: dict, source: str):
    """Copy a trained imdpipe model's streams (and matching audio/fusion parts) into ``model``."""
    src_cfg = ModelConfig(**ckpt["model_config"])
    cfg = model.config
    if src_cfg.size != cfg.size:
        raise ValueError(f"{source} holds a {src_cfg.size!r} model; this run builds {cfg.size!r} "
                         f"(pass --size {src_cfg.size} or another checkpoint)")
    src = ckpt["model"]
    target = model.state_dict()
    out = dict(target)
    loaded, notes = [], []
    for name, stream in model.visual.streams.items():
        prefix = f"visual.streams.{name}."
        part = {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix)}
        if not part:
            raise ValueError(f"{source} has no {name} stream (it was trained on {list(src_cfg.modalities)}); "
                             f"initialize from a run that used {name}, or from an ImageNet ViT")
        for key, value in _fit_stream(part, stream, notes, name).items():
            out[prefix + key] = value
        loaded.append(prefix[:-1])

    def take_if_same(prefix: str) -> None:
        mine = {k: v for k, v in target.items() if k.startswith(prefix)}
        theirs = {k: v for k, v in src.items() if k.startswith(prefix)}
        if mine and set(mine) == set(theirs) and all(mine[k].shape == theirs[k].shape for k in mine):
            out.update(theirs)
            loaded.append(prefix[:-1])
        elif mine:
            notes.append(f"{prefix[:-1]} not loaded (its shapes differ in {source})")

    take_if_same("visual.fuse.")
    if src_cfg.fusion == cfg.fusion:
        take_if_same("audio.")
        take_if_same("fusion.")
    elif any(k.startswith(("audio.", "fusion.")) for k in target):
        notes.append(f"audio bottleneck and fusion not loaded ({source} used fusion {src_cfg.fusion!r}, "
                     f"this run {cfg.fusion!r})")
    model.load_state_dict(out, strict=True)
    return loaded, notes


def _fit_stream(part: dict, stream, notes: list[str], name: str) -> dict:
    """A trained stream's weights for ``stream``: position / time embeddings resampled when the
    crop size or clip length differ, every other tensor of the same shape."""
    target = stream.state_dict()
    fitted = {}
    for key, want in target.items():
        if key not in part:
            raise ValueError(f"the checkpoint's {name} stream lacks {key!r}")
        value = part[key]
        if key == "pos_embed" and value.shape != want.shape:
            value = resample_abs_pos_embed(value, new_size=list(stream.cfg.grid_size), num_prefix_tokens=1)
            notes.append(f"{name} position embedding resampled to a {stream.cfg.grid_size} patch grid")
        elif key == "time_embed" and value.shape != want.shape:  # (1, T, D): linear in time
            value = F.interpolate(value.transpose(1, 2), size=want.shape[1], mode="linear",
                                  align_corners=True).transpose(1, 2)
            notes.append(f"{name} time embedding interpolated from {part[key].shape[1]} to {want.shape[1]} frames")
        if value.shape != want.shape:
            raise ValueError(f"the checkpoint's {name} stream has {key!r} of shape {tuple(value.shape)}, "
                             f"this model needs {tuple(want.shape)}")
        fitted[key] = value
    return fitted
