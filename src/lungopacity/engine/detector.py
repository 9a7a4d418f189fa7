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
* ``best.pt`` — the weights with the best validation RSNA metric;
* ``val_predictions.csv`` — the best model's raw detections on the validation patients,
  in the submission format (original pixels);
* ``postprocess.json`` / ``postprocess_grid.csv`` — the post-processing tuned on those
  predictions (:mod:`lungopacity.postprocess`; no gating: the classifier is not
  part of this run) and every setting tried.

Each epoch's shuffle, augmentation and randomness are seeded from (seed, epoch), so a run
killed mid-epoch and resumed with ``resume=True`` ends in the state of an uninterrupted run.
On CUDA the model trains with automatic mixed precision and channels-last weights.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from lungopacity.data.cache import PreparedCache
from lungopacity.data.datasets import CacheDataset, collate_samples
from lungopacity.data.preprocess import network_input
from lungopacity.data.transforms import AugmentConfig, BatchAugment
from lungopacity.engine.checkpoint import (
    atomic_torch_save,
    atomic_write_json,
    load_checkpoint,
    seed_everything,
)
from lungopacity.engine.common import (
    DistributedContext,
    Progress,
    ResumableTrainer,
    SilentProgress,
    append_jsonl,
    barrier,
    broadcast_flag,
    build_optimizer,
    build_scheduler,
    epoch_seed,
    init_distributed,
    resolve_device,
)
from lungopacity.postprocess import (
    PostprocessConfig,
    load_postprocess,
    rsna_map_by_threshold,
    save_postprocess,
    threshold_candidates,
    tune_postprocess,
)
from lungopacity.io.submission import write_submission
from lungopacity.metrics.rsna_map import rsna_map
from lungopacity.models.detector import (
    ARCHITECTURES,
    DEFAULT_BACKBONE,
    OPACITY_LABEL,
    OpacityDetector,
    create_detector,
    detector_from_config,
)

log = logging.getLogger(__name__)

CONFIG_FILE, METRICS_FILE = "config.json", "metrics.jsonl"
LAST_FILE, BEST_FILE = "last.pt", "best.pt"
VAL_PREDICTIONS_FILE, POSTPROCESS_FILE, POSTPROCESS_GRID_FILE = (
    "val_predictions.csv",
    "postprocess.json",
    "postprocess_grid.csv",
)
RUN_KIND = "detector"


@dataclass
class DetectorTrainConfig:
    """Everything that decides a detector training run."""

    arch: str = "retinanet"  # retinanet | fasterrcnn
    backbone: str = DEFAULT_BACKBONE
    pretrained: str = "none"  # none | efficientnet-lite0 (offline) | timm (online) | PATH
    size: int | None = None  # the detector's image_size; None: the cache's size
    epochs: int = 12
    batch_size: int = 8
    recipe: str = "finetune"  # see engine.common.build_optimizer
    lr: float | None = 3e-4  # None: the recipe's default
    weight_decay: float | None = None
    seed: int = 0
    augment: bool = True
    hflip: bool = False
    grad_clip: float = 10.0
    patience: int = 5  # epochs without a better validation metric before stopping
    fpn_channels: int = 128
    trainable_layers: int | None = None  # backbone levels that train (None: all)
    score_thresh: float = 0.05  # lowest raw detection score kept (post-processing tunes the real one)
    detections_per_img: int = 8
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    device: str = "auto"
    num_workers: int = 0
    max_steps_per_epoch: int | None = None  # bound an epoch (benchmarks, smoke tests)
    eval_batch_size: int = 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorTrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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


@dataclass
class DetectorRun:
    """A trained detector with what it needs at prediction time."""

    run_dir: Path
    model: OpacityDetector
    config: dict[str, Any]
    postprocess: PostprocessConfig


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


