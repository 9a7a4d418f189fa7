"""One regression test per reader defect of issue 12 (each escaped the old reader).

The old reader let zlib.error, NotImplementedError (unknown VR), ValueError
(RescaleIntercept "abc", NumberOfFrames "abc", Window Width < 1), TypeError (missing
Columns, truncated TIFF), struct.error / BytesLengthException (bad element lengths),
KeyError, UFuncTypeError and MemoryError escape, returned all-NaN images as success
(NaN/inf Rescale Slope, float TIFF with NaN), and spent up to gigabytes on small files.
Memory is measured in a fresh subprocess (peak RSS the read adds, via VmHWM after
resetting it), and must stay under the bound each test states.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_builders import dataset, encapsulated, save
from fuzzing import _deflated_dicom
from lungopacity.io import ImageReadError, read_image
from lungopacity.io.dicom import header_from_dataset, parse_age, parse_sex, parse_view, read_dicom_header

REPO = Path(__file__).resolve().parents[1]
RAMP12 = (np.arange(32 * 32).reshape(32, 32) * 4 % 4096).astype(np.int64)


def refused(data: bytes, match: str, **kwargs) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(data, name="f.dcm", **kwargs)
    message = str(info.value)
    assert message.startswith("f.dcm: ") and "\n" not in message, message
    assert match in message, message
    return message


def with_raw_value(ds, keyword: str, placeholder: str, raw: bytes) -> bytes:
    """The saved file with ``keyword``'s value bytes replaced (pydicom will not write such values)."""
    setattr(ds, keyword, placeholder)
    data = save(ds)
    old = placeholder.encode().ljust(len(placeholder) + len(placeholder) % 2)
    assert data.count(old) == 1
    return data.replace(old, raw.ljust(len(old)))


def element_offset(data: bytes, group: int, element: int) -> int:
    offset = data.find(struct.pack("<HH", group, element), 132)
    assert offset > 0
    return offset


# --------------------------------------------------------------------------- escapes


def test_corrupt_deflate_stream_is_an_image_read_error() -> None:  # was zlib.error
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data = bytearray(save(dataset(RAMP12, bits_stored=12), DeflatedExplicitVRLittleEndian))
    (meta_length,) = struct.unpack("<I", data[140:144])  # (0002,0000) File Meta Information Group Length
    body = 144 + meta_length  # the deflate stream starts after the meta group
    data[body + 40 : body + 60] = b"\xff" * 20
    refused(bytes(data), "Deflate")
    refused(bytes(data[: body + 80]), "")  # truncated stream


def test_unknown_vr_is_an_image_read_error() -> None:  # was NotImplementedError
    data = bytearray(save(dataset(RAMP12, bits_stored=12)))
    at = element_offset(data, 0x0028, 0x0101)  # BitsStored, VR US
    data[at + 4 : at + 6] = b"ZZ"
    refused(bytes(data), "")
    # An unknown VR on a header field the pixels do not need leaves it unknown.
    data = bytearray(save(dataset(RAMP12, bits_stored=12)))
    at = element_offset(data, 0x0010, 0x0040)  # PatientSex
    data[at + 4 : at + 6] = b"ZZ"
    pixels, header = read_image(bytes(data))
    assert header["sex"] is None and pixels.shape == (32, 32)
    assert read_dicom_header(bytes(data))["sex"] is None


@pytest.mark.parametrize("keyword,value,match", [
    ("RescaleIntercept", b"abc", "RescaleIntercept 'abc' is not a number"),
    ("RescaleSlope", b"abc", "RescaleSlope 'abc' is not a number"),
    ("NumberOfFrames", b"abc", "NumberOfFrames 'abc' is not a whole number"),
    ("NumberOfFrames", b"1.5", "is not a whole number"),
])
def test_non_numeric_header_values_are_refused(keyword: str, value: bytes, match: str) -> None:  # was ValueError
    ds = dataset(RAMP12, bits_stored=12)
    if keyword.startswith("Rescale"):
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    refused(with_raw_value(ds, keyword, "77777", value), match)


def test_window_width_below_one_is_refused_when_applied() -> None:  # was ValueError
    ds = dataset(RAMP12, bits_stored=12)
    ds.WindowCenter = 2048
    data = with_raw_value(ds, "WindowWidth", "77777", b"0.5")
    refused(data, "Window Width 0.5 is below 1", window="file")
    assert read_image(data)[0].shape == (32, 32)


