"""Audio bottleneck (AB) of IMD (paper Sec. 3.3).

The audio transformer (AST, AudioSet-pretrained) is frozen; its pooled embedding (mean of the
CLS and distillation tokens after the final LayerNorm, 768 wide) is cached by the pipeline. The
only trained audio part is this bottleneck: one LayerNorm and two linear layers, each followed
by ReLU, bridging AudioSet-oriented features to the video classes.

A clip without an audio track arrives as an all-zero embedding; the LayerNorm maps it to its
bias, so the bottleneck output is a learned constant for "no audio".
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AudioBottleneck"]


class AudioBottleneck(nn.Module):
    """``LN -> Linear -> ReLU -> Linear -> ReLU`` on a cached AST embedding ``(B, in_dim)``."""

    def __init__(
        self,
        in_dim: int = 768,
        hidden_dim: int = 768,
        out_dim: int = 768,
        drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.norm = nn.LayerNorm(in_dim, **dd)
        self.fc1 = nn.Linear(in_dim, hidden_dim, **dd)
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, out_dim, **dd)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected an audio embedding of shape (B, {self.in_dim}), got {tuple(x.shape)}")
        x = self.act1(self.fc1(self.norm(x)))  # (B, hidden)
        return self.act2(self.fc2(self.drop(x)))  # (B, out_dim)
