"""The prediction product: bundle round trip, refusal of bad bundles, batch prediction, calibration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lungopacity.constants import CLASS_KEYS
from lungopacity.inference import BundleError, Predictor
from lungopacity.engine.bundle import LOGIT_COLUMNS, calibrate_image
from lungopacity.inference.bundle import read_manifest


def test_demo_chain_writes_every_product(tiny_demo) -> None:
    paths = tiny_demo.paths
    assert (paths["classifier"] / "oof.csv").exists()
    assert (paths["classifier_report"] / "metrics.json").exists()
    assert (paths["fusion"] / "fusion.json").exists()
    assert (paths["detector_report"] / "submission.csv").exists()
    manifest = read_manifest(paths["model"])
    assert manifest.detector and manifest.applicability and len(manifest.classifier.members) == 2
    assert (manifest.fusion is not None) == (manifest.decision_source == "fusion")
    table = pd.read_csv(paths["predictions"] / "predictions.csv")
    assert len(table) == 3
    for column in ("id", "p_normal", "p_not_normal", "p_lung_opacity", "opacity_probability", "decision",
                   "image_probability", "decision_source", "member_std", "uncertain", "applicable"):
        assert column in table.columns
    np.testing.assert_allclose(table[["p_normal", "p_not_normal", "p_lung_opacity"]].sum(axis=1), 1.0, atol=1e-6)


def test_bundle_predictions_equal_the_run_models(tiny_demo) -> None:
    """Same probabilities from the saved bundle as from the training run's own checkpoints."""
    from lungopacity.data.cache import PreparedCache
    from lungopacity.engine.classifier import load_run_models

    paths = tiny_demo.paths
    predictor = Predictor.from_bundle(paths["model"])
    models, _ = load_run_models(paths["classifier"])
    cache = PreparedCache(paths["cache"])
    x = torch.from_numpy(np.stack([cache.image(i) for i in range(6)])).float().div(255)[:, None]
    with torch.no_grad():
        logits = torch.stack([m(x) for m in models]).mean(0).double().numpy()
    expected = torch.softmax(torch.from_numpy(logits / predictor.temperature), dim=1).numpy()
    np.testing.assert_allclose(predictor.classify(x), expected, atol=1e-6)


def test_bundle_predicts_the_same_after_a_reload(tiny_demo) -> None:
    image = sorted((tiny_demo.paths["data"] / "stage_2_train_images").glob("*.dcm"))[0]
    first = Predictor.from_bundle(tiny_demo.paths["model"]).read(image.read_bytes(), image.name, with_images=False)
    second = Predictor.from_bundle(tiny_demo.paths["model"]).read(image.read_bytes(), image.name, with_images=False)
    assert first.prediction.probabilities == second.prediction.probabilities
    assert first.prediction.opacity_probability == second.prediction.opacity_probability
    assert [b.__dict__ for b in first.prediction.boxes] == [b.__dict__ for b in second.prediction.boxes]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("corrupt_weights", "does not match its checksum"),
        ("missing_detector", "detector.safetensors is missing"),
        ("old_format", "rebuild the bundle"),
        ("no_manifest", "bundle.json missing"),
        ("bad_json", "damaged"),
    ],
)
def test_damaged_or_incomplete_bundle_is_refused(tiny_demo, tmp_path: Path, damage: str, message: str) -> None:
    bundle = tmp_path / "model"
    shutil.copytree(tiny_demo.paths["model"], bundle)
    manifest_path = bundle / "bundle.json"
    if damage == "corrupt_weights":
        data = bytearray((bundle / "classifier_0.safetensors").read_bytes())
        data[-100] ^= 0xFF
        (bundle / "classifier_0.safetensors").write_bytes(bytes(data))
    elif damage == "missing_detector":
        (bundle / "detector.safetensors").unlink()
    elif damage == "old_format":
        manifest = json.loads(manifest_path.read_text())
        manifest["format_version"] = 0
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "no_manifest":
        manifest_path.unlink()
    elif damage == "bad_json":
        manifest_path.write_text("{not json")
    with pytest.raises(BundleError, match=message):
        Predictor.from_bundle(bundle)


