"""Irrelevant Modality Dropout (IMD, paper Sec. 3.4, Eqs. 4-8) and the fusion baselines.

Every fusion maps a visual embedding ``v`` (B, Dv) and an audio embedding ``a`` (B, Da) to a fused
embedding ``z`` (B, out_dim) and a relevance (B,) or None; the shared classifier
``logits = MLP(LN(z))`` (Eq. 9) lives in ``model.py``, so Table 5 compares fusions only.

IMD
---
* Eq. 4, relevance network. As printed, ``rev = sigma(MLP(LN(z)) + z)`` with ``z = [a; v]`` is a
  vector of the width of ``z``, not one relevance per clip. Our reading::

      rev = sigmoid(w^T (MLP(LN(z)) + z) + b)

  i.e. the printed expression is a pre-norm residual MLP block (the same shape as a
  transformer's MLP sub-block, which is what ``MLP(LN(z)) + z`` denotes everywhere else in the
  paper, Eqs. 2-3), and a linear projection to one logit comes before the sigmoid. This keeps
  every printed term, adds the fewest parameters (``Dz + 1``) that make the output a scalar,
  and keeps the residual path so the relevance sees the raw embeddings. Alternatives such as
  averaging the sigmoid vector would make ``rev`` a mean of per-channel gates with no single
  logit for the binary cross-entropy of Sec. 3.5.
* Precision: the projection to the logit runs in float32 with autocast disabled, and the
  training loss takes the logit (binary cross-entropy with logits). In bf16 the sigmoid rounds
  to exactly 1.0 from a logit of about 6.5 on, where a clamped BCE on ``rev`` has no gradient
  left; ``rev`` (the sigmoid) is what masks the audio and what is reported.
* Eq. 5, thresholding: ``delta = 0 if rev < alpha else rev`` (the printed ``z < alpha`` is read
  as ``rev < alpha``). Scheme ``M`` (masking) multiplies the audio half by ``delta``; scheme
  ``W`` (weighting, Table 4) by ``rev`` always.
* Eqs. 6-7: split ``z`` into audio and visual halves, scale the audio half, concatenate again.
* Eq. 8: ``z_av = MLP(LN(z))``.

The masking is deterministic and identical in training and evaluation (the paper thresholds at
test time too), so unlike timm's ``drop_path`` the pure function takes no ``training`` flag.
Gradients reach the relevance network through the product ``a * rev`` when the audio is kept;
a dropped clip passes no gradient to ``rev`` through the classification loss.

Baselines
---------
* ``late-concat`` (Wang et al., "What makes training multi-modal classification networks
  hard?"): ``z = W [v; a] + b``.
* ``gmu`` (Arevalo et al.): ``h_v = tanh(W_v v)``, ``h_a = tanh(W_a a)``,
  ``g = sigmoid(W_z [v; a])``, ``z = g * h_v + (1 - g) * h_a``.
* ``se-gate``: squeeze-excitation channel gate of the visual embedding from the audio,
  ``v' = v * sigmoid(W2 relu(W1 a))``; ``z = [v'; a]``.
* ``nl-gate``: non-local attention with visual queries and audio keys/values, added back to
  the visual features. Pooled embeddings are single tokens (attention over one key is a
  constant 1), so each is viewed as ``G`` tokens: queries are ``W_q v`` split in G tokens,
  keys/values ``W_k a``, ``W_v a`` split in G tokens; ``z = v + W_o attn(q, k, v)``.
* ``avc`` (Arandjelovic and Zisserman, Look, Listen and Learn): ``z = relu(W [v; a])``, 128 wide.
* ``none``: ``z = v``; ``audio-only``: ``z = a``.
"""

from __future__ import annotations

import inspect

import torch
from timm.layers import Mlp
from torch import nn

__all__ = [
    "FUSION_LAYERS",
    "SCHEMES",
    "AVCFusion",
    "AudioOnly",
    "GMUFusion",
    "IMDFusion",
    "IrrelevantModalityDropout",
    "LateConcatFusion",
    "NLGateFusion",
    "RelevanceNetwork",
    "SEGateFusion",
    "VisualOnly",
    "build_fusion",
    "irrelevant_modality_dropout",
]

SCHEMES = ("M", "W")


# --------------------------------------------------------------------------------------------
# IMD masking: pure function + thin module (like timm's drop_path / DropPath)
# --------------------------------------------------------------------------------------------


