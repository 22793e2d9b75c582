"""Parameter and FLOP counts of the model, beside the paper's supplementary Table 4.

The model is built on the ``meta`` device (no memory, no compute) and one view (batch 1:
an RGB clip, a flow clip and an audio embedding) is traced under
``torch.utils.flop_counter.FlopCounterMode``. Fused attention (``scaled_dot_product_attention``)
has no FLOP formula on every backend, so timm's ``Attention`` modules are switched to their
explicit ``q @ k^T`` / ``attn @ v`` path while counting. FLOPs count a multiply-add as 2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model import SIZES, ModelConfig, build_model

__all__ = ["PAPER_TABLE4", "count_flops", "model_info"]

PAPER_VIEWS = 12  # 3 spatial crops x 4 temporal clips (paper Sec. 4.1)

# Supplementary Table 4 (Kinetics400, 8 frames, 224x224; params per stream, GFLOPs of the whole
# multi-view test).
PAPER_TABLE4: dict[str, dict[str, float]] = {
    "small": {"params_per_stream": 47.9e6, "gflops_multi_view": 2871.0, "top1": 78.8, "top5": 92.8},
    "base": {"params_per_stream": 88.6e6, "gflops_multi_view": 4464.0, "top1": 81.1, "top5": 94.3},
    "large": {"params_per_stream": 173.7e6, "gflops_multi_view": 8232.0, "top1": 82.6, "top5": 95.2},
}


def count_flops(model: torch.nn.Module, *inputs: Any) -> int:
    """FLOPs of one forward, with attention forced onto its explicit (countable) path."""
    attns = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in attns]
    try:
        for m in attns:
            m.fused_attn = False
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        for m, s in zip(attns, saved):
            m.fused_attn = s
    return int(counter.get_total_flops())


def model_info(*, size: str, frames: int, img_size: int = 224, num_classes: int = 400) -> dict[str, Any]:
    """Parameters per stream and in total, and GFLOPs per view, of the full IMD model.

    Args:
        size: One of ``SIZES``.
        frames: Frames per clip (T).
        img_size: Frame height and width.
        num_classes: Classes of the classifier (Kinetics400 by default; affects the total only).

    Returns:
        ``{"size", "frames", "img_size", "params_per_stream": {"rgb", "flow"}, "params_total",
        "gflops_per_view", "flops_per_view", "paper"}``; ``paper`` holds Table 4's figures (empty
        for ``tiny``),
        with ``gflops_per_view`` = the multi-view figure / 12 views.
    """
    if size not in SIZES:
        raise ValueError(f"size should be one of {SIZES}, got {size!r}")
    cfg = ModelConfig(num_classes=num_classes, size=size, fusion="imd", num_frames=frames, img_size=img_size)
    model = build_model(cfg, device="meta").eval()
    assert model.visual is not None
    per_stream = {name: sum(p.numel() for p in s.parameters()) for name, s in model.visual.streams.items()}
    total = sum(p.numel() for p in model.parameters())
    rgb = torch.empty(1, frames, 3, img_size, img_size, device="meta")
    flow = torch.empty(1, frames, 2, img_size, img_size, device="meta")
    audio = torch.empty(1, cfg.audio_dim, device="meta")
    flops = count_flops(model, rgb, flow, audio)
    paper: dict[str, float] = {}
    if size in PAPER_TABLE4:
        paper = dict(PAPER_TABLE4[size])
        paper["views"] = PAPER_VIEWS
        paper["gflops_per_view"] = round(paper["gflops_multi_view"] / PAPER_VIEWS, 1)
    return {
        "size": size,
        "frames": frames,
        "img_size": img_size,
        "params_per_stream": per_stream,
        "params_total": total,
        "gflops_per_view": round(flops / 1e9, 2),
        "flops_per_view": flops,
        "paper": paper,
    }
