"""The classifier's evaluation report: ``report.md`` with the ROC per class and the confusion matrix.

The figures are the paper's Figure 7 (one-vs-rest ROC curve of each class, in one plot),
the confusion matrix of the arg-max class, and the opacity ROC of AP and PA views.
Numbers come from the metrics dict of :func:`lungopacity.engine.evaluate.classifier_metrics`;
the curves from the predictions table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungopacity.constants import CLASS_KEYS, CLASS_NAMES, LUNG_OPACITY, VIEWS
from lungopacity.metrics.classification import roc_curve
from lungopacity.reports.plots import new_figure, plot_confusion_matrix, plot_roc_curves, save_figure
from lungopacity.reports.text import interval as format_interval

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
ROC_PER_CLASS_PNG = "roc_per_class.png"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
ROC_BY_VIEW_PNG = "roc_opacity_by_view.png"
PROBABILITY_COLUMNS = tuple(f"p_{key}" for key in CLASS_KEYS)

_SOURCE_TEXT = {
    "oof": "out-of-fold probabilities of the run (`oof.csv`): each patient scored by the fold model that did not train on it",
    "ensemble": "the run's fold models, averaged in logit space (patients none of them trained on)",
    "model": "the run's model",
}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(interval: Sequence[float] | None) -> str:
    return format_interval(interval)


def _roc_label(name: str, auc: float | None, interval: Sequence[float] | None) -> str:
    label = f"{name}: AUC {_fmt(auc)}"
    return label + (f" {_fmt_ci(interval)}" if interval is not None else "")


def roc_per_class_figure(predictions: pd.DataFrame, metrics: Mapping[str, Any], path: str | Path) -> Path | None:
    """One-vs-rest ROC of every class in one plot (the paper's Figure 7); None when no class has both outcomes."""
    labels = predictions["class"].to_numpy()
    curves = []
    for k, name in enumerate(CLASS_NAMES):
        is_class = labels == k
        if is_class.all() or not is_class.any():
            continue
        fpr, tpr, _ = roc_curve(is_class, predictions[PROBABILITY_COLUMNS[k]].to_numpy())
        curves.append((_roc_label(name, metrics["class_auc"].get(name), metrics["class_auc_ci"].get(name)), fpr, tpr))
    if not curves:
        return None
    figure, ax = new_figure(6.5, 6.0)
    plot_roc_curves(ax, curves, title=f"ROC per class, one vs rest (n = {len(labels)})")
    return save_figure(figure, path)


def roc_by_view_figure(predictions: pd.DataFrame, metrics: Mapping[str, Any], path: str | Path) -> Path | None:
    """Opacity ROC (P(Lung Opacity)) of AP and PA images; None unless a view has both outcomes."""
    if "view" not in predictions:
        return None
    opacity = predictions["class"].to_numpy() == LUNG_OPACITY
    views = predictions["view"].astype(object).to_numpy()
    curves = []
    for view in VIEWS:
        mask = views == view
        y = opacity[mask]
        if y.size == 0 or y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, predictions[PROBABILITY_COLUMNS[LUNG_OPACITY]].to_numpy()[mask])
        curves.append((f"{view} (n = {int(mask.sum())}): AUC {_fmt(metrics['view_opacity_auc'].get(view))}", fpr, tpr))
    if not curves:
        return None
    figure, ax = new_figure(6.0, 5.5)
    plot_roc_curves(ax, curves, title="Lung opacity ROC by view", colors=("#9467bd", "#ff7f0e"))
    return save_figure(figure, path)


