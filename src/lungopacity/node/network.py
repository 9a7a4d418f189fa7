"""The node's side of the DICOM network: what it accepts, where it sends, and how.

* Accepted SOP classes (:data:`ACCEPTED_SOP_CLASSES`): CR, DX for presentation, DX for
  processing, Secondary Capture (RSNA's images are SC with Modality CR). Anything else
  is refused at association negotiation, before any data is sent.
* Accepted transfer syntaxes (:func:`accepted_transfer_syntaxes`): the uncompressed ones
  and each compressed one this installation can decode, so a PACS that holds another
  syntax transcodes before sending (Orthanc does) instead of sending what cannot be read.
* Results go back by C-STORE (:func:`send_c_store`) and optionally by DICOMweb STOW-RS
  (:func:`stow`, standard library only: one ``multipart/related; type="application/dicom"``
  POST).
"""

from __future__ import annotations

import logging
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lungopacity.errors import ConfigError, LungOpacityError
from lungopacity.inference.dicom_output import RESULT_SOP_CLASSES, multipart_related
from lungopacity.io.dicom_pixels import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN as DEFLATED_LE
from lungopacity.io.dicom_pixels import EXPLICIT_VR_BIG_ENDIAN as EXPLICIT_BE
from lungopacity.io.dicom_pixels import EXPLICIT_VR_LITTLE_ENDIAN as EXPLICIT_LE
from lungopacity.io.dicom_pixels import IMPLICIT_VR_LITTLE_ENDIAN as IMPLICIT_LE

log = logging.getLogger(__name__)

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
VERIFICATION = "1.2.840.10008.1.1"
ACCEPTED_SOP_CLASSES: dict[str, str] = {
    CR_IMAGE: "CR Image Storage",
    DX_FOR_PRESENTATION: "Digital X-Ray Image Storage - For Presentation",
    DX_FOR_PROCESSING: "Digital X-Ray Image Storage - For Processing",
    SECONDARY_CAPTURE_IMAGE: "Secondary Capture Image Storage",
}
JPEG_BASELINE, JPEG_EXTENDED = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"
COMPRESSED_SYNTAXES = (
    JPEG_BASELINE, JPEG_EXTENDED, "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
)

#: C-STORE statuses the SCP answers with (PS3.4 Annex B, PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_CANNOT_UNDERSTAND = 0xC000
#: Warning statuses a storage SCP may answer while storing the object (coercion, ...).
STORED_WITH_WARNING = {0xB000, 0xB006, 0xB007}

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def check_ae_title(value: str, option: str) -> str:
    """An AE title as the standard allows it (1-16 printable characters, no backslash, not blank)."""
    text = str(value).strip()
    if not text or not _AE_TITLE.match(text):
        raise ConfigError(option, f"{value!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
    return text


@dataclass(frozen=True)
class Destination:
    """Where results are sent by C-STORE: ``HOST:PORT:AET``."""

    host: str
    port: int
    ae_title: str

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str, option: str = "--send-to") -> Destination:
    """``HOST:PORT:AET`` (an IPv6 host in brackets: ``[::1]:104:PACS``)."""
    parts = str(text).rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise ConfigError(option, f"{text!r} must be HOST:PORT:AET, e.g. 127.0.0.1:4242:ORTHANC")
    host, port_text, aet = parts
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(option, f"{text!r}: port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(option, f"{text!r}: port {port} is outside 1-65535")
    return Destination(host, port, check_ae_title(aet, option))


def accepted_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes, and every compressed one this installation can decode."""
    syntaxes = [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED_LE]
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom < 3: JPEG Baseline through Pillow only
        return syntaxes + [JPEG_BASELINE]
    for uid in COMPRESSED_SYNTAXES:
        try:
            decoder = get_decoder(uid)
        except (NotImplementedError, ValueError, KeyError):
            continue
        if not decoder.is_available:
            continue
        plugins = set(getattr(decoder, "available_plugins", ()) or ())
        if uid == JPEG_EXTENDED and plugins <= {"pillow"}:
            continue  # Pillow decodes 8-bit JPEG Extended only; 12-bit radiographs would fail
        syntaxes.append(uid)
    return syntaxes


def quiet_dicom_libraries() -> None:
    """pynetdicom's and highdicom's INFO lines carry UIDs; keep them out of the node's log.

    Only loggers nobody configured are changed (an explicit level, e.g. for debugging, stays).
    """
    for name in ("pynetdicom", "highdicom"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


class SendError(LungOpacityError):
    """A result could not be delivered (the destination refused or could not be reached).

    ``stored`` lists the kinds delivered before the failure.
    """

    stored: list[str] = []


def send_c_store(destination: Destination, calling_ae: str, datasets: list[tuple[str, Any]],
                 *, timeout: float = 30.0, on_stored: Callable[[str], None] | None = None) -> list[str]:
    """Send ``(kind, dataset)`` pairs over one association; returns the kinds stored.

    ``on_stored(kind)`` is called as soon as each object is stored (to record it durably
    before the next one is sent).

    Raises:
        SendError: no association, or a store refused (the kinds stored before it are
            in the exception's ``stored`` attribute).
    """
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
        ae.add_requested_context(sop_class, [EXPLICIT_LE, IMPLICIT_LE])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association aborted or not reachable"
        raise SendError(str(destination), reason)
    stored: list[str] = []
    try:
        for kind, ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status is not None and "Status" in status else -1
            if code != STATUS_SUCCESS and code not in STORED_WITH_WARNING:
                error = SendError(str(destination), f"C-STORE of the {kind.upper()} answered "
                                                    f"{'no response' if code < 0 else f'status 0x{code:04X}'}")
                error.stored = list(stored)
                raise error
            stored.append(kind)
            if on_stored is not None:
                on_stored(kind)
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


def stow_url(url: str) -> str:
    """The STOW-RS endpoint: ``URL/studies`` unless the URL already names it."""
    base = url.rstrip("/")
    return base if base.endswith("/studies") else f"{base}/studies"


def check_stow_url(url: str) -> str:
    if not re.match(r"^https?://[^/\s]+", str(url)):
        raise ConfigError("--stow", f"{url!r} must be an http:// or https:// URL (the DICOMweb root)")
    return str(url)


def stow(url: str, parts: list[bytes], *, timeout: float = 60.0) -> int:
    """POST DICOM files to a STOW-RS endpoint; returns the HTTP status (200 or 202).

    Raises:
        SendError: the server refused (4xx/5xx) or could not be reached.
    """
    body, content_type = multipart_related(parts)
    request = urllib.request.Request(stow_url(url), data=body, method="POST", headers={
        "Content-Type": content_type, "Accept": "application/dicom+json",
    })
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the operator's URL
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        raise SendError(f"STOW-RS {stow_url(url)}", f"HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SendError(f"STOW-RS {stow_url(url)}", str(getattr(exc, "reason", exc))) from None
    if status not in (200, 202):
        raise SendError(f"STOW-RS {stow_url(url)}", f"HTTP {status}")
    return status


__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "RESULT_SOP_CLASSES",
    "Destination",
    "SendError",
    "accepted_transfer_syntaxes",
    "check_ae_title",
    "check_stow_url",
    "parse_destination",
    "quiet_dicom_libraries",
    "send_c_store",
    "stow",
]
