"""Integrity of a cache: every chunk of every done video exists and decodes (``imdpipe verify``).

Zarr reads a chunk that is missing on disk as the array's fill value, with no error, and a chunk
whose bytes changed would decompress to wrong values if nothing checked it. So every chunk of a
stage store ends with a CRC-32C of its encoded bytes
(:func:`imdpipe.pipeline.store.chunk_codecs`), and this module

* finds, from the shard indexes alone (a few bytes per shard file, no decoding), the chunks of
  done videos that are missing or lie past the end of a truncated shard file
  (:func:`missing_chunks`); stages and the trainer run it whenever they open a store, so a lost
  chunk is never read as data;
* decodes every chunk of every done video, which checks every checksum (:func:`verify_store`);
* repairs a store: the damaged videos are marked not done and their entries reset to the fill
  value, so the stage's next run recomputes exactly them (:func:`repair_store`).

The stores are local directories (zarr's ``LocalStore``): shard files are read from the file
system by the key zarr gives each storage unit.
"""

from __future__ import annotations

import itertools
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from imdpipe.contract import AUDIO, FRAMES, RELEVANCE
from imdpipe.pipeline.shard_reader import MISSING, raw_video_chunks, write_raw_shard
from imdpipe.pipeline.store import DONE, ERROR, StageStore, StoreDamaged, claim_shard

#: Kinds of damage, in the order the summary lists them.
KINDS = ("missing", "truncated", "corrupt", "flags", "no-checksum", "unreadable")


@dataclass(frozen=True)
class Damage:
    """One damaged array entry: video ``index`` (-1: the whole array) of ``array``."""

    array: str
    index: int
    kind: str  # one of KINDS
    detail: str


@dataclass
class StoreReport:
    """What :func:`verify_store` found in one store."""

    path: Path
    stage: str
    per_video: bool
    done: int = 0  # videos marked done
    chunks: int = 0  # chunks of done videos checked
    damage: list[Damage] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)  # videos --repair marked not done
    busy: list[tuple[int, int]] = field(default_factory=list)  # shards a running stage held during --repair
    rerun: str = ""  # the command that recomputes what --repair cleared

    @property
    def bad_videos(self) -> list[int]:
        return sorted({d.index for d in self.damage if d.index >= 0})

    @property
    def store_wide(self) -> list[Damage]:
        """Damage --repair cannot fix in place (no checksums, an unreadable dictionary store)."""
        return [d for d in self.damage if d.index < 0]

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def fixed(self) -> bool:
        """Nothing left that the stage's rerun would not recompute."""
        return not self.store_wide and not self.busy and set(self.bad_videos) <= set(self.repaired)


@dataclass
class VerifyReport:
    """What ``imdpipe verify`` found (and repaired) in a cache."""

    cache: Path
    stores: list[StoreReport]
    repair: bool = False

    @property
    def damaged(self) -> bool:
        return any(not s.ok for s in self.stores)

    @property
    def unresolved(self) -> bool:
        """Damage is left: found without --repair, or --repair could not fix all of it."""
        return any(not s.ok and not (self.repair and s.fixed) for s in self.stores)


# ---------------------------------------------------------------------------------------------
# Chunk geometry and shard indexes
# ---------------------------------------------------------------------------------------------
def _video_arrays(group: zarr.Group, names: Sequence[str] | None = None) -> list[tuple[str, zarr.Array]]:
    """The per-video data arrays of a stage store (not the flags), in name order."""
    return sorted((name, arr) for name, arr in group.arrays()
                  if name not in (DONE, ERROR) and (names is None or name in names))


def has_checksum(arr: zarr.Array) -> bool:
    """Whether each chunk of ``arr`` ends with a CRC-32C (inside the shards when sharded)."""
    codecs = arr.metadata.codecs
    inner = getattr(codecs[0], "codecs", None) if arr.shards is not None else None
    return any(isinstance(c, Crc32cCodec) for c in (inner if inner is not None else codecs))


def _unit_file(root: Path, arr: zarr.Array, coords: tuple[int, ...]) -> Path:
    """The file holding storage unit (shard, or chunk when unsharded) ``coords`` of ``arr``."""
    return root / arr.path / arr.metadata.encode_chunk_key(coords)


