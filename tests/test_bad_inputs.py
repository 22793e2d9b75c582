"""Bad inputs become one clear message (or a stated warning), never a traceback or a silent surprise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from synth_fixtures import build_synth
from train_fixtures import make_cache, tiny_config
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.pipeline.index import build_index
from imdpipe.train.loop import train

runner = CliRunner()


def test_index_lists_a_broken_symlink_as_an_error(tmp_path_factory, tmp_path):
    synth = build_synth(tmp_path_factory)
    root = tmp_path / "videos"
    for cls in (synth / "videos").iterdir():
        (root / cls.name).mkdir(parents=True)
        for video in cls.iterdir():
            (root / cls.name / video.name).symlink_to(video)
    gone = root / "yoga" / "yoga_lost.mp4"
    gone.symlink_to(tmp_path / "nowhere" / "yoga_lost.mp4")
    manifest = build_index(cache=tmp_path / "cache", root=root, show_progress=False)
    (row,) = [r for r in manifest.records if r.video_id == "yoga_lost"]
    assert row.status == "error" and "broken symbolic link" in row.error and str(gone) in row.error
    assert sum(r.ok for r in manifest.records) == len(manifest.records) - 1


def test_index_with_a_missing_annotation_csv_is_one_message(tmp_path):
    result = runner.invoke(app, ["index", str(tmp_path), "--annotations", "/nonexistent.csv",
                                 "--cache", str(tmp_path / "c")])
    assert result.exit_code == 2 and "/nonexistent.csv: no such file" in result.output
    assert "Traceback" not in result.output


def test_evaluate_with_a_video_as_run_dir_is_one_message(tmp_path):
    video = tmp_path / "some.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    cache = make_cache(tmp_path / "cache", train_per_class=2, test_per_class=1)
    result = runner.invoke(app, ["evaluate", "--run-dir", str(video), "--cache", str(cache)])
    assert result.exit_code == 2 and "is not an imdpipe checkpoint" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_extract_audio_on_cuda_without_a_gpu_is_one_message(tmp_path):
    cache = make_cache(tmp_path / "cache", train_per_class=2, test_per_class=1)
    result = runner.invoke(app, ["extract-audio", "--cache", str(cache), "--model", str(tmp_path),
                                 "--device", "cuda", "--quiet"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output and "--device cpu" in result.output
    assert "Traceback" not in result.output


def test_train_warns_once_with_the_numbers_for_repeats_and_upscales(tmp_path):
    from rich.console import Console

    cache = make_cache(tmp_path / "cache", T=6, size=(36, 44))
    out = Path(tmp_path / "log.txt")
    with open(out, "w") as f:
        train(cache=cache, out=tmp_path / "run", config=tiny_config(epochs=1, num_frames=8, frame_stride=1,
                                                                     crop_size=48),
              show_progress=False, console=Console(file=f, width=300))
    text = out.read_text()
    assert text.count("warning:") == 2
    assert "--num-frames 8 with --frame-stride 1 spans 8 cached positions but frames.zarr holds T=6" in text
    assert "repeats its last position 2 time(s)" in text
    assert "--crop-size 48 is larger than the cached frames' short side (36x44)" in text and "1.33x" in text
