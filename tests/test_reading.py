"""A reading a person can trust (issue 13): one explained probability, provenance, applicability, uncertainty.

Regression tests for the defects of issue 13: calibration.png and bundle.json disagreed; a
bundle shipped fusion although its own cross-fitted comparison showed it worse; the final
probability, the class probability and the box score were unexplained; nothing said the
model was trained on synthetic data; a photograph got a finding; imputed metadata were not
shown; the detector's best and worst sheets shared patients; intervals printed as
"-0.0798 - -0.0176".
"""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lungopacity.cli import app
from lungopacity.constants import LUNG_OPACITY
from lungopacity.engine.bundle import FUSION_METRICS_FILE, LOGIT_COLUMNS, build_bundle, calibrate_image
from lungopacity.errors import BundleError
from lungopacity.inference import Box, Prediction, Predictor
from lungopacity.inference.applicability import ApplicabilityGate, FeatureModel
from lungopacity.inference.bundle import read_manifest
from lungopacity.inference.manifest import MIN_TRAINING_PATIENTS, BundleManifest, HeaderRules, scale_probability
from lungopacity.metrics.classification import softmax

REPO = Path(__file__).resolve().parents[1]


def _dicom(tiny_demo, k: int = 0) -> Path:
    return sorted((tiny_demo.paths["data"] / "stage_2_train_images").glob("*.dcm"))[k]


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _demo_png(tiny_demo, k: int = 0) -> bytes:
    from lungopacity.io import read_image

    pixels, _ = read_image(_dicom(tiny_demo, k))
    return _png_bytes((pixels * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def image_bundle(tiny_demo, tmp_path_factory) -> Path:
    """An image-only bundle of the demo runs (whether the demo's own keeps fusion depends on the toy run)."""
    paths = tiny_demo.paths
    return build_bundle(tmp_path_factory.mktemp("image_bundle") / "model", paths["classifier"],
                        detector_run=paths["detector"], cache_dir=paths["cache"],
                        detector_postprocess=paths["detector_report"] / "report.json")


@pytest.fixture(scope="module")
def fusion_bundle(tiny_demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo rebuilt with its fusion network kept (its comparison set to show fusion ahead)."""
    root = tmp_path_factory.mktemp("fusion_bundle")
    fusion = root / "fusion"
    shutil.copytree(tiny_demo.paths["fusion"], fusion)
    report = json.loads((fusion / FUSION_METRICS_FILE).read_text())
    report["models"]["image-only"]["auc"], report["models"]["fusion"]["auc"] = 0.80, 0.85
    (fusion / FUSION_METRICS_FILE).write_text(json.dumps(report))
    paths = tiny_demo.paths
    return build_bundle(root / "model", paths["classifier"], fusion_dir=fusion, detector_run=paths["detector"],
                        cache_dir=paths["cache"], detector_postprocess=paths["detector_report"] / "report.json")


# --------------------------------------------------------------------------- calibration


def test_calibration_figure_draws_the_numbers_of_bundle_json(tiny_demo, image_bundle: Path, tmp_path: Path) -> None:
    """calibration.png said ECE 0.045 -> 0.041 while bundle.json said 0.035 -> 0.061."""
    from lungopacity.reports.calibration import reliability_figure

    model = image_bundle
    card = read_manifest(model).model_card["calibration"]
    # The card's numbers are those of P(opacity) of the held-out predictions, recomputed independently.
    held_out = pd.read_csv(tiny_demo.paths["classifier"] / "oof.csv")
    logits = held_out[list(LOGIT_COLUMNS)].to_numpy()
    target = (held_out["class"].to_numpy() == LUNG_OPACITY).astype(int)
    after = softmax(logits, card["temperature"])[:, LUNG_OPACITY]
    edges = np.asarray(card["bin_edges"])
    assert len(edges) == 11
    bins = np.clip(np.searchsorted(edges, after, side="right") - 1, 0, 9)
    counts = np.bincount(bins, minlength=10)
    assert card["after"]["count"] == counts.tolist() and sum(card["before"]["count"]) == len(target)
    ece = sum(counts[b] / len(target) * abs(target[bins == b].mean() - after[bins == b].mean())
              for b in range(10) if counts[b])
    assert card["ece_after"] == pytest.approx(ece, abs=1e-12)
    assert card["ece_after"] == calibrate_image(held_out).ece_after

    drawn = reliability_figure(card, tmp_path / "calibration.png")
    assert drawn["legend"] == [f"before (T = 1): ECE {card['ece_before']:.3f}",
                               f"after (T = {card['temperature']:.3f}): ECE {card['ece_after']:.3f}"]
    for key in ("before", "after"):
        filled = [i for i, c in enumerate(card[key]["count"]) if c]
        assert drawn[key]["x"] == [card[key]["mean_predicted"][i] for i in filled]
        assert drawn[key]["y"] == [card[key]["observed"][i] for i in filled]
        assert drawn["counts"][key] == card[key]["count"]
    assert (model / "calibration.png").read_bytes()[:4] == b"\x89PNG"


def test_temperature_is_fitted_on_the_opacity_probability() -> None:
    """Calibrated logits scaled by 4 (overconfident): the fit must find a temperature near 4."""
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0.0, 1.5, (3000, 3))
    probabilities = softmax(true_logits)
    classes = np.array([rng.choice(3, p=row) for row in probabilities])
    held_out = pd.DataFrame(4.0 * true_logits, columns=list(LOGIT_COLUMNS))
    held_out["class"], held_out["fold"] = classes, rng.integers(0, 5, len(classes))
    result = calibrate_image(held_out)
    target = (classes == LUNG_OPACITY).astype(float)
    logits = held_out[list(LOGIT_COLUMNS)].to_numpy()

    def nll(t: float) -> float:
        p = np.clip(softmax(logits, t)[:, LUNG_OPACITY], 1e-7, 1 - 1e-7)
        return float(-np.mean(target * np.log(p) + (1 - target) * np.log(1 - p)))

    assert nll(result.temperature) <= min(nll(result.temperature * 0.9), nll(result.temperature * 1.1))
    assert 3.2 < result.temperature < 4.8 and result.ece_after < result.ece_before


# ------------------------------------------------------------------------------ fusion rule


def test_fusion_worse_than_the_image_gives_an_image_only_bundle_and_the_card_says_why(
    tiny_demo, tmp_path: Path
) -> None:
    paths = tiny_demo.paths
    fusion = tmp_path / "fusion"
    shutil.copytree(paths["fusion"], fusion)
    report = json.loads((fusion / FUSION_METRICS_FILE).read_text())
    report["models"]["image-only"]["auc"], report["models"]["fusion"]["auc"] = 0.90, 0.85
    report["comparisons"]["fusion_vs_image-only"]["delong_p"] = 0.0123
    (fusion / FUSION_METRICS_FILE).write_text(json.dumps(report))
    manifest = read_manifest(build_bundle(tmp_path / "model", paths["classifier"], fusion_dir=fusion,
                                          cache_dir=paths["cache"]))
    assert manifest.fusion is None and manifest.decision_source == "image" and manifest.threshold.score == "image"
    assert not (tmp_path / "model" / "fusion").exists()
    decision = manifest.model_card["decision"]
    assert decision["component"] == "image" and decision["fusion_kept"] is False
    assert "0.8500 is below the image classifier's 0.9000" in decision["reason"] and "0.0123" in decision["reason"]
    assert "at least" in decision["rule"]
    reading = Predictor.from_bundle(tmp_path / "model").read(_dicom(tiny_demo).read_bytes(), "a.dcm",
                                                             with_images=False).prediction
    assert reading.decision_source == "image" and reading.opacity_probability == reading.image_probability
    assert reading.imputed == {}


def test_the_real_demo_comparison_decides_by_the_rule(tiny_demo) -> None:
    report = json.loads((tiny_demo.paths["fusion"] / FUSION_METRICS_FILE).read_text())
    fusion_ahead = report["models"]["fusion"]["auc"] >= report["models"]["image-only"]["auc"]
    manifest = read_manifest(tiny_demo.paths["model"])
    assert (manifest.fusion is not None) == fusion_ahead
    assert manifest.model_card["decision"]["fusion_kept"] == fusion_ahead


def test_kept_fusion_is_calibrated_on_its_cross_fitted_output(tiny_demo, fusion_bundle: Path) -> None:
    manifest = read_manifest(fusion_bundle)
    assert manifest.decision_source == "fusion" and manifest.fusion is not None
    card = manifest.model_card
    assert card["calibration"]["temperature"] == manifest.fusion.temperature
    scores = pd.read_csv(tiny_demo.paths["fusion"] / "report" / "cross_fitted_scores.csv")
    assert card["calibration"]["n"] == len(scores)
    assert sum(card["calibration"]["after"]["count"]) == len(scores)

    predictor = Predictor.from_bundle(fusion_bundle)
    image = predictor.load(_dicom(tiny_demo).read_bytes(), name="a.dcm")
    (prediction,) = predictor.predict_images([image])
    # The fusion network takes the ensemble's uncalibrated probabilities (what it was trained on).
    logits, _ = predictor.member_logits_and_features(predictor.classifier_input([image]))
    raw = softmax(logits.mean(0).astype(np.float64))[0]
    rows = [{**prediction.metadata, **{f"p_{k}": raw[i] for i, k in enumerate(("normal", "not_normal", "lung_opacity"))}}]
    expected = scale_probability(predictor.fusion.predict(rows).probability, manifest.fusion.temperature)[0]
    assert prediction.opacity_probability == pytest.approx(expected, abs=1e-9)
    assert prediction.decision_source == "fusion"
    assert prediction.image_probability == pytest.approx(softmax(logits.mean(0), predictor.temperature)[0, LUNG_OPACITY])


# ------------------------------------------------------------------------- what a reading says


def test_a_reading_explains_its_numbers(tiny_demo, fusion_bundle: Path) -> None:
    predictor = Predictor.from_bundle(fusion_bundle)
    predictor.threshold = 0.0  # every applicable image positive, so boxes are drawn
    # The toy detector is barely trained (scores near its 0.05 floor): let every box through.
    predictor.detectors[0].model.score_thresh = 0.001
    predictor.postprocess.score_threshold = 0.0
    readings = [predictor.read(_dicom(tiny_demo, k).read_bytes(), f"{k}.dcm", with_images=False).prediction
                for k in range(4)]
    assert any(r.boxes for r in readings)
    gating = predictor.postprocess.gating != "none"
    for r in readings:
        assert r.image_probability == r.probabilities["lung_opacity"]
        for box in r.boxes:
            factor = r.box_gating_factor if gating else 1.0
            assert box.box_confidence == pytest.approx(box.detector_score * factor, abs=2e-4)
            assert box.x1 < box.x2 and box.y1 < box.y2
        assert (r.box_gating_factor is not None) == gating
        if r.decision and not r.boxes:
            assert "no box passed" in r.boxes_note


def test_a_positive_decision_without_a_box_says_so(tiny_demo) -> None:
    predictor = Predictor.from_bundle(tiny_demo.paths["model"])
    predictor.threshold = 0.0
    predictor.postprocess.score_threshold = 2.0  # no box can pass
    prediction = predictor.read(_dicom(tiny_demo).read_bytes(), "a.dcm", with_images=False).prediction
    assert prediction.decision is True and prediction.boxes == []
    assert prediction.boxes_note == "opacity found, but no box passed the detector's threshold: the location is not known"


def test_member_spread_and_the_uncertain_flag(tiny_demo, image_bundle: Path) -> None:
    predictor = Predictor.from_bundle(image_bundle)
    image = predictor.load(_dicom(tiny_demo).read_bytes(), name="a.dcm")
    logits, _ = predictor.member_logits_and_features(predictor.classifier_input([image]))
    members = [softmax(z.astype(np.float64), predictor.temperature)[0, LUNG_OPACITY] for z in logits]
    (p,) = predictor.predict_images([image])
    assert p.member_probabilities == [round(float(m), 4) for m in members]
    assert p.member_std == pytest.approx(np.std(members)) and p.member_min == min(members) and p.member_max == max(members)
    predictor.threshold = (min(members) + max(members)) / 2  # between the members: uncertain
    (between,) = predictor.predict_images([image])
    predictor.threshold = max(members) + 1e-3
    (above,) = predictor.predict_images([image])
    assert between.uncertain is True and above.uncertain is False


def test_imputed_metadata_are_visible(tiny_demo, fusion_bundle: Path) -> None:
    predictor = Predictor.from_bundle(fusion_bundle)
    prediction = predictor.read(_demo_png(tiny_demo), "x.png", view="AP", with_images=False).prediction
    encoder = predictor.fusion.encoder
    assert prediction.missing == ["sex", "age"]
    assert prediction.metadata_source == {"sex": "missing", "age": "missing", "view": "given"}
    assert prediction.imputed == {"sex_male": round(encoder.fraction_male, 4), "age": round(encoder.median_age_years, 4)}
    row = prediction.csv_row()
    assert row["imputed"] == f"sex_male={round(encoder.fraction_male, 4):g};age={round(encoder.median_age_years, 4):g}"
    assert row["sex_source"] == "missing" and row["view_source"] == "given"


# ---------------------------------------------------------------------------------- provenance


def test_the_card_records_the_training_data_and_readings_warn(tiny_demo) -> None:
    manifest = read_manifest(tiny_demo.paths["model"])
    data = manifest.training_data
    assert data.synthetic is True and "synthetic marker" in data.synthetic_evidence
    assert data.source_folder == "data" and data.n_patients == 48
    assert sum(data.patients_per_class.values()) == 48 and sum(data.views.values()) == 48
    assert data.age_range[0] <= data.age_range[1] and data.prepared_size == 64
    validation = manifest.model_card["validation"]
    low, high = validation["final_auc_ci95"]
    assert low <= validation["final_auc"] <= high and "bootstrap" in validation["method"]
    assert manifest.model_card["limitations"] and manifest.model_card["intended_use"]

    predictor = Predictor.from_bundle(tiny_demo.paths["model"])
    assert any("synthetic" in w for w in predictor.warnings)
    assert any(f"fewer than {MIN_TRAINING_PATIENTS:,}" in w for w in predictor.warnings)
    prediction = predictor.read(_dicom(tiny_demo).read_bytes(), "a.dcm", with_images=False).prediction
    assert prediction.model_warnings == predictor.warnings


def test_predict_on_a_real_dicom_says_the_model_was_trained_on_synthetic_data(
    tiny_demo, rsna_dicom_dir: Path, tmp_path: Path
) -> None:
    dicom = sorted((rsna_dicom_dir / "stage_2_train_images").glob("*.dcm"))[0]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(dicom), "--bundle", str(tiny_demo.paths["model"]),
                                      "--out", str(out), "--no-images"])
    assert result.exit_code == 0, result.output
    assert "warning: This model was trained on synthetic phantom images" in result.output
    assert "1 image read" in result.output and "1 images" not in result.output
    (record,) = json.loads((out / "predictions.json").read_text())
    assert any("synthetic" in w for w in record["model_warnings"])
    assert any("synthetic" in w for w in json.loads((out / "predict_run.json").read_text())["model_warnings"])


# ------------------------------------------------------------------------------- applicability


def test_a_photograph_gets_no_decision_and_says_why(tiny_demo, tmp_path: Path) -> None:
    """The acceptance check: a scikit-image photograph saved as PNG."""
    skimage_data = pytest.importorskip("skimage.data")
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(_png_bytes(skimage_data.astronaut()))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(photo), "--bundle", str(tiny_demo.paths["model"]),
                                      "--out", str(out), "--no-images"])
    assert result.exit_code == 0, result.output
    assert "astronaut: no decision: the image does not resemble the training radiographs" in result.output
    assert "0 with opacity, 1 without a decision" in result.output
    (record,) = json.loads((out / "predictions.json").read_text())
    assert record["decision"] is None and record["applicable"] is False and record["boxes"] == []
    assert record["feature_distance"] > 1 and "does not resemble" in record["not_applicable_reasons"][0]
    row = pd.read_csv(out / "predictions.csv", keep_default_na=False).iloc[0]
    assert row["decision"] == "" and row["applicable"] == 0 and "does not resemble" in row["not_applicable_reasons"]
    submission = pd.read_csv(out / "submission.csv", keep_default_na=False)
    assert submission["PredictionString"].tolist() == [""]


def test_training_images_pass_the_gate(tiny_demo) -> None:
    manifest = read_manifest(tiny_demo.paths["model"])
    assert manifest.model_card["applicability"]["held_out_rejection_rate"] <= 0.1
    predictor = Predictor.from_bundle(tiny_demo.paths["model"])
    readings = [predictor.read(_dicom(tiny_demo, k).read_bytes(), f"{k}.dcm", with_images=False).prediction
                for k in range(6)]
    assert sum(r.applicable for r in readings) >= 5
    assert all(r.unchecked == [] for r in readings)  # a demo DICOM carries every header field


@pytest.mark.parametrize(
    ("tags", "metadata", "size", "reason"),
    [
        ({"modality": "MR"}, {}, (512, 512), "modality MR is not a radiograph (CR/DX)"),
        ({"body_part": "HEAD"}, {}, (512, 512), "body part HEAD is not the chest"),
        ({"view_position": "LL"}, {}, (512, 512), "view LL is not a frontal view"),
        ({}, {"age": 6.0}, (512, 512), "age 6 years is outside the training ages (17-97 years)"),
        ({}, {}, (40, 512), "smaller than 64 px"),
        ({}, {}, (200, 512), "aspect ratio of 2.56"),
    ],
)
def test_header_checks(tags: dict, metadata: dict, size: tuple[int, int], reason: str) -> None:
    gate = ApplicabilityGate(None)
    gate.rules = HeaderRules(age_range=(17.0, 97.0), min_side=64, max_aspect=1.5)
    verdict = gate.check(size, metadata, tags, feature_distance=0.5)
    assert not verdict.applicable and len(verdict.reasons) == 1 and reason in verdict.reasons[0]
    passing = gate.check((512, 500), {"age": 40.0, "view": "PA"},
                         {"modality": "DX", "body_part": "CHEST", "view_position": "PA"}, 0.99)
    assert passing.applicable and passing.reasons == [] and passing.unchecked == []
    unknown = gate.check((512, 512), {}, {}, 0.5)
    assert unknown.applicable and unknown.unchecked == ["modality", "body_part", "view", "age"]


def test_an_mr_dicom_gets_no_decision(tiny_demo, tmp_path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(_dicom(tiny_demo))
    ds.Modality = "MR"
    path = tmp_path / "mr.dcm"
    ds.save_as(path)
    prediction = Predictor.from_bundle(tiny_demo.paths["model"]).read(path.read_bytes(), "mr.dcm",
                                                                       with_images=False).prediction
    assert prediction.decision is None and prediction.boxes == []
    assert any("modality MR" in r for r in prediction.not_applicable_reasons)
    assert prediction.boxes_note.startswith("no decision")


def test_feature_distance_is_the_mahalanobis_distance() -> None:
    """With all but one axis kept, the PPCA distance is exactly the sample-covariance Mahalanobis distance."""
    from lungopacity.engine.applicability import fit_feature_model

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(5, 5))
    train = rng.normal(size=(400, 5)) @ mixing + 3.0
    model = fit_feature_model(train, n_components=4)
    test = rng.normal(size=(7, 5)) @ mixing
    precision = np.linalg.inv(np.cov(train, rowvar=False))
    centred = test - train.mean(axis=0)
    expected = np.einsum("ij,jk,ik->i", centred, precision, centred) / 5
    np.testing.assert_allclose(model.distance(test), expected, rtol=1e-9)
    restored = FeatureModel.from_tensors(model.tensors("m"), "m")
    np.testing.assert_allclose(restored.distance(test), expected, rtol=1e-5)


# -------------------------------------------------------------------------------- the manifest


def _manifest_dict(bundle: Path) -> dict:
    return json.loads((bundle / "bundle.json").read_text())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m["threshold"].update(score="fusion"), "threshold: threshold.score is 'fusion' but the bundle has no"),
        (lambda m: m["applicability"].update(thresholds=[1.0]), "applicability.n_fit: must hold one count per threshold"),
        (lambda m: m["model_card"].pop("training_data"), "model_card.training_data: missing"),
        (lambda m: m["model_card"]["training_data"].update(n_patients="many"), "n_patients: expected an integer"),
        (lambda m: m["applicability"]["header"].update(age_range=[90, 10]), "age_range: must be [low, high]"),
    ],
)
def test_a_bad_format_3_manifest_is_refused(image_bundle: Path, damage, message: str) -> None:
    data = _manifest_dict(image_bundle)  # image-only: a 'fusion' score without a fusion part is the damage
    damage(data)
    with pytest.raises(BundleError, match=re.escape(message)):
        BundleManifest.from_dict(data)


def test_the_manifest_round_trips(tiny_demo) -> None:
    data = _manifest_dict(tiny_demo.paths["model"])
    assert BundleManifest.from_dict(data).to_dict() == data


# ------------------------------------------------------------------------------- documentation


def test_outputs_doc_defines_every_column_and_field() -> None:
    text = (REPO / "docs" / "OUTPUTS.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+)`", text))
    columns = set(Prediction.csv_columns())
    assert columns <= documented, columns - documented
    names = {f.name for f in fields(Prediction)} | {f.name for f in fields(Box)}
    assert names <= documented, names - documented


def test_an_earlier_journal_box_still_reads() -> None:
    box = Box.from_dict({"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "score": 0.5})
    assert box.box_confidence == 0.5 and box.score == 0.5 and box.detector_score is None


# ------------------------------------------------------------------------------ smaller defects


def test_intervals_print_as_brackets() -> None:
    from lungopacity.reports.text import interval

    assert interval((-0.0798, -0.0176), 4, signed=True) == "[-0.0798, -0.0176]"
    assert interval((0.81, 0.86)) == "[0.810, 0.860]"


def test_fusion_report_prints_intervals_as_brackets(tmp_path: Path) -> None:
    from lungopacity.reports.fusion import fusion_comparison_report

    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 200)
    table = pd.DataFrame({"Target": target, "p_metadata": rng.random(200),
                          "p_image": target * 0.5 + rng.random(200), "p_fusion": target * 0.3 + rng.random(200)})
    fusion_comparison_report(table, tmp_path, n_bootstrap=50)
    text = (tmp_path / "fusion_report.md").read_text()
    assert re.search(r"\| \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] \|", text)
    assert not re.search(r"\d - [-+]?\d", text)


def test_best_and_worst_case_sheets_share_no_patient() -> None:
    from lungopacity.reports.detection import select_cases

    rng = np.random.default_rng(1)
    per_image = rng.random(30)
    n_gt = rng.integers(0, 3, 30)
    for count in (4, 10, 20):
        best, worst = select_cases(per_image, n_gt, rng.integers(0, 3, 30), count)
        assert not set(best) & set(worst) and len(worst) > 0
        assert (n_gt[best] > 0).all()
