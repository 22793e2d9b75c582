"""Multi-view evaluation of a trained run: ``evaluate(run=..., cache=..., split="test")``.

Paper 4.1: 3 spatial crops x 4 temporal clips per video, softmax averaged over the views, top-1
and top-5. Also per-class accuracy, a confusion-matrix PNG, the share of views whose audio IMD
dropped (``rev < alpha``), and, when ground-truth audio relevance is known (the synthetic data
writes ``ground_truth.csv``), the ROC AUC of rev against it (a video's rev = mean over its views).

``RUN/metrics.json`` (or ``metrics-<split>.json`` for other splits) fields:

* ``top1``, ``top5``: percent of videos; ``views``: views per video; ``num_clips``: videos scored;
* ``per_class``: ``{class: {"top1": percent, "n": videos}}``;
* ``audio_dropped``: ``{"overall": share, "per_class": {class: share}}`` or null (no IMD);
* ``relevance_auc``: AUC in [0, 1] or null when unknown; ``relevance_auc_n``: videos used;
* ``confusion``: counts ``[true][predicted]``; ``epoch``, ``cache``, ``split``;
* ``checkpoint``: the file scored; ``selected_on``: what chose it (``holdout`` = a hold-out of the
  training split, a split name, or ``last`` = no selection); ``selection_leak``: true only when
  ``allow_selection_leak`` let a checkpoint selected on the scored split through.
* ``videos``: per scored video, as columns ``video_id``, ``label`` and ``predicted`` (class
  indices into ``labels``), e.g. to bootstrap intervals over the test videos.
* ``world_size``: processes that scored; ``videos_per_rank``: videos each scored, in rank order.

Under torchrun (``torchrun --nproc_per_node N -m imdpipe evaluate ...``) every process scores a
contiguous part of the split (:meth:`~imdpipe.train.runtime.Dist.part`), rank 0 gathers the
per-video results in rank order (the order of one process) and alone writes and prints.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from imdpipe.contract import FLOW_BOUND, GROUND_TRUTH_NAME, video_path
from imdpipe.train.config import DEFAULT_DIST_TIMEOUT_MIN, VAL_LAST, TrainConfig
from imdpipe.train.data import (
    ClipDataset,
    compare_provenance,
    loader_kwargs,
    loader_workers,
    open_cache,
    prepare_inputs,
    report_selection,
    select_videos,
)
from imdpipe.train.runtime import (
    CHECKPOINT_LAST,
    Dist,
    autocast_context,
    init_distributed,
    load_checkpoint,
    model_from_checkpoint,
    run_dir_checkpoint,
)


def mann_whitney_auc(scores, positives) -> float | None:
    """ROC AUC as the Mann-Whitney U statistic: P(score of a positive > score of a negative),
    ties counted one half (average ranks). None when a class is empty."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average rank (1-based) over runs of ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def read_ground_truth(path: str | Path) -> dict[str, bool]:
    """``video_id -> relevant`` from a CSV with columns video_id and relevant (1/0, true/false)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"video_id", "relevant"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path} needs columns video_id and relevant, has {reader.fieldnames}")
        return {row["video_id"]: row["relevant"].strip().lower() in ("1", "true", "yes") for row in reader}


def find_ground_truth(cache: Path, video_paths: list[str]) -> Path | None:
    """``ground_truth.csv`` in the cache or its parent, else up to 3 levels above the videos."""
    candidates = [cache / GROUND_TRUTH_NAME, cache.parent / GROUND_TRUTH_NAME]
    if video_paths:
        p = video_path(cache, video_paths[0])
        candidates += [parent / GROUND_TRUTH_NAME for parent in list(p.parents)[:3]]
    return next((c for c in candidates if c.is_file()), None)


@torch.no_grad()
def score_views(model, loader, *, modalities, device, amp: bool, flow_bound: float = FLOW_BOUND, progress=None,
                task=None):
    """Forward every view of every video; returns per-video softmax averaged over views and per-view rev.

    Returns a dict of tensors: ``probs`` (N, C), ``labels`` (N,), ``indices`` (N,),
    ``rev`` (N, V) or None, ``target`` (N, V) or None, ``has_audio`` (N,) or None.
    """
    model.eval()
    probs, labels, indices, revs, targets, has_audio = [], [], [], [], [], []
    for batch in loader:
        b = batch["label"].shape[0]
        rgb, flow, audio = prepare_inputs(batch, modalities, device, flow_bound=flow_bound, flatten_views=True)
        with autocast_context(device, amp):
            logits, rev = model(rgb, flow, audio)
        p = logits.float().softmax(-1).view(b, -1, logits.shape[-1]).mean(1)  # average over views
        probs.append(p.cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
        if rev is not None:
            revs.append(rev.float().view(b, -1).cpu())
        if "target" in batch:
            targets.append(batch["target"].float())
        if "has_audio" in batch:
            has_audio.append(batch["has_audio"])
        if progress is not None:
            progress.advance(task, b)
    cat = (lambda xs: torch.cat(xs) if xs else None)
    return {"probs": cat(probs), "labels": cat(labels), "indices": cat(indices), "rev": cat(revs),
            "target": cat(targets), "has_audio": cat(has_audio)}


def top_k_correct(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, probs.shape[1])
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(1)


def selected_on_of(ckpt: dict, path: Path, splits: set[str]) -> str:
    """What chose a checkpoint: ``last`` for checkpoint-last.pt (the last epoch, chosen by nobody),
    else the split its run selected on (``holdout``: a hold-out of the training split)."""
    if path.name == CHECKPOINT_LAST:
        return VAL_LAST
    selection = ckpt.get("selection")
    if selection:
        return selection["selected_on"]
    legacy = ckpt["config"].get("val_split")  # runs from before the hold-out: 'auto' took val, else test
    if legacy == "auto":
        train_split = ckpt["config"].get("train_split", "train")
        return next((s for s in ("val", "validation", "test") if s in splits and s != train_split), VAL_LAST)
    return "train-loss" if legacy == "none" else str(legacy)


def check_selection(ckpt: dict, ckpt_path: Path, split: str, splits: set[str], allow: bool,
                    console) -> tuple[str, bool]:
    """``(selected_on, leak)``: refuses a checkpoint selected on ``split`` unless ``allow``."""
    selected_on = selected_on_of(ckpt, ckpt_path, splits)
    leak = selected_on == split
    if leak and not allow:
        raise ValueError(f"{ckpt_path} was selected on split {split!r} (the epoch with the best top-1 there); "
                         f"scoring it on {split!r} reports a number chosen on the data it reports. Score "
                         f"--checkpoint last, retrain with --val-split holdout (the default), or pass "
                         f"--allow-selection-leak to score it anyway (metrics.json then says so).")
    if leak:
        console.print(f"[yellow]warning:[/yellow] {ckpt_path.name} was selected on {split!r}, the split scored "
                      f"here: this number is optimistic (selection_leak: true in metrics.json)")
    return selected_on, leak


def evaluate(*, run: str | Path, cache: str | Path, split: str = "test", crops: int = 3, clips: int = 4,
             ground_truth: str | Path | None = None, checkpoint: str = "best", batch_size: int | None = None,
             num_workers: int | None = None, device: str | None = None, out: str | Path | None = None,
             allow_selection_leak: bool = False, dist_timeout: float = DEFAULT_DIST_TIMEOUT_MIN, console=None,
             show_progress: bool = True) -> dict | None:
    """Score a run's checkpoint on one split of a cache and write metrics.json + a confusion matrix.

    Under torchrun every process calls this and scores its contiguous part of the split; rank 0
    gathers the per-video results, writes the files and returns the metrics, the other ranks
    return None. A head-only run (scored from cached view embeddings, seconds of work) is scored
    by rank 0 alone while the other ranks wait at a barrier.

    Args:
        run: the run directory (or a checkpoint file).
        cache: the cache to score (its provenance must match the checkpoint's).
        split: manifest split.
        crops, clips: spatial crops and temporal clips per video (paper: 3 x 4).
        ground_truth: CSV (video_id, relevant) for the relevance AUC; default: auto-detected
            ``ground_truth.csv`` next to the cache or above its videos.
        checkpoint: ``best`` or ``last``.
        batch_size: videos per forward pass (default: the run's eval_batch_size).
        num_workers: DataLoader workers (default: the run's).
        device: ``auto``, ``cpu`` or ``cuda`` (default: the run's).
        out: directory for metrics.json and the PNG (default: the run directory).
        allow_selection_leak: score a checkpoint that was selected on ``split`` anyway (refused
            otherwise: the number would be chosen on the data it reports); metrics.json then
            says ``selection_leak: true``.
        dist_timeout: minutes a collective waits for the slowest process under torchrun.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    if crops < 1 or clips < 1:
        raise ValueError(f"crops and clips should be >= 1, got {crops} and {clips}")
    ckpt_path = run_dir_checkpoint(run, checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    config = TrainConfig.from_dict(ckpt["config"])
    ddp, dev = init_distributed(device or config.device, timeout_min=dist_timeout)
    try:
        kw = dict(run=run, cache=Path(cache), split=split, crops=crops, clips=clips, ground_truth=ground_truth,
                  out=out, allow_selection_leak=allow_selection_leak,
                  console=console if ddp.main else Console(quiet=True))
        if ckpt.get("streams") is None:
            return _evaluate(ckpt, ckpt_path, config, ddp=ddp, device=dev, batch_size=batch_size,
                             num_workers=num_workers, show_progress=show_progress and ddp.main, **kw)
        metrics = None
        if ddp.main:
            metrics = _evaluate_head_only(ckpt, ckpt_path, config, device=device, world=ddp.world, **kw)
        ddp.barrier()
        return metrics
    finally:
        ddp.close()


def _evaluate_head_only(ckpt: dict, ckpt_path: Path, config: TrainConfig, *, cache: Path, split: str, clips: int,
                        crops: int, device: str | None, world: int, allow_selection_leak: bool, console,
                        **write_kw) -> dict:
    """A head trained on cached visual embeddings: score the cached views (one process).

    A checkpoint selected on ``split`` is refused before anything is read or scored, as in
    :func:`_evaluate`."""
    from imdpipe.pipeline.manifest import read_manifest
    from imdpipe.train.head_only import evaluate_cached

    selected_on, leak = check_selection(ckpt, ckpt_path, split, {r.split for r in read_manifest(cache).records},
                                        allow_selection_leak, console)
    res, manifest, sel, alpha = evaluate_cached(ckpt, cache, split=split, clips=clips, crops=crops,
                                                device=device, console=console)
    return _write_metrics(res, ckpt, ckpt_path, config, manifest=manifest, sel=sel, alpha=alpha, cache=cache,
                          selected_on=selected_on, leak=leak, split=split, clips=clips, crops=crops,
                          videos_per_rank=[len(res["labels"])] + [0] * (world - 1), console=console, **write_kw)


def _evaluate(ckpt: dict, ckpt_path: Path, config: TrainConfig, *, ddp: Dist, device: torch.device, run, cache: Path,
              split: str, crops: int, clips: int, ground_truth, batch_size: int | None, num_workers: int | None, out,
              allow_selection_leak: bool, console, show_progress: bool) -> dict | None:
    """Score a full model's checkpoint: every process its part of the split, rank 0 writes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    info = open_cache(cache, audio=config.uses_audio, relevance=False)
    problems, notes = compare_provenance(ckpt["provenance"], info.provenance)
    if problems:
        raise ValueError(f"{cache} does not match the caches {ckpt_path} was trained on:\n  " + "\n  ".join(problems)
                         + "\nRebuild the cache with the run's settings (see its config.yaml and checkpoint "
                           "provenance) or evaluate another run.")
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    selected_on, leak = check_selection(ckpt, ckpt_path, split, {r.split for r in info.manifest.records},
                                        allow_selection_leak, console)
    sel = select_videos(info, split)
    report_selection(sel, split, console)
    if not sel.indices:
        raise ValueError(f"no usable videos in split {split!r} of {cache}")
    model = model_from_checkpoint(ckpt, device)
    ds = ClipDataset(info, ddp.part(sel.indices), mode="eval", clip=config.clip, modalities=config.modalities,
                     relevance=False, clips=clips, crops=crops, seed=config.seed)
    workers = loader_workers(config.num_workers if num_workers is None else num_workers)
    loader = DataLoader(ds, batch_size=batch_size or config.eval_batch_size, shuffle=False,
                        **loader_kwargs(min(workers, len(ds)), pin_memory=device.type == "cuda", persistent=False))
    part = f", rank {ddp.rank}'s {len(ds)} of {len(sel.indices)} videos" if ddp.enabled else ""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not show_progress) as progress:
        task = progress.add_task(f"evaluate {split} ({clips}x{crops} views{part})", total=len(ds))
        res = score_views(model, loader, modalities=config.modalities, device=device, amp=config.amp,
                          flow_bound=info.flow_bound, progress=progress, task=task)
    parts = ddp.gather(res)
    if not ddp.main:
        return None
    return _write_metrics(_concat(parts), ckpt, ckpt_path, config, manifest=info.manifest, sel=sel,
                          selected_on=selected_on, leak=leak,
                          alpha=model.relevance_threshold, cache=cache, split=split, clips=clips, crops=crops,
                          ground_truth=ground_truth, run=run, out=out, console=console,
                          videos_per_rank=[0 if r["labels"] is None else len(r["labels"]) for r in parts])


def _concat(parts: list[dict]) -> dict:
    """``score_views`` dicts of consecutive parts (rank order) -> the dict of the whole split."""
    out = {}
    for key in parts[0]:
        pieces = [p[key] for p in parts if p[key] is not None]
        out[key] = torch.cat(pieces) if pieces else None
    return out


def _write_metrics(res: dict, ckpt: dict, ckpt_path: Path, config: TrainConfig, *, manifest, sel, alpha: float,
                   selected_on: str, leak: bool, cache: Path, split: str, clips: int, crops: int, ground_truth, run,
                   out, console, videos_per_rank: list[int]) -> dict:
    """metrics.json and the confusion matrix from per-video scores (``score_views``' dict)."""
    labels = list(ckpt["labels"])
    probs, y = res["probs"], res["labels"]
    pred = probs.argmax(1)
    n_classes = len(labels)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y.numpy(), pred.numpy()), 1)
    per_class = {}
    for c, name in enumerate(labels):
        n = int(confusion[c].sum())
        per_class[name] = {"top1": float(100.0 * confusion[c, c] / n) if n else None, "n": n}
    audio_dropped = None
    if res["rev"] is not None:
        dropped = (res["rev"] < alpha).float()  # (N, V)
        audio_dropped = {"overall": dropped.mean().item(), "per_class": {
            name: (dropped[y == c].mean().item() if (y == c).any() else None) for c, name in enumerate(labels)}}
    auc, auc_n, gt_path = None, 0, None
    if res["rev"] is not None:
        gt_path = Path(ground_truth) if ground_truth else find_ground_truth(cache, [manifest.records[i].path
                                                                                    for i in sel.indices])
        if gt_path is not None:
            truth = read_ground_truth(gt_path)
            ids = [manifest.records[int(i)].video_id for i in res["indices"]]
            known = [k for k, vid in enumerate(ids) if vid in truth]
            if known:
                video_rev = res["rev"].mean(1).numpy()
                auc = mann_whitney_auc(video_rev[known], [truth[ids[k]] for k in known])
                auc_n = len(known)
    metrics = {
        "top1": 100.0 * (pred == y).float().mean().item(),
        "top5": 100.0 * top_k_correct(probs, y, 5).float().mean().item(),
        "views": clips * crops, "clips": clips, "crops": crops, "num_clips": len(y),
        "left_out": sel.n_left_out, "per_class": per_class, "audio_dropped": audio_dropped,
        "relevance_auc": auc, "relevance_auc_n": auc_n, "ground_truth": str(gt_path) if gt_path else None,
        "confusion": confusion.tolist(), "labels": labels, "split": split, "cache": str(cache),
        "checkpoint": str(ckpt_path), "epoch": ckpt.get("epoch"), "selected_on": selected_on,
        "selection_leak": leak, "fusion": config.fusion,
        "modalities": list(config.modalities),
        "videos": {"video_id": [manifest.records[int(i)].video_id for i in res["indices"]],
                   "label": y.tolist(), "predicted": pred.tolist()},
        "world_size": len(videos_per_rank), "videos_per_rank": videos_per_rank,
    }
    out_dir = Path(out) if out else (ckpt_path.parent if Path(run).is_file() else Path(run))
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if split == "test" else f"-{split}"
    metrics_path = out_dir / f"metrics{suffix}.json"
    tmp = metrics_path.with_name(metrics_path.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    tmp.replace(metrics_path)
    plot_confusion(confusion, labels, out_dir / f"confusion{suffix}.png",
                   title=f"{split}: top-1 {metrics['top1']:.1f}%")
    metrics["metrics_path"] = str(metrics_path)
    _print(metrics, console)
    return metrics


def plot_confusion(confusion: np.ndarray, labels: list[str], path: Path, *, title: str = "") -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    n = len(labels)
    side = min(max(4.0, 0.35 * n + 2), 30)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    rows = confusion.sum(1, keepdims=True)
    ax.imshow(confusion / np.maximum(rows, 1), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)


def _print(m: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"evaluation on {m['split']} ({m['views']} views)", show_header=False)
    table.add_row("videos", str(m["num_clips"]))
    table.add_row("top-1", f"{m['top1']:.2f}%")
    table.add_row("top-5", f"{m['top5']:.2f}%")
    if m["audio_dropped"] is not None:
        table.add_row("audio dropped (IMD)", f"{100 * m['audio_dropped']['overall']:.1f}% of views")
    table.add_row("relevance AUC", "-" if m["relevance_auc"] is None else
                  f"{m['relevance_auc']:.3f} ({m['relevance_auc_n']} videos)")
    table.add_row("metrics", m["metrics_path"])
    console.print(table)
