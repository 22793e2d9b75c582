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
from collections.abc import Callable
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
        self._decode_chunk = chunk_decoder(inner, self.chunk_spec)
        self._decode_index = _index_decoder(shard, self.per_shard)
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
        raw = os.pread(fd, self.index_size, st.st_size - self.index_size)
        index = self._decode_index(raw).reshape(*self.per_shard, 2)
        self._index[key] = (stamp, index)
        return index

    def _decode(self, raw: bytes) -> np.ndarray:
        return self._decode_chunk(raw)[0, 0]


def _sharding(arr: zarr.Array):
    from zarr.codecs import ShardingCodec
    from zarr.storage import LocalStore

    codecs = getattr(arr.metadata, "codecs", ())
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) and isinstance(arr.store, LocalStore) \
            and codecs[0].index_location.value == "end":
        return codecs[0]
    return None


def chunk_decoder(inner: list, spec) -> Callable[[bytes], np.ndarray]:
    """A function from one chunk's encoded bytes to its array (``spec.shape``), through the chunk
    codecs ``inner`` last to first; every checksum codec in the chain is checked (a mismatch raises).

    The stores' own chain, ``bytes -> zstd -> crc32c`` (:func:`imdpipe.pipeline.store.chunk_codecs`),
    is decoded with the libraries zarr's codecs call (the same CRC-32C check, the same zstd frame)
    but without zarr's buffer wrappers, which cost more than the decoding on small chunks.
    """
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

    if [type(c) for c in inner] == [BytesCodec, ZstdCodec, Crc32cCodec] and spec.config.order == "C":
        import google_crc32c
        from numcodecs.zstd import decompress

        dtype = spec.dtype.to_native_dtype()
        if inner[0].endian is not None and dtype.itemsize > 1:
            dtype = dtype.newbyteorder("<" if inner[0].endian.value == "little" else ">")
        shape = tuple(spec.shape)

        def decode(raw: bytes) -> np.ndarray:
            body = raw[:-4]
            if google_crc32c.value(body) != int.from_bytes(raw[-4:], "little"):
                raise ValueError("the chunk's stored and computed CRC-32C checksums do not match")
            return np.frombuffer(decompress(body), dtype).reshape(shape)

        return decode

    def decode_generic(raw: bytes) -> np.ndarray:
        buf = spec.prototype.buffer.from_bytes(raw)
        for codec in reversed(inner[1:]):
            buf = codec._decode_sync(buf, spec)
        return inner[0]._decode_sync(buf, spec).as_numpy_array().reshape(spec.shape)

    return decode_generic


def _index_decoder(shard, per_shard: tuple[int, ...]) -> Callable[[bytes], np.ndarray]:
    """A function from a shard's index bytes to its ``(chunks, 2)`` offsets and lengths (checksum checked).

    The stores' index chain (little-endian bytes + CRC-32C, zarr's default) is decoded directly:
    zarr's own path is one event-loop round trip per shard, slow on a busy machine.
    """
    from zarr.codecs import BytesCodec, Crc32cCodec
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    codecs = list(shard.index_codecs)
    if [type(c) for c in codecs] == [BytesCodec, Crc32cCodec] and codecs[0].endian.value == "little":
        import google_crc32c

        def decode(raw: bytes) -> np.ndarray:
            if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise ValueError("the shard index's stored and computed CRC-32C checksums do not match")
            return np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)

        return decode

    def decode_generic(raw: bytes) -> np.ndarray:
        buf = default_buffer_prototype().buffer.from_bytes(raw)
        return sync(shard._decode_shard_index(buf, per_shard)).offsets_and_lengths.reshape(-1, 2)

    return decode_generic


