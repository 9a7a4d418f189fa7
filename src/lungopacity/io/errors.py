"""The readers' error types (defined with the package's error base in :mod:`lungopacity.errors`)."""

from lungopacity.errors import DataFormatError, ImageReadError

__all__ = ["DataFormatError", "ImageReadError"]
