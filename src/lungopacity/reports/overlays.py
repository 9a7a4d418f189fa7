"""Boxes and heatmaps drawn over radiographs, as PNG, with Pillow and NumPy only.

:func:`overlay_png` draws every ground-truth box of a patient and every predicted box
with its score (the paper's Figure 10 shows all boxes of a patient this way), in
colour-blind-safe Okabe-Ito colours with a dark halo, so they stay visible over any
grey level or heatmap colour; its legend names only the kinds of box drawn.
:func:`contact_sheet` tiles such images into one PNG. :func:`heatmap_layer` colours a
Grad-CAM map with viridis (perceptually uniform; the table is built in, no matplotlib),
transparent where the map is low and outside the image content (black borders and
background); :func:`heatmap_overlay` blends it over the image and
:func:`heatmap_picture` adds the boxes on top and a colour bar. Line widths and text
sizes follow the image size, so the drawing is legible on a 128-pixel thumbnail and on a
1024-pixel original alike. No module here imports matplotlib (the runtime draws with it).
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

#: Ground-truth boxes (the readers'): Okabe-Ito sky blue.
GT_COLOR: tuple[int, int, int] = (86, 180, 233)
#: Predicted boxes and their scores: Okabe-Ito orange.
PRED_COLOR: tuple[int, int, int] = (230, 159, 0)
#: The dark line drawn under every box line, so a box shows on bright and dark alike.
HALO_COLOR: tuple[int, int, int] = (0, 0, 0)
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


def png_bytes(image: Image.Image | ArrayLike, *, compress_level: int = 6, mode: str = "RGB") -> bytes:
    """PNG bytes of a Pillow image or an array (see :func:`to_rgb_uint8`).

    ``mode="RGBA"`` takes a uint8 ``(H, W, 4)`` array as it is (e.g. :func:`heatmap_layer`);
    ``compress_level`` is zlib's (1 fastest, 9 smallest; Pillow's default 6).
    """
    if not isinstance(image, Image.Image):
        if mode == "RGBA":
            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 4:
                raise ConfigError(f"an RGBA image must be uint8 (H, W, 4), got {array.dtype} {array.shape}")
            image = Image.fromarray(np.ascontiguousarray(array), mode="RGBA")
        else:
            image = Image.fromarray(to_rgb_uint8(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
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


def _box(draw: ImageDraw.ImageDraw, xyxy: tuple[float, ...], colour: tuple[int, int, int], line: int) -> None:
    """A box line of ``colour`` over a dark halo one pixel wider on each side."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    halo = max(1, line // 2)
    draw.rectangle([x1 - halo, y1 - halo, x2 + halo, y2 + halo], outline=HALO_COLOR, width=line + 2 * halo)
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)


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
        _box(draw, (x1, y1, x2, y2), GT_COLOR, line)
    # Predictions drawn lowest score first so the best box (and its label) ends on top.
    order = np.argsort(scores, kind="stable") if scores is not None else np.arange(len(pred))
    for k in order:
        _box(draw, tuple(pred[k]), PRED_COLOR, line)
    if scores is not None:
        for k in order:
            x1, y1, x2, y2 = pred[k]
            _label(draw, (x1 + 2 * line, y1 + 2 * line), f"{scores[k]:.2f}", PRED_COLOR, font, (width, height))
    if title:
        _label(draw, (0, 0), title, TEXT_COLOR, font, (width, height))
    # The legend names only what is drawn.
    entries = [(name, colour) for name, colour, n in (("ground truth", GT_COLOR, len(gt)),
                                                      ("predicted", PRED_COLOR, len(pred))) if n]
    if legend and entries:
        small = _font(max(10, round(font_size * 0.8)))
        text_h = draw.textbbox((0, 0), "Ag", font=small)[3]
        step = text_h + 2 * max(1, text_h // 6)
        for k, (name, colour) in enumerate(entries):
            _label(draw, (0, height - (len(entries) - k) * step - 2 * (len(entries) - 1 - k)), name, colour, small,
                   (width, height))
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

#: matplotlib's viridis (CC0) sampled at 256 levels, as RGB hex: perceptually uniform,
#: readable in grey and by colour-blind readers. Built in, so no matplotlib at runtime.
_VIRIDIS_HEX = (
    "44015444025645045745055946075a46085c460a5d460b5e470d60470e61471063471164471365481467481668481769"
    "48186a481a6c481b6d481c6e481d6f481f70482071482173482374482475482576482677482878482979472a7a472c7a"
    "472d7b472e7c472f7d46307e46327e46337f463480453581453781453882443983443a83443b84433d84433e85423f85"
    "4240864241864142874144874045884046883f47883f48893e49893e4a893e4c8a3d4d8a3d4e8a3c4f8a3c508b3b518b"
    "3b528b3a538b3a548c39558c39568c38588c38598c375a8c375b8d365c8d365d8d355e8d355f8d34608d34618d33628d"
    "33638d32648e32658e31668e31678e31688e30698e306a8e2f6b8e2f6c8e2e6d8e2e6e8e2e6f8e2d708e2d718e2c718e"
    "2c728e2c738e2b748e2b758e2a768e2a778e2a788e29798e297a8e297b8e287c8e287d8e277e8e277f8e27808e26818e"
    "26828e26828e25838e25848e25858e24868e24878e23888e23898e238a8d228b8d228c8d228d8d218e8d218f8d21908d"
    "21918c20928c20928c20938c1f948c1f958b1f968b1f978b1f988b1f998a1f9a8a1e9b8a1e9c891e9d891f9e891f9f88"
    "1fa0881fa1881fa1871fa28720a38620a48621a58521a68522a78522a88423a98324aa8325ab8225ac8226ad8127ad81"
    "28ae8029af7f2ab07f2cb17e2db27d2eb37c2fb47c31b57b32b67a34b67935b77937b87838b9773aba763bbb753dbc74"
    "3fbc7340bd7242be7144bf7046c06f48c16e4ac16d4cc26c4ec36b50c46a52c56954c56856c66758c7655ac8645cc863"
    "5ec96260ca6063cb5f65cb5e67cc5c69cd5b6ccd5a6ece5870cf5773d05675d05477d1537ad1517cd2507fd34e81d34d"
    "84d44b86d54989d5488bd6468ed64590d74393d74195d84098d83e9bd93c9dd93ba0da39a2da37a5db36a8db34aadc32"
    "addc30b0dd2fb2dd2db5de2bb8de29bade28bddf26c0df25c2df23c5e021c8e020cae11fcde11dd0e11cd2e21bd5e21a"
    "d8e219dae319dde318dfe318e2e418e5e419e7e419eae51aece51befe51cf1e51df4e61ef6e620f8e621fbe723fde725"
)
VIRIDIS: np.ndarray = np.frombuffer(bytes.fromhex(_VIRIDIS_HEX), dtype=np.uint8).reshape(256, 3)
VIRIDIS.setflags(write=False)

#: Heat values below this are drawn fully transparent (no tint where the map says little).
HEAT_FLOOR = 0.2
#: Opacity of the heatmap where it is highest (it grows linearly from the floor).
HEAT_MAX_ALPHA = 0.6
#: Grey level (of 255) at or below which pixels connected to the image border count as background.
BACKGROUND_LEVEL = 8


def viridis_colormap(values: ArrayLike) -> np.ndarray:
    """Viridis colours of values in [0, 1] (clipped): uint8 ``(..., 3)``."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    return VIRIDIS[np.rint(v * 255.0).astype(np.intp)]


def content_mask(pixels: ArrayLike, level: int = BACKGROUND_LEVEL) -> np.ndarray:
    """True over the image content: False on the near-black regions that touch the border.

    Black borders and a black background around the radiograph are what a heatmap must
    not be drawn over; dark pixels inside the image (enclosed by content) stay content.
    """
    from scipy import ndimage

    grey = to_rgb_uint8(pixels)[:, :, 0]
    dark = grey <= level
    if not dark.any():
        return np.ones(grey.shape, dtype=bool)
    labels, _ = ndimage.label(dark)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, edge[edge > 0])
    return ~background


def _resized_heat(heatmap01: ArrayLike, height: int, width: int) -> np.ndarray:
    heat = np.asarray(heatmap01, dtype=np.float32)
    if heat.ndim != 2:
        raise ConfigError(f"the heatmap must be 2-D, got shape {heat.shape}")
    if heat.shape != (height, width):
        heat = np.asarray(Image.fromarray(np.ascontiguousarray(heat)).resize((width, height), Image.Resampling.BILINEAR))
    return np.clip(np.nan_to_num(heat), 0.0, 1.0)


def heat_alpha(heat01: ArrayLike, max_alpha: float = HEAT_MAX_ALPHA, floor: float = HEAT_FLOOR) -> np.ndarray:
    """Opacity per heat value: 0 up to ``floor``, then linear up to ``max_alpha`` at 1."""
    if not 0.0 <= max_alpha <= 1.0:
        raise ConfigError(f"alpha must lie in [0, 1], got {max_alpha}")
    if not 0.0 <= floor < 1.0:
        raise ConfigError(f"the heat floor must lie in [0, 1), got {floor}")
    heat = np.clip(np.asarray(heat01, dtype=np.float64), 0.0, 1.0)
    return max_alpha * np.clip((heat - floor) / (1.0 - floor), 0.0, 1.0)


def _colours_and_alpha(grey: Image.Image, heatmap01: ArrayLike, rows: int, cols: int,
                       max_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Viridis colours ``(rows, cols, 3)`` and float opacity ``(rows, cols)`` of a map over a grey image."""
    if (rows, cols) != (grey.size[1], grey.size[0]):
        # The mask from the image at the layer's size (an area average keeps black borders black).
        grey = grey.resize((cols, rows), Image.Resampling.BOX)
    mask = content_mask(np.asarray(grey))
    heat = _resized_heat(heatmap01, rows, cols)
    return viridis_colormap(heat), np.where(mask, heat_alpha(heat, max_alpha), 0.0)


def heatmap_layer(pixels: ArrayLike, heatmap01: ArrayLike, *, size: tuple[int, int] | None = None,
                  max_alpha: float = HEAT_MAX_ALPHA) -> np.ndarray:
    """The heatmap as an RGBA layer to lay over the image: uint8 ``(h, w, 4)``.

    Colours are :func:`viridis_colormap` of the map (resized to the layer, bilinear);
    alpha is :func:`heat_alpha` inside :func:`content_mask` of ``pixels`` and 0 outside.

    Args:
        pixels: the image the layer goes over (its content decides where heat may show).
        heatmap01: 2-D map in [0, 1], any size.
        size: (rows, cols) of the layer; default the image's. A smaller layer is what a
            browser stretches over the picture (the map is coarse anyway).
    """
    grey = Image.fromarray(to_rgb_uint8(pixels)[:, :, 0])
    rows, cols = size if size is not None else (grey.size[1], grey.size[0])
    colours, alpha = _colours_and_alpha(grey, heatmap01, rows, cols, max_alpha)
    layer = np.empty((rows, cols, 4), dtype=np.uint8)
    layer[:, :, :3] = colours
    layer[:, :, 3] = np.rint(alpha * 255.0).astype(np.uint8)
    return layer


def heatmap_overlay(pixels: ArrayLike, heatmap01: ArrayLike, alpha: float = HEAT_MAX_ALPHA) -> np.ndarray:
    """Blend a heatmap (e.g. Grad-CAM, values in [0, 1]) over an image.

    The map is resized to the image (bilinear), coloured with viridis and mixed as
    ``(1 - a) * image + a * colour`` with ``a`` = :func:`heat_alpha` (``alpha`` at the
    map's maximum, 0 at or below :data:`HEAT_FLOOR`) inside the image content and 0 on
    black borders and background (:func:`content_mask`).

    Returns:
        uint8 ``(H, W, 3)``, ready for :func:`overlay_png` or :func:`png_bytes`.
    """
    rgb = to_rgb_uint8(pixels)
    height, width = rgb.shape[:2]
    colours, a = _colours_and_alpha(Image.fromarray(rgb[:, :, 0]), heatmap01, height, width, alpha)
    a = a[:, :, None]
    base = rgb.astype(np.float64)
    blended = base + a * (colours.astype(np.float64) - base)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def colour_bar(height: int, width: int) -> np.ndarray:
    """A vertical viridis bar, 1 at the top: uint8 ``(height, width, 3)``."""
    values = np.linspace(1.0, 0.0, max(1, height))
    return np.repeat(viridis_colormap(values)[:, None, :], max(1, width), axis=1)


def heatmap_picture(
    pixels: ArrayLike,
    heatmap01: ArrayLike,
    pred_boxes: ArrayLike | None = None,
    pred_scores: ArrayLike | None = None,
    *,
    gt_boxes: ArrayLike | None = None,
    scale: float | tuple[float, float] = 1.0,
    label: str = "Grad-CAM",
    title: str | None = None,
) -> Image.Image:
    """The heatmap over the image, the boxes on top of it, and a colour bar at the right.

    The picture is the image's width plus a strip for the bar, which is labelled
    ``label`` with its ends "high" and "low" (the map is relative: 1 is its own maximum);
    ``title`` is written at the top left (e.g. what the map may be read as).
    The legend names the box kinds drawn (see :func:`overlay_image`).
    """
    blended = heatmap_overlay(pixels, heatmap01)
    over = overlay_image(blended, gt_boxes, pred_boxes, pred_scores, title, scale=scale)
    height, width = blended.shape[:2]
    _, font_size = _sizes(height, width)
    font = _font(max(10, round(font_size * 0.8)))
    probe = ImageDraw.Draw(over)
    text_w = max(probe.textlength(t, font=font) for t in ("high", "low", label))
    text_h = probe.textbbox((0, 0), "Ag", font=font)[3]
    bar_w = max(6, round(width / 40))
    pad = max(2, round(width / 100))
    strip = int(np.ceil(bar_w + 3 * pad + text_w))
    canvas = Image.new("RGB", (width + strip, height), SHEET_BACKGROUND)
    canvas.paste(over, (0, 0))
    top, bottom = pad + text_h + pad, height - pad - text_h - pad
    if bottom - top > 4:
        canvas.paste(Image.fromarray(colour_bar(bottom - top, bar_w)), (width + pad, top))
        draw = ImageDraw.Draw(canvas)
        draw.text((width + pad, pad), label, fill=TEXT_COLOR, font=font)
        draw.text((width + 2 * pad + bar_w, top), "high", fill=TEXT_COLOR, font=font)
        draw.text((width + 2 * pad + bar_w, bottom - text_h), "low", fill=TEXT_COLOR, font=font)
    return canvas
