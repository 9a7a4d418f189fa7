"""ROC/AUC, bootstrap and DeLong statistics, operating points and calibration: hand-built
values and agreement with scikit-learn and with direct O(n^2) formulas written here."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from lungopacity.constants import CLASS_NAMES  # noqa: E402
from lungopacity.metrics import (  # noqa: E402
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
from lungopacity.metrics.classification import _weighted_auc  # noqa: E402


def correlated_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two correlated scores of different strength (a better than b)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    shared = rng.normal(size=n)
    score_a = 1.2 * y + shared + 0.5 * rng.normal(size=n)
    score_b = 0.8 * y + shared + 0.5 * rng.normal(size=n)
    return y, score_a, score_b


def pairwise_components(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong structural components straight from the pair kernel psi (O(m n))."""
    pos, neg = score[y == 1], score[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


# --------------------------------------------------------------------------- ROC / AUC


HAND_BUILT = [
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
    ([0, 1], [0.5, 0.5], 0.5),
    ([0, 1, 1, 0, 1], [0.2, 0.2, 0.9, 0.9, 0.2], (0.5 + 0 + 1 + 0.5 + 0.5 + 0) / 6),
]


@pytest.mark.parametrize("y, score, expected", HAND_BUILT)
def test_roc_auc_hand_built(y, score, expected):
    assert roc_auc(y, score) == pytest.approx(expected, abs=1e-15)
    assert roc_auc(y, score) == pytest.approx(sklearn_metrics.roc_auc_score(y, score), abs=1e-15)


@pytest.mark.parametrize("y, score, expected", HAND_BUILT)
def test_roc_curve_points_equal_sklearn_hand_built(y, score, expected):
    fpr, tpr, thresholds = roc_curve(y, score)
    ref_fpr, ref_tpr, ref_thresholds = sklearn_metrics.roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_array_equal(thresholds, ref_thresholds)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-15)


def test_roc_curve_hand_built_points():
    fpr, tpr, thresholds = roc_curve([0, 1, 1, 0], [0.1, 0.5, 0.5, 0.3])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.5, 0.3, 0.1])
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 1, 1, 1])


@pytest.mark.parametrize("seed", range(5))
def test_roc_and_auc_equal_sklearn_on_random_cases_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
    y[:2] = [0, 1]
    score = np.round(rng.normal(size=n) + y, 1)  # rounding creates many ties
    fpr, tpr, thresholds = roc_curve(y, score)
    ref_fpr, ref_tpr, ref_thresholds = sklearn_metrics.roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_array_equal(thresholds, ref_thresholds)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-15)
    assert roc_auc(y, score) == pytest.approx(sklearn_metrics.roc_auc_score(y, score), abs=1e-12)
    assert roc_auc(y.astype(bool), score) == roc_auc(y, score)


