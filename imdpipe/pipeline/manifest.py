"""The dataset manifest: ``manifest.csv`` and ``labels.txt`` at the root of a cache.

Every stage store is indexed by the manifest's ``index`` column (the row number), and records
the manifest's SHA-256 so a store built for one manifest is never mixed with another.

When the index stage drew the splits itself (``--split-fractions``), the rule is recorded in
``# key=value`` lines above the CSV header (``pandas.read_csv(path, comment="#")`` skips them);
:attr:`Manifest.meta` holds them.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from imdpipe.contract import LABELS_NAME, MANIFEST_NAME

STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass
class VideoRecord:
    """One row of ``manifest.csv``."""

    index: int
    video_id: str
    path: str
    label: int
    label_name: str
    split: str
    duration_s: float = 0.0
    fps: float = 0.0
    n_frames: int = 0
    width: int = 0
    height: int = 0
    has_audio: bool = False
    status: str = STATUS_OK
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


MANIFEST_COLUMNS = tuple(f.name for f in fields(VideoRecord))
_CASTS = {f.name: f.type for f in fields(VideoRecord)}


def _cast(name: str, value: str):
    kind = _CASTS[name]
    if kind == "int":
        return int(value) if value != "" else 0
    if kind == "float":
        return float(value) if value != "" else 0.0
    if kind == "bool":
        return value.strip().lower() in ("1", "true", "yes")
    return value


@dataclass
class Manifest:
    """A cache's manifest: the video records in index order, the class names, and the file hash."""

    records: list[VideoRecord]
    labels: list[str]
    sha256: str
    cache_dir: Path
    meta: dict[str, str] = field(default_factory=dict)  # the "# key=value" lines above the header

    def __len__(self) -> int:
        return len(self.records)

    def ok_indices(self, split: str | None = None) -> list[int]:
        """Indices of videos the index stage could read (optionally of one split)."""
        return [r.index for r in self.records if r.ok and (split is None or r.split == split)]

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]


def manifest_bytes(records: list[VideoRecord], meta: dict[str, str] | None = None) -> bytes:
    buf = io.StringIO()
    for key, value in (meta or {}).items():
        if "=" in key or "\n" in key + value:
            raise ValueError(f"manifest meta {key!r}={value!r} may hold neither '=' in the key nor newlines")
        buf.write(f"# {key}={value}\n")
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        row = asdict(rec)
        row["has_audio"] = int(rec.has_audio)
        row["duration_s"] = f"{rec.duration_s:.4f}"
        row["fps"] = f"{rec.fps:.4f}"
        writer.writerow(row)
    return buf.getvalue().encode("utf-8")


def write_manifest(cache_dir: str | Path, records: list[VideoRecord], labels: list[str],
                   meta: dict[str, str] | None = None) -> Manifest:
    """Write ``manifest.csv`` (with ``meta`` as ``# key=value`` lines on top) and ``labels.txt``
    atomically (write, then rename)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(records):
        if rec.index != i:
            raise ValueError(f"manifest records must be in index order: row {i} has index {rec.index}")
    data = manifest_bytes(records, meta)
    _atomic_write(cache_dir / MANIFEST_NAME, data)
    _atomic_write(cache_dir / LABELS_NAME, ("\n".join(labels) + "\n").encode("utf-8"))
    return Manifest(records=records, labels=list(labels), sha256=hashlib.sha256(data).hexdigest(),
                    cache_dir=cache_dir, meta=dict(meta or {}))


def read_manifest(cache_dir: str | Path) -> Manifest:
    """Read a cache's manifest; a clear error if the index stage has not run there."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run `imdpipe index --cache {cache_dir} ...` first to build the manifest."
        )
    data = path.read_bytes()
    lines = data.decode("utf-8").splitlines(keepends=True)
    meta = {}
    while lines and lines[0].startswith("#"):
        key, _, value = lines.pop(0)[1:].strip().partition("=")
        meta[key.strip()] = value.strip()
    reader = csv.DictReader(io.StringIO("".join(lines)))
    missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}; rebuild it with `imdpipe index`.")
    records = [VideoRecord(**{k: _cast(k, row[k]) for k in MANIFEST_COLUMNS}) for row in reader]
    labels_path = cache_dir / LABELS_NAME
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path} does not exist: rebuild the cache with `imdpipe index`.")
    labels = [line for line in labels_path.read_text(encoding="utf-8").splitlines() if line]
    return Manifest(records=records, labels=labels, sha256=hashlib.sha256(data).hexdigest(),
                    cache_dir=cache_dir, meta=meta)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
