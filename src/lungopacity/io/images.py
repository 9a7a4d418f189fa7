"""One entry point for every image file: :func:`read_image`.

It sniffs the content (never trusts the file name), dispatches to the DICOM reader
or to Pillow, and returns float32 pixels in [0, 1] plus the header dict described in
docs/ARCHITECTURE.md.

:func:`read_image` is total: for any bytes it returns a finite float32 image in [0, 1]
or raises :class:`~lungopacity.errors.ImageReadError` (``"<file>: <cause>"``, one line).
Sizes are checked against ``max_pixels`` from the file's header before any decode
(:mod:`lungopacity.io.limits` documents the memory a read may cost).
"""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from lungopacity.io.dicom import (
    WINDOW_POLICIES,
    _short,
    read_dicom,
    read_source_bytes,
    resolve_window_policy,
    window_record,
)
from lungopacity.io.codestreams import CodestreamError, jpeg_info
from lungopacity.io.dicom_pixels import check_complete
from lungopacity.io.errors import ImageReadError
from lungopacity.io.limits import DEFAULT_MAX_PIXELS, pixel_limit_cause

log = logging.getLogger(__name__)

ImageFormat = Literal["dicom", "png", "jpeg", "tiff"]

#: File extensions the folder scanners pick up.
IMAGE_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff")

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}
_TIFF_TILE_TAGS = (322, 323)  # TileWidth, TileLength


