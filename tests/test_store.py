"""The shared store helper: settings refusal, done flags, shard ownership, block writes."""

import numpy as np
import pytest
import zarr

from imdpipe.pipeline.store import ArraySpec, Partition, SettingsMismatch, StageStore, partition_shards, run_stage

SPECS = [ArraySpec("x", (3, 2), "float32", ("t", "c")), ArraySpec("n", (), "int32", ())]


def _open(path, **kw):
    args = dict(stage="demo", settings={"size": [4, 4], "mode": "a"}, manifest_sha256="abc", n_items=10,
                arrays=SPECS, videos_per_shard=4)
    args.update(kw)
    return StageStore.open(path, **args)


def _produce(fail=()):
    def produce(indices):
        for i in indices:
            if i in fail:
                yield i, ValueError(f"bad video {i} [Errno 2]")
            else:
                yield i, {"x": np.full((3, 2), i, np.float32), "n": np.int32(i * 10)}
    return produce


def test_layout_chunks_shards_and_dims(tmp_path):
    store = _open(tmp_path / "s.zarr")
    g = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert g["x"].chunks == (1, 3, 2) and g["x"].shards == (4, 3, 2)
    assert g["done"].chunks == (4,) and g["error"].chunks == (4,)
    assert g["x"].attrs["_ARRAY_DIMENSIONS"] == ["video", "t", "c"]
    assert g.attrs["settings"] == {"size": [4, 4], "mode": "a", "videos_per_shard": 4, "chunk_checksum": "crc32c"}
    for name in ("x", "n", "done", "error"):  # every chunk ends with its checksum
        assert type(g[name].metadata.codecs[-1]).__name__ == "Crc32cCodec" or \
            type(g[name].metadata.codecs[0].codecs[-1]).__name__ == "Crc32cCodec"

    assert g.attrs["stage"] == "demo" and g.attrs["manifest_sha256"] == "abc"
    assert store.shard_ranges() == [(0, 4), (4, 8), (8, 10)]


def test_settings_mismatch_is_refused_naming_keys(tmp_path):
    _open(tmp_path / "s.zarr")
    with pytest.raises(SettingsMismatch) as e:
        _open(tmp_path / "s.zarr", settings={"size": [8, 8], "mode": "a"})
    assert "size" in str(e.value) and "--overwrite" in str(e.value) and "mode" not in str(e.value)
    with pytest.raises(SettingsMismatch, match="manifest"):
        _open(tmp_path / "s.zarr", manifest_sha256="other")
    # the same settings reopen, in any key order and with tuples for lists
    _open(tmp_path / "s.zarr", settings={"mode": "a", "size": (4, 4)})
    # --overwrite rebuilds from nothing
    store = _open(tmp_path / "s.zarr", settings={"size": [8, 8], "mode": "a"}, overwrite=True)
    assert store.settings["size"] == [8, 8] and not store.done_mask().any()


def test_run_writes_values_errors_and_done_flags_that_survive_reopen(tmp_path):
    store = _open(tmp_path / "s.zarr")
    summary = run_stage(store, _produce(fail={5}), eligible=[i for i in range(10) if i != 2],
                        names=[f"v{i}.mp4" for i in range(10)], show_progress=False)
    assert (summary.ok, summary.failed, summary.skipped) == (8, 1, 1)
    assert summary.errors == [(5, "v5.mp4", "ValueError: bad video 5 [Errno 2]")]
    again = _open(tmp_path / "s.zarr")
    done = again.done_mask()
    assert done.tolist() == [i not in (2, 5) for i in range(10)]
    assert again.errors()[5] == "ValueError: bad video 5 [Errno 2]"
    x = again["x"][:]
    assert x[7, 0, 0] == 7 and x[2].sum() == 0 and x[5].sum() == 0
    # a rerun only retries the failed video; a fixed file then succeeds and keeps the others intact
    summary = run_stage(again, _produce(), eligible=range(10), names=[""] * 10, show_progress=False)
    assert (summary.ok, summary.already_done) == (2, 8)
    assert again.done_mask().all() and again.errors()[5] == ""
    assert again["n"][:].tolist() == [i * 10 for i in range(10)]


