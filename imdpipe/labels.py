"""Built-in label sets shipped as package data, with their official names and order.

``kinetics400`` (400 classes, the official alphabetical order), ``ucf101`` (classInd.txt order),
``hmdb51`` (51 classes, alphabetical as in the split files) and ``audioset`` (527 rows of
``class_labels_indices.csv``: index, mid, display name).
"""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources

LABEL_SETS = ("kinetics400", "ucf101", "hmdb51", "audioset")


def _read(name: str) -> str:
    return resources.files("imdpipe.data").joinpath(name).read_text(encoding="utf-8")


@cache
def audioset_rows() -> tuple[tuple[int, str, str], ...]:
    """AudioSet ontology rows ``(index, mid, display_name)`` in model output order."""
    rows = csv.DictReader(_read("audioset.csv").splitlines())
    return tuple((int(r["index"]), r["mid"], r["display_name"]) for r in rows)


@cache
def label_set(name: str) -> tuple[str, ...]:
    """Class names of a built-in label set, in label order (AudioSet: display names)."""
    if name not in LABEL_SETS:
        raise ValueError(f"unknown label set {name!r}; built-in sets are {', '.join(LABEL_SETS)}")
    if name == "audioset":
        return tuple(r[2] for r in audioset_rows())
    return tuple(line for line in _read(f"{name}.txt").splitlines() if line)
