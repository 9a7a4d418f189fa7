"""`--ema`: the weight average through the classifier's and the detector's runs and the command line.

The loop's own behaviour (exact decay, resume, checkpoint keys) is in test_engine_loop.py;
here: the option reaches the run, what a fold writes comes from the average, and the
detector's last.pt loads as the average.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from lungopacity.cli import app
from lungopacity.data.cache import PreparedCache, prepare_cache
from lungopacity.engine.checkpoint import load_checkpoint
from lungopacity.engine.classifier import ClassifierTrainConfig, predict_logits, train_classifier
from lungopacity.engine.detector import DetectorTrainConfig, load_detector_run, train_detector
from lungopacity.engine.loop import load_best_model
from lungopacity.engine.runs import LOGIT_COLUMNS
from lungopacity.errors import ConfigError
from lungopacity.models.classifier import classifier_from_config
from lungopacity.synthetic import write_demo_dataset
from small_training import check_classifier_option_on_cli, small_cache, small_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return small_cache(tmp_path_factory.mktemp("ema_data"), seed=6)


def test_a_classifier_fold_predicts_its_patients_with_the_average(cache, tmp_path):
    torch.set_num_threads(1)
    run_dir = tmp_path / "ema"
    train_classifier(cache, run_dir, small_config(ema=0.9, select="last"))
    assert json.loads((run_dir / "config.json").read_text())["train"]["ema"] == 0.9
    last = load_checkpoint(run_dir / "fold_0" / "last.pt")
    best = load_checkpoint(run_dir / "fold_0" / "best.pt")
    assert last["ema"]["updates"] == 6  # 2 epochs x 3 steps
    for name, tensor in last["ema"]["model"].items():
        assert torch.equal(best["model"][name], tensor), name
    assert any(not torch.equal(last["model"][k], last["ema"]["model"][k]) for k in last["model"]
               if last["model"][k].dtype.is_floating_point)
    # The held-out probabilities are the average's.
    held_out = pd.read_csv(run_dir / "fold_0" / "val_predictions.csv", dtype={"patientId": str})
    data = PreparedCache(cache)
    position_of = {pid: i for i, pid in enumerate(data.table["patientId"])}
    positions = np.array([position_of[p] for p in held_out["patientId"]])
    model, _ = load_best_model(run_dir / "fold_0" / "best.pt", classifier_from_config, "cpu")
    logits = predict_logits([model.eval()], data, positions, size=48)
    np.testing.assert_allclose(held_out[list(LOGIT_COLUMNS)].to_numpy(), logits, rtol=1e-4, atol=1e-5)


def test_a_detector_run_keeps_the_average_and_loads_it_as_its_last_weights(tmp_path):
    torch.set_num_threads(1)
    write_demo_dataset(tmp_path / "data", n=12, size=96, seed=1)
    prepare_cache(tmp_path / "data", tmp_path / "cache", size=64, workers=1, val_fraction=0.25, seed=0)
    config = DetectorTrainConfig(
        backbone="test_efficientnet", fpn_channels=16, epochs=1, batch_size=4, max_steps_per_epoch=2,
        eval_batch_size=8, score_thresh=0.001, device="cpu", ema=0.99,
    )
    train_detector(tmp_path / "cache", tmp_path / "det", config)
    run = load_detector_run(tmp_path / "det")
    assert run.train.ema == 0.99
    last = load_checkpoint(run.last_checkpoint)
    assert last["ema"]["updates"] == 2
    loaded = run.load_model(weights="last").state_dict()
    for name, tensor in last["ema"]["model"].items():
        assert torch.equal(loaded[name], tensor), name
    assert any(not torch.equal(loaded[k], last["model"][k]) for k in loaded if loaded[k].dtype.is_floating_point)


@pytest.mark.parametrize("config", [ClassifierTrainConfig(ema=1.0), ClassifierTrainConfig(ema=-0.5),
                                    DetectorTrainConfig(ema=1.5)])
def test_a_decay_outside_0_1_names_the_option(config):
    with pytest.raises(ConfigError, match="--ema"):
        config.validate()


def test_the_command_line_passes_the_decay_and_refuses_one_of_1(cache, tmp_path):
    check_classifier_option_on_cli(cache, tmp_path, "--ema", "0.99", "1", "ema")
    bad = CliRunner().invoke(app, ["train-detector", str(cache), "--out", str(tmp_path / "det"), "--ema", "-0.1"])
    assert bad.exit_code == 2 and "--ema" in bad.stderr
