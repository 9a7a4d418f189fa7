"""Training run folders as types: the one place that writes and reads their ``config.json``.

A **classifier run** (``train_classifier``)::

    RUN/config.json              kind "classifier", train, model, cache, folds, input_size, class_names
    RUN/metrics.jsonl            one line per fold and epoch
    RUN/fold_K/best.pt           the selected weights of fold K (best or last epoch, see --select)
    RUN/fold_K/last.pt           the complete training state after the last finished epoch
    RUN/fold_K/val_predictions.csv   fold K's selected model on its validation patients (with logits)
    RUN/oof.csv                  k-fold: every patient once, from the fold model that did not train on it
    RUN/val_summary.json, RUN/tensorboard/ (optional)

A **detector run** (``train_detector``)::

    RUN/config.json              kind "detector", train, model, cache, input_size, image_size, n_train ...
    RUN/metrics.jsonl, RUN/best.pt, RUN/last.pt
    RUN/val_predictions.csv      raw detections of best.pt on the validation split (submission format)
    RUN/postprocess.json         the post-processing tuned on them (+ postprocess_grid.csv)

:func:`load_classifier_run` and :func:`load_detector_run` check the folder and return a
:class:`ClassifierRun` / :class:`DetectorRun`; anything missing, damaged or of the other
kind raises :class:`~lungopacity.errors.RunFolderError` (one line naming the file).
Classifier runs written before ``kind`` existed load as classifier runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch

from lungopacity.constants import CLASS_KEYS, CLASS_NAMES
from lungopacity.data.cache import PreparedCache
from lungopacity.engine.checkpoint import atomic_write_json, to_plain
from lungopacity.engine.config import ClassifierTrainConfig, DetectorTrainConfig
from lungopacity.engine.loop import BEST_FILE, LAST_FILE, load_best_model
from lungopacity.postprocess import PostprocessConfig, load_postprocess
from lungopacity.errors import ConfigError, RunExistsError, RunFolderError
from lungopacity.models.classifier import OpacityClassifier, classifier_from_config
from lungopacity.models.detector import OpacityDetector, detector_from_config

log = logging.getLogger(__name__)

CONFIG_FILE, METRICS_FILE, OOF_FILE = "config.json", "metrics.jsonl", "oof.csv"
VAL_PREDICTIONS_FILE, VAL_SUMMARY_FILE = "val_predictions.csv", "val_summary.json"
POSTPROCESS_FILE, POSTPROCESS_GRID_FILE = "postprocess.json", "postprocess_grid.csv"
TENSORBOARD_DIR = "tensorboard"
CLASSIFIER_KIND, DETECTOR_KIND = "classifier", "detector"
PROBABILITY_COLUMNS = tuple(f"p_{key}" for key in CLASS_KEYS)
LOGIT_COLUMNS = tuple(f"logit_{key}" for key in CLASS_KEYS)


TrainConfig = TypeVar("TrainConfig", ClassifierTrainConfig, DetectorTrainConfig)


def _as_device(device: str | torch.device) -> torch.device:
    return torch.device(device)


@dataclass(frozen=True)
class CacheReference:
    """The prepared cache a run trained on, as recorded in its config.json.

    Attributes:
        path: the cache folder (absolute, as it was at training time; it may be gone).
        size: the PREPARED image side S (not the network input size).
        n: patients in the cache's index.
        patients_hash: digest of the cache's patient ids (None for caches that lack it).
        window: the readers' window policy the cache was prepared with (serving repeats it).
    """

    path: Path
    size: int
    n: int
    patients_hash: str | None = None
    window: str = "none"

    @classmethod
    def of(cls, cache: PreparedCache) -> CacheReference:
        return cls(cache.path.resolve(), int(cache.size), len(cache), cache.meta.get("patients_hash"), cache.window)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheReference:
        return cls(Path(str(data["path"])), int(data["size"]), int(data.get("n", 0)), data.get("patients_hash"),
                   str(data.get("window", "none")))

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": self.size, "n": self.n, "patients_hash": self.patients_hash,
                "window": self.window}

    def matches(self, cache: PreparedCache) -> bool:
        """True when ``cache`` holds exactly the patients the run trained on."""
        return self.patients_hash is not None and self.patients_hash == cache.meta.get("patients_hash")


def _read_config(path: Path, kind: str) -> dict[str, Any]:
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise RunFolderError(path, f"not a {kind} run folder (it does not exist or is a file)")
    if not config_path.is_file():
        raise RunFolderError(path, f"not a {kind} run (no {CONFIG_FILE})")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(config_path, f"damaged ({exc})") from None
    if not isinstance(data, dict):
        raise RunFolderError(config_path, "damaged (not a JSON object)")
    found = data.get("kind", CLASSIFIER_KIND)  # classifier runs before format 2 had no kind
    if found != kind:
        raise RunFolderError(path, f"not a {kind} run (its {CONFIG_FILE} is for a {found!r} run)")
    return data


def _require(data: dict[str, Any], keys: tuple[str, ...], config_path: Path) -> None:
    missing = [key for key in keys if key not in data]
    if missing:
        raise RunFolderError(config_path, f"incomplete run config: {', '.join(repr(k) for k in missing)} missing")


def _cache_reference(data: dict[str, Any], config_path: Path) -> CacheReference:
    try:
        return CacheReference.from_dict(data["cache"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RunFolderError(config_path, f"incomplete run config: bad 'cache' entry ({exc})") from None


# ----------------------------------------------------------------------- classifier


@dataclass
class ClassifierRun:
    """A classifier run folder (see the module docstring).

    Attributes:
        path: the run folder.
        train: the training settings.
        model_config: what rebuilds the network (``classifier_from_config``).
        cache: the cache it trained on.
        folds: 1 (the cache's train/val split) or K (the cache's K folds).
        input_size: the network input side (the ``--size`` it trained at, else the cache's).
        class_names: the classes, in output order.
    """

    path: Path
    train: ClassifierTrainConfig
    model_config: dict[str, Any]
    cache: CacheReference
    folds: int
    input_size: int
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    kind: str = CLASSIFIER_KIND

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def is_kfold(self) -> bool:
        return self.folds > 1

    def fold_dir(self, fold: int) -> Path:
        return self.path / f"fold_{fold}"

    @property
    def best_checkpoints(self) -> list[Path]:
        """``fold_K/best.pt`` of every fold, in fold order (they may not exist yet)."""
        return [self.fold_dir(k) / BEST_FILE for k in range(self.folds)]

    @property
    def last_checkpoints(self) -> list[Path]:
        return [self.fold_dir(k) / LAST_FILE for k in range(self.folds)]

    @property
    def oof_path(self) -> Path:
        return self.path / OOF_FILE

    def val_predictions_path(self, fold: int = 0) -> Path:
        return self.fold_dir(fold) / VAL_PREDICTIONS_FILE

    @property
    def held_out_path(self) -> Path:
        """oof.csv for a k-fold run, fold_0/val_predictions.csv for a single split."""
        return self.oof_path if self.is_kfold else self.val_predictions_path(0)

    def to_dict(self) -> dict[str, Any]:
        """The config.json content."""
        return {
            "kind": CLASSIFIER_KIND,
            "train": self.train.to_dict(),
            "model": to_plain(self.model_config),
            "cache": self.cache.to_dict(),
            "folds": int(self.folds),
            "input_size": int(self.input_size),
            "class_names": list(self.class_names),
        }

    def save(self) -> None:
        """Write config.json (atomically)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.to_dict(), self.config_path)

    def load_models(self, device: str | torch.device = "cpu") -> list[OpacityClassifier]:
        """The selected model (best.pt) of every fold, in eval mode on ``device``.

        Raises:
            RunFolderError: a fold has no best.pt (the run did not finish it).
            CheckpointError: a best.pt is damaged or does not fit the model.
        """
        device = _as_device(device)
        models = []
        for fold, path in enumerate(self.best_checkpoints):
            if not path.is_file():
                raise RunFolderError(path, f"missing; the run did not finish fold {fold} (train with --resume)")
            model, _ = load_best_model(path, classifier_from_config, device, self.model_config)
            models.append(model.eval())  # type: ignore[arg-type]
        return models

    def held_out_predictions(self) -> pd.DataFrame:
        """The run's held-out table with probabilities and logits.

        ``oof.csv`` for a k-fold run (every patient once, scored by the fold model that did
        not train on it), else ``fold_0/val_predictions.csv``: ``patientId, fold, p_*,
        logit_*, class, Target``.

        Raises:
            RunFolderError: the file is missing (the run did not finish) or lacks columns.
        """
        path = self.held_out_path
        if not path.is_file():
            raise RunFolderError(path, "missing; the run did not finish (train with --resume)")
        try:
            table = pd.read_csv(path, dtype={"patientId": str})
        except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise RunFolderError(path, f"damaged ({exc})") from None
        missing = [c for c in ("patientId", *PROBABILITY_COLUMNS, *LOGIT_COLUMNS, "class") if c not in table.columns]
        if missing:
            raise RunFolderError(path, f"lacks columns {', '.join(missing)} (written by an older version: retrain)")
        return table


