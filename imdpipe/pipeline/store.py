"""The store helper every stage writes through: Zarr v3 stores that survive crashes.

A per-video stage store (``frames.zarr``, ``audio.zarr``, ``relevance.zarr``) holds

* per-video arrays whose first axis is the manifest ``index``; each video is one chunk, and
  ``videos_per_shard`` consecutive videos share one shard file (Zarr's sharding codec);
* ``done`` bool (N,) and ``error`` str (N,), chunked like the shards, so the writer that owns a
  shard also owns its flags;
* root attrs ``imdpipe_version``, ``stage``, ``created``, ``settings`` and ``manifest_sha256``.

Rules, learned the hard way:

* Two writers touching chunks of the same shard lose data, so the unit of work handed to a
  writer is a whole shard (:func:`partition_shards`), and a process writes a shard in one
  ``__setitem__`` once every pending video in it has been computed (:func:`run_stage`). A pool
  worker that owns a whole shard may write its data itself (:meth:`StageStore.write_rows`, then
  :data:`WRITTEN`); the flags are still written by the process running :func:`run_stage`.
* Data first, then ``error``, then ``done``: a kill between the two leaves ``done`` False and
  the video is recomputed on the next run.
* Opening an existing store with different settings is refused with the differing keys named;
  ``overwrite=True`` rebuilds it from nothing.
* Handles are not fork-safe: readers open stores inside each DataLoader worker.
* Every chunk ends with a CRC-32C of its encoded bytes (:func:`chunk_codecs`), so a chunk that
  changed on disk fails to decode instead of reading as wrong values; a chunk missing on disk
  reads as the fill value without any error, so :mod:`imdpipe.pipeline.integrity` checks that the
  chunks of done videos exist (``imdpipe verify``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from imdpipe import __version__
from imdpipe.pipeline import zarr_jpeg

# visual.zarr built from a pretrained trunk keeps the trunk's weights beside its arrays
# (visual_cache.STREAMS_FILE); zarr lists that file as an unknown member every time the group is read.
warnings.filterwarnings("ignore", message=r"Object at streams\.pt is not recognized as a component")

# stores may hold JPEG chunks: known to zarr here even without the installed entry point
zarr_jpeg.register()

DONE = "done"
ERROR = "error"
#: zstd level 1: the same ratio as zarr's default level on frames and flow, about 2x faster to write.
DEFAULT_CODEC = ZstdCodec(level=1)
#: The checksum every chunk carries (recorded in the settings of every stage store).
CHECKSUM = "crc32c"


def chunk_codecs(compressors: Any = None) -> tuple:
    """An array's bytes-to-bytes codecs with a CRC-32C of the encoded chunk last.

    ``compressors`` is one codec, a sequence of them, or None for :data:`DEFAULT_CODEC`. The
    checksum comes last so it covers the bytes on disk: a flipped or truncated chunk fails to
    decode (zarr raises) instead of decompressing to wrong values.
    """
    if compressors is None:
        chain = [DEFAULT_CODEC]
    elif isinstance(compressors, (list, tuple)):
        chain = list(compressors)
    else:
        chain = [compressors]
    return (*(c for c in chain if not isinstance(c, Crc32cCodec)), Crc32cCodec())


class SettingsMismatch(ValueError):
    """An existing store was built with other settings (or for another manifest)."""


class StoreDamaged(ValueError):
    """Chunks of a store are missing or fail their checksum; the message names the store, the
    array, the videos and the command that repairs it."""

    def __init__(self, message: str):
        # A DataLoader worker's exception is re-raised in the main process as
        # ``type(e)("Caught ... Original Traceback ... StoreDamaged: <message>")``: keep the message.
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and "Original Traceback" in message and marker in message:
            message = message.split("Original Traceback", 1)[1].split(marker, 1)[1].strip()
        super().__init__(message)


class DiskFull(OSError):
    """A write ran out of disk space; the message names the path, the space needed and what was kept."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def tree_bytes(path: str | Path) -> int:
    """Bytes of the files under a directory (a store's size on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@dataclass(frozen=True)
class ArraySpec:
    """A per-video array of a stage store.

    Args:
        name: array name inside the store.
        shape: the shape of one video's entry (the leading ``video`` axis is added).
        dtype: numpy dtype string.
        dims: names of the per-video axes (``video`` is prepended) for ``_ARRAY_DIMENSIONS``.
        fill_value: value of entries never written (failed or pending videos).
        attrs: extra array attributes (units, quantization formula...).
        chunks: the chunk shape inside one video's entry (the ``video`` axis is 1 per chunk);
            None = the whole entry is one chunk. Chunks must tile the entry.
        serializer: zarr array-to-bytes codec of a chunk (an image codec such as JPEG); None =
            zarr's plain ``bytes``.
        compressors: zarr bytes-to-bytes codec(s) after the serializer; None =
            :data:`DEFAULT_CODEC` with the plain serializer, none after an image codec. A CRC-32C
            is appended either way (:func:`chunk_codecs`).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]
    fill_value: Any = 0
    attrs: dict = field(default_factory=dict)
    chunks: tuple[int, ...] | None = None
    serializer: Any = None
    compressors: Any = None

    def __post_init__(self):
        if len(self.shape) != len(self.dims):
            raise ValueError(f"array {self.name!r}: {len(self.shape)} axes in shape {self.shape} "
                             f"but {len(self.dims)} dims {self.dims}")
        if self.chunks is not None and (len(self.chunks) != len(self.shape)
                                        or any(c < 1 or s % c for c, s in zip(self.chunks, self.shape))):
            raise ValueError(f"array {self.name!r}: chunks {self.chunks} do not tile the entry shape {self.shape}")

    def codecs(self) -> dict:
        """The chunk codec chain as zarr's ``create_array`` keywords (serializer, then compressors)."""
        if self.serializer is None:
            return {"serializer": "auto", "compressors": chunk_codecs(self.compressors)}
        return {"serializer": self.serializer,
                "compressors": chunk_codecs(() if self.compressors is None else self.compressors)}


