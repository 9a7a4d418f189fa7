"""DICOM Pixel Data -> one integer frame, for every common transfer syntax, within limits.

The reader never lets pydicom decode pixels: it parses the header with pydicom (stopping
before Pixel Data), then locates the Pixel Data element itself and decodes it here, so
that every size is checked before anything is allocated and nothing is copied needlessly:

- native syntaxes (Implicit/Explicit VR Little Endian, Explicit VR Big Endian, Deflated
  after its bounded inflation in :mod:`lungopacity.io.dicom`): a zero-copy NumPy view of
  the file's bytes;
- encapsulated syntaxes: the fragments of the one frame are joined (one copy of the
  *compressed* bytes), the codestream's own header is parsed and checked against Rows,
  Columns, Samples per Pixel and the pixel limit (:mod:`lungopacity.io.codestreams`), and
  only then is the decoder called.

Decoders (all permissively licensed):

=============================================  ===========================================
JPEG Baseline, JPEG Extended 8-bit               Pillow (HPND; libjpeg-turbo), with DCT
                                                 scaling for reduced-size decodes
JPEG Extended 12-bit, JPEG Lossless (P14, SV1)   imagecodecs (BSD-3-Clause; libjpeg-turbo 3)
JPEG-LS lossless and near-lossless               imagecodecs (CharLS, BSD-3-Clause)
JPEG 2000 lossless and lossy, HTJ2K              imagecodecs (OpenJPEG, BSD-2-Clause)
RLE Lossless                                     imagecodecs' PackBits decoder, per segment
=============================================  ===========================================
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from lungopacity.io.codestreams import (
    CodestreamError,
    CodestreamInfo,
    j2k_info,
    jpeg_info,
    rle_segments,
    sniff_codestream,
)
from lungopacity.io.errors import ImageReadError

log = logging.getLogger(__name__)

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

#: Transfer syntaxes whose pixels are stored as plain samples.
NATIVE_SYNTAXES: dict[str, str] = {
    IMPLICIT_VR_LITTLE_ENDIAN: "Implicit VR Little Endian",
    EXPLICIT_VR_LITTLE_ENDIAN: "Explicit VR Little Endian",
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: "Deflated Explicit VR Little Endian",
    EXPLICIT_VR_BIG_ENDIAN: "Explicit VR Big Endian",
}

#: Encapsulated (compressed) transfer syntaxes the reader decodes: UID -> (name, codestream kind).
ENCAPSULATED_SYNTAXES: dict[str, tuple[str, str]] = {
    JPEG_BASELINE: ("JPEG Baseline (Process 1)", "jpeg"),
    "1.2.840.10008.1.2.4.51": ("JPEG Extended (Process 2 and 4, 12-bit)", "jpeg"),
    "1.2.840.10008.1.2.4.57": ("JPEG Lossless (Process 14)", "jpeg"),
    "1.2.840.10008.1.2.4.70": ("JPEG Lossless SV1 (Process 14, Selection Value 1)", "jpeg"),
    "1.2.840.10008.1.2.4.80": ("JPEG-LS Lossless", "jpeg"),
    "1.2.840.10008.1.2.4.81": ("JPEG-LS Near-Lossless", "jpeg"),
    "1.2.840.10008.1.2.4.90": ("JPEG 2000 Lossless", "jpeg2000"),
    "1.2.840.10008.1.2.4.91": ("JPEG 2000", "jpeg2000"),
    "1.2.840.10008.1.2.4.201": ("HTJ2K Lossless", "jpeg2000"),
    "1.2.840.10008.1.2.4.202": ("HTJ2K Lossless RPCL", "jpeg2000"),
    "1.2.840.10008.1.2.4.203": ("HTJ2K", "jpeg2000"),
    "1.2.840.10008.1.2.5": ("RLE Lossless", "rle"),
}

IMAGECODECS_HINT = "install imagecodecs (BSD-3-Clause): pip install 'imagecodecs>=2024.6.1'"

#: Most fragments one frame may have (real files have one to a few hundred).
MAX_FRAGMENTS = 65536

_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UT", b"UN", b"UC", b"UR", b"SV", b"UV"}


@dataclass(frozen=True)
class PixelGeometry:
    """The image pixel attributes the decoders need (validated by the reader)."""

    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool

    @property
    def pixels(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class PixelElement:
    """Where the Pixel Data value lies in the file's (or the inflated) bytes."""

    vr: bytes | None
    value: memoryview
    encapsulated: bool


