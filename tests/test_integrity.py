"""Cache integrity: missing, truncated and flipped chunks are found, named, repaired and never trained on."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from audio_fixtures import make_cache as make_audio_cache
from audio_fixtures import tiny_ast_dir, tone
from synth_fixtures import build_synth_cache
from train_fixtures import make_cache, tiny_config
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.pipeline.audio import extract_audio
from imdpipe.pipeline.flow import extract_flow
from imdpipe.pipeline.integrity import _shard_index, verify_cache
from imdpipe.pipeline.store import ArraySpec, DiskFull, ShardClaim, StageStore, StoreDamaged, run_stage
from imdpipe.train.loop import train
from imdpipe.train.runtime import save_checkpoint

DAMAGES = ("delete-shard", "delete-chunk", "truncate", "flip")


def damage(store: Path, name: str, video: int, how: str) -> list[int]:
    """Damage ``video``'s entry of ``store/name`` on disk; returns the done videos it hits."""
    arr = zarr.open_group(store, mode="r+")[name]
    k = arr.shards[0]
    shard = store / name / arr.metadata.encode_chunk_key((video // k,) + (0,) * (arr.ndim - 1))
    done = np.flatnonzero(zarr.open_group(store, mode="r")["done"][:])
    in_shard = [int(v) for v in done if v // k == video // k]
    if how == "delete-shard":  # the issue's `rm CACHE/frames.zarr/rgb/c/2/0/0/0/0`
        shard.unlink()
        return in_shard
    if how == "delete-chunk":  # the chunk disappears from the shard index (reads as the fill value)
        arr[video] = np.full(arr.shape[1:], arr.fill_value, arr.dtype)
        return [video]
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
        return in_shard
    per_shard = tuple(s // c for s, c in zip(arr.shards, arr.chunks))
    offset, length = _shard_index(shard, arr, per_shard)[(video % k,) + (0,) * (arr.ndim - 1)]
    rng = np.random.default_rng(video)
    for pos in rng.choice(np.arange(int(offset), int(offset + length)), size=min(100, int(length)), replace=False):
        data[pos] ^= 0xFF
    shard.write_bytes(bytes(data))
    return [video]


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("integrity") / "cache", train_per_class=4, test_per_class=1)


def _copy(cache: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    return out


@pytest.mark.parametrize("store,name", [("frames.zarr", "rgb"), ("frames.zarr", "flow"), ("audio.zarr", "embedding")])
@pytest.mark.parametrize("how", DAMAGES)
def test_verify_finds_each_damage_and_repair_marks_exactly_those_videos(clean_cache, tmp_path, store, name, how):
    cache = _copy(clean_cache, tmp_path)
    hit = damage(cache / store, name, 5, how)
    report = verify_cache(cache)
    assert report.damaged and report.unresolved
    (bad,) = [r for r in report.stores if r.path.name == store]
    assert bad.bad_videos == hit
    assert {d.array for d in bad.damage} == {name}
    kind = {"delete-shard": "missing", "delete-chunk": "missing", "truncate": "truncated", "flip": "corrupt"}[how]
    assert {d.kind for d in bad.damage} == {kind}
    assert all(r.ok for r in report.stores if r.path.name != store)

    result = CliRunner().invoke(app, ["verify", "--cache", str(cache)])
    assert result.exit_code == 1, result.output
    assert "DAMAGED" in result.output and "--repair" in result.output

    result = CliRunner().invoke(app, ["verify", "--cache", str(cache), "--repair"])
    assert result.exit_code == 0, result.output
    done = zarr.open_group(cache / store, mode="r")["done"][:]
    before = zarr.open_group(clean_cache / store, mode="r")["done"][:]
    assert np.flatnonzero(before & ~done).tolist() == hit
    errors = zarr.open_group(cache / store, mode="r")["error"][:]
    assert all("verify --repair" in errors[v] for v in hit)
    assert not verify_cache(cache).damaged
    # the untouched videos keep their data, bit for bit
    keep = np.flatnonzero(done)
    a, b = zarr.open_group(clean_cache / store, mode="r")[name], zarr.open_group(cache / store, mode="r")[name]
    assert all(np.array_equal(a[v], b[v]) for v in keep)


def test_train_refuses_a_missing_chunk_naming_the_video(clean_cache, tmp_path):
    cache = _copy(clean_cache, tmp_path)
    damage(cache / "frames.zarr", "rgb", 2, "delete-chunk")
    with pytest.raises(StoreDamaged) as e:
        train(cache=cache, out=tmp_path / "run", config=tiny_config(epochs=1), show_progress=False)
    message = str(e.value)
    assert "frames.zarr" in message and "rgb" in message and "train_0_2" in message
    assert "imdpipe verify --cache" in message and "--repair" in message


@pytest.mark.parametrize("workers", [0, 1])
def test_train_stops_on_a_flipped_chunk_naming_store_array_and_video(clean_cache, tmp_path, workers):
    cache = _copy(clean_cache, tmp_path)
    damage(cache / "frames.zarr", "flow", 3, "flip")
    result = CliRunner().invoke(app, ["train", "--cache", str(cache), "--out", str(tmp_path / "run"),
                                      "--size", "tiny", "--crop-size", "32", "--num-frames", "4",
                                      "--frame-stride", "1", "--batch-size", "4", "--epochs", "1",
                                      "--num-workers", str(workers), "--device", "cpu", "--val-split", "last",
                                      "--quiet"])
    assert result.exit_code != 0
    out = result.output
    assert "frames.zarr" in out and "flow" in out and "#3 train_0_3" in out, out
    assert "imdpipe verify" in out and "Traceback" not in out


def test_a_store_without_checksums_is_refused_by_the_trainer_and_flagged_by_verify(clean_cache, tmp_path):
    cache = _copy(clean_cache, tmp_path)
    g = zarr.open_group(cache / "audio.zarr", mode="r+")
    old = g["has_audio"][:]
    del g["has_audio"]
    arr = g.create_array("has_audio", shape=old.shape, chunks=(4,), dtype=bool, fill_value=False,
                         compressors=None)  # no checksum, as stores built before checksums
    arr[:] = old
    assert any(d.kind == "no-checksum" for r in verify_cache(cache).stores for d in r.damage)
    with pytest.raises(ValueError, match="without chunk checksums.*has_audio.*--overwrite"):
        train(cache=cache, out=tmp_path / "run", config=tiny_config(epochs=1), show_progress=False)


# ---------------------------------------------------------------------------------------------
# The real stages: damage, repair, rerun == a clean run
# ---------------------------------------------------------------------------------------------
FLOW = dict(backend="dis", frames=4, size=(32, 48), preset="ultrafast", workers=0, videos_per_shard=3,
            show_progress=False)


def _store_arrays(path: Path) -> dict:
    g = zarr.open_group(path, mode="r")
    return {name: arr[...] for name, arr in g.arrays()}


def _assert_same(a: Path, b: Path):
    x, y = _store_arrays(a), _store_arrays(b)
    assert x.keys() == y.keys()
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory) -> Path:
    return build_synth_cache(tmp_path_factory)


def test_flow_stage_refuses_then_repair_and_rerun_equal_a_clean_run(tmp_path, synth_cache):
    flow = {**FLOW, "rgb_codec": "zstd", "flow_codec": "zstd"}  # not the CLI's default codecs
    ref = _copy(synth_cache, tmp_path / "ref")
    extract_flow(cache=ref, **flow)
    work = _copy(ref, tmp_path / "work")
    damage(work / "frames.zarr", "rgb", 1, "delete-shard")
    damage(work / "frames.zarr", "flow", 4, "truncate")
    damage(work / "frames.zarr", "rgb", 10, "flip")
    damage(work / "frames.zarr", "frame_index", 13, "delete-chunk")
    # the stage meets the missing chunks when it opens the store: refused, naming videos and the fix
    with pytest.raises(StoreDamaged, match=r"(?s)rgb: missing.*#0 .*#1 .*verify --cache .* --repair.*extract-flow"):
        extract_flow(cache=work, **flow)
    report = verify_cache(work, repair=True)
    (frames,) = report.stores
    assert frames.bad_videos == [0, 1, 2, 3, 4, 5, 10, 13] and frames.fixed
    assert "extract-flow" in frames.rerun and "--frames 4 --size 32x48 --backend dis" in frames.rerun
    summary = extract_flow(cache=work, **flow)
    assert summary.ok == 8 and summary.already_done == 8
    _assert_same(ref / "frames.zarr", work / "frames.zarr")
    # the printed command carries the store's own settings (codecs included): run as printed, it
    # accepts the store and finds every video done
    result = CliRunner().invoke(app, shlex.split(frames.rerun)[1:] + ["--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "--rgb-codec zstd --flow-codec zstd" in frames.rerun


def test_audio_stage_repair_and_rerun_equal_a_clean_run(tmp_path):
    model = tiny_ast_dir(tmp_path / "ast")
    clips = [(f"clip{i}", 1.0 + 0.3 * i, tone(200 + 100 * i, 1.0 + 0.3 * i, 16000, 0.3) if i != 2 else None, 16000)
             for i in range(6)]
    ref = make_audio_cache(tmp_path / "ref", clips)
    # one video's 2 windows per forward: a rerun then batches each video exactly as the clean run
    # did (a GEMM over another batch size may round the last bit otherwise, on some CPUs)
    kw = dict(model=model, windows=2, batch_size=2, workers=0, device="cpu", videos_per_shard=2, show_progress=False)
    extract_audio(cache=ref, **kw)
    work = _copy(ref, tmp_path / "work")
    damage(work / "audio.zarr", "embedding", 2, "delete-chunk")  # no audio: zero embedding, still a chunk
    damage(work / "audio.zarr", "logits", 4, "flip")
    report = verify_cache(work, repair=True)
    assert report.stores[0].bad_videos == [2, 4]
    summary = extract_audio(cache=work, **kw)
    assert summary.ok == 2 and summary.already_done == 4
    _assert_same(ref / "audio.zarr", work / "audio.zarr")


# ---------------------------------------------------------------------------------------------
# Disk full
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 400 KB tmpfs (needs root; skipped otherwise). Yields (dir, resize(bytes))."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")

    def resize(size: int):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)
    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_stage_one_message_nothing_done_lost_then_resume(tmp_path, synth_cache, small_fs):
    mnt, resize = small_fs
    flow = {**FLOW, "rgb_codec": "zstd", "flow_codec": "zstd"}  # lossless: more than the 400 KB disk holds
    ref = _copy(synth_cache, tmp_path / "ref")
    extract_flow(cache=ref, **flow)
    cache = mnt / "cache"
    cache.mkdir()
    for name in ("manifest.csv", "labels.txt"):
        shutil.copy(synth_cache / name, cache / name)
    with pytest.raises(DiskFull) as e:
        extract_flow(cache=cache, **flow)
    message = str(e.value)
    assert "disk full while writing" in message and str(cache / "frames.zarr") in message
    assert "video(s) left need about" in message and "already done are kept" in message
    done = zarr.open_group(cache / "frames.zarr", mode="r")["done"][:]
    assert 0 < done.sum() < len(done)
    assert not list((cache / "frames.zarr").rglob("*.partial")) and not list(cache.glob("*.tmp-*"))
    assert not verify_cache(cache).damaged  # what is done is intact
    result = CliRunner().invoke(app, ["extract-flow", "--cache", str(cache), "--frames", "4", "--size", "32x48",
                                      "--backend", "dis", "--preset", "ultrafast", "--workers", "0",
                                      "--videos-per-shard", "3", "--rgb-codec", "zstd", "--flow-codec", "zstd",
                                      "--quiet"])
    assert result.exit_code == 2 and "disk full while writing" in result.output and "Traceback" not in result.output
    resize(8 << 20)  # space freed: the rerun finishes the rest
    summary = extract_flow(cache=cache, **flow)
    assert summary.already_done == int(done.sum())
    _assert_same(ref / "frames.zarr", cache / "frames.zarr")


def test_disk_full_checkpoint_removes_tmp_and_keeps_the_previous_one(small_fs):
    mnt, _ = small_fs
    path = mnt / "checkpoint-last.pt"
    save_checkpoint({"w": torch.ones(1000)}, path)
    before = path.read_bytes()
    with pytest.raises(DiskFull, match=r"checkpoint-last.pt: the checkpoint needs about 1.0 MB.*previous.*kept"):
        save_checkpoint({"w": torch.zeros(250_000)}, path)
    assert path.read_bytes() == before and not (mnt / "checkpoint-last.pt.tmp").exists()


def test_injected_enospc_in_a_pool_worker_is_one_message(tmp_path, monkeypatch):
    """Without a small filesystem: ENOSPC raised by a shard write (as in extract-flow's pool workers)."""
    store_path = tmp_path / "s.zarr"
    specs = [ArraySpec("x", (3, 2), "float32", ("t", "c"))]
    store = StageStore.open(store_path, stage="demo", settings={}, manifest_sha256="a", n_items=8, arrays=specs,
                            videos_per_shard=2)
    real = StageStore.write_rows

    def write_rows(self, start, stop, rows):
        if start >= 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(store_path / "x" / "c" / "2"))
        return real(self, start, stop, rows)

    monkeypatch.setattr(StageStore, "write_rows", write_rows)

    def produce(indices):
        for i in indices:
            yield i, {"x": np.full((3, 2), i, np.float32)}

    with pytest.raises(DiskFull, match=r"disk full while writing .*x/c/2 .*free there.*4 video\(s\) left need about"):
        run_stage(store, produce, eligible=range(8), names=[""] * 8, show_progress=False)
    assert store.done_mask().tolist() == [True] * 4 + [False] * 4
    monkeypatch.setattr(StageStore, "write_rows", real)
    assert run_stage(store, produce, eligible=range(8), names=[""] * 8, show_progress=False).ok == 4
    assert store["x"][:, 0, 0].tolist() == list(range(8))


# ---------------------------------------------------------------------------------------------
# Concurrent unsharded runs divide the shards
# ---------------------------------------------------------------------------------------------
RUN_LOGGED = """
import sys, time
import imdpipe.pipeline.flow as F
real = F.extract_video
def logged(path, settings, **kw):
    with open(sys.argv[2], "a") as f:
        f.write(path + "\\n")
    time.sleep(0.25)
    return real(path, settings, **kw)
F.extract_video = logged
F.extract_flow(cache=sys.argv[1], backend="dis", frames=4, size=(32, 48), preset="ultrafast", workers=0,
               videos_per_shard=1, show_progress=False)
"""


def test_two_concurrent_unsharded_runs_compute_each_video_once(tmp_path, synth_cache):
    ref = _copy(synth_cache, tmp_path / "ref")
    extract_flow(cache=ref, **{**FLOW, "videos_per_shard": 1})
    cache = _copy(synth_cache, tmp_path / "both")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [subprocess.Popen([sys.executable, "-c", RUN_LOGGED, str(cache), str(log)]) for log in logs]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    computed = [log.read_text().split() if log.exists() else [] for log in logs]
    assert sorted(computed[0] + computed[1]) == sorted(set(computed[0] + computed[1]))  # nobody twice
    assert len(computed[0]) + len(computed[1]) == 16 and all(computed)  # every video, shared
    _assert_same(ref / "frames.zarr", cache / "frames.zarr")


def test_a_killed_runs_claim_is_taken_over(tmp_path):
    store_path = tmp_path / "s.zarr"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom imdpipe.pipeline.store import ShardClaim\n"
        f"claim = ShardClaim({str(store_path)!r}, 0)\nassert claim.acquire()\n"
        "print('held', flush=True)\ntime.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    claim = ShardClaim(store_path, 0)
    assert not claim.acquire()
    assert f"pid {holder.pid}" in claim.file.read_text()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert claim.acquire()  # no stale claim outlives its process
    claim.release()
