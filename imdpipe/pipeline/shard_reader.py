"""Read a few chunks of one video from a sharded Zarr array with one file open, no event loop.

A training clip needs 8 positions of one video: 8 RGB chunks and 8 or 16 flow chunks. Through
zarr's generic read path each chunk costs ~1 ms of CPU in thread hand-offs around a JPEG decode
of ~0.3 ms (measured with benchmarks/bench_storage.py), so the loader would spend more time in
zarr than in decoding. :class:`ShardReader` does what zarr does, for local stores only: it
decodes a shard's index once per process (zarr's own index codecs: the index checksum is
checked), reads each wanted chunk's byte range, and decodes it with the array's own chunk
codecs, last to first (so a checksum codec in the chain is checked too). Chunks never written
read as the fill value, as with zarr. Anything it does not handle (another store, array-to-array
codecs, a codec without a synchronous decode) falls back to plain zarr indexing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

MISSING = 2**64 - 1


class ShardReader:
    """Positions of one video from a ``(video, time, ...)`` array sharded by whole videos."""

    def __init__(self, arr: zarr.Array):
        self.arr = arr
        self._index: dict[str, tuple[tuple, np.ndarray]] = {}
        self.fast = self._setup()

    def _setup(self) -> bool:
        from zarr.abc.codec import ArrayBytesCodec, BytesBytesCodec
        from zarr.codecs import ShardingCodec
        from zarr.core.buffer import default_buffer_prototype
        from zarr.storage import LocalStore

        meta = self.arr.metadata
        codecs = getattr(meta, "codecs", ())
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or not isinstance(self.arr.store, LocalStore):
            return False
        shard = codecs[0]
        if shard.index_location.value != "end":
            return False
        inner = list(shard.codecs)
        if not isinstance(inner[0], ArrayBytesCodec) or not all(isinstance(c, BytesBytesCodec) for c in inner[1:]):
            return False
        if not all(hasattr(c, "_decode_sync") for c in inner):
            return False
        self.shard, self.inner = shard, inner
        self.shard_shape = tuple(meta.chunk_grid.chunk_shape)
        self.chunk_shape = tuple(shard.chunk_shape)
        # one position, whole frames, one or more whole channel planes per chunk (frames.zarr's layout)
        if (len(self.chunk_shape) != 5 or self.chunk_shape[:2] != (1, 1)
                or self.chunk_shape[2:4] != tuple(self.arr.shape[2:4]) or self.shard_shape[1:] != self.arr.shape[1:]):
            return False
        self.per_shard = tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape))
        spec = meta.get_chunk_spec((0,) * len(self.shard_shape), self.arr._async_array.config,
                                   default_buffer_prototype())
        self.chunk_spec = shard._get_chunk_spec(spec)
        self.index_size = shard._shard_index_size(self.per_shard)
        self.root = Path(self.arr.store.root) / self.arr.path
        return True

    def read(self, video: int, positions: np.ndarray, ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        """``arr[video, positions, ys, xs]`` of a ``(video, time, y, x, channel)`` array (positions distinct)."""
        positions = np.asarray(positions)
        if not self.fast:
            steps = np.diff(positions)
            if len(positions) == 1 or (steps == steps[0]).all():  # a strided slice: zarr's quick path
                step = int(steps[0]) if len(positions) > 1 else 1
                return self.arr[video, int(positions[0]):int(positions[-1]) + 1:step, ys, xs]
            return self.arr.get_orthogonal_selection((video, positions, ys, xs))
        k = self.shard_shape[0]
        channels = self.chunk_shape[4]
        crop = np.empty(self.arr.shape[2:4], dtype=bool)[ys, xs].shape
        out = np.empty((len(positions), *crop, self.arr.shape[4]), dtype=self.arr.dtype)
        path = self.root / self.arr.metadata.encode_chunk_key((video // k, 0, 0, 0, 0))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # no video of this shard was written
            out[...] = self.arr.fill_value
            return out
        try:
            index = self._shard_index(path, fd)
            for j, t in enumerate(positions.tolist()):
                for c in range(self.per_shard[4]):
                    offset, length = (int(v) for v in index[video % k, t, 0, 0, c])
                    dest = out[j, :, :, c * channels:(c + 1) * channels]
                    if offset == MISSING:
                        dest[...] = self.arr.fill_value
                    else:
                        dest[...] = self._decode(os.pread(fd, length, offset))[ys, xs]
        finally:
            os.close(fd)
        return out

    def _shard_index(self, path: Path, fd: int) -> np.ndarray:
        st = os.fstat(fd)
        key = str(path)
        stamp = (st.st_size, st.st_mtime_ns)
        hit = self._index.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        raw = os.pread(fd, self.index_size, st.st_size - self.index_size)
        buf = default_buffer_prototype().buffer.from_bytes(raw)
        index = sync(self.shard._decode_shard_index(buf, self.per_shard)).offsets_and_lengths
        self._index[key] = (stamp, index)
        return index

    def _decode(self, raw: bytes) -> np.ndarray:
        spec = self.chunk_spec
        buf = spec.prototype.buffer.from_bytes(raw)
        for codec in reversed(self.inner[1:]):
            buf = codec._decode_sync(buf, spec)
        chunk = self.inner[0]._decode_sync(buf, spec).as_numpy_array()
        return chunk.reshape(self.chunk_shape)[0, 0]


def _sharding(arr: zarr.Array):
    from zarr.codecs import ShardingCodec
    from zarr.storage import LocalStore

    codecs = getattr(arr.metadata, "codecs", ())
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) and isinstance(arr.store, LocalStore) \
            and codecs[0].index_location.value == "end":
        return codecs[0]
    return None


def raw_video_chunks(arr: zarr.Array, videos) -> dict[tuple[int, ...], bytes] | None:
    """The encoded bytes of every chunk of ``videos`` (all in one shard), keyed by their coordinates
    inside the shard; None when ``arr`` is not a local store sharded by videos. Raises when the
    shard's index fails its checksum."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    shard = _sharding(arr)
    if shard is None:
        return None
    shard_shape = tuple(arr.metadata.chunk_grid.chunk_shape)
    per_shard = tuple(s // c for s, c in zip(shard_shape, shard.chunk_shape))
    k = shard_shape[0]
    videos = list(videos)
    if not videos:
        return {}
    path = Path(arr.store.root) / arr.path / arr.metadata.encode_chunk_key((videos[0] // k,) + (0,) * (arr.ndim - 1))
    out = {}
    with open(path, "rb") as f:
        data = f.read()
    size = shard._shard_index_size(per_shard)
    index = sync(shard._decode_shard_index(default_buffer_prototype().buffer.from_bytes(data[-size:]),
                                           per_shard)).offsets_and_lengths
    for v in videos:
        for coords in np.ndindex(*per_shard[1:]):
            key = (v % k, *coords)
            offset, length = (int(x) for x in index[key])
            if offset != MISSING:
                out[key] = data[offset:offset + length]
    return out


def write_raw_shard(arr: zarr.Array, start: int, chunks: dict[tuple[int, ...], bytes]) -> None:
    """Write the shard of video ``start`` holding exactly ``chunks`` (encoded bytes, as from
    :func:`raw_video_chunks`): nothing is decoded or re-encoded, so a lossy codec loses nothing."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    shard = _sharding(arr)
    shard_shape = tuple(arr.metadata.chunk_grid.chunk_shape)
    per_shard = tuple(s // c for s, c in zip(shard_shape, shard.chunk_shape))
    proto = default_buffer_prototype()
    mapping = {key: proto.buffer.from_bytes(b) for key, b in chunks.items()}
    buf = sync(shard._encode_shard_dict(mapping, chunks_per_shard=per_shard, buffer_prototype=proto))
    path = Path(arr.store.root) / arr.path / arr.metadata.encode_chunk_key((start // shard_shape[0],)
                                                                            + (0,) * (arr.ndim - 1))
    if buf is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.to_bytes())
    os.replace(tmp, path)
