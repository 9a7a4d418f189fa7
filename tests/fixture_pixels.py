"""Hand-built pixels shared by the DICOM syntax tests and their fixture generator."""

from __future__ import annotations

import numpy as np


def lossless_fixture_pixels(bits: int, signed: bool, shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A deterministic image using the whole range of ``bits`` (smooth ramps plus a hard edge)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    top = 2**bits - 1
    values = (rows * 977 + cols * 131 + (rows * cols) % 97) % (top + 1)
    values[shape[0] // 2 :, : shape[1] // 4] = top  # a saturated block: edges for the predictor
    values[0, 0], values[-1, -1] = 0, top
    if signed:
        values = values - 2 ** (bits - 1)
    return values.astype(np.int64)