def test_missing_columns_is_refused() -> None:  # was TypeError
    ds = dataset(RAMP12, bits_stored=12)
    del ds.Columns
    refused(save(ds), "DICOM image has no Columns")


def test_bad_element_lengths_are_refused() -> None:  # were struct.error and BytesLengthException
    data = bytearray(save(dataset(RAMP12, bits_stored=12)))
    at = element_offset(data, 0x0028, 0x0010)  # Rows, US, length 2
    data[at + 6 : at + 8] = struct.pack("<H", 3)
    refused(bytes(data), "")
    # A huge item length in encapsulated pixel data.
    codestream = io.BytesIO()
    Image.fromarray(RAMP12.astype(np.uint8)).save(codestream, format="JPEG")
    data = bytearray(encapsulated(dataset(RAMP12.astype(np.uint8), bits_stored=8), codestream.getvalue(), "1.2.840.10008.1.2.4.50"))
    offset_table = element_offset(data, 0x7FE0, 0x0010) + 12
    (table_length,) = struct.unpack("<I", data[offset_table + 4 : offset_table + 8])
    fragment = offset_table + 8 + table_length
    assert data[fragment : fragment + 4] == b"\xfe\xff\x00\xe0"
    data[fragment + 4 : fragment + 8] = struct.pack("<I", 0xFFFFFFF0)
    refused(bytes(data), "truncated")
    for length in (1, 0xFFFF):  # header elements with odd or huge lengths
        bad = bytearray(save(dataset(RAMP12, bits_stored=12)))
        at = element_offset(bad, 0x0028, 0x0030)  # PixelSpacing
        bad[at + 6 : at + 8] = struct.pack("<H", length)
        with pytest.raises(ImageReadError):
            read_image(bytes(bad))


