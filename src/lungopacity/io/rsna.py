"""The RSNA data layer: label tables, boxes, metadata, the patient table and splits.

An RSNA-format folder holds

* ``stage_2_train_labels.csv``: ``patientId,x,y,width,height,Target``, one row per box,
  one row with empty box fields for a patient without boxes;
* ``stage_2_detailed_class_info.csv``: ``patientId,class``, one row per label row;
* images in ``stage_2_train_images/`` (the official layout) or ``images/``, as
  ``<patientId>.dcm`` / ``.png`` / ``.jpg``;
* optionally ``metadata.csv`` (``patientId,PatientAge,PatientSex,ViewPosition``, extra
  columns allowed), used when the images are not DICOM.

The RSNA ``x, y, width, height`` form exists only in this module and in the
submission writer: everything returned here holds boxes as xyxy in original pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungopacity.constants import CLASS_NAMES, LUNG_OPACITY, RSNA_IMAGE_SIZE
from lungopacity.errors import ConfigError
from lungopacity.io.dicom import parse_age, parse_sex, parse_view, read_dicom_header
from lungopacity.io.errors import DataFormatError, ImageReadError
from lungopacity.io.images import IMAGE_EXTENSIONS, original_size

log = logging.getLogger(__name__)

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_INFO_CSV = "stage_2_detailed_class_info.csv"
METADATA_CSV = "metadata.csv"
IMAGE_DIRS: tuple[str, ...] = ("stage_2_train_images", "images")
LABEL_COLUMNS: tuple[str, ...] = ("patientId", "x", "y", "width", "height", "Target")
CLASS_INFO_COLUMNS: tuple[str, ...] = ("patientId", "class")
METADATA_COLUMNS: tuple[str, ...] = ("patientId", "PatientAge", "PatientSex", "ViewPosition")
PATIENT_COLUMNS: tuple[str, ...] = ("patientId", "path", "class", "Target", "boxes", "sex", "age", "view")

_CLASS_CODE = {name: code for code, name in enumerate(CLASS_NAMES)}


@dataclass
class LoadReport:
    """What loading an RSNA folder kept, dropped and repaired: nothing is lost silently."""

    folder: str
    n_label_patients: int = 0
    n_images: int = 0
    n_kept: int = 0
    n_labels_without_image: int = 0
    images_without_labels: list[str] = field(default_factory=list)
    n_boxes: int = 0
    boxes_clipped: list[str] = field(default_factory=list)
    metadata_source: str = "none"
    n_missing_metadata: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    unreadable_headers: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph a person can read."""
        parts = [
            f"{self.folder}: {self.n_label_patients} labelled patients, {self.n_images} images; "
            f"kept {self.n_kept} patients with both ({self.n_boxes} boxes)",
        ]
        if self.n_labels_without_image:
            parts.append(f"{self.n_labels_without_image} labelled patients have no image (skipped)")
        if self.images_without_labels:
            shown = ", ".join(self.images_without_labels[:3])
            parts.append(f"{len(self.images_without_labels)} images have no labels (skipped: {shown}...)")
        if self.boxes_clipped:
            parts.append(f"{len(self.boxes_clipped)} boxes reached past the image border and were clipped")
        if self.unreadable_headers:
            parts.append(f"{len(self.unreadable_headers)} DICOM headers unreadable (kept; decoding will report them)")
        parts.append(f"metadata from {self.metadata_source}")
        if self.n_missing_metadata:
            parts.append(f"{self.n_missing_metadata} patients lack sex, age or view")
        if self.class_counts:
            parts.append("classes: " + ", ".join(f"{k} {v}" for k, v in self.class_counts.items()))
        return "; ".join(parts)


