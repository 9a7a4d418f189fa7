"""Detector training engine, box mapping, evaluation report and overlays."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lungopacity.data.cache import PreparedCache, prepare_cache
from lungopacity.data.transforms import BatchAugment
from lungopacity.engine.checkpoint import load_checkpoint
from lungopacity.engine.detector import (
    DetectorTrainConfig,
    detection_losses,
    gt_boxes,
    load_detector_run,
    predict_boxes,
    prepare_detection_batch,
    train_detector,
)
from lungopacity.engine.evaluate_detection import evaluate_detector, read_opacity_probabilities
from lungopacity.io.errors import DataFormatError
from lungopacity.io.submission import read_submission
from lungopacity.models.detector import create_detector
from lungopacity.reports.detection import metrics_by_view, select_cases
from lungopacity.reports.overlays import (
    GT_COLOR,
    PRED_COLOR,
    contact_sheet,
    overlay_png,
    read_png,
    to_rgb_uint8,
)
from lungopacity.synthetic import write_demo_dataset

TINY_BACKBONE = "test_efficientnet"  # timm's 82k-parameter test network


@pytest.fixture(autouse=True)
def one_cpu_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions on a shared 2-core machine
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_demo_dataset(root / "data", n=20, size=128, seed=0)
    prepare_cache(root / "data", root / "cache", size=64, workers=1)
    return root / "cache"


def tiny_config(**overrides) -> DetectorTrainConfig:
    settings = dict(backbone=TINY_BACKBONE, fpn_channels=16, epochs=2, batch_size=4, max_steps_per_epoch=2,
                    eval_batch_size=8, score_thresh=0.001, device="cpu", seed=1)
    settings.update(overrides)
    return DetectorTrainConfig(**settings)


# ------------------------------------------------------------------ training step


def _batch(boxes: list[torch.Tensor], size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(boxes), 1, size, size), dtype=torch.uint8, generator=generator)
    return {"image": images, "boxes": boxes}


def test_a_batch_of_negatives_gives_zero_box_loss():
    model = create_detector("retinanet", TINY_BACKBONE, image_size=64, fpn_channels=16).train()
    augment = BatchAugment(seed=0)
    images, targets = prepare_detection_batch(_batch([torch.zeros((0, 4))] * 3), torch.device("cpu"), augment)
    assert [tuple(i.shape) for i in images] == [(1, 64, 64)] * 3
    assert all(t["labels"].dtype == torch.int64 and len(t["boxes"]) == 0 for t in targets)
    losses = detection_losses(model, images, targets)
    assert losses["bbox_regression"].item() == 0.0
    assert losses["classification"].item() > 0.0
    assert losses["total"].item() == pytest.approx(losses["classification"].item())
    losses["total"].backward()  # negatives still train the classification head

    positive = [torch.tensor([[10.0, 12.0, 40.0, 50.0]]), torch.zeros((0, 4))]
    images, targets = prepare_detection_batch(_batch(positive), torch.device("cpu"), None)
    assert targets[0]["labels"].tolist() == [1]
    assert detection_losses(model, images, targets)["bbox_regression"].item() > 0.0


def test_augmentation_moves_the_target_boxes_with_the_pixels():
    image = torch.zeros((1, 1, 64, 64), dtype=torch.uint8)
    image[0, 0, 20:40, 10:30] = 255
    batch = {"image": image, "boxes": [torch.tensor([[10.0, 20.0, 30.0, 40.0]])]}
    images, targets = prepare_detection_batch(batch, torch.device("cpu"), BatchAugment(seed=3))
    bright = torch.nonzero(images[0][0] > 0.5)
    box = targets[0]["boxes"][0]
    # The bright square after the affine map lies inside its moved box (within a pixel of blur).
    assert bright[:, 1].min() >= box[0] - 1 and bright[:, 1].max() <= box[2] + 1
    assert bright[:, 0].min() >= box[1] - 1 and bright[:, 0].max() <= box[3] + 1


# ------------------------------------------------------------------ box mapping


def test_boxes_round_trip_original_prepared_original(tmp_path):
    write_demo_dataset(tmp_path / "data", n=6, size=1024, seed=3)
    prepare_cache(tmp_path / "data", tmp_path / "cache", size=256, workers=1)
    cache = PreparedCache(tmp_path / "cache")
    assert cache.size == 256
    positions = cache.indices()
    n_boxes = 0
    for i in positions:
        original = cache.table["boxes"].iat[i]
        prepared = cache.boxes_prepared(i)
        np.testing.assert_allclose(prepared, original / 4.0, atol=1e-3)
        np.testing.assert_allclose(cache.boxes_to_original(prepared, i), original, atol=1.0)
        n_boxes += len(original)
    assert n_boxes > 0


class BrightRegionDetector(torch.nn.Module):
    """Eval-mode stand-in for a detector: one box around the pixels brighter than 0.5."""

    def forward(self, images):
        out = []
        for image in images:
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            if len(xs) == 0:
                out.append({"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0)})
                continue
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
            out.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return out


def _rectangle_folder(folder, height: int, width: int, boxes: dict[str, list[float] | None]) -> None:
    images = folder / "images"
    images.mkdir(parents=True)
    label_rows, class_rows = ["patientId,x,y,width,height,Target"], ["patientId,class"]
    for pid, box in boxes.items():
        pixels = np.full((height, width), 40, dtype=np.uint8)
        if box is None:
            label_rows.append(f"{pid},,,,,0")
            class_rows.append(f"{pid},Normal")
        else:
            x, y, w, h = box
            pixels[int(y): int(y + h), int(x): int(x + w)] = 255
            label_rows.append(f"{pid},{x},{y},{w},{h},1")
            class_rows.append(f"{pid},Lung Opacity")
        Image.fromarray(pixels).save(images / f"{pid}.png")
    (folder / "stage_2_train_labels.csv").write_text("\n".join(label_rows) + "\n")
    (folder / "stage_2_detailed_class_info.csv").write_text("\n".join(class_rows) + "\n")


def test_predicted_boxes_come_back_in_original_pixels(tmp_path):
    # Non-square originals (1000 high, 800 wide) resized to 256 x 256: x and y scale differently.
    truth = {"wide": [80.0, 600.0, 400.0, 200.0], "tall": [480.0, 100.0, 160.0, 720.0], "none": None}
    _rectangle_folder(tmp_path / "data", 1000, 800, truth)
    prepare_cache(tmp_path / "data", tmp_path / "cache", size=256, workers=1)
    cache = PreparedCache(tmp_path / "cache")
    positions = cache.indices()
    predictions = predict_boxes(BrightRegionDetector(), cache, positions, batch_size=2)
    assert predictions.patient_ids == cache.table["patientId"].tolist()
    one_pixel = np.array([800 / 256, 1000 / 256] * 2)  # a prepared pixel, in original pixels
    for pid, boxes, scores, expected in zip(predictions.patient_ids, predictions.boxes, predictions.scores,
                                            gt_boxes(cache, positions)):
        if truth[pid] is None:
            assert boxes.shape == (0, 4) and scores.shape == (0,)
            continue
        x, y, w, h = truth[pid]
        np.testing.assert_allclose(expected, [[x, y, x + w, y + h]])
        assert np.all(np.abs(boxes[0] - expected[0]) <= one_pixel)

    mirrored = predict_boxes(BrightRegionDetector(), cache, positions, batch_size=3, hflip_tta=True)
    assert mirrored.n_sets == 2
    for boxes, plain in zip(mirrored.boxes, predictions.boxes):
        assert len(boxes) == 2 * len(plain)
        for box in boxes:  # the mirrored pass maps back onto the plain detection exactly
            np.testing.assert_allclose(box, plain[0], atol=1e-4)


# --------------------------------------------------------------- training runs


class Interrupted(Exception):
    pass


class StopAtEpoch:
    """Progress that kills the run when the given epoch starts (like Ctrl-C)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def start(self, description: str, total: int) -> None:
        if description.startswith(f"detector epoch {self.epoch}/"):
            raise Interrupted(description)

    def update(self, n: int = 1, **postfix) -> None:
        pass

    def close(self) -> None:
        pass


