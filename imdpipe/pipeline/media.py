"""Writing real mp4 files (H.264 video + AAC audio) with PyAV, for synthetic data and tests."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, audio: np.ndarray | None = None,
              sample_rate: int = 16000, *, crf: int = 18, audio_bitrate: int = 96000) -> Path:
    """Write ``frames`` (T, H, W, 3) uint8 RGB and optional ``audio`` as an mp4.

    Args:
        path: output file (parents are created).
        frames: RGB frames; H and W must be even (yuv420p).
        fps: frame rate.
        audio: float waveform in [-1, 1], shape (S,) mono or (C, S); None writes no audio track.
        sample_rate: audio sample rate in Hz.
        crf: H.264 quality (lower is better; 18 is visually lossless).
        audio_bitrate: AAC bit rate in bits/s.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 with yuv420p needs even frame sizes, got {h}x{w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        vstream = container.add_stream("libx264", rate=rate)
        vstream.width, vstream.height, vstream.pix_fmt = w, h, "yuv420p"
        # The same frames give the same bytes, in any process, whatever the pool size: one x264
        # thread, and no macroblock-tree rate control (with it, two encodes of the same frames in
        # one process decoded to different pixels; without it 3 encodes x 24 videos, in-process
        # and in a pool, gave identical bytes).
        vstream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
        vstream.codec_context.thread_count = 1
        astream = None
        if audio is not None:
            audio = np.atleast_2d(np.asarray(audio, dtype=np.float32))
            layout = {1: "mono", 2: "stereo"}[audio.shape[0]]
            astream = container.add_stream("aac", rate=sample_rate, layout=layout)
            astream.bit_rate = audio_bitrate
        for frame in frames:
            for packet in vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
        if astream is not None:
            # AAC wants planar float frames of 1024 samples.
            clipped = np.clip(audio, -1.0, 1.0)
            for start in range(0, clipped.shape[1], 1024):
                chunk = np.ascontiguousarray(clipped[:, start:start + 1024])
                aframe = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=astream.layout.name)
                aframe.sample_rate = sample_rate
                aframe.pts = start
                for packet in astream.encode(aframe):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    return path
