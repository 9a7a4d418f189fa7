"""Detector training on one of the cache's folds (`train-detector --fold K`, issue 17)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lungopacity.data.cache import PreparedCache, prepare_cache
from lungopacity.engine.detector import DetectorTrainConfig, detector_positions, load_detector_run, train_detector
from lungopacity.errors import ConfigError
from lungopacity.io.submission import read_submission
from lungopacity.synthetic import write_demo_dataset


@pytest.fixture(scope="module")
def fold_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("foldcache")
    write_demo_dataset(root / "data", n=15, size=96, seed=0)
    prepare_cache(root / "data", root / "cache", size=64, workers=1, folds=3)
    return root / "cache"


def test_a_fold_run_validates_on_that_fold_and_trains_on_the_others(fold_cache, tmp_path):
    torch.set_num_threads(1)
    cache = PreparedCache(fold_cache)
    folds = cache.table["fold"].to_numpy()
    config = DetectorTrainConfig(
        backbone="test_efficientnet", fpn_channels=16, epochs=1, batch_size=4, max_steps_per_epoch=1,
        eval_batch_size=8, score_thresh=0.001, device="cpu", fold=1,
    )
    run_dir = tmp_path / "det"
    train_detector(fold_cache, run_dir, config)

    ids = cache.table["patientId"].astype(str).to_numpy()
    held_out = set(ids[folds == 1])
    assert set(read_submission(run_dir / "val_predictions.csv")["patientId"]) == held_out
    run = load_detector_run(run_dir)
    assert run.train.fold == 1
    assert json.loads((run_dir / "config.json").read_text())["train"]["fold"] == 1
    assert (run.n_train, run.n_val) == (int((folds != 1).sum()), len(held_out))

    train, val = detector_positions(cache, 1)
    assert set(ids[val]) == held_out
    assert set(ids[train]) == set(ids) - held_out


def test_a_fold_the_cache_lacks_names_the_option(fold_cache):
    cache = PreparedCache(fold_cache)
    with pytest.raises(ConfigError, match="--fold"):
        detector_positions(cache, 3)
    assert [len(v) for _, v in [detector_positions(cache, None)]] == [len(cache.indices("val"))]
    with pytest.raises(ConfigError, match="--fold"):
        DetectorTrainConfig(fold=-1).validate()
    assert np.isin(cache.table["fold"].to_numpy(), [0, 1, 2]).all()
