"""Security middleware: response headers, the Host allow-list and the optional bearer token.

All three are pure ASGI middleware, so they also guard what FastAPI serves itself.

* :class:`SecurityHeaders`: no sniffing, no framing, no referrer, and a strict CSP
  (only this origin; the documentation pages get one that lets Swagger UI style itself).
* :class:`HostAllowList`: a request whose ``Host`` is not a loopback name or address, or
  one of the names added, is answered 421 (400 without a Host). A page on another site
  cannot then reach a service on ``localhost`` through a DNS name it re-points there
  (DNS rebinding): the browser sends that name as the Host.
* :class:`BearerToken`: with a token set, every API call needs
  ``Authorization: Bearer <token>`` (401 otherwise). The page, its assets, the API
  description and ``/healthz`` stay open; the page asks a person for the token.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lungopacity.errors import ConfigError
from lungopacity.service.errors import CLOSE, error_response

log = logging.getLogger(__name__)

#: What the allow-list always accepts (every 127.x.y.z address counts as loopback).
DEFAULT_ALLOWED_HOSTS: tuple[str, ...] = ("localhost", "*.localhost", "127.0.0.1", "::1")

#: Served without the token: the page and its assets, the API description, the liveness probe.
PUBLIC_PATHS: frozenset[str] = frozenset({"/", "/favicon.ico", "/healthz", "/openapi.json", "/docs", "/redoc"})
PUBLIC_PREFIXES: tuple[str, ...] = ("/static/", "/docs-assets/")

_PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
# Swagger UI and Redoc set inline styles and Redoc runs its search in a blob: worker;
# scripts still come only from this origin.
_DOCS_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
    "worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_PATHS: tuple[str, ...] = ("/docs", "/redoc")


class SecurityHeaders:
    """No sniffing, no framing, no referrer; a strict CSP on every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = _DOCS_CSP if scope["path"] in DOCS_PATHS else _PAGE_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", csp.encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------- Host


def host_name(value: str) -> str:
    """The host name of a ``Host`` header or an allow-list entry: lower case, no port,
    no brackets, no trailing dot (``'[::1]:8000'`` -> ``'::1'``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``*.localhost`` and loopback addresses (127.0.0.0/8, ::1).

    Used both for Host headers and for the address the server binds to.
    """
    name = host_name(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


class AllowedHosts:
    """Loopback names and addresses, plus the names and addresses given.

    An entry is a host name or address (a port, if given, is ignored), ``*.example.org``
    for every name under ``example.org``, or ``*`` for any Host at all (no protection).
    """

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.any = False
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        for entry in extra:
            entry = entry.strip()
            if entry == "*":
                self.any = True
                continue
            wildcard = entry.startswith("*.")
            name = host_name(entry[2:] if wildcard else entry)
            if any(c in entry for c in " /\\@?#") or not (_is_address(name) or _HOST_NAME.fullmatch(name)):
                raise ConfigError("--allowed-host", f"{entry!r} is not a host name, an address, '*.domain' or '*'")
            if wildcard:
                self.suffixes.append("." + name)
            else:
                self.names.add(name)

    def allows(self, host_header: str) -> bool:
        """Whether a request with this ``Host`` header is answered."""
        if self.any:
            return True
        name = host_name(host_header)
        if not name:
            return False
        return is_loopback_host(name) or name in self.names or any(name.endswith(s) for s in self.suffixes)

    def describe(self) -> str:
        """``'localhost names and loopback addresses, example.org, *.lan'`` for logs and messages."""
        if self.any:
            return "any host"
        shown = sorted(self.names) + sorted("*" + s for s in self.suffixes)
        return ", ".join(["localhost names and loopback addresses", *shown])


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostAllowList:
    """Answer 421 to a request for a host name this server does not serve (400 without Host)."""

    def __init__(self, app: ASGIApp, allowed: AllowedHosts) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.allowed.any:
            await self.app(scope, receive, send)
            return
        host = next((value.decode("latin-1") for key, value in scope["headers"] if key == b"host"), None)
        if host is None or not host.strip():
            response = error_response(400, "bad_request", "The request has no Host header.", CLOSE)
        elif not self.allowed.allows(host):
            shown = host.strip()[:60]
            log.info("refused a request for host %r (not in the allow-list)", shown)
            response = error_response(
                421, "misdirected_request",
                f"This server does not answer to the host name '{shown}'; "
                "its administrator can add it with --allowed-host.",
                CLOSE,
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


# --------------------------------------------------------------------------- token


def check_token(token: str) -> str:
    """The token, or :class:`~lungopacity.errors.ConfigError` when it cannot travel in a header."""
    if not token or any(not (0x21 <= ord(c) <= 0x7E) for c in token):
        raise ConfigError("--token", "the token must be printable ASCII without spaces")
    return token


def is_public_path(path: str) -> bool:
    """Paths served without the token (the page, its assets, the docs, /healthz)."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class BearerToken:
    """Require ``Authorization: Bearer <token>`` on every API call (401 otherwise)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = check_token(token).encode("ascii")

    def _authorised(self, scope: Scope) -> bool | None:
        """True for the right token, False for a wrong one, None when none was sent."""
        header = next((value for key, value in scope["headers"] if key == b"authorization"), None)
        if header is None:
            return None
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credentials.strip(), self._expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        verdict = self._authorised(scope)
        if verdict:
            await self.app(scope, receive, send)
            return
        if verdict is None:
            message = "This server needs an access token: send 'Authorization: Bearer <token>' (the web page asks for it)."
            challenge = 'Bearer realm="lungopacity"'
        else:
            message = "The access token was not accepted."
            challenge = 'Bearer realm="lungopacity", error="invalid_token"'
        response = error_response(401, "unauthorized", message, {"WWW-Authenticate": challenge, **CLOSE})
        await response(scope, receive, send)
