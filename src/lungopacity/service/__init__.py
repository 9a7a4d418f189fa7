"""The web page and HTTP API that read one chest X-ray (FastAPI).

Imports only :mod:`lungopacity.inference` (and :mod:`lungopacity.constants`,
:mod:`lungopacity.errors`). Run it with ``lungopacity serve --bundle MODEL`` or
:func:`serve`; build it for tests or embedding with :func:`create_app`. One module per
job: ``upload``, ``gate``, ``security``, ``metrics``, ``docs``, ``routes``, ``loading``,
``server``, ``schemas``, ``settings``; ``app`` assembles them.
"""

from lungopacity.service.app import create_app, serve
from lungopacity.service.errors import ApiError
from lungopacity.service.gate import InferenceGate, UploadSlots
from lungopacity.service.loading import PredictorLike, load_predictor
from lungopacity.service.schemas import DISCLAIMER, PredictResponse, predict_response, summary_text
from lungopacity.service.security import DEFAULT_ALLOWED_HOSTS, AllowedHosts, is_loopback_host
from lungopacity.service.server import ServerLimits, uvicorn_config
from lungopacity.service.settings import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, ServiceSettings
from lungopacity.service.upload import UploadTimeouts, parse_overrides, read_multipart

__all__ = [
    "DEFAULT_ALLOWED_HOSTS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DISCLAIMER",
    "AllowedHosts",
    "ApiError",
    "InferenceGate",
    "PredictResponse",
    "PredictorLike",
    "ServerLimits",
    "ServiceSettings",
    "UploadSlots",
    "UploadTimeouts",
    "create_app",
    "is_loopback_host",
    "load_predictor",
    "parse_overrides",
    "predict_response",
    "read_multipart",
    "serve",
    "summary_text",
    "uvicorn_config",
]
