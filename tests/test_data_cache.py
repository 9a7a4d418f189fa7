"""The prepared-image cache and the demo-data round trip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lungopacity.data.cache import DONE, PreparedCache, prepare_cache, prepare_one
from lungopacity.io import DataFormatError
from lungopacity.io.rsna import load_rsna
from lungopacity.synthetic import write_demo_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    write_demo_dataset(out, n=40, size=256, seed=3)
    return out


def test_demo_data_round_trip_keeps_labels_boxes_and_metadata(demo_dir: Path) -> None:
    import pandas as pd

    table = load_rsna(demo_dir)
    assert len(table) == 40 and table.attrs["load_report"].metadata_source == "DICOM headers"
    labels = pd.read_csv(demo_dir / "stage_2_train_labels.csv")
    classes = pd.read_csv(demo_dir / "stage_2_detailed_class_info.csv").drop_duplicates("patientId")
    class_code = {"Normal": 0, "No Lung Opacity / Not Normal": 1, "Lung Opacity": 2}
    expected_class = classes.set_index("patientId")["class"].map(class_code)
    for _, row in table.iterrows():
        rows = labels[labels["patientId"] == row["patientId"]].dropna()
        expected = np.stack([rows.x, rows.y, rows.x + rows.width, rows.y + rows.height], 1) if len(rows) else np.zeros((0, 4))
        np.testing.assert_allclose(row["boxes"], expected, atol=1e-3)
        assert row["Target"] == int(len(rows) > 0)
        assert row["class"] == expected_class[row["patientId"]]
        assert row["sex"] in ("M", "F") and row["view"] in ("AP", "PA") and 0 < row["age"] <= 100


def test_prepare_writes_every_image_and_maps_boxes(demo_dir: Path, tmp_path: Path) -> None:
    result = prepare_cache(demo_dir, tmp_path / "cache", size=64, workers=2, chunk_size=4)
    assert (result.n_total, result.n_prepared, result.n_failed) == (40, 40, 0)
    cache = PreparedCache(tmp_path / "cache")
    assert cache.complete and cache.images.shape == (40, 64, 64) and len(cache.indices()) == 40
    for i in range(len(cache)):
        np.testing.assert_array_equal(cache.image(i), prepare_one(cache.table["path"].iat[i], 64))
        boxes = cache.table["boxes"].iat[i]
        np.testing.assert_allclose(cache.boxes_to_original(cache.boxes_prepared(i), i), boxes, atol=1e-3)
    assert set(cache.table["split"]) == {"train", "val"}
    again = prepare_cache(demo_dir, tmp_path / "cache", size=64, workers=2)
    assert (again.n_prepared, again.n_skipped) == (0, 40)


def test_a_dataset_sample_owns_its_pixels(demo_dir: Path, tmp_path: Path) -> None:
    # Regression: samples shared the read-only memmap (PyTorch warned of a non-writable array),
    # so an in-place transform would have written into, or faulted on, the prepared images.
    from lungopacity.data.datasets import CacheDataset

    prepare_cache(demo_dir, tmp_path / "cache", size=32, workers=1)
    cache = PreparedCache(tmp_path / "cache")
    dataset = CacheDataset(cache, cache.indices())
    before = np.array(cache.images[dataset.rows[0]])
    for sample in (dataset[0], dataset.__getitems__([0, 1])[0]):
        image = sample["image"]
        assert image.dtype == torch.uint8 and image.shape == (1, 32, 32)
        np.testing.assert_array_equal(image[0].numpy(), before)
        pixels = image.numpy()
        assert pixels.flags.writeable and not np.shares_memory(pixels, cache.images)


def test_prepare_reports_a_corrupt_file_and_goes_on(demo_dir: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    victim = sorted((data / "stage_2_train_images").glob("*.dcm"))[5]
    victim.write_bytes(victim.read_bytes()[:300])
    result = prepare_cache(data, tmp_path / "cache", size=32, workers=1)
    assert result.n_failed == 1 and result.n_prepared == 39
    errors = (tmp_path / "cache" / "errors.csv").read_text().splitlines()
    assert len(errors) == 2 and victim.stem in errors[1]
    assert "truncated" in errors[1]
    cache = PreparedCache(tmp_path / "cache")
    assert victim.stem not in set(cache.table["patientId"].iloc[cache.indices()])


def test_prepare_refuses_a_cache_made_with_other_settings(demo_dir: Path, tmp_path: Path) -> None:
    prepare_cache(demo_dir, tmp_path / "cache", size=32, workers=1)
    with pytest.raises(DataFormatError, match="other settings"):
        prepare_cache(demo_dir, tmp_path / "cache", size=48, workers=1)


def test_prepare_resumes_after_being_killed(demo_dir: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    prepare_cache(demo_dir, reference, size=128, workers=1)
    cache_dir = tmp_path / "killed"
    # Slow every image down in the child so the kill lands mid-run.
    script = (
        "import time, lungopacity.data.cache as c\n"
        "orig = c.prepare_one\n"
        "def slow(path, size, window='none'):\n    time.sleep(0.15)\n    return orig(path, size, window)\n"
        "c.prepare_one = slow\n"
        f"c.prepare_cache({str(demo_dir)!r}, {str(cache_dir)!r}, size=128, workers=1, chunk_size=2)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.time() + 120
    status_path = cache_dir / "status.npy"
    while time.time() < deadline:
        if status_path.exists():
            done = int((np.load(status_path) == DONE).sum())
            if 6 <= done < 40:
                break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done_before = int((np.load(status_path) == DONE).sum())
    assert 0 < done_before < 40, "the kill did not land mid-run"
    assert json.loads((cache_dir / "meta.json").read_text())["state"] == "in-progress"

    result = prepare_cache(demo_dir, cache_dir, size=128, workers=1)
    assert result.n_skipped == done_before and result.n_prepared == 40 - done_before
    np.testing.assert_array_equal(np.load(cache_dir / "images.npy"), np.load(reference / "images.npy"))
    assert PreparedCache(cache_dir).complete


def test_prepare_the_shared_real_images(rsna_dir: Path, tmp_path: Path) -> None:
    result = prepare_cache(rsna_dir, tmp_path / "cache", size=64, workers=2)
    assert (result.n_total, result.n_failed) == (600, 0)
    cache = PreparedCache(tmp_path / "cache")
    assert len(cache) == 600 and cache.complete
    assert cache.table[["sex", "age", "view"]].notna().all().all()
    assert int(cache.table["boxes"].map(len).sum()) == 250
