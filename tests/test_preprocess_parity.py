"""One preprocessing path: the tensor a network sees in training equals the one it sees in serving.

The same file goes through the training path (``prepare`` into a cache, the cache
dataset and collate of the training loops, then ``network_input``) and the serving path
(``Predictor.load`` then the predictor's network input); the tensors must be identical
bit for bit on the CPU, for a JPEG-Baseline DICOM (decoded at a reduced scale by both)
and a PNG, with a network input size equal to and different from the prepared size.
A second resize or decode path on either side breaks these tests.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from lungopacity.data.cache import PreparedCache, prepare_cache
from lungopacity.data.datasets import CacheDataset, collate_samples
from lungopacity.data.preprocess import network_input
from lungopacity.inference import Predictor
from lungopacity.io import read_image

SRC = Path(__file__).resolve().parents[1] / "src" / "lungopacity"


def _training_tensors(cache: PreparedCache, input_size: int) -> dict[str, torch.Tensor]:
    """What the training loops feed the network, keyed by patientId (no augmentation)."""
    positions = cache.indices()
    loader = DataLoader(CacheDataset(cache, positions), batch_size=4, shuffle=False, collate_fn=collate_samples)
    out: dict[str, torch.Tensor] = {}
    ids = cache.table["patientId"].to_numpy()
    for batch in loader:
        x = network_input(batch["image"], size=input_size, device="cpu", channels_last=True)
        for position, tensor in zip(batch["position"].tolist(), x):
            out[str(ids[position])] = tensor
    return out


def _bundle_with_input_size(source: Path, dest: Path, input_size: int) -> Path:
    shutil.copytree(source, dest)
    manifest = json.loads((dest / "bundle.json").read_text())
    manifest["classifier"]["preprocessing"]["input_size"] = input_size
    (dest / "bundle.json").write_text(json.dumps(manifest))
    return dest


def _png_dataset(demo_data: Path, out: Path, n: int = 6) -> Path:
    """The first ``n`` demo patients again, as PNG files in the RSNA images/ layout."""
    from PIL import Image

    labels = pd.read_csv(demo_data / "stage_2_train_labels.csv")
    classes = pd.read_csv(demo_data / "stage_2_detailed_class_info.csv")
    ids = sorted(labels["patientId"].unique())[:n]
    (out / "images").mkdir(parents=True)
    for pid in ids:
        pixels, _ = read_image(demo_data / "stage_2_train_images" / f"{pid}.dcm")
        Image.fromarray(np.rint(pixels * 65535).astype(np.uint16)).save(out / "images" / f"{pid}.png")
    labels[labels["patientId"].isin(ids)].to_csv(out / "stage_2_train_labels.csv", index=False)
    classes[classes["patientId"].isin(ids)].to_csv(out / "stage_2_detailed_class_info.csv", index=False)
    pd.DataFrame({"patientId": ids, "PatientAge": 50, "PatientSex": "F", "ViewPosition": "PA"}).to_csv(
        out / "metadata.csv", index=False
    )
    return out


@pytest.mark.parametrize("input_size", [None, 96])
def test_dicom_training_and_serving_tensors_are_identical(tiny_demo, tmp_path: Path, input_size: int | None) -> None:
    paths = tiny_demo.paths
    cache = PreparedCache(paths["cache"])
    size = input_size or cache.size
    bundle = _bundle_with_input_size(paths["model"], tmp_path / "model", size)
    predictor = Predictor.from_bundle(bundle)
    assert predictor.classifier_preprocessing.prepared_size == cache.size
    trained = _training_tensors(cache, size)
    checked = 0
    for pid, path in list(zip(cache.table["patientId"], cache.table["path"]))[:8]:
        served = predictor.classifier_input([predictor.load(path)])[0]
        assert served.shape == (1, size, size)
        assert torch.equal(served, trained[pid]), pid
        checked += 1
    assert checked == 8


def test_png_training_and_serving_tensors_are_identical(tiny_demo, tmp_path: Path) -> None:
    data = _png_dataset(tiny_demo.paths["data"], tmp_path / "png-data")
    cache_dir = tmp_path / "png-cache"
    prepare_cache(data, cache_dir, size=64, workers=1, folds=2, val_fraction=0.34)
    cache = PreparedCache(cache_dir)
    bundle = _bundle_with_input_size(tiny_demo.paths["model"], tmp_path / "model", 80)
    predictor = Predictor.from_bundle(bundle)
    trained = _training_tensors(cache, 80)
    for pid, path in zip(cache.table["patientId"], cache.table["path"]):
        assert Path(path).suffix == ".png"
        served = predictor.classifier_input([predictor.load(path)])[0]
        assert torch.equal(served, trained[pid]), pid


# Where resizing is allowed: the network input (data/preprocess.py) and pictures for people.
RESIZE_ALLOWED = {
    "data/preprocess.py",  # the one path to network input
    "inference/gradcam.py",  # upsampling a heatmap to the image for display
    "inference/predictor.py",  # display pictures (never network input)
}
#: Folders whose resizing is never network input: readers (reduced-scale JPEG decoding),
#: phantoms (drawn at any size), reports (pictures for people).
RESIZE_ALLOWED_FOLDERS = ("io/", "synthetic/", "reports/")


def _resize_calls(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("interpolate", "resize", "draft", "upsample", "resized_crop"):
                lines.append(node.lineno)
    return lines


def test_no_second_resize_path() -> None:
    """A resize outside the allowed places is a second path from pixels to network input."""
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative in RESIZE_ALLOWED or relative.startswith(RESIZE_ALLOWED_FOLDERS):
            continue
        calls = _resize_calls(path)
        if calls:
            offenders[relative] = calls
    assert not offenders, f"resize calls outside data/preprocess.py: {offenders}"
