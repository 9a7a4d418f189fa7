"""Post-processing of detections: NMS, WBF, shrink, gating, the tuned threshold (postprocess.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lungopacity.postprocess import (
    PostprocessConfig,
    apply_postprocess,
    apply_postprocess_all,
    cross_fitted_per_image,
    cross_fitted_rsna_map,
    load_postprocess,
    nms,
    rsna_map_by_threshold,
    rsna_map_by_threshold_and_cap,
    save_postprocess,
    threshold_candidates,
    tune_postprocess,
    weighted_boxes_fusion,
)
from lungopacity.metrics import rsna_map

ONLY_THRESHOLD = dict(fusion_options=[("none", 0.0)], shrink_options=[1.0], max_boxes_options=[None])


# ---------------------------------------------------------------------------- NMS


def test_nms_keeps_the_best_of_overlapping_boxes_in_score_order():
    boxes = np.array([[1, 0, 11, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]], dtype=float)
    scores = np.array([0.8, 0.9, 0.7, 0.6])
    # IoU(b1, b0) = 90/110 = 0.818; IoU(b1, b3) = 50/100 = 0.5 exactly: not suppressed (strict >).
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [1, 2, 3])
    np.testing.assert_array_equal(nms(boxes, scores, 0.85), [1, 0, 2, 3])
    np.testing.assert_array_equal(nms(boxes, scores, 0.49), [1, 2])
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)


# ---------------------------------------------------------------------------- WBF


def test_wbf_averages_overlapping_boxes_weighted_by_score():
    boxes = np.array([[50, 50, 60, 60], [0, 0, 10, 10], [2, 0, 12, 10]], dtype=float)
    scores = np.array([0.5, 0.9, 0.3])
    fused, fused_scores = weighted_boxes_fusion(boxes, scores, 0.5)
    # IoU of the two left boxes = 80/120 > 0.5: (0.9 * [0,0,10,10] + 0.3 * [2,0,12,10]) / 1.2
    np.testing.assert_allclose(fused, [[0.5, 0, 10.5, 10], [50, 50, 60, 60]])
    np.testing.assert_allclose(fused_scores, [0.6, 0.5])  # mean score of a cluster; best first

    _, max_scores = weighted_boxes_fusion(boxes, scores, 0.5, confidence="max")
    np.testing.assert_allclose(max_scores, [0.9, 0.5])
    # Merged from two prediction sets: a box only one set found keeps half its score.
    _, two_set_scores = weighted_boxes_fusion(boxes, scores, 0.5, n_models=2)
    np.testing.assert_allclose(two_set_scores, [0.6, 0.25])
    # Above the IoU of the pair nothing is fused.
    unfused, unfused_scores = weighted_boxes_fusion(boxes, scores, 0.7)
    np.testing.assert_allclose(unfused, boxes[[1, 0, 2]])
    np.testing.assert_allclose(unfused_scores, [0.9, 0.5, 0.3])


def test_wbf_matches_against_the_running_fused_box():
    boxes = np.array([[0, 0, 10, 10], [3, 0, 13, 10], [5, 0, 15, 10]], dtype=float)
    scores = np.array([0.5, 0.5, 0.4])
    # IoU(a, b) = 70/130 > 0.45: fused to [1.5, 0, 11.5, 10]. c overlaps that at 65/135 = 0.48
    # (> 0.45) although it overlaps a, the best box, only at 1/3: it joins the cluster.
    fused, fused_scores = weighted_boxes_fusion(boxes, scores, 0.45)
    np.testing.assert_allclose(fused, [[2.5, 0, 12.5, 10]])
    np.testing.assert_allclose(fused_scores, [1.4 / 3])


# ---------------------------------------------------------------- whole pipeline


def test_shrink_gating_threshold_and_max_boxes_exact():
    boxes = np.array([[10, 20, 30, 60], [100, 100, 140, 120]], dtype=float)
    scores = np.array([0.4, 0.8])
    config = PostprocessConfig(shrink=0.5, gating="multiply", score_threshold=0.3)
    out, out_scores = apply_postprocess(boxes, scores, 0.5, config)
    # Best first; scores x 0.5 -> 0.4, 0.2; threshold 0.3 keeps the first; shrink about the centre.
    np.testing.assert_allclose(out, [[110, 105, 130, 115]])
    np.testing.assert_allclose(out_scores, [0.4])
    out, out_scores = apply_postprocess(boxes, scores, None, PostprocessConfig(max_boxes=1))
    np.testing.assert_allclose(out, [[100, 100, 140, 120]])
    with pytest.raises(ValueError, match="P\\(opacity\\)"):
        apply_postprocess(boxes, scores, None, PostprocessConfig(gating="multiply"))


def test_fusion_runs_on_the_detector_scores_before_gating():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], dtype=float)
    scores = np.array([0.3, 0.9])
    config = PostprocessConfig(fusion="nms", fusion_iou=0.5, gating="multiply", score_threshold=0.0)
    # P = 0 zeroes every score, yet NMS still keeps the box the detector preferred.
    out, out_scores = apply_postprocess(boxes, scores, 0.0, config)
    np.testing.assert_allclose(out, [[1, 0, 11, 10]])
    np.testing.assert_allclose(out_scores, [0.0])


def test_config_json_round_trip_and_validation(tmp_path):
    config = PostprocessConfig(gating="multiply", fusion="wbf", fusion_iou=0.45, shrink=0.875, score_threshold=0.31,
                               max_boxes=4, n_models=2)
    save_postprocess(tmp_path / "pp.json", config, val_rsna_map=0.25)
    assert json.loads((tmp_path / "pp.json").read_text())["val_rsna_map"] == 0.25
    assert load_postprocess(tmp_path / "pp.json") == config
    for bad in (dict(gating="max"), dict(fusion="soft"), dict(shrink=0.0), dict(fusion="nms", fusion_iou=1.0)):
        with pytest.raises(ValueError):
            PostprocessConfig(**bad)


# ------------------------------------------------------------------------- tuning


def _box(x: float, y: float, size: float = 100.0) -> list[float]:
    return [x, y, x + size, y + size]


def test_tuned_threshold_on_a_hand_built_case():
    gt = [np.array([_box(0, 0)]), np.zeros((0, 4)), np.array([_box(0, 0)])]
    preds = [np.array([_box(0, 0), _box(200, 200)]), np.array([_box(0, 0, 50)]), np.array([_box(0, 0)])]
    scores = [np.array([0.9, 0.3]), np.array([0.2]), np.array([0.6])]
    # Keep >= 0.2: (1/2 + 0 + 1) / 3 = 0.5; >= 0.25: (1/2 + 1) / 2; >= 0.45: 1.0; >= 0.75: 0.5.
    np.testing.assert_allclose(
        rsna_map_by_threshold(gt, preds, scores, [0.2, 0.25, 0.45, 0.75, 0.95]), [0.5, 0.75, 1.0, 0.5, 0.0]
    )
    config, table = tune_postprocess(gt, preds, scores, **ONLY_THRESHOLD)
    assert config.score_threshold == pytest.approx(0.45)  # midway between the scores 0.3 and 0.6
    assert table["rsna_map"].iloc[0] == 1.0
    # On the full grid nothing beats it, and ties keep fusion, shrink and the cap switched
    # off (a cap of 1 box also scores 1.0 at this threshold).
    config, table = tune_postprocess(gt, preds, scores)
    assert (config.fusion, config.shrink, config.gating, config.max_boxes) == ("none", 1.0, "none", None)
    assert config.score_threshold == pytest.approx(0.45)
    assert len(table) == 7 * 6 * 4
    assert set(table["max_boxes"]) == {0, 1, 2, 3}


def test_tuning_switches_gating_on_when_it_helps():
    gt = [np.array([_box(0, 0)]), np.zeros((0, 4))]
    preds = [np.array([_box(0, 0)]), np.array([_box(300, 300)])]
    scores = [np.array([0.5]), np.array([0.8])]
    p_opacity = np.array([0.9, 0.1])
    config, table = tune_postprocess(gt, preds, scores, p_opacity, **ONLY_THRESHOLD)
    # Without gating the false alarm outscores the hit: 0.5 at best. Gated: 0.45 vs 0.08.
    assert set(table["gating"]) == {"none", "multiply"}
    assert table.set_index("gating").loc["none", "rsna_map"] == 0.5
    assert config.gating == "multiply"
    assert config.score_threshold == pytest.approx((0.45 + 0.08) / 2)
    boxes, kept_scores = apply_postprocess_all(preds, scores, p_opacity, config)
    assert rsna_map(gt, boxes, kept_scores) == 1.0


def test_tuning_picks_the_shrink_that_matches_the_readers():
    # The detector's boxes are 1/0.8 of the readers' (IoU 0.64: misses at IoU >= 0.65). From
    # shrink 0.9 on (IoU 0.79) every threshold is a hit; ties keep the mildest shrink.
    truth = np.array([_box(100, 100, 180)])
    centre, half = 190.0, 112.5
    pred = np.array([[centre - half, centre - half, centre + half, centre + half]])
    gt = [truth] * 4
    config, table = tune_postprocess(gt, [pred] * 4, [np.array([0.7])] * 4, fusion_options=[("none", 0.0)])
    assert config.shrink == 0.9
    assert table["rsna_map"].iloc[0] == pytest.approx(1.0)


def _random_case(seed: int, n: int = 60):
    rng = np.random.default_rng(seed)
    gt, preds, scores = [], [], []
    for _ in range(n):
        g = rng.uniform(0, 600, (int(rng.choice([0, 0, 1, 2])), 2))
        truth = np.concatenate([g, g + rng.uniform(80, 300, g.shape)], axis=1)
        jitter = truth[:, None, :] + rng.normal(0, 20, (len(truth), 2, 4))
        jitter = jitter.reshape(-1, 4)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 5)
        extra = rng.uniform(0, 700, (int(rng.integers(0, 3)), 2))
        extra = np.concatenate([extra, extra + 120], axis=1)
        p = np.concatenate([jitter, extra])
        gt.append(truth)
        preds.append(p)
        scores.append(np.round(rng.random(len(p)), 1))  # ties on purpose
    return gt, preds, scores, rng.random(n)


def test_metric_by_threshold_agrees_with_rsna_map():
    gt, preds, scores, _ = _random_case(1, n=80)
    thresholds = threshold_candidates(scores)
    fast = rsna_map_by_threshold(gt, preds, scores, thresholds)
    reference = [rsna_map(gt, [p[s >= c] for p, s in zip(preds, scores)], [s[s >= c] for s in scores])
                 for c in thresholds]
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-12)


def test_tuned_config_reproduces_its_table_value():
    gt, preds, scores, p_opacity = _random_case(2)
    config, table = tune_postprocess(gt, preds, scores, p_opacity, max_boxes_options=(3,))
    boxes, kept = apply_postprocess_all(preds, scores, p_opacity, config)
    assert rsna_map(gt, boxes, kept) == pytest.approx(table["rsna_map"].iloc[0], abs=1e-12)
    assert table["rsna_map"].is_monotonic_decreasing


def test_cross_fitted_metric_on_an_unambiguous_case():
    gt = [np.array([_box(0, 0)])] * 6 + [np.zeros((0, 4))] * 4
    preds = [np.array([_box(0, 0), _box(300, 300)])] * 6 + [np.array([_box(500, 500)])] * 4
    scores = [np.array([0.9, 0.3])] * 6 + [np.array([0.2])] * 4
    # Every half tunes a threshold in (0.3, 0.9]: hits kept, every false alarm dropped.
    assert cross_fitted_rsna_map(gt, preds, scores, **ONLY_THRESHOLD) == 1.0
    assert np.isnan(cross_fitted_rsna_map(gt[:1], preds[:1], scores[:1]))


def test_metric_by_threshold_and_cap_agrees_with_rsna_map():
    gt, preds, scores, _ = _random_case(3, n=80)
    thresholds = threshold_candidates(scores)
    caps = (None, 3, 2, 1)
    fast = rsna_map_by_threshold_and_cap(gt, preds, scores, thresholds, caps)
    assert fast.shape == (len(caps), len(thresholds))
    for row, cap in zip(fast, caps):
        reference = []
        for c in thresholds:
            orders = [np.argsort(-s, kind="stable") for s in scores]
            kept = [order[s[order] >= c][: None if cap is None else cap] for order, s in zip(orders, scores)]
            reference.append(rsna_map(gt, [p[k] for p, k in zip(preds, kept)], [s[k] for s, k in zip(scores, kept)]))
        np.testing.assert_allclose(row, reference, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(fast[0], rsna_map_by_threshold(gt, preds, scores, thresholds))
    with pytest.raises(ValueError):
        rsna_map_by_threshold_and_cap(gt, preds, scores, thresholds, (0,))


def test_tuning_switches_the_cap_on_when_it_helps():
    # Patient A: a hit at 0.9 and a false alarm at 0.8; patient B: a hit at 0.7 only. No
    # threshold keeps B's hit without A's false alarm: best 0.75 (>= 0.7: A 1/2, B 1).
    # At most one box per image keeps both hits alone: 1.0.
    gt = [np.array([_box(0, 0)]), np.array([_box(0, 0)])]
    preds = [np.array([_box(0, 0), _box(300, 300)]), np.array([_box(0, 0)])]
    scores = [np.array([0.9, 0.8]), np.array([0.7])]
    config, table = tune_postprocess(gt, preds, scores, fusion_options=[("none", 0.0)], shrink_options=[1.0])
    by_cap = table.set_index("max_boxes")["rsna_map"]
    assert by_cap.to_dict() == {1: 1.0, 0: 0.75, 3: 0.75, 2: 0.75}
    assert config.max_boxes == 1
    assert config.score_threshold == pytest.approx(0.7)
    assert table["n_boxes_kept"].iloc[0] == 2
    boxes, kept = apply_postprocess_all(preds, scores, None, config)
    assert [len(b) for b in boxes] == [1, 1]
    assert rsna_map(gt, boxes, kept) == 1.0
    assert "at most 1 boxes" in config.describe()
    # A fixed cap is a one-element grid.
    fixed, table = tune_postprocess(gt, preds, scores, fusion_options=[("none", 0.0)], shrink_options=[1.0],
                                    max_boxes_options=(None,))
    assert fixed.max_boxes is None and table["rsna_map"].iloc[0] == 0.75


def test_cross_fitting_by_given_folds():
    gt = [np.array([_box(0, 0)])] * 6 + [np.zeros((0, 4))] * 4
    preds = [np.array([_box(0, 0), _box(300, 300)])] * 6 + [np.array([_box(500, 500)])] * 4
    scores = [np.array([0.9, 0.3])] * 6 + [np.array([0.2])] * 4
    folds = np.array([0, 1, 2] * 3 + [0])
    per_image, chosen = cross_fitted_per_image(gt, preds, scores, fold_of=folds, **ONLY_THRESHOLD)
    assert len(chosen) == 3 and all(0.3 < c.score_threshold <= 0.9 for c in chosen)
    # Hits kept, false alarms dropped: 1 on the positives, not counted on the negatives.
    np.testing.assert_array_equal(per_image, [1.0] * 6 + [np.nan] * 4)
    assert cross_fitted_rsna_map(gt, preds, scores, fold_of=folds, **ONLY_THRESHOLD) == 1.0
    # Folds that split positives from negatives: the positives' settings are tuned on the
    # negatives alone, where every threshold that keeps a box scores 0 (and keeping none is
    # undefined), so the tie keeps the lowest threshold: both boxes, precision 1/2 each.
    lonely = np.array([0] * 6 + [1] * 4)
    per_image, chosen = cross_fitted_per_image(gt, preds, scores, fold_of=lonely, **ONLY_THRESHOLD)
    assert chosen[0].score_threshold == pytest.approx(0.2)
    np.testing.assert_array_equal(per_image[:6], [0.5] * 6)
    with pytest.raises(ValueError, match="fold numbers"):
        cross_fitted_per_image(gt, preds, scores, fold_of=folds[:-1])
    with pytest.raises(ValueError, match="two folds"):
        cross_fitted_per_image(gt, preds, scores, fold_of=np.zeros(10))
    assert np.isnan(cross_fitted_rsna_map(gt, preds, scores, fold_of=np.zeros(10)))
