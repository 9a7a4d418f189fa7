"""ONNX export: the exported classifier and detector agree with the PyTorch path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from lungopacity.inference import BundleError, Predictor  # noqa: E402
from lungopacity.inference.onnx import export_onnx  # noqa: E402
from lungopacity.metrics.boxes import iou_matrix  # noqa: E402


@pytest.fixture(scope="module")
def exported_bundle(tiny_demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(tiny_demo.paths["model"], bundle)
    written = export_onnx(bundle)
    assert set(written) == {"classifier", "detector"}
    return bundle


def test_onnx_classifier_matches_pytorch(exported_bundle: Path, tiny_demo) -> None:
    torch_predictor = Predictor.from_bundle(exported_bundle)
    onnx_predictor = Predictor.from_bundle(exported_bundle, runtime="onnx")
    from lungopacity.data.cache import PreparedCache

    # The toy detector is barely trained: its scores sit around the bundle's 0.05 floor, so
    # compare both runtimes below it (the same floor on each side) to always have boxes.
    torch_predictor.detectors[0].model.score_thresh = 0.001
    onnx_predictor.onnx.anchor_info["score_thresh"] = 0.001
    cache = PreparedCache(tiny_demo.paths["cache"])
    x = torch.from_numpy(np.stack([cache.image(i) for i in range(8)])).float().div(255)[:, None]
    np.testing.assert_allclose(onnx_predictor.classify(x), torch_predictor.classify(x), atol=1e-3)


def test_onnx_detector_boxes_within_a_pixel(exported_bundle: Path, tiny_demo) -> None:
    torch_predictor = Predictor.from_bundle(exported_bundle)
    onnx_predictor = Predictor.from_bundle(exported_bundle, runtime="onnx")
    from lungopacity.data.cache import PreparedCache

    # The toy detector is barely trained: its scores sit around the bundle's 0.05 floor, so
    # compare both runtimes below it (the same floor on each side) to always have boxes.
    torch_predictor.detectors[0].model.score_thresh = 0.001
    onnx_predictor.onnx.anchor_info["score_thresh"] = 0.001
    cache = PreparedCache(tiny_demo.paths["cache"])
    x = torch.from_numpy(np.stack([cache.image(i) for i in range(8)])).float().div(255)[:, None]
    reference = torch_predictor.detect(x)
    exported = onnx_predictor.detect(x)
    total = 0
    for (boxes_t, scores_t), (boxes_o, scores_o) in zip(reference, exported):
        assert len(boxes_t) == len(boxes_o)
        total += len(boxes_t)
        if len(boxes_t):
            np.testing.assert_allclose(boxes_o, boxes_t, atol=1.0)
            np.testing.assert_allclose(scores_o, scores_t, atol=1e-3)
    assert total > 0, "the toy detector gave no boxes at all: the comparison would be empty"


def test_onnx_end_to_end_reading_agrees(exported_bundle: Path, tiny_demo) -> None:
    image = sorted((tiny_demo.paths["data"] / "stage_2_train_images").glob("*.dcm"))[1]
    a = Predictor.from_bundle(exported_bundle).read(image.read_bytes(), image.name, with_images=False).prediction
    b = Predictor.from_bundle(exported_bundle, runtime="onnx").read(image.read_bytes(), image.name, with_images=False).prediction
    for key in a.probabilities:
        assert abs(a.probabilities[key] - b.probabilities[key]) < 1e-3
    assert abs(a.opacity_probability - b.opacity_probability) < 1e-3
    assert len(a.boxes) == len(b.boxes)
    if a.boxes:
        ious = iou_matrix(np.array([[q.x1, q.y1, q.x2, q.y2] for q in a.boxes]),
                          np.array([[q.x1, q.y1, q.x2, q.y2] for q in b.boxes]))
        assert np.diag(ious).min() > 0.95


def test_onnx_runtime_without_export_is_refused(tiny_demo) -> None:
    with pytest.raises(BundleError, match="export-onnx"):
        Predictor.from_bundle(tiny_demo.paths["model"], runtime="onnx")
