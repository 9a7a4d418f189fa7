"""The reliability diagram of the bundle's final P(opacity) (``MODEL/calibration.png``).

The figure is drawn from the model card's calibration block (the dict of
:class:`lungopacity.engine.calibration.CalibrationSummary`), never recomputed, so the
picture and ``bundle.json`` cannot disagree; :func:`reliability_figure` returns what it
put on the axes, read back from the drawn artists, which the tests compare with the card.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lungopacity.reports.plots import new_figure, save_figure


def _curve(bins: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(m, o) for m, o, c in zip(bins["mean_predicted"], bins["observed"], bins["count"]) if c > 0]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    predicted, observed = zip(*pairs)
    return np.asarray(predicted, dtype=float), np.asarray(observed, dtype=float)


def reliability_figure(summary: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """Observed opacity rate against predicted P(opacity), before and after calibration, with bin counts.

    Args:
        summary: the model card's ``calibration`` block (``CalibrationSummary.to_dict()``).
        path: the PNG to write.

    Returns:
        What was drawn, read from the figure: ``legend`` (the two curves' labels with
        their ECE), ``before`` / ``after`` (``x``, ``y`` of the points) and ``counts``
        (``before`` / ``after``: the bar heights, one per bin).
    """
    figure, (ax, bars) = new_figure(5.5, 6.5, nrows=2)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    edges = np.asarray(summary["bin_edges"], dtype=float)
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    labels = {
        "before": f"before (T = 1): ECE {summary['ece_before']:.3f}",
        "after": f"after (T = {summary['temperature']:.3f}): ECE {summary['ece_after']:.3f}",
    }
    curves = {}
    for key, colour, offset in (("before", "tab:orange", -0.2), ("after", "tab:blue", 0.2)):
        x, y = _curve(summary[key])
        (curves[key],) = ax.plot(x, y, marker="o", color=colour, label=labels[key])
        bars.bar(centres + offset * width, summary[key]["count"], width=0.4 * width, color=colour,
                 label=key, gid=f"counts_{key}")
    for key, offset in (("before", -0.2), ("after", 0.2)):
        for centre, count in zip(centres + offset * width, summary[key]["count"]):
            if count:
                bars.annotate(str(count), (centre, count), ha="center", va="bottom", fontsize=7)
    cross = summary.get("ece_after_cross_fitted")
    ax.set_xlabel("predicted P(opacity)")
    ax.set_ylabel("observed opacity rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    title = f"{summary['quantity']}\n{summary['n']} held-out patients ({summary['n_positive']} with opacity)"
    if cross is not None:
        title += f"; cross-fitted ECE after {cross:.3f}"
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    bars.set_xlim(0, 1)
    bars.set_xlabel(f"predicted P(opacity), {len(centres)} bins")
    bars.set_ylabel("patients per bin")
    bars.legend(fontsize=8)
    drawn = {
        "legend": [text.get_text() for text in ax.get_legend().get_texts()][1:],
        **{key: {"x": [float(v) for v in line.get_xdata()], "y": [float(v) for v in line.get_ydata()]}
           for key, line in curves.items()},
        "counts": {key: [int(round(p.get_height())) for p in bars.patches if p.get_gid() == f"counts_{key}"]
                   for key in ("before", "after")},
    }
    save_figure(figure, path, dpi=120)
    return drawn
