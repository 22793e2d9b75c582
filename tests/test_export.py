"""export: any imdpipe store copied to HDF5 with every array and attribute intact."""

import h5py
import numpy as np
import pytest

from imdpipe.pipeline.export import export_store, read_h5_attrs
from imdpipe.pipeline.store import ArraySpec, StageStore, add_array, create_group, root_attrs, run_stage


def _stage_store(path):
    specs = [ArraySpec("embedding", (2, 5), "float16", ("window", "feature"), attrs={"units": "a.u."}),
             ArraySpec("has_audio", (), "bool", ()),
             ArraySpec("frame_index", (3,), "int32", ("time",), attrs={"bound": 20, "formula": {"q": "round(x)"}})]
    store = StageStore.open(path, stage="demo", settings={"windows": 2, "size": [4, 4]}, manifest_sha256="abc",
                            n_items=7, arrays=specs, videos_per_shard=3,
                            attrs={"audio_labels": ["Speech", "Dog, bark"], "feature_extractor": {"max_length": 8}})

    def produce(indices):
        for i in indices:
            if i == 4:
                yield i, ValueError("broken file, naïve ünïcode")
            else:
                yield i, {"embedding": np.full((2, 5), i / 3, np.float32), "has_audio": i % 2 == 0,
                          "frame_index": np.arange(3) + i}

    run_stage(store, produce, eligible=range(7), names=[f"v{i}" for i in range(7)], show_progress=False)
    return store


def test_every_array_and_attr_round_trips(tmp_path):
    store = _stage_store(tmp_path / "s.zarr")
    out = export_store(tmp_path / "s.zarr", tmp_path / "s.h5")
    with h5py.File(out, "r") as f:
        assert set(f.keys()) == {"embedding", "has_audio", "frame_index", "done", "error"}
        for name in ("embedding", "has_audio", "frame_index", "done"):
            src = store[name][:]
            assert f[name].dtype == src.dtype and f[name].shape == src.shape
            np.testing.assert_array_equal(f[name][:], src)
        errors = [e.decode() for e in f["error"][:]]
        assert errors == [str(e) for e in store.errors()] and "naïve ünïcode" in errors[4]
        assert f["embedding"].chunks == (1, 2, 5)
        attrs = read_h5_attrs(f)
        assert attrs == store.attrs
        assert attrs["audio_labels"] == ["Speech", "Dog, bark"] and attrs["settings"]["size"] == [4, 4]
        assert read_h5_attrs(f["frame_index"]) == dict(store["frame_index"].attrs)
        assert read_h5_attrs(f["embedding"])["_ARRAY_DIMENSIONS"] == ["video", "window", "feature"]


def test_whole_dataset_store_with_nested_group(tmp_path):
    group = create_group(tmp_path / "w.zarr", root_attrs("savld", {"k": 2}, None, encoder="minilm"),
                         overwrite=False)
    sim = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    add_array(group, "similarity", sim, ("video_label", "audio_label"), metric="cosine")
    sub = group.create_group("extra")
    sub.attrs["note"] = None
    add_array(sub, "names", np.array(["a", "bé", "c"], dtype=np.dtypes.StringDType()), ("label",))
    export_store(group, tmp_path / "w.h5")
    with h5py.File(tmp_path / "w.h5", "r") as f:
        np.testing.assert_array_equal(f["similarity"][:], sim)
        assert read_h5_attrs(f["similarity"])["metric"] == "cosine"
        assert [s.decode() for s in f["extra/names"][:]] == ["a", "bé", "c"]
        assert read_h5_attrs(f["extra"]) == {"note": None}
        assert read_h5_attrs(f)["settings"] == {"k": 2}


def test_existing_output_is_refused_unless_overwrite_and_missing_store_is_clear(tmp_path):
    _stage_store(tmp_path / "s.zarr")
    (tmp_path / "s.h5").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_store(tmp_path / "s.zarr", tmp_path / "s.h5")
    assert (tmp_path / "s.h5").read_bytes() == b"keep me"
    export_store(tmp_path / "s.zarr", tmp_path / "s.h5", overwrite=True, compression="gzip")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["embedding"].compression == "gzip" and f["embedding"].shape == (7, 2, 5)
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_store(tmp_path / "missing.zarr", tmp_path / "m.h5")
