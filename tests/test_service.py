"""The web service through FastAPI's TestClient, with a fake predictor.

Every route and every error path: the result's shape and values, the form overrides,
413 (stream and Content-Length), 415, 422, 400, 503 (queue full, not ready, load
failure), 500 without internals, and no file name or patient id in the logs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from lungopacity.inference import Box, InputError, Prediction, Reading
from lungopacity.service import DISCLAIMER, ApiError, InferenceGate, create_app, parse_overrides, read_multipart, summary_text
from lungopacity.service.app import declared_pixels, human_bytes

# --------------------------------------------------------------------------- the fake


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class FakePredictor:
    """A deterministic stand-in for ``lungopacity.inference.Predictor``.

    P(opacity) is the mean grey level of the image in [0, 1]; the other two classes
    share the rest equally. A positive reading has one box over the central half.
    DICOM is read with pydicom (its PatientSex/PatientAge/ViewPosition are the metadata
    unless overridden), everything else with Pillow; what neither can decode raises
    ``InputError``. ``hold`` (an Event) makes every read wait for it, to fill the
    service's slots; ``started`` counts reads that began; ``fail`` makes reads raise it.
    Its pictures are what the real predictor's are for the page: the image as a grey JPEG
    and, with ``with_heatmap``, a red RGBA glow over the central half at half the size.
    ``no_decision`` (reasons) makes every reading one without a decision (the
    applicability gate refused it); ``warnings`` are the model's warnings on every reading.
    """

    version = "fake-1.0"
    model_card = {"name": "fake", "threshold": 0.5}
    threshold = 0.5

    def __init__(self, hold: threading.Event | None = None, fail: Exception | None = None, *,
                 no_decision: list[str] | None = None, warnings: list[str] | None = None) -> None:
        self.hold = hold
        self.fail = fail
        self.no_decision = list(no_decision or [])
        self.warnings: list[str] = list(warnings or [])
        self.calls: list[dict[str, Any]] = []
        self.started = threading.Semaphore(0)

    def _decode(self, data: bytes, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        if len(data) >= 132 and data[128:132] == b"DICM":
            import pydicom

            try:
                dataset = pydicom.dcmread(io.BytesIO(data))
                pixels = dataset.pixel_array.astype(np.float64)
            except Exception as exc:  # noqa: BLE001 - the fake mirrors the real reader's contract
                raise InputError(name, f"not a readable DICOM ({type(exc).__name__})") from None
            top = float(2 ** int(dataset.BitsStored) - 1)
            age = str(getattr(dataset, "PatientAge", "")).rstrip("Y")
            header = {
                "sex": getattr(dataset, "PatientSex", None) or None,
                "age": float(age) if age.isdigit() else None,
                "view": getattr(dataset, "ViewPosition", None) or None,
            }
            return pixels / top, header
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
        except Exception as exc:  # noqa: BLE001
            raise InputError(name, f"cannot decode the image ({type(exc).__name__})") from None
        return pixels, {"sex": None, "age": None, "view": None}

    def read(
        self,
        data: bytes,
        name: str,
        *,
        sex: str | None = None,
        age: float | None = None,
        view: str | None = None,
        with_images: bool = True,
        with_heatmap: bool = False,
    ) -> Reading:
        self.calls.append({"name": name, "sex": sex, "age": age, "view": view, "with_images": with_images,
                           "with_heatmap": with_heatmap, "n": len(data)})
        self.started.release()
        if self.hold is not None and not self.hold.wait(timeout=20):
            raise RuntimeError("FakePredictor was never released")
        if self.fail is not None:
            raise self.fail
        pixels, header = self._decode(data, name)
        rows, cols = pixels.shape
        p_opacity = round(float(pixels.mean()), 4)
        rest = (1.0 - p_opacity) / 2
        decision: bool | None = p_opacity >= self.threshold
        boxes = [Box(cols / 4, rows / 4, 3 * cols / 4, 3 * rows / 4, p_opacity)] if decision else []
        if self.no_decision:
            decision, boxes = None, []
        given = {"sex": sex, "age": age, "view": view}
        metadata = {"sex": sex or header["sex"], "age": age if age is not None else header["age"], "view": view or header["view"]}
        prediction = Prediction(
            id=name,
            probabilities={"normal": rest, "not_normal": rest, "lung_opacity": p_opacity},
            opacity_probability=p_opacity,
            decision=decision,
            threshold=self.threshold,
            boxes=boxes,
            metadata=metadata,
            metadata_source={key: "missing" if metadata[key] is None else "given" if given[key] is not None else "header"
                             for key in ("sex", "age", "view")},
            missing=[key for key in ("sex", "age", "view") if metadata[key] is None],
            image_size=(rows, cols),
            timings={"read": 0.001, "total": 0.002},
            model_version=self.version,
            applicable=not self.no_decision,
            not_applicable_reasons=list(self.no_decision),
            boxes_note="no decision: the image failed the applicability check, so no boxes are given"
            if self.no_decision else None,
        )
        reading = Reading(prediction=prediction)
        if self.warnings:
            prediction.model_warnings = list(self.warnings)
        if with_images:
            buffer = io.BytesIO()
            Image.fromarray(np.uint8(np.round(pixels * 255))).save(buffer, format="JPEG", quality=90)
            reading.display_jpeg, reading.display_size = buffer.getvalue(), (rows, cols)
        if with_heatmap:
            # A red glow over the central half, like a Grad-CAM layer, at half the size.
            h, w = max(1, rows // 2), max(1, cols // 2)
            ys, xs = np.mgrid[0:h, 0:w]
            glow = np.exp(-(((xs - w / 2) / (w / 4)) ** 2 + ((ys - h / 2) / (h / 4)) ** 2))
            rgba = np.zeros((h, w, 4), np.uint8)
            rgba[:, :, 0] = 255
            rgba[:, :, 3] = np.uint8(np.round(glow * 150))
            reading.heatmap_layer_png = _png_bytes(Image.fromarray(rgba, mode="RGBA"))
        return reading


def grey_png(level: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A PNG of one grey level (width x height)."""
    return _png_bytes(Image.new("L", size, color=level))


