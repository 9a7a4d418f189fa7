"""What the HTTP API returns: pydantic models, so ``/openapi.json`` documents every answer.

The prediction itself is :class:`lungopacity.inference.Prediction`; these models are
its JSON form plus what only the service adds (the upload's hash, the pictures as
``data:`` URLs, the plain-language summary and the notice that it is not a diagnosis).
The pictures are layers, not finished drawings: the radiograph as a display-size grey
JPEG, the boxes as numbers (the page draws them as vectors) and, on request
(``heatmap=true``), the heatmap as a small RGBA PNG to stretch over the JPEG.
"""

from __future__ import annotations

import base64
from typing import Any

from pydantic import BaseModel, Field

from lungopacity.inference import Prediction, Reading
from lungopacity.inference.gradcam import HEATMAP_CAPTION

#: Shown with every result, on the page and in the API answer.
DISCLAIMER = (
    "This is not a diagnosis. The result comes from a machine-learning model and must be "
    "reviewed by a qualified clinician together with the full clinical picture."
)


class BoxOut(BaseModel):
    """One opacity box, xyxy in the pixels of the uploaded image (docs/OUTPUTS.md)."""

    x1: float
    y1: float
    x2: float
    y2: float
    box_confidence: float = Field(
        description="detector score x box_gating_factor, in [0, 1]: the box's confidence after gating"
    )
    detector_score: float | None = Field(None, description="the detector's own score for the box, before gating")
    score: float = Field(description="the same as box_confidence (kept for older clients)")


class UploadInfo(BaseModel):
    """What the service saw of the upload (no file name: it may identify a patient)."""

    sha256: str = Field(description="first 16 hex digits of the SHA-256 of the uploaded bytes")
    bytes: int
    format: str = Field(description="format sniffed from the content: dicom, png, jpeg or tiff")


class PredictResponse(BaseModel):
    """The answer of ``POST /v1/predict``."""

    id: str = Field(description="a name derived from the upload's hash (never the file name)")
    model_version: str
    summary: str = Field(description='plain-language result, e.g. "Signs of lung opacity found (probability 0.83)"')
    disclaimer: str
    probabilities: dict[str, float] = Field(
        description="the classifier's class probabilities keyed normal, not_normal, lung_opacity"
    )
    image_probability: float | None = Field(None, description="the classifier ensemble's calibrated P(opacity)")
    opacity_probability: float = Field(
        description="the final calibrated P(opacity) of the component the bundle chose (decision_source)"
    )
    decision_source: str = Field("image", description="which component produced the decision: image | fusion")
    decision: bool | None = Field(
        description="True when opacity_probability >= threshold; null when the image is outside what the model "
        "was trained on (not_applicable_reasons say why): no finding either way"
    )
    threshold: float
    applicable: bool = Field(True, description="False when the applicability gate refused the image")
    not_applicable_reasons: list[str] = Field(default_factory=list, description="why there is no decision")
    unchecked: list[str] = Field(default_factory=list, description="applicability checks that could not be made")
    uncertain: bool = Field(False, description="the ensemble's members fall on both sides of the threshold")
    member_probabilities: list[float] = Field(default_factory=list, description="each member's P(opacity)")
    boxes: list[BoxOut] = Field(description="opacity boxes, xyxy in original pixels")
    boxes_note: str | None = Field(None, description="why a positive decision has no box, when it has none")
    image_size: list[int] = Field(description="[rows, cols] of the uploaded image")
    metadata: dict[str, Any] = Field(description="the sex / age / view used")
    metadata_source: dict[str, str] = Field(
        default_factory=dict, description="where each of sex / age / view came from: header | given | missing"
    )
    missing: list[str] = Field(description="metadata inputs that were missing and imputed")
    imputed: dict[str, float] = Field(default_factory=dict, description="the values used in place of missing ones")
    model_warnings: list[str] = Field(
        default_factory=list, description="what to know about the model, e.g. trained on synthetic data"
    )
    timings: dict[str, float] = Field(description="seconds per stage; queue_wait and server_total added by the service")
    upload: UploadInfo
    image_jpeg: str | None = Field(
        None, description="the radiograph alone at display size (longest side at most 1024 pixels), grey, as a "
        "data:image/jpeg;base64 URL; the boxes are drawn over it by the client (images=true, the default)"
    )
    display_size: list[int] | None = Field(
        None, description="[rows, cols] of image_jpeg; boxes scale from image_size to it"
    )
    heatmap_png: str | None = Field(
        None, description="only with heatmap=true: the Grad-CAM map as a data:image/png;base64 URL of an RGBA layer "
        "(viridis colour scale, relative: 1 is the map's maximum; transparent where low and outside the image "
        "content), with image_jpeg's aspect ratio and at most 256 pixels long, to be stretched over image_jpeg "
        "under the boxes"
    )
    heatmap_caption: str | None = Field(
        None, description="with heatmap_png: what the heatmap shows and may not be read as (measured on real boxes)"
    )


