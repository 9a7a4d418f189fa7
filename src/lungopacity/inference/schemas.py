"""What a prediction is: the contract between the predictor, the CLI and the web service."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lungopacity.constants import CLASS_KEYS


@dataclass
class Box:
    """One opacity box in original pixels (xyxy) with its final score."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float

    def xywh(self) -> tuple[float, float, float, float]:
        """The RSNA/submission form (x, y, width, height)."""
        return (self.x1, self.y1, self.x2 - self.x1, self.y2 - self.y1)


@dataclass
class Prediction:
    """The reading of one radiograph.

    Attributes:
        id: the input's name without extension (file stem or upload name).
        probabilities: the classifier's calibrated class probabilities, keyed by
            ``CLASS_KEYS`` (``normal``, ``not_normal``, ``lung_opacity``).
        opacity_probability: the final P(opacity): the fusion network's output when
            the bundle has one, else the classifier's Lung Opacity probability.
        decision: True when ``opacity_probability >= threshold``.
        threshold: the operating threshold of the bundle.
        boxes: opacity boxes in original pixels (empty when the decision is negative
            or nothing was found).
        metadata: the sex / age / view used (None where missing: the fusion network
            imputes it with its training statistics).
        metadata_source: where each of sex / age / view came from: "header" (the
            file), "given" (an option, a metadata CSV or the form) or "missing".
        missing: the metadata inputs that were missing and imputed ("sex", "age", "view").
        image_size: (rows, cols) of the original image.
        timings: seconds per stage ("read", "classify", "detect", "total", ...).
    """

    id: str
    probabilities: dict[str, float]
    opacity_probability: float
    decision: bool
    threshold: float
    boxes: list[Box] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    metadata_source: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)
    timings: dict[str, float] = field(default_factory=dict)
    model_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what predictions.json and the HTTP API return)."""
        data = asdict(self)
        data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        """The inverse of :meth:`to_dict` (reading ``predictions.json`` or a journal back)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["boxes"] = [Box(**b) for b in data.get("boxes", [])]
        values["image_size"] = tuple(data.get("image_size", (0, 0)))
        return cls(**values)

    @classmethod
    def csv_columns(cls) -> list[str]:
        """The columns of predictions.csv, in order."""
        blank = cls(id="", probabilities={k: 0.0 for k in CLASS_KEYS}, opacity_probability=0.0, decision=False,
                    threshold=0.5)
        return list(blank.csv_row())

    def csv_row(self) -> dict[str, Any]:
        """One row of predictions.csv."""
        row: dict[str, Any] = {"id": self.id}
        for key in CLASS_KEYS:
            row[f"p_{key}"] = self.probabilities[key]
        row["opacity_probability"] = self.opacity_probability
        row["decision"] = int(self.decision)
        row["threshold"] = self.threshold
        row["n_boxes"] = len(self.boxes)
        row["boxes"] = " ".join(f"{b.score:.4f} {b.x1:.1f} {b.y1:.1f} {b.x2:.1f} {b.y2:.1f}" for b in self.boxes)
        row["sex"], row["age"], row["view"] = (self.metadata.get(k) for k in ("sex", "age", "view"))
        row["missing"] = ";".join(self.missing)
        return row


@dataclass
class Reading:
    """A prediction plus the pictures a person looks at (PNG bytes)."""

    prediction: Prediction
    overlay_png: bytes | None = None
    heatmap_png: bytes | None = None
