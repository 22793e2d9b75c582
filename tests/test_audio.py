"""extract-audio: decoding, windows, fbank crops, the stored AST outputs, resume and errors."""

import numpy as np
import pytest
import torch
import zarr
from audio_fixtures import TINY_MAX_LENGTH, make_cache, tiny_ast_dir, tone, write_clip
from typer.testing import CliRunner

from imdpipe.labels import label_set
from imdpipe.pipeline import audio as A
from imdpipe.pipeline.store import SettingsMismatch, StageStore

SR = 16000


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_ast_dir(tmp_path_factory.mktemp("tiny_ast"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return A.load_audio_model(tiny_dir, device="cpu", dtype="float32")


def _clips():
    stereo = np.stack([tone(440, 3.0, 44100, 0.5), tone(1000, 3.0, 44100, 0.3)])
    return [("stereo", 3.0, stereo, 44100),
            ("short", 0.8, tone(300, 0.8, SR, 0.4), SR),
            ("silent", 2.0, None, SR),
            ("broken", 1.0, None, SR),
            ("long", 4.0, tone(700, 4.0, 22050, 0.6) * np.linspace(0, 1, 4 * 22050, dtype=np.float32), 22050)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache"), _clips(), broken=("broken",))


def _reference(path, start_frame, net, fe):
    """Independent recomputation: decode, slice the window's samples, extractor, model."""
    wave, has_audio = A.decode_audio(path)
    assert has_audio
    n = 400 + (fe.max_length - 1) * 160
    a = start_frame * 160
    x = fe(wave[a:a + n], sampling_rate=SR, return_tensors="pt")["input_values"]
    with torch.no_grad():
        h = net.audio_spectrogram_transformer(x).last_hidden_state  # (1, tokens, D)
        logits = net(x).logits
    return ((h[:, 0] + h[:, 1]) / 2)[0].numpy(), logits[0].numpy()


# -- decoding -------------------------------------------------------------------------------------
def test_decode_is_channel_mean_resampled_to_16k_with_exact_length(tmp_path):
    sr = 44100
    left, right = tone(440, 2.0, sr, 0.5), tone(1000, 2.0, sr, 0.3)
    path = write_clip(tmp_path / "st.mp4", 2.0, audio=np.stack([left, right]), sample_rate=sr)
    wave, has_audio = A.decode_audio(path)
    assert has_audio and wave.dtype == np.float32
    assert len(wave) == 2 * SR  # AAC priming dropped and the padded last frame trimmed
    spectrum = np.abs(np.fft.rfft(wave[:SR])) / (SR / 2)  # 1 Hz bins over one second
    # mean of channels: 0.5/2 at 440 Hz and 0.3/2 at 1 kHz (FFmpeg's downmix would give /sqrt(2))
    assert spectrum[440] == pytest.approx(0.25, abs=0.01)
    assert spectrum[1000] == pytest.approx(0.15, abs=0.01)
    assert spectrum[np.r_[100:400, 480:960, 1040:8000]].max() < 0.01
    # sample-aligned with the source (no priming offset): compare with the ideal mono signal
    t = np.arange(2 * SR) / SR
    ideal = 0.25 * np.sin(2 * np.pi * 440 * t) + 0.15 * np.sin(2 * np.pi * 1000 * t)
    err = wave[800:-800] - ideal[800:-800]
    assert np.sqrt(np.mean(err ** 2)) < 0.02
    shifted = wave[800:-800] - ideal[801:-799]
    assert np.sqrt(np.mean(shifted ** 2)) > np.sqrt(np.mean(err ** 2))


def test_decode_without_audio_track_and_broken_file(tmp_path):
    path = write_clip(tmp_path / "mute.mp4", 1.0, audio=None)
    wave, has_audio = A.decode_audio(path)
    assert not has_audio and wave.size == 0
    assert A.probe_duration(path) == pytest.approx(1.0)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(Exception, match="Invalid data"):
        A.decode_audio(bad)


# -- windows and features -------------------------------------------------------------------------
def test_window_starts_centre_short_and_spread_long():
    np.testing.assert_allclose(A.window_starts(5.0, 1), [(5.0 - 10.24) / 2])
    np.testing.assert_allclose(A.window_starts(30.0, 1), [(30.0 - 10.24) / 2])
    np.testing.assert_allclose(A.window_starts(30.0, 3), [0.0, 9.88, 19.76])
    np.testing.assert_allclose(A.window_starts(4.0, 3, 1.28), [0.0, 1.36, 2.72])
    np.testing.assert_allclose(A.window_starts(0.8, 2, 1.28), [-0.24, -0.24])  # shorter: all centred
    with pytest.raises(ValueError, match="windows"):
        A.window_starts(5.0, 0)


def test_fbank_crop_equals_extractor_on_the_window_samples(tiny):
    _, fe, _ = tiny
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(3 * SR)).astype(np.float32)
    full = A.fbank(wave, fe)
    assert full.shape == (1 + (3 * SR - 400) // 160, 128)
    n = 400 + (fe.max_length - 1) * 160
    for f0 in (0, 37, 151):
        crop = A.crop_windows(full, [f0], fe.max_length, A.pad_value(fe))[0]
        direct = fe(wave[f0 * 160:f0 * 160 + n], sampling_rate=SR, return_tensors="np")["input_values"][0]
        np.testing.assert_allclose(crop, direct, atol=1e-5)
    # a short clip centred in the window: padding (0 in fbank space, as the extractor pads) around it
    short = wave[:8000]  # 0.5 s -> 48 frames
    frames = A.start_frames(A.window_starts(0.5, 1, A.window_seconds(fe)), fe)
    assert frames.tolist() == [-39]  # (0.5 - 1.28) / 2 s = -0.39 s
    win = A.crop_windows(A.fbank(short, fe), frames, fe.max_length, A.pad_value(fe))[0]
    padded = fe(short, sampling_rate=SR, return_tensors="np")["input_values"][0]  # extractor pads at the end
    np.testing.assert_allclose(win[39:39 + 48], padded[:48], atol=1e-6)
    assert np.all(win[:39] == A.pad_value(fe)) and np.all(win[39 + 48:] == A.pad_value(fe))
    np.testing.assert_allclose(padded[48:], A.pad_value(fe), atol=1e-6)
    assert A.pad_value(fe) == pytest.approx(4.2677393 / (2 * 4.5689974))


# -- the stage ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extracted(cache, tiny_dir):
    summary = A.extract_audio(cache=cache, model=tiny_dir, windows=1, batch_size=3, workers=1, device="cpu",
                              show_progress=False, videos_per_shard=2)
    return summary, zarr.open_group(cache / "audio.zarr", mode="r")


def test_store_layout_attrs_and_per_video_state(extracted, tiny_dir, tiny):
    summary, g = extracted
    net = tiny[0]
    assert (summary.ok, summary.failed) == (4, 1)
    assert summary.errors[0][1] == "videos/broken.mp4" and "InvalidDataError" in summary.errors[0][2]
    assert g["embedding"].shape == (5, 1, 64) and g["embedding"].dtype == np.float16
    assert g["logits"].shape == (5, 1, 527) and g["logits"].dtype == np.float16
    assert g["window_start_s"].dtype == np.float32 and g["has_audio"].dtype == bool
    assert g["embedding"].attrs["_ARRAY_DIMENSIONS"] == ["video", "window", "feature"]
    assert g["done"][:].tolist() == [True, True, True, False, True]
    assert g["has_audio"][:].tolist() == [True, True, False, False, True]
    assert "InvalidDataError" in str(g["error"][3])
    labels = g.attrs["audio_labels"]
    assert labels == [net.config.id2label[i] for i in range(527)] == list(label_set("audioset"))
    s = g.attrs["settings"]
    assert s["model"] == str(tiny_dir.resolve()) and s["windows"] == 1 and s["dtype"] == "float32"
    assert s["window_s"] == pytest.approx(TINY_MAX_LENGTH / 100)
    assert g.attrs["feature_extractor"]["max_length"] == TINY_MAX_LENGTH
    assert g.attrs["stage"] == "audio" and len(s["model_sha256"]) == 64
    # no audio track: done, zeros; window centred on the video timeline
    assert not g["embedding"][2].any() and not g["logits"][2].any()
    np.testing.assert_allclose(g["window_start_s"][:, 0], [0.86, -0.24, 0.36, 0.0, 1.36], atol=1e-6)


def test_stored_outputs_equal_an_independent_recomputation(extracted, cache, tiny):
    _, g = extracted
    net, fe, _ = tiny
    for index, name, f0 in ((0, "stereo", 86), (4, "long", 136)):
        emb, logits = _reference(cache / f"videos/{name}.mp4", f0, net, fe)
        np.testing.assert_allclose(g["embedding"][index, 0].astype(np.float32), emb, atol=3e-3, rtol=2e-3)
        np.testing.assert_allclose(g["logits"][index, 0].astype(np.float32), logits, atol=3e-3, rtol=2e-3)
        assert np.abs(emb).max() > 0.1  # not a trivially zero comparison


def test_windows_batched_across_videos_equal_per_video_embedding(cache, tiny_dir, tmp_path):
    work = make_cache(tmp_path, [c for c in _clips() if c[0] != "broken"])
    A.extract_audio(cache=work, model=tiny_dir, windows=3, batch_size=4, workers=0, device="cpu",
                    show_progress=False)
    g = zarr.open_group(work / "audio.zarr", mode="r")
    net, fe, settings = A.load_store_model(work / "audio.zarr", device="cpu")
    assert settings["windows"] == 3
    for i, name in enumerate(["stereo", "short", "silent", "long"]):
        ref = A.embed_video(work / f"videos/{name}.mp4", model=net, feature_extractor=fe, settings=settings)
        np.testing.assert_allclose(g["embedding"][i].astype(np.float32), ref["embedding"], atol=3e-3, rtol=2e-3)
        np.testing.assert_allclose(g["logits"][i].astype(np.float32), ref["logits"], atol=3e-3, rtol=2e-3)
        np.testing.assert_allclose(g["window_start_s"][i], ref["window_start_s"])
        assert bool(g["has_audio"][i]) == ref["has_audio"]
    np.testing.assert_allclose(g["window_start_s"][3], [0.0, 1.36, 2.72], atol=1e-6)
    # the long clip fades in: its windows differ
    assert np.abs(g["embedding"][3, 0].astype(np.float32) - g["embedding"][3, 2].astype(np.float32)).max() > 1e-2


def test_kill_and_resume_gives_the_same_store(cache, tiny_dir, tmp_path, monkeypatch):
    clips = [c for c in _clips() if c[0] != "broken"]
    ref_cache = make_cache(tmp_path / "ref", clips)
    A.extract_audio(cache=ref_cache, model=tiny_dir, batch_size=1, workers=0, device="cpu",
                    videos_per_shard=1, show_progress=False)
    work = make_cache(tmp_path / "work", clips)
    real, calls = A.forward_windows, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is killed mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "forward_windows", dying)
    with pytest.raises(KeyboardInterrupt):
        A.extract_audio(cache=work, model=tiny_dir, batch_size=1, workers=0, device="cpu",
                        videos_per_shard=1, show_progress=False)
    partial = StageStore.open_existing(work / "audio.zarr").done_mask()
    assert 0 < partial.sum() < len(clips)
    monkeypatch.setattr(A, "forward_windows", real)
    summary = A.extract_audio(cache=work, model=tiny_dir, batch_size=1, workers=0, device="cpu",
                              videos_per_shard=1, show_progress=False)
    assert summary.already_done == partial.sum() and summary.ok == len(clips) - partial.sum()
    a, b = zarr.open_group(ref_cache / "audio.zarr"), zarr.open_group(work / "audio.zarr")
    for name in ("embedding", "logits", "window_start_s", "has_audio", "done"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_settings_mismatch_is_refused_and_overwrite_rebuilds(cache, tiny_dir, tmp_path):
    work = make_cache(tmp_path, [_clips()[1]])
    A.extract_audio(cache=work, model=tiny_dir, workers=0, device="cpu", show_progress=False)
    with pytest.raises(SettingsMismatch, match="windows"):
        A.extract_audio(cache=work, model=tiny_dir, windows=2, workers=0, device="cpu", show_progress=False)
    summary = A.extract_audio(cache=work, model=tiny_dir, windows=2, workers=0, device="cpu",
                              overwrite=True, show_progress=False)
    assert summary.ok == 1 and zarr.open_group(work / "audio.zarr")["embedding"].shape == (1, 2, 64)


def test_offline_hub_id_or_missing_dir_gives_one_clear_error(tmp_path):
    with pytest.raises(A.ModelUnavailable, match="local directory"):
        A.load_audio_model("imdpipe-tests/no-such-ast-model", device="cpu")
    with pytest.raises(A.ModelUnavailable, match="no such directory"):
        A.load_audio_model(tmp_path / "nope", device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        A.resolve_dtype("float16", torch.device("cpu"))


def test_bfloat16_autocast_path_runs_and_stays_close(tiny, tmp_path):
    net, fe, _ = tiny
    x = torch.from_numpy(A.crop_windows(A.fbank(tone(500, 1.5, SR, 0.3), fe), [0], fe.max_length,
                                        A.pad_value(fe)))
    e32, l32 = A.forward_windows(net, x, device="cpu", dtype="float32")
    e16, l16 = A.forward_windows(net, x, device="cpu", dtype="bfloat16")
    assert e16.dtype == np.float32 and np.abs(e16 - e32).max() < 0.1 and np.abs(l16 - l32).max() < 0.1


def test_cli_extract_audio_and_export(cache, tiny_dir, tmp_path):
    import h5py

    from imdpipe.cli.main import app

    work = make_cache(tmp_path, [_clips()[1], _clips()[2]])
    result = CliRunner().invoke(app, ["extract-audio", "--cache", str(work), "--model", str(tiny_dir),
                                      "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert zarr.open_group(work / "audio.zarr")["done"][:].all()
    result = CliRunner().invoke(app, ["export", str(work / "audio.zarr"), str(tmp_path / "a.h5")])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "a.h5") as f:
        assert f["embedding"].shape == (2, 1, 64) and f.attrs["stage"] == "audio"
    result = CliRunner().invoke(app, ["extract-audio", "--cache", str(work), "--model", str(tmp_path / "no"),
                                      "--quiet"])
    assert result.exit_code != 0 and "no such directory" in result.output


@pytest.mark.online
def test_real_audioset_ast_on_the_transformers_sample_audio():
    import os

    from huggingface_hub import hf_hub_download

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        pytest.skip("offline")
    path = hf_hub_download(repo_id="nielsr/audio-spectogram-transformer-checkpoint", filename="sample_audio.flac",
                           repo_type="dataset")
    net, fe, info = A.load_audio_model(A.DEFAULT_MODEL, device="cpu", dtype="float32")
    wave, _ = A.decode_audio(path)
    x = fe(wave, sampling_rate=SR, return_tensors="pt")["input_values"]
    _, logits = A.forward_windows(net, x, device="cpu", dtype="float32")
    np.testing.assert_allclose(logits[0, :3], [-0.8760, -7.0042, -8.6602], atol=1e-3)
    assert info["labels"] == list(label_set("audioset"))
