"""Training the 3-class classifier: single split or k-fold, resumable, optionally distributed.

A run folder (:class:`lungopacity.engine.runs.ClassifierRun`) holds

* ``config.json`` — ``kind: "classifier"``, the training settings, the model config
  (enough to rebuild it), the cache it trained on, the folds and the input size;
* ``metrics.jsonl`` — one line per epoch (and fold): losses, AUCs, lr, images/s, the
  share of step time spent waiting for data, skipped (non-finite) steps;
* ``fold_K/last.pt`` — the complete state after the last finished epoch (model,
  optimiser, scheduler, augmentation and RNG state), written atomically;
* ``fold_K/best.pt`` — the selected weights: the epoch with the best validation opacity
  AUC (``select="best"``) or the fold's last epoch (``select="last"``);
* ``fold_K/val_predictions.csv`` — the selected model's probabilities and logits on its
  validation patients;
* ``oof.csv`` — k-fold only: out-of-fold probabilities, every patient exactly once;
* ``tensorboard/fold_K/`` — event files, when the tensorboard package is installed.

A single-split run is ``fold_0`` with the cache's train/val split. A k-fold run uses the
cache's ``fold`` column, the split ``prepare --folds K`` made once (``folds`` must equal
that K). The epochs run in :class:`lungopacity.engine.loop.EpochLoop`, seeded from
(seed, fold, epoch), so a run killed mid-epoch and resumed with ``resume=True`` ends in
exactly the state of an uninterrupted run.

``select="best"`` chooses each fold's epoch on the very patients whose probabilities
then enter ``oof.csv``, which flatters the out-of-fold figures a little; ``select="last"``
keeps the final epoch (and does not stop early), so the held-out patients choose nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lungopacity.constants import CLASS_NAMES, LUNG_OPACITY
from lungopacity.data.cache import PreparedCache
from lungopacity.data.datasets import CacheDataset, collate_samples
from lungopacity.data.preprocess import network_input
from lungopacity.data.transforms import AugmentConfig
from lungopacity.engine.checkpoint import atomic_write_json, remove_stale_temp_files
from lungopacity.engine.common import DistributedContext, Progress, barrier, training_context
from lungopacity.engine.config import ClassifierTrainConfig
from lungopacity.engine.loop import (
    EpochLoop,
    Evaluation,
    LoopFiles,
    LoopSettings,
    StepContext,
    TrainingTask,
    load_best_weights,
)
from lungopacity.engine.runs import (
    CONFIG_FILE,
    LOGIT_COLUMNS,
    METRICS_FILE,
    OOF_FILE,
    PROBABILITY_COLUMNS,
    TENSORBOARD_DIR,
    VAL_SUMMARY_FILE,
    CacheReference,
    ClassifierRun,
    load_run_models,
    run_settings,
)
from lungopacity.errors import ConfigError, DataFormatError
from lungopacity.metrics.classification import one_vs_rest_auc, roc_auc
from lungopacity.metrics.classification import softmax as softmax_np
from lungopacity.models.classifier import OpacityClassifier, create_classifier

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE", "METRICS_FILE", "OOF_FILE", "PROBABILITY_COLUMNS", "ClassifierTrainConfig", "FoldResult",
    "TrainResult", "cache_fold_count", "classification_summary", "fold_positions", "load_run_models",
    "predict_logits", "softmax_np", "train_classifier",
]


@dataclass
class FoldResult:
    fold: int
    best_epoch: int  # 1-based epoch of the selected weights (best.pt)
    best_auc: float  # its selection score (opacity AUC, or -val_loss when undefined)
    epochs_run: int
    val_predictions: pd.DataFrame = field(repr=False)


@dataclass
class TrainResult:
    run_dir: Path
    folds: list[FoldResult]
    oof_path: Path | None
    metrics: dict[str, float]


# ----------------------------------------------------------------------- helpers


@torch.no_grad()
def predict_logits(
    models: list[OpacityClassifier] | OpacityClassifier,
    cache: PreparedCache,
    positions: np.ndarray,
    *,
    size: int | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> np.ndarray:
    """Logits (N, 3) for cache positions; several models are averaged in logit space."""
    models = models if isinstance(models, list) else [models]
    device = torch.device(device)
    for model in models:
        model.eval().to(device)
    dataset = CacheDataset(cache, positions)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples)
    out = []
    if progress:
        progress.start("predict", len(dataset))
    for batch in loader:
        x = network_input(batch["image"], size=size, device=device, channels_last=True)
        logits = torch.stack([model(x).float() for model in models]).mean(0)
        out.append(logits.cpu().numpy())
        if progress:
            progress.update(len(x))
    if progress:
        progress.close()
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_NAMES)), np.float32)


def classification_summary(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Opacity AUC, abnormal-vs-normal AUC, per-class one-vs-rest AUC, accuracy."""
    target = (labels == LUNG_OPACITY).astype(int)
    summary: dict[str, Any] = {"n": int(len(labels))}
    summary["opacity_auc"] = float(roc_auc(target, probs[:, LUNG_OPACITY])) if 0 < target.sum() < len(target) else float("nan")
    abnormal = (labels != 0).astype(int)
    summary["abnormal_auc"] = float(roc_auc(abnormal, 1.0 - probs[:, 0])) if 0 < abnormal.sum() < len(abnormal) else float("nan")
    summary["class_auc"] = {
        name: (float(v) if v is not None else float("nan"))
        for name, v in one_vs_rest_auc(labels, probs, list(CLASS_NAMES)).items()
    }
    summary["accuracy"] = float((probs.argmax(1) == labels).mean()) if len(labels) else float("nan")
    return summary


