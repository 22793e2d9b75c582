"""Predict classes of raw video files with a trained run: ``predict(run=..., videos=[...])``.

Each video goes through the same stages as the run's caches, with the settings those caches
recorded (kept in the checkpoint's cache provenance, so the caches need not be present):
frames + flow (:func:`imdpipe.pipeline.flow.extract_video` with the ``frames.zarr`` settings, then
through the store's codecs with :func:`~imdpipe.pipeline.flow.as_stored`, so JPEG stores match),
AST embedding (:func:`imdpipe.pipeline.audio.embed_video` with the ``audio.zarr`` settings; the
AST checkpoint must be the one the store was built with), then the run's test views (clips x
crops) through the model, softmax averaged. Reported per video: the top-5 classes, rev (mean over
views) and whether the audio was used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imdpipe.contract import AST_WINDOW_S, AUDIO, FRAMES
from imdpipe.train.config import TrainConfig
from imdpipe.train.data import eval_views, prepare_inputs
from imdpipe.train.runtime import (
    autocast_context,
    load_checkpoint,
    model_from_checkpoint,
    run_dir_checkpoint,
    select_device,
)


def _flow_settings(ckpt: dict):
    from imdpipe.pipeline.flow import FlowSettings

    prov = ckpt["provenance"]["stores"][FRAMES.name]
    return FlowSettings.from_store_attrs(prov)


def _raft_model(settings, flow_weights, device):
    """The RAFT the frames store was built with (its weights id is checked)."""
    from imdpipe.pipeline.flow import build_raft

    model, wid = build_raft(settings.raft_variant, weights=flow_weights, device=device)
    if settings.raft_weights and wid != settings.raft_weights:
        raise ValueError(f"the run's frames.zarr was built with RAFT weights {settings.raft_weights}, "
                         f"these are {wid}; pass --flow-weights with the same file")
    return model


def _audio_model(ckpt: dict, device):
    """The AST the run's audio.zarr was built with, refusing another checkpoint."""
    from imdpipe.pipeline.audio import load_audio_model

    settings = ckpt["provenance"]["stores"][AUDIO.name]["settings"]
    net, fe, info = load_audio_model(settings["model"], device=device, dtype=settings.get("dtype"))
    if settings.get("model_sha256") and info["model_sha256"] != settings["model_sha256"]:
        raise ValueError(f"{settings['model']} is not the AST checkpoint the run's audio.zarr was built with "
                         f"(model_sha256 {info['model_sha256'][:12]} != {settings['model_sha256'][:12]})")
    return net, fe, settings


@torch.no_grad()
def predict(*, run: str | Path, videos: list[str | Path], checkpoint: str = "best", clips: int | None = None,
            crops: int | None = None, top_k: int = 5, device: str | None = None,
            flow_weights: str | Path | None = None, console=None) -> list[dict]:
    """Classify raw videos with a trained run.

    Args:
        run: run directory (or checkpoint file).
        videos: video files.
        checkpoint: ``best`` or ``last``.
        clips, crops: test views (default: 4 x 3, as evaluate).
        top_k: classes reported per video.
        device: ``auto``, ``cpu`` or ``cuda`` (default: the run's).
        flow_weights: RAFT state_dict file, when the run's frames were made by RAFT from a file.

    Returns:
        One dict per video: ``video``, ``top`` [(class, probability)...], ``rev`` (None without
        IMD), ``audio_used`` (bool), ``audio_note``, ``has_audio``; or ``error`` when the video
        could not be processed (the others go on).
    """
    from rich.console import Console

    console = console or Console()
    ckpt = load_checkpoint(run_dir_checkpoint(run, checkpoint))
    config = TrainConfig.from_dict(ckpt["config"])
    dev = select_device(device or config.device)
    model = model_from_checkpoint(ckpt, dev)
    labels = list(ckpt["labels"])
    flow_settings = _flow_settings(ckpt)
    raft = _raft_model(flow_settings, flow_weights, dev) if flow_settings.backend == "raft" else None
    audio_net = fe = audio_settings = None
    if config.uses_audio:
        audio_net, fe, audio_settings = _audio_model(ckpt, dev)
    window_s = float((audio_settings or {}).get("window_s", AST_WINDOW_S))
    clips = clips or 4
    crops = crops or 3
    results = []
    from imdpipe.pipeline.audio import embed_video
    from imdpipe.pipeline.flow import as_stored, extract_video
    from imdpipe.pipeline.media import probe_fps

    for video in videos:
        video = Path(video)
        try:
            if not video.is_file():
                raise FileNotFoundError(f"{video} does not exist")
            frames = as_stored(extract_video(video, flow_settings, device=dev, raft_model=raft), flow_settings)
            audio = None
            if config.uses_audio:
                audio = embed_video(video, model=audio_net, feature_extractor=fe, settings=audio_settings, device=dev)
            views = eval_views(rgb=frames["rgb"] if "rgb" in config.modalities else None,
                               flow=frames["flow"] if "flow" in config.modalities else None,
                               frame_index=frames["frame_index"], fps=probe_fps(video), audio=audio,
                               clip=config.clip, clips=clips, crops=crops,
                               flow_bound=flow_settings.bound, window_s=window_s)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
            msg = f"{type(e).__name__}: {e}"
            console.print(f"[red]{video}[/red]: {msg}")
            results.append({"video": str(video), "error": msg})
            continue
        batch = {k: v.unsqueeze(0) for k, v in views.items() if isinstance(v, torch.Tensor)}
        rgb, flow, aud = prepare_inputs(batch, config.modalities, dev, flow_bound=flow_settings.bound,
                                        flatten_views=True)
        with autocast_context(dev, config.amp):
            logits, rev = model(rgb, flow, aud)
        probs = logits.float().softmax(-1).mean(0).cpu()
        k = min(top_k, len(labels))
        top = probs.topk(k)
        has_audio = bool(audio["has_audio"]) if audio is not None else False
        rev_mean = float(rev.float().mean()) if rev is not None else None
        if not config.uses_audio:
            used, note = False, "visual only (the run does not use audio)"
        elif rev is None:
            used, note = True, f"always ({config.fusion} fusion has no relevance gate)"
        elif config.scheme == "W":
            used, note = True, f"weighted by rev {rev_mean:.3f} (scheme W)"
        else:
            kept = (rev.float() >= model.relevance_threshold).float().mean().item()
            used = kept >= 0.5
            note = (f"{'used' if used else 'dropped'}: rev {rev_mean:.3f} vs alpha {model.relevance_threshold} "
                    f"(kept in {100 * kept:.0f}% of {len(rev)} views)")
        if config.uses_audio and not has_audio:
            note += "; the file has no audio track (zero embedding)"
        res = {"video": str(video), "top": [(labels[int(i)], float(p)) for p, i in zip(top.values, top.indices)],
               "rev": rev_mean, "audio_used": used, "audio_note": note, "has_audio": has_audio}
        results.append(res)
        _print(res, console)
    return results


def _print(res: dict, console) -> None:
    from rich.table import Table

    table = Table(title=res["video"], show_header=True)
    table.add_column("#", justify="right")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for i, (name, p) in enumerate(res["top"], 1):
        table.add_row(str(i), name, f"{p:.3f}")
    console.print(table)
    rev = "-" if res["rev"] is None else f"{res['rev']:.3f}"
    console.print(f"rev: {rev}  audio: {res['audio_note']}")
