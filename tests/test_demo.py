"""The demo orchestration end to end, at toy sizes: every stage runs, the table has every method."""

import json

from imdpipe.demo import METHODS, DemoSettings, format_table, run_demo

TOY = DemoSettings(videos_per_class=3, video_size=(64, 80), duration_s=1.6, fps=10, soundbank_clips=24,
                   tagger_epochs=1, frames=8, crop_size=48, num_frames=4, epochs=1, batch_size=8)


def test_demo_runs_every_stage_and_writes_results(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(out=out, seed=3, settings=TOY, show_progress=False)
    assert [r["method"] for r in results] == [m[0] for m in METHODS]
    assert json.loads((out / "results.json").read_text()) == results
    for r in results:
        assert set(r) == {"method", "top1", "top5", "audio_dropped", "relevance_auc"}
        assert 0 <= r["top1"] <= r["top5"] <= 100
    imd = {r["method"]: r for r in results}
    # only IMD has a relevance network: it reports dropped audio and (synthetic truth exists) an AUC
    assert imd["IMD"]["audio_dropped"] is not None and 0 <= imd["IMD"]["audio_dropped"] <= 1
    assert imd["IMD"]["relevance_auc"] is not None
    assert imd["visual only"]["audio_dropped"] is None and imd["GMU"]["relevance_auc"] is None
    report = (out / "report.md").read_text()
    assert "| IMD* |" in report and "savld" in report.lower()
    # the dictionaries' relevance AUCs (text vs data vs hybrid) are reported beside the table
    assert "| text (the paper's) |" in report and "| hybrid |" in report
    assert (out / "cache" / "savld_report.json").is_file() and (out / "cache" / "savld_report.md").is_file()
    for run in ("visual-only", "late-concat", "gmu", "imd", "imd-aug"):
        assert (out / "runs" / run / "metrics.json").is_file()
    # the stores and the tagger are reused by a rerun of the same seed; another seed is refused here
    assert (out / "cache" / "relevance.zarr").is_dir() and (out / "tagger" / "tagger.json").is_file()
    try:
        run_demo(out=out, seed=4, settings=TOY, show_progress=False, methods=())
    except ValueError as e:
        assert "seed 3" in str(e)
    else:
        raise AssertionError("a demo dir made with another seed must be refused")
    assert "IMD" in str(format_table(results).columns[0]._cells)
