"""The web page and HTTP API that read one chest X-ray (FastAPI).

Imports only :mod:`lungopacity.inference` (and :mod:`lungopacity.constants`).
Run it with ``lungopacity serve --bundle MODEL`` or :func:`serve`; build it for tests
or embedding with :func:`create_app`.
"""

from lungopacity.service.app import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    ApiError,
    InferenceGate,
    create_app,
    load_predictor,
    parse_overrides,
    read_multipart,
    serve,
)
from lungopacity.service.schemas import DISCLAIMER, PredictResponse, summary_text

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DISCLAIMER",
    "ApiError",
    "InferenceGate",
    "PredictResponse",
    "create_app",
    "load_predictor",
    "parse_overrides",
    "read_multipart",
    "serve",
    "summary_text",
]
