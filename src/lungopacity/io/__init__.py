"""Files on disk -> arrays and tables: image readers and the RSNA data layer."""

from lungopacity.io.errors import DataFormatError, ImageReadError
from lungopacity.io.images import IMAGE_EXTENSIONS, WINDOW_POLICIES, read_image, sniff_format

__all__ = ["DataFormatError", "ImageReadError", "IMAGE_EXTENSIONS", "WINDOW_POLICIES", "read_image", "sniff_format"]
