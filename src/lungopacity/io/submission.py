"""RSNA submission files: write, read back, and score against the official labels.

A submission is a CSV with the header ``patientId,PredictionString``, one row per
patient; the prediction string holds, for each box, ``confidence x y width height`` in
original pixels, separated by spaces, and is empty when the patient has no box. This
module (with :mod:`lungopacity.io.rsna`) is the only place where the ``x y width height``
form exists: everything it returns holds boxes as xyxy.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from lungopacity.errors import ConfigError
from lungopacity.io.errors import DataFormatError
from lungopacity.io.rsna import (
    CLASS_INFO_CSV,
    boxes_per_patient,
    load_label_tables,
    object_column,
    read_labels_csv,
    split_rows,
)
from lungopacity.metrics.rsna_map import (
    RSNA_IOU_THRESHOLDS,
    precision_matrix,
    sensitivity_at_fppi,
)

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS: tuple[str, str] = ("patientId", "PredictionString")
FPPI_POINTS: tuple[float, ...] = (0.5, 1.0, 2.0)


def _format_number(value: float, decimals: int | None) -> str:
    if decimals is not None:
        text = f"{value:.{decimals}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))  # the shortest text that reads back as the same float64


def format_prediction_string(boxes: ArrayLike | None, scores: ArrayLike | None, decimals: int | None = None) -> str:
    """``"c x y w h c x y w h ..."`` for xyxy boxes and their confidences (input order kept).

    Args:
        boxes: ``(N, 4)`` xyxy in original pixels.
        scores: ``(N,)`` confidences.
        decimals: round every number to this many decimals; ``None`` (default) writes
            each as the shortest text that reads back as the same float64.

    Raises:
        ValueError: non-finite values, a box with x2 < x1 or y2 < y1, or counts that differ.
    """
    array = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    confidences = np.zeros(0) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(array) != len(confidences):
        raise ConfigError(f"{len(array)} boxes but {len(confidences)} scores")
    if not (np.all(np.isfinite(array)) and np.all(np.isfinite(confidences))):
        raise ConfigError("boxes and scores must be finite")
    widths, heights = array[:, 2] - array[:, 0], array[:, 3] - array[:, 1]
    if np.any(widths < 0) or np.any(heights < 0):
        raise ConfigError("boxes must be xyxy with x1 <= x2 and y1 <= y2")
    parts = []
    for (x1, y1, _, _), w, h, c in zip(array, widths, heights, confidences):
        parts.append(" ".join(_format_number(v, decimals) for v in (c, x1, y1, w, h)))
    return " ".join(parts)


def parse_prediction_string(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`format_prediction_string`: xyxy boxes ``(N, 4)`` and scores ``(N,)``.

    Raises:
        ValueError: a token count that is not a multiple of 5, a token that is not a
            finite number, or a negative width or height (the message says which).
    """
    tokens = text.split()
    if len(tokens) % 5:
        raise ConfigError(
            f"{len(tokens)} values; a prediction string holds groups of 5 (confidence x y width height)"
        )
    values = np.empty(len(tokens), dtype=np.float64)
    for k, token in enumerate(tokens):
        try:
            values[k] = float(token)
        except ValueError:
            raise ConfigError(f"value {k + 1} ({token!r}) is not a number") from None
        if not math.isfinite(values[k]):
            raise ConfigError(f"value {k + 1} ({token!r}) is not finite")
    groups = values.reshape(-1, 5)
    bad = np.flatnonzero((groups[:, 3] < 0) | (groups[:, 4] < 0))
    if bad.size:
        raise ConfigError(f"box {bad[0] + 1} has a negative width or height")
    boxes = groups[:, 1:].copy()
    boxes[:, 2] += boxes[:, 0]
    boxes[:, 3] += boxes[:, 1]
    return boxes, groups[:, 0].copy()


class _BadPredictionString(ValueError):
    """The first malformed string of a batch: its position and what is wrong with it."""

    def __init__(self, index: int, cause: str) -> None:
        super().__init__(cause)
        self.index, self.cause = index, cause


