"""End to end in real headless Chromium: the page uploads a file and shows the reading.

The app runs under uvicorn on 127.0.0.1 (a free port, the production configuration of
``service.server``) in a background thread, with the fake predictor of
``test_service.py``. Every request the page makes to another host is blocked and
recorded, so the tests also prove the page and the API docs work offline (no CDN).
Screenshots go to /tmp/service_desktop.png, /tmp/service_desktop_heatmap.png,
/tmp/service_viewer_zoomed.png, /tmp/service_phone.png, /tmp/service_no_reading.png,
/tmp/service_token.png, /tmp/service_docs.png and /tmp/service_redoc.png. The tests assert
on elements (the viewer keeps its zoom, pan and window in data attributes), not on pixels.
"""

from __future__ import annotations

import json
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


def upload(page: Any, path: Path | None = None, *, files: Any = None, wait: bool = True) -> None:
    """Choose a file and press the button; wait for the result unless told not to."""
    if files is not None:
        page.set_input_files("#file-input", files=files)
    else:
        page.set_input_files("#file-input", str(path))
    page.click("#submit-button")
    if wait:
        page.wait_for_selector("#result:not([hidden])", timeout=15_000)
        # The picture is drawn on the canvas once the JPEG is decoded.
        page.wait_for_selector("#image-canvas[data-window]", state="attached", timeout=15_000)


def test_upload_shows_the_reading_in_the_viewer(browser: Any, server_url: str, tmp_path: Path) -> None:
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

        page.select_option("#sex", "F")
        page.fill("#age", "54")
        upload(page, chest_like_png(tmp_path / "xray-0042.png", 220))

        summary = page.text_content("#summary")
        assert summary.startswith("Signs of lung opacity found (probability 0.")
        assert page.text_content("#status") == f"Done. {summary}."
        assert page.text_content("#metadata") == "female, 54 years, view not given"
        assert page.text_content("#box-count") == "1"
        assert "must be reviewed by a qualified clinician" in page.text_content("#disclaimer")
        assert page.evaluate("document.activeElement.id") == "result-heading"
        # The picture: the server's display JPEG on a canvas at its own size.
        assert page.get_attribute("#image-canvas", "data-width") == "320"
        assert page.get_attribute("#image-canvas", "data-window") == "128,256"
        # The file and what was read from it (the name stays in the page).
        assert page.text_content("#file-name") == "xray-0042.png"
        assert page.text_content("#file-format").startswith("PNG, ")
        assert page.text_content("#image-size") == "320 x 256 pixels"
        assert page.text_content("#field-sex") == "female (given in the form)"
        assert page.text_content("#field-view") == "not known (estimated)"

        # The box: one SVG box in original pixels, numbered like its row in the table.
        assert page.get_attribute("#box-layer", "viewBox") == "0 0 320 256"
        box = page.locator("#box-layer g.box rect.box-line")
        expect(box).to_have_count(1)
        assert [box.get_attribute(k) for k in ("x", "y", "width", "height")] == ["80", "64", "160", "128"]
        assert page.locator("#box-layer text").text_content() == "1"
        cells = page.locator("#box-rows tr").first.locator("th, td").all_text_contents()
        confidence = page.text_content("#opacity-probability")
        assert cells == ["1", "80.0", "64.0", "240.0", "192.0", confidence]
        # Focusing the row (keyboard) highlights its box.
        page.focus("#box-rows tr")
        expect(page.locator("#box-layer g.box")).to_have_class("box highlight")

        # The finding's probability bar has its own colour.
        colours = page.eval_on_selector_all(
            "#probability-rows .bar-fill", "bars => bars.map(b => getComputedStyle(b).backgroundColor)"
        )
        assert len(colours) == 3 and colours[2] != colours[0] == colours[1]
        assert page.locator("#probability-rows tr.finding th").text_content() == "Lung opacity (the finding)"

        # The legend names only what is drawn: the box kind now.
        expect(page.locator("#legend li")).to_have_count(1)
        expect(page.locator("#legend li.box")).to_be_visible()
        assert page.text_content("#picture-caption") == "Boxes mark where the model found opacity."
        page.screenshot(path="/tmp/service_desktop.png", full_page=True)

        # The layers, from the keyboard: the radios move with the arrow keys.
        page.focus("#layer-boxes")
        page.keyboard.press("ArrowLeft")  # -> image only
        assert page.is_checked("#layer-plain")
        expect(page.locator("#box-layer")).to_be_hidden()
        expect(page.locator("#legend li")).to_have_count(0)
        assert page.text_content("#picture-caption") == "The image alone."
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")  # -> boxes + heatmap: fetched now, with ?heatmap=true
        assert page.is_checked("#layer-heatmap")
        expect(page.locator("#heatmap-layer")).to_be_visible(timeout=15_000)
        assert page.get_attribute("#heatmap-layer", "src").startswith("data:image/png;base64,")
        expect(page.locator("#box-layer")).to_be_visible()  # the heatmap adds to the boxes
        expect(page.locator("#legend li")).to_have_count(2)
        expect(page.locator("#legend li.heatmap")).to_contain_text("Grad-CAM heatmap")
        from lungopacity.inference.gradcam import HEATMAP_CAPTION

        assert page.text_content("#picture-caption").startswith("Heatmap: " + HEATMAP_CAPTION)  # the measured wording
        page.screenshot(path="/tmp/service_desktop_heatmap.png")

        # Download of the JSON result.
        with page.expect_download() as download_info:
            page.click("#download-json")
        download = download_info.value
        assert download.suggested_filename.startswith("lung-opacity-upload-") and download.suggested_filename.endswith(".json")
        saved = json.loads(Path(download.path()).read_text())
        assert saved["summary"] == summary and saved["boxes"][0]["x1"] == 80.0

        # A new upload clears everything first; an API error leaves nothing of the last result.
        upload(page, files=[{"name": "scan.dcm", "mimeType": "application/dicom", "buffer": b"not an image\n" * 20}],
               wait=False)
        expect(page.locator("#error")).to_have_text(
            "The file is not a DICOM, PNG or JPEG image (judged from its content, not its name).", timeout=15_000
        )
        assert page.is_hidden("#result")
        assert page.locator("#box-rows tr").count() == 0 and page.locator("#box-layer g").count() == 0
        assert page.get_attribute("#heatmap-layer", "src") is None
        assert page.text_content("#file-name") == "" and page.text_content("#summary") == ""
        # The next good upload starts again with boxes only, no heatmap, no error.
        upload(page, chest_like_png(tmp_path / "second.png", 200))
        assert page.is_checked("#layer-boxes") and page.is_hidden("#heatmap-layer")
        assert page.text_content("#error") == "" and page.text_content("#file-name") == "second.png"
        assert outside == [], f"the page tried to reach other hosts: {outside}"
        assert console_errors == [] or all("415" in text for text in console_errors), console_errors
    finally:
        context.close()


