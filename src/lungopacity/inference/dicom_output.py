"""Readings as DICOM objects a PACS can store and a viewer can show.

For each DICOM radiograph read, three objects, all in the source's Study (same Study
Instance UID), each in a new Series, built with highdicom and referencing the source
image:

* **Comprehensive SR** following TID 1500 (Measurement Report): one image-level
  measurement group (TID 1501) with the finding (lung opacity present / absent /
  indeterminate), its probability, the operating threshold, the algorithm
  identification (TID 4019: the bundle's model name and version) and, when the
  prediction has them, the applicability gate and the uncertainty; one planar ROI group
  (TID 1410) per box, the box as a closed POLYLINE (a rectangle, 5 points) in pixel
  coordinates of the source image, with its score.
* **Grayscale Softcopy Presentation State**: the boxes as graphic annotations, so a
  viewer draws them over the original image.
* **Secondary Capture**: the image with the boxes and the result burned in (RGB), for
  viewers that show neither SR nor presentation states.

Codes (all from DICOM PS3.16 except the ``99LUNGOP`` local scheme, declared in each SR's
Coding Scheme Identification Sequence): see :data:`CODES`.

What is copied from the source: the attributes of the Patient and Study information
entities (highdicom's ``copy_patient_and_study_information``: Patient, General Study,
Patient Study, Clinical Trial modules) and the Specific Character Set; nothing else, no
private tags. One repair: a Patient's Age that is not a valid Age String (RSNA writes a
bare ``'51'``) is written in the standard form (``'051Y'``), or left out when it cannot be
read.

UIDs are derived from the source SOP Instance UID and the bundle's identity (a hash), so
the same image read by the same bundle gives the same SOP Instance UIDs: a result sent
twice (a node restarted mid-send) is the same instance to a PACS, not a duplicate. All
results of one bundle for one study share one series per kind.

Only DICOM inputs get DICOM outputs: a PNG or JPEG has no study to join.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lungopacity.errors import ConfigError, ImageReadError
from lungopacity.inference.schemas import Box, Prediction, Reading
from lungopacity.io.dicom import parse_age
from lungopacity.io.images import read_image, sniff_format

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

    from lungopacity.inference.predictor import Predictor

log = logging.getLogger(__name__)

#: The three result objects, in the order they are sent.
RESULT_KINDS: tuple[str, ...] = ("sr", "gsps", "sc")
#: File names inside a result folder.
RESULT_FILES: dict[str, str] = {"sr": "SR.dcm", "gsps": "GSPS.dcm", "sc": "SC.dcm"}
#: Series Number of each kind (high, so they sort after the modality's own series).
SERIES_NUMBERS: dict[str, int] = {"sr": 9901, "gsps": 9902, "sc": 9903}
SERIES_DESCRIPTIONS: dict[str, str] = {
    "sr": "lungopacity SR - research use, not for diagnosis",
    "gsps": "lungopacity boxes - research use, not for diagnosis",
    "sc": "lungopacity overlay - research use, not for diagnosis",
}
#: The local (private) coding scheme for concepts PS3.16 has no code for.
LOCAL_SCHEME = "99LUNGOP"
MANUFACTURER = "lungopacity"
#: The longest side of the Secondary Capture; larger radiographs are scaled down for it.
SC_MAX_SIDE = 2048
#: SOP Classes of the result objects.
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
GRAYSCALE_SOFTCOPY_PS = "1.2.840.10008.5.1.4.1.1.11.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
RESULT_SOP_CLASSES: dict[str, str] = {"sr": COMPREHENSIVE_SR, "gsps": GRAYSCALE_SOFTCOPY_PS, "sc": SECONDARY_CAPTURE}


def _codes() -> dict[str, tuple[str, str, str]]:
    """(value, scheme, meaning) of every concept the SR uses."""
    return {
        "title": ("126000", "DCM", "Imaging Measurement Report"),
        "procedure_radiography": ("168537006", "SCT", "Plain radiography"),
        "procedure_chest": ("413815006", "SCT", "Chest imaging"),
        "finding_type": ("112001", "DCM", "Opacity"),
        "finding_site": ("39607008", "SCT", "Lung"),
        "finding": ("121052", "DCM", "Presence of property"),
        "present": ("121053", "DCM", "Present"),
        "absent": ("121054", "DCM", "Absent"),
        "indeterminate": ("121059", "DCM", "Presence Undetermined"),
        "probability": ("122157", "DCM", "Probability"),
        "threshold": ("122411", "DCM", "Threshold Value"),
        "score": ("246262008", "SCT", "Score"),
        "no_units": ("1", "UCUM", "no units"),
        "yes": ("373066001", "SCT", "Yes"),
        "no": ("373067005", "SCT", "No"),
        # Local concepts: no PS3.16 code says these.
        "image_probability": ("IMGPROB", LOCAL_SCHEME, "Image classifier probability of opacity"),
        "applicable": ("APPLIC", LOCAL_SCHEME, "Input within the model's intended use"),
        "applicability_reason": ("APPREASON", LOCAL_SCHEME, "Reason the input is outside intended use"),
        "uncertainty": ("UNCERT", LOCAL_SCHEME, "Spread of ensemble probabilities"),
        "uncertain": ("UNCFLAG", LOCAL_SCHEME, "Ensemble members disagree about the decision"),
        "warning": ("WARNING", LOCAL_SCHEME, "Warning about the reading"),
    }


#: The concepts of the SR, by role: ``(code value, coding scheme, meaning)``.
CODES: dict[str, tuple[str, str, str]] = _codes()


def _code(key: str) -> Any:
    from highdicom.sr import CodedConcept

    value, scheme, meaning = CODES[key]
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


# ----------------------------------------------------------------- identity


@dataclass(frozen=True)
class AlgorithmInfo:
    """The algorithm identification the results carry (TID 4019), from the bundle.

    Attributes:
        name: the model's name (Algorithm Name, Manufacturer Model Name).
        version: the bundle's version (Algorithm Version): lungopacity's version and
            the bundle's creation time.
        key: the bundle's identity (creation time and weight checksums): with the source
            SOP Instance UID, it fixes the results' UIDs.
        parameters: Algorithm Parameters (threshold rule, parts of the bundle).
        software_version: lungopacity's version (Software Versions).
        window: the bundle's window policy, with which the secondary capture's pixels are
            decoded (the image the model read, as it read it).
    """

    name: str
    version: str
    key: str
    parameters: tuple[str, ...] = ()
    software_version: str = ""
    window: str = "none"

    @classmethod
    def from_predictor(cls, predictor: Predictor) -> AlgorithmInfo:
        manifest = predictor.manifest
        card = manifest.model_card or {}
        backbone = str(manifest.classifier.model_config.get("backbone", "classifier"))
        parts = [backbone] + (["fusion"] if manifest.fusion else []) + (["detector"] if manifest.detector else [])
        name = str(card.get("name") or f"lungopacity {' + '.join(parts)}")
        version = str(card.get("version") or f"{manifest.lungopacity_version} bundle {manifest.created}")
        digests = "|".join(w.sha256 for w in manifest.weight_files)
        key = hashlib.sha256(f"{manifest.created}|{digests}".encode()).hexdigest()
        threshold = manifest.threshold
        parameters = (
            f"threshold {threshold.value:.6g} on the {threshold.score} probability ({threshold.rule})",
            f"parts: {', '.join(parts)}",
        )
        return cls(name=name[:64], version=version[:64], key=key, parameters=parameters,
                   software_version=manifest.lungopacity_version, window=manifest.classifier.preprocessing.window)


def derived_uid(*parts: str) -> str:
    """A UID under the ``2.25`` root fixed by ``parts`` (a hash: same parts, same UID)."""
    digest = hashlib.sha256("|".join(("lungopacity",) + parts).encode("utf-8")).digest()
    return "2.25." + str(uuid.UUID(bytes=digest[:16]).int)


def short_hash(text: str) -> str:
    """A 12-character hash that names an instance in logs without identifying it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def require_dicom_libraries(option: str, modules: tuple[str, ...] = ("highdicom",)) -> None:
    """Fail early, as one line, when the optional DICOM libraries are not installed.

    Raises:
        ConfigError: naming ``option`` and the install command.
    """
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(option, f"needs {' and '.join(missing)}: pip install 'lungopacity[dicom]'")


