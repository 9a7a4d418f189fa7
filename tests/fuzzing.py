"""Seeded hostile inputs for the image reader: real-format seed files and their mutations.

Shared by ``tests/test_reader_fuzz.py`` (a few hundred cases) and
``benchmarks/bench_fuzz.py`` (``--n 10000``). Same seed, same cases, byte for byte.

Seeds are files of every format and DICOM flavour the reader accepts: the synthetic RSNA
writer's JPEG Baseline DICOM, 12/16-bit uncompressed DICOMs with rescale, window and VOI
LUT, MONOCHROME1, Deflated, RLE, JPEG 2000, JPEG-LS, JPEG Lossless and 12-bit JPEG
DICOMs, PNG/JPEG/TIFF from Pillow, and the 16 shared real RSNA DICOMs when present.

Mutations: bit flips, byte overwrites, truncation, chunk deletion/duplication, DICOM
header fields corrupted at the byte level (values, VRs, lengths), declared sizes made
huge (DICOM Rows/Columns, JPEG SOF, PNG IHDR, TIFF tags, JPEG 2000 SIZ) and
decompression bombs (Deflated DICOMs, PNG, TIFF, JPEG).
"""

from __future__ import annotations

import io
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dicom_builders import dataset as _dataset, encapsulated as _encapsulated, save as _save

REPO = Path(__file__).resolve().parents[1]
SHARED_DICOMS = REPO.parent / "shared" / "data" / "rsna-dicom" / "stage_2_train_images"
FIXTURES = Path(__file__).resolve().parent / "data"

WINDOWS = ("none", "none", "auto", "file")


@dataclass(frozen=True)
class FuzzCase:
    """One input: which seed, which mutation, the bytes, and the read options."""

    index: int
    seed: str
    mutation: str
    data: bytes
    window: str
    min_size: int | None


# --------------------------------------------------------------------------- seeds


