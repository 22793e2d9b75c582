"""Relevance targets: hand-computed IoU/Dice, normalisation, relevance.zarr from a fake audio store, CLI."""

import itertools

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.pipeline import relevance as rel
from imdpipe.pipeline.manifest import VideoRecord, write_manifest
from imdpipe.pipeline.savld import Savld, load_savld, read_savld_txt
from imdpipe.pipeline.store import ArraySpec, SettingsMismatch, StageStore


# ---------------------------------------------------------------------------------------------
# The overlap by hand
# ---------------------------------------------------------------------------------------------
def test_iou_and_dice_by_hand_with_k_not_equal_ya():
    pred, dic = [0, 1, 2, 3, 4], [2, 4, 9]  # Ya=5, K=3, |P & D| = 2, |P | D| = 6
    t, c = rel.overlap_score(pred, dic, K=3, Ya=5, overlap="iou")
    assert c == 2 and t == pytest.approx((2 / 6) / (3 / 5))  # raw 1/3, best possible 3/5 -> 5/9
    t, c = rel.overlap_score(pred, dic, K=3, Ya=5, overlap="dice")
    assert c == 2 and t == pytest.approx((4 / 8) / (6 / 8))  # raw 1/2, best possible 3/4 -> 2/3
    # the paper's best K=10, Ya=20: all 10 dictionary labels predicted -> 1, half of them -> 0.4 (IoU)
    assert rel.overlap_score(range(20), range(10), K=10, Ya=20)[0] == pytest.approx(1.0)
    assert rel.overlap_score(range(20), range(15, 25), K=10, Ya=20) == (pytest.approx(0.4), 5)
    assert rel.overlap_score(range(20), range(15, 25), K=10, Ya=20, overlap="dice")[0] == pytest.approx(0.5)
    # K == Ya: normalisation is the identity
    assert rel.overlap_score(range(10), range(5, 15), K=10, Ya=10)[0] == pytest.approx(5 / 15)
    assert rel.overlap_score(range(10), range(5, 15), K=10, Ya=10, overlap="dice")[0] == pytest.approx(0.5)
    assert rel.overlap_score(["Dog", "Car"], ["Bird"], K=1, Ya=2) == (0.0, 0)
    assert rel.max_overlap(K=10, Ya=20) == pytest.approx(0.5)
    assert rel.max_overlap(K=10, Ya=20, overlap="dice") == pytest.approx(2 / 3)


def test_overlap_bad_inputs():
    with pytest.raises(ValueError, match="Ya=3"):
        rel.overlap_score([1, 2], [1], K=1, Ya=3)
    with pytest.raises(ValueError, match="K=2"):
        rel.overlap_score([1, 2, 3], [1, 1], K=2, Ya=3)
    with pytest.raises(ValueError, match="overlap"):
        rel.overlap_score([1], [1], K=1, Ya=1, overlap="jaccard")


def test_vectorised_counts_match_set_intersections():
    rng = np.random.default_rng(0)
    C, K, Ya = 30, 4, 7
    logits = rng.normal(size=(5, 3, C)).astype(np.float16).astype(np.float32)
    dict_top = np.stack([rng.permutation(C)[:K] for _ in range(5)])
    member = np.zeros((5, C), bool)
    np.put_along_axis(member, dict_top, True, axis=1)
    counts = rel.window_counts(logits, member[:, None, :], ya=Ya)
    for n, w in itertools.product(range(5), range(3)):
        top = set(np.argsort(-logits[n, w])[:Ya].tolist())
        t, c = rel.overlap_score(top, dict_top[n], K=K, Ya=Ya)
        assert counts[n, w] == c
        for overlap in rel.OVERLAPS:
            assert rel.normalized_overlap(counts[n, w], K=K, Ya=Ya, overlap=overlap) == pytest.approx(
                rel.overlap_score(top, dict_top[n], K=K, Ya=Ya, overlap=overlap)[0])
    all_counts = np.arange(0, K + 1)
    for overlap in rel.OVERLAPS:
        t = rel.normalized_overlap(all_counts, K=K, Ya=Ya, overlap=overlap)
        assert t[0] == 0 and t[-1] == pytest.approx(1) and (np.diff(t) > 0).all()


def test_top_predictions_break_ties_by_index():
    assert rel.top_predictions(np.array([1.0, 3.0, 3.0, 0.0, 3.0], np.float16), 3).tolist() == [1, 2, 4]


