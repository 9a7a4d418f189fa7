"""A real PACS: Orthanc sends radiographs to the node and receives the results back.

Orthanc (Debian's ``orthanc``) runs on free loopback ports with a configuration made
here (tests/pacs.py); the node runs as ``lungopacity listen`` in a subprocess, so the
restart test can SIGKILL it. Everything is checked through Orthanc's REST API. The
tests skip, with the reason, when Orthanc or dcmtk is not installed (.ci/run installs
them).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

pytest.importorskip("pynetdicom", reason="pynetdicom is not installed (pip install 'lungopacity[dicom]')")
pytest.importorskip("highdicom", reason="highdicom is not installed (pip install 'lungopacity[dicom]')")

from pacs import NODE_AET, ORTHANC_AET, NodeProcess, Orthanc, free_port, orthanc_binary, result_instances, wait_until  # noqa: E402,I001
from test_dicom_output import rsna_or_synthetic  # noqa: E402

from lungopacity.inference.dicom_output import read_sr_summary  # noqa: E402
from lungopacity.node.spool import instance_key  # noqa: E402

if orthanc_binary() is None:
    pytest.skip("Orthanc is not installed (Debian package orthanc; .ci/run installs it)", allow_module_level=True)

RESULT_MODALITIES = ("SR", "PR", "OT")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eleven source DICOMs of different studies: the shared real ones, else synthetic."""
    return rsna_or_synthetic(tmp_path_factory.mktemp("sources"), n=11)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with Orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True) as server:
        yield server


