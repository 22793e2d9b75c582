"""The index stage: find a dataset's videos, probe each one, write ``manifest.csv`` and ``labels.txt``.

Three source layouts (all may be combined with ``--labels``):

* class folders ``ROOT/<class>/<video>`` (UCF-101 / HMDB51 raw layout); every video gets split
  ``all`` unless split files are given, or ``train`` / ``val`` / ``test`` drawn per class with
  ``split_fractions`` (seeded, stratified by class: :mod:`imdpipe.pipeline.splits`; the rule is
  recorded in the manifest's ``# split_fractions=...`` lines);
* class folders plus split files (``splits=DIR``): UCF-101 ``trainlist0N.txt`` / ``testlist0N.txt``
  (and ``classInd.txt``) or HMDB51 ``<class>_test_splitN.txt``; split values ``train`` / ``test``,
  and ``unused`` for videos on disk that the split files do not use (HMDB51 code 0 or not listed);
* Kinetics annotation CSVs (``label,youtube_id,time_start,time_end,split``): files named
  ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` anywhere under ROOT; split values as in the CSV.

Every video is probed with PyAV (:func:`probe_video`). A file that cannot be read, or a video a
split file or annotation names but ROOT lacks, gets ``status=error`` and a message; the run goes
on. Video ids must be unique: duplicates are refused with the offending paths.
"""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from imdpipe.labels import LABEL_SETS, label_set
from imdpipe.pipeline.manifest import (
    MANIFEST_NAME,
    STATUS_ERROR,
    STATUS_OK,
    Manifest,
    VideoRecord,
    manifest_bytes,
    write_manifest,
)

#: File extensions treated as videos when scanning folders (case-insensitive).
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                              ".wmv", ".3gp", ".ogv", ".ts"})

SPLIT_ALL = "all"
SPLIT_UNUSED = "unused"


class VideoProbeError(ValueError):
    """A file that PyAV cannot read as a video; the message names the file and the reason."""


class DatasetLayoutError(ValueError):
    """The dataset cannot be indexed as given (duplicate ids, unknown classes, bad split files)."""


# ---------------------------------------------------------------------------------------------
# Probing
# ---------------------------------------------------------------------------------------------
def probe_video(path: str | Path) -> dict:
    """Read a video's properties with PyAV, checking that its frames can be decoded.

    Returns:
        ``{"duration_s", "fps", "n_frames", "width", "height", "has_audio"}``. ``n_frames`` comes
        from the container when it records it (mp4), else from decoding every frame (mkv, webm).

    Raises:
        VideoProbeError: empty file, not a media container, no video stream, no decodable frame,
            or fewer frames on disk than the container declares (a truncated download).
    """
    from imdpipe.pipeline.media import VideoError, duration, frame_rate, open_media

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise VideoProbeError(f"{path}: cannot stat the file ({e.strerror or e})") from None
    if size == 0:
        raise VideoProbeError(f"{path}: empty file (0 bytes); re-download or delete it")
    try:
        container = open_media(path)
    except VideoError as e:  # PyAV raises many error types; all mean "unreadable"
        cause = e.__cause__ or e
        raise VideoProbeError(f"{path}: not a readable video container ({type(cause).__name__}: {cause}); "
                              f"the file is corrupt, truncated or not a video") from None
    with container:
        if not container.streams.video:
            raise VideoProbeError(f"{path}: the container has no video stream")
        stream = container.streams.video[0]
        fps = frame_rate(stream)
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        has_audio = any(a.codec_context.channels > 0 for a in container.streams.audio)
        declared = int(stream.frames or 0)
        try:
            first = next(iter(container.decode(stream)), None)
        except Exception as e:  # noqa: BLE001
            raise VideoProbeError(f"{path}: cannot decode the first frame ({type(e).__name__}: {e})") from None
        if first is None:
            raise VideoProbeError(f"{path}: the video stream holds no decodable frame")
        width, height = width or first.width, height or first.height
        container.seek(0)
        try:
            if declared:
                # Cheap completeness check without decoding: count the packets actually present.
                present = sum(1 for p in container.demux(stream) if p.size)
                if present < declared:
                    raise VideoProbeError(f"{path}: truncated: the container declares {declared} frames "
                                          f"but only {present} are in the file; re-download it")
                n_frames = declared
            else:
                n_frames = sum(1 for _ in container.decode(stream))
        except VideoProbeError:
            raise
        except Exception as e:  # noqa: BLE001
            raise VideoProbeError(f"{path}: damaged stream ({type(e).__name__}: {e}); "
                                  f"the file is probably truncated") from None
        length = duration(container) or (n_frames / fps if fps else 0.0)
        fps = fps or frame_rate(stream, n_frames=n_frames, duration_s=length)
    return {"duration_s": length, "fps": fps, "n_frames": n_frames, "width": width, "height": height,
            "has_audio": bool(has_audio)}


