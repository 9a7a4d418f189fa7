"""COCO files written by `predict --coco` and `evaluate-detector` load in pycocotools with the same boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lungopacity.cli import app

pycocotools = pytest.importorskip("pycocotools.coco", reason="pycocotools (the dev extra) is not installed")


def test_predict_coco_boxes_equal_predictions_json(tiny_demo, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    out = tmp_path / "out"
    images = sorted((tiny_demo.paths["data"] / "stage_2_train_images").glob("*.dcm"))[:6]
    result = CliRunner().invoke(app, ["predict", *map(str, images), "--bundle", str(tiny_demo.paths["model"]),
                                      "--out", str(out), "--no-images", "--coco"])
    assert result.exit_code == 0, result.output
    predictions = {p["id"]: p for p in json.loads((out / "predictions.json").read_text())}
    coco = COCO(str(out / "coco.json"))
    assert len(coco.getImgIds()) == len(predictions)
    n_boxes = 0
    for image in coco.loadImgs(coco.getImgIds()):
        prediction = predictions[image["patient_id"]]
        assert (image["height"], image["width"]) == tuple(prediction["image_size"])
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        got = sorted((a["score"], a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
                     for a in annotations)
        expected = sorted((b["score"], b["x1"], b["y1"], b["x2"], b["y2"]) for b in prediction["boxes"])
        np.testing.assert_allclose(np.array(got).reshape(-1, 5), np.array(expected).reshape(-1, 5), atol=1e-6)
        n_boxes += len(expected)
    assert n_boxes == sum(len(p["boxes"]) for p in predictions.values())


def test_evaluate_detector_writes_coco_ground_truth_and_detections(tiny_demo) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from lungopacity.data.cache import PreparedCache
    from lungopacity.io.submission import read_submission

    report = tiny_demo.paths["detector_report"]
    gt = COCO(str(report / "coco_ground_truth.json"))
    cache = PreparedCache(tiny_demo.paths["cache"])
    boxes_by_id = dict(zip(cache.table["patientId"], cache.table["boxes"]))
    for image in gt.loadImgs(gt.getImgIds()):
        annotations = gt.loadAnns(gt.getAnnIds(imgIds=[image["id"]]))
        got = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                        for a in annotations]).reshape(-1, 4)
        expected = np.asarray(boxes_by_id[image["patient_id"]], dtype=np.float64).reshape(-1, 4)
        np.testing.assert_allclose(np.sort(got, axis=0), np.sort(expected, axis=0), atol=1e-3)
    detections = json.loads((report / "coco_detections.json").read_text())
    submission = read_submission(report / "submission.csv")
    assert len(detections) == sum(len(b) for b in submission["boxes"])
    if detections:  # the toy detector may find nothing above its threshold
        evaluation = COCOeval(gt, gt.loadRes(str(report / "coco_detections.json")), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
