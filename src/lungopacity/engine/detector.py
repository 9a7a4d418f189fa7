"""Training the opacity detector (RetinaNet by default, Faster R-CNN as an option), resumable.

The detector trains on every patient of the cache's train split, negatives included (an
image without boxes teaches the classification head what is not an opacity and adds
nothing to the box loss), with box-aware augmentation: the same random affine map moves
the pixels and the boxes (:class:`lungopacity.data.transforms.BatchAugment`). Images go
to the network as a list of ``(1, S, S)`` float tensors at the cache's size ``S``, with
targets in those pixels (labels all 1); the detector resizes to its own ``image_size``
internally and returns boxes in the input's pixels, which
:meth:`PreparedCache.boxes_to_original` maps back to the original image.

A run folder holds

* ``config.json`` — the training settings and the model config (enough to rebuild it);
* ``metrics.jsonl`` — one line per epoch: losses, lr, images/s, data-wait share, and the
  validation RSNA metric (at the best confidence threshold of that epoch);
* ``last.pt`` — the complete state after the last finished epoch (model, optimiser,
  scheduler, grad scaler, augmentation and RNG state), written atomically;
* ``tensorboard/`` — event files, when the tensorboard package is installed;
* ``best.pt`` — the weights with the best validation RSNA metric;
* ``val_predictions.csv`` — the best model's raw detections on the validation patients,
  in the submission format (original pixels);
* ``postprocess.json`` / ``postprocess_grid.csv`` — the post-processing tuned on those
  predictions (:mod:`lungopacity.postprocess`; no gating: the classifier is not
  part of this run) and every setting tried.

The epochs run in :class:`lungopacity.engine.loop.EpochLoop`: each epoch's shuffle,
augmentation and randomness are seeded from (seed, epoch), so a run killed mid-epoch and
resumed with ``resume=True`` ends in the state of an uninterrupted run. On CUDA the model
trains with automatic mixed precision and channels-last weights. The folder is read back
by :func:`lungopacity.engine.runs.load_detector_run`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from lungopacity.data.cache import PreparedCache
from lungopacity.data.datasets import CacheDataset, collate_samples
from lungopacity.data.preprocess import network_input
from lungopacity.data.transforms import AugmentConfig, BatchAugment
from lungopacity.engine.checkpoint import atomic_write_json, remove_stale_temp_files
from lungopacity.engine.common import Progress, barrier, training_context
from lungopacity.engine.config import DetectorTrainConfig
from lungopacity.engine.loop import (
    BEST_FILE,
    LAST_FILE,
    EpochLoop,
    Evaluation,
    LoopFiles,
    LoopSettings,
    StepContext,
    TrainingTask,
    load_best_weights,
)
from lungopacity.postprocess import (
    PostprocessConfig,
    rsna_map_by_threshold,
    save_postprocess,
    threshold_candidates,
    tune_postprocess,
)
from lungopacity.engine.runs import (
    CONFIG_FILE,
    DETECTOR_KIND,
    METRICS_FILE,
    POSTPROCESS_FILE,
    POSTPROCESS_GRID_FILE,
    TENSORBOARD_DIR,
    VAL_PREDICTIONS_FILE,
    VAL_SUMMARY_FILE,
    CacheReference,
    DetectorRun,
    load_detector_run,
    run_settings,
)
from lungopacity.errors import ConfigError, DataFormatError
from lungopacity.io.submission import write_submission
from lungopacity.metrics.rsna_map import rsna_map
from lungopacity.models.detector import OPACITY_LABEL, create_detector

log = logging.getLogger(__name__)

RUN_KIND = DETECTOR_KIND

__all__ = [
    "BEST_FILE", "CONFIG_FILE", "LAST_FILE", "METRICS_FILE", "POSTPROCESS_FILE", "POSTPROCESS_GRID_FILE", "RUN_KIND",
    "VAL_PREDICTIONS_FILE", "BoxPredictions", "DetectorRun", "DetectorTrainConfig", "DetectorTrainResult",
    "best_threshold_map", "detection_losses", "detector_positions", "detection_targets", "gt_boxes", "load_detector_run", "predict_boxes",
    "prepare_detection_batch", "train_detector",
]


@dataclass
class BoxPredictions:
    """Detections per patient, boxes xyxy in original pixels, best first."""

    patient_ids: list[str]
    positions: np.ndarray  # rows of the cache table
    boxes: list[np.ndarray] = field(repr=False)  # (N_i, 4) float64
    scores: list[np.ndarray] = field(repr=False)  # (N_i,) float64
    n_sets: int = 1  # prediction sets merged per patient (models x test-time flips)


@dataclass
class DetectorTrainResult:
    run_dir: Path
    best_epoch: int
    best_val_map: float
    epochs_run: int
    postprocess: PostprocessConfig
    val_map_postprocessed: float


# ----------------------------------------------------------------------- batches


def detection_targets(boxes: Sequence[torch.Tensor], device: torch.device | str) -> list[dict[str, torch.Tensor]]:
    """torchvision targets: ``boxes`` float ``(N, 4)`` xyxy and ``labels`` all opacity."""
    targets = []
    for image_boxes in boxes:
        image_boxes = image_boxes.to(device=device, dtype=torch.float32).reshape(-1, 4)
        labels = torch.full((len(image_boxes),), OPACITY_LABEL, dtype=torch.int64, device=device)
        targets.append({"boxes": image_boxes, "labels": labels})
    return targets


def prepare_detection_batch(
    batch: dict[str, Any], device: torch.device, augment: BatchAugment | None = None
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A collated cache batch -> (list of ``(1, S, S)`` float images, targets), augmented
    on ``device`` with the boxes moved along with the pixels."""
    images = network_input(batch["image"], device=device)
    boxes = [b.to(device) for b in batch["boxes"]]
    if augment is not None:
        images, moved = augment(images, boxes)
        assert moved is not None
        boxes = moved
    return list(images.unbind(0)), detection_targets(boxes, device)