def irrelevant_modality_dropout(
    audio: torch.Tensor,
    rev: torch.Tensor,
    alpha: float,
    scheme: str = "M",
) -> torch.Tensor:
    """Scale the audio embedding by its relevance (Eqs. 5-7).

    Args:
        audio: Audio half of the concatenated embedding, ``(B, Da)``.
        rev: Relevance in [0, 1], ``(B,)``.
        alpha: Threshold; with scheme ``M`` a clip with ``rev < alpha`` has its audio zeroed.
        scheme: ``"M"`` multiplies by ``delta = 0 if rev < alpha else rev``; ``"W"`` by ``rev``.

    Returns:
        The scaled audio embedding, ``(B, Da)``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme should be one of {SCHEMES}, got {scheme!r}")
    if rev.ndim != 1 or rev.shape[0] != audio.shape[0]:
        raise ValueError(f"rev should have shape ({audio.shape[0]},), got {tuple(rev.shape)}")
    if scheme == "M":
        delta = torch.where(rev < alpha, torch.zeros_like(rev), rev)  # Eq. 5
    else:
        delta = rev
    return audio * delta[:, None].to(audio.dtype)  # (B, Da), Eq. 7; thresholded in rev's precision


class IrrelevantModalityDropout(nn.Module):
    """Thin module over :func:`irrelevant_modality_dropout`; holds ``alpha`` and ``scheme``."""

    def __init__(self, alpha: float = 0.25, scheme: str = "M") -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme should be one of {SCHEMES}, got {scheme!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha should be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.scheme = scheme

    def forward(self, audio: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
        return irrelevant_modality_dropout(audio, rev, self.alpha, self.scheme)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, scheme={self.scheme!r}"


class RelevanceNetwork(nn.Module):
    """Eq. 4 as read here: ``rev = sigmoid(w^T (MLP(LN(z)) + z) + b)``, ``(B, Dz) -> (B,)``."""

    def __init__(self, dim: int, hidden_dim: int | None = None, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, hidden_dim or dim, dim, drop=drop, **dd)
        self.proj = nn.Linear(dim, 1, **dd)

    def forward_logit(self, z: torch.Tensor) -> torch.Tensor:
        """The relevance logit ``(B,)`` in float32 (before the sigmoid), autocast or not."""
        h = self.mlp(self.norm(z)) + z
        with torch.autocast(device_type="cpu" if h.device.type == "meta" else h.device.type, enabled=False):
            w, b = self.proj.weight, self.proj.bias
            return torch.nn.functional.linear(h.float(), w.float(), b.float()).squeeze(-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward_logit(z))


# --------------------------------------------------------------------------------------------
# Fusions. Signature: forward(v (B, Dv) or None, a (B, Da) or None) -> (z (B, out_dim), rev or None)
# --------------------------------------------------------------------------------------------


class IMDFusion(nn.Module):
    """Relevance network, thresholded masking of the audio half, then ``z_av = MLP(LN(z))``."""

    def __init__(
        self,
        visual_dim: int,
        audio_dim: int,
        out_dim: int,
        *,
        hidden_dim: int | None = None,
        alpha: float = 0.25,
        scheme: str = "M",
        drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim = audio_dim + visual_dim
        self.audio_dim = audio_dim
        self.out_dim = out_dim
        self.relevance = RelevanceNetwork(dim, hidden_dim, drop=drop, **dd)
        self.imd = IrrelevantModalityDropout(alpha, scheme)
        self.norm = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, hidden_dim or out_dim, out_dim, drop=drop, **dd)

    def forward_with_logit(self, v: torch.Tensor, a: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_av (B, out_dim), rev (B,), relevance logit (B,))``; rev and the logit in float32."""
        z = torch.cat([a, v], dim=-1)  # (B, Da + Dv); audio first as in Eq. 6
        logit = self.relevance.forward_logit(z)  # (B,), Eq. 4
        rev = torch.sigmoid(logit)
        z = torch.cat([self.imd(a, rev), v], dim=-1)  # Eqs. 5-7
        return self.mlp(self.norm(z)), rev, logit  # (B, out_dim), Eq. 8

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, rev, _ = self.forward_with_logit(v, a)
        return z, rev


class LateConcatFusion(nn.Module):
    """``z = W [v; a] + b``."""

    def __init__(
        self, visual_dim: int, audio_dim: int, out_dim: int, *, device=None, dtype=None
    ):
        super().__init__()
        self.out_dim = out_dim
        self.proj = nn.Linear(visual_dim + audio_dim, out_dim, device=device, dtype=dtype)

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.proj(torch.cat([v, a], dim=-1)), None


class GMUFusion(nn.Module):
    """Gated multimodal unit: ``g * tanh(W_v v) + (1 - g) * tanh(W_a a)``, ``g = sigmoid(W_z [v; a])``."""

    def __init__(
        self, visual_dim: int, audio_dim: int, out_dim: int, *, device=None, dtype=None
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.out_dim = out_dim
        self.visual_proj = nn.Linear(visual_dim, out_dim, bias=False, **dd)
        self.audio_proj = nn.Linear(audio_dim, out_dim, bias=False, **dd)
        self.gate = nn.Linear(visual_dim + audio_dim, out_dim, bias=False, **dd)

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, None]:
        h_v = torch.tanh(self.visual_proj(v))
        h_a = torch.tanh(self.audio_proj(a))
        g = torch.sigmoid(self.gate(torch.cat([v, a], dim=-1)))
        return g * h_v + (1 - g) * h_a, None


