"""Figure helpers shared by the reports (matplotlib without pyplot: Agg, no display, no global state).

Figures are built as :class:`matplotlib.figure.Figure` objects directly, so they render
with the Agg backend whatever backend the process has chosen and are freed when they go
out of scope (pyplot would keep every figure alive in its global registry).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

#: Line colours for curves, in class-code order first (Normal, Not Normal, Lung Opacity).
CURVE_COLORS: tuple[str, ...] = ("#2b7bba", "#7f7f7f", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def new_figure(width: float = 6.0, height: float = 5.0, nrows: int = 1, ncols: int = 1) -> tuple[Figure, Any]:
    """A pyplot-free figure and its axes (one ``Axes`` or an array of them, as ``subplots``)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=True)
    return figure, axes


def save_figure(figure: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write a figure as PNG atomically (temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, path)
    return path


def wrap_label(text: str, width: int = 16) -> str:
    """Break a long class name over lines for tick labels."""
    return "\n".join(textwrap.wrap(text, width)) or text


def plot_roc_curves(
    ax: Axes,
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
    title: str | None = None,
    colors: Sequence[str] = CURVE_COLORS,
) -> None:
    """Draw ROC curves on ``ax``: each ``(label, fpr, tpr)`` as a step-free polyline, with the chance line.

    The label is shown in the legend as given (callers put the AUC in it).
    """
    ax.plot([0, 1], [0, 1], linestyle="--", color="#bbbbbb", linewidth=1, label="chance")
    for k, (label, fpr, tpr) in enumerate(curves):
        ax.plot(np.asarray(fpr), np.asarray(tpr), color=colors[k % len(colors)], linewidth=2, label=label)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)


def plot_confusion_matrix(
    ax: Axes, matrix: np.ndarray, class_names: Sequence[str], title: str | None = None
) -> None:
    """Draw a confusion matrix (rows = true class, columns = predicted).

    Cell colour is the share of the true class (row-normalised), so classes of very
    different sizes read alike; each cell is annotated with the count and that share.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_totals, out=np.zeros(counts.shape, dtype=np.float64), where=row_totals > 0)
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(
                j, i, f"{counts[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center",
                color="white" if shares[i, j] > 0.6 else "black", fontsize="small",
            )
    labels = [wrap_label(name) for name in class_names]
    ax.set_xticks(range(len(labels)), labels, fontsize="small")
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    if title:
        ax.set_title(title)
