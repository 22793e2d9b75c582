"""What the launcher tells this process: its place among torchrun ranks or Slurm array tasks,
and its share of the node's CPU cores (its device: :func:`imdpipe.devices.select_device`).

torchrun sets ``RANK`` / ``WORLD_SIZE`` (all processes) and ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``
(the processes on this node); a Slurm job array sets ``SLURM_ARRAY_TASK_ID`` /
``SLURM_ARRAY_TASK_COUNT`` / ``SLURM_ARRAY_TASK_MIN``. Every stage and loop reads them here, so
under ``torchrun --nproc_per_node 8`` each process uses an eighth of the cores instead of all of
them. No torch import: the CLI resolves defaults before it imports torch.
"""

from __future__ import annotations

import os


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def local_rank() -> int:
    """This process's index among the processes of its node (torchrun's ``LOCAL_RANK``, else 0)."""
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    """Processes sharing this node (torchrun's ``LOCAL_WORLD_SIZE``, else 1)."""
    return max(_env_int("LOCAL_WORLD_SIZE", 1), 1)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which Slurm and taskset restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cores_per_process() -> int:
    """This process's share of the cores: cores / LOCAL_WORLD_SIZE, at least 1.

    The default worker count of every stage, so 8 torchrun ranks on a 64-core node start 8
    workers each instead of 64 (each worker imports torch and holds its own buffers).
    """
    return max(available_cores() // local_world_size(), 1)


def shard_from_env() -> tuple[int, int]:
    """``(index, count)`` of this writer: torchrun's RANK/WORLD_SIZE, else a Slurm array task, else (0, 1).

    A Slurm array ``--array=M-N`` gives task ids M..N; the index is counted from
    ``SLURM_ARRAY_TASK_MIN`` so any start works (arrays with a step are not supported: pass
    ``--shard`` explicitly).
    """
    world = _env_int("WORLD_SIZE", 1)
    if world > 1:
        return _env_int("RANK", 0), world
    count = _env_int("SLURM_ARRAY_TASK_COUNT", 1)
    if count > 1:
        return _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0), count
    return 0, 1
