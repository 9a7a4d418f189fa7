"""Evaluating a classifier run on a prepared cache: metrics.json, predictions.csv and a report.

Which probabilities are honest depends on what the run saw:

* a **k-fold run** trained a model on every patient of its cache except one fold, so an
  ensemble of its fold models has seen every one of those patients. For them the run's
  out-of-fold probabilities (``oof.csv``: each patient scored by the one fold model that
  did not train on it) are used instead of the ensemble; patients the run never saw (any
  other cache) are scored by the ensemble (fold models averaged in logit space);
* a **single-split run** trained on its cache's train split. Its validation patients
  (``fold_0/val_predictions.csv``) are unseen; when the evaluated patients include
  training patients (``--split all`` on its own cache) they are scored all the same and
  the report warns that the numbers are optimistic.

A patient counts as "the run's" by patientId: the cache the run trained on is recognised
by the ``patients_hash`` of the run's cache reference (and, for a single-split run on
another cache, by the training patients of the original cache when it is still there).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungopacity.constants import CLASS_NAMES, LUNG_OPACITY, NORMAL, VIEWS
from lungopacity.data.cache import PreparedCache
from lungopacity.engine.checkpoint import atomic_write_json
from lungopacity.engine.classifier import (
    PROBABILITY_COLUMNS,
    classification_summary,
    predict_logits,
    softmax_np,
)
from lungopacity.engine.common import Progress, resolve_device
from lungopacity.engine.pointing import evaluate_pointing, positive_positions
from lungopacity.engine.runs import ClassifierRun, load_classifier_run
from lungopacity.errors import ConfigError
from lungopacity.metrics.classification import (
    bootstrap_auc_ci,
    confusion_matrix,
    threshold_at_sensitivity,
    youden_threshold,
)

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "all")
METRICS_FILE, PREDICTIONS_FILE = "metrics.json", "predictions.csv"
VAL_PREDICTIONS_FILE = "val_predictions.csv"

#: Where a patient's probabilities came from (the ``source`` column of predictions.csv).
SOURCE_OOF = "oof"  # the run's out-of-fold probabilities
SOURCE_ENSEMBLE = "ensemble"  # the fold models of a k-fold run, averaged in logit space
SOURCE_MODEL = "model"  # the single model of a single-split run
#: Sensitivity of the second reported operating point.
TARGET_SENSITIVITY = 0.9
#: Columns of predictions.csv, in order.
PREDICTION_COLUMNS = ("patientId", *PROBABILITY_COLUMNS, "class", "Target", "view", "source", "seen_in_training")


# ------------------------------------------------------------------------- metrics


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _binary_ci(y: np.ndarray, score: np.ndarray, n_boot: int, seed: int) -> list[float] | None:
    """95 % bootstrap percentile interval, or None when a class is missing."""
    if y.size == 0 or y.min() == y.max():
        return None
    interval = bootstrap_auc_ci(y, score, n_boot=n_boot, alpha=0.05, seed=seed)
    return [interval.lo, interval.hi]


def _operating_point(y: np.ndarray, score: np.ndarray, target: float | None) -> dict[str, float] | None:
    if y.size == 0 or y.min() == y.max():
        return None
    point = youden_threshold(y, score) if target is None else threshold_at_sensitivity(y, score, target)
    return {"threshold": point.threshold, "sensitivity": point.sensitivity, "specificity": point.specificity}


def classifier_metrics(predictions: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every number of the evaluation report, from a predictions table.

    Args:
        predictions: one row per patient with ``p_normal, p_not_normal, p_lung_opacity``
            (probabilities in class-code order), ``class`` (0/1/2) and optionally ``view``
            ('AP' / 'PA' / missing).
        n_boot: bootstrap replicates of each 95 % AUC interval (stratified, percentile).
        seed: seed of the bootstrap.

    Returns:
        A JSON-ready dict (undefined values are ``None``): ``n``, ``class_counts``,
        ``opacity_auc`` (+ ``_ci``), ``abnormal_auc`` (+ ``_ci``), ``class_auc`` and
        ``class_auc_ci`` keyed by class name, ``accuracy``, ``operating_points``
        (``youden`` and ``sensitivity_90``: threshold on P(opacity), sensitivity,
        specificity), ``view_opacity_auc`` / ``view_counts`` for AP and PA,
        ``confusion_matrix`` (rows true, columns predicted) and ``class_names``.
    """
    labels = predictions["class"].to_numpy().astype(np.int64)
    probs = predictions[list(PROBABILITY_COLUMNS)].to_numpy(dtype=np.float64)
    summary = classification_summary(labels, probs)
    opacity = (labels == LUNG_OPACITY).astype(np.int64)
    abnormal = (labels != NORMAL).astype(np.int64)
    p_opacity = probs[:, LUNG_OPACITY]

    metrics: dict[str, Any] = {
        "n": int(summary["n"]),
        "class_counts": {name: int((labels == k).sum()) for k, name in enumerate(CLASS_NAMES)},
        "opacity_auc": _finite_or_none(summary["opacity_auc"]),
        "opacity_auc_ci": _binary_ci(opacity, p_opacity, n_boot, seed),
        "abnormal_auc": _finite_or_none(summary["abnormal_auc"]),
        "abnormal_auc_ci": _binary_ci(abnormal, 1.0 - probs[:, NORMAL], n_boot, seed),
        "class_auc": {name: _finite_or_none(value) for name, value in summary["class_auc"].items()},
        "class_auc_ci": {
            name: _binary_ci((labels == k).astype(np.int64), probs[:, k], n_boot, seed)
            for k, name in enumerate(CLASS_NAMES)
        },
        "accuracy": _finite_or_none(summary["accuracy"]),
        "operating_points": {
            "youden": _operating_point(opacity, p_opacity, None),
            "sensitivity_90": _operating_point(opacity, p_opacity, TARGET_SENSITIVITY),
        },
        "n_boot": int(n_boot),
        "bootstrap_seed": int(seed),
    }
    views = predictions["view"] if "view" in predictions else pd.Series([None] * len(predictions))
    views = views.astype(object).where(views.notna(), None).to_numpy()
    metrics["view_opacity_auc"], metrics["view_counts"] = {}, {}
    for view in VIEWS:
        mask = views == view
        y = opacity[mask]
        metrics["view_counts"][view] = {"n": int(mask.sum()), "opacity": int(y.sum())}
        defined = y.size > 0 and y.min() != y.max()
        metrics["view_opacity_auc"][view] = (
            _finite_or_none(classification_summary(labels[mask], probs[mask])["opacity_auc"]) if defined else None
        )
    metrics["confusion_matrix"] = confusion_matrix(labels, probs.argmax(axis=1), len(CLASS_NAMES)).tolist()
    metrics["class_names"] = list(CLASS_NAMES)
    return metrics


