"""The RSNA submission writer, reader and scorer (io/submission.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lungopacity.io.errors import DataFormatError
from lungopacity.io.submission import (
    format_prediction_string,
    parse_prediction_string,
    parse_prediction_strings,
    read_submission,
    score_submission,
    write_submission,
)
from lungopacity.metrics import rsna_map

# Official-format labels: one row per box, an empty box for a patient without one.
LABELS = """patientId,x,y,width,height,Target
p-normal,,,,,0
p-one,100,150,200,300,1
p-two,50,60,100,120,1
p-two,600,400,150,250,1
p-other,,,,,0
"""
CLASSES = """patientId,class
p-normal,Normal
p-one,Lung Opacity
p-two,Lung Opacity
p-two,Lung Opacity
p-other,No Lung Opacity / Not Normal
"""
GT = {
    "p-normal": np.zeros((0, 4)),
    "p-one": np.array([[100, 150, 300, 450]], dtype=float),
    "p-two": np.array([[50, 60, 150, 180], [600, 400, 750, 650]], dtype=float),
    "p-other": np.zeros((0, 4)),
}


@pytest.fixture
def labels_csv(tmp_path):
    (tmp_path / "stage_2_train_labels.csv").write_text(LABELS)
    (tmp_path / "stage_2_detailed_class_info.csv").write_text(CLASSES)
    return tmp_path / "stage_2_train_labels.csv"


def test_prediction_string_is_confidence_then_xywh():
    assert format_prediction_string([[10, 20, 110, 220], [1.5, 2.25, 3, 4]], [0.5, 0.75]) == (
        "0.5 10 20 100 200 0.75 1.5 2.25 1.5 1.75"
    )
    assert format_prediction_string(np.zeros((0, 4)), np.zeros(0)) == ""
    assert format_prediction_string([[10.123, 20, 110.5, 220]], [0.98765], decimals=2) == "0.99 10.12 20 100.38 200"
    with pytest.raises(ValueError, match="x1 <= x2"):
        format_prediction_string([[10, 20, 5, 220]], [0.5])


def test_written_submission_parses_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"patient-{k}" for k in range(6)]
    boxes, scores = [], []
    for k in range(6):
        n = k % 4  # 0..3 boxes, patient 0 and 4 have none
        corners = rng.integers(0, 4096, (n, 2)) / 8.0  # exact binary fractions: x + w is exact
        sizes = rng.integers(8, 2400, (n, 2)) / 8.0
        boxes.append(np.concatenate([corners, corners + sizes], axis=1))
        scores.append(rng.random(n))  # arbitrary float64 confidences
    path = write_submission(tmp_path / "sub.csv", ids, boxes, scores)
    lines = path.read_text().splitlines()
    assert lines[0] == "patientId,PredictionString"
    assert lines[1] == "patient-0,"
    table = read_submission(path)
    assert table["patientId"].tolist() == ids
    for expected_boxes, expected_scores, got_boxes, got_scores in zip(boxes, scores, table["boxes"], table["scores"]):
        assert np.array_equal(got_boxes, expected_boxes.reshape(-1, 4))
        assert np.array_equal(got_scores, expected_scores)


def test_arbitrary_float_boxes_round_trip_to_rounding(tmp_path):
    rng = np.random.default_rng(1)
    corners = rng.uniform(0, 900, (5, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, 300, (5, 2))], axis=1)
    scores = rng.random(5)
    write_submission(tmp_path / "sub.csv", ["a"], [boxes], [scores])
    back = read_submission(tmp_path / "sub.csv")
    np.testing.assert_allclose(back["boxes"][0], boxes, rtol=0, atol=1e-9)
    assert np.array_equal(back["scores"][0], scores)


@pytest.mark.parametrize(
    ("row", "cause"),
    [
        ("p-one,0.5 10 20 100", "groups of 5"),
        ("p-one,0.5 10 abc 100 200", "value 3 ('abc') is not a number"),
        ("p-one,0.5 10 20 -100 200", "negative width"),
        ("p-one,0.5 10 20 nan 200", "not finite"),
        (",0.5 10 20 100 200", "empty patientId"),
    ],
)
def test_malformed_prediction_strings_name_file_and_line(tmp_path, row, cause):
    path = tmp_path / "bad.csv"
    path.write_text(f"patientId,PredictionString\np-normal,\n{row}\n")
    with pytest.raises(DataFormatError) as error:
        read_submission(path)
    message = str(error.value)
    assert message.startswith(str(path)) and "line 3" in message and cause in message


def test_bad_submission_tables(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text("patientId,Prediction\na,\n")
    with pytest.raises(DataFormatError, match="missing column"):
        read_submission(path)
    path.write_text("patientId,PredictionString\na,\nb,\na,0.5 1 2 3 4\n")
    with pytest.raises(DataFormatError, match="line 4: patient a already appeared on line 2"):
        read_submission(path)
    with pytest.raises(DataFormatError, match="file not found"):
        read_submission(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="appears twice"):
        write_submission(path, ["a", "a"], [None, None], [None, None])


def test_parse_prediction_string_returns_xyxy():
    boxes, scores = parse_prediction_string("  0.9 10 20 30 40   0.1 0 0 5 5 ")
    np.testing.assert_array_equal(boxes, [[10, 20, 40, 60], [0, 0, 5, 5]])
    np.testing.assert_array_equal(scores, [0.9, 0.1])


# ------------------------------------------------------------------------- scoring


def _write(tmp_path, rows, name="sub.csv"):
    ids = [r[0] for r in rows]
    path = write_submission(tmp_path / name, ids, [r[1] for r in rows], [r[2] for r in rows])
    return path


def test_submission_equal_to_the_labels_scores_one(tmp_path, labels_csv):
    rows = [(pid, boxes, np.ones(len(boxes))) for pid, boxes in GT.items()]
    result = score_submission(labels_csv, _write(tmp_path, rows))
    assert result["rsna_map"] == 1.0
    assert all(v == 1.0 for v in result["precision_at_iou"].values())
    assert result["sensitivity_at_fppi"]["0.5"] == 1.0
    assert (result["n_patients"], result["n_with_opacity"], result["n_gt_boxes"], result["n_scored"]) == (4, 2, 3, 2)


def test_empty_submission_scores_zero_over_the_positive_images(tmp_path, labels_csv):
    rows = [(pid, np.zeros((0, 4)), np.zeros(0)) for pid in GT]
    result = score_submission(labels_csv, _write(tmp_path, rows))
    assert result["rsna_map"] == 0.0
    assert result["n_scored"] == 2  # the two positives; negatives without boxes are left out
    assert result["n_predicted_boxes"] == 0


def test_missing_patients_count_as_no_prediction(tmp_path, labels_csv):
    rows = [("p-one", GT["p-one"], [0.9])]
    result = score_submission(labels_csv, _write(tmp_path, rows))
    assert result["n_missing"] == 3
    assert result["rsna_map"] == 0.5  # p-one hit (1.0), p-two missed (0.0)


def test_unknown_submission_patient_is_an_error(tmp_path, labels_csv):
    rows = [("p-one", GT["p-one"], [0.9]), ("p-stranger", np.zeros((0, 4)), np.zeros(0))]
    with pytest.raises(DataFormatError, match="not in the labels .* p-stranger"):
        score_submission(labels_csv, _write(tmp_path, rows))


def test_score_agrees_with_rsna_map_and_needs_no_class_table(tmp_path, labels_csv):
    rng = np.random.default_rng(3)
    rows = []
    for pid, boxes in GT.items():
        jittered = boxes + rng.normal(0, 15, boxes.shape)
        extra = np.array([[400, 400, 500, 520]]) if pid in ("p-normal", "p-two") else np.zeros((0, 4))
        pred = np.concatenate([jittered, extra])
        rows.append((pid, pred, np.round(rng.random(len(pred)), 3)))
    path = _write(tmp_path, rows)
    expected = rsna_map(list(GT.values()), [r[1] for r in rows], [r[2] for r in rows])
    assert score_submission(labels_csv, path)["rsna_map"] == pytest.approx(expected, abs=1e-12)
    # Only the labels file: the boxes are all the metric needs.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "labels.csv").write_text(LABELS)
    assert score_submission(alone / "labels.csv", path)["rsna_map"] == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------ batch parsing vs one by one


def _random_prediction_strings(rng: np.random.Generator, n: int) -> list[str]:
    texts = []
    for k in range(n):
        values = []
        for _ in range(int(rng.integers(0, 5))):
            c, x, y = rng.random(), rng.uniform(-5, 1000), rng.uniform(0, 1000)
            w, h = rng.uniform(0, 300), rng.uniform(0, 300)
            values += [repr(c), f"{x:.3f}", str(int(y)), f"{w:g}", "0" if k % 7 == 0 else repr(h)]
        separator = ["  ", " ", "\t", " \t "][k % 4]  # every kind of whitespace split() takes
        texts.append((" " if k % 3 == 0 else "") + separator.join(values) + (" " if k % 5 == 0 else ""))
    return texts


def test_batch_parsing_equals_parsing_one_by_one():
    texts = _random_prediction_strings(np.random.default_rng(5), 500)
    texts += ["", "   ", "1e-3 1E2 +2 0.5e1 6", "0.9 1_000 2 3 4"]  # what float() reads, read alike
    boxes, scores = parse_prediction_strings(texts)
    assert len(boxes) == len(scores) == len(texts)
    for text, got_boxes, got_scores in zip(texts, boxes, scores):
        expected_boxes, expected_scores = parse_prediction_string(text)
        assert got_boxes.dtype == got_scores.dtype == np.float64
        assert got_boxes.shape == expected_boxes.shape and got_scores.shape == expected_scores.shape
        assert np.array_equal(got_boxes, expected_boxes) and np.array_equal(got_scores, expected_scores)
    assert parse_prediction_strings([]) == ([], [])


@pytest.mark.parametrize(
    "bad",
    ["0.5 10 20 100", "0.5 10 abc 100 200", "0.5 10 20 -100 200", "0.5 10 20 nan 200", "inf 1 2 3 4",
     "0.5 1 2 3 -0.5", "0.5 1 2 3 4 0.1"],
)
def test_batch_parsing_names_the_first_bad_string_with_the_single_string_message(bad):
    texts = ["0.9 1 2 3 4", "", bad, "0.5 10 zz 1 1"]
    with pytest.raises(ValueError) as single:
        parse_prediction_string(bad)
    with pytest.raises(ValueError) as batch:
        parse_prediction_strings(texts)
    assert batch.value.index == 2 and batch.value.cause == str(single.value) == str(batch.value)


@pytest.mark.parametrize(
    ("rows", "line", "cause"),
    [
        # A bad string before a bad row: the string is reported, as when parsing row by row.
        (["a,0.5 1 2 3", ",0.5 1 2 3 4"], 2, "patient a: bad PredictionString: 4 values"),
        (["a,0.5 1 2 3 4", "b,0.5 x 2 3 4", "a,"], 3, "patient b: bad PredictionString: value 2 ('x')"),
        # A bad row before a bad string: the row is reported.
        ([",0.5 1 2 3 4", "a,0.5 1 2 3"], 2, "empty patientId"),
        (["a,", "a,0.5 1 2 3", "b,0.5 x 2 3 4"], 3, "patient a already appeared on line 2"),
        (["a,", "b,1 2 3 4 5,extra", "c,0.5 x 2 3 4"], 3, "3 fields, expected 2"),
        (["a,", "", " , ", "b,0.5 1 2 -3 4"], 5, "patient b: bad PredictionString: box 1 has a negative"),
    ],
)
def test_read_submission_reports_the_first_error_of_the_file(tmp_path, rows, line, cause):
    path = tmp_path / "sub.csv"
    path.write_text("patientId,PredictionString\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataFormatError) as error:
        read_submission(path)
    assert str(error.value).startswith(f"{path}: line {line}: {cause}")


def test_read_submission_skips_blank_rows_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text('patientId,PredictionString\n\na,"0.5 1 2\n3 4"\n , \nb,0.25 0 0 1 1\nc,0.5 1 x 3 4\n')
    with pytest.raises(DataFormatError, match=r"line 7: patient c"):
        read_submission(path)  # the quoted string spanning two lines counts as two
    path.write_text('patientId,PredictionString\n\na,"0.5 1 2\n3 4"\n , \nb,0.25 0 0 1 1\n')
    table = read_submission(path)
    assert table["patientId"].tolist() == ["a", "b"]
    np.testing.assert_array_equal(table["boxes"][0], [[1, 2, 4, 6]])
    np.testing.assert_array_equal(table["scores"][1], [0.25])


def test_labels_only_ground_truth_equals_the_per_patient_reference(tmp_path):
    from lungopacity.io.rsna import read_labels_csv, xywh_rows_to_xyxy
    from lungopacity.io.submission import _labels_table

    # Without the class table, mixed Target rows of one patient are allowed: only its
    # box rows count. Duplicated rows stay duplicated.
    labels = LABELS + "p-mixed,,,,,0\np-mixed,1,2,3,4,1\np-one,100,150,200,300,1\n"
    (tmp_path / "labels.csv").write_text(labels)
    table = _labels_table(tmp_path / "labels.csv", None)
    rows = read_labels_csv(tmp_path / "labels.csv")
    positive = rows[rows["Target"] == 1]
    reference = {pid: xywh_rows_to_xyxy(g) for pid, g in positive.groupby("patientId", sort=False)}
    assert table["patientId"].tolist() == ["p-normal", "p-one", "p-two", "p-other", "p-mixed"]
    for pid, boxes, target in zip(table["patientId"], table["boxes"], table["Target"]):
        expected = reference.get(pid, np.zeros((0, 4), np.float32))
        assert boxes.dtype == np.float32 and np.array_equal(boxes, expected.reshape(-1, 4))
        assert target == int(len(expected) > 0)
    assert len(table["boxes"][1]) == 2