def test_zoom_pan_and_window_level(browser: Any, server_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    context, page, outside, console_errors = open_page(browser, server_url, viewport={"width": 1280, "height": 900})
    try:
        expect(page.locator("#model-version")).to_have_text("fake-1.0")
        upload(page, chest_like_png(tmp_path / "xray.png", 220))
        viewer = page.locator("#viewer")
        assert page.text_content("#zoom-level") == "100 %" and page.is_disabled("#zoom-out")

        # Buttons.
        page.click("#zoom-in")
        expect(page.locator("#zoom-level")).to_have_text("150 %")
        assert "scale(1.5)" in page.get_attribute("#stage", "style")
        page.click("#zoom-out")
        expect(page.locator("#zoom-level")).to_have_text("100 %")

        # Keyboard, in the focused viewer: + zooms, arrows pan, 0 fits.
        viewer.focus()
        page.keyboard.press("+")
        page.keyboard.press("+")
        expect(page.locator("#zoom-level")).to_have_text("225 %")
        x0 = int(viewer.get_attribute("data-pan-x"))
        page.keyboard.press("ArrowRight")  # moves the view right: the image goes left
        assert int(viewer.get_attribute("data-pan-x")) < x0
        y0 = int(viewer.get_attribute("data-pan-y"))
        page.keyboard.press("ArrowDown")
        assert int(viewer.get_attribute("data-pan-y")) < y0
        page.keyboard.press("0")
        expect(page.locator("#zoom-level")).to_have_text("100 %")
        assert viewer.get_attribute("data-pan-x") == "0" and viewer.get_attribute("data-pan-y") == "0"

        # The mouse: the wheel zooms about the pointer, a drag pans.
        box = viewer.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx, cy)
        page.mouse.wheel(0, -100)
        expect(page.locator("#zoom-level")).to_have_text("125 %")
        before = int(viewer.get_attribute("data-pan-x"))
        page.mouse.down()
        page.mouse.move(cx + 40, cy, steps=4)
        page.mouse.up()
        assert int(viewer.get_attribute("data-pan-x")) == min(0, before + 40)
        # Boxes, heatmap and image move together: one transform on their common stage.
        assert page.locator("#stage > canvas + img + svg").count() == 1

        # Window / level: the sliders, a Shift-drag, and the reset.
        page.fill("#wl-level", "100")
        page.fill("#wl-width", "120")
        expect(page.locator("#wl-readout")).to_have_text("level 100, width 120")
        assert page.get_attribute("#image-canvas", "data-window") == "100,120"
        page.focus("#wl-width")
        page.keyboard.press("ArrowRight")  # sliders are keyboard controls
        assert page.get_attribute("#image-canvas", "data-window") == "100,121"
        viewer.scroll_into_view_if_needed()
        box = viewer.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.keyboard.down("Shift")
        page.mouse.move(cx, cy)
        page.mouse.down()
        page.mouse.move(cx + 30, cy - 20, steps=3)
        page.mouse.up()
        page.keyboard.up("Shift")
        assert page.get_attribute("#image-canvas", "data-window") == "120,151"
        page.mouse.move(cx, cy)
        page.mouse.down(button="right")  # the right button windows too, without a key
        page.mouse.move(cx - 10, cy + 10, steps=2)
        page.mouse.up(button="right")
        assert page.get_attribute("#image-canvas", "data-window") == "110,141"
        page.click("#wl-reset")
        expect(page.locator("#wl-readout")).to_have_text("level 128, width 256 (as read)")
        assert page.get_attribute("#image-canvas", "data-window") == "128,256"
        assert page.input_value("#wl-level") == "128" and page.input_value("#wl-width") == "256"
        page.screenshot(path="/tmp/service_viewer_zoomed.png")
        assert outside == [] and console_errors == []
    finally:
        context.close()


