"""Class-activation heatmaps of the Lung Opacity class, and what they may be called.

Grad-CAM (Selvaraju et al. 2017): the class score's gradient with respect to a feature
map, averaged over space, weights the feature channels; the ReLU of the weighted sum is
the map. Classic Grad-CAM uses the final feature map (the backbone's ``forward_features``,
8 x 8 cells for a 256-px EfficientNet input). Options, as the field uses them to sharpen it:

* ``stages``: maps of earlier backbone stages (timm's ``feature_info``; ``-2`` is the
  stride-16 stage, 16 x 16 cells at 256 px), alone or several averaged (each scaled to
  a maximum of 1 first), ``"final"`` naming the final map;
* ``method="gradcam++"`` (Chattopadhay et al. 2018): channel weights from the positive
  gradients, weighted per cell by the second/third-order terms;
* ``hflip=True``: the map of the mirrored image, mirrored back, averaged with the plain one.

With an ensemble, the members' maps are averaged. Which variant is drawn by default (the
predictor's heatmap) is :data:`HEATMAP_METHOD`; how good it is on real boxes was measured with the pointing game
(``benchmarks/bench_pointing.py``, BENCHMARKS.md "Pointing game"), and
:data:`HEATMAP_CAPTION` is the one wording of what the picture may claim, chosen from that
finding: every picture, page and document that shows the map uses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lungopacity.constants import LUNG_OPACITY
from lungopacity.errors import ConfigError

#: The final feature map (what ``forward_features`` returns), as an entry of ``stages``.
FINAL = "final"
#: The Grad-CAM weighting schemes.
METHODS = ("gradcam", "gradcam++")

#: The variant :func:`grad_cam` draws by default, hence the predictor's heatmap (keyword
#: arguments of :func:`grad_cam`). Chosen by the pointing game on the 600 shared real RSNA
#: images (5-fold EfficientNet-Lite0, each image explained by its out-of-fold model;
#: BENCHMARKS.md "Pointing game"): of 11 variants, the final map and the stride-16 stage
#: averaged, with horizontal-flip averaging, put the maximum in an opacity box most often
#: (0.300 [0.227, 0.367] of 150 positives; the final map alone 0.227; a random point
#: 0.127). It costs about twice the final map alone.
HEATMAP_METHOD: Mapping[str, Any] = {"stages": (FINAL, -2), "method": "gradcam", "hflip": True}

#: Caption of the heatmap wherever it is shown (overlay picture, web page, docs), worded
#: after that finding: the map's maximum beats a random point (gain +0.173 [0.106, 0.238])
#: but lands in a box less often than a fixed, model-free prior of where opacities usually
#: are (0.560), so the map shows what raised the classifier's score, not where the opacity is.
HEATMAP_CAPTION = (
    "Regions that raised the classifier's opacity score (Grad-CAM). Not a localisation: on "
    "150 real RSNA images with opacity its hottest point lay inside a radiologist's box 30 % "
    "of the time (a random point: 13 %). For where, read the detector's boxes."
)
#: The short form, for a legend or a picture title.
HEATMAP_TITLE = "Opacity-score evidence (Grad-CAM), not a localisation"


def _stage_list(stages: Sequence[int | str]) -> list[int | str]:
    items = list(stages)
    if not items:
        raise ConfigError("stages: name at least one feature map ('final' or a stage index)")
    for stage in items:
        if stage != FINAL and not isinstance(stage, (int, np.integer)):
            raise ConfigError(f"stages: {stage!r} is neither 'final' nor a stage index")
    return items


def _channel_weights(grads: torch.Tensor, feature_map: torch.Tensor, method: str) -> torch.Tensor:
    if method == "gradcam":
        return grads.mean(dim=(2, 3), keepdim=True)
    # Grad-CAM++ under the exponential-score assumption (the usual closed form).
    grads_2, grads_3 = grads.pow(2), grads.pow(3)
    activation_sum = feature_map.sum(dim=(2, 3), keepdim=True)
    denominator = 2 * grads_2 + activation_sum * grads_3
    alpha = torch.where(grads != 0, grads_2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator)),
                        torch.zeros_like(grads))
    return (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)


def _model_maps(model: torch.nn.Module, x: torch.Tensor, stages: list[int | str], class_index: int,
                method: str, output_size: tuple[int, int]) -> list[torch.Tensor]:
    """One ``(B, 1, rows, cols)`` map per entry of ``stages`` for one model."""
    # The feature maps are taken from the forward pass and fed on, not caught with a forward
    # hook: hooks live on the shared module, so two requests served at once would catch
    # each other's activations.
    with torch.enable_grad():
        if stages == [FINAL]:
            final = model.forward_features(x.detach()).detach().requires_grad_(True)  # type: ignore[operator]
            maps_in = [final]
        else:
            indices = [int(stage) for stage in stages if stage != FINAL]
            if not hasattr(model, "forward_stages"):
                raise ConfigError(f"stages {indices}: {type(model).__name__} has no forward_stages")
            final, earlier = model.forward_stages(x.detach().requires_grad_(False), indices)  # type: ignore[operator]
            found = iter(earlier)
            maps_in = [final if stage == FINAL else next(found) for stage in stages]
        logits = model.forward_head(final)  # type: ignore[operator]
        grads = torch.autograd.grad(logits[:, class_index].sum(), maps_in)
    out = []
    for feature_map, grad in zip(maps_in, grads):
        feature_map = feature_map.detach()
        weights = _channel_weights(grad.detach(), feature_map, method)
        cam = F.relu((weights * feature_map).sum(dim=1, keepdim=True)).detach()
        out.append(F.interpolate(cam.float().cpu(), size=output_size, mode="bilinear", align_corners=False))
    return out


def _unit_peak(maps: torch.Tensor) -> torch.Tensor:
    peak = maps.flatten(1).max(dim=1).values.clamp(min=1e-12).view(-1, *([1] * (maps.ndim - 1)))
    return maps / peak


def grad_cam(
    models: Sequence[torch.nn.Module],
    x: torch.Tensor,
    *,
    class_index: int = LUNG_OPACITY,
    output_size: tuple[int, int] | None = None,
    stages: Sequence[int | str] | None = None,
    method: str | None = None,
    hflip: bool | None = None,
) -> np.ndarray:
    """Grad-CAM maps in [0, 1] for a batch.

    Args:
        models: classifiers with ``forward_features``/``forward_head`` (an ensemble is
            averaged); earlier ``stages`` need ``forward_stages``
            (:class:`lungopacity.models.classifier.OpacityClassifier`).
        x: ``(B, 1, H, W)`` float input in [0, 1], as the models take it.
        class_index: the class whose evidence is shown (default Lung Opacity).
        output_size: (rows, cols) of the returned maps; default the input's size.
        stages: the feature maps: ``"final"`` (``forward_features``) and/or backbone stage
            indices (negative from the end); several are averaged, each scaled to a
            maximum of 1 first. None: :data:`HEATMAP_METHOD`'s (final and stride 16).
        method: ``"gradcam"`` or ``"gradcam++"`` (None: :data:`HEATMAP_METHOD`'s).
        hflip: also explain the mirrored image, mirror its map back and average (None:
            :data:`HEATMAP_METHOD`'s, on). ``stages=("final",), hflip=False`` is the
            classic Grad-CAM of the final feature map.

    Returns:
        float32 ``(B, rows, cols)``; each map scaled so its maximum is 1 (all zero when
        the class has no positive evidence).

    Raises:
        ConfigError: unknown method or stage, or stages the model cannot give.
    """
    stages = HEATMAP_METHOD["stages"] if stages is None else stages
    method = str(HEATMAP_METHOD["method"]) if method is None else method
    hflip = bool(HEATMAP_METHOD["hflip"]) if hflip is None else hflip
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    stage_list = _stage_list(stages)
    output_size = output_size or (x.shape[-2], x.shape[-1])
    views = [(x, False)] + ([(x.flip(-1), True)] if hflip else [])
    total = torch.zeros(x.shape[0], 1, *output_size)
    for view, flipped in views:
        view_total = torch.zeros_like(total)
        for model in models:
            maps = _model_maps(model, view, stage_list, class_index, method, output_size)
            combined = maps[0] if len(maps) == 1 else torch.stack([_unit_peak(m) for m in maps]).mean(0)
            view_total += combined
        total += view_total.flip(-1) if flipped else view_total
    total = total[:, 0]
    return _unit_peak(total).numpy().astype(np.float32)