def test_train_detector_writes_checkpoints_and_resumes_exactly(tmp_path, tiny_cache):
    config = tiny_config()
    whole = train_detector(tiny_cache, tmp_path / "whole", config)
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "postprocess.json", "val_predictions.csv",
                 "postprocess_grid.csv"):
        assert (tmp_path / "whole" / name).exists(), name
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and "val_rsna_map" in r for r in records)
    assert whole.epochs_run == 2 and whole.best_epoch in (1, 2)
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert saved["kind"] == "detector" and saved["model"]["backbone"] == TINY_BACKBONE
    with pytest.raises(FileExistsError):
        train_detector(tiny_cache, tmp_path / "whole", config)

    with pytest.raises(Interrupted):
        train_detector(tiny_cache, tmp_path / "resumed", config, progress=StopAtEpoch(2))
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "resumed" / "postprocess.json").exists()
    train_detector(tiny_cache, tmp_path / "resumed", resume=True)

    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    resumed_records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in resumed_records] == [r["train_loss"] for r in records]
    # The uninterrupted run reuses its best epoch's detections, the resumed one predicts
    # again with best.pt: the same files either way.
    for name in ("val_predictions.csv", "postprocess.json"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "resumed" / name).read_text(), name

    run = load_detector_run(tmp_path / "whole")
    assert not run.model.training
    assert run.postprocess == whole.postprocess