@dataclass(frozen=True)
class Partition:
    """Which of ``count`` cooperating writers this process is (``--shard index/count``)."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str | None) -> Partition:
        """Parse ``"i/n"``; ``None`` falls back to :meth:`from_env`."""
        if text is None or text == "":
            return cls.from_env()
        try:
            i, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard takes the form i/n (for example 0/4), got {text!r}") from None
        return cls(i, n)

    @classmethod
    def from_env(cls) -> Partition:
        """torchrun's RANK/WORLD_SIZE, else a Slurm array task, else everything (0/1)."""
        from imdpipe.launch import shard_from_env

        return cls(*shard_from_env())

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def normalize_settings(settings: dict) -> dict:
    """Settings as they read back from JSON attrs (tuples become lists, keys strings)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def diff_settings(stored: dict, wanted: dict) -> list[str]:
    """Human-readable differences between two settings dicts, one line per key."""
    stored, wanted = normalize_settings(stored), normalize_settings(wanted)
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key, "<absent>"), wanted.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: store has {a!r}, this run asks for {b!r}")
    return lines


def root_attrs(stage: str, settings: dict, manifest_sha256: str | None, **extra) -> dict:
    """The provenance every store carries in its root attrs."""
    attrs = {
        "imdpipe_version": __version__,
        "stage": stage,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": normalize_settings(settings),
        "manifest_sha256": manifest_sha256,
    }
    attrs.update(normalize_settings(extra))
    return attrs


def check_provenance(path: Path, attrs: dict, *, stage: str, settings: dict,
                     manifest_sha256: str | None) -> None:
    """Refuse a store made by another stage, with other settings or for another manifest."""
    problems = []
    if attrs.get("stage") != stage:
        problems.append(f"stage: store has {attrs.get('stage')!r}, this run is {stage!r}")
    problems += diff_settings(attrs.get("settings", {}), settings)
    if manifest_sha256 is not None and attrs.get("manifest_sha256") != manifest_sha256:
        problems.append("manifest_sha256: the store was built for another manifest.csv "
                        "(the dataset was re-indexed)")
    if problems:
        raise SettingsMismatch(
            f"{path} was built with different settings:\n  " + "\n  ".join(problems)
            + "\nRerun with --overwrite to rebuild it (its content is replaced), "
              "or point --cache at another directory."
        )


def create_group(path: str | Path, attrs: dict, *, overwrite: bool,
                 build: Callable[[zarr.Group], None] | None = None) -> zarr.Group:
    """Create a Zarr v3 group atomically: built beside ``path`` (``build`` adds its arrays), then
    renamed into place, so no reader ever sees a half-made store.

    Raises:
        FileExistsError: ``path`` exists (before, or because a concurrent writer created it
            first) and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to rebuild it.")
        shutil.rmtree(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        group.attrs.update(attrs)
        if build is not None:
            build(group)
    except OSError as e:  # no half-made store is left behind (disk full, permissions)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFull(f"disk full while creating {path} ({human_bytes(free_bytes(path))} free there): free "
                           f"some space or put --cache on another disk, then rerun the same command.") from e
        raise
    try:
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists():
            raise FileExistsError(f"{path} was created by another process at the same time.") from None
        raise
    return zarr.open_group(path, mode="r+")