def test_truncated_tiff_at_every_cut_is_an_image_read_error() -> None:  # was TypeError
    for image in (RAMP12.astype(np.uint16), RAMP12.astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="TIFF")
        data = buf.getvalue()
        for cut in list(range(8, 300, 7)) + list(range(300, len(data), max(1, len(data) // 40))):
            try:
                pixels, _ = read_image(data[:cut])
            except ImageReadError:
                continue
            assert pixels.dtype == np.float32 and np.isfinite(pixels).all()


def test_lut_and_pixel_dtype_corruptions_are_refused() -> None:  # were KeyError / UFuncTypeError / OverflowError
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = dataset(RAMP12.astype(np.uint8), bits_stored=8)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 40])  # 40-bit LUT entries
    item.add_new(0x00283006, "US", [0, 1, 2, 3])
    ds.VOILUTSequence = Sequence([item])
    refused(save(ds), "VOI LUT declares 40-bit entries", window="auto")
    ds = dataset(RAMP12, bits_stored=12)
    ds.BitsAllocated = 24
    refused(save(ds), "BitsAllocated 24")
    ds = dataset(RAMP12, bits_stored=12)
    ds.BitsStored = 40
    refused(save(ds), "BitsStored 40 does not fit BitsAllocated 16")


def test_header_parsers_never_raise() -> None:
    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no")

        def __float__(self) -> float:
            raise RuntimeError("no")

    for value in (Hostile(), b"\xff", float("nan"), float("inf"), -3, [1, 2], object()):
        assert parse_age(value) is None
        assert parse_sex(value) is None
        assert parse_view(value) is None

    class Dataset:
        def get(self, keyword):
            raise NotImplementedError("unknown VR")

        def __contains__(self, keyword):
            return True

    header = header_from_dataset(Dataset())
    assert header["sex"] is None and header["rows"] is None and header["window"]["policy"] == "none"


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("slope", [b"nan", b"inf", b"-inf", b"1e999"])
def test_non_finite_rescale_slope_is_refused(slope: bytes) -> None:  # was an all-NaN "success"
    ds = dataset(RAMP12, bits_stored=12)
    ds.RescaleIntercept = 0
    refused(with_raw_value(ds, "RescaleSlope", "77777", slope), "RescaleSlope")


def test_zero_rescale_slope_is_refused() -> None:
    ds = dataset(RAMP12, bits_stored=12)
    ds.RescaleSlope, ds.RescaleIntercept = 0, 5
    refused(save(ds), "RescaleSlope 0")


def test_float_tiff_with_nan_or_inf_is_refused() -> None:  # was an all-NaN "success"
    for bad in (np.nan, np.inf):
        image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
        image[3, 4] = bad
        buf = io.BytesIO()
        Image.fromarray(image, mode="F").save(buf, format="TIFF")
        with pytest.raises(ImageReadError, match="NaN or infinite"):
            read_image(buf.getvalue())


# --------------------------------------------------------------------------- memory

PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from lungopacity.io import read_image
    path, kwargs = sys.argv[1], json.loads(sys.argv[2])
    data = open(path, "rb").read()
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    try:  # a first read loads the decoders' modules; the second one is measured
        read_image(data, name="f", **kwargs)
    except Exception:
        pass
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    try:
        pixels, _ = read_image(data, name="f", **kwargs)
        outcome, decoded = "ok", int(pixels.size)
    except Exception as exc:
        outcome, decoded = type(exc).__name__ + ": " + str(exc), 0
    print(json.dumps({"outcome": outcome, "peak": status("VmHWM") - before, "decoded": decoded}))
""")


def peak_of_read(tmp_path: Path, data: bytes, **kwargs) -> dict:
    """Outcome and peak RSS added by one read, in a fresh process (glibc told to unmap freed memory).

    The file is read twice; the second read is measured, so module imports do not count.
    """
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), json.dumps(kwargs)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_deflate_bombs_are_refused_within_a_small_bound(tmp_path: Path) -> None:
    # Declares 512 x 512 (256 KiB) but its Pixel Data inflates to 72 MB: refused after the
    # declared size plus 1 MiB has been inflated.
    result = peak_of_read(tmp_path, _deflated_dicom((512, 512), pixel_bytes=72_000_000))
    assert "decompression bomb" in result["outcome"] and result["peak"] < 16e6, result
    # Declares 20000 x 20000: refused from the header, before the pixels are inflated.
    result = peak_of_read(tmp_path, _deflated_dicom((64, 64), declared=(20000, 20000), pixel_bytes=30_000_000))
    assert "exceeds the limit" in result["outcome"] and result["peak"] < 16e6, result


def test_valid_deflated_image_costs_at_most_six_bytes_per_pixel(tmp_path: Path) -> None:
    side = 3072  # 9.4 Mpx of 8-bit zeros: the file is ~10 KB
    result = peak_of_read(tmp_path, _deflated_dicom((side, side)))
    assert result["outcome"] == "ok" and result["decoded"] == side * side
    assert result["peak"] < 6 * side * side, result  # inflated bytes (1) + float32 (4) + slack


def test_jpeg_in_dicom_declaring_over_the_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512), dtype=np.uint8)).save(buf, format="JPEG")
    jpeg = bytearray(buf.getvalue())
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 9000, 9000)
    ds = dataset(np.zeros((2, 2), np.uint8), bits_stored=8)
    ds.Rows, ds.Columns = 9000, 9000
    data = encapsulated(ds, bytes(jpeg), "1.2.840.10008.1.2.4.50")
    result = peak_of_read(tmp_path, data, max_pixels=8192 * 8192)  # the service's limit
    assert "exceeds the limit of 67108864 pixels" in result["outcome"] and result["peak"] < 8e6, result


def test_tiny_rgb_jpeg_declaring_8190_squared_is_refused_cheaply(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=50)
    jpeg = bytearray(buf.getvalue())
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 8190, 8190)
    assert len(jpeg) < 1000
    result = peak_of_read(tmp_path, bytes(jpeg))
    assert "cannot hold the 8190x8190 pixels" in result["outcome"] and result["peak"] < 8e6, result


def test_valid_rgb_jpeg_costs_at_most_six_bytes_per_pixel(tmp_path: Path) -> None:
    side = 3000
    rng = np.random.default_rng(1)
    rgb = np.repeat(rng.integers(0, 255, (side // 10, side // 10, 1), dtype=np.uint8), 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgb).resize((side, side)).save(buf, format="JPEG", quality=80)
    result = peak_of_read(tmp_path, buf.getvalue())
    assert result["outcome"] == "ok" and result["decoded"] == side * side
    assert result["peak"] < 6 * side * side, result  # was ~40 bytes per pixel


def test_uncompressed_16bit_dicom_is_viewed_in_place(tmp_path: Path) -> None:
    side = 3000
    stored = (np.arange(side * side, dtype=np.int64).reshape(side, side) % 4096)
    result = peak_of_read(tmp_path, save(dataset(stored, bits_stored=12)))
    assert result["outcome"] == "ok"
    assert result["peak"] < 5 * side * side, result  # float32 result (4) + slack: no copy of the samples
