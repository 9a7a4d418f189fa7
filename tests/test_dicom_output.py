"""DICOM results (SR TID 1500, GSPS, Secondary Capture): validated by dciodvfy, read back with highdicom.

The sources are the shared real RSNA DICOMs when present, else a synthetic RSNA-like
DICOM (lungopacity.synthetic); dciodvfy (Debian's dicom3tools) checks each object
against the IOD, and the tests skip with the reason when it is not installed.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from conftest import RSNA_DICOM_DIR

highdicom = pytest.importorskip("highdicom", reason="highdicom is not installed (pip install 'lungopacity[dicom]')")

from lungopacity.errors import ImageReadError  # noqa: E402
from lungopacity.inference.dicom_output import (  # noqa: E402
    CODES, GRAYSCALE_SOFTCOPY_PS, RESULT_KINDS, SECONDARY_CAPTURE, AlgorithmInfo, build_dicom_results,
    dicom_results_for_upload, encode_dataset, is_dicom, multipart_related, read_sr_summary, write_dicom_results,
)
from lungopacity.inference.schemas import Box, Prediction  # noqa: E402

ALGORITHM = AlgorithmInfo(name="lungopacity test model", version="0.1.0 bundle 2025-01-01T00:00:00+00:00",
                          key="0" * 64, parameters=("threshold 0.5 on the classifier probability (youden)",),
                          software_version="0.1.0")


def rsna_or_synthetic(tmp_path: Path, n: int = 1) -> list[Path]:
    """Real RSNA DICOMs (the shared ones), else synthetic RSNA-like ones."""
    images = RSNA_DICOM_DIR / "stage_2_train_images"
    if images.is_dir():
        found = sorted(images.glob("*.dcm"))[:n]
        if len(found) == n:
            return found
    from lungopacity.synthetic.rsna_writer import write_dicom

    rng = np.random.default_rng(0)
    return [write_dicom(tmp_path / f"synthetic_{i}.dcm", rng.integers(0, 255, (256, 256), dtype=np.uint8),
                        sex="F", age=51, view="PA", patient_id=f"synthetic-{i}", pixel_spacing=0.143)
            for i in range(n)]


def private_source(tmp_path: Path) -> Path:
    """A CR DICOM with a private block, an unrelated public tag and an RSNA-style age."""
    from lungopacity.synthetic.rsna_writer import write_dicom

    path = write_dicom(tmp_path / "private.dcm", np.full((200, 300), 90, dtype=np.uint8), sex="M", age=7,
                       view="AP", patient_id="PID-777", pixel_spacing=0.2, transfer_syntax="explicit-little")
    ds = pydicom.dcmread(path)
    ds.PatientName = "Doe^Jane"
    ds.AccessionNumber = "ACC123"
    ds.ProtocolName = "unrelated protocol"
    ds.OperatorsName = "Operator^Olga"
    block = ds.private_block(0x0011, "LUNGOPACITY TEST", create=True)
    block.add_new(0x01, "LO", "private secret")
    ds.save_as(path)
    return path


def prediction_for(path: Path, *, decision: bool | None = True, boxes: list[Box] | None = None,
                   probability: float = 0.8734567891) -> Prediction:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if boxes is None:
        boxes = [Box(0.1 * cols, 0.2 * rows, 0.4 * cols, 0.6 * rows, 0.71),
                 Box(0.55 * cols, 0.15 * rows, 0.9 * cols, 0.7 * rows, 0.42)]
    return Prediction(id=path.stem, probabilities={"normal": 0.1, "not_normal": 0.2, "lung_opacity": 0.7},
                      opacity_probability=probability, decision=decision, threshold=0.5, boxes=boxes,
                      image_size=(rows, cols))


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dicom3tools' IOD validator on one file."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; .ci/run installs it")
    run = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


#: Warnings dciodvfy gives that are about the source's own values or the declared local code scheme.
EXPECTED_WARNINGS = ("DICOMDIR", "Retired Person Name form", "Unrecognized defined term <99LUNGOP>")


def check_valid(path: Path) -> None:
    errors, warnings = dciodvfy(path)
    assert not errors, f"{path.name}: dciodvfy errors:\n" + "\n".join(errors)
    unexpected = [w for w in warnings if not any(e in w for e in EXPECTED_WARNINGS)]
    assert not unexpected, f"{path.name}: dciodvfy warnings not looked at before:\n" + "\n".join(unexpected)


def test_results_validate_and_read_back(tmp_path: Path) -> None:
    (source,) = rsna_or_synthetic(tmp_path)
    data = source.read_bytes()
    src = pydicom.dcmread(source, stop_before_pixels=True)
    prediction = prediction_for(source)
    results = build_dicom_results(data, prediction, ALGORITHM, name=str(source))
    written = write_dicom_results(results, tmp_path / "out")
    assert sorted(p.name for p in written.values()) == ["GSPS.dcm", "SC.dcm", "SR.dcm"]
    for path in written.values():
        check_valid(path)

    sr, gsps, sc = (pydicom.dcmread(written[k]) for k in RESULT_KINDS)
    # Same study, three new series, none of them the source's.
    series = {str(ds.SeriesInstanceUID) for ds in (sr, gsps, sc)}
    assert len(series) == 3 and str(src.SeriesInstanceUID) not in series
    for ds in (sr, gsps, sc):
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.PatientID == src.PatientID and ds.PatientName == src.PatientName
        assert ds.StudyDate == src.StudyDate
    assert (sr.Modality, gsps.Modality, sc.Modality) == ("SR", "PR", "OT")
    assert gsps.SOPClassUID == GRAYSCALE_SOFTCOPY_PS and sc.SOPClassUID == SECONDARY_CAPTURE

    summary = read_sr_summary(sr)
    assert summary["probability"] == pytest.approx(prediction.opacity_probability, abs=1e-9)
    assert summary["threshold"] == pytest.approx(0.5)
    assert summary["finding"] == "present"
    assert summary["source_sop_instance_uid"] == str(src.SOPInstanceUID)
    assert summary["region_sources"] == [str(src.SOPInstanceUID)] * 2
    assert (summary["algorithm_name"], summary["algorithm_version"]) == (ALGORITHM.name, ALGORITHM.version)
    expected = [(b.x1, b.y1, b.x2, b.y2, b.score) for b in prediction.boxes]
    assert np.allclose(summary["boxes"], expected, atol=1e-3)
    # Every reading says whether it passed the applicability gate, and the classifier's own probability.
    assert summary["image_probability"] == pytest.approx(prediction.image_probability)
    assert summary["applicable"] is True and summary["uncertain"] is False
    # The SR's evidence names the source.
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID

    # GSPS: the source referenced, one closed rectangle per box in its pixel coordinates.
    ref = gsps.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    objects = gsps.GraphicAnnotationSequence[0].GraphicObjectSequence
    assert len(objects) == len(prediction.boxes)
    for graphic, box in zip(objects, prediction.boxes):
        assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
        points = np.asarray(graphic.GraphicData, dtype=np.float64).reshape(-1, 2)
        assert np.allclose(points, [[box.x1, box.y1], [box.x2, box.y1], [box.x2, box.y2], [box.x1, box.y2],
                                    [box.x1, box.y1]], atol=1e-3)

    # SC: the image with the boxes burned in (the predicted-box colour on a box edge).
    assert sc.BurnedInAnnotation == "YES" and sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    pixels = sc.pixel_array
    assert pixels.shape == (int(src.Rows), int(src.Columns), 3)
    box = prediction.boxes[0]
    edge = pixels[int(round((box.y1 + box.y2) / 2)), int(round(box.x1)) + 1]
    from lungopacity.reports.overlays import PRED_COLOR

    assert tuple(int(v) for v in edge) == PRED_COLOR


def test_only_patient_and_study_attributes_are_copied(tmp_path: Path) -> None:
    source = private_source(tmp_path)
    results = build_dicom_results(source.read_bytes(), prediction_for(source), ALGORITHM)
    written = write_dicom_results(results, tmp_path / "out")
    for kind, path in written.items():
        check_valid(path)
        ds = pydicom.dcmread(path)
        assert not [e for e in ds if e.tag.is_private], f"{kind}: private tags copied"
        assert "ProtocolName" not in ds and "OperatorsName" not in ds, f"{kind}: unrelated attributes copied"
        assert ds.AccessionNumber == "ACC123" and str(ds.PatientName) == "Doe^Jane"
        # RSNA's bare-number age '7' is written as a valid Age String.
        assert ds.PatientAge == "007Y"


def test_uids_are_fixed_by_source_and_bundle(tmp_path: Path) -> None:
    (source,) = rsna_or_synthetic(tmp_path)
    data, prediction = source.read_bytes(), prediction_for(source)
    first = build_dicom_results(data, prediction, ALGORITHM)
    again = build_dicom_results(data, prediction, ALGORITHM)
    other = build_dicom_results(data, prediction, AlgorithmInfo(**{**ALGORITHM.__dict__, "key": "1" * 64}))
    for kind in RESULT_KINDS:
        a, b, c = (getattr(r, kind) for r in (first, again, other))
        assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
        assert a.SOPInstanceUID != c.SOPInstanceUID
    assert len({str(getattr(first, k).SOPInstanceUID) for k in RESULT_KINDS}) == 3


def test_negative_reading_without_boxes(tmp_path: Path) -> None:
    (source,) = rsna_or_synthetic(tmp_path)
    results = build_dicom_results(source.read_bytes(), prediction_for(source, decision=False, boxes=[],
                                                                      probability=0.12), ALGORITHM)
    for path in write_dicom_results(results, tmp_path / "out").values():
        check_valid(path)
    summary = read_sr_summary(results.sr)
    assert summary["finding"] == "absent" and summary["boxes"] == []
    assert summary["probability"] == pytest.approx(0.12)
    assert "GraphicObjectSequence" not in results.gsps.GraphicAnnotationSequence[0]


def test_applicability_and_uncertainty_are_reported_when_present(tmp_path: Path) -> None:
    (source,) = rsna_or_synthetic(tmp_path)
    gated = prediction_for(source, decision=None, boxes=[])
    gated.image_probability, gated.applicable = 0.64, False
    gated.not_applicable_reasons = ["view LL is not AP or PA"]
    gated.member_std, gated.uncertain = 0.083, True
    gated.model_warnings = ["trained on synthetic data"]
    results = build_dicom_results(source.read_bytes(), gated, ALGORITHM)
    for path in write_dicom_results(results, tmp_path / "out").values():
        check_valid(path)
    summary = read_sr_summary(results.sr)
    assert summary["finding"] == "indeterminate"
    assert summary["image_probability"] == pytest.approx(0.64)
    assert summary["uncertainty"] == pytest.approx(0.083)
    assert summary["applicable"] is False and summary["uncertain"] is True
    assert summary["texts"] == ["view LL is not AP or PA", "trained on synthetic data"]
    assert "no decision" in results.gsps.ContentDescription
    # The codes the SR uses for them are the documented ones.
    names = {item.ConceptNameCodeSequence[0].CodeValue for item in results.sr.ContentSequence[-1]
             .ContentSequence[0].ContentSequence}
    assert {CODES["applicable"][0], CODES["uncertainty"][0], CODES["image_probability"][0]} <= names


def test_non_dicom_inputs_get_no_results(tmp_path: Path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(buffer, format="PNG")
    png = buffer.getvalue()
    assert not is_dicom(png)
    with pytest.raises(ImageReadError, match="not a DICOM file"):
        build_dicom_results(png, prediction_for(private_source(tmp_path)), ALGORITHM, name="chest.png")
    with pytest.raises(ImageReadError, match="chest.png: not a DICOM file"):
        dicom_results_for_upload(None, png, "chest.png")  # type: ignore[arg-type]  # refused before any reading


def test_multipart_related_round_trip(tmp_path: Path) -> None:
    from email.parser import BytesParser
    from email.policy import HTTP

    (source,) = rsna_or_synthetic(tmp_path)
    results = build_dicom_results(source.read_bytes(), prediction_for(source), ALGORITHM)
    parts = list(results.encoded().values())
    body, content_type = multipart_related(parts)
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    payloads = [p.get_payload(decode=True) for p in message.iter_parts()]
    assert [p.get_content_type() for p in message.iter_parts()] == ["application/dicom"] * 3
    assert payloads == parts
    assert pydicom.dcmread(io.BytesIO(payloads[0])).SOPInstanceUID == results.sr.SOPInstanceUID


def test_predict_writes_dicom_results_for_dicom_inputs_only(tiny_demo: Any, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lungopacity.cli import app
    from PIL import Image

    sources = rsna_or_synthetic(tmp_path, n=2)
    png = tmp_path / "photo.png"
    Image.fromarray(np.full((128, 128), 100, dtype=np.uint8)).save(png)
    out, dicom_out = tmp_path / "pred", tmp_path / "dicom"
    run = CliRunner().invoke(app, ["predict", *map(str, sources), str(png), "--bundle", str(tiny_demo.paths["model"]),
                                   "--out", str(out), "--dicom-out", str(dicom_out), "--no-images"])
    assert run.exit_code == 0, run.output
    assert "DICOM results (SR, GSPS, SC) for 2 images" in run.output and "1 not DICOM" in run.output
    import json

    predictions = {p["id"]: p for p in json.loads((out / "predictions.json").read_text())}
    assert set(predictions) == {s.stem for s in sources} | {"photo"}
    assert sorted(p.name for p in dicom_out.iterdir()) == sorted(s.stem for s in sources)
    for source in sources:
        folder = dicom_out / source.stem
        summary = read_sr_summary(pydicom.dcmread(folder / "SR.dcm"))
        assert summary["probability"] == pytest.approx(predictions[source.stem]["opacity_probability"], abs=1e-9)
        assert summary["source_sop_instance_uid"] == str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert len(summary["boxes"]) == len(predictions[source.stem]["boxes"])
    # A rerun into the same folders continues; another --dicom-out is another run.
    again = CliRunner().invoke(app, ["predict", *map(str, sources), "--bundle", str(tiny_demo.paths["model"]),
                                     "--out", str(out), "--dicom-out", str(tmp_path / "elsewhere"), "--no-images"])
    assert again.exit_code == 1 and "different dicom_out" in again.output


def test_results_for_an_upload(tiny_demo: Any, tmp_path: Path) -> None:
    from lungopacity.inference.predictor import Predictor

    (source,) = rsna_or_synthetic(tmp_path)
    predictor = Predictor.from_bundle(tiny_demo.paths["model"])
    reading, results = dicom_results_for_upload(predictor, source.read_bytes(), source.name)
    summary = read_sr_summary(results.sr)
    assert summary["probability"] == pytest.approx(reading.prediction.opacity_probability, abs=1e-9)
    assert summary["algorithm_version"].startswith(predictor.manifest.lungopacity_version)
    assert summary["algorithm_name"].startswith("lungopacity ")
    # What the service sends: a multipart/related body of the three Part 10 files.
    body, _ = multipart_related(results.encoded().values())
    assert body.count(b"Content-Type: application/dicom") == 3
    assert encode_dataset(results.sr)[128:132] == b"DICM"


def _split_multipart_related(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a multipart/related body, parsed independently of multipart_related()."""
    import email.parser
    import email.policy

    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    assert message.is_multipart()
    return [part.get_payload(decode=True) for part in message.iter_parts()]