def test_single_class_is_rejected():
    with pytest.raises(ValueError):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        roc_curve([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError):
        roc_auc([0, 2], [0.1, 0.2])


# --------------------------------------------------------------------------- bootstrap


def test_weighted_bootstrap_auc_equals_auc_of_the_resample():
    y, score, _ = correlated_scores(300, seed=3)
    score = np.round(score, 1)
    distinct, group_of_sample = np.unique(score, return_inverse=True)
    rng = np.random.default_rng(0)
    resampled = rng.integers(0, y.size, size=(20, y.size))
    aucs = _weighted_auc(group_of_sample.reshape(-1), distinct.size, y, resampled)
    expected = [roc_auc(y[r], score[r]) for r in resampled]
    np.testing.assert_allclose(aucs, expected, rtol=0, atol=1e-12)
    # A replicate with one class only is NaN.
    single_class = np.flatnonzero(y == 1)[:5][None, :]
    assert np.isnan(_weighted_auc(group_of_sample.reshape(-1), distinct.size, y, single_class))[0]


def test_bootstrap_ci_contains_auc_narrows_with_n_and_is_reproducible():
    y_small, s_small, _ = correlated_scores(200, seed=1)
    y_large, s_large, _ = correlated_scores(2000, seed=1)
    small = bootstrap_auc_ci(y_small, s_small, n_boot=500, seed=0)
    large = bootstrap_auc_ci(y_large, s_large, n_boot=500, seed=0)
    for auc, lo, hi in (small, large):
        assert lo < auc < hi
    assert small.auc == roc_auc(y_small, s_small)
    # Width shrinks roughly like 1 / sqrt(n): 10x the cases, about a third of the width.
    assert (large.hi - large.lo) < 0.5 * (small.hi - small.lo)
    assert bootstrap_auc_ci(y_small, s_small, n_boot=500, seed=0) == small
    assert bootstrap_auc_ci(y_small, s_small, n_boot=500, seed=1) != small
    loose = bootstrap_auc_ci(y_small, s_small, n_boot=500, seed=0, stratified=False)
    assert loose.lo < loose.auc < loose.hi
    narrow = bootstrap_auc_ci(y_small, s_small, n_boot=500, alpha=0.5, seed=0)
    assert small.lo < narrow.lo < narrow.hi < small.hi


# --------------------------------------------------------------------------- DeLong


def test_delong_matches_direct_structural_components():
    y, score_a, score_b = correlated_scores(150, seed=5)
    score_b = np.round(score_b, 1)  # ties in one score
    v10_a, v01_a = pairwise_components(y, score_a)
    v10_b, v01_b = pairwise_components(y, score_b)
    m, n = v10_a.size, v01_a.size
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    cov = s10 / m + s01 / n
    expected_z = (v10_a.mean() - v10_b.mean()) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    result = delong_test(y, score_a, score_b)
    assert result.auc_a == pytest.approx(roc_auc(y, score_a), abs=1e-12)
    assert result.auc_b == pytest.approx(roc_auc(y, score_b), abs=1e-12)
    assert result.z == pytest.approx(expected_z, rel=1e-9)
    assert 0 < result.p < 1
    reversed_result = delong_test(y, score_b, score_a)
    assert reversed_result.z == pytest.approx(-result.z) and reversed_result.p == pytest.approx(result.p)


def test_delong_agrees_with_paired_bootstrap():
    y, score_a, score_b = correlated_scores(600, seed=11)
    delong = delong_test(y, score_a, score_b)
    boot = paired_bootstrap_auc_test(y, score_a, score_b, n_boot=1000, seed=0)
    assert boot.diff == pytest.approx(delong.auc_a - delong.auc_b, abs=1e-12)
    assert boot.z == pytest.approx(delong.z, rel=0.2)
    assert delong.z > 2 and delong.p < 0.05 and boot.p < 0.05
    assert boot.lo < boot.diff < boot.hi and boot.lo > 0


def test_identical_scores_are_not_different():
    y, score_a, _ = correlated_scores(100, seed=2)
    delong = delong_test(y, score_a, score_a)
    assert (delong.z, delong.p) == (0.0, 1.0)
    boot = paired_bootstrap_auc_test(y, score_a, score_a, n_boot=100)
    assert (boot.diff, boot.z, boot.p) == (0.0, 0.0, 1.0)


# --------------------------------------------------------------------------- operating points

Y_OP = np.array([0, 0, 0, 1, 1, 1])
S_OP = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])


def test_youden_threshold_hand_built():
    # J = 2/3 at 0.7 (sens 2/3, spec 1) and at 0.4 (sens 1, spec 2/3): the higher wins.
    point = youden_threshold(Y_OP, S_OP)
    assert point.threshold == 0.7
    assert point.sensitivity == pytest.approx(2 / 3) and point.specificity == 1.0
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]).threshold == 0.3


def test_threshold_at_sensitivity_hand_built():
    assert threshold_at_sensitivity(Y_OP, S_OP, target=0.9) == pytest.approx((0.4, 1.0, 2 / 3))
    assert threshold_at_sensitivity(Y_OP, S_OP, target=0.5) == pytest.approx((0.7, 2 / 3, 1.0))
    assert threshold_at_sensitivity(Y_OP, S_OP, target=2 / 3).threshold == 0.7
    with pytest.raises(ValueError):
        threshold_at_sensitivity(Y_OP, S_OP, target=0.0)


def test_sensitivity_specificity_counts_ties_as_positive():
    assert sensitivity_specificity(Y_OP, S_OP, 0.4) == pytest.approx((1.0, 2 / 3))
    assert sensitivity_specificity(Y_OP, S_OP, 0.41) == pytest.approx((2 / 3, 2 / 3))
    sens, spec = sensitivity_specificity([1, 1], [0.2, 0.8], 0.5)
    assert sens == 0.5 and np.isnan(spec)
    # Every operating point of roc_curve is reproduced by the >= rule.
    fpr, tpr, thresholds = roc_curve(Y_OP, S_OP)
    for f, t, th in zip(fpr[1:], tpr[1:], thresholds[1:]):
        assert sensitivity_specificity(Y_OP, S_OP, th) == pytest.approx((t, 1 - f))