class _DetectorTrainer(ResumableTrainer):
    def __init__(
        self,
        run_dir: Path,
        cache: PreparedCache,
        train_positions: np.ndarray,
        val_positions: np.ndarray,
        config: DetectorTrainConfig,
        device: torch.device,
        context: DistributedContext,
        progress: Progress,
    ) -> None:
        self.run_dir, self.cache = run_dir, cache
        self.train_positions, self.val_positions = train_positions, val_positions
        self.config, self.device, self.context, self.progress = config, device, context, progress
        self.use_cuda_extras = device.type == "cuda"
        seed_everything(epoch_seed(config.seed, -1))
        self.model = create_detector(
            config.arch, config.backbone, pretrained=config.pretrained, image_size=config.size or cache.size,
            score_thresh=config.score_thresh, detections_per_img=config.detections_per_img,
            trainable_layers=config.trainable_layers, fpn_channels=config.fpn_channels,
        ).to(device)
        if self.use_cuda_extras and config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_model: torch.nn.Module = self.model
        if context.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=config.trainable_layers is not None,
            )
        self.dataset = CacheDataset(cache, train_positions)
        self.batch_size = max(1, min(config.batch_size, len(self.dataset) // context.world_size))
        steps = max(len(self.dataset) // (self.batch_size * context.world_size), 1)
        if config.max_steps_per_epoch:
            steps = min(steps, config.max_steps_per_epoch)
        self.steps_per_epoch = steps
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config.recipe, parameters, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = build_scheduler(config.recipe, self.optimizer, steps_per_epoch=steps, epochs=config.epochs)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_cuda_extras and config.amp)
        augment_config = AugmentConfig(hflip_probability=0.5 if config.hflip else 0.0)
        self.augment = BatchAugment(augment_config) if config.augment else None
        self.init_bookkeeping()
        # The best epoch's validation detections, kept so finish() need not predict again
        # (absent after a resume: then finish() predicts with best.pt).
        self.best_predictions: BoxPredictions | None = None

    # -- state
    # -- loader
    def _loader(self, epoch: int) -> DataLoader:
        seed = epoch_seed(self.config.seed, epoch)
        if self.context.enabled:
            sampler: Any = DistributedSampler(
                self.dataset, num_replicas=self.context.world_size, rank=self.context.rank, shuffle=True,
                seed=self.config.seed, drop_last=True,
            )
            sampler.set_epoch(epoch)
        else:
            generator = torch.Generator().manual_seed(seed)
            num_samples = min(self.steps_per_epoch * self.batch_size, len(self.dataset))
            sampler = RandomSampler(self.dataset, num_samples=num_samples, generator=generator)
        return DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
            collate_fn=collate_samples, num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )

    # -- one epoch
    def train_epoch(self) -> dict[str, Any]:
        epoch = self.epoch
        seed = epoch_seed(self.config.seed, epoch)
        torch.manual_seed(seed)
        if self.augment:
            self.augment.generator.manual_seed(seed + 1)
        self.train_model.train()
        loader = self._loader(epoch)
        sums: dict[str, float] = {}
        seen, steps_done, skipped, wait_time = 0, 0, 0, 0.0
        start = time.perf_counter()
        if self.context.is_main:
            self.progress.start(f"detector epoch {epoch + 1}/{self.config.epochs}", self.steps_per_epoch)
        iterator = iter(loader)
        for _ in range(self.steps_per_epoch):
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            wait_time += time.perf_counter() - t0
            images, targets = prepare_detection_batch(batch, self.device, self.augment)
            losses = detection_losses(self.train_model, images, targets, amp=self.config.amp)
            loss = losses["total"]
            if not torch.isfinite(loss):
                # A diverging batch must not poison the weights; the epoch goes on without it.
                skipped += 1
                log.warning("epoch %d: non-finite detector loss (%s); step skipped", epoch + 1,
                            {k: float(v) for k, v in losses.items()})
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.config.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(images)
            seen += len(images)
            steps_done += 1
            if self.context.is_main:
                elapsed = time.perf_counter() - start
                self.progress.update(1, loss=f"{sums['total'] / seen:.4f}",
                                     img_s=f"{seen * self.context.world_size / elapsed:.1f}")
        if self.context.is_main:
            self.progress.close()
        if steps_done == 0 and skipped:
            raise FloatingPointError(
                f"epoch {epoch + 1}: every step had a non-finite loss; lower --lr or check the data"
            )
        seconds = time.perf_counter() - start
        record = {f"train_{name}" if name != "total" else "train_loss": total / max(seen, 1)
                  for name, total in sums.items()}
        record.update({
            "images_per_s": seen * self.context.world_size / max(seconds, 1e-9),
            "data_wait_fraction": wait_time / max(seconds, 1e-9),
            "train_seconds": seconds,
            "skipped_steps": skipped,
        })
        return record

    def predict_val(self) -> BoxPredictions:
        return predict_boxes(
            self.model, self.cache, self.val_positions, batch_size=self.config.eval_batch_size,
            device=self.device, amp=self.config.amp,
        )

    def evaluate(self) -> tuple[dict[str, Any], BoxPredictions]:
        start = time.perf_counter()
        predictions = self.predict_val()
        gt = gt_boxes(self.cache, self.val_positions)
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
        return summary, predictions

    def run(self) -> None:
        config = self.config
        last_path, best_path = self.run_dir / LAST_FILE, self.run_dir / BEST_FILE
        metrics_path = self.run_dir / METRICS_FILE
        while self.epoch < config.epochs and not self.finished:
            epoch_lr = self.optimizer.param_groups[0]["lr"]  # the lr of this epoch's first step
            train_stats = self.train_epoch()
            summary, predictions = self.evaluate()
            value = summary["val_rsna_map"]
            selection = value if np.isfinite(value) else -1.0
            improved = selection > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.epochs_since_best = selection, self.epoch, 0
                self.best_predictions = predictions
            else:
                self.epochs_since_best += 1
            record = {"epoch": self.epoch + 1, "lr": epoch_lr, **train_stats, **summary}
            self.history.append(record)
            self.epoch += 1
            stop = broadcast_flag(self.epochs_since_best >= config.patience, self.context)
            self.finished = stop or self.epoch >= config.epochs
            if self.context.is_main:
                if improved:
                    atomic_torch_save(
                        {"model": self.model.state_dict(), "model_config": self.model.config(), "epoch": self.epoch,
                         "metrics": record, "train_config": config.to_dict()},
                        best_path,
                    )
                atomic_torch_save(self.state(), last_path)
                append_jsonl(metrics_path, record)
                log.info(
                    "detector epoch %d: train loss %.4f, val RSNA metric %.4f (score >= %.3f), %.1f img/s%s",
                    self.epoch, record.get("train_loss", float("nan")), value, summary["val_score_threshold"],
                    record["images_per_s"], " (best)" if improved else "",
                )
            barrier(self.context)
            if stop:
                log.info("detector: early stop after %d epochs without a better validation metric", config.patience)

    def finish(self) -> DetectorTrainResult:
        """Best weights -> validation detections, tuned post-processing, files."""
        best = load_checkpoint(self.run_dir / BEST_FILE, map_location=self.device)
        self.model.load_state_dict(best["model"])
        predictions = self.best_predictions if self.best_predictions is not None else self.predict_val()
        gt = gt_boxes(self.cache, self.val_positions)
        try:
            postprocess, grid = tune_postprocess(gt, predictions.boxes, predictions.scores)
            tuned_map = float(grid["rsna_map"].iloc[0])
        except ValueError as exc:  # no validation ground truth and no detections at all
            log.warning("post-processing not tuned: %s", exc)
            postprocess, grid, tuned_map = PostprocessConfig(), pd.DataFrame(), float("nan")
        if self.context.is_main:
            write_submission(self.run_dir / VAL_PREDICTIONS_FILE, predictions.patient_ids, predictions.boxes,
                             predictions.scores)
            save_postprocess(
                self.run_dir / POSTPROCESS_FILE, postprocess, tuned_on="val", n_patients=len(gt),
                val_rsna_map=tuned_map, best_epoch=int(best["epoch"]),
            )
            grid.to_csv(self.run_dir / POSTPROCESS_GRID_FILE, index=False)
            atomic_write_json(
                {"best_epoch": int(best["epoch"]), "best_val_rsna_map": float(self.best_score),
                 "val_rsna_map_postprocessed": tuned_map, "postprocess": postprocess.to_dict(),
                 "epochs_run": self.epoch, "n_val": len(gt)},
                self.run_dir / "val_summary.json",
            )
        return DetectorTrainResult(self.run_dir, int(best["epoch"]), float(self.best_score), self.epoch, postprocess,
                                   tuned_map)


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
        FileExistsError: ``run_dir`` holds a run and ``resume`` is False.
        FileNotFoundError: ``resume`` without a run to continue.
        ValueError: bad settings, or a cache split without train or val patients.
    """
    run_dir = Path(run_dir)
    cache = PreparedCache(cache_dir)
    config_path = run_dir / CONFIG_FILE
    if resume:
        if not config_path.exists():
            raise FileNotFoundError(f"{run_dir}: nothing to resume (no {CONFIG_FILE})")
        config = DetectorTrainConfig.from_dict(json.loads(config_path.read_text())["train"])
    else:
        config = config or DetectorTrainConfig()
        if config_path.exists():
            raise FileExistsError(
                f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out"
            )
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {config.arch!r}")
    train_positions, val_positions = cache.indices("train"), cache.indices("val")
    if len(train_positions) == 0 or len(val_positions) == 0:
        raise ValueError(f"{cache.path}: the cache's split has {len(train_positions)} train and "
                         f"{len(val_positions)} val patients")
    device = resolve_device(config.device)
    context = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    progress = progress if (progress is not None and context.is_main) else SilentProgress()

    trainer = _DetectorTrainer(run_dir, cache, train_positions, val_positions, config, device, context, progress)
    if context.is_main and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        n_positive = int((cache.table["Target"].to_numpy()[train_positions] == 1).sum())
        atomic_write_json(
            {
                "kind": RUN_KIND,
                "train": config.to_dict(),
                "model": trainer.model.config(),
                "cache": {"path": str(cache.path.resolve()), "size": cache.size, "n": len(cache),
                          "patients_hash": cache.meta.get("patients_hash")},
                "n_train": int(len(train_positions)),
                "n_train_positive": n_positive,
                "n_val": int(len(val_positions)),
                "input_size": cache.size,
                "image_size": config.size or cache.size,
            },
            config_path,
        )
    barrier(context)
    last = run_dir / LAST_FILE
    if resume and last.exists():
        trainer.load_state(load_checkpoint(last, map_location=device))
        if context.is_main:
            with open(run_dir / METRICS_FILE, "w") as handle:
                for record in trainer.history:
                    handle.write(json.dumps(record) + "\n")
        log.info("detector: resuming after epoch %d", trainer.epoch)
    trainer.run()
    result = trainer.finish()
    if context.is_main:
        log.info(
            "detector run %s: best epoch %d, validation RSNA metric %.4f (raw, best threshold), "
            "%.4f post-processed (%s)",
            run_dir, result.best_epoch, result.best_val_map, result.val_map_postprocessed, result.postprocess.describe(),
        )
    return result


# --------------------------------------------------------------- loading runs


def load_detector_run(run_dir: str | Path, device: str | torch.device = "cpu") -> DetectorRun:
    """The best detector of a run (eval mode), its config and its tuned post-processing.

    Raises:
        FileNotFoundError: not a detector run, or no best.pt yet.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a detector run (no {CONFIG_FILE})")
    config = json.loads(config_path.read_text())
    if config.get("kind") != RUN_KIND:
        kind = config.get("kind", "another model")
        raise FileNotFoundError(f"{run_dir}: not a detector run (its config.json is for {kind!r})")
    best_path = run_dir / BEST_FILE
    if not best_path.exists():
        raise FileNotFoundError(f"{best_path}: missing; the run has not finished an epoch (train with --resume)")
    checkpoint = load_checkpoint(best_path, map_location=device)
    model = detector_from_config(checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    postprocess_path = run_dir / POSTPROCESS_FILE
    if postprocess_path.exists():
        postprocess = load_postprocess(postprocess_path)
    else:
        log.warning("%s: no %s (training did not finish); using no post-processing", run_dir, POSTPROCESS_FILE)
        postprocess = PostprocessConfig()
    return DetectorRun(run_dir, model, config, postprocess)
