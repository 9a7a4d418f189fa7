"""Post-processing of detections, as the best RSNA teams did it, each step tuned on validation.

The steps, in the order :func:`apply_postprocess` runs them on one patient's boxes:

1. **fusion**: ``"nms"`` (greedy non-maximum suppression) or ``"wbf"`` (weighted box
   fusion: overlapping boxes are averaged, weighted by score, instead of discarded),
   both at ``fusion_iou``, on the detector's own scores;
2. **gating** (``"multiply"``): every box score is multiplied by the patient's P(opacity)
   from the classifier (or the fusion model), so a confident "no opacity" silences the
   detector on that image (a positive factor, uniform per image: it would not change
   what fusion does, and fusing first keeps that true even for P = 0);
3. **shrink**: width and height scaled by ``shrink`` about the box centre (the winners
   shrank boxes by about 0.85-0.9: detectors over-cover the readers' boxes);
4. **threshold**: boxes with score ``>= score_threshold`` are kept (the threshold that
   maximises the RSNA metric on validation), at most ``max_boxes`` of them.

:func:`tune_postprocess` grid-searches gating x fusion x shrink and, for every
combination, every confidence threshold and per-image cap at once: greedy
confidence-order matching is prefix-consistent (keeping the predictions above a threshold,
or the best m of them, keeps a prefix of each image's ranking, and the matches of a prefix
are the prefix of the matches), so one matching per combination scores every threshold and
cap (:func:`rsna_map_by_threshold_and_cap`).

Boxes are xyxy in original pixels; all of this is pure NumPy.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from lungopacity.errors import ConfigError
from lungopacity.metrics.boxes import as_boxes, iou_matrix, shrink_boxes
from lungopacity.metrics.rsna_map import RSNA_IOU_THRESHOLDS, per_image_precision

log = logging.getLogger(__name__)

GATING_MODES: tuple[str, ...] = ("none", "multiply")
FUSION_MODES: tuple[str, ...] = ("none", "nms", "wbf")
WBF_CONFIDENCE: tuple[str, ...] = ("avg", "max")

#: Default search grid of :func:`tune_postprocess`.
DEFAULT_FUSION_GRID: tuple[tuple[str, float], ...] = (
    ("none", 0.0),
    ("nms", 0.25),
    ("nms", 0.35),
    ("nms", 0.45),
    ("wbf", 0.35),
    ("wbf", 0.45),
    ("wbf", 0.55),
)
DEFAULT_SHRINK_GRID: tuple[float, ...] = (1.0, 0.95, 0.9, 0.875, 0.85, 0.8)
#: Per-image caps tried (None: no cap; looser first, so a tie keeps the looser). Most
#: positive RSNA patients carry one or two readers' boxes, and a box beyond them costs its
#: image precision at every IoU threshold (BENCHMARKS.md, "A cap on the boxes per image").
DEFAULT_MAX_BOXES_GRID: tuple[int | None, ...] = (None, 3, 2, 1)
#: At most this many confidence thresholds are tried per combination (quantiles beyond).
MAX_THRESHOLD_CANDIDATES = 128


@dataclass
class PostprocessConfig:
    """Settings of :func:`apply_postprocess` (JSON-serialisable; stored with a detector run)."""

    gating: str = "none"  # none | multiply (score x P(opacity) of the patient)
    fusion: str = "none"  # none | nms | wbf
    fusion_iou: float = 0.5  # IoU above which boxes are suppressed (nms) or fused (wbf)
    shrink: float = 1.0  # width/height factor about the centre; 1.0 = off
    score_threshold: float = 0.0  # keep boxes with score >= this
    max_boxes: int | None = None  # keep at most this many per image (best first)
    n_models: int = 1  # prediction sets merged per image (WBF's score rescaling)
    wbf_confidence: str = "avg"  # avg | max: score of a fused box

    def __post_init__(self) -> None:
        if self.gating not in GATING_MODES:
            raise ConfigError(f"gating must be one of {GATING_MODES}, got {self.gating!r}")
        if self.fusion not in FUSION_MODES:
            raise ConfigError(f"fusion must be one of {FUSION_MODES}, got {self.fusion!r}")
        if self.wbf_confidence not in WBF_CONFIDENCE:
            raise ConfigError(f"wbf_confidence must be one of {WBF_CONFIDENCE}, got {self.wbf_confidence!r}")
        if not self.shrink > 0:
            raise ConfigError(f"shrink must be > 0, got {self.shrink}")
        if self.fusion != "none" and not 0.0 <= self.fusion_iou < 1.0:
            raise ConfigError(f"fusion_iou must lie in [0, 1), got {self.fusion_iou}")
        if self.max_boxes is not None and self.max_boxes < 1:
            raise ConfigError(f"max_boxes must be >= 1 or None, got {self.max_boxes}")
        if self.n_models < 1:
            raise ConfigError(f"n_models must be >= 1, got {self.n_models}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PostprocessConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        """One line a person can read."""
        parts = ["gating x P(opacity)" if self.gating == "multiply" else "no gating"]
        parts.append(f"{self.fusion.upper()} at IoU {self.fusion_iou:g}" if self.fusion != "none" else "no fusion")
        parts.append(f"shrink {self.shrink:g}" if self.shrink != 1.0 else "no shrink")
        parts.append(f"score >= {self.score_threshold:.4g}")
        if self.max_boxes:
            parts.append(f"at most {self.max_boxes} boxes")
        return ", ".join(parts)


def save_postprocess(path: str | Path, config: PostprocessConfig, **extra: Any) -> None:
    """Write ``{"postprocess": config, **extra}`` as JSON (atomically: temporary file, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"postprocess": config.to_dict(), **extra}, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_postprocess(path: str | Path) -> PostprocessConfig:
    """Read a file written by :func:`save_postprocess`."""
    data = json.loads(Path(path).read_text())
    return PostprocessConfig.from_dict(data["postprocess"] if "postprocess" in data else data)


