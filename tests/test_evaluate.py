"""Multi-view evaluation: metrics.json, the relevance AUC, refusing a mismatched cache."""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import make_cache, tiny_config
from typer.testing import CliRunner

from imdpipe.train.evaluate import mann_whitney_auc
from imdpipe.train.loop import train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    cache = make_cache(root / "cache", classes=3, train_per_class=6, test_per_class=3)
    run = root / "run"
    train(cache=cache, out=run, config=tiny_config(epochs=2, batch_size=6), show_progress=False)
    return cache, run


def test_auc_matches_hand_computation():
    # positives 0.8, 0.4 (tie with a negative), negatives 0.4, 0.1, 0.5
    scores, pos = [0.8, 0.4, 0.4, 0.1, 0.5], [1, 1, 0, 0, 0]
    # pairs: 0.8 beats all 3; 0.4 beats 0.1, ties 0.4 (1/2), loses to 0.5 -> (3 + 1.5) / 6
    assert mann_whitney_auc(scores, pos) == pytest.approx(4.5 / 6)
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=40), rng.random(40) < 0.4
    s[::5] = 0.0  # ties
    brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(s[y], s[~y])])
    assert mann_whitney_auc(s, y) == pytest.approx(brute)
    assert mann_whitney_auc([0.1, 0.2], [1, 1]) is None


def test_evaluate_cli_twelve_views_writes_metrics(trained, tmp_path):
    from imdpipe.cli.main import app

    cache, run = trained
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "--run-dir", str(run), "--cache", str(cache), "--split", "test",
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["views"] == 12 and m["clips"] == 4 and m["crops"] == 3
    assert m["num_clips"] == 9
    assert 0 <= m["top1"] <= m["top5"] == 100.0  # 3 classes: the top-5 always holds the label
    assert set(m["per_class"]) == {"class_0", "class_1", "class_2"}
    assert all(v["n"] == 3 for v in m["per_class"].values())
    assert sum(np.diag(m["confusion"])) == round(m["top1"] * 9 / 100)
    assert m["audio_dropped"] is not None and 0 <= m["audio_dropped"]["overall"] <= 1
    assert set(m["audio_dropped"]["per_class"]) == set(m["per_class"])
    # ground_truth.csv beside the manifest is found; the AUC is a probability
    assert m["ground_truth"].endswith("ground_truth.csv") and 0 <= m["relevance_auc"] <= 1
    assert m["relevance_auc_n"] == 9
    assert (out / "confusion.png").stat().st_size > 1000


def test_evaluate_views_and_auc_null_without_ground_truth(trained, tmp_path):
    from imdpipe.train.evaluate import evaluate

    cache, run = trained
    (cache / "ground_truth.csv").rename(tmp_path / "gt.csv")
    try:
        m = evaluate(run=run, cache=cache, clips=2, crops=1, out=tmp_path, show_progress=False)
        assert m["views"] == 2 and m["relevance_auc"] is None and m["ground_truth"] is None
        m2 = evaluate(run=run, cache=cache, clips=1, crops=1, out=tmp_path, ground_truth=tmp_path / "gt.csv",
                      show_progress=False)
        assert m2["relevance_auc"] is not None
    finally:
        (tmp_path / "gt.csv").rename(cache / "ground_truth.csv")


def test_evaluate_refuses_cache_with_other_frame_settings(trained, tmp_path):
    from imdpipe.train.evaluate import evaluate

    _, run = trained
    other = make_cache(tmp_path / "other", classes=3, train_per_class=1, test_per_class=1,
                       frames_settings={"backend": "farneback"})
    with pytest.raises(ValueError, match="frames.zarr setting backend"):
        evaluate(run=run, cache=other, show_progress=False)
    relabelled = make_cache(tmp_path / "relabel", classes=4, train_per_class=1, test_per_class=1)
    with pytest.raises(ValueError, match="labels"):
        evaluate(run=run, cache=relabelled, show_progress=False)
