"""One window policy from `prepare` to the bundle, `predict` and the service.

A 12-bit DICOM with a Window Center/Width must look the same to the network in training
(the cache, prepared with ``--window auto``) and in serving (the predictor and the web
service read the policy from the bundle); the bundle says which policy it was trained
with, and a cache prepared with another policy is refused on resume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_uncompressed_dicom
from lungopacity.data.cache import PreparedCache, prepare_cache
from lungopacity.data.preprocess import network_input, prepare_image
from lungopacity.engine.bundle import build_bundle
from lungopacity.engine.classifier import ClassifierTrainConfig, train_classifier
from lungopacity.errors import ConfigError, DataFormatError
from lungopacity.inference import Predictor
from lungopacity.inference.bundle import read_manifest
from lungopacity.io import read_image

WINDOW = (1800.0, 1200.0)  # center, width in stored values of a 12-bit image


def _windowed_dataset(root: Path, n: int = 12) -> Path:
    """An RSNA folder of 12-bit DICOMs with a window narrower than the stored range."""
    rng = np.random.default_rng(3)
    images = root / "stage_2_train_images"
    images.mkdir(parents=True)
    labels, classes = [], []
    for k in range(n):
        pid = f"win{k:02d}"
        ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64)
        stored = np.clip(ramp + rng.normal(0, 200, ramp.shape), 0, 4095).astype(np.uint16)
        make_uncompressed_dicom(images / f"{pid}.dcm", stored, bits_stored=12, window=WINDOW,
                                sex="M" if k % 2 else "F", view="AP" if k % 3 else "PA")
        target = int(k % 3 == 0)
        labels.append([pid, 10.0, 10.0, 20.0, 20.0, 1] if target else [pid, None, None, None, None, 0])
        classes.append([pid, {0: "Lung Opacity", 1: "Normal", 2: "No Lung Opacity / Not Normal"}[k % 3]])
    pd.DataFrame(labels, columns=["patientId", "x", "y", "width", "height", "Target"]).to_csv(
        root / "stage_2_train_labels.csv", index=False)
    pd.DataFrame(classes, columns=["patientId", "class"]).to_csv(root / "stage_2_detailed_class_info.csv", index=False)
    return root


@pytest.fixture(scope="module")
def windowed(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("window")
    data = _windowed_dataset(root / "data")
    prepare_cache(data, root / "cache", size=32, workers=1, folds=2, val_fraction=0.25, window="auto")
    torch.manual_seed(0)
    config = ClassifierTrainConfig(backbone="test_resnet", pretrained="none", epochs=1, batch_size=4, folds=2,
                                   max_steps_per_epoch=1, device="cpu", augment=False, patience=1)
    train_classifier(root / "cache", root / "run", config)
    build_bundle(root / "model", root / "run", cache_dir=root / "cache")
    return {"data": data, "cache": root / "cache", "model": root / "model"}


def test_the_window_changes_what_the_reader_returns(windowed) -> None:
    path = next((windowed["data"] / "stage_2_train_images").glob("*.dcm"))
    full, header_none = read_image(path, window="none")
    windowed_pixels, header_auto = read_image(path, window="auto")
    assert header_auto["window"]["applied"] == "window" and header_none["window"]["applied"] is None
    assert np.abs(full - windowed_pixels).mean() > 0.05  # not a cosmetic difference


def test_cache_bundle_predictor_and_service_read_the_same_pixels(windowed) -> None:
    cache = PreparedCache(windowed["cache"])
    assert cache.window == "auto"
    manifest = read_manifest(windowed["model"])
    assert manifest.classifier.preprocessing.window == "auto"  # the bundle says what it was trained with
    predictor = Predictor.from_bundle(windowed["model"])
    for i in range(len(cache)):
        path = cache.table["path"].iat[i]
        image = predictor.load(path)
        served = image.prepared[(cache.size, "auto")]
        np.testing.assert_array_equal(served, cache.image(i))  # predict and the service read it so
        np.testing.assert_array_equal(served, prepare_image(read_image(path, window="auto")[0], cache.size))
        unwindowed = prepare_image(read_image(path, window="none")[0], cache.size)
        assert not np.array_equal(served, unwindowed)


def test_the_service_answers_with_the_bundles_policy(windowed) -> None:
    from fastapi.testclient import TestClient

    from lungopacity.service.app import create_app

    cache = PreparedCache(windowed["cache"])
    predictor = Predictor.from_bundle(windowed["model"])
    path = Path(cache.table["path"].iat[0])
    expected = predictor.classify(network_input(cache.image(0)[None], device="cpu"))[0]
    with TestClient(create_app(predictor), base_url="http://localhost") as client:
        answer = client.post("/v1/predict", files={"file": ("x.dcm", path.read_bytes(), "application/dicom")})
    assert answer.status_code == 200, answer.text
    probabilities = answer.json()["probabilities"]
    got = [probabilities[k] for k in ("normal", "not_normal", "lung_opacity")]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_resuming_a_cache_with_another_policy_is_refused(windowed, tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="window"):
        prepare_cache(windowed["data"], windowed["cache"], size=32, workers=1, folds=2, val_fraction=0.25,
                      window="none")
    with pytest.raises(ConfigError, match="--window"):
        prepare_cache(windowed["data"], tmp_path / "c", size=32, window="soft")
