"""What a prediction is: the contract between the predictor, the CLI and the web service.

Every field is defined in ``docs/OUTPUTS.md`` (units, conventions, formulas); the
docstrings here are the short form.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lungopacity.constants import CLASS_KEYS

#: ``decision_source`` values: whose calibrated P(opacity) is the final one.
DECISION_SOURCES: tuple[str, ...] = ("image", "fusion")


@dataclass
class Box:
    """One opacity box, xyxy in original pixels.

    Attributes:
        x1, y1, x2, y2: left, top, right, bottom edges in pixels of the original image.
        box_confidence: ``detector_score x box_gating_factor`` of the prediction (the
            score the box threshold was tuned on); not a probability of opacity.
        detector_score: the detector's own score of the box (after box fusion), in [0, 1].
    """

    x1: float
    y1: float
    x2: float
    y2: float
    box_confidence: float
    detector_score: float | None = None

    @property
    def score(self) -> float:
        """The former name of :attr:`box_confidence` (kept for callers not yet updated)."""
        return self.box_confidence

    def xywh(self) -> tuple[float, float, float, float]:
        """The RSNA/submission form (x, y, width, height)."""
        return (self.x1, self.y1, self.x2 - self.x1, self.y2 - self.y1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Box:
        values = dict(data)
        if "score" in values and "box_confidence" not in values:  # a journal of an earlier version
            values["box_confidence"] = values.pop("score")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Prediction:
    """The reading of one radiograph.

    Attributes:
        id: the input's name without extension (file stem or upload name).
        probabilities: the classifier ensemble's calibrated class probabilities, keyed
            by ``CLASS_KEYS`` (``normal``, ``not_normal``, ``lung_opacity``).
        opacity_probability: the final P(opacity): the calibrated output of the
            component named by ``decision_source``.
        decision: True / False when ``opacity_probability >= threshold`` / below; None
            (no decision) when the image failed the applicability gate
            (``not_applicable_reasons``).
        threshold: the bundle's operating threshold on ``opacity_probability``.
        image_probability: the classifier ensemble's calibrated P(opacity)
            (``probabilities["lung_opacity"]``).
        decision_source: ``"image"`` (the classifier decides) or ``"fusion"`` (the fusion
            network over sex / age / view and the classifier's probabilities).
        boxes: opacity boxes in original pixels (empty unless the decision is positive).
        boxes_note: why a positive decision has no box, or why there are no boxes at all
            when that needs saying; None otherwise.
        box_gating_factor: the factor the detector scores were multiplied by (the
            classifier's uncalibrated P(opacity)); None when the bundle does not gate.
        member_probabilities: the final P(opacity) of each ensemble member alone.
        member_std, member_min, member_max: their spread.
        uncertain: True when the members fall on both sides of the threshold.
        applicable: False when a check of the applicability gate failed.
        not_applicable_reasons: one sentence per failed check.
        unchecked: checks that could not be made (the value is unknown).
        feature_distance: mean over members of (feature distance / threshold); above 1
            the image does not resemble the training images.
        metadata: the sex / age / view of the image (None where unknown).
        metadata_source: per field: "header" (the file), "given" (an option, a metadata
            CSV or the form) or "missing".
        missing: the metadata inputs the fusion network lacked and imputed.
        imputed: the fusion input values used instead (``sex_male``: fraction male,
            ``age``: years, ``view_ap``: fraction AP, all training statistics).
        image_size: (rows, cols) of the original image.
        timings: seconds per stage ("read", "classify", "detect", "total", ...).
        model_version: the bundle's version string.
        model_warnings: what the bundle's provenance says a person must know.
    """

    id: str
    probabilities: dict[str, float]
    opacity_probability: float
    decision: bool | None
    threshold: float
    image_probability: float | None = None
    decision_source: str = "image"
    boxes: list[Box] = field(default_factory=list)
    boxes_note: str | None = None
    box_gating_factor: float | None = None
    member_probabilities: list[float] = field(default_factory=list)
    member_std: float | None = None
    member_min: float | None = None
    member_max: float | None = None
    uncertain: bool = False
    applicable: bool = True
    not_applicable_reasons: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    feature_distance: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    metadata_source: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    imputed: dict[str, float] = field(default_factory=dict)
    image_size: tuple[int, int] = (0, 0)
    timings: dict[str, float] = field(default_factory=dict)
    model_version: str = ""
    model_warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.image_probability is None and "lung_opacity" in self.probabilities:
            self.image_probability = float(self.probabilities["lung_opacity"])

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
        values["boxes"] = [Box.from_dict(b) for b in data.get("boxes", [])]
        values["image_size"] = tuple(data.get("image_size", (0, 0)))
        return cls(**values)

    @classmethod
    def csv_columns(cls) -> list[str]:
        """The columns of predictions.csv, in order."""
        blank = cls(id="", probabilities={k: 0.0 for k in CLASS_KEYS}, opacity_probability=0.0, decision=False,
                    threshold=0.5)
        return list(blank.csv_row())

    def csv_row(self) -> dict[str, Any]:
        """One row of predictions.csv (see docs/OUTPUTS.md): lists joined with ``;``, boxes as JSON."""
        row: dict[str, Any] = {"id": self.id}
        row["decision"] = "" if self.decision is None else int(self.decision)
        row["opacity_probability"] = self.opacity_probability
        row["decision_source"] = self.decision_source
        row["image_probability"] = self.image_probability
        row["threshold"] = self.threshold
        for key in CLASS_KEYS:
            row[f"p_{key}"] = self.probabilities[key]
        row["member_std"], row["member_min"], row["member_max"] = self.member_std, self.member_min, self.member_max
        row["uncertain"] = int(self.uncertain)
        row["applicable"] = int(self.applicable)
        row["not_applicable_reasons"] = "; ".join(self.not_applicable_reasons)
        row["unchecked"] = ";".join(self.unchecked)
        row["feature_distance"] = self.feature_distance
        row["n_boxes"] = len(self.boxes)
        row["boxes"] = json.dumps([asdict(b) for b in self.boxes]) if self.boxes else ""
        row["boxes_note"] = self.boxes_note or ""
        row["box_gating_factor"] = self.box_gating_factor
        for key in ("sex", "age", "view"):
            row[key] = self.metadata.get(key)
            row[f"{key}_source"] = self.metadata_source.get(key, "")
        row["missing"] = ";".join(self.missing)
        row["imputed"] = ";".join(f"{k}={v:g}" for k, v in self.imputed.items())
        return row


@dataclass
class Reading:
    """A prediction plus the pictures a person looks at.

    Attributes:
        overlay_png, heatmap_png: ``predict``'s pictures, drawn whole (boxes over the
            image; the heatmap with the boxes on top and a colour bar), at display size.
        display_jpeg: the web page's picture: the radiograph alone, grey JPEG at display
            size (the page draws the boxes over it from the numbers).
        display_size: (rows, cols) of ``display_jpeg``.
        heatmap_layer_png: the web page's heatmap: an RGBA PNG (viridis, transparent
            where low and outside the image content) to stretch over ``display_jpeg``.
    """

    prediction: Prediction
    overlay_png: bytes | None = None
    heatmap_png: bytes | None = None
    display_jpeg: bytes | None = None
    display_size: tuple[int, int] | None = None
    heatmap_layer_png: bytes | None = None
