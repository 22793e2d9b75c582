"""JPEG as a Zarr 3 codec, written exactly as the imagecodecs-zarr package writes it.

A chunk is encoded as one baseline JPEG (libjpeg-turbo through ``imagecodecs.jpeg8_encode``) of
the chunk squeezed to 2-D (a grey plane) or to 3-D with 3 channels (an RGB image), and decoded
with ``imagecodecs.jpeg8_decode`` reshaped to the chunk shape. The array metadata is the codec
entry ``{"name": "imagecodecs_jpeg", "configuration": {"level": quality}}``: the name, keys and
bytes of ``imagecodecs.zarr.Jpeg``, which the ``imagecodecs-zarr`` package registers as Zarr 3
codec entry points. So a ``frames.zarr`` with JPEG arrays reads with plain ``zarr.open`` and
either

* ``pip install imagecodecs-zarr`` (it needs Python >= 3.12 and zarr >= 3.2), or
* ``pip install imdpipe``: this module is registered under the same codec name in imdpipe's
  package metadata (``[project.entry-points."zarr.codecs"]``), so zarr loads it when a store
  needs it, without the reader importing imdpipe. It defers to ``imagecodecs.zarr.Jpeg`` when
  the installed imagecodecs ships one, so both installed never register two implementations.

Only the configuration keys imdpipe writes are accepted here (``level``, ``subsampling``);
a store written by another tool with more of imagecodecs' JPEG options needs imagecodecs-zarr.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import JSON, parse_named_configuration

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

CODEC_NAME = "imagecodecs_jpeg"
_KEYS = ("level", "subsampling")


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """One JPEG per chunk: uint8 chunks that squeeze to (H, W) grey or (H, W, 3) RGB.

    Args:
        level: JPEG quality 1-100 (libjpeg's scale; None = imagecodecs' default 75).
        subsampling: chroma subsampling of RGB chunks, ``"444"``, ``"422"`` or ``"420"``
            (None = libjpeg-turbo's default 4:2:0).
    """

    is_fixed_size = False

    level: int | None = None
    subsampling: str | None = None

    def __init__(self, *, level: int | None = None, subsampling: str | None = None) -> None:
        if level is not None and not 1 <= int(level) <= 100:
            raise ValueError(f"JPEG quality (level) must be in 1..100, got {level}")
        if subsampling is not None and str(subsampling) not in ("444", "422", "420"):
            raise ValueError(f"JPEG subsampling must be '444', '422' or '420', got {subsampling!r}")
        object.__setattr__(self, "level", None if level is None else int(level))
        object.__setattr__(self, "subsampling", None if subsampling is None else str(subsampling))

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, cfg = parse_named_configuration(data, CODEC_NAME, require_configuration=False)
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(_KEYS))
        if unknown:
            raise ValueError(f"{CODEC_NAME} options {unknown} are not supported by imdpipe's reader: "
                             f"pip install imagecodecs-zarr (Python >= 3.12) to read this array")
        return cls(**cfg)

    def to_dict(self) -> dict[str, JSON]:
        cfg = {k: getattr(self, k) for k in _KEYS if getattr(self, k) is not None}
        return {"name": CODEC_NAME, "configuration": cfg} if cfg else {"name": CODEC_NAME}

    def validate(self, *, shape, dtype, chunk_grid) -> None:
        if np.dtype(dtype.to_native_dtype()) != np.uint8:
            raise ValueError(f"{CODEC_NAME} encodes uint8 chunks only, got {dtype}")

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        import imagecodecs

        decoded = imagecodecs.jpeg8_decode(chunk_bytes.as_numpy_array())
        return chunk_spec.prototype.nd_buffer.from_numpy_array(decoded.reshape(chunk_spec.shape))

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        import imagecodecs

        image = np.atleast_2d(np.squeeze(chunk_array.as_numpy_array()))
        if image.ndim == 3 and image.shape[-1] != 3 or image.ndim > 3:
            raise ValueError(f"{CODEC_NAME} needs chunks that squeeze to (H, W) or (H, W, 3), got "
                             f"{tuple(chunk_spec.shape)}: chunk a 2-component array one plane at a time")
        encoded = imagecodecs.jpeg8_encode(image, level=self.level, subsampling=self.subsampling)
        return chunk_spec.prototype.buffer.from_bytes(encoded)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError


try:  # imagecodecs >= 2026.8 ships the codec itself (what imagecodecs-zarr registers): use that one
    from imagecodecs.zarr import Jpeg  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - older imagecodecs, or one that cannot load with this zarr
    Jpeg = JpegCodec


def register() -> None:
    """Make ``imagecodecs_jpeg`` known to zarr in this process (the entry point does it for readers)."""
    from zarr.registry import register_codec

    register_codec(CODEC_NAME, Jpeg)


__all__ = ["CODEC_NAME", "Jpeg", "JpegCodec", "register"]
