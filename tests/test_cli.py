"""The command line's conventions: --version, choices, help on every option, log levels, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.core import TyperOption
from typer.testing import CliRunner

from lungopacity import __version__
from lungopacity.cli import app


def _click_commands() -> dict:
    return dict(typer.main.get_command(app).commands)


def test_version_is_printed() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"lungopacity {__version__}"


def test_a_wrong_choice_is_a_usage_error_listing_the_choices(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train-classifier", str(tmp_path), "--out", str(tmp_path / "r"), "--balance", "x"])
    assert result.exit_code == 2
    assert "'x' is not one of 'none', 'loss', 'sampler'" in result.stderr


@pytest.mark.parametrize(
    ("argv", "choices"),
    [
        (["train-classifier", "C", "--out", "R", "--recipe", "sgd"], "'paper', 'finetune'"),
        (["train-classifier", "C", "--out", "R", "--select", "worst"], "'best', 'last'"),
        (["train-detector", "C", "--out", "R", "--arch", "yolo"], "'retinanet', 'fasterrcnn'"),
        (["evaluate-classifier", "R", "--cache", "C", "--out", "O", "--split", "train"], "'val', 'all'"),
        (["evaluate-detector", "R", "--cache", "C", "--out", "O", "--split", "test"], "'val', 'train', 'all'"),
        (["predict", "x.dcm", "--bundle", "B", "--out", "O", "--runtime", "tensorrt"], "'torch', 'onnx'"),
        (["predict", "x.dcm", "--bundle", "B", "--out", "O", "--sex", "X"], "'M', 'F'"),
        (["predict", "x.dcm", "--bundle", "B", "--out", "O", "--view", "LL"], "'AP', 'PA'"),
    ],
)
def test_every_fixed_choice_is_checked_by_the_command_line(argv: list[str], choices: str) -> None:
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and choices in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["train-classifier", "evaluate-classifier", "train-detector", "evaluate-detector",
                                     "predict"])
def test_a_device_that_is_no_device_is_a_usage_error(command: str) -> None:
    argv = {"train-classifier": ["C", "--out", "R"], "evaluate-classifier": ["R", "--cache", "C", "--out", "O"],
            "train-detector": ["C", "--out", "R"], "evaluate-detector": ["R", "--cache", "C", "--out", "O"],
            "predict": ["x", "--bundle", "B", "--out", "O"]}[command]
    result = CliRunner().invoke(app, [command, *argv, "--device", "gpu0"])
    assert result.exit_code == 2 and "'gpu0' is not a device" in result.stderr


def test_every_option_has_help_text() -> None:
    missing = [
        f"{name} {param.opts[0]}"
        for name, command in _click_commands().items()
        for param in command.params
        if isinstance(param, TyperOption) and not (param.help or "").strip()
    ]
    assert missing == []


def test_every_command_has_a_description() -> None:
    assert [name for name, command in _click_commands().items() if not (command.help or "").strip()] == []


def test_devices_default_to_auto_everywhere() -> None:
    defaults = {
        name: param.default
        for name, command in _click_commands().items()
        for param in command.params
        if isinstance(param, TyperOption) and param.name == "device"
    }
    assert defaults and set(defaults.values()) == {"auto"}, defaults


def test_train_classifier_defaults_to_the_five_folds_that_prepare_writes() -> None:
    options = {p.name: p for p in _click_commands()["train-classifier"].params}
    prepare = {p.name: p for p in _click_commands()["prepare"].params}
    assert options["folds"].default == prepare["folds"].default == 5


@pytest.mark.parametrize(("extra", "backbone", "pretrained"), [
    ([], "efficientnet_lite0", "efficientnet-lite0"),
    (["--backbone", "efficientnet_lite2"], "efficientnet_lite2", "efficientnet-lite2"),
    (["--backbone", "resnet18"], "resnet18", "none"),
    (["--backbone", "resnet18", "--pretrained", "timm"], "resnet18", "timm"),
])
def test_train_classifier_defaults_to_the_best_measured_recipe(monkeypatch, tmp_path: Path, extra, backbone,
                                                              pretrained) -> None:
    # BENCHMARKS.md (issue 17): Lite0 on its offline ImageNet weights, 3 epochs, scored best on the
    # real images; "auto" weights are the offline ones of the chosen backbone, none for others.
    import lungopacity.engine.classifier as engine

    seen = {}

    def fake_train(cache, out, config, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(engine, "train_classifier", fake_train)
    CliRunner().invoke(app, ["train-classifier", str(tmp_path), "--out", str(tmp_path / "run"), *extra])
    config = seen["config"]
    assert (config.backbone, config.pretrained, config.epochs, config.folds) == (backbone, pretrained, 3, 5)


def _tiny_labels(tmp_path: Path) -> tuple[Path, Path]:
    labels = tmp_path / "labels.csv"
    labels.write_text("patientId,x,y,width,height,Target\na,10,10,50,50,1\nb,,,,,0\n")
    submission = tmp_path / "submission.csv"
    submission.write_text("patientId,PredictionString\na,0.9 10 10 50 50\nb,\n")
    return labels, submission


def test_library_info_lines_are_hidden_by_default_and_shown_with_v(tmp_path: Path) -> None:
    labels, submission = _tiny_labels(tmp_path)
    quiet = CliRunner().invoke(app, ["score", str(labels), str(submission)])
    assert quiet.exit_code == 0 and "RSNA metric 1.0000" in quiet.stdout
    assert "INFO" not in quiet.stderr
    verbose = CliRunner().invoke(app, ["-v", "score", str(labels), str(submission)])
    assert verbose.exit_code == 0 and "INFO lungopacity" in verbose.stderr and "DEBUG" not in verbose.stderr
    assert verbose.stdout == quiet.stdout  # the command's own lines are the same at every level
