"""The one epoch loop every image model trains with (the classifier's folds, the detector).

In the manner of MONAI's workflows, a task supplies only what differs — how to build its
network, one training step (batch -> loss dict) and one evaluation (-> metrics, the score
that selects ``best.pt``, and a payload kept for the selected epoch) — and
:class:`EpochLoop` owns the rest:

* the sampler and loader of each epoch, with shuffling, augmentation and dropout seeded
  from ``(seed, fold, epoch)`` alone (:func:`~lungopacity.engine.common.epoch_seed`), so an
  epoch replayed after a resume draws exactly what it drew the first time;
* the device, float16 autocast with a GradScaler (CUDA only), channels-last weights,
  gradient-norm clipping, the optimiser and per-step schedule of the recipe;
* non-finite losses: the step is skipped (no update, the schedule moves on), counted in
  the metrics line as ``skipped_steps``, and an epoch in which every step was non-finite
  stops the run with :class:`~lungopacity.errors.TrainingDivergedError`; under DDP the
  decision is all-reduced so that every rank skips the same steps;
* progress bars, one ``metrics.jsonl`` line per epoch, TensorBoard event files when the
  package is installed (:mod:`.tensorboard`);
* selection (``best``: the best score so far, with early stopping after ``patience``
  epochs without improvement; ``last``: every epoch, no early stopping) and the atomic
  ``best.pt`` / ``last.pt`` checkpoints (:mod:`.checkpoint`);
* resume from ``last.pt`` (weights, optimiser, schedule, scaler, augmentation and every
  RNG), removal of the temporary files an interrupted write left;
* DistributedDataParallel: a DistributedSampler, rank 0 alone writes, the stop decision
  is rank 0's, and each rank records a digest of its trained weights;
* an optional exponential moving average of the weights (``ema_decay``,
  :class:`WeightAverage`): updated after every step, it is what each epoch evaluates and
  what ``best.pt`` keeps, while the raw weights go on training.

``last.pt`` holds (format 2, loadable with ``weights_only=True``)::

    format_version, model, optimizer, scheduler, scaler, augment, epoch (epochs done),
    best_score, best_epoch (0-based), epochs_since_best, history (the metrics lines),
    finished, rng {python: list, numpy: {..., keys: int64 tensor}, torch, cuda?},
    model_config, train_config, ema ({model, updates} of the weight average, or None)

and ``best.pt``: ``format_version, model, model_config, epoch (1-based), metrics (its
metrics line), train_config``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler

from lungopacity.data.datasets import collate_samples
from lungopacity.data.transforms import AugmentConfig, BatchAugment
from lungopacity.engine.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    atomic_torch_save,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    seed_everything,
    set_rng_state,
    to_plain,
)
from lungopacity.engine.common import (
    DistributedContext,
    Progress,
    append_jsonl,
    barrier,
    broadcast_flag,
    build_optimizer,
    build_scheduler,
    epoch_seed,
)
from lungopacity.engine.tensorboard import TensorBoardLog
from lungopacity.errors import CheckpointError, ConfigError, TrainingDivergedError

log = logging.getLogger(__name__)

LAST_FILE, BEST_FILE = "last.pt", "best.pt"
#: Keys every last.pt holds.
STATE_KEYS = (
    "model", "optimizer", "scheduler", "scaler", "epoch", "best_score", "best_epoch", "epochs_since_best",
    "history", "rng",
)
#: Keys every best.pt holds.
BEST_KEYS = ("model", "model_config", "epoch")
#: Non-finite steps logged one by one per epoch; the rest are only counted.
_LOGGED_SKIPS = 3


@dataclass
class LoopSettings:
    """The loop's share of a training config (each trainer fills it from its own)."""

    epochs: int
    batch_size: int
    seed: int
    recipe: str
    lr: float | None
    weight_decay: float | None
    grad_clip: float  # 0: no clipping
    patience: int
    augment: AugmentConfig | None  # None: no augmentation
    amp: bool  # float16 autocast + GradScaler; only ever on CUDA
    channels_last: bool  # weights in channels_last (the trainer decides on which devices)
    num_workers: int = 0
    max_steps_per_epoch: int | None = None
    select: str = "best"  # best | last
    # Per-step decay of the weight average (WeightAverage); 0: none, the raw weights are evaluated.
    ema_decay: float = 0.0


