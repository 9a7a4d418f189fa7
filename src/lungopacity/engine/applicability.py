"""Fitting the applicability gate at bundle time (:mod:`lungopacity.inference.applicability`).

For every classifier member ``k``: its pooled features on (a sample of) the cache images
it trained on are fitted with a probabilistic-PCA Gaussian, and its threshold is the
99th percentile of the distance over the images it did not train on (its validation
fold): those are the held-out training images, seen neither by the member nor by its
feature model, so the threshold describes new images from the training distribution.
The header rules come from the training table (ages, sizes, views).

The same forward pass gives each member's logits on its held-out images, which the
bundle keeps for the uncertainty figures (member spread) without a second pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from lungopacity.data.preprocess import network_input
from lungopacity.errors import ConfigError
from lungopacity.inference.applicability import FeatureModel, member_outputs
from lungopacity.inference.manifest import HeaderRules

log = logging.getLogger(__name__)

#: Images per member at most for the fit and for the threshold (bounds the bundle's time on big caches).
MAX_IMAGES = 1000
N_COMPONENTS = 64
PERCENTILE = 99.0
#: Smallest accepted image side: half the smallest training side, and never more than this.
MIN_SIDE_CAP = 256
#: Largest accepted long/short side: at least this, or 1.25 x the largest training aspect.
MIN_MAX_ASPECT = 1.5


def fit_feature_model(features: np.ndarray, n_components: int = N_COMPONENTS) -> FeatureModel:
    """A probabilistic-PCA Gaussian of ``(N, D)`` features.

    At most ``N // 2`` axes are kept, so the residual variance is estimated from the
    directions left; it is floored at 1e-6 of the mean kept variance (never zero).
    """
    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    if n < 4:
        raise ConfigError(f"a feature model needs at least 4 images, got {n}")
    mean = x.mean(axis=0)
    _, singular, axes = np.linalg.svd(x - mean, full_matrices=False)
    variances = singular**2 / (n - 1)
    r = max(1, min(n_components, n // 2, d - 1))
    kept = variances[:r]
    residual = float(variances[r:].sum() / (d - r))
    residual = max(residual, 1e-6 * float(kept.mean()), 1e-12)
    return FeatureModel(mean, axes[:r], np.maximum(kept, residual), residual)


@dataclass
class MemberFit:
    """One member's gate and what its forward passes gave."""

    model: FeatureModel
    threshold: float
    n_fit: int
    n_held_out: int
    held_out_ids: list[str]
    held_out_logits: np.ndarray  # (n_held_out, C)
    held_out_distance: np.ndarray  # (n_held_out,) distance / threshold


def cache_outputs(
    member: torch.nn.Module,
    images: Callable[[int], np.ndarray],
    positions: Sequence[int],
    input_size: int,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """One member's logits ``(N, C)`` and pooled features ``(N, D)`` on cache images (by position)."""
    logits, features = [], []
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        x = network_input(np.stack([images(int(i)) for i in chunk]), size=input_size, device=device)
        member_logits, member_features = member_outputs([member], x)
        logits.append(member_logits[0])
        features.append(member_features[0])
    return np.concatenate(logits), np.concatenate(features)


def _sample(positions: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(positions) <= limit:
        return positions
    return np.sort(rng.choice(positions, size=limit, replace=False))


def fit_members(
    members: Sequence[torch.nn.Module],
    held_out_ids: Sequence[set[str]],
    table: pd.DataFrame,
    images: Callable[[int], np.ndarray],
    input_size: int,
    *,
    max_images: int = MAX_IMAGES,
    n_components: int = N_COMPONENTS,
    percentile: float = PERCENTILE,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[MemberFit]:
    """Fit every member's gate on the cache (``table``: usable rows, ``images(position)``: uint8 image).

    Args:
        members: the classifier members, in bundle order (eval mode).
        held_out_ids: per member, the patients it did not train on (its validation fold).
        table: the cache table, ``patientId`` per position.
        images: position -> prepared uint8 image.
        input_size: the classifier's input side.
    """
    rng = np.random.default_rng(seed)
    ids = table["patientId"].astype(str).to_numpy()
    fits = []
    for k, (member, held) in enumerate(zip(members, held_out_ids)):
        is_held = np.isin(ids, list(held))
        fit_positions = _sample(np.flatnonzero(~is_held), max_images, rng)
        held_positions = _sample(np.flatnonzero(is_held), max_images, rng)
        if len(held_positions) == 0:
            raise ConfigError(f"member {k} has no held-out images in the cache")
        _, fit_features = cache_outputs(member, images, fit_positions, input_size, device=device)
        held_logits, held_features = cache_outputs(member, images, held_positions, input_size, device=device)
        model = fit_feature_model(fit_features, n_components)
        distance = model.distance(held_features)
        threshold = float(np.percentile(distance, percentile))
        fits.append(MemberFit(model, threshold, len(fit_positions), len(held_positions),
                              ids[held_positions].tolist(), held_logits, distance / threshold))
        log.info("applicability member %d: %d-dimensional features, %d axes, fitted on %d images, "
                 "threshold %.3f (%gth percentile of %d held-out images)", k, model.dimension,
                 model.components.shape[0], len(fit_positions), threshold, percentile, len(held_positions))
    return fits


def header_rules(table: pd.DataFrame, views_seen: Sequence[str]) -> HeaderRules:
    """The header checks from the training table (``age``, ``orig_h``, ``orig_w``)."""
    ages = pd.to_numeric(table["age"], errors="coerce").dropna()
    sides = np.minimum(table["orig_h"].to_numpy(dtype=float), table["orig_w"].to_numpy(dtype=float))
    longs = np.maximum(table["orig_h"].to_numpy(dtype=float), table["orig_w"].to_numpy(dtype=float))
    aspect = float((longs / np.maximum(sides, 1)).max()) if len(sides) else 1.0
    views = tuple(v for v in ("AP", "PA") if v in set(views_seen)) or ("AP", "PA")
    return HeaderRules(
        views=views,
        age_range=(float(ages.min()), float(ages.max())) if len(ages) else None,
        min_side=int(max(1, min(MIN_SIDE_CAP, np.floor(sides.min() / 2)))) if len(sides) else 64,
        max_aspect=round(max(MIN_MAX_ASPECT, 1.25 * aspect), 3),
    )


__all__ = ["MAX_IMAGES", "N_COMPONENTS", "PERCENTILE", "MemberFit", "cache_outputs", "fit_feature_model",
           "fit_members", "header_rules"]
