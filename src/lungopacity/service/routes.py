"""The endpoints: the page, the probes, ``/v1/info``, ``/v1/predict`` and ``/metrics``.

``POST /v1/predict`` runs in this order, so that nothing a slow client does can hold a
worker: the declared size (413 unread) -> the model is loaded (503) -> the inference line
is not full already (503 unread) -> an upload slot (503) -> the body, under deadlines
(408/413/400) -> the form and the file's checks (400/413/415) -> an inference ticket
(503) -> the reading (200, 422, 500).
"""

from __future__ import annotations

import logging
import math
import time
from enum import Enum
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from lungopacity.constants import SEXES, VIEWS
from lungopacity.inference import InputError, Reading
from lungopacity.service.errors import CLOSE, ApiError
from lungopacity.service.gate import InferenceGate, UploadSlots
from lungopacity.service.loading import PredictorLike, ServiceState
from lungopacity.service.metrics import ServiceMetrics
from lungopacity.service.schemas import (
    DISCLAIMER,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    PredictResponse,
    ReadyResponse,
    predict_response,
)
from lungopacity.service.settings import ServiceSettings
from lungopacity.service.upload import ACCEPTED_FORMATS, MAX_AGE_YEARS, check_upload, parse_overrides, read_multipart, too_large

log = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "bad form field (sex, age, view) or malformed request"},
    401: {"model": ErrorResponse, "description": "the server was started with a token and the request lacks it"},
    408: {"model": ErrorResponse, "description": "the upload took too long or stalled"},
    413: {"model": ErrorResponse, "description": "upload, or the image's pixel count, over the limit"},
    415: {"model": ErrorResponse, "description": "not a DICOM, PNG, JPEG or TIFF (sniffed from the content); "
          "with format=dicom, not a DICOM"},
    421: {"model": ErrorResponse, "description": "the Host header names a host this server does not serve"},
    422: {"model": ErrorResponse, "description": "recognised format but unreadable image"},
    503: {"model": ErrorResponse, "description": "busy (uploads or queue full, see Retry-After) or model not loaded"},
    500: {"model": ErrorResponse, "description": "internal error (no details are given)"},
    501: {"model": ErrorResponse, "description": "format=dicom on a server without the DICOM libraries (lungopacity[dicom])"},
}

DICOM_MEDIA_TYPE = 'multipart/related; type="application/dicom"'


class ResultFormat(str, Enum):
    """What ``POST /v1/predict`` answers with."""

    json = "json"
    dicom = "dicom"


_PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "format=json: the reading (below). format=dicom: a multipart/related body of three "
                       "DICOM Part 10 files, as a STOW-RS request carries them: the Structured Report "
                       "(TID 1500), the Grayscale Softcopy Presentation State with the boxes, and the "
                       "Secondary Capture with the overlay, in the upload's study as new series; the "
                       "reading's decision, probability and model version also come as X-Lungopacity-* headers.",
        "content": {DICOM_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    **ERROR_RESPONSES,
}

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "one DICOM, PNG or JPEG radiograph"},
                        "sex": {"type": "string", "enum": list(SEXES), "description": "overrides the DICOM header"},
                        "age": {"type": "number", "minimum": 0, "maximum": MAX_AGE_YEARS, "description": "years; overrides the header"},
                        "view": {"type": "string", "enum": list(VIEWS), "description": "overrides the header"},
                    },
                }
            }
        },
    }
}

_BUSY_MESSAGE = "The server is busy reading other X-rays; try again in a few seconds."


def _static_bytes(name: str) -> bytes:
    return resources.files("lungopacity.service").joinpath("static", name).read_bytes()


def _heatmap_option(heatmap: bool) -> dict[str, bool]:
    """``with_heatmap`` only when asked for, so predictors without the keyword still serve readings."""
    return {"with_heatmap": True} if heatmap else {}