@dataclass
class LoopFiles:
    """Where one loop writes."""

    folder: Path  # last.pt, best.pt, DDP weight digests
    metrics: Path  # metrics.jsonl (the folds of a run share one)
    fold: int | None = None  # written into each metrics line and part of the seed; None: no fold
    tensorboard: Path | None = None  # event files (when the tensorboard package is installed)

    @property
    def last(self) -> Path:
        return self.folder / LAST_FILE

    @property
    def best(self) -> Path:
        return self.folder / BEST_FILE


@dataclass
class Evaluation:
    """What a task's evaluation reports for one epoch.

    Attributes:
        metrics: entries of the metrics line (by convention prefixed ``val_``).
        score: the selection score, higher is better (finite: map undefined metrics to
            a fallback such as ``-val_loss``).
        payload: anything the task wants back for the selected epoch (e.g. its
            validation predictions), kept in memory only.
        curves: ``name -> (labels 0/1, scores in [0, 1])`` for TensorBoard PR curves.
    """

    metrics: dict[str, Any]
    score: float
    payload: Any = None
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a training step gets besides its batch."""

    model: torch.nn.Module  # the model to call: DDP-wrapped when distributed
    device: torch.device
    augment: BatchAugment | None
    amp: bool  # autocast on (CUDA and the config asks for it)
    channels_last: bool

    def autocast(self) -> Any:
        """float16 autocast when ``amp``, else a no-op context."""
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)


class WeightAverage:
    """An exponential moving average of a network's weights and buffers.

    After step ``t`` (0-based) the average moves towards the trained weights by
    ``1 - d_t`` with ``d_t = min(decay, (1 + t) / (10 + t))``: the warm-up that timm's
    model EMA and TensorFlow's ExponentialMovingAverage use, so that the pretrained or
    random starting point does not linger in the average of a short run (on 90 steps a
    plain 0.99 would still hold 40 % of it). Integer buffers (BatchNorm's step count) are
    copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError("--ema", f"must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.decay_at(self.updates)
        trained = model.state_dict()
        for name, average in self.module.state_dict().items():
            value = trained[name].detach()
            if average.dtype.is_floating_point:
                average.lerp_(value.to(average.dtype), weight)
            else:
                average.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])


