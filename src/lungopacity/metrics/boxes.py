"""Box helpers shared by the metrics (pure NumPy).

Boxes inside the package are **xyxy in pixels**: float arrays of shape ``(N, 4)``
holding ``x1, y1, x2, y2`` with ``x1 < x2`` and ``y1 < y2``. The RSNA CSV form
``x, y, width, height`` (xywh) is converted at the edges with :func:`xywh_to_xyxy`
and :func:`xyxy_to_xywh`.

Areas are plain ``(x2 - x1) * (y2 - y1)`` (continuous coordinates, no ``+ 1``), which is
what the RSNA challenge scorer uses on its ``x, y, width, height`` boxes.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import ArrayLike

from lungopacity.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "as_boxes",
    "box_area",
    "clip_boxes",
    "iou_matrix",
    "scale_boxes",
    "shrink_boxes",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]


def as_boxes(boxes: ArrayLike | None) -> np.ndarray:
    """Return ``boxes`` as a float64 ``(N, 4)`` array.

    ``None`` and empty inputs (``[]``, shape ``(0,)`` or ``(0, 4)``) give a ``(0, 4)``
    array; a single box of shape ``(4,)`` becomes ``(1, 4)``.

    Raises:
        ValueError: if the input cannot be read as ``(N, 4)`` or holds non-finite values.
    """
    if boxes is None:
        return np.zeros((0, 4), dtype=np.float64)
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ConfigError(f"boxes must have shape (N, 4), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ConfigError("boxes hold non-finite values")
    return array


def xywh_to_xyxy(boxes: ArrayLike) -> np.ndarray:
    """Convert ``x, y, width, height`` boxes (RSNA CSV form) to ``x1, y1, x2, y2``.

    Works on any array whose last axis has length 4; returns float64.
    """
    array = np.asarray(boxes, dtype=np.float64)
    if array.shape[-1:] != (4,):
        raise ConfigError(f"last axis must have length 4, got shape {array.shape}")
    out = array.copy()
    out[..., 2] = array[..., 0] + array[..., 2]
    out[..., 3] = array[..., 1] + array[..., 3]
    return out


def xyxy_to_xywh(boxes: ArrayLike) -> np.ndarray:
    """Convert ``x1, y1, x2, y2`` boxes to ``x, y, width, height`` (RSNA CSV form).

    Works on any array whose last axis has length 4; returns float64.
    """
    array = np.asarray(boxes, dtype=np.float64)
    if array.shape[-1:] != (4,):
        raise ConfigError(f"last axis must have length 4, got shape {array.shape}")
    out = array.copy()
    out[..., 2] = array[..., 2] - array[..., 0]
    out[..., 3] = array[..., 3] - array[..., 1]
    return out


def box_area(boxes: ArrayLike) -> np.ndarray:
    """Area of xyxy boxes (last axis of length 4); inverted boxes count as area 0."""
    array = np.asarray(boxes, dtype=np.float64)
    widths = np.clip(array[..., 2] - array[..., 0], 0.0, None)
    heights = np.clip(array[..., 3] - array[..., 1], 0.0, None)
    return widths * heights


def iou_matrix(boxes_a: ArrayLike, boxes_b: ArrayLike) -> np.ndarray:
    """Pairwise intersection over union of xyxy boxes.

    Args:
        boxes_a: ``(..., N, 4)`` xyxy boxes.
        boxes_b: ``(..., M, 4)`` xyxy boxes; leading axes broadcast against ``boxes_a``'s.

    Returns:
        float64 array ``(..., N, M)``; pairs whose union is 0 (two empty boxes) get IoU 0.
    """
    a = np.asarray(boxes_a, dtype=np.float64)
    b = np.asarray(boxes_b, dtype=np.float64)
    if a.shape[-1:] != (4,) or b.shape[-1:] != (4,) or a.ndim < 2 or b.ndim < 2:
        raise ConfigError(f"boxes must have shape (..., N, 4); got {a.shape} and {b.shape}")
    a_exp = a[..., :, None, :]
    b_exp = b[..., None, :, :]
    inter_w = np.minimum(a_exp[..., 2], b_exp[..., 2]) - np.maximum(a_exp[..., 0], b_exp[..., 0])
    inter_h = np.minimum(a_exp[..., 3], b_exp[..., 3]) - np.maximum(a_exp[..., 1], b_exp[..., 1])
    intersection = np.clip(inter_w, 0.0, None) * np.clip(inter_h, 0.0, None)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0.0, intersection / np.where(union > 0.0, union, 1.0), 0.0)
    return iou


def clip_boxes(boxes: ArrayLike, height: float, width: float) -> np.ndarray:
    """Clip xyxy boxes to an image of ``height`` x ``width`` pixels (``[0, width]``, ``[0, height]``)."""
    array = np.asarray(boxes, dtype=np.float64).copy()
    array[..., 0::2] = np.clip(array[..., 0::2], 0.0, float(width))
    array[..., 1::2] = np.clip(array[..., 1::2], 0.0, float(height))
    return array


def scale_boxes(boxes: ArrayLike, scale_x: float, scale_y: float | None = None) -> np.ndarray:
    """Multiply x coordinates by ``scale_x`` and y coordinates by ``scale_y`` (default: ``scale_x``).

    Used to move boxes between original pixels and prepared (resized) pixels,
    e.g. ``scale_boxes(boxes, S / orig_w, S / orig_h)``.
    """
    scale_y = scale_x if scale_y is None else scale_y
    array = np.asarray(boxes, dtype=np.float64).copy()
    array[..., 0::2] *= float(scale_x)
    array[..., 1::2] *= float(scale_y)
    return array


def shrink_boxes(boxes: ArrayLike, factor: float) -> np.ndarray:
    """Scale xyxy boxes about their own centre: width and height are multiplied by ``factor``.

    ``factor < 1`` shrinks (a common RSNA post-processing step, since detectors trained on
    the generous RSNA boxes over-cover), ``factor > 1`` grows. The centre stays put.

    Raises:
        ValueError: if ``factor`` is not positive.
    """
    if not factor > 0:
        raise ConfigError(f"factor must be > 0, got {factor}")
    array = np.asarray(boxes, dtype=np.float64)
    centre_x = (array[..., 0] + array[..., 2]) / 2.0
    centre_y = (array[..., 1] + array[..., 3]) / 2.0
    half_w = (array[..., 2] - array[..., 0]) * (factor / 2.0)
    half_h = (array[..., 3] - array[..., 1]) * (factor / 2.0)
    return np.stack(
        [centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], axis=-1
    )