def _phantom(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.5 + 0.3 * np.sin(6 * x) * np.cos(4 * y) + 0.05 * rng.standard_normal((size, size))
    return np.clip(img, 0, 1)


def _pil_bytes(arr: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_seeds(size: int = 160, *, include_shared: bool = True) -> dict[str, bytes]:
    """Seed files by name (deterministic; the shared real DICOMs are added when present)."""
    import imagecodecs
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

    from lungopacity.synthetic.rsna_writer import write_dicom

    img = _phantom(size)
    u8 = np.rint(img * 255).astype(np.uint8)
    u12 = np.rint(img * 4095).astype(np.uint16)
    u16 = np.rint(img * 65535).astype(np.uint16)
    seeds: dict[str, bytes] = {}

    with tempfile.TemporaryDirectory() as tmp:
        path = write_dicom(Path(tmp) / "seed.dcm", u8, sex="M", age=45, view="AP", patient_id="fuzz-jpeg", pixel_spacing=0.14)
        seeds["dicom_jpeg_baseline"] = path.read_bytes()

    ds = _dataset(u12, bits_stored=12)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    ds.WindowCenter, ds.WindowWidth = 3000, 4000
    seeds["dicom_u12_rescale_window"] = _save(ds)
    seeds["dicom_u16_monochrome1"] = _save(_dataset(u16, bits_stored=16, photometric="MONOCHROME1"))
    signed = (u12.astype(np.int32) - 2048).astype(np.int16)
    seeds["dicom_s12_signed"] = _save(_dataset(signed, bits_stored=12, signed=True))

    ds = _dataset(u8, bits_stored=8)
    lut = Dataset()
    lut.add_new(0x00283002, "US", [256, 0, 8])  # LUTDescriptor
    lut.add_new(0x00283006, "US", [int(v) for v in np.rint(np.sqrt(np.arange(256) / 255) * 255)])  # LUTData
    ds.VOILUTSequence = Sequence([lut])
    seeds["dicom_voi_lut"] = _save(ds)

    ds = _dataset(u12, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 2048, 2048
    seeds["dicom_deflated"] = _save(ds, DeflatedExplicitVRLittleEndian)

    ds = _dataset(u12, bits_stored=12)
    ds.compress(RLELossless)
    seeds["dicom_rle"] = _save(ds)
    seeds["dicom_j2k_lossless"] = _encapsulated(
        _dataset(u12, bits_stored=12), imagecodecs.jpeg2k_encode(u12, level=0, reversible=True, codecformat="J2K"),
        "1.2.840.10008.1.2.4.90",
    )
    seeds["dicom_j2k_lossy"] = _encapsulated(
        _dataset(u12, bits_stored=12), imagecodecs.jpeg2k_encode(u12, level=30, codecformat="J2K"), "1.2.840.10008.1.2.4.91"
    )
    seeds["dicom_jpegls"] = _encapsulated(_dataset(u12, bits_stored=12), imagecodecs.jpegls_encode(u12), "1.2.840.10008.1.2.4.80")
    seeds["dicom_jpeg12"] = _encapsulated(
        _dataset(u12, bits_stored=12), imagecodecs.jpeg8_encode(u12, level=90, bitspersample=12), "1.2.840.10008.1.2.4.51"
    )
    lossless = FIXTURES / "jpeg_lossless_sv1_s16.dcm"
    if lossless.exists():
        seeds["dicom_jpeg_lossless"] = lossless.read_bytes()

    rgb = np.stack([u8, np.flipud(u8), u8 // 2], axis=2)
    seeds["png_8"] = _pil_bytes(u8, "PNG")
    seeds["png_16"] = _pil_bytes(u16, "PNG")
    seeds["png_rgb"] = _pil_bytes(rgb, "PNG")
    seeds["jpeg_gray"] = _pil_bytes(u8, "JPEG", quality=90)
    seeds["jpeg_rgb"] = _pil_bytes(rgb, "JPEG", quality=85)
    seeds["jpeg_progressive"] = _pil_bytes(u8, "JPEG", quality=85, progressive=True)
    seeds["tiff_8"] = _pil_bytes(u8, "TIFF")
    seeds["tiff_16"] = _pil_bytes(u16, "TIFF")
    seeds["tiff_float"] = _pil_bytes(img.astype(np.float32), "TIFF")
    seeds["tiff_deflate"] = _pil_bytes(u8, "TIFF", compression="tiff_adobe_deflate")

    if include_shared and SHARED_DICOMS.is_dir():
        for path in sorted(SHARED_DICOMS.glob("*.dcm")):
            seeds[f"rsna_{path.stem[:8]}"] = path.read_bytes()
    return seeds


# --------------------------------------------------------------------------- mutations

_INTERESTING = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)
#: (group, element) of DICOM attributes the pixel pipeline depends on.
_PIXEL_TAGS = [
    (0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0100), (0x0028, 0x0101), (0x0028, 0x0102),
    (0x0028, 0x0103), (0x0028, 0x0002), (0x0028, 0x0004), (0x0028, 0x0008), (0x0028, 0x1050),
    (0x0028, 0x1051), (0x0028, 0x1052), (0x0028, 0x1053), (0x0028, 0x3010), (0x0028, 0x3002),
    (0x0028, 0x3006), (0x7FE0, 0x0010), (0x0002, 0x0010), (0x0010, 0x1010), (0x0010, 0x0040),
    (0x0028, 0x0030), (0xFFFE, 0xE000),
]
_BAD_TEXT = [b"abc", b"nan", b"inf", b"-inf", b"0", b"-1", b"1e308", b"1e-308", b"99999", b"", b"0.5", b"1\\2", b"\xff\xfe"]


def _flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 33))):
        i = int(rng.integers(0, len(out)))
        out[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _set_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 17))):
        i = int(rng.integers(0, len(out)))
        out[i] = _INTERESTING[int(rng.integers(0, len(_INTERESTING)))] if rng.random() < 0.7 else int(rng.integers(0, 256))
    return bytes(out)