def detection_losses(
    model: torch.nn.Module,
    images: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]],
    *,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """The model's loss dict for one batch (training mode), in float32; ``"total"`` is their sum."""
    device_type = images[0].device.type
    with torch.autocast(device_type, dtype=torch.float16, enabled=amp and device_type == "cuda"):
        losses = model(images, targets)
    losses = {name: value.float() for name, value in losses.items()}
    losses["total"] = torch.stack(list(losses.values())).sum()
    return losses


# -------------------------------------------------------------------- prediction


def _as_model_list(models: Sequence[torch.nn.Module] | torch.nn.Module) -> list[torch.nn.Module]:
    return list(models) if isinstance(models, (list, tuple)) else [models]


@torch.no_grad()
def predict_boxes(
    models: Sequence[torch.nn.Module] | torch.nn.Module,
    cache: PreparedCache,
    positions: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    hflip_tta: bool = False,
    amp: bool = False,
    progress: Progress | None = None,
) -> BoxPredictions:
    """Detections for cache positions, boxes mapped back to ORIGINAL pixels.

    Several models (and, with ``hflip_tta``, the horizontally flipped image) each add
    their boxes; fuse them with the post-processing (``n_sets`` tells WBF how many sets
    were merged).

    Args:
        models: one detector or several (eval-mode torchvision contract).
        cache: the prepared cache.
        positions: rows of ``cache.table``.
        batch_size: images per forward pass.
        device: where to run.
        hflip_tta: also predict on the mirrored image and mirror the boxes back.
        amp: float16 autocast (CUDA only).
        progress: progress reporter.
    """
    model_list = _as_model_list(models)
    device = torch.device(device)
    for model in model_list:
        model.eval().to(device)
    positions = np.asarray(positions, dtype=np.int64)
    dataset = CacheDataset(cache, positions)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples)
    flips = (False, True) if hflip_tta else (False,)
    boxes_out: list[np.ndarray] = []
    scores_out: list[np.ndarray] = []
    if progress:
        progress.start("predict", len(dataset))
    for batch in loader:
        images = network_input(batch["image"], device=device)
        width = images.shape[-1]
        per_image: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(len(images))]
        for model in model_list:
            for flip in flips:
                x = torch.flip(images, dims=[-1]) if flip else images
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
                    detections = model(list(x.unbind(0)))
                for k, detection in enumerate(detections):
                    b = detection["boxes"].float().cpu().numpy().astype(np.float64).reshape(-1, 4)
                    s = detection["scores"].float().cpu().numpy().astype(np.float64).reshape(-1)
                    if flip:
                        b = np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1)
                    per_image[k].append((b, s))
        for k, position in enumerate(batch["position"].tolist()):
            b = np.concatenate([p[0] for p in per_image[k]])
            s = np.concatenate([p[1] for p in per_image[k]])
            order = np.argsort(-s, kind="stable")
            boxes_out.append(cache.boxes_to_original(b[order], position).astype(np.float64))
            scores_out.append(s[order])
        if progress:
            progress.update(len(images))
    if progress:
        progress.close()
    ids = cache.table["patientId"].astype(str).to_numpy()[positions].tolist()
    return BoxPredictions(ids, positions, boxes_out, scores_out, n_sets=len(model_list) * len(flips))