def noise_png(size: tuple[int, int], seed: int = 0) -> bytes:
    """A PNG that does not compress (random pixels)."""
    rng = np.random.default_rng(seed)
    return _png_bytes(Image.fromarray(rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)))


def error_of(response: httpx.Response) -> dict[str, str]:
    """The ``error`` object of a JSON error answer (and check the envelope's shape)."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"].strip()
    return body["error"]


def local_client(app: Any, **options: Any) -> TestClient:
    """A TestClient that calls the app as http://localhost, a Host the default allow-list accepts."""
    return TestClient(app, base_url="http://localhost", **options)


@pytest.fixture
def fake() -> FakePredictor:
    return FakePredictor()


@pytest.fixture
def client(fake: FakePredictor) -> TestClient:
    with local_client(create_app(fake)) as test_client:
        yield test_client


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll until ``condition()`` holds; fail with ``what`` if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- 200


def test_predict_returns_the_full_reading(client: TestClient, fake: FakePredictor) -> None:
    data = grey_png(204)  # mean 0.8 -> positive
    response = client.post("/v1/predict", files={"file": ("chest.png", data, "image/png")})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    digest = hashlib.sha256(data).hexdigest()[:16]
    assert body["id"] == f"upload-{digest}"
    assert body["upload"] == {"sha256": digest, "bytes": len(data), "format": "png"}
    assert body["model_version"] == "fake-1.0"
    assert body["probabilities"] == pytest.approx({"normal": 0.1, "not_normal": 0.1, "lung_opacity": 0.8})
    assert body["opacity_probability"] == pytest.approx(0.8)
    assert body["decision"] is True and body["threshold"] == 0.5
    assert body["summary"] == "Signs of lung opacity found (probability 0.80)"
    assert body["disclaimer"] == DISCLAIMER
    assert body["boxes"] == [{"x1": 16.0, "y1": 12.0, "x2": 48.0, "y2": 36.0, "box_confidence": pytest.approx(0.8),
                              "detector_score": None, "score": pytest.approx(0.8)}]
    assert body["image_size"] == [48, 64]
    assert body["missing"] == ["sex", "age", "view"]
    assert {"read", "total", "queue_wait", "server_total"} <= set(body["timings"])
    assert body["timings"]["server_total"] >= body["timings"]["queue_wait"] >= 0
    # The picture arrives inline: the predictor's own JPEG and its size; no heatmap unless asked for.
    expected = fake.read(data, "x")
    prefix = "data:image/jpeg;base64,"
    assert body["image_jpeg"].startswith(prefix)
    assert base64.b64decode(body["image_jpeg"][len(prefix):]) == expected.display_jpeg
    assert body["display_size"] == [48, 64]
    assert body["heatmap_png"] is None and body["heatmap_caption"] is None and "overlay_png" not in body
    assert fake.calls[0]["name"] == f"upload-{digest}"  # never the file name
    assert fake.calls[0]["with_heatmap"] is False