class TrainingTask(ABC):
    """What differs between the models the loop trains.

    Attributes:
        label: names the run in progress bars and logs (``"fold 0"``, ``"detector"``);
            a bar's description is ``f"{label} epoch {e}/{epochs}"``.
        train_dataset: the training samples (collated by ``collate_samples``).
        train_config: the trainer's config as a dict (stored in the checkpoints).
    """

    label: str = "train"
    train_dataset: Dataset
    train_config: dict[str, Any]

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A fresh network (the loop has seeded every generator; it moves it to the device)."""

    @abstractmethod
    def train_step(self, batch: dict[str, Any], step: StepContext) -> dict[str, torch.Tensor]:
        """Losses of one batch: ``"loss"`` is minimised, other entries are logged as ``train_<name>``."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module) -> Evaluation:
        """Validation of the bare (unwrapped) model after an epoch."""

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return len(batch["image"])

    def sample_weights(self) -> Sequence[float] | None:
        """Per-sample weights for class-balanced sampling (None: uniform shuffling)."""
        return None

    def trainable_parameters(self, model: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
        return model.parameters()

    def set_train_mode(self, model: torch.nn.Module) -> None:
        """Put the (possibly wrapped) model in training mode at the start of each epoch."""
        model.train()

    def ddp_options(self) -> dict[str, Any]:
        """Extra keyword arguments for DistributedDataParallel."""
        return {}

    def model_config(self, model: torch.nn.Module) -> dict[str, Any]:
        """What rebuilds the network (stored in both checkpoints)."""
        return model.config()  # type: ignore[operator]

    def describe(self, record: dict[str, Any]) -> str:
        """One log line for a finished epoch."""
        return f"{self.label} epoch {record['epoch']}: train loss {record.get('train_loss', float('nan')):.4f}"


@dataclass
class LoopResult:
    """How a loop ended."""

    best_epoch: int  # 1-based epoch of best.pt (with select=last: the last epoch)
    best_score: float
    epochs_run: int
    best_payload: Any  # the task's payload of that epoch, None when it ran before a resume
    model: torch.nn.Module  # the bare model as the last epoch evaluated it (the weight average, if any)


class EpochLoop:
    """Train one task for ``settings.epochs`` epochs (see the module docstring)."""

    def __init__(
        self,
        task: TrainingTask,
        settings: LoopSettings,
        files: LoopFiles,
        *,
        device: torch.device,
        context: DistributedContext,
        progress: Progress,
    ) -> None:
        if settings.select not in ("best", "last"):
            raise ConfigError(f"select must be best or last, got {settings.select!r}")
        self.task, self.settings, self.files = task, settings, files
        self.device, self.context, self.progress = device, context, progress
        self.seed_stream = files.fold if files.fold is not None else 0
        self.amp = device.type == "cuda" and settings.amp
        seed_everything(epoch_seed(settings.seed, -1, self.seed_stream))
        model = task.build_model().to(device)
        if settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = model
        self.train_model: torch.nn.Module = model
        self.average = WeightAverage(model, settings.ema_decay) if settings.ema_decay > 0 else None
        if context.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, **task.ddp_options()
            )
        self.dataset = task.train_dataset
        n = len(self.dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ConfigError(f"{task.label}: no training samples")
        self.batch_size = max(1, min(settings.batch_size, n // context.world_size))
        steps = max(n // (self.batch_size * context.world_size), 1)
        if settings.max_steps_per_epoch:
            steps = min(steps, settings.max_steps_per_epoch)
        self.steps_per_epoch = steps
        self.optimizer = build_optimizer(
            settings.recipe, list(task.trainable_parameters(model)), lr=settings.lr, weight_decay=settings.weight_decay
        )
        self.scheduler = build_scheduler(settings.recipe, self.optimizer, steps_per_epoch=steps, epochs=settings.epochs)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.augment = BatchAugment(settings.augment) if settings.augment is not None else None
        self.sample_weights = task.sample_weights()
        if self.sample_weights is not None and context.enabled:
            log.warning("%s: class-balanced sampling is not available under DDP; shuffling uniformly", task.label)
        # Bookkeeping (checkpointed in last.pt).
        self.epoch = 0
        self.best_score = float("-inf")  # any first score wins, also a fallback below -1
        self.best_epoch = -1
        self.epochs_since_best = 0
        self.history: list[dict[str, Any]] = []
        self.finished = False
        self.best_payload: Any = None

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """What each epoch evaluates and best.pt keeps: the weight average, or the trained weights."""
        return self.average.module if self.average is not None else self.model

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (last.pt)."""
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "augment": self.augment.state_dict() if self.augment else None,
            "epoch": self.epoch,
            "best_score": float(self.best_score),
            "best_epoch": self.best_epoch,
            "epochs_since_best": self.epochs_since_best,
            "history": to_plain(self.history),
            "finished": self.finished,
            "rng": rng_state(),
            "model_config": to_plain(self.task.model_config(self.model)),
            "train_config": to_plain(self.task.train_config),
            "ema": self.average.state_dict() if self.average is not None else None,
        }

    def restore(self, path: Path) -> None:
        """Continue from a last.pt written by :meth:`state`."""
        state = load_checkpoint(path, map_location=self.device, required=STATE_KEYS)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.augment and state.get("augment"):
                self.augment.load_state_dict(state["augment"])
            self.epoch = int(state["epoch"])
            self.best_score, self.best_epoch = float(state["best_score"]), int(state["best_epoch"])
            self.epochs_since_best = int(state["epochs_since_best"])
            self.history = list(state["history"])
            self.finished = bool(state.get("finished", False))
            set_rng_state(state["rng"])
            if self.average is not None:
                if not state.get("ema"):
                    raise CheckpointError(path, "holds no weight average; resume without --ema or start anew")
                self.average.load_state_dict(state["ema"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(path, f"does not fit this run ({_first_line(exc)})") from None

    def _rewrite_metrics(self) -> None:
        """On resume: other folds' lines as they are, this loop's lines up to the checkpoint."""
        path = self.files.metrics
        kept = []
        if path.exists():
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            kept = [r for r in kept if r.get("fold") != self.files.fold]
        with open(path, "w") as handle:
            for record in kept + self.history:
                handle.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------- loader

    def _loader(self, epoch: int) -> DataLoader:
        seed = epoch_seed(self.settings.seed, epoch, self.seed_stream)
        generator = torch.Generator().manual_seed(seed)
        num_samples = self.steps_per_epoch * self.batch_size
        if self.context.enabled:
            sampler: Any = DistributedSampler(
                self.dataset, num_replicas=self.context.world_size, rank=self.context.rank, shuffle=True,
                seed=self.settings.seed, drop_last=True,
            )
            sampler.set_epoch(epoch)
        elif self.sample_weights is not None:
            sampler = WeightedRandomSampler(list(self.sample_weights), num_samples=num_samples, replacement=True,
                                            generator=generator)
        else:
            sampler = RandomSampler(self.dataset, num_samples=min(num_samples, len(self.dataset)),  # type: ignore[arg-type]
                                    generator=generator)
        return DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
            collate_fn=collate_samples, num_workers=self.settings.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )

    # ------------------------------------------------------------- one epoch

    def _all_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).all()
        if not self.context.enabled:
            return bool(finite)
        flag = finite.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # one rank's NaN skips the step everywhere
        return bool(flag.item())

    def train_epoch(self) -> dict[str, Any]:
        """One pass over the epoch's batches; the training part of its metrics line."""
        epoch, settings = self.epoch, self.settings
        seed = epoch_seed(settings.seed, epoch, self.seed_stream)
        torch.manual_seed(seed)  # dropout of this epoch
        if self.augment:
            self.augment.generator.manual_seed(seed + 1)
        self.task.set_train_mode(self.train_model)
        loader = self._loader(epoch)
        step_context = StepContext(self.train_model, self.device, self.augment, self.amp, settings.channels_last)
        sums: dict[str, float] = {"loss": 0.0}
        seen, steps_done, skipped, wait_time = 0, 0, 0, 0.0
        epoch_lr = self.optimizer.param_groups[0]["lr"]  # the lr of this epoch's first step
        start = time.perf_counter()
        if self.context.is_main:
            self.progress.start(f"{self.task.label} epoch {epoch + 1}/{settings.epochs}", self.steps_per_epoch)
        iterator = iter(loader)
        for _ in range(self.steps_per_epoch):
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            wait_time += time.perf_counter() - t0
            losses = self.task.train_step(batch, step_context)
            loss = losses["loss"]
            if not self._all_finite(loss):
                # A diverging batch must not poison the weights; the epoch goes on without it.
                skipped += 1
                if skipped <= _LOGGED_SKIPS and self.context.is_main:
                    log.warning("%s epoch %d: non-finite loss (%s); step skipped", self.task.label, epoch + 1,
                                {k: float(v.detach()) for k, v in losses.items()})
                self.optimizer.zero_grad(set_to_none=True)
                with warnings.catch_warnings():
                    # The schedule moves on over a skipped step on purpose (also before any update).
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                    self.scheduler.step()
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if settings.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.average is not None:
                self.average.update(self.model)
            n = self.task.batch_size_of(batch)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
            seen += n
            steps_done += 1
            if self.context.is_main:
                elapsed = time.perf_counter() - start
                self.progress.update(1, loss=f"{sums['loss'] / seen:.4f}",
                                     img_s=f"{seen * self.context.world_size / elapsed:.1f}")
        if self.context.is_main:
            self.progress.close()
        if skipped and self.context.is_main:
            log.warning("%s epoch %d: %d of %d steps skipped for a non-finite loss", self.task.label, epoch + 1,
                        skipped, skipped + steps_done)
        if steps_done == 0 and skipped:
            raise TrainingDivergedError(
                f"{self.task.label} epoch {epoch + 1}",
                "every step had a non-finite loss; lower --lr or check the data",
            )
        seconds = time.perf_counter() - start
        record: dict[str, Any] = {"lr": epoch_lr}
        for name, total in sums.items():
            record["train_loss" if name == "loss" else f"train_{name}"] = total / max(seen, 1)
        record.update({
            "images_per_s": seen * self.context.world_size / max(seconds, 1e-9),
            "data_wait_fraction": wait_time / max(seconds, 1e-9),
            "train_seconds": seconds,
            "skipped_steps": skipped,
        })
        return record

    # ------------------------------------------------------------------ run

    def fit(self, *, resume: bool = False) -> LoopResult:
        """Train until ``epochs`` or early stopping; with ``resume``, continue from last.pt first."""
        settings, files = self.settings, self.files
        if self.context.is_main:
            remove_stale_temp_files(files.folder)
        if resume and files.last.exists():
            self.restore(files.last)
            if self.context.is_main:
                self._rewrite_metrics()
            log.info("%s: resuming after epoch %d", self.task.label, self.epoch)
        board = None
        if self.context.is_main and not self.finished and self.epoch < settings.epochs:
            board = TensorBoardLog.create(files.tensorboard, purge_step=self.epoch + 1 if self.epoch else None)
        try:
            while self.epoch < settings.epochs and not self.finished:
                self._run_epoch(board)
        finally:
            if board is not None:
                board.close()
        if self.context.enabled:
            # The trained weights, before the task loads best.pt: what DDP must keep equal across ranks.
            self._write_weights_digest()
        return LoopResult(self.best_epoch + 1, float(self.best_score), self.epoch, self.best_payload,
                          self.evaluated_model)

    def _run_epoch(self, board: TensorBoardLog | None) -> None:
        settings = self.settings
        train_stats = self.train_epoch()
        evaluation = self.task.evaluate(self.evaluated_model)
        score = float(evaluation.score)
        selected = settings.select == "last" or score > self.best_score
        if selected:
            self.best_score, self.best_epoch, self.epochs_since_best = score, self.epoch, 0
            self.best_payload = evaluation.payload
        else:
            self.epochs_since_best += 1
        record: dict[str, Any] = {} if self.files.fold is None else {"fold": self.files.fold}
        record["epoch"] = self.epoch + 1
        record.update(train_stats)
        record.update(evaluation.metrics)
        record = to_plain(record)
        self.history.append(record)
        self.epoch += 1
        # With select=last no epoch is chosen on validation: no early stopping either.
        stop = settings.select == "best" and self.epochs_since_best >= settings.patience
        stop = broadcast_flag(stop, self.context)
        self.finished = stop or self.epoch >= settings.epochs
        if self.context.is_main:
            if selected:
                atomic_torch_save(
                    {"format_version": CHECKPOINT_FORMAT_VERSION, "model": self.evaluated_model.state_dict(),
                     "model_config": to_plain(self.task.model_config(self.model)), "epoch": self.epoch,
                     "metrics": record, "train_config": to_plain(self.task.train_config)},
                    self.files.best,
                )
            atomic_torch_save(self.state(), self.files.last)
            append_jsonl(self.files.metrics, record)
            if board is not None:
                board.write(record, self.epoch, evaluation.curves)
            log.info("%s, %.1f img/s%s%s", self.task.describe(record), record["images_per_s"],
                     f", {record['skipped_steps']} steps skipped" if record["skipped_steps"] else "",
                     " (best)" if selected and settings.select == "best" else "")
        barrier(self.context)
        if stop:
            log.info("%s: early stop after %d epochs without a better validation score", self.task.label,
                     settings.patience)

    def _write_weights_digest(self) -> None:
        """Each rank records a digest of its trained parameters: after DDP training they must be equal.

        Parameters only: BatchNorm running statistics are buffers that each rank updates from
        its own shard after DDP's start-of-forward broadcast, so they legitimately differ.
        """
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.named_parameters()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        path = self.files.folder / f"weights_digest_rank{self.context.rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(digest.hexdigest())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def evaluated_weights(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint's epoch was evaluated with: last.pt's weight average when
    the run kept one (its ``model`` are the raw weights training continues from), else ``model``."""
    average = checkpoint.get("ema")
    return average["model"] if isinstance(average, dict) and "model" in average else checkpoint["model"]


def load_best_weights(path: Path, model: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load best.pt's weights into ``model``; returns the checkpoint (its ``epoch``, ``metrics``)."""
    best = load_checkpoint(path, map_location=device, required=BEST_KEYS)
    try:
        model.load_state_dict(evaluated_weights(best))
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"weights do not fit the model ({_first_line(exc)})") from None
    return best


def load_best_model(
    path: Path,
    build: Callable[[dict[str, Any]], torch.nn.Module],
    device: torch.device | str = "cpu",
    fallback_config: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild best.pt's network from the model config it carries (or ``fallback_config``) and load it.

    Returns ``(model on device, checkpoint)``.
    """
    best = load_checkpoint(path, map_location=device, required=("model", "epoch"))
    config = best.get("model_config") or fallback_config
    if not isinstance(config, dict):
        raise CheckpointError(path, "incomplete checkpoint: no model config")
    try:
        model = build(config)
        model.load_state_dict(evaluated_weights(best))
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"weights do not fit the model ({_first_line(exc)})") from None
    return model.to(device), best