def gt_boxes(cache: PreparedCache, positions: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    """Ground-truth boxes (xyxy, original pixels) of cache positions."""
    column = cache.table["boxes"]
    return [np.asarray(column.iat[int(i)], dtype=np.float64).reshape(-1, 4) for i in positions]


def best_threshold_map(gt: list[np.ndarray], predictions: BoxPredictions) -> tuple[float, float]:
    """(RSNA metric at the best confidence threshold, that threshold) of raw detections."""
    candidates = threshold_candidates(predictions.scores)
    values = rsna_map_by_threshold(gt, predictions.boxes, predictions.scores, candidates)
    if not np.isfinite(values).any():
        return float("nan"), float(candidates[-1])
    k = int(np.nanargmax(values))
    return float(values[k]), float(candidates[k])


# ---------------------------------------------------------------------- training


def detector_positions(cache: PreparedCache, fold: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) cache positions: the cache's train/val split (``fold`` None), or
    the patients of every other fold and those of fold ``fold`` (the cache's ``fold`` column).

    Raises:
        ConfigError: the cache has no fold ``fold``.
        DataFormatError: the split leaves a part without usable patients.
    """
    if fold is None:
        train, val = cache.indices("train"), cache.indices("val")
        if len(train) == 0 or len(val) == 0:
            raise DataFormatError(cache.path, f"the cache's split has {len(train)} train and {len(val)} val patients")
        return train, val
    usable = cache.indices()
    column = pd.to_numeric(cache.table["fold"].iloc[usable], errors="coerce").to_numpy()
    present = sorted({int(v) for v in column[np.isfinite(column)]})
    if fold not in present:
        have = f"folds {present[0]}..{present[-1]}" if present else "no folds"
        raise ConfigError("--fold", f"the cache {cache.path} has {have}, not fold {fold} (made by `prepare --folds K`)")
    val = usable[column == fold]
    train = usable[np.isfinite(column) & (column != fold)]
    if len(train) == 0:
        raise DataFormatError(cache.path, f"no usable patient outside fold {fold} to train on")
    return train, val


class _DetectorTask(TrainingTask):
    """The detector's share of the loop: torchvision loss steps and an RSNA-metric evaluation."""

    label = "detector"

    def __init__(
        self,
        cache: PreparedCache,
        train_positions: np.ndarray,
        val_positions: np.ndarray,
        config: DetectorTrainConfig,
        device: torch.device,
    ) -> None:
        self.cache, self.config, self.device = cache, config, device
        self.train_positions, self.val_positions = train_positions, val_positions
        self.train_dataset = CacheDataset(cache, train_positions)
        self.train_config = config.to_dict()
        self.gt = gt_boxes(cache, val_positions)

    def build_model(self) -> torch.nn.Module:
        config = self.config
        return create_detector(
            config.arch, config.backbone, pretrained=config.pretrained, image_size=config.size or self.cache.size,
            score_thresh=config.score_thresh, detections_per_img=config.detections_per_img,
            trainable_layers=config.trainable_layers, fpn_channels=config.fpn_channels,
        )

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def ddp_options(self) -> dict[str, Any]:
        return {"find_unused_parameters": self.config.trainable_layers is not None}

    def train_step(self, batch: dict[str, Any], step: StepContext) -> dict[str, torch.Tensor]:
        images, targets = prepare_detection_batch(batch, step.device, step.augment)
        losses = detection_losses(step.model, images, targets, amp=step.amp)
        total = losses.pop("total")
        return {"loss": total, **losses}

    def predict_val(self, model: torch.nn.Module) -> BoxPredictions:
        return predict_boxes(
            model, self.cache, self.val_positions, batch_size=self.config.eval_batch_size,
            device=self.device, amp=self.config.amp,
        )

    def evaluate(self, model: torch.nn.Module) -> Evaluation:
        start = time.perf_counter()
        predictions = self.predict_val(model)
        gt = self.gt
        value, threshold = best_threshold_map(gt, predictions)
        all_boxes = rsna_map(gt, predictions.boxes, predictions.scores)
        summary = {
            "val_rsna_map": value,
            "val_score_threshold": threshold,
            "val_rsna_map_all_boxes": all_boxes,
            "val_n": len(gt),
            "val_boxes_per_image": float(np.mean([len(b) for b in predictions.boxes])) if gt else float("nan"),
            "val_seconds": time.perf_counter() - start,
        }
        return Evaluation(summary, value if np.isfinite(value) else -1.0, payload=predictions)

    def describe(self, record: dict[str, Any]) -> str:
        return (f"detector epoch {record['epoch']}: train loss {record.get('train_loss', float('nan')):.4f}, "
                f"val RSNA metric {record['val_rsna_map']:.4f} (score >= {record['val_score_threshold']:.3f})")


def _loop_settings(config: DetectorTrainConfig, device: torch.device) -> LoopSettings:
    return LoopSettings(
        epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, recipe=config.recipe, lr=config.lr,
        weight_decay=config.weight_decay, grad_clip=config.grad_clip, patience=config.patience,
        augment=AugmentConfig(hflip_probability=0.5 if config.hflip else 0.0) if config.augment else None,
        amp=config.amp, channels_last=config.channels_last and device.type == "cuda",  # CUDA only
        num_workers=config.num_workers, max_steps_per_epoch=config.max_steps_per_epoch, ema_decay=config.ema,
    )


def _finish(
    run: DetectorRun, task: _DetectorTask, loop: EpochLoop, best_predictions: BoxPredictions | None, is_main: bool,
    best_score: float,
) -> DetectorTrainResult:
    """Best weights -> validation detections, tuned post-processing, files."""
    best = load_best_weights(run.best_checkpoint, loop.model, task.device)
    # The best epoch's detections when this process trained it; after a resume past it,
    # predicted again with best.pt (the same files either way).
    predictions = best_predictions if best_predictions is not None else task.predict_val(loop.model)
    gt = task.gt
    try:
        postprocess, grid = tune_postprocess(gt, predictions.boxes, predictions.scores)
        tuned_map = float(grid["rsna_map"].iloc[0])
    except ValueError as exc:  # no validation ground truth and no detections at all
        log.warning("post-processing not tuned: %s", exc)
        postprocess, grid, tuned_map = PostprocessConfig(), pd.DataFrame(), float("nan")
    if is_main:
        write_submission(run.val_predictions_path, predictions.patient_ids, predictions.boxes, predictions.scores)
        save_postprocess(
            run.postprocess_path, postprocess, tuned_on="val", n_patients=len(gt),
            val_rsna_map=tuned_map, best_epoch=int(best["epoch"]),
        )
        grid.to_csv(run.path / POSTPROCESS_GRID_FILE, index=False)
        atomic_write_json(
            {"best_epoch": int(best["epoch"]), "best_val_rsna_map": float(best_score),
             "val_rsna_map_postprocessed": tuned_map, "postprocess": postprocess.to_dict(),
             "epochs_run": loop.epoch, "n_val": len(gt)},
            run.path / VAL_SUMMARY_FILE,
        )
    return DetectorTrainResult(run.path, int(best["epoch"]), float(best_score), loop.epoch, postprocess, tuned_map)


def train_detector(
    cache_dir: str | Path,
    run_dir: str | Path,
    config: DetectorTrainConfig | None = None,
    *,
    resume: bool = False,
    progress: Progress | None = None,
) -> DetectorTrainResult:
    """Train the detector on a prepared cache (see the module docstring for the run folder).

    Args:
        cache_dir: a folder made by ``lungopacity prepare``.
        run_dir: the run folder to create, or to continue with ``resume=True``.
        config: training settings; with ``resume`` the run's own config.json is used.
        resume: continue a run that was stopped.
        progress: progress reporter (the CLI passes a progress bar).

    Raises:
        RunExistsError: ``run_dir`` holds a run and ``resume`` is False.
        RunFolderError: ``resume`` without a run to continue.
        ConfigError: bad settings.
        DataFormatError: a cache split without train or val patients.
        CheckpointError: a damaged ``last.pt`` on resume.
    """
    run_dir = Path(run_dir)
    cache = PreparedCache(cache_dir)
    config = run_settings(run_dir, cache, config, resume=resume, default=DetectorTrainConfig)
    config.validate()
    train_positions, val_positions = detector_positions(cache, config.fold)
    device, context, progress = training_context(config.device, progress)
    if context.is_main:
        remove_stale_temp_files(run_dir)

    task = _DetectorTask(cache, train_positions, val_positions, config, device)
    files = LoopFiles(folder=run_dir, metrics=run_dir / METRICS_FILE, fold=None,
                      tensorboard=run_dir / TENSORBOARD_DIR)
    loop = EpochLoop(task, _loop_settings(config, device), files, device=device, context=context, progress=progress)
    run = DetectorRun(
        path=run_dir, train=config, model_config=task.model_config(loop.model), cache=CacheReference.of(cache),
        input_size=cache.size, image_size=config.size or cache.size, n_train=int(len(train_positions)),
        n_train_positive=int((cache.table["Target"].to_numpy()[train_positions] == 1).sum()),
        n_val=int(len(val_positions)),
    )
    if context.is_main and not resume:
        run.save()
    barrier(context)
    result = loop.fit(resume=resume)
    finished = _finish(run, task, loop, result.best_payload, context.is_main, result.best_score)
    if context.is_main:
        log.info(
            "detector run %s: best epoch %d, validation RSNA metric %.4f (raw, best threshold), "
            "%.4f post-processed (%s)",
            run_dir, finished.best_epoch, finished.best_val_map, finished.val_map_postprocessed,
            finished.postprocess.describe(),
        )
    return finished

