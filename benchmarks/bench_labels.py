"""Time the label tables, the submission reader and ``score`` before and after vectorising.

Run (from the repository root, real labels from ../shared/data):

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_labels.py \
        ../shared/data/rsna/stage_2_train_labels.csv [--repeats 5]

Side by side in one run, each the best of ``--repeats`` calls:

* ``load_label_tables`` on the official tables (26,684 patients, 30,227 rows);
* ``read_submission`` of a submission for every labelled patient (the labels' boxes with
  Gaussian noise plus 0-2 random boxes each; written once to a temporary folder);
* ``score_submission`` of that submission;
* ``score`` as a process: a fresh interpreter that imports the scorer and scores (what
  ``lungopacity score`` costs without the CLI layer), and ``python -m lungopacity.cli
  score`` itself.

"before" is the implementation replaced in issue 16, kept below as the reference: a pandas
group and ``xywh_rows_to_xyxy`` per patient, ``Series.str.strip`` on every cell, one
``parse_prediction_string`` per row, two matchings of the dataset for the two metric
means, and SciPy imported with ``lungopacity.metrics``. The script checks that before and
after give identical tables and scores.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungopacity.constants import CLASS_NAMES, LUNG_OPACITY
from lungopacity.io import rsna, submission
from lungopacity.io.errors import DataFormatError
from lungopacity.io.rsna import (
    CLASS_INFO_COLUMNS,
    CLASS_INFO_CSV,
    LABEL_COLUMNS,
    xywh_rows_to_xyxy,
)
from lungopacity.io.submission import (
    FPPI_POINTS,
    SUBMISSION_COLUMNS,
    parse_prediction_string,
    write_submission,
)
from lungopacity.metrics.rsna_map import (
    RSNA_IOU_THRESHOLDS,
    per_image_precision,
    precision_per_threshold,
    sensitivity_at_fppi,
)

# ------------------------------------------------------------ before: the reference


def old_read_csv(path: Path, required: Iterable[str]) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataFormatError(path, f"missing column(s) {', '.join(missing)}")
    for column in df.columns:
        df[column] = df[column].str.strip()
    return df


def old_read_labels_csv(path: Path) -> pd.DataFrame:
    """read_labels_csv with the pandas strip (the validation is unchanged, so reused)."""
    df = old_read_csv(path, LABEL_COLUMNS)
    out = pd.DataFrame({"patientId": df["patientId"].astype(str)})
    for column in ("x", "y", "width", "height", "Target"):
        out[column] = rsna._numeric(df, column, path)
    out["Target"] = out["Target"].astype(int)
    return out


def old_read_class_info_csv(path: Path) -> pd.DataFrame:
    df = old_read_csv(path, CLASS_INFO_COLUMNS)
    codes = {name: code for code, name in enumerate(CLASS_NAMES)}
    return pd.DataFrame(
        {"patientId": df["patientId"], "class_name": df["class"], "class": df["class"].map(codes).astype(int)}
    )


def old_load_label_tables(labels_csv: Path) -> pd.DataFrame:
    class_info_csv = labels_csv.parent / CLASS_INFO_CSV
    rows = old_read_labels_csv(labels_csv)
    classes = old_read_class_info_csv(class_info_csv)
    per_patient_classes = classes.groupby("patientId", sort=False)["class"].nunique()
    assert not (per_patient_classes > 1).any()
    class_of = classes.drop_duplicates("patientId").set_index("patientId")["class"]
    assert rows["patientId"].isin(class_of.index).all()
    grouped = rows.groupby("patientId", sort=False)
    target = grouped["Target"].max()
    patient_ids = target.index
    cls = class_of.reindex(patient_ids).astype(int)
    assert not ((cls == LUNG_OPACITY) != (target == 1)).any()
    assert not (grouped["Target"].nunique() > 1).any()
    positive_rows = rows[rows["Target"] == 1]
    boxes_by_patient = {
        pid: xywh_rows_to_xyxy(group) for pid, group in positive_rows.groupby("patientId", sort=False)
    }
    empty = np.zeros((0, 4), dtype=np.float32)
    table = pd.DataFrame(
        {"patientId": patient_ids.astype(str), "class": cls.to_numpy(dtype=int), "Target": target.to_numpy(dtype=int)}
    )
    table["boxes"] = [boxes_by_patient.get(pid, empty) for pid in table["patientId"]]
    return table.reset_index(drop=True)


def old_read_submission(path: Path) -> pd.DataFrame:
    ids, boxes, scores, line_of = [], [], [], {}
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lstrip("\ufeff") for h in next(reader)]
        assert all(c in header for c in SUBMISSION_COLUMNS)
        id_col, pred_col = header.index("patientId"), header.index("PredictionString")
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataFormatError(path, f"line {line}: {len(row)} fields, expected {len(header)}")
            pid = row[id_col].strip()
            if not pid:
                raise DataFormatError(path, f"line {line}: empty patientId")
            if pid in line_of:
                raise DataFormatError(path, f"line {line}: patient {pid} already appeared on line {line_of[pid]}")
            try:
                b, s = parse_prediction_string(row[pred_col])
            except ValueError as exc:
                raise DataFormatError(path, f"line {line}: patient {pid}: bad PredictionString: {exc}") from None
            line_of[pid] = line
            ids.append(pid)
            boxes.append(b)
            scores.append(s)
    table = pd.DataFrame({"patientId": pd.Series(ids, dtype=object)})
    table["boxes"] = pd.Series(boxes, dtype=object)
    table["scores"] = pd.Series(scores, dtype=object)
    return table


def old_score_submission(labels_csv: Path, submission_csv: Path) -> dict[str, Any]:
    labels = old_load_label_tables(labels_csv)
    sub = old_read_submission(submission_csv)
    known = set(labels["patientId"])
    assert all(pid in known for pid in sub["patientId"])
    by_id = dict(zip(sub["patientId"], zip(sub["boxes"], sub["scores"])))
    empty = (np.zeros((0, 4)), np.zeros(0))
    predictions = [by_id.get(pid, empty) for pid in labels["patientId"]]
    gt = list(labels["boxes"])
    pred_boxes = [p[0] for p in predictions]
    pred_scores = [p[1] for p in predictions]
    per_image = per_image_precision(gt, pred_boxes, pred_scores)
    counted = ~np.isnan(per_image)
    per_threshold = precision_per_threshold(gt, pred_boxes, pred_scores)
    n_gt_boxes = int(sum(len(b) for b in gt))
    return {
        "rsna_map": float(per_image[counted].mean()) if counted.any() else float("nan"),
        "precision_at_iou": {f"{t:.2f}": float(v) for t, v in zip(RSNA_IOU_THRESHOLDS, per_threshold)},
        "sensitivity_at_fppi": {
            f"{k:g}": v for k, v in sensitivity_at_fppi(gt, pred_boxes, pred_scores, FPPI_POINTS).items()
        },
        "n_patients": int(len(labels)),
        "n_with_opacity": int(sum(len(b) > 0 for b in gt)),
        "n_gt_boxes": n_gt_boxes,
        "n_predicted_boxes": int(sum(len(b) for b in pred_boxes)),
        "n_missing": int(len(labels) - len(sub)),
        "n_scored": int(counted.sum()),
    }


# ------------------------------------------------------------------ the measurement


def noisy_submission(labels: pd.DataFrame, path: Path, seed: int = 0) -> Path:
    """Every labelled patient: its boxes with noise (sd 20 px) plus 0-2 random boxes."""
    rng = np.random.default_rng(seed)
    boxes, scores = [], []
    for truth in labels["boxes"]:
        jittered = truth.astype(np.float64) + rng.normal(0.0, 20.0, truth.shape)
        jittered[:, 2:] = np.maximum(jittered[:, 2:], jittered[:, :2] + 1.0)
        n_extra = int(rng.integers(0, 3))
        corners = rng.uniform(0.0, 700.0, (n_extra, 2))
        extra = np.concatenate([corners, corners + rng.uniform(50.0, 300.0, (n_extra, 2))], axis=1)
        predicted = np.concatenate([jittered, extra])
        boxes.append(predicted)
        scores.append(rng.random(len(predicted)))
    return write_submission(path, labels["patientId"], boxes, scores, decimals=2)


def best_time(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def same_tables(a: pd.DataFrame, b: pd.DataFrame, columns: Iterable[str]) -> bool:
    if list(a["patientId"]) != list(b["patientId"]):
        return False
    for column in columns:
        for x, y in zip(a[column], b[column]):
            if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
                return False
    return True


PROCESS_CODE = {
    # The old package imported SciPy with lungopacity.metrics (classification statistics).
    "before": "import lungopacity.metrics.classification, sys; sys.path.insert(0, 'benchmarks'); "
              "import bench_labels as b; from pathlib import Path; "
              "print(b.old_score_submission(Path(sys.argv[1]), Path(sys.argv[2]))['rsna_map'])",
    "after": "import sys; from lungopacity.io.submission import score_submission; "
             "print(score_submission(sys.argv[1], sys.argv[2])['rsna_map'])",
}


def process_time(args: list[str], repeats: int) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        best = min(best, time.perf_counter() - start)
        out = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels_csv", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--process-repeats", type=int, default=3)
    args = parser.parse_args()

    rows: list[tuple[str, float, float]] = []
    new_labels = rsna.load_label_tables(args.labels_csv)
    with tempfile.TemporaryDirectory() as tmp:
        sub_csv = noisy_submission(new_labels, Path(tmp) / "submission.csv")
        print(f"{len(new_labels)} patients, {int(new_labels['boxes'].map(len).sum())} GT boxes; "
              f"submission {sub_csv.stat().st_size / 1e6:.1f} MB")

        t_old, old_labels = best_time(lambda: old_load_label_tables(args.labels_csv), args.repeats)
        t_new, new_labels = best_time(lambda: rsna.load_label_tables(args.labels_csv), args.repeats)
        assert same_tables(old_labels, new_labels, ["boxes"]), "label tables differ"
        assert (old_labels[["class", "Target"]].to_numpy() == new_labels[["class", "Target"]].to_numpy()).all()
        rows.append(("load_label_tables (official tables)", t_old, t_new))

        t_old, old_sub = best_time(lambda: old_read_submission(sub_csv), args.repeats)
        t_new, new_sub = best_time(lambda: submission.read_submission(sub_csv), args.repeats)
        assert same_tables(old_sub, new_sub, ["boxes", "scores"]), "submission tables differ"
        rows.append(("read_submission", t_old, t_new))

        t_old, old_score = best_time(lambda: old_score_submission(args.labels_csv, sub_csv), args.repeats)
        t_new, new_score = best_time(lambda: submission.score_submission(args.labels_csv, sub_csv), args.repeats)
        assert old_score == new_score, (old_score, new_score)
        rows.append(("score_submission (in process)", t_old, t_new))

        python = sys.executable
        files = [str(args.labels_csv), str(sub_csv)]
        t_old, out_old = process_time([python, "-c", PROCESS_CODE["before"], *files], args.process_repeats)
        t_new, out_new = process_time([python, "-c", PROCESS_CODE["after"], *files], args.process_repeats)
        assert out_old == out_new, (out_old, out_new)
        rows.append(("score as a process (import + score)", t_old, t_new))
        t_cli, _ = process_time([python, "-m", "lungopacity.cli", "score", *files], 1)

    print(f"\n{'step':40s} {'before s':>9s} {'after s':>9s} {'speed-up':>9s}")
    for name, before, after in rows:
        print(f"{name:40s} {before:9.3f} {after:9.3f} {before / after:8.1f}x")
    print(f"{'python -m lungopacity.cli score (after)':40s} {'':9s} {t_cli:9.3f}")
    print(f"\nRSNA metric {new_score['rsna_map']:.6f} (before and after identical: scores, tables, boxes)")


if __name__ == "__main__":
    main()