def _unit_files(root: Path, arr: zarr.Array, video: int) -> list[Path]:
    """The files holding the row of storage units of ``video`` (every unit along the other axes)."""
    outer = tuple(arr.shards) if arr.shards is not None else tuple(arr.chunks)
    grid = [math.ceil(s / o) for s, o in zip(arr.shape, outer)]
    return [_unit_file(Path(root), arr, (video // outer[0], *rest))
            for rest in itertools.product(*(range(g) for g in grid[1:]))]


def _shard_index(file: Path, arr: zarr.Array, per_shard: tuple[int, ...]) -> np.ndarray | str:
    """``(offset, length)`` of every inner chunk of one shard file, shape ``(*per_shard, 2)``.

    Reads only the index (16 bytes per inner chunk and its CRC-32C, at the end of the file by
    default). Returns a message instead when the index cannot be trusted (a truncated file).
    """
    codec = arr.metadata.codecs[0]
    n = math.prod(per_shard)
    checked = any(isinstance(c, Crc32cCodec) for c in codec.index_codecs)
    size = 16 * n + (4 if checked else 0)
    total = file.stat().st_size
    if total < size:
        return f"{file} holds {total} bytes, less than its {size}-byte chunk index (truncated)"
    with open(file, "rb") as f:
        f.seek(0 if codec.index_location.value == "start" else total - size)
        raw = f.read(size)
    body = raw[:16 * n]
    if checked and google_crc32c.value(body) != int.from_bytes(raw[16 * n:], "little"):
        return f"the chunk index of {file} fails its checksum (the file was truncated or overwritten)"
    return np.frombuffer(body, "<u8").reshape(*per_shard, 2)


def missing_chunks(path: str | Path, group: zarr.Group, videos: Sequence[int], *,
                   names: Sequence[str] | None = None) -> tuple[list[Damage], int]:
    """Chunks of ``videos`` that are absent or past the end of their shard file, without decoding.

    Args:
        path: the store directory.
        group: the store, open.
        videos: the videos to check (the done ones).
        names: the arrays to check (default: every per-video data array).

    Returns:
        ``(damage, chunks)``: one :class:`Damage` per damaged (array, video), and how many chunks
        were looked up.
    """
    root = Path(path)
    videos = sorted(int(v) for v in videos)
    damage, looked = [], 0
    for name, arr in _video_arrays(group, names):
        inner = tuple(arr.chunks)
        outer = tuple(arr.shards) if arr.shards is not None else inner
        per_shard = tuple(o // i for o, i in zip(outer, inner))
        grid = [math.ceil(s / o) for s, o in zip(arr.shape, outer)]
        by_unit: dict[int, list[int]] = {}
        for v in videos:
            by_unit.setdefault(v // outer[0], []).append(v)
        for b, vids in by_unit.items():
            for rest in itertools.product(*(range(g) for g in grid[1:])):
                coords = (b, *rest)
                file = _unit_file(root, arr, coords)
                # inner chunks of this unit inside the array (a last unit may overhang the shape)
                valid = tuple(min(p, math.ceil((s - c * o) / i))
                              for p, s, c, o, i in zip(per_shard[1:], arr.shape[1:], rest, outer[1:], inner[1:]))
                looked += len(vids) * math.prod(valid)
                if not file.is_file():
                    damage += [Damage(name, v, "missing", f"{file} is missing") for v in vids]
                    continue
                if arr.shards is None:
                    continue  # the file is the chunk: decoding checks its bytes
                index = _shard_index(file, arr, per_shard)
                if isinstance(index, str):
                    damage += [Damage(name, v, "truncated", index) for v in vids]
                    continue
                size = file.stat().st_size
                for v in vids:
                    entries = index[(v - b * outer[0]) // inner[0]][tuple(slice(0, k) for k in valid)]
                    entries = entries.reshape(-1, 2)
                    absent = int((entries[:, 0] == MISSING).sum())
                    if absent:
                        damage.append(Damage(name, v, "missing", f"{absent} of its {len(entries)} chunk(s) are "
                                                                 f"absent from {file}"))
                    elif (entries[:, 0] + entries[:, 1] > size).any():
                        damage.append(Damage(name, v, "truncated", f"its chunk(s) end past the end of {file} "
                                                                   f"({size} bytes)"))
    return damage, looked


def _done_flags(group: zarr.Group) -> tuple[np.ndarray, list[Damage]]:
    """The done flags, read chunk by chunk; a chunk that fails to decode counts as not done and
    flags each of its videos."""
    arr = group[DONE]
    n, k = arr.shape[0], arr.chunks[0]
    done, damage = np.zeros(n, dtype=bool), []
    for s in range(0, n, k):
        e = min(s + k, n)
        try:
            done[s:e] = np.asarray(arr[s:e], dtype=bool)
        except Exception as ex:  # noqa: BLE001 - any decode failure is damage
            damage += [Damage(DONE, v, "flags", f"the done flags of videos {s}..{e - 1} cannot be read "
                                                f"({type(ex).__name__}: {ex})") for v in range(s, e)]
    return done, damage


def _decode_failures(group: zarr.Group, videos: np.ndarray, skip: set[tuple[str, int]]) -> list[Damage]:
    """Decode every chunk of ``videos`` (checking the checksums), a shard's block at a time."""
    damage = []
    names = [n for n, _ in _video_arrays(group)] + [ERROR]
    for name in names:
        arr = group[name]
        k = arr.shards[0] if arr.shards is not None else arr.chunks[0]
        for s in range(0, arr.shape[0], k):
            vids = [int(v) for v in videos[(videos >= s) & (videos < s + k)] if (name, int(v)) not in skip]
            if not vids:
                continue
            try:
                arr[s:min(s + k, arr.shape[0])]
                continue
            except Exception:  # noqa: BLE001 - find which videos fail
                pass
            for v in vids:
                try:
                    arr[v]
                except Exception as ex:  # noqa: BLE001 - a checksum mismatch, a zstd error, ...
                    damage.append(Damage(name, v, "corrupt", f"{type(ex).__name__}: {ex}"))
    return damage


# ---------------------------------------------------------------------------------------------
# Verify and repair
# ---------------------------------------------------------------------------------------------
def rerun_command(stage: str, settings: dict, cache: Path) -> str:
    """The command that recomputes the videos --repair cleared (the store's own settings)."""
    c = shlex.quote(str(cache))
    k = settings.get("videos_per_shard")
    shard = f" --videos-per-shard {k}" if k else ""
    if stage == FRAMES.stage:
        size = settings.get("size", [256, 340])
        extra = f" --preset {settings['preset']}" if settings.get("backend") == "dis" and "preset" in settings else ""
        for kind in ("rgb", "flow"):  # the store's codecs (stores from before the choice: zstd)
            codec = settings.get(f"{kind}_codec", "zstd")
            extra += f" --{kind}-codec {codec}"
            if codec == "jpeg":
                extra += f" --{kind}-quality {settings[f'{kind}_quality']}"
        return (f"imdpipe extract-flow --cache {c} --frames {settings.get('frames')} --size {size[0]}x{size[1]} "
                f"--backend {settings.get('backend')}{extra}{shard}")
    if stage == AUDIO.stage:
        return (f"imdpipe extract-audio --cache {c} --model {shlex.quote(str(settings.get('model')))} "
                f"--windows {settings.get('windows')} --dtype {settings.get('dtype')}{shard}")
    if stage == RELEVANCE.stage:
        return (f"imdpipe build-savld --cache {c} --relevance-k {settings.get('K')} --ya {settings.get('Ya')} "
                f"--overlap {settings.get('overlap')}")
    return f"the command that built the {stage!r} store, with the settings in its zarr.json"


def verify_store(path: str | Path, *, decode: bool = True) -> StoreReport:
    """Check one store of a cache.

    A per-video store (with ``done`` flags): every chunk of every done video of every array
    exists (shard indexes) and, with ``decode``, decodes (checksums); arrays without chunk
    checksums are flagged as a whole. Any other store (``savld.zarr``) is read whole.
    """
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
    except Exception as ex:  # noqa: BLE001 - unreadable metadata
        return StoreReport(path, "?", False, damage=[Damage("zarr.json", -1, "unreadable",
                                                           f"{type(ex).__name__}: {ex}")])
    stage = str(attrs.get("stage", "?"))
    cache = path.parent
    if DONE not in group:
        report = StoreReport(path, stage, False, rerun=f"imdpipe build-savld --cache {shlex.quote(str(cache))} "
                                                       f"--overwrite (with the options it was built with)")
        for name, arr in sorted(group.arrays()):
            report.chunks += arr.nchunks
            if not has_checksum(arr):
                report.damage.append(Damage(name, -1, "no-checksum", "its chunks carry no checksum"))
            try:
                arr[...]
            except Exception as ex:  # noqa: BLE001
                report.damage.append(Damage(name, -1, "corrupt", f"{type(ex).__name__}: {ex}"))
        return report
    report = StoreReport(path, stage, True, rerun=rerun_command(stage, attrs.get("settings", {}), cache))
    for name, arr in _video_arrays(group):
        if not has_checksum(arr):
            report.damage.append(Damage(name, -1, "no-checksum", "its chunks carry no checksum, so damage cannot "
                                                                 "be detected"))
    done, flag_damage = _done_flags(group)
    report.damage += flag_damage
    videos = np.flatnonzero(done)
    report.done = len(videos)
    missing, report.chunks = missing_chunks(path, group, videos)
    report.damage += missing
    if decode:
        report.damage += _decode_failures(group, videos, {(d.array, d.index) for d in missing})
    return report


def repair_store(report: StoreReport) -> None:
    """Mark the damaged videos of a per-video store not done and reset their entries to the fill value.

    Works shard by shard under the shard's claim (a shard a running stage holds is left alone and
    listed in ``report.busy``). Flags first: a crash mid-repair leaves the videos not done, so the
    next run recomputes them. Videos not done in a repaired shard are reset too (they will be
    recomputed anyway); done ones keep their (verified) data.
    """
    if not report.per_video:
        return
    store = StageStore.open_existing(report.path, mode="r+")
    bad = np.asarray(report.bad_videos, dtype=int)
    why = {}
    for d in report.damage:
        why.setdefault(d.index, f"{d.array}: {d.kind} ({d.detail})")
    for s, e in store.shard_ranges():
        hit = [int(v) for v in bad[(bad >= s) & (bad < e)]]
        if not hit:
            continue
        with claim_shard(report.path, s, wait=False) as held:
            if not held:
                report.busy.append((s, e))
                continue
            try:
                done = np.asarray(store[DONE][s:e], dtype=bool)
            except Exception:  # noqa: BLE001 - unreadable flags: every video of the shard is recomputed
                done = np.zeros(e - s, dtype=bool)
            try:
                errors = np.asarray(store[ERROR][s:e]).astype(object)
            except Exception:  # noqa: BLE001
                errors = np.full(e - s, "", dtype=object)
            for v in hit:
                done[v - s] = False
                errors[v - s] = f"imdpipe verify --repair cleared it: {why[v]}; recompute with: {report.rerun}"
            store[DONE][s:e] = done
            store[ERROR][s:e] = errors.astype(str)
            for _, arr in _video_arrays(store.group):
                # sharded arrays: the done videos' chunks are copied as encoded bytes (a lossy codec,
                # frames.zarr's JPEG, must not re-encode them); the others are left out (fill value)
                kept = raw_video_chunks(arr, np.flatnonzero(done) + s)
                if kept is not None:
                    write_raw_shard(arr, s, kept)
                    continue
                block = np.full((e - s, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
                for v in np.flatnonzero(done) + s:
                    block[v - s] = arr[v]
                # zarr rewrites a shard by reading it first, which a damaged shard fails: drop the
                # files of these videos (their good data is in ``block``), then write them anew
                for file in _unit_files(report.path, arr, s):
                    file.unlink(missing_ok=True)
                # explicit chunks: a done video whose data equals the fill value must stay present
                arr.with_config({"write_empty_chunks": True})[s:e] = block
            report.repaired += hit


def cache_stores(cache: str | Path) -> list[Path]:
    """The ``*.zarr`` stores of a cache directory, in name order."""
    cache = Path(cache)
    if not cache.is_dir():
        raise FileNotFoundError(f"{cache} is not a directory; --cache takes a cache root (holding manifest.csv)")
    return sorted(p for p in cache.iterdir() if p.is_dir() and p.suffix == ".zarr" and (p / "zarr.json").is_file())


def verify_cache(cache: str | Path, *, repair: bool = False, decode: bool = True) -> VerifyReport:
    """Verify (and with ``repair``, repair) every store of a cache; see :func:`verify_store`."""
    stores = cache_stores(cache)
    reports = [verify_store(p, decode=decode) for p in stores]
    if repair:
        for r in reports:
            if r.bad_videos:
                repair_store(r)
    return VerifyReport(Path(cache), reports, repair=repair)


def damage_message(path: Path, damage: Sequence[Damage], *, video_ids: Sequence[str] | None = None,
                   cache: Path | None = None, limit: int = 8) -> str:
    """One message naming the store, the arrays, the videos and the commands that repair them."""
    cache = cache or path.parent
    by_array: dict[str, list[Damage]] = {}
    for d in damage:
        by_array.setdefault(d.array, []).append(d)
    lines = [f"{path} is damaged:"]
    for name, ds in by_array.items():
        vids = [_video_name(d.index, video_ids) for d in ds[:limit]]
        more = f" and {len(ds) - limit} more" if len(ds) > limit else ""
        lines.append(f"  {name}: {ds[0].kind} chunk(s) of done video(s) {', '.join(vids)}{more} ({ds[0].detail})")
    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
        rerun = f"`{rerun_command(str(attrs.get('stage')), attrs.get('settings', {}), cache)}`"
    except Exception:  # noqa: BLE001 - unreadable attrs: name the store instead
        rerun = f"the stage that built {path.name}"
    lines.append(f"Run `imdpipe verify --cache {shlex.quote(str(cache))} --repair` (marks those videos not done), "
                 f"then {rerun}, which recomputes only them.")
    return "\n".join(lines)


def _video_name(index: int, video_ids: Sequence[str] | None) -> str:
    if video_ids is not None and 0 <= index < len(video_ids):
        return f"#{index} {video_ids[index]}"
    return f"#{index}"


def manifest_ids(cache: Path) -> list[str] | None:
    """Video ids of a cache's manifest (None when it has none or it cannot be read)."""
    from imdpipe.pipeline.manifest import read_manifest

    try:
        return [r.video_id for r in read_manifest(cache).records]
    except Exception:  # noqa: BLE001 - names are a courtesy in messages
        return None


def check_done_chunks(path: str | Path, group: zarr.Group, *, done: np.ndarray | None = None,
                      names: Sequence[str] | None = None) -> None:
    """Refuse a store in which chunks of done videos are missing or truncated (cheap: shard indexes only).

    Raises:
        StoreDamaged: naming the store, the arrays, the videos and the repair command.
    """
    path = Path(path)
    if done is None:
        done, flag_damage = _done_flags(group)
        if flag_damage:
            raise StoreDamaged(damage_message(path, flag_damage, video_ids=manifest_ids(path.parent)))
    damage, _ = missing_chunks(path, group, np.flatnonzero(done), names=names)
    if damage:
        raise StoreDamaged(damage_message(path, damage, video_ids=manifest_ids(path.parent)))


def print_report(report: VerifyReport, console=None, *, limit: int = 10) -> None:
    """The summary table (one row per store) and the damaged videos of each store."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(stderr=True)
    ids = manifest_ids(report.cache)
    table = Table(title=f"verify {report.cache}" + (" (--repair)" if report.repair else ""))
    for col in ("store", "done", "chunks", "missing", "truncated", "corrupt", "bad videos",
                "repaired" if report.repair else "status"):
        table.add_column(col, justify="left" if col in ("store", "status") else "right")
    for r in report.stores:
        kinds = {k: len({(d.array, d.index) for d in r.damage if d.kind == k}) for k in KINDS}
        status = ("ok" if r.ok else str(len(r.repaired))) if report.repair else ("ok" if r.ok else "[red]DAMAGED")
        table.add_row(r.path.name, str(r.done) if r.per_video else "-", str(r.chunks), str(kinds["missing"]),
                      str(kinds["truncated"]), str(kinds["corrupt"] + kinds["flags"] + kinds["unreadable"]),
                      str(len(r.bad_videos)), status)
    console.print(table)
    for r in report.stores:
        for d in r.store_wide:
            console.print(f"[red]{escape(r.path.name)}/{escape(d.array)}[/red]: {d.kind}: {escape(d.detail)}; "
                          f"rebuild it with {escape(r.rerun)} --overwrite", soft_wrap=True)
        shown = r.damage if len(r.damage) <= limit else r.damage[:limit]
        for d in (d for d in shown if d.index >= 0):
            console.print(f"[red]{escape(r.path.name)}/{escape(d.array)}[/red] {escape(_video_name(d.index, ids))}: "
                          f"{d.kind}: {escape(d.detail)}", soft_wrap=True, highlight=False)
        if len(r.damage) > limit:
            console.print(f"... and {len(r.damage) - limit} more in {escape(r.path.name)}")
        for s, e in r.busy:
            console.print(f"[yellow]{escape(r.path.name)}: videos {s}..{e - 1} are held by a running stage; "
                          f"rerun verify --repair when it has finished[/yellow]")
        if report.repair and r.repaired:
            console.print(f"{escape(r.path.name)}: {len(r.repaired)} video(s) marked not done; recompute them "
                          f"with: {escape(r.rerun)}", soft_wrap=True, highlight=False)
    if not report.damaged:
        console.print(f"[green]{len(report.stores)} store(s) verified: no damage[/green]")
    elif not report.repair:
        console.print(f"[red]Damage found.[/red] Run `imdpipe verify --cache {escape(str(report.cache))} --repair`, "
                      f"then:", soft_wrap=True, highlight=False)
        for r in report.stores:
            if r.bad_videos:
                console.print(f"  {escape(r.rerun)}", soft_wrap=True, highlight=False)
