"""The RSNA Pneumonia Detection Challenge metric, and a FROC summary (pure NumPy).

**Boxes are xyxy** (``x1, y1, x2, y2`` in pixels, float arrays of shape ``(N, 4)``), as
everywhere in the package; convert RSNA ``x, y, width, height`` rows with
:func:`lungopacity.metrics.boxes.xywh_to_xyxy` first.

The challenge metric, as implemented here:

* IoU thresholds ``t`` = 0.40, 0.45, ..., 0.75 (:data:`RSNA_IOU_THRESHOLDS`).
* For one image and one threshold, predictions are visited in **descending confidence**
  (equal confidences keep their input order). A prediction is a true positive when some
  ground-truth box not yet matched at this threshold has IoU **strictly greater** than
  ``t`` with it (IoU == 0.5 is *not* a hit at 0.5); it then takes the unmatched ground
  truth with the highest IoU (on equal IoU, the first in input order). Otherwise it is a
  false positive. Ground truth left unmatched are false negatives.
* Image score at ``t`` = TP / (TP + FP + FN); image score = mean over the thresholds.
* An image without ground truth scores 0 when it has any prediction and is **left out**
  of the mean when it has none.
* Dataset score = mean of the image scores.

:func:`image_precision` is a short per-image implementation (a Python loop over
predictions); :func:`rsna_map`, :func:`per_image_precision` and
:func:`precision_per_threshold` share one vectorised implementation that pads all
images into arrays and runs the greedy matching for every image and threshold at once,
looping only over prediction rank.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from lungopacity.errors import ConfigError
from lungopacity.metrics.boxes import as_boxes, iou_matrix

logger = logging.getLogger(__name__)

__all__ = [
    "RSNA_IOU_THRESHOLDS",
    "FrocCurve",
    "bootstrap_rsna_map_ci",
    "froc_curve",
    "image_precision",
    "per_image_precision",
    "precision_per_threshold",
    "rsna_map",
    "sensitivity_at_fppi",
]

#: The challenge's IoU thresholds: 0.40 to 0.75 in steps of 0.05 (8 values).
RSNA_IOU_THRESHOLDS: tuple[float, ...] = (0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75)

# Images scored per block of the vectorised implementation (bounds padded-array memory).
_CHUNK_IMAGES = 8192


def _as_scores(scores: ArrayLike | None, n_boxes: int) -> np.ndarray:
    """Return confidences as a float64 ``(n_boxes,)`` array, checked against the box count."""
    if scores is None:
        if n_boxes:
            raise ConfigError(f"{n_boxes} predicted boxes but no scores")
        return np.zeros(0, dtype=np.float64)
    array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if array.shape[0] != n_boxes:
        raise ConfigError(f"{n_boxes} predicted boxes but {array.shape[0]} scores")
    if not np.all(np.isfinite(array)):
        raise ConfigError("scores hold non-finite values")
    return array


def _as_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    array = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ConfigError("at least one IoU threshold is needed")
    return array


def image_precision(
    gt_boxes: ArrayLike | None,
    pred_boxes: ArrayLike | None,
    pred_scores: ArrayLike | None,
    thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> float | None:
    """RSNA score of one image: mean over IoU thresholds of TP / (TP + FP + FN).

    Args:
        gt_boxes: ``(G, 4)`` xyxy ground-truth boxes (``None`` or empty for none).
        pred_boxes: ``(P, 4)`` xyxy predicted boxes (``None`` or empty for none).
        pred_scores: ``(P,)`` confidences of the predictions.
        thresholds: IoU thresholds; a hit needs IoU strictly greater than the threshold.

    Returns:
        The image score in [0, 1], or ``None`` when the image has neither ground truth
        nor predictions (such images are left out of the dataset mean).
    """
    gt = as_boxes(gt_boxes)
    pred = as_boxes(pred_boxes)
    confidences = _as_scores(pred_scores, pred.shape[0])
    threshold_values = _as_thresholds(thresholds)
    if gt.shape[0] == 0 and pred.shape[0] == 0:
        return None
    if gt.shape[0] == 0 or pred.shape[0] == 0:
        return 0.0
    order = np.argsort(-confidences, kind="stable")
    ious = iou_matrix(pred[order], gt)
    total = 0.0
    for threshold in threshold_values:
        matched = np.zeros(gt.shape[0], dtype=bool)
        true_positives = 0
        for row in ious:
            candidates = np.where(~matched & (row > threshold), row, -1.0)
            best = int(np.argmax(candidates))
            if candidates[best] > threshold:
                matched[best] = True
                true_positives += 1
        false_positives = pred.shape[0] - true_positives
        false_negatives = gt.shape[0] - true_positives
        total += true_positives / (true_positives + false_positives + false_negatives)
    return total / threshold_values.size


class _Padded(NamedTuple):
    """All images of a dataset padded into arrays; predictions sorted by descending score."""

    gt: np.ndarray  # (n, G, 4)
    gt_valid: np.ndarray  # (n, G) bool
    pred: np.ndarray  # (n, P, 4), descending confidence along P
    pred_scores: np.ndarray  # (n, P)
    pred_valid: np.ndarray  # (n, P) bool
    n_gt: np.ndarray  # (n,)
    n_pred: np.ndarray  # (n,)


def _pad_boxes(
    boxes: list[np.ndarray], counts: np.ndarray, sort_keys: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad per-image box lists into ``(n, width, 4)``; optional per-box keys sort each image
    by descending key.

    Returns the padded boxes, the validity mask (valid entries first in every row) and the
    padded keys (zeros if none).
    """
    n_images = counts.shape[0]
    width = max(int(counts.max(initial=0)), 1)
    padded = np.zeros((n_images, width, 4), dtype=np.float64)
    padded_keys = np.zeros((n_images, width), dtype=np.float64)
    valid = np.zeros((n_images, width), dtype=bool)
    total = int(counts.sum())
    if total == 0:
        return padded, valid, padded_keys
    flat = np.concatenate([b for b in boxes if b.shape[0]], axis=0)
    if not np.all(np.isfinite(flat)):
        raise ConfigError("boxes hold non-finite values")
    starts = np.cumsum(counts) - counts
    position = np.arange(total) - np.repeat(starts, counts)
    flat_slot = np.repeat(np.arange(n_images) * width, counts) + position
    padded.reshape(-1, 4)[flat_slot] = flat
    valid.reshape(-1)[flat_slot] = True
    if sort_keys is not None:
        padded_keys.reshape(-1)[flat_slot] = sort_keys
        # Row-wise stable sort on -key with padding at +inf: equal confidences keep their
        # input order (as in image_precision) and padding stays at the end of each row.
        order = np.argsort(np.where(valid, -padded_keys, np.inf), axis=1, kind="stable")
        padded = np.take_along_axis(padded, order[:, :, None], axis=1)
        padded_keys = np.take_along_axis(padded_keys, order, axis=1)
    return padded, valid, padded_keys


