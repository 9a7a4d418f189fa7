"""Admission control, in two stages: receiving uploads, then running inferences.

A request first takes an upload slot (:class:`UploadSlots`) while its body is read
under deadlines; only a complete, checked upload asks the :class:`InferenceGate` for an
inference ticket. So slow or stalled clients hold upload slots, never the workers, and
the memory held by uploads is bounded by ``(max_uploads + max_concurrent + max_queue)``
times the upload limit. Past either bound the answer is 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from lungopacity.errors import ConfigError

T = TypeVar("T")


class UploadSlots:
    """At most ``max_uploads`` request bodies are being received at once. Thread-safe."""

    def __init__(self, max_uploads: int) -> None:
        if max_uploads < 1:
            raise ConfigError("max_uploads must be >= 1")
        self.max_uploads = max_uploads
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Uploads being received now."""
        with self._lock:
            return self._in_flight

    def try_acquire(self) -> bool:
        """Take a slot, or return False when all ``max_uploads`` are taken."""
        with self._lock:
            if self._in_flight >= self.max_uploads:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        """Return a slot."""
        with self._lock:
            self._in_flight -= 1


class InferenceGate:
    """At most ``max_concurrent`` inferences run, ``max_queue`` more wait.

    A request takes a ticket once its upload is read and checked. Inference runs in a
    thread pool of ``max_concurrent`` workers (its queue is the waiting line); the ticket
    is returned when the worker finishes, so a client that disconnects cannot free a slot
    while its inference still runs. Thread-safe and independent of the event loop.

    Args:
        max_concurrent: worker threads.
        max_queue: tickets beyond the workers (requests waiting for one).
        on_inference: called with the seconds each inference took (metrics).
    """

    def __init__(self, max_concurrent: int, max_queue: int, on_inference: Callable[[float], None] | None = None) -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise ConfigError("max_concurrent must be >= 1 and max_queue >= 0")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.on_inference = on_inference
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self._mean_seconds = 1.0  # running estimate of one inference, for Retry-After
        self._executor: ThreadPoolExecutor | None = None

    @property
    def admitted(self) -> int:
        """Requests holding a ticket (waiting for a worker or running)."""
        with self._lock:
            return self._admitted

    @property
    def running(self) -> int:
        """Inferences running now."""
        with self._lock:
            return self._running

    @property
    def waiting(self) -> int:
        """Requests with a ticket that wait for a worker (the queue depth)."""
        with self._lock:
            return max(0, self._admitted - self._running)

    @property
    def full(self) -> bool:
        """Every ticket is taken (a hint: it may change at once)."""
        with self._lock:
            return self._admitted >= self.max_concurrent + self.max_queue

    def try_admit(self) -> bool:
        """Take a ticket, or return False when ``max_concurrent + max_queue`` are taken."""
        with self._lock:
            if self._admitted >= self.max_concurrent + self.max_queue:
                return False
            self._admitted += 1
            return True

    def release(self) -> None:
        """Return a ticket."""
        with self._lock:
            self._admitted -= 1

    def retry_after_seconds(self) -> int:
        """A client's fair wait before retrying: the work ahead of it, shared by the workers."""
        with self._lock:
            ahead = self._admitted / self.max_concurrent
            return max(1, min(60, math.ceil(self._mean_seconds * ahead)))

    def _executor_or_new(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_concurrent, thread_name_prefix="lungopacity-infer")
            return self._executor

    async def run(self, function: Callable[[], T]) -> tuple[T, float]:
        """Run ``function`` in the pool; return its result and the seconds it waited in line.

        The caller must hold a ticket; this returns it when the work is done (or
        was cancelled before it started).
        """
        submitted = time.perf_counter()
        started: list[float] = []

        def work() -> T:
            started.append(time.perf_counter())
            with self._lock:
                self._running += 1
            try:
                return function()
            finally:
                seconds = time.perf_counter() - started[0]
                with self._lock:
                    self._running -= 1
                    self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds
                if self.on_inference is not None:
                    self.on_inference(seconds)

        try:
            future: Future[T] = self._executor_or_new().submit(work)
        except BaseException:
            self.release()
            raise
        future.add_done_callback(lambda _: self.release())
        result = await asyncio.wrap_future(future)
        return result, started[0] - submitted

    def shutdown(self) -> None:
        """Stop the worker threads (waiting work is cancelled)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
