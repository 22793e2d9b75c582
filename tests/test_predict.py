"""``imdpipe predict`` on real mp4s: real flow stage, real (tiny) AST, a trained tiny head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from audio_fixtures import tiny_ast_dir, tone, write_clip
from train_fixtures import tiny_config
from typer.testing import CliRunner

from imdpipe.pipeline.manifest import VideoRecord, write_manifest

torch.set_num_threads(1)

CLASSES = ["clapping", "drumming", "juggling", "rowing", "typing", "walking"]


@pytest.fixture(scope="module")
def run_and_videos(tmp_path_factory):
    from imdpipe.pipeline.audio import extract_audio
    from imdpipe.pipeline.flow import extract_flow
    from imdpipe.train.loop import train

    root = tmp_path_factory.mktemp("predict")
    cache = root / "cache"
    records = []
    for c, name in enumerate(CLASSES):
        for k in range(2):
            rel = f"videos/{name}/{name}_{k}.mp4"
            audio = tone(200.0 * (c + 1), 2.0, 16000, 0.3) if k == 0 else None  # one silent video per class
            write_clip(cache / rel, 2.0, audio=audio, fps=10, size=32)
            records.append(VideoRecord(index=len(records), video_id=f"{name}_{k}", path=rel, label=c, label_name=name,
                                       split="train", duration_s=2.0, fps=10.0, n_frames=20, width=32, height=32,
                                       has_audio=audio is not None))
    write_manifest(cache, records, CLASSES)
    extract_flow(cache=cache, backend="dis", frames=6, size=(32, 40), workers=0, show_progress=False)
    extract_audio(cache=cache, model=tiny_ast_dir(root / "ast"), windows=1, workers=0, show_progress=False)
    run = root / "run"
    train(cache=cache, out=run, config=tiny_config(epochs=1, batch_size=6, fusion="late-concat", val_split="last"),
          show_progress=False)
    return run, cache, [cache / r.path for r in records]


def test_predict_cli_prints_five_classes(run_and_videos):
    from imdpipe.cli.main import app

    run, _, videos = run_and_videos
    result = CliRunner().invoke(app, ["predict", "--run-dir", str(run), str(videos[0]), str(videos[1])],
                                env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for video in videos[:2]:
        block = result.output.split(video.name)[1].split("rev:")[0]
        assert sum(name in block for name in CLASSES) == 5, block
    assert result.output.count("rev:") == 2
    assert "late-concat fusion has no relevance gate" in result.output
    assert "no audio track" in result.output  # videos[1] is silent


def test_predict_matches_cached_features(run_and_videos):
    """Recomputing the stages from the mp4 gives the same probabilities as the cached features."""
    from torch.utils.data import DataLoader

    from imdpipe.train.data import ClipDataset, open_cache
    from imdpipe.train.evaluate import score_views
    from imdpipe.train.predict import predict
    from imdpipe.train.runtime import load_checkpoint, model_from_checkpoint

    run, cache, videos = run_and_videos
    res = predict(run=run, videos=[videos[0], cache / "missing.mp4"], clips=2, crops=3)
    assert "error" in res[1] and "missing.mp4" in res[1]["error"]  # the bad file is reported, the rest goes on
    info = open_cache(cache, audio=True, relevance=False)
    ckpt = load_checkpoint(run / "checkpoint-last.pt")  # val_split last: nothing selected, no best file
    ds = ClipDataset(info, [0], mode="eval", relevance=False, num_frames=4, frame_stride=1, crop_size=32,
                     clips=2, crops=3)
    cached = score_views(model_from_checkpoint(ckpt, torch.device("cpu")), DataLoader(ds, batch_size=1),
                         modalities=("rgb", "flow", "audio"), device=torch.device("cpu"), amp=False)
    probs = cached["probs"][0]
    top = probs.topk(5)
    assert [n for n, _ in res[0]["top"]] == [CLASSES[i] for i in top.indices]
    # float16 storage of the AST embedding is the only difference
    assert np.allclose([p for _, p in res[0]["top"]], top.values.numpy(), atol=2e-3)


def test_predict_with_a_head_only_run_on_real_camera_videos(run_and_videos, tmp_path):
    """A head trained head-only (another fusion than the run's) on the run's cached streams, put back
    on those streams by predict: on real camera footage it gives exactly what the same full model,
    assembled by hand as an ordinary run checkpoint (the run's streams + the head's weights), gives."""
    from audio_fixtures import camera_clips

    from imdpipe.train.head_only import train_head_only
    from imdpipe.train.predict import predict
    from imdpipe.train.runtime import load_checkpoint
    from imdpipe.train.visual_cache import extract_visual

    run, cache, _ = run_and_videos
    extract_visual(cache=cache, run=run, train_views=2, videos_per_shard=4, show_progress=False)
    head = tmp_path / "head"
    train_head_only(cache=cache, out=head, config=tiny_config(epochs=2, batch_size=6, fusion="gmu", head_only=True,
                                                              val_split="last"), show_progress=False)
    head_ckpt = load_checkpoint(head / "checkpoint-last.pt")
    streams = {k: v for k, v in load_checkpoint(run / "checkpoint-last.pt")["model"].items() if k.startswith("visual.")}
    full = {key: value for key, value in head_ckpt.items() if key != "streams"}
    full["model"] = {**streams, **head_ckpt["model"]}
    torch.save(full, tmp_path / "full.pt")

    videos = camera_clips()
    got = predict(run=head, videos=videos, clips=2, crops=3)
    want = predict(run=tmp_path / "full.pt", videos=videos, clips=2, crops=3)
    for g, w in zip(got, want):
        assert "error" not in g, g
        assert [name for name, _ in g["top"]] == [name for name, _ in w["top"]]
        np.testing.assert_allclose([p for _, p in g["top"]], [p for _, p in w["top"]], rtol=0, atol=1e-6)
        assert len(g["top"]) == 5 and set(n for n, _ in g["top"]) <= set(CLASSES)
        assert g["rev"] is None and not g["has_audio"] and "no audio track" in g["audio_note"]
    # two different clips are two different inputs (the frames really were decoded and used)
    assert [p for _, p in got[0]["top"]] != [p for _, p in got[1]["top"]]
