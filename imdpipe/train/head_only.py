"""Head-only training on cached visual embeddings: ``train_head_only(cache=..., out=..., config=...)``.

The visual streams are frozen and cached once (``visual.zarr``, :mod:`imdpipe.train.visual_cache`);
only the audio bottleneck, the fusion and the classifier are trained, on the cached fused visual
embeddings, the cached AST embeddings (``audio.zarr``) and the relevance targets
(``relevance.zarr``, or targets rebuilt in memory by a sweep). Everything lives in memory (the
embeddings are small), so there are no DataLoader workers, and a cell trains in seconds.

It mirrors the full trainer wherever the two can agree: the same loss
(``CE + lambda * BCE(rev, target)``), optimizer, warmup + cosine schedule and gradient clipping;
one training view per video and epoch, drawn from the video's cached training views; the audio
window nearest the view's clip centre time; intra-class cross-modality augmentation by swapping
in another training video's audio at the same time. It differs where it must: the streams never
change (the paper trains end to end), views are drawn from a fixed set of ``train_views`` clips
instead of a fresh random clip each epoch, and validation averages the 12 cached test views of
the validation split instead of one centre view.

A head-only run directory has the full trainer's contract (config.yaml, checkpoint-best/last.pt,
metrics.jsonl, training-curves.png), except that without validation (``--val-split last``)
checkpoint-best.pt is written too and is the last epoch; its checkpoints hold the head's weights and name the
visual store (``streams``), so ``evaluate`` scores it on the cached test views and
``model_from_checkpoint`` (hence ``predict``) puts the head back on the streams it was trained on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imdpipe.contract import AST_WINDOW_S, AUDIO, FRAMES, RELEVANCE
from imdpipe.pipeline.manifest import Manifest, read_manifest
from imdpipe.pipeline.store import StageStore
from imdpipe.train.config import VAL_HOLDOUT, VAL_LAST, TrainConfig, load_config, save_config
from imdpipe.train.data import (
    Selection,
    _store_provenance,
    report_selection,
    select_by_flags,
)
from imdpipe.train.events import EventWriter
from imdpipe.train.loop import (
    CONFIG_NAME,
    CURVES_NAME,
    METRICS_NAME,
    _append_metric,
    _model_config_dict,
    _print_summary,
    _read_metrics,
    _write_curves,
    _write_metrics,
    build_optimizer,
    loss_terms,
    resolve_val_split,
    schedule,
)
from imdpipe.train.runtime import (
    CHECKPOINT_BEST,
    CHECKPOINT_LAST,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    seed_everything,
    select_device,
    state_sha256,
)
from imdpipe.train.visual_cache import CLIP_FIELDS, STAGE, STORE_NAME

AUDIO_STORE, FRAMES_STORE, RELEVANCE_STORE = AUDIO.name, FRAMES.name, RELEVANCE.name


# ---------------------------------------------------------------------------------------------
# The cached data, in memory
# ---------------------------------------------------------------------------------------------
@dataclass
class HeadData:
    """Every array head-only training reads, for all manifest rows (float16 embeddings in memory)."""

    manifest: Manifest
    visual_path: Path
    visual_settings: dict
    visual_attrs: dict
    test_v: torch.Tensor  # (N, V, D) float16
    train_v: torch.Tensor  # (N, Vt, D) float16
    test_time: np.ndarray  # (N, V)
    train_time: np.ndarray  # (N, Vt)
    done: dict[str, np.ndarray]  # store name -> (N,) done flags of the stores read
    audio: torch.Tensor | None = None  # (N, W, Da) float16
    starts: np.ndarray | None = None  # (N, W) window starts (s)
    has_audio: np.ndarray | None = None  # (N,)
    window_s: float = AST_WINDOW_S
    target: np.ndarray | None = None  # (N, W) relevance targets
    relevance: dict | None = None  # K, Ya, overlap of the targets
    provenance: dict | None = None

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @cached_property
    def label(self) -> np.ndarray:
        """(N,) class index of every manifest row (built once: it is indexed per sample)."""
        return np.asarray([r.label for r in self.manifest.records], dtype=np.int64)

    @property
    def audio_dim(self) -> int:
        return int(self.audio.shape[-1]) if self.audio is not None else 768

    def with_targets(self, targets) -> HeadData:
        """The same data with other relevance targets (a :class:`imdpipe.pipeline.relevance.Targets`)."""
        from dataclasses import replace

        done = {**self.done, RELEVANCE_STORE: np.asarray(targets.done, dtype=bool)}
        rel = {"K": targets.K, "Ya": targets.ya, "overlap": targets.overlap}
        return replace(self, target=np.asarray(targets.target, dtype=np.float32), relevance=rel, done=done)


_REBUILD = {STORE_NAME: "imdpipe extract-visual --cache {cache} --run-dir RUN",
            AUDIO_STORE: "imdpipe extract-audio --cache {cache}",
            RELEVANCE_STORE: "imdpipe build-savld --cache {cache}"}


#: The arrays head-only training reads, per store (every one read whole, in one pass per shard file).
_ARRAYS = {STORE_NAME: ("test_embedding", "train_embedding", "test_clip_time_s", "train_clip_time_s"),
           AUDIO_STORE: ("embedding", "window_start_s", "has_audio"), RELEVANCE_STORE: ("target",)}


def load_head_data(cache: str | Path, *, visual: str | Path | None = None, audio: bool = True,
                   relevance: bool = True) -> HeadData:
    """Read visual.zarr (+ audio.zarr, relevance.zarr) of a cache into memory, checking their provenance.

    Each array is read whole, one shard file at a time (:meth:`StageStore.read_whole`): every chunk
    of a done video must be present and pass its CRC-32C, or the read is refused with the videos
    named (damaged data is never used). On a UCF-101-sized cache that is 6.5x less CPU than zarr's
    chunk-by-chunk ``arr[...]`` of stores holding one chunk per video (``benchmarks/bench_head_only.py``).
    """
    root = Path(cache)
    manifest = read_manifest(root)
    vpath = Path(visual) if visual is not None else root / STORE_NAME
    if not vpath.exists():
        raise FileNotFoundError(f"{vpath} does not exist: run `imdpipe extract-visual --cache {root} --run-dir RUN` "
                                f"first.")
    stores = {STORE_NAME: vpath}
    if audio or relevance:
        stores[AUDIO_STORE] = root / AUDIO_STORE
    if relevance:
        stores[RELEVANCE_STORE] = root / RELEVANCE_STORE
    stages = {STORE_NAME: STAGE, AUDIO_STORE: "audio", RELEVANCE_STORE: "relevance"}
    arrays, provenance, done, attrs = {}, {}, {}, {}
    for name, path in stores.items():
        store = StageStore.open_existing(path, stage=stages[name])
        if store.attrs.get("manifest_sha256") != manifest.sha256:
            raise ValueError(f"{path} was built for another manifest.csv than {root / 'manifest.csv'}; rebuild it "
                             f"with `{_REBUILD[name].format(cache=root)} --overwrite`")
        if store.n_items != len(manifest):
            raise ValueError(f"{path} holds {store.n_items} videos but the manifest has {len(manifest)}")
        provenance[name] = _store_provenance(store.group)
        attrs[name] = store.attrs
        done[name] = store.done_mask()
        arrays[name] = {a: store.read_whole(a, done=done[name]) for a in _ARRAYS[name]}
    va, vattrs = arrays[STORE_NAME], attrs[STORE_NAME]
    provenance[FRAMES_STORE] = dict(vattrs["frames_provenance"])
    data = HeadData(
        manifest=manifest, visual_path=vpath, visual_settings=dict(vattrs["settings"]), visual_attrs=vattrs,
        test_v=torch.from_numpy(va["test_embedding"].astype(np.float16, copy=False)),
        train_v=torch.from_numpy(va["train_embedding"].astype(np.float16, copy=False)),
        test_time=va["test_clip_time_s"].astype(np.float64), train_time=va["train_clip_time_s"].astype(np.float64),
        done=done, provenance={"manifest_sha256": manifest.sha256, "labels": list(manifest.labels),
                               "stores": provenance})
    if AUDIO_STORE in arrays:
        aa = arrays[AUDIO_STORE]
        data.audio = torch.from_numpy(aa["embedding"].astype(np.float16, copy=False))
        data.starts = aa["window_start_s"].astype(np.float64)
        data.has_audio = aa["has_audio"].astype(bool)
        data.window_s = float(attrs[AUDIO_STORE].get("settings", {}).get("window_s", AST_WINDOW_S))
    if RELEVANCE_STORE in arrays:
        data.target = arrays[RELEVANCE_STORE]["target"].astype(np.float32)
        prov = provenance[RELEVANCE_STORE]
        data.relevance = {k: prov.get(k, prov["settings"].get(k)) for k in ("K", "Ya", "overlap")}
    return data


def select(data: HeadData, split: str, *, stores: tuple[str, ...]) -> Selection:
    """Videos of ``split`` every needed store finished; the others counted by reason."""
    return select_by_flags(data.manifest, split, {name: data.done[name] for name in stores})


def nearest_windows(starts: np.ndarray, window_s: float, times: np.ndarray) -> np.ndarray:
    """Per row, the audio window whose centre is nearest each time: starts (b, W), times (b, V) -> (b, V)."""
    centres = starts[:, None, :] + window_s / 2
    return np.argmin(np.abs(centres - times[:, :, None]), axis=-1)


# ---------------------------------------------------------------------------------------------
# The model: the full model's head, without streams
# ---------------------------------------------------------------------------------------------
def head_config(config: TrainConfig, data: HeadData):
    """The full :class:`ModelConfig` (the streams' sizes from the visual store, the head from ``config``)."""
    return config.model_config(num_classes=len(data.labels), audio_dim=data.audio_dim)


def build_head(model_cfg, device=None):
    from imdpipe.heads.model import MultimodalActionModel

    return MultimodalActionModel(model_cfg, streams=False).to(device)


def head_forward(model, v: torch.Tensor, audio: torch.Tensor | None, *, rev_logit: bool = False):
    """``(logits, rev)`` (``+ rev_logit`` when asked) from visual embeddings ``(B, D)`` and raw audio
    embeddings ``(B, Da)``."""
    mods = model.config.modalities
    a = model.audio(audio) if model.audio is not None else None
    return model.forward_head(v if model.config.visual_streams else None, a if "audio" in mods else None,
                              rev_logit=rev_logit)


def head_model_from_checkpoint(ckpt: dict, device) -> torch.nn.Module:
    from imdpipe.heads import ModelConfig

    model = build_head(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# One epoch, scoring
# ---------------------------------------------------------------------------------------------
def _batch_inputs(data: HeadData, idx: np.ndarray, views: np.ndarray, donors: np.ndarray, times: np.ndarray,
                  emb: torch.Tensor, device, *, audio: bool, relevance: bool):
    """Visual (b, D) or (b, V, D), audio embedding and target of the given (video, view) pairs."""
    v = emb[idx[:, None], views].float().to(device)  # (b, V, D)
    a = t = None
    if audio or relevance:
        w = nearest_windows(data.starts[donors], data.window_s, times)  # (b, V)
        if audio:
            a = data.audio[donors[:, None], w].float().to(device)
        if relevance:
            t = torch.from_numpy(data.target[donors[:, None], w]).to(device)
    return v, a, t


@torch.no_grad()
def score_cached(model, data: HeadData, indices, *, device, batch_size: int = 256) -> dict:
    """Every cached test view of ``indices`` through the head: the dict ``score_views`` returns."""
    model.eval()
    mods = model.config.modalities
    uses_audio = "audio" in mods
    has_target = data.target is not None
    idx_all = np.asarray(indices, dtype=np.int64)
    V = data.test_v.shape[1]
    probs, revs, targets = [], [], []
    for s in range(0, len(idx_all), batch_size):
        idx = idx_all[s:s + batch_size]
        views = np.tile(np.arange(V), (len(idx), 1))
        v, a, t = _batch_inputs(data, idx, views, idx, data.test_time[idx], data.test_v, device,
                                audio=uses_audio, relevance=has_target and data.starts is not None)
        b = len(idx)
        logits, rev = head_forward(model, v.flatten(0, 1), a.flatten(0, 1) if a is not None else None)
        probs.append(logits.float().softmax(-1).view(b, V, -1).mean(1).cpu())
        if rev is not None:
            revs.append(rev.float().view(b, V).cpu())
        if t is not None:
            targets.append(t.cpu())
    cat = (lambda xs: torch.cat(xs) if xs else None)
    return {"probs": cat(probs), "labels": torch.from_numpy(data.label[idx_all]), "indices": torch.from_numpy(idx_all),
            "rev": cat(revs), "target": cat(targets),
            "has_audio": torch.from_numpy(data.has_audio[idx_all]) if data.has_audio is not None else None}


def fused_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer (SGD or AdamW, same groups and settings) with torch's fused kernel.

    A head's step is memory-bound: the unfused SGD update makes three passes over the 6M
    parameters (weight decay, momentum, update), ~40% of a step's CPU time at batch 64 on CPU;
    the fused kernel makes one (15 -> 6 ms per step, ``benchmarks/bench_head_only.py``). It is the
    same update up to float rounding (~1e-8 per step).
    """
    fused = {"foreach": None, "fused": True}
    groups = [{**group, **fused} for group in optimizer.param_groups]
    return type(optimizer)(groups, **{**optimizer.defaults, **fused})


def fit_head(data: HeadData, config: TrainConfig, *, train_idx, val_idx=None, device=None, on_epoch=None,
             progress=None, resume: dict | None = None,
             stop_after_epoch: int | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """Train a head on cached embeddings; ``on_epoch(record, model, optimizer, scheduler, history)`` after each epoch.

    Every epoch's randomness (order, views, audio donors, dropout) is drawn from ``(seed, epoch)``
    alone, so a run resumed from a checkpoint ends with the same weights as an uninterrupted one.

    Args:
        resume: a checkpoint written by ``on_epoch`` (``model``, ``optimizer``, ``scheduler``,
            ``epoch``, ``step``): training continues after its epoch.
        stop_after_epoch: stop once this epoch (0-based) is done, as if killed there (resume tests).

    Returns the model after the last epoch and this call's metric records (step and epoch lines).
    """
    device = device or torch.device("cpu")
    seed_everything(config.seed)
    model_cfg = head_config(config, data)
    model = build_head(model_cfg, device)
    optimizer = fused_optimizer(build_optimizer(model, config))
    train_idx = np.asarray(train_idx, dtype=np.int64)
    n, bs = len(train_idx), config.batch_size
    steps_per_epoch = n // bs
    if steps_per_epoch == 0:
        raise ValueError(f"{n} training videos do not fill one batch of {bs}; lower --batch-size")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(config, steps_per_epoch))
    uses_audio, uses_rel = config.uses_audio, config.uses_relevance
    labels_all = torch.from_numpy(data.label)
    Vt = data.train_v.shape[1]
    pools: dict[int, np.ndarray] = {}
    for i in train_idx:
        pools.setdefault(int(data.label[i]), []).append(int(i))
    pools = {c: np.asarray(p) for c, p in pools.items()}
    history: list[dict] = []
    step, start = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        step, start = resume["step"], resume["epoch"] + 1
    for epoch in range(start, config.epochs):
        model.train()
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(int(rng.integers(2**62)))
        order = rng.permutation(train_idx)
        views = rng.integers(0, Vt, size=n)
        donors = order.copy()
        if config.cross_modal_p > 0:  # intra-class cross-modality augmentation (paper 3.6)
            for j in np.flatnonzero(rng.random(n) < config.cross_modal_p):
                pool = pools[int(data.label[order[j]])]
                pool = pool[pool != order[j]]
                if len(pool):
                    donors[j] = pool[rng.integers(len(pool))]
        sums = np.zeros(5)
        t0 = time.perf_counter()
        for s in range(0, steps_per_epoch * bs, bs):
            idx, vw, dn = order[s:s + bs], views[s:s + bs, None], donors[s:s + bs]
            v, a, tgt = _batch_inputs(data, idx, vw, dn, data.train_time[idx, vw[:, 0]][:, None], data.train_v,
                                      device, audio=uses_audio, relevance=uses_rel)
            y = labels_all[idx].to(device)
            logits, _, rev_logit = head_forward(model, v[:, 0], a[:, 0] if a is not None else None, rev_logit=True)
            loss, ce, bce = loss_terms(logits, rev_logit, y, tgt[:, 0] if tgt is not None else None, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            b = len(idx)
            sums += [loss.item() * b, ce.item() * b, bce.item() * b, (logits.argmax(-1) == y).sum().item(), b]
            if step % config.log_every == 0:
                history.append({"kind": "step", "epoch": epoch, "step": step, "loss": loss.item(), "ce": ce.item(),
                                "bce": bce.item(), "lr": scheduler.get_last_lr()[0],
                                "clips_per_s": sums[4] / max(time.perf_counter() - t0, 1e-9)})
            if progress is not None:
                progress(b)
        seconds = time.perf_counter() - t0
        rec = {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": sums[0] / sums[4],
               "train_ce": sums[1] / sums[4], "train_bce": sums[2] / sums[4], "train_top1": 100 * sums[3] / sums[4],
               "lr": scheduler.get_last_lr()[0], "clips_per_s": sums[4] / seconds, "seconds": seconds,
               "val_top1": None, "val_loss": None}
        if val_idx is not None and len(val_idx):
            res = score_cached(model, data, val_idx, device=device)
            rec["val_top1"] = 100 * (res["probs"].argmax(-1) == res["labels"]).float().mean().item()
            rec["val_loss"] = F.nll_loss(res["probs"].clamp_min(1e-12).log(), res["labels"]).item()
        history.append(rec)
        if on_epoch is not None:
            on_epoch(rec, model, optimizer, scheduler, history)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    return model, history


# ---------------------------------------------------------------------------------------------
# A run directory
# ---------------------------------------------------------------------------------------------
def check_config(config: TrainConfig, data: HeadData) -> TrainConfig:
    """The config with the streams' clip settings from the visual store (refusing other visual streams)."""
    vs = data.visual_settings
    streams = [m for m in config.modalities if m in ("rgb", "flow")]
    if streams and streams != list(vs["modalities"]):
        raise ValueError(f"{data.visual_path} caches the streams {vs['modalities']}, the config asks for "
                         f"{streams}: pass --modalities {','.join([*vs['modalities'], 'audio'])}")
    clip = {k: (tuple(vs[k]) if isinstance(vs[k], list) else vs[k]) for k in CLIP_FIELDS if k != "modalities"}
    return config.replace(head_only=True, **clip, relevance=data.relevance or {})


def is_head_only_run(out: str | Path) -> bool:
    """Whether the run directory ``out`` holds a head-only run (its config.yaml says so)."""
    path = Path(out) / CONFIG_NAME
    return path.is_file() and load_config(path).head_only


def train_head_only(*, cache: str | Path, out: str | Path, config: TrainConfig | None = None,
                    visual: str | Path | None = None, data: HeadData | None = None, resume: bool = False,
                    console=None, show_progress: bool = True, stop_after_epoch: int | None = None) -> dict:
    """Train a head on ``cache``'s cached embeddings and write the run directory ``out``.

    Args:
        cache: the cache root (manifest.csv, visual.zarr, audio.zarr, relevance.zarr).
        out: the run directory (created; an existing run is only continued with ``resume``).
        config: the settings (the clip settings are taken from the visual store). Ignored with
            ``resume``: the checkpoint's settings are used.
        visual: the visual store (default ``cache/visual.zarr``; with ``resume``, the run's).
        data: already loaded :class:`HeadData` (else read from the cache).
        resume: continue from ``out/checkpoint-last.pt``; the caches must be the ones the run
            started on, and the run ends with the weights an uninterrupted run ends with.
        stop_after_epoch: stop once this epoch (0-based) is checkpointed, as if killed there
            (for resume tests).

    Returns:
        The same summary dict as :func:`imdpipe.train.loop.train`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from imdpipe.train.data import compare_provenance

    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    out = Path(out)
    ckpt = None
    if resume:
        if not (out / CHECKPOINT_LAST).is_file():
            raise FileNotFoundError(f"{out} holds no {CHECKPOINT_LAST} to resume: start the run without --resume.")
        ckpt = load_checkpoint(out / CHECKPOINT_LAST)
        if ckpt.get("streams") is None:
            raise ValueError(f"{out / CHECKPOINT_LAST} is a full run, not a head-only one: resume it with "
                             f"`imdpipe train --resume` on its own cache")
        config = TrainConfig.from_dict(ckpt["config"])
        visual = visual if visual is not None else ckpt["streams"]["visual_store"]
    else:
        config = config or TrainConfig()
        if (out / CHECKPOINT_LAST).exists():
            raise FileExistsError(f"{out} already holds a run ({CHECKPOINT_LAST}); pass --resume to continue it "
                                  f"or choose another --out.")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = select_device(config.device)
    if data is None:
        data = load_head_data(cache, visual=visual, audio=config.uses_audio, relevance=config.uses_relevance)
    config = check_config(config, data)
    prior: list[dict] = []
    if ckpt is not None:
        problems, notes = compare_provenance(ckpt["provenance"], data.provenance)
        if data.visual_settings["streams_sha256"] != ckpt["streams"]["streams_sha256"]:
            problems.append(f"{data.visual_path} was made by other visual streams than the run's "
                            f"{ckpt['streams']['visual_store']}")
        if problems or notes:
            raise ValueError(f"cannot resume {out} on {cache}: the caches differ from the ones the run started on:"
                             f"\n  " + "\n  ".join(problems + notes))
        prior = [r for r in _read_metrics(out / METRICS_NAME) if r["epoch"] <= ckpt["epoch"]]
    stores = tuple(data.done)
    splits = {r.split for r in data.manifest.records}
    if config.train_split not in splits:
        raise ValueError(f"train_split {config.train_split!r} is not a split of {cache}/manifest.csv "
                         f"(splits: {sorted(splits)})")
    train_sel = select(data, config.train_split, stores=stores)
    report_selection(train_sel, config.train_split, console)
    if not train_sel.indices:
        raise ValueError(f"no usable training videos in {cache} (split {config.train_split!r})")
    train_idx, val_idx, selected_on = resolve_val_split(config, data.manifest, train_sel.indices)
    if selected_on not in (VAL_HOLDOUT, VAL_LAST):  # a named split
        val_sel = select(data, selected_on, stores=stores)
        report_selection(val_sel, selected_on, console)
        val_idx = val_sel.indices
    selection = {"val_split": config.val_split, "selected_on": selected_on,
                 "val_fraction": config.val_fraction if selected_on == VAL_HOLDOUT else None,
                 "val_videos": len(val_idx or [])}
    model_cfg = head_config(config, data)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CONFIG_NAME)
    _write_metrics(out / METRICS_NAME, prior)
    streams = {"visual_store": str(data.visual_path.resolve()),
               "streams_sha256": data.visual_settings["streams_sha256"], "source": data.visual_attrs.get("streams")}
    console.print(f"head-only training of {model_cfg.fusion} on cached {', '.join(model_cfg.modalities)} "
                  f"embeddings: {len(train_idx)} videos, {len(data.labels)} classes, "
                  f"{config.epochs} epochs, batch {config.batch_size}, {device.type}"
                  + (f", resuming after epoch {ckpt['epoch'] + 1}" if ckpt is not None else ""))
    best: dict | None = ckpt.get("best") if ckpt is not None else None
    written = 0
    # a resumed run drops the events written after its checkpoint (those of steps > the checkpoint's)
    events = EventWriter(out, enabled=config.tensorboard, purge_step=ckpt["step"] + 1 if ckpt is not None else None)

    def on_epoch(rec, model, optimizer, scheduler, history):
        nonlocal best, written
        for r in history[written:]:
            _append_metric(out / METRICS_NAME, r)
            events.record(r)
        events.flush()
        written = len(history)
        key = (rec["val_top1"], -rec["val_loss"]) if rec["val_top1"] is not None else (rec["epoch"],)
        improved = best is None or tuple(key) > tuple(best["key"])  # no validation: the last epoch
        if improved:
            best = {"key": list(key), "epoch": rec["epoch"], "val_top1": rec["val_top1"],
                    "train_loss": rec["train_loss"]}
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_states(), "epoch": rec["epoch"], "step": rec["step"], "best": best,
                 "config": config.to_dict(), "model_config": _model_config_dict(model_cfg),
                 "provenance": data.provenance, "labels": list(data.labels), "metrics": rec, "streams": streams,
                 "selection": selection}
        save_checkpoint(state, out / CHECKPOINT_LAST)
        if improved:
            save_checkpoint(state, out / CHECKPOINT_BEST)

    first = ckpt["epoch"] + 1 if ckpt is not None else 0
    last_epoch = config.epochs if stop_after_epoch is None else min(stop_after_epoch + 1, config.epochs)
    clips = (len(train_idx) // config.batch_size) * config.batch_size * max(last_epoch - first, 0)
    with Progress(TextColumn("[bold]head-only"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not show_progress) as bar:
        task = bar.add_task("head-only", total=clips)
        t0 = time.perf_counter()
        try:
            model, history = fit_head(data, config, train_idx=train_idx, val_idx=val_idx, device=device,
                                      on_epoch=on_epoch, progress=lambda b: bar.advance(task, b), resume=ckpt,
                                      stop_after_epoch=stop_after_epoch)
        finally:
            events.close()
        train_seconds = time.perf_counter() - t0
    history = prior + history
    _write_curves(history, out / CURVES_NAME)
    last = [r for r in history if r["kind"] == "epoch"][-1]
    summary = {
        "run": str(out), "epochs_done": last["epoch"] + 1, "epochs": config.epochs, "steps": last["step"],
        "train_videos": len(train_idx), "left_out": train_sel.n_left_out,
        "final_train_loss": last["train_loss"], "final_train_top1": last["train_top1"],
        "best_epoch": best["epoch"], "best_val_top1": best["val_top1"],
        "clips_per_s": clips / train_seconds if train_seconds and clips else None,
        "seconds": time.perf_counter() - t_start, "world_size": 1, "per_rank_batch": config.batch_size,
        "device": str(device), "weights_sha256": state_sha256(model.state_dict()),
    }
    _print_summary(summary, console)
    return summary



def evaluate_cached(ckpt: dict, cache: str | Path, *, split: str, clips: int, crops: int, device: str | None,
                    console) -> tuple[dict, Manifest, Selection, float]:
    """Score a head-only checkpoint on ``cache``'s cached test views (``evaluate`` calls this).

    The cache's visual.zarr must hold the streams the head was trained on and ``clips x crops``
    test views; its other settings and the audio store must match the checkpoint's provenance.
    """
    from imdpipe.train.data import compare_provenance

    config = TrainConfig.from_dict(ckpt["config"])
    cache = Path(cache)
    data = load_head_data(cache, audio=config.uses_audio, relevance=False)
    vs = data.visual_settings
    if vs["streams_sha256"] != ckpt["streams"]["streams_sha256"]:
        raise ValueError(f"{data.visual_path} was made by other visual streams than the head was trained on "
                         f"({ckpt['streams']['visual_store']}); rebuild it with `imdpipe extract-visual` and the "
                         f"same --run-dir")
    if (vs["clips"], vs["crops"]) != (clips, crops):
        raise ValueError(f"{data.visual_path} caches {vs['clips']} clips x {vs['crops']} crops per video, not "
                         f"{clips} x {crops}: evaluate with --clips {vs['clips']} --crops {vs['crops']} or rebuild it")
    problems, notes = compare_provenance(ckpt["provenance"], data.provenance)
    if problems:
        raise ValueError(f"{cache} does not match the caches the head was trained on:\n  " + "\n  ".join(problems))
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    sel = select(data, split, stores=tuple(data.done))
    report_selection(sel, split, console)
    if not sel.indices:
        raise ValueError(f"no usable videos in split {split!r} of {cache}")
    dev = select_device(device or config.device)
    model = head_model_from_checkpoint(ckpt, dev)
    return score_cached(model, data, sel.indices, device=dev), data.manifest, sel, config.alpha
