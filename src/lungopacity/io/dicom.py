"""DICOM reading: pixels in the package's one convention, plus the header fields we use.

The pixel pipeline, in the order the DICOM standard applies it:

1. decode (pydicom; JPEG Baseline through Pillow, uncompressed natively);
2. Modality LUT / Rescale Slope and Intercept;
3. optionally the VOI LUT or window (``apply_window=True``);
4. scale to [0, 1] from the range the stored bits allow (BitsStored, signedness,
   rescale) or, after a window, from the window's output range;
5. MONOCHROME1 inversion, so that dense tissue is bright in every image.

Nothing else in the package rescales raw pixel values.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lungopacity.io.errors import ImageReadError

log = logging.getLogger(__name__)

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

#: Transfer syntaxes Pillow cannot decode, and what to install for them.
_DECODER_HINTS: dict[str, str] = {
    "1.2.840.10008.1.2.4.57": "JPEG Lossless; install pylibjpeg and pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1; install pylibjpeg and pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless; install pyjpegls or python-gdcm",
    "1.2.840.10008.1.2.4.81": "JPEG-LS near-lossless; install pyjpegls or python-gdcm",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless; install pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "JPEG 2000; install pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.51": "JPEG Extended 12-bit; install pylibjpeg and pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.5": "RLE Lossless; install pylibjpeg and pylibjpeg-rle",
}

_AGE_RE = re.compile(r"^\s*(\d{1,3}(?:\.\d+)?)\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


def parse_age(value: Any) -> float | None:
    """Patient age in years from a DICOM Age String or a bare number.

    RSNA stores ``'51'``; the standard form is ``'051Y'``; months, weeks and days
    (``'006M'``, ``'003W'``, ``'010D'``) are converted to years. Anything else is None.
    """
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        return v if np.isfinite(v) and v >= 0 else None
    match = _AGE_RE.match(str(value))
    if not match:
        return None
    number, unit = match.groups()
    return float(number) * _AGE_UNIT_YEARS[unit.upper()]


def parse_sex(value: Any) -> str | None:
    """'M' or 'F' from PatientSex (case and spaces ignored); anything else is unknown."""
    if value is None:
        return None
    text = str(value).strip().upper()
    if text in ("M", "MALE"):
        return "M"
    if text in ("F", "FEMALE"):
        return "F"
    return None


def parse_view(value: Any) -> str | None:
    """'AP' or 'PA' from ViewPosition; other projections (LL, ...) are unknown for this model."""
    if value is None:
        return None
    text = str(value).strip().upper()
    return text if text in ("AP", "PA") else None


def _pixel_spacing(ds: Any) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None:
            try:
                row, col = (float(v) for v in value)
                return (row, col)
            except (TypeError, ValueError):
                try:
                    v = float(value)
                    return (v, v)
                except (TypeError, ValueError):
                    return None
    return None


def header_from_dataset(ds: Any) -> dict[str, Any]:
    """The header dict of the package (see docs/ARCHITECTURE.md) from a pydicom Dataset."""
    comments = " ".join(str(ds.get(k, "")) for k in ("ImageComments", "DeidentificationMethod"))
    return {
        "sex": parse_sex(ds.get("PatientSex")),
        "age": parse_age(ds.get("PatientAge")),
        "view": parse_view(ds.get("ViewPosition")),
        "pixel_spacing": _pixel_spacing(ds),
        "modality": str(ds.get("Modality")) if ds.get("Modality") else None,
        "patient_id": str(ds.get("PatientID")) if ds.get("PatientID") else None,
        "rows": int(ds.Rows) if "Rows" in ds else None,
        "cols": int(ds.Columns) if "Columns" in ds else None,
        "synthetic": "lungopacity synthetic" in comments.lower(),
    }


def _open_dataset(source: str | Path | bytes | BinaryIO, name: str, stop_before_pixels: bool) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    fileobj: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fileobj, stop_before_pixels=stop_before_pixels)
        # pydicom reports a file cut short only as a warning and returns what it could read.
        for warning in caught:
            if "end of file" in str(warning.message).lower():
                raise ImageReadError(name, f"truncated DICOM ({warning.message})")
        if len(ds) == 0:
            raise ImageReadError(name, "truncated or corrupt DICOM (no data elements could be read)")
        return ds
    except ImageReadError:
        raise
    except InvalidDicomError:
        raise ImageReadError(name, "not a DICOM file (no DICM preamble and no valid data elements)") from None
    except FileNotFoundError:
        raise ImageReadError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(name, "is a directory, not a file") from None
    except PermissionError:
        raise ImageReadError(name, "permission denied") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageReadError(name, f"truncated or corrupt DICOM ({type(exc).__name__}: {exc})") from None


def read_dicom_header(source: str | Path | bytes | BinaryIO, name: str | None = None) -> dict[str, Any]:
    """The header dict alone, without decoding pixels (fast: for building patient tables)."""
    name = name or str(source if not isinstance(source, (bytes, bytearray)) else "<upload>")
    ds = _open_dataset(source, name, stop_before_pixels=True)
    return header_from_dataset(ds)


def _stored_value_range(ds: Any) -> tuple[float, float]:
    """Range of values the stored bits allow, after the Modality LUT (rescale)."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2**bits - 1
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    a, b = lo * slope + intercept, hi * slope + intercept
    return (min(a, b), max(a, b))


