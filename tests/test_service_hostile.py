"""The service under hostile clients, on a real server (uvicorn on a loopback port).

Each server test starts the production configuration (``service.server.uvicorn_config``:
the guarded h11 protocol, its header and body deadlines) on 127.0.0.1 with a free port,
in a thread, and stops it at the end. The slow clients are raw sockets, bounded in count
and time; every wait has a timeout so a regression fails instead of hanging. The upload
deadlines themselves are also checked without a server, on ``read_multipart``.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from lungopacity.service import ApiError, ServerLimits, UploadTimeouts, create_app, read_multipart, uvicorn_config
from test_service import FakePredictor, grey_png, wait_until

pytestmark = pytest.mark.timeout(120)


@contextmanager
def running_server(app: Any, limits: ServerLimits | None = None) -> Iterator[int]:
    """Serve ``app`` with the production uvicorn configuration on 127.0.0.1; yield the port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, limits=limits, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "uvicorn to start")
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def read_answer(conn: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (bounded by ``timeout``)."""
    conn.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = conn.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def recv_until(conn: socket.socket, suffix: bytes, timeout: float = 10.0) -> bytes:
    """Read until what arrived ends with ``suffix`` (one answer on a kept-alive connection)."""
    conn.settimeout(timeout)
    data = b""
    while not data.endswith(suffix):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def json_error(answer: bytes) -> dict[str, str]:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


def upload_head(port: int, length: int = 100_000) -> bytes:
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def trickle(conn: socket.socket, first: bytes, rest: bytes, every: float, most: int) -> tuple[bytes, int]:
    """Send ``first``, then the bytes of ``rest`` one every ``every`` seconds (at most
    ``most`` of them), until the server answers and closes; return the answer and the
    number of bytes trickled."""
    conn.sendall(first)
    sent = 0
    while sent < most:
        readable, _, _ = select.select([conn], [], [], every)
        if readable:
            return read_answer(conn), sent
        try:
            conn.sendall(rest[sent % len(rest) : sent % len(rest) + 1])
        except OSError:
            break
        sent += 1
    return read_answer(conn, timeout=every), sent


#: A valid start of a multipart body: the file part's head, then the file's bytes.
SLOW_BODY = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n' + b"\0" * 200


class SlowClients:
    """``n`` connections that each send an upload's headers, then 1 byte every ``every`` s."""

    def __init__(self, port: int, n: int, every: float, most: int) -> None:
        self.answers: list[bytes | None] = [None] * n
        self.threads = []
        for i in range(n):
            conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            thread = threading.Thread(target=self._run, args=(i, conn, upload_head(port), every, most), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _run(self, i: int, conn: socket.socket, head: bytes, every: float, most: int) -> None:
        with conn:
            self.answers[i] = trickle(conn, head, SLOW_BODY, every, most)[0]

    def join(self, timeout: float) -> list[bytes | None]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        return self.answers


# --------------------------------------------------------------------------- slow bodies


def test_slow_uploads_do_not_stop_a_normal_request() -> None:
    """10 clients sending 1 byte every 2 s hold upload slots, never inference slots: a normal
    request still gets its reading, and the slow ones are cut off with 408 (issue 12)."""
    fake = FakePredictor()
    # Two inference tickets in all: had the slow uploads taken tickets, the normal
    # request would get 503.
    app = create_app(fake, max_concurrent=1, max_queue=1, stall_timeout=5.0)
    with running_server(app) as port:
        slow = SlowClients(port, n=10, every=2.0, most=15)
        wait_until(lambda: app.state.uploads.in_flight == 10, "the 10 slow uploads to be received", timeout=20)
        assert app.state.gate.admitted == 0  # not one of them holds an inference ticket

        response = httpx.post(f"http://127.0.0.1:{port}/v1/predict", files={"file": ("x.png", grey_png(204))}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["opacity_probability"] == pytest.approx(0.8)
        assert len(fake.calls) == 1

        answers = slow.join(timeout=60)
        assert all(answer is not None and answer.startswith(b"HTTP/1.1 408") for answer in answers), answers
        assert {json_error(answer)["code"] for answer in answers} == {"upload_timeout"}  # type: ignore[arg-type]
        assert "stalled" in json_error(answers[0])["message"]  # type: ignore[arg-type]
        wait_until(lambda: app.state.uploads.in_flight == 0, "the upload slots to be returned")
        assert len(fake.calls) == 1
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'lungopacity_refusals_total{reason="upload_timeout"} 10.0' in metrics


def test_full_upload_slots_answer_503_then_recover() -> None:
    fake = FakePredictor()
    app = create_app(fake, max_uploads=1, stall_timeout=2.0)
    with running_server(app) as port:
        slow = SlowClients(port, n=1, every=0.5, most=40)
        wait_until(lambda: app.state.uploads.in_flight == 1, "the slow upload to be received")
        refused = httpx.post(f"http://127.0.0.1:{port}/v1/predict", files={"file": ("x.png", grey_png(10))}, timeout=30)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "busy" and int(refused.headers["retry-after"]) >= 1
        assert fake.calls == []

        (answer,) = slow.join(timeout=30)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408")
        wait_until(lambda: app.state.uploads.in_flight == 0, "the slot to be returned")
        ok = httpx.post(f"http://127.0.0.1:{port}/v1/predict", files={"file": ("x.png", grey_png(10))}, timeout=30)
        assert ok.status_code == 200, ok.text


def test_unread_body_is_cut_off_by_the_server() -> None:
    """A body the app never reads (here a 405) cannot trickle in for ever."""
    with running_server(create_app(FakePredictor()), ServerLimits(body_timeout=1.5)) as port:
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        with conn:
            head = "POST /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n".encode()
            conn.sendall(head)
            first = recv_until(conn, b"}")
            assert first.startswith(b"HTTP/1.1 405")
            # The answer is out; keep trickling: the server must close the connection.
            _, sent = trickle(conn, b"", b"-" * 60, every=0.25, most=60)
        assert sent < 60, "the connection stayed open while the body trickled in"


# --------------------------------------------------------------------------- slow headers


def test_slow_headers_get_408_and_the_connection_closes() -> None:
    with running_server(create_app(FakePredictor()), ServerLimits(header_timeout=1.5)) as port:
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        with conn:
            # One header byte every 0.25 s: progress, but the headers never end in time.
            answer, sent = trickle(conn, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: ", b"a" * 60, every=0.25, most=60)
    assert sent < 60, "the slow headers were never cut off"
    assert answer.startswith(b"HTTP/1.1 408")
    assert json_error(answer)["code"] == "header_timeout"


def test_silent_connection_is_closed() -> None:
    with running_server(create_app(FakePredictor()), ServerLimits(header_timeout=1.0)) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            answer = read_answer(conn, timeout=20)
    assert answer.startswith(b"HTTP/1.1 408")


def test_slow_headers_of_a_kept_alive_request_are_cut_off_too() -> None:
    with running_server(create_app(FakePredictor()), ServerLimits(header_timeout=1.5, keep_alive_timeout=30)) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            first = recv_until(conn, b'{"status":"ok"}')
            assert first.startswith(b"HTTP/1.1 200")
            answer, sent = trickle(conn, b"GET /healthz HTTP/1.1\r\nHost: loc", b"a" * 60, every=0.25, most=60)
    assert sent < 60 and answer.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("piece", [64, 100_000])  # many small reads, or one read holding it all
def test_oversized_headers_are_refused(piece: int) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 8192 + b"\r\n\r\n"
    with running_server(create_app(FakePredictor()), ServerLimits(max_header_bytes=4096)) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                for start in range(0, len(request), piece):
                    conn.sendall(request[start : start + piece])
            except OSError:
                pass  # the server may close while the rest is sent
            answer = read_answer(conn, timeout=20)
    # The protocol counts before h11 sees the bytes, so h11's own limit (400) never comes first.
    assert answer.startswith(b"HTTP/1.1 431"), answer[:40]
    assert json_error(answer)["code"] == "headers_too_large"


def test_headers_at_the_limit_pass() -> None:
    with running_server(create_app(FakePredictor()), ServerLimits(max_header_bytes=4096)) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: "
            request = head + b"a" * (4096 - len(head) - 4) + b"\r\n\r\n"
            assert len(request) == 4096
            conn.sendall(request[:2000])
            time.sleep(0.05)
            conn.sendall(request[2000:])
            assert recv_until(conn, b'{"status":"ok"}').startswith(b"HTTP/1.1 200")


def test_normal_requests_pass_the_guarded_protocol() -> None:
    """Keep-alive, pipelining-free reuse and large uploads work as before under the guards."""
    fake = FakePredictor()
    with running_server(create_app(fake), ServerLimits(header_timeout=2.0, body_timeout=5.0)) as port:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for level in (10, 200):
                assert client.post("/v1/predict", files={"file": ("x.png", grey_png(level, (900, 700)))}).status_code == 200
            assert client.get("/healthz").json() == {"status": "ok"}
    assert len(fake.calls) == 2


# --------------------------------------------------------------------------- upload deadlines, no server


def _head() -> bytes:
    return b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'


def test_stalled_upload_is_408() -> None:
    async def one_byte_now_and_then() -> AsyncIterator[bytes]:
        yield _head()
        for _ in range(100):
            await asyncio.sleep(0.05)
            yield b"\0"

    with pytest.raises(ApiError) as caught:
        asyncio.run(read_multipart(
            "multipart/form-data; boundary=b", one_byte_now_and_then(), max_file_bytes=10_000,
            timeouts=UploadTimeouts(total=60, stall=0.3),
        ))
    assert caught.value.status == 408 and caught.value.code == "upload_timeout"
    assert "stalled (less than 1 KB in 0.3 s)" in caught.value.message
    assert caught.value.headers == {"Connection": "close"}


def test_upload_over_its_total_time_is_408_even_with_progress() -> None:
    async def steady() -> AsyncIterator[bytes]:
        yield _head()
        while True:
            await asyncio.sleep(0.02)
            yield b"\0" * 4096  # far above the stall rule

    with pytest.raises(ApiError) as caught:
        asyncio.run(read_multipart(
            "multipart/form-data; boundary=b", steady(), max_file_bytes=10**9,
            timeouts=UploadTimeouts(total=0.4, stall=0.1),
        ))
    assert caught.value.status == 408 and "longer than the 0.4 s allowed" in caught.value.message


def test_a_read_spanning_stall_windows_is_not_lost() -> None:
    """A chunk that arrives after a window boundary is still read (the read is not cancelled)."""
    payload = bytes(range(256)) * 16  # 4 KB
    request = httpx.Request("POST", "http://x/", files={"file": ("a", payload)})
    body = request.read()
    parts = [body[i : i + 2048] for i in range(0, len(body), 2048)]

    async def bursty() -> AsyncIterator[bytes]:
        for part in parts:
            await asyncio.sleep(0.25)  # each burst straddles a 0.1 s window
            yield part

    # min_progress 0: windows pass without data while a read is pending.
    timeouts = UploadTimeouts(total=30, stall=0.1, min_progress_bytes=0)
    form = asyncio.run(read_multipart(request.headers["content-type"], bursty(), max_file_bytes=len(payload), timeouts=timeouts))
    assert form.file == payload


def test_upload_timeouts_are_validated() -> None:
    with pytest.raises(ValueError):
        UploadTimeouts(total=0)
    with pytest.raises(ValueError):
        ServerLimits(header_timeout=-1)
