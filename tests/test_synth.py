"""The synthetic dataset writer: design, files, ground truth vs real mp4 content, determinism."""

from __future__ import annotations

import csv
import itertools
import json
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from synth_fixtures import TINY, build_synth
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.datasets.synth import (
    CLASS_DESIGN,
    SOUND_POOL,
    VISUAL_FAMILIES,
    plan_dataset,
    plan_soundbank,
    read_plans,
    render_frames,
    render_sound,
    render_video,
    synth_dataset,
    visual_pairs,
)
from imdpipe.labels import label_set
from imdpipe.pipeline.index import probe_video


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return build_synth(tmp_path_factory)


RENDER = {"size": TINY["size"], "duration_s": TINY["duration_s"], "fps": TINY["fps"]}


def _gt(out: Path) -> list[dict]:
    with open(out / "ground_truth.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _decode(path: Path):
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        audio = None
        if c.streams.audio:
            c.seek(0)
            audio = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)[0]
    return frames, audio


def test_design_classes_pairs_and_sounds():
    names = [c.name for c in CLASS_DESIGN]
    assert len(names) == 8 and len(set(names)) == 8
    kinetics = set(label_set("kinetics400"))
    assert all(n.replace("_", " ") in kinetics for n in names), "class names must be Kinetics-400 classes"
    pairs = visual_pairs()
    assert sorted(pairs) == sorted([("playing_drums", "applauding"), ("driving_car", "feeding_birds")])
    # Paired classes differ only by their relevant sound; unpaired classes each own a visual family.
    by_name = {c.name: c for c in CLASS_DESIGN}
    for a, b in pairs:
        assert by_name[a].visual == by_name[b].visual
        assert by_name[a].relevant_sound and by_name[b].relevant_sound
        assert by_name[a].relevant_sound != by_name[b].relevant_sound
    families = [c.visual for c in CLASS_DESIGN]
    assert len(set(families)) == 6 and set(families) == set(VISUAL_FAMILIES)
    assert len({VISUAL_FAMILIES[f].motion for f in families}) == 6
    assert [c for c in CLASS_DESIGN if c.relevant_sound is None], "some classes never have relevant audio"
    audioset = set(label_set("audioset"))
    assert len(SOUND_POOL) >= 8 and set(SOUND_POOL) <= audioset
    assert {c.relevant_sound for c in CLASS_DESIGN if c.relevant_sound} <= set(SOUND_POOL)


def test_plan_relevance_is_per_video_and_pairs_share_parameter_distribution():
    plans = plan_dataset(seed=3, videos_per_class=40)
    by_class = {c.name: [p for p in plans if p.class_name == c.name] for c in CLASS_DESIGN}
    for cls in CLASS_DESIGN:
        mine = by_class[cls.name]
        fam = VISUAL_FAMILIES[cls.visual]
        for p in mine:
            assert p.visual == cls.visual and set(p.visual_params) == set(fam.ranges)
            assert all(lo <= p.visual_params[k] <= hi for k, (lo, hi) in fam.ranges.items())
            assert p.relevant == (p.sound is not None and p.sound == cls.relevant_sound)
        if cls.relevant_sound:
            rate = np.mean([p.relevant for p in mine])
            assert 0.6 <= rate < 1.0, (cls.name, rate)  # mostly relevant, but not always
        else:
            assert not any(p.relevant for p in mine)
            assert any(p.sound is None for p in mine) and any(p.sound for p in mine)
    # Same family, same ranges: the per-video parameters of a visual pair are identically distributed
    # (checked on the pooled draws: means agree within sampling noise).
    for a, b in visual_pairs():
        for k, (lo, hi) in VISUAL_FAMILIES[by_class[a][0].visual].ranges.items():
            ma = np.mean([p.visual_params[k] for p in by_class[a]])
            mb = np.mean([p.visual_params[k] for p in by_class[b]])
            assert abs(ma - mb) < 0.25 * (hi - lo), (a, b, k)


def _band_features(x: np.ndarray, sr: int = 16000) -> np.ndarray:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    edges = np.geomspace(40, sr / 2, 25)
    f = np.fft.rfftfreq(x.size, 1 / sr)
    bands = np.array([spec[(f >= lo) & (f < hi)].mean() for lo, hi in itertools.pairwise(edges)])
    v = np.log(bands + 1e-6)
    return (v - v.mean()) / v.std()