# --------------------------------------------------------------------------- multiclass


def test_confusion_matrix_hand_built_and_sklearn():
    y = [0, 0, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 2, 0, 2]
    np.testing.assert_array_equal(
        confusion_matrix(y, y_pred, 3), [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    )
    rng = np.random.default_rng(0)
    y, y_pred = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    np.testing.assert_array_equal(
        confusion_matrix(y, y_pred, 4), sklearn_metrics.confusion_matrix(y, y_pred, labels=range(4))
    )
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)


def test_one_vs_rest_auc_equals_sklearn_per_class():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300)
    probs = special.softmax(rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[y], axis=1)
    result = one_vs_rest_auc(y, probs)
    assert list(result) == list(CLASS_NAMES)
    for code, name in enumerate(CLASS_NAMES):
        assert result[name] == pytest.approx(
            sklearn_metrics.roc_auc_score(y == code, probs[:, code]), abs=1e-12
        )
    missing = one_vs_rest_auc(np.where(y == 2, 1, y), probs, class_names=("a", "b", "c"))
    assert np.isnan(missing["c"]) and not np.isnan(missing["a"])


# --------------------------------------------------------------------------- calibration


def test_ece_and_reliability_hand_built():
    p = np.array([0.1, 0.1, 0.9, 0.9])
    y = np.array([0, 1, 1, 1])
    # Bin of 0.1: predicted 0.1, observed 0.5; bin of 0.9: predicted 0.9, observed 1.
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    curve = reliability_curve(y, p, n_bins=10)
    assert curve.count.sum() == 4 and (curve.count > 0).sum() == 2
    filled = curve.count > 0
    np.testing.assert_allclose(curve.mean_predicted[filled], [0.1, 0.9])
    np.testing.assert_allclose(curve.observed_frequency[filled], [0.5, 1.0])
    assert np.isnan(curve.mean_predicted[~filled]).all()
    assert len(curve.bin_edges) == 11
    # Probability 1.0 falls in the last (closed) bin.
    assert reliability_curve([1], [1.0], n_bins=4).count.tolist() == [0, 0, 0, 1]


def test_ece_multiclass_top_label_hand_built():
    probs = np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6]])
    y = np.array([0, 1, 2, 2])
    # Confidence 0.7: 1 of 2 right (gap 0.2); confidence 0.6: 2 of 2 right (gap 0.4).
    assert expected_calibration_error(y, probs, n_bins=10) == pytest.approx(0.5 * 0.2 + 0.5 * 0.4)


def test_negative_log_likelihood_and_softmax():
    assert negative_log_likelihood(np.zeros((4, 3)), [0, 1, 2, 0]) == pytest.approx(np.log(3))
    np.testing.assert_allclose(softmax([0.0, np.log(3.0)]), [[0.5, 0.5], [0.25, 0.75]])
    np.testing.assert_allclose(softmax([[2.0, 0.0]], temperature=2.0), softmax([[1.0, 0.0]]))


def test_temperature_scaling_fixes_overconfident_logits():
    rng = np.random.default_rng(0)
    n, k = 4000, 3
    true_logits = rng.normal(scale=1.5, size=(n, k))
    y = np.array([rng.choice(k, p=row) for row in special.softmax(true_logits, axis=1)])
    overconfident = 3.0 * true_logits
    temperature = fit_temperature(overconfident, y)
    assert temperature == pytest.approx(3.0, rel=0.15)
    nll_before = negative_log_likelihood(overconfident, y)
    nll_after = negative_log_likelihood(overconfident, y, temperature)
    assert nll_after < nll_before - 0.1
    ece_before = expected_calibration_error(y, softmax(overconfident))
    ece_after = expected_calibration_error(y, softmax(overconfident, temperature))
    assert ece_after < 0.5 * ece_before
    # Binary logits (1-D) work too, and under-confident ones get T < 1.
    z = rng.normal(scale=2.0, size=n)
    y_binary = (rng.random(n) < special.expit(z)).astype(int)
    assert fit_temperature(0.5 * z, y_binary) == pytest.approx(0.5, rel=0.15)