def test_heatmap_true_adds_the_heatmap_layer(client: TestClient, fake: FakePredictor) -> None:
    data = grey_png(204)
    response = client.post("/v1/predict?heatmap=true&images=false", files={"file": ("x.png", data)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert fake.calls[-1]["with_heatmap"] is True and fake.calls[-1]["with_images"] is False
    prefix = "data:image/png;base64,"
    assert body["heatmap_png"].startswith(prefix) and body["image_jpeg"] is None
    layer = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"][len(prefix):])))
    assert layer.mode == "RGBA" and layer.size == (32, 24)
    assert body["decision"] is True  # the reading comes with it, the same as without
    from lungopacity.inference.gradcam import HEATMAP_CAPTION

    assert body["heatmap_caption"] == HEATMAP_CAPTION


def test_negative_reading_says_no_opacity(client: TestClient) -> None:
    response = client.post("/v1/predict", files={"file": ("x.png", grey_png(26))})
    body = response.json()
    assert response.status_code == 200
    assert body["decision"] is False and body["boxes"] == []
    assert body["summary"] == "No lung opacity found (probability 0.10)"


def test_form_fields_override_and_are_normalised(client: TestClient, fake: FakePredictor) -> None:
    response = client.post(
        "/v1/predict",
        files={"file": ("x.png", grey_png(128))},
        data={"sex": "f", "age": " 63 ", "view": "ap"},
    )
    assert response.status_code == 200, response.text
    call = fake.calls[-1]
    assert (call["sex"], call["age"], call["view"]) == ("F", 63.0, "AP")
    assert response.json()["metadata"] == {"sex": "F", "age": 63.0, "view": "AP"}
    assert response.json()["missing"] == []


def test_empty_form_fields_mean_use_the_header(client: TestClient, fake: FakePredictor) -> None:
    response = client.post("/v1/predict", files={"file": ("x.png", grey_png(128))}, data={"sex": "", "age": "", "view": ""})
    assert response.status_code == 200
    assert (fake.calls[-1]["sex"], fake.calls[-1]["age"], fake.calls[-1]["view"]) == (None, None, None)


def test_dicom_upload_uses_its_header(client: TestClient, tmp_path: Path) -> None:
    from conftest import make_uncompressed_dicom

    stored = np.full((32, 40), 3000, dtype=np.uint16)  # 3000 / 4095 -> 0.7326
    path = make_uncompressed_dicom(tmp_path / "a.dcm", stored, bits_stored=12, sex="M", age="047Y", view="AP")
    response = client.post("/v1/predict", files={"file": ("study", path.read_bytes(), "application/octet-stream")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["upload"]["format"] == "dicom"
    assert body["opacity_probability"] == pytest.approx(round(3000 / 4095, 4))
    assert body["metadata"] == {"sex": "M", "age": 47.0, "view": "AP"}
    assert body["image_size"] == [32, 40]


def test_content_is_sniffed_not_the_name(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("L", (20, 10), color=51).save(buffer, format="JPEG", quality=95)
    response = client.post("/v1/predict", files={"file": ("notes.txt", buffer.getvalue(), "text/plain")})
    assert response.status_code == 200, response.text
    assert response.json()["upload"]["format"] == "jpeg"


def test_images_false_skips_the_pictures(client: TestClient, fake: FakePredictor) -> None:
    response = client.post("/v1/predict?images=false", files={"file": ("x.png", grey_png(200))})
    assert response.status_code == 200
    assert response.json()["image_jpeg"] is None and response.json()["heatmap_png"] is None
    assert response.json()["display_size"] is None
    assert fake.calls[-1]["with_images"] is False


# --------------------------------------------------------------------------- 413


def test_upload_over_the_limit_is_413(fake: FakePredictor) -> None:
    data = noise_png((100, 100))  # about 10 kB, incompressible
    with local_client(create_app(fake, max_upload_bytes=4000)) as client:
        response = client.post("/v1/predict", files={"file": ("x.png", data)})
        assert response.status_code == 413
        error = error_of(response)
        assert error["code"] == "upload_too_large"
        assert "3.9 KB" in error["message"]
        # Just under the limit is fine.
        small = grey_png(100, (20, 20))
        assert len(small) < 4000
        assert client.post("/v1/predict", files={"file": ("x.png", small)}).status_code == 200
    assert len(fake.calls) == 1


def _call_asgi(app: Any, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict[str, Any], list[int]]:
    """Send one POST /v1/predict straight to the ASGI app; return status, JSON and receive() calls."""
    received: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append(1)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
        "root_path": "", "headers": [(b"host", b"localhost"), *headers], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(payload), received


def test_declared_content_length_over_the_limit_is_refused_unread(fake: FakePredictor) -> None:
    app = create_app(fake, max_upload_bytes=1000)
    headers = [(b"content-type", b"multipart/form-data; boundary=xyz"), (b"content-length", b"999999999")]
    status, body, received = _call_asgi(app, headers, b"")
    assert status == 413 and body["error"]["code"] == "upload_too_large"
    assert received == []  # not one byte of the body was read


def test_stream_reading_stops_at_the_limit() -> None:
    consumed: list[int] = []

    async def endless_file() -> AsyncIterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        for i in range(1000):
            consumed.append(i)
            yield b"\0" * 1000

    with pytest.raises(ApiError) as caught:
        asyncio.run(read_multipart("multipart/form-data; boundary=b", endless_file(), max_file_bytes=5000))
    assert caught.value.status == 413
    assert len(consumed) == 6  # the sixth kilobyte passes 5000 bytes; nothing after it is read


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_read_multipart_round_trip(chunk_size: int) -> None:
    payload = bytes(range(256)) * 40
    request = httpx.Request(
        "POST", "http://x/", files={"file": ("a b.dcm", payload)}, data={"sex": "M", "age": "33.5"}
    )
    body = request.read()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), chunk_size):
            yield body[start : start + chunk_size]

    form = asyncio.run(read_multipart(request.headers["content-type"], chunks(), max_file_bytes=len(payload)))
    assert form.file == payload
    assert form.fields == {"sex": "M", "age": "33.5"}


def test_truncated_multipart_is_400() -> None:
    async def truncated() -> AsyncIterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\nabc'

    with pytest.raises(ApiError) as caught:
        asyncio.run(read_multipart("multipart/form-data; boundary=b", truncated(), max_file_bytes=100))
    assert caught.value.status == 400 and "ended early" in caught.value.message


def test_image_with_too_many_pixels_is_413(fake: FakePredictor) -> None:
    with local_client(create_app(fake, max_pixels=10_000)) as client:
        response = client.post("/v1/predict", files={"file": ("x.png", grey_png(0, (200, 100)))})
        assert response.status_code == 413
        error = error_of(response)
        assert error["code"] == "image_too_large" and "200x100" in error["message"]
        assert client.post("/v1/predict", files={"file": ("x.png", grey_png(0, (100, 100)))}).status_code == 200
    assert len(fake.calls) == 1


def test_declared_pixels_reads_headers_only() -> None:
    buffer = io.BytesIO()
    Image.new("L", (300, 20)).save(buffer, format="JPEG")
    assert declared_pixels(buffer.getvalue(), "jpeg", 10**6) == (300, 20)
    assert declared_pixels(b"\x89PNG\r\n\x1a\nrubbish", "png", 10**6) is None
    # A PNG header declaring 100000 x 100000 pixels (no pixel data at all).
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk
    assert declared_pixels(bomb, "png", 8192 * 8192) == (100_000, 100_000)
    # A JPEG whose frame header claims 65000 x 65000 pixels: Pillow refuses to open it.
    jpeg = bytearray(buffer.getvalue())
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    width, height = declared_pixels(bytes(jpeg), "jpeg", 8192 * 8192)
    assert width * height > 8192 * 8192


# --------------------------------------------------------------------------- 415 / 422 / 400


def test_text_file_named_dcm_is_415(client: TestClient, fake: FakePredictor) -> None:
    response = client.post("/v1/predict", files={"file": ("scan.dcm", b"patient notes, not an image\n" * 20)})
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"
    assert fake.calls == []


def test_request_that_is_not_multipart_is_415(client: TestClient) -> None:
    response = client.post("/v1/predict", json={"file": "abc"})
    assert response.status_code == 415
    error = error_of(response)
    assert error["code"] == "not_multipart" and "application/json" in error["message"]


def test_corrupt_png_is_422_with_the_cause(client: TestClient) -> None:
    response = client.post("/v1/predict", files={"file": ("Smith_John.png", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "unreadable_image"
    assert error["message"].startswith("The PNG file could not be read: cannot decode the image")
    assert "Smith_John" not in error["message"]


@pytest.mark.parametrize(
    ("fields", "mentions"),
    [
        ({"sex": "X"}, "sex must be M or F"),
        ({"age": "-5"}, "age must be a number of years between 0 and 120"),
        ({"age": "abc"}, "not 'abc'"),
        ({"age": "nan"}, "age must be"),
        ({"age": "200"}, "age must be"),
        ({"view": "LL"}, "view must be AP or PA"),
        ({"Sex": "M"}, "Unknown form field 'Sex'"),
    ],
)
def test_bad_form_fields_are_400(client: TestClient, fake: FakePredictor, fields: dict[str, str], mentions: str) -> None:
    response = client.post("/v1/predict", files={"file": ("x.png", grey_png(1))}, data=fields)
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "bad_request" and mentions in error["message"]
    assert fake.calls == []


def test_missing_or_empty_file_is_400(client: TestClient) -> None:
    missing = client.post("/v1/predict", files={"sex": (None, "M")})
    assert missing.status_code == 400 and "field named 'file'" in error_of(missing)["message"]
    empty = client.post("/v1/predict", files={"file": ("x.png", b"")})
    assert empty.status_code == 400 and error_of(empty)["message"] == "The uploaded file is empty."
    two = client.post("/v1/predict", files=[("file", ("a.png", grey_png(1))), ("file", ("b.png", grey_png(2)))])
    assert two.status_code == 400 and "one file" in error_of(two)["message"]


def test_parse_overrides_exact_values() -> None:
    assert parse_overrides({}) == {"sex": None, "age": None, "view": None}
    assert parse_overrides({"sex": " m ", "age": "0", "view": "Pa"}) == {"sex": "M", "age": 0.0, "view": "PA"}
    assert parse_overrides({"age": "120"})["age"] == 120.0
    with pytest.raises(ApiError):
        parse_overrides({"age": "inf"})


# --------------------------------------------------------------------------- 503 / 500


def test_full_queue_answers_503_with_retry_after() -> None:
    hold = threading.Event()
    fake = FakePredictor(hold=hold)
    app = create_app(fake, max_concurrent=1, max_queue=1)
    results: dict[str, int] = {}
    with local_client(app) as client:

        def upload(key: str) -> None:
            results[key] = client.post("/v1/predict", files={"file": ("x.png", grey_png(100))}).status_code

        running = threading.Thread(target=upload, args=("running",))
        running.start()
        assert fake.started.acquire(timeout=10), "the first request never reached the predictor"
        waiting = threading.Thread(target=upload, args=("waiting",))
        waiting.start()
        gate: InferenceGate = app.state.gate
        wait_until(lambda: gate.admitted == 2, "the second request to queue")
        try:
            refused = client.post("/v1/predict", files={"file": ("x.png", grey_png(100))})
            assert refused.status_code == 503
            assert error_of(refused)["code"] == "busy"
            assert int(refused.headers["retry-after"]) >= 1
        finally:
            hold.set()
            running.join(timeout=20)
            waiting.join(timeout=20)
        assert results == {"running": 200, "waiting": 200}
        wait_until(lambda: gate.admitted == 0, "the tickets to be returned")
        assert client.post("/v1/predict", files={"file": ("x.png", grey_png(100))}).status_code == 200
    assert len(fake.calls) == 3


def test_inference_gate_counts_tickets() -> None:
    gate = InferenceGate(max_concurrent=2, max_queue=1)
    assert [gate.try_admit() for _ in range(4)] == [True, True, True, False]
    gate.release()
    assert gate.try_admit() is True
    assert 1 <= gate.retry_after_seconds() <= 60
    with pytest.raises(ValueError):
        InferenceGate(max_concurrent=0, max_queue=1)


def test_readyz_is_503_until_the_bundle_is_loaded(fake: FakePredictor) -> None:
    loaded = threading.Event()

    def slow_loader() -> FakePredictor:
        assert loaded.wait(timeout=20)
        return fake

    app = create_app(slow_loader)
    with local_client(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and error_of(not_ready)["code"] == "not_ready"
        predict = client.post("/v1/predict", files={"file": ("x.png", grey_png(1))})
        assert predict.status_code == 503 and predict.headers["retry-after"] == "5"
        assert client.get("/v1/info").json()["ready"] is False
        loaded.set()
        wait_until(lambda: app.state.service.ready, "the loader to finish")
        assert client.get("/readyz").json() == {"status": "ready", "model_version": "fake-1.0"}
        assert client.post("/v1/predict", files={"file": ("x.png", grey_png(1))}).status_code == 200


def test_failed_load_is_reported_not_ready(caplog: pytest.LogCaptureFixture) -> None:
    def broken_loader() -> FakePredictor:
        raise ValueError("bundle.json: missing key 'threshold'")

    app = create_app(broken_loader)
    with caplog.at_level(logging.ERROR), local_client(app) as client:
        wait_until(lambda: app.state.service.load_error is not None, "the loader to fail")
        response = client.get("/readyz")
        assert response.status_code == 503
        error = error_of(response)
        assert error["code"] == "model_unavailable" and "threshold" not in error["message"]
        assert client.get("/healthz").status_code == 200
    assert "missing key 'threshold'" in caplog.text  # the administrator finds the cause in the log


def test_unexpected_failure_is_500_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakePredictor(fail=RuntimeError("CUDA error at /opt/secret/kernel.cu:42"))
    app = create_app(fake)
    with caplog.at_level(logging.ERROR), local_client(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/predict", files={"file": ("x.png", grey_png(1))})
        assert response.status_code == 500
        error = error_of(response)
        assert error["code"] == "internal_error" and "secret" not in error["message"]
        assert app.state.gate.admitted == 0
    assert "RuntimeError" in caplog.text


# --------------------------------------------------------------------------- privacy


def test_logs_never_name_the_file_or_the_patient(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from conftest import make_uncompressed_dicom

    stored = np.full((16, 16), 200, dtype=np.uint8)
    path = make_uncompressed_dicom(tmp_path / "x.dcm", stored, bits_stored=8)
    import pydicom

    dataset = pydicom.dcmread(path)
    dataset.PatientID = "PID-98765"
    dataset.PatientName = "Doe^Jane"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    dicom = buffer.getvalue()
    file_name = "Doe_Jane_PID-98765_chest.dcm"

    fake = FakePredictor()
    with caplog.at_level(logging.DEBUG), local_client(create_app(fake)) as client:
        ok = client.post("/v1/predict", files={"file": (file_name, dicom)})
        bad = client.post("/v1/predict", files={"file": (file_name, b"\x89PNG\r\n\x1a\nbroken")})
        text = client.post("/v1/predict", files={"file": (file_name, b"hello")})
    assert (ok.status_code, bad.status_code, text.status_code) == (200, 422, 415)
    digest = hashlib.sha256(dicom).hexdigest()[:16]
    assert digest in caplog.text  # uploads are logged, by hash
    for secret in ("Doe", "Jane", "PID-98765", "chest.dcm"):
        assert secret not in caplog.text
        assert secret not in ok.text + bad.text + text.text
    assert fake.calls[0]["name"] == f"upload-{digest}"


# --------------------------------------------------------------------------- page, docs, misc


SVG_NAMESPACE = "http://www.w3.org/2000/svg"


def test_page_is_accessible_and_offline(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<meta name="viewport"' in html
    assert '<label for="file-input"' in html and '<input type="file" id="file-input"' in html
    assert 'aria-live="polite"' in html and 'role="alert"' in html
    assert "Not a diagnosis." in html and 'href="/openapi.json"' in html
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        response = client.get(asset)
        assert response.status_code == 200 and kind in response.headers["content-type"]
        # Works offline: nothing is fetched from another host (the SVG namespace is a name, not a fetch).
        text = response.text.replace(SVG_NAMESPACE, "")
        assert "http://" not in text and "https://" not in text
    assert "http://" not in html.replace(SVG_NAMESPACE, "") and "https://" not in html


def test_openapi_describes_the_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/healthz", "/readyz", "/v1/info"} <= set(spec["paths"])
    predict = spec["paths"]["/v1/predict"]["post"]
    assert "file" in predict["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(predict["responses"])
    assert {p["name"] for p in predict["parameters"]} >= {"images", "heatmap"}
    answer = spec["components"]["schemas"]["PredictResponse"]["properties"]
    assert {"image_jpeg", "display_size", "heatmap_png"} <= set(answer) and "overlay_png" not in answer


def test_info_and_unknown_routes(client: TestClient) -> None:
    info = client.get("/v1/info").json()
    assert info["ready"] is True and info["model_version"] == "fake-1.0"
    assert info["max_upload_bytes"] == 50 * 2**20 and "dicom" in info["formats"]
    assert error_of(client.get("/nowhere"))["code"] == "not_found"
    assert error_of(client.get("/v1/predict"))["code"] == "method_not_allowed"


def test_summary_and_sizes_in_words() -> None:
    assert summary_text(Prediction("a", {}, 0.834, True, 0.5)) == "Signs of lung opacity found (probability 0.83)"
    assert summary_text(Prediction("a", {}, 0.2, False, 0.5)) == "No lung opacity found (probability 0.20)"
    assert human_bytes(50 * 2**20) == "50 MB"
    assert human_bytes(4000) == "3.9 KB"
    assert human_bytes(999) == "999 bytes"