def test_evaluate_detector_writes_report_submission_and_gating(tmp_path, tiny_cache):
    train_detector(tiny_cache, tmp_path / "run", tiny_config(epochs=1))
    cache = PreparedCache(tiny_cache)
    val = cache.table.iloc[cache.indices("val")]
    probs = pd.DataFrame({"patientId": val["patientId"], "p_lung_opacity": np.where(val["Target"] == 1, 0.8, 0.1)})
    probs.to_csv(tmp_path / "probs.csv", index=False)
    report = evaluate_detector(tmp_path / "run", tiny_cache, "val", tmp_path / "report", tmp_path / "probs.csv",
                               device="cpu", n_cases=4)
    out = tmp_path / "report"
    assert report["main_variant"] == "gated"
    assert set(report["variants"]) == {"stored", "tuned", "gated"}
    assert report["n_patients"] == len(val) and report["n_positive"] >= 1
    for name in ("report.md", "report.json", "submission.csv", "submission_stored.csv", "submission_tuned.csv",
                 "per_patient.csv", "worst_cases.png", "best_cases.png"):
        assert (out / name).exists(), name
    assert set(json.loads((out / "report.json").read_text())["by_view"]) <= {"AP", "PA", "unknown"}
    submission = read_submission(out / "submission.csv")
    assert submission["patientId"].tolist() == val["patientId"].tolist()
    assert "## By view" in (out / "report.md").read_text()

    probs.iloc[1:].to_csv(tmp_path / "partial.csv", index=False)
    with pytest.raises(DataFormatError, match="has no p_lung_opacity for 1 of"):
        read_opacity_probabilities(tmp_path / "partial.csv", val["patientId"].tolist())


# --------------------------------------------------------------- report helpers