def add_array(group: zarr.Group, name: str, data: np.ndarray, dims: Sequence[str], **attrs) -> zarr.Array:
    """Write a whole (small) array with its ``_ARRAY_DIMENSIONS``; for per-store results."""
    data = np.asarray(data)
    if data.ndim != len(dims):
        raise ValueError(f"array {name!r} has {data.ndim} axes but dims {tuple(dims)}")
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, dimension_names=tuple(dims),
                             compressors=chunk_codecs(), overwrite=True)
    arr[...] = data
    arr.attrs.update({"_ARRAY_DIMENSIONS": list(dims), **normalize_settings(attrs)})
    return arr


class StageStore:
    """A per-video stage store: arrays indexed by manifest ``index`` plus done/error flags.

    Use :meth:`open` to create or reopen one; the constructor only wraps an open group.
    """

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, stage: str, settings: dict, manifest_sha256: str,
             n_items: int, arrays: Sequence[ArraySpec], videos_per_shard: int = 16,
             overwrite: bool = False, attrs: dict | None = None) -> StageStore:
        """Create the store, or reopen it when it exists with the same settings.

        Args:
            path: the ``*.zarr`` directory.
            stage: stage name recorded in attrs (``flow``, ``audio``, ``relevance``).
            settings: every setting that changes content; compared on reopen.
            manifest_sha256: hash of the manifest the indices refer to.
            n_items: number of videos (manifest rows).
            arrays: the per-video arrays.
            videos_per_shard: videos per shard file and per unit of work.
            overwrite: rebuild the store from nothing if it exists.
            attrs: extra root attrs written at creation (model label lists, ...).
        """
        path = Path(path)
        if videos_per_shard < 1:
            raise ValueError(f"videos_per_shard must be >= 1, got {videos_per_shard}")
        settings = {**settings, "videos_per_shard": videos_per_shard, "chunk_checksum": CHECKSUM}
        if not path.exists() or overwrite:
            try:
                group = create_group(path, root_attrs(stage, settings, manifest_sha256, **(attrs or {})),
                                     overwrite=overwrite,
                                     build=lambda g: _add_stage_arrays(g, n_items, arrays, videos_per_shard))
                return cls(path, group)
            except FileExistsError:
                if overwrite:
                    raise
                # a concurrent --shard writer created it first: join it (settings still checked)
        group = zarr.open_group(path, mode="r+")
        check_provenance(path, dict(group.attrs), stage=stage, settings=settings,
                         manifest_sha256=manifest_sha256)
        store = cls(path, group)
        if store.n_items != n_items:
            raise SettingsMismatch(f"{path} holds {store.n_items} videos but the manifest has "
                                   f"{n_items}; rerun with --overwrite to rebuild it.")
        store.check_done_chunks()
        return store

    @classmethod
    def open_existing(cls, path: str | Path, *, stage: str | None = None, mode: str = "r") -> StageStore:
        """Open a finished store for reading (a clear error if it is missing)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run the stage that builds it first.")
        group = zarr.open_group(path, mode=mode)
        if stage is not None and group.attrs.get("stage") != stage:
            raise SettingsMismatch(f"{path} is a {group.attrs.get('stage')!r} store, expected {stage!r}")
        return cls(path, group)

    # -- state --------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def settings(self) -> dict:
        return dict(self.group.attrs.get("settings", {}))

    @property
    def n_items(self) -> int:
        return int(self.group[DONE].shape[0])

    @property
    def videos_per_shard(self) -> int:
        return int(self.group[DONE].chunks[0])

    def done_mask(self) -> np.ndarray:
        try:
            return np.asarray(self.group[DONE][:], dtype=bool)
        except Exception as e:  # noqa: BLE001 - a damaged flags chunk
            from imdpipe.pipeline.integrity import check_done_chunks

            check_done_chunks(self.path, self.group)  # names the videos whose flags are unreadable
            raise StoreDamaged(f"{self.path}/done cannot be read ({type(e).__name__}: {e}); run `imdpipe "
                               f"verify --cache {self.path.parent} --repair`") from e

    def check_done_chunks(self) -> None:
        """Refuse the store if a chunk of a done video is missing or truncated (reads shard indexes only)."""
        from imdpipe.pipeline.integrity import check_done_chunks

        check_done_chunks(self.path, self.group, done=self.done_mask())

    def read_whole(self, name: str, *, done: np.ndarray | None = None) -> np.ndarray:
        """The whole array ``name``, every done video's chunks present and checksummed.

        Read one shard file at a time (:func:`imdpipe.pipeline.shard_reader.read_sharded`), which
        for a store of one small chunk per video takes 6-7x less CPU than zarr's
        ``arr[...]``. Entries of videos not done hold the fill value.

        Raises:
            StoreDamaged: the array carries no chunk checksums, or a done video's chunk is absent,
                truncated or fails its checksum (the message names the videos and the repair).
        """
        from imdpipe.pipeline.integrity import has_checksum, missing_chunks
        from imdpipe.pipeline.shard_reader import read_sharded

        arr = self.group[name]
        repair = f"run `imdpipe verify --cache {self.path.parent} --repair`, then rerun the stage that writes it"
        if not has_checksum(arr):
            raise StoreDamaged(f"{self.path}/{name} was built without chunk checksums, so a damaged chunk would be "
                               f"read as data; rebuild {self.path.name} with --overwrite.")
        done = self.done_mask() if done is None else np.asarray(done, dtype=bool)
        got = read_sharded(arr)
        if got is None:  # not sharded by videos: zarr reads it, once no done video's chunk is missing
            damage, _ = missing_chunks(self.path, self.group, np.flatnonzero(done), names=[name])
            problems = {d.index: d.detail for d in damage}
            data = None
            if not problems:
                try:
                    data = np.asarray(arr[...])
                except Exception as e:  # noqa: BLE001 - a checksum mismatch somewhere in the array
                    raise StoreDamaged(f"{self.path}/{name} fails to decode ({type(e).__name__}: {e}); "
                                       f"{repair}.") from e
        else:
            data, problems = got
        bad = sorted(v for v in problems if done[v])
        if bad:
            first = ", ".join(f"{v} ({problems[v]})" for v in bad[:3])
            raise StoreDamaged(f"{self.path}/{name}: {len(bad)} done video(s) cannot be read: {first}"
                               f"{' ...' if len(bad) > 3 else ''}; {repair}.")
        return data

    def errors(self) -> np.ndarray:
        return np.asarray(self.group[ERROR][:])

    def is_done(self, index: int) -> bool:
        return bool(self.group[DONE][index])

    def __getitem__(self, name: str) -> zarr.Array:
        return self.group[name]

    def shard_ranges(self) -> list[tuple[int, int]]:
        k, n = self.videos_per_shard, self.n_items
        return [(s, min(s + k, n)) for s in range(0, n, k)]

    def pending_by_shard(self, eligible: Sequence[int], part: Partition = Partition(), *,
                         done: np.ndarray | None = None) -> dict[tuple[int, int], set[int]]:
        """The shards of writer ``part`` with work left: ``{(start, stop): eligible, not done indices}``."""
        done = self.done_mask() if done is None else done
        waiting = np.zeros(self.n_items, dtype=bool)
        waiting[np.asarray(eligible, dtype=int)] = True
        waiting &= ~done
        return {(s, e): set((np.flatnonzero(waiting[s:e]) + s).tolist())
                for s, e in partition_shards(self.shard_ranges(), part)
                if waiting[s:e].any()}

    # -- writing ------------------------------------------------------------------------------
    def write_rows(self, start: int, stop: int, rows: dict[int, dict[str, np.ndarray]]) -> None:
        """Write the data (not the flags) of videos in one shard ``[start, stop)``, one pass per array.

        ``rows`` maps index -> {array name: value}; videos not given keep their stored content.
        Only the owner of the whole shard may call this (a run_stage process or its pool worker).
        """
        idx = sorted(rows)
        if any(not start <= i < stop for i in idx):
            raise ValueError(f"write_rows({start}, {stop}) got indices outside the shard")
        if not idx:
            return
        for name in rows[idx[0]]:
            # Every chunk of a block holds a video's result, so skip zarr's per-chunk "all equal to
            # the fill value?" scan: it took 2/3 of the write time of frames.zarr (3x faster).
            arr = self.group[name].with_config({"write_empty_chunks": True})
            block = np.stack([np.asarray(rows[i][name], dtype=arr.dtype) for i in idx])
            if len(idx) == stop - start:
                arr[start:stop] = block
            else:
                # only the given videos' chunks are encoded, one contiguous run at a time; the
                # shard's other chunks keep their bytes (a lossy codec must never re-encode a video
                # that is already stored)
                try:
                    j = 0  # the runs are consecutive pieces of idx, the block's rows in idx order
                    for a, b in _runs(idx):
                        arr[a:b] = block[j:j + b - a]
                        j += b - a
                except Exception as e:  # noqa: BLE001 - the shard's index fails to decode
                    raise StoreDamaged(f"{self.path}/{name}: the shard of videos {start}..{stop - 1} fails to decode "
                                       f"({type(e).__name__}: {e}), so it cannot be rewritten. Run `imdpipe "
                                       f"verify --cache {self.path.parent} --repair`, then rerun this "
                                       f"command.") from e

    def write_block(self, start: int, stop: int, rows: dict[int, dict[str, np.ndarray]],
                    errors: dict[int, str], written: Iterable[int] = ()) -> None:
        """Write the results of videos in one shard ``[start, stop)`` in a single pass.

        ``rows`` maps index -> {array name: value}; ``errors`` maps index -> message; ``written``
        are videos whose data a pool worker already stored (:meth:`write_rows`). Rows not given
        keep their stored content. Data first, then errors, then done flags.
        """
        written = sorted(written)
        if any(not start <= i < stop for i in [*errors, *written]):
            raise ValueError(f"write_block({start}, {stop}) got indices outside the shard")
        self.write_rows(start, stop, rows)
        err = np.asarray(self.group[ERROR][start:stop]).astype(object)
        done = np.asarray(self.group[DONE][start:stop], dtype=bool)
        for i in [*rows, *written]:
            err[i - start] = ""
            done[i - start] = True
        for i, message in errors.items():
            err[i - start] = message
            done[i - start] = False
        self.group[ERROR][start:stop] = err.astype(str)
        self.group[DONE][start:stop] = done


def _add_stage_arrays(group: zarr.Group, n_items: int, arrays: Sequence[ArraySpec], k: int) -> None:
    """The per-video arrays (one chunk per video, ``k`` videos per shard) plus done/error flags."""
    flag_chunks = (min(k, max(n_items, 1)),)
    for spec in arrays:
        chunks = (1, *(spec.shape if spec.chunks is None else spec.chunks))
        # a shard holds k whole videos; it needs the sharding codec also at k == 1 when a video
        # spans several chunks (one file per video, not one per chunk)
        sharded = k > 1 or chunks[1:] != tuple(spec.shape)
        shards = (min(k, max(n_items, 1)), *spec.shape) if sharded else None
        arr = group.create_array(spec.name, shape=(n_items, *spec.shape), chunks=chunks, shards=shards,
                                 dtype=spec.dtype, fill_value=spec.fill_value, **spec.codecs(),
                                 dimension_names=("video", *spec.dims))
        arr.attrs.update({"_ARRAY_DIMENSIONS": ["video", *spec.dims], **normalize_settings(spec.attrs)})
    done = group.create_array(DONE, shape=(n_items,), chunks=flag_chunks, dtype="bool", fill_value=False,
                              compressors=chunk_codecs(), dimension_names=("video",))
    done.attrs["_ARRAY_DIMENSIONS"] = ["video"]
    err = group.create_array(ERROR, shape=(n_items,), chunks=flag_chunks, dtype=str, fill_value="",
                             compressors=chunk_codecs(), dimension_names=("video",))
    err.attrs["_ARRAY_DIMENSIONS"] = ["video"]


def _runs(idx: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted distinct indices as contiguous ``[start, stop)`` runs."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def partition_shards(shards: Sequence[tuple[int, int]], part: Partition) -> list[tuple[int, int]]:
    """The shards a writer owns: shard b goes to writer ``b % count``; never split."""
    return [s for b, s in enumerate(shards) if b % part.count == part.index]


# ---------------------------------------------------------------------------------------------
# Running a stage
# ---------------------------------------------------------------------------------------------
Produce = Callable[[list[int]], Iterable[tuple[int, "dict[str, np.ndarray] | BaseException | _Written"]]]


class _Written:
    def __repr__(self):
        return "WRITTEN"

    def __reduce__(self):  # unpickles as the module's singleton, so ``result is WRITTEN`` holds
        return "WRITTEN"


#: What a producer yields for a video whose data its pool worker stored itself (the worker owned
#: the whole shard and called :meth:`StageStore.write_rows` before the result came back).
WRITTEN = _Written()


@dataclass
class Summary:
    """What one run of a stage did."""

    stage: str
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    already_done: int = 0
    not_mine: int = 0
    seconds: float = 0.0
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (index, name, message)

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    def as_dict(self) -> dict:
        return {"stage": self.stage, "ok": self.ok, "failed": self.failed, "skipped": self.skipped,
                "already_done": self.already_done, "other_shards": self.not_mine,
                "seconds": round(self.seconds, 3), "errors": [list(e) for e in self.errors]}


def claims_dir(store_path: str | Path) -> Path:
    """Where the claim files of a store live: ``<store>.claims/`` beside it."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".claims")