def _read_csv(path: Path, required: Iterable[str]) -> pd.DataFrame:
    if not path.exists():
        raise DataFormatError(path, "file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataFormatError(path, f"not a readable CSV ({type(exc).__name__}: {exc})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataFormatError(
            path, f"missing column(s) {', '.join(missing)}; expected {','.join(required)}, found {','.join(df.columns)}"
        )
    for column in df.columns:
        # A list comprehension strips 30,000 cells ~10x faster than ``Series.str.strip``.
        values = df[column]
        df[column] = pd.Series([v.strip() for v in values.tolist()], index=values.index, dtype=values.dtype)
    return df


def _numeric(df: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """Column as floats; empty cells become NaN, anything non-numeric is an error naming the line."""
    text = df[column]
    values = pd.to_numeric(text.where(text != "", None), errors="coerce")
    bad = values.isna() & (text != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataFormatError(path, f"line {i + 2}: malformed number {text.iloc[i]!r} in column {column}")
    return values.astype(float)


def read_labels_csv(path: str | Path) -> pd.DataFrame:
    """``stage_2_train_labels.csv`` as validated rows: patientId, x, y, width, height, Target.

    Raises:
        DataFormatError: wrong columns, malformed numbers, a Target other than 0/1, a
            positive row without a box, a negative row with one, or a box of no area.
    """
    path = Path(path)
    df = _read_csv(path, LABEL_COLUMNS)
    out = pd.DataFrame({"patientId": df["patientId"].astype(str)})
    if (out["patientId"] == "").any():
        i = int(np.flatnonzero((out["patientId"] == "").to_numpy())[0])
        raise DataFormatError(path, f"line {i + 2}: empty patientId")
    for column in ("x", "y", "width", "height", "Target"):
        out[column] = _numeric(df, column, path)
    target = out["Target"]
    if target.isna().any() or not target.isin([0, 1]).all():
        i = int(np.flatnonzero((target.isna() | ~target.isin([0, 1])).to_numpy())[0])
        raise DataFormatError(path, f"line {i + 2}: Target must be 0 or 1, got {df['Target'].iloc[i]!r}")
    box = out[["x", "y", "width", "height"]]
    has_box = box.notna().all(axis=1)
    partial = box.notna().any(axis=1) & ~has_box
    for mask, why in (
        (partial, "box has some of x, y, width, height empty"),
        ((target == 1) & ~has_box, "Target is 1 but the row has no box"),
        ((target == 0) & has_box, "Target is 0 but the row has a box"),
        (has_box & ((box["width"] <= 0) | (box["height"] <= 0)), "box width and height must be positive"),
    ):
        if mask.any():
            i = int(np.flatnonzero(mask.to_numpy())[0])
            raise DataFormatError(path, f"line {i + 2}: {why}")
    out["Target"] = target.astype(int)
    return out


def read_class_info_csv(path: str | Path) -> pd.DataFrame:
    """``stage_2_detailed_class_info.csv`` as patientId, class name, class code."""
    path = Path(path)
    df = _read_csv(path, CLASS_INFO_COLUMNS)
    unknown = ~df["class"].isin(CLASS_NAMES)
    if unknown.any():
        i = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataFormatError(
            path, f"line {i + 2}: unknown class {df['class'].iloc[i]!r}; expected one of {', '.join(CLASS_NAMES)}"
        )
    return pd.DataFrame(
        {"patientId": df["patientId"], "class_name": df["class"], "class": df["class"].map(_CLASS_CODE).astype(int)}
    )


def xywh_rows_to_xyxy(rows: pd.DataFrame) -> np.ndarray:
    """RSNA ``x, y, width, height`` rows -> float32 (N, 4) xyxy (the CSV edge conversion)."""
    x, y, w, h = (rows[c].to_numpy(dtype=np.float64) for c in ("x", "y", "width", "height"))
    return np.stack([x, y, x + w, y + h], axis=1).astype(np.float32).reshape(-1, 4)


def object_column(items: Iterable[Any]) -> np.ndarray:
    """A 1-D object array holding ``items`` as they are (arrays of equal shape are not stacked)."""
    items = list(items)
    column = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        column[i] = item
    return column


def split_rows(array: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """``array`` cut along its first axis into consecutive pieces of ``counts`` rows (views).

    The same pieces as ``np.split(array, np.cumsum(counts)[:-1])``, at a fraction of its
    cost for tens of thousands of small pieces.
    """
    ends = np.cumsum(counts).tolist()
    starts = [0, *ends[:-1]]
    return [array[start:end] for start, end in zip(starts, ends)]


def boxes_per_patient(rows: pd.DataFrame, patient_ids: Iterable[str]) -> list[np.ndarray]:
    """The boxes of each patient from validated label rows, all patients in one pass.

    Args:
        rows: label rows as from :func:`read_labels_csv` (``patientId, x, y, width,
            height, Target``); only the ``Target == 1`` rows carry boxes.
        patient_ids: the patients wanted, unique, in the order of the result.

    Returns:
        Per patient, float32 ``(N, 4)`` xyxy in original pixels, in the rows' file order
        (duplicated rows stay duplicated); ``(0, 4)`` for a patient without a box row.
        Rows of patients not in ``patient_ids`` are ignored.
    """
    # Sorting the rows by patient once and splitting the box array replaces a pandas
    # group per patient (7 s on the 26,684 official patients, BENCHMARKS.md).
    index = pd.Index(list(patient_ids), dtype=object)
    if not index.is_unique:
        raise ConfigError("boxes_per_patient needs unique patient ids")
    positive = rows["Target"].to_numpy() == 1
    codes = index.get_indexer(rows["patientId"].to_numpy()[positive])
    xyxy = xywh_rows_to_xyxy(rows[positive])
    wanted = codes >= 0
    codes, xyxy = codes[wanted], xyxy[wanted]
    order = np.argsort(codes, kind="stable")  # stable: a patient's boxes keep file order
    counts = np.bincount(codes, minlength=len(index))
    return split_rows(xyxy[order], counts)


def load_label_tables(
    labels_csv: str | Path, class_info_csv: str | Path | None = None
) -> pd.DataFrame:
    """Patient-level labels from the two official CSVs; no images needed.

    Args:
        labels_csv: ``stage_2_train_labels.csv``, or an RSNA folder holding both CSVs.
        class_info_csv: ``stage_2_detailed_class_info.csv``; default: beside labels_csv.

    Returns:
        One row per patient, in first-appearance order: ``patientId``, ``class``
        (0/1/2), ``Target``, ``boxes`` (float32 (N, 4) xyxy, original pixels).

    Raises:
        DataFormatError: malformed tables, a patient missing from the class table, a
            patient with two different classes, or class and Target that disagree.
    """
    labels_csv = Path(labels_csv)
    if labels_csv.is_dir():
        folder = labels_csv
        labels_csv = folder / LABELS_CSV
        class_info_csv = class_info_csv or folder / CLASS_INFO_CSV
    class_info_csv = Path(class_info_csv) if class_info_csv else labels_csv.parent / CLASS_INFO_CSV
    rows = read_labels_csv(labels_csv)
    classes = read_class_info_csv(class_info_csv)

    per_patient_classes = classes.groupby("patientId", sort=False)["class"].nunique()
    conflicting = per_patient_classes[per_patient_classes > 1]
    if len(conflicting):
        raise DataFormatError(
            class_info_csv, f"{len(conflicting)} patients have more than one class, e.g. {conflicting.index[0]}"
        )
    class_of = classes.drop_duplicates("patientId").set_index("patientId")["class"]
    missing = ~rows["patientId"].isin(class_of.index)
    if missing.any():
        first = rows["patientId"][missing].iloc[0]
        raise DataFormatError(
            class_info_csv, f"{rows['patientId'][missing].nunique()} labelled patients have no class row, e.g. {first}"
        )

    grouped = rows.groupby("patientId", sort=False)
    target = grouped["Target"].max()
    patient_ids = target.index
    cls = class_of.reindex(patient_ids).astype(int)
    disagree = (cls == LUNG_OPACITY) != (target == 1)
    if disagree.any():
        pid = patient_ids[np.flatnonzero(disagree.to_numpy())[0]]
        raise DataFormatError(
            labels_csv,
            f"class and Target disagree for {int(disagree.sum())} patients, e.g. {pid}: "
            f"class {CLASS_NAMES[int(cls[pid])]!r} with Target {int(target[pid])}",
        )
    mixed = grouped["Target"].nunique() > 1
    if mixed.any():
        pid = patient_ids[np.flatnonzero(mixed.to_numpy())[0]]
        raise DataFormatError(labels_csv, f"patient {pid} has rows with Target 0 and rows with Target 1")

    table = pd.DataFrame(
        {
            "patientId": patient_ids.astype(str),
            "class": cls.to_numpy(dtype=int),
            "Target": target.to_numpy(dtype=int),
        }
    )
    table["boxes"] = object_column(boxes_per_patient(rows, table["patientId"]))
    return table.reset_index(drop=True)


def read_metadata_csv(path: str | Path) -> pd.DataFrame:
    """``metadata.csv`` as patientId, sex ('M'/'F'/None), age (float or NaN), view ('AP'/'PA'/None)."""
    path = Path(path)
    df = _read_csv(path, METADATA_COLUMNS)
    out = pd.DataFrame({"patientId": df["patientId"].astype(str)})
    out["sex"] = pd.Series([parse_sex(v) for v in df["PatientSex"]], dtype=object)
    out["age"] = pd.Series([parse_age(v) if v != "" else None for v in df["PatientAge"]], dtype=float)
    out["view"] = pd.Series([parse_view(v) for v in df["ViewPosition"]], dtype=object)
    if out["patientId"].duplicated().any():
        raise DataFormatError(path, f"duplicate patientId {out['patientId'][out['patientId'].duplicated()].iloc[0]}")
    return out


def find_image_dir(folder: str | Path) -> Path | None:
    """The image folder of an RSNA folder: ``stage_2_train_images/`` or ``images/``."""
    folder = Path(folder)
    for name in IMAGE_DIRS:
        if (folder / name).is_dir():
            return folder / name
    return None


def find_image_files(image_dir: str | Path) -> dict[str, Path]:
    """``{patientId: path}`` for every image file in a folder (not recursive)."""
    found: dict[str, Path] = {}
    for path in sorted(Path(image_dir).iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            if path.stem in found:
                log.warning("%s: two images for patient %s; using %s", image_dir, path.stem, found[path.stem].name)
                continue
            found[path.stem] = path
    return found


def _metadata_from_headers(
    paths: pd.Series, progress: Callable[[int], None] | None
) -> tuple[pd.DataFrame, list[tuple[int, int]], list[str]]:
    sexes, ages, views, sizes = [], [], [], []
    unreadable: list[str] = []
    for path in paths:
        path = Path(path)
        if path.suffix.lower() in (".dcm", ".dicom"):
            try:
                header = read_dicom_header(path)
            except ImageReadError as exc:
                # Reported, not fatal: decoding the file later reports it again and skips it.
                log.warning("%s (metadata unknown)", exc)
                unreadable.append(str(path))
                header = {"sex": None, "age": None, "view": None, "rows": None, "cols": None}
            sexes.append(header["sex"])
            ages.append(header["age"])
            views.append(header["view"])
            sizes.append((header["rows"] or RSNA_IMAGE_SIZE, header["cols"] or RSNA_IMAGE_SIZE))
        else:
            sexes.append(None)
            ages.append(None)
            views.append(None)
            try:
                sizes.append(original_size(path))
            except OSError as exc:
                raise ImageReadError(path, f"cannot read image size ({exc})") from None
        if progress:
            progress(1)
    meta = pd.DataFrame({"sex": pd.Series(sexes, dtype=object), "age": pd.Series(ages, dtype=float),
                         "view": pd.Series(views, dtype=object)})
    return meta, sizes, unreadable


def _clip_boxes_to_images(table: pd.DataFrame, labels_csv: Path) -> list[str]:
    """Clip every box to its image (``orig_w`` x ``orig_h``) in one pass; the patients changed.

    Replaces the ``boxes`` of the patients whose boxes changed, in place.

    Raises:
        DataFormatError: a box lies entirely outside its image (the first such patient).
    """
    counts = np.fromiter((len(b) for b in table["boxes"]), dtype=np.intp, count=len(table))
    if not counts.any():
        return []
    boxes = np.concatenate([b for b in table["boxes"] if len(b)]).astype(np.float32, copy=False)
    owner = np.repeat(np.arange(len(table)), counts)
    widths = table["orig_w"].to_numpy()[owner]
    heights = table["orig_h"].to_numpy()[owner]
    # np.clip on float32 boxes with integer bounds, as per patient: the same float32 values.
    clipped = boxes.copy()
    clipped[:, 0] = np.clip(boxes[:, 0], 0, widths)
    clipped[:, 2] = np.clip(boxes[:, 2], 0, widths)
    clipped[:, 1] = np.clip(boxes[:, 1], 0, heights)
    clipped[:, 3] = np.clip(boxes[:, 3], 0, heights)
    outside = ((clipped[:, 2] - clipped[:, 0]) <= 0) | ((clipped[:, 3] - clipped[:, 1]) <= 0)
    if outside.any():
        i = int(owner[np.flatnonzero(outside)[0]])
        pid, h, w = table["patientId"].iloc[i], table["orig_h"].iloc[i], table["orig_w"].iloc[i]
        raise DataFormatError(labels_csv, f"patient {pid}: a box lies entirely outside the {w}x{h} image")
    changed_rows = np.unique(owner[(clipped != boxes).any(axis=1)])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    column = table.columns.get_loc("boxes")
    for i in changed_rows:
        table.iat[int(i), column] = clipped[starts[i]:starts[i] + counts[i]].copy()
    return [str(pid) for pid in table["patientId"].to_numpy()[changed_rows]]


def load_rsna(
    folder: str | Path,
    *,
    metadata_csv: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Load an RSNA-format folder as the patient table (one row per patient with an image).

    Metadata (sex, age, view) comes from the DICOM headers; for non-DICOM images from
    ``metadata_csv`` (default: ``folder/metadata.csv`` when present). Labelled patients
    without an image are dropped and counted; images without labels are listed; boxes
    reaching past the image border are clipped and counted. The report is logged and
    kept in ``table.attrs["load_report"]`` (a :class:`LoadReport`).

    Returns:
        Columns ``patientId, path, class, Target, boxes, sex, age, view, orig_h, orig_w``.

    Raises:
        DataFormatError: missing or malformed tables, no image folder, no patient left.
    """
    folder = Path(folder)
    report = LoadReport(folder=str(folder))
    labels = load_label_tables(folder / LABELS_CSV, folder / CLASS_INFO_CSV)
    report.n_label_patients = len(labels)
    image_dir = find_image_dir(folder)
    if image_dir is None:
        raise DataFormatError(folder, f"no image folder: expected {' or '.join(IMAGE_DIRS)}/")
    images = find_image_files(image_dir)
    report.n_images = len(images)
    report.images_without_labels = sorted(set(images) - set(labels["patientId"]))
    table = labels[labels["patientId"].isin(images)].reset_index(drop=True)
    report.n_labels_without_image = len(labels) - len(table)
    if table.empty:
        raise DataFormatError(folder, f"none of the {len(labels)} labelled patients has an image in {image_dir}")
    table.insert(1, "path", [str(images[pid]) for pid in table["patientId"]])

    header_meta, sizes, report.unreadable_headers = _metadata_from_headers(table["path"], progress)
    table["orig_h"] = [s[0] for s in sizes]
    table["orig_w"] = [s[1] for s in sizes]
    is_dicom = table["path"].str.lower().str.endswith((".dcm", ".dicom"))
    metadata_csv = Path(metadata_csv) if metadata_csv else (folder / METADATA_CSV)
    if metadata_csv.exists() and not is_dicom.all():
        csv_meta = read_metadata_csv(metadata_csv).set_index("patientId")
        csv_meta = csv_meta.reindex(table["patientId"])
        for column in ("sex", "age", "view"):
            header_meta[column] = header_meta[column].where(is_dicom.to_numpy(), csv_meta[column].to_numpy())
        report.metadata_source = "DICOM headers and " + metadata_csv.name if is_dicom.any() else metadata_csv.name
    elif is_dicom.any():
        report.metadata_source = "DICOM headers"
    for column in ("sex", "view"):
        # Unknown is None (not NaN) for the string fields, as in the header dict.
        table[column] = pd.Series([v if isinstance(v, str) else None for v in header_meta[column]], dtype=object)
    table["age"] = header_meta["age"].to_numpy(dtype=float)
    report.n_missing_metadata = int(table[["sex", "age", "view"]].isna().any(axis=1).sum())

    report.boxes_clipped = _clip_boxes_to_images(table, folder / LABELS_CSV)
    report.n_kept = len(table)
    report.n_boxes = int(sum(len(b) for b in table["boxes"]))
    report.class_counts = {CLASS_NAMES[c]: int((table["class"] == c).sum()) for c in range(len(CLASS_NAMES))}
    table.attrs["load_report"] = report
    log.info(report.summary())
    return table


# --------------------------------------------------------------------------- splits


def _stratified_order(table: pd.DataFrame, stratify_col: str, seed: int) -> dict[Any, np.ndarray]:
    """Per stratum, the patientIds in a seeded random order that does not depend on row order."""
    rng = np.random.default_rng(seed)
    order = {}
    for stratum, group in sorted(table.groupby(stratify_col), key=lambda kv: str(kv[0])):
        ids = np.sort(group["patientId"].astype(str).to_numpy())
        order[stratum] = ids[rng.permutation(len(ids))]
    return order


def stratified_split(
    table: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0, stratify_col: str = "class"
) -> pd.Series:
    """Patient-level train/val assignment, stratified, seeded; index = patientId."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if table["patientId"].duplicated().any():
        raise ConfigError("the table has duplicate patientIds: split patients, not rows")
    split = {}
    for ids in _stratified_order(table, stratify_col, seed).values():
        n_val = int(round(len(ids) * val_fraction))
        for i, pid in enumerate(ids):
            split[pid] = "val" if i < n_val else "train"
    return pd.Series(split, name="split").reindex(table["patientId"].astype(str))


def assign_folds(table: pd.DataFrame, k: int = 5, seed: int = 0, stratify_col: str = "class") -> pd.Series:
    """Patient-level k-fold assignment (0..k-1), stratified, seeded; index = patientId."""
    if k < 2:
        raise ConfigError(f"k-fold needs k >= 2, got {k}")
    if table["patientId"].duplicated().any():
        raise ConfigError("the table has duplicate patientIds: split patients, not rows")
    fold = {}
    offset = 0
    for ids in _stratified_order(table, stratify_col, seed).values():
        for i, pid in enumerate(ids):
            # The offset carries on across strata so small strata do not all start at fold 0.
            fold[pid] = (offset + i) % k
        offset += len(ids)
    return pd.Series(fold, name="fold").reindex(table["patientId"].astype(str)).astype(int)


def make_splits(
    table: pd.DataFrame, val_fraction: float = 0.2, k: int = 5, seed: int = 0, stratify_col: str = "class"
) -> pd.DataFrame:
    """``patientId, split, fold`` for every patient of the table."""
    ids = table["patientId"].astype(str)
    return pd.DataFrame(
        {
            "patientId": ids.to_numpy(),
            "split": stratified_split(table, val_fraction, seed, stratify_col).to_numpy(),
            "fold": assign_folds(table, k, seed, stratify_col).to_numpy(),
        }
    )


def write_splits(splits: pd.DataFrame, path: str | Path) -> None:
    """Write ``patientId,split,fold`` as CSV."""
    splits[["patientId", "split", "fold"]].to_csv(path, index=False)


def read_splits(path: str | Path) -> pd.DataFrame:
    """Read and validate a split CSV written by :func:`write_splits`."""
    path = Path(path)
    df = _read_csv(path, ("patientId", "split", "fold"))
    if not df["split"].isin(["train", "val"]).all():
        bad = df["split"][~df["split"].isin(["train", "val"])].iloc[0]
        raise DataFormatError(path, f"split must be 'train' or 'val', got {bad!r}")
    folds = _numeric(df, "fold", path)
    if folds.isna().any() or (folds < 0).any() or (folds % 1 != 0).any():
        raise DataFormatError(path, "fold must be a non-negative integer")
    if df["patientId"].duplicated().any():
        raise DataFormatError(path, f"patient {df['patientId'][df['patientId'].duplicated()].iloc[0]} appears twice")
    return pd.DataFrame({"patientId": df["patientId"], "split": df["split"], "fold": folds.astype(int)})