# ----------------------------------------------------------------- which patients


def _read_ids_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"patientId": str})


def _single_split_training_ids(run: ClassifierRun, cache: PreparedCache, same_cache: bool) -> set[str] | None:
    """patientIds a single-split run trained on, or None when they cannot be known."""
    val_path = run.val_predictions_path(0)
    val_ids = set(_read_ids_csv(val_path)["patientId"]) if val_path.exists() else None
    if same_cache and val_ids is not None:
        # Same patients as the training cache: everything usable that was not validation.
        return set(cache.table["patientId"].iloc[cache.indices()]) - val_ids
    original = run.cache.path
    if original.is_dir():
        try:
            trained_cache = PreparedCache(original)
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot open the run's training cache to check for overlap: %s", original, exc)
            return None
        if run.cache.matches(trained_cache):
            return set(trained_cache.table["patientId"].iloc[trained_cache.indices("train")])
    return None


def _positions(cache: PreparedCache, split: str) -> np.ndarray:
    if split not in EVAL_SPLITS:
        raise ConfigError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    positions = cache.indices(None if split == "all" else split)
    if len(positions) == 0:
        raise ConfigError(f"{cache.path}: no usable patients in split {split!r}")
    return positions


# ------------------------------------------------------------------------ the run


def evaluate_classifier(
    run_dir: str | Path,
    cache_dir: str | Path,
    split: str = "val",
    out_dir: str | Path | None = None,
    *,
    n_boot: int = 1000,
    device: str = "auto",
    batch_size: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
    pointing: bool = True,
) -> dict[str, Any]:
    """Evaluate a classifier run on the patients of a prepared cache and write the report.

    Writes into ``out_dir``: ``metrics.json`` (see :func:`classifier_metrics`, plus the
    provenance: ``source``, ``source_counts``, ``n_models``, ``same_cache``,
    ``n_seen_in_training``, ``warnings``), ``predictions.csv`` (``patientId, p_normal,
    p_not_normal, p_lung_opacity, class, Target, view, source, seen_in_training``),
    ``report.md``, ``roc_per_class.png``, ``confusion_matrix.png`` and, when both views
    have both outcomes, ``roc_opacity_by_view.png``.

    Args:
        run_dir: a classifier run folder (``train_classifier``).
        cache_dir: a prepared cache; the run's own or any other.
        split: ``'val'`` (the cache's validation patients) or ``'all'`` (every usable patient).
        out_dir: the report folder (default ``run_dir/eval_<cache folder name>_<split>``).
        n_boot: bootstrap replicates for the 95 % AUC intervals.
        device: ``'auto'``, ``'cpu'``, ``'cuda'`` ...
        batch_size: images per forward pass.
        seed: bootstrap seed.
        progress: progress reporter for the prediction pass.
        pointing: when the evaluated patients include opacity boxes, also play the pointing
            game with the runtime's heatmap (``metrics['pointing']``, see
            :mod:`lungopacity.engine.pointing`): each patient explained by its out-of-fold
            model in a k-fold run on its own cache, else by the run's models averaged.

    Returns:
        The metrics dict written to ``metrics.json``.

    Raises:
        RunFolderError: not a classifier run, an unfinished fold, or a k-fold run without
            ``oof.csv``.
        ValueError: unknown split, or no usable patient in it.
    """
    run_dir, cache = Path(run_dir), PreparedCache(cache_dir)
    run = load_classifier_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / f"eval_{cache.path.name}_{split}"
    positions = _positions(cache, split)
    table = cache.table.iloc[positions].reset_index(drop=True)
    ids = table["patientId"].astype(str).to_numpy()
    n_folds = run.folds
    if run.cache.window != cache.window:
        log.warning("%s: prepared with window policy %r, but the run was trained on images prepared with %r; "
                    "the figures describe images the model was not trained to see", cache.path, cache.window,
                    run.cache.window)
    same_cache = run.cache.matches(cache)
    warnings: list[str] = []

    probs = np.full((len(ids), len(CLASS_NAMES)), np.nan)
    source = np.full(len(ids), SOURCE_ENSEMBLE if n_folds > 1 else SOURCE_MODEL, dtype=object)
    seen = np.zeros(len(ids), dtype=bool)
    if n_folds > 1:
        oof_path = run.oof_path
        oof = run.held_out_predictions().drop_duplicates("patientId").set_index("patientId")
        in_oof = np.isin(ids, oof.index.to_numpy())
        # Each of these patients trained all but one fold model: only its out-of-fold
        # probability is a prediction on an unseen patient.
        probs[in_oof] = oof.loc[ids[in_oof], list(PROBABILITY_COLUMNS)].to_numpy(dtype=np.float64)
        source[in_oof] = SOURCE_OOF
        if same_cache and not in_oof.all():
            log.info("%d evaluated patients are not in %s (not usable when the run trained); ensemble used", int((~in_oof).sum()), oof_path)
        if in_oof.any() and not same_cache:
            warnings.append(
                f"{int(in_oof.sum())} of the {len(ids)} patients were training patients of this run (another cache "
                "holding the same patients); their out-of-fold probabilities are used"
            )
    else:
        trained_ids = _single_split_training_ids(run, cache, same_cache)
        if trained_ids is None:
            warnings.append("the run's training patients could not be determined (its cache is gone): overlap not checked")
        else:
            seen = np.isin(ids, np.array(sorted(trained_ids), dtype=object))
            if seen.any():
                warnings.append(
                    f"{int(seen.sum())} of the {len(ids)} evaluated patients were TRAINING patients of this run "
                    "(single split): the model has seen them, so these metrics are optimistic"
                )

    need_model = np.isnan(probs).any(axis=1)
    n_models = 0
    models = None
    if need_model.any():
        torch_device = resolve_device(device)
        models = run.load_models(torch_device)
        n_models = len(models)
        logits = predict_logits(
            models, cache, positions[need_model], size=run.input_size, batch_size=batch_size,
            device=torch_device, progress=progress,
        )
        probs[need_model] = softmax_np(logits.astype(np.float64))

    predictions = pd.DataFrame({"patientId": ids})
    for k, column in enumerate(PROBABILITY_COLUMNS):
        predictions[column] = probs[:, k]
    predictions["class"] = table["class"].to_numpy().astype(np.int64)
    predictions["Target"] = table["Target"].to_numpy().astype(np.int64)
    predictions["view"] = table["view"].to_numpy()
    predictions["source"] = source
    predictions["seen_in_training"] = seen
    predictions = predictions[list(PREDICTION_COLUMNS)]

    metrics = classifier_metrics(predictions, n_boot=n_boot, seed=seed)
    if pointing and len(positive_positions(cache, positions)):
        torch_device = resolve_device(device)
        if models is None:
            models = run.load_models(torch_device)
        out_of_fold = n_folds > 1 and same_cache and bool((source == SOURCE_OOF).all())
        metrics["pointing"] = evaluate_pointing(
            models, cache, positions, input_size=run.input_size, out_of_fold=out_of_fold, n_boot=n_boot, seed=seed,
            device=torch_device,
        )
    counts = {name: int((source == name).sum()) for name in (SOURCE_OOF, SOURCE_ENSEMBLE, SOURCE_MODEL)}
    used = [name for name, count in counts.items() if count]
    metrics.update(
        {
            "run_dir": str(run_dir),
            "cache_dir": str(cache.path),
            "split": split,
            "folds": n_folds,
            "same_cache": bool(same_cache),
            "source": "+".join(used),
            "source_counts": {name: count for name, count in counts.items() if count},
            "n_models": n_models,
            "n_seen_in_training": int(seen.sum()),
            "input_size": run.input_size,
            "warnings": warnings,
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{PREDICTIONS_FILE}.tmp"
    predictions.to_csv(tmp, index=False)
    tmp.replace(out_dir / PREDICTIONS_FILE)
    atomic_write_json(metrics, out_dir / METRICS_FILE)

    # Imported here: matplotlib is slow to import and training never needs it.
    from lungopacity.reports.classification import write_classification_report

    write_classification_report(metrics, predictions, out_dir)
    for warning in warnings:
        log.warning("%s: %s", out_dir, warning)
    log.info(
        "evaluated %s on %s (%s, %d patients, source %s): opacity AUC %s, accuracy %s",
        run_dir, cache.path, split, metrics["n"], metrics["source"], metrics["opacity_auc"], metrics["accuracy"],
    )
    return metrics