# ---------------------------------------------------------------------------------------------
# A fake cache: manifest + audio.zarr in the contract layout (no audio model needed)
# ---------------------------------------------------------------------------------------------
AUDIO = ["Speech", "Guitar", "Applause", "Dog", "Car", "Music", "Clapping", "Bird"]
CLASSES = ["playing guitar", "applauding"]
# video -> (class, manifest status, has_audio, audio done, top-3 label indices per window)
VIDEOS = [
    (0, "ok", True, True, [[1, 5, 7], [3, 4, 7]]),
    (0, "ok", False, True, None),  # no audio track
    (1, "ok", True, True, [[2, 3, 4], [0, 2, 6]]),
    (1, "ok", True, False, None),  # the audio stage failed on it
    (0, "error", False, False, None),  # unreadable video (manifest)
    (1, "ok", True, True, [[6, 7, 3], [7, 3, 4]]),
]


def _hand_savld():
    # k=3: guitar -> Guitar, Music, Speech; applauding -> Applause, Clapping, Speech
    sim = np.full((2, len(AUDIO)), -1.0)
    sim[0, [1, 5, 0]] = [0.9, 0.8, 0.7]
    sim[1, [2, 6, 0]] = [0.9, 0.8, 0.7]
    return Savld.from_similarity(CLASSES, AUDIO, sim, k=3)


def _logits(top):
    x = np.full(len(AUDIO), -5.0)
    x[top] = [3.0, 2.0, 1.0]
    return x


def make_cache(root, *, audio_labels=AUDIO):
    records = []
    for i, (c, status, has, _, _) in enumerate(VIDEOS):
        records.append(VideoRecord(index=i, video_id=f"v{i}", path=f"videos/{CLASSES[c]}/v{i}.mp4", label=c,
                                   label_name=CLASSES[c], split="train", duration_s=4.0, fps=25.0,
                                   n_frames=100, width=64, height=48, has_audio=has, status=status,
                                   error="" if status == "ok" else "cannot decode"))
    manifest = write_manifest(root, records, CLASSES)
    W, D = 2, 4
    store = StageStore.open(
        root / "audio.zarr", stage="audio", settings={"model": "tiny-test-ast", "windows": W},
        manifest_sha256=manifest.sha256, n_items=len(VIDEOS), videos_per_shard=4,
        arrays=[ArraySpec("embedding", (W, D), "float16", ("window", "feature")),
                ArraySpec("logits", (W, len(AUDIO)), "float16", ("window", "audio_label")),
                ArraySpec("window_start_s", (W,), "float32", ("window",)),
                ArraySpec("has_audio", (), "bool", (), fill_value=False)],
        attrs={"audio_labels": list(audio_labels), "model": "tiny-test-ast"})
    for s, e in store.shard_ranges():
        rows, errors = {}, {}
        for i in range(s, e):
            _, status, has, done, tops = VIDEOS[i]
            if status != "ok":
                continue
            if not done:
                errors[i] = "ValueError: broken audio stream"
                continue
            logits = np.stack([_logits(t) for t in tops]) if has else np.zeros((W, len(AUDIO)))
            rows[i] = {"embedding": np.ones((W, D)), "logits": logits, "window_start_s": np.array([0.0, 5.0]),
                       "has_audio": np.bool_(has)}
        store.write_block(s, e, rows, errors)
    return manifest


@pytest.fixture
def cache(tmp_path):
    make_cache(tmp_path)
    return tmp_path


