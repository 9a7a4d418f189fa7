"""The synthetic RSNA-format dataset: phantoms, labels, DICOMs, determinism and class mix."""

from __future__ import annotations

import csv
import re
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array

from lungopacity.constants import CLASS_NAMES, LUNG_OPACITY, NORMAL, NOT_NORMAL
from lungopacity.synthetic import (
    CLASS_INFO_CSV,
    IMAGES_DIR,
    LABELS_CSV,
    SYNTHETIC_MARKER,
    allocate_view_class,
    make_phantom,
    plan_patients,
    write_demo_dataset,
    write_dicom,
)

UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
RSNA_NUMBER = re.compile(r"^[0-9]+\.0$")


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def decode_with_pillow(path: Path) -> np.ndarray:
    return pixel_array(path, decoding_plugin="pillow")


@pytest.fixture(scope="module")
def demo40(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("demo40")
    return out, write_demo_dataset(out, n=40, size=64, seed=7)


# --- the folder -----------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    first = tmp_path / "a"
    second = tmp_path / "b"
    other = tmp_path / "c"
    write_demo_dataset(first, n=6, size=64, seed=3)
    write_demo_dataset(second, n=6, size=64, seed=3)
    write_demo_dataset(other, n=6, size=64, seed=4)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 2 + 6
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    assert not set(files) & {p.relative_to(other) for p in other.rglob("*.dcm")}


def test_label_csvs_follow_the_rsna_format(demo40: tuple[Path, object]) -> None:
    out, summary = demo40
    labels = read_rows(out / LABELS_CSV)
    classes = read_rows(out / CLASS_INFO_CSV)
    assert labels[0] == ["patientId", "x", "y", "width", "height", "Target"]
    assert classes[0] == ["patientId", "class"]
    labels, classes = labels[1:], classes[1:]
    assert len(labels) == len(classes)
    assert (out / LABELS_CSV).read_bytes().count(b"\r") == 0
    boxes_per_patient: Counter[str] = Counter()
    class_of: dict[str, str] = {}
    for (pid, x, y, w, h, target), (pid2, name) in zip(labels, classes):
        assert pid == pid2 and name in CLASS_NAMES
        assert class_of.setdefault(pid, name) == name
        if target == "0":
            assert [x, y, w, h] == ["", "", "", ""] and name != "Lung Opacity"
            assert pid not in boxes_per_patient  # a single row
            boxes_per_patient[pid] = 0
        else:
            assert target == "1" and name == "Lung Opacity"
            assert all(RSNA_NUMBER.match(v) for v in (x, y, w, h)), (x, y, w, h)
            x0, y0, width, height = (float(v) for v in (x, y, w, h))
            assert width > 0 and height > 0 and x0 >= 0 and y0 >= 0
            assert x0 + width <= 64 and y0 + height <= 64
            boxes_per_patient[pid] += 1
    ids = [row[0] for row in labels]
    assert ids == sorted(ids)  # sorted by patientId, a patient's rows together
    assert len(class_of) == 40 == summary.n
    assert sum(1 for pid in ids if boxes_per_patient[pid] == 0) == sum(1 for c in class_of.values() if c != "Lung Opacity")
    assert all(1 <= boxes_per_patient[pid] <= 4 for pid, c in class_of.items() if c == "Lung Opacity")
    # the stratified allocation for n=40: AP 18 (2/9/7), PA 22 (11/9/2)
    assert Counter(class_of.values()) == {"Normal": 13, "No Lung Opacity / Not Normal": 18, "Lung Opacity": 9}
    assert summary.class_counts == {"Normal": 13, "No Lung Opacity / Not Normal": 18, "Lung Opacity": 9}
    assert summary.view_counts == {"AP": 18, "PA": 22}
    assert summary.n_boxes == sum(1 for row in labels if row[5] == "1")
    assert summary.path == out
    stems = {p.stem for p in (out / IMAGES_DIR).glob("*.dcm")}
    assert stems == set(class_of)


def test_dicoms_carry_rsna_tags_and_decode_with_pillow(demo40: tuple[Path, object]) -> None:
    out, _ = demo40
    files = sorted((out / IMAGES_DIR).glob("*.dcm"))
    uids = set()
    views = Counter()
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST"
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel) == (8, 8, 7, 1)
        assert (ds.Rows, ds.Columns) == (64, 64)
        assert ds.PatientSex in ("M", "F")
        assert re.fullmatch(r"[0-9]{1,3}", str(ds.PatientAge)) and 1 <= int(ds.PatientAge) <= 100
        assert ds.ViewPosition in ("AP", "PA") and ds.SeriesDescription == f"view: {ds.ViewPosition}"
        views[ds.ViewPosition] += 1
        assert ds.PatientID == path.stem == ds.PatientName
        assert uuid.UUID(ds.PatientID).version == 4
        assert ds.ImageComments == SYNTHETIC_MARKER == ds.DeidentificationMethod
        assert ds.StudyDate == "19010101"
        spacing = [float(v) for v in ds.PixelSpacing]
        assert spacing[0] == spacing[1] and 0.139 * 16 <= spacing[0] <= 0.194 * 16  # RSNA's range x 1024/64
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert UID.match(uid) and len(uid) <= 64
            uids.add(uid)
        pixels = decode_with_pillow(path)
        assert pixels.shape == (64, 64) and pixels.dtype == np.uint8 and pixels.std() > 10
    assert len(uids) == 3 * len(files)
    assert views == {"AP": 18, "PA": 22}


