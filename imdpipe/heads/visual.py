"""Visual two-stream transformer of IMD (paper Sec. 3.2, Eqs. 1-3; supplementary Sec. 2.2).

Each stream (RGB with 3 input channels, optical flow with 2) is a ViT whose last ``n`` blocks
are factorized spatio-temporal blocks, as in TimeSformer's divided attention:

* Tokenization (Eq. 1): every frame is cut into 16x16 patches (timm ``PatchEmbed``), a spatial
  positional embedding (ViT layout ``(1, 1 + N, D)``) is added per frame and a temporal
  embedding ``(1, T, D)`` per frame index; one learnable clip-level CLS token is prepended.
  Tokens are kept as ``(B, 1 + T*N, D)`` throughout.
* Spatial block (Eq. 2, blocks ``1 .. L-n``): attention inside each frame; the CLS token is
  repeated per frame, attends with that frame's patches, and the T copies are averaged back.
  Then the MLP. Parameter names match timm's ``Block`` so ImageNet ViT weights load 1:1.
* Factorized block (Eq. 3, the last ``n`` blocks): temporal attention over the T tokens at each
  patch position (CLS excluded), followed by the linear layer ``LR`` (``temporal_fc``), residual;
  then the spatial block above. ``temporal_fc`` starts at zero, so a freshly initialized
  factorized block computes exactly the spatial block (TimeSformer's init invariance).
* The two streams' CLS embeddings are fused by two fully connected layers, each followed by ReLU
  (end of Sec. 3.2).

Flow comes in as pixels of displacement (dequantized uint8 flow, within the cache's quantization
bound); the model divides it by that ``flow_bound`` so it enters the patch embedding in about
[-1, 1], the range of normalized RGB. RGB comes in already normalized.

Sizes (``VISUAL_SIZES``). Parameters per stream (8 frames, 224x224; the flow stream has
``16*16*D`` fewer weights in its 2-channel patch embedding), ours vs the paper's supplementary
Table 4 (``imdpipe model-info`` prints these):

======  ====================================  =================  =================
size    D / depth / heads / MLP / factorized  ours, RGB / flow   paper, per stream
======  ====================================  =================  =================
tiny    96 / 3 / 3 / 4 / 1                    0.48M / 0.45M      --
small   768 / 8 / 8 / 3 / 1 (no qkv bias)     50.94M / 50.75M    47.9M (+6.4%)
base    768 / 12 / 12 / 4 / 2                 91.71M / 91.52M    88.6M (+3.5%)
large   1024 / 24 / 16 / 4 / 4                324.31M / 324.05M  173.7M (+87%)
======  ====================================  =================  =================

* ``small`` uses the widths of timm's original ``vit_small_patch16_224`` (768 wide, 8 blocks,
  8 heads, MLP ratio 3, no qkv bias; the pre-DeiT "ViT-S" of TimeSformer-era timm), the only
  published 8-block ViT. Its plain ViT body without classifier has 47.99M parameters, within 0.2% of
  the paper's 47.9M; the paper's figure apparently leaves out the temporal attention, its norm
  and ``LR`` of the one factorized block (2.95M), which we count.
* ``base`` uses ViT-B/16 widths: 85.80M for the ViT body plus 2 x 2.95M for the temporal parts
  and 6K for the time embedding. The paper's 88.6M is close to 85.8M + one block's temporal
  parts (88.75M); ours is 3.5% above it.
* ``large`` uses ViT-L/16 widths (1024 wide, 16 heads), the only 24-block ViT with ImageNet-21K
  weights, which the paper says every size is initialized from. The paper's 173.7M cannot be a
  1024-wide 24-block ViT (whose body alone is 303.3M); it is near a *768-wide* 24-block encoder
  (170.9M body, 182.7M with 4 factorized blocks), and the paper's large/base GFLOPs ratio (1.84)
  also points to a 768-wide encoder (ViT-L/ViT-B is 3.5). No ImageNet checkpoint exists for
  such an encoder, so we keep ViT-L widths and report the gap.

GFLOPs per view (batch 1: both streams, audio bottleneck, IMD and classifier with 400 classes;
8 frames, 224x224; attention counted; a multiply-add counts 2 FLOPs), ours vs the paper's
Table 4 divided by its 12 test views (3 crops x 4 clips):

=======  ==============  =================================
size     ours per view   paper, whole test / 12 views
=======  ==============  =================================
tiny     3.5             --
small    333.6           2,871 / 12 = 239.3
base     597.0           4,464 / 12 = 372.0
large    2,095.2         8,232 / 12 = 686.0
=======  ==============  =================================

Counted as multiply-adds (fvcore's convention, half our numbers) base is 298.5 GMACs per view,
below the paper's 372; the paper states neither its convention nor its view count for the
FLOPs, so the numbers are not directly comparable. Ratios small : base : large are
0.56 : 1 : 3.51 here and 0.64 : 1 : 1.84 in the paper (see ``large`` above).

Relevance network (Eq. 4) reading: see ``imdpipe.heads.fusion``; in short
``rev = sigmoid(w^T (MLP(LN(z)) + z) + b)``: the printed ``sigma(MLP(LN(z)) + z)`` is a residual
MLP of the width of ``z``, so a linear projection to one logit is added before the sigmoid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import LayerNorm, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.layers.attention import Attention
from timm.models import adapt_input_conv, load_state_dict
from timm.models._manipulate import named_apply
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from imdpipe.contract import FLOW_BOUND

__all__ = [
    "VISUAL_SIZES",
    "FactorizedBlock",
    "SpatialBlock",
    "TwoStreamTransformer",
    "VisualConfig",
    "VisualTransformer",
    "base",
    "build_two_stream",
    "convert_vit_state_dict",
    "large",
    "load_vit_checkpoint",
    "load_vit_weights",
    "small",
    "tiny",
    "visual_config",
    "vit_state_dict",
]

STREAM_CHANNELS = {"rgb": 3, "flow": 2}


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class SpatialBlock(Block):
    """Spatial-only block (Eq. 2) on clip tokens ``(B, 1 + T*N, D)``.

    Attention runs inside each frame with the clip CLS token repeated per frame; the T CLS
    outputs are averaged back into one. The MLP then runs on every token. Submodule names are
    those of timm's ``Block`` (``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``).
    """

    def spatial_attention(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Per-frame attention residual branch, ``(B, 1 + T*N, D) -> (B, 1 + T*N, D)``."""
        B, L, D = x.shape
        T = num_frames
        N = (L - 1) // T
        assert N * T == L - 1, f"token count {L} is not 1 + T*N for T={T}"
        cls = x[:, :1].expand(B, T, D).reshape(B * T, 1, D)  # (B*T, 1, D)
        patches = x[:, 1:].reshape(B * T, N, D)  # (B*T, N, D)
        y = self.attn(self.norm1(torch.cat([cls, patches], dim=1)))  # (B*T, 1+N, D)
        cls_out = y[:, 0].reshape(B, T, D).mean(dim=1, keepdim=True)  # (B, 1, D)
        return torch.cat([cls_out, y[:, 1:].reshape(B, T * N, D)], dim=1)  # (B, 1+T*N, D)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:  # type: ignore[override]
        x = x + self.drop_path1(self.ls1(self.spatial_attention(x, num_frames)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class FactorizedBlock(SpatialBlock):
    """Factorized spatio-temporal block (Eq. 3): temporal attention + ``LR``, then spatial.

    ``temporal_norm1``, ``temporal_attn`` and ``temporal_fc`` follow TimeSformer's names.
    ``temporal_fc`` is zero-initialized, so the block starts as a :class:`SpatialBlock`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__(
            dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop,
            attn_drop=attn_drop,
            drop_path=drop_path,
            **dd,
        )
        self.temporal_norm1 = LayerNorm(dim, **dd)
        self.temporal_attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **dd,
        )
        self.temporal_fc = nn.Linear(dim, dim, **dd)  # LR of Eq. 3
        self.reset_temporal_fc()

    def reset_temporal_fc(self) -> None:
        """Zero ``LR`` so the block equals the spatial block (TimeSformer init)."""
        nn.init.zeros_(self.temporal_fc.weight)
        nn.init.zeros_(self.temporal_fc.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:  # type: ignore[override]
        B, L, D = x.shape
        T = num_frames
        N = (L - 1) // T
        patches = x[:, 1:]  # (B, T*N, D), CLS excluded from temporal attention
        xt = patches.reshape(B, T, N, D).transpose(1, 2).reshape(B * N, T, D)  # (B*N, T, D)
        res = self.temporal_fc(self.temporal_attn(self.temporal_norm1(xt)))  # (B*N, T, D)
        res = res.reshape(B, N, T, D).transpose(1, 2).reshape(B, T * N, D)  # (B, T*N, D)
        x = torch.cat([x[:, :1], patches + self.drop_path1(res)], dim=1)
        return super().forward(x, num_frames)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

VISUAL_SIZES: dict[str, dict[str, Any]] = {
    # CPU tests and the demo.
    "tiny": {
        "embed_dim": 96,
        "depth": 3,
        "num_heads": 3,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "num_factorized": 1,
    },
    # Legacy timm vit_small_patch16_224 widths (8 blocks, the paper's "small").
    "small": {
        "embed_dim": 768,
        "depth": 8,
        "num_heads": 8,
        "mlp_ratio": 3.0,
        "qkv_bias": False,
        "num_factorized": 1,
    },
    # ViT-B/16.
    "base": {
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "num_factorized": 2,
    },
    # ViT-L/16.
    "large": {
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "num_factorized": 4,
    },
}


@dataclass
class VisualConfig:
    """Shape of the visual two-stream transformer."""

    embed_dim: int = 768  # D, token width
    depth: int = 12  # L, number of blocks
    num_heads: int = 12  # attention heads, spatial and temporal
    num_factorized: int = 2  # n, last blocks that are factorized (Eq. 3)
    mlp_ratio: float = 4.0  # MLP hidden width / D
    qkv_bias: bool = True  # bias in the qkv projections (False for legacy ViT-S)
    patch_size: int = 16  # P
    img_size: int = 224  # H = W of the input frames
    num_frames: int = 8  # T
    streams: tuple[str, ...] = ("rgb", "flow")  # which streams exist
    drop_rate: float = 0.0  # dropout after attention/MLP projections and on embeddings
    attn_drop_rate: float = 0.0  # dropout on attention weights
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks
    flow_bound: float = FLOW_BOUND  # flow (pixels, within +-flow_bound) is divided by this before the patch embedding

    def __post_init__(self) -> None:
        self.streams = tuple(self.streams)
        unknown = [s for s in self.streams if s not in STREAM_CHANNELS]
        if unknown or not self.streams or len(set(self.streams)) != len(self.streams):
            raise ValueError(f"streams should be a non-empty subset of ('rgb', 'flow'), got {self.streams}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim should be divisible by num_heads, got {self.embed_dim} and {self.num_heads}"
            )
        if not 0 <= self.num_factorized <= self.depth:
            raise ValueError(
                f"num_factorized should be in [0, depth={self.depth}], got {self.num_factorized}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size should be divisible by patch_size={self.patch_size}, got {self.img_size}"
            )
        if self.num_frames < 1:
            raise ValueError(f"num_frames should be >= 1, got {self.num_frames}")
        if self.flow_bound <= 0:
            raise ValueError(f"flow_bound should be > 0, got {self.flow_bound}")

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return g, g


def visual_config(size: str, **overrides: Any) -> VisualConfig:
    """The :class:`VisualConfig` of a named size, with field overrides."""
    if size not in VISUAL_SIZES:
        raise ValueError(f"size should be one of {tuple(VISUAL_SIZES)}, got {size!r}")
    return VisualConfig(**{**VISUAL_SIZES[size], **overrides})


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class VisualTransformer(nn.Module):
    """One stream: tokenization (Eq. 1), ``L - n`` spatial blocks, ``n`` factorized blocks.

    Parameter names follow timm's ``VisionTransformer`` (``patch_embed``, ``cls_token``,
    ``pos_embed``, ``blocks.i.*``, ``norm``) plus ``time_embed`` and the temporal parts.
    """

    def __init__(self, cfg: VisualConfig, in_chans: int = 3, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.in_chans = in_chans
        self.num_frames = cfg.num_frames
        self.embed_dim = D = cfg.embed_dim
        self.patch_embed = PatchEmbed(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=in_chans, embed_dim=D, **dd
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, D, **dd))  # spatial, per frame
        self.time_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, D, **dd))  # per frame index
        self.pos_drop = nn.Dropout(cfg.drop_rate)

        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        first_factorized = cfg.depth - cfg.num_factorized
        blocks = []
        for i in range(cfg.depth):
            block_cls = FactorizedBlock if i >= first_factorized else SpatialBlock
            blocks.append(
                block_cls(
                    D,
                    cfg.num_heads,
                    mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=cfg.qkv_bias,
                    proj_drop=cfg.drop_rate,
                    attn_drop=cfg.attn_drop_rate,
                    drop_path=dpr[i],
                    **dd,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.norm = LayerNorm(D, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT init; zero time embedding and zero ``LR`` (TimeSformer)."""
        named_apply(init_weights_vit_timm, self)
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.zeros_(self.time_embed)
        for block in self.blocks:
            if isinstance(block, FactorizedBlock):
                block.reset_temporal_fc()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Frames ``(B, T, C, H, W)`` -> normed tokens ``(B, 1 + T*N, D)``."""
        if x.ndim != 5:
            raise ValueError(f"expected a clip of shape (B, T, C, H, W), got shape {tuple(x.shape)}")
        B, T, C, H, W = x.shape
        if C != self.in_chans:
            raise ValueError(f"expected {self.in_chans} channels, got {C} (input shape {tuple(x.shape)})")
        if T != self.num_frames:
            raise ValueError(f"expected {self.num_frames} frames, got {T} (input shape {tuple(x.shape)})")
        if (H, W) != tuple(self.patch_embed.img_size):
            raise ValueError(f"expected frames of size {tuple(self.patch_embed.img_size)}, got {(H, W)}")
        x = self.patch_embed(x.reshape(B * T, C, H, W))  # (B*T, N, D)
        N, D = x.shape[1], x.shape[2]
        x = x + self.pos_embed[:, 1:]  # spatial position, shared by frames
        x = x.reshape(B, T, N, D) + self.time_embed[:, :, None]  # (B, T, N, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, 1, D)  # (B, 1, D)
        x = torch.cat([cls, x.reshape(B, T * N, D)], dim=1)  # (B, 1+T*N, D)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x, T)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, 1 + T*N, D)`` -> class embedding ``(B, D)``."""
        return x[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class TwoStreamTransformer(nn.Module):
    """RGB and flow streams, class embeddings fused by two FC + ReLU layers (Sec. 3.2)."""

    def __init__(self, cfg: VisualConfig, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.embed_dim = D = cfg.embed_dim
        self.streams = nn.ModuleDict(
            {name: VisualTransformer(cfg, in_chans=STREAM_CHANNELS[name], **dd) for name in cfg.streams}
        )
        self.fuse = nn.Sequential(
            nn.Linear(D * len(cfg.streams), D, **dd),
            nn.ReLU(),
            nn.Linear(D, D, **dd),
            nn.ReLU(),
        )

    def forward_features(
        self,
        rgb: torch.Tensor | None = None,
        flow: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-stream class embeddings ``{name: (B, D)}``; flow is divided by ``flow_bound``."""
        inputs = {"rgb": rgb, "flow": flow}
        out = {}
        for name, stream in self.streams.items():
            x = inputs[name]
            if x is None:
                raise ValueError(f"the {name!r} stream needs an input, got None")
            if name == "flow":
                x = x / self.cfg.flow_bound  # pixels -> about [-1, 1]
            out[name] = stream(x)
        return out

    def forward_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenated class embeddings -> fused visual embedding ``(B, D)``."""
        return self.fuse(torch.cat([feats[name] for name in self.streams], dim=-1))

    def forward(self, rgb: torch.Tensor | None = None, flow: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(rgb, flow))


# --------------------------------------------------------------------------------------------
# Initialization from ImageNet ViT checkpoints
# --------------------------------------------------------------------------------------------

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
_IGNORED_PREFIXES = ("head.", "head_drop.", "fc_norm.", "pre_logits.")  # classifier parts, dropped


def _npz_vit_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A timm-named state dict from an original (big_vision / jax) ViT ``.npz`` via timm."""
    import numpy as np
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    with np.load(path, allow_pickle=False) as w:
        files = set(w.files)
        prefix = "opt/target/" if "opt/target/embedding/kernel" in files else ""
        pos = w[f"{prefix}Transformer/posembed_input/pos_embedding"]
        kernel = w[f"{prefix}embedding/kernel"]  # (P, P, C, D)
        q = w[f"{prefix}Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]  # (D, h, hd)
        mlp = w[f"{prefix}Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]  # (D, hidden)
        depth = sum(
            1
            for f in files
            if f.startswith(f"{prefix}Transformer/encoderblock_") and f.endswith("LayerNorm_0/scale")
        )
        qkv_bias = f"{prefix}Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/bias" in files
    grid = round((pos.shape[1] - 1) ** 0.5)
    patch = kernel.shape[0]
    vit = VisionTransformer(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=kernel.shape[2],
        num_classes=0,
        embed_dim=kernel.shape[3],
        depth=depth,
        num_heads=q.shape[1],
        mlp_ratio=mlp.shape[1] / mlp.shape[0],
        qkv_bias=qkv_bias,
        weight_init="skip",
    )
    _load_weights(vit, path)
    return vit.state_dict()


def vit_state_dict(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A timm-named ViT state dict from a local ``.pth``/``.safetensors``/``.npz`` or a timm name."""
    return load_vit_weights(checkpoint)[0]


def load_vit_weights(checkpoint: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """A timm-named ViT state dict and the file it came from.

    ``checkpoint`` is a local ``.pth``/``.safetensors``/``.npz`` file, or a timm pretrained name
    such as ``vit_base_patch16_224.augreg_in21k`` loaded by ``timm.create_model(name,
    pretrained=True)``: from timm's Hugging Face hub cache (offline) or the hub (online). The
    file is None when timm loaded weights from somewhere that cannot be located afterwards.

    Raises:
        FileNotFoundError: a path that does not exist, or a timm name whose weights are neither
            cached nor downloadable (the message says how to pass a local file instead).
        ValueError: a string that is neither a file nor a timm model name.
    """
    path = os.fspath(checkpoint)
    if os.path.isfile(path):
        if path.lower().endswith(".npz"):
            return _npz_vit_state_dict(path), path
        return load_state_dict(path), path  # timm: .safetensors or torch pickle, unwraps 'state_dict'/'model'
    if path.lower().endswith(_CHECKPOINT_SUFFIXES) or os.path.isdir(path) or os.sep in path:
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    import timm

    if not timm.is_model(path):
        raise ValueError(
            f"init checkpoint {path!r} is not a file and not a timm model name (for example "
            f"'vit_base_patch16_224.augreg_in21k'); pass a timm name or a local .pth/.safetensors/.npz file"
        )
    try:
        vit = timm.create_model(path, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 - hub errors differ by version and transport; all mean "not here"
        raise FileNotFoundError(
            f"--init-checkpoint {path}: timm could not load these pretrained weights ({type(e).__name__}); "
            f"offline they must already be in the Hugging Face hub cache. Download them once on a machine "
            f"with network (python -c \"import timm; timm.create_model('{path}', pretrained=True)\") and copy "
            f"the hub cache (~/.cache/huggingface/hub), or pass a local file: --init-checkpoint "
            f"/path/to/{path}.safetensors (a timm ViT state dict: .safetensors, .pth or .npz)."
        ) from None
    return vit.state_dict(), _timm_cached_file(vit)


def _timm_cached_file(vit: nn.Module) -> str | None:
    """The local file timm read a model's pretrained weights from (overlay file or hub cache)."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return str(cfg["file"])
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def convert_vit_state_dict(
    vit: dict[str, torch.Tensor],
    stream: VisualTransformer,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an ImageNet ViT state dict onto one stream.

    Spatial weights are copied; temporal attention and its norm start from the spatial ones;
    ``temporal_fc`` and ``time_embed`` are zero; a patch embedding with other input channels is
    adapted with timm's ``adapt_input_conv``; the positional embedding is resampled when the
    patch grid differs; classifier weights are dropped.

    Returns:
        The complete state dict of ``stream`` and the checkpoint keys that were ignored.
    """
    target = stream.state_dict()
    cfg = stream.cfg
    D = cfg.embed_dim
    if "patch_embed.proj.weight" not in vit or "pos_embed" not in vit:
        raise ValueError(
            "expected a timm ViT state dict with 'patch_embed.proj.weight' and 'pos_embed', "
            f"got keys {sorted(vit)[:8]}..."
        )
    src_dim = vit["pos_embed"].shape[-1]
    if src_dim != D:
        raise ValueError(f"checkpoint width should be embed_dim={D}, got {src_dim}")
    src_depth = 1 + max((int(k.split(".")[1]) for k in vit if k.startswith("blocks.")), default=-1)
    if src_depth != cfg.depth:
        raise ValueError(f"checkpoint should have depth={cfg.depth} blocks, got {src_depth}")

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src_key: str, dst_key: str) -> None:
        if src_key not in vit:
            raise ValueError(f"checkpoint is missing {src_key!r} (needed for {dst_key!r})")
        v = vit[src_key]
        if v.shape != target[dst_key].shape:
            raise ValueError(
                f"checkpoint {src_key!r} should have shape {tuple(target[dst_key].shape)}, "
                f"got {tuple(v.shape)}"
            )
        out[dst_key] = v
        used.add(src_key)

    for key in target:
        if key == "patch_embed.proj.weight":
            w = vit[key]  # (D, C, P, P)
            used.add(key)
            if w.shape[1] != stream.in_chans:
                w = adapt_input_conv(stream.in_chans, w)
            if w.shape != target[key].shape:
                raise ValueError(
                    f"patch embedding should have shape {tuple(target[key].shape)}, got {tuple(w.shape)}"
                )
            out[key] = w
        elif key == "pos_embed":
            used.add(key)
            out[key] = resample_abs_pos_embed(vit[key], new_size=list(cfg.grid_size), num_prefix_tokens=1)
        elif key == "time_embed" or ".temporal_fc." in key:
            out[key] = torch.zeros_like(target[key], device="cpu")
        elif ".temporal_attn." in key:
            take(key.replace(".temporal_attn.", ".attn."), key)
        elif ".temporal_norm1." in key:
            take(key.replace(".temporal_norm1.", ".norm1."), key)
        else:
            take(key, key)
    ignored = sorted(k for k in vit if k not in used)
    unexpected = [k for k in ignored if not k.startswith(_IGNORED_PREFIXES)]
    if unexpected:
        raise ValueError(f"checkpoint has keys this stream cannot use: {unexpected[:8]}")
    return out, ignored


def load_vit_checkpoint(
    model: TwoStreamTransformer,
    checkpoint: str | os.PathLike | dict[str, torch.Tensor],
) -> list[str]:
    """Initialize every stream of ``model`` from one ImageNet ViT; returns the ignored keys."""
    vit = checkpoint if isinstance(checkpoint, dict) else vit_state_dict(checkpoint)
    ignored: list[str] = []
    for stream in model.streams.values():
        sd, ignored = convert_vit_state_dict(vit, stream)
        stream.load_state_dict(sd, strict=True)
    return ignored


def build_two_stream(
    cfg: VisualConfig,
    init_checkpoint: str | os.PathLike | None = None,
    *,
    device=None,
    dtype=None,
) -> TwoStreamTransformer:
    """Build a :class:`TwoStreamTransformer`, optionally initialized from an ImageNet ViT."""
    model = TwoStreamTransformer(cfg, device=device, dtype=dtype)
    if init_checkpoint is not None:
        load_vit_checkpoint(model, init_checkpoint)
    return model


# --------------------------------------------------------------------------------------------
# Named constructors
# --------------------------------------------------------------------------------------------


def _named(size: str, init_checkpoint, device, dtype, overrides) -> TwoStreamTransformer:
    return build_two_stream(visual_config(size, **overrides), init_checkpoint, device=device, dtype=dtype)


def tiny(init_checkpoint=None, *, device=None, dtype=None, **overrides: Any) -> TwoStreamTransformer:
    """96 wide, 3 blocks (1 factorized), 3 heads: for CPU tests and the demo."""
    return _named("tiny", init_checkpoint, device, dtype, overrides)


def small(init_checkpoint=None, *, device=None, dtype=None, **overrides: Any) -> TwoStreamTransformer:
    """Legacy timm ViT-S/16 widths: 768 wide, 8 blocks (1 factorized), 8 heads, MLP ratio 3."""
    return _named("small", init_checkpoint, device, dtype, overrides)


def base(init_checkpoint=None, *, device=None, dtype=None, **overrides: Any) -> TwoStreamTransformer:
    """ViT-B/16 widths: 768 wide, 12 blocks (2 factorized), 12 heads."""
    return _named("base", init_checkpoint, device, dtype, overrides)


def large(init_checkpoint=None, *, device=None, dtype=None, **overrides: Any) -> TwoStreamTransformer:
    """ViT-L/16 widths: 1024 wide, 24 blocks (4 factorized), 16 heads."""
    return _named("large", init_checkpoint, device, dtype, overrides)
