"""`--freeze-bn`: batch-norm layers keep the statistics of the pretrained weights while the rest trains.

A run with it leaves every running mean and variance at the values of its weights file (and
counts no batch) while the layers' scale and shift learn; without it the statistics move.
A fresh network has no statistics to keep, so the flag then is refused by name. The flag
reaches config.json through the command line.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lungopacity.cli import app
from lungopacity.engine.checkpoint import load_checkpoint
from lungopacity.engine.classifier import ClassifierTrainConfig, train_classifier
from lungopacity.errors import ConfigError
from lungopacity.models.classifier import create_classifier
from small_training import small_cache, small_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return small_cache(tmp_path_factory.mktemp("freeze_bn_data"), seed=10)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """test_resnet weights whose batch-norm statistics are not a fresh layer's (0 and 1)."""
    generator = torch.Generator().manual_seed(3)
    model = create_classifier("test_resnet", pretrained="none", num_classes=3, in_chans=1, log=False).model
    state = model.state_dict()
    for name, value in state.items():
        if name.endswith("running_mean"):
            state[name] = torch.randn(value.shape, generator=generator) * 0.1
        elif name.endswith("running_var"):
            state[name] = 1.0 + torch.rand(value.shape, generator=generator)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    torch.save(state, path)
    return path, state


def _statistics(state):
    return {k.removeprefix("model."): v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_statistics_stay_while_scale_and_shift_learn(cache, tmp_path, weights_file, freeze):
    torch.set_num_threads(1)
    path, start = weights_file
    config = small_config(pretrained=str(path), freeze_bn=freeze, epochs=2, select="last")
    train_classifier(cache, tmp_path / "run", config)
    trained = load_checkpoint(tmp_path / "run" / "fold_0" / "last.pt")["model"]
    before, after = _statistics(start), _statistics(trained)
    assert before.keys() == after.keys() and before
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    assert unchanged == freeze
    counted = max(int(v) for k, v in trained.items() if k.endswith("num_batches_tracked"))
    assert (counted == 0) == freeze
    scales = [k for k in trained if k.endswith("bn1.weight")]
    assert scales and any(not torch.equal(trained[k], start[k.removeprefix("model.")]) for k in scales)


def test_a_fresh_network_has_no_statistics_to_keep():
    with pytest.raises(ConfigError, match="--freeze-bn"):
        ClassifierTrainConfig(pretrained="none", freeze_bn=True).validate()


def test_the_command_line_passes_the_flag(cache, tmp_path, weights_file):
    common = [str(cache), "--backbone", "test_resnet", "--size", "32", "--epochs", "1", "--batch-size", "8",
              "--max-steps-per-epoch", "1", "--device", "cpu", "--folds", "1", "--pretrained", str(weights_file[0])]
    for flags, expected in (([], False), (["--freeze-bn"], True)):
        out = tmp_path / f"run_{expected}"
        result = CliRunner().invoke(app, ["train-classifier", *common, "--out", str(out), *flags])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "config.json").read_text())["train"]["freeze_bn"] is expected
