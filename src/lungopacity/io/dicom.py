"""DICOM reading: pixels in the package's one convention, plus the header fields we use.

The pixel pipeline, in the order the DICOM standard applies it:

1. decode the one frame (:mod:`lungopacity.io.dicom_pixels`: native samples as a view of
   the file's bytes; JPEG Baseline through Pillow; JPEG Extended 12-bit, JPEG Lossless,
   JPEG-LS, JPEG 2000, HTJ2K and RLE through imagecodecs), after checking every declared
   size against the pixel limit;
2. Modality LUT / Rescale Slope and Intercept;
3. the VOI LUT or window, as the window policy says (:data:`WINDOW_POLICIES`);
4. scale to [0, 1] from the range the stored bits allow (BitsStored, signedness,
   rescale) or, after a VOI transform, from its output range;
5. MONOCHROME1 inversion, so that dense tissue is bright in every image.

Steps 2 to 5 run in place on one float32 array. Nothing else in the package rescales raw
pixel values.

Every function here is total over its input bytes: it returns, or raises
:class:`~lungopacity.errors.ImageReadError` with a one-line ``"<file>: <cause>"``. Header
conversions (``int(ds.Rows)``, ``float(ds.RescaleSlope)``, a VR pydicom does not know)
are inside that guarantee, and non-finite rescale or window values are refused.
"""

from __future__ import annotations

import io
import logging
import math
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from lungopacity.errors import ConfigError
from lungopacity.io.dicom_pixels import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    ENCAPSULATED_SYNTAXES,
    JPEG_BASELINE,
    NATIVE_SYNTAXES,
    PixelGeometry,
    encapsulated_frame,
    locate_pixel_data,
    native_frame,
)
from lungopacity.io.errors import ImageReadError
from lungopacity.io.limits import DEFAULT_MAX_PIXELS, HEADER_ALLOWANCE_BYTES, max_file_bytes, pixel_limit_cause

log = logging.getLogger(__name__)

WindowPolicy = Literal["none", "auto", "file"]

#: Window policies of the readers:
#:
#: - ``none``: never apply a VOI LUT or window (pixels scaled over the stored range);
#: - ``auto``: apply the file's VOI LUT when it has one, else its Window Center/Width when
#:   BitsStored > 8 (a 12-16-bit image is meant to be looked at through its window);
#: - ``file``: apply the file's VOI LUT or window whenever it has one.
WINDOW_POLICIES: tuple[str, ...] = ("none", "auto", "file")

