"""Calibration of the final P(opacity), fitted on held-out predictions (the training side of ``bundle``).

The quantity calibrated is the one a reading reports as ``opacity_probability``:

* image path: P(opacity) = ``softmax(logits / T)[lung_opacity]`` of the classifier
  ensemble; ``T`` is fitted on the out-of-fold logits by minimising the *binary* negative
  log-likelihood of P(opacity) against the opacity label (not the 3-class likelihood,
  which calibrates the top class and can leave P(opacity) worse: the demo bundle's
  top-class ECE went 0.035 -> 0.061 that way);
* fusion path: ``sigmoid(logit(p) / T)`` of the fusion network's output, ``T`` fitted on
  its cross-fitted scores (every patient scored by a network that did not train on it).

:func:`calibration_summary` gives the numbers the model card stores and the reliability
diagram draws (:func:`lungopacity.reports.calibration.reliability_figure`): ECE before and
after with the same 10 equal-width bins of P(opacity), and every bin's count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize, special

from lungopacity.constants import LUNG_OPACITY
from lungopacity.inference.manifest import scale_probability
from lungopacity.metrics.classification import expected_calibration_error, reliability_curve

#: Bins of the reliability diagram and of the ECE (equal width over [0, 1]).
N_BINS = 10
TEMPERATURE_BOUNDS = (0.05, 20.0)
_EPS = 1e-7


def opacity_from_logits(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """P(opacity) of ``(N, 3)`` logits at a temperature."""
    return special.softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)[:, LUNG_OPACITY]


def _binary_nll(probability: np.ndarray, target: np.ndarray) -> float:
    p = np.clip(probability, _EPS, 1 - _EPS)
    return float(-np.mean(target * np.log(p) + (1 - target) * np.log(1 - p)))


def _fit(objective) -> float:
    low, high = TEMPERATURE_BOUNDS
    result = optimize.minimize_scalar(lambda t: objective(float(np.exp(t))), bounds=(np.log(low), np.log(high)),
                                      method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def fit_opacity_temperature(logits: np.ndarray, target: np.ndarray) -> float:
    """The ``T`` minimising the binary NLL of ``softmax(logits / T)[opacity]`` against ``target`` (0/1)."""
    target = np.asarray(target, dtype=np.float64)
    return _fit(lambda t: _binary_nll(opacity_from_logits(logits, t), target))


def fit_probability_temperature(probability: np.ndarray, target: np.ndarray) -> float:
    """The ``T`` minimising the binary NLL of ``sigmoid(logit(p) / T)`` against ``target`` (0/1)."""
    target = np.asarray(target, dtype=np.float64)
    return _fit(lambda t: _binary_nll(scale_probability(probability, t), target))


@dataclass
class ReliabilityBins:
    """One reliability curve: per bin its count, mean predicted P(opacity), observed opacity rate."""

    count: list[int]
    mean_predicted: list[float | None]
    observed: list[float | None]

    @classmethod
    def of(cls, target: np.ndarray, probability: np.ndarray, n_bins: int = N_BINS) -> ReliabilityBins:
        curve = reliability_curve(target, probability, n_bins)
        as_list = lambda values: [None if np.isnan(v) else float(v) for v in values]  # noqa: E731
        return cls([int(c) for c in curve.count], as_list(curve.mean_predicted), as_list(curve.observed_frequency))


@dataclass
class CalibrationSummary:
    """What the model card stores about the calibration, and what ``calibration.png`` draws.

    Attributes:
        quantity: what was calibrated (the final ``opacity_probability`` of which component).
        method: how.
        temperature: the fitted temperature.
        n, n_positive: held-out patients and those with opacity.
        bin_edges: the ``n_bins + 1`` edges shared by both curves and both ECEs.
        ece_before, ece_after: expected calibration error of P(opacity) without and with
            the temperature, on these patients (the temperature was fitted on them).
        ece_after_cross_fitted: ECE when each fold's temperature is fitted on the other
            folds (an honest estimate of the ECE on new patients), None with one fold.
        before, after: the reliability bins.
    """

    quantity: str
    method: str
    temperature: float
    n: int
    n_positive: int
    bin_edges: list[float]
    ece_before: float
    ece_after: float
    ece_after_cross_fitted: float | None
    before: ReliabilityBins
    after: ReliabilityBins

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_summary(
    target: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    *,
    temperature: float,
    quantity: str,
    method: str,
    after_cross_fitted: np.ndarray | None = None,
    n_bins: int = N_BINS,
) -> CalibrationSummary:
    """ECE before / after and the bins, all of P(opacity) with the same ``n_bins`` bins."""
    target = np.asarray(target).astype(int)
    ece = lambda p: float(expected_calibration_error(target, p, n_bins))  # noqa: E731
    return CalibrationSummary(
        quantity=quantity, method=method, temperature=float(temperature), n=int(target.size),
        n_positive=int(target.sum()), bin_edges=[float(e) for e in np.linspace(0.0, 1.0, n_bins + 1)],
        ece_before=ece(before), ece_after=ece(after),
        ece_after_cross_fitted=None if after_cross_fitted is None else ece(after_cross_fitted),
        before=ReliabilityBins.of(target, before, n_bins), after=ReliabilityBins.of(target, after, n_bins),
    )


def cross_fitted(fit, apply, groups: np.ndarray, *arrays: np.ndarray) -> np.ndarray | None:
    """``apply(fit(other groups), this group)`` for every group: held-out calibrated values.

    ``fit(*arrays_of_the_other_groups) -> T`` and ``apply(T, *arrays_of_this_group) -> values``.
    """
    groups = np.asarray(groups)
    names = np.unique(groups)
    if names.size < 2:
        return None
    out = np.empty(len(groups), dtype=np.float64)
    for name in names:
        held = groups == name
        temperature = fit(*(a[~held] for a in arrays))
        out[held] = apply(temperature, *(a[held] for a in arrays))
    return out


__all__ = [
    "N_BINS",
    "CalibrationSummary",
    "ReliabilityBins",
    "calibration_summary",
    "cross_fitted",
    "fit_opacity_temperature",
    "fit_probability_temperature",
    "opacity_from_logits",
    "scale_probability",
]
