"""SAVLD: label normalisation, encoder pooling, metrics, savld.zarr/savld.txt, plots, semantics."""

import json

import numpy as np
import pytest
import zarr

from imdpipe.labels import label_set
from imdpipe.pipeline import savld as sv
from imdpipe.pipeline.store import SettingsMismatch


# ---------------------------------------------------------------------------------------------
# Label texts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,kind,want", [
    ("PlayingDaf", "video", "playing daf"),  # UCF-101 CamelCase
    ("ApplyEyeMakeup", "video", "apply eye makeup"),
    ("YoYo", "video", "yo yo"),
    ("Skijet", "video", "skijet"),
    ("brush_hair", "video", "brush hair"),  # HMDB51
    ("flic_flac", "video", "flic flac"),
    ("passing American football (in game)", "video", "passing american football (in game)"),  # Kinetics
    ("  playing   guitar ", "video", "playing guitar"),
    ("Rowboat, canoe, kayak", "audio", "rowboat, canoe, kayak"),  # one AudioSet label, kept whole
    ("Motor vehicle (road)", "audio", "motor vehicle (road)"),
    ("MotorVehicle_sound", "audio", "motorvehicle sound"),  # no CamelCase split for audio labels
])
def test_normalize_label(raw, kind, want):
    assert sv.normalize_label(raw, kind=kind) == want


def test_builtin_sets_normalize_to_distinct_lowercase_words():
    for name in ("ucf101", "hmdb51", "kinetics400"):
        texts = [sv.normalize_label(x) for x in label_set(name)]
        assert len(set(texts)) == len(texts)
        assert all(t == t.lower() and "_" not in t and "  " not in t for t in texts)
    ucf = dict(zip(label_set("ucf101"), (sv.normalize_label(x) for x in label_set("ucf101"))))
    assert ucf["PlayingDaf"] == "playing daf" and ucf["BlowDryHair"] == "blow dry hair"
    with pytest.raises(ValueError, match="kind"):
        sv.normalize_label("x", kind="text")


