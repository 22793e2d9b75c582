"""The flow stage: known motion, frame/flow alignment, frames.zarr layout, resume after SIGKILL,
concurrent shards, bad videos, RAFT batching, and the CLI."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.pipeline.flow import (
    DIS_PRESETS,
    FlowSettings,
    VideoError,
    as_stored,
    decode_video_frames,
    extract_flow,
    extract_video,
    flow_pair,
    sample_positions,
)
from imdpipe.pipeline.flow_utils import FLOW_BOUND, dequantize, quantize
from imdpipe.pipeline.manifest import VideoRecord, write_manifest
from imdpipe.pipeline.media import write_mp4
from imdpipe.pipeline.store import SettingsMismatch

STEP = 40 / 255
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# synthetic videos
# ---------------------------------------------------------------------------------------------
def _texture(rng, h, w, sigma=1.5):
    t = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
    return (t - t.min()) / (t.max() - t.min())


def _to_rgb(gray01):
    g = np.clip(gray01 * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.stack([g, g, g], axis=-1)


def translation_video(path, *, n, h, w, dx, dy, seed=0, fps=25, audio=True):
    """A smooth random texture moving by (dx, dy) pixels per frame (sub-pixel, bicubic)."""
    rng = np.random.default_rng(seed)
    big = _texture(rng, 2 * h, 2 * w)
    frames = []
    for t in range(n):
        m = np.float32([[1, 0, dx * t], [0, 1, dy * t]])
        moved = cv2.warpAffine(big, m, (2 * w, 2 * h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        frames.append(_to_rgb(moved[h // 2:h // 2 + h, w // 2:w // 2 + w]))
    sound = 0.1 * np.sin(np.linspace(0, 400 * np.pi, int(16000 * n / fps))) if audio else None
    write_mp4(path, np.stack(frames), fps, sound, crf=10)
    return path


def rotzoom_video(path, *, n, h, w, degrees, scale, seed=1):
    """A texture rotating by ``degrees`` and zooming by ``scale`` per frame about the image centre.

    Returns the ground-truth flow (H, W, 2) between any two consecutive frames.
    """
    rng = np.random.default_rng(seed)
    tex = _texture(rng, h, w)
    th = math.radians(degrees)
    a = scale * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    frames = []
    for t in range(n):
        at = np.linalg.matrix_power(a, t)
        m = np.hstack([at, (c - at @ c)[:, None]]).astype(np.float32)
        frames.append(_to_rgb(cv2.warpAffine(tex, m, (w, h), flags=cv2.INTER_CUBIC,
                                             borderMode=cv2.BORDER_REFLECT)))
    write_mp4(path, np.stack(frames), 25, crf=10)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    px = np.stack([xx - c[0], yy - c[1]], axis=-1)
    return (px @ a.T - px).astype(np.float32)  # x_{t+1} = c + A (x_t - c)


def make_cache(cache, paths, labels=("a",)):
    recs = [VideoRecord(index=i, video_id=Path(p).stem + str(i), path=str(p), label=0, label_name=labels[0],
                        split="train") for i, p in enumerate(paths)]
    return write_manifest(cache, recs, list(labels))


def epe(flow, gt, margin):
    d = flow - gt
    return float(np.hypot(d[..., 0], d[..., 1])[..., margin:-margin, margin:-margin].mean())


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def test_sample_positions_by_hand_and_invariants():
    assert sample_positions(10, 4).tolist() == [1, 3, 6, 8]  # floor((t + 0.5) * 10 / 4)
    assert sample_positions(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    for n in (1, 2, 5, 31, 32, 33, 100, 1001):
        for t in (1, 8, 32):
            p = sample_positions(n, t)
            assert len(p) == t and p.dtype == np.int32
            assert p.min() >= 0 and p.max() < n and (np.diff(p) >= 0).all()
            if n >= t:
                assert len(np.unique(p)) == t
    assert flow_pair(3, 10) == (3, 4) and flow_pair(9, 10) == (8, 9)
    with pytest.raises(ValueError):
        flow_pair(0, 1)


# ---------------------------------------------------------------------------------------------
# known motion, measured at the default store size 256x340
# ---------------------------------------------------------------------------------------------
# Bounds on the mean end-point error of the *stored, dequantized* flow (quantization and H.264 at
# crf 10 included), margin 16 px. dx, dy sit on the quantization grid. Measured here (n=5, T=4):
# translation / rotation+zoom = DIS balanced 0.087 / 0.076, DIS medium 0.093 / 0.073,
# DIS ultrafast 0.119 / 0.143, Farneback 0.078 / 0.071; bounds leave ~25% headroom.
TRANSLATION_BOUNDS = {("dis", "balanced"): 0.11, ("dis", "medium"): 0.11, ("dis", "ultrafast"): 0.16,
                      ("farneback", "balanced"): 0.11}
ROTZOOM_BOUNDS = {("dis", "balanced"): 0.10, ("dis", "medium"): 0.10, ("dis", "ultrafast"): 0.19,
                  ("farneback", "balanced"): 0.10}


@pytest.fixture(scope="module")
def motion_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("motion")
    dx, dy = 8.5 * STEP, -4.5 * STEP  # 1.333, -0.706 px per frame
    translation_video(d / "shift.mp4", n=5, h=256, w=340, dx=dx, dy=dy)
    gt_rz = rotzoom_video(d / "rotzoom.mp4", n=5, h=256, w=340, degrees=0.6, scale=1.01)
    return {"shift": (d / "shift.mp4", np.float32([dx, dy])), "rotzoom": (d / "rotzoom.mp4", gt_rz)}


@pytest.mark.parametrize("backend,preset", sorted(TRANSLATION_BOUNDS))
def test_known_translation_and_rotation_zoom(motion_videos, backend, preset):
    settings = FlowSettings(frames=4, size=(256, 340), backend=backend, preset=preset)
    path, gt = motion_videos["shift"]
    out = extract_video(path, settings)
    flow = dequantize(out["flow"])
    e_shift = epe(flow, gt, 16)
    path, gt = motion_videos["rotzoom"]
    out = extract_video(path, settings)
    e_rz = epe(dequantize(out["flow"]), gt, 16)
    print(f"{backend}/{preset}: translation EPE {e_shift:.3f}, rotation+zoom EPE {e_rz:.3f}")
    assert e_shift < TRANSLATION_BOUNDS[(backend, preset)]
    assert e_rz < ROTZOOM_BOUNDS[(backend, preset)]
    # a wrong sign or a swapped axis is far off: the estimate is the motion, not its mirror
    assert epe(flow, -motion_videos["shift"][1], 16) > 1.0


def test_flow_is_in_pixels_of_the_stored_frame(tmp_path):
    # a 128x160 video moving 2 px/frame stored at 64x80 moves 1 px/frame in the store
    path = translation_video(tmp_path / "big.mp4", n=4, h=128, w=160, dx=2 * 6.5 * STEP, dy=0.0)
    out = extract_video(path, FlowSettings(frames=3, size=(64, 80), preset="medium"))
    assert out["rgb"].shape == (3, 64, 80, 3)
    assert epe(dequantize(out["flow"]), np.float32([6.5 * STEP, 0.0]), 8) < 0.12


# ---------------------------------------------------------------------------------------------
# no off-by-one: rgb[t] is frame_index[t], flow[t] is (frame_index[t] -> +1)
# ---------------------------------------------------------------------------------------------
def _decode_all(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.parametrize("frames", [5, 13])  # distinct positions (incl. the last frame), and repeats
def test_rgb_and_flow_line_up_with_an_independent_decode(tmp_path, frames):
    n = 9
    path = translation_video(tmp_path / "v.mp4", n=n, h=64, w=80, dx=0.7, dy=0.3, seed=3)
    s = FlowSettings(frames=frames, size=(64, 80), backend="dis", preset="ultrafast")
    out = extract_video(path, s)
    ref = _decode_all(path)
    assert len(ref) == n and out["n_frames"] == n
    fi = out["frame_index"]
    assert fi.dtype == np.int32 and fi.shape == (frames,)
    assert fi.min() >= 0 and fi.max() < n and (np.diff(fi) >= 0).all()
    assert bool(out["repeated"]) == (frames > n)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    blank = np.zeros((64, 80), np.uint8)
    dis.calc(blank, blank, None)  # OpenCV DIS's first call differs from later ones: warm it up
    for t, i in enumerate(fi):
        assert np.array_equal(out["rgb"][t], ref[i]), f"rgb[{t}] is not source frame {i}"
        a, b = (i, i + 1) if i + 1 < n else (i - 1, i)
        gray = [cv2.cvtColor(ref[k], cv2.COLOR_RGB2GRAY) for k in (a, b)]
        assert np.array_equal(out["flow"][t], quantize(dis.calc(gray[0], gray[1], None))), f"flow[{t}]"
    if frames == 5:
        assert fi[-1] == n - 1  # the last frame is sampled and pairs with its predecessor


def test_frame_count_from_the_decoder_wins_over_the_header(tmp_path, monkeypatch):
    import imdpipe.pipeline.flow as flow_mod

    path = translation_video(tmp_path / "v.mp4", n=7, h=32, w=48, dx=0.5, dy=0.0, audio=False)
    monkeypatch.setattr(flow_mod, "_frame_count_hint", lambda p: 20)  # a lying container header
    video = decode_video_frames(path, (32, 48), frames=4)
    assert video.n_frames == 7 and video.frame_index.tolist() == sample_positions(7, 4).tolist()
    assert set(video.images) == {i for p in video.frame_index for i in flow_pair(int(p), 7)}


# ---------------------------------------------------------------------------------------------
# the stage and its store
# ---------------------------------------------------------------------------------------------
def _small_videos(d, count, *, n=6, h=48, w=64):
    return [translation_video(d / f"v{i}.mp4", n=n + i % 3, h=h, w=w, dx=0.4 + 0.1 * i, dy=-0.2, seed=10 + i,
                              audio=i % 2 == 0) for i in range(count)]


@pytest.fixture(scope="module")
def small_videos(tmp_path_factory):
    return _small_videos(tmp_path_factory.mktemp("small"), 6)


KW = {"backend": "dis", "frames": 4, "size": (48, 64), "preset": "ultrafast", "show_progress": False}


def test_store_layout_settings_resume_and_refusal(tmp_path, small_videos):
    cache = tmp_path / "cache"
    manifest = make_cache(cache, small_videos)
    summary = extract_flow(cache=cache, workers=0, videos_per_shard=4, **KW)
    assert (summary.ok, summary.failed) == (6, 0)
    g = zarr.open_group(cache / "frames.zarr", mode="r")
    assert g["rgb"].shape == (6, 4, 48, 64, 3) and g["rgb"].dtype == np.uint8
    assert g["flow"].shape == (6, 4, 48, 64, 2) and g["flow"].dtype == np.uint8
    # one chunk per position (JPEG flow: one grey plane per component), 4 whole videos per shard
    assert g["rgb"].chunks == (1, 1, 48, 64, 3) and g["rgb"].shards == (4, 4, 48, 64, 3)
    assert g["flow"].chunks == (1, 1, 48, 64, 1) and g["flow"].shards == (4, 4, 48, 64, 2)
    assert g["frame_index"].dtype == np.int32 and g["frame_index"].shape == (6, 4)
    assert g["rgb"].attrs["_ARRAY_DIMENSIONS"] == ["video", "time", "y", "x", "channel"]
    assert g["flow"].attrs["_ARRAY_DIMENSIONS"] == ["video", "time", "y", "x", "component"]
    assert g["flow"].attrs["bound"] == 20.0 and "round(255" in g["flow"].attrs["quantization"]
    assert g["done"][:].all() and g["n_frames"][:].tolist() == [6, 7, 8, 6, 7, 8]
    attrs = dict(g.attrs)
    assert attrs["stage"] == "flow" and attrs["manifest_sha256"] == manifest.sha256
    s = attrs["settings"]
    assert (s["frames"], s["size"], s["backend"], s["preset"]) == (4, [48, 64], "dis", "ultrafast")
    assert s["dis_params"] == DIS_PRESETS["ultrafast"]
    # the predict command rebuilds the settings from the store and gets the same row
    settings = FlowSettings.from_store_attrs(attrs)
    assert (settings.rgb_codec, settings.rgb_quality, settings.flow_codec, settings.flow_quality) == \
        ("jpeg", 95, "jpeg", 95)
    row = as_stored(extract_video(small_videos[2], settings), settings)
    for name in ("rgb", "flow", "frame_index"):
        assert np.array_equal(g[name][2], row[name])
    # a rerun skips everything; other settings are refused; --overwrite rebuilds
    again = extract_flow(cache=cache, workers=0, videos_per_shard=4, **KW)
    assert (again.ok, again.already_done) == (0, 6)
    with pytest.raises(SettingsMismatch, match="preset"):
        extract_flow(cache=cache, workers=0, videos_per_shard=4, **{**KW, "preset": "medium"})
    redo = extract_flow(cache=cache, workers=0, videos_per_shard=4, overwrite=True, **{**KW, "preset": "medium"})
    assert redo.ok == 6
    assert zarr.open_group(cache / "frames.zarr", mode="r").attrs["settings"]["preset"] == "medium"


def test_bad_videos_are_recorded_and_the_run_goes_on(tmp_path):
    d = tmp_path / "vids"
    d.mkdir()
    good = translation_video(d / "good.mp4", n=6, h=48, w=64, dx=0.5, dy=0.0)
    silent = translation_video(d / "silent.mp4", n=6, h=48, w=64, dx=0.5, dy=0.0, audio=False)
    short = translation_video(d / "short.mp4", n=3, h=48, w=64, dx=0.5, dy=0.0)
    single = translation_video(d / "single.mp4", n=1, h=48, w=64, dx=0.5, dy=0.0)
    empty = d / "empty.mp4"
    empty.write_bytes(b"")
    text = d / "text.mp4"
    text.write_text("this is not a video\n")
    missing = d / "missing.mp4"
    paths = [good, empty, silent, text, short, single, missing]
    cache = tmp_path / "cache"
    make_cache(cache, paths)
    summary = extract_flow(cache=cache, workers=2, videos_per_shard=3, **KW)  # through the process pool
    assert (summary.ok, summary.failed) == (3, 4)
    g = zarr.open_group(cache / "frames.zarr", mode="r")
    assert g["done"][:].tolist() == [True, False, True, False, True, False, False]
    errors = g["error"][:]
    for i in (1, 3, 5, 6):
        assert str(paths[i]) in errors[i]
    assert "at least 2" in errors[5]
    assert g["repeated"][:].tolist()[4] is True and g["frame_index"][4].tolist() == [0, 1, 1, 2]
    assert (g["flow"][1] == 128).all()  # failed rows keep the zero-flow fill
    # --strict turns failures into a non-zero exit; the store is still written
    res = CliRunner().invoke(app, ["extract-flow", "--cache", str(cache), "--backend", "dis", "--frames", "4",
                                   "--size", "48x64", "--preset", "ultrafast", "--workers", "0",
                                   "--videos-per-shard", "3", "--strict", "-q"])
    assert res.exit_code == 1, res.output
    res = CliRunner().invoke(app, ["extract-flow", "--cache", str(cache), "--backend", "dis", "--frames", "4",
                                   "--size", "48x64", "--preset", "ultrafast", "--workers", "0",
                                   "--videos-per-shard", "3", "-q"])
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------------------------------
# crash safety and concurrency (real processes)
# ---------------------------------------------------------------------------------------------
def _run_code(cache, **kw):
    args = {**KW, "workers": 0, "videos_per_shard": 1, **kw}
    return ("from imdpipe.pipeline.flow import extract_flow; "
            f"extract_flow(cache={str(cache)!r}, **{args!r})")


def _spawn(code):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _arrays(cache):
    g = zarr.open_group(cache / "frames.zarr", mode="r")
    return {k: g[k][:] for k in ("rgb", "flow", "frame_index", "n_frames", "repeated", "done", "error")}


@pytest.mark.parametrize("workers", [0, 2])  # in process, and pool workers that store their own shards
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, small_videos, workers):
    ref = tmp_path / "ref"
    make_cache(ref, small_videos)
    extract_flow(cache=ref, workers=0, videos_per_shard=1, **KW)
    # Video 4 is replaced by a FIFO: opening it blocks, so the run is deterministically mid-way
    # (videos 0-3 written, 4 pending; with a pool, 5 may be done too) when the whole process
    # group is killed. Same paths, so the same manifest.
    vids = tmp_path / "vids"
    vids.mkdir()
    paths = []
    for i, p in enumerate(small_videos):
        q = vids / p.name
        if i == 4:
            os.mkfifo(q)
        else:
            q.write_bytes(p.read_bytes())
        paths.append(q)
    cache = tmp_path / "cache"
    make_cache(cache, paths)
    proc = _spawn(_run_code(cache, workers=workers))
    try:
        deadline = time.time() + 120
        done = np.zeros(6, bool)
        while time.time() < deadline and proc.poll() is None:
            if (cache / "frames.zarr" / "done").exists():
                done = zarr.open_group(cache / "frames.zarr", mode="r")["done"][:]
                if done[:4].all():
                    break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = zarr.open_group(cache / "frames.zarr", mode="r")["done"][:]  # as the kill left it
    assert done[:4].all() and not done[4] and (workers or not done[5])
    paths[4].unlink()
    paths[4].write_bytes(small_videos[4].read_bytes())
    summary = extract_flow(cache=cache, workers=workers, videos_per_shard=1, **KW)
    assert (summary.ok, summary.already_done) == (6 - done.sum(), done.sum())
    a, b = _arrays(ref), _arrays(cache)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_two_shard_processes_at_once_equal_one_process(tmp_path, small_videos):
    one = tmp_path / "one"
    make_cache(one, small_videos)
    extract_flow(cache=one, workers=0, videos_per_shard=2, **KW)
    two = tmp_path / "two"
    make_cache(two, small_videos)
    procs = [_spawn(_run_code(two, videos_per_shard=2, shard=f"{i}/2")) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=180) == 0, p.stderr.read().decode()
    a, b = _arrays(one), _arrays(two)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert not list(two.glob("frames.zarr.tmp-*"))


def test_fewer_shards_than_workers_says_how_to_use_every_core(tmp_path, small_videos):
    import io

    from rich.console import Console

    cache = tmp_path / "cache"
    make_cache(cache, small_videos)  # 6 videos, 4 per shard: 2 shards for 3 workers
    out = io.StringIO()
    summary = extract_flow(cache=cache, workers=3, videos_per_shard=4, console=Console(file=out, width=200), **KW)
    assert summary.ok == 6
    assert "only 2 shard(s) of 4 videos to compute for 3 workers" in out.getvalue()
    out = io.StringIO()
    extract_flow(cache=cache, workers=3, videos_per_shard=4, console=Console(file=out, width=200), **KW)
    assert "shard(s)" not in out.getvalue()  # nothing left to compute: no hint


def test_a_dying_worker_blames_only_its_video(tmp_path, small_videos):
    from flow_crash import crashing_extract_shard

    from imdpipe.pipeline.flow import cpu_producer, open_frames_store
    from imdpipe.pipeline.manifest import read_manifest
    from imdpipe.pipeline.store import run_stage

    vids = tmp_path / "vids"
    vids.mkdir()
    paths = [vids / ("v1_crash.mp4" if i == 1 else p.name) for i, p in enumerate(small_videos[:4])]
    for p, q in zip(small_videos, paths):
        q.write_bytes(p.read_bytes())
    ref, cache = tmp_path / "ref", tmp_path / "cache"
    make_cache(ref, paths)
    extract_flow(cache=ref, workers=0, videos_per_shard=2, **KW)
    make_cache(cache, paths)
    settings = FlowSettings(frames=4, size=(48, 64), backend="dis", preset="ultrafast")
    store = open_frames_store(cache, settings, read_manifest(cache), videos_per_shard=2, overwrite=False)
    produce = cpu_producer(settings, [str(p) for p in paths], workers=2, store_path=store.path, videos_per_shard=2,
                           task=crashing_extract_shard)
    summary = run_stage(store, produce, eligible=range(4), names=[str(p) for p in paths], show_progress=False)
    # the pool dies on shard [0, 2); its videos are rerun one per process: only video 1 is blamed
    assert (summary.ok, summary.failed) == (3, 1)
    a, b = _arrays(ref), _arrays(cache)
    assert b["done"].tolist() == [True, False, True, True]
    assert "worker process died" in b["error"][1] and str(paths[1]) in b["error"][1]
    for k in ("rgb", "flow", "frame_index"):
        assert np.array_equal(a[k][[0, 2, 3]], b[k][[0, 2, 3]]), k


# ---------------------------------------------------------------------------------------------
# RAFT (random weights: shapes, padding and batching bookkeeping only)
# ---------------------------------------------------------------------------------------------
def test_raft_batches_pairs_across_videos_like_per_video_calls(tmp_path):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    weights = tmp_path / "raft_small_random.pth"
    torch.save(raft_small(weights=None).state_dict(), weights)
    d = tmp_path / "vids"
    d.mkdir()
    # 36x44 is not a multiple of 8 and below RAFT's 128 minimum: exercises the padding path
    paths = [translation_video(d / f"r{i}.mp4", n=4 + i, h=36, w=44, dx=0.5, dy=0.25, seed=i) for i in range(2)]
    paths.append(d / "broken.mp4")
    paths[-1].write_text("not a video")
    cache = tmp_path / "cache"
    make_cache(cache, paths)
    # 2 videos x 2 pairs in batches of 3: one batch holds pairs of both videos
    summary = extract_flow(cache=cache, backend="raft", raft_variant="small", raft_iters=1, flow_weights=weights,
                           frames=2, size=(36, 44), batch_size=3, workers=0, device="cpu", videos_per_shard=2,
                           show_progress=False)
    assert (summary.ok, summary.failed) == (2, 1)
    g = zarr.open_group(cache / "frames.zarr", mode="r")
    s = FlowSettings.from_store_attrs(dict(g.attrs))
    assert (s.backend, s.raft_variant, s.raft_iters) == ("raft", "small", 1)
    assert s.raft_weights.startswith("sha256:") and len(s.raft_weights) == 7 + 64
    model = raft_small(weights=None)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    for i in range(2):
        row = extract_video(paths[i], s, raft_model=model)
        stored = dequantize(g["flow"][i])
        assert stored.shape == (2, 36, 44, 2)
        assert np.abs(stored - dequantize(row["flow"])).max() <= STEP + 1e-4  # same pairs, same video
        assert np.array_equal(g["frame_index"][i], row["frame_index"])
    # RAFT gives different flow for different videos (the batching did not mix them up)
    assert not np.array_equal(g["flow"][0], g["flow"][1])


def test_raft_quantizes_on_the_device_exactly_like_the_host():
    from torchvision.models.optical_flow import raft_small

    from imdpipe.pipeline.flow import raft_flow

    torch.manual_seed(0)
    model = raft_small(weights=None).eval()
    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 256, (2, 36, 44, 3), dtype=np.uint8) for _ in range(2))
    px = raft_flow(model, first, second, iters=1)
    codes = raft_flow(model, first, second, iters=1, bound=FLOW_BOUND)
    assert px.dtype == np.float32 and codes.dtype == np.uint8 and codes.shape == (2, 36, 44, 2)
    assert np.array_equal(codes, quantize(px, FLOW_BOUND))


def test_raft_without_weights_offline_says_what_to_do(tmp_path, monkeypatch):
    from imdpipe.pipeline import flow as flow_mod

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # nothing cached
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network is unreachable")))
    with pytest.raises(RuntimeError, match="--flow-weights"):
        flow_mod.build_raft("small")
    assert flow_mod.torchvision_raft_cached("small") is False
    backend, reason = flow_mod.resolve_backend("auto", device="cpu", flow_weights=None)
    assert backend == "dis" and reason


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_help_documents_every_option_and_runs(tmp_path, small_videos):
    res = CliRunner().invoke(app, ["extract-flow", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in ("--cache", "--backend", "--frames", "--size", "--preset", "--raft-variant", "--raft-iters",
                "--flow-weights", "--device", "--workers", "--batch-size", "--videos-per-shard", "--shard",
                "--overwrite", "--strict", "--quiet", "256x340", "32"):
        assert opt in res.output, opt
    cache = tmp_path / "cache"
    make_cache(cache, small_videos[:2])
    res = CliRunner().invoke(app, ["extract-flow", "--cache", str(cache), "--frames", "4", "--size", "48x64",
                                   "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert "flow backend: dis" in res.output and "no CUDA" in res.output
    assert zarr.open_group(cache / "frames.zarr", mode="r")["done"][:].all()
    res = CliRunner().invoke(app, ["extract-flow", "--cache", str(cache), "--frames", "8", "--size", "48x64",
                                   "--workers", "0", "-q"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = CliRunner().invoke(app, ["extract-flow", "--cache", str(cache), "--size", "48by64"])
    assert res.exit_code != 0 and "HxW" in res.output


def test_bad_settings_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="preset"):
        FlowSettings(preset="turbo")
    with pytest.raises(ValueError, match="backend"):
        FlowSettings(backend="auto")
    with pytest.raises(VideoError, match="cannot open"):
        decode_video_frames("/nonexistent/x.mp4", (32, 32))
