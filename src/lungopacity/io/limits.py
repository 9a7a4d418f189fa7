"""The readers' resource limits: how many pixels, and how many bytes, an input may cost.

Every reader checks the size an input *declares* (DICOM Rows x Columns x frames x
samples, a JPEG frame header, a JPEG 2000 SIZ segment, PNG's IHDR, TIFF's tags) against
``max_pixels`` before it decodes or inflates anything, so a small file that declares a
huge image is refused at the cost of reading its header.

Peak memory of a read (above what the caller already holds, i.e. the file's bytes) is
then bounded by the declared pixels: about ``2 x b + 4`` bytes per pixel, where ``b`` is
the decoder's bytes per sample (1 for 8-bit, 2 for 9-16-bit, 4 for 32-bit or float
samples) and 4 is the float32 result. That is at most 6 bytes per pixel for 8-bit
images, 8 for 16-bit and 12 for 32-bit; colour PNG/TIFF add 3 bytes per pixel for the
RGB buffer. ``benchmarks/bench_fuzz.py`` measures it (BENCHMARKS.md).
"""

from __future__ import annotations

#: Default ceiling on decoded pixels (decompression-bomb guard): 16k x 16k. A read of an
#: image at this limit costs about 1.1 GB for the float32 result alone; services that
#: must stay well under that pass a smaller limit (the web service uses 8192 x 8192).
DEFAULT_MAX_PIXELS = 16384 * 16384

#: Header bytes a DICOM may carry besides its pixels (Deflate inflation cap, file size cap).
HEADER_ALLOWANCE_BYTES = 64 * 1024 * 1024


def max_file_bytes(max_pixels: int) -> int:
    """Largest input file accepted: uncompressed 32-bit samples at the pixel limit, plus headers."""
    return int(max_pixels) * 4 + HEADER_ALLOWANCE_BYTES


def pixel_limit_cause(rows: int, cols: int, max_pixels: int, *, frames: int = 1, samples: int = 1, what: str = "image") -> str | None:
    """The refusal message when a declared size is over the limit (or empty), else None."""
    if rows <= 0 or cols <= 0:
        return f"{what} declares an empty size of {cols}x{rows} pixels"
    total = int(rows) * int(cols) * max(int(frames), 1) * max(int(samples), 1)
    if total > max_pixels:
        extra = ""
        if frames > 1 or samples > 1:
            extra = f" ({frames} frame(s) x {samples} sample(s))"
        return f"{what} of {cols}x{rows} pixels{extra} exceeds the limit of {max_pixels} pixels"
    return None


__all__ = ["DEFAULT_MAX_PIXELS", "HEADER_ALLOWANCE_BYTES", "max_file_bytes", "pixel_limit_cause"]