def test_targets_counts_flags_and_table(cache):
    res = rel.build_relevance(cache=cache, savld=_hand_savld(), K=2, ya=3, overlap="iou", alpha=0.25,
                              show_progress=False)
    s = res.summary
    assert (s.ok, s.failed, s.skipped) == (4, 1, 1)
    assert s.errors[0][0] == 3 and "broken audio stream" in s.errors[0][2] and "extract-audio" in s.errors[0][2]
    g = zarr.open_group(cache / "relevance.zarr", mode="r")
    # K=2, Ya=3: c=2 -> (2/3)/(2/3) = 1; c=1 -> (1/4)/(2/3) = 0.375; c=0 -> 0
    expected = {0: [1.0, 0.0], 1: [0.0, 0.0], 2: [0.375, 1.0], 5: [0.375, 0.0]}
    counts = {0: [2, 0], 1: [0, 0], 2: [1, 2], 5: [1, 0]}
    target, count = g["target"][:], g["overlap_count"][:]
    assert target.dtype == np.float32 and count.dtype == np.int16 and target.shape == (6, 2)
    for i, want in expected.items():
        np.testing.assert_allclose(target[i], want, atol=1e-6)
        assert count[i].tolist() == counts[i]
    assert g["done"][:].tolist() == [True, True, True, False, False, True]
    assert g["target"].attrs["_ARRAY_DIMENSIONS"] == ["video", "window"]
    a = g.attrs
    assert (a["K"], a["Ya"], a["overlap"]) == (2, 3, "iou") and a["savld_sha256"] == _hand_savld().sha256
    assert a["settings"]["savld_sha256"] == a["savld_sha256"] and a["settings"]["audio_model"] == "tiny-test-ast"
    # per-class table: guitar videos 0, 1 -> windows [1, 0, 0, 0]; applauding 2, 5 -> [.375, 1, .375, 0]
    rows = {r.label: r for r in res.classes}
    assert rows["playing guitar"].videos == 2 and rows["playing guitar"].with_audio == 1
    assert rows["playing guitar"].mean_target == pytest.approx(0.25)
    assert rows["playing guitar"].share_at_alpha == pytest.approx(0.25)
    assert rows["applauding"].mean_target == pytest.approx(1.75 / 4)
    assert rows["applauding"].share_at_alpha == pytest.approx(0.75)
    assert res.mean_target == pytest.approx(2.75 / 8)


def test_dice_and_rerun_behaviour(cache):
    rel.build_relevance(cache=cache, savld=_hand_savld(), K=2, ya=3, overlap="dice", show_progress=False)
    t = zarr.open_group(cache / "relevance.zarr", mode="r")["target"][:]
    np.testing.assert_allclose(t[2], [0.5, 1.0])  # Dice: (2/5)/(4/5), (4/5)/(4/5)
    again = rel.build_relevance(cache=cache, savld=_hand_savld(), K=2, ya=3, overlap="dice",
                                show_progress=False)
    assert again.summary.ok == 0 and again.summary.already_done == 4 and again.summary.failed == 1
    with pytest.raises(SettingsMismatch, match="overlap"):
        rel.build_relevance(cache=cache, savld=_hand_savld(), K=2, ya=3, overlap="iou", show_progress=False)
    other = Savld.from_similarity(CLASSES, AUDIO, np.eye(2, len(AUDIO)), k=3)
    with pytest.raises(SettingsMismatch, match="savld_sha256"):
        rel.build_relevance(cache=cache, savld=other, K=2, ya=3, overlap="dice", show_progress=False)
    res = rel.build_relevance(cache=cache, savld=_hand_savld(), K=2, ya=3, overlap="iou", overwrite=True,
                              show_progress=False)
    assert res.summary.ok == 4
    np.testing.assert_allclose(zarr.open_group(cache / "relevance.zarr")["target"][2], [0.375, 1.0])


def test_label_space_mismatch_and_ranges_are_refused(cache, tmp_path):
    wrong = Savld.from_similarity(CLASSES, AUDIO[::-1], np.zeros((2, len(AUDIO))), k=3)
    with pytest.raises(ValueError, match="label spaces differ.*first difference at index 0"):
        rel.build_relevance(cache=cache, savld=wrong, K=2, ya=3, show_progress=False)
    audioset = Savld.from_similarity(CLASSES, [*AUDIO, "Cat"], np.zeros((2, 9)), k=3)
    with pytest.raises(ValueError, match="label spaces differ.*--audio-labels"):
        rel.build_relevance(cache=cache, savld=audioset, K=2, ya=3, show_progress=False)
    with pytest.raises(ValueError, match="K .*k"):
        rel.build_relevance(cache=cache, savld=_hand_savld(), K=4, ya=3, show_progress=False)
    with pytest.raises(ValueError, match="Ya"):
        rel.build_relevance(cache=cache, savld=_hand_savld(), K=2, ya=20, show_progress=False)
    missing = Savld.from_similarity(["playing guitar", "sneezing"], AUDIO, np.zeros((2, len(AUDIO))), k=3)
    with pytest.raises(ValueError, match="no row for video class.*applauding"):
        rel.build_relevance(cache=cache, savld=missing, K=2, ya=3, show_progress=False)
    assert not (cache / "relevance.zarr").exists()  # nothing half-built


def test_audio_store_finished(cache):
    assert rel.audio_store_finished(cache) == (True, "")
    g = zarr.open_group(cache / "audio.zarr", mode="r+")
    err = g["error"][:].astype(object)
    err[3] = ""
    g["error"][:] = err.astype(str)  # video 3 neither done nor failed: extract-audio still running
    ok, why = rel.audio_store_finished(cache)
    assert not ok and "1 video(s) not yet processed" in why


