"""evaluate_classifier: metrics that agree with an independent implementation, the report files,
and the leakage rule (out-of-fold probabilities for a k-fold run's own patients)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import roc_auc_score

from lungopacity.constants import CLASS_NAMES
from lungopacity.data.cache import PreparedCache, prepare_cache
from lungopacity.engine.classifier import (
    PROBABILITY_COLUMNS,
    ClassifierTrainConfig,
    load_run_models,
    predict_logits,
    softmax_np,
    train_classifier,
)
from lungopacity.engine.evaluate import classifier_metrics, evaluate_classifier
from lungopacity.metrics.classification import roc_auc
from lungopacity.synthetic import write_demo_dataset

REQUIRED_KEYS = {
    "n", "opacity_auc", "opacity_auc_ci", "abnormal_auc", "abnormal_auc_ci", "class_auc", "class_auc_ci",
    "accuracy", "operating_points", "view_opacity_auc", "confusion_matrix", "source", "source_counts",
    "n_seen_in_training", "warnings",
}
REPORT_FILES = ("metrics.json", "predictions.csv", "report.md", "roc_per_class.png", "confusion_matrix.png")


def _config(**overrides) -> ClassifierTrainConfig:
    settings = dict(
        backbone="test_resnet", pretrained="none", size=32, epochs=1, batch_size=8, recipe="finetune",
        max_steps_per_epoch=2, seed=3, patience=10, eval_batch_size=32, device="cpu",
    )
    settings.update(overrides)
    return ClassifierTrainConfig(**settings)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """The cache the runs train on ('own') and a cache of other patients ('other')."""
    root = tmp_path_factory.mktemp("evaluate_data")
    write_demo_dataset(root / "demo_own", 60, size=128, seed=21)
    write_demo_dataset(root / "demo_other", 30, size=128, seed=22)
    prepare_cache(root / "demo_own", root / "own", size=64, workers=1, val_fraction=0.25, folds=3)
    prepare_cache(root / "demo_other", root / "other", size=64, workers=1)
    return {"own": root / "own", "other": root / "other"}


@pytest.fixture(scope="module")
def single_run(caches, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("single") / "run"
    train_classifier(caches["own"], run, _config())
    return run


@pytest.fixture(scope="module")
def kfold_run(caches, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("kfold") / "run"
    train_classifier(caches["own"], run, _config(folds=3))
    return run


def _read_predictions(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "predictions.csv", dtype={"patientId": str, "view": object})


def _assert_metrics_match_predictions(metrics: dict, predictions: pd.DataFrame) -> None:
    """Every headline number recomputed from predictions.csv with scikit-learn."""
    labels = predictions["class"].to_numpy()
    probs = predictions[list(PROBABILITY_COLUMNS)].to_numpy()
    assert metrics["n"] == len(predictions)
    assert metrics["opacity_auc"] == pytest.approx(roc_auc_score(predictions["Target"], probs[:, 2]), abs=1e-12)
    assert metrics["opacity_auc"] == pytest.approx(roc_auc(predictions["Target"], probs[:, 2]), abs=1e-12)
    assert metrics["abnormal_auc"] == pytest.approx(roc_auc_score(labels != 0, 1 - probs[:, 0]), abs=1e-12)
    for k, name in enumerate(CLASS_NAMES):
        assert metrics["class_auc"][name] == pytest.approx(roc_auc_score(labels == k, probs[:, k]), abs=1e-12)
        lo, hi = metrics["class_auc_ci"][name]
        assert lo <= metrics["class_auc"][name] <= hi
    lo, hi = metrics["opacity_auc_ci"]
    assert lo <= metrics["opacity_auc"] <= hi
    assert metrics["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    assert metrics["confusion_matrix"] == sk_confusion_matrix(labels, probs.argmax(1), labels=[0, 1, 2]).tolist()
    for view in ("AP", "PA"):
        mask = (predictions["view"] == view).to_numpy()
        target = predictions["Target"].to_numpy()[mask]
        expected = roc_auc_score(target, probs[mask, 2]) if 0 < target.sum() < mask.sum() else None
        assert metrics["view_opacity_auc"][view] == (pytest.approx(expected, abs=1e-12) if expected is not None else None)
    for key in ("youden", "sensitivity_90"):
        point = metrics["operating_points"][key]
        called = probs[:, 2] >= point["threshold"]
        positive = predictions["Target"].to_numpy() == 1
        assert point["sensitivity"] == pytest.approx(called[positive].mean())
        assert point["specificity"] == pytest.approx((~called[~positive]).mean())
    assert metrics["operating_points"]["sensitivity_90"]["sensitivity"] >= 0.9


def _assert_report_files(out: Path) -> None:
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    for name in ("roc_per_class.png", "confusion_matrix.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as image:
            assert min(image.size) > 200
    report = (out / "report.md").read_text()
    assert "](roc_per_class.png)" in report and "](confusion_matrix.png)" in report


# ------------------------------------------------------------------ hand-built cases


def test_metrics_of_a_hand_built_table():
    # Eight patients; P(opacity) ranks the three opacity patients first, except one tie.
    predictions = pd.DataFrame(
        {
            "p_normal": [0.7, 0.6, 0.2, 0.3, 0.1, 0.1, 0.3, 0.5],
            "p_not_normal": [0.2, 0.3, 0.6, 0.4, 0.2, 0.3, 0.3, 0.3],
            "p_lung_opacity": [0.1, 0.1, 0.2, 0.3, 0.7, 0.6, 0.4, 0.2],
            "class": [0, 0, 1, 1, 2, 2, 2, 1],
            "view": ["PA", "PA", "AP", "AP", "AP", "AP", "PA", None],
        }
    )
    metrics = classifier_metrics(predictions, n_boot=200, seed=0)
    # Opacity scores of positives (0.7, 0.6, 0.4) are all above the negatives' (max 0.3): AUC 1.
    assert metrics["opacity_auc"] == 1.0
    assert metrics["opacity_auc_ci"] == [1.0, 1.0]
    assert metrics["operating_points"]["youden"] == {"threshold": 0.4, "sensitivity": 1.0, "specificity": 1.0}
    assert metrics["operating_points"]["sensitivity_90"]["threshold"] == 0.4
    # Normal vs rest: P(normal) of the normals (0.7, 0.6) vs others (max 0.5): 1.0.
    assert metrics["class_auc"]["Normal"] == 1.0
    assert metrics["abnormal_auc"] == 1.0
    # Not normal: positives 0.6, 0.4, 0.3 vs negatives 0.2, 0.3, 0.2, 0.3, 0.3 -> (5 + 5 + 3 * 0.5 + 2) / 15.
    assert metrics["class_auc"]["No Lung Opacity / Not Normal"] == pytest.approx(13.5 / 15)
    # Arg-max: 0, 0, 1, 1, 2, 2, 2 (the 0.4 opacity is the largest of patient 6), 0.
    assert metrics["confusion_matrix"] == [[2, 0, 0], [1, 2, 0], [0, 0, 3]]
    assert metrics["accuracy"] == pytest.approx(7 / 8)
    # AP: opacity 0.7, 0.6 vs 0.2, 0.3 -> 1.0; PA: one opacity patient vs two normals -> 1.0.
    assert metrics["view_opacity_auc"] == {"AP": 1.0, "PA": 1.0}
    assert metrics["view_counts"] == {"AP": {"n": 4, "opacity": 2}, "PA": {"n": 3, "opacity": 1}}
    assert metrics["class_counts"] == {CLASS_NAMES[0]: 2, CLASS_NAMES[1]: 3, CLASS_NAMES[2]: 3}


def test_undefined_metrics_are_null_not_nan():
    predictions = pd.DataFrame(
        {"p_normal": [0.5, 0.4, 0.2], "p_not_normal": [0.3, 0.4, 0.2], "p_lung_opacity": [0.2, 0.2, 0.6],
         "class": [0, 1, 2], "view": ["PA", "PA", "AP"]}
    )
    metrics = classifier_metrics(predictions, n_boot=50)
    assert metrics["view_opacity_auc"] == {"AP": None, "PA": None}  # each view holds one outcome only
    json.dumps(metrics, allow_nan=False)


# -------------------------------------------------------------------- real runs


def test_single_split_run_on_its_validation_patients(caches, single_run, tmp_path):
    out = tmp_path / "report"
    metrics = evaluate_classifier(single_run, caches["own"], "val", out, n_boot=200, device="cpu")
    assert REQUIRED_KEYS <= metrics.keys()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    _assert_report_files(out)
    predictions = _read_predictions(out)
    _assert_metrics_match_predictions(metrics, predictions)

    cache = PreparedCache(caches["own"])
    val = cache.table.iloc[cache.indices("val")]
    assert predictions["patientId"].tolist() == val["patientId"].tolist()
    assert predictions["class"].tolist() == val["class"].tolist()
    assert predictions["view"].tolist() == val["view"].tolist()
    assert metrics["source"] == "model" and metrics["n_seen_in_training"] == 0 and metrics["warnings"] == []
    # The same model on the same patients as the run's own validation pass.
    own = pd.read_csv(single_run / "fold_0" / "val_predictions.csv", dtype={"patientId": str}).set_index("patientId")
    np.testing.assert_allclose(
        predictions[list(PROBABILITY_COLUMNS)].to_numpy(),
        own.loc[predictions["patientId"], list(PROBABILITY_COLUMNS)].to_numpy(), atol=1e-5,
    )


def test_single_split_run_on_all_of_its_own_cache_warns_that_training_patients_were_seen(caches, single_run, tmp_path):
    metrics = evaluate_classifier(single_run, caches["own"], "all", tmp_path / "report", n_boot=100, device="cpu")
    cache = PreparedCache(caches["own"])
    predictions = _read_predictions(tmp_path / "report")
    split = cache.table.set_index("patientId").loc[predictions["patientId"], "split"]
    assert predictions["seen_in_training"].tolist() == (split == "train").tolist()
    assert metrics["n_seen_in_training"] == int((split == "train").sum()) > 0
    assert metrics["n"] == len(cache.indices())
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Warning" in report and "TRAINING patients" in report


def test_kfold_run_on_its_own_cache_uses_out_of_fold_probabilities(caches, kfold_run, tmp_path):
    out = tmp_path / "report"
    metrics = evaluate_classifier(kfold_run, caches["own"], "all", out, n_boot=200, device="cpu")
    _assert_report_files(out)
    predictions = _read_predictions(out)
    _assert_metrics_match_predictions(metrics, predictions)
    oof = pd.read_csv(kfold_run / "oof.csv", dtype={"patientId": str}).set_index("patientId")
    assert sorted(predictions["patientId"]) == sorted(oof.index)
    np.testing.assert_array_equal(
        predictions[list(PROBABILITY_COLUMNS)].to_numpy(), oof.loc[predictions["patientId"], list(PROBABILITY_COLUMNS)].to_numpy()
    )
    assert metrics["source"] == "oof" and metrics["same_cache"] and metrics["n_models"] == 0
    assert set(predictions["source"]) == {"oof"}
    assert "out-of-fold" in (out / "report.md").read_text()

    # The validation split of the same cache: the OOF rows of those patients.
    val_metrics = evaluate_classifier(kfold_run, caches["own"], "val", tmp_path / "val", n_boot=50, device="cpu")
    cache = PreparedCache(caches["own"])
    assert val_metrics["n"] == len(cache.indices("val")) and val_metrics["source"] == "oof"


def test_kfold_run_on_another_cache_averages_the_fold_models_in_logit_space(caches, kfold_run, tmp_path):
    out = tmp_path / "report"
    metrics = evaluate_classifier(kfold_run, caches["other"], "all", out, n_boot=200, device="cpu")
    predictions = _read_predictions(out)
    _assert_metrics_match_predictions(metrics, predictions)
    assert metrics["source"] == "ensemble" and metrics["n_models"] == 3 and not metrics["same_cache"]
    assert metrics["warnings"] == []

    cache = PreparedCache(caches["other"])
    positions = cache.indices()
    assert predictions["patientId"].tolist() == cache.table["patientId"].iloc[positions].tolist()
    models, config = load_run_models(kfold_run)
    logits = [predict_logits(model, cache, positions, size=config["input_size"]) for model in models]
    expected = softmax_np(np.mean(logits, axis=0).astype(np.float64))
    probs = predictions[list(PROBABILITY_COLUMNS)].to_numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    for single in logits:
        assert not np.allclose(probs, softmax_np(single.astype(np.float64)), atol=1e-5)


def test_unknown_split_is_refused(caches, single_run, tmp_path):
    with pytest.raises(ValueError, match="split must be"):
        evaluate_classifier(single_run, caches["own"], "train", tmp_path / "report", device="cpu")


def test_kfold_evaluation_plays_the_pointing_game_with_out_of_fold_heatmaps(caches, kfold_run, tmp_path):
    """metrics['pointing'] equals the game recomputed by hand: each positive patient's map from
    the fold model that did not train on it, its maximum scored against the patient's boxes."""
    from lungopacity.data.preprocess import network_input
    from lungopacity.inference.gradcam import HEATMAP_METHOD, grad_cam
    from lungopacity.metrics.pointing import area_share, pointing_hit

    metrics = evaluate_classifier(kfold_run, caches["own"], "all", tmp_path / "report", n_boot=100, device="cpu")
    game = metrics["pointing"]
    cache = PreparedCache(caches["own"])
    models, config = load_run_models(kfold_run)
    hits, baselines = [], []
    for i in cache.indices():
        boxes = cache.table["boxes"].iat[i]
        if cache.table["Target"].iat[i] != 1 or len(boxes) == 0:
            continue
        x = network_input(cache.image(i)[None], size=config["input_size"])
        cam = grad_cam([models[int(cache.table["fold"].iat[i])]], x, **dict(HEATMAP_METHOD))[0]
        size = (int(cache.table["orig_h"].iat[i]), int(cache.table["orig_w"].iat[i]))
        hits.append(pointing_hit(cam, boxes, size))
        baselines.append(area_share(cam.shape, boxes, size))
    assert game["n"] == len(hits) > 0
    assert game["hit_rate"] == pytest.approx(np.mean(hits)) and game["baseline"] == pytest.approx(np.mean(baselines))
    assert game["explained_by"] == "out-of-fold model" and game["n_boot"] == 100
    assert "## Pointing game" in (tmp_path / "report" / "report.md").read_text()

    other = evaluate_classifier(kfold_run, caches["other"], "all", tmp_path / "other", n_boot=50, device="cpu")
    assert other["pointing"]["explained_by"] == "the run's models averaged"
    skipped = evaluate_classifier(kfold_run, caches["own"], "all", tmp_path / "none", n_boot=50, device="cpu", pointing=False)
    assert "pointing" not in skipped and "Pointing game" not in (tmp_path / "none" / "report.md").read_text()
