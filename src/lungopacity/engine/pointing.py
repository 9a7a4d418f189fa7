"""The pointing game of a classifier run's heatmaps on a prepared cache.

For every opacity-positive patient with boxes, a heatmap (``inference.gradcam.grad_cam``
with any of its options) is computed on the prepared image, laid over the whole original
image, and scored with :mod:`lungopacity.metrics.pointing`: does its maximum lie in a
ground-truth box, against the boxes' share of the image (a random point's chance).

Which model explains a patient follows the evaluation's rule: in a k-fold run on its own
cache, the fold model that never trained on the patient (out-of-fold); otherwise the
run's models averaged (what the predictor shows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lungopacity.constants import LUNG_OPACITY
from lungopacity.data.cache import PreparedCache
from lungopacity.data.preprocess import network_input
from lungopacity.inference.gradcam import HEATMAP_METHOD, grad_cam
from lungopacity.metrics.pointing import area_share, pointing_game, pointing_hit

log = logging.getLogger(__name__)

#: Heatmap function: (models, x float batch) -> (B, rows, cols) maps over the whole image.
HeatmapFn = Callable[[Sequence[torch.nn.Module], torch.Tensor], np.ndarray]


@dataclass
class PointingScores:
    """Per-patient pointing-game values (``hits`` and ``baselines`` in the order of ``positions``)."""

    positions: np.ndarray
    patient_ids: list[str]
    hits: np.ndarray
    baselines: np.ndarray


def positive_positions(cache: PreparedCache, positions: np.ndarray) -> np.ndarray:
    """The positions among ``positions`` whose patient has opacity and at least one box."""
    table = cache.table
    keep = [int(i) for i in positions if int(table["Target"].iat[int(i)]) == 1 and len(table["boxes"].iat[int(i)]) > 0]
    return np.asarray(keep, dtype=np.int64)


def model_groups(cache: PreparedCache, positions: np.ndarray, n_models: int, out_of_fold: bool) -> dict[int | None, np.ndarray]:
    """Which positions each model explains: ``{fold: positions}`` out of fold, else ``{None: all}``."""
    if not out_of_fold:
        return {None: np.asarray(positions, dtype=np.int64)}
    folds = cache.table["fold"].to_numpy()[positions].astype(int)
    return {int(k): np.asarray(positions, dtype=np.int64)[folds == k] for k in range(n_models) if (folds == k).any()}


def heatmap_scores(
    models: Sequence[torch.nn.Module],
    cache: PreparedCache,
    positions: np.ndarray,
    *,
    input_size: int | None = None,
    out_of_fold: bool = False,
    heatmap: HeatmapFn | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> PointingScores:
    """Pointing-game hit and baseline of every position (all should be positives with boxes).

    Args:
        models: the run's models, in fold order.
        cache: the prepared cache the positions index.
        positions: table positions to score.
        input_size: the network input side (the run's; default the cache's size).
        out_of_fold: explain each patient with ``models[its fold]`` (a k-fold run on its own
            cache) instead of all models averaged.
        heatmap: the map function (default :func:`grad_cam` with :data:`HEATMAP_METHOD`).
        batch_size: images per pass.
        device: where the models run.
    """
    heatmap = heatmap or (lambda ms, x: grad_cam(ms, x, **dict(HEATMAP_METHOD)))
    positions = np.asarray(positions, dtype=np.int64)
    hits = np.full(len(positions), np.nan)
    baselines = np.full(len(positions), np.nan)
    slot = {int(p): k for k, p in enumerate(positions)}
    for fold, group in model_groups(cache, positions, len(models), out_of_fold).items():
        members = list(models) if fold is None else [models[fold]]
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            images = np.stack([cache.image(int(i)) for i in chunk])
            x = network_input(images, size=input_size, device=device)
            maps = heatmap(members, x)
            for position, cam in zip(chunk, maps):
                table_row = int(position)
                boxes = cache.table["boxes"].iat[table_row]
                size = (int(cache.table["orig_h"].iat[table_row]), int(cache.table["orig_w"].iat[table_row]))
                hits[slot[table_row]] = pointing_hit(cam, boxes, size)
                baselines[slot[table_row]] = area_share(cam.shape, boxes, size)
    ids = cache.table["patientId"].astype(str).to_numpy()[positions].tolist()
    return PointingScores(positions, ids, hits, baselines)


def pointing_summary(scores: PointingScores, *, n_boot: int = 1000, seed: int = 0, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-ready pointing game of ``scores`` (:class:`~lungopacity.metrics.pointing.PointingResult`) plus ``extra``."""
    result = pointing_game(scores.hits, scores.baselines, n_boot=n_boot, seed=seed).to_dict()
    result.update(dict(extra or {}))
    return result


def evaluate_pointing(
    models: Sequence[torch.nn.Module],
    cache: PreparedCache,
    positions: np.ndarray,
    *,
    input_size: int | None = None,
    out_of_fold: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any] | None:
    """The pointing game of the runtime's heatmap (:data:`HEATMAP_METHOD`) on the positives among ``positions``.

    Returns None when no patient there has opacity with a box (nothing to point at).
    """
    positives = positive_positions(cache, positions)
    if len(positives) == 0:
        return None
    scores = heatmap_scores(models, cache, positives, input_size=input_size, out_of_fold=out_of_fold, device=device)
    summary = pointing_summary(scores, n_boot=n_boot, seed=seed, extra={
        "heatmap": {key: (list(value) if isinstance(value, tuple) else value) for key, value in HEATMAP_METHOD.items()},
        "class_index": LUNG_OPACITY,
        "explained_by": "out-of-fold model" if out_of_fold else "the run's models averaged",
    })
    log.info("pointing game on %d positive patients: hit rate %.3f, baseline %.3f", summary["n"], summary["hit_rate"], summary["baseline"])
    return summary
