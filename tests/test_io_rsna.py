"""The RSNA data layer: official tables, the patient table, inconsistencies and splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungopacity.io import DataFormatError
from lungopacity.io.rsna import (
    assign_folds,
    load_label_tables,
    load_rsna,
    make_splits,
    read_metadata_csv,
    read_splits,
    stratified_split,
    write_splits,
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