# -------------------------------------------------------------------- inputs


def is_dicom(data: bytes) -> bool:
    """True when the bytes are a DICOM file (by content, as the readers decide)."""
    return sniff_format(bytes(data[:256])) == "dicom"


def source_dataset(data: bytes, name: str = "<upload>") -> Dataset:
    """The source's header (no pixels) for building results from.

    Raises:
        ImageReadError: not a DICOM file, or one without the identifiers a result must
            reference (SOP Class / Instance, Study / Series Instance UIDs, rows, columns).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not is_dicom(data):
        raise ImageReadError(name, "not a DICOM file: DICOM results (SR, presentation state, "
                                   "secondary capture) are made only for DICOM inputs")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageReadError(name, f"truncated or corrupt DICOM ({type(exc).__name__})") from None
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
               if not ds.get(k)]
    if missing:
        raise ImageReadError(name, f"DICOM lacks {', '.join(missing)}, which a result must reference")
    return ds


def _patient_study_reference(source: Dataset) -> Dataset:
    """The source as highdicom copies patient and study from it, with Patient's Age repaired."""
    from pydicom.dataset import Dataset as PydicomDataset

    ref = PydicomDataset()
    for element in source:
        if not element.tag.is_private and element.tag.group != 0x7FE0:
            ref.add(copy.deepcopy(element))
    ref.file_meta = copy.deepcopy(getattr(source, "file_meta", PydicomDataset()))
    if "PatientAge" in ref:
        text = str(ref.PatientAge or "").strip().upper()
        if text and not (len(text) == 4 and text[:3].isdigit() and text[3] in "DWMY"):
            years = parse_age(text)
            if years is not None and years < 1000:
                ref.PatientAge = f"{int(round(years)):03d}Y"
            else:
                del ref.PatientAge
    return ref


