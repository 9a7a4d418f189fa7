"""The node's spool: every received instance on disk, in exactly one state, until its results are sent.

One folder per state; an instance moves between them by atomic renames, each followed by
an fsync of the folders involved, so a crash (a kill, a power cut) leaves every instance
in one state and a restart picks up from there::

    incoming/<key>.tmp     being written by a C-STORE (not yet answered): removed on restart
    received/<key>.dcm     stored durably, answered success; waiting to be read
    work/<key>/            results being written: removed on restart (the instance is still received)
    processed/<key>/       results written (SR.dcm, GSPS.dcm, SC.dcm, result.json); being sent;
                           <KIND>.sent / <KIND>.stowed markers record each object delivered
    sent/<key>.json        everything delivered; the source and results are deleted
    failed/<key>.dcm, .txt the instance could not be read; the reason (without identifiers)

``key`` is a hash of the SOP Instance UID (:func:`instance_key`), so file names and log
lines name no patient and no UID. Transitions:

    C-STORE -> incoming -> received            (fsync, rename; then the SCP answers success)
    received -> work -> processed; received deleted   (results first, then the source goes)
    processed: each object sent, its marker written   (a restart resends only unmarked objects)
    processed -> sent                          (the record written, then the folder removed)
    received -> failed                         (unreadable: kept for a person to look at)

A restart resends at most the object whose marker was not yet written when the process
died; result UIDs are derived from the source and the bundle, so the PACS receives the
same instance again, not a second one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungopacity.errors import ConfigError

log = logging.getLogger(__name__)

STATES = ("incoming", "received", "work", "processed", "sent", "failed")
RESULT_JSON = "result.json"


def instance_key(sop_instance_uid: str) -> str:
    """The spool's name for an instance: a hash of its SOP Instance UID (no identifier on disk or in logs)."""
    return hashlib.sha256(str(sop_instance_uid).strip().encode("utf-8")).hexdigest()[:32]


def log_id(key: str) -> str:
    """The short form of a key used in log lines."""
    return key[:12]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the caller renames it into place)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@dataclass
class SpoolContents:
    """What a spool held when it was opened (after clearing half-written entries)."""

    received: list[str]
    processed: list[str]
    cleared: int  # half-written entries removed (incoming/, work/)


