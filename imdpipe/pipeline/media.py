"""Media files through PyAV, in one place: opening, probing, decoding and writing mp4s.

* :func:`open_media` / :func:`open_video`: one way to open a file, with an error naming it and
  the fix;
* :func:`frame_rate` (the one fps rule: the stream's rate, else frames / duration),
  :func:`duration`, :func:`frame_count`, :func:`probe_fps`;
* :func:`decode_frames` (RGB frames turned upright by the display matrix and resized, one pass;
  a stream that stops well before the container's frame count is an error) and
  :func:`decode_audio_track` (a mono waveform on the container's timeline);
* :func:`write_mp4`: H.264 + AAC files for the synthetic data and the tests.

The index, flow and audio stages and ``predict`` all read videos through these.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np


class VideoError(RuntimeError):
    """A video that cannot be opened or decoded; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------
# Opening and probing
# ---------------------------------------------------------------------------------------------
def open_media(path: str | Path):
    """``av.open`` a media file for reading (a clear :class:`VideoError` when it cannot be)."""
    try:
        return av.open(str(path))
    except Exception as e:  # noqa: BLE001 - PyAV raises a family of FFmpeg errors
        raise VideoError(f"cannot open {path}: {type(e).__name__}: {e}. Re-encode the file "
                         f"(e.g. ffmpeg -i in.mp4 out.mp4) or remove it from the manifest.") from e


def open_video(path: str | Path):
    """:func:`open_media` for a file that must hold a video stream."""
    container = open_media(path)
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path} has no video stream")
    return container


def frame_rate(stream, *, n_frames: int = 0, duration_s: float = 0.0) -> float:
    """Frames per second of a video stream: its average (else guessed, else base) rate, else
    ``n_frames / duration_s`` for a container that records none (what ``frame_index`` counts in)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if rate:
        return float(rate)
    return n_frames / duration_s if n_frames and duration_s > 0 else 0.0


def duration(container) -> float:
    """Length (s) of a file's timeline: the video stream's, else the audio stream's, else the
    container's; 0 when none is recorded."""
    for stream in (*container.streams.video, *container.streams.audio):
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def probe_duration(path: str | Path) -> float:
    """:func:`duration` of a media file."""
    with open_media(path) as container:
        return duration(container)


def count_frames(container) -> int:
    """The first video stream's frame count (mp4 sample tables), else its number of packets."""
    stream = container.streams.video[0]
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    return sum(1 for pkt in container.demux(stream) if pkt.size)


def frame_count(path: str | Path) -> int:
    """:func:`count_frames` of a video file."""
    with open_video(path) as container:
        return count_frames(container)


def probe_fps(path: str | Path) -> float:
    """:func:`frame_rate` of a video file's first video stream, as ``index`` records it in the
    manifest (so ``predict`` picks the same audio window as training on a file with no rate)."""
    with open_video(path) as container:
        stream = container.streams.video[0]
        return frame_rate(stream) or frame_rate(stream, n_frames=count_frames(container),
                                                duration_s=duration(container))


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
#: Frames a decode that stops with an error may lose against the container's count and still be
#: used (2%, at least 1: a damaged last frame); more is a per-video error, never a shortened clip.
MAX_LOST_FRAMES = 0.02


def upright_turns(rotation: float) -> int:
    """Quarter turns (``np.rot90``'s ``k``, counterclockwise) that stand a frame upright, from PyAV's
    ``VideoFrame.rotation`` (the display matrix's counterclockwise angle; -90 for most portrait phone
    clips)."""
    return int(round(rotation / 90)) % 4


def decode_frames(path: str | Path, wanted: set[int], size: tuple[int, int], *, threads: int = 0,
                  expected: int = 0) -> tuple[dict[int, np.ndarray], int, int]:
    """Decode every frame once, keeping the ``wanted`` ones as RGB turned upright by the stream's
    display matrix (phone clips), then resized to ``size`` (H, W) with ``cv2.INTER_AREA``.

    Returns ``(images, frames decoded, rotation)``, ``rotation`` the clockwise degrees the frames
    were turned (0, 90, 180 or 270). A stream that stops with a decode error ends the pass with the
    frames decoded so far, unless that loses more than :data:`MAX_LOST_FRAMES` of the ``expected``
    (container) count: then, as for fewer than 2 frames, a :class:`VideoError` naming both counts.
    """
    h, w = size
    images: dict[int, np.ndarray] = {}
    n, turns = 0, 0
    with open_video(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE" if threads == 1 else "AUTO"
        stream.thread_count = threads
        try:
            for frame in container.decode(stream):
                if n == 0:
                    turns = upright_turns(getattr(frame, "rotation", 0) or 0)
                if n in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    if turns:
                        rgb = np.ascontiguousarray(np.rot90(rgb, k=turns))
                    if rgb.shape[:2] != (h, w):
                        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
                    images[n] = np.ascontiguousarray(rgb)
                n += 1
        except Exception as e:  # noqa: BLE001 - keep what was decoded when little is lost
            if n < 2:
                raise VideoError(f"cannot decode {path}: {e}. Re-encode the file or remove it from the "
                                 f"manifest.") from None
            if expected - n > max(1, int(MAX_LOST_FRAMES * expected)):
                raise VideoError(f"{path}: decoded only {n} of the {expected} frames the container records; "
                                 f"decoding stopped with {type(e).__name__}: {e}. The stream is damaged from "
                                 f"frame {n} on: re-download or re-encode the file, or remove it from the "
                                 f"manifest.") from None
            # a damaged last frame or two: keep the frames decoded so far (positions are resampled)
    return images, n, (-90 * turns) % 360


def decode_audio_track(path: str | Path, sample_rate: int) -> tuple[np.ndarray, bool, float]:
    """(mono float32 waveform at ``sample_rate``, has_audio, timeline duration in s).

    Mono is the mean of the channels after resampling each with PyAV's ``AudioResampler``, which
    keeps the layout (FFmpeg's own downmix scales by sqrt(2) and shifts normalised features). The
    waveform starts at the container's time 0 and has exactly the track's nominal length.
    """
    with open_media(path) as container:
        length = duration(container)
        if not container.streams.audio:
            return np.zeros(0, np.float32), False, length
        stream = container.streams.audio[0]
        t0 = float(container.start_time or 0) / av.time_base
        resampler = None
        chunks: list[np.ndarray] = []
        lead = None
        for frame in container.decode(stream):
            if resampler is None:
                # Keep the layout: no FFmpeg downmix (it scales by sqrt(2)); we average below.
                resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=sample_rate)
                lead = (float(frame.time) - t0) if frame.time is not None else 0.0
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        if resampler is not None:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        if not chunks:
            raise ValueError("the audio track holds no decodable samples")
        wave = np.concatenate(chunks, axis=1).astype(np.float32).mean(axis=0)  # (C, S) -> (S,)
        # Place on the container timeline: a late start is zero-filled, samples before 0 dropped.
        shift = round((lead or 0.0) * sample_rate)
        if shift > 0:
            wave = np.concatenate([np.zeros(shift, np.float32), wave])
        elif shift < 0:
            wave = wave[-shift:]
        # Trim the decoded tail (whole last AAC frame) to the nominal track length.
        if stream.duration is not None and stream.time_base is not None:
            start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
            expected = round((start - t0 + float(stream.duration * stream.time_base)) * sample_rate)
            if len(wave) > expected:
                wave = wave[:expected]
            elif len(wave) < expected:
                wave = np.concatenate([wave, np.zeros(expected - len(wave), np.float32)])
        return np.ascontiguousarray(wave, dtype=np.float32), True, length


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


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