def test_full_size_dicom_has_rsna_pixel_spacing_and_size(tmp_path: Path) -> None:
    summary = write_demo_dataset(tmp_path, n=1, size=1024, seed=1)
    (path,) = (tmp_path / IMAGES_DIR).glob("*.dcm")
    ds = pydicom.dcmread(path)
    assert 0.139 <= float(ds.PixelSpacing[0]) <= 0.194
    assert decode_with_pillow(path).shape == (1024, 1024)
    assert 40_000 < path.stat().st_size < 400_000  # RSNA's files are ~140 kB
    assert summary.describe().endswith("1024 px; seed 1")


def test_io_reader_sees_the_synthetic_marker(demo40: tuple[Path, object]) -> None:
    from lungopacity.io import read_image

    path = sorted((demo40[0] / IMAGES_DIR).glob("*.dcm"))[0]
    pixels, header = read_image(path)
    ds = pydicom.dcmread(path)
    assert header["synthetic"] is True
    assert header["age"] == float(ds.PatientAge) and header["view"] == ds.ViewPosition
    assert np.array_equal(np.round(pixels * 255).astype(np.uint8), decode_with_pillow(path))


def test_existing_dicoms_are_not_overwritten_silently(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, n=3, size=32, seed=0)
    with pytest.raises(FileExistsError):
        write_demo_dataset(tmp_path, n=3, size=32, seed=1)
    summary = write_demo_dataset(tmp_path, n=2, size=32, seed=1, overwrite=True)
    assert len(list((tmp_path / IMAGES_DIR).glob("*.dcm"))) == 2 == summary.n


def test_class_view_sex_and_age_mix_follows_rsna(tmp_path: Path) -> None:
    summary = write_demo_dataset(tmp_path, n=400, size=32, seed=11)
    labels = read_rows(tmp_path / LABELS_CSV)[1:]
    classes = dict(read_rows(tmp_path / CLASS_INFO_CSV)[1:])
    headers = {p.stem: pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / IMAGES_DIR).glob("*.dcm")}
    assert len(headers) == len(classes) == 400
    opacity = {pid for pid, name in classes.items() if name == "Lung Opacity"}
    ap = {pid for pid, ds in headers.items() if ds.ViewPosition == "AP"}
    assert len(opacity) / 400 == pytest.approx(0.225, abs=0.01)
    assert len(ap) / 400 == pytest.approx(0.456, abs=0.01)
    assert len(opacity & ap) / len(ap) == pytest.approx(0.383, abs=0.02)
    assert len(opacity - ap) / (400 - len(ap)) == pytest.approx(0.093, abs=0.02)
    assert Counter(classes.values())["Normal"] / 400 == pytest.approx(8851 / 26684, abs=0.01)
    male = sum(ds.PatientSex == "M" for ds in headers.values()) / 400
    assert 0.49 < male < 0.65  # RSNA 0.567; binomial sd 0.025
    ages = np.array([int(ds.PatientAge) for ds in headers.values()])
    assert ages.min() >= 1 and ages.max() <= 100 and 42 <= np.median(ages) <= 56  # RSNA median 49
    boxes_per_positive = sum(row[5] == "1" for row in labels) / len(opacity)
    assert 1.35 < boxes_per_positive < 1.85  # RSNA 1.59
    assert summary.n_boxes == sum(row[5] == "1" for row in labels)


# --- allocation ------------------------------------------------------------------------------


