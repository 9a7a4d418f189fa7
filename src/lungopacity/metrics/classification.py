"""Classification metrics: ROC/AUC with confidence intervals and tests, operating points,
confusion matrix, calibration and temperature scaling (pure NumPy / SciPy).

Conventions used throughout:

* Binary labels are 0/1 (or bool); 1 is the positive class (opacity).
* A score **at or above** a threshold predicts positive (``score >= threshold``), the
  scikit-learn convention, so every threshold returned here reproduces its operating
  point with that rule.
* Functions that need both classes raise ``ValueError`` when one is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special, stats

from lungopacity.constants import CLASS_NAMES
from lungopacity.errors import ConfigError
from lungopacity.metrics import CLASSIFICATION_NAMES

logger = logging.getLogger(__name__)

# One list of the public names: the package's lazy loader (metrics/__init__.py) holds it,
# so that it can answer without importing SciPy.
__all__ = sorted(CLASSIFICATION_NAMES)

# Bootstrap replicates are scored in blocks so that a (block, distinct scores) matrix
# stays around this many float64 values (~32 MB) whatever the data size.
_BOOTSTRAP_BLOCK_VALUES = 4_000_000


# --------------------------------------------------------------------------- validation


def _as_binary_labels(y: ArrayLike) -> np.ndarray:
    labels = np.asarray(y).reshape(-1)
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if labels.size and not np.all(np.isin(labels, (0, 1))):
        raise ConfigError("binary labels must be 0/1 (or bool)")
    return labels.astype(np.int64)


def _as_scores(score: ArrayLike, n: int, name: str = "score") -> np.ndarray:
    values = np.asarray(score, dtype=np.float64).reshape(-1)
    if values.shape[0] != n:
        raise ConfigError(f"{name} has {values.shape[0]} values for {n} labels")
    if not np.all(np.isfinite(values)):
        raise ConfigError(f"{name} holds non-finite values")
    return values


def _binary_inputs(y: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    labels = _as_binary_labels(y)
    values = _as_scores(score, labels.shape[0])
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.shape[0]:
        raise ConfigError("both classes (0 and 1) must be present")
    return labels, values


# --------------------------------------------------------------------------- ROC and AUC


def roc_curve(y: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points, identical to ``sklearn.metrics.roc_curve(y, score, drop_intermediate=False)``.

    One point per distinct score value (descending), preceded by the point ``(0, 0)`` whose
    threshold is ``+inf`` (scikit-learn >= 1.3 convention). No collinear points are dropped.

    Returns:
        ``(fpr, tpr, thresholds)``; the point ``i`` is the rule ``score >= thresholds[i]``.

    Raises:
        ValueError: when only one class is present.
    """
    labels, values = _binary_inputs(y, score)
    order = np.argsort(-values, kind="stable")
    sorted_scores = values[order]
    sorted_labels = labels[order]
    last_of_group = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_group]
    false_positives = last_of_group + 1 - true_positives
    true_positives = np.r_[0, true_positives]
    false_positives = np.r_[0, false_positives]
    fpr = false_positives / false_positives[-1]
    tpr = true_positives / true_positives[-1]
    thresholds = np.r_[np.inf, sorted_scores[last_of_group]]
    return fpr, tpr, thresholds


