"""The HTTP server: uvicorn's h11 protocol with the timeouts uvicorn lacks.

uvicorn (0.29 to at least 0.54) times out only idle keep-alive connections: a client
that connects and sends its request line and headers one byte at a time, or never
finishes them, holds the connection for ever, and once a request's headers are in, a
body the application does not read (a 404, a 401) can trickle in for ever too. So the
server runs :class:`GuardedH11Protocol`, uvicorn's own h11 protocol plus two deadlines:

* **headers**: a request's line and headers must be complete within ``header_timeout``
  seconds of the connection's start (or of the first byte of a follow-up request on a
  kept-alive connection); otherwise the answer is 408 and the connection closes;
* **body**: a request body must be complete within ``body_timeout`` seconds of its
  headers, whatever the application does with it; otherwise the connection closes.
  (``/v1/predict`` enforces tighter upload deadlines itself, with a JSON 408.)

* **header size**: a request's line and headers may not pass ``max_header_bytes`` (431).
  h11's own ``max_incomplete_event_size`` (set to the same) bounds only what is still
  incomplete, so a large header block arriving in one read would pass it.

Idle keep-alive connections are closed by uvicorn's ``timeout_keep_alive``. The h11 implementation is forced
(httptools, when installed, would bypass these timers) and WebSocket upgrades are off.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lungopacity.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """Connection-level limits of the server (see the module's docstring)."""

    header_timeout: float = 10.0
    body_timeout: float = 130.0
    keep_alive_timeout: int = 5
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        if not (self.header_timeout > 0 and self.body_timeout > 0 and self.keep_alive_timeout >= 1):
            raise ConfigError("server timeouts must be positive (keep-alive at least 1 s)")
        if self.max_header_bytes < 1024:
            raise ConfigError("max_header_bytes must be at least 1024")


def _raw_error(status: str, code: str, message: str) -> bytes:
    """A complete JSON error answer, written before h11 has seen a request to answer."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a body deadline per request."""

    limits = ServerLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes of the current request's head seen so far
        self._head_tail = b""  # its last 3 bytes, to find a terminator split across reads

    # -- uvicorn's protocol interface, extended

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            if self._header_timer is None:
                self._arm_header_timer()  # the first byte of a follow-up request
            if not self._head_within_limit(data):
                log.info("closing a connection whose request headers passed %d bytes", self.limits.max_header_bytes)
                self._refuse(_raw_error(
                    "431 Request Header Fields Too Large", "headers_too_large",
                    f"The request headers are larger than {self.limits.max_header_bytes} bytes.",
                ))
                return
        super().data_received(data)
        self._follow_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_state()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    # -- the header size

    def _head_within_limit(self, data: bytes) -> bool:
        """Count the head's bytes up to its blank line; False once they pass the limit."""
        window = self._head_tail + data
        end = window.find(b"\r\n\r\n")
        used = self._head_bytes + (end + 4 - len(self._head_tail) if end >= 0 else len(data))
        if used > self.limits.max_header_bytes:
            return False
        if end >= 0:
            self._head_bytes, self._head_tail = 0, b""
        else:
            self._head_bytes, self._head_tail = used, window[-3:]
        return True

    def _refuse(self, answer: bytes) -> None:
        """Write a raw answer (nothing else was sent on this connection) and close it."""
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE:
            self.transport.write(answer)
        self.transport.close()

    # -- the deadlines

    def _follow_state(self) -> None:
        """Stop the header timer once a request's headers are in; time its body."""
        state = self.conn.their_state
        if state is not h11.IDLE and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if state is h11.SEND_BODY:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
        elif self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_timed_out)

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        log.info("closing a connection whose request headers took over %g s", self.limits.header_timeout)
        self._refuse(_raw_error(
            "408 Request Timeout", "header_timeout",
            f"The request headers took longer than {self.limits.header_timeout:g} s; send the request again.",
        ))

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        log.info("closing a connection whose request body took over %g s", self.limits.body_timeout)
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None


def guarded_protocol(limits: ServerLimits) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class bound to ``limits`` (uvicorn takes a class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def uvicorn_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits | None = None,
    log_level: str = "info",
    **options: Any,
) -> uvicorn.Config:
    """The uvicorn configuration ``serve`` runs (tests run the same one on a free port)."""
    limits = limits or ServerLimits()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        ws="none",
        lifespan="on",
        timeout_keep_alive=limits.keep_alive_timeout,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        log_level=log_level,
        **options,
    )