# ---------------------------------------------------------- optional fields


def _optional_findings(prediction: Prediction) -> dict[str, Any]:
    """The reading's explanation fields that go into the SR (docs/OUTPUTS.md).

    Keys: ``image_probability`` (float), ``applicable`` (bool), ``reasons`` (why there is
    no decision), ``uncertainty`` (the spread of the members' P(opacity)), ``uncertain``
    (members on both sides of the threshold), ``warnings`` (what to know about the model).
    """
    found: dict[str, Any] = {"applicable": bool(prediction.applicable), "uncertain": bool(prediction.uncertain)}
    if prediction.image_probability is not None and np.isfinite(prediction.image_probability):
        found["image_probability"] = float(prediction.image_probability)
    if prediction.not_applicable_reasons:
        found["reasons"] = [str(r) for r in prediction.not_applicable_reasons]
    if prediction.member_std is not None and np.isfinite(prediction.member_std):
        found["uncertainty"] = float(prediction.member_std)
    if prediction.model_warnings:
        found["warnings"] = [str(w) for w in prediction.model_warnings]
    return found


def box_score(box: Box) -> float:
    """The score a box is reported with: its ``box_confidence``."""
    return float(box.box_confidence)


def finding_key(prediction: Prediction) -> str:
    """'present', 'absent' or 'indeterminate' (no decision: the input failed the gate)."""
    if prediction.decision is None:
        return "indeterminate"
    return "present" if prediction.decision else "absent"