class Spool:
    """The spool folder of one node (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            for state in STATES:
                (self.root / state).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("--spool", f"{self.root}: cannot create the spool folders ({exc.strerror or exc})") from None
        probe = self.root / "incoming" / ".write-test"
        try:
            write_durably(probe, b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError("--spool", f"{self.root}: not writable ({exc.strerror or exc})") from None

    def dir(self, state: str) -> Path:
        return self.root / state

    # ------------------------------------------------------------- recovery

    def recover(self) -> SpoolContents:
        """Clear half-written entries and list what waits to be read and to be sent (oldest first)."""
        cleared = 0
        for path in list(self.dir("incoming").iterdir()):
            if path.name == ".write-test" or path.suffix == ".tmp":
                path.unlink(missing_ok=True)
                cleared += 1
        for path in list(self.dir("work").iterdir()):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            cleared += 1
        processed = self._oldest_first([p for p in self.dir("processed").iterdir() if p.is_dir()])
        received = []
        for path in self._oldest_first(list(self.dir("received").glob("*.dcm"))):
            key = path.stem
            if (self.dir("processed") / key).is_dir() or (self.dir("sent") / f"{key}.json").exists():
                # Killed between writing the results and deleting the source: the results stand.
                path.unlink(missing_ok=True)
                continue
            received.append(key)
        for state in ("incoming", "work", "received"):
            _fsync_dir(self.dir(state))
        return SpoolContents(received=received, processed=[p.name for p in processed], cleared=cleared)

    @staticmethod
    def _oldest_first(paths: list[Path]) -> list[Path]:
        def mtime(p: Path) -> float:
            try:
                return p.stat().st_mtime
            except OSError:
                return 0.0

        return sorted(paths, key=lambda p: (mtime(p), p.name))

    # --------------------------------------------------------- transitions

    def is_held(self, key: str) -> bool:
        """True while the instance waits to be read or its results to be sent."""
        return (self.dir("received") / f"{key}.dcm").exists() or (self.dir("processed") / key).is_dir()

    def receive(self, key: str, data: bytes) -> Path:
        """incoming -> received: the instance is on disk, synced, before the SCP answers success."""
        tmp = self.dir("incoming") / f"{key}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        target = self.dir("received") / f"{key}.dcm"
        try:
            write_durably(tmp, data)
            os.replace(tmp, target)
            _fsync_dir(self.dir("received"))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    def source(self, key: str) -> Path:
        return self.dir("received") / f"{key}.dcm"

    def work_dir(self, key: str) -> Path:
        """A fresh folder to write the results into (moved by :meth:`processed`)."""
        folder = self.dir("work") / key
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def processed(self, key: str, summary: dict[str, Any]) -> Path:
        """work -> processed (results complete), then the source is deleted."""
        work = self.dir("work") / key
        write_durably(work / RESULT_JSON, json.dumps(summary, indent=2).encode())
        _fsync_dir(work)
        target = self.dir("processed") / key
        if target.exists():  # an earlier copy of the same instance: the fresh results replace it
            shutil.rmtree(target)
        os.replace(work, target)
        _fsync_dir(self.dir("processed"))
        _fsync_dir(self.dir("work"))
        self.source(key).unlink(missing_ok=True)
        _fsync_dir(self.dir("received"))
        return target

    def result_files(self, key: str) -> Path:
        return self.dir("processed") / key

    def is_delivered(self, key: str, kind: str, channel: str) -> bool:
        return (self.dir("processed") / key / f"{kind}.{channel}").exists()

    def mark_delivered(self, key: str, kind: str, channel: str) -> None:
        """Record that one result object reached the destination ``channel`` ('sent' or 'stowed')."""
        folder = self.dir("processed") / key
        tmp = folder / f".{kind}.{channel}.tmp"
        write_durably(tmp, str(time.time()).encode())
        os.replace(tmp, folder / f"{kind}.{channel}")
        _fsync_dir(folder)

    def summary(self, key: str) -> dict[str, Any]:
        try:
            return json.loads((self.dir("processed") / key / RESULT_JSON).read_text())
        except (OSError, ValueError):
            return {}

    def finish(self, key: str, record: dict[str, Any]) -> None:
        """processed -> sent: the record written first, then the results deleted."""
        target = self.dir("sent") / f"{key}.json"
        tmp = self.dir("sent") / f".{key}.json.tmp"
        write_durably(tmp, json.dumps(record, indent=2).encode())
        os.replace(tmp, target)
        _fsync_dir(self.dir("sent"))
        shutil.rmtree(self.dir("processed") / key, ignore_errors=True)
        _fsync_dir(self.dir("processed"))

    def fail(self, key: str, reason: str) -> None:
        """received -> failed, with the reason (the caller keeps identifiers out of it)."""
        write_durably(self.dir("failed") / f"{key}.txt", (reason + "\n").encode())
        source = self.source(key)
        if source.exists():
            os.replace(source, self.dir("failed") / f"{key}.dcm")
        _fsync_dir(self.dir("failed"))
        _fsync_dir(self.dir("received"))
        shutil.rmtree(self.dir("work") / key, ignore_errors=True)

    def counts(self) -> dict[str, int]:
        """How many instances each state holds (for logs and tests)."""
        return {
            "received": len(list(self.dir("received").glob("*.dcm"))),
            "processed": sum(1 for p in self.dir("processed").iterdir() if p.is_dir()),
            "sent": len(list(self.dir("sent").glob("*.json"))),
            "failed": len(list(self.dir("failed").glob("*.txt"))),
        }


__all__ = ["STATES", "Spool", "SpoolContents", "instance_key", "log_id", "write_durably"]
