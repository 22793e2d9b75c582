"""Decoding that does not silently go wrong: frames lost mid-stream, rotation metadata."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import zarr

from imdpipe.pipeline.flow import FlowSettings, VideoError, decode_video_frames, extract_flow, extract_video
from imdpipe.pipeline.manifest import VideoRecord, write_manifest
from imdpipe.pipeline.media import write_mp4

H, W = 48, 80


def _moving(n: int, h: int = H, w: int = W) -> np.ndarray:
    """A textured pattern drifting right, so every frame differs (real H.264 P-frames)."""
    rng = np.random.default_rng(0)
    tex = rng.integers(0, 255, (h, 2 * w, 3), dtype=np.uint8)
    return np.stack([np.ascontiguousarray(tex[:, 2 * t:2 * t + w]) for t in range(n)])


def corrupt_middle(path: Path, nbytes: int = 6000, seed: int = 0) -> None:
    """Randomize ``nbytes`` in the middle of the file (the damage of a bad disk sector or download)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    noise = np.random.default_rng(seed).integers(0, 256, nbytes, np.uint8)
    data[mid - nbytes // 2: mid + nbytes // 2] = noise.tobytes()
    path.write_bytes(bytes(data))


def set_rotation(path: Path, degrees_cw: int) -> None:
    """Set the video track's display matrix (mp4 ``tkhd``) to show the frames turned clockwise."""
    data = bytearray(path.read_bytes())
    i = data.find(b"tkhd")
    version = data[i + 4]
    off = i + 8 + (28 if version == 1 else 20) + 16  # version/flags, times/ids/duration, reserved/layer/group/volume
    one = 1 << 16
    a, b, c, d = {90: (0, one, -one, 0), 180: (-one, 0, 0, -one), 270: (0, -one, one, 0)}[degrees_cw]
    data[off:off + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))


def test_mid_stream_corruption_is_a_per_video_error_never_a_silent_done(tmp_path):
    good, bad = tmp_path / "good.mp4", tmp_path / "bad.mp4"
    frames = _moving(40)
    write_mp4(good, frames, 10)
    write_mp4(bad, frames, 10)
    corrupt_middle(bad)
    with pytest.raises(VideoError, match=r"decoded only \d+ of the 40 frames"):
        decode_video_frames(bad, (H, W), frames=8)
    records = [VideoRecord(index=i, video_id=p.stem, path=str(p), label=0, label_name="a", split="train",
                           n_frames=40, fps=10.0, width=W, height=H) for i, p in enumerate((good, bad))]
    write_manifest(tmp_path / "cache", records, ["a"])
    summary = extract_flow(cache=tmp_path / "cache", backend="dis", frames=8, size=(H, W), workers=0,
                           videos_per_shard=1, show_progress=False)
    assert (summary.ok, summary.failed) == (1, 1)
    g = zarr.open_group(tmp_path / "cache" / "frames.zarr", mode="r")
    assert g["done"][:].tolist() == [True, False]
    message = str(g["error"][1])
    assert "decoded only" in message and str(bad) in message and "of the 40 frames" in message
    assert g["n_frames"][0] == 40


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_clip_is_stored_upright_and_its_rotation_recorded(tmp_path, degrees):
    upright = np.zeros((6, H, W, 3), np.uint8)
    upright[:, : H // 2, : W // 2] = (255, 0, 0)  # red top-left
    upright[:, : H // 2, W // 2:] = (0, 255, 0)  # green top-right
    upright[:, H // 2:] = (0, 0, 255)  # blue bottom
    coded = np.ascontiguousarray(np.rot90(upright, k=degrees // 90, axes=(1, 2)))  # turned counterclockwise
    path = tmp_path / "phone.mp4"
    write_mp4(path, coded, 10)
    set_rotation(path, degrees)  # the display matrix turns it back
    row = extract_video(path, FlowSettings(frames=4, size=(H, W), backend="dis"))
    assert row["rotation"] == degrees
    rgb = row["rgb"].astype(int)
    for (y, x), colour in {(H // 4, W // 4): (255, 0, 0), (H // 4, 3 * W // 4): (0, 255, 0),
                           (3 * H // 4, W // 2): (0, 0, 255)}.items():
        assert np.abs(rgb[:, y, x] - colour).max() < 40, (degrees, (y, x), rgb[0, y, x])
