"""The RSNA challenge metric, FROC and box helpers: exact hand-built cases and agreement
with a plain-Python reference written here."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from lungopacity.metrics import (
    RSNA_IOU_THRESHOLDS,
    clip_boxes,
    froc_curve,
    image_precision,
    iou_matrix,
    per_image_precision,
    precision_per_threshold,
    rsna_map,
    scale_boxes,
    sensitivity_at_fppi,
    shrink_boxes,
    xywh_to_xyxy,
    xyxy_to_xywh,
)

EMPTY = np.zeros((0, 4))
NO_SCORES = np.zeros(0)


def strip(x1: float, x2: float) -> list[float]:
    """A box 100 px tall between x1 and x2, so IoU reduces to 1-D interval overlap."""
    return [x1, 0.0, x2, 100.0]


# --------------------------------------------------------------------------- reference


def reference_iou(a, b) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_image_score(gt, preds, scores, thresholds=RSNA_IOU_THRESHOLDS):
    """The challenge rule, written as literally as possible with Python lists."""
    gt = [list(map(float, g)) for g in gt]
    order = sorted(range(len(preds)), key=lambda i: -float(scores[i]))  # sorted() is stable
    preds = [list(map(float, preds[i])) for i in order]
    if not gt and not preds:
        return None
    per_threshold = []
    for t in thresholds:
        matched = [False] * len(gt)
        tp = 0
        for p in preds:
            best_index, best_iou = None, None
            for j, g in enumerate(gt):
                value = reference_iou(p, g)
                if not matched[j] and value > t and (best_iou is None or value > best_iou):
                    best_index, best_iou = j, value
            if best_index is not None:
                matched[best_index] = True
                tp += 1
        fp = len(preds) - tp
        fn = len(gt) - tp
        per_threshold.append(tp / (tp + fp + fn))
    return sum(per_threshold) / len(per_threshold)


def random_case(rng: np.random.Generator):
    """A small image on a coarse integer grid: exact IoU ties, duplicate boxes, score ties."""
    n_gt = 0 if rng.random() < 0.4 else int(rng.integers(1, 5))
    n_pred = int(rng.integers(0, 6))

    def boxes(n):
        corner = rng.integers(0, 8, size=(n, 2)).astype(float)
        size = rng.integers(1, 6, size=(n, 2)).astype(float)
        return np.concatenate([corner, corner + size], axis=1) * 10.0

    gt = boxes(n_gt)
    if n_gt >= 2 and rng.random() < 0.2:
        gt[1] = gt[0]  # two identical ground truths: equal IoU to every prediction
    preds = boxes(n_pred)
    if n_gt and n_pred:
        # Some predictions are near-copies of ground truth so that hits are common.
        copies = min(n_gt, n_pred, int(rng.integers(0, 3)))
        preds[:copies] = gt[:copies] + rng.integers(-1, 2, size=(copies, 4)) * 10.0
        preds[:, 2:] = np.maximum(preds[:, 2:], preds[:, :2] + 10.0)
    scores = np.round(rng.random(n_pred), 1)  # ties in confidence
    return gt, preds, scores


# --------------------------------------------------------------------------- hand-built


def test_thresholds_are_the_challenge_ones():
    assert RSNA_IOU_THRESHOLDS == pytest.approx([0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75])


def test_empty_ground_truth_without_predictions_is_left_out():
    assert image_precision(EMPTY, EMPTY, NO_SCORES) is None
    assert image_precision(None, [], []) is None
    perfect = np.array([strip(0, 100)])
    # The empty image would pull the mean to 0.5 if it counted.
    assert rsna_map([perfect, EMPTY], [perfect, EMPTY], [np.array([0.9]), NO_SCORES]) == 1.0
    assert np.isnan(rsna_map([EMPTY], [EMPTY], [NO_SCORES]))
    assert np.isnan(per_image_precision([EMPTY], [EMPTY], [NO_SCORES])[0])


def test_empty_ground_truth_with_predictions_scores_zero():
    preds = np.array([strip(0, 100), strip(200, 300)])
    assert image_precision(EMPTY, preds, [0.9, 0.1]) == 0.0
    perfect = np.array([strip(0, 100)])
    assert rsna_map([perfect, EMPTY], [perfect, preds], [[0.5], [0.9, 0.1]]) == 0.5


def test_ground_truth_without_predictions_scores_zero():
    gt = np.array([strip(0, 100)])
    assert image_precision(gt, EMPTY, NO_SCORES) == 0.0
    assert rsna_map([gt], [EMPTY], [NO_SCORES]) == 0.0


def test_iou_exactly_at_threshold_is_not_a_hit():
    gt = np.array([strip(0, 100)])
    pred = np.array([strip(0, 50)])  # IoU = 50 / 100 = 0.5 exactly
    assert iou_matrix(pred, gt)[0, 0] == 0.5
    assert image_precision(gt, pred, [1.0], thresholds=(0.5,)) == 0.0
    assert image_precision(gt, pred, [1.0], thresholds=(0.45,)) == 1.0
    # Hits at 0.40 and 0.45 only: 2 of 8 thresholds.
    assert image_precision(gt, pred, [1.0]) == 0.25
    np.testing.assert_array_equal(
        precision_per_threshold([gt], [pred], [[1.0]]), [1, 1, 0, 0, 0, 0, 0, 0]
    )
    assert rsna_map([gt], [pred], [[1.0]]) == 0.25


def test_one_ground_truth_two_overlapping_predictions_is_one_tp_one_fp():
    gt = np.array([strip(0, 100)])
    preds = np.array([strip(0, 99), strip(1, 100)])  # both IoU 0.99
    assert image_precision(gt, preds, [0.8, 0.9]) == 0.5  # 1 / (1 + 1 + 0) at every threshold
    assert rsna_map([gt], [preds], [[0.8, 0.9]]) == 0.5


def test_confidence_order_decides_which_prediction_takes_a_ground_truth():
    # A = [0, 100], B = [60, 160]. P1 = [30, 140]: IoU 0.5 with A, 80/130 with B.
    # P2 = B exactly.
    gt = np.array([strip(0, 100), strip(60, 160)])
    preds = np.array([strip(30, 140), strip(60, 160)])
    ious = iou_matrix(preds, gt)
    assert ious[0, 0] == 0.5 and ious[0, 1] == pytest.approx(80 / 130) and ious[1, 1] == 1.0
    # P1 first: it takes B (its highest IoU), so P2 finds nothing -> 1 TP, 1 FP, 1 FN
    # at 0.40-0.60; above 0.615 P1 misses and P2 takes B -> again 1/3.
    assert image_precision(gt, preds, [0.9, 0.1]) == pytest.approx(1 / 3, abs=1e-15)
    # P2 first: it takes B, P1 then takes A where 0.5 > t (t = 0.40, 0.45): score 1 there.
    assert image_precision(gt, preds, [0.1, 0.9]) == pytest.approx((2 * 1 + 6 / 3) / 8, abs=1e-15)
    assert rsna_map([gt, gt], [preds, preds], [[0.9, 0.1], [0.1, 0.9]]) == pytest.approx(
        (1 / 3 + 0.5) / 2, abs=1e-15
    )


def test_equal_confidences_keep_input_order():
    gt = np.array([strip(0, 100), strip(60, 160)])
    p1, p2 = strip(30, 140), strip(60, 160)  # as above
    first_p1 = np.array([p1, p2])
    first_p2 = np.array([p2, p1])
    assert image_precision(gt, first_p1, [0.5, 0.5]) == pytest.approx(1 / 3, abs=1e-15)
    assert image_precision(gt, first_p2, [0.5, 0.5]) == pytest.approx(0.5, abs=1e-15)
    np.testing.assert_allclose(
        per_image_precision([gt, gt], [first_p1, first_p2], [[0.5, 0.5], [0.5, 0.5]]),
        [1 / 3, 0.5],
        atol=1e-15,
    )


def test_equal_iou_ground_truths_first_in_input_order_is_taken():
    # P = [10, 110] has IoU 90/110 with both A = [0, 100] and B = [20, 120]; Q = B.
    a, b = strip(0, 100), strip(20, 120)
    preds = np.array([strip(10, 110), b])
    scores = [0.9, 0.1]
    ious = iou_matrix(preds[:1], np.array([a, b]))
    assert ious[0, 0] == ious[0, 1]
    # P takes A, Q takes B: perfect at every threshold.
    assert image_precision(np.array([a, b]), preds, scores) == 1.0
    # P takes B; Q reaches A only with IoU 80/120 = 0.667: hits at 0.40-0.65, 1/3 at 0.70, 0.75.
    assert image_precision(np.array([b, a]), preds, scores) == pytest.approx((6 + 2 / 3) / 8)
    np.testing.assert_allclose(
        per_image_precision([np.array([a, b]), np.array([b, a])], [preds, preds], [scores, scores]),
        [1.0, (6 + 2 / 3) / 8],
        atol=1e-15,
    )


def test_several_boxes_and_images():
    gt_a = np.array([strip(0, 100), strip(200, 300), strip(400, 500)])
    preds_a = np.array([strip(0, 100), strip(200, 300), strip(700, 800)])  # 2 TP, 1 FP, 1 FN
    gt_b = np.array([strip(0, 100)])
    preds_b = np.array([strip(0, 100)])
    per_image = per_image_precision(
        [gt_a, gt_b, EMPTY, EMPTY],
        [preds_a, preds_b, EMPTY, np.array([strip(0, 10)])],
        [[0.3, 0.2, 0.1], [0.5], [], [0.1]],
    )
    np.testing.assert_allclose(per_image, [0.5, 1.0, np.nan, 0.0], rtol=0, atol=1e-15)
    assert rsna_map(
        [gt_a, gt_b, EMPTY, EMPTY],
        [preds_a, preds_b, EMPTY, np.array([strip(0, 10)])],
        [[0.3, 0.2, 0.1], [0.5], [], [0.1]],
    ) == pytest.approx(0.5, abs=1e-15)


def test_inputs_are_validated():
    gt = np.array([strip(0, 100)])
    with pytest.raises(ValueError):
        rsna_map([gt], [gt], [[0.1, 0.2]])  # two scores for one box
    with pytest.raises(ValueError):
        rsna_map([gt, gt], [gt], [[0.1]])  # lengths differ
    with pytest.raises(ValueError):
        rsna_map([gt], [np.ones((1, 3))], [[0.1]])
    with pytest.raises(ValueError):
        rsna_map([gt], [gt], [[np.nan]])


# --------------------------------------------------------------------------- reference agreement


def test_vectorised_metric_equals_plain_reference_on_random_cases():
    rng = np.random.default_rng(1234)
    cases = [random_case(rng) for _ in range(1000)]
    gt = [c[0] for c in cases]
    preds = [c[1] for c in cases]
    scores = [c[2] for c in cases]
    expected = [reference_image_score(*c) for c in cases]
    expected_array = np.array([np.nan if e is None else e for e in expected])
    # The random cases must exercise every branch for the comparison to mean something.
    assert np.isnan(expected_array).any() and (expected_array == 0).any()
    assert ((expected_array > 0) & (expected_array < 1)).sum() > 100

    vectorised = per_image_precision(gt, preds, scores)
    np.testing.assert_allclose(vectorised, expected_array, rtol=0, atol=1e-12)
    looped = [image_precision(*c) for c in cases]
    assert [v is None for v in looped] == [e is None for e in expected]
    np.testing.assert_allclose(
        [np.nan if v is None else v for v in looped], expected_array, rtol=0, atol=1e-12
    )
    counted = [e for e in expected if e is not None]
    assert rsna_map(gt, preds, scores) == pytest.approx(np.mean(counted), abs=1e-12)

    per_threshold = precision_per_threshold(gt, preds, scores)
    reference_per_threshold = [
        np.mean([s for c in cases if (s := reference_image_score(*c, thresholds=(t,))) is not None])
        for t in RSNA_IOU_THRESHOLDS
    ]
    np.testing.assert_allclose(per_threshold, reference_per_threshold, rtol=0, atol=1e-12)
    assert per_threshold.mean() == pytest.approx(rsna_map(gt, preds, scores), abs=1e-12)


def test_scoring_in_blocks_of_images_changes_nothing(monkeypatch):
    # The package re-exports the function under the module's name, so fetch the module itself.
    rsna_map_module = importlib.import_module("lungopacity.metrics.rsna_map")

    rng = np.random.default_rng(99)
    cases = [random_case(rng) for _ in range(200)]
    gt, preds, scores = ([c[i] for c in cases] for i in range(3))
    whole = per_image_precision(gt, preds, scores)
    whole_froc = froc_curve(gt, preds, scores)
    monkeypatch.setattr(rsna_map_module, "_CHUNK_IMAGES", 7)
    np.testing.assert_array_equal(per_image_precision(gt, preds, scores), whole)
    for blocked, single in zip(froc_curve(gt, preds, scores), whole_froc):
        np.testing.assert_array_equal(blocked, single)


def test_float32_and_list_inputs_give_the_same_score():
    rng = np.random.default_rng(7)
    cases = [random_case(rng) for _ in range(50)]
    gt = [c[0] for c in cases]
    preds = [c[1] for c in cases]
    scores = [c[2] for c in cases]
    as_float32 = rsna_map(
        [g.astype(np.float32) for g in gt], [p.astype(np.float32) for p in preds], scores
    )
    as_lists = rsna_map([g.tolist() for g in gt], [p.tolist() for p in preds], [s.tolist() for s in scores])
    assert as_float32 == as_lists == rsna_map(gt, preds, scores)


# --------------------------------------------------------------------------- FROC


def test_sensitivity_at_fppi_hand_built():
    gt = [np.array([strip(0, 100)]), np.array([strip(200, 300), strip(400, 500)])]
    preds = [
        np.array([strip(0, 100), strip(600, 700)]),  # TP @0.9, FP @0.8
        np.array([strip(800, 900), strip(200, 300)]),  # FP @0.7, TP @0.6
    ]
    scores = [np.array([0.9, 0.8]), np.array([0.7, 0.6])]
    curve = froc_curve(gt, preds, scores)
    np.testing.assert_allclose(curve.fppi, [0, 0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(curve.sensitivity, [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3])
    np.testing.assert_array_equal(curve.thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6])
    result = sensitivity_at_fppi(gt, preds, scores, fppi=(0.25, 0.5, 1, 2))
    assert result == pytest.approx({0.25: 1 / 3, 0.5: 1 / 3, 1.0: 2 / 3, 2.0: 2 / 3})


def test_froc_groups_tied_confidences_and_uses_strict_iou():
    gt = [np.array([strip(0, 100)]), EMPTY]
    preds = [np.array([strip(0, 50)]), np.array([strip(0, 100)])]  # IoU 0.5 exactly: a miss
    scores = [np.array([0.5]), np.array([0.5])]
    curve = froc_curve(gt, preds, scores, iou=0.5)
    np.testing.assert_allclose(curve.fppi, [0.0, 1.0])  # both FP, one tied point
    np.testing.assert_allclose(curve.sensitivity, [0.0, 0.0])
    assert froc_curve(gt, preds, scores, iou=0.49).sensitivity[-1] == 1.0


# --------------------------------------------------------------------------- box helpers


def test_xywh_round_trip_and_values():
    xywh = np.array([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 1.0, 2.0]])
    xyxy = xywh_to_xyxy(xywh)
    np.testing.assert_array_equal(xyxy, [[10, 20, 40, 60], [0, 0, 1, 2]])
    np.testing.assert_array_equal(xyxy_to_xywh(xyxy), xywh)


def test_iou_matrix_values():
    a = np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
    b = np.array([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 5.0, 10.0]])
    expected = np.array([[1.0, 0.0, 0.5], [25 / 175, 0.0, 0.0]])
    np.testing.assert_allclose(iou_matrix(a, b), expected, rtol=0, atol=1e-15)
    assert iou_matrix(a, np.zeros((0, 4))).shape == (2, 0)
    # Broadcast over leading axes: batch of 3 images.
    batch = iou_matrix(np.stack([a] * 3), np.stack([b] * 3))
    np.testing.assert_allclose(batch, np.stack([expected] * 3), atol=1e-15)


def test_shrink_clip_and_scale():
    boxes = np.array([[100.0, 200.0, 300.0, 600.0]])
    shrunk = shrink_boxes(boxes, 0.5)
    np.testing.assert_allclose(shrunk, [[150, 300, 250, 500]])
    np.testing.assert_allclose(shrunk[:, :2] + shrunk[:, 2:], boxes[:, :2] + boxes[:, 2:])  # centre
    np.testing.assert_allclose(shrink_boxes(shrunk, 2.0), boxes)
    with pytest.raises(ValueError):
        shrink_boxes(boxes, 0.0)
    np.testing.assert_array_equal(
        clip_boxes([[-5.0, 10.0, 1100.0, 2000.0]], height=1024, width=800), [[0, 10, 800, 1024]]
    )
    np.testing.assert_array_equal(scale_boxes(boxes, 0.5, 0.25), [[50, 50, 150, 150]])
    np.testing.assert_array_equal(scale_boxes(boxes, 2.0), [[200, 400, 600, 1200]])


def test_bootstrap_interval_of_the_metric():
    from lungopacity.metrics import bootstrap_rsna_map_ci

    # Every counted image scores 0.5: every resample's mean is 0.5, whatever it draws.
    assert bootstrap_rsna_map_ci([0.5, np.nan, 0.5, 0.5, np.nan], n_boot=50) == (0.5, 0.5)
    # Two images, 0 and 1: resamples give 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4.
    low, high = bootstrap_rsna_map_ci([0.0, 1.0], n_boot=4000, seed=1)
    assert (low, high) == (0.0, 1.0)
    low, high = bootstrap_rsna_map_ci([0.0, 1.0], n_boot=4000, seed=1, level=0.4)
    assert (low, high) == (0.5, 0.5)
    assert all(np.isnan(bootstrap_rsna_map_ci([np.nan, np.nan], n_boot=10)))
    for bad in (dict(n_boot=0), dict(level=1.0)):
        with pytest.raises(ValueError):
            bootstrap_rsna_map_ci([0.3], **bad)
    with pytest.raises(ValueError):
        bootstrap_rsna_map_ci([])