def test_cli_builds_savld_from_the_cache_then_relevance(cache):
    result = CliRunner().invoke(app, ["build-savld", "--cache", str(cache), "--k", "3", "--relevance-k", "2",
                                      "--ya", "3", "--plot", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "mean relevance" in result.output and "playing guitar" in result.output
    d = load_savld(cache / "savld.zarr")
    assert d.video_labels == CLASSES and d.audio_labels == AUDIO  # from labels.txt and audio.zarr attrs
    assert d.neighbours("playing guitar", 1) == ["Guitar"]
    assert set(d.neighbours("applauding", 2)) == {"Applause", "Clapping"}
    assert read_savld_txt(cache / "savld.txt") == d.rows()
    assert (cache / "plots" / "savld_similarity.png").stat().st_size > 0
    # targets agree with an independent set computation on the dictionary the CLI built
    g = zarr.open_group(cache / "relevance.zarr", mode="r")
    assert g.attrs["savld_sha256"] == d.sha256
    for i, (c, status, has, done, tops) in enumerate(VIDEOS):
        if status == "ok" and done and has:
            for w, top in enumerate(tops):
                want, cnt = rel.overlap_score(top, d.topk_index[c, :2], K=2, Ya=3)
                assert g["target"][i, w] == pytest.approx(want) and g["overlap_count"][i, w] == cnt
    # asking for AudioSet against this 8-label audio model: the SAVLD is built, relevance refused
    result = CliRunner().invoke(app, ["build-savld", "--cache", str(cache), "--audio-labels", "audioset",
                                      "--out", str(cache / "as"), "--k", "3", "--relevance-k", "2", "--ya", "3",
                                      "--quiet"])
    assert result.exit_code == 2 and "label spaces differ" in result.output


@pytest.mark.parametrize("K,ya,overlap", [(2, 3, "iou"), (1, 2, "dice"), (3, 3, "iou")])
def test_targets_rebuilt_in_memory_equal_the_store(cache, K, ya, overlap):
    rel.build_relevance(cache=cache, savld=_hand_savld(), K=K, ya=ya, overlap=overlap, show_progress=False)
    g = zarr.open_group(cache / "relevance.zarr", mode="r")
    mem = rel.relevance_targets(cache=cache, savld=_hand_savld(), K=K, ya=ya, overlap=overlap, block=2)
    assert mem.done.tolist() == g["done"][:].tolist()
    np.testing.assert_array_equal(mem.target, g["target"][:])
    np.testing.assert_array_equal(mem.overlap_count, g["overlap_count"][:])
    assert mem.target.dtype == np.float32 and mem.savld_sha256 == g.attrs["savld_sha256"]
    with pytest.raises(ValueError, match="Ya"):
        rel.relevance_targets(cache=cache, savld=_hand_savld(), K=K, ya=99)


def test_targets_rebuilt_in_memory_honour_short_and_empty_entries(cache):
    # a data dictionary: guitar's entry holds 2 labels (Guitar, Music), applauding's is empty
    base = _hand_savld()
    idx = np.array([[1, 5, -1], [-1, -1, -1]], dtype=np.int32)
    score = np.where(idx >= 0, 1.0, np.nan).astype(np.float32)
    savld = Savld(video_labels=base.video_labels, audio_labels=base.audio_labels, similarity=base.similarity,
                  topk_index=idx, topk_score=score, attrs={"metric": "lift", "k": 3, "source": "data"})
    rel.build_relevance(cache=cache, savld=savld, K=3, ya=3, overlap="iou", show_progress=False)
    g = zarr.open_group(cache / "relevance.zarr", mode="r")
    mem = rel.relevance_targets(cache=cache, savld=savld, K=3, ya=3, overlap="iou", block=3)
    np.testing.assert_array_equal(mem.target, g["target"][:])
    np.testing.assert_array_equal(mem.overlap_count, g["overlap_count"][:])
    for i, (c, status, has, done, tops) in enumerate(VIDEOS):
        if not (status == "ok" and done and has):
            assert not mem.target[i].any()
            continue
        for w, top in enumerate(tops):
            entry = [j for j in idx[c] if j >= 0]
            if not entry:  # an empty entry: nothing is relevant
                assert mem.target[i, w] == 0
                continue
            want, cnt = rel.overlap_score(top, entry, K=len(entry), Ya=3)  # normalised by the entry's size
            assert mem.target[i, w] == pytest.approx(want) and mem.overlap_count[i, w] == cnt