_AGE_RE = re.compile(r"^\s*(\d{1,3}(?:\.\d+)?)\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
_INFLATE_CHUNK = 1 << 20
_LUT_CHUNK = 1 << 20  # pixels mapped per step through a VOI/Modality LUT


# --------------------------------------------------------------------------- header values


def parse_age(value: Any) -> float | None:
    """Patient age in years from a DICOM Age String or a bare number.

    RSNA stores ``'51'``; the standard form is ``'051Y'``; months, weeks and days
    (``'006M'``, ``'003W'``, ``'010D'``) are converted to years. Anything else is None.
    """
    try:
        if value is None:
            return None
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            v = float(value)
            return v if math.isfinite(v) and v >= 0 else None
        match = _AGE_RE.match(str(value))
        if not match:
            return None
        number, unit = match.groups()
        return float(number) * _AGE_UNIT_YEARS[unit.upper()]
    except Exception:  # noqa: BLE001 - an unparsable age is an unknown age
        return None


def parse_sex(value: Any) -> str | None:
    """'M' or 'F' from PatientSex (case and spaces ignored); anything else is unknown."""
    try:
        text = "" if value is None else str(value).strip().upper()
    except Exception:  # noqa: BLE001
        return None
    if text in ("M", "MALE"):
        return "M"
    if text in ("F", "FEMALE"):
        return "F"
    return None


def parse_view(value: Any) -> str | None:
    """'AP' or 'PA' from ViewPosition; other projections (LL, ...) are unknown for this model."""
    try:
        text = "" if value is None else str(value).strip().upper()
    except Exception:  # noqa: BLE001
        return None
    return text if text in ("AP", "PA") else None


def _get(ds: Any, keyword: str) -> Any:
    """``ds.get(keyword)``, or None when pydicom cannot convert the stored value."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.get(keyword)
    except Exception:  # noqa: BLE001 - unknown VR, bad number, bad length: the value is unknown
        return None


def _finite_float(value: Any) -> float | None:
    try:
        v = float(value)
    except Exception:  # noqa: BLE001
        return None
    return v if math.isfinite(v) else None


def _pixel_spacing(ds: Any) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _get(ds, keyword)
        if value is None:
            continue
        try:
            values = [_finite_float(v) for v in value] if not isinstance(value, (str, bytes, int, float)) else [_finite_float(value)] * 2
        except Exception:  # noqa: BLE001
            return None
        if len(values) == 1:
            values = values * 2
        if len(values) != 2 or any(v is None or v <= 0 for v in values):
            return None
        return (float(values[0]), float(values[1]))  # type: ignore[arg-type]
    return None


def _text(ds: Any, keyword: str) -> str | None:
    value = _get(ds, keyword)
    try:
        return str(value) if value else None
    except Exception:  # noqa: BLE001
        return None


def _optional_int(ds: Any, keyword: str) -> int | None:
    value = _get(ds, keyword)
    try:
        return int(value) if value is not None and value != "" else None
    except Exception:  # noqa: BLE001
        return None


def header_from_dataset(ds: Any, *, window: dict[str, Any] | None = None) -> dict[str, Any]:
    """The header dict of the package (see docs/ARCHITECTURE.md) from a pydicom Dataset.

    Never raises: a value pydicom cannot convert is unknown (None). ``window`` is the
    record of the VOI transform applied (see :func:`read_dicom`); None records the
    ``none`` policy.
    """
    comments = " ".join(_text(ds, k) or "" for k in ("ImageComments", "DeidentificationMethod"))
    return {
        "sex": parse_sex(_get(ds, "PatientSex")),
        "age": parse_age(_get(ds, "PatientAge")),
        "view": parse_view(_get(ds, "ViewPosition")),
        "pixel_spacing": _pixel_spacing(ds),
        "modality": _text(ds, "Modality"),
        "patient_id": _text(ds, "PatientID"),
        "rows": _optional_int(ds, "Rows"),
        "cols": _optional_int(ds, "Columns"),
        "synthetic": "lungopacity synthetic" in comments.lower(),
        "window": window if window is not None else window_record("none"),
    }


def window_record(policy: str, applied: str | None = None, center: float | None = None, width: float | None = None,
                  function: str | None = None) -> dict[str, Any]:
    """``header['window']``: the policy asked for and the VOI transform it applied.

    ``applied`` is ``'voi_lut'``, ``'window'`` or None; ``center``/``width`` (and the
    VOI LUT Function) are those of the applied window, None otherwise.
    """
    return {"policy": policy, "applied": applied, "center": center, "width": width, "function": function}


# --------------------------------------------------------------------------- opening


@dataclass
class ParsedDicom:
    """A DICOM's header (pydicom Dataset, read up to Pixel Data) and where its pixels lie."""

    ds: Any
    syntax: str
    buffer: memoryview
    pixel_offset: int
    implicit: bool
    little: bool


def _meta_transfer_syntax(data: bytes | memoryview) -> tuple[str | None, int]:
    """(TransferSyntaxUID, offset after the File Meta group) of a file with the DICM prefix."""
    buf = memoryview(data)
    pos, syntax = 132, None
    for _ in range(256):
        if len(buf) - pos < 8:
            break
        group, element = struct.unpack("<HH", buf[pos : pos + 4])
        if group != 0x0002:
            break
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if len(buf) - pos < 12:
                break
            (length,) = struct.unpack("<I", buf[pos + 8 : pos + 12])
            head = 12
        else:
            (length,) = struct.unpack("<H", buf[pos + 6 : pos + 8])
            head = 8
        if length == 0xFFFFFFFF:
            break
        if element == 0x0010:
            syntax = bytes(buf[pos + head : pos + head + length]).rstrip(b"\0 ").decode("ascii", "replace")
        pos += head + length
    return syntax, pos


def _stop_at_pixels(tag: Any, vr: Any, length: Any) -> bool:
    return int(tag) in _PIXEL_TAGS


def _parse_body(buffer: io.BytesIO, name: str) -> tuple[Any, int]:
    from pydicom.filereader import read_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(buffer, False, True, stop_when=_stop_at_pixels)
    return ds, buffer.tell()


def _declared_pixel_bytes(ds: Any, name: str, max_pixels: int) -> int:
    """Bytes the declared image needs (all frames and samples), refusing sizes over the limit."""
    rows, cols = _required_int(ds, "Rows", name), _required_int(ds, "Columns", name)
    frames = _frame_count(ds, name)
    samples = _int_attr(ds, "SamplesPerPixel", name, default=1)
    bits = _int_attr(ds, "BitsAllocated", name, default=8)
    cause = pixel_limit_cause(rows, cols, max_pixels, frames=frames, samples=samples)
    if cause:
        raise ImageReadError(name, cause)
    return (rows * cols * frames * max(samples, 1) * max(bits, 1) + 7) // 8


def _inflate(data: bytes, start: int, name: str, max_pixels: int, header_only: bool) -> tuple[Any, memoryview, int]:
    """Inflate a Deflated Explicit VR Little Endian body, never beyond what its header declares.

    The header is inflated first (at most :data:`HEADER_ALLOWANCE_BYTES`) and parsed;
    the declared image is checked against ``max_pixels``; the rest is inflated into one
    buffer of exactly the declared pixel bytes plus 1 MiB. A stream that inflates further
    is a bomb and is refused. Returns the header Dataset, the inflated bytes and the
    offset of Pixel Data in them.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    source = memoryview(data)[start:]
    consumed = 0

    def pieces(limit: int) -> Any:
        """Inflated chunks until ``limit`` more bytes were produced or the stream ends."""
        nonlocal consumed
        produced = 0
        while produced < limit and not inflater.eof:
            if inflater.unconsumed_tail:
                chunk: bytes | memoryview = inflater.unconsumed_tail
            elif consumed < len(source):
                chunk = source[consumed : consumed + _INFLATE_CHUNK]
                consumed += len(chunk)
            else:
                return  # the stream ends early: the pixel-length check reports it
            piece = inflater.decompress(chunk, max(1, min(4 * _INFLATE_CHUNK, limit - produced)))
            produced += len(piece)
            yield piece

    try:
        head = io.BytesIO()
        target, ds, offset = 1 << 18, None, 0
        while True:
            for piece in pieces(target - head.tell()):
                head.write(piece)
            length = head.tell()
            head.seek(0)
            try:
                ds, offset = _parse_body(head, name)
            except Exception:  # noqa: BLE001 - a header cut by the partial inflation: inflate more
                ds, offset = None, length
            head.seek(length)
            exhausted = inflater.eof or (consumed >= len(source) and not inflater.unconsumed_tail)
            if (ds is not None and offset < length) or exhausted:
                break
            if target >= HEADER_ALLOWANCE_BYTES:
                raise ImageReadError(name, f"Deflated DICOM header inflates to more than {HEADER_ALLOWANCE_BYTES} bytes")
            target = min(target * 4, HEADER_ALLOWANCE_BYTES)
        if ds is None:
            head.seek(0)
            ds, offset = _parse_body(head, name)
        if header_only or offset >= length or "Rows" not in ds:
            return ds, head.getbuffer()[:length], offset
        cap = offset + 12 + _declared_pixel_bytes(ds, name, max_pixels) + (1 << 20)
        buffer = bytearray(cap)
        buffer[:length] = head.getbuffer()[:length]
        del head
        filled = length
        for piece in pieces(cap - length + 1):
            if filled + len(piece) > cap:
                raise ImageReadError(name, f"Deflated DICOM inflates beyond the {cap} bytes its header declares (a decompression bomb)")
            buffer[filled : filled + len(piece)] = piece
            filled += len(piece)
        return ds, memoryview(buffer)[:filled], offset
    except zlib.error as exc:
        raise ImageReadError(name, f"corrupt Deflate stream ({exc})") from None


def open_dicom(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, header_only: bool = False) -> ParsedDicom:
    """Parse a DICOM's header (up to Pixel Data); Deflated bodies are inflated within limits."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if len(data) >= 132 and data[128:132] == b"DICM":
            syntax, body_start = _meta_transfer_syntax(data)
            if syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
                ds, inflated, offset = _inflate(data, body_start, name, max_pixels, header_only)
                if len(ds) == 0:
                    raise ImageReadError(name, "truncated or corrupt DICOM (no data elements could be inflated)")
                return ParsedDicom(ds, syntax, inflated, offset, False, True)
        fileobj = io.BytesIO(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fileobj, stop_before_pixels=True)
        # pydicom reports a file cut short only as a warning and returns what it could read.
        for warning in caught:
            if "end of file" in str(warning.message).lower():
                raise ImageReadError(name, f"truncated DICOM ({warning.message})")
        if len(ds) == 0:
            raise ImageReadError(name, "truncated or corrupt DICOM (no data elements could be read)")
        offset = fileobj.tell()
        meta = getattr(ds, "file_meta", None)
        syntax = str(_get(meta, "TransferSyntaxUID") or "") if meta is not None else ""
        implicit, little = _encoding(ds, syntax)
        return ParsedDicom(ds, syntax, memoryview(data), offset, implicit, little)
    except ImageReadError:
        raise
    except InvalidDicomError:
        raise ImageReadError(name, "not a DICOM file (no DICM preamble and no valid data elements)") from None
    except MemoryError:
        raise ImageReadError(name, "DICOM header needs more memory than is available") from None
    except Exception as exc:  # noqa: BLE001 - struct.error, KeyError, NotImplementedError (unknown VR) ...
        raise ImageReadError(name, f"truncated or corrupt DICOM ({type(exc).__name__}: {_short(exc)})") from None


def _encoding(ds: Any, syntax: str) -> tuple[bool, bool]:
    original = getattr(ds, "original_encoding", None)
    if isinstance(original, tuple) and len(original) == 2 and None not in original:
        return bool(original[0]), bool(original[1])
    return syntax == "1.2.840.10008.1.2", syntax != "1.2.840.10008.1.2.2"


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _name_of(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read"):
        return "<upload>"
    return str(source)


def read_source_bytes(source: str | Path | bytes | BinaryIO, name: str, max_pixels: int) -> bytes:
    """The input's bytes, refusing files larger than any image under the limit could be."""
    limit = max_file_bytes(max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source) if not isinstance(source, bytes) else source
    elif hasattr(source, "read"):
        try:
            data = source.read(limit + 1)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001
            raise ImageReadError(name, f"cannot read the upload ({type(exc).__name__}: {_short(exc)})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageReadError(name, "the file object did not return bytes (open it in binary mode)")
        data = bytes(data)
    else:
        path = Path(source)
        try:
            if not path.exists():
                raise ImageReadError(name, "file not found")
            if path.is_dir():
                raise ImageReadError(name, "is a directory, not a file")
            size = path.stat().st_size
            if size > limit:
                raise ImageReadError(name, f"file of {size} bytes is larger than any image within the pixel limit could be ({limit} bytes)")
            data = path.read_bytes()
        except ImageReadError:
            raise
        except PermissionError:
            raise ImageReadError(name, "permission denied") from None
        except OSError as exc:
            raise ImageReadError(name, f"cannot read file ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise ImageReadError(name, f"input of more than {limit} bytes is larger than any image within the pixel limit could be")
    return data


def read_dicom_header(
    source: str | Path | bytes | BinaryIO,
    name: str | None = None,
    *,
    window: str = "none",
) -> dict[str, Any]:
    """The header dict alone, without decoding pixels (fast: for building patient tables).

    ``header['window']`` says what :func:`read_dicom` would apply under ``window``.

    Raises:
        ImageReadError: the file is not a readable DICOM (never any other exception).
    """
    name = name or _name_of(source)
    policy = check_window_policy(window)
    try:
        data = read_source_bytes(source, name, DEFAULT_MAX_PIXELS)
        parsed = open_dicom(data, name, header_only=True)
        plan = _window_plan(parsed.ds, policy, name, _int_attr(parsed.ds, "BitsStored", name, default=8, lenient=True))
        return header_from_dataset(parsed.ds, window=plan.record)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(name, "DICOM header needs more memory than is available") from None
    except Exception as exc:  # noqa: BLE001 - the guarantee: nothing else escapes
        log.debug("%s: unexpected error reading the header", name, exc_info=True)
        raise ImageReadError(name, f"unreadable DICOM header ({type(exc).__name__}: {_short(exc)})") from None


# --------------------------------------------------------------------------- attribute checks


def _raw_value(ds: Any, keyword: str, name: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.get(keyword)
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(name, f"unreadable {keyword} ({type(exc).__name__}: {_short(exc, 80)})") from None


def _first(value: Any) -> Any:
    if isinstance(value, (str, bytes, int, float)) or value is None:
        return value
    try:
        return value[0] if len(value) else None
    except Exception:  # noqa: BLE001
        return value


def _int_attr(ds: Any, keyword: str, name: str, *, default: int, lenient: bool = False) -> int:
    value = _first(_get(ds, keyword) if lenient else _raw_value(ds, keyword, name))
    if value is None or value == "":
        return default
    try:
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            raise ValueError
        return int(number)
    except Exception:  # noqa: BLE001
        if lenient:
            return default
        raise ImageReadError(name, f"{keyword} {_show(value)} is not a whole number") from None


def _required_int(ds: Any, keyword: str, name: str) -> int:
    if _raw_value(ds, keyword, name) in (None, ""):
        raise ImageReadError(name, f"DICOM image has no {keyword}")
    return _int_attr(ds, keyword, name, default=0)


def _float_attr(ds: Any, keyword: str, name: str, *, default: float | None) -> float | None:
    value = _first(_raw_value(ds, keyword, name))
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        number = float(value)
    except Exception:  # noqa: BLE001
        raise ImageReadError(name, f"{keyword} {_show(value)} is not a number") from None
    if not math.isfinite(number):
        raise ImageReadError(name, f"{keyword} {_show(value)} is not a finite number")
    return number


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _frame_count(ds: Any, name: str) -> int:
    frames = _int_attr(ds, "NumberOfFrames", name, default=1)
    if frames < 0:
        raise ImageReadError(name, f"NumberOfFrames {frames} is negative")
    return frames or 1


# --------------------------------------------------------------------------- window policy


@dataclass(frozen=True)
class WindowPlan:
    """The VOI transform a policy applies to one file (validated before any decode)."""

    record: dict[str, Any]
    kind: str | None = None  # 'voi_lut' | 'window' | None
    center: float = 0.0
    width: float = 1.0
    function: str = "LINEAR"
    lut: Any = None  # (first_mapped, bits, entries) for a VOI LUT


def check_window_policy(window: str | None) -> str:
    """The policy name, or :class:`~lungopacity.errors.ConfigError` for anything else."""
    policy = "none" if window is None else str(window).strip().lower()
    if policy not in WINDOW_POLICIES:
        raise ConfigError("window", f"must be one of {', '.join(WINDOW_POLICIES)}, not {window!r}")
    return policy


def resolve_window_policy(window: str | None, apply_window: bool | None) -> str:
    """The policy from ``window=`` and the older ``apply_window=`` flag (True means ``file``)."""
    if apply_window is not None:
        policy = check_window_policy(window)
        if policy != "none" and not (apply_window and policy == "file"):
            raise ConfigError("window", f"window={window!r} contradicts apply_window={apply_window!r}")
        return "file" if apply_window else "none"
    return check_window_policy(window)


def _lut_table(item: Any, name: str, what: str) -> tuple[int, int, np.ndarray]:
    descriptor = _raw_value(item, "LUTDescriptor", name)
    data = _raw_value(item, "LUTData", name)
    try:
        entries, first, bits = (int(v) for v in list(descriptor)[:3])
    except Exception:  # noqa: BLE001
        raise ImageReadError(name, f"{what} LUT Descriptor {_show(descriptor)} is not three numbers") from None
    entries = entries or 65536
    if not 1 <= bits <= 16:
        raise ImageReadError(name, f"{what} LUT declares {bits}-bit entries (1 to 16 allowed)")
    if data is None:
        raise ImageReadError(name, f"{what} LUT has no LUT Data")
    try:
        if isinstance(data, (bytes, bytearray)):
            table = np.frombuffer(data, dtype="<u2" if bits > 8 or len(data) >= 2 * entries else np.uint8)
        else:
            table = np.asarray(list(data) if not isinstance(data, int) else [data], dtype=np.float64)
    except Exception:  # noqa: BLE001
        raise ImageReadError(name, f"{what} LUT Data is not a list of numbers") from None
    if table.size < entries:
        raise ImageReadError(name, f"{what} LUT has {table.size} entries; its descriptor declares {entries}")
    table = np.asarray(table[:entries], dtype=np.float32)
    if not np.isfinite(table).all():
        raise ImageReadError(name, f"{what} LUT Data holds non-finite values")
    return first, bits, table


def _window_plan(ds: Any, policy: str, name: str, bits_stored: int) -> WindowPlan:
    """What ``policy`` applies to ``ds``: validated values, or ImageReadError."""
    if policy == "none":
        return WindowPlan(window_record("none"))
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    item = None
    if "VOILUTSequence" in ds:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sequence = ds.VOILUTSequence
                item = sequence[0] if len(sequence) else None
        except Exception:  # noqa: BLE001
            raise ImageReadError(name, "VOI LUT Sequence is unreadable") from None
    if item is not None:
        first, bits, table = _lut_table(item, name, "VOI")
        return WindowPlan(window_record(policy, "voi_lut"), "voi_lut", lut=(first, bits, table))
    if has_window and (policy == "file" or bits_stored > 8):
        center = _float_attr(ds, "WindowCenter", name, default=None)
        width = _float_attr(ds, "WindowWidth", name, default=None)
        if center is None or width is None:
            return WindowPlan(window_record(policy))
        function = str(_get(ds, "VOILUTFunction") or "LINEAR").strip().upper()
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            log.debug("%s: unknown VOI LUT Function %r; using LINEAR", name, function)
            function = "LINEAR"
        if function == "LINEAR" and width < 1:
            raise ImageReadError(name, f"Window Width {width:g} is below 1 (PS3.3 C.11.2.1.2 requires >= 1)")
        if width <= 0:
            raise ImageReadError(name, f"Window Width {width:g} is not positive")
        return WindowPlan(window_record(policy, "window", center, width, function), "window", center, width, function)
    return WindowPlan(window_record(policy))


# --------------------------------------------------------------------------- pixel pipeline


def _stored_value_range(bits_stored: int, signed: bool, slope: float, intercept: float) -> tuple[float, float]:
    """Range of values the stored bits allow, after the Modality LUT (rescale)."""
    if signed:
        lo, hi = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    else:
        lo, hi = 0, 2**bits_stored - 1
    a, b = lo * slope + intercept, hi * slope + intercept
    return (min(a, b), max(a, b))


def _map_through_lut(values: np.ndarray, first: int, table: np.ndarray) -> None:
    """values[i] = table[clip(values[i] - first, 0, n - 1)], in place, a chunk at a time."""
    flat = values.reshape(-1)
    last = table.size - 1
    index = np.empty(min(flat.size, _LUT_CHUNK), dtype=np.int32)
    for start in range(0, flat.size, _LUT_CHUNK):
        part = flat[start : start + _LUT_CHUNK]
        idx = index[: part.size]
        np.subtract(part, first, out=part)
        np.clip(part, 0, last, out=part)
        np.rint(part, out=part)
        idx[...] = part
        np.take(table, idx, out=part)


def _apply_window(values: np.ndarray, plan: WindowPlan) -> None:
    """The window of PS3.3 C.11.2.1.2-3, in place, onto [0, 1]."""
    c, w = plan.center, plan.width
    if plan.function == "LINEAR_EXACT":
        values -= np.float32(c)
        values *= np.float32(1.0 / w)
        values += np.float32(0.5)
    elif plan.function == "SIGMOID":
        values -= np.float32(c)
        values *= np.float32(-4.0 / w)
        with np.errstate(over="ignore"):
            np.exp(values, out=values)
        values += np.float32(1.0)
        np.reciprocal(values, out=values)
    elif w > 1:
        values -= np.float32(c - 0.5)
        values *= np.float32(1.0 / (w - 1.0))
        values += np.float32(0.5)
    else:  # LINEAR with width 1 is a threshold at c - 0.5
        np.greater(values, np.float32(c - 0.5), out=values, casting="unsafe")


def _correct_unused_bits(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Clear (unsigned) or sign-extend (signed) the bits above BitsStored, only when set."""
    bits = 8 * arr.dtype.itemsize
    if bits_stored >= bits or arr.size == 0:
        return arr
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    if int(arr.min()) >= lo and int(arr.max()) <= hi:
        return arr  # nothing above BitsStored: keep the zero-copy view
    fixed = arr.astype(arr.dtype.newbyteorder("="), copy=True)
    shift = bits - bits_stored
    if signed:
        np.left_shift(fixed, shift, out=fixed)
        np.right_shift(fixed, shift, out=fixed)
    else:
        np.bitwise_and(fixed, np.array(hi, dtype=fixed.dtype), out=fixed)
    return fixed


def read_dicom(
    source: str | Path | bytes | BinaryIO,
    *,
    name: str | None = None,
    window: str = "none",
    apply_window: bool | None = None,
    min_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM radiograph as float32 pixels in [0, 1] and its header dict.

    Args:
        source: path, bytes or a binary file object.
        name: how to call the file in error messages (defaults to the path).
        window: the window policy (:data:`WINDOW_POLICIES`): ``none`` (default) never
            applies a VOI transform, ``auto`` applies the VOI LUT when present and the
            window when BitsStored > 8, ``file`` applies whichever the file has. What
            was applied is recorded in ``header['window']``.
        apply_window: older spelling: True means ``window='file'``.
        min_size: the caller will resize the image down to at least this many pixels
            per side, so an 8-bit JPEG may be decoded at a reduced scale (JPEG DCT
            scaling: 1/2, 1/4, 1/8). None decodes at full resolution.
        max_pixels: refuse images declaring more pixels (Rows x Columns x frames x
            samples, and the codestream's own size) before anything is decoded.

    Memory: above the file's bytes, at most the decoder's output (1, 2 or 4 bytes per
    pixel; none for uncompressed data, which is viewed in place) plus the float32 result
    (4 bytes per pixel), plus a copy of the decoded samples only when bits above
    BitsStored must be cleared; steps 2-5 run in place.

    Raises:
        ImageReadError: not a DICOM, no pixel data, colour or multi-frame, truncated,
            corrupt, over the pixel limit, non-finite rescale/window values, or a
            transfer syntax this installation cannot decode (the message says what to
            install). Never any other exception for any input bytes.
        ConfigError: ``window`` is not one of :data:`WINDOW_POLICIES`.
    """
    name = name or _name_of(source)
    policy = resolve_window_policy(window, apply_window)
    try:
        data = read_source_bytes(source, name, max_pixels)
        return _read_dicom_bytes(data, name, policy, min_size, max_pixels)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(name, "decoding needs more memory than is available") from None
    except Exception as exc:  # noqa: BLE001 - the guarantee: nothing else escapes
        log.debug("%s: unexpected error decoding the DICOM", name, exc_info=True)
        raise ImageReadError(name, f"unreadable DICOM ({type(exc).__name__}: {_short(exc)})") from None


def _read_dicom_bytes(data: bytes, name: str, policy: str, min_size: int | None, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    parsed = open_dicom(data, name, max_pixels=max_pixels)
    ds = parsed.ds
    element = locate_pixel_data(parsed.buffer, parsed.pixel_offset, implicit=parsed.implicit, little=parsed.little, name=name)
    if element is None:
        if "Rows" in ds:
            # An image header without pixels: the file is cut short or PixelData is missing.
            raise ImageReadError(name, "DICOM has no pixel data: the file is truncated or its PixelData element is missing")
        raise ImageReadError(name, "DICOM has no pixel data (PixelData element missing)")

    samples = _int_attr(ds, "SamplesPerPixel", name, default=1)
    if samples != 1:
        photometric = _text(ds, "PhotometricInterpretation")
        raise ImageReadError(name, f"colour DICOM ({samples} samples per pixel, {photometric}); a radiograph is monochrome")
    frames = _frame_count(ds, name)
    if frames != 1:
        raise ImageReadError(name, f"multi-frame DICOM ({frames} frames); expected one radiograph")
    photometric = str(_raw_value(ds, "PhotometricInterpretation", name) or "MONOCHROME2").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(name, f"unsupported PhotometricInterpretation {_show(photometric)}")
    rows, cols = _required_int(ds, "Rows", name), _required_int(ds, "Columns", name)
    cause = pixel_limit_cause(rows, cols, max_pixels)
    if cause:
        raise ImageReadError(name, cause)
    bits_allocated = _int_attr(ds, "BitsAllocated", name, default=8)
    if bits_allocated not in (1, 8, 16, 32):
        raise ImageReadError(name, f"BitsAllocated {bits_allocated} (1, 8, 16 or 32 allowed)")
    bits_stored = _int_attr(ds, "BitsStored", name, default=bits_allocated)
    if not 1 <= bits_stored <= bits_allocated:
        raise ImageReadError(name, f"BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}")
    representation = _int_attr(ds, "PixelRepresentation", name, default=0)
    if representation not in (0, 1):
        raise ImageReadError(name, f"PixelRepresentation {representation} (0 or 1 allowed)")
    signed = representation == 1

    modality_lut = None
    if "ModalityLUTSequence" in ds:
        try:
            item = ds.ModalityLUTSequence[0]
        except Exception:  # noqa: BLE001
            raise ImageReadError(name, "Modality LUT Sequence is empty or unreadable") from None
        modality_lut = _lut_table(item, name, "Modality")
        slope, intercept = 1.0, 0.0
    else:
        slope = _float_attr(ds, "RescaleSlope", name, default=1.0) or 0.0
        intercept = _float_attr(ds, "RescaleIntercept", name, default=0.0) or 0.0
        if slope == 0.0:
            raise ImageReadError(name, "RescaleSlope 0 maps every pixel to the same value")
    plan = _window_plan(ds, policy, name, bits_stored)

    syntax = parsed.syntax
    if syntax and syntax not in NATIVE_SYNTAXES and syntax not in ENCAPSULATED_SYNTAXES:
        raise ImageReadError(
            name,
            f"unsupported transfer syntax {_show(syntax)}; the reader decodes the uncompressed syntaxes, Deflate, "
            "JPEG (baseline, extended, lossless), JPEG-LS, JPEG 2000, HTJ2K and RLE",
        )
    geometry = PixelGeometry(rows, cols, bits_allocated, bits_stored, signed)
    if element.encapsulated:
        if syntax in NATIVE_SYNTAXES or not syntax:
            raise ImageReadError(name, f"encapsulated pixel data in a file declaring {NATIVE_SYNTAXES.get(syntax, 'no transfer syntax')}")
        allow_reduced = min_size is not None and plan.kind is None and bits_stored == 8 and modality_lut is None
        raw = encapsulated_frame(element, geometry, syntax, name=name, min_size=min_size, allow_reduced=allow_reduced)
    else:
        if syntax in ENCAPSULATED_SYNTAXES:
            raise ImageReadError(name, f"uncompressed pixel data in a file declaring {ENCAPSULATED_SYNTAXES[syntax][0]}")
        raw = native_frame(element, geometry, little=parsed.little, name=name)
        # Native samples may carry other data (old overlays) above BitsStored. Decoded
        # samples may not: a lossy codec's overshoot is clipped below, not masked.
        raw = _correct_unused_bits(raw, bits_stored, signed) if bits_allocated > 1 else raw

    values = raw.astype(np.float32)  # the one float32 array steps 2-5 work on, in place
    del raw
    if modality_lut is not None:
        first, lut_bits, table = modality_lut
        _map_through_lut(values, first, table)
        lo, hi = 0.0, float(2**lut_bits - 1)
    else:
        if slope != 1.0:
            values *= np.float32(slope)
        if intercept != 0.0:
            values += np.float32(intercept)
        lo, hi = _stored_value_range(bits_stored, signed, slope, intercept)
    if plan.kind == "voi_lut":
        first, lut_bits, table = plan.lut
        _map_through_lut(values, first, table)
        values *= np.float32(1.0 / (2**lut_bits - 1))
    elif plan.kind == "window":
        _apply_window(values, plan)
    else:
        values -= np.float32(lo)
        values *= np.float32(1.0 / max(hi - lo, 1e-12))
    if photometric == "MONOCHROME1":
        np.subtract(np.float32(1.0), values, out=values)
    np.clip(values, 0.0, 1.0, out=values)
    if values.size and not (math.isfinite(float(values.min())) and math.isfinite(float(values.max()))):
        raise ImageReadError(name, "decoding produced non-finite pixel values")
    header = header_from_dataset(ds, window=plan.record)
    return values, header


def decodable_transfer_syntaxes() -> dict[str, str]:
    """UID -> name of every transfer syntax :func:`read_dicom` decodes in this installation."""
    names = dict(NATIVE_SYNTAXES)
    try:
        import imagecodecs  # noqa: F401

        names.update({uid: what for uid, (what, _) in ENCAPSULATED_SYNTAXES.items()})
    except ImportError:
        names[JPEG_BASELINE] = ENCAPSULATED_SYNTAXES[JPEG_BASELINE][0]
    return names


__all__ = [
    "WINDOW_POLICIES",
    "check_window_policy",
    "decodable_transfer_syntaxes",
    "header_from_dataset",
    "open_dicom",
    "parse_age",
    "parse_sex",
    "parse_view",
    "read_dicom",
    "read_dicom_header",
    "resolve_window_policy",
    "window_record",
]
