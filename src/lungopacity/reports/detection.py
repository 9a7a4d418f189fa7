"""The detector's evaluation report: metric tables, best and worst cases, Markdown.

Pure functions over per-patient boxes (xyxy, original pixels); the orchestration (load a
run, predict, post-process) is :func:`lungopacity.engine.evaluate_detection.evaluate_detector`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lungopacity.metrics.rsna_map import (
    RSNA_IOU_THRESHOLDS,
    per_image_precision,
    precision_per_threshold,
    sensitivity_at_fppi,
)
from lungopacity.reports.overlays import contact_sheet, overlay_png

log = logging.getLogger(__name__)

FPPI_POINTS: tuple[float, ...] = (0.5, 1.0, 2.0)
REPORT_JSON, REPORT_MD = "report.json", "report.md"


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: undefined metrics are written as null."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def detection_metrics(
    gt: Sequence[ArrayLike],
    boxes: Sequence[ArrayLike],
    scores: Sequence[ArrayLike],
    ranked_boxes: Sequence[ArrayLike] | None = None,
    ranked_scores: Sequence[ArrayLike] | None = None,
) -> dict[str, Any]:
    """The RSNA metric, precision at each IoU threshold and FROC points of a set of patients.

    Args:
        gt: per patient ground-truth boxes.
        boxes, scores: the final (thresholded) predictions: what a submission holds.
        ranked_boxes, ranked_scores: the same predictions before the confidence threshold,
            for the sensitivity at 0.5 / 1 / 2 false positives per image (a threshold
            would cut the FROC curve short); default: ``boxes``/``scores``.

    Returns:
        ``rsna_map``, ``precision_at_iou`` ({"0.40": ...}), ``sensitivity_at_fppi``
        ({"0.5": ...}, IoU > 0.5), ``n_patients``, ``n_positive``, ``n_gt_boxes``,
        ``n_pred_boxes``, ``n_scored``, and ``per_image`` (the image scores, NaN where
        an image has neither ground truth nor predictions).
    """
    ranked_boxes = boxes if ranked_boxes is None else ranked_boxes
    ranked_scores = scores if ranked_scores is None else ranked_scores
    n = len(gt)
    n_gt_boxes = int(sum(len(np.asarray(g).reshape(-1, 4)) for g in gt))
    if n == 0:
        per_image = np.zeros(0)
    else:
        per_image = per_image_precision(gt, boxes, scores)
    counted = ~np.isnan(per_image)
    if n and counted.any():
        per_threshold = precision_per_threshold(gt, boxes, scores)
    else:
        per_threshold = np.full(len(RSNA_IOU_THRESHOLDS), np.nan)
    if n and n_gt_boxes:
        sensitivity = sensitivity_at_fppi(gt, ranked_boxes, ranked_scores, FPPI_POINTS)
    else:
        sensitivity = {f: float("nan") for f in FPPI_POINTS}
    return {
        "rsna_map": float(per_image[counted].mean()) if counted.any() else float("nan"),
        "precision_at_iou": {f"{t:.2f}": float(v) for t, v in zip(RSNA_IOU_THRESHOLDS, per_threshold)},
        "sensitivity_at_fppi": {f"{f:g}": float(v) for f, v in sensitivity.items()},
        "n_patients": n,
        "n_positive": int(sum(len(np.asarray(g).reshape(-1, 4)) > 0 for g in gt)),
        "n_gt_boxes": n_gt_boxes,
        "n_pred_boxes": int(sum(len(np.asarray(b).reshape(-1, 4)) for b in boxes)),
        "n_scored": int(counted.sum()),
        "per_image": per_image,
    }


def metrics_by_view(
    views: Sequence[Any],
    gt: Sequence[ArrayLike],
    boxes: Sequence[ArrayLike],
    scores: Sequence[ArrayLike],
    ranked_boxes: Sequence[ArrayLike] | None = None,
    ranked_scores: Sequence[ArrayLike] | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`detection_metrics` per view position ('AP', 'PA', and 'unknown' when some lack one)."""
    ranked_boxes = boxes if ranked_boxes is None else ranked_boxes
    ranked_scores = scores if ranked_scores is None else ranked_scores
    labels = np.array([v if isinstance(v, str) and v else "unknown" for v in views], dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for view in [v for v in ("AP", "PA", "unknown") if (labels == v).any()]:
        idx = np.flatnonzero(labels == view)
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        metrics = detection_metrics(pick(gt), pick(boxes), pick(scores), pick(ranked_boxes), pick(ranked_scores))
        metrics.pop("per_image")
        out[view] = metrics
    return out


def select_cases(
    per_image: np.ndarray, n_gt: np.ndarray, n_pred: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the best and worst scored patients; no patient is on both sheets.

    Best: the highest image scores among patients with ground truth (a true negative is
    not interesting to look at). Worst: the lowest image scores, most boxes involved
    first (a missed pair of opacities before a single false alarm), among the patients
    not already shown as best. When fewer than ``2 * count`` patients are scored, the
    best sheet takes at most half of them (rounded up) so the worst sheet is not empty.
    Patients that are left out of the metric (no boxes either way) are never picked.
    """
    per_image = np.asarray(per_image, dtype=np.float64)
    n_gt, n_pred = np.asarray(n_gt), np.asarray(n_pred)
    counted = np.flatnonzero(~np.isnan(per_image))
    positive = counted[n_gt[counted] > 0]
    n_best = min(count, -(-len(counted) // 2)) if len(counted) < 2 * count else count
    best = positive[np.lexsort((-(n_gt[positive]), -per_image[positive]))][:n_best]
    rest = counted[~np.isin(counted, best)]
    worst = rest[np.lexsort((-(n_gt[rest] + n_pred[rest]), per_image[rest]))][:count]
    return best, worst


def note_sheet(text: str, width: int = 480, height: int = 120) -> bytes:
    """A PNG holding one line of text: what a case sheet shows when no patient is left for it."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("L", (width, height), 235)
    ImageDraw.Draw(image).multiline_text((12, 12), text, fill=20)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def case_sheet(
    images: Sequence[np.ndarray],
    scales: Sequence[tuple[float, float]],
    gt: Sequence[ArrayLike],
    boxes: Sequence[ArrayLike],
    scores: Sequence[ArrayLike],
    titles: Sequence[str],
    columns: int = 4,
    min_side: int = 384,
) -> bytes:
    """A contact sheet of overlays (all boxes of each patient, Figure 10 style).

    Args:
        images: float ``(H, W)`` images in [0, 1] (e.g. the prepared cache's).
        scales: per image ``(sx, sy)`` from box pixels (original) to image pixels.
        gt, boxes, scores: per image ground truth, predicted boxes and their scores.
        titles: per image caption.
        columns: tiles per row.
        min_side: smaller images are enlarged to this side first, so that box labels
            stay legible on small prepared images; only the first tile names the colours.
    """
    from PIL import Image

    tiles = []
    for k, (image, scale, g, b, s, t) in enumerate(zip(images, scales, gt, boxes, scores, titles)):
        image = np.asarray(image, dtype=np.float32)
        factor = max(1.0, min_side / max(min(image.shape), 1))
        if factor > 1.0:
            height, width = image.shape
            size = (round(width * factor), round(height * factor))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
            scale = (scale[0] * size[0] / width, scale[1] * size[1] / height)
        tiles.append(overlay_png(image, g, b, s, title=t, scale=scale, legend=k == 0))
    return contact_sheet(tiles, columns=columns)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown a person can read."""
    runs = report["run"]
    title = runs if isinstance(runs, str) else f"{len(runs)} fold runs out of fold ({', '.join(runs)})"
    lines = [f"# Detector evaluation: {title}", ""]
    lines.append(
        f"Cache `{report['cache']}`, split **{report['split']}**: {report['n_patients']} patients, "
        f"{report['n_positive']} with opacity. Boxes in original pixels."
    )
    lines += ["", "## Variants", "", "| variant | post-processing | RSNA metric | cross-fitted | boxes |",
              "|---|---|---|---|---|"]
    for name, variant in report["variants"].items():
        crossed = _fmt(variant.get("cross_fitted_rsna_map"))
        if variant.get("cross_fitted_rsna_map_ci95"):
            low, high = variant["cross_fitted_rsna_map_ci95"]
            crossed += f" [{_fmt(low)}, {_fmt(high)}]"
        lines.append(
            f"| {name} | {variant['postprocess_description']} | {_fmt(variant['metrics']['rsna_map'])} | "
            f"{crossed} | {variant['metrics']['n_pred_boxes']} |"
        )
    lines += ["", f"Main variant: **{report['main_variant']}**. " + report.get("tuning_note", ""), ""]
    main = report["variants"][report["main_variant"]]["metrics"]
    lines += ["## Precision per IoU threshold (main variant)", "",
              "| IoU | " + " | ".join(main["precision_at_iou"]) + " |",
              "|---" * (len(main["precision_at_iou"]) + 1) + "|",
              "| TP/(TP+FP+FN) | " + " | ".join(_fmt(v) for v in main["precision_at_iou"].values()) + " |", ""]
    lines += ["## Sensitivity at false positives per image (IoU > 0.5)", "", "| variant | "
              + " | ".join(f"{k} FP/image" for k in main["sensitivity_at_fppi"]) + " |",
              "|---" * (len(main["sensitivity_at_fppi"]) + 1) + "|"]
    for name, variant in report["variants"].items():
        values = variant["metrics"]["sensitivity_at_fppi"].values()
        lines.append(f"| {name} | " + " | ".join(_fmt(v, 3) for v in values) + " |")
    lines += ["", "## By view (main variant)", "",
              "| view | patients | with opacity | RSNA metric | sens. @1 FP/image |",
              "|---|---|---|---|---|"]
    for view, metrics in report["by_view"].items():
        lines.append(
            f"| {view} | {metrics['n_patients']} | {metrics['n_positive']} | {_fmt(metrics['rsna_map'])} | "
            f"{_fmt(metrics['sensitivity_at_fppi'].get('1'), 3)} |"
        )
    lines += ["", "## Files", ""]
    for label, path in report["files"].items():
        lines.append(f"- {label}: `{path}`")
    lines.append("")
    return "\n".join(lines)


def write_report(out_dir: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` (NaN as null) and ``report.md``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = _nan_to_none(report)
    json_path, md_path = out_dir / REPORT_JSON, out_dir / REPORT_MD
    json_path.write_text(json.dumps(clean, indent=2))
    md_path.write_text(render_markdown(clean))
    return json_path, md_path
