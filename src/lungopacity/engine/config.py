"""The settings of the classifier and detector training runs, as typed dataclasses.

They live apart from the trainers so that the run-folder types (:mod:`.runs`) can read
them without importing a training loop. ``to_dict`` / ``from_dict`` are what a run's
``config.json`` holds under ``"train"``; ``from_dict`` ignores keys it does not know (a
run written by a newer version) and fills missing ones with today's defaults (an older
run), so old run folders keep loading.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from lungopacity.errors import ConfigError
from lungopacity.models.detector import ARCHITECTURES, DEFAULT_BACKBONE

T = TypeVar("T")

BALANCE_MODES = ("none", "loss", "sampler")
SELECT_MODES = ("best", "last")


class _DictForm:
    """``to_dict`` / ``from_dict`` of a config dataclass (unknown keys ignored, missing ones defaulted)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})


def _check_choice(option: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(option, f"must be one of {', '.join(choices)}, got {value!r}")


def _check_common(config: Any) -> None:
    if config.epochs < 1:
        raise ConfigError("--epochs", f"must be >= 1, got {config.epochs}")
    if config.batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {config.batch_size}")
    if config.patience < 1:
        raise ConfigError("--patience", f"must be >= 1, got {config.patience}")
    if config.grad_clip < 0:
        raise ConfigError("--grad-clip", f"must be >= 0 (0 disables), got {config.grad_clip}")
    if config.max_steps_per_epoch is not None and config.max_steps_per_epoch < 1:
        raise ConfigError("--max-steps-per-epoch", f"must be >= 1, got {config.max_steps_per_epoch}")
    if config.recipe not in ("paper", "finetune"):
        raise ConfigError("--recipe", f"must be paper or finetune, got {config.recipe!r}")
    if not 0.0 <= config.ema < 1.0:
        raise ConfigError("--ema", f"must be in [0, 1) (0 disables), got {config.ema}")


@dataclass
class ClassifierTrainConfig(_DictForm):
    """Everything that decides a classifier training run."""

    backbone: str = "legacy_xception"
    pretrained: str = "none"
    size: int | None = None  # None: the cache's size; otherwise resized on the device
    epochs: int = 10
    batch_size: int = 16
    recipe: str = "finetune"
    lr: float | None = None
    weight_decay: float | None = None
    # 1: the cache's train/val split; K >= 2: the cache's K folds (written by `prepare --folds K`)
    folds: int = 1
    seed: int = 0
    balance: str = "none"  # none | loss (class-weighted) | sampler (class-balanced sampling)
    augment: bool = True
    hflip: bool = False
    grad_clip: float = 5.0
    patience: int = 5  # epochs without a better validation AUC before stopping
    drop_rate: float = 0.2
    label_smoothing: float = 0.0
    # Weight of the box-supervised activation-map loss (engine.classifier.box_map_loss):
    # the head's opacity map at each location is trained against the share of it inside
    # a box. 0 disables it.
    box_supervision: float = 0.0
    # Mixup's Beta(alpha, alpha) (engine.classifier.mixup_batch); 0 disables it.
    mixup: float = 0.0
    # best: each fold keeps its epoch with the best validation opacity AUC (chosen on the
    # patients whose probabilities then enter oof.csv: optimistic); last: its final epoch
    # (no early stopping either), so the held-out probabilities choose nothing.
    select: str = "best"
    # Per-step decay of an exponential moving average of the weights (engine.loop.WeightAverage),
    # which each epoch then evaluates and best.pt keeps; 0 disables it.
    ema: float = 0.0
    # The backbone's learning rate as a share of the head's (the final linear layer):
    # below 1 the pretrained features move less than the fresh head. 1: one rate for all.
    backbone_lr_scale: float = 1.0
    # Stochastic depth: the share of residual blocks dropped per sample in training, rising
    # linearly with depth to this value (timm's drop_path_rate); 0 disables it.
    drop_path: float = 0.0
    # Keep every batch-norm layer's running statistics at the pretrained values (the layers
    # normalise with them in training too; their scale and shift still learn): small batches
    # of one domain then cannot pull them away. Without batch statistics the layers feel the
    # scale of the weights again: the recipe's rate is then too high (BENCHMARKS.md).
    freeze_bn: bool = False
    amp: bool = True  # CUDA only
    # Also on the CPU: depthwise convolutions (EfficientNet, Xception) train several times
    # faster in channels_last there (BENCHMARKS.md).
    channels_last: bool = True
    device: str = "auto"
    num_workers: int = 0
    max_steps_per_epoch: int | None = None  # bound an epoch (benchmarks, smoke tests)
    eval_batch_size: int = 64

    def validate(self) -> None:
        """Raise :class:`ConfigError` (naming the option) for a value training cannot use."""
        _check_common(self)
        _check_choice("--balance", self.balance, BALANCE_MODES)
        _check_choice("--select", self.select, SELECT_MODES)
        if self.folds < 1:
            raise ConfigError("--folds", f"must be >= 1, got {self.folds}")
        if not self.box_supervision >= 0:
            raise ConfigError("--box-supervision", f"must be >= 0 (0 disables), got {self.box_supervision}")
        if not self.mixup >= 0:
            raise ConfigError("--mixup", f"must be >= 0 (0 disables), got {self.mixup}")
        if not self.backbone_lr_scale > 0:
            raise ConfigError("--backbone-lr-scale", f"must be > 0 (1: one rate for all), got {self.backbone_lr_scale}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError("--drop-path", f"must be in [0, 1) (0 disables), got {self.drop_path}")
        if self.freeze_bn and self.pretrained == "none":
            raise ConfigError("--freeze-bn", "needs --pretrained weights: a fresh network has no statistics to keep")


@dataclass
class DetectorTrainConfig(_DictForm):
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
    # None: the cache's train/val split; K: validate on the cache's fold K (its ``fold``
    # column, written by `prepare --folds N`) and train on the other folds
    fold: int | None = None
    seed: int = 0
    augment: bool = True
    hflip: bool = False
    grad_clip: float = 10.0
    patience: int = 5  # epochs without a better validation metric before stopping
    fpn_channels: int = 128
    trainable_layers: int | None = None  # backbone levels that train (None: all)
    score_thresh: float = 0.05  # lowest raw detection score kept (post-processing tunes the real one)
    detections_per_img: int = 8
    ema: float = 0.0  # as ClassifierTrainConfig.ema
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    device: str = "auto"
    num_workers: int = 0
    max_steps_per_epoch: int | None = None  # bound an epoch (benchmarks, smoke tests)
    eval_batch_size: int = 16

    def validate(self) -> None:
        """Raise :class:`ConfigError` (naming the option) for a value training cannot use."""
        _check_common(self)
        _check_choice("--arch", self.arch, tuple(ARCHITECTURES))
        if self.fold is not None and self.fold < 0:
            raise ConfigError("--fold", f"must be >= 0, got {self.fold}")
