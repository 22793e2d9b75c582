"""A deterministic synthetic audio-visual action dataset, shaped like the IMD problem.

The paper's point (IMD, Sec. 1 and 3) is that action labels are *visual*: a video's audio is
relevant to its label only sometimes (a guitar sound for "playing guitar"), and is often
irrelevant (narration, music, crowd noise) or absent. This writer produces real mp4 files
(H.264 + AAC, via :func:`imdpipe.pipeline.media.write_mp4`) with that structure:

* eight classes named like Kinetics-400 classes (folder names use underscores);
* each class draws its frames from a procedural *visual family* (textured shapes that
  translate, oscillate, rotate, pulse or orbit over noisy random backgrounds, with per-video
  random colours, positions and speeds);
* two pairs of classes share one visual family **and** its parameter distribution, so only
  their relevant audio tells them apart (``playing_drums``/``applauding`` and
  ``driving_car``/``feeding_birds``);
* classes with a relevant sound carry it with probability ``p_relevant`` (per video), otherwise
  an irrelevant sound drawn from the same pool, or no audio track; the other classes carry
  irrelevant sounds or no audio at all;
* eight procedural, spectrally distinct sounds, each named by its exact AudioSet display name;
* a separate multi-label sound bank of wav clips to pretrain a small audio tagger.

Everything is drawn from ``numpy.random.default_rng`` streams keyed by the seed and the item,
so a seed reproduces the same frames, waveforms and file list, whatever the worker count.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import shutil
import time
import wave
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imdpipe import __version__
from imdpipe.contract import GROUND_TRUTH_NAME
from imdpipe.pipeline.media import write_mp4

# ---------------------------------------------------------------------------------------------
# The design: sounds, visual families, classes
# ---------------------------------------------------------------------------------------------
GUITAR = "Guitar"
DRUM = "Drum"
APPLAUSE = "Applause"
ENGINE = "Engine"
BIRD = "Bird vocalization, bird call, bird song"
BABBLE = "Hubbub, speech noise, speech babble"
SIREN = "Siren"
WHISTLING = "Whistling"

#: The procedural sound pool, by AudioSet display name (all exist in ``label_set("audioset")``).
SOUND_POOL = (GUITAR, DRUM, APPLAUSE, ENGINE, BIRD, BABBLE, SIREN, WHISTLING)


@dataclass(frozen=True)
class VisualFamily:
    """A procedural visual generator and the distribution its per-video parameters come from.

    Args:
        name: family name (key of :data:`VISUAL_FAMILIES`).
        motion: the motion signature (``translate``, ``oscillate``, ``rotate``, ``pulse``, ``orbit``,
            ``scroll``).
        ranges: ``{parameter: (low, high)}``; each video draws every parameter uniformly.
    """

    name: str
    motion: str
    ranges: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class ClassDesign:
    """One class of the synthetic dataset.

    Args:
        name: class folder name (a Kinetics-400 class name with underscores for spaces).
        visual: the visual family (shared by the two classes of a visual pair).
        relevant_sound: AudioSet name of the class's relevant sound, or None (audio never relevant).
        p_relevant: probability that a video carries its relevant sound.
        p_silent: probability that a video without its relevant sound has no audio track at all
            (else it carries an irrelevant sound from the pool).
    """

    name: str
    visual: str
    relevant_sound: str | None
    p_relevant: float = 0.0
    p_silent: float = 0.5


_COMMON = {"hue": (0.0, 1.0), "bg_hue": (0.0, 1.0), "size": (0.14, 0.22), "stripes": (2.0, 5.0)}
VISUAL_FAMILIES: dict[str, VisualFamily] = {
    f.name: f for f in (
        # Horizontal drift of a striped disc across the frame.
        VisualFamily("drift", "translate", {**_COMMON, "speed": (0.25, 0.45), "y": (0.3, 0.7),
                                            "x0": (0.1, 0.3)}),
        # Vertical sinusoidal oscillation (shared by playing_drums and applauding).
        VisualFamily("bounce", "oscillate", {**_COMMON, "freq": (1.2, 2.2), "amp": (0.18, 0.3),
                                             "x": (0.3, 0.7)}),
        # A striped bar rotating around a point (shared by driving_car and feeding_birds).
        VisualFamily("spin", "rotate", {**_COMMON, "omega": (2.0, 4.0), "x": (0.4, 0.6),
                                        "y": (0.4, 0.6)}),
        # A ring pulsing in size.
        VisualFamily("pulse", "pulse", {**_COMMON, "freq": (0.8, 1.6), "x": (0.35, 0.65),
                                        "y": (0.35, 0.65)}),
        # Three dots orbiting a centre.
        VisualFamily("orbit", "orbit", {**_COMMON, "omega": (2.5, 4.5), "radius": (0.18, 0.28),
                                        "x": (0.4, 0.6), "y": (0.4, 0.6)}),
        # A diagonal grating scrolling over the whole frame, with a static disc.
        VisualFamily("scroll", "scroll", {**_COMMON, "speed": (0.3, 0.6), "x": (0.3, 0.7),
                                          "y": (0.3, 0.7)}),
    )
}

#: The eight classes, in label order (``classInd.txt`` order).
CLASS_DESIGN: tuple[ClassDesign, ...] = (
    ClassDesign("playing_guitar", "drift", GUITAR, p_relevant=0.8),
    ClassDesign("playing_drums", "bounce", DRUM, p_relevant=0.8),
    ClassDesign("applauding", "bounce", APPLAUSE, p_relevant=0.8),
    ClassDesign("driving_car", "spin", ENGINE, p_relevant=0.8),
    ClassDesign("feeding_birds", "spin", BIRD, p_relevant=0.8),
    ClassDesign("juggling_balls", "orbit", None, p_silent=0.5),
    ClassDesign("skipping_rope", "pulse", None, p_silent=0.5),
    ClassDesign("yoga", "scroll", None, p_silent=0.5),
)


def visual_pairs(design: tuple[ClassDesign, ...] = CLASS_DESIGN) -> list[tuple[str, ...]]:
    """Groups of classes that share one visual family (only audio can separate them)."""
    by_visual: dict[str, list[str]] = {}
    for c in design:
        by_visual.setdefault(c.visual, []).append(c.name)
    return [tuple(v) for v in by_visual.values() if len(v) > 1]


# ---------------------------------------------------------------------------------------------
# Per-video plan
# ---------------------------------------------------------------------------------------------
@dataclass
class VideoPlan:
    """Everything random about one video, drawn before any rendering (so workers agree)."""

    video_id: str
    class_name: str
    label: int
    split: str
    visual: str
    visual_params: dict[str, float]
    sound: str | None  # AudioSet name of the sound it carries, None = no audio track
    relevant: bool
    seed: tuple[int, ...]  # key of the rng stream that renders the frames and the waveform


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def plan_dataset(*, seed: int = 0, videos_per_class: int = 16, test_fraction: float = 0.25,
                 design: tuple[ClassDesign, ...] = CLASS_DESIGN) -> list[VideoPlan]:
    """Draw the plan of every video: split, visual parameters, sound and relevance.

    Args:
        seed: the dataset seed.
        videos_per_class: videos per class.
        test_fraction: fraction of each class's videos in ``testlist01`` (at least one when a class
            has two videos or more).
        design: the class design table.
    """
    if videos_per_class < 1:
        raise ValueError(f"videos_per_class must be >= 1, got {videos_per_class}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    plans = []
    for label, cls in enumerate(design):
        rng = _rng(seed, 1, label)
        n_test = round(test_fraction * videos_per_class)
        if videos_per_class >= 2 and test_fraction > 0:
            n_test = min(max(n_test, 1), videos_per_class - 1)
        test_set = set(rng.permutation(videos_per_class)[:n_test].tolist())
        family = VISUAL_FAMILIES[cls.visual]
        for j in range(videos_per_class):
            params = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in sorted(family.ranges.items())}
            relevant = cls.relevant_sound is not None and rng.random() < cls.p_relevant
            if relevant:
                sound = cls.relevant_sound
            elif rng.random() < cls.p_silent:
                sound = None
            else:
                pool = [s for s in SOUND_POOL if s != cls.relevant_sound]
                sound = pool[int(rng.integers(len(pool)))]
            plans.append(VideoPlan(
                video_id=f"{cls.name}_{j:03d}", class_name=cls.name, label=label,
                split="test" if j in test_set else "train", visual=cls.visual, visual_params=params,
                sound=sound, relevant=bool(relevant), seed=(int(seed), 2, label, j)))
    return plans


# ---------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour as RGB floats in [0, 255]."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    rgb = v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return rgb * 255.0


def render_frames(plan: VideoPlan, *, size: tuple[int, int] = (112, 112), duration_s: float = 3.0,
                  fps: float = 10) -> np.ndarray:
    """Render a video's frames: uint8 (T, H, W, 3), T = round(duration_s * fps)."""
    h, w = size
    n = max(1, round(duration_s * fps))
    rng = _rng(*plan.seed, 0)
    p = plan.visual_params
    motion = VISUAL_FAMILIES[plan.visual].motion
    t = (np.arange(n, dtype=np.float32) / fps)[:, None, None]  # (T, 1, 1)
    yy, xx = np.meshgrid(np.linspace(0.0, 1.0, h, dtype=np.float32),
                         np.linspace(0.0, 1.0, w, dtype=np.float32), indexing="ij")  # (H, W)

    # Noisy random background: low-frequency colour blotches plus per-frame sensor noise.
    coarse = rng.uniform(-1.0, 1.0, size=(max(2, h // 16), max(2, w // 16), 1)).astype(np.float32)
    ry = np.minimum((np.arange(h) * coarse.shape[0]) // h, coarse.shape[0] - 1)
    rx = np.minimum((np.arange(w) * coarse.shape[1]) // w, coarse.shape[1] - 1)
    blotch = coarse[ry][:, rx]  # (H, W, 1)
    bg = _hsv(p["bg_hue"], 0.35, 0.45).astype(np.float32) * (1.0 + 0.35 * blotch)  # (H, W, 3)
    noise = rng.standard_normal(size=(n, h, w, 1), dtype=np.float32)
    noise *= 10.0
    frames = bg + noise  # (T, H, W, 3): sensor noise, brightness only

    fg = _hsv(p["hue"], 0.85, 0.95).astype(np.float32)
    fg2 = _hsv((p["hue"] + 0.5) % 1.0, 0.7, 0.9).astype(np.float32)
    r = p["size"]
    stripes = p["stripes"]
    if motion == "translate":
        cx = (p["x0"] + p["speed"] * t) % 1.0
        cy = p["y"]
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r ** 2
        tex = np.sin(2 * np.pi * stripes * (xx - cx) / r) > 0
    elif motion == "oscillate":
        cy = 0.5 + p["amp"] * np.sin(2 * np.pi * p["freq"] * t)
        cx = p["x"]
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r ** 2
        tex = np.sin(2 * np.pi * stripes * (yy - cy) / r) > 0
    elif motion == "rotate":
        ang = p["omega"] * t
        u = (xx - p["x"]) * np.cos(ang) + (yy - p["y"]) * np.sin(ang)
        v = -(xx - p["x"]) * np.sin(ang) + (yy - p["y"]) * np.cos(ang)
        mask = (np.abs(u) < 1.8 * r) & (np.abs(v) < 0.35 * r)
        tex = np.sin(2 * np.pi * stripes * u / r) > 0
    elif motion == "pulse":
        rad = np.sqrt((xx - p["x"]) ** 2 + (yy - p["y"]) ** 2)[None]
        cur = r * (1.0 + 0.6 * np.sin(2 * np.pi * p["freq"] * t))
        mask = np.abs(rad - cur) < 0.3 * r
        tex = np.sin(2 * np.pi * stripes * np.arctan2(yy - p["y"], xx - p["x"]) / np.pi) > 0
        tex = np.broadcast_to(tex, mask.shape)
    elif motion == "orbit":
        mask = np.zeros((n, h, w), dtype=bool)
        for k in range(3):
            ang = p["omega"] * t + 2 * np.pi * k / 3
            cx = p["x"] + p["radius"] * np.cos(ang)
            cy = p["y"] + p["radius"] * np.sin(ang)
            mask |= ((xx - cx) ** 2 + (yy - cy) ** 2) < (0.45 * r) ** 2
        tex = np.broadcast_to(((xx + yy) * stripes * 8).astype(int) % 2 == 0, mask.shape)
    elif motion == "scroll":
        phase = (xx + yy)[None] * stripes * 3 - p["speed"] * 6 * t
        grating = np.sin(2 * np.pi * phase) > 0.3
        disc = (((xx - p["x"]) ** 2 + (yy - p["y"]) ** 2) < r ** 2)[None]
        mask = grating | disc
        tex = np.broadcast_to(disc, mask.shape)
    else:  # pragma: no cover - guarded by the design table
        raise AssertionError(motion)
    mask = np.broadcast_to(mask, (n, h, w))
    tex = np.broadcast_to(tex, (n, h, w))
    colour = np.where(tex[..., None], fg, fg2)  # (T, H, W, 3)
    jitter = rng.normal(0.0, 6.0, size=3).astype(np.float32)
    frames = np.where(mask[..., None], colour + jitter, frames)
    return np.clip(frames, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Sounds
# ---------------------------------------------------------------------------------------------
def _time(n: int, sr: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / sr


def _karplus_strong(freq: float, n: int, sr: int, rng: np.random.Generator, decay: float = 0.996) -> np.ndarray:
    period = max(2, round(sr / freq))
    out = np.zeros(n + period, dtype=np.float64)
    out[:period] = rng.uniform(-1.0, 1.0, period)
    # y[i] = decay * (y[i - P] + y[i - P - 1]) / 2, computed one period-block at a time.
    for start in range(period, n + period, period):
        stop = min(start + period, n + period)
        prev = out[start - period:stop - period]
        prev1 = out[start - period - 1:stop - period - 1] if start - period - 1 >= 0 else \
            np.concatenate([[0.0], out[start - period:stop - period - 1]])
        out[start:stop] = decay * 0.5 * (prev + prev1)
    return out[:n]


def _guitar(n, sr, rng):
    out = np.zeros(n)
    notes = [82.4, 110.0, 146.8, 196.0, 246.9, 329.6]
    step = int(sr * rng.uniform(0.25, 0.4))
    for start in range(int(rng.integers(0, step // 2 + 1)), n, step):
        f = notes[int(rng.integers(len(notes)))] * (2 if rng.random() < 0.3 else 1)
        out[start:] += _karplus_strong(f, n - start, sr, rng)
    return out


def _drum(n, sr, rng):
    t = _time(n, sr)
    out = np.zeros(n)
    beat = int(sr * rng.uniform(0.2, 0.3))
    for k, start in enumerate(range(int(rng.integers(0, beat)), n, beat)):
        tt = t[: n - start]
        if k % 2 == 0:  # kick: sine with a falling pitch
            f = 55.0 + 90.0 * np.exp(-tt * 30.0)
            out[start:] += np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-tt * 12.0)
        else:  # snare: noise burst plus a 190 Hz body
            out[start:] += (0.6 * rng.normal(0, 1, tt.size) + np.sin(2 * np.pi * 190 * tt)) * np.exp(-tt * 25.0)
    return out


def _applause(n, sr, rng):
    # Many independent hand claps: dense random impulses convolved with short bright noise bursts.
    clicks = np.zeros(n)
    n_claps = int(n / sr * rng.uniform(60, 100))
    clicks[rng.integers(0, n, n_claps)] = rng.uniform(0.3, 1.0, n_claps)
    kt = _time(int(0.012 * sr), sr)
    kernel = rng.normal(0, 1, kt.size) * np.exp(-kt * 400.0)
    out = np.convolve(clicks, kernel)[:n]
    return np.diff(out, prepend=0.0)  # tilt towards high frequencies


def _engine(n, sr, rng):
    t = _time(n, sr)
    f0 = rng.uniform(35, 55) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.2, 0.5) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    out = sum(np.sin(k * phase) / k ** 0.7 for k in range(1, 12))
    rumble = np.convolve(rng.normal(0, 1, n), np.ones(40) / 40, mode="same")
    return out * (0.8 + 0.2 * np.sin(phase / 2)) + 3.0 * rumble


def _bird(n, sr, rng):
    t = _time(n, sr)
    out = np.zeros(n)
    length = int(sr * rng.uniform(0.06, 0.12))
    gap = int(sr * rng.uniform(0.12, 0.25))
    base = rng.uniform(2500, 4000)
    for start in range(int(rng.integers(0, gap)), n - length, length + gap):
        tt = t[:length]
        f = base + rng.uniform(1000, 2500) * np.sin(np.pi * tt / tt[-1]) * (1 if rng.random() < 0.5 else -0.5)
        out[start:start + length] += np.sin(2 * np.pi * np.cumsum(f) / sr) * np.hanning(length)
    return out


_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (570, 840, 2410), (300, 870, 2240))


def _babble(n, sr, rng):
    # A few talkers: harmonic glottal sources shaped by vowel formants that change every syllable.
    t = _time(n, sr)
    out = np.zeros(n)
    hop = 160  # formant gains vary slowly: evaluate them every 10 ms
    for _ in range(int(rng.integers(2, 5))):
        f0 = rng.uniform(100, 240) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        syll = int(sr * rng.uniform(0.12, 0.2))
        vowel = np.repeat(rng.integers(0, len(_VOWELS), n // syll + 1), syll)[:n]
        formants = np.asarray(_VOWELS, dtype=np.float64)[vowel[::hop]]  # (n / hop, 3)
        ks = np.arange(1, int(3000 / f0.mean()) + 1)
        fk = ks[:, None] * f0[::hop][None, :]  # (K, n / hop)
        gain = np.exp(-(((fk[..., None] - formants[None]) / 120.0) ** 2)).sum(-1) + 0.02
        gain = np.repeat(gain, hop, axis=1)[:, :n]  # (K, n)
        voice = (gain * np.sin(ks[:, None] * phase[None, :])).sum(0)
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * t * sr / syll / 2 + rng.uniform(0, 6.3)) ** 2
        out += voice * envelope
    return out


def _siren(n, sr, rng):
    t = _time(n, sr)
    lo, hi = rng.uniform(550, 750), rng.uniform(1200, 1600)
    f = lo + (hi - lo) * 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(0.3, 0.6) * t))
    phase = 2 * np.pi * np.cumsum(f) / sr
    return np.sin(phase) + 0.4 * np.sin(2 * phase) + 0.2 * np.sin(3 * phase)


def _whistling(n, sr, rng):
    t = _time(n, sr)
    note = int(sr * rng.uniform(0.2, 0.35))
    pitches = rng.uniform(900, 2000, n // note + 1)
    f = np.repeat(pitches, note)[:n] * (1 + 0.01 * np.sin(2 * np.pi * 6 * t))
    f = np.convolve(f, np.ones(400) / 400, mode="same")  # glide between notes
    f[:200], f[-200:] = f[200], f[-201]
    return np.sin(2 * np.pi * np.cumsum(f) / sr) + 0.05 * rng.normal(0, 1, n)


SOUND_GENERATORS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    GUITAR: _guitar, DRUM: _drum, APPLAUSE: _applause, ENGINE: _engine, BIRD: _bird,
    BABBLE: _babble, SIREN: _siren, WHISTLING: _whistling,
}


def render_sound(name: str, *, rng: np.random.Generator, duration_s: float, sample_rate: int = 16000,
                 peak: float = 0.5) -> np.ndarray:
    """Render one procedural sound (float32 mono, peak-normalised to ``peak``).

    Args:
        name: the sound's AudioSet display name (a key of :data:`SOUND_GENERATORS`).
        rng: the random stream (per item, for determinism).
        duration_s: length in seconds.
        sample_rate: Hz.
        peak: absolute peak of the result.
    """
    if name not in SOUND_GENERATORS:
        raise ValueError(f"unknown synthetic sound {name!r}; known: {', '.join(SOUND_GENERATORS)}")
    n = max(1, round(duration_s * sample_rate))
    x = np.asarray(SOUND_GENERATORS[name](n, sample_rate, rng), dtype=np.float64)
    x = x - x.mean()
    fade = min(n // 2, int(0.01 * sample_rate))
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        x[:fade] *= ramp
        x[-fade:] *= ramp[::-1]
    m = np.abs(x).max()
    return (x * (peak / m) if m > 0 else x).astype(np.float32)


def render_audio(plan: VideoPlan, *, duration_s: float = 3.0, sample_rate: int = 16000) -> np.ndarray | None:
    """A video's audio track (float32 mono) or None when it has no audio track."""
    if plan.sound is None:
        return None
    rng = _rng(*plan.seed, 1)
    x = render_sound(plan.sound, rng=rng, duration_s=duration_s, sample_rate=sample_rate)
    return x + rng.normal(0.0, 0.003, x.size).astype(np.float32)  # faint room noise


def render_video(plan: VideoPlan, *, size=(112, 112), duration_s=3.0, fps=10, sample_rate=16000):
    """``(frames uint8 (T, H, W, 3), audio float32 (S,) or None)`` of one planned video."""
    return (render_frames(plan, size=size, duration_s=duration_s, fps=fps),
            render_audio(plan, duration_s=duration_s, sample_rate=sample_rate))


# ---------------------------------------------------------------------------------------------
# Sound bank
# ---------------------------------------------------------------------------------------------
def plan_soundbank(*, seed: int = 0, clips: int = 240, pool: tuple[str, ...] = SOUND_POOL) -> list[list[str]]:
    """The labels of each sound-bank clip: one or two distinct sounds, every sound equally often."""
    rng = _rng(seed, 3)
    labels = []
    order = list(rng.permutation(len(pool)))
    for i in range(clips):
        first = pool[order[i % len(pool)]]
        if i % len(pool) == len(pool) - 1:
            order = list(rng.permutation(len(pool)))
        names = [first]
        if rng.random() < 0.5:
            other = [s for s in pool if s != first]
            names.append(other[int(rng.integers(len(other)))])
        labels.append(names)
    return labels


def render_soundbank_clip(labels: list[str], *, seed: int, index: int, duration_s: float = 2.0,
                          sample_rate: int = 16000) -> np.ndarray:
    """One multi-label sound-bank clip: its sounds mixed at random gains (float32 mono)."""
    rng = _rng(seed, 4, index)
    mix = np.zeros(max(1, round(duration_s * sample_rate)), dtype=np.float32)
    for name in labels:
        mix += rng.uniform(0.6, 1.0) * render_sound(name, rng=rng, duration_s=duration_s,
                                                      sample_rate=sample_rate)
    mix += rng.normal(0.0, 0.003, mix.size).astype(np.float32)
    return np.clip(mix / max(1.0, np.abs(mix).max() / 0.9), -1.0, 1.0).astype(np.float32)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write mono float audio in [-1, 1] as 16-bit PCM wav (stdlib ``wave``)."""
    path = Path(path)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    return path


# ---------------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------------
@dataclass
class SynthSummary:
    """What :func:`synth_dataset` wrote."""

    out: Path
    n_videos: int
    n_classes: int
    n_with_audio: int
    n_relevant: int
    n_soundbank: int
    seconds: float
    per_class: list[dict] = field(default_factory=list)


_OWNED = ("videos", "splits", "soundbank", GROUND_TRUTH_NAME, "synth.json")


def _write_one_video(job) -> str:
    plan, out, size, duration_s, fps, sample_rate = job
    frames, audio = render_video(plan, size=size, duration_s=duration_s, fps=fps, sample_rate=sample_rate)
    path = Path(out) / "videos" / plan.class_name / f"{plan.video_id}.mp4"
    tmp = path.with_name(f".{path.stem}.part.mp4")  # hidden: the index skips it if we die here
    write_mp4(tmp, frames, fps, audio, sample_rate)
    tmp.replace(path)
    return plan.video_id


def _write_one_clip(job) -> str:
    labels, seed, index, path, duration_s, sample_rate = job
    write_wav(path, render_soundbank_clip(labels, seed=seed, index=index, duration_s=duration_s,
                                          sample_rate=sample_rate), sample_rate)
    return str(path)


def synth_dataset(out: str | Path, *, seed: int = 0, videos_per_class: int = 16,
                  size: tuple[int, int] = (112, 112), duration_s: float = 3.0, fps: float = 10,
                  sample_rate: int = 16000, test_fraction: float = 0.25, soundbank_clips: int = 240,
                  soundbank_duration_s: float = 2.0, workers: int = 0, overwrite: bool = False,
                  console=None, show_progress: bool = True) -> SynthSummary:
    """Write the synthetic dataset into ``out`` (layout in cache_layout.md, "Synthetic dataset").

    Args:
        out: output directory.
        seed: dataset seed; the same seed gives the same frames, audio and file list.
        videos_per_class: videos per class (8 classes).
        size: frame size (H, W), both even (H.264 yuv420p).
        duration_s: video length in seconds.
        fps: frame rate.
        sample_rate: audio sample rate (Hz) of videos and sound bank.
        test_fraction: fraction of each class in ``testlist01.txt``.
        soundbank_clips: number of multi-label sound-bank clips (0 = no sound bank).
        soundbank_duration_s: length of each sound-bank clip in seconds.
        workers: worker processes (0 = in this process).
        overwrite: replace a dataset already written in ``out`` (only the synth's own files).
        console: a ``rich.console.Console`` (default: stderr).
        show_progress: draw a progress bar.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    h, w = (int(size[0]), int(size[1]))
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise ValueError(f"size must be even and at least 16x16 (H.264 yuv420p), got {h}x{w}")
    if duration_s <= 0 or fps <= 0:
        raise ValueError(f"duration_s and fps must be positive, got {duration_s} and {fps}")
    if soundbank_clips < 0:
        raise ValueError(f"soundbank_clips must be >= 0, got {soundbank_clips}")
    out = Path(out)
    existing = [name for name in _OWNED if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a synthetic dataset ({', '.join(existing)}); "
                              f"pass overwrite=True (--overwrite) to replace it, or pick another OUT.")
    for name in existing:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    console = console or Console(stderr=True)
    t0 = time.perf_counter()

    plans = plan_dataset(seed=seed, videos_per_class=videos_per_class, test_fraction=test_fraction)
    for cls in CLASS_DESIGN:
        (out / "videos" / cls.name).mkdir(parents=True, exist_ok=True)
    bank_labels = plan_soundbank(seed=seed, clips=soundbank_clips)
    bank_dir = out / "soundbank"
    bank_dir.mkdir(parents=True, exist_ok=True)

    video_jobs = [(p, str(out), (h, w), duration_s, fps, sample_rate) for p in plans]
    clip_jobs = [(labels, seed, i, bank_dir / f"clip_{i:05d}.wav", soundbank_duration_s, sample_rate)
                 for i, labels in enumerate(bank_labels)]
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        tv = progress.add_task("synth videos", total=len(video_jobs))
        tc = progress.add_task("synth sound bank", total=len(clip_jobs))
        if workers > 0:
            # forkserver, not fork: the caller (the demo) may hold torch's OpenMP threads, which a
            # forked child must not inherit
            methods = mp.get_all_start_methods()
            context = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                for _ in pool.map(_write_one_video, video_jobs, chunksize=4):
                    progress.advance(tv)
                for _ in pool.map(_write_one_clip, clip_jobs, chunksize=16):
                    progress.advance(tc)
        else:
            for job in video_jobs:
                _write_one_video(job)
                progress.advance(tv)
            for job in clip_jobs:
                _write_one_clip(job)
                progress.advance(tc)

    # UCF-101 style split files (1-based class numbers) and the ground truth.
    splits = out / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    (splits / "classInd.txt").write_text(
        "".join(f"{i + 1} {c.name}\n" for i, c in enumerate(CLASS_DESIGN)), encoding="utf-8")
    (splits / "trainlist01.txt").write_text("".join(
        f"{p.class_name}/{p.video_id}.mp4 {p.label + 1}\n" for p in plans if p.split == "train"), encoding="utf-8")
    (splits / "testlist01.txt").write_text("".join(
        f"{p.class_name}/{p.video_id}.mp4\n" for p in plans if p.split == "test"), encoding="utf-8")
    with open(out / GROUND_TRUTH_NAME, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["video_id", "label_name", "relevant", "sound", "has_audio", "split", "visual"])
        for p in plans:
            writer.writerow([p.video_id, p.class_name, int(p.relevant), p.sound or "", int(p.sound is not None),
                             p.split, p.visual])
    with open(bank_dir / "soundbank.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "labels"])
        for job in clip_jobs:
            writer.writerow([Path(job[3]).name, ";".join(job[0])])

    settings = {"seed": seed, "videos_per_class": videos_per_class, "size": [h, w], "duration_s": duration_s,
                "fps": fps, "sample_rate": sample_rate, "test_fraction": test_fraction,
                "soundbank_clips": soundbank_clips, "soundbank_duration_s": soundbank_duration_s}
    meta = {
        "imdpipe_version": __version__,
        "settings": settings,
        "sounds": list(SOUND_POOL),
        "visual_families": {k: asdict(v) for k, v in VISUAL_FAMILIES.items()},
        "classes": [asdict(c) for c in CLASS_DESIGN],
        "visual_pairs": [list(p) for p in visual_pairs()],
        "videos": [asdict(p) for p in plans],
    }
    # Written last: its presence marks a complete dataset.
    tmp = out / "synth.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    tmp.replace(out / "synth.json")

    per_class = []
    for label, cls in enumerate(CLASS_DESIGN):
        mine = [p for p in plans if p.label == label]
        per_class.append({"class": cls.name, "visual": cls.visual, "relevant_sound": cls.relevant_sound or "",
                          "videos": len(mine), "train": sum(p.split == "train" for p in mine),
                          "test": sum(p.split == "test" for p in mine),
                          "relevant": sum(p.relevant for p in mine),
                          "irrelevant": sum(p.sound is not None and not p.relevant for p in mine),
                          "silent": sum(p.sound is None for p in mine)})
    return SynthSummary(out=out, n_videos=len(plans), n_classes=len(CLASS_DESIGN),
                        n_with_audio=sum(p.sound is not None for p in plans),
                        n_relevant=sum(p.relevant for p in plans), n_soundbank=len(clip_jobs),
                        seconds=time.perf_counter() - t0, per_class=per_class)


def read_plans(out: str | Path) -> list[VideoPlan]:
    """The video plans recorded in ``OUT/synth.json`` (to re-render frames/audio for checks)."""
    meta = json.loads((Path(out) / "synth.json").read_text(encoding="utf-8"))
    return [VideoPlan(**{**v, "seed": tuple(v["seed"])}) for v in meta["videos"]]


__all__ = ["CLASS_DESIGN", "SOUND_POOL", "VISUAL_FAMILIES", "ClassDesign", "SynthSummary", "VideoPlan",
           "VisualFamily", "plan_dataset", "plan_soundbank", "read_plans", "render_audio", "render_frames",
           "render_sound", "render_soundbank_clip", "render_video", "synth_dataset", "visual_pairs",
           "write_wav"]