def test_sounds_are_spectrally_distinct():
    # Nearest-centroid on log band energies: fresh draws of each sound land on their own centroid.
    feats = {s: [_band_features(render_sound(s, rng=np.random.default_rng(i), duration_s=1.0))
                 for i in range(4)] for s in SOUND_POOL}
    centroids = {s: np.mean(v[:3], axis=0) for s, v in feats.items()}
    for s, v in feats.items():
        x = render_sound(s, rng=np.random.default_rng(99), duration_s=1.0)
        assert x.dtype == np.float32 and x.shape == (16000,) and np.isclose(np.abs(x).max(), 0.5)
        held_out = v[3]
        nearest = min(centroids, key=lambda c: np.linalg.norm(held_out - centroids[c]))
        assert nearest == s, f"{s} looks like {nearest}"
    with pytest.raises(ValueError, match="unknown synthetic sound"):
        render_sound("Music", rng=np.random.default_rng(0), duration_s=1.0)


def test_layout_splits_and_synth_json(synth):
    out = synth
    gt = _gt(out)
    assert len(gt) == 8 * TINY["videos_per_class"]
    assert [r["video_id"] for r in gt] == sorted({r["video_id"] for r in gt}, key=[r["video_id"] for r in gt].index)
    class_ind = (out / "splits" / "classInd.txt").read_text().splitlines()
    assert class_ind == [f"{i + 1} {c.name}" for i, c in enumerate(CLASS_DESIGN)]
    train = [line.split() for line in (out / "splits" / "trainlist01.txt").read_text().splitlines()]
    test = [line.split() for line in (out / "splits" / "testlist01.txt").read_text().splitlines()]
    assert all(len(t) == 1 for t in test) and all(len(t) == 2 for t in train)
    listed = {t[0]: "train" for t in train} | {t[0]: "test" for t in test}
    assert len(listed) == len(train) + len(test) == len(gt)
    names = [c.name for c in CLASS_DESIGN]
    for rel, num in train:
        cls = rel.split("/")[0]
        assert int(num) == names.index(cls) + 1
    for r in gt:
        rel = f"{r['label_name']}/{r['video_id']}.mp4"
        assert (out / "videos" / rel).is_file()
        assert listed[rel] == r["split"]
    assert sorted(p.relative_to(out / "videos").as_posix() for p in (out / "videos").rglob("*.mp4")) == sorted(listed)
    meta = json.loads((out / "synth.json").read_text())
    assert meta["settings"]["seed"] == TINY["seed"] and meta["settings"]["size"] == list(TINY["size"])
    assert [c["name"] for c in meta["classes"]] == names
    assert sorted(map(tuple, meta["visual_pairs"])) == sorted(visual_pairs())


def test_ground_truth_matches_real_mp4_content(synth):
    out = synth
    gt = {r["video_id"]: r for r in _gt(out)}
    plans = read_plans(out)
    relevant_of = {c.name: c.relevant_sound for c in CLASS_DESIGN}
    n_frames = round(TINY["duration_s"] * TINY["fps"])
    renders = {p.video_id: render_video(p, **RENDER) for p in plans}
    for p in plans:
        r = gt[p.video_id]
        path = out / "videos" / p.class_name / f"{p.video_id}.mp4"
        info = probe_video(path)
        assert info["has_audio"] == (r["sound"] != "") == (r["has_audio"] == "1")
        assert (info["n_frames"], info["width"], info["height"]) == (n_frames, 64, 64)
        assert r["relevant"] == str(int(r["sound"] == relevant_of[p.class_name]))
        assert r["sound"] == "" or r["sound"] in SOUND_POOL
    # The mp4 holds the planned frames and sound: decoded content is closer to its own render
    # than to the other video of the same visual family.
    for a, b in [("playing_drums_000", "applauding_001"), ("driving_car_001", "feeding_birds_000")]:
        frames, audio = _decode(out / "videos" / a.rsplit("_", 1)[0] / f"{a}.mp4")
        own, other = renders[a][0].astype(float), renders[b][0].astype(float)
        assert np.abs(frames - own).mean() < 0.6 * np.abs(frames - other).mean()
        if renders[a][1] is not None:
            ref = renders[a][1]
            n = min(ref.size, audio.size)
            assert np.corrcoef(ref[:n], audio[:n])[0, 1] > 0.9


