"""Data-driven dictionaries and the SAVLD report on a synthetic cache whose sounds are known.

The cache follows the synthetic design (``plan_dataset``: classes, train/test split, which sound
each video carries, which are relevant) with an ``audio.zarr`` in the contract layout whose
logits rank the carried sound first (an audio model that hears exactly what was mixed in), so
every statistic has an independent reference computed from the plan.
"""

import json

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.datasets.synth import CLASS_DESIGN, SOUND_POOL, plan_dataset
from imdpipe.pipeline import relevance as rel
from imdpipe.pipeline import savld_data as sd
from imdpipe.pipeline import savld_report as sr
from imdpipe.pipeline.manifest import VideoRecord, write_manifest
from imdpipe.pipeline.savld import Savld, load_savld, read_savld_txt, write_savld
from imdpipe.pipeline.store import ArraySpec, SettingsMismatch, StageStore

AUDIO = list(SOUND_POOL)
CLASSES = [c.name for c in CLASS_DESIGN]
NEVER_RELEVANT = [c.name for c in CLASS_DESIGN if c.relevant_sound is None]


def oracle_logits(sound, rng, *, second=None):
    """Logits of one window: the carried sound first, ``second`` (if any) next, the rest noise below."""
    x = rng.normal(-4.0, 0.5, len(AUDIO))
    if sound is not None:
        x[AUDIO.index(sound)] = 5.0
    if second is not None:
        x[AUDIO.index(second)] = 3.0
    return x


def make_synthetic_cache(root, *, seed=0, videos_per_class=16, override=None):
    """manifest.csv + audio.zarr + ground_truth.csv for the synthetic design; ``override`` maps a
    video_id to the sound its logits should show instead (to test what can and cannot move lift)."""
    plans = plan_dataset(seed=seed, videos_per_class=videos_per_class)
    records = [VideoRecord(index=i, video_id=p.video_id, path=f"videos/{p.class_name}/{p.video_id}.mp4",
                           label=p.label, label_name=p.class_name, split=p.split, duration_s=3.0, fps=10.0,
                           n_frames=30, width=64, height=64, has_audio=p.sound is not None)
               for i, p in enumerate(plans)]
    manifest = write_manifest(root, records, CLASSES)
    store = StageStore.open(
        root / "audio.zarr", stage="audio", settings={"model": "oracle", "windows": 1},
        manifest_sha256=manifest.sha256, n_items=len(plans), videos_per_shard=16,
        arrays=[ArraySpec("embedding", (1, 4), "float16", ("window", "feature")),
                ArraySpec("logits", (1, len(AUDIO)), "float16", ("window", "audio_label")),
                ArraySpec("window_start_s", (1,), "float32", ("window",)),
                ArraySpec("has_audio", (), "bool", (), fill_value=False)],
        attrs={"audio_labels": AUDIO, "model": "oracle"})
    rng = np.random.default_rng(seed)
    override = override or {}
    for s, e in store.shard_ranges():
        rows = {}
        for i in range(s, e):
            p = plans[i]
            sound = override.get(p.video_id, p.sound)
            logits = oracle_logits(sound, rng) if p.sound is not None else np.zeros(len(AUDIO))
            rows[i] = {"embedding": np.ones((1, 4)), "logits": logits[None], "window_start_s": np.zeros(1),
                       "has_audio": np.bool_(p.sound is not None)}
        store.write_block(s, e, rows, {})
    (root / "ground_truth.csv").write_text("video_id,relevant\n" + "".join(
        f"{p.video_id},{int(p.relevant)}\n" for p in plans))
    return plans


@pytest.fixture
def cache(tmp_path):
    make_synthetic_cache(tmp_path)
    return tmp_path


