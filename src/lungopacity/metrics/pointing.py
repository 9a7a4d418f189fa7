"""The pointing game: does a heatmap's maximum lie inside a ground-truth box?

Zhang et al. (ECCV 2016, "Top-down neural attention by excitation backprop") score a
saliency map by whether its maximum falls on the object. Here, for one image:

* the map is a ``rows x cols`` grid laid over the whole image of ``H x W`` original pixels;
  cell ``(r, c)`` stands for the point at its centre, ``x = (c + 0.5) W / cols``,
  ``y = (r + 0.5) H / rows``;
* a point is **in** the boxes when it lies in (or on the border of) at least one xyxy box,
  in original pixels;
* the **hit** is the share of the map's maximal cells that are in the boxes: 1 or 0 when
  the maximum is unique, and a tie is split evenly, so a constant map (no evidence: every
  cell is maximal) scores exactly the baseline;
* the **baseline** is the share of the grid's cells in the boxes: the chance that a point
  drawn uniformly over the image hits a box (the union of the boxes' area, as a fraction
  of the image, measured on the same grid).

Over a set of positive images the hit rate is the mean hit and the baseline the mean
baseline; :func:`pointing_game` adds percentile bootstrap intervals (images resampled) for
the hit rate and for the paired difference hit - baseline. A detector's top box is scored
with :func:`point_hit` on its centre.

Pure NumPy; boxes are xyxy in original pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lungopacity.errors import ConfigError, DataFormatError

__all__ = [
    "PointingResult",
    "area_share",
    "box_mask",
    "point_hit",
    "pointing_game",
    "pointing_hit",
]


def _as_boxes(boxes: Any) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4))
    if array.ndim != 2 or array.shape[1] != 4:
        raise DataFormatError(f"boxes: expected an (N, 4) xyxy array, got shape {array.shape}")
    return array


def _as_image_size(image_size: tuple[int, int]) -> tuple[float, float]:
    height, width = (float(side) for side in image_size)
    if height <= 0 or width <= 0:
        raise ConfigError(f"image_size: expected positive (rows, cols), got {image_size}")
    return height, width


def box_mask(shape: tuple[int, int], boxes: Any, image_size: tuple[int, int]) -> np.ndarray:
    """Boolean ``shape`` grid: True where the cell's centre lies in at least one box.

    Args:
        shape: ``(rows, cols)`` of the grid (a heatmap's shape).
        boxes: ``(N, 4)`` xyxy in original pixels (borders count as inside).
        image_size: ``(H, W)`` of the original image the grid covers.
    """
    rows, cols = (int(side) for side in shape)
    if rows < 1 or cols < 1:
        raise ConfigError(f"shape: expected a grid of at least 1 x 1 cells, got {shape}")
    height, width = _as_image_size(image_size)
    array = _as_boxes(boxes)
    ys = (np.arange(rows) + 0.5) * (height / rows)
    xs = (np.arange(cols) + 0.5) * (width / cols)
    mask = np.zeros((rows, cols), dtype=bool)
    for x1, y1, x2, y2 in array:
        in_rows = (ys >= y1) & (ys <= y2)
        in_cols = (xs >= x1) & (xs <= x2)
        mask |= in_rows[:, None] & in_cols[None, :]
    return mask


def area_share(shape: tuple[int, int], boxes: Any, image_size: tuple[int, int]) -> float:
    """The baseline: share of the grid's cells whose centre lies in a box (a random point's chance)."""
    return float(box_mask(shape, boxes, image_size).mean())


def pointing_hit(heatmap: Any, boxes: Any, image_size: tuple[int, int]) -> float:
    """Share of the map's maximal cells that lie in a box (1.0 / 0.0 for a unique maximum).

    Args:
        heatmap: 2-D finite map over the whole image (any resolution).
        boxes: ``(N, 4)`` xyxy in original pixels.
        image_size: ``(H, W)`` of the original image.

    Raises:
        DataFormatError: the map is not 2-D or holds NaN/inf.
    """
    values = np.asarray(heatmap, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise DataFormatError(f"heatmap: expected a non-empty 2-D map, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise DataFormatError("heatmap: holds NaN or infinite values")
    peak = values == values.max()
    inside = box_mask(values.shape, boxes, image_size)
    return float(inside[peak].mean())


def point_hit(x: float, y: float, boxes: Any) -> bool:
    """Whether the point ``(x, y)`` (original pixels) lies in (or on the border of) a box."""
    array = _as_boxes(boxes)
    return bool(np.any((array[:, 0] <= x) & (x <= array[:, 2]) & (array[:, 1] <= y) & (y <= array[:, 3])))


@dataclass(frozen=True)
class PointingResult:
    """A pointing-game score over ``n`` images, with 95 % percentile bootstrap intervals.

    ``gain`` is the mean of hit - baseline per image (paired); ``gain_ci`` excludes 0 when
    the method beats a random point on these images; both intervals are None with
    ``n_boot == 0``.
    """

    n: int
    hit_rate: float
    hit_rate_ci: tuple[float, float] | None
    baseline: float
    gain: float
    gain_ci: tuple[float, float] | None
    n_boot: int

    @property
    def beats_baseline(self) -> bool:
        """True when the whole 95 % interval of hit - baseline lies above 0."""
        return self.gain_ci is not None and bool(self.gain_ci[0] > 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists for the intervals, ``beats_baseline`` included."""
        data = asdict(self)
        data["hit_rate_ci"] = list(self.hit_rate_ci) if self.hit_rate_ci is not None else None
        data["gain_ci"] = list(self.gain_ci) if self.gain_ci is not None else None
        data["beats_baseline"] = self.beats_baseline
        return data


def pointing_game(hits: Sequence[float] | np.ndarray, baselines: Sequence[float] | np.ndarray, *,
                  n_boot: int = 1000, seed: int = 0) -> PointingResult:
    """Hit rate, baseline and their paired difference over images, with bootstrap intervals.

    Args:
        hits: per image, :func:`pointing_hit` (or :func:`point_hit` as 0/1).
        baselines: per image, :func:`area_share` (same order).
        n_boot: bootstrap resamples of the images (the same resamples for both intervals;
            0: no intervals).
        seed: the resampling seed.

    Raises:
        DataFormatError: no image, unequal lengths, or values outside [0, 1].
        ConfigError: ``n_boot < 0``.
    """
    hit = np.asarray(hits, dtype=np.float64).reshape(-1)
    base = np.asarray(baselines, dtype=np.float64).reshape(-1)
    if hit.size == 0:
        raise DataFormatError("pointing game: no image to score")
    if hit.shape != base.shape:
        raise DataFormatError(f"pointing game: {hit.size} hits but {base.size} baselines")
    for name, values in (("hits", hit), ("baselines", base)):
        if not (np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()):
            raise DataFormatError(f"pointing game: {name} must lie in [0, 1]")
    if n_boot < 0:
        raise ConfigError(f"n_boot must be >= 0, got {n_boot}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, hit.size, size=(n_boot, hit.size))

    def interval(values: np.ndarray) -> tuple[float, float] | None:
        if n_boot == 0:
            return None
        lo, hi = np.percentile(values[draws].mean(axis=1), [2.5, 97.5])
        return float(lo), float(hi)

    return PointingResult(
        n=int(hit.size),
        hit_rate=float(hit.mean()),
        hit_rate_ci=interval(hit),
        baseline=float(base.mean()),
        gain=float((hit - base).mean()),
        gain_ci=interval(hit - base),
        n_boot=int(n_boot),
    )
