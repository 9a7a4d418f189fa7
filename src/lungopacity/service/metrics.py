"""``/metrics`` in the Prometheus text format, and the middleware that counts requests.

Each app has its own registry (several apps in one process, as in the tests, do not
mix). What is exported:

* ``lungopacity_http_requests_total{route, method, status}``: answers, by the route's
  path template (``unmatched`` for paths no route serves) and method (``other`` for
  unusual ones), so no client can grow the label set;
* ``lungopacity_inference_seconds``: a histogram of the time each inference took;
* ``lungopacity_inference_queue_depth``, ``lungopacity_inferences_running``,
  ``lungopacity_uploads_in_flight``: read from the gates at scrape time;
* ``lungopacity_refusals_total{reason}``: 503s and 408s by cause (``uploads_full``,
  ``queue_full``, ``upload_timeout``);
* ``lungopacity_model_ready``: 1 once the model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lungopacity.service.gate import InferenceGate, UploadSlots

#: Inference times from a fast GPU (tens of ms) to a slow CPU with Grad-CAM (tens of s).
INFERENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REFUSAL_REASONS = ("uploads_full", "queue_full", "upload_timeout")
#: Methods counted by name; any other (clients may send any token) is counted as "other",
#: so no client can grow the label set.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ServiceMetrics:
    """The service's Prometheus registry and the instruments the app updates."""

    def __init__(self, gate: InferenceGate, uploads: UploadSlots, ready: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lungopacity_http_requests", "HTTP answers by route template, method and status.",
            ("route", "method", "status"), registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "lungopacity_inference_seconds", "Seconds each inference took (reading, model, pictures).",
            buckets=INFERENCE_BUCKETS, registry=self.registry,
        )
        self.refusals = Counter(
            "lungopacity_refusals", "Requests refused for load or slowness, by reason.", ("reason",), registry=self.registry,
        )
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)  # exported as 0 before the first refusal
        Gauge(
            "lungopacity_inference_queue_depth", "Requests holding a ticket that wait for an inference worker.",
            registry=self.registry,
        ).set_function(lambda: gate.waiting)
        Gauge("lungopacity_inferences_running", "Inferences running now.", registry=self.registry).set_function(
            lambda: gate.running
        )
        Gauge("lungopacity_uploads_in_flight", "Upload bodies being received now.", registry=self.registry).set_function(
            lambda: uploads.in_flight
        )
        Gauge("lungopacity_model_ready", "1 once the model bundle is loaded.", registry=self.registry).set_function(
            lambda: 1.0 if ready() else 0.0
        )

    def observe_inference(self, seconds: float) -> None:
        self.inference_seconds.observe(seconds)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def response(self) -> Response:
        """The current values in the Prometheus text exposition format."""
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


class RequestMetrics:
    """Count every answer by route template, method and status (outermost middleware)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            code = str(status[0]) if status else "500"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method if method in KNOWN_METHODS else "other", code).inc()