# ----------------------------------------------------------------------- box steps


def _scores(scores: ArrayLike | None, n: int) -> np.ndarray:
    array = np.zeros(0) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if array.shape[0] != n:
        raise ConfigError(f"{n} boxes but {array.shape[0]} scores")
    return array


def nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    Boxes are visited in descending score (equal scores keep input order); a box is
    dropped when its IoU with an already kept box is strictly greater than
    ``iou_threshold`` (torchvision's convention).

    Returns:
        Indices of the kept boxes, best first.
    """
    boxes = as_boxes(boxes)
    scores = _scores(scores, len(boxes))
    order = np.argsort(-scores, kind="stable")
    if len(order) == 0:
        return order.astype(np.int64)
    ious = iou_matrix(boxes, boxes)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for index in order:
        if suppressed[index]:
            continue
        keep.append(index)
        suppressed |= ious[index] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def weighted_boxes_fusion(
    boxes: ArrayLike,
    scores: ArrayLike,
    iou_threshold: float,
    *,
    n_models: int = 1,
    confidence: str = "avg",
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted box fusion (Solovyev et al., 2021) of one image's boxes (one class).

    Boxes are visited in descending score (equal scores keep input order). Each joins
    the cluster whose current fused box it overlaps most, when that IoU is strictly
    greater than ``iou_threshold``, and otherwise starts a new cluster. A cluster's fused
    box is the score-weighted mean of its members' coordinates (updated as members
    join). Its score is the members' mean score (``confidence="avg"``) times
    ``min(members, n_models) / n_models`` (a box that only some of the ``n_models``
    merged prediction sets found is trusted less), or their maximum (``"max"``).

    Returns:
        Fused boxes ``(K, 4)`` and scores ``(K,)``, best first.
    """
    if confidence not in WBF_CONFIDENCE:
        raise ConfigError(f"confidence must be one of {WBF_CONFIDENCE}, got {confidence!r}")
    boxes = as_boxes(boxes)
    scores = _scores(scores, len(boxes))
    order = np.argsort(-scores, kind="stable")
    members: list[list[int]] = []
    fused: list[np.ndarray] = []
    for index in order:
        if fused:
            ious = iou_matrix(boxes[index][None], np.asarray(fused))[0]
            best = int(np.argmax(ious))
            if ious[best] > iou_threshold:
                members[best].append(int(index))
                weights = scores[members[best]]
                total = weights.sum()
                if total > 0:
                    fused[best] = (weights[:, None] * boxes[members[best]]).sum(axis=0) / total
                else:  # all-zero scores: plain mean
                    fused[best] = boxes[members[best]].mean(axis=0)
                continue
        members.append([int(index)])
        fused.append(boxes[index].copy())
    if not fused:
        return np.zeros((0, 4)), np.zeros(0)
    fused_scores = np.empty(len(members))
    for k, cluster in enumerate(members):
        values = scores[cluster]
        if confidence == "max":
            fused_scores[k] = values.max()
        else:
            fused_scores[k] = values.mean() * min(len(cluster), n_models) / n_models
    out_order = np.argsort(-fused_scores, kind="stable")
    return np.asarray(fused)[out_order], fused_scores[out_order]


def _fuse(boxes: ArrayLike, scores: ArrayLike, config: PostprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """The fusion step; returns boxes and scores best first."""
    boxes = as_boxes(boxes)
    scores = _scores(scores, len(boxes))
    if config.fusion == "nms":
        keep = nms(boxes, scores, config.fusion_iou)
        return boxes[keep], scores[keep]
    if config.fusion == "wbf":
        return weighted_boxes_fusion(
            boxes, scores, config.fusion_iou, n_models=config.n_models, confidence=config.wbf_confidence
        )
    order = np.argsort(-scores, kind="stable")
    return boxes[order], scores[order]


def _gate(scores: np.ndarray, p_opacity: float | None, config: PostprocessConfig) -> np.ndarray:
    if config.gating == "none":
        return scores
    if p_opacity is None or not np.isfinite(p_opacity):
        raise ConfigError("gating needs the patient's P(opacity)")
    return scores * float(p_opacity)


def apply_postprocess(
    boxes: ArrayLike,
    scores: ArrayLike,
    p_opacity: float | None,
    config: PostprocessConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Post-process one patient's detections (see the module docstring for the steps).

    Args:
        boxes: ``(N, 4)`` xyxy boxes (original pixels).
        scores: ``(N,)`` detector confidences.
        p_opacity: the patient's P(opacity); required when ``config.gating != "none"``.
        config: the settings.

    Returns:
        Boxes ``(K, 4)`` float64 and scores ``(K,)``, best first.
    """
    boxes, scores = _fuse(boxes, scores, config)
    scores = _gate(scores, p_opacity, config)
    if config.shrink != 1.0 and len(boxes):
        boxes = shrink_boxes(boxes, config.shrink)
    keep = scores >= config.score_threshold
    boxes, scores = boxes[keep], scores[keep]
    if config.max_boxes is not None:
        boxes, scores = boxes[: config.max_boxes], scores[: config.max_boxes]
    return boxes, scores


def pool_detections(
    per_member: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Several models' ``(boxes, scores)`` per image pooled into one set per image.

    ``per_member[m][i]`` is model m's detections on image i. The pooled set goes through
    :func:`apply_postprocess` with ``n_models = len(per_member)`` and a fusion step (NMS or
    WBF) that merges the members' boxes of one finding; one member is returned as it is.
    """
    if len(per_member) == 1:
        return list(per_member[0])
    counts = {len(m) for m in per_member}
    if len(counts) != 1:
        raise ConfigError(f"detector members detected on different numbers of images: {sorted(counts)}")
    pooled = []
    for sets in zip(*per_member):
        boxes = np.concatenate([np.asarray(b, dtype=np.float32).reshape(-1, 4) for b, _ in sets])
        scores = np.concatenate([np.asarray(c, dtype=np.float32).reshape(-1) for _, c in sets])
        pooled.append((boxes, scores))
    return pooled


def apply_postprocess_all(
    boxes_list: Sequence[ArrayLike],
    scores_list: Sequence[ArrayLike],
    p_opacity: Sequence[float] | np.ndarray | None,
    config: PostprocessConfig,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """:func:`apply_postprocess` over patients (``p_opacity`` one value per patient, or None)."""
    if len(boxes_list) != len(scores_list):
        raise ConfigError(f"{len(boxes_list)} box lists but {len(scores_list)} score lists")
    if p_opacity is not None and len(p_opacity) != len(boxes_list):
        raise ConfigError(f"{len(boxes_list)} patients but {len(p_opacity)} probabilities")
    out_boxes, out_scores = [], []
    for i, (boxes, scores) in enumerate(zip(boxes_list, scores_list)):
        p = None if p_opacity is None else float(p_opacity[i])
        b, s = apply_postprocess(boxes, scores, p, config)
        out_boxes.append(b)
        out_scores.append(s)
    return out_boxes, out_scores


# ------------------------------------------------------- metric at every threshold


def rsna_map_by_threshold(
    gt_boxes: Sequence[ArrayLike | None],
    pred_boxes: Sequence[ArrayLike | None],
    pred_scores: Sequence[ArrayLike | None],
    score_thresholds: ArrayLike,
    iou_thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> np.ndarray:
    """The RSNA metric when only predictions with score ``>= c`` are kept, for every ``c``.

    Equal to ``rsna_map(gt, [p[s >= c]], [s[s >= c]])`` for each ``c`` (see
    :mod:`lungopacity.metrics.rsna_map` for the rules), computed with one greedy matching
    of all predictions; NaN where no image has ground truth or a kept prediction.

    Returns:
        float64 ``(C,)``.
    """
    return rsna_map_by_threshold_and_cap(gt_boxes, pred_boxes, pred_scores, score_thresholds, (None,),
                                         iou_thresholds)[0]


def rsna_map_by_threshold_and_cap(
    gt_boxes: Sequence[ArrayLike | None],
    pred_boxes: Sequence[ArrayLike | None],
    pred_scores: Sequence[ArrayLike | None],
    score_thresholds: ArrayLike,
    max_boxes_options: Sequence[int | None],
    iou_thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> np.ndarray:
    """:func:`rsna_map_by_threshold` for every per-image cap ``m`` too.

    Row ``j`` keeps, per image, at most ``max_boxes_options[j]`` of the predictions with
    score ``>= c`` (the best first, ties in input order; None: no cap), as
    :func:`apply_postprocess` does. A cap keeps a prefix of each image's ranking as a
    threshold does, so the one greedy matching scores every (cap, threshold) pair.

    Returns:
        float64 ``(len(max_boxes_options), C)``.
    """
    caps = list(max_boxes_options)
    for cap in caps:
        if cap is not None and int(cap) < 1:
            raise ConfigError(f"max_boxes must be >= 1 or None, got {cap}")
    thresholds = np.asarray(score_thresholds, dtype=np.float64).reshape(-1)
    iou_values = np.asarray(iou_thresholds, dtype=np.float64)
    n_images = len(gt_boxes)
    if not (len(pred_boxes) == len(pred_scores) == n_images):
        raise ConfigError("gt, boxes and scores must have one entry per image")
    gts = [as_boxes(g) for g in gt_boxes]
    preds = [as_boxes(p) for p in pred_boxes]
    scores = [_scores(s, len(p)) for s, p in zip(pred_scores, preds)]
    n_gt = np.array([len(g) for g in gts], dtype=np.int64)
    n_pred = np.array([len(p) for p in preds], dtype=np.int64)
    width_p, width_g = max(int(n_pred.max(initial=0)), 1), max(int(n_gt.max(initial=0)), 1)

    # Padded, descending-score predictions (stable: equal scores keep input order).
    sorted_scores = np.full((n_images, width_p), -np.inf)
    padded_pred = np.zeros((n_images, width_p, 4))
    padded_gt = np.zeros((n_images, width_g, 4))
    gt_valid = np.zeros((n_images, width_g), dtype=bool)
    if n_pred.sum():
        flat_scores = np.concatenate(scores)
        flat_boxes = np.concatenate([p for p in preds if len(p)])
        image_of = np.repeat(np.arange(n_images), n_pred)
        order = np.lexsort((-flat_scores, image_of))  # by image, then descending score (stable)
        rank = np.arange(len(order)) - np.repeat(np.cumsum(n_pred) - n_pred, n_pred)
        sorted_scores[image_of, rank] = flat_scores[order]
        padded_pred[image_of, rank] = flat_boxes[order]
    if n_gt.sum():
        image_of = np.repeat(np.arange(n_images), n_gt)
        slot = np.arange(int(n_gt.sum())) - np.repeat(np.cumsum(n_gt) - n_gt, n_gt)
        padded_gt[image_of, slot] = np.concatenate([g for g in gts if len(g)])
        gt_valid[image_of, slot] = True
    pred_valid = np.isfinite(sorted_scores)

    # Greedy matching for every image and IoU threshold, rank by rank.
    true_positive = np.zeros((n_images, iou_values.size, width_p), dtype=bool)
    rows = np.flatnonzero((n_gt > 0) & (n_pred > 0))
    if rows.size:
        ious = iou_matrix(padded_pred[rows], padded_gt[rows])  # (r, P, G)
        ious = np.where(pred_valid[rows][:, :, None] & gt_valid[rows][:, None, :], ious, -1.0)
        available = np.repeat(gt_valid[rows][:, None, :], iou_values.size, axis=1)  # (r, T, G)
        for rank in range(width_p):
            rank_ious = ious[:, None, rank, :]
            eligible = available & (rank_ious > iou_values[None, :, None])
            hit = eligible.any(axis=2)
            if not hit.any():
                continue
            best = np.where(eligible, rank_ious, -1.0).argmax(axis=2)
            r_idx, t_idx = np.nonzero(hit)
            available[r_idx, t_idx, best[r_idx, t_idx]] = False
            true_positive[rows, :, rank] = hit
    cumulative_tp = np.concatenate(
        [np.zeros((n_images, iou_values.size, 1)), np.cumsum(true_positive, axis=2)], axis=2
    )  # (n, T, P + 1): TP among the first k predictions

    # k[c, n]: how many predictions of image n have score >= c.
    kept_by_threshold = ((sorted_scores[None, :, :] >= thresholds[:, None, None]) & pred_valid[None]).sum(axis=2)
    image_index = np.arange(n_images)[None, :]
    out = np.empty((len(caps), thresholds.size))
    for j, cap in enumerate(caps):
        kept = kept_by_threshold if cap is None else np.minimum(kept_by_threshold, int(cap))  # (C, n)
        tp = cumulative_tp[image_index, :, kept]  # (C, n, T)
        denominator = kept[:, :, None] + n_gt[None, :, None] - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            per_image = np.where(denominator > 0, tp / np.maximum(denominator, 1), 0.0).mean(axis=2)  # (C, n)
        counted = (kept + n_gt[None, :]) > 0
        totals = np.where(counted, per_image, 0.0).sum(axis=1)
        n_counted = counted.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[j] = np.where(n_counted > 0, totals / np.maximum(n_counted, 1), np.nan)
    return out


def threshold_candidates(
    scores_list: Sequence[np.ndarray], max_candidates: int = MAX_THRESHOLD_CANDIDATES
) -> np.ndarray:
    """Confidence thresholds worth trying, ascending.

    With few distinct scores, one threshold per distinct keep-set: the midpoint between
    each pair of neighbouring distinct scores (so the chosen threshold does not sit on a
    validation score), the lowest score (keep all), and a value above the highest (keep
    nothing). With many, ``max_candidates`` quantiles of the scores plus keep-nothing.
    """
    flat = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for s in scores_list] + [np.zeros(0)])
    if flat.size == 0:
        return np.array([0.0])
    distinct = np.unique(flat)
    top = distinct[-1]
    keep_nothing = (top + 1.0) / 2.0 if top < 1.0 else float(np.nextafter(top, np.inf))
    if distinct.size <= max_candidates:
        middles = (distinct[:-1] + distinct[1:]) / 2.0
        return np.concatenate([[distinct[0]], middles, [keep_nothing]])
    quantiles = np.unique(np.quantile(flat, np.linspace(0.0, 1.0, max_candidates)))
    return np.concatenate([quantiles, [keep_nothing]])


# ----------------------------------------------------------------------- tuning


def counts_above(scores_list: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """Per image, how many scores are ``>= threshold``."""
    return np.array([int((np.asarray(s) >= threshold).sum()) for s in scores_list], dtype=np.int64)


def tune_postprocess(
    gt_boxes: Sequence[ArrayLike | None],
    pred_boxes: Sequence[ArrayLike | None],
    pred_scores: Sequence[ArrayLike | None],
    p_opacity: Sequence[float] | np.ndarray | None = None,
    *,
    gating_options: Sequence[str] | None = None,
    fusion_options: Sequence[tuple[str, float]] = DEFAULT_FUSION_GRID,
    shrink_options: Sequence[float] = DEFAULT_SHRINK_GRID,
    score_thresholds: ArrayLike | None = None,
    max_boxes_options: Sequence[int | None] = DEFAULT_MAX_BOXES_GRID,
    n_models: int = 1,
) -> tuple[PostprocessConfig, pd.DataFrame]:
    """Grid-search the post-processing that maximises the RSNA metric.

    Every combination of gating (``none``, plus ``multiply`` when ``p_opacity`` is
    given), fusion (``(mode, iou)`` pairs) and shrink factor is applied without a
    threshold, then every per-image cap (``max_boxes_options``) and confidence threshold
    (:func:`threshold_candidates`, or ``score_thresholds``) is scored at once. Ties go to
    the earlier combination of the grid (gating off, no fusion, no shrink and no cap come
    first, so a step is only switched on when it helps) and, within it, to the lower
    threshold.

    Args:
        gt_boxes: per patient, ground-truth boxes (xyxy, original pixels).
        pred_boxes, pred_scores: per patient, the raw detections.
        p_opacity: per patient P(opacity) for gating, or None.
        gating_options, fusion_options, shrink_options: the grid.
        score_thresholds: thresholds to try (default: from the scores of each combination).
        max_boxes_options: per-image caps to try (None: no cap); ``(m,)`` fixes the cap.
        n_models: passed to every :class:`PostprocessConfig`.

    Returns:
        The best config (with its threshold and cap) and a table of every combination
        tried: ``gating, fusion, fusion_iou, shrink, max_boxes, score_threshold, rsna_map,
        n_boxes_kept`` (``max_boxes`` 0: no cap), best first.
    """
    n = len(gt_boxes)
    if not (len(pred_boxes) == len(pred_scores) == n):
        raise ConfigError("gt, boxes and scores must have one entry per patient")
    if gating_options is None:
        gating_options = ("none", "multiply") if p_opacity is not None else ("none",)
    if "multiply" in gating_options and p_opacity is None:
        raise ConfigError("gating 'multiply' needs p_opacity")
    p_values = None if p_opacity is None else np.asarray(p_opacity, dtype=np.float64).reshape(-1)
    if p_values is not None and len(p_values) != n:
        raise ConfigError(f"{n} patients but {len(p_values)} probabilities")
    caps = [None if m is None else int(m) for m in max_boxes_options]
    if not caps:
        raise ConfigError("max_boxes_options is empty (give None for no cap)")
    rows: list[dict[str, Any]] = []
    best: tuple[float, PostprocessConfig] | None = None
    # Fusion runs once per fusion setting; gating and shrink are then cheap array
    # operations on the fused boxes, exactly as apply_postprocess orders the steps.
    fused_sets = {}
    for fusion, fusion_iou in fusion_options:
        config = PostprocessConfig(fusion=fusion, fusion_iou=float(fusion_iou), n_models=n_models)
        fused = [_fuse(b, s, config) for b, s in zip(pred_boxes, pred_scores)]
        counts = np.array([len(b) for b, _ in fused], dtype=np.int64)
        flat_boxes = np.concatenate([b for b, _ in fused] + [np.zeros((0, 4))])
        flat_scores = np.concatenate([s for _, s in fused] + [np.zeros(0)])
        fused_sets[(fusion, float(fusion_iou))] = (counts, flat_boxes, flat_scores)
    for gating in gating_options:
        for fusion, fusion_iou in fusion_options:
            counts, flat_boxes, flat_scores = fused_sets[(fusion, float(fusion_iou))]
            if gating == "multiply":
                assert p_values is not None
                if not np.all(np.isfinite(p_values)):
                    raise ConfigError("p_opacity holds non-finite values")
                flat_scores = flat_scores * np.repeat(p_values, counts)
            splits = np.cumsum(counts)[:-1]
            scores = np.split(flat_scores, splits)
            candidates = (
                threshold_candidates(scores) if score_thresholds is None
                else np.asarray(score_thresholds, dtype=np.float64).reshape(-1)
            )
            for shrink in shrink_options:
                shrunk = shrink_boxes(flat_boxes, float(shrink)) if shrink != 1.0 else flat_boxes
                boxes = np.split(shrunk, splits)
                by_cap = rsna_map_by_threshold_and_cap(gt_boxes, boxes, scores, candidates, caps)
                for cap, values in zip(caps, by_cap):
                    finite = np.where(np.isfinite(values), values, -np.inf)
                    k = int(np.argmax(finite))
                    config = PostprocessConfig(
                        gating=gating, fusion=fusion, fusion_iou=float(fusion_iou), shrink=float(shrink),
                        score_threshold=float(candidates[k]), max_boxes=cap, n_models=n_models,
                    )
                    value = float(values[k])
                    kept_per_image = (counts_above(scores, config.score_threshold) if cap is None
                                      else np.minimum(counts_above(scores, config.score_threshold), cap))
                    rows.append({
                        "gating": gating, "fusion": fusion,
                        "fusion_iou": float(fusion_iou) if fusion != "none" else np.nan,
                        "shrink": float(shrink), "max_boxes": 0 if cap is None else cap,
                        "score_threshold": config.score_threshold, "rsna_map": value,
                        "n_boxes_kept": int(kept_per_image.sum()),
                    })
                    if np.isfinite(value) and (best is None or value > best[0]):
                        best = (value, config)
    if best is None:
        raise ConfigError("the metric is undefined for every setting (no ground truth and no predictions)")
    table = pd.DataFrame(rows).sort_values("rsna_map", ascending=False, kind="stable").reset_index(drop=True)
    log.info("post-processing tuned on %d patients: RSNA metric %.4f with %s", n, best[0], best[1].describe())
    return best[1], table


def cross_fitted_per_image(
    gt_boxes: Sequence[ArrayLike | None],
    pred_boxes: Sequence[ArrayLike | None],
    pred_scores: Sequence[ArrayLike | None],
    p_opacity: Sequence[float] | np.ndarray | None = None,
    *,
    folds: int = 2,
    seed: int = 0,
    fold_of: ArrayLike | None = None,
    **tune_kwargs: Any,
) -> tuple[np.ndarray, list[PostprocessConfig]]:
    """Each patient's RSNA precision with settings tuned on the other folds' patients only.

    Tuning and scoring on the same patients flatters the result (the grid picks what
    happens to fit them); here patients are split into ``folds`` groups (seeded, with
    positives spread evenly), or into the given ``fold_of`` groups (e.g. the folds whose
    models predicted them), each group is post-processed with the settings tuned on the
    rest (:func:`tune_postprocess` with ``tune_kwargs``), and every patient is scored.

    Returns:
        Per patient the precision (NaN where it does not count: no truth and no kept box),
        and the settings chosen for each group, in group order.

    Raises:
        ConfigError: ``fold_of`` of the wrong length or with fewer than two groups; a group
            whose other patients leave the metric undefined.
    """
    n = len(gt_boxes)
    if fold_of is None:
        if n < folds or folds < 2:
            raise ConfigError(f"cannot cross-fit {n} patients in {folds} folds")
        positive = np.array([len(as_boxes(g)) > 0 for g in gt_boxes])
        rng = np.random.default_rng(seed)
        groups = np.empty(n, dtype=np.int64)
        for group in (np.flatnonzero(positive), np.flatnonzero(~positive)):
            shuffled = group[rng.permutation(len(group))]
            groups[shuffled] = (np.arange(len(group)) + int(rng.integers(folds))) % folds
    else:
        groups = np.asarray(fold_of).reshape(-1)
        if len(groups) != n:
            raise ConfigError(f"{n} patients but {len(groups)} fold numbers")
        if len(np.unique(groups)) < 2:
            raise ConfigError("cross-fitting needs patients of at least two folds")
    p_values = None if p_opacity is None else np.asarray(p_opacity, dtype=np.float64).reshape(-1)
    out_boxes: list[np.ndarray] = [np.zeros((0, 4))] * n
    out_scores: list[np.ndarray] = [np.zeros(0)] * n
    chosen = []
    for fold in np.unique(groups):
        tune_idx, test_idx = np.flatnonzero(groups != fold), np.flatnonzero(groups == fold)
        pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731
        config, _ = tune_postprocess(
            pick(gt_boxes, tune_idx), pick(pred_boxes, tune_idx), pick(pred_scores, tune_idx),
            None if p_values is None else p_values[tune_idx], **tune_kwargs,
        )
        chosen.append(config)
        boxes, scores = apply_postprocess_all(
            pick(pred_boxes, test_idx), pick(pred_scores, test_idx),
            None if p_values is None else p_values[test_idx], config,
        )
        for k, i in enumerate(test_idx):
            out_boxes[i], out_scores[i] = boxes[k], scores[k]
    return per_image_precision(gt_boxes, out_boxes, out_scores), chosen


def cross_fitted_rsna_map(
    gt_boxes: Sequence[ArrayLike | None],
    pred_boxes: Sequence[ArrayLike | None],
    pred_scores: Sequence[ArrayLike | None],
    p_opacity: Sequence[float] | np.ndarray | None = None,
    *,
    folds: int = 2,
    seed: int = 0,
    fold_of: ArrayLike | None = None,
    **tune_kwargs: Any,
) -> float:
    """An honest estimate of the tuned post-processing: tune on the other folds, score each
    fold, the RSNA metric over all patients (:func:`cross_fitted_per_image`).

    Returns:
        The metric, NaN when it is undefined or a fold has nothing to tune on.
    """
    try:
        per_image, _ = cross_fitted_per_image(gt_boxes, pred_boxes, pred_scores, p_opacity, folds=folds, seed=seed,
                                              fold_of=fold_of, **tune_kwargs)
    except ValueError:
        return float("nan")
    counted = ~np.isnan(per_image)
    return float(per_image[counted].mean()) if counted.any() else float("nan")
