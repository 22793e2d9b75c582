"""The index stage: probing real files (good and broken), the three layouts, labels, refusals, CLI."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from synth_fixtures import TINY, build_synth, build_synth_cache
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.datasets.synth import CLASS_DESIGN
from imdpipe.labels import label_set
from imdpipe.pipeline.index import (
    DatasetLayoutError,
    VideoProbeError,
    build_index,
    probe_video,
    read_split_files,
    run_index,
)
from imdpipe.pipeline.manifest import read_manifest
from imdpipe.pipeline.media import write_mp4


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return build_synth(tmp_path_factory)


@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory) -> Path:
    return build_synth_cache(tmp_path_factory)


N_FRAMES = round(TINY["duration_s"] * TINY["fps"])
ODD = "vídeo com espaço ü"  # non-ASCII with spaces


def _gt(out: Path) -> dict[str, dict]:
    with open(out / "ground_truth.csv", newline="", encoding="utf-8") as f:
        return {r["video_id"]: r for r in csv.DictReader(f)}


def _faststart_copy(src: Path, dst: Path) -> None:
    """Remux with the moov atom first, so a truncated copy still opens (a half-finished download)."""
    with av.open(str(src)) as i, av.open(str(dst), "w", options={"movflags": "faststart"}) as o:
        s = o.add_stream_from_template(i.streams.video[0])
        for p in i.demux(i.streams.video[0]):
            if p.dts is not None:
                p.stream = s
                o.mux(p)


def _remux_mkv(src: Path, dst: Path) -> None:
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        s = o.add_stream_from_template(i.streams.video[0])
        for p in i.demux(i.streams.video[0]):
            if p.dts is not None:
                p.stream = s
                o.mux(p)


@pytest.fixture()
def messy_root(synth, tmp_path) -> Path:
    """The tiny synthetic videos plus every kind of bad or odd file, in class folders."""
    root = tmp_path / "videos"
    shutil.copytree(synth / "videos", root)
    yoga = root / "yoga"
    good = yoga / "yoga_000.mp4"
    (yoga / "zero_bytes.mp4").write_bytes(b"")
    data = good.read_bytes()
    (yoga / "truncated.mp4").write_bytes(data[: len(data) // 2])
    _faststart_copy(good, tmp_path / "fs.mp4")
    fs = (tmp_path / "fs.mp4").read_bytes()
    (yoga / "truncated_faststart.mp4").write_bytes(fs[: len(fs) // 2])
    (yoga / "text_file.mp4").write_text("this is not a video\n")
    frames = np.full((3, 64, 64, 3), 90, np.uint8)
    write_mp4(yoga / "no_audio.mp4", frames, 8)
    write_mp4(yoga / "one_frame.mp4", frames[:1], 8, np.zeros(1600, np.float32))
    shutil.copy(good, yoga / f"{ODD}.mp4")
    _remux_mkv(good, yoga / "as_mkv.mkv")
    (yoga / "README.txt").write_text("not a video, ignored")
    (yoga / ".yoga_000.part.mp4").write_bytes(b"half written by a killed synth: hidden, ignored")
    return root


def test_probe_video_values_and_errors(messy_root):
    yoga = messy_root / "yoga"
    info = probe_video(yoga / "yoga_000.mp4")
    assert info == {"duration_s": pytest.approx(TINY["duration_s"], abs=0.01), "fps": TINY["fps"],
                    "n_frames": N_FRAMES, "width": 64, "height": 64, "has_audio": info["has_audio"]}
    mkv = probe_video(yoga / "as_mkv.mkv")  # mkv does not record a frame count: decoded
    with av.open(str(yoga / "as_mkv.mkv")) as c:
        assert c.streams.video[0].frames == 0
    assert mkv["n_frames"] == N_FRAMES and mkv["has_audio"] is False
    assert probe_video(yoga / "no_audio.mp4")["has_audio"] is False
    one = probe_video(yoga / "one_frame.mp4")
    assert one["n_frames"] == 1 and one["has_audio"] is True
    for name, message in [("zero_bytes.mp4", "empty file"), ("truncated.mp4", "not a readable video"),
                          ("truncated_faststart.mp4", "truncated"), ("text_file.mp4", "not a readable video")]:
        with pytest.raises(VideoProbeError, match=message) as e:
            probe_video(yoga / name)
        assert str(yoga / name) in str(e.value)
    with pytest.raises(VideoProbeError, match="cannot stat"):
        probe_video(yoga / "missing.mp4")


def test_index_class_folders_with_bad_files(messy_root, synth, tmp_path):
    cache = tmp_path / "cache"
    manifest, summary = run_index(cache=cache, root=messy_root, show_progress=False)
    back = read_manifest(cache)
    assert back.sha256 == manifest.sha256 and back.records == manifest.records
    assert manifest.labels == sorted(c.name for c in CLASS_DESIGN)  # no split files: sorted folders
    recs = {r.video_id: r for r in manifest.records}
    assert [r.index for r in manifest.records] == list(range(len(manifest)))
    assert len(manifest) == 16 + 8  # 16 synthetic + 8 added (README and hidden file ignored)
    bad = {"zero_bytes": "empty file", "truncated": "not a readable", "truncated_faststart": "truncated",
           "text_file": "not a readable"}
    for vid, msg in bad.items():
        assert recs[vid].status == "error" and msg in recs[vid].error and vid in recs[vid].error
    assert {r.video_id for r in manifest.records if r.status == "error"} == set(bad)
    assert (summary.ok, summary.failed) == (20, 4) and summary.per_split == {"all": (20, 4)}
    assert recs["no_audio"].has_audio is False and recs["no_audio"].n_frames == 3
    assert recs["one_frame"].ok and recs["one_frame"].n_frames == 1
    assert recs[ODD].ok and recs[ODD].path.endswith(f"yoga/{ODD}.mp4")
    assert recs["as_mkv"].ok and recs["as_mkv"].n_frames == N_FRAMES
    gt = _gt(synth)
    for vid, row in gt.items():
        r = recs[vid]
        assert r.ok and r.label_name == row["label_name"] and manifest.labels[r.label] == r.label_name
        assert r.has_audio == (row["sound"] != "")
        assert (r.n_frames, r.width, r.height, r.fps) == (N_FRAMES, 64, 64, TINY["fps"])
        assert Path(r.path).is_absolute() and Path(r.path).is_file()
    # Records are grouped by label, then video id.
    assert [(r.label, r.video_id) for r in manifest.records] == sorted((r.label, r.video_id) for r in manifest.records)
    assert (cache / "labels.txt").read_text().splitlines() == manifest.labels
    assert manifest.ok_indices() == [r.index for r in manifest.records if r.ok]


def test_index_ucf_splits_of_synth(synth_cache, synth):
    manifest = read_manifest(synth_cache)
    assert manifest.labels == [c.name for c in CLASS_DESIGN]  # classInd.txt order
    gt = _gt(synth)
    assert {r.video_id: r.split for r in manifest.records} == {k: v["split"] for k, v in gt.items()}
    assert all(r.ok for r in manifest.records)
    assert len(manifest.ok_indices("test")) == sum(v["split"] == "test" for v in gt.values())


def test_ucf_unused_missing_and_workers(messy_root, synth, tmp_path):
    splits = tmp_path / "splits"
    shutil.copytree(synth / "splits", splits)
    with open(splits / "testlist01.txt", "a") as f:
        f.write("yoga/yoga_999.avi\n")  # listed but not on disk
    m0, s0 = run_index(cache=tmp_path / "c0", root=messy_root, splits=splits, show_progress=False)
    run_index(cache=tmp_path / "c2", root=messy_root, splits=splits, workers=2, show_progress=False)
    assert (tmp_path / "c0/manifest.csv").read_bytes() == (tmp_path / "c2/manifest.csv").read_bytes()
    recs = {r.video_id: r for r in m0.records}
    assert recs["no_audio"].split == "unused" and recs[ODD].split == "unused"
    missing = recs["yoga_999"]
    assert (missing.status, missing.split, missing.path, missing.label_name) == ("error", "test", "", "yoga")
    assert "listed in the ucf101 split files" in missing.error
    assert s0.per_split["test"][1] == 1 and s0.per_split["unused"] == (4, 4)
    with pytest.raises(DatasetLayoutError, match="no split files for split 2"):
        build_index(cache=tmp_path / "c3", root=messy_root, splits=splits, split_id=2, show_progress=False)


def test_hmdb_split_files(synth, tmp_path):
    root = tmp_path / "hmdb"
    for cls in ("brush_hair", "wave"):
        for j in range(3):
            dst = root / cls / f"{cls}_clip_{j}.avi.mp4"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(synth / "videos/yoga/yoga_000.mp4", dst)
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    for cls in ("brush_hair", "wave"):
        (splits / f"{cls}_test_split1.txt").write_text(
            f"{cls}_clip_0.avi.mp4 1 \n{cls}_clip_1.avi.mp4 2 \n{cls}_clip_2.avi.mp4 0 \n")
    kind, table = read_split_files(splits, 1)
    assert kind == "hmdb51" and table["wave_clip_1.avi"] == ("test", "wave")
    manifest = build_index(cache=tmp_path / "c", root=root, splits=splits, show_progress=False)
    assert manifest.labels == ["brush_hair", "wave"]  # built-in hmdb51 order, classes present
    assert {r.video_id: r.split for r in manifest.records} == {
        f"{c}_clip_{j}.avi": s for c in ("brush_hair", "wave") for j, s in enumerate(("train", "test", "unused"))}
    (splits / "wave_test_split1.txt").write_text("wave_clip_0.avi.mp4 7\n")
    with pytest.raises(DatasetLayoutError, match="wave_test_split1.txt:1"):
        build_index(cache=tmp_path / "c2", root=root, splits=splits, show_progress=False)


def test_kinetics_annotations(synth, tmp_path):
    root = tmp_path / "k400"
    src = synth / "videos"
    rows = [("playing guitar", "abcDEF12345", 10, 20, "train", src / "playing_guitar/playing_guitar_000.mp4"),
            ("yoga", "-x_y-z012345", 0, 10, "val", src / "yoga/yoga_001.mp4"),
            ("abseiling", "zzzzzzzzzzz", 95, 105, "train", None)]  # never downloaded
    for label, yid, s, e, _, path in rows:
        if path is not None:
            dst = root / ("train" if s else "val") / label / f"{yid}_{s:06d}_{e:06d}.mp4"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dst)
    csv_path = tmp_path / "k.csv"
    lines = ["label,youtube_id,time_start,time_end,split"] + [f"{r[0]},{r[1]},{r[2]},{r[3]},{r[4]}" for r in rows]
    csv_path.write_text("\n".join(lines) + "\n")
    manifest, summary = run_index(cache=tmp_path / "c", root=root, annotations=[csv_path], show_progress=False)
    k400 = label_set("kinetics400")
    assert manifest.labels == ["abseiling", "playing guitar", "yoga"]  # official relative order
    recs = {r.video_id: r for r in manifest.records}
    assert recs["abcDEF12345_000010_000020"].ok and recs["abcDEF12345_000010_000020"].split == "train"
    assert recs["-x_y-z012345_000000_000010"].split == "val"
    assert recs["zzzzzzzzzzz_000095_000105"].status == "error"
    assert "download is missing" in recs["zzzzzzzzzzz_000095_000105"].error
    assert summary.per_split == {"train": (1, 1), "val": (1, 0)}
    full = build_index(cache=tmp_path / "c2", root=root, annotations=csv_path, labels="kinetics400",
                       show_progress=False)
    assert full.labels == list(k400) and {r.label for r in full.records} == {0, 232, 398}
    csv_path.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(DatasetLayoutError, match="abcDEF12345_000010_000020: k.csv:2, k.csv:5"):
        build_index(cache=tmp_path / "c3", root=root, annotations=csv_path, show_progress=False)


def test_duplicates_labels_and_overwrite_refusals(synth, tmp_path):
    root = tmp_path / "v"
    shutil.copytree(synth / "videos", root)
    shutil.copy(root / "yoga/yoga_000.mp4", root / "applauding/yoga_000.mp4")
    with pytest.raises(DatasetLayoutError, match="duplicate video ids") as e:
        build_index(cache=tmp_path / "c", root=root, show_progress=False)
    assert str(root / "applauding/yoga_000.mp4") in str(e.value) and str(root / "yoga/yoga_000.mp4") in str(e.value)
    assert not (tmp_path / "c" / "manifest.csv").exists()
    (root / "applauding/yoga_000.mp4").unlink()

    order = tmp_path / "order.txt"
    order.write_text("\n".join(reversed([c.name for c in CLASS_DESIGN])) + "\n")
    m = build_index(cache=tmp_path / "c", root=root, labels=order, show_progress=False)
    assert m.labels[0] == "yoga" and m.records[0].label_name == "yoga" and m.records[0].label == 0
    order.write_text("yoga\n")
    with pytest.raises(DatasetLayoutError, match="not in the label set"):
        build_index(cache=tmp_path / "c", root=root, labels=order, show_progress=False)
    with pytest.raises(DatasetLayoutError, match="neither a built-in set"):
        build_index(cache=tmp_path / "c", root=root, labels="kinetics600", show_progress=False)

    before = (tmp_path / "c" / "manifest.csv").read_bytes()
    # Same content again: fine. Different content: refused unless overwrite.
    order.write_text("\n".join(reversed([c.name for c in CLASS_DESIGN])) + "\n")
    assert build_index(cache=tmp_path / "c", root=root, labels=order, show_progress=False).sha256 == m.sha256
    (root / "yoga/yoga_001.mp4").unlink()
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_index(cache=tmp_path / "c", root=root, show_progress=False)
    assert (tmp_path / "c" / "manifest.csv").read_bytes() == before
    build_index(cache=tmp_path / "c", root=root, overwrite=True, show_progress=False)
    assert (tmp_path / "c" / "manifest.csv").read_bytes() != before
    again = build_index(cache=tmp_path / "c", root=root, show_progress=False)  # identical: accepted
    assert again.sha256 == read_manifest(tmp_path / "c").sha256


def test_cli_index(messy_root, synth, tmp_path):
    runner = CliRunner()
    cache = tmp_path / "cache"
    r = runner.invoke(app, ["index", str(messy_root), "--cache", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "index summary" in r.output and "zero_bytes" in r.output and "empty file" in r.output
    assert len(read_manifest(cache)) == 24
    r = runner.invoke(app, ["index", str(messy_root), "--cache", str(cache), "--quiet", "--strict"])
    assert r.exit_code == 1 and "4 video(s) could not be read" in r.output
    r = runner.invoke(app, ["index", str(synth / "videos"), "--cache", str(cache), "--quiet",
                            "--splits", str(synth / "splits")])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = runner.invoke(app, ["index", str(synth / "videos"), "--cache", str(cache), "--quiet",
                            "--splits", str(synth / "splits"), "--overwrite", "--strict"])
    assert r.exit_code == 0, r.output
    assert {rec.split for rec in read_manifest(cache).records} == {"train", "test"}
    r = runner.invoke(app, ["index", str(tmp_path / "nowhere"), "--cache", str(cache)])
    assert r.exit_code == 2 and "is not a directory" in r.output