def _box_array(boxes: ArrayLike | None) -> np.ndarray:
    """Cheap :func:`as_boxes` for the common case of a ready ``(N, 4)`` array."""
    if boxes is None:
        return np.zeros((0, 4), dtype=np.float64)
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] == 4:
        return array
    return as_boxes(array)


def _score_array(scores: ArrayLike | None, n_boxes: int) -> np.ndarray:
    """Cheap :func:`_as_scores` without the finiteness check (done once on all scores)."""
    if scores is None:
        return _as_scores(scores, n_boxes)
    array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if array.shape[0] != n_boxes:
        raise ConfigError(f"{n_boxes} predicted boxes but {array.shape[0]} scores")
    return array


def _pad_dataset(
    gt: Sequence[ArrayLike | None],
    preds: Sequence[ArrayLike | None],
    scores: Sequence[ArrayLike | None],
) -> _Padded:
    # Per-image work is kept to the bare conversion (this loop dominates on 27k images);
    # finiteness is checked once on the concatenated arrays below.
    gt_list = [_box_array(b) for b in gt]
    pred_list = [_box_array(b) for b in preds]
    score_list = [_score_array(s, p.shape[0]) for s, p in zip(scores, pred_list)]
    n_gt = np.fromiter((b.shape[0] for b in gt_list), dtype=np.int64, count=len(gt_list))
    n_pred = np.fromiter((b.shape[0] for b in pred_list), dtype=np.int64, count=len(pred_list))
    gt_padded, gt_valid, _ = _pad_boxes(gt_list, n_gt)
    flat_scores = (
        np.concatenate(score_list) if n_pred.sum() else np.zeros(0, dtype=np.float64)
    )
    if not np.all(np.isfinite(flat_scores)):
        raise ConfigError("scores hold non-finite values")
    pred_padded, pred_valid, pred_scores = _pad_boxes(pred_list, n_pred, flat_scores)
    return _Padded(gt_padded, gt_valid, pred_padded, pred_scores, pred_valid, n_gt, n_pred)


