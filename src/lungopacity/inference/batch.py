"""Batch prediction to a folder: what ``lungopacity predict`` does. It never loses work.

Results are written as each batch finishes, so a run that is killed (or runs out of
memory) keeps everything it finished, and running the same command again with the same
``--out`` continues where it stopped: files already predicted, or already recorded as
unreadable, are skipped. A file that cannot be read or predicted is recorded with its
reason and the batch goes on; it never becomes a finding.

The output folder:

* ``journal.jsonl`` — one JSON line per finished file (``{"input", "prediction"}`` or
  ``{"input", "error"}``), appended and synced after every batch: the record from which
  the other files are made;
* ``predictions.csv``, ``submission.csv`` (the challenge's format), ``errors.csv``
  (``input,error``) — appended after every batch;
* ``predictions.json`` — every prediction, written when the run ends;
* ``coco.json`` (with ``coco``) — the predicted boxes as a COCO dataset (annotations with
  ``score`` = ``box_confidence``) for detection tools (FiftyOne, CVAT, pycocotools), written
  when the run ends;
* ``overlays/<id>.png`` and ``overlays/<id>_heatmap.png`` — the pictures, per image;
* ``predict_run.json`` — the bundle and options of the run: a rerun into the same folder
  with another bundle or other options is refused (``overwrite`` starts afresh);
* with ``dicom_out``, ``<dicom_out>/<id>/SR.dcm``, ``GSPS.dcm``, ``SC.dcm`` for every DICOM
  input (:mod:`lungopacity.inference.dicom_output`), written before the batch is journaled;
  PNG/JPEG inputs get none (a log line says so).

Ids are the file name without extension; where two inputs share it, the name with its
extension, then the parent folder's name joined with ``_``, then a short hash of the
path — always flat (no ``/``), so the overlay names are too.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lungopacity.errors import ConfigError, DataFormatError
from lungopacity.inference.metadata import METADATA_FIELDS, parse_given, parse_given_fields
from lungopacity.inference.predictor import Predictor
from lungopacity.inference.schemas import Prediction
from lungopacity.io.images import IMAGE_EXTENSIONS
from lungopacity.io.submission import SUBMISSION_COLUMNS, format_prediction_string

log = logging.getLogger(__name__)

JOURNAL_FILE, RUN_FILE = "journal.jsonl", "predict_run.json"
PREDICTIONS_CSV, PREDICTIONS_JSON, SUBMISSION_CSV, ERRORS_CSV, COCO_JSON = (
    "predictions.csv", "predictions.json", "submission.csv", "errors.csv", "coco.json",
)
OVERLAY_DIR = "overlays"
RESULT_FILES = (JOURNAL_FILE, RUN_FILE, PREDICTIONS_CSV, PREDICTIONS_JSON, SUBMISSION_CSV, ERRORS_CSV, COCO_JSON)


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
    """A metadata CSV for inputs without a header: ``id`` (or ``patientId``) and any of sex, age, view.

    RSNA's ``metadata.csv`` column names (PatientSex, PatientAge, ViewPosition) work too.
    Every value is checked (sex M/F, age 0-120 years, view AP/PA; empty means unknown).

    Raises:
        DataFormatError: the file is missing, empty, not a CSV, lacks the columns, or
            has a bad value (``file:line``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise DataFormatError(path, "the file is empty; it needs a header row with id and sex, age or view") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataFormatError(path, f"not a readable CSV table ({type(exc).__name__})") from None
    renames = {"patientId": "id", "PatientSex": "sex", "PatientAge": "age", "ViewPosition": "view"}
    table = table.rename(columns={k: v for k, v in renames.items() if k in table.columns})
    if "id" not in table.columns:
        raise DataFormatError(path, f"needs an 'id' or 'patientId' column (found {', '.join(map(str, table.columns))[:200]})")
    fields = [c for c in METADATA_FIELDS if c in table.columns]
    if not fields:
        raise DataFormatError(path, "needs at least one of the columns sex, age, view")
    rows: dict[str, dict[str, Any]] = {}
    for line, row in enumerate(table.to_dict("records"), start=2):
        where = f"{path}:{line}"
        try:
            values = parse_given_fields(row, where)
        except ConfigError as exc:
            raise DataFormatError(where, exc.cause) from None
        image_id = str(row["id"]).strip()
        if image_id in rows:
            raise DataFormatError(where, f"id {image_id[:40]!r} appears twice")
        rows[image_id] = {k: v for k, v in values.items() if v is not None}
    return rows


def flat_ids(paths: list[Path], taken: dict[str, Path] | None = None) -> dict[Path, str]:
    """Each file's id, unique and free of path separators (see the module docstring).

    ``taken`` holds the ids already given to other files (by an earlier run into the same
    folder); they are kept and never reused.
    """
    taken = dict(taken or {})
    owner = {path: image_id for image_id, path in taken.items()}
    fresh = [p for p in paths if p not in owner]

    def candidates(path: Path) -> list[str]:
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        return [path.stem, path.name, f"{path.parent.name}_{path.name}", f"{path.stem}_{digest}"]

    for level in range(4):
        proposals: dict[str, list[Path]] = {}
        for path in fresh:
            proposals.setdefault(candidates(path)[level], []).append(path)
        for image_id, group in proposals.items():
            safe = image_id.replace("/", "_").replace("\\", "_") or "image"
            if (len(group) == 1 or level == 3) and safe not in taken:
                taken[safe] = group[0]
                owner[group[0]] = safe
        fresh = [p for p in fresh if p not in owner]
        if not fresh:
            break
    return {path: owner[path] for path in paths}


@dataclass
class BatchResult:
    out_dir: Path
    n_predicted: int
    n_errors: int
    n_positive: int
    n_skipped: int = 0  # finished by an earlier run into the same folder
    n_uncertain: int = 0  # members on both sides of the threshold
    no_decision: list[tuple[str, list[str]]] = field(default_factory=list)  # (id, reasons): failed the gate
    model_warnings: list[str] = field(default_factory=list)
    n_dicom: int = 0  # inputs given DICOM results (SR, GSPS, SC) by this run
    n_not_dicom: int = 0  # predicted inputs that are not DICOM, so got no DICOM results
    n_dicom_failed: int = 0  # DICOM inputs whose results could not be built (logged)

    @property
    def n_no_decision(self) -> int:
        return len(self.no_decision)


class _Journal:
    """The folder's record of finished files, and the views made from it."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.path = out_dir / JOURNAL_FILE
        self.predictions: dict[str, dict[str, Any]] = {}  # input -> prediction dict
        self.errors: dict[str, str] = {}  # input -> reason
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        with open(self.path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                if "prediction" in record:
                    self.predictions[record["input"]] = record["prediction"]
                else:
                    self.errors[record["input"]] = str(record["error"])
            except (ValueError, KeyError, TypeError):
                if number == len(lines):  # a run killed while writing its last line: that file is redone
                    log.info("%s: last line incomplete (an interrupted run); it is redone", self.path)
                    continue
                raise DataFormatError(f"{self.path}:{number}", "damaged journal line; start afresh with --overwrite") from None

    @property
    def done(self) -> set[str]:
        return set(self.predictions) | set(self.errors)

    def ids(self) -> dict[str, Path]:
        return {p["id"]: Path(source) for source, p in self.predictions.items()}

    def append(self, predictions: list[tuple[str, Prediction]], errors: list[tuple[str, str]]) -> None:
        """Record one batch durably, then extend the CSV views with it."""
        lines = [json.dumps({"input": source, "prediction": p.to_dict()}) for source, p in predictions]
        lines += [json.dumps({"input": source, "error": reason}) for source, reason in errors]
        if lines:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        for source, p in predictions:
            self.predictions[source] = p.to_dict()
        for source, reason in errors:
            self.errors[source] = reason
        _append_csv(self.out_dir / PREDICTIONS_CSV, [p.csv_row() for _, p in predictions],
                    columns=Prediction.csv_columns())
        _append_csv(self.out_dir / SUBMISSION_CSV, [_submission_row(p) for _, p in predictions],
                    columns=list(SUBMISSION_COLUMNS))
        _append_csv(self.out_dir / ERRORS_CSV, [{"input": s, "error": r} for s, r in errors], columns=["input", "error"])

    def rewrite_views(self) -> None:
        """Make the CSV views match the journal exactly (after an interrupted run)."""
        predictions = [Prediction.from_dict(p) for p in self.predictions.values()]
        for name in (PREDICTIONS_CSV, SUBMISSION_CSV, ERRORS_CSV):
            (self.out_dir / name).unlink(missing_ok=True)
        _append_csv(self.out_dir / PREDICTIONS_CSV, [p.csv_row() for p in predictions],
                    columns=Prediction.csv_columns(), always=True)
        _append_csv(self.out_dir / SUBMISSION_CSV, [_submission_row(p) for p in predictions],
                    columns=list(SUBMISSION_COLUMNS), always=True)
        _append_csv(self.out_dir / ERRORS_CSV, [{"input": s, "error": r} for s, r in self.errors.items()],
                    columns=["input", "error"], always=True)

    def write_json(self) -> None:
        path = self.out_dir / PREDICTIONS_JSON
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(list(self.predictions.values()), indent=2))
        os.replace(tmp, path)

    def write_coco(self) -> None:
        """The predicted boxes as a COCO dataset, one image per prediction (original pixels)."""
        from lungopacity.io.coco import write_coco_dataset

        predictions = [Prediction.from_dict(p) for p in self.predictions.values()]
        write_coco_dataset(
            self.out_dir / COCO_JSON,
            [p.id for p in predictions],
            [p.image_size for p in predictions],
            [[[b.x1, b.y1, b.x2, b.y2] for b in p.boxes] for p in predictions],
            [[b.box_confidence for b in p.boxes] for p in predictions],
            file_names=[Path(source).name for source in self.predictions],
        )


def _submission_row(prediction: Prediction) -> dict[str, str]:
    """The challenge's row: ``box_confidence x y width height`` per box (the one place boxes are xywh)."""
    boxes = [[b.x1, b.y1, b.x2, b.y2] for b in prediction.boxes]
    scores = [b.box_confidence for b in prediction.boxes]
    return {"patientId": prediction.id, "PredictionString": format_prediction_string(boxes, scores, decimals=4)}


def _append_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None, always: bool = False) -> None:
    """Append rows, writing the header when the file is new (``always``: create it even without rows)."""
    if not rows and not (always and not path.exists()):
        return
    columns = columns or list(rows[0])
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())


