"""Which torch device a command runs on: one rule for training and serving.

``auto`` is the local CUDA device when there is one (``LOCAL_RANK`` under ``torchrun``),
else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` name one. A device that this
machine does not have is a :class:`~lungopacity.errors.ConfigError` naming ``--device``,
not a CUDA traceback later.
"""

from __future__ import annotations

import os
import re

import torch

from lungopacity.errors import ConfigError

#: What ``--device`` accepts.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_HELP = "auto (a CUDA GPU when there is one, else the CPU) | cpu | cuda | cuda:N | mps."


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for ``device`` (see the module docstring).

    Raises:
        ConfigError: not a device name, or a device this machine does not have.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if not DEVICE_PATTERN.match(name):
        raise ConfigError("--device", f"{device!r} is not a device; use {DEVICE_HELP}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    resolved = torch.device(name)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device", f"{name} was asked for but this machine has no usable CUDA GPU; use cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError("--device", f"{name} was asked for but this machine has {torch.cuda.device_count()} GPU(s)")
    if resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("--device", "mps was asked for but this machine has no usable Apple GPU; use cpu or auto")
    return resolved


__all__ = ["DEVICE_HELP", "DEVICE_PATTERN", "resolve_device"]