def _class_weights(labels: np.ndarray) -> torch.Tensor:
    counts = np.bincount(labels, minlength=len(CLASS_NAMES)).astype(np.float64)
    weights = counts.sum() / (len(CLASS_NAMES) * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def cache_fold_count(cache: PreparedCache) -> int:
    """K of the folds ``prepare --folds K`` stored in the cache's ``fold`` column."""
    folds = cache.meta.get("folds")
    if folds is None:
        column = pd.to_numeric(cache.table["fold"], errors="coerce")
        if column.isna().all():
            raise DataFormatError(cache.path / "index.csv", "no fold column values; prepare the cache again")
        folds = int(column.max()) + 1
    return int(folds)


def fold_positions(cache: PreparedCache, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) cache positions per fold.

    ``folds == 1``: the cache's train/val split. ``folds == K >= 2``: the cache's own K
    folds (its ``fold`` column), so every run on a cache shares the split ``prepare`` made.

    Raises:
        ConfigError: ``folds`` differs from the number of folds the cache was prepared with.
        DataFormatError: the cache's split or folds leave a part without usable patients.
    """
    if folds <= 1:
        train, val = cache.indices("train"), cache.indices("val")
        if len(val) == 0 or len(train) == 0:
            raise DataFormatError(cache.path, f"the cache's split has {len(train)} train and {len(val)} val patients")
        return [(train, val)]
    prepared = cache_fold_count(cache)
    if folds != prepared:
        raise ConfigError(
            "--folds",
            f"{folds} differs from the {prepared} folds of the cache {cache.path} (made by `prepare --folds "
            f"{prepared}`); train with --folds {prepared} or prepare the cache again with --folds {folds}",
        )
    usable = cache.indices()
    column = pd.to_numeric(cache.table["fold"].iloc[usable], errors="coerce").to_numpy()
    if np.isnan(column).any() or not np.isin(column, np.arange(folds)).all():
        raise DataFormatError(cache.path / "index.csv", f"fold column must hold 0..{folds - 1} for every patient")
    column = column.astype(np.int64)
    parts = []
    for k in range(folds):
        val = usable[column == k]
        if len(val) == 0:
            raise DataFormatError(cache.path, f"fold {k} has no usable patient")
        parts.append((usable[column != k], val))
    return parts


def _fold_positions(cache: PreparedCache, config: ClassifierTrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`fold_positions` for a config (kept for older callers)."""
    return fold_positions(cache, config.folds)


def box_coverage(boxes: list[torch.Tensor], height: int, width: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Share of each cell of a ``grid_h x grid_w`` grid over the image that a box covers.

    ``boxes``: per image, xyxy in the image's ``height x width`` pixels. Returns
    ``(B, grid_h, grid_w)`` in [0, 1]; where boxes overlap, a cell takes its largest share.
    """
    device = boxes[0].device if boxes else torch.device("cpu")
    out = torch.zeros(len(boxes), grid_h, grid_w, device=device)
    cell_y0 = torch.arange(grid_h, device=device, dtype=torch.float32) * (height / grid_h)
    cell_x0 = torch.arange(grid_w, device=device, dtype=torch.float32) * (width / grid_w)
    for b, image_boxes in enumerate(boxes):
        if image_boxes.numel() == 0:
            continue
        x1, y1, x2, y2 = image_boxes.float().unbind(1)
        overlap_x = ((torch.minimum(x2[:, None], cell_x0 + width / grid_w) - torch.maximum(x1[:, None], cell_x0))
                     .clamp(min=0) / (width / grid_w))
        overlap_y = ((torch.minimum(y2[:, None], cell_y0 + height / grid_h) - torch.maximum(y1[:, None], cell_y0))
                     .clamp(min=0) / (height / grid_h))
        out[b] = (overlap_y[:, :, None] * overlap_x[:, None, :]).amax(0)
    return out


def box_map_loss(maps: torch.Tensor, boxes: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Binary cross-entropy of the opacity activation map against the boxes' coverage.

    At each location the opacity evidence is the opacity class's map against the other
    two (``m_opacity - logsumexp(m_others)``); its target is the share of the cell inside
    a box: 0 everywhere on an image without boxes. This teaches the classifier *where*
    opacity lies from the boxes 600 images carry, at no cost at inference (the maps are
    the head's own).
    """
    others = [k for k in range(maps.shape[1]) if k != LUNG_OPACITY]
    evidence = maps[:, LUNG_OPACITY] - torch.logsumexp(maps[:, others], dim=1)
    target = box_coverage(boxes, height, width, maps.shape[-2], maps.shape[-1]).to(evidence.device)
    return F.binary_cross_entropy_with_logits(evidence, target)


def mixup_batch(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018): each image blended with another of the batch.

    Returns ``(lam * x + (1 - lam) * x[perm], perm, lam)`` with ``lam ~ Beta(alpha, alpha)``
    drawn from torch's global generator (seeded by the loop per epoch, so a resumed run
    mixes the same pairs). The loss is then ``lam * loss(y) + (1 - lam) * loss(y[perm])``.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0]).to(x.device)
    return lam * x + (1.0 - lam) * x[perm], perm, lam


