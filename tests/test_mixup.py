"""Mixup for the classifier: the blend, the loss it implies, and the option through config,
engine and command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lungopacity.data.cache import PreparedCache
from lungopacity.data.datasets import CacheDataset, collate_samples
from lungopacity.data.preprocess import network_input
from lungopacity.engine.checkpoint import load_checkpoint
from lungopacity.engine.classifier import (
    ClassifierTrainConfig,
    _ClassifierTask,
    box_coverage,
    mixup_batch,
    train_classifier,
)
from lungopacity.engine.loop import StepContext
from lungopacity.errors import ConfigError
from small_training import check_classifier_option_on_cli, small_cache, small_config


def test_each_image_is_blended_with_another_of_the_batch():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    torch.manual_seed(3)
    mixed, perm, lam = mixup_batch(x, 0.4)
    assert 0.0 < lam < 1.0
    assert sorted(perm.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    torch.manual_seed(3)  # the loop seeds the global generator, so a resumed epoch mixes alike
    again, perm_again, lam_again = mixup_batch(x, 0.4)
    assert lam_again == lam and torch.equal(perm_again, perm) and torch.equal(again, mixed)


def test_small_alpha_barely_mixes_and_alpha_one_is_uniform():
    torch.manual_seed(0)
    x = torch.zeros(2, 1, 1, 1)
    small = np.array([mixup_batch(x, 0.05)[2] for _ in range(400)])
    uniform = np.array([mixup_batch(x, 1.0)[2] for _ in range(4000)])
    assert np.mean(np.minimum(small, 1 - small) < 0.05) > 0.6  # Beta(0.05, 0.05) sits near 0 and 1
    assert abs(uniform.mean() - 0.5) < 0.02 and abs(uniform.var() - 1 / 12) < 0.01


def test_a_negative_alpha_is_refused():
    with pytest.raises(ConfigError, match="--mixup"):
        ClassifierTrainConfig(mixup=-0.1).validate()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return small_cache(tmp_path_factory.mktemp("mixup_data"), seed=4)


@pytest.mark.parametrize("box_supervision", [0.0, 1.0])
def test_the_step_loss_is_cross_entropy_against_the_mixed_labels(cache, box_supervision):
    prepared = PreparedCache(cache)
    positions = np.arange(len(prepared.table))
    config = small_config(mixup=0.4, box_supervision=box_supervision)
    task = _ClassifierTask(prepared, 0, positions[:8], positions[8:], config, torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model().eval()  # no dropout: the two computations see the same network
    batch = collate_samples([CacheDataset(prepared, positions[:8])[i] for i in range(8)])
    step = StepContext(model=model, device=torch.device("cpu"), augment=None, amp=False, channels_last=False)
    torch.manual_seed(11)
    out = task.train_step(batch, step)

    # Independently: the same draw, then soft-label cross-entropy on the blended images.
    torch.manual_seed(11)
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(8)
    x = network_input(batch["image"], size=48, device=torch.device("cpu"))
    with torch.no_grad():
        logits, maps = model(lam * x + (1 - lam) * x[perm], with_activation_maps=True)
    onehot = F.one_hot(batch["label"], 3).float()
    soft = lam * onehot + (1 - lam) * onehot[perm]
    expected = -(soft * F.log_softmax(logits, dim=1)).sum(1).mean()
    if box_supervision:
        # The map's target is the blend of the two images' box coverages.
        boxes = [b * (48 / 64) for b in batch["boxes"]]
        coverage = box_coverage(boxes, 48, 48, *maps.shape[-2:])
        target = lam * coverage + (1 - lam) * coverage[perm]
        evidence = maps[:, 2] - torch.logsumexp(maps[:, :2], dim=1)
        box_loss = F.binary_cross_entropy_with_logits(evidence, target)
        assert float(out["box_loss"]) == pytest.approx(float(box_loss), rel=1e-5) and float(box_loss) > 0
        expected = expected + box_loss
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert 0.0 < lam < 1.0 and not torch.equal(perm, torch.arange(8))  # the case really mixes


def test_mixup_training_records_the_option_and_changes_the_weights(cache, tmp_path):
    train_classifier(cache, tmp_path / "plain", small_config())
    train_classifier(cache, tmp_path / "mixup", small_config(mixup=0.4))
    saved = json.loads((tmp_path / "mixup" / "config.json").read_text())
    assert saved["train"]["mixup"] == 0.4
    plain = load_checkpoint(tmp_path / "plain" / "fold_0" / "last.pt")["model"]
    mixed = load_checkpoint(tmp_path / "mixup" / "fold_0" / "last.pt")["model"]
    assert any(not torch.equal(plain[k], mixed[k]) for k in plain)


def test_the_command_line_passes_alpha_and_refuses_a_negative_one(cache, tmp_path):
    check_classifier_option_on_cli(cache, tmp_path, "--mixup", "0.2", "-1", "mixup")
