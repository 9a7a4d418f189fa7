"""The web service: a page and an HTTP API that read one chest X-ray at a time.

``create_app`` builds the FastAPI application around a predictor (or a bundle path,
loaded once at start-up in the background); ``serve`` loads a bundle and runs it with
uvicorn. The service imports only ``lungopacity.inference`` (and ``constants``).

Safety rules, all enforced here:

* uploads are read from the request stream into memory with a hard size limit
  (413 as soon as the limit is passed, or at once from ``Content-Length``); nothing is
  written to disk;
* the content is sniffed, never the file name (415 for what is not DICOM/PNG/JPEG/TIFF),
  and an image's declared dimensions are checked against ``max_pixels`` before decoding;
* logs name an upload by the first 16 hex digits of its SHA-256, never by file name or
  patient identifiers (the predictor is given that hash as the name too);
* at most ``max_concurrent`` inferences run at once in a thread pool, at most
  ``max_queue`` more wait; past that the answer is 503 with ``Retry-After``;
* every error is JSON ``{"error": {"code": ..., "message": ...}}``; 500s carry no internals.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import math
import struct
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lungopacity.constants import SEXES, VIEWS
from lungopacity.inference import InputError, Reading, sniff_format
from lungopacity.service.schemas import (
    DISCLAIMER,
    BoxOut,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    PredictResponse,
    ReadyResponse,
    UploadInfo,
    png_data_url,
    summary_text,
)

log = logging.getLogger(__name__)

#: Largest upload accepted (the file itself): 50 MiB.
DEFAULT_MAX_UPLOAD_BYTES = 50 * 2**20
#: Largest decoded image accepted (decompression-bomb guard): 8192 x 8192 pixels, far
#: above any radiograph (a large detector is about 4300 x 3500).
DEFAULT_MAX_PIXELS = 8192 * 8192
#: Room in the request body for the multipart framing and the small form fields.
FORM_OVERHEAD_BYTES = 64 * 1024
#: Longest accepted value of a text form field (sex, age, view).
MAX_FIELD_BYTES = 64
#: Most parts a request may have (file + three fields, with some slack).
MAX_PARTS = 8
ACCEPTED_FORMATS: tuple[str, ...] = ("dicom", "png", "jpeg", "tiff")
FORM_FIELDS: tuple[str, ...] = ("sex", "age", "view")
MAX_AGE_YEARS = 120.0


class PredictorLike(Protocol):
    """What the service needs of a predictor (``lungopacity.inference.Predictor`` or a test fake)."""

    version: str

    def read(
        self,
        data: bytes,
        name: str,
        *,
        sex: str | None = None,
        age: float | None = None,
        view: str | None = None,
        with_images: bool = True,
    ) -> Reading: ...


PredictorSource = PredictorLike | str | Path | Callable[[], PredictorLike]


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The JSON error envelope every failing route returns."""
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=status,
        headers={"Cache-Control": "no-store", **dict(headers or {})},
    )


def human_bytes(n: int) -> str:
    """``52428800`` -> ``'50 MB'`` (binary units, as people read file sizes)."""
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" or value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def too_large_message(max_file_bytes: int) -> str:
    """The one 413 message for uploads, wherever the limit is noticed."""
    return f"The file is larger than the limit of {human_bytes(max_file_bytes)}; send one radiograph (DICOM, PNG or JPEG)."


# --------------------------------------------------------------------------- upload


@dataclass
class UploadForm:
    """A parsed ``multipart/form-data`` request, held in memory."""

    file: bytes | None = None
    fields: dict[str, str] = field(default_factory=dict)