class SEGateFusion(nn.Module):
    """Squeeze-excitation gate of ``v`` from ``a``: ``z = [v * sigmoid(W2 relu(W1 a)); a]``."""

    def __init__(
        self,
        visual_dim: int,
        audio_dim: int,
        out_dim: int,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.out_dim = visual_dim + audio_dim
        hidden = max(visual_dim // 4, 8)  # SE reduction ratio 4
        self.fc1 = nn.Linear(audio_dim, hidden, **dd)
        self.fc2 = nn.Linear(hidden, visual_dim, **dd)

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, None]:
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(a))))  # (B, Dv)
        return torch.cat([v * gate, a], dim=-1), None


class NLGateFusion(nn.Module):
    """Non-local gate: visual queries, audio keys/values, over G tokens per embedding; residual to v."""

    def __init__(
        self,
        visual_dim: int,
        audio_dim: int,
        out_dim: int,
        *,
        num_tokens: int = 8,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if visual_dim % num_tokens:
            raise ValueError(
                f"nl-gate needs visual_dim divisible by num_tokens={num_tokens}, got {visual_dim}"
            )
        self.out_dim = visual_dim
        self.num_tokens = num_tokens
        self.q = nn.Linear(visual_dim, visual_dim, **dd)
        self.k = nn.Linear(audio_dim, visual_dim, **dd)
        self.v = nn.Linear(audio_dim, visual_dim, **dd)
        self.out = nn.Linear(visual_dim, visual_dim, **dd)

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, None]:
        B, D = v.shape
        G = self.num_tokens
        q = self.q(v).reshape(B, G, D // G)  # (B, G, d)
        k = self.k(a).reshape(B, G, D // G)
        val = self.v(a).reshape(B, G, D // G)
        attn = torch.softmax(q @ k.transpose(1, 2) * (D // G) ** -0.5, dim=-1)  # (B, G, G)
        return v + self.out((attn @ val).reshape(B, D)), None


class AVCFusion(nn.Module):
    """Look, Listen and Learn AVC head: ``z = relu(W [v; a] + b)``, ``avc_dim`` (128) wide."""

    def __init__(
        self,
        visual_dim: int,
        audio_dim: int,
        out_dim: int,
        *,
        avc_dim: int = 128,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.out_dim = avc_dim
        self.proj = nn.Linear(visual_dim + audio_dim, avc_dim, device=device, dtype=dtype)

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.relu(self.proj(torch.cat([v, a], dim=-1))), None


class VisualOnly(nn.Module):
    """``z = v`` (fusion ``none``)."""

    def __init__(self, visual_dim: int, audio_dim: int, out_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()  # no parameters: device and dtype are accepted like every fusion's
        self.out_dim = visual_dim

    def forward(self, v: torch.Tensor, a: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return v, None


class AudioOnly(nn.Module):
    """``z = a`` (fusion ``audio-only``)."""

    def __init__(self, visual_dim: int, audio_dim: int, out_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()  # no parameters: device and dtype are accepted like every fusion's
        self.out_dim = audio_dim

    def forward(self, v: torch.Tensor | None, a: torch.Tensor) -> tuple[torch.Tensor, None]:
        return a, None


FUSION_LAYERS: dict[str, type[nn.Module]] = {
    "imd": IMDFusion,
    "late-concat": LateConcatFusion,
    "gmu": GMUFusion,
    "se-gate": SEGateFusion,
    "nl-gate": NLGateFusion,
    "avc": AVCFusion,
    "none": VisualOnly,
    "audio-only": AudioOnly,
}


def build_fusion(name: str, visual_dim: int, audio_dim: int, out_dim: int, *, device=None, dtype=None,
                 **options) -> nn.Module:
    """The fusion layer ``name`` with its own ``options`` (e.g. ``alpha`` for ``imd``).

    Raises:
        ValueError: an unknown fusion, or an option this fusion does not take (named, with the
            options it does take), so a misspelled option is never silently ignored.
    """
    if name not in FUSION_LAYERS:
        raise ValueError(f"fusion should be one of {tuple(FUSION_LAYERS)}, got {name!r}")
    cls = FUSION_LAYERS[name]
    params = inspect.signature(cls).parameters
    takes = [p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY
             and p not in ("device", "dtype")]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ValueError(f"fusion {name!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(takes) or 'none'}")
    return cls(visual_dim, audio_dim, out_dim, device=device, dtype=dtype, **options)