def load_classifier_run(path: str | Path) -> ClassifierRun:
    """The classifier run in ``path`` (nothing heavy is loaded: see :meth:`ClassifierRun.load_models`).

    Raises:
        RunFolderError: no such folder, no or damaged config.json, a detector run, an
            incomplete config.
    """
    path = Path(path)
    data = _read_config(path, CLASSIFIER_KIND)
    config_path = path / CONFIG_FILE
    _require(data, ("train", "model", "cache", "folds"), config_path)
    cache = _cache_reference(data, config_path)
    try:
        train = ClassifierTrainConfig.from_dict(data["train"])
        folds = int(data["folds"])
        input_size = int(data.get("input_size") or train.size or cache.size)
    except (TypeError, ValueError) as exc:
        raise RunFolderError(config_path, f"incomplete run config ({exc})") from None
    return ClassifierRun(
        path=path, train=train, model_config=dict(data["model"]), cache=cache, folds=folds, input_size=input_size,
        class_names=list(data.get("class_names", CLASS_NAMES)),
    )


def load_run_models(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[list[OpacityClassifier], dict[str, Any]]:
    """The selected model of every fold of a classifier run, and its config.json as a dict.

    Kept for callers of the untyped form; new code uses :func:`load_classifier_run`.
    """
    run = load_classifier_run(run_dir)
    return run.load_models(device), run.to_dict()


# ------------------------------------------------------------------------- detector


@dataclass
class DetectorRun:
    """A detector run folder (see the module docstring).

    Attributes:
        path: the run folder.
        train: the training settings.
        model_config: what rebuilds the network (``detector_from_config``).
        cache: the cache it trained on.
        input_size: the side of the images it is fed (the cache's prepared size).
        image_size: the side the detector resizes them to internally.
        n_train, n_train_positive, n_val: patients of the cache's split it used.
        device: where :attr:`model` loads.
    """

    path: Path
    train: DetectorTrainConfig
    model_config: dict[str, Any]
    cache: CacheReference
    input_size: int
    image_size: int
    n_train: int = 0
    n_train_positive: int = 0
    n_val: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"), repr=False, compare=False)
    kind: str = DETECTOR_KIND

    @property
    def run_dir(self) -> Path:
        return self.path

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def best_checkpoint(self) -> Path:
        return self.path / BEST_FILE

    @property
    def last_checkpoint(self) -> Path:
        return self.path / LAST_FILE

    @property
    def postprocess_path(self) -> Path:
        return self.path / POSTPROCESS_FILE

    @property
    def val_predictions_path(self) -> Path:
        return self.path / VAL_PREDICTIONS_FILE

    @property
    def config(self) -> dict[str, Any]:
        """The config.json content (for callers of the untyped form)."""
        return self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": DETECTOR_KIND,
            "train": self.train.to_dict(),
            "model": to_plain(self.model_config),
            "cache": self.cache.to_dict(),
            "n_train": int(self.n_train),
            "n_train_positive": int(self.n_train_positive),
            "n_val": int(self.n_val),
            "input_size": int(self.input_size),
            "image_size": int(self.image_size),
        }

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.to_dict(), self.config_path)

    def load_model(self, device: str | torch.device | None = None, weights: str = "best") -> OpacityDetector:
        """The detector of best.pt (``weights="best"``) or last.pt (``"last"``: the final
        epoch, not chosen on the validation patients) in eval mode on ``device`` (default
        :attr:`device`).

        Raises:
            ConfigError: ``weights`` is neither.
            RunFolderError: no such checkpoint yet.
            CheckpointError: the checkpoint is damaged or does not fit the model.
        """
        if weights not in ("best", "last"):
            raise ConfigError("--weights", f"must be best or last, got {weights!r}")
        device = _as_device(device if device is not None else self.device)
        path = self.best_checkpoint if weights == "best" else self.last_checkpoint
        if not path.is_file():
            raise RunFolderError(path, "missing; the run has not finished an epoch (train with --resume)")
        model, _ = load_best_model(path, detector_from_config, device, self.model_config)
        return model.eval()  # type: ignore[return-value]

    @cached_property
    def model(self) -> OpacityDetector:
        """The best detector on :attr:`device` (loaded once)."""
        return self.load_model()

    @cached_property
    def postprocess(self) -> PostprocessConfig:
        """The post-processing tuned on validation (none when training did not finish)."""
        if not self.postprocess_path.is_file():
            log.warning("%s: no %s (training did not finish); using no post-processing", self.path, POSTPROCESS_FILE)
            return PostprocessConfig()
        try:
            return load_postprocess(self.postprocess_path)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise RunFolderError(self.postprocess_path, f"damaged ({exc})") from None


