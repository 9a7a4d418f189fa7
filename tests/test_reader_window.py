"""The reader's window policy (issue 15, deliverable 1): none | auto | file, exact values.

Every expected value below is worked out by hand from PS3.3 C.11.2.1.2 (LINEAR:
``y = ((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped to [0, 1]), C.11.2.1.3 (LINEAR_EXACT,
SIGMOID) and C.11.1 (Modality LUT / rescale), on hand-built pixels; the windows are
chosen so that the answers are exact binary fractions.
"""

from __future__ import annotations

import numpy as np
import pytest

from dicom_builders import dataset, save
from lungopacity.errors import ConfigError
from lungopacity.io import ImageReadError, read_image
from lungopacity.io.dicom import WINDOW_POLICIES, read_dicom, read_dicom_header

# Window centre 2048, width 1025: the ramp runs from 1535.5 to 2559.5, slope 1/1024.
STORED_12 = np.array([[0, 1535, 1536, 2048, 2559, 2560, 4095]])
WINDOWED_12 = np.array([[0.0, 0.0, 0.5 / 1024, 0.5 + 0.5 / 1024, 1.0 - 0.5 / 1024, 1.0, 1.0]], dtype=np.float32)


def file_with(stored: np.ndarray, bits: int, **attributes) -> bytes:
    ds = dataset(stored, bits_stored=bits, photometric=attributes.pop("photometric", "MONOCHROME2"))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return save(ds)


def test_policies_on_a_12bit_file_with_a_window() -> None:
    data = file_with(STORED_12, 12, WindowCenter=2048, WindowWidth=1025)
    plain, header = read_image(data)
    np.testing.assert_allclose(plain, STORED_12 / 4095, atol=1e-7)
    assert header["window"] == {"policy": "none", "applied": None, "center": None, "width": None, "function": None}
    for policy in ("auto", "file"):
        windowed, header = read_image(data, window=policy)
        np.testing.assert_array_equal(windowed, WINDOWED_12)
        assert header["window"] == {"policy": policy, "applied": "window", "center": 2048.0, "width": 1025.0, "function": "LINEAR"}


def test_auto_leaves_8bit_windows_alone_and_file_applies_them() -> None:
    stored = np.array([[0, 96, 97, 128, 159, 160, 255]])
    data = file_with(stored, 8, WindowCenter=128, WindowWidth=65)  # ramp 95.5 .. 159.5, slope 1/64
    auto, header = read_image(data, window="auto")
    np.testing.assert_allclose(auto, stored / 255, atol=1e-7)
    assert header["window"]["applied"] is None and header["window"]["policy"] == "auto"
    applied, header = read_image(data, window="file")
    np.testing.assert_array_equal(applied, np.array([[0, 0.5 / 64, 1.5 / 64, 0.5 + 0.5 / 64, 1 - 0.5 / 64, 1, 1]], np.float32))
    assert header["window"]["applied"] == "window"


def test_12bit_file_without_a_window_is_scaled_by_bits_stored_under_every_policy() -> None:
    data = file_with(STORED_12, 12)
    for policy in WINDOW_POLICIES:
        pixels, header = read_image(data, window=policy)
        np.testing.assert_allclose(pixels, STORED_12 / 4095, atol=1e-7)
        assert header["window"]["applied"] is None


def test_window_applies_to_rescaled_values_16bit() -> None:
    # Stored x -> 2x - 1000 (Rescale); window centre 0, width 1025 on the rescaled values.
    stored = np.array([[0, 244, 245, 500, 756, 757, 65535]])
    data = file_with(stored, 16, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=1025)
    pixels, _ = read_image(data, window="auto")
    rescaled = 2.0 * stored - 1000
    expected = np.clip((rescaled - (0 - 0.5)) / 1024 + 0.5, 0, 1)
    np.testing.assert_allclose(pixels, expected, atol=1e-6)
    assert pixels[0, 0] == 0.0 and pixels[0, 3] == pytest.approx(0.5 + 0.5 / 1024) and pixels[0, -1] == 1.0
    plain, _ = read_image(data)  # none: the stored range through the rescale, 0..65535 -> -1000..130070
    np.testing.assert_allclose(plain, (rescaled + 1000) / (2 * 65535), atol=1e-6)


def test_monochrome1_is_inverted_after_the_window() -> None:
    data = file_with(STORED_12, 12, WindowCenter=2048, WindowWidth=1025, photometric="MONOCHROME1")
    pixels, _ = read_image(data, window="file")
    np.testing.assert_array_equal(pixels, 1.0 - WINDOWED_12)
    plain, _ = read_image(data)
    np.testing.assert_allclose(plain, 1.0 - STORED_12 / 4095, atol=1e-7)