class ErrorBody(BaseModel):
    """A machine-readable code and a message a person can act on."""

    code: str
    message: str


class ErrorResponse(BaseModel):
    """Every error of the API has this shape."""

    error: ErrorBody


class HealthResponse(BaseModel):
    """``GET /healthz``: the process answers."""

    status: str = "ok"


class ReadyResponse(BaseModel):
    """``GET /readyz``: the model bundle is loaded."""

    status: str = "ready"
    model_version: str


class InfoResponse(BaseModel):
    """``GET /v1/info``: what a client needs before uploading."""

    ready: bool
    model_version: str | None
    max_upload_bytes: int
    formats: list[str]
    disclaimer: str
    model_warnings: list[str] = Field(
        default_factory=list, description="what to know about the model, e.g. trained on synthetic data"
    )


def summary_text(prediction: Prediction) -> str:
    """The plain-language result shown to a person.

    >>> from lungopacity.inference import Prediction
    >>> summary_text(Prediction("a", {}, 0.834, True, 0.5))
    'Signs of lung opacity found (probability 0.83)'
    >>> summary_text(Prediction("a", {}, 0.9, None, 0.5, not_applicable_reasons=["modality MR is not CR or DX"]))
    'No reading: the image is outside what the model was trained on (modality MR is not CR or DX)'
    """
    if prediction.decision is None:
        reasons = "; ".join(prediction.not_applicable_reasons) or "the applicability checks failed"
        return f"No reading: the image is outside what the model was trained on ({reasons})"
    if prediction.decision:
        return f"Signs of lung opacity found (probability {prediction.opacity_probability:.2f})"
    return f"No lung opacity found (probability {prediction.opacity_probability:.2f})"


def png_data_url(png: bytes | None) -> str | None:
    """``data:image/png;base64,...`` for inline display, or None when there is no picture."""
    if png is None:
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def jpeg_data_url(jpeg: bytes | None) -> str | None:
    """``data:image/jpeg;base64,...`` for inline display, or None when there is no picture."""
    if jpeg is None:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def predict_response(reading: Reading, upload: UploadInfo, *, queue_wait: float, server_total: float) -> PredictResponse:
    """The answer of ``POST /v1/predict`` for one reading: the only place it is built.

    Args:
        reading: what the predictor returned (prediction and pictures).
        upload: the upload's hash, size and sniffed format.
        queue_wait: seconds the request waited for an inference worker.
        server_total: seconds from the request's arrival to this answer.
    """
    prediction = reading.prediction
    timings = {key: float(value) for key, value in prediction.timings.items()}
    timings["queue_wait"] = queue_wait
    timings["server_total"] = server_total
    return PredictResponse(
        id=prediction.id,
        model_version=prediction.model_version,
        summary=summary_text(prediction),
        disclaimer=DISCLAIMER,
        probabilities={key: float(value) for key, value in prediction.probabilities.items()},
        image_probability=prediction.image_probability,
        opacity_probability=float(prediction.opacity_probability),
        decision_source=prediction.decision_source,
        decision=None if prediction.decision is None else bool(prediction.decision),
        threshold=float(prediction.threshold),
        applicable=prediction.applicable,
        not_applicable_reasons=list(prediction.not_applicable_reasons),
        unchecked=list(prediction.unchecked),
        uncertain=bool(prediction.uncertain),
        member_probabilities=list(prediction.member_probabilities),
        boxes=[BoxOut(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, box_confidence=b.box_confidence,
                      detector_score=b.detector_score, score=b.box_confidence) for b in prediction.boxes],
        boxes_note=prediction.boxes_note,
        image_size=[int(v) for v in prediction.image_size],
        metadata=dict(prediction.metadata),
        metadata_source=dict(prediction.metadata_source),
        missing=list(prediction.missing),
        imputed=dict(prediction.imputed),
        model_warnings=list(prediction.model_warnings),
        timings=timings,
        upload=upload,
        image_jpeg=jpeg_data_url(getattr(reading, "display_jpeg", None)),
        display_size=[int(v) for v in reading.display_size] if getattr(reading, "display_size", None) else None,
        heatmap_png=png_data_url(getattr(reading, "heatmap_layer_png", None)),
        heatmap_caption=HEATMAP_CAPTION if getattr(reading, "heatmap_layer_png", None) else None,
    )
