"""The image readers: pixel convention, header fields, and one error type for bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import make_uncompressed_dicom
from lungopacity.io import ImageReadError, read_image, sniff_format
from lungopacity.io.dicom import parse_age, parse_sex, parse_view, read_dicom_header


def ramp(shape=(32, 48), top=255) -> np.ndarray:
    return (np.arange(shape[0] * shape[1]).reshape(shape) % (top + 1)).astype(np.int64)


def test_real_rsna_dicoms_match_metadata_table(rsna_dicom_dir: Path, rsna_dir: Path) -> None:
    meta = pd.read_csv(rsna_dir / "metadata.csv", dtype=str).set_index("patientId")
    files = sorted((rsna_dicom_dir / "stage_2_train_images").glob("*.dcm"))
    assert len(files) == 16
    for path in files:
        pixels, header = read_image(path)
        assert pixels.shape == (1024, 1024) and pixels.dtype == np.float32
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and pixels.std() > 0.05
        row = meta.loc[path.stem]
        assert header["sex"] == row["PatientSex"]
        assert header["age"] == float(row["PatientAge"])
        assert header["view"] == row["ViewPosition"]
        assert header["modality"] == "CR" and header["patient_id"] == path.stem
        assert header["pixel_spacing"][0] == pytest.approx(float(row["PixelSpacing"]))


def test_real_dicom_pixels_equal_pydicom_decode(rsna_dicom_dir: Path) -> None:
    import pydicom

    path = sorted((rsna_dicom_dir / "stage_2_train_images").glob("*.dcm"))[0]
    expected = pydicom.dcmread(path).pixel_array.astype(np.float32) / 255.0  # 8-bit MONOCHROME2
    pixels, _ = read_image(path)
    np.testing.assert_allclose(pixels, expected, atol=1e-7)


def test_reduced_jpeg_decode_is_a_downscale_of_the_full_image(rsna_dicom_dir: Path) -> None:
    path = sorted((rsna_dicom_dir / "stage_2_train_images").glob("*.dcm"))[1]
    full, header = read_image(path)
    reduced, header_reduced = read_image(path, min_size=256)
    assert reduced.shape == (256, 256)
    assert (header_reduced["rows"], header_reduced["cols"]) == (1024, 1024)
    box = full.reshape(256, 4, 256, 4).mean(axis=(1, 3))
    assert np.abs(box - reduced).mean() < 0.01


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = ramp()
    m2 = make_uncompressed_dicom(tmp_path / "m2.dcm", stored, bits_stored=8)
    m1 = make_uncompressed_dicom(tmp_path / "m1.dcm", stored, bits_stored=8, photometric="MONOCHROME1")
    p2, _ = read_image(m2)
    p1, _ = read_image(m1)
    np.testing.assert_allclose(p2, stored / 255.0, atol=1e-6)
    np.testing.assert_allclose(p1, 1.0 - stored / 255.0, atol=1e-6)


@pytest.mark.parametrize("bits", [12, 16])
def test_high_bit_depth_scaled_by_bits_stored(tmp_path: Path, bits: int) -> None:
    top = 2**bits - 1
    stored = np.array([[0, top // 4, top // 2], [top, 1, top - 1]])
    pixels, header = read_image(make_uncompressed_dicom(tmp_path / "hi.dcm", stored, bits_stored=bits))
    np.testing.assert_allclose(pixels, stored / top, atol=1e-6)
    assert header["age"] == 51.0 and header["sex"] == "F"


def test_rescale_slope_intercept_keeps_relative_values(tmp_path: Path) -> None:
    stored = np.array([[0, 1024], [2048, 4095]])
    plain, _ = read_image(make_uncompressed_dicom(tmp_path / "a.dcm", stored, bits_stored=12))
    rescaled, _ = read_image(
        make_uncompressed_dicom(tmp_path / "b.dcm", stored, bits_stored=12, slope=2.0, intercept=-1024)
    )
    np.testing.assert_allclose(plain, rescaled, atol=1e-6)


def test_window_applied_only_when_asked(tmp_path: Path) -> None:
    stored = np.array([[0, 1000, 2000, 3000, 4095]])
    path = make_uncompressed_dicom(tmp_path / "w.dcm", stored, bits_stored=12, window=(2000, 1000))
    raw, _ = read_image(path)
    windowed, _ = read_image(path, apply_window=True)
    np.testing.assert_allclose(raw, stored / 4095, atol=1e-6)
    assert windowed[0, 0] == 0.0 and windowed[0, 1] == 0.0  # below the window
    assert windowed[0, 3] == pytest.approx(1.0) and windowed[0, 4] == pytest.approx(1.0)  # above it
    assert 0.45 < windowed[0, 2] < 0.55  # the centre maps to the middle


def test_png_jpeg_tiff_and_16bit_png(tmp_path: Path) -> None:
    gray = (ramp((40, 30)) % 256).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(gray).save(tmp_path / "g.tif")
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=100)
    Image.fromarray((gray.astype(np.uint16) * 257)).save(tmp_path / "g16.png")
    for name in ("g.png", "g.tif", "g16.png"):
        pixels, header = read_image(tmp_path / name)
        np.testing.assert_allclose(pixels, gray / 255.0, atol=1e-6, err_msg=name)
        assert header["sex"] is None and (header["rows"], header["cols"]) == (40, 30)
    jpeg, _ = read_image(tmp_path / "g.jpg")
    assert np.abs(jpeg - gray / 255.0).mean() < 0.02


def test_bytes_input_and_content_sniffing(tmp_path: Path) -> None:
    gray = np.full((8, 8), 128, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    wrong_name = tmp_path / "looks_like.dcm"
    wrong_name.write_bytes(buf.getvalue())
    pixels, _ = read_image(wrong_name)  # the content decides, not the name
    assert pixels.shape == (8, 8)
    pixels, _ = read_image(buf.getvalue(), name="upload.png")
    assert pixels[0, 0] == pytest.approx(128 / 255)
    assert sniff_format(b"\0" * 128 + b"DICM") == "dicom"
    assert sniff_format(b"hello world") is None


def test_bad_files_raise_one_error_type_naming_the_file(tmp_path: Path, rsna_dicom_dir: Path) -> None:
    real = sorted((rsna_dicom_dir / "stage_2_train_images").glob("*.dcm"))[0].read_bytes()
    cases = {
        "empty.dcm": b"",
        "text.dcm": b"patientId,x,y\n1,2,3\n" * 20,
        "truncated.dcm": real[: len(real) // 2],
        "header_only.dcm": real[:600],
        "trunc.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        message = str(info.value)
        assert message.startswith(str(path) + ": ") and "\n" not in message, message
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "missing.dcm")
    with pytest.raises(ImageReadError, match="empty file"):
        read_image(tmp_path / "empty.dcm")
    with pytest.raises(ImageReadError, match="not an image"):
        read_image(tmp_path / "text.dcm")


def test_dicom_without_pixels_colour_and_multiframe_are_refused(tmp_path: Path) -> None:
    import pydicom

    path = make_uncompressed_dicom(tmp_path / "ok.dcm", ramp((4, 4)), bits_stored=8)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(tmp_path / "nopix.dcm")
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.save_as(tmp_path / "rgb.dcm")
    with pytest.raises(ImageReadError, match="colour"):
        read_image(tmp_path / "rgb.dcm")
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.save_as(tmp_path / "multi.dcm")
    with pytest.raises(ImageReadError, match="multi-frame"):
        read_image(tmp_path / "multi.dcm")


def test_unsupported_transfer_syntax_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate

    path = make_uncompressed_dicom(tmp_path / "ok.dcm", ramp((8, 8)), bits_stored=8)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    ds.PixelData = encapsulate([imagecodecs.jpeg2k_encode(ramp((8, 8)).astype(np.uint8), level=0, codecformat="J2K")])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    np.testing.assert_allclose(read_image(tmp_path / "j2k.dcm")[0], ramp((8, 8)) / 255, atol=1e-6)  # decodable now
    real_import = builtins.__import__

    def without_imagecodecs(name, *args, **kwargs):
        if name.split(".")[0] == "imagecodecs":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_imagecodecs)
    with pytest.raises(ImageReadError, match="pip install 'imagecodecs"):
        read_image(tmp_path / "j2k.dcm")


def test_decompression_bomb_limit(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        read_image(tmp_path / "big.png", max_pixels=200 * 200)


def test_header_parsers() -> None:
    assert parse_age("51") == 51.0
    assert parse_age("051Y") == 51.0
    assert parse_age("006M") == 0.5
    assert parse_age("026W") == pytest.approx(26 * 7 / 365.25)
    assert parse_age("010D") == pytest.approx(10 / 365.25)
    assert parse_age("") is None and parse_age("abc") is None and parse_age(None) is None
    assert parse_sex("m") == "M" and parse_sex("F ") == "F" and parse_sex("O") is None
    assert parse_view("ap") == "AP" and parse_view("PA") == "PA" and parse_view("LL") is None


def test_header_only_read_is_the_same_header(rsna_dicom_dir: Path) -> None:
    path = sorted((rsna_dicom_dir / "stage_2_train_images").glob("*.dcm"))[3]
    assert read_dicom_header(path) == read_image(path)[1]