def _run_identity(predictor: Predictor, defaults: dict[str, Any], metadata_csv: Path | None, override: bool,
                  with_images: bool, dicom_out: Path | None = None) -> dict[str, Any]:
    csv_digest = hashlib.sha256(metadata_csv.read_bytes()).hexdigest() if metadata_csv else None
    identity = {
        "bundle": str(Path(predictor.path).resolve()),
        "bundle_created": predictor.manifest.created,
        "model_version": predictor.version,
        "given": defaults,
        "metadata_csv_sha256": csv_digest,
        "override": override,
        "with_images": with_images,
        "model_warnings": list(predictor.warnings),
    }
    if dicom_out is not None:  # only then: folders of runs without it keep matching
        identity["dicom_out"] = str(dicom_out.resolve())
    return identity


def _start_folder(out_dir: Path, identity: dict[str, Any], overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    run_file = out_dir / RUN_FILE
    if overwrite:
        for name in RESULT_FILES:
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / OVERLAY_DIR, ignore_errors=True)
    elif run_file.exists():
        try:
            previous = json.loads(run_file.read_text())
        except ValueError:
            previous = None
        if previous != identity:
            keys = set(identity) | (set(previous) if isinstance(previous, dict) else set())
            changed = sorted(k for k in keys if not isinstance(previous, dict) or previous.get(k) != identity.get(k))
            raise ConfigError(out_dir, f"holds predictions of another run (different {', '.join(changed)}); "
                                       "choose another --out, or pass --overwrite to replace them")
    elif (out_dir / JOURNAL_FILE).exists() or (out_dir / PREDICTIONS_CSV).exists():
        raise ConfigError(out_dir, "holds predictions of an unknown run; choose another --out, or pass --overwrite")
    run_file.write_text(json.dumps(identity, indent=2))


