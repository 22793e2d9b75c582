"""Devices, autocast, seeding, torchrun/DDP setup and checkpoints: what every loop here shares.

The same torch code runs on CPU and CUDA; only the device, the DDP backend (gloo / NCCL) and
autocast (bf16 on CUDA, ``nullcontext`` on CPU as nanoGPT does) change.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from imdpipe.devices import autocast, select_device
from imdpipe.train.config import DEFAULT_DIST_TIMEOUT_MIN

CHECKPOINT_LAST = "checkpoint-last.pt"
CHECKPOINT_BEST = "checkpoint-best.pt"


def autocast_context(device: torch.device, enabled: bool = True):
    """The trainer's mixed precision: bf16 autocast on CUDA, nothing on CPU."""
    return autocast(device, torch.bfloat16 if enabled and device.type == "cuda" else None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (epoch, rank, ...), stable across runs and processes."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0]
               % (2**63 - 1))


def rng_states(device: torch.device | None = None) -> dict:
    """Python, numpy and torch CPU RNG states, plus the CUDA state of ``device`` only.

    Only this process's GPU: ``get_rng_state_all`` would touch (and create a context on) every
    visible GPU from every rank.
    """
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device | None = None) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and device is not None and device.type == "cuda":
        if isinstance(cuda, (list, tuple)):  # checkpoints written before: one state per visible GPU
            cuda = cuda[device.index or 0]
        torch.cuda.set_rng_state(cuda, device)


@dataclass
class Dist:
    """This process's place in a (maybe single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
        """Sum numbers (a list, or a 1-D tensor already on ``device``) over processes, in float64.

        One host sync: the summed tensor is read back once (a list alone is returned as it is).
        """
        if isinstance(values, torch.Tensor):
            t = values.to(device, torch.float64, copy=True)
        elif not self.enabled:
            return list(values)
        else:
            t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()

    def part(self, items: Sequence) -> list:
        """This process's contiguous share of ``items`` for scoring (validation, evaluate).

        Rank r gets the r-th of ``world`` consecutive slices whose sizes differ by at most one
        (the first ``len % world`` ranks take one more); concatenated in rank order they are
        ``items`` exactly: no item twice (unlike ``DistributedSampler``, which pads with
        duplicates), none left out, the order kept.
        """
        n, w, r = len(items), self.world, self.rank
        start = r * (n // w) + min(r, n % w)
        return list(items[start:start + n // w + (r < n % w)])

    def gather(self, obj) -> list | None:
        """Every process's ``obj`` (picklable) on rank 0, in rank order; None on the other ranks.

        ``torch.distributed.gather_object``: on NCCL the pickles travel through this process's
        current GPU (``select_device`` sets it).
        """
        if not self.enabled:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()



def init_distributed(device_name: str = "auto", *, timeout_min: float = DEFAULT_DIST_TIMEOUT_MIN
                     ) -> tuple[Dist, torch.device]:
    """Join the torchrun group described by RANK / WORLD_SIZE / LOCAL_RANK (gloo on CPU, NCCL on CUDA).

    ``timeout_min`` bounds how long a collective waits for the slowest rank (NCCL's default is
    10 minutes); work one rank does alone between collectives (a checkpoint write) must stay
    below it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if world <= 1:
        return Dist(), device
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(minutes=timeout_min))
        here = True
    return Dist(rank=rank, world=world, local_rank=local_rank, initialized_here=here), device


def save_checkpoint(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename (a kill never leaves half a checkpoint).

    Raises:
        DiskFull: the disk filled up; the temporary file is removed and the previous checkpoint
            at ``path`` is untouched.
    """
    from imdpipe.pipeline.store import DiskFull, human_bytes, is_disk_full

    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        tmp.replace(path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        # torch.save reports a full disk as "RuntimeError: [enforce fail at inline_container.cc:672] .
        # unexpected pos 576 vs 534" (its zip writer checks how much each write stored)
        if is_disk_full(e) or (isinstance(e, RuntimeError) and "unexpected pos" in str(e)):
            need = _state_bytes(state)
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            raise DiskFull(f"disk full writing {path}: the checkpoint needs about {human_bytes(need)} and only "
                           f"{human_bytes(written)} fit; {kept}. Free that much space (or use another --out), "
                           f"then rerun with --resume.") from e
        raise


def _state_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    return 0


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is it a run directory written by `imdpipe train`?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a video, a truncated file, another pickle
        raise ValueError(f"{path} is not an imdpipe checkpoint (torch.load: {type(e).__name__}: {e}); --run-dir "
                         f"takes a run directory written by `imdpipe train` or one of its checkpoint-*.pt "
                         f"files") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is a torch file but not an imdpipe checkpoint (no model / model_config); --run-dir "
                         f"takes a run directory written by `imdpipe train` or one of its checkpoint-*.pt files")
    return ckpt


def state_sha256(state_dict: dict) -> str:
    """Hash of a state dict's names, shapes, dtypes and bytes (to compare weights across processes)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_from_checkpoint(ckpt: dict, device: torch.device):
    """Rebuild the model a checkpoint was trained as and load its weights."""
    from imdpipe.heads import ModelConfig, build_model

    cfg = dict(ckpt["model_config"])
    if "flow_scale" in cfg:  # checkpoints written before the name said what it is
        cfg["flow_bound"] = cfg.pop("flow_scale")
    model = build_model(ModelConfig(**cfg))
    if ckpt.get("streams") is not None:  # a head trained on cached embeddings: put it back on its streams
        from imdpipe.train.visual_cache import streams_state

        if model.visual is not None:
            model.visual.load_state_dict(streams_state(ckpt["streams"]["visual_store"])[0])
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        if unexpected or any(not k.startswith("visual.") for k in missing):
            raise ValueError(f"the head-only checkpoint does not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model.to(device).eval()
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def run_dir_checkpoint(run: str | Path, which: str = "best") -> Path:
    """``checkpoint-best.pt`` / ``checkpoint-last.pt`` of a run directory, or a checkpoint file itself.

    A run trained with ``--val-split last`` selects nothing and has no checkpoint-best.pt: ``best``
    is then its checkpoint-last.pt (what the run's result is).
    """
    run = Path(run)
    if run.is_file():
        return run
    names = {"best": CHECKPOINT_BEST, "last": CHECKPOINT_LAST}
    if which not in names:
        raise ValueError(f"checkpoint should be 'best' or 'last', got {which!r}")
    if which == "best" and not (run / CHECKPOINT_BEST).exists() and (run / CHECKPOINT_LAST).exists():
        return run / CHECKPOINT_LAST
    return run / names[which]
