"""What a compressed image declares about itself, read from its header without decoding.

The readers check these declarations against the pixel limit and against the DICOM
attributes *before* a decoder allocates anything, so a small file that declares a huge
image costs nothing (see :mod:`lungopacity.io.limits`). Every parser here works on the
first bytes of a codestream, never raises anything but :class:`CodestreamError`, and
touches no decoder.

Codestreams understood:

- JPEG (ISO 10918: baseline, extended, progressive, lossless, arithmetic) and JPEG-LS
  (ISO 14495, frame header SOF55): the first SOF marker segment;
- JPEG 2000 (ISO 15444) codestreams and JP2 files: the SIZ marker segment;
- DICOM RLE Lossless: the 64-byte segment table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: SOF markers of ISO 10918 (C4 is DHT, C8 is reserved, CC is DAC) and JPEG-LS's SOF55.
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_LOSSLESS_SOF = {0xC3, 0xC7, 0xCB, 0xCF}
_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7}
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class CodestreamError(ValueError):
    """The codestream's header is missing or malformed (the message says how)."""


@dataclass(frozen=True)
class CodestreamInfo:
    """Declared geometry of one compressed frame."""

    kind: str  # 'jpeg' | 'jpeg-ls' | 'jpeg2000'
    rows: int
    cols: int
    components: int
    precision: int  # bits per sample
    signed: bool = False
    marker: int = 0  # JPEG: the SOF marker (0xC0 baseline ... 0xF7 JPEG-LS)
    #: Fewest bytes a complete codestream of this geometry can have (0 when no bound is known).
    min_bytes: int = 0
    #: Whether the codestream has its end marker (JPEG EOI / JPEG 2000 EOC) after the headers.
    complete: bool = True

    @property
    def lossless_jpeg(self) -> bool:
        return self.kind == "jpeg" and self.marker in _LOSSLESS_SOF