def test_allocation_matches_rsna_and_keeps_every_class() -> None:
    pairs = allocate_view_class(40)
    assert Counter(pairs) == {("AP", 0): 2, ("AP", 1): 9, ("AP", 2): 7, ("PA", 0): 11, ("PA", 1): 9, ("PA", 2): 2}
    for n in range(3, 30):
        pairs = allocate_view_class(n)
        assert len(pairs) == n
        assert {c for _, c in pairs} == {NORMAL, NOT_NORMAL, LUNG_OPACITY}, n
    assert len(allocate_view_class(1)) == 1
    plan = plan_patients(12, 5)
    assert plan == plan_patients(12, 5) and plan != plan_patients(12, 6)
    assert len({p.patient_id for p in plan}) == 12


# --- phantoms in memory ----------------------------------------------------------------------


def test_phantom_pixels_follow_the_package_convention() -> None:
    case = make_phantom(0, size=96, view="PA", label_class=NORMAL, sex="F", age=51)
    assert case.pixels.shape == (96, 96) and case.pixels.dtype == np.float32
    assert 0.0 <= case.pixels.min() and case.pixels.max() <= 1.0
    assert np.array_equal(case.pixels, np.round(case.pixels * 255) / np.float32(255))
    assert case.boxes.shape == (0, 4) and case.boxes.dtype == np.float32 and case.target == 0
    assert (case.view, case.sex, case.age, case.class_name) == ("PA", "F", 51, "Normal")
    # RSNA's 0.139-0.194 mm at 1024 px, scaled to 96 px
    assert 0.139 * 1024 / 96 - 1e-6 <= case.pixel_spacing <= 0.194 * 1024 / 96 + 1e-6
    # lungs are dark, the body around them bright: a radiograph, not noise
    lungs = case.pixels[case.lung_mask].mean()
    assert 0.15 < case.lung_mask.mean() < 0.45
    assert case.pixels[75:90, 20:76].mean() > lungs + 0.2  # abdomen under the domes
    assert np.array_equal(make_phantom(0, size=96, view="PA", label_class=NORMAL, sex="F", age=51).pixels, case.pixels)


def test_ap_phantoms_have_less_lung_and_a_side_marker() -> None:
    for seed in range(6):
        ap = make_phantom(seed, size=128, view="AP", label_class=NORMAL)
        pa = make_phantom(seed, size=128, view="PA", label_class=NORMAL)
        # higher domes and a bigger heart leave less visible lung in AP
        assert ap.lung_mask.mean() < pa.lung_mask.mean() - 0.01
        # a white lead letter in a top corner (a few pixels, not one bright grain)
        def sixth_brightest_in_top_corners(pixels: np.ndarray) -> float:
            return float(np.sort(np.concatenate([pixels[:20, :24].ravel(), pixels[:20, -24:].ravel()]))[-6])

        assert sixth_brightest_in_top_corners(ap.pixels) > 0.95
        assert sixth_brightest_in_top_corners(pa.pixels) < 0.9


def test_not_normal_phantoms_have_findings_and_no_boxes() -> None:
    findings = Counter()
    for seed in range(12):
        case = make_phantom(seed, size=64, label_class=NOT_NORMAL)
        assert case.boxes.shape == (0, 4) and case.target == 0
        assert 1 <= len(case.findings) <= 2 and "lung_opacity" not in case.findings
        findings.update(case.findings)
    assert len(findings) >= 3
    assert make_phantom(0, size=64, label_class=NORMAL).findings == ()
    with pytest.raises(ValueError, match="at least 32"):
        make_phantom(0, size=31)


def test_opacity_boxes_lie_in_the_image_and_the_lungs_with_rsna_sizes() -> None:
    size = 128
    widths, heights, counts = [], [], Counter()
    for seed in range(40):
        case = make_phantom(seed, size=size, label_class=LUNG_OPACITY)
        assert case.findings[-1] == "lung_opacity" and case.target == 1
        counts[len(case.boxes)] += 1
        for x1, y1, x2, y2 in case.boxes:
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            assert x1 == int(x1) and y2 == int(y2)
            inside = case.lung_mask[int(y1): int(y2), int(x1): int(x2)]
            assert inside.mean() > 0.5, (seed, case.boxes)
            widths.append((x2 - x1) * 1024 / size)
            heights.append((y2 - y1) * 1024 / size)
    assert set(counts) <= {1, 2, 3, 4} and counts[1] + counts[2] >= 36
    assert 170 < np.median(widths) < 265  # RSNA median 217 px at 1024
    assert 230 < np.median(heights) < 370  # RSNA median 298 px at 1024