def roc_auc(y: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic.

    ``P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg)`` over all positive /
    negative pairs, computed from average ranks (equal to the trapezoidal area under
    :func:`roc_curve`).
    """
    labels, values = _binary_inputs(y, score)
    ranks = stats.rankdata(values)  # average ranks: ties count one half
    n_pos = int(labels.sum())
    n_neg = labels.shape[0] - n_pos
    rank_sum = float(ranks[labels == 1].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _weighted_auc(
    group_of_sample: np.ndarray,
    n_groups: int,
    labels: np.ndarray,
    resampled: np.ndarray,
) -> np.ndarray:
    """Mann-Whitney AUC of bootstrap replicates given as index matrices.

    Args:
        group_of_sample: ``(n,)`` rank of each sample's score among the distinct scores
            (ascending), so equal scores share a group.
        n_groups: number of distinct scores.
        labels: ``(n,)`` 0/1 labels.
        resampled: ``(B, m)`` sample indices of ``B`` replicates.

    Returns:
        ``(B,)`` AUCs; NaN for replicates holding a single class.
    """
    n_reps = resampled.shape[0]
    offsets = (np.arange(n_reps) * n_groups)[:, None]
    flat_groups = (group_of_sample[resampled] + offsets).reshape(-1)
    flat_labels = labels[resampled].reshape(-1).astype(np.float64)
    size = n_reps * n_groups
    positives = np.bincount(flat_groups, weights=flat_labels, minlength=size)
    negatives = np.bincount(flat_groups, weights=1.0 - flat_labels, minlength=size)
    positives = positives.reshape(n_reps, n_groups)
    negatives = negatives.reshape(n_reps, n_groups)
    # Negatives strictly below each group, plus half the negatives tied with it.
    negatives_below = np.cumsum(negatives, axis=1) - 0.5 * negatives
    n_pos = positives.sum(axis=1)
    n_neg = negatives.sum(axis=1)
    pairs = n_pos * n_neg
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (positives * negatives_below).sum(axis=1) / pairs
    return np.where(pairs > 0, auc, np.nan)


def _bootstrap_indices(
    rng: np.random.Generator, labels: np.ndarray, n_reps: int, stratified: bool
) -> np.ndarray:
    n = labels.shape[0]
    if not stratified:
        return rng.integers(0, n, size=(n_reps, n))
    positive_idx = np.flatnonzero(labels == 1)
    negative_idx = np.flatnonzero(labels == 0)
    draws_pos = positive_idx[rng.integers(0, positive_idx.size, size=(n_reps, positive_idx.size))]
    draws_neg = negative_idx[rng.integers(0, negative_idx.size, size=(n_reps, negative_idx.size))]
    return np.concatenate([draws_pos, draws_neg], axis=1)


def _bootstrap_aucs(
    labels: np.ndarray,
    score_list: Sequence[np.ndarray],
    n_boot: int,
    seed: int,
    stratified: bool,
) -> np.ndarray:
    """``(n_boot, len(score_list))`` AUCs, every score judged on the same resamples."""
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    grouped = []
    for values in score_list:
        distinct, group_of_sample = np.unique(values, return_inverse=True)
        grouped.append((group_of_sample.reshape(-1), distinct.size))
    largest = max(size for _, size in grouped)
    block = max(1, _BOOTSTRAP_BLOCK_VALUES // max(largest, labels.shape[0]))
    out = np.empty((n_boot, len(score_list)))
    for start in range(0, n_boot, block):
        stop = min(start + block, n_boot)
        resampled = _bootstrap_indices(rng, labels, stop - start, stratified)
        for column, (group_of_sample, n_groups) in enumerate(grouped):
            out[start:stop, column] = _weighted_auc(group_of_sample, n_groups, labels, resampled)
    return out


class AucInterval(NamedTuple):
    """An AUC with its bootstrap percentile interval."""

    auc: float
    lo: float
    hi: float


def bootstrap_auc_ci(
    y: ArrayLike,
    score: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
) -> AucInterval:
    """AUC with a ``1 - alpha`` bootstrap percentile confidence interval.

    Args:
        y: 0/1 labels.
        score: scores, higher = more likely positive.
        n_boot: number of bootstrap replicates.
        alpha: the interval covers ``1 - alpha``.
        seed: seed of ``numpy.random.default_rng``; same seed, same interval.
        stratified: resample positives and negatives separately (class counts fixed);
            otherwise resample all cases, dropping replicates that lose a class.

    Returns:
        ``AucInterval(auc, lo, hi)`` (a tuple): the AUC of the full data and the
        ``alpha/2`` and ``1 - alpha/2`` quantiles of the replicate AUCs.
    """
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    labels, values = _binary_inputs(y, score)
    aucs = _bootstrap_aucs(labels, [values], n_boot, seed, stratified)[:, 0]
    kept = aucs[~np.isnan(aucs)]
    if kept.size < aucs.size:
        logger.warning("%d of %d bootstrap replicates lost a class", aucs.size - kept.size, aucs.size)
    lo, hi = np.quantile(kept, [alpha / 2.0, 1.0 - alpha / 2.0])
    return AucInterval(roc_auc(labels, values), float(lo), float(hi))


class DeLongResult(NamedTuple):
    """Paired DeLong comparison of two AUCs on the same cases."""

    auc_a: float
    auc_b: float
    z: float  #: (auc_a - auc_b) / standard error of the difference
    p: float  #: two-sided p-value


def _delong_components(
    labels: np.ndarray, values: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components (Sun & Xu 2014, via mid-ranks).

    ``v10[i]`` is the fraction of negatives below positive ``i`` (ties one half),
    ``v01[j]`` the fraction of positives above negative ``j``.
    """
    positive = labels == 1
    n_pos = int(positive.sum())
    n_neg = labels.shape[0] - n_pos
    ranks_all = stats.rankdata(values)
    ranks_pos = stats.rankdata(values[positive])
    ranks_neg = stats.rankdata(values[~positive])
    v10 = (ranks_all[positive] - ranks_pos) / n_neg
    v01 = 1.0 - (ranks_all[~positive] - ranks_neg) / n_pos
    return float(v10.mean()), v10, v01


