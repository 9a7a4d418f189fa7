"""The DICOM node in-process: C-STORE in, results out, the spool across restarts, refusals, logs.

The destination is a pynetdicom storage SCP run by the test (it records what it is
sent); the sender is dcmtk's ``storescu``/``echoscu`` where the plain network path is
the point, and pynetdicom's SCU where the test needs the status codes. The Orthanc
round trip is in test_orthanc.py.
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

pytest.importorskip("pynetdicom", reason="pynetdicom is not installed (pip install 'lungopacity[dicom]')")
pytest.importorskip("highdicom", reason="highdicom is not installed (pip install 'lungopacity[dicom]')")

from pacs import free_port, wait_until  # noqa: E402
from test_dicom_output import rsna_or_synthetic  # noqa: E402

from lungopacity.errors import ConfigError  # noqa: E402
from lungopacity.inference.dicom_output import (  # noqa: E402
    RESULT_FILES, RESULT_SOP_CLASSES, read_sr_summary,
)
from lungopacity.node import DicomNode, NodeConfig, parse_destination  # noqa: E402
from lungopacity.node.network import EXPLICIT_LE, IMPLICIT_LE, STATUS_OUT_OF_RESOURCES, Destination  # noqa: E402
from lungopacity.node.spool import Spool, instance_key  # noqa: E402

NODE_AET = "LUNGOPTEST"


class Destination_SCP:
    """A storage SCP for the results: keeps every dataset it is sent."""

    def __init__(self, port: int = 0) -> None:
        from pynetdicom import AE, evt

        self.received: list[pydicom.Dataset] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="DEST")
        for sop_class in RESULT_SOP_CLASSES.values():
            ae.add_supported_context(sop_class, [EXPLICIT_LE, IMPLICIT_LE])
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])
        self.destination = Destination("127.0.0.1", self.port, "DEST")

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return 0x0000

    def by_source(self) -> dict[str, list[str]]:
        """source SOP Instance UID -> the SOP classes of the results received for it."""
        out: dict[str, list[str]] = {}
        with self.lock:
            for ds in self.received:
                if "SourceImageSequence" in ds:
                    source = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
                elif "ReferencedSeriesSequence" in ds:
                    source = ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
                else:  # the SR's evidence
                    source = (ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                              .ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                out.setdefault(str(source), []).append(str(ds.SOPClassUID))
        return out

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def predictor(tiny_demo: Any) -> Any:
    from lungopacity.inference.predictor import Predictor

    return Predictor.from_bundle(tiny_demo.paths["model"])


@pytest.fixture
def destination() -> Any:
    scp = Destination_SCP()
    yield scp
    scp.stop()


def make_node(predictor: Any, spool: Path, destination: Destination, **options: Any) -> DicomNode:
    options.setdefault("retry_seconds", 0.2)
    options.setdefault("network_timeout", 10.0)
    return DicomNode(predictor, NodeConfig(ae_title=NODE_AET, port=0, destination=destination, spool=spool,
                                           **options))


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} (Debian package dcmtk) is not installed; .ci/run installs it")
    return path


def storescu(port: int, files: list[Path], calling: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    # -xy proposes JPEG Baseline besides the uncompressed syntaxes, so RSNA's JPEG files go as they are.
    return subprocess.run([need("storescu"), "-xy", "-aet", calling, "-aec", NODE_AET, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_storescu_to_node_to_destination(predictor: Any, destination: Destination_SCP, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    sources = rsna_or_synthetic(tmp_path, n=3)
    caplog.set_level(logging.INFO)
    with make_node(predictor, tmp_path / "spool", destination.destination) as node:
        echo = subprocess.run([need("echoscu"), "-aec", NODE_AET, "127.0.0.1", str(node.port)],
                              capture_output=True, text=True, timeout=60)
        assert echo.returncode == 0, echo.stderr
        run = storescu(node.port, sources)
        assert run.returncode == 0, run.stderr
        expected = {sop_uid(s) for s in sources}
        wait_until(lambda: set(destination.by_source()) == expected and all(
            len(v) == 3 for v in destination.by_source().values()), 90, "3 results per source at the destination")
        wait_until(lambda: node.counts()["sent"] == 3, 10, "the spool to record 3 instances sent")
        counts = node.counts()
    assert counts == {"received": 0, "processed": 0, "sent": 3, "failed": 0, "pending": 0}
    for classes in destination.by_source().values():
        assert sorted(classes) == sorted(RESULT_SOP_CLASSES.values())
    # What the node read is what the predictor reads in-process.
    for source in sources:
        (expected_p,) = predictor.predict_images([predictor.load(source.read_bytes(), name="x")])
        (sr,) = [ds for ds in destination.received if ds.Modality == "SR"
                 and read_sr_summary(ds)["source_sop_instance_uid"] == sop_uid(source)]
        assert read_sr_summary(sr)["probability"] == pytest.approx(expected_p.opacity_probability, abs=1e-5)
    # The spool keeps only records without images; the log names no patient and no UID.
    spool = tmp_path / "spool"
    assert not list((spool / "received").iterdir()) and not list((spool / "processed").iterdir())
    records = [json.loads(p.read_text()) for p in (spool / "sent").glob("*.json")]
    assert all(r["sent_at"] >= r["processed_at"] >= r["received_at"] for r in records)
    text = "\n".join(r.getMessage() for r in caplog.records)
    for source in sources:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        for value in (ds.PatientID, str(ds.PatientName), ds.SOPInstanceUID, ds.StudyInstanceUID):
            assert str(value) not in text
    assert f"instance {instance_key(sop_uid(sources[0]))[:12]}: received" in text


def test_refuses_other_sop_classes_and_other_callers(predictor: Any, destination: Destination_SCP,
                                                     tmp_path: Path) -> None:
    (source,) = rsna_or_synthetic(tmp_path)
    ct = pydicom.dcmread(source)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ct_path = tmp_path / "ct.dcm"
    ct.save_as(ct_path)
    with make_node(predictor, tmp_path / "spool", destination.destination, allowed_ae=("PACS",)) as node:
        refused_caller = storescu(node.port, [source], calling="INTRUDER")
        assert refused_caller.returncode != 0 and "Association Rejected" in refused_caller.stderr
        refused_class = storescu(node.port, [ct_path], calling="PACS")
        assert refused_class.returncode != 0
        assert "no presentation context" in refused_class.stderr.lower() or "no acceptable" in refused_class.stderr.lower()
        accepted = storescu(node.port, [source], calling="PACS")
        assert accepted.returncode == 0, accepted.stderr
        wait_until(lambda: node.counts()["sent"] == 1, 60, "the allowed caller's instance to be sent")
        assert node.counts()["received"] + node.counts()["failed"] == 0


class BlockedPredictor:
    """The tiny bundle's predictor, held at predict_images until released."""

    def __init__(self, predictor: Any) -> None:
        self._predictor, self.release, self.entered = predictor, threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def predict_images(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.release.wait(60)
        return self._predictor.predict_images(*args, **kwargs)


def c_store(port: int, path: Path) -> int:
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_full_queue_is_refused_as_out_of_resources(predictor: Any, destination: Destination_SCP,
                                                   tmp_path: Path) -> None:
    sources = rsna_or_synthetic(tmp_path, n=3)
    blocked = BlockedPredictor(predictor)
    with make_node(blocked, tmp_path / "spool", destination.destination, queue_size=1) as node:
        assert c_store(node.port, sources[0]) == 0x0000
        assert blocked.entered.wait(60)  # the worker holds it: the queue's one place is taken
        assert c_store(node.port, sources[1]) == STATUS_OUT_OF_RESOURCES
        assert c_store(node.port, sources[0]) == 0x0000  # the same instance again: held once, not refused
        assert node.counts()["received"] == 1
        blocked.release.set()
        wait_until(lambda: node.counts()["sent"] == 1, 60, "the accepted instance to be sent")
        assert c_store(node.port, sources[2]) == 0x0000  # room again
        wait_until(lambda: node.counts()["sent"] == 2, 60, "the next instance to be sent")
    assert set(destination.by_source()) == {sop_uid(sources[0]), sop_uid(sources[2])}
    assert all(len(v) == 3 for v in destination.by_source().values())


def test_restart_reads_and_sends_what_the_spool_holds(predictor: Any, destination: Destination_SCP,
                                                      tmp_path: Path) -> None:
    """A spool as a killed node leaves it: each state is finished once, half-written ones cleared."""
    sources = rsna_or_synthetic(tmp_path, n=3)
    spool_dir = tmp_path / "spool"
    # Make instance 0 processed with its SR already delivered, using a node whose destination is down.
    dead = Destination("127.0.0.1", free_port(), "DEAD")
    with make_node(predictor, spool_dir, dead, retry_seconds=60) as node:
        assert c_store(node.port, sources[0]) == 0x0000
        wait_until(lambda: node.counts()["processed"] == 1, 60, "instance 0 to be read")
    spool = Spool(spool_dir)
    key0 = instance_key(sop_uid(sources[0]))
    spool.mark_delivered(key0, "sr", "sent")
    # Instance 1 received and not read; a half-written receipt and half-written results.
    spool.receive(instance_key(sop_uid(sources[1])), sources[1].read_bytes())
    (spool_dir / "incoming" / "deadbeef.123.tmp").write_bytes(b"half")
    (spool_dir / "work" / "cafe").mkdir()
    (spool_dir / "work" / "cafe" / "SR.dcm").write_bytes(b"half")

    with make_node(predictor, spool_dir, destination.destination) as node:
        wait_until(lambda: node.counts()["sent"] == 2, 60, "both spooled instances to be sent")
    got = destination.by_source()
    assert sorted(got[sop_uid(sources[0])]) == sorted([RESULT_SOP_CLASSES["gsps"], RESULT_SOP_CLASSES["sc"]]), \
        "the SR of instance 0 was delivered before the restart and must not be sent again"
    assert sorted(got[sop_uid(sources[1])]) == sorted(RESULT_SOP_CLASSES.values())
    assert not list((spool_dir / "incoming").glob("*.tmp")) and not list((spool_dir / "work").iterdir())
    record = json.loads((spool_dir / "sent" / f"{key0}.json").read_text())
    assert record["objects"] == ["sr", "gsps", "sc"]


def test_unreachable_destination_is_retried(predictor: Any, tmp_path: Path) -> None:
    port = free_port()
    (source,) = rsna_or_synthetic(tmp_path)
    with make_node(predictor, tmp_path / "spool", Destination("127.0.0.1", port, "DEST"), retry_seconds=0.3) as node:
        assert c_store(node.port, source) == 0x0000
        wait_until(lambda: node.counts()["processed"] == 1, 60, "the instance to be read")
        time.sleep(1.0)  # a few failed attempts
        assert node.counts()["processed"] == 1 and node.counts()["sent"] == 0
        late = Destination_SCP(port)
        try:
            wait_until(lambda: node.counts()["sent"] == 1, 60, "the results once the destination is up")
        finally:
            late.stop()
    assert len(late.received) == 3
    record = json.loads(next((tmp_path / "spool" / "sent").glob("*.json")).read_text())
    assert record["attempts"] >= 2


def test_unreadable_instance_is_kept_aside_without_identifiers(predictor: Any, destination: Destination_SCP,
                                                               tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lungopacity.synthetic.rsna_writer import write_dicom

    path = write_dicom(tmp_path / "bad.dcm", np.zeros((64, 64), dtype=np.uint8), sex="F", age=40, view="PA",
                       patient_id="SECRET-PATIENT-42", pixel_spacing=0.2, transfer_syntax="explicit-little")
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]  # pixel data cut short
    ds.save_as(path)
    caplog.set_level(logging.INFO)
    with make_node(predictor, tmp_path / "spool", destination.destination) as node:
        assert c_store(node.port, path) == 0x0000
        wait_until(lambda: node.counts()["failed"] == 1, 60, "the bad instance to be set aside")
    key = instance_key(str(ds.SOPInstanceUID))
    assert (tmp_path / "spool" / "failed" / f"{key}.dcm").exists()
    reason = (tmp_path / "spool" / "failed" / f"{key}.txt").read_text()
    text = "\n".join(r.getMessage() for r in caplog.records) + reason
    assert f"instance {key[:12]}: not read" in text
    assert "SECRET-PATIENT-42" not in text and str(ds.SOPInstanceUID) not in text
    assert destination.received == []


class StowServer(http.server.BaseHTTPRequestHandler):
    bodies: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers["Content-Length"])
        StowServer.bodies.append((self.path + " " + self.headers["Content-Type"], self.rfile.read(length)))
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def test_stow_rs_posts_the_results(predictor: Any, destination: Destination_SCP, tmp_path: Path) -> None:
    from email.parser import BytesParser
    from email.policy import HTTP

    StowServer.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StowServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (source,) = rsna_or_synthetic(tmp_path)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        with make_node(predictor, tmp_path / "spool", destination.destination, stow_url=url) as node:
            assert c_store(node.port, source) == 0x0000
            wait_until(lambda: node.counts()["sent"] == 1, 60, "the results to be sent and stowed")
    finally:
        server.shutdown()
    ((head, body),) = StowServer.bodies
    assert head.startswith('/dicom-web/studies multipart/related; type="application/dicom"; boundary=')
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {head.split(' ', 1)[1]}\r\n\r\n".encode() + body)
    stowed = [pydicom.dcmread(io.BytesIO(p.get_payload(decode=True))) for p in message.iter_parts()]
    assert sorted(str(ds.SOPClassUID) for ds in stowed) == sorted(RESULT_SOP_CLASSES.values())
    assert {str(ds.SOPInstanceUID) for ds in stowed} == {str(ds.SOPInstanceUID) for ds in destination.received}


def test_options_are_checked(tmp_path: Path) -> None:
    assert parse_destination("pacs.local:104:PACS") == Destination("pacs.local", 104, "PACS")
    assert parse_destination("[::1]:4242:ORTHANC") == Destination("::1", 4242, "ORTHANC")
    for bad, message in (("pacs:104", "HOST:PORT:AET"), ("pacs:x:PACS", "not a number"),
                         ("pacs:70000:PACS", "outside"), ("pacs:104:WAY_TOO_LONG_AE_TITLE", "not an AE title")):
        with pytest.raises(ConfigError, match=message):
            parse_destination(bad)
    dest = Destination("127.0.0.1", 104, "PACS")
    with pytest.raises(ConfigError, match="--workers"):
        NodeConfig(ae_title="A", port=0, destination=dest, spool=tmp_path, workers=0)
    with pytest.raises(ConfigError, match="--stow"):
        NodeConfig(ae_title="A", port=0, destination=dest, spool=tmp_path, stow_url="ftp://x")
    with pytest.raises(ConfigError, match="--ae-title"):
        NodeConfig(ae_title="back\\slash", port=0, destination=dest, spool=tmp_path)
    assert set(RESULT_FILES) == {"sr", "gsps", "sc"}