def text_savld(cache, rows: dict[str, list[str]], *, k=3, settings=None):
    """A text dictionary whose similarity ranks ``rows[class]`` first (others by a fixed pattern)."""
    sim = np.tile(np.linspace(0.3, 0.0, len(AUDIO)), (len(CLASSES), 1))
    for c, labels in rows.items():
        for r, lab in enumerate(labels):
            sim[CLASSES.index(c), AUDIO.index(lab)] = 0.9 - 0.1 * r
    d = Savld.from_similarity(CLASSES, AUDIO, sim, k=k)
    return write_savld(d, cache, settings={"encoder": "hand", "metric": "cosine", "k": k, "source": "text",
                                           **(settings or {})})


# ---------------------------------------------------------------------------------------------
# Statistics and the data dictionary
# ---------------------------------------------------------------------------------------------
def test_statistics_match_the_plan(cache):
    plans = plan_dataset(seed=0, videos_per_class=16)
    stats = sd.label_statistics(cache, ya=1)
    train = [p for p in plans if p.split == "train"]
    want = np.zeros((len(CLASSES), len(AUDIO)), int)
    for p in train:
        if p.sound is not None:
            want[p.label, AUDIO.index(p.sound)] += 1
    np.testing.assert_array_equal(stats.counts, want)
    per_class = np.bincount([p.label for p in train], minlength=len(CLASSES))
    np.testing.assert_array_equal(stats.clips, per_class)  # silent clips count, predicting nothing
    np.testing.assert_array_equal(stats.audible_clips, want.sum(1))
    base = want.sum(0) / len(train)
    np.testing.assert_allclose(stats.base_frequency, base)
    g = CLASSES.index("playing_guitar")
    j = AUDIO.index("Guitar")
    assert stats.lift[g, j] == pytest.approx((want[g, j] / per_class[g]) / base[j])
    # Ya=2: every audible clip's top-2 holds its sound and the next-highest noise label
    two = sd.label_statistics(cache, ya=2)
    assert (two.counts.sum(1) == 2 * want.sum(1)).all()
    with pytest.raises(ValueError, match="Ya"):
        sd.label_statistics(cache, ya=9)


def test_data_dictionary_finds_the_relevant_sounds_and_empty_entries(cache):
    stats = sd.label_statistics(cache, ya=1)
    idx, lift = sd.data_topk(stats, k=3)
    entries = {c: [AUDIO[j] for j in idx[i] if j >= 0] for i, c in enumerate(CLASSES)}
    assert entries["playing_guitar"][0] == "Guitar" and entries["applauding"][0] == "Applause"
    for c in CLASS_DESIGN:
        if c.relevant_sound is not None:
            assert entries[c.name] == [c.relevant_sound]
    for name in NEVER_RELEVANT:  # audio never relevant: an empty entry, not K background sounds
        assert entries[name] == [] and (idx[CLASSES.index(name)] == sd.NO_LABEL).all()
    assert np.isnan(lift[CLASSES.index("yoga")]).all()
    assert lift[0, 0] == pytest.approx(stats.lift[0, AUDIO.index("Guitar")])
    # the thresholds decide: asking only for lift >= 1 and any frequency lets background sounds in
    loose, _ = sd.data_topk(stats, k=3, min_lift=1.0, min_freq=0.0)
    assert (loose[CLASSES.index("yoga")] >= 0).any()
    with pytest.raises(ValueError, match="min_lift"):
        sd.data_topk(stats, k=3, min_lift=0.5)


def test_lift_is_computed_on_the_train_split_only(cache, tmp_path):
    plans = plan_dataset(seed=0, videos_per_class=16)
    before = sd.label_statistics(cache, ya=1)
    # every test video of every class now "sounds like" Siren: nothing may change
    tests = {p.video_id: "Siren" for p in plans if p.split == "test" and p.sound is not None}
    other = tmp_path / "test_changed"
    other.mkdir()
    make_synthetic_cache(other, override=tests)
    after = sd.label_statistics(other, ya=1)
    np.testing.assert_array_equal(after.counts, before.counts)
    np.testing.assert_array_equal(sd.data_topk(after, k=3)[0], sd.data_topk(before, k=3)[0])
    # the same change on training videos does move it (so the check above can fail)
    trains = {p.video_id: "Siren" for p in plans if p.split == "train" and p.class_name == "yoga" and p.sound}
    moved = tmp_path / "train_changed"
    moved.mkdir()
    make_synthetic_cache(moved, override=trains)
    changed = sd.label_statistics(moved, ya=1)
    assert changed.counts[CLASSES.index("yoga"), AUDIO.index("Siren")] == len(trains) > 0
    assert [AUDIO[j] for j in sd.data_topk(changed, k=3)[0][CLASSES.index("yoga")] if j >= 0] == ["Siren"]


