"""Batch prediction to a folder: what ``lungopacity predict`` does.

Writes ``predictions.csv``, ``predictions.json``, the challenge's ``submission.csv``,
``errors.csv`` (one row per file that could not be read, with the reason) and, per
image, ``overlays/<id>.png`` (boxes and scores over the image) and
``overlays/<id>_heatmap.png`` (Grad-CAM of the Lung Opacity class).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lungopacity.inference.predictor import Predictor
from lungopacity.io.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


def expand_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (their image files, recursively) and glob patterns -> sorted unique files.

    Returns the files and (input, reason) for inputs that match nothing.
    """
    files: list[Path] = []
    unmatched: list[tuple[str, str]] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                unmatched.append((text, "folder holds no DICOM, PNG, JPEG or TIFF files"))
            files.extend(found)
        elif path.is_file():
            files.append(path)  # an explicit file is tried whatever its extension: content decides
        elif any(ch in text for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                unmatched.append((text, "pattern matches no file"))
            files.extend(found)
        else:
            unmatched.append((text, "file not found"))
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique, unmatched


def read_metadata_overrides(path: str | Path) -> dict[str, dict[str, Any]]:
    """A metadata CSV for non-DICOM inputs: ``id`` (or ``patientId``) and any of sex, age, view.

    RSNA's ``metadata.csv`` column names (PatientSex, PatientAge, ViewPosition) work too.
    """
    from lungopacity.io.errors import DataFormatError

    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, "file not found")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    renames = {"patientId": "id", "PatientSex": "sex", "PatientAge": "age", "ViewPosition": "view"}
    table = table.rename(columns={k: v for k, v in renames.items() if k in table.columns})
    if "id" not in table.columns:
        raise DataFormatError(path, f"needs an 'id' or 'patientId' column (found {', '.join(table.columns)})")
    fields = [c for c in ("sex", "age", "view") if c in table.columns]
    if not fields:
        raise DataFormatError(path, "needs at least one of the columns sex, age, view")
    return {
        row["id"]: {k: (row[k] if row[k] != "" else None) for k in fields}
        for row in table.to_dict("records")
    }


@dataclass
class BatchResult:
    out_dir: Path
    n_predicted: int
    n_errors: int
    n_positive: int


def predict_to_folder(
    predictor: Predictor,
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    metadata_csv: str | Path | None = None,
    sex: str | None = None,
    age: float | None = None,
    view: str | None = None,
    batch_size: int = 16,
    with_images: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> BatchResult:
    """Predict every input and write the result files (see the module docstring)."""
    from lungopacity.io.submission import write_submission

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, errors = expand_inputs(inputs)
    overrides = read_metadata_overrides(metadata_csv) if metadata_csv else {}
    defaults = {k: v for k, v in (("sex", sex), ("age", age), ("view", view)) if v is not None}
    if defaults:
        # Options apply to every image; a metadata CSV row for an image wins over them.
        overrides = {f.stem: {**defaults, **overrides.get(f.stem, {})} for f in files}
    readings, read_errors = predictor.predict_paths(
        files, metadata=overrides, batch_size=batch_size, with_images=with_images, progress=progress
    )
    errors.extend(read_errors)

    predictions = [r.prediction for r in readings]
    pd.DataFrame([p.csv_row() for p in predictions]).to_csv(out_dir / "predictions.csv", index=False)
    (out_dir / "predictions.json").write_text(json.dumps([p.to_dict() for p in predictions], indent=2))
    write_submission(
        out_dir / "submission.csv",
        [p.id for p in predictions],
        [[[b.x1, b.y1, b.x2, b.y2] for b in p.boxes] for p in predictions],
        [[b.score for b in p.boxes] for p in predictions],
        decimals=4,
    )
    with open(out_dir / "errors.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "error"])
        writer.writerows(errors)
    if with_images:
        overlays = out_dir / "overlays"
        overlays.mkdir(exist_ok=True)
        for reading in readings:
            if reading.overlay_png:
                (overlays / f"{reading.prediction.id}.png").write_bytes(reading.overlay_png)
            if reading.heatmap_png:
                (overlays / f"{reading.prediction.id}_heatmap.png").write_bytes(reading.heatmap_png)
    result = BatchResult(out_dir, len(predictions), len(errors), sum(p.decision for p in predictions))
    log.info("predicted %d images (%d positive), %d errors -> %s", result.n_predicted, result.n_positive, result.n_errors, out_dir)
    return result
