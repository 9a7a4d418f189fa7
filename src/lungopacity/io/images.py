"""One entry point for every image file: :func:`read_image`.

It sniffs the content (never trusts the file name), dispatches to the DICOM reader
or to Pillow, and returns float32 pixels in [0, 1] plus the header dict described in
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from lungopacity.io.dicom import read_dicom
from lungopacity.io.errors import ImageReadError

log = logging.getLogger(__name__)

ImageFormat = Literal["dicom", "png", "jpeg", "tiff"]

#: File extensions the folder scanners pick up.
IMAGE_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff")

#: Default ceiling on decoded pixels (decompression-bomb guard): 16k x 16k.
DEFAULT_MAX_PIXELS = 16384 * 16384


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


def empty_header() -> dict[str, Any]:
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
    }


def _read_bytes(source: str | Path | bytes | BinaryIO, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if hasattr(source, "read"):
        return source.read()  # type: ignore[union-attr]
    path = Path(source)
    if not path.exists():
        raise ImageReadError(name, "file not found")
    if path.is_dir():
        raise ImageReadError(name, "is a directory, not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageReadError(name, f"cannot read file ({exc.strerror or exc})") from None


def _pil_to_unit_float(img: Any, name: str) -> np.ndarray:
    """Pillow image -> float32 [0, 1] grayscale, scaled by the bit depth of its mode."""
    mode = img.mode
    if mode in ("1", "L", "P", "LA", "PA"):
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif mode == "I":
        raw = np.asarray(img)
        # 32-bit integer images from 16-bit PNG/TIFF hold 0..65535.
        top = 65535.0 if raw.max(initial=0) <= 65535 else float(raw.max())
        arr = raw.astype(np.float32) / top
    elif mode == "F":
        raw = np.asarray(img, dtype=np.float32)
        lo, hi = float(raw.min()), float(raw.max())
        arr = raw if (lo >= 0.0 and hi <= 1.0) else (raw - lo) / max(hi - lo, 1e-12)
    elif mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
        spread = float(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean())
        if spread > 8.0:
            log.warning("%s: colour image (mean channel spread %.1f/255); using its luminance", name, spread)
        arr = np.asarray(img.convert("RGB").convert("L"), dtype=np.float32) / 255.0
    else:
        raise ImageReadError(name, f"unsupported image mode {mode}")
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


def _read_pil(
    data: bytes, name: str, fmt: ImageFormat, max_pixels: int, min_size: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels and the original (rows, cols), which differ when JPEG was decoded reduced."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageReadError(name, f"image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels")
            if getattr(img, "n_frames", 1) > 1:
                log.warning("%s: %d frames; using the first", name, img.n_frames)
            if fmt == "jpeg" and min_size is not None and img.mode == "L" and min(w, h) >= 2 * min_size:
                img.draft("L", (min_size, min_size))
            img.load()
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(name, f"decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(name, f"truncated or corrupt {fmt.upper()} ({exc})") from None
    return _pil_to_unit_float(img, name), (h, w)


def read_image(
    source: str | Path | bytes | BinaryIO,
    *,
    name: str | None = None,
    apply_window: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM, PNG, JPEG or TIFF radiograph.

    Args:
        source: a path, the file's bytes, or a binary file object.
        name: the name used in error messages (defaults to the path, or '<upload>').
        apply_window: DICOM only: apply the file's VOI LUT / window.
        max_pixels: refuse images with more pixels than this (decompression bombs).
        min_size: the caller resizes down to at least this size, so JPEG data may be
            decoded at a reduced scale; None keeps full resolution.

    Returns:
        ``(pixels, header)``: float32 ``H x W`` in [0, 1] (bright = dense), and the
        header dict (sex, age, view, pixel_spacing, modality, patient_id, rows, cols,
        synthetic); non-DICOM files have None for the metadata. ``rows``/``cols`` are
        always the original size, also when ``min_size`` let JPEG decode smaller.

    Raises:
        ImageReadError: with a one-line message naming the file and the cause.
    """
    if name is None:
        name = "<upload>" if isinstance(source, (bytes, bytearray)) or hasattr(source, "read") else str(source)
    data = _read_bytes(source, name)
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    fmt = sniff_format(data[:256])
    if fmt is None:
        raise ImageReadError(name, "not an image: content is neither DICOM, PNG, JPEG nor TIFF")
    if fmt == "dicom":
        pixels, header = read_dicom(data, name=name, apply_window=apply_window, min_size=min_size)
        if pixels.size > max_pixels:
            raise ImageReadError(name, f"image of {pixels.shape[1]}x{pixels.shape[0]} pixels exceeds the limit of {max_pixels} pixels")
        return pixels, header
    pixels, (rows, cols) = _read_pil(data, name, fmt, max_pixels, min_size)
    header = empty_header()
    header["rows"], header["cols"] = rows, cols
    return pixels, header


def original_size(source: str | Path, header: dict[str, Any] | None = None) -> tuple[int, int]:
    """(rows, cols) of an image file without decoding all of it where possible."""
    if header and header.get("rows") and header.get("cols"):
        return int(header["rows"]), int(header["cols"])
    from PIL import Image

    with Image.open(source) as img:
        w, h = img.size
    return h, w
