"""The one error type of the readers."""

from __future__ import annotations

from pathlib import Path


class ImageReadError(ValueError):
    """An image file could not be read.

    The message is one line, ``"<file>: <cause>"``, so that a batch job can put it
    in an error table and a person can act on it.
    """

    def __init__(self, source: str | Path | None, cause: str) -> None:
        self.source = str(source) if source is not None else "<upload>"
        self.cause = " ".join(str(cause).split())
        super().__init__(f"{self.source}: {self.cause}")


class DataFormatError(ValueError):
    """A table (labels CSV, metadata CSV, split file) is malformed.

    Like :class:`ImageReadError`, the message names the file and the problem.
    """

    def __init__(self, source: str | Path, cause: str) -> None:
        self.source = str(source)
        self.cause = " ".join(str(cause).split())
        super().__init__(f"{self.source}: {self.cause}")