def _result_line(prediction: Prediction) -> str:
    p = prediction.opacity_probability
    if prediction.decision is None:
        return f"lungopacity: no decision (P(opacity) {p:.2f}); input outside intended use"
    verdict = "opacity" if prediction.decision else "no opacity"
    return f"lungopacity: {verdict}, P(opacity) {p:.2f} (threshold {prediction.threshold:.2f})"


def _rectangle(box: Box, rows: int, cols: int) -> np.ndarray:
    """The box as a closed polyline (5 points, column/row) inside the image."""
    x1, x2 = (float(np.clip(v, 0.0, cols)) for v in (box.x1, box.x2))
    y1, y2 = (float(np.clip(v, 0.0, rows)) for v in (box.y1, box.y2))
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float64)


# ------------------------------------------------------------------ results


@dataclass
class DicomResults:
    """The three result objects of one source image."""

    sr: Dataset
    gsps: Dataset
    sc: Dataset
    source_key: str = ""  # a short hash of the source SOP Instance UID (for logs)
    study_instance_uid: str = field(default="", repr=False)

    def items(self) -> list[tuple[str, Dataset]]:
        return [("sr", self.sr), ("gsps", self.gsps), ("sc", self.sc)]

    def encoded(self) -> dict[str, bytes]:
        """Each object as a DICOM Part 10 file."""
        return {kind: encode_dataset(ds) for kind, ds in self.items()}


def encode_dataset(ds: Dataset) -> bytes:
    """A dataset as DICOM Part 10 bytes (preamble, file meta, dataset)."""
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.save_as(buffer, write_like_original=False)
    return buffer.getvalue()


