"""``visual.zarr``: the fused visual embedding of every test and training view, computed once.

Everything IMD's ablations vary (the audio bottleneck, the relevance network, the fusion, the
classifier) sits after the visual class embedding ``v`` (paper Fig. 2: the two streams' CLS
embeddings fused by two FC + ReLU layers). ``extract_visual`` runs the visual streams of a
trained run (or of a pretrained trunk) once per view and stores ``v``, so a head can then be
trained and scored on cached embeddings in seconds (:mod:`imdpipe.train.head_only`).

Per video (a per-video store written through :class:`~imdpipe.pipeline.store.StageStore`: done
flags, shards, resume, ``--shard``/torchrun, settings refused on mismatch):

* ``test_embedding`` (clips x crops, D): the test views exactly as ``evaluate`` makes them
  (``ClipDataset`` in eval mode, clip-major order: paper 4 clips x 3 crops);
* ``train_embedding`` (train_views, D): ``train_views`` augmented training clips; view ``k`` is
  the clip the full trainer draws at epoch ``k`` with the same seed (random start, random
  resized crop, flip), so the cached views are the full trainer's first epochs' clips;
* ``test_clip_time_s`` / ``train_clip_time_s``: each view's clip centre time, from which the head
  trainer picks the audio window nearest the clip, as the full trainer does.

The settings hold the streams' weights hash (``streams_sha256``), the view and clip settings and
the frames.zarr settings the views were cut from; a store made by other streams or settings is
refused. With ``--init-checkpoint`` (no trained run) the streams are the pretrained trunk and the
seeded random init of the two fusing FC layers; their weights are saved beside the arrays as
``streams.pt`` so a head trained on the store can be put back on the same streams.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imdpipe.contract import FRAMES, VISUAL
from imdpipe.pipeline.store import ArraySpec, Partition, StageStore, Summary, run_stage
from imdpipe.train.config import ClipSpec, TrainConfig
from imdpipe.train.data import CacheInfo, ClipDataset, compare_provenance, open_cache, prepare_inputs
from imdpipe.train.runtime import (
    load_checkpoint,
    model_from_checkpoint,
    run_dir_checkpoint,
    save_checkpoint,
    seed_everything,
    select_device,
    state_sha256,
)

STAGE = VISUAL.stage
STORE_NAME = VISUAL.name
STREAMS_FILE = "streams.pt"
#: Settings a store is cut with (the streams' size and modalities and their ClipSpec).
CLIP_FIELDS = ("size", "modalities", *(f.name for f in fields(ClipSpec)))


@dataclass
class Streams:
    """The visual streams to cache, where they come from, and the clip settings they expect."""

    model: torch.nn.Module  # TwoStreamTransformer
    config: TrainConfig
    source: dict  # {"kind": "run" | "init", "checkpoint": path, "epoch": int or None (+ "file", "sha256": init)}
    provenance: dict | None  # the run's cache provenance (None for a bare trunk)

    @property
    def sha256(self) -> str:
        return state_sha256(self.model.state_dict())


def load_streams(*, run: str | Path | None = None, checkpoint: str = "best", init_checkpoint: str | None = None,
                 config: TrainConfig | None = None, num_classes: int = 1, seed: int = 0,
                 device: torch.device | None = None) -> Streams:
    """The visual streams of a run's checkpoint, or a pretrained trunk built with ``config``'s sizes.

    Args:
        run: run directory (or checkpoint file) written by ``imdpipe train``.
        checkpoint: ``best`` or ``last`` (with ``run``).
        init_checkpoint: a timm ViT checkpoint for both streams (without ``run``).
        config: sizes and clip settings of a bare trunk (default: the paper's).
        num_classes: class count of the throwaway head built around the trunk.
        seed: seeds the random init of the fusing FC layers (bare trunk).
    """
    from imdpipe.heads import build_model

    device = device or torch.device("cpu")
    if (run is None) == (init_checkpoint is None):
        raise ValueError("give either a trained run (--run-dir) or a pretrained trunk (--init-checkpoint), not both")
    if run is not None:
        path = run_dir_checkpoint(run, checkpoint)
        ckpt = load_checkpoint(path)
        if ckpt.get("streams") is not None:
            raise ValueError(f"{path} is a head-only run: give the run its visual streams came from")
        model = model_from_checkpoint(ckpt, device)
        if model.visual is None:
            raise ValueError(f"{path} has no visual streams (fusion {model.config.fusion!r}, "
                             f"modalities {model.config.modalities})")
        return Streams(model=model.visual.eval(), config=TrainConfig.from_dict(ckpt["config"]),
                       source={"kind": "run", "checkpoint": str(path.resolve()), "epoch": ckpt.get("epoch")},
                       provenance=ckpt["provenance"])
    config = config or TrainConfig()
    if not config.model_config(num_classes=1).visual_streams:
        raise ValueError(f"modalities {config.modalities} have no visual stream to cache")
    seed_everything(seed)
    model = build_model(config.model_config(num_classes=num_classes), init_checkpoint=init_checkpoint)
    report = model.init_report  # the file read (a timm name resolves to its hub-cache file) and its SHA-256
    return Streams(model=model.visual.to(device).eval(), config=config,
                   source={"kind": "init", "checkpoint": str(init_checkpoint), "epoch": None,
                           "file": report["file"] and str(Path(report["file"]).resolve()), "sha256": report["sha256"]},
                   provenance=None)


def store_settings(streams: Streams, info: CacheInfo, *, train_views: int, clips: int, crops: int,
                   seed: int) -> dict:
    """Everything that changes the stored embeddings."""
    c = streams.config
    clip = {name: getattr(c, name) for name in CLIP_FIELDS}
    clip["modalities"] = [m for m in c.modalities if m in ("rgb", "flow")]
    return {"streams_sha256": streams.sha256, **clip, "clips": clips, "crops": crops, "train_views": train_views,
            "seed": seed, "dtype": "float16", "frames": info.provenance["stores"][FRAMES.name]["settings"]}


class _Views(Dataset):
    """Every view of one video: the ``clips x crops`` test views and ``train_views`` training clips."""

    def __init__(self, info: CacheInfo, indices: list[int], config: TrainConfig, *, train_views: int, clips: int,
                 crops: int, seed: int):
        kw = dict(clip=config.clip, modalities=[m for m in config.modalities if m in ("rgb", "flow")],
                  relevance=False, seed=seed)
        self.test = ClipDataset(info, indices, mode="eval", clips=clips, crops=crops, **kw)
        self.train = ClipDataset(info, indices, mode="train", cross_modal_p=0.0, **kw)
        self.indices, self.train_views = list(indices), train_views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict:
        index = self.indices[item]
        try:
            test = self.test[item]
            train = []
            for k in range(self.train_views):  # view k = the full trainer's clip at epoch k
                self.train.set_epoch(k)
                train.append(self.train[item])
            train = torch.utils.data.default_collate(train)
        except Exception as e:  # noqa: BLE001 - one unreadable video must not stop the others
            return {"index": index, "error": f"{type(e).__name__}: {e}"}
        return {"index": index, "test": test, "train": train}


@torch.no_grad()
def _embed(streams: Streams, views: dict, device: torch.device, *, flow_bound: float, batch_size: int) -> np.ndarray:
    """Fused visual embeddings ``(V, D)`` of a dict of views ``(V, ...)``."""
    mods = streams.config.modalities
    n = views["clip_time_s"].shape[0]
    out = []
    for s in range(0, n, batch_size):
        chunk = {k: v[s:s + batch_size] for k, v in views.items() if isinstance(v, torch.Tensor)}
        rgb, flow, _ = prepare_inputs(chunk, mods, device, flow_bound=flow_bound)
        out.append(streams.model(rgb if "rgb" in mods else None, flow if "flow" in mods else None).float().cpu())
    return torch.cat(out).numpy()


@dataclass
class VisualResult:
    """What :func:`extract_visual` did."""

    summary: Summary
    path: Path
    settings: dict


def extract_visual(*, cache: str | Path, run: str | Path | None = None, checkpoint: str = "best",
                   init_checkpoint: str | None = None, config: TrainConfig | None = None, train_views: int = 8,
                   clips: int = 4, crops: int = 3, seed: int | None = None, batch_size: int = 16,
                   num_workers: int = 0, device: str = "auto", videos_per_shard: int = 16, overwrite: bool = False,
                   part: Partition | None = None, console=None, show_progress: bool = True) -> VisualResult:
    """Write ``cache/visual.zarr``: the streams' fused embedding of every video's test and training views.

    Args:
        cache: the cache root (manifest.csv, frames.zarr).
        run: a trained run whose streams to cache (its clip settings are used).
        checkpoint: ``best`` or ``last`` checkpoint of ``run``.
        init_checkpoint: instead of a run, a timm ViT checkpoint for both streams, with ``config``'s
            sizes and clip settings (default: the paper's).
        config: a bare trunk's settings (ignored with ``run``).
        train_views: augmented training clips cached per video (ours, not in the paper: 8).
        clips, crops: test views per video (paper: 4 x 3).
        seed: seed of the training views (default: the run's seed, so view k is the run's epoch-k clip).
        batch_size: views per forward pass.
        num_workers: DataLoader processes cutting views (0 = in this process).
        device: ``auto``, ``cpu`` or ``cuda``.
        videos_per_shard: videos per shard file and unit of work.
        overwrite: rebuild a store made by other streams or settings.
        part: which shards this process writes (default: torchrun's rank, else all).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    if train_views < 1 or clips < 1 or crops < 1:
        raise ValueError(f"train_views, clips and crops must be >= 1, got {train_views}, {clips}, {crops}")
    cache = Path(cache)
    part = part or Partition.from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = select_device(device, local_rank)
    info = open_cache(cache, audio=False, relevance=False)
    streams = load_streams(run=run, checkpoint=checkpoint, init_checkpoint=init_checkpoint, config=config,
                           num_classes=len(info.labels), seed=0 if seed is None else seed, device=dev)
    if streams.provenance is not None:
        problems, notes = compare_provenance(streams.provenance, info.provenance)
        if problems:
            raise ValueError(f"{cache} does not match the cache the run's streams were trained on:\n  "
                             + "\n  ".join(problems))
        for note in notes:
            console.print(f"[yellow]note:[/yellow] {note}")
    seed = streams.config.seed if seed is None else seed
    settings = store_settings(streams, info, train_views=train_views, clips=clips, crops=crops, seed=seed)
    dim = int(streams.model.embed_dim)
    V = clips * crops
    path = cache / STORE_NAME
    store = StageStore.open(
        path, stage=STAGE, settings=settings, manifest_sha256=info.manifest.sha256, n_items=len(info.manifest),
        videos_per_shard=videos_per_shard, overwrite=overwrite,
        attrs={"streams": streams.source, "embed_dim": dim, "labels": list(info.labels),
               "frames_provenance": info.provenance["stores"][FRAMES.name]},
        arrays=[ArraySpec("test_embedding", (V, dim), "float16", ("view", "feature"),
                          attrs={"description": "fused visual embedding of each test view (clip-major)"}),
                ArraySpec("test_clip_time_s", (V,), "float32", ("view",), fill_value=float("nan")),
                ArraySpec("train_embedding", (train_views, dim), "float16", ("view", "feature"),
                          attrs={"description": "fused visual embedding of training clip k (the full "
                                                "trainer's epoch-k clip for this seed)"}),
                ArraySpec("train_clip_time_s", (train_views,), "float32", ("view",), fill_value=float("nan"))])
    if streams.source["kind"] == "init" and part.index == 0 and not (path / STREAMS_FILE).exists():
        save_checkpoint({"visual": streams.model.state_dict(), "streams_sha256": settings["streams_sha256"]},
                        path / STREAMS_FILE)
    frames_done = _frames_done(info)
    eligible = [i for i in info.manifest.ok_indices() if frames_done[i]]

    def produce(pending: list[int]):
        ds = _Views(info, pending, streams.config, train_views=train_views, clips=clips, crops=crops, seed=seed)
        loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
        for item in loader:
            index = int(item["index"])
            if "error" in item:
                yield index, RuntimeError(item["error"])
                continue
            kw = dict(flow_bound=info.flow_bound, batch_size=batch_size)
            yield index, {"test_embedding": _embed(streams, item["test"], dev, **kw).astype(np.float16),
                          "test_clip_time_s": item["test"]["clip_time_s"].numpy().astype(np.float32),
                          "train_embedding": _embed(streams, item["train"], dev, **kw).astype(np.float16),
                          "train_clip_time_s": item["train"]["clip_time_s"].numpy().astype(np.float32)}

    console.print(f"caching {V} test + {train_views} training views per video through the "
                  f"{streams.config.size} streams of {streams.source['checkpoint']} ({dev.type})")
    summary = run_stage(store, produce, eligible=eligible, names=info.manifest.paths, part=part,
                        description="extract-visual", unit="video", console=console, show_progress=show_progress)
    skipped = len(info.manifest.ok_indices()) - len(eligible)
    if skipped:
        console.print(f"[yellow]{skipped} video(s) left out: frames.zarr has no result for them[/yellow]")
    return VisualResult(summary=summary, path=path, settings=settings)


def _frames_done(info: CacheInfo) -> np.ndarray:
    return StageStore.open_existing(info.stores[FRAMES.name]).done_mask()


def streams_state(visual_store: str | Path) -> tuple[dict, dict]:
    """The streams a visual store was made with: ``(state_dict of model.visual, settings)``.

    Reads the run checkpoint the store names (or the store's own ``streams.pt``) and refuses
    weights whose hash is not the one the store recorded (the run was retrained since).
    """
    store = StageStore.open_existing(visual_store, stage=STAGE)
    settings, source = store.settings, store.attrs.get("streams", {})
    if source.get("kind") == "run":
        ckpt = load_checkpoint(source["checkpoint"])
        state = {k[len("visual."):]: v for k, v in ckpt["model"].items() if k.startswith("visual.")}
    else:  # a trunk's streams, saved beside the arrays (not a run checkpoint: no model_config)
        path = Path(visual_store) / STREAMS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {visual_store} was made from a pretrained trunk, whose "
                                    f"streams are kept there; rebuild the store with `imdpipe extract-visual "
                                    f"--init-checkpoint ... --overwrite`")
        state = torch.load(path, map_location="cpu", weights_only=True)["visual"]
    if state_sha256(state) != settings["streams_sha256"]:
        raise ValueError(f"the streams in {source.get('checkpoint') or Path(visual_store) / STREAMS_FILE} are not the "
                         f"ones {visual_store} was made with (weights hash differs): the run was changed since")
    return state, settings