def test_voi_lut_sequence_is_applied_by_auto_even_on_8bit_and_wins_over_a_window() -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = np.array([[50, 100, 101, 102, 103, 200]])
    ds = dataset(stored, bits_stored=8)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 100, 8])  # 4 entries, first mapped value 100, 8-bit output
    item.add_new(0x00283006, "US", [0, 85, 170, 255])
    ds.VOILUTSequence = Sequence([item])
    ds.WindowCenter, ds.WindowWidth = 10, 5  # present too: the LUT is preferred
    data = save(ds)
    expected = np.array([[0, 0, 1 / 3, 2 / 3, 1, 1]], dtype=np.float32)
    for policy in ("auto", "file"):
        pixels, header = read_image(data, window=policy)
        np.testing.assert_allclose(pixels, expected, atol=1e-7)
        assert header["window"]["applied"] == "voi_lut" and header["window"]["center"] is None
    plain, header = read_image(data)
    np.testing.assert_allclose(plain, stored / 255, atol=1e-7)
    assert header["window"]["applied"] is None


def test_linear_exact_and_sigmoid_functions() -> None:
    stored = np.array([[1536, 2048, 2560]])
    exact, header = read_image(file_with(stored, 12, WindowCenter=2048, WindowWidth=1024, VOILUTFunction="LINEAR_EXACT"), window="file")
    np.testing.assert_array_equal(exact, np.array([[0.0, 0.5, 1.0]], np.float32))
    assert header["window"]["function"] == "LINEAR_EXACT"
    sigmoid, _ = read_image(file_with(stored, 12, WindowCenter=2048, WindowWidth=1024, VOILUTFunction="SIGMOID"), window="file")
    np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-4 * (stored - 2048) / 1024)), atol=1e-6)


def test_width_one_linear_window_is_a_threshold() -> None:
    stored = np.array([[2046, 2047, 2048, 2049]])
    pixels, _ = read_image(file_with(stored, 12, WindowCenter=2048, WindowWidth=1), window="file")
    np.testing.assert_array_equal(pixels, np.array([[0, 0, 1, 1]], np.float32))


def test_invalid_window_is_refused_only_when_it_would_be_applied() -> None:
    template = file_with(STORED_12, 12, WindowCenter=2048, WindowWidth="99991")
    for width in (b"0.5", b"0", b"-5", b"nan", b"inf", b"abc"):
        # Written into the file's bytes: pydicom refuses to set such values itself.
        data = template.replace(b"99991 ", width.ljust(6))
        assert data != template
        with pytest.raises(ImageReadError, match="Window ?Width"):
            read_image(data, window="auto", name="w.dcm")
        pixels, header = read_image(data, name="w.dcm")  # policy none never reads the window
        assert header["window"]["applied"] is None and np.isfinite(pixels).all()


def test_apply_window_flag_still_means_file() -> None:
    data = file_with(STORED_12, 12, WindowCenter=2048, WindowWidth=1025)
    pixels, header = read_image(data, apply_window=True)
    np.testing.assert_array_equal(pixels, WINDOWED_12)
    assert header["window"]["policy"] == "file"
    with pytest.raises(ConfigError):
        read_image(data, window="auto", apply_window=False)


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="window: must be one of none, auto, file"):
        read_image(file_with(STORED_12, 12), window="soft")


def test_header_only_read_reports_the_same_window_record() -> None:
    data = file_with(STORED_12, 12, WindowCenter=2048, WindowWidth=1025)
    for policy in WINDOW_POLICIES:
        assert read_dicom_header(data, window=policy)["window"] == read_dicom(data, window=policy)[1]["window"]


def test_decode_prepared_passes_the_policy_through() -> None:
    from lungopacity.data.preprocess import WINDOW_POLICIES as PREPARED_POLICIES
    from lungopacity.data.preprocess import decode_prepared

    assert set(PREPARED_POLICIES) == {"none", "auto", "file"}
    stored = np.tile(np.array([[0, 1535, 1536, 2048, 2559, 2560, 4095, 4095]]), (8, 1))
    data = file_with(stored, 12, WindowCenter=2048, WindowWidth=1025)
    plain, header = decode_prepared(data, 8)
    windowed, header_w = decode_prepared(data, 8, window="auto")
    assert header["window"]["applied"] is None and header_w["window"]["applied"] == "window"
    assert plain[0, 3] == round(2048 / 4095 * 255) and windowed[0, 3] == round((0.5 + 0.5 / 1024) * 255)
    assert windowed[0, 1] == 0 and windowed[0, 5] == 255
