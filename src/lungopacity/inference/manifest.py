"""The bundle manifest (``bundle.json``) as typed records, validated when read.

A bundle is written by the training side (:mod:`lungopacity.engine.bundle`) and read by
the runtime (:mod:`lungopacity.inference.bundle`); this module is the contract between
the two. :meth:`BundleManifest.from_dict` checks every field it relies on and raises
:class:`~lungopacity.errors.BundleError` naming the file and the field, so a damaged or
hand-edited ``bundle.json`` is one clear line instead of a ``KeyError`` deep in the
predictor. The schema has a version (:data:`BUNDLE_FORMAT_VERSION`); a bundle of another
version is refused with the advice to rebuild it.

Layout of ``bundle.json`` (format version 2)::

    format, format_version, lungopacity_version, created, class_names
    classifier:  model_config, preprocessing {prepared_size, input_size, window},
                 members [{file, sha256}], temperature
    fusion:      null | {dir, features, sha256}
    detector:    null | {file, sha256, model_config, preprocessing, postprocess}
    threshold:   {value, rule, sensitivity, specificity, score}
    model_card:  free-form JSON object (intended use, training data, validation, limits)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lungopacity.constants import CLASS_NAMES
from lungopacity.errors import BundleError

BUNDLE_FORMAT = "lungopacity-bundle"
BUNDLE_FORMAT_VERSION = 2
MANIFEST_FILE = "bundle.json"
#: What the operating threshold is compared with.
THRESHOLD_SCORES: tuple[str, ...] = ("classifier", "fused")


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
    """The fusion network's folder inside the bundle and the checksum of its weights."""

    dir: str
    features: tuple[str, ...]
    sha256: str

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
        return cls(folder, tuple(features), weights.sha256)


@dataclass(frozen=True)
class DetectorPart:
    """The opacity detector: architecture, weights, input and the tuned box post-processing."""

    weights: WeightFile
    model_config: dict[str, Any]
    preprocessing: Preprocessing
    postprocess: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, reader: _Reader) -> DetectorPart:
        return cls(
            weights=WeightFile.read(reader),
            model_config=reader.get("model_config", dict),
            preprocessing=Preprocessing.read(reader.child("preprocessing")),  # type: ignore[arg-type]
            postprocess=reader.get("postprocess", dict, optional=True) or {},
        )

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.weights.file, "sha256": self.weights.sha256, "model_config": self.model_config,
                "preprocessing": asdict(self.preprocessing), "postprocess": self.postprocess}


@dataclass(frozen=True)
class Threshold:
    """The operating threshold on the final P(opacity) and how it was chosen."""

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


@dataclass(frozen=True)
class BundleManifest:
    """``bundle.json``: what is in the bundle and how to use it."""

    lungopacity_version: str
    created: str
    classifier: ClassifierPart
    threshold: Threshold
    fusion: FusionPart | None = None
    detector: DetectorPart | None = None
    model_card: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = CLASS_NAMES
    format_version: int = BUNDLE_FORMAT_VERSION

    @property
    def weight_files(self) -> list[WeightFile]:
        """Every weight file the bundle needs, for the presence and checksum checks."""
        files = list(self.classifier.members)
        if self.fusion is not None:
            files.append(self.fusion.weights)
        if self.detector is not None:
            files.append(self.detector.weights)
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
            },
            "detector": None if self.detector is None else self.detector.to_dict(),
            "threshold": asdict(self.threshold),
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
        if version != BUNDLE_FORMAT_VERSION:
            top.fail(
                f"bundle format {version} was written by lungopacity {top.data.get('lungopacity_version')}; "
                f"this is lungopacity {__version__}, which reads format {BUNDLE_FORMAT_VERSION}: rebuild the bundle"
            )
        class_names = top.get("class_names", list)
        if list(class_names) != list(CLASS_NAMES):
            top.fail(f"classes {class_names} differ from {list(CLASS_NAMES)}", "class_names")
        fusion = top.child("fusion", optional=True)
        detector = top.child("detector", optional=True)
        return cls(
            lungopacity_version=top.get("lungopacity_version", str),
            created=top.get("created", str),
            classifier=ClassifierPart.read(top.child("classifier")),  # type: ignore[arg-type]
            threshold=Threshold.read(top.child("threshold")),  # type: ignore[arg-type]
            fusion=FusionPart.read(fusion) if fusion is not None else None,
            detector=DetectorPart.read(detector) if detector is not None else None,
            model_card=top.get("model_card", dict, optional=True) or {},
            class_names=tuple(class_names),
            format_version=version,
        )


__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_FILE",
    "BundleManifest",
    "ClassifierPart",
    "DetectorPart",
    "FusionPart",
    "Preprocessing",
    "Threshold",
    "WeightFile",
]