def build_dicom_results(
    data: bytes,
    prediction: Prediction,
    algorithm: AlgorithmInfo,
    *,
    name: str = "<upload>",
    pixels: np.ndarray | None = None,
) -> DicomResults:
    """The SR, presentation state and secondary capture of one DICOM source.

    Args:
        data: the source DICOM file's bytes.
        prediction: its prediction (boxes in the source's pixels).
        algorithm: the bundle's identification (:meth:`AlgorithmInfo.from_predictor`).
        name: the source in error messages.
        pixels: the source's pixels (float32 in [0, 1], full resolution) for the
            secondary capture; decoded from ``data`` when not given.

    Raises:
        ImageReadError: the source is not a DICOM file, lacks the identifiers a result
            references, or its pixels cannot be decoded.
    """
    _quiet_highdicom()
    source = source_dataset(data, name)
    if pixels is None:
        pixels, _ = read_image(data, name=name, window=algorithm.window)
    ref = _patient_study_reference(source)
    sop_uid = str(source.SOPInstanceUID)
    study_uid = str(source.StudyInstanceUID)
    uids = {kind: derived_uid(algorithm.key, sop_uid, kind) for kind in RESULT_KINDS}
    series = {kind: derived_uid(algorithm.key, study_uid, kind, "series") for kind in RESULT_KINDS}
    optional = _optional_findings(prediction)
    try:
        with warnings.catch_warnings():
            # The source's names are copied as they are, whatever highdicom thinks of their form.
            warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
            sr = _build_sr(ref, prediction, algorithm, optional, uids["sr"], series["sr"])
            gsps = _build_gsps(ref, prediction, algorithm, uids["gsps"], series["gsps"])
            sc = _build_sc(ref, np.asarray(pixels), prediction, algorithm, uids["sc"], series["sc"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # highdicom refuses a source whose header breaks the standard (a bad value, an unknown class).
        raise ImageReadError(name, f"DICOM results could not be built from this source ({type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:200]})") from None
    return DicomResults(sr, gsps, sc, source_key=short_hash(sop_uid), study_instance_uid=study_uid)


def _quiet_highdicom() -> None:
    """highdicom logs every copy at INFO with the source's SOP Instance UID: an identifier in the log."""
    logger = logging.getLogger("highdicom")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def _common(algorithm: AlgorithmInfo, kind: str) -> dict[str, Any]:
    return {
        "manufacturer": MANUFACTURER,
        "series_number": SERIES_NUMBERS[kind],
        "instance_number": 1,
        "series_description": SERIES_DESCRIPTIONS[kind],
    }


def _build_sr(ref: Dataset, prediction: Prediction, algorithm: AlgorithmInfo, optional: dict[str, Any],
              sop_uid: str, series_uid: str) -> Dataset:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from highdicom.sr import (
        AlgorithmIdentification,
        ComprehensiveSR,
        DeviceObserverIdentifyingAttributes,
        FindingSite,
        ImageRegion,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        SourceImageForRegion,
        TextContentItem,
        TrackingIdentifier,
    )
    from highdicom.sr.enum import GraphicTypeValues, RelationshipTypeValues
    from pydicom.sr.codedict import codes

    rows, cols = int(ref.Rows), int(ref.Columns)
    algorithm_id = AlgorithmIdentification(name=algorithm.name, version=algorithm.version,
                                           parameters=list(algorithm.parameters) or None)
    device = DeviceObserverIdentifyingAttributes(
        uid=derived_uid(algorithm.key, "device"), name="lungopacity", manufacturer_name=MANUFACTURER,
        model_name=algorithm.name,
    )
    context = ObservationContext(observer_device_context=ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device))
    unit = _code("no_units")
    sop_class, source_uid = str(ref.SOPClassUID), str(ref.SOPInstanceUID)
    site = [FindingSite(anatomic_location=_code("finding_site"))]

    measurements = [
        Measurement(name=_code("probability"), value=float(prediction.opacity_probability), unit=unit),
        Measurement(name=_code("threshold"), value=float(prediction.threshold), unit=unit),
    ]
    if "image_probability" in optional:
        measurements.append(Measurement(name=_code("image_probability"), value=optional["image_probability"], unit=unit))
    if "uncertainty" in optional:
        measurements.append(Measurement(name=_code("uncertainty"), value=optional["uncertainty"], unit=unit))
    evaluations = [QualitativeEvaluation(name=_code("finding"), value=_code(finding_key(prediction)))]
    if "applicable" in optional:
        evaluations.append(QualitativeEvaluation(name=_code("applicable"),
                                                 value=_code("yes" if optional["applicable"] else "no")))
    if "uncertain" in optional:
        evaluations.append(QualitativeEvaluation(name=_code("uncertain"),
                                                 value=_code("yes" if optional["uncertain"] else "no")))
    image_group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=derived_uid(sop_uid, "image-finding"),
                                               identifier="lung opacity (image)"),
        finding_type=_code("finding_type"),
        algorithm_id=algorithm_id,
        finding_sites=site,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup(referenced_sop_class_uid=sop_class,
                                                      referenced_sop_instance_uid=source_uid)],
    )
    texts = [("applicability_reason", r) for r in optional.get("reasons", [])]
    texts += [("warning", w) for w in optional.get("warnings", [])]
    for key, text in texts:
        image_group[0].ContentSequence.append(TextContentItem(
            name=_code(key), value=" ".join(text.split())[:1024], relationship_type=RelationshipTypeValues.CONTAINS))

    groups: list[Any] = [image_group]
    for k, box in enumerate(prediction.boxes, start=1):
        region = ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=_rectangle(box, rows, cols),
            source_image=SourceImageForRegion(referenced_sop_class_uid=sop_class, referenced_sop_instance_uid=source_uid),
        )
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=derived_uid(sop_uid, "box", str(k)),
                                                   identifier=f"lung opacity box {k}"),
            referenced_region=region,
            finding_type=_code("finding_type"),
            algorithm_id=algorithm_id,
            finding_sites=site,
            measurements=[Measurement(name=_code("score"), value=box_score(box), unit=unit)],
        ))
    report = MeasurementReport(
        observation_context=context,
        procedure_reported=[_code("procedure_radiography"), _code("procedure_chest")],
        imaging_measurements=groups,
    )
    scheme = CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME, name="lungopacity local codes", responsible_organization="lungopacity project",
    )
    common = _common(algorithm, "sr")
    sr = ComprehensiveSR(
        evidence=[ref], content=report[0], series_instance_uid=series_uid, sop_instance_uid=sop_uid,
        is_complete=True, is_final=False, is_verified=False, coding_schemes=[scheme],
        series_number=common["series_number"], instance_number=common["instance_number"],
        manufacturer=MANUFACTURER, series_description=common["series_description"],
        manufacturer_model_name=algorithm.name, software_versions=algorithm.software_version or None,
    )
    return sr


