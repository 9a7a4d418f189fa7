"""The DICOM node: a C-STORE SCP that reads what it receives and sends the results back.

A PACS (or a modality, or dcmtk's ``storescu``) sends a radiograph by C-STORE; the node

1. writes it to the spool, synced, *before* it answers success (a full queue or a full
   disk is answered "out of resources", 0xA700, so the sender keeps the image and retries);
2. reads it with the bundle in one of ``workers`` threads (one inference at a time; the
   decoding and the building of the results run in parallel);
3. writes the result objects (:mod:`lungopacity.inference.dicom_output`: SR, GSPS,
   Secondary Capture) to the spool;
4. sends them by C-STORE to the destination (and by STOW-RS when asked), retrying with
   a growing delay while the destination refuses or cannot be reached.

The spool (:mod:`lungopacity.node.spool`) makes this survive a kill: a restart reads what
was received and not read, and sends what was read and not sent, nothing twice.

Log lines name instances by a short hash of their SOP Instance UID, never by patient
name, ID or UID; reasons for a failure are scrubbed of the instance's identifiers.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lungopacity.errors import ConfigError, LungOpacityError
from lungopacity.inference.dicom_output import (
    RESULT_FILES,
    RESULT_KINDS,
    AlgorithmInfo,
    build_dicom_results,
    require_dicom_libraries,
    write_dicom_results,
)
from lungopacity.node.network import (
    ACCEPTED_SOP_CLASSES,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    VERIFICATION,
    Destination,
    SendError,
    accepted_transfer_syntaxes,
    check_ae_title,
    check_stow_url,
    quiet_dicom_libraries,
    send_c_store,
    stow,
)
from lungopacity.node.spool import Spool, instance_key, log_id

log = logging.getLogger(__name__)

#: Header values scrubbed from failure reasons before they are logged or written.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber", "StudyID",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ReferringPhysicianName", "InstitutionName",
)


@dataclass
class NodeConfig:
    """How the node listens and where it sends.

    Attributes:
        ae_title: the node's AE title (what the PACS calls it).
        port: the port it listens on (0: any free port, e.g. in tests; see
            :attr:`DicomNode.port`).
        destination: where results go by C-STORE.
        spool: the spool folder (created when missing).
        host: the address it listens on (``0.0.0.0``: every interface).
        stow_url: a DICOMweb root (``http://pacs/dicom-web``); results are also sent by
            STOW-RS to ``URL/studies``.
        workers: threads reading instances.
        queue_size: instances received and not yet read that the node keeps; one more
            is answered "out of resources".
        allowed_ae: calling AE titles allowed to associate (empty: any).
        retry_seconds: first delay before resending to a destination that failed;
            doubled each time up to ``max_retry_seconds``.
        network_timeout: seconds a peer may take to answer.
    """

    ae_title: str
    port: int
    destination: Destination
    spool: Path
    host: str = "127.0.0.1"
    stow_url: str | None = None
    workers: int = 1
    queue_size: int = 32
    allowed_ae: tuple[str, ...] = ()
    retry_seconds: float = 5.0
    max_retry_seconds: float = 300.0
    network_timeout: float = 30.0

    def __post_init__(self) -> None:
        require_dicom_libraries("listen", ("pynetdicom", "highdicom"))
        self.ae_title = check_ae_title(self.ae_title, "--ae-title")
        self.allowed_ae = tuple(check_ae_title(a, "--allowed-ae") for a in self.allowed_ae)
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError("--port", f"must be 0-65535, got {self.port}")
        if int(self.workers) < 1:
            raise ConfigError("--workers", f"must be at least 1, got {self.workers}")
        if int(self.queue_size) < 1:
            raise ConfigError("--queue", f"must be at least 1, got {self.queue_size}")
        if self.stow_url is not None:
            self.stow_url = check_stow_url(self.stow_url)
        self.spool = Path(self.spool)


@dataclass(order=True)
class _Delivery:
    due: float
    order: int
    key: str = field(compare=False)
    attempt: int = field(default=0, compare=False)


class DicomNode:
    """The node (see the module docstring): :meth:`start`, then :meth:`wait` or :meth:`stop`."""

    def __init__(self, predictor: Any, config: NodeConfig) -> None:
        self.predictor, self.config = predictor, config
        self.algorithm = AlgorithmInfo.from_predictor(predictor)
        self.spool = Spool(config.spool)
        self._lock = threading.Lock()
        self._predict_lock = threading.Lock()
        self._held: set[str] = set()
        self._pending = 0  # received, not yet read
        self._queue: queue.Queue[str] = queue.Queue()
        self._deliveries: queue.Queue[_Delivery] = queue.Queue()
        self._order = itertools.count()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self.port = int(config.port)

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Recover the spool, start the workers and the sender, then listen."""
        from pynetdicom import AE, evt

        quiet_dicom_libraries()
        contents = self.spool.recover()
        with self._lock:
            self._held.update(contents.received + contents.processed)
            self._pending = len(contents.received)
        for key in contents.received:
            self._queue.put(key)
        for key in contents.processed:
            self._schedule(key, 0, delay=0.0)
        if contents.received or contents.processed or contents.cleared:
            log.info("spool %s: %d instance(s) to read, %d to send, %d half-written entr%s cleared",
                     self.spool.root, len(contents.received), len(contents.processed), contents.cleared,
                     "y" if contents.cleared == 1 else "ies")
        for n in range(int(self.config.workers)):
            self._threads.append(threading.Thread(target=self._work, name=f"lungopacity-worker-{n}", daemon=True))
        self._threads.append(threading.Thread(target=self._send_loop, name="lungopacity-sender", daemon=True))
        for thread in self._threads:
            thread.start()

        ae = AE(ae_title=self.config.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.network_timeout
        syntaxes = accepted_transfer_syntaxes()
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(VERIFICATION)
        if self.config.allowed_ae:
            ae.require_calling_aet = list(self.config.allowed_ae)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS)]
        try:
            self._server = ae.start_server((self.config.host, int(self.config.port)), block=False,
                                           evt_handlers=handlers)
        except OSError as exc:
            self._stop.set()
            raise ConfigError("--port", f"cannot listen on {self.config.host}:{self.config.port} "
                                        f"({exc.strerror or exc})") from None
        self.port = int(self._server.server_address[1])
        log.info("node %s listening on %s:%d; results to %s%s; spool %s; %d worker(s), queue %d",
                 self.config.ae_title, self.config.host, self.port, self.config.destination,
                 f" and STOW-RS {self.config.stow_url}" if self.config.stow_url else "", self.spool.root,
                 self.config.workers, self.config.queue_size)

    def request_stop(self) -> None:
        """Ask the node to stop (safe from a signal handler)."""
        self._stop.set()

    def wait(self) -> None:
        """Block until :meth:`request_stop` (or :meth:`stop`) is called."""
        while not self._stop.wait(0.5):
            pass

    def stop(self, timeout: float = 30.0) -> None:
        """Stop listening, let the workers finish the instance in hand, and return.

        What is still queued stays in the spool and is read at the next start.
        """
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        counts = self.spool.counts()
        log.info("node %s stopped; spool holds %d to read, %d to send", self.config.ae_title,
                 counts["received"], counts["processed"])

    def __enter__(self) -> DicomNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- receive

    def _on_store(self, event: Any) -> int:
        """C-STORE: spool the instance, then answer; never accept what cannot be kept."""
        if self._stop.is_set():
            return STATUS_OUT_OF_RESOURCES
        if str(event.context.abstract_syntax) not in ACCEPTED_SOP_CLASSES:
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        if not uid:
            return STATUS_CANNOT_UNDERSTAND
        key = instance_key(uid)
        with self._lock:
            if key in self._held:
                log.info("instance %s: received again while held; kept once", log_id(key))
                return STATUS_SUCCESS
            if self._pending >= self.config.queue_size:
                log.warning("instance %s: refused, the queue is full (%d waiting)", log_id(key), self._pending)
                return STATUS_OUT_OF_RESOURCES
            self._pending += 1
            self._held.add(key)
        try:
            self.spool.receive(key, event.encoded_dataset(include_meta=True))
        except Exception as exc:  # noqa: BLE001 - disk full, bad stream: refuse, keep nothing half-done
            with self._lock:
                self._pending -= 1
                self._held.discard(key)
            log.error("instance %s: refused, could not be spooled (%s)", log_id(key), type(exc).__name__)
            return STATUS_OUT_OF_RESOURCES
        self._queue.put(key)
        log.info("instance %s: received", log_id(key))
        return STATUS_SUCCESS

    # ------------------------------------------------------------------- read

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                key = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._read(key)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one instance
                log.error("instance %s: unexpected error while reading (%s); it stays in the spool",
                          log_id(key), type(exc).__name__)
            finally:
                with self._lock:
                    self._pending -= 1

    def _read(self, key: str) -> None:
        source = self.spool.source(key)
        try:
            data = source.read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._held.discard(key)
            return
        received_at = source.stat().st_mtime if source.exists() else time.time()
        name = f"instance {log_id(key)}"
        started = time.time()
        try:
            image = self.predictor.load(data, name=name)
            image.id = key
            with self._predict_lock:
                (prediction,) = self.predictor.predict_images([image])
            results = build_dicom_results(data, prediction, self.algorithm, name=name, pixels=image.full_pixels())
            write_dicom_results(results, self.spool.work_dir(key))
        except LungOpacityError as exc:
            self._failed(key, data, exc.cause)
            return
        except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the node
            self._failed(key, data, f"{type(exc).__name__}: {exc}")
            return
        summary = {
            "key": key, "received_at": received_at, "read_started_at": started, "processed_at": time.time(),
            "opacity_probability": prediction.opacity_probability, "decision": prediction.decision,
            "n_boxes": len(prediction.boxes), "algorithm": self.algorithm.name, "version": self.algorithm.version,
        }
        self.spool.processed(key, summary)
        verdict = "no decision" if prediction.decision is None else ("positive" if prediction.decision else "negative")
        log.info("instance %s: read, P(opacity) %.3f %s, %d box(es)", log_id(key), prediction.opacity_probability,
                 verdict, len(prediction.boxes))
        self._schedule(key, 0, delay=0.0)

    def _failed(self, key: str, data: bytes, reason: str) -> None:
        reason = scrub(reason, data)
        self.spool.fail(key, reason)
        with self._lock:
            self._held.discard(key)
        log.warning("instance %s: not read (%s); kept in %s", log_id(key), reason, self.spool.dir("failed"))

    # ------------------------------------------------------------------- send

    def _schedule(self, key: str, attempt: int, delay: float) -> None:
        self._deliveries.put(_Delivery(time.monotonic() + delay, next(self._order), key, attempt))

    def _send_loop(self) -> None:
        waiting: list[_Delivery] = []
        while not self._stop.is_set():
            timeout = 0.2 if not waiting else max(0.0, min(0.2, waiting[0].due - time.monotonic()))
            try:
                heapq.heappush(waiting, self._deliveries.get(timeout=timeout))
                continue
            except queue.Empty:
                pass
            if waiting and waiting[0].due <= time.monotonic():
                delivery = heapq.heappop(waiting)
                try:
                    self._deliver(delivery)
                except Exception as exc:  # noqa: BLE001 - keep sending the others
                    log.error("instance %s: unexpected error while sending (%s); retried later",
                              log_id(delivery.key), type(exc).__name__)
                    self._retry(delivery, f"{type(exc).__name__}")

    def _deliver(self, delivery: _Delivery) -> None:
        import pydicom

        key = delivery.key
        folder = self.spool.result_files(key)
        if not folder.is_dir():
            return
        # The two channels are independent: one that fails does not hold back the other,
        # and each object's marker keeps a retry from sending it again where it arrived.
        failures: list[str] = []
        todo = [k for k in RESULT_KINDS if not self.spool.is_delivered(key, k, "sent")]
        if todo:
            try:
                datasets = [(k, pydicom.dcmread(folder / RESULT_FILES[k])) for k in todo]
                send_c_store(self.config.destination, self.config.ae_title, datasets,
                             timeout=self.config.network_timeout,
                             on_stored=lambda kind: self.spool.mark_delivered(key, kind, "sent"))
            except SendError as exc:
                failures.append(str(exc))
        if self.config.stow_url:
            pending = [k for k in RESULT_KINDS if not self.spool.is_delivered(key, k, "stowed")]
            if pending:
                try:
                    stow(self.config.stow_url, [(folder / RESULT_FILES[k]).read_bytes() for k in pending],
                         timeout=self.config.network_timeout)
                except SendError as exc:
                    failures.append(str(exc))
                else:
                    for kind in pending:
                        self.spool.mark_delivered(key, kind, "stowed")
        if failures:
            self._retry(delivery, "; ".join(failures))
            return
        summary = self.spool.summary(key)
        record = {**summary, "sent_at": time.time(), "attempts": delivery.attempt + 1,
                  "destination": str(self.config.destination), "stow": bool(self.config.stow_url),
                  "objects": list(RESULT_KINDS)}
        self.spool.finish(key, record)
        with self._lock:
            self._held.discard(key)
        log.info("instance %s: %d result objects sent to %s", log_id(key), len(RESULT_KINDS), self.config.destination)

    def _retry(self, delivery: _Delivery, reason: str) -> None:
        delay = min(self.config.max_retry_seconds, self.config.retry_seconds * (2 ** min(delivery.attempt, 16)))
        log.warning("instance %s: sending failed (%s); retry in %.0f s", log_id(delivery.key), reason, delay)
        self._schedule(delivery.key, delivery.attempt + 1, delay=delay)

    # ------------------------------------------------------------------ state

    def counts(self) -> dict[str, int]:
        """Instances per spool state, and how many wait in memory."""
        counts = self.spool.counts()
        with self._lock:
            counts["pending"] = self._pending
        return counts


def scrub(text: str, data: bytes) -> str:
    """``text`` with the instance's identifying header values replaced by ``<redacted>``."""
    import io

    text = " ".join(str(text).split())
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        values = set()
        for keyword in IDENTIFYING_KEYWORDS:
            value = ds.get(keyword)
            if value is None:
                continue
            items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
            for item in items:
                item_text = str(item).strip()
                if len(item_text) >= 3:
                    values.add(item_text)
                    values.update(p for p in item_text.split("^") if len(p) >= 3)
    except Exception:  # noqa: BLE001 - an unreadable header: keep only the kind of error
        return text.split(":", 1)[0][:80]
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, "<redacted>")
    return text[:300]


__all__ = ["DicomNode", "NodeConfig", "scrub"]
