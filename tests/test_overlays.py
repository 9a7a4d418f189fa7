"""Pictures for people: the viridis table, where a heatmap may show, boxes on top, the legend.

Hand-built images with known answers: a black border the heatmap must stay off, a map
whose low part must stay transparent, boxes whose colour must survive the heatmap under
them, a legend that names only what was drawn, and a colour bar that runs low to high.
"""

from __future__ import annotations

import numpy as np
import pytest

from lungopacity.errors import ConfigError
from lungopacity.reports.overlays import (
    GT_COLOR,
    HALO_COLOR,
    HEAT_FLOOR,
    HEAT_MAX_ALPHA,
    PRED_COLOR,
    VIRIDIS,
    content_mask,
    heat_alpha,
    heatmap_layer,
    heatmap_overlay,
    heatmap_picture,
    overlay_image,
    png_bytes,
    read_png,
    to_rgb_uint8,
    viridis_colormap,
)


def _has(image: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((np.asarray(image)[:, :, :3] == colour).all(axis=2).any())


def test_viridis_is_matplotlibs_table() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    expected = np.rint(matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(VIRIDIS, expected)
    np.testing.assert_array_equal(viridis_colormap([0.0, 1.0, -3.0, 7.0, np.nan]),
                                  [[68, 1, 84], [253, 231, 37], [68, 1, 84], [253, 231, 37], [68, 1, 84]])
    # Perceptually ordered: lightness (here the plain luma) rises monotonically.
    luma = VIRIDIS.astype(float) @ [0.299, 0.587, 0.114]
    assert (np.diff(luma) > -0.5).all()


def test_content_mask_leaves_out_black_borders_but_not_dark_inner_parts() -> None:
    image = np.zeros((20, 30))
    image[3:17, 5:25] = 0.6  # the radiograph inside a black border
    image[8:12, 12:18] = 0.0  # a black spot inside it (enclosed): still content
    mask = content_mask(image)
    assert not mask[:3].any() and not mask[17:].any() and not mask[:, :5].any() and not mask[:, 25:].any()
    assert mask[3:17, 5:25].all()
    assert content_mask(np.full((4, 4), 0.5)).all()


def test_heat_alpha_is_zero_up_to_the_floor_then_linear() -> None:
    values = [0.0, HEAT_FLOOR, (1 + HEAT_FLOOR) / 2, 1.0]
    np.testing.assert_allclose(heat_alpha(values), [0.0, 0.0, HEAT_MAX_ALPHA / 2, HEAT_MAX_ALPHA])
    with pytest.raises(ConfigError):
        heat_alpha(values, max_alpha=1.5)


def test_heatmap_layer_shows_only_high_heat_over_the_content() -> None:
    image = np.zeros((40, 40))
    image[:, 10:] = 0.5  # a black band on the left: background
    heat = np.ones((40, 40))
    heat[20:] = 0.1  # the lower half is below the floor
    layer = heatmap_layer(image, heat)
    assert layer.shape == (40, 40, 4) and layer.dtype == np.uint8
    assert (layer[:, :10, 3] == 0).all()  # never over the black border
    assert (layer[20:, :, 3] == 0).all()  # no tint where the map says little
    assert (layer[:20, 10:, 3] == round(HEAT_MAX_ALPHA * 255)).all()
    np.testing.assert_array_equal(layer[0, 20, :3], VIRIDIS[255])
    # A smaller layer for the page: the mask is taken at that size.
    small = heatmap_layer(image, heat, size=(10, 10))
    assert small.shape == (10, 10, 4) and (small[:, :2, 3] == 0).all() and (small[:5, 3:, 3] > 0).all()
    assert read_png(png_bytes(small, mode="RGBA")).shape == (10, 10, 3)


def test_heatmap_overlay_blends_exactly() -> None:
    grey = np.full((8, 8), 0.5)  # 128
    heat = np.zeros((8, 8))
    heat[:4] = 1.0
    blended = heatmap_overlay(grey, heat, alpha=0.5)
    # Top: half grey, half viridis' yellow (253, 231, 37); bottom: the image untouched.
    np.testing.assert_array_equal(blended[0, 0], np.rint(0.5 * 128 + 0.5 * np.array([253, 231, 37])))
    np.testing.assert_array_equal(blended[7, 7], [128, 128, 128])
    np.testing.assert_array_equal(heatmap_overlay(grey, heat, alpha=0.0), to_rgb_uint8(grey))


def test_boxes_have_a_halo_and_the_legend_names_only_what_is_drawn() -> None:
    pixels = np.full((200, 200), 0.5)
    only_predicted = np.asarray(overlay_image(pixels, None, [[50, 50, 150, 150]], [0.9]))
    assert _has(only_predicted, PRED_COLOR) and not _has(only_predicted, GT_COLOR)
    # The coloured line (2 px here, drawn inwards from x1 = 50) has a dark pixel on each side.
    np.testing.assert_array_equal(only_predicted[100, 48:54], [(128,) * 3, HALO_COLOR, PRED_COLOR, PRED_COLOR,
                                                               HALO_COLOR, (128,) * 3])
    both = np.asarray(overlay_image(pixels, [[10, 10, 40, 40]], [[50, 50, 150, 150]], [0.9]))
    assert _has(both, GT_COLOR) and _has(both, PRED_COLOR)
    nothing = np.asarray(overlay_image(pixels, None, None))
    np.testing.assert_array_equal(nothing, to_rgb_uint8(pixels))  # no boxes: no legend either


def test_heatmap_picture_keeps_the_boxes_on_top_and_adds_a_colour_bar() -> None:
    pixels = np.full((200, 300), 0.5)
    heat = np.ones((8, 8))  # the map at its maximum under the box
    picture = np.asarray(heatmap_picture(pixels, heat, [[60, 40, 200, 160]], [0.8]))
    assert picture.shape[0] == 200 and picture.shape[1] > 300
    assert (picture[100, 60] == PRED_COLOR).all()  # the box line is untouched by the heatmap
    assert (picture[100, 100] != to_rgb_uint8(pixels)[100, 100]).any()  # the heatmap is there
    bar = picture[:, 300:]
    assert _has(bar, tuple(VIRIDIS[255])) and _has(bar, tuple(VIRIDIS[0]))
    top = np.argwhere((bar == VIRIDIS[255]).all(axis=2))[:, 0].min()
    bottom = np.argwhere((bar == VIRIDIS[0]).all(axis=2))[:, 0].max()
    assert top < bottom  # high at the top
