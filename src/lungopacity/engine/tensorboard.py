"""TensorBoard event files beside metrics.jsonl, when the optional ``tensorboard`` package is there.

Install with ``pip install lungopacity[tensorboard]``; without it the training loop writes
what it always wrote and says so once, at INFO level. Every number of a metrics line
becomes a scalar under the same name (nested dicts as ``name/key``, e.g.
``val_class_auc/Lung Opacity``) at step = epoch (1-based), so the curves in TensorBoard
are the numbers in ``metrics.jsonl``. A task may add precision-recall curves (the
classifier's validation P(opacity)).

A resumed run opens its writer with ``purge_step`` = the first epoch it replays, so the
replayed epochs replace the events the interrupted run wrote for them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Metrics-line keys that are coordinates, not measurements.
NOT_SCALARS = frozenset({"fold", "epoch"})

_missing_reported = False


def flatten_scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(tag, value)`` for every real number in a metrics line, nested dicts joined with '/'."""
    for key, value in record.items():
        if not prefix and key in NOT_SCALARS:
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten_scalars(value, f"{tag}/")
        elif isinstance(value, (bool, np.bool_)):
            continue
        elif isinstance(value, (int, float, np.integer, np.floating)):
            yield tag, float(value)


class TensorBoardLog:
    """A SummaryWriter opened on first use (rank 0 only; the loop decides)."""

    def __init__(self, folder: Path, purge_step: int | None = None) -> None:
        self.folder, self.purge_step = Path(folder), purge_step
        self._writer: Any = None

    @classmethod
    def create(cls, folder: Path | None, purge_step: int | None = None) -> TensorBoardLog | None:
        """A log for ``folder``, or None when there is no folder or no tensorboard package."""
        global _missing_reported
        if folder is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            if not _missing_reported:
                log.info("tensorboard is not installed: no event files (pip install 'lungopacity[tensorboard]')")
                _missing_reported = True
            return None
        return cls(folder, purge_step)

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.folder.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.folder), purge_step=self.purge_step)
        return self._writer

    def write(
        self,
        record: Mapping[str, Any],
        step: int,
        curves: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        """One metrics line (and precision-recall curves ``name -> (labels 0/1, scores)``) at ``step``."""
        writer = self._open()
        for tag, value in flatten_scalars(record):
            writer.add_scalar(tag, value, global_step=step)
        for name, (labels, scores) in (curves or {}).items():
            labels = np.asarray(labels).astype(bool)
            scores = np.asarray(scores, dtype=np.float64)
            if labels.size and 0 < labels.sum() < labels.size and np.isfinite(scores).all():
                writer.add_pr_curve(name, labels, np.clip(scores, 0.0, 1.0), global_step=step)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files in ``folder``: ``tag -> [(step, value), ...]``.

    For tests and notebooks; needs the tensorboard package.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value if math.isfinite(event.value) else float("nan"))
              for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }
