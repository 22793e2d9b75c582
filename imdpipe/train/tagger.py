"""Pretrain a small audio tagger on a sound bank: a real AST that stands in for the AudioSet AST.

The paper's audio branch is a frozen, AudioSet-pretrained AST (``MIT/ast-finetuned-audioset-
10-10-0.4593``). Where that checkpoint cannot be downloaded (offline demo, CI), or when one wants
a tagger for one's own sounds, :func:`train_tagger` trains the same architecture
(transformers' ``ASTForAudioClassification``, tiny config) with a multi-label BCE loss on a
sound bank and saves it with ``save_pretrained`` next to its ``ASTFeatureExtractor`` config, so
``imdpipe extract-audio --model TAGGER_DIR`` loads it exactly like a hub AST.

Sound bank: ``soundbank.csv`` with columns ``path,labels``; ``labels`` are AudioSet display
names joined by ``;``; paths are relative to the csv; audio is decoded with PyAV (16 kHz mono
wav expected, anything PyAV reads works). The label space is the sorted set of labels present.

Training inputs use the extraction path of :mod:`imdpipe.pipeline.audio`: the whole clip's
fbank, cropped to ``max_length`` frames at a random offset (windows that overhang the clip
are padded in fbank space, as at extraction); held-out clips use the centred window, as
``extract-audio`` does with one window.

``TAGGER_DIR`` layout: ``config.json`` + ``model.safetensors`` (the AST), ``preprocessor_config.json``
(the extractor), ``tagger.json`` (settings, sound bank hash, labels, per-epoch metrics).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from imdpipe.contract import AST_WINDOW_S
from imdpipe.devices import select_device
from imdpipe.pipeline.audio import (
    FRAME_LENGTH_S,
    FRAME_SHIFT_S,
    SAMPLE_RATE,
    crop_windows,
    decode_audio,
    fbank,
    pad_value,
    start_frames,
    window_seconds,
    window_starts,
)

TAGGER_JSON = "tagger.json"
AST_MAX_LENGTH = round(AST_WINDOW_S / FRAME_SHIFT_S)  # 1024 fbank frames: the AudioSet AST's input


@dataclass(frozen=True)
class TaggerSettings:
    """Everything that changes the trained tagger (recorded in tagger.json, compared on reuse)."""

    epochs: int = 12  #: passes over the training clips
    hidden_size: int = 96  #: transformer width
    layers: int = 3  #: transformer blocks
    heads: int = 4  #: attention heads
    patch_stride: int = 16  #: frequency and time stride of the 16x16 patches (16 = no overlap)
    max_length: int | None = None  #: frames per input (10 ms each); None = the longest clip, at most 1024
    num_mel_bins: int = 128  #: mel bins of the fbank (AST: 128)
    batch_size: int = 16  #: clips per step
    lr: float = 1e-3  #: AdamW peak learning rate (linear warm-up, cosine decay)
    weight_decay: float = 0.01  #: AdamW weight decay
    val_fraction: float = 0.2  #: share of clips held out for the mAP
    seed: int = 0  #: seeds the split, the init and the crops

    def __post_init__(self):
        checks = {"epochs": self.epochs >= 1,
                  "hidden_size": self.hidden_size >= 8 and self.hidden_size % self.heads == 0,
                  "layers": self.layers >= 1, "heads": self.heads >= 1, "patch_stride": 1 <= self.patch_stride <= 16,
                  "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "val_fraction": 0.0 <= self.val_fraction < 1.0,
                  "max_length": self.max_length is None or self.max_length >= 16,
                  "num_mel_bins": self.num_mel_bins >= 16}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid tagger settings {bad}: {asdict(self)} (hidden_size must be a multiple "
                             f"of heads, max_length and num_mel_bins >= 16, 0 <= val_fraction < 1)")


def read_soundbank(csv_path: str | Path) -> list[tuple[Path, list[str]]]:
    """Rows ``(absolute audio path, [labels])`` of a sound bank csv, with clear errors."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} does not exist: pass the soundbank.csv written by "
                                f"`imdpipe synth OUT` (OUT/soundbank/soundbank.csv).")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"path", "labels"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{csv_path} needs the columns path,labels; it has {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            labels = [s.strip() for s in row["labels"].split(";") if s.strip()]
            if not labels:
                raise ValueError(f"{csv_path} line {line}: no labels for {row['path']!r}")
            path = Path(row["path"])
            rows.append((path if path.is_absolute() else csv_path.parent / path, labels))
    if len(rows) < 2:
        raise ValueError(f"{csv_path} holds {len(rows)} clip(s); a tagger needs at least 2.")
    return rows


def soundbank_sha256(csv_path: str | Path) -> str:
    """Hash of the csv and of every audio file it lists (their bytes, in csv order)."""
    h = hashlib.sha256(Path(csv_path).read_bytes())
    for path, _ in read_soundbank(csv_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} (listed in {csv_path}) does not exist.")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class average precision (N, C) -> (C,), NaN for classes without positives."""
    n, c = targets.shape
    out = np.full(c, np.nan)
    for k in range(c):
        pos = targets[:, k] > 0.5
        if not pos.any():
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        hits = pos[order]
        precision = np.cumsum(hits) / np.arange(1, n + 1)
        out[k] = precision[hits].mean()
    return out


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    ap = average_precision(scores, targets)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def chance_map(targets: np.ndarray) -> float:
    """Expected mAP of random scores: each class's positive rate."""
    rate = targets.mean(axis=0)
    return float(rate[rate > 0].mean()) if (rate > 0).any() else float("nan")


def _build(settings: TaggerSettings, labels: list[str], max_length: int):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    config = ASTConfig(
        hidden_size=settings.hidden_size, num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads, intermediate_size=4 * settings.hidden_size,
        patch_size=16, frequency_stride=settings.patch_stride, time_stride=settings.patch_stride,
        max_length=max_length, num_mel_bins=settings.num_mel_bins,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        problem_type="multi_label_classification", hidden_dropout_prob=0.1)
    with warnings.catch_warnings():  # 128 Kaldi mel bins leave one filter empty, as in the AudioSet AST
        warnings.filterwarnings("ignore", message="At least one mel filter")
        fe = ASTFeatureExtractor(max_length=max_length, num_mel_bins=settings.num_mel_bins)
    return ASTForAudioClassification(config), fe


def _existing(out: Path) -> dict | None:
    meta = out / TAGGER_JSON
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None


def train_tagger(soundbank: str | Path, out: str | Path, *, settings: TaggerSettings | None = None,
                 overwrite: bool = False, device=None, console=None) -> dict:
    """Train (or reuse) a small AST tagger on a sound bank and save it to ``out``.

    Args:
        soundbank: ``soundbank.csv`` (columns path,labels).
        out: the tagger directory (``save_pretrained`` files + ``tagger.json``).
        settings: model and training settings.
        overwrite: retrain even when ``out`` holds a tagger (replaced only when training ends).
        device: torch device (default CUDA when available).
        console: rich console for progress lines.

    Returns:
        The ``tagger.json`` content, with ``"reused": True`` when nothing was trained.

    Raises:
        FileExistsError: ``out`` holds a tagger made with other settings or another sound bank
            (pass ``overwrite=True``), or a directory that is not a tagger.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    settings = settings or TaggerSettings()
    soundbank, out = Path(soundbank), Path(out)
    rows = read_soundbank(soundbank)
    bank_hash = soundbank_sha256(soundbank)
    wanted = asdict(settings)
    old = _existing(out)
    if old is not None and not overwrite:
        if old.get("settings") == wanted and old.get("soundbank_sha256") == bank_hash \
                and (out / "config.json").is_file():
            console.print(f"reusing the tagger in {out} (same settings and sound bank); "
                          f"held-out mAP {old['metrics']['val_map']:.3f}. Pass --overwrite to retrain.")
            return {**old, "reused": True}
        why = [k for k in wanted if old.get("settings", {}).get(k) != wanted[k]]
        if old.get("soundbank_sha256") != bank_hash:
            why.append("sound bank content")
        raise FileExistsError(f"{out} holds a tagger trained with other {', '.join(why)}; "
                              f"pass --overwrite to retrain it, or choose another --out.")
    if out.exists() and old is None and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not a tagger directory; choose another --out "
                              f"or pass --overwrite.")

    t_start = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    dev = select_device(device)
    labels = sorted({lab for _, labs in rows for lab in labs})
    lab_index = {lab: i for i, lab in enumerate(labels)}
    win, hop = round(FRAME_LENGTH_S * SAMPLE_RATE), round(FRAME_SHIFT_S * SAMPLE_RATE)  # 400, 160 samples
    waves = []
    for path, _ in rows:
        wave, has_audio = decode_audio(path, sample_rate=SAMPLE_RATE)
        if not has_audio or len(wave) < win:
            raise ValueError(f"{path}: no audio (or shorter than 25 ms); fix or drop the row in {soundbank}")
        waves.append(wave)
    n_frames = [1 + (len(w) - win) // hop for w in waves]  # Kaldi fbank frames per clip
    max_length = settings.max_length or min(max(max(n_frames), 16), AST_MAX_LENGTH)
    net, fe = _build(settings, labels, max_length)
    feats = [fbank(w, fe) for w in waves]  # (n_frames, mels) each, normalised
    targets = np.zeros((len(rows), len(labels)), np.float32)
    for i, (_, labs) in enumerate(rows):
        targets[i, [lab_index[lab] for lab in labs]] = 1.0

    # Held-out split (a fixed permutation of the seed); every clip trains when val_fraction is 0.
    order = rng.permutation(len(rows))
    n_val = round(settings.val_fraction * len(rows))
    n_val = min(max(n_val, 1 if settings.val_fraction > 0 else 0), len(rows) - 1)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    fill = pad_value(fe)

    def centred(i: int) -> np.ndarray:
        f0 = start_frames(window_starts(n_frames[i] * 0.01, 1, window_seconds(fe)), fe)
        return crop_windows(feats[i], f0, max_length, fill)[0]

    def random_crop(i: int) -> np.ndarray:
        lo, hi = sorted((0, n_frames[i] - max_length))
        return crop_windows(feats[i], [int(rng.integers(lo, hi + 1))], max_length, fill)[0]

    val_x = torch.from_numpy(np.stack([centred(i) for i in val_idx])) if n_val else None
    net.to(dev)
    optim = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    history = []
    for epoch in range(1, settings.epochs + 1):
        net.train()
        perm = rng.permutation(train_idx)
        losses = []
        for b in range(0, len(perm), settings.batch_size):
            idx = perm[b:b + settings.batch_size]
            x = torch.from_numpy(np.stack([random_crop(i) for i in idx])).to(dev)
            y = torch.from_numpy(targets[idx]).to(dev)
            loss = loss_fn(net(x).logits, y)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            losses.append(float(loss.detach()))
        val_map = float("nan")
        if n_val:
            net.eval()
            with torch.inference_mode():
                scores = torch.cat([net(val_x[k:k + 64].to(dev)).logits.float().cpu()
                                    for k in range(0, n_val, 64)]).numpy()
            val_map = mean_average_precision(scores, targets[val_idx])
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_map": val_map})
        console.print(f"epoch {epoch}/{settings.epochs}: train loss {np.mean(losses):.4f}, "
                      f"held-out mAP {val_map:.3f}")

    meta = {
        "kind": "imdpipe audio tagger",
        "architecture": "ASTForAudioClassification",
        "settings": wanted,
        "max_length": max_length,
        "window_s": window_seconds(fe),
        "soundbank": str(soundbank.resolve()),
        "soundbank_sha256": bank_hash,
        "labels": labels,
        "n_clips": len(rows),
        "n_train": len(train_idx),
        "n_val": int(n_val),
        "parameters": sum(p.numel() for p in net.parameters()),
        "history": history,
        "metrics": {"final_loss": history[-1]["loss"], "val_map": history[-1]["val_map"],
                    "val_chance_map": chance_map(targets[val_idx]) if n_val else float("nan")},
        "seconds": round(time.perf_counter() - t_start, 2),
        "device": str(dev),
    }
    # Write beside the target, then swap it in: an interrupted run never leaves a half tagger.
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    net.to("cpu").eval().save_pretrained(tmp)
    fe.save_pretrained(tmp)
    (tmp / TAGGER_JSON).write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    console.print(f"saved the tagger to {out} ({len(labels)} labels, {meta['parameters'] / 1e6:.2f}M parameters, "
                  f"{meta['seconds']:.0f} s); held-out mAP {meta['metrics']['val_map']:.3f} "
                  f"(chance {meta['metrics']['val_chance_map']:.3f})")
    return {**meta, "reused": False}