def ready_predictor(state: ServiceState, headers: dict[str, str] | None = None) -> PredictorLike:
    """The loaded predictor, or :class:`ApiError` 503 saying why there is none."""
    predictor = state.predictor
    if predictor is not None:
        return predictor
    if state.load_error is not None:
        raise ApiError(
            503, "model_unavailable",
            "The model bundle could not be loaded; the administrator must check the bundle (details in the server log).",
            headers,
        )
    raise ApiError(503, "not_ready", "The model is still loading; try again in a few seconds.", {"Retry-After": "5", **(headers or {})})


def dicom_results_available() -> None:
    """Raise :class:`ApiError` 501 when this server cannot make DICOM results."""
    import importlib.util

    if importlib.util.find_spec("highdicom") is None:
        raise ApiError(501, "dicom_unavailable",
                       "This server cannot make DICOM results: the administrator must install lungopacity[dicom].")


def build_router(
    settings: ServiceSettings,
    state: ServiceState,
    gate: InferenceGate,
    uploads: UploadSlots,
    metrics: ServiceMetrics,
) -> APIRouter:
    """All the service's routes, bound to its settings, model state, gates and metrics."""
    router = APIRouter()
    index_html = _static_bytes("index.html").decode("utf-8")
    favicon = _static_bytes("favicon.ico")

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html)

    @router.get("/favicon.ico", include_in_schema=False)
    async def favicon_ico() -> Response:
        return Response(favicon, media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"})

    @router.get("/healthz", response_model=HealthResponse, tags=["status"])
    async def healthz() -> HealthResponse:
        """The process is alive (says nothing about the model). Needs no token."""
        return HealthResponse()

    @router.get("/readyz", response_model=ReadyResponse, responses={503: ERROR_RESPONSES[503]}, tags=["status"])
    async def readyz() -> ReadyResponse:
        """The model bundle is loaded and predictions can be served."""
        predictor = ready_predictor(state)
        return ReadyResponse(model_version=str(predictor.version))

    @router.get(
        "/metrics", response_class=PlainTextResponse, tags=["status"],
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}},
    )
    async def prometheus_metrics() -> Response:
        """Requests by route and status, inference latency, queue depth, uploads in flight."""
        return metrics.response()

    @router.get("/v1/info", response_model=InfoResponse, tags=["predict"])
    async def info() -> InfoResponse:
        """Limits and model version, for clients to check before uploading."""
        predictor = state.predictor
        return InfoResponse(
            ready=predictor is not None,
            model_version=str(predictor.version) if predictor is not None else None,
            max_upload_bytes=settings.max_upload_bytes,
            formats=list(ACCEPTED_FORMATS),
            disclaimer=DISCLAIMER,
            # A test fake may not know its warnings; a real predictor always does.
            model_warnings=list(getattr(predictor, "warnings", []) or []) if predictor is not None else [],
        )

    @router.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=_PREDICT_RESPONSES,
        openapi_extra=_PREDICT_BODY,
        tags=["predict"],
    )
    async def predict(
        request: Request, images: bool = True, heatmap: bool = False,
        format: ResultFormat = ResultFormat.json,  # noqa: A002 - the query name
    ) -> Response:
        """Read one radiograph (multipart field ``file``; optional ``sex``, ``age``, ``view``).

        ``images`` (default true): add ``image_jpeg``, the radiograph at display size
        (the boxes are numbers in original pixels; a client draws them over it).
        ``heatmap=true``: add ``heatmap_png``, the Grad-CAM layer (costs a backward pass;
        the page asks for it only when the heatmap is switched on). Set ``format=dicom``
        (DICOM uploads only) for the results as DICOM objects instead of JSON: SR, GSPS and
        Secondary Capture in one ``multipart/related`` body, for a viewer or PACS to store.
        """
        began = time.perf_counter()
        as_dicom = format is ResultFormat.dicom
        if as_dicom:
            dicom_results_available()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise too_large(settings.max_upload_bytes)
        predictor = ready_predictor(state, CLOSE)
        if gate.full:  # no point receiving a body that could not be read now; checked again below
            metrics.refused("queue_full")
            log.warning("busy: %d requests admitted, refusing one unread", gate.admitted)
            raise ApiError(503, "busy", _BUSY_MESSAGE, {"Retry-After": str(gate.retry_after_seconds()), **CLOSE})

        # 1. The body, in an upload slot, under deadlines; no worker is held meanwhile.
        if not uploads.try_acquire():
            metrics.refused("uploads_full")
            log.warning("busy: %d uploads being received, refusing one", uploads.in_flight)
            retry = max(1, math.ceil(settings.stall_timeout))
            raise ApiError(503, "busy", _BUSY_MESSAGE, {"Retry-After": str(retry), **CLOSE})
        try:
            form = await read_multipart(
                request.headers.get("content-type", ""), request.stream(),
                max_file_bytes=settings.max_upload_bytes, max_body_bytes=settings.max_body_bytes,
                timeouts=settings.upload_timeouts,
            )
        except ApiError as exc:
            if exc.status == 408:
                metrics.refused("upload_timeout")
                log.info("upload cut off: %s", exc.message)
            raise
        finally:
            uploads.release()

        # 2. What was sent, checked before any decoding.
        overrides = parse_overrides(form.fields)
        data, upload = check_upload(form, settings.max_pixels)
        digest = upload.sha256
        if as_dicom and upload.format != "dicom":
            raise ApiError(415, "not_dicom", f"format=dicom makes DICOM results, which need a DICOM upload; this is a {upload.format.upper()} file.")

        # 3. An inference ticket, then the reading.
        if not gate.try_admit():
            metrics.refused("queue_full")
            log.warning("busy: %d requests admitted, refusing one", gate.admitted)
            raise ApiError(503, "busy", _BUSY_MESSAGE, {"Retry-After": str(gate.retry_after_seconds())})
        name = f"upload-{digest}"

        def infer() -> Reading:
            return predictor.read(data, name, with_images=images and not as_dicom,
                                  **_heatmap_option(heatmap and not as_dicom), **overrides)

        def infer_dicom() -> tuple[Reading, bytes, str]:
            from lungopacity.inference.dicom_output import dicom_results_for_upload, multipart_related

            reading, results = dicom_results_for_upload(predictor, data, name, **overrides)  # type: ignore[arg-type]
            body, content_type = multipart_related(results.encoded().values())
            return reading, body, content_type

        try:
            if as_dicom:
                (reading, dicom_body, dicom_type), waited = await gate.run(infer_dicom)
            else:
                reading, waited = await gate.run(infer)  # returns the ticket when the work ends
        except InputError as exc:
            log.info("upload %s: %s unreadable (422)", digest, upload.format)
            cause = getattr(exc, "cause", None) or str(exc).split(": ", 1)[-1]
            raise ApiError(422, "unreadable_image", f"The {upload.format.upper()} file could not be read: {cause}") from None
        except Exception as exc:  # noqa: BLE001 - logged here, answered without internals
            log.error("upload %s: inference failed with %s", digest, type(exc).__name__, exc_info=True)
            raise ApiError(
                500, "internal_error",
                "The model failed on this image. Try again; if it persists, tell the administrator "
                f"(reference {digest}).",
            ) from None
        total = time.perf_counter() - began
        if as_dicom:
            prediction = reading.prediction
            decision = "none" if prediction.decision is None else str(prediction.decision).lower()
            log.info("upload %s: %d bytes, dicom results, decision=%s, %.2f s", digest, upload.bytes, decision, total)
            return Response(dicom_body, media_type=dicom_type, headers={
                "Cache-Control": "no-store",
                "X-Lungopacity-Decision": decision,
                "X-Lungopacity-Probability": f"{prediction.opacity_probability:.6f}",
                "X-Lungopacity-Model-Version": str(predictor.version),
            })
        body = predict_response(reading, upload, queue_wait=waited, server_total=total)
        log.info("upload %s: %d bytes, %s, decision=%s, %.2f s", digest, upload.bytes, upload.format, body.decision, total)
        return JSONResponse(body.model_dump(), headers={"Cache-Control": "no-store"})

    return router