class _MultipartCollector:
    """Callbacks for ``python_multipart.MultipartParser`` that keep parts in memory, bounded."""

    def __init__(self, max_file_bytes: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.form = UploadForm()
        self.n_parts = 0
        self.finished = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self.n_parts += 1
        if self.n_parts > MAX_PARTS:
            raise ApiError(400, "bad_request", f"Too many form parts; send one 'file' and optionally {', '.join(FORM_FIELDS)}.")
        self._disposition, self._name, self._is_file, self._data = b"", "", False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ApiError(400, "bad_request", "A form part has no name; name the upload field 'file'.")
        self._name = options[b"name"].decode("utf-8", "replace")
        # Only the presence of a file name matters; its value is never read or logged.
        self._is_file = b"filename" in options or self._name == "file"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        limit = self.max_file_bytes if self._is_file else MAX_FIELD_BYTES
        if len(self._data) + (end - start) > limit:
            if self._is_file:
                raise ApiError(413, "upload_too_large", too_large_message(self.max_file_bytes))
            raise ApiError(400, "bad_request", f"The form field '{self._name[:20]}' is too long.")
        self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._is_file:
            if self._name != "file":
                raise ApiError(400, "bad_request", "Send the X-ray in the form field named 'file'.")
            if self.form.file is not None:
                raise ApiError(400, "bad_request", "Send one file per request.")
            self.form.file = bytes(self._data)
            return
        if self._name in self.form.fields:
            raise ApiError(400, "bad_request", f"The form field '{self._name[:20]}' is given twice.")
        try:
            self.form.fields[self._name] = self._data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_request", f"The form field '{self._name[:20]}' is not UTF-8 text.") from None

    def on_end(self) -> None:
        self.finished = True


async def read_multipart(
    content_type: str,
    chunks: AsyncIterator[bytes],
    *,
    max_file_bytes: int,
    max_body_bytes: int | None = None,
) -> UploadForm:
    """Parse a ``multipart/form-data`` body from a stream of chunks, in memory, with limits.

    Reading stops, and :class:`ApiError` 413 is raised, as soon as the file part passes
    ``max_file_bytes`` or the whole body passes ``max_body_bytes`` (default: the file
    limit plus :data:`FORM_OVERHEAD_BYTES`); the rest of the stream is never read.

    Args:
        content_type: the request's Content-Type header (must carry the boundary).
        chunks: the request body, e.g. ``request.stream()``.
        max_file_bytes: the largest accepted file part.
        max_body_bytes: the largest accepted body.

    Returns:
        The file's bytes (None when there is no file part) and the text fields.
    """
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    media_type, params = parse_options_header(content_type or "")
    if media_type != b"multipart/form-data":
        shown = (content_type or "none").split(";")[0][:60]
        raise ApiError(
            415,
            "not_multipart",
            f"Send the X-ray as multipart/form-data with a field named 'file' (the request's content type was '{shown}').",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "The multipart/form-data request has no boundary.")
    body_limit = max_body_bytes if max_body_bytes is not None else max_file_bytes + FORM_OVERHEAD_BYTES
    collector = _MultipartCollector(max_file_bytes)
    callbacks = {name: getattr(collector, name) for name in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
        "on_header_end", "on_headers_finished", "on_end",
    )}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > body_limit:
                raise ApiError(413, "upload_too_large", too_large_message(max_file_bytes))
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError:
        raise ApiError(400, "bad_request", "The multipart/form-data body is malformed.") from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "The upload was interrupted.") from None
    if not collector.finished:
        raise ApiError(400, "bad_request", "The multipart/form-data body ended early (incomplete upload).")
    return collector.form


def parse_overrides(fields: Mapping[str, str]) -> dict[str, Any]:
    """Validate the optional form fields into predictor keywords ``sex``, ``age``, ``view``.

    Empty values mean "use the file's header". Raises :class:`ApiError` 400 with a
    message saying what is accepted.
    """
    unknown = sorted(set(fields) - set(FORM_FIELDS))
    if unknown:
        raise ApiError(
            400, "bad_request",
            f"Unknown form field '{unknown[0][:20]}'; the accepted fields are file, {', '.join(FORM_FIELDS)}.",
        )
    values = {key: fields.get(key, "").strip() for key in FORM_FIELDS}
    sex = values["sex"].upper() or None
    if sex is not None and sex not in SEXES:
        raise ApiError(400, "bad_request", f"sex must be M or F (or left empty to use the file's header), not {values['sex'][:20]!r}.")
    view = values["view"].upper() or None
    if view is not None and view not in VIEWS:
        raise ApiError(400, "bad_request", f"view must be AP or PA (or left empty to use the file's header), not {values['view'][:20]!r}.")
    age: float | None = None
    if values["age"]:
        try:
            age = float(values["age"])
        except ValueError:
            age = math.nan
        if not (0.0 <= age <= MAX_AGE_YEARS):  # also false for NaN
            raise ApiError(
                400, "bad_request",
                f"age must be a number of years between 0 and {MAX_AGE_YEARS:.0f} (or left empty), not {values['age'][:20]!r}.",
            )
    return {"sex": sex, "age": age, "view": view}


