"""What the HTTP API returns: pydantic models, so ``/openapi.json`` documents every answer.

The prediction itself is :class:`lungopacity.inference.Prediction`; these models are
its JSON form plus what only the service adds (the upload's hash, the pictures as
``data:`` URLs, the plain-language summary and the notice that it is not a diagnosis).
"""

from __future__ import annotations

import base64
from typing import Any

from pydantic import BaseModel, Field

from lungopacity.inference import Prediction, Reading

#: Shown with every result, on the page and in the API answer.
DISCLAIMER = (
    "This is not a diagnosis. The result comes from a machine-learning model and must be "
    "reviewed by a qualified clinician together with the full clinical picture."
)


class BoxOut(BaseModel):
    """One opacity box, xyxy in the pixels of the uploaded image."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float = Field(description="the box's confidence in [0, 1]")


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
    opacity_probability: float = Field(description="the final (fused) P(opacity)")
    decision: bool = Field(description="True when opacity_probability >= threshold")
    threshold: float
    boxes: list[BoxOut] = Field(description="opacity boxes, xyxy in original pixels")
    image_size: list[int] = Field(description="[rows, cols] of the uploaded image")
    metadata: dict[str, Any] = Field(description="the sex / age / view used")
    missing: list[str] = Field(description="metadata inputs that were missing and imputed")
    timings: dict[str, float] = Field(description="seconds per stage; queue_wait and server_total added by the service")
    upload: UploadInfo
    overlay_png: str | None = Field(None, description="the image with boxes, as a data:image/png;base64 URL")
    heatmap_png: str | None = Field(None, description="the Grad-CAM heatmap, as a data:image/png;base64 URL")


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


def summary_text(prediction: Prediction) -> str:
    """The plain-language result shown to a person.

    >>> from lungopacity.inference import Prediction
    >>> summary_text(Prediction("a", {}, 0.834, True, 0.5))
    'Signs of lung opacity found (probability 0.83)'
    """
    if prediction.decision:
        return f"Signs of lung opacity found (probability {prediction.opacity_probability:.2f})"
    return f"No lung opacity found (probability {prediction.opacity_probability:.2f})"


def png_data_url(png: bytes | None) -> str | None:
    """``data:image/png;base64,...`` for inline display, or None when there is no picture."""
    if png is None:
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


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
        opacity_probability=float(prediction.opacity_probability),
        decision=bool(prediction.decision),
        threshold=float(prediction.threshold),
        boxes=[BoxOut(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, score=b.score) for b in prediction.boxes],
        image_size=[int(v) for v in prediction.image_size],
        metadata=dict(prediction.metadata),
        missing=list(prediction.missing),
        timings=timings,
        upload=upload,
        overlay_png=png_data_url(reading.overlay_png),
        heatmap_png=png_data_url(reading.heatmap_png),
    )
