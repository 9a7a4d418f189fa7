"""Reading an upload: the streaming multipart parser, its limits and deadlines, the checks.

Everything here runs before an inference slot is taken, so a slow or hostile upload
costs an upload slot (bounded, see :mod:`lungopacity.service.gate`) and never a worker.

* the body is parsed from the request stream into memory with hard size limits (413
  as soon as a limit is passed; the rest is never read); nothing is written to disk;
* with :class:`UploadTimeouts` the body must arrive within a total deadline and deliver
  at least :data:`MIN_PROGRESS_BYTES` in every stall window (408 otherwise), so a client
  sending one byte every few seconds is cut off;
* the content is sniffed, never the file name (415 for what is not DICOM/PNG/JPEG/TIFF),
  and an image's declared dimensions are checked against ``max_pixels`` before decoding;
* logs name an upload by the first 16 hex digits of its SHA-256, never by file name.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import math
import struct
import warnings
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect

from lungopacity.constants import SEXES, VIEWS
from lungopacity.errors import ConfigError
from lungopacity.inference import sniff_format
from lungopacity.service.errors import CLOSE, ApiError
from lungopacity.service.schemas import UploadInfo

log = logging.getLogger(__name__)

#: Room in the request body for the multipart framing and the small form fields.
FORM_OVERHEAD_BYTES = 64 * 1024
#: Longest accepted value of a text form field (sex, age, view).
MAX_FIELD_BYTES = 64
#: Most parts a request may have (file + three fields, with some slack).
MAX_PARTS = 8
ACCEPTED_FORMATS: tuple[str, ...] = ("dicom", "png", "jpeg", "tiff")
FORM_FIELDS: tuple[str, ...] = ("sex", "age", "view")
MAX_AGE_YEARS = 120.0
#: An upload must deliver at least this much in every stall window (see UploadTimeouts).
MIN_PROGRESS_BYTES = 1024


def human_bytes(n: int) -> str:
    """``52428800`` -> ``'50 MB'`` (binary units, as people read file sizes)."""
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" or value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def too_large_message(max_file_bytes: int) -> str:
    """The one 413 message for uploads, wherever the limit is noticed."""
    return f"The file is larger than the limit of {human_bytes(max_file_bytes)}; send one radiograph (DICOM, PNG or JPEG)."


def too_large(max_file_bytes: int) -> ApiError:
    """413 for an upload over the limit; the connection closes (the rest is not read)."""
    return ApiError(413, "upload_too_large", too_large_message(max_file_bytes), CLOSE)


@dataclass(frozen=True)
class UploadTimeouts:
    """How long an upload body may take.

    Attributes:
        total: seconds from the first read of the body to its end.
        stall: the stall window: every ``stall`` seconds at least ``min_progress_bytes``
            must have arrived (the body's end excepted), or the upload is cut off.
        min_progress_bytes: see ``stall``.
    """

    total: float = 120.0
    stall: float = 10.0
    min_progress_bytes: int = MIN_PROGRESS_BYTES

    def __post_init__(self) -> None:
        if not (self.total > 0 and self.stall > 0 and self.min_progress_bytes >= 0):
            raise ConfigError("upload timeouts must be positive")


class _DeadlineReader:
    """Chunks of a body stream, or :class:`ApiError` 408 when a deadline passes.

    The pending read is kept across stall windows (never cancelled while the upload is
    on time), so a window that ends mid-read loses nothing.
    """

    def __init__(self, chunks: AsyncIterable[bytes], timeouts: UploadTimeouts) -> None:
        self._iterator = chunks.__aiter__()
        self._timeouts = timeouts
        self._loop = asyncio.get_running_loop()
        self._began = self._loop.time()
        self._window_began = self._began
        self._window_bytes = 0
        self._pending: asyncio.Future[bytes] | None = None

    async def next(self) -> bytes | None:
        """The next chunk, or None at the end of the body."""
        limits = self._timeouts
        while True:
            if self._pending is None:
                self._pending = asyncio.ensure_future(self._iterator.__anext__())
            now = self._loop.time()
            if now - self._began >= limits.total:
                raise ApiError(
                    408, "upload_timeout",
                    f"The upload took longer than the {limits.total:g} s allowed; send it again over a faster connection.",
                    CLOSE,
                )
            if now - self._window_began >= limits.stall:
                if self._window_bytes < limits.min_progress_bytes:
                    raise ApiError(
                        408, "upload_timeout",
                        f"The upload stalled (less than {human_bytes(limits.min_progress_bytes)} in {limits.stall:g} s); "
                        "send it again.",
                        CLOSE,
                    )
                self._window_began, self._window_bytes = now, 0
            wait = min(self._began + limits.total, self._window_began + limits.stall) - now
            done, _ = await asyncio.wait({self._pending}, timeout=max(wait, 0.0))
            if not done:
                continue
            finished, self._pending = self._pending, None
            try:
                chunk = finished.result()
            except StopAsyncIteration:
                return None
            self._window_bytes += len(chunk)
            return chunk

    async def close(self) -> None:
        """Stop a read still pending (the upload was refused or timed out)."""
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.wait({self._pending})
            self._pending = None


class _PlainReader:
    """Chunks of a body stream without deadlines."""

    def __init__(self, chunks: AsyncIterable[bytes]) -> None:
        self._iterator = chunks.__aiter__()

    async def next(self) -> bytes | None:
        try:
            return await self._iterator.__anext__()
        except StopAsyncIteration:
            return None

    async def close(self) -> None:
        return None


@dataclass
class UploadForm:
    """A parsed ``multipart/form-data`` request, held in memory."""

    file: bytes | None = None
    fields: dict[str, str] = field(default_factory=dict)


class _MultipartCollector:
    """Callbacks for ``python_multipart.MultipartParser`` that keep parts in memory, bounded."""

    def __init__(self, max_file_bytes: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.form = UploadForm()
        self.n_parts = 0
        self.finished = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self.n_parts += 1
        if self.n_parts > MAX_PARTS:
            raise ApiError(400, "bad_request", f"Too many form parts; send one 'file' and optionally {', '.join(FORM_FIELDS)}.", CLOSE)
        self._disposition, self._name, self._is_file, self._data = b"", "", False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ApiError(400, "bad_request", "A form part has no name; name the upload field 'file'.", CLOSE)
        self._name = options[b"name"].decode("utf-8", "replace")
        # Only the presence of a file name matters; its value is never read or logged.
        self._is_file = b"filename" in options or self._name == "file"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        limit = self.max_file_bytes if self._is_file else MAX_FIELD_BYTES
        if len(self._data) + (end - start) > limit:
            if self._is_file:
                raise too_large(self.max_file_bytes)
            raise ApiError(400, "bad_request", f"The form field '{self._name[:20]}' is too long.", CLOSE)
        self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._is_file:
            if self._name != "file":
                raise ApiError(400, "bad_request", "Send the X-ray in the form field named 'file'.", CLOSE)
            if self.form.file is not None:
                raise ApiError(400, "bad_request", "Send one file per request.", CLOSE)
            self.form.file = bytes(self._data)
            return
        if self._name in self.form.fields:
            raise ApiError(400, "bad_request", f"The form field '{self._name[:20]}' is given twice.", CLOSE)
        try:
            self.form.fields[self._name] = self._data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_request", f"The form field '{self._name[:20]}' is not UTF-8 text.", CLOSE) from None

    def on_end(self) -> None:
        self.finished = True


async def read_multipart(
    content_type: str,
    chunks: AsyncIterator[bytes] | AsyncIterable[bytes],
    *,
    max_file_bytes: int,
    max_body_bytes: int | None = None,
    timeouts: UploadTimeouts | None = None,
) -> UploadForm:
    """Parse a ``multipart/form-data`` body from a stream of chunks, in memory, with limits.

    Reading stops, and :class:`ApiError` 413 is raised, as soon as the file part passes
    ``max_file_bytes`` or the whole body passes ``max_body_bytes`` (default: the file
    limit plus :data:`FORM_OVERHEAD_BYTES`); the rest of the stream is never read. With
    ``timeouts``, :class:`ApiError` 408 is raised when the body is late or stalls.

    Args:
        content_type: the request's Content-Type header (must carry the boundary).
        chunks: the request body, e.g. ``request.stream()``.
        max_file_bytes: the largest accepted file part.
        max_body_bytes: the largest accepted body.
        timeouts: the body's deadlines (None: no deadline).

    Returns:
        The file's bytes (None when there is no file part) and the text fields.
    """
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    media_type, params = parse_options_header(content_type or "")
    if media_type != b"multipart/form-data":
        shown = (content_type or "none").split(";")[0][:60]
        raise ApiError(
            415,
            "not_multipart",
            f"Send the X-ray as multipart/form-data with a field named 'file' (the request's content type was '{shown}').",
            CLOSE,
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "The multipart/form-data request has no boundary.", CLOSE)
    body_limit = max_body_bytes if max_body_bytes is not None else max_file_bytes + FORM_OVERHEAD_BYTES
    collector = _MultipartCollector(max_file_bytes)
    callbacks = {name: getattr(collector, name) for name in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
        "on_header_end", "on_headers_finished", "on_end",
    )}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    reader = _DeadlineReader(chunks, timeouts) if timeouts is not None else _PlainReader(chunks)
    received = 0
    try:
        while (chunk := await reader.next()) is not None:
            received += len(chunk)
            if received > body_limit:
                raise too_large(max_file_bytes)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError:
        raise ApiError(400, "bad_request", "The multipart/form-data body is malformed.", CLOSE) from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "The upload was interrupted.") from None
    finally:
        await reader.close()
    if not collector.finished:
        raise ApiError(400, "bad_request", "The multipart/form-data body ended early (incomplete upload).")
    return collector.form


def parse_overrides(fields: Mapping[str, str]) -> dict[str, Any]:
    """Validate the optional form fields into predictor keywords ``sex``, ``age``, ``view``.

    Empty values mean "use the file's header". Raises :class:`ApiError` 400 with a
    message saying what is accepted.
    """
    unknown = sorted(set(fields) - set(FORM_FIELDS))
    if unknown:
        raise ApiError(
            400, "bad_request",
            f"Unknown form field '{unknown[0][:20]}'; the accepted fields are file, {', '.join(FORM_FIELDS)}.",
        )
    values = {key: fields.get(key, "").strip() for key in FORM_FIELDS}
    sex = values["sex"].upper() or None
    if sex is not None and sex not in SEXES:
        raise ApiError(400, "bad_request", f"sex must be M or F (or left empty to use the file's header), not {values['sex'][:20]!r}.")
    view = values["view"].upper() or None
    if view is not None and view not in VIEWS:
        raise ApiError(400, "bad_request", f"view must be AP or PA (or left empty to use the file's header), not {values['view'][:20]!r}.")
    age: float | None = None
    if values["age"]:
        try:
            age = float(values["age"])
        except ValueError:
            age = math.nan
        if not (0.0 <= age <= MAX_AGE_YEARS):  # also false for NaN
            raise ApiError(
                400, "bad_request",
                f"age must be a number of years between 0 and {MAX_AGE_YEARS:.0f} (or left empty), not {values['age'][:20]!r}.",
            )
    return {"sex": sex, "age": age, "view": view}


def declared_pixels(data: bytes, fmt: str, max_pixels: int) -> tuple[int, int] | None:
    """The (width, height) a PNG/JPEG/TIFF declares in its header, without decoding pixels.

    Returns None when the header cannot be read (the predictor then gives the reason) or
    for DICOM (checked by the predictor's reader). An image so large that Pillow refuses
    even to open it is reported as ``(max_pixels + 1, 1)``.
    """
    if fmt == "dicom":
        return None
    if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        # The first chunk holds the size; read it directly (Pillow would refuse a
        # header-only file before telling us).
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.size
        except Image.DecompressionBombError:
            # Pillow refuses past 2 x MAX_IMAGE_PIXELS; that is beyond our own limit too.
            return (max_pixels + 1, 1) if max_pixels < 2 * (Image.MAX_IMAGE_PIXELS or 0) else None
        except Exception:  # noqa: BLE001 - unreadable headers are the predictor's to explain
            return None


def check_upload(form: UploadForm, max_pixels: int) -> tuple[bytes, UploadInfo]:
    """The uploaded file and what the service saw of it, or :class:`ApiError` 400/413/415.

    The format is sniffed from the content; a PNG/JPEG/TIFF whose header declares more
    than ``max_pixels`` is refused before anything decodes it.
    """
    data = form.file
    if data is None:
        raise ApiError(400, "bad_request", "No file: send the X-ray as a multipart/form-data field named 'file'.")
    if not data:
        raise ApiError(400, "bad_request", "The uploaded file is empty.")
    digest = hashlib.sha256(data).hexdigest()[:16]
    fmt = sniff_format(data[:1024])
    if fmt not in ACCEPTED_FORMATS:
        log.info("upload %s: %d bytes, not an image (415)", digest, len(data))
        raise ApiError(
            415, "unsupported_media_type",
            "The file is not a DICOM, PNG or JPEG image (judged from its content, not its name).",
        )
    size = declared_pixels(data, fmt, max_pixels)
    if size is not None and size[0] * size[1] > max_pixels:
        log.info("upload %s: %s of %dx%d pixels over the limit (413)", digest, fmt, size[0], size[1])
        raise ApiError(
            413, "image_too_large",
            f"The image has more than the {max_pixels:,} pixels allowed ({size[0]}x{size[1]}); "
            "send a radiograph at its usual resolution.",
        )
    return data, UploadInfo(sha256=digest, bytes=len(data), format=fmt)