# -------------------------------------------------------------------- one fold


class _ClassifierTask(TrainingTask):
    """The classifier's share of the loop: cross-entropy steps and an AUC evaluation."""

    def __init__(
        self,
        cache: PreparedCache,
        fold: int,
        train_positions: np.ndarray,
        val_positions: np.ndarray,
        config: ClassifierTrainConfig,
        device: torch.device,
    ) -> None:
        self.cache, self.fold, self.config, self.device = cache, fold, config, device
        self.label = f"fold {fold}"
        self.train_positions, self.val_positions = train_positions, val_positions
        self.train_dataset = CacheDataset(cache, train_positions)
        self.train_config = config.to_dict()
        weights = _class_weights(self.train_dataset.labels) if config.balance == "loss" else None
        self.loss_weights = weights.to(device) if weights is not None else None
        self.val_labels = cache.table["class"].to_numpy()[val_positions]

    def build_model(self) -> torch.nn.Module:
        # Only when asked: a backbone without stochastic depth then builds as before.
        extra = {"drop_path_rate": self.config.drop_path} if self.config.drop_path > 0 else None
        try:
            return create_classifier(
                self.config.backbone, pretrained=self.config.pretrained, num_classes=len(CLASS_NAMES), in_chans=1,
                drop_rate=self.config.drop_rate, model_kwargs=extra,
            )
        except TypeError as exc:
            if extra is None or "drop_path_rate" not in str(exc):
                raise
            raise ConfigError("--drop-path", f"backbone {self.config.backbone} has no stochastic depth") from None

    def trainable_parameters(self, model: torch.nn.Module) -> Any:
        scale = self.config.backbone_lr_scale
        if scale == 1.0:
            return model.parameters()
        head = {id(p) for p in model.head_parameters()}  # type: ignore[operator]
        # The head first: the loop logs the first group's rate, which stays the recipe's.
        return [{"params": [p for p in model.parameters() if id(p) in head], "lr_scale": 1.0},
                {"params": [p for p in model.parameters() if id(p) not in head], "lr_scale": scale}]

    def set_train_mode(self, model: torch.nn.Module) -> None:
        model.train()
        if self.config.freeze_bn:
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def sample_weights(self) -> list[float] | None:
        if self.config.balance != "sampler":
            return None
        labels = self.train_dataset.labels
        per_class = np.bincount(labels, minlength=len(CLASS_NAMES)).astype(np.float64)
        return (1.0 / np.maximum(per_class[labels], 1)).tolist()

    def train_step(self, batch: dict[str, Any], step: StepContext) -> dict[str, torch.Tensor]:
        x = network_input(batch["image"], size=self.config.size, device=step.device, channels_last=step.channels_last)
        y = batch["label"].to(step.device)
        supervise_boxes = self.config.box_supervision > 0
        boxes = None
        if supervise_boxes:
            # Boxes are in the cache's pixels; the input may be resized to config.size.
            factor = x.shape[-1] / self.cache.size
            boxes = [b.to(step.device) * factor for b in batch["boxes"]]
        if step.augment:
            x, moved = step.augment(x, boxes)
            boxes = moved if supervise_boxes else None
        # Mixed after augmentation, so each image keeps its own geometry and its boxes.
        perm, lam = None, 1.0
        if self.config.mixup > 0:
            x, perm, lam = mixup_batch(x, self.config.mixup)

        def mixed(loss_of: Any, target: Any) -> torch.Tensor:
            # Both losses are linear in their target, so mixing the losses is mixing the targets.
            plain = loss_of(target)
            if perm is None:
                return plain
            other = target[perm] if torch.is_tensor(target) else [target[i] for i in perm.tolist()]
            return lam * plain + (1.0 - lam) * loss_of(other)

        with step.autocast():
            if supervise_boxes:
                logits, maps = step.model(x, with_activation_maps=True)
            else:
                logits = step.model(x)
            classification = mixed(lambda target: F.cross_entropy(
                logits.float(), target, weight=self.loss_weights, label_smoothing=self.config.label_smoothing), y)
        if not supervise_boxes:
            return {"loss": classification}
        box_loss = mixed(lambda b: box_map_loss(maps.float(), b, x.shape[-2], x.shape[-1]), boxes)
        return {"loss": classification + self.config.box_supervision * box_loss, "box_loss": box_loss.detach()}

    def predict_val(self, model: torch.nn.Module) -> np.ndarray:
        return predict_logits(
            model, self.cache, self.val_positions, size=self.config.size,  # type: ignore[arg-type]
            batch_size=self.config.eval_batch_size, device=self.device,
        )

    def evaluate(self, model: torch.nn.Module) -> Evaluation:
        logits = self.predict_val(model)
        labels = self.val_labels
        probs = softmax_np(logits)
        loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()) if len(labels) else float("nan")
        summary = classification_summary(labels, probs)
        summary["val_loss"] = loss
        auc = summary["opacity_auc"]
        metrics = {f"val_{k}" if not k.startswith("val_") else k: v for k, v in summary.items()}
        target = (labels == LUNG_OPACITY).astype(np.int64)
        return Evaluation(
            metrics=metrics,
            score=auc if np.isfinite(auc) else -loss,  # no opacity in validation: the lowest loss
            payload=logits,
            curves={"val_opacity": (target, probs[:, LUNG_OPACITY])},
        )

    def describe(self, record: dict[str, Any]) -> str:
        return (f"fold {self.fold} epoch {record['epoch']}: train loss {record['train_loss']:.4f}, "
                f"val loss {record['val_loss']:.4f}, opacity AUC {record['val_opacity_auc']:.4f}")

    def predictions_table(self, logits: np.ndarray) -> pd.DataFrame:
        probs = softmax_np(logits)
        table = self.cache.table.iloc[self.val_positions]
        predictions = pd.DataFrame({"patientId": table["patientId"].to_numpy(), "fold": self.fold})
        for k, column in enumerate(PROBABILITY_COLUMNS):
            predictions[column] = probs[:, k]
        for k, column in enumerate(LOGIT_COLUMNS):
            predictions[column] = logits[:, k]
        predictions["class"] = table["class"].to_numpy()
        predictions["Target"] = table["Target"].to_numpy()
        return predictions


