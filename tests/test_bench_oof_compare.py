"""benchmarks/bench_oof_compare.py: an ensemble row is scored as a bundle scores it.

A bundle of several runs averages their logits and takes the softmax; the mean of the
runs' probabilities is another number. Hand-built runs where the two differ.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import special

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_oof_compare.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_oof_compare", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_oof_compare"] = module
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, logits: np.ndarray, patients: list[str]) -> Path:
    folder.mkdir(parents=True)
    probabilities = special.softmax(logits, axis=1)
    pd.DataFrame({"patientId": patients, "fold": 0,
                  "p_normal": probabilities[:, 0], "p_not_normal": probabilities[:, 1],
                  "p_lung_opacity": probabilities[:, 2],
                  "logit_normal": logits[:, 0], "logit_not_normal": logits[:, 1],
                  "logit_lung_opacity": logits[:, 2], "class": 0, "Target": 0}).to_csv(folder / "oof.csv", index=False)
    return folder


def test_a_group_is_the_softmax_of_the_mean_logits(bench, tmp_path):
    patients = ["a", "b"]
    first = write_run(tmp_path / "r0", np.array([[0.0, 0.0, 4.0], [0.0, 0.0, 0.0]]), patients)
    second = write_run(tmp_path / "r1", np.array([[0.0, 0.0, -2.0], [2.0, 0.0, 0.0]]), patients)
    label, score = bench.group_scores(f"pair={first},{second}", pd.Index(["b", "a"]))
    assert label == "pair"
    # b: mean logits (1, 0, 0); a: (0, 0, 1); in the order asked for.
    expected = [1 / (np.e + 2), np.e / (np.e + 2)]
    np.testing.assert_allclose(score, expected, rtol=1e-12)
    mean_probability_a = (special.softmax([0, 0, 4.0])[2] + special.softmax([0, 0, -2.0])[2]) / 2
    assert abs(mean_probability_a - score[1]) > 0.05  # the other rule would give another number


def test_a_bad_group_or_a_missing_run_is_one_line(bench, tmp_path):
    run = write_run(tmp_path / "r0", np.zeros((1, 3)), ["a"])
    with pytest.raises(SystemExit, match="LABEL=RUN"):
        bench.group_scores("no-runs", pd.Index(["a"]))
    with pytest.raises(SystemExit, match="does not cover the same patients"):
        bench.group_scores(f"g={run}", pd.Index(["a", "z"]))
    with pytest.raises(SystemExit, match="oof.csv: missing"):
        bench.group_scores(f"g={tmp_path / 'absent'}", pd.Index(["a"]))