def _probe_safe(path: str) -> dict | str:
    try:
        return probe_video(path)
    except VideoProbeError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - one bad file never aborts the run
        return f"{path}: {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------
# Finding videos
# ---------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    video_id: str
    path: str  # absolute path, or "" when the video is missing
    label_name: str
    split: str
    error: str = ""


def _is_video(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_EXTENSIONS


def scan_class_folders(root: str | Path) -> list[tuple[str, Path]]:
    """``(class name, path)`` of every video file in ``ROOT/<class>/`` (hidden files skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a directory; pass the folder holding one sub-folder per class")
    found = []
    for cls in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        found += [(cls.name, p) for p in sorted(cls.iterdir()) if _is_video(p)]
    return found


def broken_links(root: str | Path) -> list[tuple[str, Path]]:
    """``(class name, path)`` of symbolic links named like videos in ``ROOT/<class>/`` whose target is missing."""
    root = Path(root)
    return [(cls.name, p) for cls in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            for p in sorted(cls.iterdir())
            if p.is_symlink() and not p.exists() and not p.name.startswith(".")
            and p.suffix.lower() in VIDEO_EXTENSIONS]


def _broken_link_error(p: Path) -> str:
    return (f"{p}: broken symbolic link to {os.readlink(p)} (the target does not exist); restore the target or "
            f"remove the link")


def _refuse_duplicates(pairs: list[tuple[str, str]], what: str) -> None:
    """``pairs`` of (video id, where); refuse any id seen twice, naming all its places."""
    by_id: dict[str, list[str]] = {}
    for vid, where in pairs:
        by_id.setdefault(vid, []).append(where)
    dups = {k: v for k, v in by_id.items() if len(v) > 1}
    if dups:
        lines = [f"  {k}: {', '.join(v)}" for k, v in sorted(dups.items())[:20]]
        more = f"\n  ... and {len(dups) - 20} more" if len(dups) > 20 else ""
        raise DatasetLayoutError(f"duplicate video ids ({what}); every video id must be unique. Rename or remove "
                          f"the duplicates:\n" + "\n".join(lines) + more)


def _split_files(splits: Path, split_id: int) -> tuple[str, list[Path]]:
    """Detect the split-file format in ``splits`` (a directory): ``ucf101`` or ``hmdb51``."""
    if not splits.is_dir():
        raise DatasetLayoutError(f"{splits} is not a directory; --splits takes the folder holding the split files")
    ucf = [splits / f"trainlist{split_id:02d}.txt", splits / f"testlist{split_id:02d}.txt"]
    if any(p.is_file() for p in ucf):
        return "ucf101", [p for p in ucf if p.is_file()]
    hmdb = sorted(splits.glob(f"*_test_split{split_id}.txt"))
    if hmdb:
        return "hmdb51", hmdb
    raise DatasetLayoutError(f"no split files for split {split_id} in {splits}: expected UCF-101 "
                      f"trainlist{split_id:02d}.txt/testlist{split_id:02d}.txt or HMDB51 "
                      f"<class>_test_split{split_id}.txt")


def read_split_files(splits: str | Path, split_id: int = 1) -> tuple[str, dict[str, tuple[str, str]]]:
    """Read UCF-101 or HMDB51 split files.

    Returns:
        ``(format, {video stem: (split, class or "")})``, split in train/test/unused. Stems are
        matched so that a dataset converted to another container (avi -> mp4) still matches.
    """
    splits = Path(splits)
    kind, files = _split_files(splits, split_id)
    out: dict[str, tuple[str, str]] = {}
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            parts = line.strip().split()
            if not parts:
                continue
            name = parts[0].replace("\\", "/")
            stem = Path(name).stem
            if kind == "ucf101":
                split = "train" if f.name.startswith("trainlist") else "test"
                cls = name.split("/")[0] if "/" in name else ""
            else:
                code = parts[1] if len(parts) > 1 else ""
                if code not in ("0", "1", "2"):
                    raise DatasetLayoutError(f"{f}:{n}: expected '<video> <0|1|2>', got {line.strip()!r}")
                split = {"0": SPLIT_UNUSED, "1": "train", "2": "test"}[code]
                cls = f.name[: -len(f"_test_split{split_id}.txt")]
            if stem in out and out[stem][0] != split:
                raise DatasetLayoutError(f"{f}:{n}: video {stem} is listed in two splits "
                                  f"({out[stem][0]} and {split})")
            out[stem] = (split, cls)
    return kind, out


def read_kinetics_csv(paths: list[Path]) -> list[dict]:
    """Rows of Kinetics annotation CSVs with ``video_id`` = ``<youtube_id>_<start:06d>_<end:06d>``."""
    rows = []
    for path in paths:
        if not Path(path).is_file():
            raise DatasetLayoutError(f"--annotations {path}: no such file; pass the Kinetics annotation CSV(s) "
                                     f"(label,youtube_id,time_start,time_end,split)")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            need = {"youtube_id", "time_start", "time_end"}
            missing = need - set(reader.fieldnames or ())
            if missing:
                raise DatasetLayoutError(f"{path}: not a Kinetics annotation CSV, it lacks columns {sorted(missing)} "
                                  f"(expected label,youtube_id,time_start,time_end,split)")
            for n, row in enumerate(reader, 2):
                try:
                    start, end = int(float(row["time_start"])), int(float(row["time_end"]))
                except ValueError:
                    raise DatasetLayoutError(f"{path}:{n}: time_start/time_end must be numbers, got "
                                      f"{row['time_start']!r}, {row['time_end']!r}") from None
                rows.append({"video_id": f"{row['youtube_id']}_{start:06d}_{end:06d}",
                             "label_name": (row.get("label") or "").strip(),
                             "split": (row.get("split") or SPLIT_ALL).strip(), "where": f"{path.name}:{n}"})
    return rows


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------
def _read_class_ind(path: Path) -> list[str]:
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and parts[0].isdigit():
            names.append((int(parts[0]), parts[1].strip()))
    return [n for _, n in sorted(names)]


def resolve_labels(labels: str | Path | None, found: list[str], *, default_set: str | None = None,
                   class_ind: Path | None = None) -> list[str]:
    """Class names in label order.

    Args:
        labels: a built-in set name, a text file (one name a line), or None to decide from the data.
        found: the class names present in the data.
        default_set: a built-in set whose order to use when every found class belongs to it.
        class_ind: a UCF-101 ``classInd.txt`` to take the order from (when it lists every class).
    """
    found_set = set(found)
    if labels is not None:
        if str(labels) in LABEL_SETS:
            names = list(label_set(str(labels)))
        else:
            p = Path(labels)
            if not p.is_file():
                raise DatasetLayoutError(f"--labels {labels!r} is neither a built-in set ({', '.join(LABEL_SETS)}) "
                                  f"nor a file")
            names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        unknown = sorted(found_set - set(names))
        if unknown:
            raise DatasetLayoutError(f"classes {unknown[:10]} are not in the label set {labels!r}; fix the folder "
                              f"names or pass another --labels")
        return names
    if class_ind is not None and class_ind.is_file():
        names = _read_class_ind(class_ind)
        if found_set <= set(names):
            return names
    if default_set is not None:
        builtin = label_set(default_set)
        if found_set and found_set <= set(builtin):
            # Official relative order; the full set only when the data holds every class.
            return [n for n in builtin if n in found_set]
    return sorted(found_set)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
@dataclass
class IndexSummary:
    """What one run of the index stage found."""

    ok: int = 0
    failed: int = 0
    per_split: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (ok, error)
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (index, video_id, message)
    seconds: float = 0.0


def _collect(root: Path, annotations, splits, split_id) -> tuple[list[_Entry], str | None, Path | None]:
    """The entries to index, the built-in set matching the layout, and a classInd.txt if any."""
    if annotations:
        paths = [Path(a) for a in ([annotations] if isinstance(annotations, (str, Path)) else annotations)]
        rows = read_kinetics_csv(paths)
        _refuse_duplicates([(r["video_id"], r["where"]) for r in rows], "in the annotation CSVs")
        on_disk: dict[str, list[Path]] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                p = Path(dirpath) / name
                if not name.startswith(".") and p.suffix.lower() in VIDEO_EXTENSIONS:
                    on_disk.setdefault(p.stem, []).append(p)
        wanted = {r["video_id"] for r in rows}
        _refuse_duplicates([(s, str(p)) for s, ps in on_disk.items() if s in wanted for p in ps],
                           f"several files under {root} for one annotation")
        entries = []
        for r in rows:
            p = on_disk.get(r["video_id"])
            entries.append(_Entry(r["video_id"], str(p[0].resolve()) if p else "", r["label_name"], r["split"],
                                  "" if p else f"{r['video_id']}: no file {r['video_id']}.* under {root} "
                                               f"(annotated in {r['where']}); the download is missing"))
            if not r["label_name"]:
                entries[-1].error = entries[-1].error or f"{r['where']}: no label in the annotation CSV"
        return entries, "kinetics400", None

    found = scan_class_folders(root)
    broken = broken_links(root)  # listed as errors, never skipped silently
    if not found and not broken:
        raise DatasetLayoutError(f"no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) in class folders "
                          f"{root}/<class>/; check ROOT")
    _refuse_duplicates([(p.stem, str(p)) for _, p in found + broken], f"file names under {root}")
    if splits is None:
        return ([_Entry(p.stem, str(p.resolve()), cls, SPLIT_ALL) for cls, p in found]
                + [_Entry(p.stem, str(p.absolute()), cls, SPLIT_ALL, _broken_link_error(p)) for cls, p in broken],
                None, None)

    kind, table = read_split_files(splits, split_id)
    entries = []
    seen = set()
    for cls, p in found:
        split = table.get(p.stem, (SPLIT_UNUSED, ""))[0]
        entries.append(_Entry(p.stem, str(p.resolve()), cls, split))
        seen.add(p.stem)
    for cls, p in broken:
        entries.append(_Entry(p.stem, str(p.absolute()), cls, table.get(p.stem, (SPLIT_UNUSED, ""))[0],
                              _broken_link_error(p)))
        seen.add(p.stem)
    for stem, (split, cls) in sorted(table.items()):
        if stem not in seen and split != SPLIT_UNUSED:
            entries.append(_Entry(stem, "", cls, split,
                                  f"{stem}: listed in the {kind} split files of {splits} but no such video "
                                  f"under {root}/{cls or '<class>'}/"))
    class_ind = Path(splits) / "classInd.txt" if kind == "ucf101" else None
    return entries, kind, class_ind


def build_index(*, cache: str | Path, root: str | Path, annotations=None, splits: str | Path | None = None,
                split_id: int = 1, split_fractions=None, split_seed: int = 0, labels: str | Path | None = None,
                workers: int = 0, overwrite: bool = False, console=None, show_progress: bool = True) -> Manifest:
    """Build ``manifest.csv`` and ``labels.txt``; see :func:`run_index` for the arguments."""
    return run_index(cache=cache, root=root, annotations=annotations, splits=splits, split_id=split_id,
                     split_fractions=split_fractions, split_seed=split_seed, labels=labels, workers=workers,
                     overwrite=overwrite, console=console, show_progress=show_progress)[0]


#: The splits ``split_fractions`` draws, in the order of the fractions.
FRACTION_SPLITS = ("train", "val", "test")


def draw_splits(entries: list[_Entry], fractions, seed: int) -> dict[str, str]:
    """Give every entry a split from ``fractions`` (train, val, test), per class; returns the manifest meta."""
    from imdpipe.pipeline.splits import parse_fractions, stratified_split

    fractions = parse_fractions(fractions, count=len(FRACTION_SPLITS))
    groups = stratified_split([e.video_id for e in entries], [e.label_name for e in entries], fractions, seed)
    for e, g in zip(entries, groups):
        e.split = FRACTION_SPLITS[g]
    return {"split_fractions": ",".join(f"{f:g}" for f in fractions), "split_names": ",".join(FRACTION_SPLITS),
            "split_seed": str(int(seed)), "split_stratified_by": "class"}


def run_index(*, cache: str | Path, root: str | Path, annotations=None, splits: str | Path | None = None,
              split_id: int = 1, split_fractions=None, split_seed: int = 0, labels: str | Path | None = None,
              workers: int = 0, overwrite: bool = False, console=None,
              show_progress: bool = True) -> tuple[Manifest, IndexSummary]:
    """Build ``manifest.csv`` and ``labels.txt`` in ``cache`` from the videos under ``root``.

    Args:
        cache: the cache root directory (created if needed).
        root: the dataset folder (class folders, or anywhere Kinetics files live).
        annotations: one or more Kinetics annotation CSVs (switches to Kinetics mode).
        splits: folder holding UCF-101 or HMDB51 split files.
        split_id: which official split (1-3).
        split_fractions: for class folders without split files: ``"0.8,0.1,0.1"`` (or 3 numbers),
            the shares of train / val / test drawn per class (a fraction may be 0).
        split_seed: seed of that draw.
        labels: a built-in label set name, a file with one class a line, or None: classInd.txt order,
            else the built-in set of the layout (kinetics400, ucf101, hmdb51) when every class is in
            it (kept in its order), else class names sorted.
        workers: probing processes (0 = in this process).
        overwrite: replace an existing, different manifest (stores built for it become stale).
        console: a ``rich.console.Console`` (default: stderr).
        show_progress: draw a progress bar.

    Returns:
        The written :class:`~imdpipe.pipeline.manifest.Manifest` and the run's :class:`IndexSummary`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if split_id not in (1, 2, 3):
        raise DatasetLayoutError(f"split_id must be 1, 2 or 3 (the official splits), got {split_id}")
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    cache, root = Path(cache), Path(root)
    if split_fractions is not None and (annotations or splits is not None):
        raise DatasetLayoutError("--split-fractions draws splits for class folders without split information; "
                                 "it cannot be combined with --splits or --annotations (they bring their own)")
    entries, layout, class_ind = _collect(root, annotations, splits, split_id)
    meta = draw_splits(entries, split_fractions, split_seed) if split_fractions is not None else {}
    if layout is None:
        layout = next((s for s in ("ucf101", "hmdb51", "kinetics400")
                       if {e.label_name for e in entries} <= set(label_set(s))), None)
    names = resolve_labels(labels, sorted({e.label_name for e in entries if e.label_name}),
                           default_set=layout, class_ind=class_ind)
    label_of = {n: i for i, n in enumerate(names)}
    entries.sort(key=lambda e: (label_of.get(e.label_name, len(names)), e.video_id))

    to_probe = [i for i, e in enumerate(entries) if not e.error]
    results: dict[int, dict | str] = {}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        task = progress.add_task("index: probing videos", total=len(to_probe))
        paths = [entries[i].path for i in to_probe]
        if workers > 0 and len(paths) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for i, res in zip(to_probe, pool.map(_probe_safe, paths, chunksize=8)):
                    results[i] = res
                    progress.advance(task)
        else:
            for i, path in zip(to_probe, paths):
                results[i] = _probe_safe(path)
                progress.advance(task)

    records = []
    for i, e in enumerate(entries):
        res = results.get(i, e.error)
        rec = VideoRecord(index=i, video_id=e.video_id, path=e.path, label=label_of.get(e.label_name, -1),
                          label_name=e.label_name, split=e.split)
        if isinstance(res, dict):
            for k, v in res.items():
                setattr(rec, k, v)
        else:
            rec.status, rec.error = STATUS_ERROR, res
        records.append(rec)

    target = cache / MANIFEST_NAME
    if target.is_file() and not overwrite and target.read_bytes() != manifest_bytes(records, meta):
        raise FileExistsError(f"{target} exists and differs from the new index (videos, labels or probe "
                              f"results changed); stores built on it would no longer match. Pass "
                              f"--overwrite to replace it, or use another --cache.")
    manifest = write_manifest(cache, records, names, meta)

    summary = IndexSummary(seconds=time.perf_counter() - t0)
    counts: Counter = Counter()
    for r in records:
        counts[(r.split, r.status)] += 1
        if r.status == STATUS_OK:
            summary.ok += 1
        else:
            summary.failed += 1
            summary.errors.append((r.index, r.video_id, r.error))
    for split in sorted({r.split for r in records}):
        summary.per_split[split] = (counts[(split, STATUS_OK)], counts[(split, STATUS_ERROR)])
    return manifest, summary


def print_index_summary(manifest: Manifest, summary: IndexSummary, console=None, *, max_errors: int = 10) -> None:
    """The per-split ok/error table and the first error messages."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title="index summary")
    for col in ("split", "ok", "error"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, (ok, err) in summary.per_split.items():
        table.add_row(split, str(ok), str(err))
    table.add_row("[bold]total", f"[bold]{summary.ok}", f"[bold]{summary.failed}")
    console.print(table)
    console.print(f"{len(manifest)} videos, {len(manifest.labels)} classes -> "
                  f"{escape(str(manifest.cache_dir / MANIFEST_NAME))}", soft_wrap=True)
    for index, vid, message in summary.errors[:max_errors]:
        console.print(f"[red]error[/red] #{index} {escape(vid)}: {escape(message)}", soft_wrap=True)
    if len(summary.errors) > max_errors:
        console.print(f"... and {len(summary.errors) - max_errors} more (status=error rows of manifest.csv)")