def test_service_answers_dicom_results_for_a_dicom_upload(tiny_demo: Any, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lungopacity.inference.predictor import Predictor
    from lungopacity.service import create_app

    (source,) = rsna_or_synthetic(tmp_path)
    predictor = Predictor.from_bundle(tiny_demo.paths["model"])
    data = source.read_bytes()
    with TestClient(create_app(predictor), base_url="http://localhost") as client:
        answer = client.post("/v1/predict?format=dicom", files={"file": ("x.dcm", data, "application/dicom")})
        as_json = client.post("/v1/predict?images=false", files={"file": ("x.dcm", data, "application/dicom")}).json()
        # A PNG cannot become DICOM results: refused before any reading, with the reason.
        png = io.BytesIO()
        from PIL import Image

        Image.fromarray(np.full((64, 64), 80, dtype=np.uint8)).save(png, format="PNG")
        refused = client.post("/v1/predict?format=dicom", files={"file": ("x.png", png.getvalue(), "image/png")})
        bad_choice = client.post("/v1/predict?format=xml", files={"file": ("x.dcm", data, "application/dicom")})
        schema = client.get("/openapi.json").json()
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    parts = _split_multipart_related(answer.content, answer.headers["content-type"])
    datasets = [pydicom.dcmread(io.BytesIO(part)) for part in parts]
    assert sorted(ds.Modality for ds in datasets) == ["OT", "PR", "SR"]  # SC, GSPS, SR
    source_ds = pydicom.dcmread(source, stop_before_pixels=True)
    assert {str(ds.StudyInstanceUID) for ds in datasets} == {str(source_ds.StudyInstanceUID)}
    assert all(str(ds.SeriesInstanceUID) != str(source_ds.SeriesInstanceUID) for ds in datasets)
    (sr,) = [ds for ds in datasets if ds.Modality == "SR"]
    summary = read_sr_summary(sr)
    # The DICOM answer and the JSON answer are one reading: the same numbers.
    assert summary["probability"] == pytest.approx(as_json["opacity_probability"], abs=1e-9)
    assert float(answer.headers["x-lungopacity-probability"]) == pytest.approx(as_json["opacity_probability"], abs=1e-6)
    expected = "none" if as_json["decision"] is None else str(as_json["decision"]).lower()
    assert answer.headers["x-lungopacity-decision"] == expected
    assert len(summary["boxes"]) == len(as_json["boxes"])
    assert refused.status_code == 415 and refused.json()["error"]["code"] == "not_dicom"
    assert bad_choice.status_code == 400 and "dicom" in bad_choice.text  # the choices are named
    assert 'multipart/related; type="application/dicom"' in schema["paths"]["/v1/predict"]["post"]["responses"]["200"]["content"]


def test_dicom_runtime_loads_no_training_code_and_no_matplotlib(tmp_path: Path) -> None:
    import os
    import sys

    (source,) = rsna_or_synthetic(tmp_path)
    code = (
        "import sys, json\n"
        "import lungopacity.node\n"
        "from lungopacity.inference.dicom_output import build_dicom_results\n"
        "from test_dicom_output import ALGORITHM, prediction_for\n"
        "from pathlib import Path\n"
        f"p = Path({str(source)!r})\n"
        "build_dicom_results(p.read_bytes(), prediction_for(p), ALGORITHM)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'lungopacity.engine')))))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), str(Path(__file__).parent)])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