def sniff_format(head: bytes) -> ImageFormat | None:
    """Format from the first bytes of a file (at least 132 for DICOM), or None."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    # DICOM without the 128-byte preamble: starts with a group 0x0008 or 0x0002 tag.
    if len(head) >= 8 and head[:2] in (b"\x08\x00", b"\x02\x00") and head[2:4] != b"\x00\x00":
        return "dicom"
    return None


def empty_header(window: str = "none") -> dict[str, Any]:
    """The header dict of an image that carries no metadata (PNG, JPEG, TIFF)."""
    return {
        "sex": None,
        "age": None,
        "view": None,
        "pixel_spacing": None,
        "modality": None,
        "patient_id": None,
        "rows": None,
        "cols": None,
        "synthetic": False,
        "window": window_record(window),
    }


def _finite_unit(arr: np.ndarray, name: str) -> np.ndarray:
    """Clip in place to [0, 1] and refuse non-finite values (NaN survives clipping)."""
    np.clip(arr, 0.0, 1.0, out=arr)
    if arr.size and not (math.isfinite(float(arr.min())) and math.isfinite(float(arr.max()))):
        raise ImageReadError(name, "the image holds non-finite (NaN or infinite) pixel values")
    return arr


def _gray_from_colour(img: Any, name: str) -> Any:
    """Pillow 'L' from a colour image, warning when it really is in colour (checked on a sample)."""
    rgb = img.convert("RGB")
    img.close()
    step = max(1, int(math.sqrt(rgb.width * rgb.height / 65536.0)))
    sample = np.asarray(rgb.reduce(step) if step > 1 else rgb, dtype=np.float32)
    spread = float(np.abs(sample - sample.mean(axis=2, keepdims=True)).mean())
    if spread > 8.0:
        log.warning("%s: colour image (mean channel spread %.1f/255); using its luminance", name, spread)
    gray = rgb.convert("L")
    rgb.close()
    return gray


def _pil_to_unit_float(img: Any, name: str) -> np.ndarray:
    """Pillow image -> float32 [0, 1] grayscale, scaled by the bit depth of its mode.

    Frees the Pillow image as soon as its samples are copied out, so at most the
    samples (1-4 bytes per pixel) and the float32 result (4) are alive at once.
    """
    mode = img.mode
    if mode in ("1", "L", "P", "LA", "PA", "La"):
        gray = img if mode == "L" else img.convert("L")
        raw = np.asarray(gray)
        gray.close()
        img.close()
        arr = raw.astype(np.float32)
        del raw
        arr *= np.float32(1.0 / 255.0)
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        raw = np.asarray(img)
        img.close()
        arr = raw.astype(np.float32)
        del raw
        arr *= np.float32(1.0 / 65535.0)
    elif mode == "I":
        raw = np.asarray(img)
        img.close()
        top = float(raw.max(initial=0))
        # 32-bit integer images from 16-bit PNG/TIFF hold 0..65535.
        scale = 65535.0 if top <= 65535 else top
        arr = raw.astype(np.float32)
        del raw
        arr *= np.float32(1.0 / scale)
    elif mode == "F":
        arr = np.array(img, dtype=np.float32)
        img.close()
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ImageReadError(name, "floating-point image holds NaN or infinite values")
        if lo < 0.0 or hi > 1.0:
            arr -= np.float32(lo)
            arr *= np.float32(1.0 / max(hi - lo, 1e-12))
    elif mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        return _pil_to_unit_float(_gray_from_colour(img, name), name)
    else:
        raise ImageReadError(name, f"unsupported image mode {mode}")
    return _finite_unit(arr, name)


def _read_pil(
    data: bytes, name: str, fmt: ImageFormat, max_pixels: int, min_size: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels and the original (rows, cols), which differ when JPEG was decoded reduced."""
    from PIL import Image

    # The declared size from the file's own header first (PNG IHDR, JPEG SOF), so that
    # the refusal names our limit; Pillow's open then reads TIFF tags the same way.
    declared = _declared_size(data, fmt, name)
    if declared is not None:
        cause = pixel_limit_cause(declared[0], declared[1], max_pixels)
        if cause:
            raise ImageReadError(name, cause)
    if fmt == "jpeg":
        _check_jpeg_file(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
            w, h = img.size
            # The declared size (PNG IHDR, JPEG SOF, TIFF tags), before any decode.
            cause = pixel_limit_cause(h, w, max_pixels)
            if cause:
                raise ImageReadError(name, cause)
            if fmt == "tiff":
                tag = getattr(img, "tag_v2", {})
                tile_w, tile_h = (int(tag.get(t, 0) or 0) for t in _TIFF_TILE_TAGS)
                if tile_w * tile_h > max(max_pixels, 1) or tile_w * tile_h > 16 * max(w * h, 65536):
                    raise ImageReadError(name, f"TIFF tiles of {tile_w}x{tile_h} pixels for a {w}x{h} image")
            if getattr(img, "n_frames", 1) > 1:
                log.warning("%s: %d frames; using the first", name, img.n_frames)
            if fmt == "jpeg":
                # Grayscale decode straight from the JPEG (luminance): 1 byte per pixel,
                # even for colour files; reduced scale when the caller resizes anyway.
                target = (min_size, min_size) if (min_size is not None and min(w, h) >= 2 * min_size) else (w, h)
                if img.mode == "L" and target != (w, h):
                    img.draft("L", target)
                elif img.mode in ("RGB", "YCbCr", "CMYK"):
                    _warn_if_colour_jpeg(data, name)
                    if img.mode != "CMYK":
                        img.draft("L", target)
            img.load()
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(name, f"decompression bomb refused ({exc})") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt files
        raise ImageReadError(name, f"truncated or corrupt {fmt.upper()} ({type(exc).__name__}: {_short(exc)})") from None
    return _pil_to_unit_float(img, name), (h, w)


def _declared_size(data: bytes, fmt: ImageFormat, name: str) -> tuple[int, int] | None:
    """(rows, cols) from a PNG's IHDR or a JPEG's SOF, without Pillow; None for TIFF."""
    if fmt == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageReadError(name, "truncated or corrupt PNG (no IHDR chunk)")
        width, height = struct.unpack(">II", data[16:24])
        return int(height), int(width)
    if fmt == "jpeg":
        try:
            info = jpeg_info(data)
        except CodestreamError as exc:
            raise ImageReadError(name, f"corrupt JPEG ({exc})") from None
        return info.rows, info.cols
    return None


def _check_jpeg_file(data: bytes, name: str) -> None:
    """Refuse a JPEG file cut short or declaring more pixels than its bytes can hold."""
    try:
        info = jpeg_info(data)
    except CodestreamError as exc:
        raise ImageReadError(name, f"corrupt JPEG ({exc})") from None
    check_complete(info, len(data), name, "JPEG")


def _warn_if_colour_jpeg(data: bytes, name: str) -> None:
    """Warn about a colour photograph, judged on a 1/8-scale decode (cheap)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as small:
            small.draft("RGB", (max(1, small.width // 8), max(1, small.height // 8)))
            sample = np.asarray(small.convert("RGB"), dtype=np.float32)
    except Exception:  # noqa: BLE001 - the full decode reports a broken file
        return
    spread = float(np.abs(sample - sample.mean(axis=2, keepdims=True)).mean()) if sample.size else 0.0
    if spread > 8.0:
        log.warning("%s: colour image (mean channel spread %.1f/255); using its luminance", name, spread)


def read_image(
    source: str | Path | bytes | BinaryIO,
    *,
    name: str | None = None,
    window: str = "none",
    apply_window: bool | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM, PNG, JPEG or TIFF radiograph.

    Args:
        source: a path, the file's bytes, or a binary file object.
        name: the name used in error messages (defaults to the path, or '<upload>').
        window: DICOM window policy, one of :data:`WINDOW_POLICIES` (``none``, the
            default, ``auto`` or ``file``; see :func:`lungopacity.io.dicom.read_dicom`).
            ``header['window']`` records the policy and what it applied.
        apply_window: older spelling: True means ``window='file'``.
        max_pixels: refuse images declaring more pixels than this (decompression bombs),
            checked from the header before decoding. PNG/JPEG/TIFF are also subject to
            Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89.5 Mpx).
        min_size: the caller resizes down to at least this size, so JPEG data may be
            decoded at a reduced scale; None keeps full resolution.

    Returns:
        ``(pixels, header)``: float32 ``H x W`` in [0, 1] (bright = dense), finite, and
        the header dict (sex, age, view, pixel_spacing, modality, patient_id, rows, cols,
        synthetic, window); non-DICOM files have None for the metadata. ``rows``/``cols``
        are always the original size, also when ``min_size`` let JPEG decode smaller.

    Memory: above the input's bytes, at most about ``2 b + 4`` bytes per declared pixel
    (``b`` = bytes per decoded sample: 1 for 8-bit, 2 for 16-bit, 4 for 32-bit/float;
    colour PNG/TIFF add 3 for their RGB buffer): see :mod:`lungopacity.io.limits`.

    Raises:
        ImageReadError: with a one-line message naming the file and the cause, for any
            input that is not a readable image within the limits. No other exception
            escapes for any input bytes (MemoryError included).
        ConfigError: ``window`` is not a known policy.
    """
    if name is None:
        name = "<upload>" if isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read") else str(source)
    policy = resolve_window_policy(window, apply_window)
    try:
        data = read_source_bytes(source, name, max_pixels)
        if not data:
            raise ImageReadError(name, "empty file (0 bytes)")
        fmt = sniff_format(data[:256])
        if fmt is None:
            raise ImageReadError(name, "not an image: content is neither DICOM, PNG, JPEG nor TIFF")
        if fmt == "dicom":
            return read_dicom(data, name=name, window=policy, min_size=min_size, max_pixels=max_pixels)
        pixels, (rows, cols) = _read_pil(data, name, fmt, max_pixels, min_size)
        header = empty_header(policy)
        header["rows"], header["cols"] = rows, cols
        return pixels, header
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(name, "decoding needs more memory than is available") from None
    except Exception as exc:  # noqa: BLE001 - the guarantee: nothing else escapes
        log.debug("%s: unexpected error reading the image", name, exc_info=True)
        raise ImageReadError(name, f"unreadable image ({type(exc).__name__}: {_short(exc)})") from None


def original_size(source: str | Path, header: dict[str, Any] | None = None) -> tuple[int, int]:
    """(rows, cols) of an image file without decoding all of it where possible."""
    if header and header.get("rows") and header.get("cols"):
        return int(header["rows"]), int(header["cols"])
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as img:
                w, h = img.size
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(source, f"cannot read image size ({type(exc).__name__}: {_short(exc)})") from None
    return h, w


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "WINDOW_POLICIES",
    "empty_header",
    "original_size",
    "read_image",
    "sniff_format",
]
