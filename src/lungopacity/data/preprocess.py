"""Decoded pixels -> network input: the one preprocessing path of training and serving.

The pixel convention of the readers (float32 ``H x W`` in [0, 1], see
:func:`lungopacity.io.read_image`) becomes what a network sees in two steps, and only
these two functions perform them:

1. :func:`decode_prepared` — decode a file (allowing the reader a reduced-scale JPEG
   decode, since the image is made smaller anyway) and resize it to the *prepared size*
   ``S`` as uint8 (:func:`prepare_image`). This is what ``prepare`` stores in the cache,
   and what the predictor computes for every file it reads.
2. :func:`network_input` — a uint8 batch ``(B, 1, S, S)`` to float in [0, 1] on the
   device, resized to the network's input size when that differs from ``S`` (one
   antialiased bilinear resize, in torch), optionally channels-last. Training,
   evaluation, ``predict``, the service and the ONNX export all call it.

Models normalise inside themselves (mean/std from their pretrained config), so nothing
after this step changes pixel values. A training run and a bundle record the prepared
size and the input size, so serving repeats exactly what training did; the test suite
checks the two paths bit for bit on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from lungopacity.errors import ConfigError
from lungopacity.io.dicom import WINDOW_POLICIES as _READER_WINDOW_POLICIES

#: Window policies of the readers (see :func:`lungopacity.io.read_image`): ``none``
#: (never apply a VOI LUT/window), ``auto`` (the file's VOI LUT, or its window when
#: BitsStored > 8), ``file`` (whichever the file has). Training and serving must use the
#: same one; the prepared cache and the bundle record it.
WINDOW_POLICIES: tuple[str, ...] = tuple(_READER_WINDOW_POLICIES)


def prepare_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """float [0, 1] image -> uint8 ``size x size`` (antialiased bilinear; one rounding).

    Images are resized to a square whatever their aspect ratio (RSNA images are
    square); boxes map between prepared and original pixels by the two axis scales.
    """
    from PIL import Image

    if pixels.shape != (size, size):
        img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        pixels = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def decode_prepared(
    source: str | Path | bytes | BinaryIO,
    size: int,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
    window: str = "none",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode one image file as the prepared cache holds it: uint8 ``size x size`` and the header.

    The reader may decode a JPEG at a reduced scale (``min_size``), since the result is
    resized down to ``size`` anyway; the header keeps the original ``rows``/``cols``.
    ``window`` is the reader's window policy (:data:`WINDOW_POLICIES`); the header's
    ``window`` entry records what it applied.

    Raises:
        ImageReadError: the file cannot be read.
    """
    prepared, header, _ = decode_prepared_with_pixels(source, size, name=name, max_pixels=max_pixels, window=window)
    return prepared, header


def decode_prepared_with_pixels(
    source: str | Path | bytes | BinaryIO,
    size: int,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
    window: str = "none",
) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """:func:`decode_prepared` plus the decoded float pixels it was made from.

    The pixels are what the reader returned (possibly at a reduced scale for a JPEG, see
    :func:`decode_prepared`); the predictor draws its pictures from them instead of
    decoding the file a second time.
    """
    from lungopacity.io.images import read_image

    kwargs: dict[str, Any] = {"min_size": size, "name": name, "window": window}
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    pixels, header = read_image(source, **kwargs)
    return prepare_image(pixels, size), header, pixels


def network_input(
    images: torch.Tensor | np.ndarray,
    *,
    size: int | None = None,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """Prepared uint8 images -> the network's float input in [0, 1].

    Args:
        images: uint8 ``(B, 1, S, S)`` or ``(B, S, S)`` (a tensor or an array).
        size: the network's input side; None or ``S`` keeps the prepared size.
        device: where the batch goes (the resize runs there).
        channels_last: return a channels-last tensor (faster convolutions).
    """
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # a read-only memory map of the cache: torch wants writable memory
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ConfigError(f"network_input takes prepared uint8 images, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    x = x.to(device, non_blocking=True).float().div_(255.0)
    if size is not None and (x.shape[-2], x.shape[-1]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


__all__ = ["WINDOW_POLICIES", "decode_prepared", "decode_prepared_with_pixels", "network_input", "prepare_image"]
