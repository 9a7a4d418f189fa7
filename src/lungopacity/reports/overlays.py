"""Boxes and heatmaps drawn over radiographs, as PNG, with Pillow only.

:func:`overlay_png` draws every ground-truth box of a patient in green and every
predicted box in orange with its score (the paper's Figure 10 shows all boxes of a
patient this way); :func:`contact_sheet` tiles such images into one PNG;
:func:`heatmap_overlay` blends a Grad-CAM map over the image with a jet-like colormap
computed in NumPy. Line widths and text sizes follow the image size, so the drawing is
legible on a 128-pixel thumbnail and on a 1024-pixel original alike.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageDraw, ImageFont

from lungopacity.errors import ConfigError

log = logging.getLogger(__name__)

#: Ground-truth boxes (the readers').
GT_COLOR: tuple[int, int, int] = (0, 255, 0)
#: Predicted boxes and their scores.
PRED_COLOR: tuple[int, int, int] = (255, 140, 0)
TEXT_COLOR: tuple[int, int, int] = (255, 255, 255)
LABEL_BACKGROUND: tuple[int, int, int] = (0, 0, 0)
SHEET_BACKGROUND: tuple[int, int, int] = (24, 24, 24)


# -------------------------------------------------------------------- conversions


def to_rgb_uint8(pixels: ArrayLike) -> np.ndarray:
    """An image as uint8 ``(H, W, 3)``.

    Accepts ``(H, W)`` or ``(H, W, 3)`` arrays, float in [0, 1] (the package's pixel
    convention; clipped) or uint8.
    """
    array = np.asarray(pixels)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ConfigError(f"an image must be (H, W) or (H, W, 3), got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(np.asarray(array, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def png_bytes(image: Image.Image | ArrayLike) -> bytes:
    """PNG bytes of a Pillow image or an array (see :func:`to_rgb_uint8`)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(to_rgb_uint8(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def read_png(data: bytes) -> np.ndarray:
    """uint8 ``(H, W, 3)`` array of PNG (or any Pillow-readable) bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, OSError):  # older Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _sizes(height: int, width: int) -> tuple[int, int]:
    """(line width, font size) for an image; both grow with the image."""
    side = min(height, width)
    return max(2, round(side / 220)), max(10, round(side / 26))


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: tuple[int, int, int],
           font: ImageFont.FreeTypeFont | ImageFont.ImageFont, bounds: tuple[int, int]) -> None:
    """Text on a dark plate, kept inside the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, (bottom - top) // 6)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0.0, xy[0]), max(0.0, bounds[0] - w))
    y = min(max(0.0, xy[1]), max(0.0, bounds[1] - h))
    draw.rectangle([x, y, x + w, y + h], fill=LABEL_BACKGROUND)
    draw.text((x + pad - left, y + pad - top), text, fill=color, font=font)


# ------------------------------------------------------------------------- overlays


def _scaled(boxes: ArrayLike | None, scale: float | tuple[float, float]) -> np.ndarray:
    array = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx, sy = (scale, scale) if np.isscalar(scale) else scale
    return array * np.array([sx, sy, sx, sy], dtype=np.float64)


def overlay_image(
    pixels: ArrayLike,
    gt_boxes: ArrayLike | None,
    pred_boxes: ArrayLike | None,
    pred_scores: ArrayLike | None = None,
    title: str | None = None,
    *,
    scale: float | tuple[float, float] = 1.0,
    legend: bool = True,
) -> Image.Image:
    """The Pillow image behind :func:`overlay_png` (same arguments)."""
    rgb = to_rgb_uint8(pixels)
    height, width = rgb.shape[:2]
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    line, font_size = _sizes(height, width)
    font = _font(font_size)
    gt = _scaled(gt_boxes, scale)
    pred = _scaled(pred_boxes, scale)
    scores = None if pred_scores is None else np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    if scores is not None and len(scores) != len(pred):
        raise ConfigError(f"{len(pred)} predicted boxes but {len(scores)} scores")
    for x1, y1, x2, y2 in gt:
        draw.rectangle([x1, y1, x2, y2], outline=GT_COLOR, width=line)
    # Predictions drawn lowest score first so the best box (and its label) ends on top.
    order = np.argsort(scores, kind="stable") if scores is not None else np.arange(len(pred))
    for k in order:
        x1, y1, x2, y2 = pred[k]
        draw.rectangle([x1, y1, x2, y2], outline=PRED_COLOR, width=line)
    if scores is not None:
        for k in order:
            x1, y1, x2, y2 = pred[k]
            _label(draw, (x1 + line, y1 + line), f"{scores[k]:.2f}", PRED_COLOR, font, (width, height))
    if title:
        _label(draw, (0, 0), title, TEXT_COLOR, font, (width, height))
    if legend and (len(gt) or len(pred)):
        small = _font(max(10, round(font_size * 0.8)))
        text_h = draw.textbbox((0, 0), "Ag", font=small)[3]
        y = height - 2 * (text_h + 2 * max(1, text_h // 6)) - 2
        _label(draw, (0, y), "ground truth", GT_COLOR, small, (width, height))
        _label(draw, (0, height), "predicted", PRED_COLOR, small, (width, height))
    return image


def overlay_png(
    pixels_float01: ArrayLike,
    gt_boxes: ArrayLike | None,
    pred_boxes: ArrayLike | None,
    pred_scores: ArrayLike | None = None,
    title: str | None = None,
    *,
    scale: float | tuple[float, float] = 1.0,
    legend: bool = True,
) -> bytes:
    """All boxes of a patient over the image, as PNG bytes of the image's size.

    Args:
        pixels_float01: ``(H, W)`` float image in [0, 1] (uint8 or an RGB array, e.g. a
            :func:`heatmap_overlay`, also work).
        gt_boxes: ``(G, 4)`` xyxy ground-truth boxes, drawn in :data:`GT_COLOR`.
        pred_boxes: ``(P, 4)`` xyxy predicted boxes, drawn in :data:`PRED_COLOR`.
        pred_scores: ``(P,)`` scores, written at each predicted box's corner.
        title: a line written at the top left (e.g. the patient id and its score).
        scale: factor (or ``(sx, sy)``) from the boxes' pixels to the image's pixels,
            e.g. ``S / 1024`` to draw original-pixel boxes over a prepared ``S x S`` image.
        legend: name the two colours at the bottom left.
    """
    return png_bytes(overlay_image(pixels_float01, gt_boxes, pred_boxes, pred_scores, title,
                                   scale=scale, legend=legend))


def contact_sheet(
    images: Sequence[bytes | ArrayLike | Image.Image],
    columns: int,
    *,
    cell_size: int | None = None,
    gap: int = 4,
) -> bytes:
    """Tile images into one PNG, ``columns`` per row, in the order given.

    Each tile is fitted into a square cell (aspect ratio kept, centred); the cell side is
    ``cell_size`` or, by default, the largest side among the tiles.

    Args:
        images: PNG bytes, arrays (see :func:`to_rgb_uint8`) or Pillow images.
        columns: tiles per row (>= 1).
        cell_size: side of a cell in pixels.
        gap: pixels between cells and around the sheet.
    """
    if columns < 1:
        raise ConfigError(f"columns must be >= 1, got {columns}")
    tiles = []
    for item in images:
        if isinstance(item, Image.Image):
            tiles.append(item.convert("RGB"))
        elif isinstance(item, (bytes, bytearray)):
            tiles.append(Image.fromarray(read_png(bytes(item))))
        else:
            tiles.append(Image.fromarray(to_rgb_uint8(item)))
    if not tiles:
        raise ConfigError("no images for the contact sheet")
    cell = cell_size or max(max(t.size) for t in tiles)
    rows = -(-len(tiles) // columns)
    used_columns = min(columns, len(tiles))
    sheet = Image.new(
        "RGB", (used_columns * cell + (used_columns + 1) * gap, rows * cell + (rows + 1) * gap), SHEET_BACKGROUND
    )
    for k, tile in enumerate(tiles):
        factor = cell / max(tile.size)
        if factor != 1.0:
            tile = tile.resize((max(1, round(tile.size[0] * factor)), max(1, round(tile.size[1] * factor))),
                               Image.Resampling.LANCZOS)
        row, column = divmod(k, columns)
        x = gap + column * (cell + gap) + (cell - tile.size[0]) // 2
        y = gap + row * (cell + gap) + (cell - tile.size[1]) // 2
        sheet.paste(tile, (x, y))
    return png_bytes(sheet)


# ------------------------------------------------------------------------- heatmaps


def jet_colormap(values: ArrayLike) -> np.ndarray:
    """Jet-like colours (blue -> cyan -> yellow -> red) of values in [0, 1]: uint8 ``(..., 3)``."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return np.rint(np.stack([red, green, blue], axis=-1) * 255.0).astype(np.uint8)


def heatmap_overlay(pixels: ArrayLike, heatmap01: ArrayLike, alpha: float = 0.4) -> np.ndarray:
    """Blend a heatmap (e.g. Grad-CAM, values in [0, 1]) over an image.

    The heatmap is resized to the image (bilinear) when their sizes differ, coloured
    with :func:`jet_colormap` and mixed as ``(1 - alpha) * image + alpha * colour``.

    Returns:
        uint8 ``(H, W, 3)``, ready for :func:`overlay_png` or :func:`png_bytes`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = to_rgb_uint8(pixels)
    heat = np.asarray(heatmap01, dtype=np.float32)
    if heat.ndim != 2:
        raise ConfigError(f"the heatmap must be 2-D, got shape {heat.shape}")
    height, width = rgb.shape[:2]
    if heat.shape != (height, width):
        heat = np.asarray(Image.fromarray(heat).resize((width, height), Image.Resampling.BILINEAR))
    colours = jet_colormap(heat).astype(np.float64)
    blended = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
