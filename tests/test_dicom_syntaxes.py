"""Every common transfer syntax decodes to the right pixels (issue 15, deliverable 2).

Each syntax is checked on pydicom's own test file where one ships offline, against the
uncompressed reference of the same image (exact for lossless syntaxes), against
pydicom's published reference values, or against an independent decoder (Pillow's
OpenJPEG for JPEG 2000; GDCM and pyjpegls for JPEG-LS near-lossless, figures recorded
below). JPEG Lossless has no offline pydicom file: its fixtures were encoded by GDCM from
hand-built pixels (tests/data/make_jpeg_lossless_fixtures.py).
"""

from __future__ import annotations

import builtins
import warnings
from pathlib import Path

import numpy as np
import pytest

from dicom_builders import dataset, encapsulated, save
from fixture_pixels import lossless_fixture_pixels
from lungopacity.io import ImageReadError, read_image
from lungopacity.io.dicom import decodable_transfer_syntaxes

DATA = Path(__file__).resolve().parent / "data"


def pydicom_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return str(path)


def stored_values(source, pixels: np.ndarray) -> np.ndarray:
    """The reader's [0, 1] pixels back to stored integers (no window, no rescale, MONOCHROME2)."""
    import pydicom

    ds = pydicom.dcmread(source, stop_before_pixels=True) if not isinstance(source, bytes) else pydicom.dcmread(
        __import__("io").BytesIO(source), stop_before_pixels=True
    )
    bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return np.rint(pixels.astype(np.float64) * (hi - lo) + lo).astype(np.int64)


def pydicom_reference(name: str) -> np.ndarray:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(pydicom_file(name)).pixel_array.astype(np.int64)


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "liver_1frame.dcm"])
def test_uncompressed_syntaxes_equal_pydicom(name: str) -> None:
    pixels, _ = read_image(pydicom_file(name))
    np.testing.assert_array_equal(stored_values(pydicom_file(name), pixels), pydicom_reference(name))


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_lossless_syntaxes_equal_the_uncompressed_image(name: str) -> None:
    """RLE, JPEG 2000 lossless and JPEG-LS lossless of MR_small equal MR_small exactly."""
    pixels, header = read_image(pydicom_file(name))
    reference, _ = read_image(pydicom_file("MR_small.dcm"))
    np.testing.assert_array_equal(pixels, reference)
    np.testing.assert_array_equal(stored_values(pydicom_file(name), pixels), pydicom_reference("MR_small.dcm"))
    assert (header["rows"], header["cols"]) == (64, 64)


def test_deflate_matches_pydicom_reference_values() -> None:
    pixels, _ = read_image(pydicom_file("image_dfl.dcm"))
    arr = stored_values(pydicom_file("image_dfl.dcm"), pixels)
    # pydicom's tests/pixels/pixels_reference.py, DEFL_8_1_1F
    assert arr[10].min() == 41 and arr[10].max() == 255
    assert tuple(arr[300, 255:263]) == (138, 65, 65, 65, 65, 35, 35, 35)
    assert arr[500].min() == 65 and arr[500].max() == 219


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG-lossy.dcm"])
def test_jpeg_extended_12bit_matches_pydicom_reference_values(name: str) -> None:
    pixels, _ = read_image(pydicom_file(name))
    arr = stored_values(pydicom_file(name), pixels)
    # pydicom's JPGE_16_12_1_0_1F_M2 / JPGE_BAD references
    assert arr[420, 140] == 244 and arr[230, 120] == 95


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "693_J2KI.dcm"])
def test_jpeg2000_lossy_agrees_with_pillows_decoder(name: str) -> None:
    from pydicom.pixels import pixel_array

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = pixel_array(pydicom_file(name), decoding_plugin="pillow").astype(np.int64)
    pixels, _ = read_image(pydicom_file(name))
    np.testing.assert_array_equal(stored_values(pydicom_file(name), pixels), expected)


def test_jpeg2000_sign_mismatch_is_corrected() -> None:
    """Dataset signed, codestream unsigned 13-bit: sign-extended as pydicom's reference says."""
    pixels, _ = read_image(pydicom_file("J2K_pixelrep_mismatch.dcm"))
    arr = stored_values(pydicom_file("J2K_pixelrep_mismatch.dcm"), pixels)
    assert arr[0, 0] == -2000
    assert arr[47:57, 279].tolist() == [621, 412, 138, -193, -520, -767, -907, -966, -988, -995]
    assert arr[328:338, 106].tolist() == [-377, -121, 141, 383, 633, 910, 1198, 1455, 1638, 1732]


