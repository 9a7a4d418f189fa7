"""Host allow-list, bearer token, security headers, /metrics, /favicon.ico and offline docs.

Through FastAPI's TestClient with the fake predictor of ``test_service.py``; the real
server and slow clients are in ``test_service_hostile.py``, the browser in
``test_service_browser.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lungopacity.errors import ConfigError
from lungopacity.service import AllowedHosts, create_app, is_loopback_host
from test_service import FakePredictor, error_of, grey_png, local_client, wait_until

TOKEN = "s3cret-Token_42"


# --------------------------------------------------------------------------- Host


@pytest.mark.parametrize("base_url", ["http://evil.example", "http://evil.example:8000", "http://localhost.evil.example"])
def test_request_for_another_host_is_421(base_url: str) -> None:
    fake = FakePredictor()
    with TestClient(create_app(fake), base_url=base_url) as client:
        for response in (client.get("/"), client.get("/healthz"), client.post("/v1/predict", files={"file": ("x.png", grey_png(1))})):
            assert response.status_code == 421
            error = error_of(response)
            assert error["code"] == "misdirected_request" and "--allowed-host" in error["message"]
            assert response.headers["connection"] == "close"
            assert response.headers["x-frame-options"] == "DENY"
    assert fake.calls == []


@pytest.mark.parametrize(
    "base_url", ["http://localhost", "http://localhost:8000", "http://127.0.0.1:8000", "http://127.3.2.1", "http://[::1]:8000", "http://app.localhost"]
)
def test_loopback_names_are_answered(base_url: str) -> None:
    with TestClient(create_app(FakePredictor()), base_url=base_url) as client:
        assert client.get("/healthz").status_code == 200


def test_added_hosts_are_answered() -> None:
    app = create_app(FakePredictor(), allowed_hosts=["xray.hospital.example", "*.ward.example"])
    for base_url, status in (
        ("http://xray.hospital.example:8000", 200), ("http://XRAY.Hospital.example.", 200),
        ("http://a.ward.example", 200), ("http://ward.example", 421), ("http://hospital.example", 421),
    ):
        with TestClient(app, base_url=base_url) as client:
            assert client.get("/healthz").status_code == status, base_url
    with TestClient(create_app(FakePredictor(), allowed_hosts=["*"]), base_url="http://anything.example") as client:
        assert client.get("/healthz").status_code == 200


def test_request_without_host_is_400() -> None:
    app = create_app(FakePredictor())
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.0", "method": "GET", "scheme": "http",
        "path": "/healthz", "raw_path": b"/healthz", "query_string": b"", "root_path": "", "headers": [],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["message"] == "The request has no Host header."


def test_allowed_host_entries_exactly() -> None:
    hosts = AllowedHosts(["Example.org:8000", "*.lan", "10.0.0.5", "[fe80::1]", "fe80::2"])
    assert [hosts.allows(h) for h in ("example.org", "example.org:80", "x.lan", "lan", "10.0.0.5:8000", "[fe80::1]:80", "[fe80::2]")] == [
        True, True, True, False, True, True, True,
    ]
    assert [hosts.allows(h) for h in ("10.0.0.6", "example.org.evil", "", "[::1]", "127.0.0.1:1")] == [False, False, False, True, True]
    assert hosts.describe() == "localhost names and loopback addresses, 10.0.0.5, example.org, fe80::1, fe80::2, *.lan"
    for bad in ("", "a b", "http://x", "x/y", "*", "a:b:c"):
        if bad == "*":
            assert AllowedHosts([bad]).allows("whatever")
            continue
        with pytest.raises(ConfigError, match="--allowed-host"):
            AllowedHosts([bad])


def test_loopback_bind_addresses() -> None:
    assert [is_loopback_host(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.1.1")] == [True] * 4
    assert [is_loopback_host(h) for h in ("0.0.0.0", "::", "192.168.1.10", "example.org", "")] == [False] * 5


# --------------------------------------------------------------------------- token


@pytest.fixture
def token_app() -> tuple[Any, FakePredictor]:
    fake = FakePredictor()
    return create_app(fake, token=TOKEN), fake


def test_token_is_required_for_every_api_call(token_app: tuple[Any, FakePredictor]) -> None:
    app, fake = token_app
    with local_client(app) as client:
        for method, path in (("GET", "/v1/info"), ("GET", "/readyz"), ("GET", "/metrics"), ("POST", "/v1/predict"), ("GET", "/nowhere")):
            kwargs = {"files": {"file": ("x.png", grey_png(1))}} if method == "POST" else {}
            response = client.request(method, path, **kwargs)
            assert response.status_code == 401, path
            error = error_of(response)
            assert error["code"] == "unauthorized" and "Authorization: Bearer" in error["message"]
            assert response.headers["www-authenticate"] == 'Bearer realm="lungopacity"'
        wrong = client.get("/v1/info", headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
        assert client.get("/v1/info", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert fake.calls == []


def test_right_token_is_accepted(token_app: tuple[Any, FakePredictor]) -> None:
    app, fake = token_app
    with local_client(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        assert client.get("/v1/info").json()["ready"] is True
        assert client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 200
        response = client.post("/v1/predict", files={"file": ("x.png", grey_png(204))})
        assert response.status_code == 200 and response.json()["decision"] is True
    with local_client(app, headers={"authorization": f"bearer {TOKEN}"}) as client:  # the scheme is case-insensitive
        assert client.get("/v1/info").status_code == 200
    assert len(fake.calls) == 1


def test_page_assets_docs_and_liveness_need_no_token(token_app: tuple[Any, FakePredictor]) -> None:
    app, _ = token_app
    with local_client(app) as client:
        for path in ("/", "/static/app.js", "/static/style.css", "/favicon.ico", "/healthz", "/openapi.json", "/docs",
                     "/redoc", "/docs-assets/swagger-ui-bundle.js"):
            assert client.get(path).status_code == 200, path


def test_openapi_declares_the_bearer_token_only_when_set(token_app: tuple[Any, FakePredictor]) -> None:
    app, _ = token_app
    with local_client(app) as client:
        spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/predict"]["post"]["security"] == [{"bearer": []}]
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    with local_client(create_app(FakePredictor())) as client:
        plain = client.get("/openapi.json").json()
    assert "securitySchemes" not in plain.get("components", {})
    assert "401" in plain["paths"]["/v1/predict"]["post"]["responses"]


@pytest.mark.parametrize("token", ["with space", "tab\there", "naïve"])
def test_token_that_cannot_travel_in_a_header_is_refused(token: str) -> None:
    with pytest.raises(ConfigError, match="--token"):
        create_app(FakePredictor(), token=token)


def test_empty_token_means_no_token() -> None:
    with local_client(create_app(FakePredictor(), token="")) as client:
        assert client.get("/v1/info").status_code == 200


# --------------------------------------------------------------------------- headers, favicon, docs


def test_security_headers_on_every_answer(client: TestClient) -> None:
    for response in (client.get("/"), client.get("/v1/info"), client.get("/nowhere"), client.get("/metrics")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "script-src 'self';" in response.headers["content-security-policy"]
    docs_csp = client.get("/docs").headers["content-security-policy"]
    assert "script-src 'self';" in docs_csp and "unsafe-eval" not in docs_csp


def test_favicon_is_an_icon(client: TestClient) -> None:
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response.headers["content-type"] == "image/x-icon"
    with Image.open(io.BytesIO(response.content)) as icon:
        assert icon.format == "ICO" and icon.size[0] >= 16


def test_docs_pages_use_only_local_assets(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "http://" not in html and "https://" not in html and "<script>" not in html
        for asset in re.findall(r'(?:src|href)="(/[^"]+)"', html):
            response = client.get(asset)
            assert response.status_code == 200 and len(response.content) > 100, asset
    assert "SwaggerUIBundle" in client.get("/static/docs.js").text


# --------------------------------------------------------------------------- metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_and_inferences(client: TestClient) -> None:
    assert client.post("/v1/predict", files={"file": ("x.png", grey_png(204))}).status_code == 200
    assert client.post("/v1/predict", files={"file": ("x.png", b"not an image" * 10)}).status_code == 415
    assert client.get("/nowhere").status_code == 404
    assert client.get("/healthz").status_code == 200
    for i in range(3):  # made-up methods and paths must not grow the label set
        client.request(f"BREW{i}", f"/pot/{i}")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)

    def requests(route: str, method: str, status: str) -> float:
        return samples[("lungopacity_http_requests_total", (("method", method), ("route", route), ("status", status)))]

    assert requests("/v1/predict", "POST", "200") == 1
    assert requests("/v1/predict", "POST", "415") == 1
    assert requests("unmatched", "GET", "404") == 1
    assert requests("/healthz", "GET", "200") == 1
    assert requests("unmatched", "other", "404") == 3
    assert len([key for key in samples if key[0] == "lungopacity_http_requests_total"]) == 5
    assert samples[("lungopacity_inference_seconds_count", ())] == 1
    assert samples[("lungopacity_inference_seconds_bucket", (("le", "+Inf"),))] == 1
    assert samples[("lungopacity_inference_queue_depth", ())] == 0
    assert samples[("lungopacity_inferences_running", ())] == 0
    assert samples[("lungopacity_uploads_in_flight", ())] == 0
    assert samples[("lungopacity_model_ready", ())] == 1
    assert samples[("lungopacity_refusals_total", (("reason", "queue_full"),))] == 0


def test_metrics_show_the_queue_and_refusals() -> None:
    hold = threading.Event()
    fake = FakePredictor(hold=hold)
    app = create_app(fake, max_concurrent=1, max_queue=1)
    results: list[int] = []
    with local_client(app) as client:

        def upload() -> None:
            results.append(client.post("/v1/predict", files={"file": ("x.png", grey_png(100))}).status_code)

        threads = [threading.Thread(target=upload) for _ in range(2)]
        try:
            threads[0].start()
            assert fake.started.acquire(timeout=10)
            threads[1].start()
            wait_until(lambda: app.state.gate.admitted == 2, "the second request to queue")
            assert client.post("/v1/predict", files={"file": ("x.png", grey_png(100))}).status_code == 503
            samples = _samples(client.get("/metrics").text)
        finally:
            hold.set()
            for thread in threads:
                thread.join(timeout=20)
    assert results == [200, 200]
    assert samples[("lungopacity_inferences_running", ())] == 1
    assert samples[("lungopacity_inference_queue_depth", ())] == 1
    assert samples[("lungopacity_refusals_total", (("reason", "queue_full"),))] == 1


@pytest.fixture
def client() -> TestClient:
    with local_client(create_app(FakePredictor())) as test_client:
        yield test_client


def test_full_line_refuses_before_reading_the_body() -> None:
    """When every inference ticket is taken, a new upload is refused unread (no wasted upload)."""
    app = create_app(FakePredictor(), max_concurrent=1, max_queue=0)
    gate = app.state.gate
    assert gate.try_admit() and gate.full
    received: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost"), (b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"5000")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 503 and headers[b"connection"] == b"close" and int(headers[b"retry-after"]) >= 1
    assert received == [] and app.state.uploads.in_flight == 0
    gate.release()