def _truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def _chunk(data: bytes, rng: np.random.Generator) -> bytes:
    a = int(rng.integers(0, len(data)))
    b = min(len(data), a + int(rng.integers(1, 4096)))
    if rng.random() < 0.5:
        return data[:a] + data[b:]
    return data[:b] + data[a:b] * int(rng.integers(1, 4)) + data[b:]


def _tag_positions(data: bytes, group: int, element: int) -> list[int]:
    needle = struct.pack("<HH", group, element)
    found, start = [], 0
    while len(found) < 8:
        i = data.find(needle, start)
        if i < 0:
            break
        found.append(i)
        start = i + 1
    return found


def _corrupt_dicom_field(data: bytes, rng: np.random.Generator) -> bytes:
    """Corrupt one pixel-relevant element at the byte level: its value, VR or length."""
    tags = list(_PIXEL_TAGS)
    rng.shuffle(tags)
    for group, element in tags:
        positions = _tag_positions(data, group, element)
        if not positions:
            continue
        pos = positions[int(rng.integers(0, len(positions)))]
        out = bytearray(data)
        vr = bytes(out[pos + 4 : pos + 6])
        explicit = vr.isalpha() and vr.isupper()
        long_vr = vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF")
        head = 12 if long_vr else 8
        choice = rng.random()
        if choice < 0.2 and explicit:  # an unknown or wrong VR
            out[pos + 4 : pos + 6] = [b"ZZ", b"XX", b"US", b"DS", b"SQ", b"OB", b"UN"][int(rng.integers(0, 7))]
        elif choice < 0.45:  # a wrong length: odd, zero, huge
            new = [0, 1, 3, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, int(rng.integers(0, 1 << 16))][int(rng.integers(0, 7))]
            if long_vr or not explicit:
                out[pos + head - 4 : pos + head] = struct.pack("<I", new & 0xFFFFFFFF)
            else:
                out[pos + 6 : pos + 8] = struct.pack("<H", new & 0xFFFF)
        else:  # a bad value in place (text for text VRs, extremes for binary)
            if long_vr or not explicit:
                (length,) = struct.unpack("<I", out[pos + head - 4 : pos + head])
            else:
                (length,) = struct.unpack("<H", out[pos + 6 : pos + 8])
            length = min(length, len(out) - pos - head)
            if length <= 0:
                continue
            if vr in (b"DS", b"IS", b"CS", b"UI", b"AS", b"LO", b"SH"):
                value = _BAD_TEXT[int(rng.integers(0, len(_BAD_TEXT)))][:length].ljust(length, b" ")
            else:
                value = bytes(int(v) for v in rng.choice([0, 0xFF, 0x80, 0x7F, 1], size=length))
            out[pos + head : pos + head + length] = value
        return bytes(out)
    return _flip_bits(data, rng)


def _huge_size(data: bytes, rng: np.random.Generator) -> bytes:
    """Make the declared size huge (or just over a limit) wherever the format keeps it."""
    sizes = [65535, 60000, 40000, 20000, 16385, 16384, 9000, 8193, 8192, 0, 1]
    w, h = (sizes[int(rng.integers(0, len(sizes)))] for _ in range(2))
    out = bytearray(data)
    done = False
    if out.startswith(b"\x89PNG") and out[12:16] == b"IHDR":
        out[16:24] = struct.pack(">II", w, h)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])) & 0xFFFFFFFF)
        done = True
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2", b"\xff\xc3", b"\xff\xf7"):
        i = bytes(out).find(marker)
        if i >= 0 and i + 9 <= len(out):
            out[i + 5 : i + 9] = struct.pack(">HH", h & 0xFFFF, w & 0xFFFF)
            done = True
    i = bytes(out).find(b"\xff\x4f\xff\x51")
    if i >= 0 and i + 16 <= len(out):
        out[i + 8 : i + 16] = struct.pack(">II", w, h)
        done = True
    if out[:4] in (b"II*\x00",):
        # ImageWidth (256) / ImageLength (257) entries of the first IFD (SHORT or LONG).
        (ifd,) = struct.unpack("<I", out[4:8])
        if ifd + 2 <= len(out):
            (count,) = struct.unpack("<H", out[ifd : ifd + 2])
            for k in range(min(count, 64)):
                e = ifd + 2 + 12 * k
                if e + 12 > len(out):
                    break
                tag, typ = struct.unpack("<HH", out[e : e + 4])
                if tag in (256, 257):
                    value = w if tag == 256 else h
                    out[e + 8 : e + 12] = struct.pack("<I", value) if typ == 4 else struct.pack("<HH", value & 0xFFFF, 0)
                    done = True
    for element, value in ((0x0010, h), (0x0011, w)):
        for pos in _tag_positions(bytes(out), 0x0028, element)[:1]:
            if bytes(out[pos + 4 : pos + 6]) == b"US":
                out[pos + 8 : pos + 10] = struct.pack("<H", value & 0xFFFF)
                done = True
    return bytes(out) if done else _flip_bits(data, rng)


