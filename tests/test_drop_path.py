"""`--drop-path`: stochastic depth for the classifier's residual blocks (timm's drop_path_rate).

The rate reaches the network (rising with depth to the value asked), is recorded so that a
checkpoint rebuilds the same network, drops blocks in training only, and is refused with
the option named where it cannot apply.
"""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath

from lungopacity.engine.checkpoint import load_checkpoint
from lungopacity.engine.classifier import ClassifierTrainConfig, train_classifier
from lungopacity.errors import ConfigError
from lungopacity.models.classifier import classifier_from_config
from small_training import check_classifier_option_on_cli, small_cache, small_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return small_cache(tmp_path_factory.mktemp("drop_path_data"), seed=9)


def _drop_rates(model: torch.nn.Module) -> list[float]:
    return [float(m.drop_prob) for m in model.modules() if isinstance(m, DropPath)]


def test_the_rate_reaches_the_network_and_rebuilds_from_the_checkpoint(cache, tmp_path):
    torch.set_num_threads(1)
    train_classifier(cache, tmp_path / "run", small_config(drop_path=0.3, epochs=1, select="last"))
    checkpoint = load_checkpoint(tmp_path / "run" / "fold_0" / "best.pt")
    assert checkpoint["model_config"]["model_kwargs"] == {"drop_path_rate": 0.3}
    rebuilt = classifier_from_config(checkpoint["model_config"])
    rebuilt.load_state_dict(checkpoint["model"])
    rates = _drop_rates(rebuilt)
    # test_resnet: timm's linear rule over its blocks, ending at the rate asked.
    assert len(rates) >= 2 and rates == sorted(rates) and rates[-1] == pytest.approx(0.3)

    # Training mode drops blocks per sample (two passes differ); evaluation never does. The
    # head's dropout is off here so that only stochastic depth can make passes differ; the
    # same network without it gives the same output twice in training mode.
    x = torch.rand(4, 1, 48, 48)
    no_dropout = dict(checkpoint["model_config"], drop_rate=0.0)
    plain = {k: v for k, v in no_dropout.items() if k != "model_kwargs"}
    for config, stochastic in ((no_dropout, True), (plain, False)):
        model = classifier_from_config(config)
        model.load_state_dict(checkpoint["model"])
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            first = model(x)
            differs = any(not torch.equal(first, model(x)) for _ in range(5))
        assert differs == stochastic
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), model(x))


def test_without_the_option_the_network_is_built_as_before(cache, tmp_path):
    torch.set_num_threads(1)
    train_classifier(cache, tmp_path / "run", small_config(epochs=1, select="last"))
    config = load_checkpoint(tmp_path / "run" / "fold_0" / "best.pt")["model_config"]
    assert "model_kwargs" not in config
    assert all(rate == 0.0 for rate in _drop_rates(classifier_from_config(config)))


def test_a_backbone_without_stochastic_depth_is_refused_by_name(cache, tmp_path):
    with pytest.raises(ConfigError, match="--drop-path.*legacy_xception"):
        train_classifier(cache, tmp_path / "run", small_config(backbone="legacy_xception", drop_path=0.2))


@pytest.mark.parametrize("rate", [-0.1, 1.0, float("nan")])
def test_a_rate_outside_zero_to_one_names_the_option(rate):
    with pytest.raises(ConfigError, match="--drop-path"):
        ClassifierTrainConfig(drop_path=rate).validate()


def test_the_command_line_passes_the_rate_and_refuses_one(cache, tmp_path):
    check_classifier_option_on_cli(cache, tmp_path, "--drop-path", "0.2", "1", "drop_path")
