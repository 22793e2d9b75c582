"""The demo end to end at toy sizes (every stage, every row, intervals, byte-identical reruns) and
its statistics against hand computations."""

import json
from dataclasses import replace

import numpy as np
import pytest
import zarr

from imdpipe.demo import (
    METHODS,
    DemoSettings,
    bootstrap_draws,
    bootstrap_top1,
    correct_matrix,
    format_table,
    markdown_table,
    reading,
    run_demo,
    summarize,
)

TOY = DemoSettings(videos_per_class=3, video_size=(64, 80), duration_s=1.6, fps=10, soundbank_clips=24,
                   tagger_epochs=1, frames=8, crop_size=48, num_frames=4, frame_stride=1, epochs=1, batch_size=8,
                   train_seeds=1, bootstrap=200)
ROW_KEYS = {"method", "top1", "top1_ci95", "top1_per_seed", "top5", "audio_dropped", "relevance_auc", "vs_baseline"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_demo(out=out, seed=3, settings=TOY, show_progress=False)


def test_demo_runs_every_stage_and_writes_results(demo):
    out, results = demo
    assert [r["method"] for r in results] == [m.name for m in METHODS]
    assert json.loads((out / "results.json").read_text()) == results
    for r in results:
        assert set(r) == ROW_KEYS
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["top1_per_seed"] == [r["top1"]]
        lo, hi = r["top1_ci95"]
        assert 0 <= lo <= r["top1"] <= hi <= 100
    rows = {r["method"]: r for r in results}
    # only IMD has a relevance network: it reports dropped audio and (synthetic truth exists) an AUC
    assert rows["IMD"]["audio_dropped"] is not None and 0 <= rows["IMD"]["audio_dropped"] <= 1
    assert rows["IMD"]["relevance_auc"] is not None
    assert rows["visual only"]["audio_dropped"] is None and rows["GMU"]["relevance_auc"] is None
    assert rows["late concat"]["vs_baseline"] is None
    assert rows["IMD"]["vs_baseline"]["top1_diff"] == pytest.approx(rows["IMD"]["top1"] - rows["late concat"]["top1"],
                                                                    abs=0.02)
    report, table = (out / "report.md").read_text(), (out / "table.md").read_text()
    assert table.startswith(markdown_table(results)) and table in report
    assert "| IMD* |" in report and "95% interval" in report and "savld" in report.lower()
    assert "IMD vs. late concat" in table
    # the dictionaries' relevance AUCs (text vs data vs hybrid) are reported beside the table
    assert "| text (the paper's) |" in report and "| hybrid |" in report
    assert (out / "cache" / "savld_report.json").is_file() and (out / "cache" / "savld_report.md").is_file()
    for run in ("visual-only", "late-concat", "gmu", "imd", "imd-aug"):
        assert (out / "runs" / f"{run}-seed0" / "metrics.json").is_file()
    # another seed is refused in this directory
    with pytest.raises(ValueError, match="seed 3"):
        run_demo(out=out, seed=4, settings=TOY, show_progress=False, methods=())
    assert "IMD" in str(format_table(results).columns[0]._cells)


def test_demo_same_seed_same_numbers(demo, tmp_path):
    """A fresh demo of the same seed (new videos, caches, tagger, runs), its row trained in this process
    instead of a worker, gives the same bytes."""
    out, results = demo
    again = run_demo(out=tmp_path / "again", seed=3, settings=replace(TOY, train_workers=0), show_progress=False,
                     methods=(METHODS[3],))
    for store, arrays in (("frames.zarr", ("rgb", "flow")), ("audio.zarr", ("embedding",))):
        for name in arrays:
            a = zarr.open_group(out / "cache" / store, mode="r")[name][:]
            b = zarr.open_group(tmp_path / "again" / "cache" / store, mode="r")[name][:]
            assert np.array_equal(a, b), (store, name)
    first = next(r for r in results if r["method"] == "IMD")
    assert again == [{**first, "vs_baseline": None}]  # same top-1, interval, top-5, dropped share, AUC


def _evaluation(ids, labels, predicted):
    return {"videos": {"video_id": ids, "label": labels, "predicted": predicted}, "top1": 0.0, "top5": 0.0,
            "audio_dropped": None, "relevance_auc": None}


def test_correct_matrix_aligns_videos_by_id():
    a = _evaluation(["x", "y", "z"], [0, 1, 2], [0, 0, 2])
    b = _evaluation(["z", "x", "y"], [2, 0, 1], [1, 0, 1])  # same videos, another order
    assert correct_matrix([a, b]).tolist() == [[True, False, True], [True, True, False]]
    with pytest.raises(ValueError, match="same test videos"):
        correct_matrix([a, _evaluation(["x", "y", "w"], [0, 1, 2], [0, 1, 2])])


def test_bootstrap_by_hand_and_paired_difference():
    correct = np.array([[1, 0, 1, 1], [0, 0, 1, 1]], dtype=bool)
    seeds = np.array([[0, 0], [1, 0]])
    videos = np.array([[0, 1, 2, 3], [3, 3, 2, 0]])
    # resample 1: seed 0 twice, all videos -> 3/4; resample 2: seeds 1 and 0 on videos 3,3,2,0 -> (3 + 4) / 8
    assert bootstrap_top1(correct, (seeds, videos)).tolist() == [75.0, 87.5]
    s, v = bootstrap_draws(3, 10, n_boot=50, seed=1)
    assert s.shape == (50, 3) and v.shape == (50, 10) and s.max() < 3 and v.max() < 10
    assert np.array_equal(v, bootstrap_draws(3, 10, n_boot=50, seed=1)[1])
    # a row always right by one video more than the baseline: its paired difference is never negative,
    # and the rows' intervals come from the same draws
    ids = [f"v{i}" for i in range(20)]
    labels = [0] * 20
    base = [_evaluation(ids, labels, [0] * 10 + [1] * 10)] * 3
    better = [_evaluation(ids, labels, [0] * 11 + [1] * 9)] * 3
    rows = summarize({"late concat": base, "IMD": better}, n_boot=500, seed=0)
    assert rows[0]["top1"] == 50.0 and rows[1]["top1"] == 55.0 and rows[0]["vs_baseline"] is None
    assert rows[1]["vs_baseline"]["top1_diff"] == 5.0 and rows[1]["vs_baseline"]["ci95"][0] >= 0
    lo, hi = rows[0]["top1_ci95"]
    assert lo < 50 < hi and abs((hi - lo) / 2 - 1.96 * 100 * (0.25 / 20) ** 0.5) < 4  # binomial: +-21.9 points
    assert rows == summarize({"late concat": base, "IMD": better}, n_boot=500, seed=0)  # seeded


def test_method_rows_are_distinct_and_share_one_recipe(demo):
    """Every trained row's config.yaml equals every other's but for what defines the row."""
    from dataclasses import asdict

    from imdpipe.demo import _slug
    from imdpipe.train.config import load_config

    out, _ = demo
    assert len({m.name for m in METHODS}) == len(METHODS)
    assert sum(m.cross_modal_p > 0 for m in METHODS) == 1
    # what defines a row, and the relevance targets' settings, recorded only by the rows trained on them
    per_row = {"fusion", "modalities", "cross_modal_p", "relevance"}
    configs = [asdict(load_config(out / "runs" / f"{_slug(m.name)}-seed0" / "config.yaml")) for m in METHODS]
    shared = [{k: v for k, v in c.items() if k not in per_row} for c in configs]
    assert all(c == shared[0] for c in shared)
    assert [(c["fusion"], tuple(c["modalities"]), c["cross_modal_p"]) for c in configs] == [
        (m.fusion, tuple(m.modalities), m.cross_modal_p) for m in METHODS]


def _row(name, top1, diff=None, ci=None):
    vs = None if diff is None else {"baseline": "late concat", "top1_diff": diff, "ci95": ci}
    return {"method": name, "top1": top1, "top1_ci95": [top1 - 5, top1 + 5], "top1_per_seed": [top1], "top5": 100.0,
            "audio_dropped": 0.4 if name == "IMD" else None, "relevance_auc": None, "vs_baseline": vs}


@pytest.mark.parametrize(("diff", "ci", "says", "never"), [
    (3.1, [-0.8, 7.0], "does not show that IMD beats late concat", "IMD does not beat"),
    (-2.3, [-6.2, 1.6], "IMD does not beat late concat here (-2.3 points)", "does not show"),
    (-6.2, [-10.9, -1.6], "IMD is worse than late concat here", "does not beat"),
    (4.7, [0.8, 9.4], "better: the data supports it", "likely reason"),
])
def test_reading_states_what_the_interval_supports(diff, ci, says, never):
    evaluations = {"late concat": [_evaluation(["a", "b"], [0, 1], [0, 1])]}
    results = [_row("late concat", 75.0), _row("IMD", 75.0 + diff, diff, ci)]
    text = reading(results, evaluations)
    assert says in text and never not in text
    assert "one video is 50.0 points" in text