def _build_gsps(ref: Dataset, prediction: Prediction, algorithm: AlgorithmInfo, sop_uid: str,
                series_uid: str) -> Dataset:
    from highdicom.pr import (
        AnnotationUnitsValues,
        GraphicAnnotation,
        GraphicLayer,
        GraphicObject,
        GraphicTypeValues,
        GrayscaleSoftcopyPresentationState,
        TextObject,
    )

    rows, cols = int(ref.Rows), int(ref.Columns)
    layer = GraphicLayer(layer_name="LUNGOPACITY", order=1, description="lungopacity: lung opacity boxes")
    graphics = [GraphicObject(graphic_type=GraphicTypeValues.POLYLINE, graphic_data=_rectangle(b, rows, cols),
                              units=AnnotationUnitsValues.PIXEL) for b in prediction.boxes]
    texts = [TextObject(text_value=_result_line(prediction)[:64], units=AnnotationUnitsValues.PIXEL,
                        bounding_box=(0.0, 0.0, cols * 0.9, rows * 0.05))]
    for b in prediction.boxes:
        x1, y1 = (float(np.clip(b.x1, 0, cols)), float(np.clip(b.y1, 0, rows)))
        texts.append(TextObject(text_value=f"opacity {box_score(b):.2f}", units=AnnotationUnitsValues.PIXEL,
                                anchor_point=(x1, y1), anchor_point_visible=False))
    annotation = GraphicAnnotation(referenced_images=[ref], graphic_layer=layer,
                                   graphic_objects=graphics or None, text_objects=texts)
    common = _common(algorithm, "gsps")
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[ref], series_instance_uid=series_uid, series_number=common["series_number"],
        sop_instance_uid=sop_uid, instance_number=common["instance_number"], manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name[:64], software_versions=algorithm.software_version or "unknown",
        device_serial_number=algorithm.key[:16], content_label="LUNGOPACITY",
        content_description=_result_line(prediction)[:64], graphic_annotations=[annotation],
        graphic_layers=[layer], series_description=common["series_description"],
        content_creator_name="lungopacity^algorithm",
    )
    _copy_laterality(ref, gsps)
    for keyword in ("ContentDate", "ContentTime"):  # older highdicom adds them; the GSPS IOD has none
        if keyword in gsps:
            delattr(gsps, keyword)
    return gsps