@pytest.mark.parametrize("n_items,k,count", [(10, 4, 3), (17, 1, 4), (5, 8, 2), (33, 5, 7)])
def test_partitions_cover_every_index_once_and_never_split_a_shard(tmp_path, n_items, k, count):
    store = _open(tmp_path / "s.zarr", n_items=n_items, videos_per_shard=k)
    shards = store.shard_ranges()
    seen = []
    for i in range(count):
        for s, e in partition_shards(shards, Partition(i, count)):
            assert (s, e) in shards and s % k == 0
            seen += range(s, e)
    assert sorted(seen) == list(range(n_items))


def test_partition_parse_and_env(monkeypatch):
    assert Partition.parse("1/3") == Partition(1, 3)
    with pytest.raises(ValueError, match="i/n"):
        Partition.parse("1-3")
    with pytest.raises(ValueError):
        Partition.parse("3/3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert Partition.parse(None) == Partition(2, 4)


def test_two_partitions_write_the_same_store_as_one(tmp_path):
    one = _open(tmp_path / "one.zarr")
    run_stage(one, _produce(), eligible=range(10), names=[""] * 10, show_progress=False)
    two = _open(tmp_path / "two.zarr")
    for i in range(2):
        run_stage(_open(tmp_path / "two.zarr"), _produce(), eligible=range(10), names=[""] * 10,
                  part=Partition(i, 2), show_progress=False)
    np.testing.assert_array_equal(one["x"][:], two["x"][:])
    assert two.done_mask().all()


def test_progress_bar_and_summary_render(tmp_path):
    import io

    from rich.console import Console

    from imdpipe.pipeline.store import print_summary

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    store = _open(tmp_path / "s.zarr")
    summary = run_stage(store, _produce(fail={1}), eligible=range(10), names=[f"v{i}" for i in range(10)],
                        console=console, show_progress=True, description="demo")
    print_summary(summary, console)
    text = buf.getvalue()
    assert "videos/s" in text and "10/10" in text
    assert "failed" in text and "v1: ValueError: bad video 1 [Errno 2]" in text


def test_background_writes_give_the_same_store_from_another_thread(tmp_path, monkeypatch):
    import threading

    fg = _open(tmp_path / "fg.zarr")
    run_stage(fg, _produce(fail={6}), eligible=range(10), names=[""] * 10, show_progress=False)
    writers = []
    original = StageStore.write_block

    def recording(self, *a, **k):
        writers.append(threading.get_ident())
        return original(self, *a, **k)

    monkeypatch.setattr(StageStore, "write_block", recording)
    bg = _open(tmp_path / "bg.zarr")
    summary = run_stage(bg, _produce(fail={6}), eligible=range(10), names=[""] * 10, show_progress=False,
                        background_writes=True)
    assert (summary.ok, summary.failed) == (9, 1)
    assert len(writers) == 3 and threading.get_ident() not in writers  # 3 shards, none written by the caller
    again = _open(tmp_path / "bg.zarr")  # every write finished before run_stage returned
    np.testing.assert_array_equal(again["x"][:], fg["x"][:])
    assert again.done_mask().tolist() == fg.done_mask().tolist() and again.errors()[6] == fg.errors()[6]


def test_a_failed_background_write_is_raised_and_other_shards_stay_done(tmp_path, monkeypatch):
    original = StageStore.write_block

    def disk_full_on_second_shard(self, start, stop, *a, **k):
        if start == 4:
            raise OSError(28, "No space left on device")
        return original(self, start, stop, *a, **k)

    monkeypatch.setattr(StageStore, "write_block", disk_full_on_second_shard)
    store = _open(tmp_path / "s.zarr")
    with pytest.raises(OSError, match="disk full") as e:
        run_stage(store, _produce(), eligible=range(10), names=[""] * 10, show_progress=False,
                  background_writes=True)
    assert "4 video(s) left" in str(e.value)  # the shard that failed in the thread counts as left to do
    done = _open(tmp_path / "s.zarr").done_mask()
    assert done[:4].all() and not done[4:8].any() and done[8:].all()  # recomputed on the next run