@pytest.mark.parametrize("name,total", [("JPEGLSNearLossless_08.dcm", 25000), ("JPEGLSNearLossless_16.dcm", 6007250)])
def test_jpeg_ls_near_lossless_agrees_with_gdcm_and_pyjpegls(name: str, total: int) -> None:
    # Sums of the stored values as decoded by GDCM 3.2.6 and pyjpegls 1.5.1 (identical).
    pixels, _ = read_image(pydicom_file(name))
    assert int(stored_values(pydicom_file(name), pixels).sum()) == total


def test_jpeg_ls_near_lossless_error_is_bounded_by_near() -> None:
    import imagecodecs

    stored = lossless_fixture_pixels(12, False)
    for near in (1, 3):
        data = encapsulated(dataset(stored, bits_stored=12), imagecodecs.jpegls_encode(stored.astype(np.uint16), level=near),
                            "1.2.840.10008.1.2.4.81")
        pixels, _ = read_image(data)
        error = np.abs(stored_values(data, pixels) - stored)
        assert error.max() <= near and error.max() > 0


@pytest.mark.parametrize(
    "fixture,bits,signed,syntax",
    [
        ("jpeg_lossless_p14_u12.dcm", 12, False, "1.2.840.10008.1.2.4.57"),
        ("jpeg_lossless_sv1_s16.dcm", 16, True, "1.2.840.10008.1.2.4.70"),
        ("jpeg_lossless_sv1_u8.dcm", 8, False, "1.2.840.10008.1.2.4.70"),
    ],
)
def test_jpeg_lossless_process14_and_sv1_are_exact(fixture: str, bits: int, signed: bool, syntax: str) -> None:
    import pydicom

    path = DATA / fixture
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    pixels, _ = read_image(path)
    np.testing.assert_array_equal(stored_values(str(path), pixels), lossless_fixture_pixels(bits, signed))


def test_htj2k_from_openjph_decodes_exactly() -> None:
    import imagecodecs

    stored = lossless_fixture_pixels(12, False)
    codestream = imagecodecs.htj2k_encode(stored.astype(np.uint16), level=0, reversible=True)
    data = encapsulated(dataset(stored, bits_stored=12), codestream, "1.2.840.10008.1.2.4.201")
    pixels, _ = read_image(data)
    np.testing.assert_array_equal(stored_values(data, pixels), stored)


def test_rle_written_by_pydicom_is_exact() -> None:
    from pydicom.uid import RLELossless

    for bits, signed in ((8, False), (12, False), (16, True)):
        stored = lossless_fixture_pixels(bits, signed)
        ds = dataset(stored, bits_stored=bits, signed=signed)
        ds.compress(RLELossless)
        data = save(ds)
        pixels, _ = read_image(data)
        np.testing.assert_array_equal(stored_values(data, pixels), stored)


def test_every_common_syntax_is_decodable_here() -> None:
    names = decodable_transfer_syntaxes()
    for uid in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
                "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
                "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                "1.2.840.10008.1.2.5"):
        assert uid in names


def test_missing_decoder_says_which_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    data = open(pydicom_file("MR_small_jp2klossless.dcm"), "rb").read()
    real_import = builtins.__import__

    def no_imagecodecs(name, *args, **kwargs):
        if name == "imagecodecs" or name.startswith("imagecodecs."):
            raise ImportError("No module named 'imagecodecs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_imagecodecs)
    with pytest.raises(ImageReadError, match=r"JPEG 2000 Lossless needs a decoder .*pip install 'imagecodecs"):
        read_image(data, name="j2k.dcm")


def test_unknown_transfer_syntax_is_named(tmp_path: Path) -> None:
    ds = dataset(lossless_fixture_pixels(8, False), bits_stored=8)
    data = encapsulated(ds, b"\xff\xd8\xff\xd9", "1.2.3.4.5.6")
    with pytest.raises(ImageReadError, match=r"unsupported transfer syntax '1\.2\.3\.4\.5\.6'; the reader decodes"):
        read_image(data, name="odd.dcm")