def predict_to_folder(
    predictor: Predictor,
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    metadata_csv: str | Path | None = None,
    sex: str | None = None,
    age: float | str | None = None,
    view: str | None = None,
    override: bool = False,
    batch_size: int = 16,
    with_images: bool = True,
    coco: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    dicom_out: str | Path | None = None,
) -> BatchResult:
    """Predict every input and write the result files (see the module docstring).

    Args:
        predictor: a loaded bundle.
        inputs: files, folders and glob patterns.
        out_dir: the results folder; an earlier run of the same command there is continued.
        metadata_csv: sex / age / view per id (a row wins over the options).
        sex, age, view: values for every input.
        override: given values replace a header's; by default they fill only what it lacks.
        batch_size: images per forward pass.
        with_images: write the overlay and heatmap pictures.
        coco: also write the boxes as a COCO dataset (``coco.json``).
        overwrite: discard the results already in ``out_dir`` and start afresh.
        progress: ``progress(done, total)``, called once before the first batch and after each.
        dicom_out: also write DICOM results (SR, GSPS, Secondary Capture) of each DICOM
            input into ``dicom_out/<id>/``.

    Raises:
        ConfigError: a bad option value, or ``out_dir`` holds another run's results.
        DataFormatError: a bad metadata CSV.
    """
    out_dir = Path(out_dir)
    if batch_size < 1:
        raise ConfigError("--batch-size", f"must be at least 1, got {batch_size}")
    defaults = {k: v for k, v in (("sex", parse_given("sex", sex, "--sex")), ("age", parse_given("age", age, "--age")),
                                  ("view", parse_given("view", view, "--view"))) if v is not None}
    csv_path = Path(metadata_csv) if metadata_csv else None
    per_id = read_metadata_overrides(csv_path) if csv_path else {}
    files, unmatched = expand_inputs(inputs)
    dicom_dir = Path(dicom_out) if dicom_out is not None else None
    if dicom_dir is not None:
        from lungopacity.inference.dicom_output import require_dicom_libraries

        require_dicom_libraries("--dicom-out")
    _start_folder(out_dir, _run_identity(predictor, defaults, csv_path, override, with_images, dicom_dir), overwrite)
    dicom_counts = {"n_dicom": 0, "n_not_dicom": 0, "n_dicom_failed": 0}

    journal = _Journal(out_dir)
    journal.rewrite_views()
    done_before = journal.done
    todo = [f for f in files if str(f) not in done_before]
    ids = flat_ids(files, journal.ids())
    items = [(f, ids[f], {**defaults, **per_id.get(ids[f], per_id.get(f.stem, {}))} or None) for f in todo]
    new_unmatched = [(text, reason) for text, reason in unmatched if text not in done_before]
    if new_unmatched:
        journal.append([], new_unmatched)
    total, finished = len(files), len(files) - len(todo)
    n_skipped = finished
    if n_skipped:
        log.info("%s: %d of %d files were finished by an earlier run; continuing", out_dir, n_skipped, total)
    if progress:
        progress(finished, total)
    overlays = out_dir / OVERLAY_DIR
    for outcome in predictor.iter_predict(items, batch_size=batch_size, with_images=with_images, override=override):
        if with_images:
            overlays.mkdir(exist_ok=True)
            for _, reading in outcome.readings:
                for suffix, picture in (("", reading.overlay_png), ("_heatmap", reading.heatmap_png)):
                    if picture:
                        _write_atomic(overlays / f"{reading.prediction.id}{suffix}.png", picture)
        if dicom_dir is not None:
            _write_dicom_outputs(predictor, outcome.readings, dicom_dir, dicom_counts)
        journal.append([(str(path), r.prediction) for path, r in outcome.readings],
                       [(str(path), reason) for path, reason in outcome.errors])
        finished += len(outcome.readings) + len(outcome.errors)
        if progress:
            progress(finished, total)
    journal.write_json()
    if coco:
        journal.write_coco()
    predictions = list(journal.predictions.values())
    result = BatchResult(
        out_dir, len(journal.predictions), len(journal.errors), sum(p.get("decision") is True for p in predictions),
        n_skipped, n_uncertain=sum(bool(p.get("uncertain")) and p.get("decision") is not None for p in predictions),
        no_decision=[(p["id"], list(p.get("not_applicable_reasons", []))) for p in predictions
                     if p.get("decision") is None],
        model_warnings=list(predictor.warnings), **dicom_counts,
    )
    log.info("predicted %d images (%d positive, %d without a decision), %d errors -> %s", result.n_predicted,
             result.n_positive, result.n_no_decision, result.n_errors, out_dir)
    return result


def _write_dicom_outputs(predictor: Predictor, readings: list[tuple[Path, Any]], folder: Path,
                         counts: dict[str, int]) -> None:
    """DICOM results of a batch's DICOM inputs; a failure is logged and the batch goes on."""
    from lungopacity.errors import LungOpacityError
    from lungopacity.inference.dicom_output import AlgorithmInfo, build_dicom_results, is_dicom, write_dicom_results

    algorithm = AlgorithmInfo.from_predictor(predictor)
    for path, reading in readings:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            counts["n_dicom_failed"] += 1
            log.warning("%s: no DICOM results (cannot read the file again: %s)", path, exc.strerror or exc)
            continue
        if not is_dicom(data):
            counts["n_not_dicom"] += 1
            log.info("%s: not a DICOM file, so no DICOM results (SR, GSPS, SC) are made for it", path)
            continue
        try:
            results = build_dicom_results(data, reading.prediction, algorithm, name=str(path))
            write_dicom_results(results, folder / reading.prediction.id)
        except (LungOpacityError, OSError) as exc:
            counts["n_dicom_failed"] += 1
            log.warning("%s", exc if isinstance(exc, LungOpacityError) else f"{path}: DICOM results not written ({exc})")
            continue
        counts["n_dicom"] += 1


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
