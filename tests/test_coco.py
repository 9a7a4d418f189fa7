"""COCO export (io/coco.py): round trips, and agreement with pycocotools (COCO, loadRes, COCOeval)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from lungopacity.io.coco import (
    COCO_CATEGORY_ID,
    coco_dataset,
    image_ids,
    read_coco_dataset,
    read_coco_results,
    write_coco_dataset,
    write_coco_results,
)
from lungopacity.io.errors import DataFormatError

pycocotools = pytest.importorskip("pycocotools", reason="pycocotools (the dev extra) is not installed")
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def _random_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"patient-{k}" for k in range(7)]
    sizes = [(1024, 1024), (512, 640), (1024, 1024), (800, 600), (1024, 1024), (256, 256), (1024, 900)]
    gt, preds, scores = [], [], []
    for k, (h, w) in enumerate(sizes):
        n = [0, 1, 2, 4, 0, 3, 1][k]  # images without boxes, one with 4
        corner = rng.uniform(0, 0.5, (n, 2)) * [w, h]
        gt.append(np.concatenate([corner, corner + rng.uniform(0.02, 0.4, (n, 2)) * [w, h]], axis=1))
        m = [1, 0, 3, 2, 0, 5, 1][k]
        corner = rng.uniform(0, 0.5, (m, 2)) * [w, h]
        preds.append(np.concatenate([corner, corner + rng.uniform(1, 300, (m, 2))], axis=1))
        scores.append(rng.random(m))
    return ids, sizes, gt, preds, scores


def _quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return function(*args)


def test_dataset_layout_is_coco():
    dataset = coco_dataset(["a", "b"], [(100, 200), (50, 60)], [np.array([[10, 20, 40, 60]]), None],
                           file_names=["a.png", "b.png"])
    assert dataset["categories"] == [{"id": 1, "name": "Lung Opacity", "supercategory": "finding"}]
    assert dataset["images"] == [
        {"id": 1, "file_name": "a.png", "width": 200, "height": 100, "patient_id": "a"},
        {"id": 2, "file_name": "b.png", "width": 60, "height": 50, "patient_id": "b"},
    ]
    assert dataset["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "area": 1200.0, "iscrowd": 0}
    ]
    with_scores = coco_dataset(["a"], [(100, 200)], [[[10, 20, 40, 60]]], [[0.25]])
    assert with_scores["annotations"][0]["score"] == 0.25
    assert with_scores["images"][0]["file_name"] == "a.dcm"


def test_written_files_load_in_pycocotools_with_the_same_boxes(tmp_path):
    ids, sizes, gt, preds, scores = _random_case()
    gt_path = write_coco_dataset(tmp_path / "gt.json", ids, sizes, gt)
    dt_path = write_coco_results(tmp_path / "dt.json", ids, preds, scores, numbering=image_ids(ids))
    coco_gt = _quiet(COCO, str(gt_path))
    coco_dt = _quiet(coco_gt.loadRes, str(dt_path))
    numbering = image_ids(ids)
    for pid, (h, w), boxes, pred, score in zip(ids, sizes, gt, preds, scores):
        image = coco_gt.loadImgs(numbering[pid])[0]
        assert (image["height"], image["width"]) == (h, w)
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[numbering[pid]]))
        got = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                        for a in anns]).reshape(-1, 4)
        np.testing.assert_allclose(got, boxes, rtol=0, atol=1e-6)
        assert all(a["category_id"] == COCO_CATEGORY_ID and a["iscrowd"] == 0 for a in anns)
        np.testing.assert_allclose([a["area"] for a in anns], (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        dets = coco_dt.loadAnns(coco_dt.getAnnIds(imgIds=[numbering[pid]]))
        got = np.array([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                        for d in dets]).reshape(-1, 4)
        np.testing.assert_allclose(got, pred, rtol=0, atol=1e-6)
        np.testing.assert_array_equal([d["score"] for d in dets], score)
    evaluation = COCOeval(coco_gt, coco_dt, "bbox")
    _quiet(evaluation.evaluate)
    _quiet(evaluation.accumulate)
    _quiet(evaluation.summarize)
    assert len(evaluation.stats) == 12 and 0.0 <= evaluation.stats[0] <= 1.0


def test_round_trip_through_our_readers(tmp_path):
    ids, sizes, gt, preds, scores = _random_case(1)
    write_coco_dataset(tmp_path / "gt.json", ids, sizes, gt, file_names=[f"{p}.jpg" for p in ids])
    write_coco_results(tmp_path / "dt.json", ids, preds, scores)
    table = read_coco_dataset(tmp_path / "gt.json")
    assert table["patientId"].tolist() == ids and table["file_name"].tolist() == [f"{p}.jpg" for p in ids]
    assert list(zip(table["height"], table["width"])) == sizes
    for got, expected in zip(table["boxes"], gt):
        assert got.shape == expected.reshape(-1, 4).shape
        np.testing.assert_allclose(got, expected.reshape(-1, 4), rtol=0, atol=1e-6)
    assert all(np.isnan(s).all() for s in table["scores"])  # ground truth has no scores
    detections = read_coco_results(tmp_path / "dt.json", tmp_path / "gt.json")
    assert detections["patientId"].tolist() == ids
    for got_boxes, got_scores, expected_boxes, expected_scores in zip(
        detections["boxes"], detections["scores"], preds, scores
    ):
        np.testing.assert_allclose(got_boxes, expected_boxes.reshape(-1, 4), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(got_scores, expected_scores)
    # Predictions written as a dataset (annotations with scores) read back the same.
    write_coco_dataset(tmp_path / "pred.json", ids, sizes, preds, scores)
    as_dataset = read_coco_dataset(tmp_path / "pred.json")
    for got, expected in zip(as_dataset["scores"], scores):
        np.testing.assert_array_equal(got, expected)


def _evaluate(gt_boxes, dt_boxes, dt_scores, tmp_path, size=(1024, 1024)):
    ids = ["p1", "p2"]  # p2 has neither ground truth nor detections
    gt_path = write_coco_dataset(tmp_path / "gt.json", ids, [size, size], [gt_boxes, None])
    dt_path = write_coco_results(tmp_path / "dt.json", ids, [dt_boxes, None], [dt_scores, None])
    coco_gt = _quiet(COCO, str(gt_path))
    evaluation = COCOeval(coco_gt, _quiet(coco_gt.loadRes, str(dt_path)), "bbox")
    for step in (evaluation.evaluate, evaluation.accumulate, evaluation.summarize):
        _quiet(step)
    return evaluation.stats


def test_one_perfect_detection_scores_ap_one(tmp_path):
    stats = _evaluate([[100, 200, 300, 500]], [[100, 200, 300, 500]], [0.9], tmp_path)
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0) and stats[2] == pytest.approx(1.0)


def test_detection_of_known_iou_scores_the_known_ap(tmp_path):
    # IoU 0.625: a hit at the IoU thresholds 0.50, 0.55 and 0.60 of COCO's ten (0.50:0.95),
    # a miss at the other seven: AP 3/10, AP50 1, AP75 0.
    stats = _evaluate([[0, 0, 100, 100]], [[0, 0, 100, 62.5]], [0.8], tmp_path)
    assert stats[0] == pytest.approx(0.3) and stats[1] == pytest.approx(1.0) and stats[2] == pytest.approx(0.0)


def test_bad_input_and_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataFormatError, match="patient a: boxes must be xyxy"):
        coco_dataset(["a"], [(10, 10)], [[[5, 5, 1, 1]]])
    with pytest.raises(DataFormatError, match="patient a: 1 boxes but 2 scores"):
        coco_dataset(["a"], [(10, 10)], [[[1, 1, 5, 5]]], [[0.1, 0.2]])
    with pytest.raises(DataFormatError, match="patient a: image size must be positive"):
        coco_dataset(["a"], [(0, 10)], [None])
    with pytest.raises(ValueError, match="patient a appears twice"):
        coco_dataset(["a", "a"], [(10, 10)] * 2, [None, None])
    with pytest.raises(ValueError, match="not among the dataset's images"):
        write_coco_results(tmp_path / "dt.json", ["z"], [None], [None], numbering={"a": 1})
    write_coco_dataset(tmp_path / "gt.json", ["a"], [(10, 10)], [[[1, 1, 5, 5]]])
    good = json.loads((tmp_path / "gt.json").read_text())
    cases = [
        ("{not json", "not a JSON file"),
        (json.dumps({"images": []}), "expected the keys images, annotations, categories"),
        (json.dumps({**good, "annotations": [{**good["annotations"][0], "category_id": 7}]}), "category_id 7"),
        (json.dumps({**good, "annotations": [{**good["annotations"][0], "image_id": 9}]}), "image_id 9 is not"),
        (json.dumps({**good, "annotations": [{**good["annotations"][0], "bbox": [1, 2, 3]}]}), "bbox must be"),
        (json.dumps({**good, "annotations": [{**good["annotations"][0], "bbox": [1, 2, -3, 4]}]}), "width, height"),
    ]
    for text, cause in cases:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(DataFormatError) as error:
            read_coco_dataset(bad)
        assert str(error.value).startswith(str(bad)) and cause in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "dt.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}]))
    with pytest.raises(DataFormatError, match="needs image_id, category_id, bbox, score"):
        read_coco_results(tmp_path / "dt.json", tmp_path / "gt.json")
    with pytest.raises(DataFormatError, match="file not found"):
        read_coco_dataset(tmp_path / "absent.json")