MUTATIONS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    "bit_flips": _flip_bits,
    "byte_values": _set_bytes,
    "truncate": _truncate,
    "chunk": _chunk,
    "dicom_field": _corrupt_dicom_field,
    "huge_size": _huge_size,
}
_MUTATION_WEIGHTS = {"bit_flips": 3, "byte_values": 2, "truncate": 2, "chunk": 1, "dicom_field": 3, "huge_size": 2}


# --------------------------------------------------------------------------- bombs


def _deflated_dicom(stored_shape: tuple[int, int], *, declared: tuple[int, int] | None = None,
                    pixel_bytes: int | None = None, private_bytes: int = 0) -> bytes:
    """A Deflated DICOM whose pixels are zeros; sizes may lie (a bomb)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _dataset(np.zeros((2, 2), np.uint8), bits_stored=8)
    rows, cols = declared or stored_shape
    ds.Rows, ds.Columns = rows, cols
    del ds.PixelData
    head = _save(ds, DeflatedExplicitVRLittleEndian)
    # Split the saved file into its meta part and its (deflated) body, then write our own body.
    meta_end = 132
    while head[meta_end : meta_end + 2] == b"\x02\x00":
        vr = head[meta_end + 4 : meta_end + 6]
        if vr in (b"OB", b"UN", b"SQ", b"UT"):
            (length,) = struct.unpack("<I", head[meta_end + 8 : meta_end + 12])
            meta_end += 12 + length
        else:
            (length,) = struct.unpack("<H", head[meta_end + 6 : meta_end + 8])
            meta_end += 8 + length
    body = zlib.decompress(head[meta_end:], -zlib.MAX_WBITS)
    count = pixel_bytes if pixel_bytes is not None else stored_shape[0] * stored_shape[1]
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(body)]
    zeros = bytes(1 << 22)
    if private_bytes:
        parts.append(comp.compress(struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, private_bytes)))
        for start in range(0, private_bytes, len(zeros)):
            parts.append(comp.compress(zeros[: min(len(zeros), private_bytes - start)]))
    parts.append(comp.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, count)))
    for start in range(0, count, len(zeros)):
        parts.append(comp.compress(zeros[: min(len(zeros), count - start)]))
    parts.append(comp.flush())
    return head[:meta_end] + b"".join(parts)


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width x height`` and whose IDAT holds a little zero data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1 << 16), 9)) + chunk(b"IEND", b"")


def make_bombs(*, scale: int = 1) -> dict[str, bytes]:
    """Decompression bombs and liars. ``scale`` 1 keeps the real inflation small (the tests);
    4 builds bombs of up to ~290 MB inflated (the benchmark)."""
    bombs = {
        # Over the limit by declaration: refused before anything is inflated.
        "bomb_deflate_declares_20000": _deflated_dicom((64, 64), declared=(20000, 20000), pixel_bytes=64 * 64),
        # Declares 512 x 512 but its Pixel Data inflates to far more.
        "bomb_deflate_long_pixels": _deflated_dicom((512, 512), pixel_bytes=72_000_000 * scale),
        # A private element before the pixels that inflates past the header allowance.
        "bomb_deflate_private_element": _deflated_dicom((64, 64), private_bytes=72_000_000 * scale),
        # A real, large, valid deflated image (accepted; memory bounded by its pixels).
        "bomb_deflate_valid_large": _deflated_dicom((2048 * scale, 2048 * scale)),
        "bomb_png_declares_60000": _png_declaring(60000, 60000),
        "bomb_png_declares_8192": _png_declaring(8192, 8192),
    }
    from PIL import Image

    side = 2048 * scale
    zeros = np.zeros((side, side), np.uint8)
    bombs["bomb_png_valid_large"] = _pil_bytes(zeros, "PNG", optimize=False)
    bombs["bomb_tiff_deflate_large"] = _pil_bytes(zeros, "TIFF", compression="tiff_adobe_deflate")
    buf = io.BytesIO()
    Image.fromarray(zeros).save(buf, format="JPEG", quality=50)
    bombs["bomb_jpeg_valid_large"] = buf.getvalue()
    return bombs


# --------------------------------------------------------------------------- cases


def iter_cases(
    n: int,
    *,
    seed: int = 12,
    seeds: dict[str, bytes] | None = None,
    bombs: dict[str, bytes] | None = None,
    bomb_every: int = 50,
) -> Iterator[FuzzCase]:
    """``n`` cases: mostly one mutation (sometimes two) of a seed, and every ``bomb_every``-th
    case one of the bombs (cycled). Deterministic for a given ``seed`` and seed set."""
    rng = np.random.default_rng(seed)
    seeds = seeds if seeds is not None else make_seeds()
    bombs = bombs if bombs is not None else make_bombs()
    names = sorted(seeds)
    bomb_names = sorted(bombs)
    mutations = list(_MUTATION_WEIGHTS)
    weights = np.array([_MUTATION_WEIGHTS[m] for m in mutations], dtype=float)
    weights /= weights.sum()
    for index in range(n):
        window = WINDOWS[int(rng.integers(0, len(WINDOWS)))]
        min_size = None if rng.random() < 0.7 else 64
        if bomb_names and bomb_every and index % bomb_every == bomb_every - 1:
            name = bomb_names[(index // bomb_every) % len(bomb_names)]
            yield FuzzCase(index, name, "bomb", bombs[name], window, min_size)
            continue
        name = names[int(rng.integers(0, len(names)))]
        data = seeds[name]
        applied = []
        for _ in range(1 if rng.random() < 0.8 else 2):
            mutation = mutations[int(rng.choice(len(mutations), p=weights))]
            data = MUTATIONS[mutation](data, rng) if data else data
            applied.append(mutation)
        yield FuzzCase(index, name, "+".join(applied), data, window, min_size)


def check_outcome(case: FuzzCase, read: Callable[..., tuple[np.ndarray, dict]], error_type: type) -> str:
    """Read one case; return 'ok' or 'refused', or raise AssertionError naming the breach."""
    name = f"case{case.index}"
    try:
        pixels, header = read(case.data, name=name, window=case.window, min_size=case.min_size)
    except error_type as exc:
        message = str(exc)
        assert message.startswith(name + ": ") and "\n" not in message, f"{case.seed}/{case.mutation}: bad message {message!r}"
        return "refused"
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.float32 and pixels.ndim == 2, (
        f"{case.seed}/{case.mutation}: returned {type(pixels)} {getattr(pixels, 'dtype', None)} {getattr(pixels, 'shape', None)}"
    )
    assert pixels.size > 0, f"{case.seed}/{case.mutation}: empty image returned"
    lo, hi = float(pixels.min()), float(pixels.max())
    assert np.isfinite(lo) and np.isfinite(hi), f"{case.seed}/{case.mutation}: non-finite pixels returned as success"
    assert 0.0 <= lo and hi <= 1.0, f"{case.seed}/{case.mutation}: pixels outside [0, 1]: {lo}..{hi}"
    assert isinstance(header, dict) and "window" in header, f"{case.seed}/{case.mutation}: header {header!r}"
    return "ok"


__all__ = ["FuzzCase", "MUTATIONS", "check_outcome", "iter_cases", "make_bombs", "make_seeds"]
