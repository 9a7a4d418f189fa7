"""Metrics (pure NumPy / SciPy): the RSNA detection score, FROC, ROC/AUC statistics,
operating points and calibration. Boxes are xyxy in pixels (see :mod:`.boxes`)."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from lungopacity.metrics.boxes import (
    clip_boxes,
    iou_matrix,
    scale_boxes,
    shrink_boxes,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from lungopacity.metrics.rsna_map import (
    RSNA_IOU_THRESHOLDS,
    FrocCurve,
    bootstrap_rsna_map_ci,
    froc_curve,
    image_precision,
    per_image_precision,
    precision_per_threshold,
    rsna_map,
    sensitivity_at_fppi,
)

if TYPE_CHECKING:
    from lungopacity.metrics.classification import (
        AucInterval,
        DeLongResult,
        OperatingPoint,
        PairedBootstrapResult,
        ReliabilityCurve,
        bootstrap_auc_ci,
        confusion_matrix,
        delong_test,
        expected_calibration_error,
        fit_temperature,
        negative_log_likelihood,
        one_vs_rest_auc,
        paired_bootstrap_auc_test,
        reliability_curve,
        roc_auc,
        roc_curve,
        sensitivity_specificity,
        softmax,
        threshold_at_sensitivity,
        youden_threshold,
    )

# The classification statistics load on first use (PEP 562): they need SciPy, whose
# ~1 s import ``lungopacity score`` (boxes and the RSNA metric: pure NumPy) should not pay.
# The box and RSNA-metric names stay eager: ``rsna_map`` is also the name of a submodule,
# which a lazy lookup would return instead of the function once the submodule is imported.
CLASSIFICATION_NAMES: frozenset[str] = frozenset(
    {
        "AucInterval",
        "DeLongResult",
        "OperatingPoint",
        "PairedBootstrapResult",
        "ReliabilityCurve",
        "bootstrap_auc_ci",
        "confusion_matrix",
        "delong_test",
        "expected_calibration_error",
        "fit_temperature",
        "negative_log_likelihood",
        "one_vs_rest_auc",
        "paired_bootstrap_auc_test",
        "reliability_curve",
        "roc_auc",
        "roc_curve",
        "sensitivity_specificity",
        "softmax",
        "threshold_at_sensitivity",
        "youden_threshold",
    }
)


def __getattr__(name: str) -> Any:
    if name not in CLASSIFICATION_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module("lungopacity.metrics.classification"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "RSNA_IOU_THRESHOLDS",
    "AucInterval",
    "DeLongResult",
    "FrocCurve",
    "OperatingPoint",
    "PairedBootstrapResult",
    "ReliabilityCurve",
    "bootstrap_auc_ci",
    "bootstrap_rsna_map_ci",
    "clip_boxes",
    "confusion_matrix",
    "delong_test",
    "expected_calibration_error",
    "fit_temperature",
    "froc_curve",
    "image_precision",
    "iou_matrix",
    "negative_log_likelihood",
    "one_vs_rest_auc",
    "paired_bootstrap_auc_test",
    "per_image_precision",
    "precision_per_threshold",
    "reliability_curve",
    "roc_auc",
    "roc_curve",
    "rsna_map",
    "scale_boxes",
    "sensitivity_at_fppi",
    "sensitivity_specificity",
    "shrink_boxes",
    "softmax",
    "threshold_at_sensitivity",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
    "youden_threshold",
]
