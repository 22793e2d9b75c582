"""Device choice and autocast, written once for every stage and loop.

A leaf module (torch only), so the stages in :mod:`imdpipe.pipeline` and the loops in
:mod:`imdpipe.train` share it without importing each other.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch


class DeviceUnavailable(ValueError, RuntimeError):
    """The asked-for device does not exist here: a bad ``--device`` value (a ValueError, which every
    command reports as a one-line error; also a RuntimeError, as callers caught it before)."""


def select_device(name: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device a process computes on.

    Args:
        name: ``"auto"`` or None (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` (this
            process's GPU, so torchrun ranks do not all land on GPU 0) or ``"cuda:N"``. A CUDA
            device is made the current one (``torch.cuda.set_device``).
        local_rank: the GPU ``"cuda"`` means (default: torchrun's ``LOCAL_RANK``, else 0).

    Raises:
        DeviceUnavailable: CUDA asked for but torch sees no GPU.
    """
    if name is None or name in ("", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {str(name)!r} asked for but torch sees no CUDA GPU; use --device cpu")
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank)
    torch.cuda.set_device(device)  # kernels and allocations without an explicit index follow it
    return device


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s type; ``nullcontext()`` when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
