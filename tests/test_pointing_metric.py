"""The pointing-game metric (metrics/pointing.py) on hand-built maps and boxes: exact values."""

from __future__ import annotations

import numpy as np
import pytest

from lungopacity.errors import ConfigError, DataFormatError
from lungopacity.metrics.pointing import area_share, box_mask, point_hit, pointing_game, pointing_hit


def test_box_mask_marks_cells_whose_centre_lies_in_a_box() -> None:
    # A 4 x 4 grid over a 100 x 100 image: cell centres at 12.5, 37.5, 62.5, 87.5.
    mask = box_mask((4, 4), [[0, 0, 40, 40]], (100, 100))
    expected = np.zeros((4, 4), dtype=bool)
    expected[:2, :2] = True
    np.testing.assert_array_equal(mask, expected)
    # A box border through a centre counts as inside; a box between centres holds none.
    assert box_mask((4, 4), [[37.5, 37.5, 37.5, 37.5]], (100, 100)).sum() == 1
    assert box_mask((4, 4), [[13, 13, 37, 37]], (100, 100)).sum() == 0
    # No box, no cell.
    assert not box_mask((4, 4), np.zeros((0, 4)), (100, 100)).any()


def test_box_mask_maps_a_non_square_grid_onto_the_original_pixels() -> None:
    # 2 rows x 4 cols over H=200, W=100: centres y = 50, 150 and x = 12.5, 37.5, 62.5, 87.5.
    mask = box_mask((2, 4), [[60, 100, 100, 200]], (200, 100))
    np.testing.assert_array_equal(mask, [[False, False, False, False], [False, False, True, True]])


def test_area_share_is_the_union_of_the_boxes_not_their_sum() -> None:
    # Two overlapping boxes on a 10 x 10 grid of a 10 x 10 image (centres at 0.5 ... 9.5).
    share = area_share((10, 10), [[0, 0, 5, 5], [3, 3, 8, 8]], (10, 10))
    assert share == pytest.approx((25 + 25 - 4) / 100)


def test_pointing_hit_unique_maximum_inside_and_outside() -> None:
    heatmap = np.zeros((4, 4))
    heatmap[0, 1] = 1.0  # centre (37.5, 12.5)
    assert pointing_hit(heatmap, [[0, 0, 40, 40]], (100, 100)) == 1.0
    assert pointing_hit(heatmap, [[50, 50, 100, 100]], (100, 100)) == 0.0
    # Either box of several is enough.
    assert pointing_hit(heatmap, [[50, 50, 100, 100], [30, 0, 45, 20]], (100, 100)) == 1.0


def test_pointing_hit_splits_ties_and_a_flat_map_scores_the_baseline() -> None:
    heatmap = np.zeros((4, 4))
    heatmap[0, 0] = heatmap[3, 3] = 0.7  # two maxima, one inside the box
    assert pointing_hit(heatmap, [[0, 0, 40, 40]], (100, 100)) == 0.5
    flat = np.zeros((4, 4))
    assert pointing_hit(flat, [[0, 0, 40, 40]], (100, 100)) == area_share((4, 4), [[0, 0, 40, 40]], (100, 100)) == 0.25


def test_pointing_hit_rejects_bad_maps_and_boxes() -> None:
    with pytest.raises(DataFormatError):
        pointing_hit(np.zeros(4), [[0, 0, 1, 1]], (4, 4))
    with pytest.raises(DataFormatError):
        pointing_hit(np.full((2, 2), np.nan), [[0, 0, 1, 1]], (4, 4))
    with pytest.raises(DataFormatError):
        pointing_hit(np.zeros((2, 2)), [[0, 0, 1]], (4, 4))
    with pytest.raises(ConfigError):
        pointing_hit(np.zeros((2, 2)), [[0, 0, 1, 1]], (0, 4))


def test_point_hit_borders_count_as_inside() -> None:
    boxes = [[10, 20, 30, 40]]
    assert point_hit(10, 20, boxes) and point_hit(30, 40, boxes) and point_hit(20, 30, boxes)
    assert not point_hit(9.9, 30, boxes) and not point_hit(20, 40.1, boxes)
    assert not point_hit(5, 5, np.zeros((0, 4)))


def test_pointing_game_means_and_a_paired_interval() -> None:
    result = pointing_game([1, 0, 1, 1], [0.25, 0.25, 0.5, 0.0], n_boot=200, seed=3)
    assert result.n == 4
    assert result.hit_rate == 0.75
    assert result.baseline == 0.25
    assert result.gain == 0.5
    lo, hi = result.hit_rate_ci
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0
    glo, ghi = result.gain_ci
    assert -1.0 <= glo <= 0.5 <= ghi <= 1.0
    data = result.to_dict()
    assert data["hit_rate"] == 0.75 and data["gain_ci"] == [glo, ghi] and data["n_boot"] == 200


def test_pointing_game_interval_excludes_zero_only_when_hits_beat_the_baseline() -> None:
    always = pointing_game(np.ones(50), np.full(50, 0.2), n_boot=200)
    assert always.gain_ci == pytest.approx((0.8, 0.8)) and always.beats_baseline
    chance = pointing_game(np.tile([1.0, 0.0, 0.0, 0.0, 0.0], 10), np.full(50, 0.2), n_boot=500)
    assert chance.gain == pytest.approx(0.0)
    assert chance.gain_ci[0] < 0.0 < chance.gain_ci[1] and not chance.beats_baseline


def test_pointing_game_rejects_bad_inputs() -> None:
    with pytest.raises(DataFormatError):
        pointing_game([], [])
    with pytest.raises(DataFormatError):
        pointing_game([1, 0], [0.5])
    with pytest.raises(DataFormatError):
        pointing_game([2.0], [0.5])
    with pytest.raises(ConfigError):
        pointing_game([1.0], [0.5], n_boot=-1)


def test_pointing_game_without_bootstrap_has_no_intervals() -> None:
    result = pointing_game([1.0, 0.0], [0.5, 0.5], n_boot=0)
    assert result.hit_rate == 0.5 and result.gain == 0.0
    assert result.hit_rate_ci is None and result.gain_ci is None and not result.beats_baseline
    assert result.to_dict()["gain_ci"] is None
