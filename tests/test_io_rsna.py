"""The RSNA data layer: official tables, the patient table, inconsistencies and splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungopacity.io import DataFormatError
from lungopacity.io.rsna import (
    assign_folds,
    boxes_per_patient,
    load_label_tables,
    load_rsna,
    make_splits,
    read_labels_csv,
    read_metadata_csv,
    read_splits,
    stratified_split,
    write_splits,
    xywh_rows_to_xyxy,
)

LABELS = "stage_2_train_labels.csv"
CLASSES = "stage_2_detailed_class_info.csv"


def test_official_label_tables_exact_counts(rsna_dir: Path) -> None:
    table = load_label_tables(rsna_dir / LABELS)
    assert len(table) == 26684
    assert table["class"].value_counts().to_dict() == {0: 8851, 1: 11821, 2: 6012}
    assert int(table["boxes"].map(len).sum()) == 9555
    assert (table["Target"] == (table["class"] == 2)).all()
    counts = table.loc[table["Target"] == 1, "boxes"].map(len).value_counts().to_dict()
    assert counts == {1: 2614, 2: 3266, 3: 119, 4: 13}


def test_boxes_are_xyxy_from_the_xywh_rows(rsna_dicom_dir: Path) -> None:
    table = load_label_tables(rsna_dicom_dir).set_index("patientId")
    boxes = table.loc["00436515-870c-4b36-a041-de91049b9ab4", "boxes"]
    # CSV rows: 264,152,213,379 and 562,152,256,453
    np.testing.assert_array_equal(boxes, [[264, 152, 477, 531], [562, 152, 818, 605]])


def test_shared_sample_keeps_only_patients_with_images(rsna_dir: Path) -> None:
    table = load_rsna(rsna_dir)
    report = table.attrs["load_report"]
    assert len(table) == 600 and report.n_kept == 600
    assert report.n_label_patients == 26684 and report.n_labels_without_image == 26084
    assert report.metadata_source == "metadata.csv"
    assert table[["sex", "age", "view"]].notna().all().all()
    assert set(table["view"]) == {"AP", "PA"}


def test_dicom_folder_loads_with_header_metadata(rsna_dicom_dir: Path, rsna_dir: Path) -> None:
    table = load_rsna(rsna_dicom_dir)
    assert len(table) == 16 and int(table["Target"].sum()) == 5
    assert table.attrs["load_report"].metadata_source == "DICOM headers"
    meta = read_metadata_csv(rsna_dir / "metadata.csv").set_index("patientId")
    for row in table.itertuples():
        assert (row.sex, row.age, row.view) == tuple(meta.loc[row.patientId, ["sex", "age", "view"]])
    assert (table["orig_h"] == 1024).all()


def _write(folder: Path, labels: str, classes: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LABELS).write_text(labels)
    (folder / CLASSES).write_text(classes)
    return folder


GOOD_LABELS = "patientId,x,y,width,height,Target\na,,,,,0\nb,10.0,20.0,30.0,40.0,1\nb,50,60,10,10,1\n"
GOOD_CLASSES = "patientId,class\na,Normal\nb,Lung Opacity\nb,Lung Opacity\n"


def test_hand_built_tables(tmp_path: Path) -> None:
    table = load_label_tables(_write(tmp_path, GOOD_LABELS, GOOD_CLASSES))
    assert list(table["patientId"]) == ["a", "b"]
    assert list(table["class"]) == [0, 2] and list(table["Target"]) == [0, 1]
    np.testing.assert_array_equal(table["boxes"][1], [[10, 20, 40, 60], [50, 60, 60, 70]])
    assert table["boxes"][0].shape == (0, 4)


@pytest.mark.parametrize(
    ("labels", "classes", "message"),
    [
        ("patientId,x,y,w,h,Target\na,,,,,0\n", GOOD_CLASSES, "missing column"),
        (GOOD_LABELS.replace("30.0", "3O.0"), GOOD_CLASSES, "line 3: malformed number '3O.0'"),
        (GOOD_LABELS.replace("a,,,,,0", "a,,,,,2"), GOOD_CLASSES, "Target must be 0 or 1"),
        (GOOD_LABELS.replace("a,,,,,0", "a,1,2,3,4,0"), GOOD_CLASSES, "Target is 0 but the row has a box"),
        (GOOD_LABELS.replace("b,50,60,10,10,1", "b,,,,,1"), GOOD_CLASSES, "Target is 1 but the row has no box"),
        (GOOD_LABELS, GOOD_CLASSES.replace("a,Normal", "a,Lung Opacity"), "class and Target disagree"),
        (GOOD_LABELS, GOOD_CLASSES.replace("a,Normal", "a,Pneumonia"), "unknown class 'Pneumonia'"),
        (GOOD_LABELS, GOOD_CLASSES.replace("a,Normal\n", ""), "have no class row"),
        (GOOD_LABELS.replace("30.0,40.0", "0,40.0"), GOOD_CLASSES, "must be positive"),
    ],
)
def test_inconsistent_tables_are_errors_naming_file_and_problem(
    tmp_path: Path, labels: str, classes: str, message: str
) -> None:
    folder = _write(tmp_path, labels, classes)
    with pytest.raises(DataFormatError, match=message) as info:
        load_label_tables(folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_images_without_labels_and_boxes_past_the_border_are_reported(tmp_path: Path) -> None:
    from PIL import Image

    folder = _write(tmp_path / "d", GOOD_LABELS.replace("50,60,10,10", "55,60,20,10"), GOOD_CLASSES)
    (folder / "images").mkdir()
    for pid in ("a", "b", "orphan"):
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "images" / f"{pid}.png")
    (folder / "metadata.csv").write_text(
        "patientId,PatientAge,PatientSex,ViewPosition,Modality\na,51,F,PA,CR\nb,,M,LL,CR\n"
    )
    table = load_rsna(folder)
    report = table.attrs["load_report"]
    assert list(table["patientId"]) == ["a", "b"]
    assert report.images_without_labels == ["orphan"]
    assert report.boxes_clipped == ["b"]
    np.testing.assert_array_equal(table["boxes"][1][1], [55, 60, 64, 64])  # clipped to the 64 px image
    assert (table["sex"][0], table["age"][0], table["view"][0]) == ("F", 51.0, "PA")
    assert table["sex"][1] == "M" and np.isnan(table["age"][1]) and table["view"][1] is None
    assert report.n_missing_metadata == 1
    assert "orphan" in report.summary()


def test_box_entirely_outside_the_image_is_an_error(tmp_path: Path) -> None:
    from PIL import Image

    folder = _write(tmp_path, GOOD_LABELS.replace("50,60,10,10", "500,600,10,10"), GOOD_CLASSES)
    (folder / "images").mkdir()
    for pid in ("a", "b"):
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "images" / f"{pid}.png")
    with pytest.raises(DataFormatError, match="entirely outside"):
        load_rsna(folder)


def test_missing_folder_parts(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="file not found"):
        load_rsna(tmp_path)
    _write(tmp_path, GOOD_LABELS, GOOD_CLASSES)
    with pytest.raises(DataFormatError, match="no image folder"):
        load_rsna(tmp_path)


def _patients(n: int = 1000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"patientId": [f"p{i:05d}" for i in range(n)], "class": rng.choice(3, n, p=[0.33, 0.44, 0.23])})


def test_split_is_patient_level_stratified_and_seeded() -> None:
    table = _patients()
    split = stratified_split(table, 0.2, seed=3)
    assert split.index.is_unique and len(split) == len(table)
    val = set(split[split == "val"].index)
    train = set(split[split == "train"].index)
    assert not (val & train) and len(val | train) == len(table)
    for c in range(3):
        ids = set(table.loc[table["class"] == c, "patientId"])
        assert abs(len(ids & val) - 0.2 * len(ids)) <= 1
    shuffled = table.sample(frac=1.0, random_state=1)
    assert (stratified_split(shuffled, 0.2, seed=3).sort_index() == split.sort_index()).all()
    assert (stratified_split(table, 0.2, seed=4) != split).any()


def test_folds_cover_every_patient_once_and_balance_classes() -> None:
    table = _patients()
    folds = assign_folds(table, k=5, seed=0)
    assert sorted(folds.unique()) == [0, 1, 2, 3, 4]
    counts = folds.value_counts()
    assert counts.max() - counts.min() <= 1
    for c in range(3):
        per_fold = folds[table.set_index("patientId")["class"] == c].value_counts()
        assert per_fold.max() - per_fold.min() <= 1


def test_split_csv_round_trip(tmp_path: Path) -> None:
    splits = make_splits(_patients(50), 0.2, k=5, seed=0)
    write_splits(splits, tmp_path / "splits.csv")
    back = read_splits(tmp_path / "splits.csv")
    pd.testing.assert_frame_equal(back, splits.reset_index(drop=True), check_dtype=False)
    (tmp_path / "bad.csv").write_text("patientId,split,fold\na,test,0\n")
    with pytest.raises(DataFormatError, match="split must be"):
        read_splits(tmp_path / "bad.csv")


def test_real_split_has_no_patient_on_both_sides(rsna_dir: Path) -> None:
    table = load_label_tables(rsna_dir / LABELS)
    splits = make_splits(table, 0.2, k=5, seed=0)
    assert splits["patientId"].is_unique
    val = splits[splits["split"] == "val"]
    assert abs(len(val) - 0.2 * len(table)) < 3
    assert not set(val["patientId"]) & set(splits.loc[splits["split"] == "train", "patientId"])


# ------------------------------------------------- vectorised boxes vs per patient


def _reference_boxes(rows: pd.DataFrame, patient_ids: list[str]) -> list[np.ndarray]:
    """The former per-patient path: one pandas group per patient through xywh_rows_to_xyxy."""
    positive = rows[rows["Target"] == 1]
    by_patient = {pid: xywh_rows_to_xyxy(group) for pid, group in positive.groupby("patientId", sort=False)}
    empty = np.zeros((0, 4), dtype=np.float32)
    return [by_patient.get(pid, empty) for pid in patient_ids]


def _assert_same_boxes(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == np.float32 and g.shape == e.shape
        np.testing.assert_array_equal(g, e)


# Interleaved patients (boxes of one patient not adjacent), a patient without boxes,
# one with 4 boxes, one with a duplicated row, fractional coordinates that float32 rounds.
EDGE_LABELS = """patientId,x,y,width,height,Target
none,,,,,0
four,10,20,30,40,1
dup,100.5,200.25,50.125,60.0625,1
four,110,120,130,140,1
other-none,,,,,0
dup,100.5,200.25,50.125,60.0625,1
four,210.3,220.7,230.1,240.9,1
four,1,2,3,4,1
one,0.1,0.2,1000.3,1000.4,1
"""
EDGE_CLASSES = """patientId,class
none,Normal
four,Lung Opacity
dup,Lung Opacity
four,Lung Opacity
other-none,No Lung Opacity / Not Normal
dup,Lung Opacity
four,Lung Opacity
four,Lung Opacity
one,Lung Opacity
"""


def test_vectorised_label_boxes_equal_the_per_patient_reference(tmp_path: Path) -> None:
    folder = _write(tmp_path, EDGE_LABELS, EDGE_CLASSES)
    table = load_label_tables(folder)
    rows = read_labels_csv(folder / LABELS)
    ids = ["none", "four", "dup", "other-none", "one"]
    assert list(table["patientId"]) == ids
    _assert_same_boxes(list(table["boxes"]), _reference_boxes(rows, ids))
    assert [len(b) for b in table["boxes"]] == [0, 4, 2, 0, 1]
    # File order within a patient, duplicates kept, x2 = x + w computed in float64.
    np.testing.assert_array_equal(table["boxes"][1][:, 0], np.float32([10, 110, 210.3, 1]))
    np.testing.assert_array_equal(table["boxes"][2][0], table["boxes"][2][1])
    np.testing.assert_array_equal(table["boxes"][4], np.float32([[0.1, 0.2, 0.1 + 1000.3, 0.2 + 1000.4]]))


def test_boxes_per_patient_on_mixed_and_unknown_rows() -> None:
    # NaN box rows beside box rows of the same patient, a patient not asked for, a patient
    # asked for without rows, a different order of the result than of the rows.
    rows = pd.DataFrame(
        {
            "patientId": ["a", "b", "a", "stranger", "b", "a"],
            "x": [np.nan, 1.0, 5.0, 9.0, 2.0, np.nan],
            "y": [np.nan, 1.0, 6.0, 9.0, 3.0, np.nan],
            "width": [np.nan, 2.0, 7.0, 9.0, 4.0, np.nan],
            "height": [np.nan, 2.0, 8.0, 9.0, 5.0, np.nan],
            "Target": [0, 1, 1, 1, 1, 0],
        }
    )
    ids = ["b", "absent", "a"]
    got = boxes_per_patient(rows, ids)
    _assert_same_boxes(got, _reference_boxes(rows, ids))
    np.testing.assert_array_equal(got[0], [[1, 1, 3, 3], [2, 3, 6, 8]])
    assert got[1].shape == (0, 4)
    np.testing.assert_array_equal(got[2], [[5, 6, 12, 14]])
    assert boxes_per_patient(rows, []) == []
    with pytest.raises(ValueError, match="unique"):
        boxes_per_patient(rows, ["a", "a"])


def test_boxes_per_patient_equals_reference_on_a_large_shuffled_table() -> None:
    rng = np.random.default_rng(7)
    n_patients = 3000
    ids = [f"p{i:05d}" for i in rng.permutation(n_patients)]
    n_boxes = rng.choice([0, 1, 2, 3, 4], n_patients, p=[0.7, 0.12, 0.14, 0.03, 0.01])
    patient_of_row = np.concatenate([np.repeat(np.arange(n_patients), n_boxes), np.flatnonzero(n_boxes == 0)])
    n_rows = len(patient_of_row)
    positive = np.arange(n_rows) < n_boxes.sum()
    xywh = np.where(positive[:, None], rng.uniform(0, 1024, (n_rows, 4)), np.nan)
    order = rng.permutation(n_rows)  # rows of a patient scattered through the file
    rows = pd.DataFrame(
        {
            "patientId": np.asarray(ids, dtype=object)[patient_of_row[order]],
            "x": xywh[order, 0], "y": xywh[order, 1], "width": xywh[order, 2], "height": xywh[order, 3],
            "Target": positive[order].astype(int),
        }
    )
    _assert_same_boxes(boxes_per_patient(rows, ids), _reference_boxes(rows, ids))


def _reference_clip(table: pd.DataFrame) -> tuple[list[np.ndarray], list[str]]:
    """The former per-patient clipping loop of load_rsna."""
    boxes_out, changed = [], []
    for pid, boxes, h, w in zip(table["patientId"], table["boxes"], table["orig_h"], table["orig_w"]):
        clipped = boxes.copy()
        if len(boxes):
            clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, w)
            clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, h)
            if not np.array_equal(clipped, boxes):
                changed.append(pid)
        boxes_out.append(clipped)
    return boxes_out, changed


def test_clipping_to_the_image_equals_the_per_patient_reference(tmp_path: Path) -> None:
    from PIL import Image

    labels = (
        "patientId,x,y,width,height,Target\n"
        "inside,1,2,3,4,1\n"  # 64 x 64 image, untouched
        "wide,40,10,30,5,1\n"  # 48 wide x 32 high: x2 70 -> 48
        "wide,-5.5,20,10,20,1\n"  # x1 -5.5 -> 0, y2 40 -> 32
        "none,,,,,0\n"
        "tall,10.25,10.75,20.5,100,1\n"  # 40 wide x 24 high: y2 -> 24
        "tall,1,1,2,2,1\n"
    )
    classes = "patientId,class\n" + "".join(
        f"{pid},{'Normal' if pid == 'none' else 'Lung Opacity'}\n"
        for pid in ("inside", "wide", "wide", "none", "tall", "tall")
    )
    folder = _write(tmp_path, labels, classes)
    (folder / "images").mkdir()
    for pid, (h, w) in {"inside": (64, 64), "wide": (32, 48), "none": (16, 16), "tall": (24, 40)}.items():
        Image.fromarray(np.zeros((h, w), np.uint8)).save(folder / "images" / f"{pid}.png")
    table = load_rsna(folder)
    unclipped = load_label_tables(folder).set_index("patientId").loc[table["patientId"], "boxes"]
    before = table.assign(boxes=list(unclipped))
    expected_boxes, expected_changed = _reference_clip(before)
    _assert_same_boxes(list(table["boxes"]), expected_boxes)
    assert table.attrs["load_report"].boxes_clipped == expected_changed == ["wide", "tall"]
    np.testing.assert_array_equal(table["boxes"][1], [[40, 10, 48, 15], [0, 20, 4.5, 32]])