@pytest.fixture(scope="module")
def node(tiny_demo: Any, orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("node")
    with NodeProcess(tiny_demo.paths["model"], folder / "spool", f"127.0.0.1:{orthanc.dicom_port}:{ORTHANC_AET}",
                     log=folder / "node.log") as process:
        orthanc.add_modality("lungopacity", NODE_AET, "127.0.0.1", process.port)
        yield process


@pytest.fixture(scope="module")
def predictor(tiny_demo: Any) -> Any:
    from lungopacity.inference.predictor import Predictor

    return Predictor.from_bundle(tiny_demo.paths["model"])


def results_arrived(orthanc: Orthanc, study_id: str) -> dict[str, list[dict[str, Any]]] | None:
    found = result_instances(orthanc, study_id)
    return found if all(m in found for m in RESULT_MODALITIES) else None


def study_of(orthanc: Orthanc, study_uid: str) -> str | None:
    hits = [h for h in orthanc.lookup(study_uid) if h.get("Type") == "Study"]
    return hits[0]["ID"] if hits else None


def expected_probability(predictor: Any, path: Path) -> float:
    (prediction,) = predictor.predict_images([predictor.load(path.read_bytes(), name=path.name)])
    return prediction.opacity_probability


def check_results(orthanc: Orthanc, study_id: str, source: Path, probability: float) -> None:
    """One SR, one GSPS and one SC in the source's study, saying what the predictor says."""
    src = pydicom.dcmread(source, stop_before_pixels=True)
    found = result_instances(orthanc, study_id)
    counts = {m: len(found.get(m, [])) for m in RESULT_MODALITIES}
    assert counts == {"SR": 1, "PR": 1, "OT": 1}, f"results in the study of {source.name}: {counts}"
    sr = pydicom.dcmread(io.BytesIO(orthanc.instance_file(found["SR"][0]["ID"])))
    summary = read_sr_summary(sr)
    assert summary["probability"] == pytest.approx(probability, abs=1e-5)
    assert summary["source_sop_instance_uid"] == str(src.SOPInstanceUID)
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    gsps = pydicom.dcmread(io.BytesIO(orthanc.instance_file(found["PR"][0]["ID"])))
    assert gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    sc = orthanc.instance_tags(found["OT"][0]["ID"])
    assert sc["BurnedInAnnotation"] == "YES" and sc["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.7"
    series = {found[m][0]["series"] for m in RESULT_MODALITIES}
    assert len(series) == 3, "each result kind is a series of its own"


def test_orthanc_sends_to_the_node_and_gets_the_results(orthanc: Orthanc, node: NodeProcess, sources: list[Path],
                                                        predictor: Any) -> None:
    orthanc.post("/modalities/lungopacity/echo", {})  # C-ECHO from the PACS: an HTTP error if it fails
    uploaded = [orthanc.upload(path.read_bytes()) for path in sources[:2]]
    answer = orthanc.store_to("lungopacity", [u["ID"] for u in uploaded])
    assert answer["FailedInstancesCount"] == 0 and answer["InstancesCount"] == 2
    for path, up in zip(sources[:2], uploaded):
        wait_until(lambda up=up: results_arrived(orthanc, up["ParentStudy"]), 90,
                   f"SR, GSPS and SC of {path.name} in Orthanc (node log: {node.log})")
        check_results(orthanc, up["ParentStudy"], path, expected_probability(predictor, path))


def test_storescu_and_echoscu_against_the_node(orthanc: Orthanc, node: NodeProcess, sources: list[Path],
                                               predictor: Any) -> None:
    for binary in ("storescu", "echoscu"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} (Debian package dcmtk) is not installed; .ci/run installs it")
    echo = subprocess.run(["echoscu", "-aec", NODE_AET, "127.0.0.1", str(node.port)], capture_output=True,
                          text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    source = sources[2]
    store = subprocess.run(["storescu", "-xy", "-aec", NODE_AET, "127.0.0.1", str(node.port), str(source)],
                           capture_output=True, text=True, timeout=60)
    assert store.returncode == 0, store.stderr
    study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    study_id = wait_until(lambda: study_of(orthanc, study_uid) and results_arrived(orthanc, study_of(orthanc, study_uid))
                          and study_of(orthanc, study_uid), 90, f"the results of {source.name} in Orthanc")
    check_results(orthanc, study_id, source, expected_probability(predictor, source))


def test_results_by_stow_rs_into_orthanc_dicomweb(tiny_demo: Any, orthanc: Orthanc, sources: list[Path],
                                                  tmp_path: Path) -> None:
    if not orthanc.dicomweb:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
    dead = f"127.0.0.1:{free_port()}:NOBODY"  # C-STORE cannot succeed: whatever arrives came by STOW-RS
    with NodeProcess(tiny_demo.paths["model"], tmp_path / "spool", dead, ae_title="LUNGOPSTOW",
                     extra=["--stow", f"{orthanc.url}/dicom-web"]) as process:
        orthanc.add_modality("lungopacity-stow", "LUNGOPSTOW", "127.0.0.1", process.port)
        up = orthanc.upload(sources[3].read_bytes())
        orthanc.store_to("lungopacity-stow", [up["ID"]])
        found = wait_until(lambda: results_arrived(orthanc, up["ParentStudy"]), 90,
                           f"results by STOW-RS in Orthanc (node log: {process.log})")
    assert {m: len(found[m]) for m in RESULT_MODALITIES} == {"SR": 1, "PR": 1, "OT": 1}
    log = process.log.read_text()
    assert "NOBODY@127.0.0.1" in log and "retry in" in log  # the C-STORE channel failed and waits


def test_killed_node_sends_each_result_exactly_once_after_restart(tiny_demo: Any, orthanc: Orthanc,
                                                                  sources: list[Path], tmp_path: Path) -> None:
    batch = sources[4:11]
    spool = tmp_path / "spool"
    send_to = f"127.0.0.1:{orthanc.dicom_port}:{ORTHANC_AET}"
    first = NodeProcess(tiny_demo.paths["model"], spool, send_to, ae_title="LUNGOPKILL", workers=1,
                        log=tmp_path / "first.log").start()
    try:
        orthanc.add_modality("lungopacity-kill", "LUNGOPKILL", "127.0.0.1", first.port)
        uploaded = [orthanc.upload(p.read_bytes()) for p in batch]
        answer = orthanc.store_to("lungopacity-kill", [u["ID"] for u in uploaded])
        assert answer["FailedInstancesCount"] == 0  # every C-STORE answered success: each is in the spool
    finally:
        first.kill()
    keys = {instance_key(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in batch}
    on_disk = {state: {p.name.split(".")[0] for p in (spool / state).iterdir()}
               for state in ("received", "processed", "sent")}
    assert keys <= on_disk["received"] | on_disk["processed"] | on_disk["sent"], "an accepted instance was lost"
    unsent = keys - on_disk["sent"]
    assert unsent, "every result was sent before the kill, so the restart was not tested; send more instances"

    with NodeProcess(tiny_demo.paths["model"], spool, send_to, ae_title="LUNGOPKILL", workers=1,
                     log=tmp_path / "second.log") as second:
        wait_until(lambda: {p.stem for p in (spool / "sent").glob("*.json")} >= keys, 120,
                   f"the restarted node to send the {len(unsent)} unsent result set(s) (log: {second.log})")
        time.sleep(1.0)  # anything sent twice would now be in Orthanc
        assert second.terminate() == 0  # SIGTERM: a graceful stop
    for path, up in zip(batch, uploaded):
        found = result_instances(orthanc, up["ParentStudy"])
        counts = {m: len(found.get(m, [])) for m in RESULT_MODALITIES}
        assert counts == {"SR": 1, "PR": 1, "OT": 1}, f"{path.name}: {counts}"
    records = [json.loads((spool / "sent" / f"{k}.json").read_text()) for k in keys]
    assert all(r["objects"] == ["sr", "gsps", "sc"] for r in records)
    assert not list((spool / "received").iterdir()) and not list((spool / "processed").iterdir())
    assert "stopped" in (tmp_path / "second.log").read_text()
