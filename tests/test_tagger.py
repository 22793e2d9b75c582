"""train-tagger: a real tiny AST trained on a sound bank of distinct tones, reused, and used by extract-audio."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import zarr
from audio_fixtures import make_cache
from typer.testing import CliRunner

from imdpipe.pipeline import audio as A
from imdpipe.train.tagger import (
    TaggerSettings,
    average_precision,
    mean_average_precision,
    read_soundbank,
    train_tagger,
)

SR = 16000
TONES = {"Whistling": 2400.0, "Engine": 110.0, "Bell": 700.0, "Hum": 260.0}
SETTINGS = TaggerSettings(epochs=16, hidden_size=64, layers=2, batch_size=4, lr=2e-3, val_fraction=0.25, seed=0)


def write_wav(path: Path, wave: np.ndarray, sr: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="wav") as c:
        stream = c.add_stream("pcm_s16le", rate=sr, layout="mono")
        frame = av.AudioFrame.from_ndarray((np.clip(wave, -1, 1) * 32767).astype(np.int16)[None], format="s16",
                                           layout="mono")
        frame.sample_rate = sr
        for packet in (*stream.encode(frame), *stream.encode()):
            c.mux(packet)
    return path


def tone_clip(freq: float, seconds: float, rng) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    f = freq * rng.uniform(0.95, 1.05)
    return (rng.uniform(0.2, 0.4) * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def make_soundbank(root: Path, per_class: int = 4, seconds: float = 1.5, seed: int = 0) -> Path:
    """Distinct tones, one label each, plus one two-label mixture; 16 kHz mono wav clips."""
    rng = np.random.default_rng(seed)
    lines = ["path,labels"]
    for name, freq in TONES.items():
        for j in range(per_class):
            write_wav(root / "clips" / f"{name}_{j}.wav", tone_clip(freq, seconds, rng))
            lines.append(f"clips/{name}_{j}.wav,{name}")
    mix = tone_clip(TONES["Bell"], seconds, rng) + tone_clip(TONES["Engine"], seconds, rng)
    write_wav(root / "clips" / "mix.wav", mix)
    lines.append("clips/mix.wav,Bell;Engine")
    (root / "soundbank.csv").write_text("\n".join(lines) + "\n")
    return root / "soundbank.csv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    csv_path = make_soundbank(root)
    meta = train_tagger(csv_path, root / "tagger", settings=SETTINGS, device="cpu")
    return csv_path, root / "tagger", meta


def test_average_precision_by_hand():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.9], [0.6, 0.3]])
    targets = np.array([[1, 0], [0, 0], [1, 1], [0, 0]])
    ap = average_precision(scores, targets)
    np.testing.assert_allclose(ap, [(1 / 1 + 2 / 3) / 2, 1.0])
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert np.isnan(average_precision(scores, np.zeros((4, 2)))).all()


@pytest.mark.filterwarnings("ignore:At least one mel filter")
def test_tagger_learns_and_saves_a_loadable_ast(trained):
    from transformers import ASTFeatureExtractor, ASTForAudioClassification

    _, out, meta = trained
    history = meta["history"]
    assert len(history) == SETTINGS.epochs and not meta["reused"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert meta["metrics"]["val_map"] > meta["metrics"]["val_chance_map"] + 0.2
    assert meta["labels"] == sorted(TONES) and meta["n_clips"] == 17 and meta["n_val"] == 4
    assert meta["max_length"] == 1 + (int(1.5 * SR) - 400) // 160
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tagger.json"):
        assert (out / name).is_file()
    saved = json.loads((out / "tagger.json").read_text())
    assert saved["settings"]["epochs"] == 16 and len(saved["soundbank_sha256"]) == 64
    net = ASTForAudioClassification.from_pretrained(out)
    fe = ASTFeatureExtractor.from_pretrained(out)
    assert [net.config.id2label[i] for i in range(4)] == sorted(TONES)
    assert net.config.problem_type == "multi_label_classification" and fe.max_length == meta["max_length"]


def test_tagger_reused_refused_or_retrained(trained, tmp_path):
    csv_path, out, _meta = trained
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = train_tagger(csv_path, out, settings=SETTINGS, device="cpu")
    assert again["reused"] and (out / "model.safetensors").stat().st_mtime_ns == stamp
    other = TaggerSettings(**{**SETTINGS.__dict__, "epochs": 1})
    with pytest.raises(FileExistsError, match="epochs"):
        train_tagger(csv_path, out, settings=other, device="cpu")
    copy = tmp_path / "tagger"
    result = CliRunner().invoke(_app(), ["train-tagger", "--soundbank", str(csv_path), "--out", str(copy),
                                         "--epochs", "1", "--hidden-size", "32", "--layers", "1",
                                         "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "tagger.json").read_text())["settings"]["hidden_size"] == 32
    result = CliRunner().invoke(_app(), ["train-tagger", "--soundbank", str(csv_path), "--out", str(copy),
                                         "--epochs", "1", "--hidden-size", "32", "--layers", "1",
                                         "--val-fraction", "0"])
    assert result.exit_code == 0 and "reusing" in result.output


def test_tagger_drives_extract_audio(trained, tmp_path):
    _, out, _ = trained
    rng = np.random.default_rng(7)
    clips = [(name, 2.0, tone_clip(TONES[name], 2.0, rng), SR) for name in ("Whistling", "Engine")]
    cache = make_cache(tmp_path, clips)
    summary = A.extract_audio(cache=cache, model=out, workers=0, device="cpu", show_progress=False)
    assert summary.ok == 2
    g = zarr.open_group(cache / "audio.zarr", mode="r")
    labels = g.attrs["audio_labels"]
    assert labels == sorted(TONES) and g["embedding"].shape == (2, 1, 64)
    top = [labels[int(np.argmax(g["logits"][i, 0]))] for i in range(2)]
    assert top == ["Whistling", "Engine"]


def test_bad_soundbanks_get_clear_errors(tmp_path):
    (tmp_path / "a.csv").write_text("file,label\nx.wav,Bell\n")
    with pytest.raises(ValueError, match="path,labels"):
        read_soundbank(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("path,labels\nmissing.wav,Bell\nother.wav,Hum\n")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        train_tagger(tmp_path / "b.csv", tmp_path / "t", settings=SETTINGS)
    with pytest.raises(FileNotFoundError, match="soundbank.csv"):
        read_soundbank(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="multiple of heads"):
        TaggerSettings(hidden_size=30, heads=4)


def _app():
    from imdpipe.cli.main import app

    return app
