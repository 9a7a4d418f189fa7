"""A small synthetic cache and a fast classifier config, for tests that really train a few steps."""

from __future__ import annotations

from pathlib import Path

from lungopacity.data.cache import prepare_cache
from lungopacity.engine.classifier import ClassifierTrainConfig
from lungopacity.synthetic import write_demo_dataset


def small_cache(root: Path, seed: int) -> Path:
    """40 synthetic patients (some with boxes) prepared at 64 px with a 25 % validation split."""
    write_demo_dataset(root / "demo", 40, size=128, seed=seed)
    prepare_cache(root / "demo", root / "cache", size=64, workers=1, val_fraction=0.25, seed=0)
    return root / "cache"


def small_config(**overrides) -> ClassifierTrainConfig:
    """A tiny ResNet at 48 px, 2 epochs of 3 steps on the CPU."""
    settings = dict(backbone="test_resnet", pretrained="none", size=48, epochs=2, batch_size=8,
                    max_steps_per_epoch=3, seed=5, patience=10, eval_batch_size=32, device="cpu")
    settings.update(overrides)
    return ClassifierTrainConfig(**settings)


def check_classifier_option_on_cli(cache: Path, out: Path, option: str, good: str, bad: str, key: str) -> None:
    """`train-classifier OPTION good` records it under config.json's train[key]; `OPTION bad`
    is a usage error (exit 2) naming the option, and creates no run folder."""
    import json

    from typer.testing import CliRunner

    from lungopacity.cli import app

    common = [str(cache), "--backbone", "test_resnet", "--size", "32", "--epochs", "1", "--batch-size", "8",
              "--max-steps-per-epoch", "1", "--device", "cpu", "--folds", "1"]
    ok = CliRunner().invoke(app, ["train-classifier", *common, "--out", str(out / "run"), option, good])
    assert ok.exit_code == 0, ok.output
    assert json.loads((out / "run" / "config.json").read_text())["train"][key] == float(good)
    refused = CliRunner().invoke(app, ["train-classifier", *common, "--out", str(out / "bad"), option, bad])
    assert refused.exit_code == 2 and option in refused.stderr
    assert not (out / "bad").exists()