def _decode_reduced_jpeg(ds: Any, name: str, min_size: int) -> np.ndarray | None:
    """Decode a JPEG Baseline frame at a reduced scale (JPEG DCT scaling) when allowed.

    JPEG can decode at 1/2, 1/4 or 1/8 of its size for a fraction of the cost. The
    result is the image as a box-filtered downscale would give it, so callers that
    resize down anyway (the prepared cache) lose nothing. Returns None when the file
    does not qualify.
    """
    from PIL import Image
    from pydicom.encaps import generate_frames

    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return None
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    img = Image.open(io.BytesIO(frame))
    if img.mode != "L":
        return None
    img.draft("L", (min_size, min_size))
    try:
        return np.asarray(img)
    except OSError as exc:
        raise ImageReadError(name, f"truncated or corrupt JPEG pixel data ({exc})") from None


def read_dicom(
    source: str | Path | bytes | BinaryIO,
    *,
    name: str | None = None,
    apply_window: bool = False,
    min_size: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM radiograph as float32 pixels in [0, 1] and its header dict.

    Args:
        source: path, bytes or a binary file object.
        name: how to call the file in error messages (defaults to the path).
        apply_window: apply the VOI LUT or Window Center/Width when the file has one.
        min_size: the caller will resize the image down to at least this many pixels
            per side, so a JPEG image may be decoded at a reduced scale (see
            :func:`_decode_reduced_jpeg`). None decodes at full resolution.

    Raises:
        ImageReadError: not a DICOM, no pixel data, colour or multi-frame, truncated,
            or a transfer syntax this installation cannot decode (the message says
            what to install).
    """
    name = name or str(source if not isinstance(source, (bytes, bytearray)) else "<upload>")
    ds = _open_dataset(source, name, stop_before_pixels=False)
    if "PixelData" not in ds:
        if "Rows" in ds:
            # An image header without pixels: pydicom drops a PixelData element cut short.
            raise ImageReadError(name, "DICOM has no pixel data: the file is truncated or its PixelData element is missing")
        raise ImageReadError(name, "DICOM has no pixel data (PixelData element missing)")
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise ImageReadError(name, f"colour DICOM ({samples} samples per pixel, {ds.get('PhotometricInterpretation')}); a radiograph is monochrome")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageReadError(name, f"multi-frame DICOM ({frames} frames); expected one radiograph")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(name, f"unsupported PhotometricInterpretation {photometric}")
    header = header_from_dataset(ds)
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""

    raw: np.ndarray | None = None
    reduced_ok = (
        min_size is not None
        and syntax == JPEG_BASELINE
        and not apply_window
        and int(ds.get("BitsStored", 8)) == 8
        and header["rows"] is not None
        and min(header["rows"], header["cols"]) >= 2 * min_size
    )
    if reduced_ok:
        try:
            raw = _decode_reduced_jpeg(ds, name, int(min_size))  # type: ignore[arg-type]
        except ImageReadError:
            raise
        except Exception as exc:  # fall back to the full decoder, which reports properly
            log.debug("%s: reduced JPEG decode failed (%s); decoding at full size", name, exc)
            raw = None
    if raw is None:
        raw = _decode_pixels(ds, name, syntax)

    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(raw, ds).astype(np.float64, copy=False)
    windowed = False
    if apply_window and ("VOILUTSequence" in ds or "WindowCenter" in ds):
        values = apply_voi_lut(values, ds, index=0).astype(np.float64, copy=False)
        windowed = True
    if windowed:
        lo, hi = _voi_output_range(ds, values)
    else:
        lo, hi = _stored_value_range(ds)
    pixels = (values - lo) / max(hi - lo, 1e-12)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    return np.clip(pixels, 0.0, 1.0).astype(np.float32), header


def _voi_output_range(ds: Any, values: np.ndarray) -> tuple[float, float]:
    """Output range of a VOI transform: the LUT's bit depth, or the window's [min, max]."""
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    # apply_voi_lut with a window maps into the stored value range.
    return _stored_value_range(ds)


def _decode_pixels(ds: Any, name: str, syntax: str) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except NotImplementedError as exc:
        hint = _DECODER_HINTS.get(syntax)
        detail = f"unsupported transfer syntax {syntax}" + (f" ({hint})" if hint else "")
        raise ImageReadError(name, f"{detail}: {exc}") from None
    except RuntimeError as exc:
        hint = _DECODER_HINTS.get(syntax)
        if hint and ("no pixel data handler" in str(exc).lower() or "unable to decode" in str(exc).lower() or "plugin" in str(exc).lower()):
            raise ImageReadError(name, f"unsupported transfer syntax {syntax} ({hint})") from None
        raise ImageReadError(name, f"truncated or corrupt pixel data ({exc})") from None
    except (ValueError, OSError, EOFError, KeyError, AttributeError, TypeError, IndexError) as exc:
        raise ImageReadError(name, f"truncated or corrupt pixel data ({type(exc).__name__}: {exc})") from None
    if arr.ndim != 2:
        raise ImageReadError(name, f"expected a 2-D monochrome image, got pixel array of shape {arr.shape}")
    return arr
