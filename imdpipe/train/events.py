"""TensorBoard event files beside ``metrics.jsonl``: what the field's trainers write.

Every record the loop appends to ``metrics.jsonl`` also goes to TensorBoard through
``torch.utils.tensorboard.SummaryWriter``: each number of a ``kind="step"`` record as
``step/<name>`` (loss, ce, bce, lr, clips_per_s) and of a ``kind="epoch"`` record as
``epoch/<name>`` (train loss and top-1, validation top-1 and loss, lr, clips/s, rev mean and
share of clips whose audio IMD dropped), all at the record's global step; plus a histogram of
the epoch's rev values. ``tensorboard --logdir RUN`` shows them. A resumed run purges the events
past its checkpoint's step, so the curves do not double back.
"""

from __future__ import annotations

import math
from pathlib import Path

SKIP = {"kind", "epoch", "step"}


class EventWriter:
    """Mirror of ``metrics.jsonl`` records into TensorBoard (a no-op when disabled)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, purge_step: int | None = None) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def record(self, rec: dict) -> None:
        """Write every finite number of one metrics record under ``<kind>/<name>``."""
        if self.writer is None:
            return
        for key, value in rec.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{rec['kind']}/{key}", value, global_step=rec["step"])

    def histogram(self, tag: str, values, step: int) -> None:
        if self.writer is not None and values is not None and len(values):
            self.writer.add_histogram(tag, values, global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in a run directory's event files (for checks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
