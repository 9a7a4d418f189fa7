"""Does the fusion network add anything? Metadata-only vs image-only vs fusion, same patients.

:func:`fusion_comparison_report` takes one row per patient with the label and the three
held-out scores (``engine.fusion.cross_fit_scores`` produces exactly that) and writes

* ``fusion_metrics.json``: AUC with a 95 % bootstrap interval per model, DeLong and paired
  bootstrap tests of fusion against image-only (and against metadata-only);
* ``fusion_roc.png``: the three ROC curves in one figure;
* ``fusion_report.md``: the same figures as a short Markdown page.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungopacity.errors import ConfigError
from lungopacity.metrics.classification import (
    bootstrap_auc_ci,
    delong_test,
    paired_bootstrap_auc_test,
    roc_curve,
)
from lungopacity.models.fusion import MISSING_FIELDS, SCORE_COLUMNS
from lungopacity.reports.plots import new_figure, plot_roc_curves, save_figure
from lungopacity.reports.text import interval as format_interval

logger = logging.getLogger(__name__)

REPORT_FILE = "fusion_report.md"
ROC_FILE = "fusion_roc.png"
METRICS_FILE = "fusion_metrics.json"


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _comparison(labels: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, n_bootstrap: int,
                seed: int) -> dict[str, Any]:
    delong = delong_test(labels, score_a, score_b)
    paired = paired_bootstrap_auc_test(labels, score_a, score_b, n_boot=n_bootstrap, seed=seed)
    return {
        "auc_difference": float(delong.auc_a - delong.auc_b),
        "delong_z": _json_number(delong.z),
        "delong_p": float(delong.p),
        "bootstrap_difference_ci95": [float(paired.lo), float(paired.hi)],
        "bootstrap_p": float(paired.p),
    }


def fusion_comparison_report(
    table_with_scores: pd.DataFrame,
    out_dir: str | Path,
    *,
    score_columns: Mapping[str, str] | None = None,
    label_column: str = "Target",
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare metadata-only, image-only and fusion P(opacity) on the same patients.

    Args:
        table_with_scores: one row per patient with ``label_column`` (0/1) and the score
            columns; optional ``missing_sex/age/view`` columns are counted in the report.
        out_dir: folder to write into (created).
        score_columns: model name -> column; default
            :data:`lungopacity.models.fusion.SCORE_COLUMNS` (``p_metadata``, ``p_image``,
            ``p_fusion``). Must contain ``"fusion"`` and ``"image-only"``.
        label_column: the binary opacity label.
        n_bootstrap: bootstrap replicates for the intervals and the paired test.
        seed: bootstrap seed (same seed, same figures).

    Returns:
        The metrics written to ``fusion_metrics.json``.

    Raises:
        ValueError: absent columns, NaN scores, or labels without both classes.
    """
    columns = dict(score_columns or SCORE_COLUMNS)
    for required in ("fusion", "image-only"):
        if required not in columns:
            raise ConfigError(f"score_columns must name a {required!r} column, got {columns}")
    absent = [c for c in [label_column, *columns.values()] if c not in table_with_scores.columns]
    if absent:
        raise ConfigError(f"fusion comparison table lacks columns {absent}")
    labels = table_with_scores[label_column].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise ConfigError(f"{label_column} must be 0/1")
    labels = labels.astype(np.int64)
    scores: dict[str, np.ndarray] = {}
    for name, column in columns.items():
        values = pd.to_numeric(table_with_scores[column], errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(values).any():
            raise ConfigError(f"{column} ({name}) has {int(np.isnan(values).sum())} missing scores")
        scores[name] = values

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, Any] = {}
    for name, values in scores.items():
        interval = bootstrap_auc_ci(labels, values, n_boot=n_bootstrap, seed=seed)
        models[name] = {"column": columns[name], "auc": interval.auc, "ci95": [interval.lo, interval.hi]}
    comparisons = {"fusion_vs_image-only": _comparison(labels, scores["fusion"], scores["image-only"],
                                                       n_bootstrap, seed)}
    if "metadata-only" in scores:
        comparisons["fusion_vs_metadata-only"] = _comparison(labels, scores["fusion"], scores["metadata-only"],
                                                             n_bootstrap, seed)
    missing_counts = {
        name: int(table_with_scores[f"missing_{name}"].astype(bool).sum())
        for name in MISSING_FIELDS
        if f"missing_{name}" in table_with_scores.columns
    }
    metrics: dict[str, Any] = {
        "n_patients": int(labels.size),
        "n_opacity": int(labels.sum()),
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "models": models,
        "comparisons": comparisons,
        "missing_inputs": missing_counts,
    }

    _plot_rocs(labels, scores, models, out / ROC_FILE)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / REPORT_FILE).write_text(_markdown(metrics), encoding="utf-8")
    logger.info("fusion comparison report written to %s", out)
    return metrics


def _plot_rocs(labels: np.ndarray, scores: Mapping[str, np.ndarray], models: Mapping[str, Any], path: Path) -> None:
    curves = []
    for name, values in scores.items():
        fpr, tpr, _ = roc_curve(labels, values)
        low, high = models[name]["ci95"]
        curves.append((f"{name}: AUC {models[name]['auc']:.3f} [{low:.3f}, {high:.3f}]", fpr, tpr))
    figure, axes = new_figure(5.5, 5.5)
    plot_roc_curves(axes, curves, title=f"Opacity ROC, {labels.size} patients ({int(labels.sum())} with opacity)")
    save_figure(figure, path, dpi=120)


def _markdown(metrics: Mapping[str, Any]) -> str:
    lines = [
        "# Fusion network: does metadata add to the image classifier?",
        "",
        f"{metrics['n_patients']} patients ({metrics['n_opacity']} with opacity), the same patients for every "
        f"model; 95 % intervals from {metrics['n_bootstrap']} stratified bootstrap replicates "
        f"(seed {metrics['seed']}).",
        "",
        "| model | score column | AUC | 95 % CI |",
        "|---|---|---|---|",
    ]
    for name, entry in metrics["models"].items():
        low, high = entry["ci95"]
        lines.append(f"| {name} | `{entry['column']}` | {entry['auc']:.4f} | {format_interval((low, high), 4)} |")
    lines += ["", "## Paired tests", "", "| comparison | AUC difference | DeLong z | DeLong p | "
              "bootstrap 95 % CI of the difference | bootstrap p |", "|---|---|---|---|---|---|"]
    for name, entry in metrics["comparisons"].items():
        low, high = entry["bootstrap_difference_ci95"]
        z = "inf" if entry["delong_z"] is None else f"{entry['delong_z']:.2f}"
        lines.append(f"| {name.replace('_', ' ')} | {entry['auc_difference']:+.4f} | {z} | {entry['delong_p']:.3g} | "
                     f"{format_interval((low, high), 4, signed=True)} | {entry['bootstrap_p']:.3g} |")
    if metrics["missing_inputs"]:
        counts = ", ".join(f"{name} {count}" for name, count in metrics["missing_inputs"].items())
        lines += ["", f"Imputed (missing) metadata inputs: {counts}."]
    lines += ["", f"![ROC curves]({ROC_FILE})", ""]
    return "\n".join(lines)
