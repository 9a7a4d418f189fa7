"""The one error base of the package, and the errors the library raises on purpose.

Every error that the library raises because an input, a setting or a file is wrong —
something a person can act on — derives from :class:`LungOpacityError`. Its message is
one line, ``"<what it concerns>: <cause>"``, where *what it concerns* names the file,
the row or the option; the command line prints exactly that line and exits non-zero,
and the web service answers it as a client error. Anything else that escapes is a bug.

Each subclass also derives from the built-in exception it stands for (``ValueError``,
``FileNotFoundError``, ...), so code that caught those before keeps working.

This module imports nothing from the package, so every layer may import it.
"""

from __future__ import annotations

from pathlib import Path


class LungOpacityError(Exception):
    """An error the library raises on purpose: one line naming what it concerns and why.

    Attributes:
        source: the file, row, option or upload the error concerns (None when there is
            no such thing, e.g. a bad combination of settings).
        cause: the problem, as one line.
    """

    def __init__(self, source: str | Path | None, cause: object | None = None) -> None:
        if cause is None:  # LungOpacityError("message") reads as the cause alone
            source, cause = None, source
        self.source = str(source) if source is not None else None
        self.cause = " ".join(str(cause).split())
        super().__init__(f"{self.source}: {self.cause}" if self.source else self.cause)

    def __reduce__(self):  # picklable across worker processes despite the two-argument init
        return (type(self), (self.source, self.cause))

    def __str__(self) -> str:
        return f"{self.source}: {self.cause}" if self.source else self.cause


class ImageReadError(LungOpacityError, ValueError):
    """An image file could not be read (or is not one the models may be shown).

    ``source`` is the file name, or ``"<upload>"`` for bytes without a name.
    """

    def __init__(self, source: str | Path | None, cause: object) -> None:
        super().__init__(source if source is not None else "<upload>", cause)


class DataFormatError(LungOpacityError, ValueError):
    """A table (labels CSV, metadata CSV, split file, predictions) is malformed."""


class ConfigError(LungOpacityError, ValueError):
    """A setting, option or argument value is not allowed (``source`` names the option, if any)."""


class RunFolderError(LungOpacityError, FileNotFoundError):
    """A training run folder is missing, incomplete, or of another kind."""


class RunExistsError(LungOpacityError, FileExistsError):
    """A folder already holds a run and would be overwritten."""


class CheckpointError(LungOpacityError, ValueError):
    """A checkpoint file is damaged, truncated or not one this package wrote."""


class TrainingDivergedError(LungOpacityError, FloatingPointError):
    """Training cannot go on: every step of an epoch had a non-finite loss (``source``: the epoch)."""


class BundleError(LungOpacityError, ValueError):
    """A model bundle that cannot be used: incompatible version, a missing or damaged part."""


class PretrainedWeightsError(LungOpacityError, RuntimeError):
    """Pretrained weights could not be obtained or do not fit the requested model."""


__all__ = [
    "BundleError",
    "CheckpointError",
    "ConfigError",
    "DataFormatError",
    "ImageReadError",
    "LungOpacityError",
    "PretrainedWeightsError",
    "RunExistsError",
    "RunFolderError",
    "TrainingDivergedError",
]
