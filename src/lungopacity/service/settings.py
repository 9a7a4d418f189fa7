"""The service's limits and access rules in one typed, validated object."""

from __future__ import annotations

from dataclasses import dataclass

from lungopacity.errors import ConfigError
from lungopacity.service.security import check_token
from lungopacity.service.upload import FORM_OVERHEAD_BYTES, UploadTimeouts

#: Largest upload accepted (the file itself): 50 MiB.
DEFAULT_MAX_UPLOAD_BYTES = 50 * 2**20
#: Largest decoded image accepted (decompression-bomb guard): 8192 x 8192 pixels, far
#: above any radiograph (a large detector is about 4300 x 3500).
DEFAULT_MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class ServiceSettings:
    """What ``create_app`` enforces.

    Attributes:
        max_upload_bytes: largest accepted file; 413 past it.
        max_pixels: largest accepted image (width x height); 413 past it.
        max_concurrent: inferences run at once (thread pool size).
        max_queue: checked uploads that may wait for a worker; past it, 503.
        max_uploads: request bodies received at once; past it, 503.
        upload_timeout: seconds an upload body may take in all; 408 past it.
        stall_timeout: seconds in which an upload must deliver at least 1 KB; 408 otherwise.
        token: when set, every API call needs ``Authorization: Bearer <token>``.
        allowed_hosts: Host names answered besides localhost names and loopback addresses.
        device: torch device for a bundle loaded by the app.
    """

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_concurrent: int = 2
    max_queue: int = 8
    max_uploads: int = 32
    upload_timeout: float = 120.0
    stall_timeout: float = 10.0
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_concurrent", "max_uploads"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, not {getattr(self, name)}")
        if self.max_queue < 0:
            raise ConfigError("max_queue", f"must be at least 0, not {self.max_queue}")
        if self.token is not None:
            check_token(self.token)
        for name in ("upload_timeout", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be a positive number of seconds, not {getattr(self, name)}")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: the file plus room for the form's framing."""
        return self.max_upload_bytes + FORM_OVERHEAD_BYTES

    @property
    def upload_timeouts(self) -> UploadTimeouts:
        return UploadTimeouts(total=self.upload_timeout, stall=self.stall_timeout)