def load_detector_run(
    path: str | Path, device: str | torch.device = "cpu", *, require_best: bool = True
) -> DetectorRun:
    """The detector run in ``path``; its :attr:`~DetectorRun.model` loads on ``device`` when first used.

    Raises:
        RunFolderError: no such folder, no or damaged config.json, a classifier run, an
            incomplete config, or (with ``require_best``) no best.pt yet.
    """
    path = Path(path)
    data = _read_config(path, DETECTOR_KIND)
    config_path = path / CONFIG_FILE
    _require(data, ("train", "model", "cache"), config_path)
    cache = _cache_reference(data, config_path)
    try:
        train = DetectorTrainConfig.from_dict(data["train"])
        input_size = int(data.get("input_size") or cache.size)
        image_size = int(data.get("image_size") or train.size or input_size)
        run = DetectorRun(
            path=path, train=train, model_config=dict(data["model"]), cache=cache, input_size=input_size,
            image_size=image_size, n_train=int(data.get("n_train", 0)),
            n_train_positive=int(data.get("n_train_positive", 0)), n_val=int(data.get("n_val", 0)),
            device=_as_device(device),
        )
    except (TypeError, ValueError) as exc:
        raise RunFolderError(config_path, f"incomplete run config ({exc})") from None
    if require_best and not run.best_checkpoint.is_file():
        raise RunFolderError(run.best_checkpoint, "missing; the run has not finished an epoch (train with --resume)")
    return run


