"""The reliability diagram of the bundle's calibration (``MODEL/calibration.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lungopacity.metrics.classification import expected_calibration_error, reliability_curve
from lungopacity.reports.plots import new_figure, save_figure


def reliability_figure(labels: np.ndarray, before: np.ndarray, after: np.ndarray, path: str | Path) -> Path:
    """Observed frequency against predicted probability, before and after temperature scaling."""
    figure, ax = new_figure(5.0, 5.0)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    for probs, name in ((before, "before"), (after, "after temperature scaling")):
        curve = reliability_curve(labels, probs, n_bins=10)
        ece = expected_calibration_error(labels, probs, n_bins=10)
        mask = curve.count > 0
        ax.plot(curve.mean_predicted[mask], curve.observed_frequency[mask], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("predicted probability (top class)")
    ax.set_ylabel("observed frequency")
    ax.set_title("Reliability diagram, held-out patients")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(figure, path, dpi=120)
