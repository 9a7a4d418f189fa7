"""The bundle manifest (``bundle.json``) as typed records, validated when read.

A bundle is written by the training side (:mod:`lungopacity.engine.bundle`) and read by
the runtime (:mod:`lungopacity.inference.bundle`); this module is the contract between
the two. :meth:`BundleManifest.from_dict` checks every field it relies on and raises
:class:`~lungopacity.errors.BundleError` naming the file and the field, so a damaged or
hand-edited ``bundle.json`` is one clear line instead of a ``KeyError`` deep in the
predictor. The schema has a version (:data:`BUNDLE_FORMAT_VERSION`); a bundle of another
version is refused with the advice to rebuild it.

Layout of ``bundle.json`` (format version 4)::

    format, format_version, lungopacity_version, created, class_names
    classifier:    model_config, preprocessing {prepared_size, input_size, window},
                   members [{file, sha256}], temperature
    fusion:        null | {dir, features, sha256, temperature}
    detector:      null | {members [{file, sha256}], model_config, preprocessing, postprocess}
    threshold:     {value, rule, sensitivity, specificity, score}   score: "image" | "fusion"
    applicability: null | {file, sha256, method, n_components, percentile, thresholds,
                           n_fit, n_held_out, header {modalities, body_parts, views,
                           age_range, min_side, max_aspect}}
    model_card:    JSON object; its ``training_data`` block is typed (:class:`TrainingData`),
                   the rest (intended use, validation, calibration, decision, limitations)
                   is for people

Format 4 (this version) holds several detector members (``detector.members``, their boxes
pooled and fused as ``detector.postprocess`` says); format 3, whose detector is one
``{file, sha256}`` inline, is still read. Format 3 added: the component that makes the decision (``threshold.score``
is ``"image"`` or ``"fusion"``, and a fusion part is present exactly when it is
``"fusion"``), the calibration temperature of the fused output (``fusion.temperature``),
the applicability gate (``applicability``) and the typed training-data provenance
(``model_card.training_data``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungopacity.constants import CLASS_NAMES
from lungopacity.errors import BundleError

BUNDLE_FORMAT = "lungopacity-bundle"
BUNDLE_FORMAT_VERSION = 4
#: Formats this version reads: 3 differs from 4 only in its detector (one weight file inline).
READABLE_FORMAT_VERSIONS: tuple[int, ...] = (3, 4)
MANIFEST_FILE = "bundle.json"
#: The component whose calibrated P(opacity) is the final one and is compared with the
#: operating threshold (the ``decision_source`` of every prediction).
THRESHOLD_SCORES: tuple[str, ...] = ("image", "fusion")
#: Below this many training patients the predictor warns (see :meth:`TrainingData.warnings`):
#: with fewer, the held-out fold holds too few positives for the AUC to be known within a
#: few hundredths, and rarer presentations are barely seen in training.
MIN_TRAINING_PATIENTS = 5000


_PROBABILITY_EPS = 1e-7


def scale_probability(probability: Any, temperature: float) -> np.ndarray:
    """``sigmoid(logit(p) / temperature)``: the calibration of the fused output (:attr:`FusionPart.temperature`)."""
    p = np.clip(np.asarray(probability, dtype=np.float64), _PROBABILITY_EPS, 1 - _PROBABILITY_EPS)
    return 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / temperature))


class _Reader:
    """Typed access to one JSON object of the manifest, with errors that name the field."""

    def __init__(self, data: Any, where: str, source: Path | str) -> None:
        self.source, self.where = source, where
        if not isinstance(data, dict):
            self.fail(f"expected a JSON object, found {type(data).__name__}")
        self.data: dict[str, Any] = data

    def fail(self, problem: str, key: str | None = None) -> None:
        name = f"{self.where}.{key}" if key and self.where else (key or self.where or "manifest")
        raise BundleError(self.source, f"{name}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if key not in self.data or self.data[key] is None:
            if optional:
                return None
            self.fail("missing", key)
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(f"expected {_kind_names(kinds)}, found a boolean", key)
        if not isinstance(value, kinds):
            self.fail(f"expected {_kind_names(kinds)}, found {type(value).__name__}", key)
        if isinstance(value, float) and not math.isfinite(value):
            self.fail("not a finite number", key)
        return value

    def positive_int(self, key: str) -> int:
        value = self.get(key, int)
        if value < 1:
            self.fail(f"must be at least 1, found {value}", key)
        return value

    def child(self, key: str, *, optional: bool = False) -> _Reader | None:
        value = self.get(key, dict, optional=optional)
        if value is None:
            return None
        return _Reader(value, f"{self.where}.{key}" if self.where else key, self.source)


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


@dataclass(frozen=True)
class WeightFile:
    """One weight file of the bundle and its SHA-256."""

    file: str
    sha256: str

    @classmethod
    def read(cls, reader: _Reader) -> WeightFile:
        digest = reader.get("sha256", str)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            reader.fail("not a SHA-256 hex digest", "sha256")
        return cls(_path_inside_bundle(reader, "file"), digest)


def _path_inside_bundle(reader: _Reader, key: str) -> str:
    """A relative path that stays inside the bundle folder (no absolute paths, no '..')."""
    name = reader.get(key, str)
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        reader.fail(f"must be a path inside the bundle, found {name!r}", key)
    return name


@dataclass(frozen=True)
class Preprocessing:
    """How the component's input was made in training, so serving repeats it exactly.

    Attributes:
        prepared_size: side of the prepared uint8 image (the training cache's size):
            :func:`lungopacity.data.preprocess.decode_prepared`.
        input_size: side of the network's input:
            :func:`lungopacity.data.preprocess.network_input` resizes to it when it
            differs from ``prepared_size``.
        window: the readers' windowing policy the cache was prepared with.
    """

    prepared_size: int
    input_size: int
    window: str = "none"

    @classmethod
    def read(cls, reader: _Reader) -> Preprocessing:
        return cls(reader.positive_int("prepared_size"), reader.positive_int("input_size"), reader.get("window", str))


@dataclass(frozen=True)
class ClassifierPart:
    """The classifier ensemble: one architecture, one weight file per member (logits averaged)."""

    model_config: dict[str, Any]
    preprocessing: Preprocessing
    members: tuple[WeightFile, ...]
    temperature: float

    @classmethod
    def read(cls, reader: _Reader) -> ClassifierPart:
        members = reader.get("members", list)
        if not members:
            reader.fail("no member weight files", "members")
        temperature = reader.get("temperature", float)
        if temperature <= 0:
            reader.fail(f"must be positive, found {temperature}", "temperature")
        return cls(
            model_config=reader.get("model_config", dict),
            preprocessing=Preprocessing.read(reader.child("preprocessing")),  # type: ignore[arg-type]
            members=tuple(
                WeightFile.read(_Reader(m, f"{reader.where}.members[{i}]", reader.source)) for i, m in enumerate(members)
            ),
            temperature=temperature,
        )


@dataclass(frozen=True)
class FusionPart:
    """The fusion network's folder inside the bundle, the checksum of its weights, and the
    temperature that calibrates its output: ``sigmoid(logit(p) / temperature)``, fitted on
    the cross-fitted (held-out) fused probabilities."""

    dir: str
    features: tuple[str, ...]
    sha256: str
    temperature: float = 1.0

    @property
    def weights(self) -> WeightFile:
        return WeightFile(f"{self.dir}/fusion.safetensors", self.sha256)

    @classmethod
    def read(cls, reader: _Reader) -> FusionPart:
        folder = _path_inside_bundle(reader, "dir")
        weights = WeightFile.read(_Reader({"file": f"{folder}/fusion.safetensors", "sha256": reader.get("sha256", str)},
                                          reader.where, reader.source))
        features = reader.get("features", list)
        if not all(isinstance(f, str) for f in features):
            reader.fail("must be a list of names", "features")
        temperature = reader.get("temperature", float)
        if temperature <= 0:
            reader.fail(f"must be positive, found {temperature}", "temperature")
        return cls(folder, tuple(features), weights.sha256, temperature)


@dataclass(frozen=True)
class DetectorPart:
    """The opacity detector: one architecture, one weight file per member, the input and
    the tuned box post-processing.

    Several members (e.g. seeds) each detect, their boxes are pooled per image and the
    post-processing's fusion (NMS or WBF over ``len(members)`` sets) merges them, so a
    bundle with several members needs a fusion step in ``postprocess``.
    """

    members: tuple[WeightFile, ...]
    model_config: dict[str, Any]
    preprocessing: Preprocessing
    postprocess: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, reader: _Reader) -> DetectorPart:
        if "members" in reader.data:  # format 4
            listed = reader.get("members", list)
            if not listed:
                reader.fail("no member weight files", "members")
            members = tuple(WeightFile.read(_Reader(m, f"{reader.where}.members[{i}]", reader.source))
                            for i, m in enumerate(listed))
        else:  # format 3: one detector, its file and checksum inline
            members = (WeightFile.read(reader),)
        postprocess = reader.get("postprocess", dict, optional=True) or {}
        if len(members) > 1 and postprocess.get("fusion", "none") == "none":
            reader.fail(f"{len(members)} detector members but no fusion in the post-processing "
                        "(their boxes would be counted twice)", "postprocess")
        return cls(
            members=members,
            model_config=reader.get("model_config", dict),
            preprocessing=Preprocessing.read(reader.child("preprocessing")),  # type: ignore[arg-type]
            postprocess=postprocess,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"members": [asdict(m) for m in self.members], "model_config": self.model_config,
                "preprocessing": asdict(self.preprocessing), "postprocess": self.postprocess}


@dataclass(frozen=True)
class Threshold:
    """The operating threshold on the final P(opacity) and how it was chosen.

    ``score`` names the component whose calibrated P(opacity) is final: ``"image"`` (the
    classifier ensemble) or ``"fusion"`` (the fusion network over metadata and the
    classifier's probabilities).
    """

    value: float
    rule: str
    sensitivity: float
    specificity: float
    score: str

    @classmethod
    def read(cls, reader: _Reader) -> Threshold:
        value = reader.get("value", float)
        if not 0.0 <= value <= 1.0:
            reader.fail(f"must be a probability in [0, 1], found {value}", "value")
        score = reader.get("score", str)
        if score not in THRESHOLD_SCORES:
            reader.fail(f"must be one of {', '.join(THRESHOLD_SCORES)}, found {score!r}", "score")
        return cls(value, reader.get("rule", str), reader.get("sensitivity", float), reader.get("specificity", float), score)


def _number_pair(reader: _Reader, key: str, *, optional: bool = False) -> tuple[float, float] | None:
    value = reader.get(key, list, optional=optional)
    if value is None:
        return None
    if len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        reader.fail(f"must be [low, high], found {value!r}", key)
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        reader.fail(f"must be [low, high] with low <= high, found {value!r}", key)
    return (low, high)


def _counts(reader: _Reader, key: str) -> dict[str, int]:
    value = reader.get(key, dict)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values()):
        reader.fail("must map names to counts (non-negative integers)", key)
    return {str(k): int(v) for k, v in value.items()}


def _names(reader: _Reader, key: str) -> tuple[str, ...]:
    value = reader.get(key, list)
    if not all(isinstance(v, str) for v in value):
        reader.fail("must be a list of names", key)
    return tuple(value)


@dataclass(frozen=True)
class TrainingData:
    """What the bundle's models were trained on: ``model_card.training_data`` (written by ``bundle``).

    Attributes:
        synthetic: True when the training images are lungopacity's synthetic phantoms
            (their DICOMs carry the marker ``io`` reads as ``header["synthetic"]``), False
            when none of the sampled source files does, None when it could not be checked.
        synthetic_evidence: how ``synthetic`` was decided (files sampled, markers found).
        source_folder: the name of the data folder the cache was prepared from.
        n_patients: patients the classifier was trained and validated on.
        patients_per_class: patients per class name.
        views: patients per view (``AP``, ``PA``, ``unknown``).
        sexes: patients per sex (``M``, ``F``, ``unknown``).
        age_range: [youngest, oldest] known age in years, None when no age is known.
        image_rows, image_cols: [smallest, largest] original image side in pixels.
        prepared_size: side of the prepared (cached) image the networks saw.
    """

    synthetic: bool | None
    synthetic_evidence: str
    source_folder: str | None
    n_patients: int
    patients_per_class: dict[str, int]
    views: dict[str, int]
    sexes: dict[str, int]
    age_range: tuple[float, float] | None
    image_rows: tuple[float, float]
    image_cols: tuple[float, float]
    prepared_size: int

    @classmethod
    def read(cls, reader: _Reader) -> TrainingData:
        synthetic = reader.get("synthetic", bool, optional=True)
        return cls(
            synthetic=synthetic,
            synthetic_evidence=reader.get("synthetic_evidence", str),
            source_folder=reader.get("source_folder", str, optional=True),
            n_patients=reader.positive_int("n_patients"),
            patients_per_class=_counts(reader, "patients_per_class"),
            views=_counts(reader, "views"),
            sexes=_counts(reader, "sexes"),
            age_range=_number_pair(reader, "age_range", optional=True),
            image_rows=_number_pair(reader, "image_rows"),  # type: ignore[arg-type]
            image_cols=_number_pair(reader, "image_cols"),  # type: ignore[arg-type]
            prepared_size=reader.positive_int("prepared_size"),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("age_range", "image_rows", "image_cols"):
            data[key] = None if data[key] is None else list(data[key])
        return data

    def warnings(self) -> list[str]:
        """What a person must know before trusting a reading of this bundle (one sentence each)."""
        out = []
        if self.synthetic:
            out.append(
                "This model was trained on synthetic phantom images, not on real radiographs: "
                "its readings of real X-rays mean nothing (a demonstration model)."
            )
        elif self.synthetic is None:
            out.append("Whether this model was trained on real radiographs could not be checked.")
        if self.n_patients < MIN_TRAINING_PATIENTS:
            out.append(
                f"This model was trained on {self.n_patients:,} patients, fewer than {MIN_TRAINING_PATIENTS:,}: "
                "its accuracy is known only roughly and rarer presentations were barely seen."
            )
        return out


@dataclass(frozen=True)
class HeaderRules:
    """The header checks of the applicability gate (a value absent from the header is not checked).

    Attributes:
        modalities: accepted DICOM Modality values (radiographs: CR, DX).
        body_parts: accepted BodyPartExamined values.
        views: accepted ViewPosition values (frontal views the model was trained on).
        age_range: [youngest, oldest] training age in years; None: not checked.
        min_side: smallest accepted side of the original image, pixels.
        max_aspect: largest accepted long side / short side.
    """

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST",)
    views: tuple[str, ...] = ("AP", "PA")
    age_range: tuple[float, float] | None = None
    min_side: int = 64
    max_aspect: float = 1.5

    @classmethod
    def read(cls, reader: _Reader) -> HeaderRules:
        max_aspect = reader.get("max_aspect", float)
        if max_aspect < 1.0:
            reader.fail(f"must be at least 1, found {max_aspect}", "max_aspect")
        return cls(
            modalities=_names(reader, "modalities"),
            body_parts=_names(reader, "body_parts"),
            views=_names(reader, "views"),
            age_range=_number_pair(reader, "age_range", optional=True),
            min_side=reader.positive_int("min_side"),
            max_aspect=max_aspect,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["age_range"] = None if self.age_range is None else list(self.age_range)
        for key in ("modalities", "body_parts", "views"):
            data[key] = list(data[key])
        return data


#: Distance methods the runtime knows (:mod:`lungopacity.inference.applicability`).
APPLICABILITY_METHODS: tuple[str, ...] = ("ppca-mahalanobis",)


@dataclass(frozen=True)
class ApplicabilityPart:
    """The applicability gate: header rules and a per-member model of the classifier's pooled features.

    For member ``k`` the file holds the mean, the leading principal axes and variances and
    the residual variance of its pooled features on the images it trained on; its
    ``thresholds[k]`` is the ``percentile`` of the distance over images it did not train
    on (its validation fold). An image fails when the mean over members of
    ``distance_k / thresholds[k]`` exceeds 1.

    Attributes:
        weights: the ``applicability.safetensors`` file and its SHA-256.
        method: the distance (``"ppca-mahalanobis"``).
        n_components: principal axes kept per member.
        percentile: the percentile of held-out distances used as threshold.
        thresholds: one threshold per classifier member.
        n_fit, n_held_out: images per member used to fit the model and to set the threshold.
        header: the header checks.
    """

    weights: WeightFile
    method: str
    n_components: int
    percentile: float
    thresholds: tuple[float, ...]
    n_fit: tuple[int, ...]
    n_held_out: tuple[int, ...]
    header: HeaderRules

    @classmethod
    def read(cls, reader: _Reader) -> ApplicabilityPart:
        method = reader.get("method", str)
        if method not in APPLICABILITY_METHODS:
            reader.fail(f"must be one of {', '.join(APPLICABILITY_METHODS)}, found {method!r}", "method")
        percentile = reader.get("percentile", float)
        if not 0.0 < percentile <= 100.0:
            reader.fail(f"must be in (0, 100], found {percentile}", "percentile")
        thresholds = reader.get("thresholds", list)
        if not thresholds or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in thresholds):
            reader.fail("must be a non-empty list of positive numbers", "thresholds")
        counts = {}
        for key in ("n_fit", "n_held_out"):
            values = reader.get(key, list)
            if len(values) != len(thresholds) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                reader.fail(f"must hold one count per threshold ({len(thresholds)})", key)
            counts[key] = tuple(values)
        return cls(
            weights=WeightFile.read(reader),
            method=method,
            n_components=reader.positive_int("n_components"),
            percentile=percentile,
            thresholds=tuple(float(t) for t in thresholds),
            n_fit=counts["n_fit"],
            n_held_out=counts["n_held_out"],
            header=HeaderRules.read(reader.child("header")),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.weights.file, "sha256": self.weights.sha256, "method": self.method,
            "n_components": self.n_components, "percentile": self.percentile,
            "thresholds": list(self.thresholds), "n_fit": list(self.n_fit), "n_held_out": list(self.n_held_out),
            "header": self.header.to_dict(),
        }


@dataclass(frozen=True)
class BundleManifest:
    """``bundle.json``: what is in the bundle and how to use it."""

    lungopacity_version: str
    created: str
    classifier: ClassifierPart
    threshold: Threshold
    fusion: FusionPart | None = None
    detector: DetectorPart | None = None
    applicability: ApplicabilityPart | None = None
    model_card: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = CLASS_NAMES
    format_version: int = BUNDLE_FORMAT_VERSION

    @property
    def decision_source(self) -> str:
        """``"image"`` or ``"fusion"``: whose calibrated P(opacity) is the final one."""
        return self.threshold.score

    @property
    def training_data(self) -> TrainingData:
        """The typed ``model_card.training_data`` (checked when the manifest was read)."""
        return TrainingData.read(_Reader(self.model_card.get("training_data"), "model_card.training_data", MANIFEST_FILE))

    def warnings(self) -> list[str]:
        """Warnings every reading of this bundle carries (training data, missing image check)."""
        out = self.training_data.warnings()
        if self.applicability is None:
            out.append("This bundle has no applicability model: images unlike the training data are not detected.")
        return out

    @property
    def weight_files(self) -> list[WeightFile]:
        """Every weight file the bundle needs, for the presence and checksum checks."""
        files = list(self.classifier.members)
        if self.fusion is not None:
            files.append(self.fusion.weights)
        if self.detector is not None:
            files.extend(self.detector.members)
        if self.applicability is not None:
            files.append(self.applicability.weights)
        return files

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``bundle.json``."""
        return {
            "format": BUNDLE_FORMAT,
            "format_version": self.format_version,
            "lungopacity_version": self.lungopacity_version,
            "created": self.created,
            "class_names": list(self.class_names),
            "classifier": {
                "model_config": self.classifier.model_config,
                "preprocessing": asdict(self.classifier.preprocessing),
                "members": [asdict(m) for m in self.classifier.members],
                "temperature": self.classifier.temperature,
            },
            "fusion": None if self.fusion is None else {
                "dir": self.fusion.dir, "features": list(self.fusion.features), "sha256": self.fusion.sha256,
                "temperature": self.fusion.temperature,
            },
            "detector": None if self.detector is None else self.detector.to_dict(),
            "threshold": asdict(self.threshold),
            "applicability": None if self.applicability is None else self.applicability.to_dict(),
            "model_card": self.model_card,
        }

    @classmethod
    def from_dict(cls, data: Any, source: Path | str = MANIFEST_FILE) -> BundleManifest:
        """Validate ``bundle.json``'s content; :class:`BundleError` names the first bad field.

        The format and its version are checked first, so a bundle of another version is
        refused with the advice to rebuild it rather than with a field error.
        """
        from lungopacity import __version__

        top = _Reader(data, "", source)
        if top.data.get("format") != BUNDLE_FORMAT:
            top.fail(f"not a lungopacity bundle (format {top.data.get('format')!r})")
        version = top.data.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            top.fail(
                f"bundle format {version} was written by lungopacity {top.data.get('lungopacity_version')}; "
                f"this is lungopacity {__version__}, which reads format "
                f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))}: rebuild the bundle"
            )
        class_names = top.get("class_names", list)
        if list(class_names) != list(CLASS_NAMES):
            top.fail(f"classes {class_names} differ from {list(CLASS_NAMES)}", "class_names")
        fusion = top.child("fusion", optional=True)
        detector = top.child("detector", optional=True)
        applicability = top.child("applicability", optional=True)
        classifier = ClassifierPart.read(top.child("classifier"))  # type: ignore[arg-type]
        threshold = Threshold.read(top.child("threshold"))  # type: ignore[arg-type]
        card = top.child("model_card")
        TrainingData.read(card.child("training_data"))  # type: ignore[union-attr,arg-type]
        if (threshold.score == "fusion") != (fusion is not None):
            top.fail(f"threshold.score is {threshold.score!r} but the bundle {'has' if fusion else 'has no'} fusion part",
                     "threshold")
        gate = ApplicabilityPart.read(applicability) if applicability is not None else None
        if gate is not None and len(gate.thresholds) != len(classifier.members):
            top.fail(f"{len(gate.thresholds)} thresholds for {len(classifier.members)} classifier members",
                     "applicability.thresholds")
        return cls(
            lungopacity_version=top.get("lungopacity_version", str),
            created=top.get("created", str),
            classifier=classifier,
            threshold=threshold,
            fusion=FusionPart.read(fusion) if fusion is not None else None,
            detector=DetectorPart.read(detector) if detector is not None else None,
            applicability=gate,
            model_card=card.data,  # type: ignore[union-attr]
            class_names=tuple(class_names),
            format_version=version,
        )


__all__ = [
    "APPLICABILITY_METHODS",
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "READABLE_FORMAT_VERSIONS",
    "MANIFEST_FILE",
    "MIN_TRAINING_PATIENTS",
    "ApplicabilityPart",
    "BundleManifest",
    "HeaderRules",
    "TrainingData",
    "ClassifierPart",
    "DetectorPart",
    "FusionPart",
    "Preprocessing",
    "Threshold",
    "WeightFile",
    "scale_probability",
]