def locate_pixel_data(buffer: memoryview, offset: int, *, implicit: bool, little: bool, name: str) -> PixelElement | None:
    """The top-level Pixel Data element starting at ``offset`` (where the header parse stopped)."""
    if len(buffer) - offset < 8:
        return None
    endian = "<" if little else ">"
    group, element = struct.unpack(endian + "HH", buffer[offset : offset + 4])
    if group == 0x7FE0 and element in (0x0008, 0x0009):
        raise ImageReadError(name, "DICOM holds Float Pixel Data, which a radiograph reader does not accept")
    if (group, element) != (0x7FE0, 0x0010):
        return None
    vr: bytes | None = None
    if implicit:
        (length,) = struct.unpack(endian + "I", buffer[offset + 4 : offset + 8])
        start = offset + 8
    else:
        vr = bytes(buffer[offset + 4 : offset + 6])
        if vr in _LONG_VRS:
            if len(buffer) - offset < 12:
                return None
            (length,) = struct.unpack(endian + "I", buffer[offset + 8 : offset + 12])
            start = offset + 12
        else:
            (length,) = struct.unpack(endian + "H", buffer[offset + 6 : offset + 8])
            start = offset + 8
    if length == 0xFFFFFFFF:
        return PixelElement(vr, buffer[start:], True)
    return PixelElement(vr, buffer[start : start + length], False)


def frame_fragments(value: memoryview, name: str) -> list[memoryview]:
    """The fragments after the Basic Offset Table of encapsulated Pixel Data (one frame)."""
    pos, items = 0, []
    while True:
        if len(value) - pos < 8:
            if not items:
                raise ImageReadError(name, "encapsulated pixel data is truncated (no Basic Offset Table item)")
            break  # no sequence delimiter: the file ends after the last complete item
        group, element, length = struct.unpack("<HHI", value[pos : pos + 8])
        if (group, element) == _SEQUENCE_DELIMITER:
            break
        if (group, element) != _ITEM:
            raise ImageReadError(name, f"encapsulated pixel data is corrupt (tag ({group:04X},{element:04X}) where an item was expected)")
        if length == 0xFFFFFFFF or pos + 8 + length > len(value):
            raise ImageReadError(name, f"encapsulated pixel data is truncated (an item declares {length} bytes, {len(value) - pos - 8} remain)")
        items.append(value[pos + 8 : pos + 8 + length])
        if len(items) > MAX_FRAGMENTS + 1:
            raise ImageReadError(name, f"encapsulated pixel data has more than {MAX_FRAGMENTS} fragments")
        pos += 8 + length
    fragments = [f for f in items[1:] if len(f)]
    if not fragments:
        raise ImageReadError(name, "encapsulated pixel data holds no compressed frame")
    return fragments


