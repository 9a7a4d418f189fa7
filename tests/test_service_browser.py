"""End to end in real headless Chromium: the page uploads a file and shows the reading.

The app runs under uvicorn on 127.0.0.1 (a free port, the production configuration of
``service.server``) in a background thread, with the fake predictor of
``test_service.py``. Every request the page makes to another host is blocked and
recorded, so the tests also prove the page and the API docs work offline (no CDN).
Screenshots go to /tmp/service_desktop.png, /tmp/service_desktop_heatmap.png,
/tmp/service_phone.png, /tmp/service_token.png, /tmp/service_docs.png and /tmp/service_redoc.png.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lungopacity.service import create_app, uvicorn_config
from test_service import FakePredictor

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]


def chest_like_png(path: Path, brightness: int) -> Path:
    """A 320 x 256 grey picture with two dark 'lungs' (enough to look at in a screenshot)."""
    image = Image.new("L", (320, 256), color=brightness)
    draw = ImageDraw.Draw(image)
    draw.ellipse((50, 40, 150, 220), fill=max(0, brightness - 90))
    draw.ellipse((170, 40, 270, 220), fill=max(0, brightness - 90))
    noise = np.random.default_rng(0).integers(-10, 10, size=(256, 320))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _serve(app: Any) -> Iterator[str]:
    """Serve an app with uvicorn on a free loopback port until the generator is closed."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.02)
    else:
        pytest.fail("uvicorn did not start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """The app with the fake predictor (deterministic results for the page's states)."""
    yield from _serve(create_app(FakePredictor()))


TOKEN = "page-token-7f3a"


@pytest.fixture(scope="module")
def token_server_url() -> Iterator[str]:
    """The app started with a token: every API call must carry it."""
    yield from _serve(create_app(FakePredictor(), token=TOKEN))


@pytest.fixture(scope="module")
def real_server_url(tiny_demo) -> Iterator[str]:
    """The app with a real bundle made by the demo chain, loaded at start-up."""
    yield from _serve(create_app(tiny_demo.paths["model"]))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (install Debian's chromium package; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def open_page(browser: Any, url: str, path: str = "/", **context_options: Any) -> tuple[Any, Any, list[str], list[str]]:
    """``url + path`` in a page that blocks and records requests to other hosts and console errors."""
    context = browser.new_context(**context_options)
    page = context.new_page()
    outside: list[str] = []
    console_errors: list[str] = []

    def only_loopback(route: Any) -> None:
        if route.request.url.startswith(url) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_loopback)
    page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
    page.goto(url + path)
    return context, page, outside, console_errors


def test_upload_shows_result_overlay_and_heatmap(browser: Any, server_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    context, page, outside, console_errors = open_page(browser, server_url, viewport={"width": 1280, "height": 900})
    try:
        assert page.title() == "Lung opacity reader"
        # (Playwright's wait_for_function needs eval, which the page's CSP forbids: use expect.)
        expect(page.locator("#model-version")).to_have_text("fake-1.0")
        # From the keyboard: skip link, then the real file input.
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "file-input"

        page.set_input_files("#file-input", str(chest_like_png(tmp_path / "xray.png", 220)))
        page.select_option("#sex", "F")
        page.fill("#age", "54")
        page.click("#submit-button")
        page.wait_for_selector("#result:not([hidden])", timeout=15_000)

        summary = page.text_content("#summary")
        assert summary.startswith("Signs of lung opacity found (probability 0.")
        assert page.text_content("#status") == f"Done. {summary}."
        assert page.text_content("#metadata") == "female, 54 years, view not given"
        assert page.text_content("#box-count") == "1"
        assert "must be reviewed by a qualified clinician" in page.text_content("#disclaimer")
        overlay = page.get_attribute("#picture", "src")
        assert overlay.startswith("data:image/png;base64,")
        expect(page.locator("#picture")).to_have_js_property("naturalWidth", 320)
        assert page.is_visible("#picture")
        assert page.evaluate("document.activeElement.id") == "result-heading"
        assert page.text_content("#picture-caption") == "Boxes mark where the model found opacity."
        page.screenshot(path="/tmp/service_desktop.png", full_page=True)

        # The heatmap toggle, from the keyboard.
        page.focus("#heatmap-toggle")
        page.keyboard.press("Space")
        heatmap = page.get_attribute("#picture", "src")
        assert heatmap.startswith("data:image/png;base64,") and heatmap != overlay
        assert "Heatmap" in page.get_attribute("#picture", "alt")
        assert page.text_content("#picture-caption").startswith("Warmer colours mark")
        page.screenshot(path="/tmp/service_desktop_heatmap.png")

        # An API error is shown as its JSON message.
        page.set_input_files("#file-input", files=[{"name": "scan.dcm", "mimeType": "application/dicom", "buffer": b"not an image\n" * 20}])
        page.click("#submit-button")
        expect(page.locator("#error")).to_have_text(
            "The file is not a DICOM, PNG or JPEG image (judged from its content, not its name).", timeout=15_000
        )
        assert outside == [], f"the page tried to reach other hosts: {outside}"
        assert console_errors == [] or all("415" in text for text in console_errors), console_errors
    finally:
        context.close()


def test_phone_layout(browser: Any, server_url: str, tmp_path: Path) -> None:
    context, page, outside, console_errors = open_page(
        browser, server_url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True, device_scale_factor=2
    )
    try:
        page.set_input_files("#file-input", str(chest_like_png(tmp_path / "dark.png", 90)))
        page.click("#submit-button")
        page.wait_for_selector("#result:not([hidden])", timeout=15_000)
        assert page.text_content("#summary").startswith("No lung opacity found (probability 0.")
        # Nothing wider than the phone: no sideways scrolling.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        box = page.locator("#picture").bounding_box()
        assert box is not None and box["width"] <= 390
        page.screenshot(path="/tmp/service_phone.png", full_page=True)
        assert outside == [] and console_errors == []
    finally:
        context.close()


def test_docs_render_offline(browser: Any, server_url: str) -> None:
    """/docs (Swagger UI) and /redoc render the operations with every outside request blocked."""
    from playwright.sync_api import expect

    context, page, outside, console_errors = open_page(browser, server_url, "/docs", viewport={"width": 1280, "height": 900})
    try:
        expect(page.locator(".opblock-summary-path", has_text="/v1/predict")).to_be_visible(timeout=30_000)
        paths = {text.strip() for text in page.locator(".opblock-summary-path").all_text_contents()}
        assert {"/v1/predict", "/v1/info", "/healthz", "/readyz", "/metrics"} <= paths
        page.screenshot(path="/tmp/service_docs.png")
        page.goto(server_url + "/redoc")
        expect(page.get_by_text("Read one radiograph", exact=False).first).to_be_visible(timeout=30_000)
        page.screenshot(path="/tmp/service_redoc.png")
        assert outside == [], f"the docs tried to reach other hosts: {outside}"
        # CSP violations show up here. The one expected: Redoc's attribution logo, which it
        # points at its CDN; the CSP stops it in the browser, before any request is made.
        unexpected = [text for text in console_errors if not ("cdn.redoc.ly" in text and "Content Security Policy" in text)]
        assert unexpected == [], console_errors
    finally:
        context.close()


def test_page_asks_for_the_token_and_sends_it(browser: Any, token_server_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    context, page, outside, console_errors = open_page(browser, token_server_url, viewport={"width": 1280, "height": 900})
    try:
        expect(page.locator("#token-form")).to_be_visible(timeout=15_000)
        expect(page.locator("#token-message")).to_contain_text("asks for an access token")
        assert page.evaluate("document.activeElement.id") == "token-input"
        expect(page.locator("#model-version")).to_have_text("unknown (enter the access token)")
        page.screenshot(path="/tmp/service_token.png")

        page.fill("#token-input", "wrong-token")
        page.click("#token-button")
        expect(page.locator("#token-message")).to_contain_text("did not accept this token", timeout=15_000)

        page.fill("#token-input", TOKEN)
        page.click("#token-button")
        expect(page.locator("#model-version")).to_have_text("fake-1.0", timeout=15_000)
        assert page.is_hidden("#token-form")
        page.set_input_files("#file-input", str(chest_like_png(tmp_path / "xray.png", 220)))
        page.click("#submit-button")
        page.wait_for_selector("#result:not([hidden])", timeout=15_000)
        assert page.text_content("#summary").startswith("Signs of lung opacity found")
        # Kept for this tab only, never in the page's address.
        assert page.evaluate("window.sessionStorage.getItem('lungopacity.token')") == TOKEN
        assert TOKEN not in page.url
        assert outside == []
        assert all("401" in text for text in console_errors), console_errors
    finally:
        context.close()


def test_token_in_the_address_fragment_is_used_and_removed(browser: Any, token_server_url: str) -> None:
    from playwright.sync_api import expect

    context, page, outside, console_errors = open_page(browser, token_server_url, f"/#token={TOKEN}")
    try:
        expect(page.locator("#model-version")).to_have_text("fake-1.0", timeout=15_000)
        assert page.is_hidden("#token-form")
        assert page.evaluate("window.location.hash") == "" and TOKEN not in page.url
        assert outside == [] and console_errors == []
    finally:
        context.close()


@pytest.mark.timeout(900)  # builds the toy demo chain when no earlier test has
def test_real_bundle_reads_a_demo_dicom(browser: Any, real_server_url: str, tiny_demo) -> None:
    """The page with a real bundle: upload a synthetic DICOM, see the reading and the overlay."""
    from playwright.sync_api import expect

    dicom = sorted((tiny_demo.paths["data"] / "stage_2_train_images").glob("*.dcm"))[0]
    context, page, outside, console_errors = open_page(browser, real_server_url, viewport={"width": 1280, "height": 900})
    try:
        expect(page.locator("#model-version")).to_contain_text("lungopacity", timeout=60_000)
        page.set_input_files("#file-input", str(dicom))
        page.click("#submit-button")
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        summary = page.text_content("#summary")
        assert summary.startswith(("Signs of lung opacity found (probability 0.", "No lung opacity found (probability 0."))
        assert "years" in page.text_content("#metadata")  # sex/age/view came from the DICOM header
        overlay = page.get_attribute("#picture", "src")
        assert overlay.startswith("data:image/png;base64,")
        expect(page.locator("#picture")).to_have_js_property("naturalWidth", 128)  # the demo DICOM's width
        page.screenshot(path="/tmp/service_real_bundle.png", full_page=True)
        assert outside == [] and console_errors == []
    finally:
        context.close()
