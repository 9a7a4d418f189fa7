"""A bundle with several detector members: their boxes pooled per image and fused, in the
bundle, the predictor, ONNX and the manifest; refusals of what would count a box twice."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lungopacity.data.cache import PreparedCache
from lungopacity.engine.bundle import build_bundle, read_postprocess_choice
from lungopacity.engine.detector import train_detector
from lungopacity.engine.runs import load_detector_run
from lungopacity.errors import BundleError, ConfigError
from lungopacity.inference import Predictor
from lungopacity.inference.bundle import read_manifest
from lungopacity.inference.manifest import MANIFEST_FILE, BundleManifest
from lungopacity.postprocess import PostprocessConfig, apply_postprocess, pool_detections, save_postprocess


@pytest.fixture(scope="module")
def second_detector(tiny_demo, tmp_path_factory) -> Path:
    """The demo's detector trained again with another seed: a second member."""
    first = load_detector_run(tiny_demo.paths["detector"])
    out = tmp_path_factory.mktemp("member") / "detector_seed1"
    train_detector(tiny_demo.paths["cache"], out, replace(first.train, seed=first.train.seed + 1))
    return out


@pytest.fixture(scope="module")
def wbf_postprocess(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pp") / "postprocess.json"
    save_postprocess(path, PostprocessConfig(fusion="wbf", fusion_iou=0.5, score_threshold=0.0),
                     rsna_map_cross_fitted=0.1)
    return path


@pytest.fixture(scope="module")
def two_member_bundle(tiny_demo, second_detector, wbf_postprocess, tmp_path_factory) -> Path:
    paths = tiny_demo.paths
    return build_bundle(tmp_path_factory.mktemp("members") / "model", paths["classifier"],
                        detector_run=[paths["detector"], second_detector], cache_dir=paths["cache"],
                        detector_postprocess=wbf_postprocess)


def _inputs(tiny_demo, n: int = 6) -> torch.Tensor:
    cache = PreparedCache(tiny_demo.paths["cache"])
    return torch.from_numpy(np.stack([cache.image(i) for i in range(n)])).float().div(255)[:, None]


def test_a_postprocess_file_is_read_as_written(wbf_postprocess):
    # Regression: the file save_postprocess writes ({"postprocess": ..., provenance}) was read
    # as an empty config, so `bundle --detector-postprocess RUN/postprocess.json` got the defaults.
    assert read_postprocess_choice(wbf_postprocess)["fusion"] == "wbf"
    assert read_postprocess_choice(wbf_postprocess)["fusion_iou"] == 0.5


def test_the_bundle_holds_every_member_and_fuses_over_all_of_them(two_member_bundle, tiny_demo, second_detector):
    manifest = read_manifest(two_member_bundle)
    members = manifest.detector.members
    assert [m.file for m in members] == ["detector.safetensors", "detector_1.safetensors"]
    assert all((two_member_bundle / m.file).is_file() for m in members)
    assert manifest.detector.postprocess["fusion"] == "wbf" and manifest.detector.postprocess["n_models"] == 2
    assert manifest.model_card["model"]["detector_runs"] == [str(tiny_demo.paths["detector"]), str(second_detector)]

    predictor = Predictor.from_bundle(two_member_bundle)
    assert len(predictor.detectors) == 2 and predictor.postprocess.n_models == 2
    for detector in predictor.detectors:
        detector.model.score_thresh = 0.001  # the toy members are barely trained: keep their boxes
    x = _inputs(tiny_demo)
    pooled = predictor.detect(x)
    # Each member alone, as its own training run loads it: the bundle pools exactly these.
    runs = [load_detector_run(tiny_demo.paths["detector"]).model, load_detector_run(second_detector).model]
    alone = []
    for model in runs:
        model.eval().model.score_thresh = 0.001
        with torch.no_grad():
            alone.append([(o["boxes"].numpy(), o["scores"].numpy()) for o in model([img for img in x])])
    assert sum(len(b) for b, _ in alone[0]) > 0 and sum(len(b) for b, _ in alone[1]) > 0
    for i, (boxes, scores) in enumerate(pooled):
        np.testing.assert_allclose(boxes, np.concatenate([alone[0][i][0], alone[1][i][0]]), atol=1e-4)
        np.testing.assert_allclose(scores, np.concatenate([alone[0][i][1], alone[1][i][1]]), atol=1e-5)


def test_pooled_members_fuse_into_one_box_per_finding():
    # Member A: a finding at the top left (0.8). Member B: the same finding (0.4) and another (0.6).
    a = [(np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([0.8]))]
    b = [(np.array([[1.0, 0.0, 11.0, 10.0], [100.0, 100.0, 110.0, 110.0]]), np.array([0.4, 0.6]))]
    (boxes, scores), = pool_detections([a, b])
    fused, confidence = apply_postprocess(boxes, scores, None, PostprocessConfig(fusion="wbf", fusion_iou=0.5,
                                                                                 n_models=2))
    # Both found the first: mean score 0.6, coordinates weighted 2:1. One found the second: 0.6 x 1/2.
    np.testing.assert_allclose(confidence, [0.6, 0.3])
    np.testing.assert_allclose(fused[0], [1 / 3, 0.0, 10 + 1 / 3, 10.0])
    np.testing.assert_allclose(fused[1], [100.0, 100.0, 110.0, 110.0])
    kept, _ = apply_postprocess(boxes, scores, None, PostprocessConfig(fusion="nms", fusion_iou=0.5, n_models=2))
    np.testing.assert_allclose(kept, [[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])


def test_a_reading_with_two_members_has_boxes_in_the_images_pixels(two_member_bundle, tiny_demo):
    image = sorted((tiny_demo.paths["data"] / "stage_2_train_images").glob("*.dcm"))[0]
    predictor = Predictor.from_bundle(two_member_bundle)
    reading = predictor.read(image.read_bytes(), image.name, with_images=False).prediction
    for box in reading.boxes:
        assert 0 <= box.x1 < box.x2 and 0 <= box.y1 < box.y2 and 0 < box.box_confidence <= 1


def test_several_detectors_without_fusion_are_refused(tiny_demo, second_detector, tmp_path):
    paths = tiny_demo.paths
    with pytest.raises(ConfigError, match="--detector-postprocess"):
        build_bundle(tmp_path / "a", paths["classifier"], detector_run=[paths["detector"], second_detector],
                     cache_dir=paths["cache"])
    plain = tmp_path / "plain.json"
    save_postprocess(plain, PostprocessConfig(fusion="none", score_threshold=0.1))
    with pytest.raises(ConfigError, match="NMS or WBF"):
        build_bundle(tmp_path / "b", paths["classifier"], detector_run=[paths["detector"], second_detector],
                     cache_dir=paths["cache"], detector_postprocess=plain)


def test_a_manifest_with_two_members_and_no_fusion_is_refused(two_member_bundle):
    data = json.loads((two_member_bundle / MANIFEST_FILE).read_text())
    data["detector"]["postprocess"]["fusion"] = "none"
    with pytest.raises(BundleError, match="no fusion"):
        BundleManifest.from_dict(data)


def test_a_format_3_bundle_with_its_inline_detector_still_reads(tiny_demo, tmp_path):
    bundle = tmp_path / "model"
    shutil.copytree(tiny_demo.paths["model"], bundle)
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    assert data["format_version"] == 4 and len(data["detector"]["members"]) == 1
    member = data["detector"].pop("members")[0]
    data["detector"].update(member)
    data["format_version"] = 3
    (bundle / MANIFEST_FILE).write_text(json.dumps(data))
    old = Predictor.from_bundle(bundle)
    new = Predictor.from_bundle(tiny_demo.paths["model"])
    assert old.manifest.detector.members == new.manifest.detector.members
    x = _inputs(tiny_demo, 3)
    for (b_old, s_old), (b_new, s_new) in zip(old.detect(x), new.detect(x)):
        np.testing.assert_array_equal(b_old, b_new)
        np.testing.assert_array_equal(s_old, s_new)


def test_pooling_refuses_members_that_saw_different_images():
    one = [(np.zeros((1, 4)), np.ones(1))]
    with pytest.raises(ConfigError, match="different numbers"):
        pool_detections([one, one * 2])
    assert pool_detections([one]) == one


def test_onnx_pools_the_members_like_pytorch(two_member_bundle, tiny_demo, tmp_path):
    pytest.importorskip("onnxruntime")
    from lungopacity.inference.onnx import export_onnx

    bundle = tmp_path / "model"
    shutil.copytree(two_member_bundle, bundle)
    assert set(export_onnx(bundle)) == {"classifier", "detector"}
    torch_predictor = Predictor.from_bundle(bundle)
    onnx_predictor = Predictor.from_bundle(bundle, runtime="onnx")
    for detector in torch_predictor.detectors:
        detector.model.score_thresh = 0.001
    onnx_predictor.onnx.anchor_info["score_thresh"] = 0.001
    x = _inputs(tiny_demo, 4)
    total = 0
    for (boxes_t, scores_t), (boxes_o, scores_o) in zip(torch_predictor.detect(x), onnx_predictor.detect(x)):
        assert len(boxes_t) == len(boxes_o)
        total += len(boxes_t)
        if len(boxes_t):
            np.testing.assert_allclose(boxes_o, boxes_t, atol=1.0)
            np.testing.assert_allclose(scores_o, scores_t, atol=1e-3)
    assert total > 0


def test_the_command_line_takes_detector_repeated(tiny_demo, second_detector, wbf_postprocess, tmp_path):
    from typer.testing import CliRunner

    from lungopacity.cli import app

    paths = tiny_demo.paths
    common = ["bundle", "--classifier", str(paths["classifier"]), "--cache", str(paths["cache"]), "--device", "cpu",
              "--detector", str(paths["detector"]), "--detector", str(second_detector)]
    ok = CliRunner().invoke(app, [*common, "--detector-postprocess", str(wbf_postprocess), "--out", str(tmp_path / "m")])
    assert ok.exit_code == 0, ok.output
    assert len(read_manifest(tmp_path / "m").detector.members) == 2
    refused = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "n")])
    assert refused.exit_code == 1 and "--detector-postprocess" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