def native_frame(element: PixelElement, geometry: PixelGeometry, *, little: bool, name: str) -> np.ndarray:
    """The first frame of native Pixel Data as an integer array (a view of the bytes where possible)."""
    rows, cols, bits = geometry.rows, geometry.cols, geometry.bits_allocated
    count = geometry.pixels
    value = element.value
    if bits == 1:
        need = (count + 7) // 8
        if len(value) < need:
            raise ImageReadError(name, f"pixel data is truncated ({len(value)} bytes, {need} expected for {cols}x{rows} 1-bit pixels)")
        packed = np.frombuffer(value, dtype=np.uint8, count=need)
        return np.unpackbits(packed, bitorder="little", count=count).reshape(rows, cols)
    itemsize = bits // 8
    need = count * itemsize
    if len(value) < need:
        raise ImageReadError(name, f"pixel data is truncated ({len(value)} bytes, {need} expected for {cols}x{rows} pixels of {bits} bits)")
    if itemsize == 1 and not little and element.vr == b"OW":
        # 8-bit samples in big-endian OW words: swap each byte pair back (one copy).
        words = np.frombuffer(value, dtype=">u2", count=(count + 1) // 2).astype("<u2")
        arr = words.view(np.uint8)[:count]
        return (arr.view(np.int8) if geometry.signed else arr).reshape(rows, cols)
    dtype = np.dtype(("<" if little else ">") + ("i" if geometry.signed else "u") + str(itemsize))
    return np.frombuffer(value, dtype=dtype, count=count).reshape(rows, cols)


def _imagecodecs(name: str, what: str, codec: str) -> Any:
    try:
        import imagecodecs
    except ImportError:
        raise ImageReadError(name, f"{what} needs a decoder that is not installed; {IMAGECODECS_HINT}") from None
    if not getattr(getattr(imagecodecs, codec, None), "available", False):
        raise ImageReadError(name, f"{what} needs imagecodecs' {codec} codec, which this build lacks; {IMAGECODECS_HINT}")
    return imagecodecs


def check_complete(info: CodestreamInfo, size: int, name: str, what: str) -> None:
    """Refuse a codestream cut short: decoders would fill the missing part with grey."""
    if not info.complete:
        end = "EOC" if info.kind == "jpeg2000" else "EOI"
        raise ImageReadError(name, f"truncated {what} data (no {end} end marker after the headers)")
    if size < info.min_bytes:
        raise ImageReadError(
            name,
            f"{what} data of {size} bytes cannot hold the {info.cols}x{info.rows} pixels it declares "
            f"(at least {info.min_bytes} bytes needed): truncated, or a decompression bomb",
        )


def _check_codestream(info: CodestreamInfo, geometry: PixelGeometry, name: str) -> None:
    if (info.rows, info.cols) != (geometry.rows, geometry.cols):
        raise ImageReadError(
            name,
            f"the {info.kind} codestream declares {info.cols}x{info.rows} pixels but the DICOM header "
            f"{geometry.cols}x{geometry.rows}",
        )
    if info.components != 1:
        raise ImageReadError(name, f"the {info.kind} codestream has {info.components} components; a radiograph is monochrome")
    if not 1 <= info.precision <= 16:
        raise ImageReadError(name, f"the {info.kind} codestream declares {info.precision}-bit samples (1 to 16 allowed)")


def _decode_pillow_jpeg(frame: bytes, info: CodestreamInfo, name: str, min_size: int | None) -> np.ndarray:
    from PIL import Image

    with warnings.catch_warnings():
        # The declared size was checked against our own limit already.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(frame), formats=["JPEG"])
        if img.mode != "L":
            raise ImageReadError(name, f"JPEG pixel data decodes as {img.mode}; a radiograph is monochrome")
        if min_size is not None and min(info.rows, info.cols) >= 2 * min_size:
            img.draft("L", (min_size, min_size))
        try:
            img.load()
        except OSError as exc:
            raise ImageReadError(name, f"truncated or corrupt JPEG pixel data ({exc})") from None
    arr = np.asarray(img)
    img.close()
    return arr


def _decode_imagecodecs_jpeg(frame: bytes, info: CodestreamInfo, name: str, what: str) -> np.ndarray:
    if info.kind == "jpeg-ls":
        codecs = _imagecodecs(name, what, "JPEGLS")
        return codecs.jpegls_decode(frame)
    codecs = _imagecodecs(name, what, "JPEG8")
    try:
        return codecs.jpeg8_decode(frame)
    except Exception as first:  # noqa: BLE001 - lossless JPEG has a second decoder
        if not info.lossless_jpeg or not getattr(getattr(codecs, "LJPEG", None), "available", False):
            raise
        log.debug("%s: libjpeg-turbo could not decode lossless JPEG (%s); trying liblj92", name, first)
        return codecs.ljpeg_decode(frame)


def _decode_j2k(frame: bytes, name: str, what: str) -> np.ndarray:
    codecs = _imagecodecs(name, what, "JPEG2K")
    try:
        return codecs.jpeg2k_decode(frame)
    except Exception as first:  # noqa: BLE001 - HTJ2K has a second decoder
        if not getattr(getattr(codecs, "HTJ2K", None), "available", False):
            raise
        log.debug("%s: OpenJPEG could not decode (%s); trying OpenJPH", name, first)
        return codecs.htj2k_decode(frame)


def _decode_rle(frame: bytes, geometry: PixelGeometry, name: str, what: str) -> np.ndarray:
    if geometry.bits_allocated not in (8, 16, 32):
        raise ImageReadError(name, f"RLE pixel data with {geometry.bits_allocated} bits allocated")
    try:
        segments = rle_segments(frame)
    except CodestreamError as exc:
        raise ImageReadError(name, f"corrupt RLE pixel data ({exc})") from None
    nbytes = geometry.bits_allocated // 8
    if len(segments) != nbytes:
        raise ImageReadError(name, f"RLE frame has {len(segments)} segments; {nbytes} expected for one {geometry.bits_allocated}-bit sample")
    codecs = _imagecodecs(name, what, "PACKBITS")
    count = geometry.pixels
    # Byte planes, most significant first (PS3.5 G.2); assembled little-endian below.
    planes = np.empty((count, nbytes), dtype=np.uint8)
    scratch = np.empty(count + 64, dtype=np.uint8)  # segments may decode a padding byte or two
    for i, segment in enumerate(segments):
        decoded = codecs.packbits_decode(bytes(segment), out=scratch)
        if len(decoded) < count:
            raise ImageReadError(name, f"RLE segment {i + 1} decodes to {len(decoded)} bytes; {count} expected")
        planes[:, nbytes - 1 - i] = decoded[:count]
    dtype = np.dtype("<" + ("i" if geometry.signed else "u") + str(nbytes))
    return planes.reshape(-1).view(dtype).reshape(geometry.rows, geometry.cols)


def encapsulated_frame(
    element: PixelElement,
    geometry: PixelGeometry,
    syntax: str,
    *,
    name: str,
    min_size: int | None = None,
    allow_reduced: bool = False,
) -> np.ndarray:
    """Decode the one frame of encapsulated Pixel Data, after checking its codestream header.

    ``allow_reduced`` lets an 8-bit JPEG decode at 1/2, 1/4 or 1/8 scale (no smaller than
    ``min_size``), which callers that resize down anyway lose nothing by.
    """
    what, kind = ENCAPSULATED_SYNTAXES[syntax]
    fragments = frame_fragments(element.value, name)
    frame = bytes(fragments[0]) if len(fragments) == 1 else b"".join(fragments)
    if kind == "rle":
        return _decode_rle(frame, geometry, name, what)
    found = sniff_codestream(frame)
    try:
        if found == "jpeg":
            info = jpeg_info(frame)
        elif found == "jpeg2000":
            info = j2k_info(frame)
        else:
            raise CodestreamError(f"no {kind.upper()} codestream where {what} pixel data should start")
    except CodestreamError as exc:
        raise ImageReadError(name, f"corrupt {what} pixel data ({exc})") from None
    _check_codestream(info, geometry, name)
    check_complete(info, len(frame), name, f"{what} pixel")

    if info.kind == "jpeg" and info.precision == 8 and not info.lossless_jpeg:
        arr = _decode_pillow_jpeg(frame, info, name, min_size if allow_reduced else None)
    else:
        try:
            if info.kind == "jpeg2000":
                arr = _decode_j2k(frame, name, what)
            else:
                arr = _decode_imagecodecs_jpeg(frame, info, name, what)
        except ImageReadError:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the codecs raise their own error types
            raise ImageReadError(name, f"truncated or corrupt {what} pixel data ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2 or arr.dtype.kind not in "ui":
        raise ImageReadError(name, f"{what} pixel data decoded to an array of shape {arr.shape} and type {arr.dtype}")
    if arr.shape != (geometry.rows, geometry.cols) and not (allow_reduced and info.kind == "jpeg"):
        raise ImageReadError(name, f"{what} pixel data decoded to {arr.shape[1]}x{arr.shape[0]}, not {geometry.cols}x{geometry.rows}")
    return _match_signedness(arr, geometry, info.precision)


def _match_signedness(arr: np.ndarray, geometry: PixelGeometry, precision: int) -> np.ndarray:
    """Reinterpret decoded samples with the dataset's Pixel Representation.

    JPEG, JPEG-LS (and some JPEG 2000 encoders) store signed samples as unsigned bit
    patterns of ``precision`` bits; sign-extend them in place, as the standard intends.
    """
    bits = 8 * arr.dtype.itemsize
    shift = bits - min(max(int(precision), 1), bits)
    if geometry.signed and arr.dtype.kind == "u":
        if not arr.flags.writeable:
            arr = arr.copy()
        arr = arr.view(np.dtype(f"i{arr.dtype.itemsize}"))
        if shift:
            np.left_shift(arr, shift, out=arr)
            np.right_shift(arr, shift, out=arr)
    elif not geometry.signed and arr.dtype.kind == "i":
        if not arr.flags.writeable:
            arr = arr.copy()
        arr = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
        if shift:
            np.bitwise_and(arr, np.array((1 << (bits - shift)) - 1, dtype=arr.dtype), out=arr)
    return arr


__all__ = [
    "DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN",
    "ENCAPSULATED_SYNTAXES",
    "IMAGECODECS_HINT",
    "JPEG_BASELINE",
    "NATIVE_SYNTAXES",
    "PixelElement",
    "PixelGeometry",
    "encapsulated_frame",
    "frame_fragments",
    "locate_pixel_data",
    "native_frame",
]
