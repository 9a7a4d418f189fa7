"""`predict` never loses work: results per batch, resumable, every failure kept with its file.

Regression tests for the defects of issue 12: a kill or an untyped error lost the whole
batch; the same file name in two folders broke the ids and overlays; bad option values
passed silently and erased the header's valid values; `--sex F` replaced a header's M;
an empty or binary metadata CSV and `--device cuda` without a GPU gave tracebacks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from lungopacity.cli import app
from lungopacity.errors import ConfigError, DataFormatError
from lungopacity.inference import Predictor
from lungopacity.inference.batch import flat_ids, predict_to_folder, read_metadata_overrides


def _dicoms(tiny_demo, n: int) -> list[Path]:
    return sorted((tiny_demo.paths["data"] / "stage_2_train_images").glob("*.dcm"))[:n]


def _folder_with_a_bad_file(tiny_demo, root: Path, n_good: int = 6) -> tuple[Path, list[str], str]:
    folder = root / "inputs"
    folder.mkdir()
    good = []
    for k, dicom in enumerate(_dicoms(tiny_demo, n_good)):
        target = folder / f"{k:02d}_{dicom.stem[:8]}.dcm"
        shutil.copy(dicom, target)
        good.append(target.stem)
    bad = folder / f"{n_good // 2:02d}_bad.dcm"  # sorts into the middle
    bad.write_bytes(_dicoms(tiny_demo, 1)[0].read_bytes()[:300])
    return folder, good, str(bad.resolve())


def test_killed_run_continues_and_predicts_each_file_exactly_once(tiny_demo, tmp_path: Path) -> None:
    folder, good, bad = _folder_with_a_bad_file(tiny_demo, tmp_path)
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        from lungopacity.inference import Predictor
        from lungopacity.inference.batch import predict_to_folder
        calls = []
        def progress(done, total):
            calls.append(done)
            if done >= 4:  # some batches are written; the rest is not done yet
                os.kill(os.getpid(), signal.SIGKILL)
        predictor = Predictor.from_bundle({str(tiny_demo.paths["model"])!r})
        predict_to_folder(predictor, [{str(folder)!r}], {str(out)!r}, batch_size=1, with_images=False,
                          progress=progress)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    partial = pd.read_csv(out / "predictions.csv")
    assert 0 < len(partial) < len(good)  # the finished batches survived the kill

    result = predict_to_folder(Predictor.from_bundle(tiny_demo.paths["model"]), [folder], out, batch_size=2,
                               with_images=False)
    table = pd.read_csv(out / "predictions.csv")
    assert sorted(table["id"]) == sorted(good)  # each good file exactly once
    errors = pd.read_csv(out / "errors.csv")
    assert errors["input"].tolist() == [bad] and "truncated" in errors["error"][0]
    assert result.n_skipped >= len(partial) and result.n_predicted == len(good) and result.n_errors == 1
    assert len(json.loads((out / "predictions.json").read_text())) == len(good)
    submission = pd.read_csv(out / "submission.csv", keep_default_na=False)
    assert sorted(submission["patientId"]) == sorted(good)


def test_a_file_that_breaks_prediction_is_an_error_and_the_batch_goes_on(
    tiny_demo, tmp_path: Path, monkeypatch
) -> None:
    folder, good, _ = _folder_with_a_bad_file(tiny_demo, tmp_path, n_good=4)
    predictor = Predictor.from_bundle(tiny_demo.paths["model"])
    victim = good[1]
    original = predictor.predict_images

    def fragile(images, given=None, *, override=False):
        if any(img.id == victim for img in images):
            raise MemoryError("out of memory in this image")
        return original(images, given, override=override)

    monkeypatch.setattr(predictor, "predict_images", fragile)
    result = predict_to_folder(predictor, [folder], tmp_path / "out", batch_size=4, with_images=False)
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert sorted(table["id"]) == sorted(set(good) - {victim})
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert any(victim in e for e in errors["input"]) and errors["error"].str.contains("MemoryError").any()
    assert result.n_errors == 2


def test_same_name_in_two_folders_gives_flat_unique_ids(tiny_demo, tmp_path: Path) -> None:
    dicom = _dicoms(tiny_demo, 1)[0]
    for sub in ("site_a", "site_b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        shutil.copy(dicom, tmp_path / "in" / sub / "chest.dcm")
    out = tmp_path / "out"
    predict_to_folder(Predictor.from_bundle(tiny_demo.paths["model"]), [tmp_path / "in"], out, with_images=True)
    ids = sorted(pd.read_csv(out / "predictions.csv")["id"])
    assert ids == ["site_a_chest.dcm", "site_b_chest.dcm"]
    for image_id in ids:
        assert (out / "overlays" / f"{image_id}.png").exists()


def test_flat_ids_keep_earlier_ids_and_never_contain_separators(tmp_path: Path) -> None:
    a, b, c = Path("/x/a/scan.png"), Path("/x/b/scan.png"), Path("/x/a/b/scan.png")
    ids = flat_ids([a, b, c])
    assert len(set(ids.values())) == 3 and all("/" not in i for i in ids.values())
    again = flat_ids([a, b, c, Path("/x/new.png")], taken={ids[a]: a, ids[b]: b, ids[c]: c})
    assert {k: again[k] for k in (a, b, c)} == ids and again[Path("/x/new.png")] == "new"


@pytest.mark.parametrize(
    ("option", "value", "exit_code", "message"),
    [("--view", "XX", 2, "'XX' is not one of 'AP', 'PA'"), ("--sex", "Q", 2, "'Q' is not one of 'M', 'F'"),
     ("--age", "-5", 1, "error: --age: age must be a number of years"),
     ("--age", "abc", 1, "error: --age: age must be a number of years")],
)
def test_bad_option_values_are_refused_before_anything_is_written(
    tiny_demo, tmp_path: Path, option: str, value: str, exit_code: int, message: str
) -> None:
    """A fixed choice is a usage error (exit 2, the choices listed); a bad number a one-line error (exit 1)."""
    dicom = _dicoms(tiny_demo, 1)[0]
    result = CliRunner().invoke(app, ["predict", str(dicom), "--bundle", str(tiny_demo.paths["model"]),
                                      "--out", str(tmp_path / "out"), option, value])
    assert result.exit_code == exit_code, result.output
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_given_values_fill_only_what_the_header_lacks_unless_override(tiny_demo, tmp_path: Path) -> None:
    dicom = _dicoms(tiny_demo, 1)[0]
    from lungopacity.io import read_image

    _, header = read_image(dicom)
    other = "F" if header["sex"] == "M" else "M"
    predictor = Predictor.from_bundle(tiny_demo.paths["model"])
    kept = predict_to_folder(predictor, [dicom], tmp_path / "kept", sex=other, with_images=False)
    record = json.loads((kept.out_dir / "predictions.json").read_text())[0]
    assert record["metadata"]["sex"] == header["sex"] and record["metadata_source"]["sex"] == "header"
    replaced = predict_to_folder(predictor, [dicom], tmp_path / "replaced", sex=other, override=True, with_images=False)
    record = json.loads((replaced.out_dir / "predictions.json").read_text())[0]
    assert record["metadata"]["sex"] == other and record["metadata_source"]["sex"] == "given"


def test_a_rerun_with_other_options_is_refused(tiny_demo, tmp_path: Path) -> None:
    dicom = _dicoms(tiny_demo, 1)[0]
    predictor = Predictor.from_bundle(tiny_demo.paths["model"])
    predict_to_folder(predictor, [dicom], tmp_path / "out", with_images=False)
    with pytest.raises(ConfigError, match="different with_images"):
        predict_to_folder(predictor, [dicom], tmp_path / "out", with_images=True)
    fresh = predict_to_folder(predictor, [dicom], tmp_path / "out", with_images=True, overwrite=True)
    assert fresh.n_skipped == 0 and fresh.n_predicted == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "the file is empty"), (bytes(range(256)) * 4, "not a readable CSV"), (b"id,colour\na,red\n", "needs at least one"),
     (b"id,sex,age\na,M,40\nb,M,forty\n", ":3: age must be a number")],
)
def test_bad_metadata_csv_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "meta.csv"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=message) as caught:
        read_metadata_overrides(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(tiny_demo, tmp_path: Path) -> None:
    dicom = _dicoms(tiny_demo, 1)[0]
    result = CliRunner().invoke(app, ["predict", str(dicom), "--bundle", str(tiny_demo.paths["model"]),
                                      "--out", str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 1 and result.stderr.startswith("error: --device: cuda was asked for")
    assert "Traceback" not in result.output