def test_select_cases_and_metrics_by_view():
    per_image = np.array([np.nan, 0.2, 1.0, 0.0, 0.5])
    best, worst = select_cases(per_image, np.array([0, 1, 2, 0, 1]), np.array([0, 1, 2, 3, 1]), 3)
    np.testing.assert_array_equal(best, [2, 4])  # positives only, best first; half of the 4 scored
    np.testing.assert_array_equal(worst, [3, 1])  # never a patient of the best sheet
    box = np.array([[0.0, 0.0, 100.0, 100.0]])
    by_view = metrics_by_view(["AP", "PA", None], [box, box, box], [box, np.zeros((0, 4)), box],
                              [np.array([0.9]), np.zeros(0), np.array([0.5])])
    assert by_view["AP"]["rsna_map"] == 1.0 and by_view["PA"]["rsna_map"] == 0.0
    assert by_view["unknown"]["n_patients"] == 1


# ---------------------------------------------------------------------- overlays


def test_overlay_png_has_the_image_size_and_both_colours():
    rng = np.random.default_rng(0)
    pixels = rng.random((100, 150)).astype(np.float32)
    png = overlay_png(pixels, [[10, 10, 60, 80]], [[70, 20, 140, 90]], [0.87], title="patient 0.50")
    drawn = read_png(png)
    assert drawn.shape == (100, 150, 3)
    assert (drawn == GT_COLOR).all(axis=2).any()
    assert (drawn == PRED_COLOR).all(axis=2).any()
    # Original-pixel boxes drawn over a smaller image: scale moves them.
    scaled = read_png(overlay_png(pixels, [[20, 20, 120, 160]], None, scale=0.5, legend=False))
    assert (scaled[10:81, 10] == GT_COLOR).all() and not (scaled[:, 100:] == GT_COLOR).all(axis=2).any()
    # No boxes, no title, no legend: the picture is the image itself.
    untouched = read_png(overlay_png(pixels, None, None))
    np.testing.assert_array_equal(untouched, to_rgb_uint8(pixels))


def test_contact_sheet_layout():
    tiles = [np.zeros((50, 50)), np.ones((40, 20)), overlay_png(np.zeros((30, 30)), None, None)]
    sheet = read_png(contact_sheet(tiles, columns=2, cell_size=50, gap=4))
    assert sheet.shape == (2 * 50 + 3 * 4, 2 * 50 + 3 * 4, 3)
    assert (sheet[4:54, 4:54] == 0).all()  # first tile, black
    assert (sheet[4:54, 58 + 12: 58 + 37] == 255).all()  # second, white, fitted to 50 high and centred


# The heatmap's colours and blending: tests/test_overlays.py.


# --------------------------------------------------------------------- run folders


def test_detector_run_folder_reads_back_typed(tmp_path, tiny_cache):
    from lungopacity.engine.runs import DetectorRun, load_classifier_run
    from lungopacity.errors import CheckpointError, RunFolderError

    config = tiny_config(epochs=1)
    train_detector(tiny_cache, tmp_path / "run", config)
    run = load_detector_run(tmp_path / "run")
    assert isinstance(run, DetectorRun) and run.train == config
    cache = PreparedCache(tiny_cache)
    assert run.cache.size == 64 and run.cache.matches(cache)
    assert (run.input_size, run.image_size) == (64, 64)
    assert run.n_train == len(cache.indices("train")) and run.n_val == len(cache.indices("val"))
    assert run.model_config["backbone"] == TINY_BACKBONE and not run.model.training
    assert run.postprocess == load_detector_run(tmp_path / "run").postprocess
    assert run.best_checkpoint == tmp_path / "run" / "best.pt"

    with pytest.raises(RunFolderError, match="not a classifier run \\(its config.json is for a 'detector' run\\)"):
        load_classifier_run(tmp_path / "run")
    (tmp_path / "run" / "best.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="best.pt: damaged or truncated"):
        load_detector_run(tmp_path / "run").load_model()
    (tmp_path / "run" / "best.pt").unlink()
    with pytest.raises(RunFolderError, match="best.pt: missing; the run has not finished an epoch"):
        load_detector_run(tmp_path / "run")
