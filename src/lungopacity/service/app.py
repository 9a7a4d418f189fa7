"""The web service assembled: :func:`create_app` builds it, :func:`serve` runs it.

Each job lives in its own module: :mod:`.upload` (streaming multipart parsing, limits,
deadlines, form fields, sniffing), :mod:`.gate` (upload slots and the inference pool),
:mod:`.security` (headers, Host allow-list, token), :mod:`.metrics` (Prometheus),
:mod:`.docs` (offline Swagger UI / Redoc), :mod:`.routes` (the endpoints),
:mod:`.loading` (the predictor), :mod:`.server` (uvicorn with header and body timeouts),
:mod:`.schemas` (the JSON answers). The service imports only ``lungopacity.inference``
(and ``constants``, ``errors``).

Safety rules, each enforced in the module named:

* uploads are read from the request stream into memory with hard size limits and
  deadlines, holding an upload slot and never an inference worker (``upload``, ``gate``);
* the content is sniffed, never the file name, and an image's declared dimensions are
  checked before decoding (``upload``);
* logs name an upload by the first 16 hex digits of its SHA-256, never by file name or
  patient identifiers (the predictor is given that hash as the name too);
* at most ``max_concurrent`` inferences run at once, ``max_queue`` more wait, at most
  ``max_uploads`` bodies are received at once; past that, 503 with ``Retry-After`` (``gate``);
* only Host names of this machine (and those added) are answered; with a token, every
  API call must carry it (``security``); slow headers and bodies are cut off (``server``);
* every error is JSON ``{"error": {"code": ..., "message": ...}}``; 500s carry no internals.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from lungopacity.service.docs import install_docs
from lungopacity.service.errors import ApiError, error_response, install_error_handlers
from lungopacity.service.gate import InferenceGate, UploadSlots
from lungopacity.service.loading import PredictorLike, PredictorSource, ServiceState, load_predictor
from lungopacity.service.metrics import RequestMetrics, ServiceMetrics
from lungopacity.service.routes import build_router
from lungopacity.service.security import AllowedHosts, BearerToken, HostAllowList, SecurityHeaders, is_loopback_host
from lungopacity.service.server import ServerLimits, uvicorn_config
from lungopacity.service.settings import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, ServiceSettings
from lungopacity.service.upload import declared_pixels, human_bytes, parse_overrides, read_multipart

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "ApiError",
    "InferenceGate",
    "PredictorLike",
    "ServiceSettings",
    "create_app",
    "declared_pixels",
    "error_response",
    "human_bytes",
    "load_predictor",
    "parse_overrides",
    "read_multipart",
    "serve",
]


def create_app(
    predictor_or_bundle_path: PredictorSource,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_concurrent: int = 2,
    max_queue: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "cpu",
    max_uploads: int = 32,
    upload_timeout: float = 120.0,
    stall_timeout: float = 10.0,
    token: str | None = None,
    allowed_hosts: Iterable[str] = (),
) -> FastAPI:
    """Build the web application.

    Args:
        predictor_or_bundle_path: a ready predictor (anything with ``read`` and
            ``version``, e.g. a test fake), a bundle path (loaded once at start-up, in the
            background, with ``Predictor.from_bundle(path, device=, max_pixels=)``), or a
            zero-argument function returning a predictor (called the same way).
        max_upload_bytes: largest accepted file; 413 past it.
        max_concurrent: inferences run at once (thread pool size).
        max_queue: checked uploads allowed to wait for a worker; past it, 503 with Retry-After.
        max_pixels: largest accepted image (width x height); 413 past it.
        device: torch device for a bundle loaded here.
        max_uploads: request bodies received at once; past it, 503 with Retry-After.
        upload_timeout: seconds an upload body may take in all; 408 past it.
        stall_timeout: seconds in which an upload must deliver at least 1 KB; 408 otherwise.
        token: when set (not empty), every API call needs ``Authorization: Bearer <token>``.
        allowed_hosts: Host names or addresses answered besides localhost names and
            loopback addresses (``*.example.org`` for a domain, ``*`` for any); others get 421.

    Returns:
        The FastAPI application (``app.state.service``, ``.gate``, ``.uploads``,
        ``.metrics`` and ``.settings`` expose the loading state, the gates, the metrics
        and the settings).

    Raises:
        lungopacity.errors.ConfigError: a setting is out of range, the token cannot be
            sent in a header, or an allowed host is not a host name.
    """
    settings = ServiceSettings(
        max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_concurrent=max_concurrent,
        max_queue=max_queue, max_uploads=max_uploads, upload_timeout=upload_timeout,
        stall_timeout=stall_timeout, token=token or None, allowed_hosts=tuple(allowed_hosts), device=device,
    )
    hosts = AllowedHosts(settings.allowed_hosts)
    state = ServiceState(predictor_or_bundle_path, device=device, max_pixels=max_pixels)
    gate = InferenceGate(max_concurrent, max_queue)
    uploads = UploadSlots(max_uploads)
    metrics = ServiceMetrics(gate, uploads, ready=lambda: state.ready)
    gate.on_inference = metrics.observe_inference

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
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = state
    app.state.gate = gate
    app.state.uploads = uploads
    app.state.metrics = metrics
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(build_router(settings, state, gate, uploads, metrics))
    install_docs(app, token_required=settings.token is not None)
    app.mount("/static", StaticFiles(packages=[("lungopacity.service", "static")]), name="static")
    # Added innermost first: a request meets the metrics, the headers, the Host check,
    # then the token.
    if settings.token is not None:
        app.add_middleware(BearerToken, token=settings.token)
    app.add_middleware(HostAllowList, allowed=hosts)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


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
    max_uploads: int = 32,
    upload_timeout: float = 120.0,
    stall_timeout: float = 10.0,
    header_timeout: float = 10.0,
    keep_alive_timeout: int = 5,
    token: str | None = None,
    allowed_hosts: Iterable[str] = (),
    log_level: str = "info",
) -> None:
    """Load ``bundle`` and serve the page and API with uvicorn until interrupted.

    The bundle is loaded before the port is opened, so a bad bundle fails here with
    ``BundleError`` (the CLI prints it) instead of leaving a server that is never ready.
    A specific address to bind to (not ``0.0.0.0`` or ``::``) is added to the allowed
    hosts. Bad settings raise :class:`~lungopacity.errors.ConfigError` before the bundle
    is read. See :func:`create_app` for the other settings and
    :class:`~lungopacity.service.server.ServerLimits` for ``header_timeout`` and
    ``keep_alive_timeout``.
    """
    import uvicorn

    hosts = list(allowed_hosts)
    if host not in ("", "0.0.0.0", "::") and not is_loopback_host(host):
        hosts.append(host)
    limits = ServerLimits(
        header_timeout=header_timeout,
        body_timeout=upload_timeout + stall_timeout,  # a backstop behind the app's own deadlines
        keep_alive_timeout=keep_alive_timeout,
    )
    # Settle the settings before the (slow) bundle load, so a bad one fails at once.
    ServiceSettings(
        max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_concurrent=max_concurrent, max_queue=max_queue,
        max_uploads=max_uploads, upload_timeout=upload_timeout, stall_timeout=stall_timeout, token=token or None,
    )
    allowed = AllowedHosts(hosts)
    predictor = load_predictor(Path(bundle), device=device, max_pixels=max_pixels)
    app = create_app(
        predictor,
        max_upload_bytes=max_upload_bytes,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        max_pixels=max_pixels,
        max_uploads=max_uploads,
        upload_timeout=upload_timeout,
        stall_timeout=stall_timeout,
        token=token,
        allowed_hosts=hosts,
    )
    log.info(
        "serving model %s on http://%s:%d (hosts: %s; token %s)", getattr(predictor, "version", "?"), host, port,
        allowed.describe(), "required" if token else "not required",
    )
    uvicorn.Server(uvicorn_config(app, host=host, port=port, limits=limits, log_level=log_level)).run()
