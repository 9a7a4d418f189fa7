"""Box supervision of the classifier: the head's activation maps, the boxes' coverage grid,
the loss that ties them, and the option through config, engine and command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lungopacity.constants import LUNG_OPACITY
from lungopacity.engine.checkpoint import load_checkpoint
from lungopacity.engine.classifier import ClassifierTrainConfig, box_coverage, box_map_loss, train_classifier
from lungopacity.errors import ConfigError
from lungopacity.models.classifier import create_classifier
from small_training import check_classifier_option_on_cli, small_cache, small_config


@pytest.mark.parametrize("backbone", ["test_resnet", "efficientnet_lite0"])
def test_the_spatial_mean_of_each_activation_map_is_that_class_logit(backbone):
    torch.manual_seed(0)
    model = create_classifier(backbone, pretrained="none", num_classes=3, in_chans=1).eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        logits, maps = model(x, with_activation_maps=True)
        plain = model(x)
    assert maps.shape[:2] == (2, 3) and maps.shape[-1] == 3  # 96 px / stride 32
    torch.testing.assert_close(logits, plain)
    torch.testing.assert_close(maps.mean(dim=(2, 3)), logits, atol=1e-5, rtol=1e-4)


def test_box_coverage_is_each_cells_share_inside_a_box():
    # 64 x 64 image, 4 x 4 grid of 16 px cells.
    half_of_two_cells = torch.tensor([[8.0, 0.0, 24.0, 16.0]])
    overlapping = torch.tensor([[32.0, 32.0, 64.0, 64.0], [40.0, 40.0, 48.0, 48.0]])
    grid = box_coverage([half_of_two_cells, overlapping, torch.zeros(0, 4)], 64, 64, 4, 4)
    expected = torch.zeros(3, 4, 4)
    expected[0, 0, 0] = expected[0, 0, 1] = 0.5
    expected[1, 2:, 2:] = 1.0  # the small box inside the large one changes nothing (largest share)
    torch.testing.assert_close(grid, expected)
    # A box over a quarter of a cell in each direction: a sixteenth of it.
    corner = box_coverage([torch.tensor([[0.0, 0.0, 4.0, 4.0]])], 64, 64, 4, 4)
    assert corner[0, 0, 0].item() == pytest.approx(1 / 16) and corner.sum().item() == pytest.approx(1 / 16)


def test_the_loss_raises_opacity_evidence_inside_boxes_and_lowers_it_elsewhere():
    maps = torch.zeros(2, 3, 4, 4, requires_grad=True)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4)]
    loss = box_map_loss(maps, boxes, 64, 64)
    # All maps 0: the evidence is 0 - log(e^0 + e^0) = -log 2 in every cell; BCE is
    # log(1 + 1/2) in the 31 cells with target 0 and log(1 + 2) in the one with target 1.
    expected = (31 * math.log(1.5) + math.log(3.0)) / 32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    grad = maps.grad[:, LUNG_OPACITY]
    assert grad[0, 0, 0] < 0  # descent raises the opacity map in the box
    assert (grad[0].flatten()[1:] > 0).all() and (grad[1] > 0).all()  # and lowers it outside / without boxes
    other = [k for k in range(3) if k != LUNG_OPACITY]
    assert (maps.grad[0, other, 0, 0] > 0).all()  # the other classes' maps move the other way


def test_a_negative_weight_is_refused():
    with pytest.raises(ConfigError, match="--box-supervision"):
        ClassifierTrainConfig(box_supervision=-0.5).validate()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return small_cache(tmp_path_factory.mktemp("box_data"), seed=3)


def test_box_supervised_training_logs_the_box_loss_and_changes_the_weights(cache, tmp_path):
    train_classifier(cache, tmp_path / "plain", small_config())
    train_classifier(cache, tmp_path / "boxes", small_config(box_supervision=1.0))
    lines = [json.loads(line) for line in (tmp_path / "boxes" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < line["train_box_loss"] < 5 for line in lines)
    assert all("train_box_loss" not in json.loads(line)
               for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines())
    saved = json.loads((tmp_path / "boxes" / "config.json").read_text())
    assert saved["train"]["box_supervision"] == 1.0
    plain = load_checkpoint(tmp_path / "plain" / "fold_0" / "last.pt")["model"]
    boxed = load_checkpoint(tmp_path / "boxes" / "fold_0" / "last.pt")["model"]
    assert plain.keys() == boxed.keys()  # the same network: nothing extra to ship
    assert any(not torch.equal(plain[k], boxed[k]) for k in plain)


def test_the_command_line_passes_the_weight_and_refuses_a_negative_one(cache, tmp_path):
    check_classifier_option_on_cli(cache, tmp_path, "--box-supervision", "0.5", "-1", "box_supervision")
