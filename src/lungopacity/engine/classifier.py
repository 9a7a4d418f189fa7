"""Training the 3-class classifier: single split or k-fold, resumable, optionally distributed.

A run folder holds

* ``config.json`` — the training settings and the model config (enough to rebuild it);
* ``metrics.jsonl`` — one line per epoch (and fold): losses, AUCs, lr, images/s, the
  share of step time spent waiting for data;
* ``fold_K/last.pt`` — the complete state after the last finished epoch (model,
  optimiser, scheduler, augmentation and RNG state), written atomically;
* ``fold_K/best.pt`` — the weights with the best validation opacity AUC;
* ``fold_K/val_predictions.csv`` — the best model's probabilities on its validation patients;
* ``oof.csv`` — k-fold only: out-of-fold probabilities, every patient exactly once.

A single-split run is ``fold_0`` with the cache's train/val split. Each epoch's shuffle,
augmentation and dropout are seeded from (seed, fold, epoch), so a run killed mid-epoch
and resumed with ``resume=True`` ends in exactly the state of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler

from lungopacity.constants import CLASS_KEYS, CLASS_NAMES, LUNG_OPACITY
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
from lungopacity.io.rsna import assign_folds
from lungopacity.metrics.classification import one_vs_rest_auc, roc_auc
from lungopacity.metrics.classification import softmax as softmax_np
from lungopacity.models.classifier import OpacityClassifier, classifier_from_config, create_classifier

log = logging.getLogger(__name__)

CONFIG_FILE, METRICS_FILE, OOF_FILE = "config.json", "metrics.jsonl", "oof.csv"
PROBABILITY_COLUMNS = tuple(f"p_{key}" for key in CLASS_KEYS)


@dataclass
class ClassifierTrainConfig:
    """Everything that decides a classifier training run."""

    backbone: str = "legacy_xception"
    pretrained: str = "none"
    size: int | None = None  # None: the cache's size; otherwise resized on the device
    epochs: int = 10
    batch_size: int = 16
    recipe: str = "finetune"
    lr: float | None = None
    weight_decay: float | None = None
    folds: int = 1  # 1: the cache's train/val split; K >= 2: K-fold over all patients
    seed: int = 0
    balance: str = "none"  # none | loss (class-weighted) | sampler (class-balanced sampling)
    augment: bool = True
    hflip: bool = False
    grad_clip: float = 5.0
    patience: int = 5  # epochs without a better validation AUC before stopping
    drop_rate: float = 0.2
    label_smoothing: float = 0.0
    amp: bool = True  # CUDA only
    # Also on the CPU: depthwise convolutions (EfficientNet, Xception) train several times
    # faster in channels_last there (BENCHMARKS.md).
    channels_last: bool = True
    device: str = "auto"
    num_workers: int = 0
    max_steps_per_epoch: int | None = None  # bound an epoch (benchmarks, smoke tests)
    eval_batch_size: int = 64

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierTrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    best_auc: float
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
    summary["opacity_auc"] = roc_auc(target, probs[:, LUNG_OPACITY]) if 0 < target.sum() < len(target) else float("nan")
    abnormal = (labels != 0).astype(int)
    summary["abnormal_auc"] = roc_auc(abnormal, 1.0 - probs[:, 0]) if 0 < abnormal.sum() < len(abnormal) else float("nan")
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



def _fold_positions(cache: PreparedCache, config: ClassifierTrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    usable = cache.indices()
    if config.folds <= 1:
        train, val = cache.indices("train"), cache.indices("val")
        if len(val) == 0 or len(train) == 0:
            raise ValueError(f"{cache.path}: the cache's split has {len(train)} train and {len(val)} val patients")
        return [(train, val)]
    table = cache.table.iloc[usable]
    folds = assign_folds(table, k=config.folds, seed=config.seed).to_numpy()
    return [(usable[folds != k], usable[folds == k]) for k in range(config.folds)]



def _rewrite_metrics(path: Path, history: list[dict[str, Any]], fold: int) -> None:
    """On resume: keep other folds' lines and this fold's lines up to the checkpoint."""
    kept = []
    if path.exists():
        kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in kept if r.get("fold") != fold]
    with open(path, "w") as handle:
        for record in kept + history:
            handle.write(json.dumps(record) + "\n")


# -------------------------------------------------------------------- one fold


class _FoldTrainer(ResumableTrainer):
    def __init__(
        self,
        run_dir: Path,
        fold: int,
        cache: PreparedCache,
        train_positions: np.ndarray,
        val_positions: np.ndarray,
        config: ClassifierTrainConfig,
        device: torch.device,
        context: DistributedContext,
        progress: Progress,
    ) -> None:
        self.run_dir, self.fold, self.cache = run_dir, fold, cache
        self.fold_dir = run_dir / f"fold_{fold}"
        self.train_positions, self.val_positions = train_positions, val_positions
        self.config, self.device, self.context, self.progress = config, device, context, progress
        self.use_cuda_extras = device.type == "cuda"
        seed_everything(epoch_seed(config.seed, -1, fold))
        self.model = create_classifier(
            config.backbone, pretrained=config.pretrained, num_classes=len(CLASS_NAMES), in_chans=1,
            drop_rate=config.drop_rate,
        ).to(device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_model: torch.nn.Module = self.model
        if context.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.dataset = CacheDataset(cache, train_positions)
        steps = len(self.dataset) // (config.batch_size * context.world_size)
        steps = max(steps, 1)
        if config.max_steps_per_epoch:
            steps = min(steps, config.max_steps_per_epoch)
        self.steps_per_epoch = steps
        self.optimizer = build_optimizer(config.recipe, self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = build_scheduler(config.recipe, self.optimizer, steps_per_epoch=steps, epochs=config.epochs)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_cuda_extras and config.amp)
        augment_config = AugmentConfig(hflip_probability=0.5 if config.hflip else 0.0)
        self.augment = BatchAugment(augment_config) if config.augment else None
        weights = _class_weights(self.dataset.labels) if config.balance == "loss" else None
        self.loss_weights = weights.to(device) if weights is not None else None
        self.init_bookkeeping()

    # -- state
    # -- loader
    def _loader(self, epoch: int) -> DataLoader:
        seed = epoch_seed(self.config.seed, epoch, self.fold)
        generator = torch.Generator().manual_seed(seed)
        num_samples = self.steps_per_epoch * self.config.batch_size
        if self.context.enabled:
            sampler: Any = DistributedSampler(
                self.dataset, num_replicas=self.context.world_size, rank=self.context.rank, shuffle=True,
                seed=self.config.seed, drop_last=True,
            )
            sampler.set_epoch(epoch)
        elif self.config.balance == "sampler":
            per_class = np.bincount(self.dataset.labels, minlength=len(CLASS_NAMES)).astype(np.float64)
            weights = 1.0 / np.maximum(per_class[self.dataset.labels], 1)
            sampler = WeightedRandomSampler(weights.tolist(), num_samples=num_samples, replacement=True, generator=generator)
        else:
            sampler = RandomSampler(self.dataset, num_samples=min(num_samples, len(self.dataset)), generator=generator)
        return DataLoader(
            self.dataset, batch_size=self.config.batch_size, sampler=sampler, drop_last=True,
            collate_fn=collate_samples, num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )

    # -- one epoch
    def train_epoch(self) -> dict[str, Any]:
        epoch = self.epoch
        seed = epoch_seed(self.config.seed, epoch, self.fold)
        torch.manual_seed(seed)  # dropout of this epoch
        if self.augment:
            self.augment.generator.manual_seed(seed + 1)
        self.train_model.train()
        loader = self._loader(epoch)
        total_loss, seen, wait_time = 0.0, 0, 0.0
        epoch_lr = self.optimizer.param_groups[0]["lr"]  # the lr of this epoch's first step
        start = time.perf_counter()
        if self.context.is_main:
            self.progress.start(f"fold {self.fold} epoch {epoch + 1}/{self.config.epochs}", self.steps_per_epoch)
        iterator = iter(loader)
        for step in range(self.steps_per_epoch):
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            wait_time += time.perf_counter() - t0
            x = network_input(batch["image"], size=self.config.size, device=self.device, channels_last=self.config.channels_last)
            if self.augment:
                x, _ = self.augment(x)
            y = batch["label"].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_cuda_extras and self.config.amp):
                logits = self.train_model(x)
                loss = F.cross_entropy(logits.float(), y, weight=self.loss_weights, label_smoothing=self.config.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.config.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total_loss += float(loss.detach()) * len(y)
            seen += len(y)
            if self.context.is_main:
                elapsed = time.perf_counter() - start
                self.progress.update(1, loss=f"{total_loss / seen:.4f}", img_s=f"{seen * self.context.world_size / elapsed:.1f}")
        if self.context.is_main:
            self.progress.close()
        seconds = time.perf_counter() - start
        return {
            "lr": epoch_lr,
            "train_loss": total_loss / max(seen, 1),
            "images_per_s": seen * self.context.world_size / max(seconds, 1e-9),
            "data_wait_fraction": wait_time / max(seconds, 1e-9),
            "train_seconds": seconds,
        }

    def evaluate(self) -> tuple[dict[str, Any], np.ndarray]:
        logits = predict_logits(
            self.model, self.cache, self.val_positions, size=self.config.size,
            batch_size=self.config.eval_batch_size, device=self.device,
        )
        labels = self.cache.table["class"].to_numpy()[self.val_positions]
        probs = softmax_np(logits)
        loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()) if len(labels) else float("nan")
        summary = classification_summary(labels, probs)
        summary["val_loss"] = loss
        return summary, logits

    def run(self) -> FoldResult:
        config = self.config
        last_path, best_path = self.fold_dir / "last.pt", self.fold_dir / "best.pt"
        metrics_path = self.run_dir / METRICS_FILE
        while self.epoch < config.epochs and not self.finished:
            train_stats = self.train_epoch()
            summary, logits = self.evaluate()
            auc = summary["opacity_auc"]
            auc_for_selection = auc if np.isfinite(auc) else -summary["val_loss"]
            improved = auc_for_selection > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.epochs_since_best = auc_for_selection, self.epoch, 0
            else:
                self.epochs_since_best += 1
            record = {
                "fold": self.fold,
                "epoch": self.epoch + 1,
                **train_stats,
                **{f"val_{k}" if not k.startswith("val_") else k: v for k, v in summary.items()},
            }
            self.history.append(record)
            self.epoch += 1
            stop = self.epochs_since_best >= config.patience
            stop = broadcast_flag(stop, self.context)
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
                    "fold %d epoch %d: train loss %.4f, val loss %.4f, opacity AUC %.4f, %.1f img/s%s",
                    self.fold, self.epoch, record["train_loss"], summary["val_loss"], auc, record["images_per_s"],
                    " (best)" if improved else "",
                )
            barrier(self.context)
            if stop:
                log.info("fold %d: early stop after %d epochs without a better validation AUC", self.fold, config.patience)
        if self.context.enabled:
            # The trained weights, before finish() loads best.pt: what DDP must keep equal across ranks.
            _write_ddp_digest(self.run_dir, self.fold, self.model, self.context)
        return self.finish()

    def finish(self) -> FoldResult:
        best = load_checkpoint(self.fold_dir / "best.pt", map_location=self.device)
        self.model.load_state_dict(best["model"])
        _, logits = self.evaluate()
        probs = softmax_np(logits)
        table = self.cache.table.iloc[self.val_positions]
        predictions = pd.DataFrame({"patientId": table["patientId"].to_numpy(), "fold": self.fold})
        for k, column in enumerate(PROBABILITY_COLUMNS):
            predictions[column] = probs[:, k]
        for k in range(len(CLASS_NAMES)):
            predictions[f"logit_{CLASS_KEYS[k]}"] = logits[:, k]
        predictions["class"] = table["class"].to_numpy()
        predictions["Target"] = table["Target"].to_numpy()
        if self.context.is_main:
            predictions.to_csv(self.fold_dir / "val_predictions.csv", index=False)
        return FoldResult(self.fold, best["epoch"], float(self.best_score), self.epoch, predictions)


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
    """
    run_dir = Path(run_dir)
    cache = PreparedCache(cache_dir)
    config_path = run_dir / CONFIG_FILE
    if resume:
        if not config_path.exists():
            raise FileNotFoundError(f"{run_dir}: nothing to resume (no {CONFIG_FILE})")
        saved = json.loads(config_path.read_text())
        config = ClassifierTrainConfig.from_dict(saved["train"])
    else:
        config = config or ClassifierTrainConfig()
        if config_path.exists():
            raise FileExistsError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    if config.balance not in ("none", "loss", "sampler"):
        raise ValueError(f"balance must be none, loss or sampler, got {config.balance!r}")
    device = resolve_device(config.device)
    context = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    progress = progress if (progress is not None and context.is_main) else SilentProgress()
    folds = _fold_positions(cache, config)

    results: list[FoldResult] = []
    for fold, (train_positions, val_positions) in enumerate(folds):
        trainer = _FoldTrainer(run_dir, fold, cache, train_positions, val_positions, config, device, context, progress)
        if fold == 0 and context.is_main and not resume:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                {
                    "train": config.to_dict(),
                    "model": trainer.model.config(),
                    "cache": {"path": str(cache.path.resolve()), "size": cache.size, "n": len(cache),
                              "patients_hash": cache.meta.get("patients_hash")},
                    "folds": len(folds),
                    "input_size": config.size or cache.size,
                    "class_names": list(CLASS_NAMES),
                },
                config_path,
            )
        barrier(context)
        last = run_dir / f"fold_{fold}" / "last.pt"
        if resume and last.exists():
            trainer.load_state(load_checkpoint(last, map_location=device))
            _rewrite_metrics(run_dir / METRICS_FILE, trainer.history, fold) if context.is_main else None
            log.info("fold %d: resuming after epoch %d", fold, trainer.epoch)
        results.append(trainer.run())

    oof_path = None
    if len(folds) > 1 and context.is_main:
        oof = pd.concat([r.val_predictions for r in results], ignore_index=True)
        oof_path = run_dir / OOF_FILE
        oof.to_csv(oof_path, index=False)
    all_predictions = pd.concat([r.val_predictions for r in results], ignore_index=True)
    summary = classification_summary(
        all_predictions["class"].to_numpy(), all_predictions[list(PROBABILITY_COLUMNS)].to_numpy()
    )
    if context.is_main:
        atomic_write_json(summary, run_dir / "val_summary.json")
    log.info("classifier run %s: validation opacity AUC %.4f over %d patients", run_dir, summary["opacity_auc"], summary["n"])
    return TrainResult(run_dir, results, oof_path, summary)


def _write_ddp_digest(run_dir: Path, fold: int, model: torch.nn.Module, context: DistributedContext) -> None:
    """Each rank records a digest of its trained parameters: after DDP training they must be equal.

    Parameters only: BatchNorm running statistics are buffers that each rank updates from
    its own shard after DDP's start-of-forward broadcast, so they legitimately differ.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    path = run_dir / f"fold_{fold}" / f"weights_digest_rank{context.rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(digest.hexdigest())


# --------------------------------------------------------------- loading runs


def load_run_models(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[list[OpacityClassifier], dict[str, Any]]:
    """The best model of every fold of a run, and the run's config."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a classifier run (no {CONFIG_FILE})")
    config = json.loads(config_path.read_text())
    models = []
    for fold in range(int(config["folds"])):
        path = run_dir / f"fold_{fold}" / "best.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; the run did not finish fold {fold} (train with --resume)")
        checkpoint = load_checkpoint(path, map_location=device)
        model = classifier_from_config(checkpoint["model_config"])
        model.load_state_dict(checkpoint["model"])
        models.append(model.to(device).eval())
    return models, config