def test_phone_layout(browser: Any, server_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    context, page, outside, console_errors = open_page(
        browser, server_url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True, device_scale_factor=2
    )
    try:
        upload(page, chest_like_png(tmp_path / "a-rather-long-file-name-from-the-archive-0001.png", 200))
        assert page.text_content("#summary").startswith("Signs of lung opacity found")
        # Nothing wider than the phone: no sideways scrolling.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for selector in ("#viewer", "#box-table", "#legend", ".toolbar", ".window-level", "#file-facts"):
            box = page.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
        # Every control of the viewer is there and big enough to touch (44 CSS px).
        for selector in ("#zoom-in", "#zoom-out", "#zoom-reset", "#wl-reset", "#download-json"):
            expect(page.locator(selector)).to_be_visible()
            assert page.locator(selector).bounding_box()["height"] >= 44, selector
        for selector in ("#layer-plain", "#layer-boxes", "#layer-heatmap"):
            label = page.locator(f"label:has({selector})").bounding_box()
            assert label["height"] >= 44, selector
        # The box label and the legend are readable: at least 12 CSS px, whatever the image size.
        size = page.eval_on_selector("#legend li", "el => parseFloat(getComputedStyle(el).fontSize)")
        assert size >= 12
        label = page.locator("#box-layer text").bounding_box()
        assert label["height"] >= 12
        page.tap("#zoom-in")
        expect(page.locator("#zoom-level")).to_have_text("150 %")
        page.screenshot(path="/tmp/service_phone.png", full_page=True)

        # A dark image: a negative reading, no boxes, the table says so.
        upload(page, chest_like_png(tmp_path / "dark.png", 90))
        assert page.text_content("#summary").startswith("No lung opacity found (probability 0.")
        assert page.text_content("#box-rows") == "No opacity boxes."
        expect(page.locator("#legend li")).to_have_count(0)  # nothing drawn, nothing named
        assert page.text_content("#zoom-level") == "100 %"  # a new reading starts fitted
        assert outside == [] and console_errors == []
    finally:
        context.close()


REASON = "modality MR is not CR or DX"
WARNING = "This model was trained on synthetic images only: it has not been validated on real radiographs."


@pytest.fixture(scope="module")
def no_reading_server_url() -> Iterator[str]:
    """The app with a fake whose applicability gate refuses every image, with a model warning."""
    yield from _serve(create_app(FakePredictor(no_decision=[REASON], warnings=[WARNING])))


def test_no_reading_is_shown_as_such(browser: Any, no_reading_server_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    context, page, outside, console_errors = open_page(browser, no_reading_server_url, viewport={"width": 1280, "height": 900})
    try:
        upload(page, chest_like_png(tmp_path / "xray.png", 220))
        assert page.text_content("#summary") == f"No reading: the image is outside what the model was trained on ({REASON})"
        assert "no-reading" in page.get_attribute("#summary", "class")
        assert page.locator("#no-reading-reasons li").all_text_contents() == [REASON]
        expect(page.locator("#model-warnings")).to_be_visible()
        assert page.locator("#model-warning-list li").all_text_contents() == [WARNING]
        assert page.text_content("#box-count") == "0"
        assert page.text_content("#opacity-probability").endswith("(no decision: the image is outside the model's range)")
        assert page.text_content("#box-rows").startswith("no decision: the image failed the applicability check")
        assert page.is_disabled("#layer-heatmap")  # no heatmap offered for an image the model cannot read
        expect(page.locator("#uncertain")).to_be_hidden()
        page.screenshot(path="/tmp/service_no_reading.png", full_page=True)
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
    """The page with a real bundle: upload a synthetic DICOM, see the reading, its boxes and the heatmap."""
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
        page.wait_for_selector("#image-canvas[data-window]", state="attached", timeout=60_000)
        assert page.get_attribute("#image-canvas", "data-width") == "128"  # the demo DICOM's width
        assert page.text_content("#field-age").endswith("(from the file's header)")
        n_boxes = int(page.text_content("#box-count"))
        assert page.locator("#box-layer g.box").count() == n_boxes
        page.check("#layer-heatmap")  # the real Grad-CAM layer, asked for now
        expect(page.locator("#heatmap-layer")).to_be_visible(timeout=60_000)
        page.screenshot(path="/tmp/service_real_bundle.png", full_page=True)
        assert outside == [] and console_errors == []
    finally:
        context.close()