def confusion_matrix_figure(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """The arg-max confusion matrix, counts and row shares."""
    figure, ax = new_figure(6.0, 5.0)
    plot_confusion_matrix(ax, np.asarray(metrics["confusion_matrix"]), metrics.get("class_names", CLASS_NAMES),
                          title=f"Confusion matrix (accuracy {_fmt(metrics.get('accuracy'))})")
    return save_figure(figure, path)


def _source_paragraph(metrics: Mapping[str, Any]) -> list[str]:
    counts: Mapping[str, int] = metrics.get("source_counts", {})
    lines = ["## Where the probabilities come from", ""]
    for name, count in counts.items():
        lines.append(f"- {count} patients: {_SOURCE_TEXT.get(name, name)}.")
    if counts.get("oof") and metrics.get("same_cache"):
        lines += [
            "",
            f"This is a {metrics.get('folds')}-fold run evaluated on the cache it was trained on: every patient was "
            "in the training folds of all but one fold model, so an ensemble of the fold models would have seen "
            "each of them. The out-of-fold probabilities are used instead; they are honest held-out predictions.",
        ]
    elif counts.get("ensemble") and not counts.get("oof"):
        lines += ["", f"An ensemble of {metrics.get('n_models')} fold models; none of them trained on these patients."]
    return lines + [""]


def classification_report_markdown(metrics: Mapping[str, Any], figures: Mapping[str, str | None]) -> str:
    """The text of ``report.md`` (figures are file names relative to the report)."""
    lines = [
        "# Classifier evaluation",
        "",
        f"- Run: `{metrics.get('run_dir', '?')}`",
        f"- Cache: `{metrics.get('cache_dir', '?')}`, split `{metrics.get('split', '?')}`, "
        f"{'the cache the run trained on' if metrics.get('same_cache') else 'not the cache the run trained on'}",
        f"- Patients: {metrics['n']} ("
        + ", ".join(f"{name} {count}" for name, count in metrics["class_counts"].items())
        + ")",
        f"- Model input size: {metrics.get('input_size', '?')} px; bootstrap: {metrics.get('n_boot')} replicates",
        "",
    ]
    warnings = metrics.get("warnings") or []
    if warnings:
        lines += ["## Warnings", ""] + [f"> **Warning:** {text}" for text in warnings] + [""]
    lines += _source_paragraph(metrics)
    lines += [
        "## Summary",
        "",
        "| metric | value | 95 % CI |",
        "|---|---|---|",
        f"| Lung opacity AUC (binary Target) | {_fmt(metrics['opacity_auc'])} | {_fmt_ci(metrics['opacity_auc_ci'])} |",
        f"| Abnormal vs normal AUC | {_fmt(metrics['abnormal_auc'])} | {_fmt_ci(metrics['abnormal_auc_ci'])} |",
        f"| 3-class accuracy | {_fmt(metrics['accuracy'])} | |",
        "",
        "## ROC per class (one vs rest)",
        "",
        "| class | AUC | 95 % CI |",
        "|---|---|---|",
    ]
    for name in metrics["class_auc"]:
        lines.append(f"| {name} | {_fmt(metrics['class_auc'][name])} | {_fmt_ci(metrics['class_auc_ci'].get(name))} |")
    if figures.get("roc_per_class"):
        lines += ["", f"![ROC per class]({figures['roc_per_class']})"]
    lines += [
        "",
        "## Operating points for lung opacity (P(Lung Opacity) >= threshold)",
        "",
        "| rule | threshold | sensitivity | specificity |",
        "|---|---|---|---|",
    ]
    for key, title in (("youden", "Youden's J (max sens + spec - 1)"), ("sensitivity_90", "90 % sensitivity")):
        point = metrics["operating_points"].get(key)
        if point is None:
            lines.append(f"| {title} | n/a | n/a | n/a |")
        else:
            lines.append(
                f"| {title} | {point['threshold']:.4f} | {point['sensitivity']:.3f} | {point['specificity']:.3f} |"
            )
    lines += ["", "## Lung opacity AUC by view", "", "| view | patients | with opacity | AUC |", "|---|---|---|---|"]
    for view in VIEWS:
        counts = metrics["view_counts"][view]
        lines.append(f"| {view} | {counts['n']} | {counts['opacity']} | {_fmt(metrics['view_opacity_auc'][view])} |")
    if figures.get("roc_by_view"):
        lines += ["", f"![Opacity ROC by view]({figures['roc_by_view']})"]
    names = metrics.get("class_names", list(CLASS_NAMES))
    lines += ["", "## Confusion matrix (rows: true class, columns: predicted)", "", "| true \\ predicted | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for name, row in zip(names, metrics["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |")
    if figures.get("confusion_matrix"):
        lines += ["", f"![Confusion matrix]({figures['confusion_matrix']})"]
    lines += _pointing_paragraph(metrics.get("pointing"))
    lines += ["", "Per-patient probabilities: `predictions.csv`; every number above: `metrics.json`.", ""]
    return "\n".join(lines)


def _pointing_paragraph(pointing: Mapping[str, Any] | None) -> list[str]:
    """The pointing-game section (empty when the evaluated patients had no boxes)."""
    if not pointing:
        return []
    heatmap = pointing.get("heatmap") or {}
    verdict = (
        "the heatmap's maximum hits a box clearly more often than a random point (interval of the gain above 0). "
        "That is a low bar: a point anywhere in the usual opacity region clears it too (on the shared RSNA images "
        "a fixed, model-free prior of where opacities lie hit more often than the heatmap; BENCHMARKS.md, "
        "\"Pointing game\"), so read the map as what raised the score, not as where the opacity is"
        if pointing.get("beats_baseline")
        else "the heatmap's maximum does **not** hit a box clearly more often than a random point "
        "(the interval of the gain includes 0 or lies below it): do not read the map as where the opacity is"
    )
    return [
        "",
        "## Pointing game (does the heatmap's maximum lie inside an opacity box?)",
        "",
        f"{pointing['n']} patients with opacity boxes; heatmap: {heatmap.get('method', '?')} of stages "
        f"{', '.join(str(stage) for stage in heatmap.get('stages', []))}"
        f"{' with horizontal-flip averaging' if heatmap.get('hflip') else ''}, explained by {pointing.get('explained_by', '?')}. "
        "Baseline: the boxes' share of the image (a random point's chance). "
        f"95 % intervals: {pointing.get('n_boot')} bootstrap resamples of the patients.",
        "",
        "| measure | value | 95 % CI |",
        "|---|---|---|",
        f"| hit rate | {_fmt(pointing['hit_rate'])} | {_fmt_ci(pointing['hit_rate_ci'])} |",
        f"| baseline (random point) | {_fmt(pointing['baseline'])} | |",
        f"| gain (hit - baseline, paired) | {_fmt(pointing['gain'])} | {_fmt_ci(pointing['gain_ci'])} |",
        "",
        f"Reading: {verdict}.",
    ]


def write_classification_report(metrics: Mapping[str, Any], predictions: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir``; return the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str | None] = {}
    for key, written in (
        ("roc_per_class", roc_per_class_figure(predictions, metrics, out_dir / ROC_PER_CLASS_PNG)),
        ("roc_by_view", roc_by_view_figure(predictions, metrics, out_dir / ROC_BY_VIEW_PNG)),
        ("confusion_matrix", confusion_matrix_figure(metrics, out_dir / CONFUSION_MATRIX_PNG)),
    ):
        figures[key] = written.name if written is not None else None
    path = out_dir / REPORT_FILE
    tmp = out_dir / f".{REPORT_FILE}.tmp"
    tmp.write_text(classification_report_markdown(metrics, figures))
    tmp.replace(path)
    log.info("classification report written to %s", path)
    return path
