"""Several classifier runs of one architecture in one bundle (issue 17: ensembles pay on small data).

The bundle's held-out figures must be those of the ensemble it ships: per patient the mean
of the runs' out-of-fold logits. Runs that cannot be averaged (another architecture,
other folds) are refused with the run named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lungopacity.cli import app
from lungopacity.engine.bundle import LOGIT_COLUMNS, build_bundle, calibrate_image, ensemble_held_out
from lungopacity.engine.runs import load_classifier_run
from lungopacity.errors import ConfigError, RunFolderError
from lungopacity.inference.bundle import read_manifest
from lungopacity.metrics.classification import softmax


def _second_run(tiny_demo, root: Path, shift: tuple[float, float, float] = (0.0, -0.5, 1.0)) -> Path:
    """A copy of the demo's classifier run whose out-of-fold logits are shifted (stands in for a second seed)."""
    second = root / "classifier_seed1"
    shutil.copytree(tiny_demo.paths["classifier"], second)
    oof = pd.read_csv(second / "oof.csv", dtype={"patientId": str})
    oof[list(LOGIT_COLUMNS)] = oof[list(LOGIT_COLUMNS)].to_numpy() + np.asarray(shift)
    oof.to_csv(second / "oof.csv", index=False)
    return second


def test_held_out_logits_of_two_runs_are_their_mean(tiny_demo, tmp_path: Path) -> None:
    first = tiny_demo.paths["classifier"]
    second = _second_run(tiny_demo, tmp_path)
    merged = ensemble_held_out([load_classifier_run(first), load_classifier_run(second)]).set_index("patientId")
    a = pd.read_csv(first / "oof.csv", dtype={"patientId": str}).set_index("patientId").loc[merged.index]
    expected = a[list(LOGIT_COLUMNS)].to_numpy() + np.array([0.0, -0.25, 0.5])  # mean of x and x + shift
    np.testing.assert_allclose(merged[list(LOGIT_COLUMNS)].to_numpy(), expected, atol=1e-9)
    probabilities = merged[["p_normal", "p_not_normal", "p_lung_opacity"]].to_numpy()
    np.testing.assert_allclose(probabilities, softmax(expected), atol=1e-9)
    assert (merged["class"] == a["class"]).all() and (merged["fold"] == a["fold"]).all()


def test_bundle_of_two_runs_ships_all_members_and_the_ensembles_calibration(tiny_demo, tmp_path: Path) -> None:
    first = tiny_demo.paths["classifier"]
    second = _second_run(tiny_demo, tmp_path)
    runs = [load_classifier_run(first), load_classifier_run(second)]
    path = build_bundle(tmp_path / "model", [first, second], cache_dir=tiny_demo.paths["cache"])
    manifest = read_manifest(path)
    folds = runs[0].folds
    assert len(manifest.classifier.members) == 2 * folds
    assert manifest.classifier.temperature == pytest.approx(calibrate_image(ensemble_held_out(runs)).temperature)
    listed = manifest.model_card["model"]["classifier_runs"]
    assert [entry["path"] for entry in listed] == [str(r.path) for r in runs]
    assert [entry["members"] for entry in listed] == [folds, folds]


def test_runs_of_another_architecture_or_split_are_refused(tiny_demo, tmp_path: Path) -> None:
    first = tiny_demo.paths["classifier"]
    other = tmp_path / "other_backbone"
    shutil.copytree(first, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["backbone"] = "efficientnet_lite1"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="cannot join .*efficientnet_lite1"):
        build_bundle(tmp_path / "model", [first, other], cache_dir=tiny_demo.paths["cache"])

    moved = _second_run(tiny_demo, tmp_path)
    oof = pd.read_csv(moved / "oof.csv", dtype={"patientId": str})
    oof.loc[0, "fold"] = (int(oof.loc[0, "fold"]) + 1) % int(oof["fold"].max() + 1)
    oof.to_csv(moved / "oof.csv", index=False)
    with pytest.raises(RunFolderError, match="other folds"):
        ensemble_held_out([load_classifier_run(first), load_classifier_run(moved)])
    assert not (tmp_path / "model").exists()


def test_cli_takes_the_classifier_option_twice(tiny_demo, tmp_path: Path) -> None:
    # Also the regression test of `lungopacity bundle` without --device: its default "auto"
    # reached torch as a device name and every CLI bundle failed with a RuntimeError.
    first = tiny_demo.paths["classifier"]
    second = _second_run(tiny_demo, tmp_path)
    result = CliRunner().invoke(app, ["bundle", "--classifier", str(first), "--classifier", str(second),
                                      "--cache", str(tiny_demo.paths["cache"]), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert len(read_manifest(tmp_path / "model").classifier.members) == 2 * load_classifier_run(first).folds
    result = CliRunner().invoke(app, ["bundle", "--classifier", str(first), "--classifier", str(first),
                                      "--out", str(tmp_path / "model2")])
    assert result.exit_code == 1 and "the same run twice" in result.output