# ------------------------------------------------------------------- starting a run


def run_settings(
    run_dir: Path,
    cache: PreparedCache,
    config: TrainConfig | None,
    *,
    resume: bool,
    default: type[TrainConfig],
) -> TrainConfig:
    """The settings a training run goes with: a new run's (refusing to overwrite a run), or the
    run's own config.json when resuming (refusing another cache than the one it trained on).

    Raises:
        RunExistsError: ``run_dir`` holds a run and ``resume`` is False.
        RunFolderError: ``resume`` without a run to continue, or a damaged one.
        ConfigError: ``resume`` with a cache of other patients.
    """
    if not resume:
        if (run_dir / CONFIG_FILE).exists():
            raise RunExistsError(run_dir, "already holds a run; pass --resume to continue it or choose another --out")
        return config or default()
    if not (run_dir / CONFIG_FILE).exists():
        raise RunFolderError(run_dir, f"nothing to resume (no {CONFIG_FILE})")
    saved: ClassifierRun | DetectorRun
    if default is ClassifierTrainConfig:
        saved = load_classifier_run(run_dir)
    else:
        saved = load_detector_run(run_dir, require_best=False)
    if saved.cache.patients_hash and not saved.cache.matches(cache):
        raise ConfigError(cache.path, f"holds other patients than the cache {saved.cache.path} this run trained on; "
                                      "resume with that cache")
    return saved.train  # type: ignore[return-value]