def sniff_codestream(data: bytes | memoryview) -> str | None:
    """'jpeg', 'jpeg2000' or None from the first bytes (JPEG-LS also starts as 'jpeg')."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head.startswith(b"\xff\x4f") or head.startswith(_JP2_SIGNATURE):
        return "jpeg2000"
    return None


def jpeg_info(data: bytes | memoryview, *, search_limit: int = 1 << 22) -> CodestreamInfo:
    """The frame header (SOF) of a JPEG or JPEG-LS codestream.

    Walks the marker segments from SOI up to the first SOF, at most ``search_limit``
    bytes (application segments before the frame header are small in practice).
    """
    buf = memoryview(data)
    n = min(len(buf), search_limit)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        raise CodestreamError("not a JPEG codestream (no SOI marker)")
    pos = 2
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            raise CodestreamError(f"JPEG marker expected at byte {pos}")
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9):
            raise CodestreamError("JPEG codestream ends before its frame header")
        if marker == 0xDA:
            raise CodestreamError("JPEG scan starts before any frame header (no SOF)")
        (length,) = struct.unpack(">H", buf[pos + 2 : pos + 4])
        if length < 2:
            raise CodestreamError(f"JPEG marker segment of length {length}")
        if marker in _SOF_MARKERS:
            if pos + 2 + length > len(buf) or length < 8:
                raise CodestreamError("JPEG frame header is truncated")
            precision = buf[pos + 4]
            rows, cols = struct.unpack(">HH", buf[pos + 5 : pos + 9])
            components = buf[pos + 9]
            kind = "jpeg-ls" if marker == 0xF7 else "jpeg"
            sampling = [buf[pos + 11 + 3 * i] for i in range(components) if pos + 11 + 3 * i < pos + 2 + length]
            return CodestreamInfo(
                kind, int(rows), int(cols), int(components), int(precision), False, int(marker),
                min_bytes=_jpeg_min_bytes(int(marker), int(rows), int(cols), sampling),
                complete=bytes(buf).rfind(b"\xff\xd9") > pos,
            )
        pos += 2 + length
    raise CodestreamError("no JPEG frame header (SOF) found")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _jpeg_min_bytes(marker: int, rows: int, cols: int, sampling: list[int]) -> int:
    """A lower bound on the entropy-coded bytes of a complete sequential Huffman JPEG.

    Every 8 x 8 block of a sequential DCT scan codes at least a DC difference and an
    end-of-block (two Huffman codes of at least one bit each); every sample of a lossless
    scan codes at least one bit. Progressive, arithmetic and JPEG-LS scans can code long
    runs in fewer bits, so they get no bound. A file far below the bound is truncated (the
    decoder would fill the rest with grey) or a bomb declaring a size it does not hold.
    """
    if marker in (0xC0, 0xC1) and sampling:
        h = [max(1, f >> 4) for f in sampling]
        v = [max(1, f & 0x0F) for f in sampling]
        hmax, vmax = max(h), max(v)
        blocks = sum(_ceil_div(_ceil_div(cols * hi, hmax), 8) * _ceil_div(_ceil_div(rows * vi, vmax), 8) for hi, vi in zip(h, v))
        return blocks // 4
    if marker == 0xC3:
        return rows * cols * max(len(sampling), 1) // 8
    return 0


def j2k_info(data: bytes | memoryview, *, search_limit: int = 1 << 20) -> CodestreamInfo:
    """The image and component sizes (SIZ) of a JPEG 2000 codestream or JP2 file.

    ``complete`` is False when the codestream lacks its EOC marker or holds tile-parts for
    fewer tiles than SIZ declares (every tile has at least one tile-part, ISO 15444-1
    A.4.2): decoders would fill the missing tiles with zeros.
    """
    buf = bytes(data)
    start = 0 if buf.startswith(_J2K_SOC_SIZ) else buf.find(_J2K_SOC_SIZ, 0, search_limit)
    if start < 0:
        raise CodestreamError("not a JPEG 2000 codestream (no SOC/SIZ markers)")
    siz = start + 4
    if len(buf) < siz + 40:
        raise CodestreamError("JPEG 2000 SIZ segment is truncated")
    (lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, csiz) = struct.unpack(
        ">HHIIIIIIIIH", buf[siz : siz + 38]
    )
    if csiz < 1 or lsiz != 38 + 3 * csiz or len(buf) < siz + 38 + 3 * csiz:
        raise CodestreamError(f"JPEG 2000 SIZ segment is malformed (Lsiz {lsiz}, Csiz {csiz})")
    if xsiz <= xosiz or ysiz <= yosiz:
        raise CodestreamError("JPEG 2000 image has no area (offsets beyond its size)")
    if xtsiz == 0 or ytsiz == 0 or xtosiz > xosiz or ytosiz > yosiz:
        raise CodestreamError(f"JPEG 2000 tile grid is malformed (tiles {xtsiz}x{ytsiz})")
    ssiz = buf[siz + 38]
    precision = (ssiz & 0x7F) + 1
    tiles = _ceil_div(xsiz - xtosiz, xtsiz) * _ceil_div(ysiz - ytosiz, ytsiz)
    present = _j2k_tiles_present(buf, siz + lsiz)
    # EOC (FFD9) cannot occur inside JPEG 2000 packet data, so its absence means truncation.
    complete = buf.rfind(b"\xff\xd9") > siz and present >= tiles
    return CodestreamInfo("jpeg2000", int(ysiz - yosiz), int(xsiz - xosiz), int(csiz), int(precision), bool(ssiz & 0x80),
                          complete=complete)


def _j2k_tiles_present(buf: bytes, pos: int) -> int:
    """Distinct tile indices among the tile-parts (SOT segments) after the main header."""
    seen: set[int] = set()
    for _ in range(1 << 17):
        if pos + 4 > len(buf) or buf[pos] != 0xFF:
            break
        marker = buf[pos + 1]
        if marker == 0xD9:  # EOC
            break
        if marker == 0x90:  # SOT: Lsot, Isot, Psot, TPsot, TNsot
            if pos + 12 > len(buf):
                break
            _lsot, isot, psot = struct.unpack(">HHI", buf[pos + 2 : pos + 10])
            seen.add(isot)
            if psot == 0 or psot < 14:
                break  # the last tile-part runs to EOC (or a malformed length ends the walk)
            pos += psot
            continue
        (length,) = struct.unpack(">H", buf[pos + 2 : pos + 4])
        if length < 2:
            break
        pos += 2 + length
    return len(seen)


def rle_segments(frame: bytes | memoryview) -> list[memoryview]:
    """The segments of one DICOM RLE Lossless frame (PS3.5 Annex G), as views."""
    buf = memoryview(frame)
    if len(buf) < 64:
        raise CodestreamError(f"RLE frame of {len(buf)} bytes is shorter than its 64-byte header")
    header = struct.unpack("<16I", buf[:64])
    count = header[0]
    if not 1 <= count <= 15:
        raise CodestreamError(f"RLE header declares {count} segments (1 to 15 allowed)")
    offsets = list(header[1 : 1 + count]) + [len(buf)]
    if offsets[0] != 64 or any(b < a for a, b in zip(offsets, offsets[1:])) or offsets[-2] > len(buf):
        raise CodestreamError("RLE segment offsets are out of order or beyond the frame")
    return [buf[a:b] for a, b in zip(offsets, offsets[1:])]


__all__ = ["CodestreamError", "CodestreamInfo", "j2k_info", "jpeg_info", "rle_segments", "sniff_codestream"]
