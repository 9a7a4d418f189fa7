"""A real PACS (Orthanc) and the node as processes, for the tests and the PACS benchmark.

:class:`Orthanc` starts Debian's ``Orthanc`` binary on free loopback ports with a
generated JSON configuration in a temporary folder (its database and log live there
too) and stops it. :class:`NodeProcess` runs ``lungopacity listen`` as a subprocess (so
a test can SIGKILL it) on a free port and reads the port back from its start line.

Everything here talks to Orthanc through its REST API with the standard library only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ORTHANC_AET = "ORTHANC"
NODE_AET = "LUNGOPACITY"
NODE_MODALITY = "lungopacity"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_binary() -> str | None:
    """Debian installs Orthanc as /usr/sbin/Orthanc (not on a normal user's PATH)."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns a true value; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - a server still starting
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else ""))


class Orthanc:
    """An Orthanc server of its own in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, *, dicomweb: bool = False) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError("Orthanc is not installed (Debian: apt-get install orthanc)")
        self.binary, self.folder = binary, Path(folder)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.dicomweb = dicomweb and DICOMWEB_PLUGIN.exists()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        storage = self.folder / "db"
        return {
            "Name": "lungopacity-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomScuTimeout": 30,
            "DicomModalities": {},
            "OverwriteInstances": False,
            "StorageCompression": False,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "StableAge": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
        }

    def start(self, timeout: float = 30.0) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen([self.binary, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.folder, start_new_session=True)
        wait_until(lambda: self._alive() and self.get("/system"), timeout, f"Orthanc on port {self.http_port} "
                   f"(log: {self.folder / 'orthanc.log'})")
        return self

    def _alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.process.returncode}: {self.log_tail()}")
        return True

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.folder / "orthanc.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ REST

    def request(self, method: str, path: str, body: bytes | dict | list | str | None = None,
                content_type: str | None = None, timeout: float = 60.0) -> bytes:
        data: bytes | None
        if isinstance(body, (dict, list)):
            data, content_type = json.dumps(body).encode(), content_type or "application/json"
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback test server
            return response.read()

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: Any, content_type: str | None = None, timeout: float = 60.0) -> Any:
        raw = self.request("POST", path, body, content_type, timeout=timeout)
        return json.loads(raw) if raw.strip() else None

    def upload(self, data: bytes) -> dict[str, Any]:
        """Store a DICOM file (REST POST /instances): its Orthanc ids (``ID``, ``ParentStudy``, ...)."""
        return self.post("/instances", data, "application/dicom")

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def store_to(self, modality: str, instance_ids: list[str], timeout: float = 120.0) -> Any:
        """Have Orthanc send instances to a modality by C-STORE (REST POST /modalities/{m}/store)."""
        return self.post(f"/modalities/{modality}/store", {"Resources": instance_ids, "Synchronous": True},
                         timeout=timeout)

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        return self.get(f"/studies/{study_id}/instances")

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        return self.post("/tools/lookup", uid)


class NodeProcess:
    """``lungopacity listen`` as a subprocess on a free port (see the module docstring)."""

    def __init__(self, bundle: Path, spool: Path, send_to: str, *, workers: int = 1, queue: int = 32,
                 ae_title: str = NODE_AET, extra: list[str] | None = None, log: Path | None = None) -> None:
        self.args = [sys.executable, "-m", "lungopacity.cli", "-v", "listen", "--bundle", str(bundle), "--ae-title",
                     ae_title, "--port", "0", "--send-to", send_to, "--spool", str(spool), "--workers",
                     str(workers), "--queue", str(queue), *(extra or [])]
        self.log = log or Path(spool).with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.start_line = ""

    def start(self, timeout: float = 90.0) -> NodeProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        stderr = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=stderr, env=env,
                                        start_new_session=True)
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.process.stdout.fileno(), False)
        buffer = b""
        while time.monotonic() < deadline:
            chunk = self.process.stdout.read()
            if chunk:
                buffer += chunk
                match = re.search(rb"listening as \S+ on \S+:(\d+);[^\n]*\n", buffer)
                if match:
                    self.port, self.start_line = int(match.group(1)), match.group(0).decode().strip()
                    return self
            if self.process.poll() is not None:
                raise AssertionError(f"the node exited with {self.process.returncode}: {self.log_tail()}")
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"the node printed no start line within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful stop."""
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.process = None

    def kill(self) -> None:
        """SIGKILL: the process dies where it stands."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.terminate(15)
            except subprocess.TimeoutExpired:
                self.kill()


def result_instances(orthanc: Orthanc, study_id: str) -> dict[str, list[dict[str, Any]]]:
    """The study's instances by Modality ('SR', 'PR', 'OT', and the source's)."""
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for series in orthanc.get(f"/studies/{study_id}/series"):
        modality = series.get("MainDicomTags", {}).get("Modality", "")
        for instance_id in series.get("Instances", []):
            by_modality.setdefault(modality, []).append({"ID": instance_id, "series": series["ID"]})
    return by_modality


__all__ = ["NODE_AET", "NODE_MODALITY", "ORTHANC_AET", "NodeProcess", "Orthanc", "free_port", "orthanc_binary",
           "result_instances", "wait_until"]