def delong_test(y: ArrayLike, score_a: ArrayLike, score_b: ArrayLike) -> DeLongResult:
    """DeLong, DeLong & Clarke-Pearson (1988) test of two correlated AUCs.

    Both scores are for the same cases; the covariance of the two AUC estimates comes from
    the structural components (sample covariances with ``n - 1``).

    Returns:
        ``DeLongResult(auc_a, auc_b, z, p)``; ``z = 0, p = 1`` when the difference and its
        variance are both zero (e.g. identical scores).

    Raises:
        ValueError: with fewer than two positives or two negatives.
    """
    labels = _as_binary_labels(y)
    values_a = _as_scores(score_a, labels.shape[0], "score_a")
    values_b = _as_scores(score_b, labels.shape[0], "score_b")
    n_pos = int(labels.sum())
    n_neg = labels.shape[0] - n_pos
    if n_pos < 2 or n_neg < 2:
        raise ConfigError("DeLong's test needs at least two positives and two negatives")
    auc_a, v10_a, v01_a = _delong_components(labels, values_a)
    auc_b, v10_b, v01_b = _delong_components(labels, values_b)
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    covariance = s10 / n_pos + s01 / n_neg
    variance = float(covariance[0, 0] + covariance[1, 1] - 2.0 * covariance[0, 1])
    difference = auc_a - auc_b
    if variance <= 1e-300:
        if difference == 0.0:
            return DeLongResult(auc_a, auc_b, 0.0, 1.0)
        z = float(np.copysign(np.inf, difference))
    else:
        z = difference / np.sqrt(variance)
    return DeLongResult(auc_a, auc_b, float(z), float(2.0 * stats.norm.sf(abs(z))))


class PairedBootstrapResult(NamedTuple):
    """Paired bootstrap comparison of two AUCs on the same cases."""

    auc_a: float
    auc_b: float
    diff: float  #: auc_a - auc_b on the full data
    lo: float  #: lower percentile bound of the difference
    hi: float  #: upper percentile bound of the difference
    z: float  #: diff / bootstrap standard deviation of the difference
    p: float  #: two-sided normal p-value of z


def paired_bootstrap_auc_test(
    y: ArrayLike,
    score_a: ArrayLike,
    score_b: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
) -> PairedBootstrapResult:
    """Compare two AUCs on the same cases by resampling cases (both scores together).

    The difference ``auc_a - auc_b`` gets a ``1 - alpha`` percentile interval and a
    normal-approximation z and two-sided p from the bootstrap standard deviation (which
    makes it directly comparable with :func:`delong_test`).
    """
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    labels, values_a = _binary_inputs(y, score_a)
    values_b = _as_scores(score_b, labels.shape[0], "score_b")
    aucs = _bootstrap_aucs(labels, [values_a, values_b], n_boot, seed, stratified)
    differences = aucs[:, 0] - aucs[:, 1]
    differences = differences[~np.isnan(differences)]
    auc_a = roc_auc(labels, values_a)
    auc_b = roc_auc(labels, values_b)
    difference = auc_a - auc_b
    lo, hi = np.quantile(differences, [alpha / 2.0, 1.0 - alpha / 2.0])
    spread = float(differences.std(ddof=1)) if differences.size > 1 else 0.0
    if spread <= 0.0:
        z = 0.0 if difference == 0.0 else float(np.copysign(np.inf, difference))
    else:
        z = difference / spread
    p = float(2.0 * stats.norm.sf(abs(z)))
    return PairedBootstrapResult(auc_a, auc_b, difference, float(lo), float(hi), float(z), p)


# --------------------------------------------------------------------------- operating points


class OperatingPoint(NamedTuple):
    """A decision threshold (``score >= threshold`` is positive) and its rates."""

    threshold: float
    sensitivity: float
    specificity: float


def youden_threshold(y: ArrayLike, score: ArrayLike) -> OperatingPoint:
    """Threshold maximising Youden's J = sensitivity + specificity - 1.

    Candidates are the distinct scores (the finite thresholds of :func:`roc_curve`); on
    equal J the highest threshold (fewest positive calls) wins.
    """
    fpr, tpr, thresholds = roc_curve(y, score)
    youden = tpr[1:] - fpr[1:]
    # J values of distinct points differ by at least 1 / (n_pos * n_neg); the tolerance
    # only absorbs rounding (2/3 vs 1 - 1/3) so that exact ties go to the higher threshold.
    best = int(np.argmax(youden >= youden.max() - 1e-12)) + 1
    return OperatingPoint(float(thresholds[best]), float(tpr[best]), float(1.0 - fpr[best]))