def declared_pixels(data: bytes, fmt: str, max_pixels: int) -> tuple[int, int] | None:
    """The (width, height) a PNG/JPEG/TIFF declares in its header, without decoding pixels.

    Returns None when the header cannot be read (the predictor then gives the reason) or
    for DICOM (checked by the predictor's reader). An image so large that Pillow refuses
    even to open it is reported as ``(max_pixels + 1, 1)``.
    """
    if fmt == "dicom":
        return None
    if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        # The first chunk holds the size; read it directly (Pillow would refuse a
        # header-only file before telling us).
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.size
        except Image.DecompressionBombError:
            # Pillow refuses past 2 x MAX_IMAGE_PIXELS; that is beyond our own limit too.
            return (max_pixels + 1, 1) if max_pixels < 2 * (Image.MAX_IMAGE_PIXELS or 0) else None
        except Exception:  # noqa: BLE001 - unreadable headers are the predictor's to explain
            return None


# --------------------------------------------------------------------------- inference


class InferenceGate:
    """Admission control: at most ``max_concurrent`` inferences run, ``max_queue`` more wait.

    A request takes a ticket *before* its upload is read, so the memory held by uploads
    is bounded too. Inference runs in a thread pool of ``max_concurrent`` workers (its
    queue is the waiting line); the ticket is returned when the worker finishes, so a
    client that disconnects cannot free a slot while its inference still runs.
    Thread-safe and independent of the event loop.
    """

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue >= 0")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._admitted = 0
        self._mean_seconds = 1.0  # running estimate of one inference, for Retry-After
        self._executor: ThreadPoolExecutor | None = None

    @property
    def admitted(self) -> int:
        """Requests holding a ticket (reading their upload, waiting or running)."""
        with self._lock:
            return self._admitted

    def try_admit(self) -> bool:
        """Take a ticket, or return False when ``max_concurrent + max_queue`` are taken."""
        with self._lock:
            if self._admitted >= self.max_concurrent + self.max_queue:
                return False
            self._admitted += 1
            return True

    def release(self) -> None:
        """Return a ticket."""
        with self._lock:
            self._admitted -= 1

    def retry_after_seconds(self) -> int:
        """A client's fair wait before retrying: the work ahead of it, shared by the workers."""
        with self._lock:
            ahead = self._admitted / self.max_concurrent
            return max(1, min(60, math.ceil(self._mean_seconds * ahead)))

    def _executor_or_new(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_concurrent, thread_name_prefix="lungopacity-infer")
            return self._executor

    async def run(self, function: Callable[[], Reading]) -> tuple[Reading, float]:
        """Run ``function`` in the pool; return its result and the seconds it waited in line.

        The caller must hold a ticket; this returns it when the work is done (or
        was cancelled before it started).
        """
        submitted = time.perf_counter()
        started: list[float] = []

        def work() -> Reading:
            started.append(time.perf_counter())
            result = function()
            seconds = time.perf_counter() - started[0]
            with self._lock:
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds
            return result

        try:
            future: Future[Reading] = self._executor_or_new().submit(work)
        except BaseException:
            self.release()
            raise
        future.add_done_callback(lambda _: self.release())
        reading = await asyncio.wrap_future(future)
        return reading, started[0] - submitted

    def shutdown(self) -> None:
        """Stop the worker threads (waiting work is cancelled)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


class ServiceState:
    """The predictor (once loaded) and what the routes share."""

    def __init__(self, source: PredictorSource, *, device: str, max_pixels: int) -> None:
        self.source = source
        self.device = device
        self.max_pixels = max_pixels
        self.predictor: PredictorLike | None = None
        self.load_error: str | None = None
        self._load_started = False
        self._lock = threading.Lock()
        if hasattr(source, "read"):
            self.predictor = source  # type: ignore[assignment]

    @property
    def ready(self) -> bool:
        return self.predictor is not None

    def start_loading(self) -> None:
        """Load the bundle once, in a background thread, so /healthz answers meanwhile."""
        with self._lock:
            if self.predictor is not None or self._load_started:
                return
            self._load_started = True
        threading.Thread(target=self._load, name="lungopacity-load", daemon=True).start()

    def _load(self) -> None:
        began = time.perf_counter()
        try:
            predictor = load_predictor(self.source, device=self.device, max_pixels=self.max_pixels)
        except Exception as exc:  # noqa: BLE001 - reported through /readyz and the log
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model bundle could not be loaded: %s", self.load_error)
            return
        self.predictor = predictor
        log.info("model %s loaded in %.1f s", getattr(predictor, "version", "?"), time.perf_counter() - began)


def load_predictor(source: PredictorSource, *, device: str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS) -> PredictorLike:
    """A predictor from a bundle path or a zero-argument loader (a predictor is returned as is).

    Raises whatever ``Predictor.from_bundle`` raises (``BundleError`` for a bad bundle).
    """
    if hasattr(source, "read"):
        return source  # type: ignore[return-value]
    if isinstance(source, (str, Path)):
        from lungopacity.inference import Predictor  # type: ignore[attr-defined]

        return Predictor.from_bundle(source, device=device, max_pixels=max_pixels)
    if callable(source):
        return source()
    raise TypeError(f"expected a predictor, a bundle path or a loader, not {type(source).__name__}")


# --------------------------------------------------------------------------- app


_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


class SecurityHeaders:
    """Pure ASGI middleware: no sniffing, no framing, no referrer; a strict CSP for the page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # FastAPI's /docs pulls Swagger UI from a CDN; leave it unconstrained.
        strict = not scope["path"].startswith(("/docs", "/redoc"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                if strict:
                    headers.append((b"content-security-policy", _CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "bad form field (sex, age, view) or malformed request"},
    413: {"model": ErrorResponse, "description": "upload, or the image's pixel count, over the limit"},
    415: {"model": ErrorResponse, "description": "not a DICOM, PNG, JPEG or TIFF (sniffed from the content)"},
    422: {"model": ErrorResponse, "description": "recognised format but unreadable image"},
    503: {"model": ErrorResponse, "description": "busy (queue full, see Retry-After) or model not loaded"},
    500: {"model": ErrorResponse, "description": "internal error (no details are given)"},
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


def create_app(
    predictor_or_bundle_path: PredictorSource,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_concurrent: int = 2,
    max_queue: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "cpu",
) -> FastAPI:
    """Build the web application.

    Args:
        predictor_or_bundle_path: a ready predictor (anything with ``read`` and
            ``version``, e.g. a test fake), a bundle path (loaded once at start-up, in the
            background, with ``Predictor.from_bundle(path, device=, max_pixels=)``), or a
            zero-argument function returning a predictor (called the same way).
        max_upload_bytes: largest accepted file; 413 past it.
        max_concurrent: inferences run at once (thread pool size).
        max_queue: requests allowed to wait for a worker; past it, 503 with Retry-After.
        max_pixels: largest accepted image (width x height); 413 past it.
        device: torch device for a bundle loaded here.

    Returns:
        The FastAPI application (``app.state.service`` and ``app.state.gate`` expose the
        loading state and the admission gate).
    """
    state = ServiceState(predictor_or_bundle_path, device=device, max_pixels=max_pixels)
    gate = InferenceGate(max_concurrent, max_queue)
    index_html = resources.files("lungopacity.service").joinpath("static", "index.html").read_text("utf-8")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        yield
        gate.shutdown()

    app = FastAPI(
        title="lungopacity",
        summary="Reads one chest X-ray: lung opacity probability, boxes and heatmap. Not a diagnosis.",
        version=_package_version(),
        lifespan=lifespan,
    )
    app.state.service = state
    app.state.gate = gate
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(packages=[("lungopacity.service", "static")]), name="static")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(400, "bad_request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s", type(exc).__name__)
        return error_response(500, "internal_error", "The server failed unexpectedly. Try again; if it persists, tell the administrator.")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/healthz", response_model=HealthResponse, tags=["status"])
    async def healthz() -> HealthResponse:
        """The process is alive (says nothing about the model)."""
        return HealthResponse()

    @app.get("/readyz", response_model=ReadyResponse, responses={503: _ERROR_RESPONSES[503]}, tags=["status"])
    async def readyz() -> ReadyResponse:
        """The model bundle is loaded and predictions can be served."""
        predictor = _ready_predictor(state)
        return ReadyResponse(model_version=str(predictor.version))

    @app.get("/v1/info", response_model=InfoResponse, tags=["predict"])
    async def info() -> InfoResponse:
        """Limits and model version, for clients to check before uploading."""
        predictor = state.predictor
        return InfoResponse(
            ready=predictor is not None,
            model_version=str(predictor.version) if predictor is not None else None,
            max_upload_bytes=max_upload_bytes,
            formats=list(ACCEPTED_FORMATS),
            disclaimer=DISCLAIMER,
        )

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=_ERROR_RESPONSES,
        openapi_extra=_PREDICT_BODY,
        tags=["predict"],
    )
    async def predict(request: Request, images: bool = True) -> JSONResponse:
        """Read one radiograph (multipart field ``file``; optional ``sex``, ``age``, ``view``).

        Set ``images=false`` to skip the overlay and heatmap pictures.
        """
        began = time.perf_counter()
        content_type = request.headers.get("content-type", "")
        body_limit = max_upload_bytes + FORM_OVERHEAD_BYTES
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > body_limit:
            raise ApiError(413, "upload_too_large", too_large_message(max_upload_bytes))
        predictor = _ready_predictor(state)
        if not gate.try_admit():
            log.warning("busy: %d requests admitted, refusing one", gate.admitted)
            raise ApiError(
                503, "busy",
                "The server is busy reading other X-rays; try again in a few seconds.",
                {"Retry-After": str(gate.retry_after_seconds())},
            )
        submitted = False
        try:
            form = await read_multipart(content_type, request.stream(), max_file_bytes=max_upload_bytes, max_body_bytes=body_limit)
            overrides = parse_overrides(form.fields)
            data = form.file
            if data is None:
                raise ApiError(400, "bad_request", "No file: send the X-ray as a multipart/form-data field named 'file'.")
            if not data:
                raise ApiError(400, "bad_request", "The uploaded file is empty.")
            digest = hashlib.sha256(data).hexdigest()[:16]
            fmt = sniff_format(data[:1024])
            if fmt not in ACCEPTED_FORMATS:
                log.info("upload %s: %d bytes, not an image (415)", digest, len(data))
                raise ApiError(
                    415, "unsupported_media_type",
                    "The file is not a DICOM, PNG or JPEG image (judged from its content, not its name).",
                )
            size = declared_pixels(data, fmt, max_pixels)
            if size is not None and size[0] * size[1] > max_pixels:
                log.info("upload %s: %s of %dx%d pixels over the limit (413)", digest, fmt, size[0], size[1])
                raise ApiError(
                    413, "image_too_large",
                    f"The image has more than the {max_pixels:,} pixels allowed ({size[0]}x{size[1]}); "
                    "send a radiograph at its usual resolution.",
                )
            name = f"upload-{digest}"

            def infer() -> Reading:
                return predictor.read(data, name, with_images=images, **overrides)

            submitted = True
            try:
                reading, waited = await gate.run(infer)
            except InputError as exc:
                log.info("upload %s: %s unreadable (422)", digest, fmt)
                cause = getattr(exc, "cause", None) or str(exc).split(": ", 1)[-1]
                raise ApiError(422, "unreadable_image", f"The {fmt.upper()} file could not be read: {cause}") from None
            except Exception as exc:  # noqa: BLE001 - logged here, answered without internals
                log.error("upload %s: inference failed with %s", digest, type(exc).__name__, exc_info=True)
                raise ApiError(
                    500, "internal_error",
                    "The model failed on this image. Try again; if it persists, tell the administrator "
                    f"(reference {digest}).",
                ) from None
        finally:
            if not submitted:
                gate.release()
        total = time.perf_counter() - began
        body = _response_body(reading, digest, len(data), fmt, waited, total)
        log.info("upload %s: %d bytes, %s, decision=%s, %.2f s", digest, len(data), fmt, body.decision, total)
        return JSONResponse(body.model_dump(), headers={"Cache-Control": "no-store"})

    return app


def _ready_predictor(state: ServiceState) -> PredictorLike:
    predictor = state.predictor
    if predictor is not None:
        return predictor
    if state.load_error is not None:
        raise ApiError(
            503, "model_unavailable",
            "The model bundle could not be loaded; the administrator must check the bundle (details in the server log).",
        )
    raise ApiError(503, "not_ready", "The model is still loading; try again in a few seconds.", {"Retry-After": "5"})


def _response_body(reading: Reading, digest: str, n_bytes: int, fmt: str, waited: float, total: float) -> PredictResponse:
    prediction = reading.prediction
    timings = {key: float(value) for key, value in prediction.timings.items()}
    timings["queue_wait"] = waited
    timings["server_total"] = total
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
        upload=UploadInfo(sha256=digest, bytes=n_bytes, format=fmt),
        overlay_png=png_data_url(reading.overlay_png),
        heatmap_png=png_data_url(reading.heatmap_png),
    )


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("lungopacity")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "0"


def serve(
    bundle: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str = "cpu",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_concurrent: int = 2,
    max_queue: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    log_level: str = "info",
) -> None:
    """Load ``bundle`` and serve the page and API with uvicorn until interrupted.

    The bundle is loaded before the port is opened, so a bad bundle fails here with
    ``BundleError`` (the CLI prints it) instead of leaving a server that is never ready.
    """
    import uvicorn

    predictor = load_predictor(Path(bundle), device=device, max_pixels=max_pixels)
    app = create_app(
        predictor,
        max_upload_bytes=max_upload_bytes,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        max_pixels=max_pixels,
    )
    log.info("serving model %s on http://%s:%d", getattr(predictor, "version", "?"), host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
