"""``StageStore.read_whole``: a whole array in one pass per shard file, equal to zarr's own read, and
never a damaged chunk of a done video read as data (head-only training loads its stores so)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from test_integrity import DAMAGES, damage
from train_fixtures import make_cache
from zarr.codecs import ZstdCodec

from imdpipe.pipeline.store import ArraySpec, StageStore, StoreDamaged

ARRAYS = {"frames.zarr": ("rgb", "flow", "frame_index"),
          "audio.zarr": ("embedding", "logits", "window_start_s", "has_audio"),
          "relevance.zarr": ("target", "overlap_count")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # 27 videos in shards of 4 (the last one overhangs), one training video whose flow failed (not done)
    return make_cache(tmp_path_factory.mktemp("whole") / "cache", classes=3, train_per_class=6, test_per_class=3,
                      failed_flow=1)


def test_read_whole_equals_zarr_on_every_array(cache):
    for store_name, names in ARRAYS.items():
        store = StageStore.open_existing(cache / store_name)
        for name in names:
            got, want = store.read_whole(name), store[name][...]
            assert got.dtype == want.dtype and got.shape == want.shape, (store_name, name)
            assert np.array_equal(got, want), (store_name, name)
    frames = StageStore.open_existing(cache / "frames.zarr")
    missing = np.flatnonzero(~frames.done_mask())
    assert len(missing) == 1 and (frames.read_whole("rgb")[missing] == 0).all()  # not done: the fill value


@pytest.mark.parametrize("store_name,name", [("audio.zarr", "embedding"), ("frames.zarr", "rgb")])
@pytest.mark.parametrize("how", DAMAGES)
def test_read_whole_refuses_a_damaged_chunk_of_a_done_video(cache, tmp_path, store_name, name, how):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    hit = damage(copy / store_name, name, 5, how)
    with pytest.raises(StoreDamaged) as err:
        StageStore.open_existing(copy / store_name).read_whole(name)
    msg = str(err.value)
    assert f"{store_name}/{name}: {len(hit)} done video(s) cannot be read: {hit[0]} (" in msg
    assert f"imdpipe verify --cache {copy} --repair" in msg
    # the other arrays of the store still read
    other = next(n for n in ARRAYS[store_name] if n != name)
    StageStore.open_existing(copy / store_name).read_whole(other)


def test_read_whole_without_shards_and_without_checksums(tmp_path):
    spec = [ArraySpec("x", (3,), "float32", ("feature",))]
    store = StageStore.open(tmp_path / "one.zarr", stage="t", settings={}, manifest_sha256="m", n_items=5,
                            arrays=spec, videos_per_shard=1)  # one file per video: zarr reads it
    rows = {i: {"x": np.full(3, i, np.float32)} for i in range(5)}
    for i in range(5):
        store.write_block(i, i + 1, {i: rows[i]}, {})
    assert np.array_equal(store.read_whole("x"), np.repeat(np.arange(5, dtype=np.float32)[:, None], 3, 1))
    (tmp_path / "one.zarr" / "x" / "c" / "3" / "0").unlink()
    with pytest.raises(StoreDamaged, match=r"1 done video\(s\) cannot be read: 3 \("):
        store.read_whole("x")
    g = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    g.create_array("x", shape=(8, 3), chunks=(1, 3), shards=(4, 3), dtype="float32", compressors=ZstdCodec())
    g.create_array("done", shape=(8,), chunks=(4,), dtype="bool", fill_value=True)
    with pytest.raises(StoreDamaged, match="without chunk checksums"):
        StageStore(tmp_path / "plain.zarr", g).read_whole("x")
