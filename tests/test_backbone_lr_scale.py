"""`--backbone-lr-scale`: a lower learning rate for the pretrained backbone than for the fresh head.

The optimiser's groups carry the scale through the whole schedule; a run trains its head
at the recipe's rate and its backbone at the scaled one; the option reaches config.json.
"""

from __future__ import annotations

import json

import pytest
import torch

from lungopacity.engine.checkpoint import load_checkpoint
from lungopacity.engine.classifier import ClassifierTrainConfig, train_classifier
from lungopacity.engine.common import build_optimizer, build_scheduler
from lungopacity.errors import ConfigError
from lungopacity.models.classifier import create_classifier
from small_training import check_classifier_option_on_cli, small_cache, small_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return small_cache(tmp_path_factory.mktemp("lr_scale_data"), seed=8)


def test_a_group_scale_multiplies_the_rate_at_every_step_of_the_schedule():
    head, backbone = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer("finetune", [{"params": [head]}, {"params": [backbone], "lr_scale": 0.1}],
                                lr=None, weight_decay=None)
    scheduler = build_scheduler("finetune", optimizer, steps_per_epoch=4, epochs=3)
    seen = []
    for _ in range(12):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    # 12 steps: one step of warm-up (10 %), so the first steps are at the peaks, then cosine.
    assert seen[0] == pytest.approx([1e-3, 1e-4])
    assert seen[2][1] < 1e-4 and seen[-1][1] > 0
    for head_lr, backbone_lr in seen:
        assert backbone_lr == pytest.approx(0.1 * head_lr, rel=1e-12, abs=1e-18)


def test_head_parameters_are_the_final_layer_only():
    model = create_classifier("test_resnet", pretrained="none", num_classes=3, in_chans=1)
    head = model.head_parameters()
    assert [tuple(p.shape) for p in head] == [tuple(p.shape) for p in model.model.get_classifier().parameters()]
    assert 0 < sum(p.numel() for p in head) < sum(p.numel() for p in model.parameters())


def _trained_parameters(run_dir, model_names):
    weights = load_checkpoint(run_dir / "fold_0" / "last.pt")["model"]
    return {name: weights[name] for name in model_names}


def test_a_run_trains_its_head_at_the_full_rate_and_its_backbone_at_the_scaled_one(cache, tmp_path):
    torch.set_num_threads(1)
    model = create_classifier("test_resnet", pretrained="none", num_classes=3, in_chans=1)
    head_names = {name for name, p in model.named_parameters() if any(p is h for h in model.head_parameters())}
    backbone_names = [name for name, _ in model.named_parameters() if name not in head_names]
    assert head_names == {"model.fc.weight", "model.fc.bias"}
    # Same seed, so the same start and the same batches: a backbone at 1e-9 of the rate
    # stays where it started (to float precision) from epoch 1 to epoch 2 while the head
    # learns on; at the full rate the backbone moves from the start like the head.
    runs = {}
    for name, scale, epochs in (("scaled1", 1e-9, 1), ("scaled2", 1e-9, 2), ("full1", 1.0, 1)):
        train_classifier(cache, tmp_path / name, small_config(backbone_lr_scale=scale, epochs=epochs, select="last"))
        runs[name] = _trained_parameters(tmp_path / name, [*backbone_names, *head_names])
    assert json.loads((tmp_path / "scaled1" / "config.json").read_text())["train"]["backbone_lr_scale"] == 1e-9
    groups = load_checkpoint(tmp_path / "scaled2" / "fold_0" / "last.pt")["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 1e-9]
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-3, 1e-12])  # the finetune recipe's peak

    def largest_change(a, b, names):
        return max(float((runs[a][n] - runs[b][n]).abs().max()) for n in names)

    assert largest_change("scaled1", "scaled2", backbone_names) < 1e-6
    assert largest_change("scaled1", "scaled2", head_names) > 1e-4
    assert largest_change("scaled1", "full1", backbone_names) > 1e-4


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan")])
def test_a_scale_that_is_not_positive_names_the_option(scale):
    with pytest.raises(ConfigError, match="--backbone-lr-scale"):
        ClassifierTrainConfig(backbone_lr_scale=scale).validate()


def test_the_command_line_passes_the_scale_and_refuses_zero(cache, tmp_path):
    check_classifier_option_on_cli(cache, tmp_path, "--backbone-lr-scale", "0.1", "0", "backbone_lr_scale")