def threshold_at_sensitivity(y: ArrayLike, score: ArrayLike, target: float = 0.9) -> OperatingPoint:
    """Highest threshold whose sensitivity reaches ``target`` (so the best specificity there).

    Raises:
        ValueError: unless ``0 < target <= 1``.
    """
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target sensitivity must be in (0, 1], got {target}")
    fpr, tpr, thresholds = roc_curve(y, score)
    # tpr is non-decreasing and ends at 1, so a first reaching point always exists.
    best = int(np.argmax(tpr >= target - 1e-12))
    return OperatingPoint(float(thresholds[best]), float(tpr[best]), float(1.0 - fpr[best]))


def sensitivity_specificity(
    y: ArrayLike, score: ArrayLike, threshold: float
) -> tuple[float, float]:
    """Sensitivity and specificity of the rule ``score >= threshold``.

    A rate whose class is absent is NaN.
    """
    labels = _as_binary_labels(y)
    values = _as_scores(score, labels.shape[0])
    called = values >= threshold
    positives = labels == 1
    n_pos = int(positives.sum())
    n_neg = labels.shape[0] - n_pos
    sensitivity = float((called & positives).sum() / n_pos) if n_pos else float("nan")
    specificity = float((~called & ~positives).sum() / n_neg) if n_neg else float("nan")
    return sensitivity, specificity


# --------------------------------------------------------------------------- multiclass