def _loop_settings(config: ClassifierTrainConfig) -> LoopSettings:
    return LoopSettings(
        epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, recipe=config.recipe, lr=config.lr,
        weight_decay=config.weight_decay, grad_clip=config.grad_clip, patience=config.patience,
        augment=AugmentConfig(hflip_probability=0.5 if config.hflip else 0.0) if config.augment else None,
        amp=config.amp, channels_last=config.channels_last, num_workers=config.num_workers,
        max_steps_per_epoch=config.max_steps_per_epoch, select=config.select, ema_decay=config.ema,
    )


def _train_fold(
    run: ClassifierRun,
    fold: int,
    cache: PreparedCache,
    train_positions: np.ndarray,
    val_positions: np.ndarray,
    config: ClassifierTrainConfig,
    *,
    device: torch.device,
    context: DistributedContext,
    progress: Progress,
    resume: bool,
    before_fit: Callable[[EpochLoop], None] | None = None,
) -> FoldResult:
    task = _ClassifierTask(cache, fold, train_positions, val_positions, config, device)
    files = LoopFiles(
        folder=run.fold_dir(fold), metrics=run.path / METRICS_FILE, fold=fold,
        tensorboard=run.path / TENSORBOARD_DIR / f"fold_{fold}",
    )
    loop = EpochLoop(task, _loop_settings(config), files, device=device, context=context, progress=progress)
    if before_fit is not None:
        before_fit(loop)
    result = loop.fit(resume=resume)
    best = load_best_weights(files.best, loop.model, device)
    # The selected epoch's own validation logits when this process trained it; after a
    # resume past that epoch they are predicted again from best.pt (the same numbers).
    logits = result.best_payload if result.best_payload is not None else task.predict_val(loop.model)
    predictions = task.predictions_table(logits)
    if context.is_main:
        predictions.to_csv(run.val_predictions_path(fold), index=False)
    return FoldResult(fold, int(best["epoch"]), float(result.best_score), result.epochs_run, predictions)


