"""The applicability gate: is this image one the model may be shown? (No labels needed.)

Two kinds of check, both per image, both in every output:

* **Header checks** (:class:`~lungopacity.inference.manifest.HeaderRules`): the DICOM
  Modality is a radiograph (CR, DX), BodyPartExamined is the chest, ViewPosition is a
  frontal view the model was trained on (AP, PA), the age (from the header, or given) lies
  inside the training range, and the image's size and aspect ratio are plausible for a
  chest radiograph. A check whose value is unknown (a PNG has no header) is not failed but
  listed as unchecked.
* **Image check**: the distance of the classifier's pooled features (``forward_features``
  then the global pool, for every ensemble member) to their training distribution. Each
  member's features on the images it trained on are modelled as a Gaussian with ``r``
  principal axes plus an isotropic residual (probabilistic PCA; a full covariance of
  ~1,000 dimensions cannot be estimated from a few hundred images). The squared
  Mahalanobis distance under that model, divided by the feature dimension, is compared
  with the member's threshold: the ``percentile`` (99) of the same distance over images
  the member did not train on. The image's ``feature_distance`` is the mean over members
  of ``distance / threshold``; above 1 the image fails. An in-distribution image that no
  member trained on exceeds a member's threshold with probability about 1 %.

An image that fails any check gets no decision (``decision: null``) and the reasons.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungopacity.errors import BundleError
from lungopacity.inference.manifest import ApplicabilityPart, HeaderRules

log = logging.getLogger(__name__)

APPLICABILITY_FILE = "applicability.safetensors"
#: Tensor names per member ``k``: ``member_{k}.<name>``.
FEATURE_MODEL_TENSORS: tuple[str, ...] = ("mean", "components", "eigenvalues", "residual_variance")


@dataclass
class FeatureModel:
    """Probabilistic-PCA Gaussian of one member's pooled features.

    Attributes:
        mean: ``(D,)`` mean feature vector.
        components: ``(r, D)`` orthonormal principal axes.
        eigenvalues: ``(r,)`` variances along them.
        residual_variance: variance of every other direction (mean of the discarded
            eigenvalues, floored).
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    residual_variance: float

    @property
    def dimension(self) -> int:
        return int(self.mean.shape[0])

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance per feature dimension, ``(N,)`` for ``(N, D)`` features."""
        centred = np.asarray(features, dtype=np.float64).reshape(-1, self.dimension) - self.mean
        projected = centred @ self.components.T
        along = (projected**2 / self.eigenvalues).sum(axis=1)
        residual = np.maximum((centred**2).sum(axis=1) - (projected**2).sum(axis=1), 0.0)
        return (along + residual / self.residual_variance) / self.dimension

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        values = {"mean": self.mean, "components": self.components, "eigenvalues": self.eigenvalues,
                  "residual_variance": np.array([self.residual_variance])}
        return {f"{prefix}.{k}": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in values.items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> FeatureModel:
        get = {k: tensors[f"{prefix}.{k}"].double().numpy() for k in FEATURE_MODEL_TENSORS}
        return cls(get["mean"], get["components"], get["eigenvalues"], float(get["residual_variance"][0]))


def load_feature_models(bundle: Path, part: ApplicabilityPart) -> list[FeatureModel]:
    """The per-member feature models of a bundle (the file's checksum was checked by read_manifest)."""
    from safetensors.torch import load_file

    path = bundle / part.weights.file
    try:
        tensors = load_file(str(path))
        return [FeatureModel.from_tensors(tensors, f"member_{k}") for k in range(len(part.thresholds))]
    except Exception as exc:  # a checksum-valid file of the wrong content is still a bad bundle
        raise BundleError(path, f"applicability models unusable ({type(exc).__name__}: {exc})") from None


@torch.no_grad()
def member_outputs(members: Sequence[torch.nn.Module], x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Every member's logits ``(K, B, C)`` and pooled features ``(K, B, D)`` in one forward pass each."""
    logits, features = [], []
    for member in members:
        feature_map = member.forward_features(x)  # type: ignore[operator]
        pooled = member.forward_head(feature_map, pre_logits=True)  # type: ignore[operator]
        logits.append(member.forward_head(feature_map).float().cpu().numpy())  # type: ignore[operator]
        features.append(pooled.float().flatten(1).cpu().numpy())
    return np.stack(logits), np.stack(features)


def dicom_tags(data: bytes) -> dict[str, str | None]:
    """Modality, BodyPartExamined and the raw ViewPosition of DICOM bytes ({} for other formats).

    The reader's header keeps only AP/PA views (a lateral is "unknown" there) and has no
    body part; the gate needs both, so it reads the three tags itself.
    """
    from lungopacity.io.images import sniff_format

    if sniff_format(data[:256]) != "dicom":
        return {}
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True,
                                 specific_tags=["Modality", "BodyPartExamined", "ViewPosition"])
    except Exception:  # noqa: BLE001 - the reader already decoded this file; tags are a bonus
        return {}

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        value = str(value).strip().upper() if value is not None else ""
        return value or None

    return {"modality": text("Modality"), "body_part": text("BodyPartExamined"), "view_position": text("ViewPosition")}


@dataclass
class Applicability:
    """The gate's verdict on one image.

    Attributes:
        applicable: False when any check failed: the image then gets no decision.
        reasons: one sentence per failed check.
        unchecked: checks that could not be made (the value is unknown), by name.
        feature_distance: mean over members of distance / threshold (> 1 fails); None
            when the bundle has no feature model.
    """

    applicable: bool = True
    reasons: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    feature_distance: float | None = None


#: The checks' names, as listed in ``unchecked``.
CHECKS: tuple[str, ...] = ("modality", "body_part", "view", "age", "image_size", "image_features")


class ApplicabilityGate:
    """The checks of a bundle (:class:`ApplicabilityPart`); without one, only the plausibility of the size."""

    def __init__(self, part: ApplicabilityPart | None, feature_models: list[FeatureModel] | None = None) -> None:
        self.part = part
        self.rules = part.header if part is not None else HeaderRules(age_range=None)
        self.feature_models = feature_models or []
        self.thresholds = np.asarray(part.thresholds if part is not None else [], dtype=np.float64)

    @classmethod
    def from_bundle(cls, bundle: Path, part: ApplicabilityPart | None) -> ApplicabilityGate:
        return cls(part, load_feature_models(bundle, part) if part is not None else None)

    def feature_distance(self, member_features: np.ndarray) -> np.ndarray | None:
        """Per image, the mean over members of distance / threshold; ``member_features`` is ``(K, B, D)``."""
        if not self.feature_models:
            return None
        if member_features.shape[0] != len(self.feature_models):
            raise BundleError("applicability", f"{member_features.shape[0]} members' features for "
                                               f"{len(self.feature_models)} feature models")
        ratios = [model.distance(features) / threshold
                  for model, features, threshold in zip(self.feature_models, member_features, self.thresholds)]
        return np.mean(ratios, axis=0)

    def check(
        self,
        size: tuple[int, int],
        metadata: Mapping[str, Any],
        tags: Mapping[str, str | None],
        feature_distance: float | None,
        modality: str | None = None,
    ) -> Applicability:
        """The verdict for one image.

        Args:
            size: (rows, cols) of the original image.
            metadata: the sex / age / view the reading uses (header or given).
            tags: :func:`dicom_tags` of the file ({} for PNG / JPEG).
            feature_distance: this image's entry of :meth:`feature_distance`.
            modality: the reader's header modality (used when ``tags`` lacks it).
        """
        rules = self.rules
        reasons: list[str] = []
        unchecked: list[str] = []
        modality = tags.get("modality") or (modality.strip().upper() if modality else None)
        if modality is None:
            unchecked.append("modality")
        elif modality not in rules.modalities:
            reasons.append(f"modality {modality} is not a radiograph ({'/'.join(rules.modalities)})")
        body_part = tags.get("body_part")
        if body_part is None:
            unchecked.append("body_part")
        elif body_part not in rules.body_parts:
            reasons.append(f"body part {body_part} is not the chest")
        view = tags.get("view_position") or metadata.get("view")
        if view is None:
            unchecked.append("view")
        elif str(view).upper() not in rules.views:
            reasons.append(f"view {view} is not a frontal view the model was trained on ({'/'.join(rules.views)})")
        age = metadata.get("age")
        if age is None or rules.age_range is None:
            unchecked.append("age")
        elif not rules.age_range[0] <= float(age) <= rules.age_range[1]:
            low, high = rules.age_range
            reasons.append(f"age {float(age):g} years is outside the training ages ({low:g}-{high:g} years)")
        rows, cols = size
        aspect = max(rows, cols) / max(1, min(rows, cols))
        if min(rows, cols) < rules.min_side:
            reasons.append(f"image {cols}x{rows} px is smaller than {rules.min_side} px on a side")
        elif aspect > rules.max_aspect:
            reasons.append(f"image {cols}x{rows} px has an aspect ratio of {aspect:.2f}, "
                           f"above {rules.max_aspect:.2f} for a chest radiograph")
        if feature_distance is None:
            unchecked.append("image_features")
        elif feature_distance > 1.0:
            reasons.append(
                f"the image does not resemble the training radiographs (feature distance {feature_distance:.2f} "
                f"times the threshold of the {self.part.percentile:g}th percentile of held-out training images)"
                if self.part is not None else "the image does not resemble the training radiographs"
            )
        return Applicability(not reasons, reasons, unchecked,
                             None if feature_distance is None else float(feature_distance))


__all__ = [
    "APPLICABILITY_FILE",
    "CHECKS",
    "Applicability",
    "ApplicabilityGate",
    "FeatureModel",
    "dicom_tags",
    "load_feature_models",
    "member_outputs",
]