def test_hybrid_rule_by_hand():
    # 2 classes x 4 labels; class 0 text proposes labels 0, 1; class 1 proposes 2, 3
    counts = np.array([[6, 1, 0, 5], [0, 0, 3, 0]])
    stats = sd.LabelStats(video_labels=["a", "b"], audio_labels=["w", "x", "y", "z"], ya=1, split="train",
                          counts=counts, clips=np.array([10, 10]), videos=np.array([10, 10]),
                          audible_clips=np.array([10, 3]))
    # base = [.3, .05, .15, .25]; class 0 lift = [2, 2, 0, 2], freq [.6, .1, 0, .5]; class 1 lift [0, 0, 2, 0]
    np.testing.assert_allclose(stats.lift, [[2, 2, 0, 2], [0, 0, 2, 0]])
    sim = np.array([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.9, 0.8]])
    idx, score = sd.hybrid_topk(stats, sim, k=2, min_lift=2.0, min_freq=0.3)
    # class 0: w kept (lift 2, freq .6), x dropped (freq .1 < .3); z added by the data (lift 2, freq .5)
    # class 1: y kept (lift 2, freq .3), z never heard -> dropped
    assert idx.tolist() == [[0, 3], [2, -1]]
    np.testing.assert_allclose(score[0], [0.9, 0.0])
    assert np.isnan(score[1, 1])
    idx, _ = sd.data_topk(stats, k=3, min_lift=2.0, min_freq=0.3)
    assert idx.tolist() == [[0, 3, -1], [2, -1, -1]]  # lift ties -> higher frequency first


# ---------------------------------------------------------------------------------------------
# Relevance with short and empty entries
# ---------------------------------------------------------------------------------------------
def test_normalized_overlap_with_short_and_empty_entries():
    # entry of 1 label, Ya=2, IoU: c=1 -> (1/2) / (1/2) = 1; K=3 entry, c=1 -> (1/4) / (2/3) = 0.375
    t = rel.normalized_overlap(np.array([[1], [1], [0]]), K=np.array([[1], [3], [0]]), Ya=2)
    np.testing.assert_allclose(t[:, 0], [1.0, 0.375, 0.0])
    np.testing.assert_allclose(rel.normalized_overlap(1, K=2, Ya=3, overlap="dice"), 0.5)
    assert rel.normalized_overlap(0, K=0, Ya=3, overlap="dice") == 0.0


