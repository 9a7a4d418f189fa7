"""Every command turns the library's errors into one line on stderr and exit status 1.

One bad input per command: a folder that is not what the command needs, a damaged
bundle, a table with the wrong columns. The assertions: exit status 1 (not Click's 2 for
usage errors, not a crash), exactly one line on stderr that starts with ``error:`` and
names the file concerned, and no traceback anywhere in the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lungopacity.cli import EXIT_LIBRARY_ERROR, app
from lungopacity.inference.manifest import BUNDLE_FORMAT_VERSION


def _damaged_bundle(root: Path) -> Path:
    bundle = root / "tampered-model"
    bundle.mkdir()
    (bundle / "bundle.json").write_text('{"format": "lungopacity-bundle", "format_version": 2, "class')
    return bundle


def _bundle_with_bad_field(root: Path) -> Path:
    bundle = root / "bad-field-model"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({
        "format": "lungopacity-bundle", "format_version": BUNDLE_FORMAT_VERSION, "lungopacity_version": "0.1.0",
        "created": "2026-01-01T00:00:00+00:00",
        "class_names": ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"],
        "classifier": {"model_config": {}, "members": [{"file": "classifier_0.safetensors", "sha256": "0" * 64}],
                       "temperature": "hot", "preprocessing": {"prepared_size": 64, "input_size": 64, "window": "none"}},
        "threshold": {"value": 0.5, "rule": "youden", "sensitivity": 0.9, "specificity": 0.8, "score": "image"},
    }))
    return bundle


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """command -> (argv, a string the one-line message must contain)."""
    empty = tmp / "empty"
    empty.mkdir()
    stale = tmp / "stale" / "stage_2_train_images"
    stale.mkdir(parents=True)
    (stale / "old.dcm").write_bytes(b"not really a dicom")
    bad_labels = tmp / "labels.csv"
    bad_labels.write_text("patient,x,y\n1,2,3\n")
    submission = tmp / "submission.csv"
    submission.write_text("patientId,PredictionString\n")
    image = tmp / "x.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    bundle = _damaged_bundle(tmp)
    not_a_folder = tmp / "a-file"
    not_a_folder.write_text("x")
    return {
        "demo-data": (["demo-data", str(stale.parent), "--n", "3", "--size", "64"], "stage_2_train_images"),
        "prepare": (["prepare", str(empty), "--out", str(tmp / "cache")], "empty"),
        "train-classifier": (["train-classifier", str(empty), "--out", str(tmp / "run")], "not a prepared cache"),
        "evaluate-classifier": (["evaluate-classifier", str(tmp / "no-run"), "--cache", str(empty),
                                 "--out", str(tmp / "report")], "empty"),
        "train-detector": (["train-detector", str(empty), "--out", str(tmp / "det")], "not a prepared cache"),
        "evaluate-detector": (["evaluate-detector", str(tmp / "no-run"), "--cache", str(empty),
                               "--out", str(tmp / "report")], "no-run"),
        "score": (["score", str(bad_labels), str(submission)], "labels.csv"),
        "train-fusion": (["train-fusion", "--oof", str(tmp / "missing-oof.csv"), "--out", str(tmp / "fusion"),
                          "--cache", str(empty)], "missing-oof.csv"),
        "bundle": (["bundle", "--classifier", str(tmp / "no-run"), "--out", str(tmp / "model")], "no-run"),
        "predict": (["predict", str(image), "--bundle", str(bundle), "--out", str(tmp / "pred")], "tampered-model"),
        "export-onnx": (["export-onnx", str(bundle)], "tampered-model"),
        "serve": (["serve", "--bundle", str(bundle), "--port", "1"], "tampered-model"),
        "listen": (["listen", "--bundle", str(bundle), "--port", "0", "--send-to", "127.0.0.1:104:PACS",
                    "--spool", str(tmp / "spool")], "tampered-model"),
        "demo": (["demo", "--out", str(not_a_folder)], "a-file"),
    }


COMMANDS = ("demo-data", "prepare", "train-classifier", "evaluate-classifier", "train-detector", "evaluate-detector",
            "score", "train-fusion", "bundle", "predict", "export-onnx", "serve", "listen", "demo")


def test_every_command_is_covered() -> None:
    registered = {command.name for command in app.registered_commands}
    assert registered == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_library_error_is_one_line_and_exit_status_1(command: str, tmp_path: Path) -> None:
    argv, named = _cases(tmp_path)[command]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == EXIT_LIBRARY_ERROR, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and named in lines[0], lines[0]
    assert "Traceback" not in result.output and "Traceback" not in result.stderr


def test_a_bundle_field_of_the_wrong_type_is_named(tmp_path: Path) -> None:
    bundle = _bundle_with_bad_field(tmp_path)
    result = CliRunner().invoke(app, ["export-onnx", str(bundle)])
    assert result.exit_code == EXIT_LIBRARY_ERROR
    assert "classifier.temperature: expected a number, found str" in result.stderr
