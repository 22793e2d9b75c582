"""Seeded, class-stratified splits: `index --split-fractions` on class folders without split files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.pipeline.index import DatasetLayoutError, build_index
from imdpipe.pipeline.manifest import read_manifest
from imdpipe.pipeline.media import write_mp4
from imdpipe.pipeline.splits import parse_fractions, stratified_split

CLASSES = {"archery": 10, "bowling": 20, "surfing": 7}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """Class folders of real (tiny) mp4s and no split files."""
    root = tmp_path_factory.mktemp("folders")
    frames = np.full((2, 32, 32, 3), 100, np.uint8)
    for cls, n in CLASSES.items():
        for i in range(n):
            write_mp4(root / cls / f"{cls}_{i:02d}.mp4", frames, 8)
    return root


def test_stratified_split_counts_and_independence():
    keys = [f"a{i:02d}" for i in range(20)] + [f"b{i:02d}" for i in range(9)]
    classes = ["a"] * 20 + ["b"] * 9
    groups = stratified_split(keys, classes, (0.8, 0.1, 0.1), seed=3)
    assert Counter(g for g, c in zip(groups, classes) if c == "a") == {0: 16, 1: 2, 2: 2}
    assert Counter(g for g, c in zip(groups, classes) if c == "b") == {0: 7, 1: 1, 2: 1}  # 0.9 rounds to 1
    # a class's draw depends only on its own items and the seed: removing class b changes nothing for a
    assert stratified_split(keys[:20], classes[:20], (0.8, 0.1, 0.1), seed=3) == groups[:20]
    # nor does the order the items come in
    perm = np.random.default_rng(0).permutation(len(keys))
    shuffled = stratified_split([keys[i] for i in perm], [classes[i] for i in perm], (0.8, 0.1, 0.1), seed=3)
    assert [shuffled[list(perm).index(i)] for i in range(len(keys))] == groups
    assert stratified_split(keys, classes, (0.8, 0.1, 0.1), seed=4) != groups
    # a tiny class never gets more than it has
    assert Counter(stratified_split(["x", "y"], ["c", "c"], (0.0, 0.5, 0.5), seed=0)) == {1: 1, 2: 1}
    with pytest.raises(ValueError, match="sum to 1"):
        parse_fractions("0.8,0.1")
    with pytest.raises(ValueError, match="expected 3 split fractions"):
        parse_fractions("0.9,0.1", count=3)
    with pytest.raises(ValueError, match="comma-separated numbers"):
        parse_fractions("a,b,c")


def test_index_split_fractions_are_stratified_seeded_and_recorded(folders, tmp_path):
    m = build_index(cache=tmp_path / "c", root=folders, split_fractions="0.8,0.1,0.1", split_seed=7,
                    show_progress=False)
    per_class = Counter((r.label_name, r.split) for r in m.records)
    expected = {"archery": (8, 1, 1), "bowling": (16, 2, 2), "surfing": (5, 1, 1)}  # 0.7 videos round to 1
    for cls, counts in expected.items():
        assert tuple(per_class[(cls, s)] for s in ("train", "val", "test")) == counts, cls
    assert {r.split for r in m.records} == {"train", "val", "test"}

    text = (tmp_path / "c" / "manifest.csv").read_text()
    assert text.startswith("# split_fractions=0.8,0.1,0.1\n")
    back = read_manifest(tmp_path / "c")
    assert back.meta == {"split_fractions": "0.8,0.1,0.1", "split_names": "train,val,test", "split_seed": "7",
                         "split_stratified_by": "class"}
    assert [r.split for r in back.records] == [r.split for r in m.records] and back.sha256 == m.sha256

    # the same seed is a no-op; another seed draws other splits, refused over the existing manifest
    assert build_index(cache=tmp_path / "c", root=folders, split_fractions="0.8,0.1,0.1", split_seed=7,
                       show_progress=False).sha256 == m.sha256
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_index(cache=tmp_path / "c", root=folders, split_fractions="0.8,0.1,0.1", split_seed=8,
                    show_progress=False)
    with pytest.raises(DatasetLayoutError, match="cannot be combined with --splits"):
        build_index(cache=tmp_path / "d", root=folders, splits=folders, split_fractions="0.8,0.1,0.1",
                    show_progress=False)


def test_cli_index_split_fractions(folders, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["index", str(folders), "--cache", str(tmp_path / "c"), "--quiet",
                            "--split-fractions", "0.7,0.15,0.15", "--split-seed", "1"])
    assert r.exit_code == 0, r.output
    assert read_manifest(tmp_path / "c").meta["split_fractions"] == "0.7,0.15,0.15"
    r = runner.invoke(app, ["index", str(folders), "--cache", str(tmp_path / "d"), "--quiet",
                            "--split-fractions", "0.7,0.2"])
    assert r.exit_code == 2 and "expected 3 split fractions" in r.output