def _build_sc(ref: Dataset, pixels: np.ndarray, prediction: Prediction, algorithm: AlgorithmInfo, sop_uid: str,
              series_uid: str) -> Dataset:
    from highdicom.sc import SCImage
    from pydicom.dataset import Dataset as PydicomDataset

    from lungopacity.reports.overlays import overlay_image

    rows, cols = int(ref.Rows), int(ref.Columns)
    if pixels.ndim != 2:
        raise ImageReadError("source", f"expected a 2-D image, got shape {pixels.shape}")
    from lungopacity.inference.predictor import _display_pixels  # the pictures' one downscale

    pixels = _display_pixels(np.asarray(pixels, dtype=np.float32), longest=SC_MAX_SIDE)
    sy, sx = pixels.shape[0] / rows, pixels.shape[1] / cols
    boxes = np.array([[b.x1, b.y1, b.x2, b.y2] for b in prediction.boxes], dtype=np.float64).reshape(-1, 4)
    scores = np.array([box_score(b) for b in prediction.boxes], dtype=np.float64)
    image = overlay_image(pixels, None, boxes, scores, _result_line(prediction), scale=(sx, sy), legend=False)
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    orientation = [str(v) for v in (ref.get("PatientOrientation") or [])]
    common = _common(algorithm, "sc")
    sc = SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT",
        # highdicom wants an orientation; the source's (often empty) one is restored below.
        patient_orientation=tuple(orientation) if len(orientation) == 2 else ("L", "F"),
        series_instance_uid=series_uid, series_number=common["series_number"], sop_instance_uid=sop_uid,
        instance_number=common["instance_number"], manufacturer=MANUFACTURER,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_description=common["series_description"], manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.software_version or None,
    )
    if len(orientation) != 2:
        sc.PatientOrientation = ref.get("PatientOrientation", "") or ""
    sc.copy_patient_and_study_information(ref)
    _copy_laterality(ref, sc)
    if ref.get("SpecificCharacterSet"):
        sc.SpecificCharacterSet = ref.SpecificCharacterSet
    sc.ConversionType = "WSD"  # made on a workstation from another image
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = "lungopacity result burned into the source image; research use, not for diagnosis"
    item = PydicomDataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    sc.SourceImageSequence = [item]
    return sc


def _copy_laterality(ref: Dataset, target: Dataset) -> None:
    """General Series' Body Part Examined and Laterality (Type 2C, which depends on the body part).

    The source's, where it has them: Laterality is required of a paired body part only,
    and a validator can tell only when the body part is named. Without either, Laterality
    is present and empty (unknown).
    """
    body_part = str(ref.get("BodyPartExamined") or "").strip()
    if body_part:
        target.BodyPartExamined = body_part
    laterality = str(ref.get("Laterality") or ref.get("ImageLaterality") or "").strip().upper()
    if laterality in ("R", "L"):
        target.Laterality = laterality
    elif not body_part:
        target.Laterality = ""


# ----------------------------------------------------------------- writing


