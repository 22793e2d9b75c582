"""Seeded, class-stratified splits: ``index --split-fractions`` and the trainer's validation hold-out.

Each class is split on its own: its items are sorted by key, permuted by a generator seeded with
``(seed, crc32(class))`` and cut into groups of ``floor(fraction * n + 0.5)`` items (the first
group takes what the others leave). So a class's assignment depends only on its own items, the
fractions and the seed: adding a class or a video of another class changes nothing else, and
every class keeps the fractions up to rounding.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Sequence

import numpy as np


def parse_fractions(text: str | Sequence[float], *, count: int | None = None) -> tuple[float, ...]:
    """``"0.8,0.1,0.1"`` (or a sequence) -> fractions in [0, 1] summing to 1."""
    try:
        values = tuple(float(x) for x in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise ValueError(f"split fractions should be comma-separated numbers such as 0.8,0.1,0.1, got {text!r}") \
            from None
    if count is not None and len(values) != count:
        raise ValueError(f"expected {count} split fractions (train,val,test), got {len(values)}: {text!r}")
    if any(not 0 <= v <= 1 for v in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions should each be in [0, 1] and sum to 1, got {values}")
    return values


def stratified_split(keys: Sequence[str], classes: Sequence[Hashable], fractions: Sequence[float],
                     seed: int) -> list[int]:
    """The group (index into ``fractions``) of each item, stratified by class and seeded.

    Args:
        keys: a unique, stable key per item (video ids): the order inside a class before the draw.
        classes: each item's class.
        fractions: the share of each group; group 0 takes the remainder of every class.
        seed: the draw's seed.
    """
    if len(keys) != len(classes):
        raise ValueError(f"keys and classes should have one entry per item, got {len(keys)} and {len(classes)}")
    by_class: dict[Hashable, list[int]] = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    groups = [0] * len(keys)
    for c, items in by_class.items():
        items.sort(key=lambda i: keys[i])
        rng = np.random.default_rng([int(seed), zlib.crc32(str(c).encode("utf-8"))])
        order = [items[j] for j in rng.permutation(len(items))]
        n = len(order)
        counts = [math.floor(f * n + 0.5) for f in fractions[1:]]
        while sum(counts) > n:  # rounding up in every group can overshoot a tiny class
            counts[counts.index(max(counts))] -= 1
        start = n - sum(counts)
        for g, k in enumerate(counts, 1):
            for i in order[start:start + k]:
                groups[i] = g
            start += k
    return groups
