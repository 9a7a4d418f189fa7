"""benchmarks/bench_fusion_variants.py: its pure helpers on hand-built cases.

The Bayes combination (exact values), cross-fitting (no row is scored by a fit that saw
it) and the choice rule (the image stays unless a variant is significantly better).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fusion_variants.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fusion_variants", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_fusion_variants"] = module  # dataclasses and pickling look modules up there
    spec.loader.exec_module(module)
    return module


def test_bayes_combination_exact_values(bench):
    # odds(0.5) / odds(0.25) = 3 (the image's likelihood ratio) times odds(0.25) = 1/3 -> odds 1.
    assert bench.bayes_combination(np.array([0.5]), np.array([0.25]), 0.25)[0] == pytest.approx(0.5, abs=1e-12)
    # A prior equal to the base rate changes nothing.
    p = np.array([0.1, 0.7, 0.9])
    assert bench.bayes_combination(p, np.full(3, 0.2), 0.2) == pytest.approx(p, abs=1e-12)
    # odds 1 (image at p = 0.5, base rate 0.5) times prior odds 0.8 / 0.2 = 4 -> 0.8.
    assert bench.bayes_combination(np.array([0.5]), np.array([0.8]), 0.5)[0] == pytest.approx(0.8, abs=1e-12)
    # p = 0 or 1 is clipped, not infinite.
    extreme = bench.bayes_combination(np.array([0.0, 1.0]), np.array([0.5, 0.5]), 0.5)
    assert np.all(np.isfinite(bench.logit(extreme)))
    assert bench.logit(0.5) == 0.0 and bench.logit(0.75) == pytest.approx(math.log(3.0), abs=1e-12)


def test_cross_fitted_never_scores_a_row_its_fit_saw(bench):
    folds = np.array([0, 0, 1, 1, 2, 2])
    calls = []

    def fit_predict(train, test):
        calls.append((train.copy(), test.copy()))
        assert not (train & test).any()
        # The score of a test row: the largest fold id seen in training (known by construction).
        return np.full(int(test.sum()), folds[train].max(), dtype=float)

    out = bench.cross_fitted(folds, fit_predict)
    assert len(calls) == 3
    assert out.tolist() == [2.0, 2.0, 2.0, 2.0, 1.0, 1.0]


def test_cross_fitted_logistic_uses_only_other_folds(bench):
    from sklearn.linear_model import LogisticRegression

    # Fold 1's labels run against its feature; its scores are those of a fit on folds 0 and 2 alone.
    x = np.array([-2.0, -1.0, 1.0, 2.0, -2.0, -1.0, 1.0, 2.0, -2.0, -1.0, 1.0, 2.0])
    y = np.array([0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1])
    folds = np.repeat([0, 1, 2], 4)
    p = bench.cross_fitted_logistic(x, y, folds)
    for fold in range(3):
        held = folds == fold
        expected = LogisticRegression().fit(x[~held, None], y[~held]).predict_proba(x[held, None])[:, 1]
        assert p[held] == pytest.approx(expected, abs=1e-12)
    assert p[4] < p[5] < p[6] < p[7]  # increasing in x, as folds 0 and 2 taught, though fold 1 falls


def test_choose_keeps_the_image_unless_significantly_better(bench):
    rows = [
        {"key": "image", "auc": 0.83},
        {"key": "a", "auc": 0.85, "delta": 0.02, "p": 0.20},
        {"key": "b", "auc": 0.80, "delta": -0.03, "p": 0.01},
    ]
    assert bench.choose(rows, "image") == "image"
    rows.append({"key": "c", "auc": 0.84, "delta": 0.01, "p": 0.03})
    rows.append({"key": "d", "auc": 0.845, "delta": 0.015, "p": 0.04})
    assert bench.choose(rows, "image") == "d"