# --------------------------------------------------------------------- the run


def train_classifier(
    cache_dir: str | Path,
    run_dir: str | Path,
    config: ClassifierTrainConfig | None = None,
    *,
    resume: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Train the classifier on a prepared cache (see the module docstring for the run folder).

    Args:
        cache_dir: a folder made by ``lungopacity prepare``.
        run_dir: the run folder to create, or to continue with ``resume=True``.
        config: training settings; with ``resume`` the run's own config.json is used.
        resume: continue a run that was stopped (its finished folds are kept).
        progress: progress reporter (the CLI passes a progress bar).

    Raises:
        RunExistsError: ``run_dir`` holds a run and ``resume`` is False.
        RunFolderError: ``resume`` without a run to continue.
        ConfigError: a bad setting, or ``folds`` other than the cache's.
        CheckpointError: a damaged ``last.pt`` on resume.
    """
    run_dir = Path(run_dir)
    cache = PreparedCache(cache_dir)
    config = run_settings(run_dir, cache, config, resume=resume, default=ClassifierTrainConfig)
    config.validate()
    folds = fold_positions(cache, config.folds)
    device, context, progress = training_context(config.device, progress)
    if context.is_main:
        remove_stale_temp_files(run_dir)

    run = ClassifierRun(
        path=run_dir, train=config, model_config={}, cache=CacheReference.of(cache), folds=len(folds),
        input_size=config.size or cache.size,
    )

    def write_config(loop: EpochLoop) -> None:
        # Once, when the first fold's network exists (its config is the run's model config).
        if context.is_main and not resume:
            run.model_config = loop.task.model_config(loop.model)
            run.save()
        barrier(context)

    results: list[FoldResult] = []
    for fold, (train_positions, val_positions) in enumerate(folds):
        results.append(_train_fold(
            run, fold, cache, train_positions, val_positions, config, device=device, context=context,
            progress=progress, resume=resume, before_fit=write_config if fold == 0 else None,
        ))

    oof_path = None
    if len(folds) > 1 and context.is_main:
        oof = pd.concat([r.val_predictions for r in results], ignore_index=True)
        oof_path = run.oof_path
        oof.to_csv(oof_path, index=False)
    all_predictions = pd.concat([r.val_predictions for r in results], ignore_index=True)
    summary = classification_summary(
        all_predictions["class"].to_numpy(), all_predictions[list(PROBABILITY_COLUMNS)].to_numpy()
    )
    summary["select"] = config.select
    summary["selected_epochs"] = [r.best_epoch for r in results]
    if context.is_main:
        atomic_write_json(summary, run_dir / VAL_SUMMARY_FILE)
    log.info("classifier run %s: validation opacity AUC %.4f over %d patients (select %s, epochs %s)", run_dir,
             summary["opacity_auc"], summary["n"], config.select, summary["selected_epochs"])
    return TrainResult(run_dir, results, oof_path, summary)

