"""k-fold detectors evaluated out of fold: `evaluate-detector FOLD_RUNS... --split oof` (issue 17)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from lungopacity.cli import app
from lungopacity.data.cache import PreparedCache, prepare_cache
from lungopacity.engine.detector import (
    DetectorTrainConfig,
    detector_positions,
    gt_boxes,
    load_detector_run,
    predict_boxes,
    train_detector,
)
from lungopacity.engine.evaluate_detection import evaluate_detector
from lungopacity.errors import ConfigError
from lungopacity.io.submission import read_submission
from lungopacity.engine.bundle import read_postprocess_choice
from lungopacity.postprocess import cross_fitted_rsna_map, load_postprocess
from lungopacity.synthetic import write_demo_dataset


def _config(**overrides) -> DetectorTrainConfig:
    settings = dict(backbone="test_efficientnet", fpn_channels=16, epochs=2, batch_size=4, max_steps_per_epoch=2,
                    eval_batch_size=8, score_thresh=0.001, device="cpu")
    return DetectorTrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def fold_runs(tmp_path_factory):
    """A 3-fold cache of 18 phantoms and one tiny detector per fold."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("oof")
    write_demo_dataset(root / "data", n=18, size=96, seed=3)
    prepare_cache(root / "data", root / "cache", size=64, workers=1, folds=3)
    runs = []
    for k in range(3):
        train_detector(root / "cache", root / f"fold_{k}", _config(fold=k, seed=k))
        runs.append(root / f"fold_{k}")
    return root / "cache", runs


def _by_hand(cache_dir, runs, weights="last"):
    """Each fold's held-out patients predicted by that fold's run, assembled in cache order."""
    cache = PreparedCache(cache_dir)
    boxes, scores, folds, positions = {}, {}, {}, []
    for run_dir in runs:
        run = load_detector_run(run_dir)
        _, held_out = detector_positions(cache, run.train.fold)
        model = run.load_model(weights=weights)
        predictions = predict_boxes(model, cache, held_out, batch_size=8)
        for p, b, s in zip(held_out.tolist(), predictions.boxes, predictions.scores):
            boxes[p], scores[p], folds[p] = b, s, run.train.fold
        positions += held_out.tolist()
    positions = sorted(positions)
    return cache, positions, [boxes[p] for p in positions], [scores[p] for p in positions], \
        np.array([folds[p] for p in positions])


def test_every_patient_is_scored_by_the_fold_run_that_held_it_out(fold_runs, tmp_path):
    cache_dir, runs = fold_runs
    report = evaluate_detector(list(reversed(runs)), cache_dir, "oof", tmp_path / "report", device="cpu", n_cases=2)
    cache, positions, boxes, scores, folds = _by_hand(cache_dir, runs)
    ids = cache.table["patientId"].astype(str).to_numpy()[positions].tolist()

    assert report["split"] == "oof" and report["weights"] == "last"
    assert report["n_patients"] == len(cache.indices()) == len(positions)
    assert set(report["variants"]) == {"tuned"} and report["main_variant"] == "tuned"  # no stored, no gating
    per_patient = pd.read_csv(tmp_path / "report" / "per_patient.csv", dtype={"patientId": str})
    assert per_patient["patientId"].tolist() == ids
    assert per_patient["n_raw"].tolist() == [len(b) for b in boxes]
    np.testing.assert_allclose(per_patient["max_raw_score"].to_numpy(),
                               [s.max() if len(s) else np.nan for s in scores], rtol=1e-6)

    # The cross-fitted figure is the library's, with the cache's folds as the groups.
    gt = gt_boxes(cache, positions)
    expected = cross_fitted_rsna_map(gt, boxes, scores, fold_of=folds, gating_options=("none",))
    tuned = report["variants"]["tuned"]
    assert tuned["cross_fitted_rsna_map"] == pytest.approx(expected, abs=1e-9)
    low, high = tuned["cross_fitted_rsna_map_ci95"]
    assert low <= tuned["cross_fitted_rsna_map"] <= high
    assert len(tuned["cross_fitted_settings_by_fold"]) == 3

    # postprocess.json is the main variant's, readable by bundle --detector-postprocess.
    written = tmp_path / "report" / "postprocess.json"
    assert load_postprocess(written).to_dict() == tuned["postprocess"]
    assert read_postprocess_choice(written) == tuned["postprocess"]
    assert read_postprocess_choice(tmp_path / "report" / "report.json") == tuned["postprocess"]
    extra = json.loads(written.read_text())
    assert extra["tuned_on"] == "oof" and extra["rsna_map_cross_fitted"] == pytest.approx(expected, abs=1e-9)
    assert "3 fold runs out of fold" in (tmp_path / "report" / "report.md").read_text()


