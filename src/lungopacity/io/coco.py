"""COCO object-detection JSON: ground truth and predictions for FiftyOne, CVAT, pycocotools.

Two kinds of file, as the COCO tools expect them:

* a **dataset** (``images``, ``categories``, ``annotations``): the ground truth, or the
  predictions of images without ground truth (each annotation then carries ``score``,
  which FiftyOne reads as the detection's confidence);
* a **results list** (a JSON array of ``{image_id, category_id, bbox, score}``): the
  detections in the form ``COCO.loadRes`` and ``COCOeval`` take, whose ``image_id``
  refer to the images of a dataset file.

One category, ``{"id": 1, "name": "Lung Opacity"}``. Images are numbered 1, 2, ... in the
order given; each image records ``file_name``, ``width``, ``height`` and the project's
``patient_id`` (an extra key the COCO tools keep and ignore), which the readers use to
map images back to patients. Boxes are ``bbox = [x, y, width, height]`` in original
pixels with ``area = width * height`` and ``iscrowd = 0``. Inside the package boxes stay
xyxy; as with the RSNA CSVs, the ``x, y, width, height`` form exists only at this edge.

Numbers are written as the shortest text that reads back as the same float64, so a
written and re-read box equals the input up to one rounding of ``x + width``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from lungopacity.constants import CLASS_NAMES, LUNG_OPACITY
from lungopacity.errors import ConfigError
from lungopacity.io.errors import DataFormatError

log = logging.getLogger(__name__)

COCO_CATEGORY_ID = 1
COCO_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": COCO_CATEGORY_ID, "name": CLASS_NAMES[LUNG_OPACITY], "supercategory": "finding"},
)


# --------------------------------------------------------------------------- building


def image_ids(patient_ids: Sequence[str]) -> dict[str, int]:
    """``{patientId: COCO image id}``: 1, 2, ... in the order given (the dataset's numbering).

    Raises:
        ValueError: a patient appears twice.
    """
    ids: dict[str, int] = {}
    for pid in patient_ids:
        pid = str(pid)
        if pid in ids:
            raise ConfigError(f"patient {pid} appears twice")
        ids[pid] = len(ids) + 1
    return ids


def _xyxy(boxes: ArrayLike | None, pid: str) -> np.ndarray:
    array = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4))
    if array.ndim != 2 or array.shape[1] != 4:
        raise DataFormatError(f"patient {pid}", f"boxes must be (N, 4) xyxy, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DataFormatError(f"patient {pid}", "boxes hold non-finite values")
    if ((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1])).any():
        raise DataFormatError(f"patient {pid}", "boxes must be xyxy with x1 <= x2 and y1 <= y2")
    return array


def _scores(scores: ArrayLike | None, n: int, pid: str) -> np.ndarray:
    array = np.zeros(0) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if array.shape[0] != n:
        raise DataFormatError(f"patient {pid}", f"{n} boxes but {array.shape[0]} scores")
    if not np.isfinite(array).all():
        raise DataFormatError(f"patient {pid}", "scores hold non-finite values")
    return array


def _bbox(box: np.ndarray) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_dataset(
    patient_ids: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    boxes_list: Sequence[ArrayLike | None],
    scores_list: Sequence[ArrayLike | None] | None = None,
    *,
    file_names: Sequence[str] | None = None,
    description: str = "lungopacity",
) -> dict[str, Any]:
    """A COCO dataset dict: images, the one category, and an annotation per box.

    Args:
        patient_ids: one per image, unique; image ids are 1, 2, ... in this order.
        sizes: per image, ``(height, width)`` in pixels (the original image).
        boxes_list: per image, ``(N, 4)`` xyxy in original pixels (empty / None: none).
        scores_list: per image, ``(N,)`` confidences; when given, every annotation
            carries ``score`` (predictions), else none does (ground truth).
        file_names: per image, the file name to record (default ``<patientId>.dcm``).
        description: ``info.description``.

    Raises:
        ValueError: lengths that differ or a repeated patient; DataFormatError (a
            ValueError) naming the patient for bad boxes, scores or sizes.
    """
    ids = [str(p) for p in patient_ids]
    n = len(ids)
    if len(sizes) != n or len(boxes_list) != n or (scores_list is not None and len(scores_list) != n):
        raise ConfigError(
            f"{n} patients but {len(sizes)} sizes, {len(boxes_list)} box lists"
            + ("" if scores_list is None else f" and {len(scores_list)} score lists")
        )
    if file_names is not None and len(file_names) != n:
        raise ConfigError(f"{n} patients but {len(file_names)} file names")
    numbering = image_ids(ids)
    images, annotations = [], []
    for k, pid in enumerate(ids):
        height, width = (int(v) for v in sizes[k])
        if height <= 0 or width <= 0:
            raise DataFormatError(f"patient {pid}", f"image size must be positive, got {height}x{width}")
        images.append(
            {
                "id": numbering[pid],
                "file_name": str(file_names[k]) if file_names is not None else f"{pid}.dcm",
                "width": width,
                "height": height,
                "patient_id": pid,
            }
        )
        boxes = _xyxy(boxes_list[k], pid)
        scores = None if scores_list is None else _scores(scores_list[k], len(boxes), pid)
        for j, box in enumerate(boxes):
            bbox = _bbox(box)
            annotation: dict[str, Any] = {
                "id": len(annotations) + 1,
                "image_id": numbering[pid],
                "category_id": COCO_CATEGORY_ID,
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            }
            if scores is not None:
                annotation["score"] = float(scores[j])
            annotations.append(annotation)
    return {
        "info": {"description": description, "version": "1.0"},
        "licenses": [],
        "images": images,
        "categories": [dict(c) for c in COCO_CATEGORIES],
        "annotations": annotations,
    }


def coco_results(
    patient_ids: Sequence[str],
    boxes_list: Sequence[ArrayLike | None],
    scores_list: Sequence[ArrayLike | None],
    *,
    numbering: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Detections as a COCO results list (``COCO.loadRes`` / ``COCOeval`` input).

    Args:
        patient_ids, boxes_list, scores_list: per image, xyxy boxes and confidences.
        numbering: ``{patientId: image id}`` of the dataset the results refer to
            (:func:`image_ids` of its patients); default: ``image_ids(patient_ids)``.

    Raises:
        ValueError: lengths that differ, or a patient not in ``numbering``;
            DataFormatError naming the patient for bad boxes or scores.
    """
    ids = [str(p) for p in patient_ids]
    if not (len(ids) == len(boxes_list) == len(scores_list)):
        raise ConfigError(f"{len(ids)} patients, {len(boxes_list)} box lists and {len(scores_list)} score lists")
    numbering = image_ids(ids) if numbering is None else numbering
    results = []
    for pid, boxes_in, scores_in in zip(ids, boxes_list, scores_list):
        if pid not in numbering:
            raise ConfigError(f"patient {pid} is not among the dataset's images")
        boxes = _xyxy(boxes_in, pid)
        scores = _scores(scores_in, len(boxes), pid)
        for box, score in zip(boxes, scores):
            results.append(
                {"image_id": int(numbering[pid]), "category_id": COCO_CATEGORY_ID, "bbox": _bbox(box),
                 "score": float(score)}
            )
    return results


# --------------------------------------------------------------------------- files


def _write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # allow_nan=False: COCO readers take strict JSON; the builders never hold NaN.
    tmp.write_text(json.dumps(obj, allow_nan=False))
    os.replace(tmp, path)
    return path


def write_coco_dataset(
    path: str | Path,
    patient_ids: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    boxes_list: Sequence[ArrayLike | None],
    scores_list: Sequence[ArrayLike | None] | None = None,
    *,
    file_names: Sequence[str] | None = None,
) -> Path:
    """Write :func:`coco_dataset` as JSON (atomically); the path written.

    Without ``scores_list`` this is the ground truth; with it, the predictions as a
    dataset (annotations with ``score``) for tools that import a dataset.
    """
    dataset = coco_dataset(patient_ids, sizes, boxes_list, scores_list, file_names=file_names)
    _write_json(dataset, path)
    log.info("wrote COCO dataset %s (%d images, %d boxes)", path, len(dataset["images"]),
             len(dataset["annotations"]))
    return Path(path)


def write_coco_results(
    path: str | Path,
    patient_ids: Sequence[str],
    boxes_list: Sequence[ArrayLike | None],
    scores_list: Sequence[ArrayLike | None],
    *,
    numbering: Mapping[str, int] | None = None,
) -> Path:
    """Write :func:`coco_results` as a JSON array (atomically); the path written."""
    results = coco_results(patient_ids, boxes_list, scores_list, numbering=numbering)
    _write_json(results, path)
    log.info("wrote COCO results %s (%d detections)", path, len(results))
    return Path(path)


def _load_json(path: Path) -> Any:
    if not path.exists():
        raise DataFormatError(path, "file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, f"not a JSON file ({exc})") from None


def _boxes_from_bboxes(bboxes: list[Any], where: Path, what: str) -> np.ndarray:
    array = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4) if bboxes else np.zeros((0, 4))
    if not np.isfinite(array).all() or (array[:, 2:] < 0).any():
        raise DataFormatError(where, f"{what}: bbox values must be finite with width, height >= 0")
    out = array.copy()
    out[:, 2] += out[:, 0]
    out[:, 3] += out[:, 1]
    return out


def _check_annotations(items: Any, path: Path, required: tuple[str, ...], category_ids: set[int]) -> None:
    if not isinstance(items, list):
        raise DataFormatError(path, "annotations must be a JSON array")
    for k, item in enumerate(items):
        if not isinstance(item, dict) or any(key not in item for key in required):
            raise DataFormatError(path, f"annotation {k + 1}: needs {', '.join(required)}")
        if item["category_id"] not in category_ids:
            raise DataFormatError(
                path, f"annotation {k + 1}: category_id {item['category_id']!r} is not {CLASS_NAMES[LUNG_OPACITY]!r}"
            )
        bbox = item["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DataFormatError(path, f"annotation {k + 1}: bbox must be [x, y, width, height]")
        if "score" in item and not (_is_number(item["score"]) and np.isfinite(item["score"])):
            raise DataFormatError(path, f"annotation {k + 1}: score must be a finite number")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _table(images: list[dict[str, Any]], annotations: list[dict[str, Any]], path: Path) -> pd.DataFrame:
    by_image: dict[int, list[dict[str, Any]]] = {int(image["id"]): [] for image in images}
    for k, annotation in enumerate(annotations):
        if annotation["image_id"] not in by_image:
            raise DataFormatError(path, f"annotation {k + 1}: image_id {annotation['image_id']!r} is not an image")
        by_image[annotation["image_id"]].append(annotation)
    rows = []
    for image in images:
        anns = by_image[int(image["id"])]
        pid = str(image.get("patient_id") or Path(str(image["file_name"])).stem)
        rows.append(
            {
                "patientId": pid,
                "image_id": int(image["id"]),
                "file_name": str(image["file_name"]),
                "height": int(image["height"]),
                "width": int(image["width"]),
                "boxes": _boxes_from_bboxes([a["bbox"] for a in anns], path, f"image {image['id']}"),
                "scores": np.asarray([float(a.get("score", np.nan)) for a in anns], dtype=np.float64),
            }
        )
    columns = ["patientId", "image_id", "file_name", "height", "width", "boxes", "scores"]
    return pd.DataFrame(rows, columns=columns)


def read_coco_dataset(path: str | Path) -> pd.DataFrame:
    """Read a COCO dataset file (ours or another tool's) back into the patient form.

    Returns:
        One row per image, in file order: ``patientId`` (the image's ``patient_id``,
        else its file name without extension), ``image_id``, ``file_name``, ``height``,
        ``width``, ``boxes`` (float64 ``(N, 4)`` xyxy, original pixels), ``scores``
        (float64 ``(N,)``; NaN where an annotation has no score).

    Raises:
        DataFormatError: missing file, not JSON, missing keys, a category other than
            Lung Opacity, an annotation of an unknown image, or a bad bbox.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or any(key not in data for key in ("images", "annotations", "categories")):
        raise DataFormatError(path, "not a COCO dataset: expected the keys images, annotations, categories")
    # Other categories may be listed; an annotation of one is an error (nothing dropped silently).
    category_ids = {c.get("id") for c in data["categories"] if isinstance(c, dict)
                    and c.get("name") == CLASS_NAMES[LUNG_OPACITY]}
    images = data["images"]
    for k, image in enumerate(images):
        if not isinstance(image, dict) or any(key not in image for key in ("id", "file_name", "width", "height")):
            raise DataFormatError(path, f"image {k + 1}: needs id, file_name, width, height")
    _check_annotations(data["annotations"], path, ("image_id", "category_id", "bbox"), category_ids)
    return _table(images, data["annotations"], path)


def read_coco_results(path: str | Path, dataset: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read a COCO results list against the dataset it refers to.

    Args:
        path: the results JSON array.
        dataset: the dataset file, or its :func:`read_coco_dataset` table.

    Returns:
        The dataset's images in its order, with the detections: columns as
        :func:`read_coco_dataset` (``boxes`` and ``scores`` from the results).

    Raises:
        DataFormatError: malformed results, a detection of an image not in the dataset,
            or a detection without a score.
    """
    path = Path(path)
    images = read_coco_dataset(dataset) if not isinstance(dataset, pd.DataFrame) else dataset
    data = _load_json(path)
    _check_annotations(data, path, ("image_id", "category_id", "bbox", "score"), {COCO_CATEGORY_ID})
    image_dicts = [
        {"id": row.image_id, "file_name": row.file_name, "width": row.width, "height": row.height,
         "patient_id": row.patientId}
        for row in images.itertuples()
    ]
    return _table(image_dicts, data, path)
