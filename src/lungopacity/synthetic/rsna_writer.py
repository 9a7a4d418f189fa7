"""Write phantoms as an RSNA-format folder: label CSVs plus JPEG Baseline DICOMs.

The folder has the official RSNA Pneumonia Detection Challenge layout::

    stage_2_train_labels.csv           patientId,x,y,width,height,Target (one row per box)
    stage_2_detailed_class_info.csv    patientId,class (one row per label row)
    stage_2_train_images/<patientId>.dcm

and the DICOMs carry the header fields RSNA's do (CR, CHEST, MONOCHROME2, 8 bits, JPEG
Baseline 1.2.840.10008.1.2.4.50, PatientAge as a bare number such as ``'51'``, fixed
dates ``19010101``).  Every file written here is marked synthetic: ``ImageComments`` and
``DeidentificationMethod`` (0012,0063) both hold :data:`SYNTHETIC_MARKER`, which
``lungopacity.io`` reads back as ``header['synthetic'] = True``.

Same arguments give byte-identical files: UIDs are hashes of the patient id (itself drawn
from the seeded generator), dates and times are fixed, nothing reads the clock.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage

from lungopacity.constants import CLASS_NAMES, LUNG_OPACITY, RSNA_IMAGE_SIZE
from lungopacity.errors import ConfigError, RunExistsError
from lungopacity.synthetic.phantom import MIN_SIZE, make_phantom_for, plan_patients

logger = logging.getLogger(__name__)

#: Written to ImageComments and DeidentificationMethod of every synthetic DICOM.
SYNTHETIC_MARKER = "lungopacity synthetic phantom"

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_INFO_CSV = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"

TRANSFER_SYNTAXES: dict[str, str] = {
    "jpeg-baseline": JPEGBaseline8Bit,
    "explicit-little": ExplicitVRLittleEndian,
}

#: Pillow JPEG quality; RSNA's 1024 px files are about 140 kB, this gives similar sizes.
JPEG_QUALITY = 90

_PATIENT_AGE_TAG = 0x00101010


def uid_from_name(name: str) -> str:
    """A DICOM UID under the ``2.25`` (UUID-derived) root, fixed by ``name``."""
    return "2.25." + str(int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:16], "big"))


def _format_ds(value: float) -> str:
    """A decimal string of at most 16 characters (the DS limit)."""
    return f"{float(value):.10g}"[:16]


def encode_jpeg_baseline(pixels_uint8: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Baseline (sequential, 8-bit, Huffman) JPEG bytes of a grayscale image, via Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(pixels_uint8).save(buffer, format="JPEG", quality=quality,
                                                 optimize=False, progressive=False)
    return buffer.getvalue()


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    sex: str | None,
    age: int | str | None,
    view: str | None,
    patient_id: str,
    pixel_spacing: float | tuple[float, float] | None,
    transfer_syntax: str = "jpeg-baseline",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    synthetic: bool = True,
    jpeg_quality: int = JPEG_QUALITY,
) -> Path:
    """Write one CR chest DICOM holding ``pixels`` (``H x W`` uint8, or uint16 uncompressed).

    ``transfer_syntax`` is ``'jpeg-baseline'`` (1.2.840.10008.1.2.4.50, like RSNA; uint8
    only) or ``'explicit-little'`` (uncompressed; uint8 or uint16, ``bits_stored`` defaults
    to the dtype's width).  ``age`` is written RSNA-style as a bare number when an int
    (``51 -> '51'``) and verbatim when a str (``'051Y'``); ``sex``, ``age``, ``view`` or
    ``pixel_spacing`` of None leave that tag out.  Pixels are stored as given whatever
    ``photometric`` says.  ``synthetic`` writes :data:`SYNTHETIC_MARKER` into ImageComments
    and DeidentificationMethod.  Returns the path written.
    """
    path = Path(path)
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ConfigError(f"pixels must be a 2-D array, got shape {pixels.shape}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ConfigError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ConfigError(f"pixels must be uint8 or uint16, got {pixels.dtype}")
    if transfer_syntax == "jpeg-baseline" and pixels.dtype != np.uint8:
        raise ConfigError("JPEG Baseline holds 8-bit pixels only; use transfer_syntax='explicit-little' for uint16")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ConfigError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    allocated = pixels.dtype.itemsize * 8
    stored = allocated if bits_stored is None else int(bits_stored)
    if not 1 <= stored <= allocated:
        raise ConfigError(f"bits_stored must be 1..{allocated}, got {bits_stored}")
    if stored < allocated and int(pixels.max(initial=0)) >= 2**stored:
        raise ConfigError(f"pixel values exceed bits_stored={stored}")

    sop_uid = uid_from_name(f"lungopacity/{patient_id}/sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = TRANSFER_SYNTAXES[transfer_syntax]
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    if view is not None:
        ds.SeriesDescription = f"view: {view}"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    if sex is not None:
        ds.PatientSex = sex
    if age is not None:
        # RSNA stores a bare number ('51'), which is not a valid AS ('051Y'): skip validation.
        age_text = age if isinstance(age, str) else str(int(age))
        ds[_PATIENT_AGE_TAG] = DataElement(_PATIENT_AGE_TAG, "AS", age_text, validation_mode=config.IGNORE)
    ds.BodyPartExamined = "CHEST"
    if view is not None:
        ds.ViewPosition = view
    ds.StudyInstanceUID = uid_from_name(f"lungopacity/{patient_id}/study")
    ds.SeriesInstanceUID = uid_from_name(f"lungopacity/{patient_id}/series")
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    if synthetic:
        ds.ImageComments = SYNTHETIC_MARKER
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = SYNTHETIC_MARKER
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    if pixel_spacing is not None:
        row_mm, col_mm = (pixel_spacing, pixel_spacing) if np.isscalar(pixel_spacing) else pixel_spacing
        ds.PixelSpacing = [_format_ds(row_mm), _format_ds(col_mm)]
    ds.BitsAllocated = allocated
    ds.BitsStored = stored
    ds.HighBit = stored - 1
    ds.PixelRepresentation = 0
    if transfer_syntax == "jpeg-baseline":
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([encode_jpeg_baseline(np.ascontiguousarray(pixels), jpeg_quality)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OB" if allocated == 8 else "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.save_as(path, write_like_original=False)
    return path


@dataclass(frozen=True)
class DemoDatasetSummary:
    """What :func:`write_demo_dataset` wrote."""

    path: Path
    n: int
    size: int
    seed: int
    #: patients per RSNA class name, in class-code order
    class_counts: dict[str, int] = field(default_factory=dict)
    #: patients per view ('AP', 'PA')
    view_counts: dict[str, int] = field(default_factory=dict)
    n_boxes: int = 0

    def describe(self) -> str:
        """One line: class counts, views, boxes and image size."""
        classes = ", ".join(f"{name} {count}" for name, count in self.class_counts.items())
        views = ", ".join(f"{view} {count}" for view, count in self.view_counts.items())
        return f"{classes}; {views}; {self.n_boxes} boxes; {self.size} px; seed {self.seed}"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"path": str(self.path), "n": self.n, "size": self.size, "seed": self.seed,
                "class_counts": dict(self.class_counts), "view_counts": dict(self.view_counts),
                "n_boxes": self.n_boxes}


def _rsna_number(value: float) -> str:
    """RSNA writes box numbers as floats with one decimal: ``264.0``."""
    return f"{float(value):.1f}"


def _label_rows(patient_id: str, label_class: int, boxes: np.ndarray) -> list[tuple[str, str, str]]:
    """(labels row, class-info row, patient id) strings for one patient."""
    name = CLASS_NAMES[label_class]
    if (label_class == LUNG_OPACITY) != (len(boxes) > 0):
        raise ConfigError(f"{patient_id}: class {name!r} with {len(boxes)} boxes")
    if label_class != LUNG_OPACITY:
        return [(f"{patient_id},,,,,0", f"{patient_id},{name}", patient_id)]
    rows = []
    for x1, y1, x2, y2 in boxes:
        numbers = ",".join(_rsna_number(v) for v in (x1, y1, x2 - x1, y2 - y1))
        rows.append((f"{patient_id},{numbers},1", f"{patient_id},{name}", patient_id))
    return rows


def write_demo_dataset(
    out_dir: str | Path,
    n: int,
    size: int = RSNA_IMAGE_SIZE,
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> DemoDatasetSummary:
    """Write ``n`` phantom patients as an RSNA-format folder under ``out_dir``.

    Classes and views are allocated to match RSNA (45.6 % AP, then P(class | view), every
    class present when ``n >= 3``) and shuffled; sex, age, pixel spacing and ids are drawn
    from ``seed``; patient ``i``'s image depends only on ``(seed, i)`` and its plan.  The
    same arguments give byte-identical files.  Rows in both CSVs are sorted by patientId.

    Raises FileExistsError when ``out_dir`` already holds DICOMs, unless ``overwrite``
    (which deletes the ``*.dcm`` files in ``stage_2_train_images`` first, nothing else).
    ``progress(done, total)`` is called after each image.
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    if size < MIN_SIZE:
        raise ConfigError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    if seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")
    out = Path(out_dir)
    images = out / IMAGES_DIR
    stale = sorted(images.glob("*.dcm")) if images.is_dir() else []
    if stale and not overwrite:
        raise RunExistsError(images, f"already holds {len(stale)} DICOM files; choose an empty folder or pass --overwrite")
    for old in stale:
        old.unlink()
    images.mkdir(parents=True, exist_ok=True)

    specs = plan_patients(n, np.random.SeedSequence(seed, spawn_key=(0,)))
    rows: list[tuple[str, str, str]] = []
    class_counts = {name: 0 for name in CLASS_NAMES}
    view_counts = {"AP": 0, "PA": 0}
    n_boxes = 0
    for index, spec in enumerate(specs):
        case = make_phantom_for(spec, np.random.SeedSequence(seed, spawn_key=(1, index)), size=size)
        pixels_u8 = np.round(case.pixels * 255.0).astype(np.uint8)
        write_dicom(images / f"{case.patient_id}.dcm", pixels_u8, sex=case.sex, age=case.age, view=case.view,
                    patient_id=case.patient_id, pixel_spacing=case.pixel_spacing)
        rows.extend(_label_rows(case.patient_id, case.label_class, case.boxes))
        class_counts[case.class_name] += 1
        view_counts[case.view] += 1
        n_boxes += len(case.boxes)
        if progress is not None:
            progress(index + 1, n)
        logger.debug("wrote %s (%s, %s, %d boxes)", case.patient_id, case.view, case.class_name, len(case.boxes))

    rows.sort(key=lambda row: row[2])  # stable: a patient's boxes keep their order
    _write_lines(out / LABELS_CSV, "patientId,x,y,width,height,Target", [r[0] for r in rows])
    _write_lines(out / CLASS_INFO_CSV, "patientId,class", [r[1] for r in rows])
    summary = DemoDatasetSummary(path=out, n=n, size=size, seed=seed, class_counts=class_counts,
                                 view_counts=view_counts, n_boxes=n_boxes)
    logger.info("wrote synthetic RSNA folder %s: %s", out, summary.describe())
    return summary


def _write_lines(path: Path, header: str, lines: Sequence[str]) -> None:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8", newline="\n")