def test_gating_is_chosen_per_fold_when_probabilities_are_given(fold_runs, tmp_path):
    cache_dir, runs = fold_runs
    cache = PreparedCache(cache_dir)
    table = cache.table.iloc[cache.indices()]
    probs = pd.DataFrame({"patientId": table["patientId"], "p_lung_opacity": np.where(table["Target"] == 1, 0.9, 0.05)})
    probs.to_csv(tmp_path / "probs.csv", index=False)
    report = evaluate_detector(runs, cache_dir, "oof", tmp_path / "report", tmp_path / "probs.csv", device="cpu",
                               n_cases=2)
    assert set(report["variants"]) == {"tuned", "gated", "chosen"}
    assert report["main_variant"] == "chosen"
    chosen = report["variants"]["chosen"]
    assert chosen["postprocess"]["gating"] in ("none", "multiply")
    # The grid that may switch gating off scores at least the gated grid's best on these patients.
    assert chosen["metrics"]["rsna_map"] >= report["variants"]["gated"]["metrics"]["rsna_map"] - 1e-12
    assert chosen["metrics"]["rsna_map"] >= report["variants"]["tuned"]["metrics"]["rsna_map"] - 1e-12
    assert json.loads((tmp_path / "report" / "postprocess.json").read_text())["variant"] == "chosen"
    assert read_submission(tmp_path / "report" / "submission.csv")["patientId"].tolist() == table["patientId"].tolist()


def test_the_runs_must_cover_each_fold_once(fold_runs, tmp_path):
    cache_dir, runs = fold_runs
    with pytest.raises(ConfigError, match="no run for fold.s. 2"):
        evaluate_detector(runs[:2], cache_dir, "oof", tmp_path / "a", device="cpu")
    with pytest.raises(ConfigError, match="holds out fold 0"):
        evaluate_detector([runs[0], runs[0], runs[1], runs[2]], cache_dir, "oof", tmp_path / "b", device="cpu")
    with pytest.raises(ConfigError, match="--split"):
        evaluate_detector(runs, cache_dir, "val", tmp_path / "c", device="cpu")
    with pytest.raises(ConfigError, match="--split"):
        evaluate_detector(runs[0], cache_dir, "everything", tmp_path / "d", device="cpu")
    with pytest.raises(ConfigError, match="--weights"):
        load_detector_run(runs[0]).load_model(weights="middle")
    # A run of a fold the cache lacks (its config edited: train-detector itself refuses one).
    stray = tmp_path / "fold_5"
    shutil.copytree(runs[2], stray)
    config = json.loads((stray / "config.json").read_text())
    config["train"]["fold"] = 5
    (stray / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="holds out fold 5, which .* lacks"):
        evaluate_detector([*runs, stray], cache_dir, "oof", tmp_path / "e", device="cpu")


def test_a_run_without_a_fold_is_refused(fold_runs, tmp_path):
    cache_dir, runs = fold_runs
    train_detector(cache_dir, tmp_path / "plain", _config(epochs=1, max_steps_per_epoch=1))
    with pytest.raises(ConfigError, match="not a fold run"):
        evaluate_detector([tmp_path / "plain", *runs[1:]], cache_dir, "oof", tmp_path / "r", device="cpu")


def test_cli_evaluates_fold_runs_out_of_fold(fold_runs, tmp_path):
    cache_dir, runs = fold_runs
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["evaluate-detector", *map(str, runs), "--cache", str(cache_dir),
                                      "--split", "oof", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "cross-fitted" in result.output and "postprocess.json" in result.output
    assert (out / "postprocess.json").is_file()
    bad = CliRunner().invoke(app, ["evaluate-detector", *map(str, runs), "--cache", str(cache_dir),
                                   "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert bad.exit_code != 0 and "--split" in bad.output
