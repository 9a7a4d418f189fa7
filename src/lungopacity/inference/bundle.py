"""Reading a model bundle: one folder that holds the whole trained system.

Layout::

    MODEL/
      bundle.json                      the manifest (:mod:`lungopacity.inference.manifest`)
      classifier_0.safetensors ...     one file per classifier (k-fold members are averaged)
      fusion/fusion.safetensors        the fusion network (optional)
      fusion/fusion.json               its feature encoder and architecture
      detector.safetensors             the opacity detector (optional)
      calibration.png                  reliability diagram before/after temperature scaling

Bundles are written by the training side (``lungopacity bundle``,
:mod:`lungopacity.engine.bundle`); this module only reads them, with no training code.
Loading checks the manifest against its schema, that every part is present, and the
checksums; anything wrong raises :class:`~lungopacity.errors.BundleError` with one line
that says what.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lungopacity.errors import BundleError
from lungopacity.inference.manifest import MANIFEST_FILE, BundleManifest
from lungopacity.models.classifier import OpacityClassifier, classifier_from_config

log = logging.getLogger(__name__)


def sha256_file(path: str | Path) -> str:
    """The SHA-256 hex digest of a file (how the manifest pins every weight file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | Path) -> BundleManifest:
    """The validated manifest of a bundle folder, after checking that every part is intact.

    Raises:
        BundleError: not a bundle, another format version, a field of the wrong type,
            a missing part, or a part that does not match its checksum.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise BundleError(path, "not a bundle folder (it does not exist or is a file)")
    if not manifest_path.exists():
        raise BundleError(path, f"not a bundle ({MANIFEST_FILE} missing); build one with `lungopacity bundle`")
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(manifest_path, f"damaged ({exc})") from None
    manifest = BundleManifest.from_dict(data, manifest_path)
    for part in manifest.weight_files:
        file = path / part.file
        if not file.is_file():
            raise BundleError(path, f"incomplete bundle: {part.file} is missing")
        if sha256_file(file) != part.sha256:
            raise BundleError(path, f"damaged bundle: {part.file} does not match its checksum")
    return manifest


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
        module.load_state_dict(state)
    except Exception as exc:  # a checksum-valid file that does not fit is still a bad bundle
        raise BundleError(path, f"weights do not fit the model described in {MANIFEST_FILE} ({exc})") from None


def _build(factory: Any, config: dict[str, Any], path: Path, what: str) -> torch.nn.Module:
    try:
        return factory(config)
    except Exception as exc:  # an unknown backbone or a bad config field in the manifest
        raise BundleError(path / MANIFEST_FILE, f"{what}.model_config does not describe a model ({exc})") from None


def load_classifiers(path: str | Path, manifest: BundleManifest, device: torch.device | str) -> list[OpacityClassifier]:
    """The classifier ensemble's members, in eval mode on ``device``."""
    path = Path(path)
    models = []
    for member in manifest.classifier.members:
        model = _build(classifier_from_config, manifest.classifier.model_config, path, "classifier")
        _load_weights(model, path / member.file)
        models.append(model.to(device).eval())
    return models  # type: ignore[return-value]


def load_detectors(path: str | Path, manifest: BundleManifest, device: torch.device | str) -> list[torch.nn.Module]:
    """The detector members in eval mode on ``device`` (none when the bundle has no detector)."""
    if manifest.detector is None:
        return []
    from lungopacity.models.detector import detector_from_config

    path = Path(path)
    models = []
    for member in manifest.detector.members:
        model = _build(detector_from_config, manifest.detector.model_config, path, "detector")
        _load_weights(model, path / member.file)
        models.append(model.to(device).eval())
    return models


def load_fusion_part(path: str | Path, manifest: BundleManifest) -> Any:
    """The fusion model, or None when the bundle has none."""
    if manifest.fusion is None:
        return None
    from lungopacity.models.fusion import load_fusion

    path = Path(path)
    try:
        return load_fusion(path / manifest.fusion.dir)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise BundleError(path, f"fusion part unusable ({exc})") from None


__all__ = ["BundleError", "load_classifiers", "load_detectors", "load_fusion_part", "read_manifest", "sha256_file"]