def parse_prediction_strings(texts: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """:func:`parse_prediction_string` for many strings at once, with the same results.

    The strings are split and converted with one ``float`` pass over all their tokens
    and checked as one array; only when that finds a problem are they parsed again one
    by one, so the error is the one :func:`parse_prediction_string` gives for the first
    malformed string.

    Returns:
        Per string, xyxy boxes ``(N, 4)`` and scores ``(N,)`` (float64).

    Raises:
        ValueError: the first malformed string; ``.index`` is its position and
            ``.cause`` the message :func:`parse_prediction_string` gives for it.
    """
    if len(texts) == 0:
        return [], []
    token_lists = [text.split() for text in texts]
    counts = np.fromiter(map(len, token_lists), dtype=np.intp, count=len(token_lists))
    values: np.ndarray | None = None
    if not (counts % 5).any():
        try:
            values = np.array(list(map(float, itertools.chain.from_iterable(token_lists))), dtype=np.float64)
        except ValueError:
            values = None
    if values is not None:
        groups = values.reshape(-1, 5)
        if not (np.isfinite(values).all() and (groups[:, 3:] >= 0).all()):
            values = None
    if values is None:
        for index, text in enumerate(texts):  # slow path, reached only when a string is bad
            try:
                parse_prediction_string(text)
            except ValueError as exc:
                raise _BadPredictionString(index, str(exc)) from None
        raise AssertionError("the batch check and parse_prediction_string disagree")  # pragma: no cover
    boxes = groups[:, 1:].copy()
    boxes[:, 2] += boxes[:, 0]
    boxes[:, 3] += boxes[:, 1]
    scores = groups[:, 0].copy()
    return split_rows(boxes, counts // 5), split_rows(scores, counts // 5)


def write_submission(
    path: str | Path,
    ids: Sequence[str],
    boxes_list: Sequence[ArrayLike | None],
    scores_list: Sequence[ArrayLike | None],
    *,
    decimals: int | None = None,
) -> Path:
    """Write a submission CSV: ``patientId,PredictionString``, one row per patient.

    Args:
        path: the file to write (its folder is created).
        ids: patient ids, unique.
        boxes_list: per patient, ``(N, 4)`` xyxy boxes in original pixels.
        scores_list: per patient, ``(N,)`` confidences.
        decimals: see :func:`format_prediction_string`.

    Returns:
        The path written.

    Raises:
        ValueError: lengths that differ, duplicate ids, or bad boxes (naming the patient).
    """
    ids = [str(i) for i in ids]
    if not (len(ids) == len(boxes_list) == len(scores_list)):
        raise ConfigError(f"{len(ids)} ids, {len(boxes_list)} box lists and {len(scores_list)} score lists")
    seen: set[str] = set()
    for pid in ids:
        if pid in seen:
            raise ConfigError(f"patient {pid} appears twice")
        seen.add(pid)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(SUBMISSION_COLUMNS)
        for pid, boxes, scores in zip(ids, boxes_list, scores_list):
            try:
                writer.writerow([pid, format_prediction_string(boxes, scores, decimals)])
            except ValueError as exc:
                raise ConfigError(f"patient {pid}: {exc}") from None
    tmp.replace(path)
    log.info("wrote submission %s (%d patients, %d boxes)", path, len(ids),
             sum(0 if b is None else len(np.asarray(b).reshape(-1, 4)) for b in boxes_list))
    return path


def read_submission(path: str | Path) -> pd.DataFrame:
    """Read a submission CSV back.

    Returns:
        One row per patient, in file order: ``patientId`` (str), ``boxes`` (float64
        ``(N, 4)`` xyxy, original pixels), ``scores`` (float64 ``(N,)``).

    Raises:
        DataFormatError: missing file or columns, an empty or repeated patientId, a
            malformed prediction string (naming the file and the line).
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, "file not found")
    ids: list[str] = []
    texts: list[str] = []
    lines: list[int] = []
    line_of: dict[str, int] = {}
    # The rows are read first and their prediction strings parsed afterwards in one batch.
    # A row error stops the reading but is raised only after the strings before it are
    # parsed, so the error reported is the first in the file, as with row-by-row parsing.
    row_error: DataFormatError | None = None
    try:
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataFormatError(path, "empty file; expected the header patientId,PredictionString")
            header = [h.strip().lstrip("\ufeff") for h in header]
            missing = [c for c in SUBMISSION_COLUMNS if c not in header]
            if missing:
                raise DataFormatError(
                    path, f"missing column(s) {', '.join(missing)}; expected {','.join(SUBMISSION_COLUMNS)}, "
                    f"found {','.join(header)}"
                )
            id_col, pred_col = header.index("patientId"), header.index("PredictionString")
            for row in reader:
                line = reader.line_num
                if not "".join(row).strip():  # a blank line, or only blank cells
                    continue
                if len(row) != len(header):
                    row_error = DataFormatError(path, f"line {line}: {len(row)} fields, expected {len(header)}")
                    break
                pid = row[id_col].strip()
                if not pid:
                    row_error = DataFormatError(path, f"line {line}: empty patientId")
                    break
                if pid in line_of:
                    row_error = DataFormatError(
                        path, f"line {line}: patient {pid} already appeared on line {line_of[pid]}"
                    )
                    break
                line_of[pid] = line
                ids.append(pid)
                texts.append(row[pred_col])
                lines.append(line)
    except UnicodeDecodeError as exc:
        row_error = DataFormatError(path, f"not a text CSV ({exc})")
    except csv.Error as exc:
        row_error = DataFormatError(path, f"not a readable CSV ({exc})")
    try:
        boxes, scores = parse_prediction_strings(texts)
    except _BadPredictionString as exc:
        raise DataFormatError(
            path, f"line {lines[exc.index]}: patient {ids[exc.index]}: bad PredictionString: {exc.cause}"
        ) from None
    if row_error is not None:
        raise row_error
    table = pd.DataFrame({"patientId": pd.Series(ids, dtype=object)})
    table["boxes"] = object_column(boxes)
    table["scores"] = object_column(scores)
    return table


def _labels_table(labels_csv: Path, class_info_csv: str | Path | None) -> pd.DataFrame:
    """Patient-level ground truth: ``load_label_tables`` when the class table is there,
    else the labels file alone (its boxes are all the metric needs)."""
    if labels_csv.is_dir() or class_info_csv is not None or (labels_csv.parent / CLASS_INFO_CSV).exists():
        return load_label_tables(labels_csv, class_info_csv)
    rows = read_labels_csv(labels_csv)
    ids = rows["patientId"].drop_duplicates().tolist()
    boxes = boxes_per_patient(rows, ids)
    table = pd.DataFrame({"patientId": ids})
    table["boxes"] = object_column(boxes)
    table["Target"] = [int(len(b) > 0) for b in boxes]
    return table


def score_submission(
    labels_csv: str | Path,
    submission_csv: str | Path,
    class_info_csv: str | Path | None = None,
) -> dict[str, Any]:
    """Score a submission with the RSNA challenge metric against the official labels.

    Patients in the labels but missing from the submission count as "no prediction";
    a submission patient that is not in the labels is an error.

    Args:
        labels_csv: ``stage_2_train_labels.csv`` (or an RSNA folder); the class table
            beside it is checked when present.
        submission_csv: the submission.
        class_info_csv: the class table, when not beside the labels.

    Returns:
        ``rsna_map``; ``precision_at_iou`` ({IoU threshold: mean TP/(TP+FP+FN)});
        ``sensitivity_at_fppi`` ({0.5, 1, 2 false positives per image: share of boxes
        found at IoU > 0.5}); counts: ``n_patients``, ``n_with_opacity``, ``n_gt_boxes``,
        ``n_predicted_boxes``, ``n_missing`` (labelled patients without a row),
        ``n_scored`` (patients with ground truth or predictions, those the mean runs over).

    Raises:
        DataFormatError: malformed files, or submission patients not in the labels.
    """
    labels_csv = Path(labels_csv)
    labels = _labels_table(labels_csv, class_info_csv)
    submission = read_submission(submission_csv)
    known = set(labels["patientId"])
    unknown = [pid for pid in submission["patientId"] if pid not in known]
    if unknown:
        raise DataFormatError(
            submission_csv, f"{len(unknown)} patients are not in the labels {labels_csv}, e.g. {unknown[0]}"
        )
    by_id = dict(zip(submission["patientId"], zip(submission["boxes"], submission["scores"])))
    empty = (np.zeros((0, 4)), np.zeros(0))
    predictions = [by_id.get(pid, empty) for pid in labels["patientId"]]
    gt = list(labels["boxes"])
    pred_boxes = [p[0] for p in predictions]
    pred_scores = [p[1] for p in predictions]
    # One matching serves both means (per_image_precision and precision_per_threshold
    # would each match the whole dataset again).
    score, counted = precision_matrix(gt, pred_boxes, pred_scores)
    per_image = np.where(counted, score.mean(axis=1), np.nan)
    if counted.any():
        per_threshold = score[counted].mean(axis=0)
    else:
        log.warning("no image has ground truth or predictions; the metric is undefined")
        per_threshold = np.full(score.shape[1], np.nan)
    n_gt_boxes = int(sum(len(b) for b in gt))
    result: dict[str, Any] = {
        "rsna_map": float(per_image[counted].mean()) if counted.any() else float("nan"),
        "precision_at_iou": {f"{t:.2f}": float(v) for t, v in zip(RSNA_IOU_THRESHOLDS, per_threshold)},
        "sensitivity_at_fppi": (
            {f"{k:g}": v for k, v in sensitivity_at_fppi(gt, pred_boxes, pred_scores, FPPI_POINTS).items()}
            if n_gt_boxes else {f"{k:g}": float("nan") for k in FPPI_POINTS}
        ),
        "n_patients": int(len(labels)),
        "n_with_opacity": int(sum(len(b) > 0 for b in gt)),
        "n_gt_boxes": n_gt_boxes,
        "n_predicted_boxes": int(sum(len(b) for b in pred_boxes)),
        "n_missing": int(len(labels) - len(submission)),
        "n_scored": int(counted.sum()),
    }
    log.info(
        "%s: RSNA metric %.4f over %d scored patients (%d of %d labelled patients had no row)",
        submission_csv, result["rsna_map"], result["n_scored"], result["n_missing"], result["n_patients"],
    )
    return result