def test_predict_command_on_a_mixed_folder(tiny_demo, tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from lungopacity.cli import app
    from lungopacity.io import read_image

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    dicom = sorted((tiny_demo.paths["data"] / "stage_2_train_images").glob("*.dcm"))[0]
    shutil.copy(dicom, inputs / "good.dcm")
    pixels, _ = read_image(dicom)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(inputs / "good.png")
    data = dicom.read_bytes()
    (inputs / "broken.dcm").write_bytes(data[: len(data) // 2])
    (tmp_path / "meta.csv").write_text("id,sex,age,view\ngood,F,40,AP\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["predict", str(inputs), "--bundle", str(tiny_demo.paths["model"]), "--out", str(out),
              "--metadata-csv", str(tmp_path / "meta.csv")],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "predictions.csv")
    assert sorted(table["id"]) == ["good.dcm", "good.png"]  # the same stem twice: ids keep the extension
    png_row = json.loads((out / "predictions.json").read_text())
    by_meta = {tuple(sorted(r["missing"])): r for r in png_row}
    assert () in by_meta  # the DICOM has its own header; the PNG got sex/age/view from the CSV
    errors = pd.read_csv(out / "errors.csv")
    assert len(errors) == 1 and errors["input"][0].endswith("broken.dcm") and "truncated" in errors["error"][0]
    for image_id in ("good.dcm", "good.png"):
        assert (out / "overlays" / f"{image_id}.png").exists()
        assert (out / "overlays" / f"{image_id}_heatmap.png").exists()
    submission = pd.read_csv(out / "submission.csv", keep_default_na=False)
    assert list(submission.columns) == ["patientId", "PredictionString"] and len(submission) == 2


def test_png_without_metadata_reports_missing_inputs(tiny_demo) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((96, 80), 120, np.uint8)).save(buffer, format="PNG")
    reading = Predictor.from_bundle(tiny_demo.paths["model"]).read(buffer.getvalue(), "x.png", view="AP")
    prediction = reading.prediction
    assert prediction.missing == ["sex", "age"]
    assert prediction.metadata["view"] == "AP" and prediction.image_size == (96, 80)
    assert set(prediction.probabilities) == set(CLASS_KEYS)
    # The service's pictures: the image alone as a grey JPEG at its size (no heatmap unless asked for).
    assert reading.display_jpeg.startswith(b"\xff\xd8") and reading.display_size == (96, 80)
    assert reading.heatmap_layer_png is None and reading.overlay_png is None
    with Image.open(io.BytesIO(reading.display_jpeg)) as picture:
        assert picture.mode == "L" and picture.size == (80, 96)
        assert abs(float(np.asarray(picture, dtype=float).mean()) - 120) < 2


def test_heatmap_layer_on_request_and_the_same_reading(tiny_demo) -> None:
    import io

    from PIL import Image

    predictor = Predictor.from_bundle(tiny_demo.paths["model"])
    dicom = sorted((tiny_demo.paths["data"] / "stage_2_train_images").glob("*.dcm"))[0]
    plain = predictor.read(dicom.read_bytes(), dicom.name, with_images=False)
    heat = predictor.read(dicom.read_bytes(), dicom.name, with_images=False, with_heatmap=True)
    assert plain.display_jpeg is None and heat.display_jpeg is None
    assert heat.prediction.opacity_probability == plain.prediction.opacity_probability
    with Image.open(io.BytesIO(heat.heatmap_layer_png)) as layer:
        assert layer.mode == "RGBA" and max(layer.size) <= 256
        rows, cols = heat.prediction.image_size
        assert abs(layer.size[0] / layer.size[1] - cols / rows) < 0.02
        alpha = np.asarray(layer)[:, :, 3]
    assert alpha.max() <= round(0.6 * 255)  # never opaque: the image shows through
    assert {"heatmap", "total"} <= set(heat.prediction.timings)


def test_large_image_pictures_are_display_size(tiny_demo) -> None:
    """A 2048-pixel upload: the page's JPEG and predict's PNGs are at most 1024 long, decoded once."""
    import io

    from PIL import Image

    from lungopacity.inference.predictor import DISPLAY_SIDE

    predictor = Predictor.from_bundle(tiny_demo.paths["model"])
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(60, 200, size=(2048, 1536), dtype=np.uint8)).save(buffer, format="PNG")
    image = predictor.load(buffer.getvalue(), "big.png", keep_display=True)
    assert image._display is not None and image._pixels is None  # kept from the first decode
    assert image.display_pixels().shape == (1024, 768) and DISPLAY_SIDE == 1024
    (prediction,) = predictor.predict_images([image])
    (heat,) = predictor.heatmaps([image], native=True)
    overlay, heat_png = predictor.pictures(image, prediction, heat)
    assert Image.open(io.BytesIO(overlay)).size == (768, 1024)
    with Image.open(io.BytesIO(heat_png)) as picture:
        assert picture.size[1] == 1024 and picture.size[0] > 768  # the colour bar at the right


def test_temperature_scaling_lowers_calibration_error(tiny_demo) -> None:
    held_out = pd.read_csv(tiny_demo.paths["classifier"] / "oof.csv")
    # Overconfident logits (x4) of the same run: the fit must undo it.
    held_out[list(LOGIT_COLUMNS)] *= 4.0
    result = calibrate_image(held_out)
    assert result.temperature > 1.0
    assert result.ece_after < result.ece_before
