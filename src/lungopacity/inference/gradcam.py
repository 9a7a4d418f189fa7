"""Grad-CAM of the Lung Opacity class: where in the image the classifier looked.

Selvaraju et al. (2017): the class score's gradient with respect to the final
feature map (the backbone's ``forward_features``), averaged over space, weights the feature channels; the ReLU of the weighted
sum is the map. With an ensemble, the maps of the members are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lungopacity.constants import LUNG_OPACITY


def grad_cam(
    models: Sequence[torch.nn.Module],
    x: torch.Tensor,
    *,
    class_index: int = LUNG_OPACITY,
    output_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Grad-CAM maps in [0, 1] for a batch.

    Args:
        models: classifiers with ``forward_features``/``forward_head`` (an ensemble is averaged).
        x: ``(B, 1, H, W)`` float input in [0, 1], as the models take it.
        class_index: the class whose evidence is shown (default Lung Opacity).
        output_size: (rows, cols) of the returned maps; default the input's size.

    Returns:
        float32 ``(B, rows, cols)``; each map scaled so its maximum is 1 (all zero when
        the class has no positive evidence).
    """
    output_size = output_size or (x.shape[-2], x.shape[-1])
    total = torch.zeros(x.shape[0], 1, *output_size)
    for model in models:
        # The final feature map is taken from forward_features and fed to forward_head, not
        # caught with a forward hook: hooks live on the shared module, so two requests
        # served at once would catch each other's activations.
        with torch.enable_grad():
            feature_map = model.forward_features(x.detach()).detach().requires_grad_(True)  # type: ignore[operator]
            logits = model.forward_head(feature_map)  # type: ignore[operator]
            (grads,) = torch.autograd.grad(logits[:, class_index].sum(), feature_map)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * feature_map).sum(dim=1, keepdim=True)).detach()
        cam = F.interpolate(cam.float().cpu(), size=output_size, mode="bilinear", align_corners=False)
        total += cam
    total = total[:, 0]
    peak = total.flatten(1).max(dim=1).values.clamp(min=1e-12).view(-1, 1, 1)
    return (total / peak).numpy().astype(np.float32)