def test_soundbank_is_multilabel_audioset(synth):
    bank = synth / "soundbank"
    with open(bank / "soundbank.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == TINY["soundbank_clips"]
    audioset = set(label_set("audioset"))
    seen = set()
    for r in rows:
        labels = r["labels"].split(";")
        assert 1 <= len(labels) <= 2 and len(set(labels)) == len(labels)
        assert set(labels) <= audioset and set(labels) <= set(SOUND_POOL)
        seen |= set(labels)
        with wave.open(str(bank / r["path"])) as w:
            assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (1, 16000, 2)
            assert w.getnframes() == int(TINY["soundbank_duration_s"] * 16000)
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            assert 0.3 * 32767 < np.abs(pcm).max() <= 32767
    assert seen == set(SOUND_POOL)
    assert any(len(r["labels"].split(";")) == 2 for r in rows)
    # Balanced: over a longer bank, every sound is a first label equally often.
    firsts = [labels[0] for labels in plan_soundbank(seed=1, clips=80)]
    assert all(firsts.count(s) == 10 for s in SOUND_POOL)


def test_determinism_same_seed_same_arrays_other_seed_differs(tmp_path):
    a, b, c = (plan_dataset(seed=s, videos_per_class=3) for s in (7, 7, 8))
    assert a == b and a != c
    for pa, pb, pc in zip(a[::5], b[::5], c[::5]):
        fa, aa = render_video(pa, **RENDER)
        fb, ab = render_video(pb, **RENDER)
        assert np.array_equal(fa, fb) and (aa is None and ab is None or np.array_equal(aa, ab))
        assert not np.array_equal(fa, render_frames(pc, **RENDER))
    # Whole datasets: same seed -> same files, ground truth and sound-bank bytes, whatever the workers.
    small = dict(TINY, videos_per_class=1, soundbank_clips=4)
    one = synth_dataset(tmp_path / "one", **small, show_progress=False)
    two = synth_dataset(tmp_path / "two", **small, workers=2, show_progress=False)
    other = synth_dataset(tmp_path / "other", **{**small, "seed": 1}, show_progress=False)

    def files(root):
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    assert files(one.out) == files(two.out) == files(other.out)
    for name in ("ground_truth.csv", "soundbank/soundbank.csv", "splits/trainlist01.txt", "soundbank/clip_00000.wav"):
        assert (one.out / name).read_bytes() == (two.out / name).read_bytes()
    assert (one.out / "soundbank/clip_00000.wav").read_bytes() != (other.out / "soundbank/clip_00000.wav").read_bytes()
    # x264 is deterministic here (one thread, no macroblock tree): byte-identical mp4 files
    videos = [p.relative_to(one.out) for p in sorted((one.out / "videos").rglob("*.mp4"))]
    assert len(videos) == len(CLASS_DESIGN)
    for rel in videos:
        assert (one.out / rel).read_bytes() == (two.out / rel).read_bytes(), rel
    fa, _ = _decode(one.out / "videos/yoga/yoga_000.mp4")
    fc, _ = _decode(other.out / "videos/yoga/yoga_000.mp4")
    assert np.abs(fa.astype(int) - fc).mean() > 5.0  # another seed is another draw


def test_refuses_to_overwrite_and_validates(tmp_path):
    small = dict(TINY, videos_per_class=1, soundbank_clips=0)
    synth_dataset(tmp_path / "d", **small, show_progress=False)
    (tmp_path / "d" / "mine.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="--overwrite"):
        synth_dataset(tmp_path / "d", **small, show_progress=False)
    synth_dataset(tmp_path / "d", **{**small, "seed": 5}, overwrite=True, show_progress=False)
    assert (tmp_path / "d" / "mine.txt").read_text() == "user file"  # only the synth's own files go
    assert json.loads((tmp_path / "d" / "synth.json").read_text())["settings"]["seed"] == 5
    with pytest.raises(ValueError, match="even"):
        synth_dataset(tmp_path / "e", **{**small, "size": (63, 64)}, show_progress=False)


def test_cli_synth(tmp_path):
    runner = CliRunner()
    args = ["synth", str(tmp_path / "s"), "--seed", "2", "--videos-per-class", "1", "--size", "32x48",
            "--duration", "1", "--fps", "6", "--soundbank-clips", "3", "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "synth summary" in r.output and "8 videos" in r.output
    info = probe_video(next((tmp_path / "s" / "videos" / "yoga").glob("*.mp4")))
    assert (info["height"], info["width"], info["n_frames"]) == (32, 48, 6)
    assert len(list((tmp_path / "s" / "soundbank").glob("*.wav"))) == 3
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = runner.invoke(app, ["synth", str(tmp_path / "t"), "--size", "big"])
    assert r.exit_code != 0 and "HxW" in r.output