def write_dicom_results(results: DicomResults, folder: str | Path) -> dict[str, Path]:
    """Write the three objects into ``folder`` (``SR.dcm``, ``GSPS.dcm``, ``SC.dcm``), each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for kind, data in results.encoded().items():
        path = folder / RESULT_FILES[kind]
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        written[kind] = path
    return written


def multipart_related(parts: Iterable[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    """DICOM files as one ``multipart/related; type="application/dicom"`` body (STOW-RS, PS3.18).

    Returns ``(body, content_type)``; the content type names the boundary.
    """
    boundary = boundary or f"lungopacity-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for part in parts:
        if f"--{boundary}".encode() in part:
            raise ConfigError("multipart", "a part contains the boundary; choose another")
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


# ------------------------------------------------------------- for callers


def dicom_results_for_reading(data: bytes, reading: Reading | Prediction, predictor: Predictor, *,
                              name: str = "<upload>", pixels: np.ndarray | None = None) -> DicomResults:
    """The results of a reading already made (the prediction of ``data`` by ``predictor``)."""
    prediction = reading.prediction if isinstance(reading, Reading) else reading
    return build_dicom_results(data, prediction, AlgorithmInfo.from_predictor(predictor), name=name, pixels=pixels)


def dicom_results_for_upload(
    predictor: Predictor,
    data: bytes,
    name: str = "<upload>",
    *,
    sex: str | None = None,
    age: float | None = None,
    view: str | None = None,
    reading: Reading | None = None,
) -> tuple[Reading, DicomResults]:
    """Read one uploaded DICOM and make its result objects (the service's ``?format=dicom``).

    Args:
        predictor: the loaded bundle.
        data: the uploaded file.
        name: the upload's name, for messages.
        sex, age, view: values a person gave (validated), as for :meth:`Predictor.read`.
        reading: the reading, when the caller has made it already (it is not made again).

    Returns:
        The reading and its :class:`DicomResults`; ``multipart_related(results.encoded().values())``
        makes the HTTP body.

    Raises:
        ImageReadError: not a DICOM file (checked before any work) or not a readable one.
    """
    if not is_dicom(data):
        raise ImageReadError(name, "not a DICOM file: DICOM results (SR, presentation state, "
                                   "secondary capture) are made only for DICOM inputs")
    require_dicom_libraries("format=dicom")
    if reading is None:
        reading = predictor.read(data, name, sex=sex, age=age, view=view, with_images=False)
    return reading, dicom_results_for_reading(data, reading, predictor, name=name)


def read_sr_summary(ds: Dataset) -> dict[str, Any]:
    """What an SR written here says, read back with highdicom (for checks and tests).

    Returns ``probability``, ``threshold``, ``finding`` ('present' / 'absent' /
    'indeterminate'), ``boxes`` (list of (x1, y1, x2, y2, score)), ``source_sop_instance_uid``,
    ``algorithm_name``, ``algorithm_version``, and the optional ``image_probability``,
    ``uncertainty``, ``applicable``, ``uncertain``, ``texts`` when present.
    """
    from highdicom.sr import ComprehensiveSR

    sr = ComprehensiveSR.from_dataset(ds, copy=True)
    groups = sr.content.get_image_measurement_groups()
    roi_groups = sr.content.get_planar_roi_measurement_groups()
    if not groups:
        raise ImageReadError("SR", "no image measurement group")
    group = groups[0]
    summary: dict[str, Any] = {"boxes": [], "texts": []}
    by_code = {CODES[k][0]: k for k in CODES}
    for m in group.get_measurements():
        key = by_code.get(m.name.value)
        if key in ("probability", "threshold", "image_probability", "uncertainty"):
            summary[key] = float(m.value)
    for item in group.get_qualitative_evaluations():
        key, value = by_code.get(item.name.value), by_code.get(item.value.value)
        if key == "finding":
            summary["finding"] = value
        elif key in ("applicable", "uncertain"):
            summary[key] = value == "yes"
    local_texts = {CODES["applicability_reason"][0], CODES["warning"][0]}
    for item in group[0].ContentSequence:
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue in local_texts:
            summary["texts"].append(str(item.TextValue))
    if group.source_images:
        summary["source_sop_instance_uid"] = str(group.source_images[0].referenced_sop_instance_uid)
    for item in group[0].ContentSequence:  # TID 4019 Algorithm Identification
        concept = item.ConceptNameCodeSequence[0].CodeValue
        if concept == "111001":
            summary["algorithm_name"] = str(item.TextValue)
        elif concept == "111003":
            summary["algorithm_version"] = str(item.TextValue)
    for roi in roi_groups:
        region = roi.roi
        points = np.asarray(region.value, dtype=np.float64)
        (score,) = [float(m.value) for m in roi.get_measurements() if m.name.value == CODES["score"][0]]
        summary["boxes"].append((float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()),
                                 float(points[:, 1].max()), score))
        summary.setdefault("region_sources", []).append(str(region.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                                                       if "ReferencedSOPSequence" in region else
                                                       str(region.ContentSequence[0].ReferencedSOPSequence[0]
                                                           .ReferencedSOPInstanceUID))
    return summary


__all__ = [
    "CODES",
    "RESULT_FILES",
    "RESULT_KINDS",
    "RESULT_SOP_CLASSES",
    "SERIES_NUMBERS",
    "AlgorithmInfo",
    "DicomResults",
    "build_dicom_results",
    "derived_uid",
    "dicom_results_for_reading",
    "dicom_results_for_upload",
    "encode_dataset",
    "is_dicom",
    "multipart_related",
    "read_sr_summary",
    "require_dicom_libraries",
    "short_hash",
    "source_dataset",
    "write_dicom_results",
]