class ShardClaim:
    """An exclusive claim on one shard of a store, so concurrent runs never compute it twice.

    The claim is an ``flock`` on ``<store>.claims/shard-<start>``; the file records who holds it
    (pid, host, since when) for people looking. The kernel drops the lock when its process dies,
    however it dies (SIGKILL included), so a killed run's claims are free again at once: no stale
    claim outlives its process. Local filesystems and NFSv4 support ``flock``.
    """

    def __init__(self, store_path: str | Path, start: int):
        self.file = claims_dir(store_path) / f"shard-{int(start):012d}"
        self._f = None

    def acquire(self, wait: bool = False) -> bool:
        """Take the claim; False when another process holds it (unless ``wait``, which blocks)."""
        self.file.parent.mkdir(exist_ok=True)
        f = open(self.file, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return False
        try:
            f.truncate(0)
            f.write(f"pid {os.getpid()} host {socket.gethostname()} since "
                    f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
            f.flush()
        except OSError:  # a full disk: the claim must not outlive the error (a rerun would wait on it)
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
            raise
        self._f = f
        return True

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


@contextlib.contextmanager
def claim_shard(store_path: str | Path, start: int, *, wait: bool = False) -> Iterator[bool]:
    """``with claim_shard(path, start) as held:`` holds the shard's claim when ``held`` is True."""
    claim = ShardClaim(store_path, start)
    try:
        yield claim.acquire(wait)
    finally:
        claim.release()


def run_stage(store: StageStore, produce: Produce, *, eligible: Sequence[int], names: Sequence[str],
              part: Partition = Partition(), description: str = "", unit: str = "video",
              console=None, show_progress: bool = True, shards_per_round: int = 8,
              background_writes: bool = False) -> Summary:
    """Compute every pending video this writer owns and write it, one whole shard at a time.

    Shards are claimed (:class:`ShardClaim`) ``shards_per_round`` at a time, then handed to
    ``produce``. A shard another run holds is skipped and retried at the end (waiting for its
    claim); a shard another run finished meanwhile is not computed again. So several runs started
    on the same store divide its shards instead of each computing all of them, and a killed run's
    shards are taken over.

    Args:
        store: the open stage store.
        produce: called once per round with the pending indices (in order); yields
            ``(index, result)`` pairs in any order, where result is ``{array name: value}``, the
            exception that video raised, or :data:`WRITTEN` when its pool worker stored the data
            (whole shards only). It owns devices, pools and batching.
        eligible: indices this stage should process (e.g. manifest rows with status ok); the
            others are counted as skipped.
        names: a name per index (the video path) for error messages.
        part: which shards this process owns.
        description: label of the progress bar.
        unit: what is counted (for the rate column).
        console: a ``rich.console.Console`` (default: stderr).
        show_progress: draw a progress bar.
        shards_per_round: shards claimed and computed per call of ``produce``.
        background_writes: write finished shards from one background thread (at most
            :data:`MAX_QUEUED_SHARDS` waiting), so the producer (a GPU) keeps computing while a
            shard is compressed and written. A round's writes finish before its claims are
            released, and a failed write is raised as if written inline.

    Raises:
        DiskFull: the disk filled up (the message names the path and the space needed); every
            shard written before is kept.
        StoreDamaged: a shard to be rewritten holds a chunk that fails to decode.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    summary = Summary(stage=str(store.group.attrs.get("stage", "")))
    t0 = time.perf_counter()
    done = store.done_mask()
    eligible_mask = np.zeros(store.n_items, dtype=bool)
    eligible_mask[np.asarray(eligible, dtype=int)] = True
    mine = partition_shards(store.shard_ranges(), part)
    mine_mask = np.zeros(store.n_items, dtype=bool)
    for s, e in mine:
        mine_mask[s:e] = True
    summary.not_mine = int((~mine_mask & eligible_mask).sum())
    summary.skipped = int((mine_mask & ~eligible_mask).sum())
    summary.already_done = int((mine_mask & eligible_mask & done).sum())
    pending_by_shard = store.pending_by_shard(eligible, part, done=done)
    queue, busy = list(pending_by_shard), []

    with _progress(console, show_progress, unit) as progress:
        total = sum(len(v) for v in pending_by_shard.values())
        task = progress.add_task(description or summary.stage, total=total)
        try:
            while queue or busy:
                held: list[ShardClaim] = []
                try:
                    batch = _claim_round(store, queue, busy, held, pending_by_shard, shards_per_round, summary)
                    progress.update(task, total=summary.ok + summary.failed
                                    + sum(len(v) for v in pending_by_shard.values()))
                    if batch:
                        _run_round(store, produce, batch, pending_by_shard, names, summary, progress, task,
                                   background_writes)
                finally:
                    for claim in held:
                        claim.release()
        except OSError as e:
            if is_disk_full(e) and not isinstance(e, DiskFull):
                raise _disk_full(store, e, sum(len(v) for v in pending_by_shard.values())) from e
            raise
    summary.seconds = time.perf_counter() - t0
    return summary


def _claim_round(store: StageStore, queue: list, busy: list, held: list, pending_by_shard: dict, size: int,
                 summary: Summary) -> list[tuple[int, int]]:
    """Claim up to ``size`` shards with work left (appending their claims to ``held``).

    Shards another process holds go to ``busy``; once ``queue`` is empty they are waited for, one
    at a time and only when nothing else is claimed, so two runs never wait on each other.
    """
    batch = []
    while (queue or busy) and len(batch) < size:
        if queue:
            key, wait = queue.pop(0), False
        elif batch:
            break
        else:
            key, wait = busy.pop(0), True
        claim = ShardClaim(store.path, key[0])
        if not claim.acquire(wait):
            busy.append(key)
            continue
        # another run may have finished (part of) the shard since this run read the flags
        fresh = np.asarray(store.group[DONE][key[0]:key[1]], dtype=bool)
        todo = {i for i in pending_by_shard[key] if not fresh[i - key[0]]}
        summary.not_mine += len(pending_by_shard[key]) - len(todo)
        if todo:
            pending_by_shard[key] = todo
            held.append(claim)
            batch.append(key)
        else:
            del pending_by_shard[key]
            claim.release()
    return batch


def _run_round(store: StageStore, produce: Produce, batch: list, pending_by_shard: dict, names, summary: Summary,
               progress, task, background_writes: bool = False) -> None:
    """Produce and write the claimed shards of one round (every write done when this returns)."""
    with _ShardWriter(store, pending_by_shard, background_writes) as writer:
        _produce_round(produce, batch, pending_by_shard, names, summary, progress, task, writer)
    left = sorted(i for key in batch for i in pending_by_shard.get(key, ()))
    if left:
        raise RuntimeError(f"produce() never yielded indices {left[:10]}...")


def _produce_round(produce: Produce, batch: list, pending_by_shard: dict, names, summary: Summary, progress, task,
                   writer: _ShardWriter) -> None:
    shard_of = {i: key for key in batch for i in pending_by_shard[key]}
    buffers: dict[tuple[int, int], tuple[dict, dict, list]] = {k: ({}, {}, []) for k in batch}
    for index, result in produce(sorted(shard_of)):
        key = shard_of.get(index)
        if key is None:
            raise RuntimeError(f"produce() yielded index {index}, which was not asked for")
        rows, errs, written = buffers[key]
        if isinstance(result, BaseException):
            if is_disk_full(result):
                raise result
            message = f"{type(result).__name__}: {result}"
            errs[index] = message
            summary.failed += 1
            summary.errors.append((index, names[index], message))
        else:
            if result is WRITTEN:
                written.append(index)
            else:
                rows[index] = result
            summary.ok += 1
        pending_by_shard[key].discard(index)
        if not pending_by_shard[key]:
            del buffers[key], pending_by_shard[key]
            writer.write(key, rows, errs, written)
        progress.advance(task)


#: finished shards waiting for the background writer; the producer blocks beyond this (bounds memory)
MAX_QUEUED_SHARDS = 2


class _ShardWriter:
    """``store.write_block`` now, or from one background thread with a bounded queue.

    A shard whose write fails is put back into ``pending_by_shard`` (still to do), then the
    error is raised: inline at once, from the thread at the next :meth:`write` or on exit.
    """

    def __init__(self, store: StageStore, pending_by_shard: dict, background: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.store, self.pending_by_shard = store, pending_by_shard
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") if background else None
        self.queued: list = []

    def _write(self, key: tuple[int, int], rows: dict, errs: dict, written: list) -> None:
        try:
            self.store.write_block(key[0], key[1], rows, errs, written)
        except OSError:
            self.pending_by_shard[key] = {*rows, *errs, *written}  # not written: still to do
            raise

    def write(self, key: tuple[int, int], rows: dict, errs: dict, written: list) -> None:
        if self.pool is None:
            self._write(key, rows, errs, written)
            return
        while len(self.queued) >= MAX_QUEUED_SHARDS:
            self.queued.pop(0).result()  # raises a failed write here
        self.queued.append(self.pool.submit(self._write, key, rows, errs, written))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True)  # also when the producer failed: finished shards stay written
            if exc[0] is None:
                for future in self.queued:
                    future.result()
        return False


def _disk_full(store: StageStore, error: OSError, left: int) -> DiskFull:
    """One message for a full disk: where, how much is free, how much the rest needs, what is kept."""
    done = int(store.done_mask().sum())
    per_video = tree_bytes(store.path) / max(done, 1)
    where = getattr(error, "filename", None) or store.path
    need = (f"about {human_bytes(per_video * left)} more ({human_bytes(per_video)} per video so far)" if done
            else "more space than is free")
    return DiskFull(f"disk full while writing {where} ({human_bytes(free_bytes(store.path))} free there). The "
                    f"{left} video(s) left need {need}: free that much or move the cache to a larger disk, then "
                    f"rerun the same command; the {done} video(s) already done are kept and skipped.")


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


def _progress(console, show: bool, unit: str):
    if not show:
        return _NoProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class _Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{'?' if speed is None else f'{speed:.1f}'} {unit}s/s", style="progress.data.speed")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def print_summary(summary: Summary, console=None, *, max_errors: int = 10) -> None:
    """Print the ok / failed / skipped table and the first few error messages."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title=f"{summary.stage} summary", show_header=True)
    for col in ("ok", "failed", "skipped (bad in manifest)", "already done", "other shards", "seconds"):
        table.add_column(col, justify="right")
    table.add_row(str(summary.ok), str(summary.failed), str(summary.skipped), str(summary.already_done),
                  str(summary.not_mine), f"{summary.seconds:.1f}")
    console.print(table)
    for index, name, message in summary.errors[:max_errors]:
        console.print(f"[red]failed[/red] #{index} {escape(name)}: {escape(message)}", highlight=False)
    if len(summary.errors) > max_errors:
        console.print(f"... and {len(summary.errors) - max_errors} more (see the store's `error` array)")