def test_opacities_brighten_their_boxes_and_nothing_far_away() -> None:
    size = 128
    for seed in range(8):
        with_opacity = make_phantom(seed, size=size, label_class=LUNG_OPACITY)
        without = make_phantom(seed, size=size, label_class=LUNG_OPACITY, draw_opacities=False)
        assert np.array_equal(with_opacity.boxes, without.boxes) and len(with_opacity.boxes) >= 1
        assert np.array_equal(with_opacity.lung_mask, without.lung_mask)
        difference = with_opacity.pixels - without.pixels
        near = np.zeros((size, size), dtype=bool)
        in_boxes = np.zeros((size, size), dtype=bool)
        pad = int(0.15 * size)
        for x1, y1, x2, y2 in with_opacity.boxes.astype(int):
            box = np.zeros((size, size), dtype=bool)
            box[y1:y2, x1:x2] = True
            in_boxes |= box
            region = box & with_opacity.lung_mask
            # visibly brighter than the same lung without the opacity
            assert difference[region].mean() > 0.05, seed
            near[max(0, y1 - pad): y2 + pad, max(0, x1 - pad): x2 + pad] = True
        assert np.all(difference[~near] == 0)  # same anatomy and grain elsewhere
        assert np.abs(difference[~in_boxes]).max() < 0.12  # only a faint fringe outside the boxes
        assert difference.min() >= -1 / 255 - 1e-6  # opacities add density, never take it away


# --- write_dicom -----------------------------------------------------------------------------


def test_write_dicom_round_trips_jpeg_and_uncompressed(tmp_path: Path) -> None:
    case = make_phantom(2, size=128, label_class=LUNG_OPACITY)
    pixels = np.round(case.pixels * 255).astype(np.uint8)
    jpeg = write_dicom(tmp_path / "j.dcm", pixels, sex="M", age=51, view="AP", patient_id="p1", pixel_spacing=1.12)
    raw = write_dicom(tmp_path / "r.dcm", pixels, sex="M", age=51, view="AP", patient_id="p1", pixel_spacing=1.12,
                      transfer_syntax="explicit-little")
    decoded = decode_with_pillow(jpeg).astype(np.int16)
    # lossy, but close: the error is JPEG's, not a shift or a flip
    assert np.abs(decoded - pixels).mean() < 4.0 and np.corrcoef(decoded.ravel(), pixels.ravel())[0, 1] > 0.99
    assert np.array_equal(pydicom.dcmread(raw).pixel_array, pixels)
    ds = pydicom.dcmread(raw)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.PatientAge == "51" and [float(v) for v in ds.PixelSpacing] == [1.12, 1.12]
    # same patient id -> same UIDs: files are reproducible
    assert ds.SOPInstanceUID == pydicom.dcmread(jpeg).SOPInstanceUID


def test_write_dicom_uint16_monochrome1_and_missing_tags(tmp_path: Path) -> None:
    stored = (np.arange(40 * 30).reshape(40, 30) * 3 % 4096).astype(np.uint16)
    path = write_dicom(tmp_path / "m1.dcm", stored, sex=None, age="051Y", view=None, patient_id="p2",
                       pixel_spacing=(0.2, 0.3), transfer_syntax="explicit-little", photometric="MONOCHROME1",
                       bits_stored=12, synthetic=False)
    ds = pydicom.dcmread(path)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.PatientAge == "051Y"
    assert "PatientSex" not in ds and "ViewPosition" not in ds and "ImageComments" not in ds
    assert [float(v) for v in ds.PixelSpacing] == [0.2, 0.3]
    assert np.array_equal(ds.pixel_array, stored)


def test_write_dicom_rejects_what_it_cannot_store(tmp_path: Path) -> None:
    kwargs = dict(sex="F", age=30, view="PA", patient_id="x", pixel_spacing=0.14)
    with pytest.raises(ValueError, match="8-bit"):
        write_dicom(tmp_path / "a.dcm", np.zeros((8, 8), np.uint16), **kwargs)
    with pytest.raises(ValueError, match="transfer_syntax"):
        write_dicom(tmp_path / "b.dcm", np.zeros((8, 8), np.uint8), transfer_syntax="jpeg2000", **kwargs)
    with pytest.raises(ValueError, match="bits_stored"):
        write_dicom(tmp_path / "c.dcm", np.full((8, 8), 5000, np.uint16), transfer_syntax="explicit-little",
                    bits_stored=12, **kwargs)
    assert not list(tmp_path.iterdir())
