"""The API's documentation pages, served with no network: ``/docs`` and ``/redoc``.

FastAPI's own pages load Swagger UI and Redoc from a CDN, so they are blank on an
offline hospital network. Here both come from the ``fastapi-offline`` package (MIT; it
ships the Swagger UI (Apache-2.0) and Redoc (MIT) bundles) under ``/docs-assets/``, with
pages of our own that run no inline script, so the CSP stays ``script-src 'self'``.
With a token set, the OpenAPI description declares the bearer scheme, so Swagger UI's
"Authorize" button sends it.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from lungopacity.service.security import is_public_path


def _page(name: str) -> str:
    return resources.files("lungopacity.service").joinpath("static", name).read_text("utf-8")


def install_docs(app: FastAPI, *, token_required: bool) -> None:
    """Add ``/docs``, ``/redoc`` and their assets to ``app`` (built with ``docs_url=None``)."""
    app.mount("/docs-assets", StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")
    swagger_html, redoc_html = _page("docs.html"), _page("redoc.html")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return HTMLResponse(swagger_html)

    @app.get("/redoc", response_class=HTMLResponse, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return HTMLResponse(redoc_html)

    if token_required:
        app.openapi = _with_bearer_scheme(app.openapi)  # type: ignore[method-assign]


def _with_bearer_scheme(build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Wrap ``app.openapi``: declare the bearer token on every operation that needs it."""

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI caches it; marking it twice changes nothing
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearer"] = {
            "type": "http", "scheme": "bearer",
            "description": "The token the server was started with (--token or LUNGOPACITY_TOKEN).",
        }
        for path, operations in schema.get("paths", {}).items():
            if not is_public_path(path):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
        return schema

    return openapi