def one_vs_rest_auc(
    y_class: ArrayLike,
    probs: ArrayLike,
    class_names: Sequence[str] = CLASS_NAMES,
) -> dict[str, float]:
    """AUC of each class against the others, from column ``k`` of ``probs``.

    Args:
        y_class: ``(n,)`` integer class codes ``0 .. K-1``.
        probs: ``(n, K)`` scores (e.g. probabilities), column order = class codes.
        class_names: ``K`` names, used as keys.

    Returns:
        ``{name: auc}``; NaN (logged) for a class that is absent or the only one present.
        The macro average is ``numpy.nanmean`` of the values.
    """
    labels = np.asarray(y_class).reshape(-1)
    scores = np.asarray(probs, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ConfigError(f"probs must have shape (n, K) with n={labels.shape[0]}, got {scores.shape}")
    if scores.shape[1] != len(class_names):
        raise ConfigError(f"{scores.shape[1]} probability columns for {len(class_names)} class names")
    result: dict[str, float] = {}
    for code, name in enumerate(class_names):
        is_class = labels == code
        if is_class.all() or not is_class.any():
            logger.warning("class %r: one-vs-rest AUC undefined (needs both classes)", name)
            result[name] = float("nan")
            continue
        result[name] = roc_auc(is_class, scores[:, code])
    return result


def confusion_matrix(y: ArrayLike, y_pred: ArrayLike, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` int64 counts; rows = true class, columns = predicted."""
    truth = np.asarray(y).reshape(-1).astype(np.int64)
    predicted = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if truth.shape != predicted.shape:
        raise ConfigError(f"y has {truth.size} values, y_pred {predicted.size}")
    for name, codes in (("y", truth), ("y_pred", predicted)):
        if codes.size and (codes.min() < 0 or codes.max() >= n_classes):
            raise ConfigError(f"{name} holds codes outside 0..{n_classes - 1}")
    counts = np.bincount(truth * n_classes + predicted, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


# --------------------------------------------------------------------------- calibration


class ReliabilityCurve(NamedTuple):
    """Per-bin calibration summary; empty bins hold NaN means and a count of 0."""

    mean_predicted: np.ndarray  #: mean confidence in each bin
    observed_frequency: np.ndarray  #: fraction positive (binary) / correct (multiclass)
    count: np.ndarray  #: cases per bin
    bin_edges: np.ndarray  #: ``n_bins + 1`` equal-width edges over [0, 1]


def _confidence_and_outcome(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(p, dtype=np.float64)
    labels = np.asarray(y).reshape(-1)
    if probabilities.ndim == 1:
        outcome = _as_binary_labels(labels).astype(np.float64)
        confidence = probabilities
    elif probabilities.ndim == 2:
        # Multiclass: top-label calibration (confidence of the argmax, was it right).
        confidence = probabilities.max(axis=1)
        outcome = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    else:
        raise ConfigError(f"p must be (n,) or (n, K), got shape {probabilities.shape}")
    if confidence.shape[0] != labels.shape[0]:
        raise ConfigError(f"p has {confidence.shape[0]} rows for {labels.shape[0]} labels")
    if np.any((confidence < 0) | (confidence > 1)) or not np.all(np.isfinite(confidence)):
        raise ConfigError("probabilities must lie in [0, 1]")
    return confidence, outcome


def reliability_curve(y: ArrayLike, p: ArrayLike, n_bins: int = 15) -> ReliabilityCurve:
    """Reliability diagram data over ``n_bins`` equal-width bins of [0, 1].

    Args:
        y: binary 0/1 labels with ``p`` of shape ``(n,)`` = P(positive); or class codes
            with ``p`` of shape ``(n, K)``, then top-label (max probability vs correct).
        p: probabilities.
        n_bins: bins ``[0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1]`` (the last one closed).
    """
    if n_bins < 1:
        raise ConfigError(f"n_bins must be >= 1, got {n_bins}")
    confidence, outcome = _confidence_and_outcome(y, p)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(bin_index, minlength=n_bins)
    confidence_sum = np.bincount(bin_index, weights=confidence, minlength=n_bins)
    outcome_sum = np.bincount(bin_index, weights=outcome, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_predicted = np.where(count > 0, confidence_sum / count, np.nan)
        observed = np.where(count > 0, outcome_sum / count, np.nan)
    return ReliabilityCurve(mean_predicted, observed, count, edges)


def expected_calibration_error(y: ArrayLike, p: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error: ``sum_b (n_b / n) * |observed_b - mean_predicted_b|``.

    Same inputs and bins as :func:`reliability_curve` (binary, or top-label multiclass).
    """
    curve = reliability_curve(y, p, n_bins)
    total = int(curve.count.sum())
    if total == 0:
        raise ConfigError("expected_calibration_error needs at least one case")
    filled = curve.count > 0
    gaps = np.abs(curve.observed_frequency[filled] - curve.mean_predicted[filled])
    return float(np.sum(curve.count[filled] / total * gaps))


def _as_logit_matrix(logits: ArrayLike) -> np.ndarray:
    """``(n, K)`` logits; a ``(n,)`` binary logit becomes columns ``(0, z)`` (softmax = sigmoid)."""
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim == 1:
        values = np.stack([np.zeros_like(values), values], axis=1)
    if values.ndim != 2:
        raise ConfigError(f"logits must be (n,) or (n, K), got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ConfigError("logits hold non-finite values")
    return values


def softmax(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities ``softmax(logits / temperature)``; ``(n,)`` logits give ``(n, 2)``."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    return special.softmax(_as_logit_matrix(logits) / temperature, axis=1)


def negative_log_likelihood(logits: ArrayLike, y: ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer labels under ``softmax(logits / temperature)``."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    values = _as_logit_matrix(logits)
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    if labels.shape[0] != values.shape[0]:
        raise ConfigError(f"{values.shape[0]} logit rows for {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= values.shape[1]):
        raise ConfigError(f"labels must be in 0..{values.shape[1] - 1}")
    log_probs = special.log_softmax(values / temperature, axis=1)
    return float(-log_probs[np.arange(labels.shape[0]), labels].mean())


def fit_temperature(
    logits: ArrayLike,
    y: ArrayLike,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """Temperature scaling (Guo et al. 2017): the ``T > 0`` minimising the mean NLL of
    ``softmax(logits / T)``.

    Args:
        logits: ``(n, K)`` multiclass logits, or ``(n,)`` binary logits.
        y: ``(n,)`` integer class codes (0/1 for binary logits).
        bounds: search range for ``T``; the search runs on ``log T`` (bounded Brent).

    Returns:
        The fitted temperature (> 0). Divide logits by it before the softmax.
    """
    low, high = bounds
    if not 0 < low < high:
        raise ConfigError(f"bounds must satisfy 0 < low < high, got {bounds}")
    values = _as_logit_matrix(logits)
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    negative_log_likelihood(values, labels)  # validates shapes and label range

    def objective(log_temperature: float) -> float:
        return negative_log_likelihood(values, labels, float(np.exp(log_temperature)))

    result = optimize.minimize_scalar(
        objective,
        bounds=(np.log(low), np.log(high)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = float(np.exp(result.x))
    if np.isclose(temperature, low, rtol=1e-3) or np.isclose(temperature, high, rtol=1e-3):
        logger.warning("fitted temperature %.4g is at the edge of the search range %s", temperature, bounds)
    logger.info(
        "temperature %.4f: NLL %.4f -> %.4f", temperature, objective(0.0), float(result.fun)
    )
    return temperature