def _padded_chunks(
    gt: Sequence[ArrayLike | None],
    preds: Sequence[ArrayLike | None],
    scores: Sequence[ArrayLike | None],
) -> Iterator[_Padded]:
    """:func:`_pad_dataset` over consecutive blocks of images.

    Padding is to the largest box count of a block, so memory stays bounded by
    ``_CHUNK_IMAGES x (max predictions) x (max ground truth)`` even for long datasets.
    """
    # Lists make slicing positional for any sequence (a pandas Series included).
    gt, preds, scores = list(gt), list(preds), list(scores)
    if not (len(gt) == len(preds) == len(scores)):
        raise ConfigError(
            f"gt, preds and scores must have one entry per image; got {len(gt)}, "
            f"{len(preds)} and {len(scores)}"
        )
    for start in range(0, len(gt), _CHUNK_IMAGES):
        stop = start + _CHUNK_IMAGES
        yield _pad_dataset(gt[start:stop], preds[start:stop], scores[start:stop])


def _greedy_true_positives(padded: _Padded, thresholds: np.ndarray) -> np.ndarray:
    """Greedy confidence-order matching for every image and threshold at once.

    Returns:
        bool ``(n, T, P)``: whether the prediction at rank ``p`` of image ``n`` is a true
        positive at threshold ``T``.
    """
    n_images, n_ranks = padded.pred_valid.shape
    true_positive = np.zeros((n_images, thresholds.size, n_ranks), dtype=bool)
    # Only images with both ground truth and predictions can have true positives; most
    # RSNA images have no ground truth, so skipping the others saves most of the work.
    rows = np.flatnonzero((padded.n_gt > 0) & (padded.n_pred > 0))
    if rows.size == 0:
        return true_positive
    n_gt_max = int(padded.n_gt[rows].max())
    n_ranks_used = int(padded.n_pred[rows].max())
    gt_valid = padded.gt_valid[rows, :n_gt_max]
    pred_valid = padded.pred_valid[rows, :n_ranks_used]
    ious = iou_matrix(padded.pred[rows, :n_ranks_used], padded.gt[rows, :n_gt_max])  # (r, P, G)
    ious = np.where(pred_valid[:, :, None] & gt_valid[:, None, :], ious, -1.0)
    # available[r, t, g]: ground truth g of image r is still unmatched at threshold t.
    available = np.repeat(gt_valid[:, None, :], thresholds.size, axis=1)
    threshold_axis = thresholds[None, :, None]
    for rank in range(n_ranks_used):
        rank_ious = ious[:, None, rank, :]  # (r, 1, G)
        eligible = available & (rank_ious > threshold_axis)  # (r, T, G)
        hit = eligible.any(axis=2)
        if not hit.any():
            continue
        # Highest IoU among eligible ground truth; argmax keeps the first on ties.
        best = np.where(eligible, rank_ious, -1.0).argmax(axis=2)
        image_idx, threshold_idx = np.nonzero(hit)
        available[image_idx, threshold_idx, best[image_idx, threshold_idx]] = False
        true_positive[rows, :, rank] = hit
        if not available.any():
            break  # every ground truth is taken: the remaining ranks are all false positives
    return true_positive