def test_label_sources(tmp_path):
    assert sv.resolve_video_labels("ucf101")[:2] == ["ApplyEyeMakeup", "ApplyLipstick"]
    f = tmp_path / "classes.txt"
    f.write_text("playing guitar\n\napplauding\n")
    assert sv.resolve_video_labels(str(f)) == ["playing guitar", "applauding"]
    audio = sv.resolve_audio_labels("audioset")
    assert len(audio) == 527 and audio[0] == "Speech" and "Rowboat, canoe, kayak" in audio
    # a model directory: id2label in index order, whatever the key order in the json
    model = tmp_path / "tagger"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"id2label": {"2": "Dog", "0": "Speech", "10": "Car",
                                                                **{str(i): f"L{i}" for i in (1, *range(3, 10))}}}))
    labels = sv.resolve_audio_labels(str(model))
    assert labels[:3] == ["Speech", "L1", "Dog"] and labels[10] == "Car" and len(labels) == 11
    csv = tmp_path / "class_labels_indices.csv"
    csv.write_text('index,mid,display_name\n0,/m/a,"Rowboat, canoe, kayak"\n1,/m/b,Dog\n')
    assert sv.resolve_audio_labels(str(csv)) == ["Rowboat, canoe, kayak", "Dog"]
    with pytest.raises(ValueError, match="neither"):
        sv.resolve_video_labels("kinetics700")
    with pytest.raises(ValueError, match="neither"):
        sv.resolve_audio_labels(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------
# Metrics and top-k
# ---------------------------------------------------------------------------------------------
def test_similarity_by_hand():
    v = np.array([[1.0, 0.0], [1.0, 1.0]])
    a = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    cos = sv.similarity_matrix(v, a, metric="cosine")
    np.testing.assert_allclose(cos, [[1, 0, 1 / np.sqrt(2)], [1 / np.sqrt(2), 1 / np.sqrt(2), 1]], atol=1e-6)
    euc = sv.similarity_matrix(v, a, metric="euclidean")
    np.testing.assert_allclose(euc, -np.array([[1, np.sqrt(10), 1], [np.sqrt(2), np.sqrt(5), 0]]), atol=1e-6)
    man = sv.similarity_matrix(v, a, metric="manhattan")
    np.testing.assert_allclose(man, -np.array([[1, 4, 1], [2, 3, 0]]), atol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        sv.similarity_matrix(v, a, metric="hamming")


def test_cosine_on_unit_vectors_ranks_like_euclidean_and_manhattan_can_differ():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(20, 16))
    a = rng.normal(size=(50, 16))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    ic, _ = sv.topk(sv.similarity_matrix(v, a, metric="cosine"), 50)
    ie, se = sv.topk(sv.similarity_matrix(v, a, metric="euclidean"), 50)
    np.testing.assert_array_equal(ic, ie)  # |v - a|^2 = 2 - 2 cos on the unit sphere
    assert (np.diff(se, axis=1) <= 0).all()  # scores best first
    # L1 and L2 disagree here: L2 distances 1.2 vs 0.99 pick a2[1], L1 distances 1.2 vs 1.4 pick a2[0]
    v1 = np.array([[0.0, 0.0]])
    a2 = np.array([[1.2, 0.0], [0.7, 0.7]])
    assert sv.topk(sv.similarity_matrix(v1, a2, metric="euclidean"), 1)[0][0, 0] == 1
    assert sv.topk(sv.similarity_matrix(v1, a2, metric="manhattan"), 1)[0][0, 0] == 0


def test_topk_ties_go_to_the_lower_index_and_k_is_checked():
    idx, score = sv.topk(np.array([[0.5, 0.9, 0.5, 0.9, 0.1]]), 4)
    assert idx.tolist() == [[1, 3, 0, 2]] and idx.dtype == np.int32 and score.dtype == np.float32
    with pytest.raises(ValueError, match="k must be"):
        sv.topk(np.zeros((2, 3)), 4)


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    return sv.load_text_encoder()


def test_encoder_info_and_mask_mean_pooling(encoder):
    import torch

    tok, model, info = encoder
    assert info["id"] == sv.DEFAULT_ENCODER_ID and len(info["weights_sha256"]) == 64
    assert info["normalize"] is True  # all-MiniLM-L6-v2's recipe ends with Normalize
    texts = ["dog", "a much longer label about playing the acoustic guitar", "car"]
    emb = sv.encode_texts(texts, tok, model, batch_size=3)
    assert emb.shape == (3, model.config.hidden_size) and emb.dtype == np.float32
    # reference: each text alone (no padding), plain mean over its tokens
    for i, t in enumerate(texts):
        b = tok([t], return_tensors="pt")
        with torch.inference_mode():
            ref = model(**b).last_hidden_state[0].mean(0).numpy()
        np.testing.assert_allclose(emb[i], ref, atol=2e-5)
    # length-sorted batching returns rows in input order; normalize gives unit vectors
    flipped = sv.encode_texts(texts[::-1], tok, model, batch_size=2, normalize=True)
    np.testing.assert_allclose(flipped[::-1], emb / np.linalg.norm(emb, axis=1, keepdims=True), atol=2e-5)


def test_hub_id_without_local_copy_names_the_fix():
    with pytest.raises(FileNotFoundError, match="local directory"):
        sv.load_text_encoder("imdpipe-test/no-such-encoder")


# ---------------------------------------------------------------------------------------------
# build_savld end to end (one encoder run shared by the tests below)
# ---------------------------------------------------------------------------------------------
VIDEO = ["playing guitar", "applauding", "driving car", "feeding birds", "PlayingDaf", "brush_hair"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("savld")
    d = sv.build_savld(video_labels=VIDEO, audio_labels=list(label_set("audioset")), k=10, metric="cosine",
                       out=out, plot=True)
    return out, d


def test_semantics_with_the_offline_encoder(built):
    _, d = built
    assert {"Guitar", "Acoustic guitar", "Electric guitar"} & set(d.neighbours("playing guitar", 3))
    assert {"Applause", "Clapping"} <= set(d.neighbours("applauding", 5))
    assert "Car" in d.neighbours("driving car", 3)
    assert "Bird" in d.neighbours("feeding birds", 3)
    assert "Guitar" not in d.neighbours("feeding birds")


def test_store_layout_attrs_and_txt_round_trip(built):
    out, d = built
    g = zarr.open_group(out / "savld.zarr", mode="r")
    assert g["similarity"].shape == (6, 527) and g["similarity"].dtype == np.float32
    assert g["topk_index"].shape == (6, 10) and g["topk_index"].dtype == np.int32
    assert g["topk_score"].dtype == np.float32
    assert g["similarity"].attrs["_ARRAY_DIMENSIONS"] == ["video_label", "audio_label"]
    assert g["topk_index"].attrs["_ARRAY_DIMENSIONS"] == ["video_label", "rank"]
    a = g.attrs
    assert a["stage"] == "savld" and a["metric"] == "cosine" and a["k"] == 10
    assert a["encoder"] == sv.DEFAULT_ENCODER_ID and len(a["encoder_sha256"]) == 64
    assert a["settings"]["metric"] == "cosine" and a["settings"]["encoder_sha256"] == a["encoder_sha256"]
    assert a["video_labels"] == VIDEO and len(a["audio_labels"]) == 527
    assert a["video_texts"][4:] == ["playing daf", "brush hair"]
    # top-k is the argmax of the stored similarity, scores match
    sim = g["similarity"][:]
    idx = g["topk_index"][:]
    np.testing.assert_array_equal(idx, np.argsort(-sim, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(g["topk_score"][:], np.take_along_axis(sim, idx, 1))
    # savld.txt: one row per video label, audio labels in rank order, commas inside a label kept
    rows = sv.read_savld_txt(out / "savld.txt")
    assert list(rows) == VIDEO
    for i, v in enumerate(VIDEO):
        assert rows[v] == [d.audio_labels[j] for j in idx[i]]
    header, line = (out / "savld.txt").read_text().splitlines()[:2]
    assert header == f"# encoder={a['encoder']} encoder_sha256={a['encoder_sha256']} source=text metric=cosine k=10"
    assert line.startswith("playing guitar\t") and line.count(";") == 9
    loaded = sv.load_savld(out)
    assert loaded.sha256 == d.sha256 == a["savld_sha256"]
    assert loaded.rows() == rows


def test_plots_written_and_nonempty(built):
    out, _ = built
    for name in ("savld_similarity.png", "savld_top_audio_labels.png"):
        p = out / "plots" / name
        assert p.stat().st_size > 10_000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rebuild_reuses_identical_refuses_different_and_overwrites(built, tmp_path):
    out, d = built
    again = sv.build_savld(video_labels=VIDEO, audio_labels=list(label_set("audioset")), k=10, out=out)
    assert again.sha256 == d.sha256
    with pytest.raises(SettingsMismatch, match="metric"):
        sv.build_savld(video_labels=VIDEO, audio_labels=list(label_set("audioset")), k=10,
                       metric="euclidean", out=out)
    with pytest.raises(SettingsMismatch, match="video_labels"):
        sv.build_savld(video_labels=VIDEO[:3], audio_labels=list(label_set("audioset")), k=10, out=out)
    # a hand-made dictionary written elsewhere, then a damaged hash is detected on load
    h = sv.Savld.from_similarity(["a", "b"], ["x", "y", "z"], [[0.1, 0.9, 0.5], [0.3, 0.3, 0.2]], k=2)
    assert h.topk_index.tolist() == [[1, 2], [0, 1]]
    sv.write_savld(h, tmp_path, settings={"metric": "cosine", "k": 2})
    assert sv.read_savld_txt(tmp_path / "savld.txt") == {"a": ["y", "z"], "b": ["x", "y"]}
    zarr.open_group(tmp_path / "savld.zarr", mode="r+").attrs["savld_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="damaged"):
        sv.load_savld(tmp_path / "savld.zarr")


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="k must be"):
        sv.build_savld(video_labels=["a"], audio_labels=["x", "y"], k=3, out=tmp_path)
    with pytest.raises(ValueError, match="duplicate"):
        sv.build_savld(video_labels=["a", "a"], audio_labels=["x", "y"], k=1, out=tmp_path)
    with pytest.raises(ValueError, match="metric"):
        sv.build_savld(video_labels=["a"], audio_labels=["x"], k=1, metric="cos", out=tmp_path)
    with pytest.raises(ValueError, match="out"):
        sv.build_savld(video_labels=["a"], audio_labels=["x"], k=1)
    bad = sv.Savld.from_similarity(["a;b"], ["x"], [[1.0]], k=1)
    with pytest.raises(ValueError, match="';'"):
        sv.write_savld_txt(tmp_path / "s.txt", bad)


def test_small_label_sets_get_tick_labels(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(1)
    d = sv.Savld.from_similarity([f"video {i}" for i in range(5)], [f"audio {j}" for j in range(8)],
                                 rng.random((5, 8)), k=3)
    paths = sv.write_plots(d, tmp_path)
    assert [p.name for p in paths] == ["savld_similarity.png", "savld_top_audio_labels.png"]
    assert all(p.stat().st_size > 5_000 for p in paths)
    counts = sv.mapped_counts(d)
    assert counts.sum() == 15 and counts.tolist() == np.bincount(d.topk_index.ravel(), minlength=8).tolist()