def test_build_savld_source_data_then_relevance_follows(cache):
    runner = CliRunner()
    r = runner.invoke(app, ["build-savld", "--cache", str(cache), "--source", "data", "--k", "3",
                            "--relevance-k", "3", "--ya", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "empty entries" in r.output and "yoga" in r.output
    d = load_savld(cache / "savld.zarr")
    assert d.source == "data" and d.attrs["settings"]["min_freq"] == sd.DEFAULT_MIN_FREQ
    assert d.attrs["settings"]["stats_split"] == "train" and d.attrs["settings"]["ya"] == 1
    assert d.neighbours("playing_guitar") == ["Guitar"] and d.neighbours("yoga") == []
    assert read_savld_txt(cache / "savld.txt")["yoga"] == [] and read_savld_txt(cache / "savld.txt") == d.rows()
    assert d.data["lift"].shape == (8, 8) and d.similarity.shape == (8, 8)  # text similarity kept too
    g = zarr.open_group(cache / "relevance.zarr", mode="r")
    assert g.attrs["savld_source"] == "data" and set(NEVER_RELEVANT) <= set(g.attrs["empty_entries"])
    plans = plan_dataset(seed=0, videos_per_class=16)
    target = g["target"][:, 0]
    for i, p in enumerate(plans):  # entry of one label, Ya=1: 1 exactly when the class's sound is heard
        assert target[i] == (1.0 if p.relevant else 0.0), p.video_id
    # a text build over the data store is refused naming the source; --overwrite switches, relevance too
    r = runner.invoke(app, ["build-savld", "--cache", str(cache), "--k", "3", "--relevance-k", "3", "--ya", "1",
                            "--quiet"])
    assert r.exit_code == 2 and "source: store has 'data'" in r.output
    r = runner.invoke(app, ["build-savld", "--cache", str(cache), "--source", "hybrid", "--k", "3",
                            "--relevance-k", "3", "--ya", "1", "--quiet", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert zarr.open_group(cache / "relevance.zarr", mode="r").attrs["savld_source"] == "hybrid"
    assert load_savld(cache / "savld.zarr").source == "hybrid"


def test_data_source_refusals(cache, tmp_path):
    from imdpipe.pipeline.savld import build_savld

    with pytest.raises(ValueError, match="needs --cache"):
        build_savld(video_labels=CLASSES, audio_labels=AUDIO, out=tmp_path / "x", source="data", k=3)
    with pytest.raises(ValueError, match="source must be"):
        build_savld(cache=cache, source="audio")
    g = zarr.open_group(cache / "audio.zarr", mode="r+")
    done = g["done"][:]
    done[3] = False
    g["done"][:] = done  # one video not processed yet: the statistics would be incomplete
    with pytest.raises(ValueError, match="every training video.*not yet processed"):
        build_savld(cache=cache, source="data", ya=1, k=3)
    assert not (cache / "savld.zarr").exists()


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def test_report_flags_a_wrong_text_dictionary_and_scores_the_dictionaries(cache):
    # wrong by construction: playing_guitar's text entry is Siren (never relevant to anything);
    # applauding's is right
    text_savld(cache, {"playing_guitar": ["Siren", "Whistling", "Engine"],
                       "applauding": ["Applause", "Drum", "Siren"]})
    report = sr.savld_report(cache=cache, K=3, ya=1)
    by = {c.label: c for c in report.classes}
    guitar, applause, yoga = by["playing_guitar"], by["applauding"], by["yoga"]
    assert sr.FLAG_UNSUPPORTED in guitar.flags and "Siren" in guitar.contradicted
    assert guitar.data_entry == ["Guitar"] and guitar.data_topk[0]["label"] == "Guitar"
    assert guitar.relevant_share["text"] < guitar.relevant_share["data"]
    assert applause.flags == [] and applause.data_entry == ["Applause"] and applause.overlap >= 1 / 3
    assert sr.FLAG_EMPTY in yoga.flags and yoga.data_entry == [] and yoga.relevant_share["data"] == 0.0
    assert guitar in sr.worst_classes(report, 4)
    # share relevant by hand: guitar's training clips whose top-1 is one of its 3 text labels
    plans = [p for p in plan_dataset(seed=0, videos_per_class=16) if p.split == "train"]
    mine = [p for p in plans if p.class_name == "playing_guitar"]
    want = np.mean([p.sound in ("Siren", "Whistling", "Engine") for p in mine])
    assert guitar.relevant_share["text"] == pytest.approx(want)
    # AUC on the held-out test split: the data dictionary separates relevant videos perfectly here
    auc = report.auc["splits"]
    assert auc["test"]["data"]["auc"] == pytest.approx(1.0)
    assert auc["test"]["text"]["auc"] < auc["test"]["data"]["auc"]
    n_test = sum(p.split == "test" for p in plan_dataset(seed=0, videos_per_class=16))
    assert auc["test"]["text"]["n"] == n_test

    paths = sr.write_report(report, cache / "report")
    saved = json.loads((cache / "report" / sr.REPORT_JSON).read_text())
    assert "playing_guitar" in saved["summary"]["flagged"] and "yoga" in saved["summary"]["empty_data_entries"]
    md = (cache / "report" / sr.REPORT_MD).read_text()
    assert "| playing_guitar |" in md and "text unsupported" in md and "plots/savld_report_worst.png" in md
    assert "<script>" in (cache / "report" / sr.REPORT_HTML).read_text()
    assert all(p.stat().st_size > 0 for p in paths)


def test_report_cli_and_rank_correlation(cache):
    text_savld(cache, {"playing_guitar": ["Guitar", "Drum", "Siren"]})
    r = CliRunner().invoke(app, ["savld-report", "--cache", str(cache), "--relevance-k", "3", "--ya", "1"])
    assert r.exit_code == 0, r.output
    assert "classes flagged" in r.output and "relevance AUC" in r.output
    assert (cache / sr.REPORT_MD).exists() and (cache / "plots" / sr.PLOT_AGREEMENT).exists()
    assert sr.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert sr.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert sr.spearman([1, 2], [1, 2]) is None and sr.spearman([1, 1, 1], [1, 2, 3]) is None
    r = CliRunner().invoke(app, ["savld-report", "--cache", str(cache / "nowhere")])
    assert r.exit_code == 2 and "error" in r.output


def test_settings_mismatch_names_the_source(cache):
    text_savld(cache, {})
    with pytest.raises(SettingsMismatch, match="source"):
        from imdpipe.pipeline.savld import build_savld

        build_savld(cache=cache, source="data", ya=1, k=3)


def test_cache_with_dictionary_shares_stores_and_owns_its_targets(cache, tmp_path_factory):
    text_savld(cache, {})
    before = sorted(p.name for p in cache.iterdir())
    out = sd.cache_with_dictionary(cache, tmp_path_factory.mktemp("variant"), source="data", k=3, K=3, ya=1,
                                   show_progress=False)
    assert (out / "audio.zarr").is_symlink() and (out / "manifest.csv").is_symlink()
    assert not (out / "savld.zarr").is_symlink() and load_savld(out / "savld.zarr").source == "data"
    assert zarr.open_group(out / "relevance.zarr", mode="r").attrs["savld_source"] == "data"
    assert sorted(p.name for p in cache.iterdir()) == before  # the original cache is untouched
    assert load_savld(cache / "savld.zarr").source == "text"
    again = sd.cache_with_dictionary(cache, out, source="data", k=3, K=3, ya=1, show_progress=False)
    assert again == out  # a rerun reuses both stores
    (out / "labels.txt").unlink()
    (out / "labels.txt").write_text("not a link\n")
    with pytest.raises(FileExistsError, match="labels.txt"):
        sd.cache_with_dictionary(cache, out, source="data", k=3, K=3, ya=1, show_progress=False)


def test_demo_dictionary_comparison(cache, tmp_path_factory):
    from imdpipe.demo import DemoSettings, compare_dictionaries, dictionary_table

    text_savld(cache, {"yoga": ["Guitar", "Drum", "Siren"]})
    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(relevance_k=1, ya=1, savld_k=3)
    report, caches = compare_dictionaries(cache, out, settings, ground_truth=cache / "ground_truth.csv",
                                          sources={"text", "hybrid"}, show_progress=False)
    assert caches["text"] == cache and caches["hybrid"] == out / "cache-hybrid"
    assert zarr.open_group(caches["hybrid"] / "relevance.zarr", mode="r").attrs["savld_source"] == "hybrid"
    test_auc = report["auc"]["splits"]["test"]
    assert test_auc["data"]["auc"] == pytest.approx(1.0) and test_auc["hybrid"]["auc"] == pytest.approx(1.0)
    table = dictionary_table(report)
    assert f"| data (training-split lift) | {test_auc['data']['auc']:.3f} |" in table
    assert "juggling_balls, skipping_rope, yoga" in table and (cache / sr.REPORT_JSON).is_file()