def _score_matrix(
    gt: Sequence[ArrayLike | None],
    preds: Sequence[ArrayLike | None],
    scores: Sequence[ArrayLike | None],
    thresholds: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image, per-threshold scores ``(n, T)`` and the mask of images that count."""
    threshold_values = _as_thresholds(thresholds)
    score_blocks = [np.zeros((0, threshold_values.size))]
    counted_blocks = [np.zeros(0, dtype=bool)]
    for padded in _padded_chunks(gt, preds, scores):
        true_positives = _greedy_true_positives(padded, threshold_values).sum(axis=2)  # (n, T)
        false_positives = padded.n_pred[:, None] - true_positives
        false_negatives = padded.n_gt[:, None] - true_positives
        denominator = true_positives + false_positives + false_negatives
        counted_blocks.append((padded.n_gt + padded.n_pred) > 0)
        score_blocks.append(
            np.where(denominator > 0, true_positives / np.maximum(denominator, 1), np.nan)
        )
    return np.concatenate(score_blocks, axis=0), np.concatenate(counted_blocks)


def precision_matrix(
    gt: Sequence[ArrayLike | None],
    preds: Sequence[ArrayLike | None],
    scores: Sequence[ArrayLike | None],
    thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray]:
    """TP / (TP + FP + FN) per image and IoU threshold, from one matching.

    What :func:`per_image_precision` (mean over thresholds) and
    :func:`precision_per_threshold` (mean over counted images) average, for a caller that
    wants both without matching the dataset twice.

    Returns:
        float64 ``(n, T)`` scores (NaN rows for images that do not count) and the bool
        ``(n,)`` mask of the images that count (ground truth or predictions).
    """
    return _score_matrix(gt, preds, scores, thresholds)


def per_image_precision(
    gt: Sequence[ArrayLike | None],
    preds: Sequence[ArrayLike | None],
    scores: Sequence[ArrayLike | None],
    thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> np.ndarray:
    """Vectorised :func:`image_precision` over a dataset.

    Args:
        gt: per image, ``(G_i, 4)`` xyxy ground-truth boxes (empty / ``None`` for none).
        preds: per image, ``(P_i, 4)`` xyxy predicted boxes.
        scores: per image, ``(P_i,)`` confidences.
        thresholds: IoU thresholds (strict ``>``).

    Returns:
        float64 ``(n,)`` image scores; NaN for images with neither ground truth nor
        predictions (left out of the dataset mean).
    """
    score, counted = _score_matrix(gt, preds, scores, thresholds)
    return np.where(counted, score.mean(axis=1), np.nan)


def bootstrap_rsna_map_ci(
    per_image: ArrayLike, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the RSNA metric over patient resamples.

    ``per_image`` is :func:`per_image_precision`'s output for fixed detections (NaN: an
    image that does not count); each of ``n_boot`` resamples of the patients, drawn with
    replacement, is scored as the mean of its counted images. The settings that made the
    detections are held fixed, so the interval is of the scoring, not of the tuning.

    Raises:
        ConfigError: ``n_boot < 1``, ``level`` outside (0, 1), or no patient at all.
    """
    values = np.asarray(per_image, dtype=np.float64).reshape(-1)
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must lie in (0, 1), got {level}")
    if values.size == 0:
        raise ConfigError("no patients to resample")
    rng = np.random.default_rng(seed)
    means = np.full(n_boot, np.nan)
    counted = np.isfinite(values)
    filled = np.where(counted, values, 0.0)
    for d in range(n_boot):
        sample = rng.integers(0, values.size, values.size)
        n_counted = int(counted[sample].sum())
        if n_counted:
            means[d] = filled[sample].sum() / n_counted
    if not np.isfinite(means).any():
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.nanpercentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def precision_per_threshold(
    gt: Sequence[ArrayLike | None],
    preds: Sequence[ArrayLike | None],
    scores: Sequence[ArrayLike | None],
    thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> np.ndarray:
    """Mean over counted images of TP / (TP + FP + FN), separately for each IoU threshold.

    The mean of the returned ``(T,)`` array equals :func:`rsna_map` (up to rounding).
    All-NaN when no image counts (no ground truth and no predictions anywhere).
    """
    score, counted = _score_matrix(gt, preds, scores, thresholds)
    if not counted.any():
        logger.warning("no image has ground truth or predictions; the metric is undefined")
        return np.full(score.shape[1], np.nan)
    return score[counted].mean(axis=0)


def rsna_map(
    gt: Sequence[ArrayLike | None],
    preds: Sequence[ArrayLike | None],
    scores: Sequence[ArrayLike | None],
    thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> float:
    """The RSNA Pneumonia challenge score of a dataset (vectorised).

    Args:
        gt: per image, ``(G_i, 4)`` xyxy ground-truth boxes (empty / ``None`` for none).
        preds: per image, ``(P_i, 4)`` xyxy predicted boxes.
        scores: per image, ``(P_i,)`` confidences.
        thresholds: IoU thresholds; a hit needs IoU strictly greater than the threshold.

    Returns:
        Mean image score over the images that have ground truth or predictions; NaN (with
        a logged warning) when there is no such image.
    """
    per_image = per_image_precision(gt, preds, scores, thresholds)
    counted = ~np.isnan(per_image)
    if not counted.any():
        logger.warning("no image has ground truth or predictions; the metric is undefined")
        return float("nan")
    return float(per_image[counted].mean())


class FrocCurve(NamedTuple):
    """Operating points of a confidence sweep, from the strictest (nothing kept) onward."""

    fppi: np.ndarray  #: false positives per image
    sensitivity: np.ndarray  #: fraction of ground-truth boxes hit
    thresholds: np.ndarray  #: keep predictions with confidence >= threshold (first: +inf)


def froc_curve(
    gt: Sequence[ArrayLike | None],
    preds: Sequence[ArrayLike | None],
    scores: Sequence[ArrayLike | None],
    iou: float = 0.5,
) -> FrocCurve:
    """Free-response ROC: sensitivity against false positives per image.

    Predictions are matched per image in confidence order as in the RSNA metric (a hit
    needs IoU strictly greater than ``iou``; each ground truth is hit at most once).
    Keeping the predictions with confidence >= ``c`` keeps a confidence-ordered prefix of
    every image, so one matching serves every ``c``. FPPI divides by all images, with or
    without ground truth.

    Raises:
        ValueError: when there are no images.
    """
    n_images = len(gt)
    if n_images == 0:
        raise ConfigError("froc_curve needs at least one image")
    confidence_blocks, hit_blocks = [np.zeros(0)], [np.zeros(0, dtype=bool)]
    total_gt = 0
    for padded in _padded_chunks(gt, preds, scores):
        true_positive = _greedy_true_positives(padded, np.array([float(iou)]))[:, 0, :]
        confidence_blocks.append(padded.pred_scores[padded.pred_valid])
        hit_blocks.append(true_positive[padded.pred_valid])
        total_gt += int(padded.n_gt.sum())
    confidences = np.concatenate(confidence_blocks)
    hits = np.concatenate(hit_blocks)
    order = np.argsort(-confidences, kind="stable")
    confidences, hits = confidences[order], hits[order]
    cumulative_tp = np.cumsum(hits)
    cumulative_fp = np.cumsum(~hits)
    # One operating point per distinct confidence: the last prediction of each tie group.
    group_end = np.r_[np.diff(confidences) != 0, True] if confidences.size else np.zeros(0, bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        sensitivity = cumulative_tp[group_end] / total_gt if total_gt else np.full(
            int(group_end.sum()), np.nan
        )
    return FrocCurve(
        fppi=np.r_[0.0, cumulative_fp[group_end] / n_images],
        sensitivity=np.r_[0.0 if total_gt else np.nan, sensitivity],
        thresholds=np.r_[np.inf, confidences[group_end]],
    )


def sensitivity_at_fppi(
    gt: Sequence[ArrayLike | None],
    preds: Sequence[ArrayLike | None],
    scores: Sequence[ArrayLike | None],
    fppi: Sequence[float] = (0.5, 1.0, 2.0),
    iou: float = 0.5,
) -> dict[float, float]:
    """Sensitivity at given false-positives-per-image budgets (FROC points).

    For each budget ``f``, the highest sensitivity among the operating points of
    :func:`froc_curve` whose FPPI is at most ``f``.

    Returns:
        ``{f: sensitivity}`` in the order given; NaN sensitivities when there is no
        ground-truth box at all.
    """
    curve = froc_curve(gt, preds, scores, iou=iou)
    result: dict[float, float] = {}
    for budget in fppi:
        allowed = curve.fppi <= float(budget)
        # The first point (nothing kept, FPPI 0) is always allowed.
        result[float(budget)] = float(np.max(curve.sensitivity[allowed]))
    return result