def read_sharded(arr: zarr.Array) -> tuple[np.ndarray, dict[int, str]] | None:
    """The whole of ``arr``, one read per shard file and no event loop: ``(data, problems)``.

    For a local array sharded along its first axis only (each shard holds whole rows: a stage
    store's ``videos_per_shard`` videos), this is ``arr[...]`` at a fraction of the cost (zarr
    spends 0.15-0.3 ms of CPU per chunk, mostly in thread hand-offs, i.e. seconds per array when
    every video is a chunk; 6-7x less CPU in all on a UCF-101-sized store). Each shard's index and
    each chunk is decoded with the array's codecs, their CRC-32C checked (:func:`chunk_decoder`).
    ``problems`` maps a row (video) to what is wrong with its chunks: absent (zarr would read the
    fill value without a word), past the end of a truncated file, failing its checksum; such rows
    hold the fill value. Returns None when ``arr`` is not laid out so (read it with zarr).
    """
    from zarr.abc.codec import ArrayBytesCodec, BytesBytesCodec
    from zarr.core.buffer import default_buffer_prototype

    shard = _sharding(arr)
    if shard is None or tuple(arr.metadata.chunk_grid.chunk_shape)[1:] != tuple(arr.shape[1:]):
        return None
    inner = list(shard.codecs)
    if not isinstance(inner[0], ArrayBytesCodec) or not all(isinstance(c, BytesBytesCodec) for c in inner[1:]) \
            or not all(hasattr(c, "_decode_sync") for c in inner):
        return None
    n, k = arr.shape[0], arr.metadata.chunk_grid.chunk_shape[0]
    chunk = tuple(shard.chunk_shape)
    per_shard = tuple(s // c for s, c in zip((k, *arr.shape[1:]), chunk))
    spec = shard._get_chunk_spec(arr.metadata.get_chunk_spec((0,) * arr.ndim, arr._async_array.config,
                                                             default_buffer_prototype()))
    decode, decode_index = chunk_decoder(inner, spec), _index_decoder(shard, per_shard)
    index_size = shard._shard_index_size(per_shard)
    # each inner chunk of a shard, in the index's order: (first row in the shard, its place in a row block)
    places = [(c[0] * chunk[0], tuple(slice(i * w, (i + 1) * w) for i, w in zip(c[1:], chunk[1:])))
              for c in np.ndindex(*per_shard)]
    root = Path(arr.store.root) / arr.path
    out = np.empty(arr.shape, dtype=arr.dtype)
    problems: dict[int, str] = {}

    def fail(rows: range, why: str) -> None:  # the whole rows hold the fill value
        out[rows.start:rows.stop] = arr.fill_value
        for row in rows:
            problems.setdefault(row, why)

    for start in range(0, n, k):
        path = root / arr.metadata.encode_chunk_key((start // k,) + (0,) * (arr.ndim - 1))
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            fail(range(start, min(start + k, n)), f"{path} is missing")
            continue
        body = len(data) - index_size
        try:
            if body < 0:
                raise ValueError(f"{len(data)} bytes, less than its {index_size}-byte chunk index")
            index = decode_index(data[body:]).tolist()
        except Exception as e:  # noqa: BLE001 - a truncated or overwritten index: every row of the shard
            fail(range(start, min(start + k, n)), f"the chunk index of {path} cannot be read ({e})")
            continue
        for (first, place), (offset, length) in zip(places, index):
            rows = range(start + first, min(start + first + chunk[0], n))
            if not rows:  # the last shard overhangs the array
                continue
            if offset == MISSING:
                fail(rows, f"a chunk is absent from {path}")
            elif offset + length > body:
                fail(rows, f"a chunk ends past the end of {path} ({len(data)} bytes: truncated)")
            else:
                try:
                    out[(slice(rows.start, rows.stop), *place)] = decode(data[offset:offset + length])[:len(rows)]
                except Exception as e:  # noqa: BLE001 - a checksum mismatch, a zstd error, ...
                    fail(rows, f"a chunk in {path} fails to decode ({type(e).__name__}: {e})")
    return out, problems


def raw_video_chunks(arr: zarr.Array, videos) -> dict[tuple[int, ...], bytes] | None:
    """The encoded bytes of every chunk of ``videos`` (all in one shard), keyed by their coordinates
    inside the shard; None when ``arr`` is not a local store sharded by videos. Raises when the
    shard's index fails its checksum."""
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
    index = _index_decoder(shard, per_shard)(data[-size:]).reshape(*per_shard, 2)
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
