"""The predictor the service serves: what it must offer, and loading it from a bundle.

The service needs only :class:`PredictorLike` (``lungopacity.inference.Predictor`` or a
test fake). A bundle path is loaded once, in a background thread, so ``/healthz``
answers while the model loads and ``/readyz`` says when it is ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from lungopacity.inference import Reading
from lungopacity.service.settings import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)


class PredictorLike(Protocol):
    """What the service needs of a predictor (``lungopacity.inference.Predictor`` or a test fake)."""

    version: str

    def read(
        self,
        data: bytes,
        name: str,
        *,
        sex: str | None = None,
        age: float | None = None,
        view: str | None = None,
        with_images: bool = True,
        with_heatmap: bool = False,
    ) -> Reading: ...


PredictorSource = PredictorLike | str | Path | Callable[[], PredictorLike]


def load_predictor(source: PredictorSource, *, device: str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS) -> PredictorLike:
    """A predictor from a bundle path or a zero-argument loader (a predictor is returned as is).

    Raises whatever ``Predictor.from_bundle`` raises (``BundleError`` for a bad bundle).
    """
    if hasattr(source, "read"):
        return source  # type: ignore[return-value]
    if isinstance(source, (str, Path)):
        from lungopacity.inference import Predictor  # type: ignore[attr-defined]

        return Predictor.from_bundle(source, device=device, max_pixels=max_pixels)
    if callable(source):
        return source()
    raise TypeError(f"expected a predictor, a bundle path or a loader, not {type(source).__name__}")


class ServiceState:
    """The predictor (once loaded) and the reason it could not be, if so."""

    def __init__(self, source: PredictorSource, *, device: str, max_pixels: int) -> None:
        self.source = source
        self.device = device
        self.max_pixels = max_pixels
        self.predictor: PredictorLike | None = None
        self.load_error: str | None = None
        self._load_started = False
        self._lock = threading.Lock()
        if hasattr(source, "read"):
            self.predictor = source  # type: ignore[assignment]

    @property
    def ready(self) -> bool:
        return self.predictor is not None

    def start_loading(self) -> None:
        """Load the bundle once, in a background thread, so /healthz answers meanwhile."""
        with self._lock:
            if self.predictor is not None or self._load_started:
                return
            self._load_started = True
        threading.Thread(target=self._load, name="lungopacity-load", daemon=True).start()

    def _load(self) -> None:
        began = time.perf_counter()
        try:
            predictor = load_predictor(self.source, device=self.device, max_pixels=self.max_pixels)
        except Exception as exc:  # noqa: BLE001 - reported through /readyz and the log
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model bundle could not be loaded: %s", self.load_error)
            return
        self.predictor = predictor
        log.info("model %s loaded in %.1f s", getattr(predictor, "version", "?"), time.perf_counter() - began)
