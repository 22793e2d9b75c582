"""Optical-flow helpers shared by the flow stage, the trainer and the plots.

Flow is stored as uint8 (see ``frames.zarr`` in cache_layout.md): clip to ``[-bound, bound]`` pixels
with bound 20, then map linearly to [0, 255] with rounding,

    q = round(255 * (clip(v, -bound, bound) + bound) / (2 * bound)),

so zero motion is 127.5 (stored as 128) and one quantization step is 40/255 ~ 0.157 px.
Channel 0 is x (right positive), channel 1 is y (down positive), in pixels of the stored frame.

Every function takes numpy arrays or torch tensors and returns the same kind. Layouts:

* numpy: channels last, ``(..., H, W, 2)`` (as stored in ``frames.zarr``);
* torch: channels first, ``(..., 2, H, W)`` (as models consume it).

Pass ``channel_axis`` / ``axis_w`` to :func:`hflip_flow` for other layouts.
"""

from __future__ import annotations

import numpy as np

from imdpipe.contract import FLOW_BOUND

__all__ = ["DEQUANT_FORMULA", "FLOW_BOUND", "QUANT_FORMULA", "dequantize", "flow_to_color", "hflip_flow", "quantize"]
QUANT_FORMULA = "q = round(255 * (clip(v, -bound, bound) + bound) / (2 * bound))"
DEQUANT_FORMULA = "v = q * (2 * bound) / 255 - bound"


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def quantize(flow_px, bound: float = FLOW_BOUND):
    """Float flow in pixels -> uint8 codes (clipped at +-``bound``, rounded to nearest)."""
    scale = 255.0 / (2.0 * bound)
    if _is_torch(flow_px):
        import torch

        v = flow_px.float().clamp(-bound, bound)
        return torch.round((v + bound) * scale).clamp(0, 255).to(torch.uint8)
    # in place on one float32 copy, in the torch branch's order (4x faster than fresh temporaries);
    # after the clip the codes are already in [0, 255]
    v = np.array(flow_px, dtype=np.float32)
    np.clip(v, -bound, bound, out=v)
    v += np.float32(bound)
    v *= np.float32(scale)
    return np.rint(v, out=v).astype(np.uint8)


def dequantize(q, bound: float = FLOW_BOUND):
    """uint8 codes -> float32 flow in pixels (the centre of each quantization bin)."""
    scale = (2.0 * bound) / 255.0
    if _is_torch(q):
        import torch

        return q.to(torch.float32) * scale - bound
    return np.asarray(q).astype(np.float32) * np.float32(scale) - np.float32(bound)


def hflip_flow(flow, *, channel_axis: int | None = None, axis_w: int | None = None):
    """Mirror a flow field left-right and negate its x component.

    Works on float flow (x -> -x) and on quantized uint8 flow (q -> 255 - q, the exact mirror of
    the quantization grid).

    Args:
        flow: numpy ``(..., H, W, 2)`` or torch ``(..., 2, H, W)`` by default.
        channel_axis: axis holding (x, y); default -1 for numpy, -3 for torch.
        axis_w: the width axis; default the axis just before the channel axis when channels are
            last, else the last axis.
    """
    torch_in = _is_torch(flow)
    ndim = flow.ndim
    if channel_axis is None:
        if axis_w is not None:
            channel_axis = -3 if (axis_w % ndim) == ndim - 1 else -1
        else:
            channel_axis = -3 if torch_in else -1
    c = channel_axis % ndim
    w = (axis_w % ndim) if axis_w is not None else (c - 1 if c == ndim - 1 else ndim - 1)
    if flow.shape[c] != 2:
        raise ValueError(f"flow must have 2 components on axis {channel_axis}, got shape {tuple(flow.shape)}")
    if c == w:
        raise ValueError(f"channel axis and width axis are both {c}")
    if torch_in:
        import torch

        out = torch.flip(flow, dims=(w,)).clone()
        x = out.select(c, 0)
        x.copy_(255 - x if out.dtype == torch.uint8 else -x)
        return out
    out = np.flip(np.asarray(flow), axis=w).copy()
    x = np.take(out, 0, axis=c)
    idx = [slice(None)] * ndim
    idx[c] = 0
    out[tuple(idx)] = (255 - x) if out.dtype == np.uint8 else -x
    return out


def flow_to_color(flow, *, bound: float = FLOW_BOUND):
    """A colour-wheel picture of a flow field (hue = direction, saturation = speed), uint8 RGB.

    Uses :func:`torchvision.utils.flow_to_image` (Middlebury colour wheel, normalised by the
    largest speed in each image). uint8 input is dequantized first.

    Args:
        flow: numpy ``(H, W, 2)`` / ``(N, H, W, 2)`` -> numpy ``(..., H, W, 3)``; torch
            ``(2, H, W)`` / ``(N, 2, H, W)`` -> torch ``(..., 3, H, W)``.
        bound: quantization bound used to dequantize uint8 input.
    """
    import torch
    from torchvision.utils import flow_to_image

    torch_in = _is_torch(flow)
    if torch_in:
        t = flow
        if t.dtype == torch.uint8:
            t = dequantize(t, bound)
        return flow_to_image(t.float())
    arr = np.asarray(flow)
    if arr.dtype == np.uint8:
        arr = dequantize(arr, bound)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 2:
        raise ValueError(f"numpy flow must be (H, W, 2) or (N, H, W, 2), got {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr.astype(np.float32), -1, -3)))
    return np.ascontiguousarray(np.moveaxis(flow_to_image(t).numpy(), -3, -1))
