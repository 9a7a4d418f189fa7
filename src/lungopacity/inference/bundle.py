"""The model bundle: one folder that holds the whole trained system.

Layout::

    MODEL/
      bundle.json                      what is inside, how to use it, the model card
      classifier_0.safetensors ...     one file per classifier (k-fold members are averaged)
      fusion/fusion.safetensors        the fusion network (optional)
      fusion/fusion.json               its feature encoder and architecture
      detector.safetensors             the opacity detector (optional)
      calibration.png                  reliability diagram before/after temperature scaling

``bundle.json`` carries the backbones and their configs (input size, normalisation),
class names, the calibration temperature, the operating threshold, the box
post-processing, the package version, the SHA-256 of every weight file, and a model
card (training data summary, validation metrics). Loading checks the format version,
that every part is present, and the checksums; anything wrong raises
:class:`BundleError` with a message that says what.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from lungopacity import __version__
from lungopacity.constants import CLASS_KEYS, CLASS_NAMES, LUNG_OPACITY
from lungopacity.engine.checkpoint import atomic_write_json
from lungopacity.errors import BundleError
from lungopacity.metrics.classification import (
    expected_calibration_error,
    fit_temperature,
    roc_auc,
    softmax,
    threshold_at_sensitivity,
    youden_threshold,
)
from lungopacity.models.classifier import OpacityClassifier, classifier_from_config

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "lungopacity-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "bundle.json"
LOGIT_COLUMNS = tuple(f"logit_{key}" for key in CLASS_KEYS)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_tensors(module: torch.nn.Module, path: Path) -> str:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    return _sha256(path)


def _validation_logits(classifier_run: Path) -> pd.DataFrame:
    """The run's held-out logits: oof.csv (k-fold) or the validation predictions of fold 0."""
    for candidate in (classifier_run / "oof.csv", classifier_run / "fold_0" / "val_predictions.csv"):
        if candidate.exists():
            table = pd.read_csv(candidate, dtype={"patientId": str})
            if all(c in table.columns for c in LOGIT_COLUMNS):
                return table
    raise FileNotFoundError(f"{classifier_run}: no held-out predictions (oof.csv or fold_0/val_predictions.csv)")


def _calibration_figure(labels: np.ndarray, before: np.ndarray, after: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lungopacity.metrics.classification import reliability_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    for probs, name in ((before, "before"), (after, "after temperature scaling")):
        curve = reliability_curve(labels, probs, n_bins=10)
        ece = expected_calibration_error(labels, probs, n_bins=10)
        mask = curve.count > 0
        ax.plot(curve.mean_predicted[mask], curve.observed_frequency[mask], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("predicted probability (top class)")
    ax.set_ylabel("observed frequency")
    ax.set_title("Reliability diagram, held-out patients")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class CalibrationResult:
    temperature: float
    ece_before: float
    ece_after: float
    n: int


def calibrate(held_out: pd.DataFrame, figure: Path | None = None) -> CalibrationResult:
    """Fit a temperature on held-out logits; report the calibration error before and after."""
    logits = held_out[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64)
    labels = held_out["class"].to_numpy(dtype=int)
    temperature = float(fit_temperature(logits, labels))
    before, after = softmax(logits), softmax(logits, temperature)
    result = CalibrationResult(
        temperature,
        float(expected_calibration_error(labels, before)),
        float(expected_calibration_error(labels, after)),
        len(labels),
    )
    if figure is not None:
        _calibration_figure(labels, before, after, figure)
    return result


# Written by train-fusion: held-out (cross-fitted) AUCs of metadata-only, image-only and fusion.
FUSION_METRICS_FILE = Path("report") / "fusion_metrics.json"


def _fusion_comparison(fusion_dir: Path) -> dict[str, Any] | None:
    """The fusion folder's cross-fitted comparison for the model card, with a warning when fusion loses.

    ``fused_opacity_auc`` in the card is measured on patients the fusion network trained
    on; this comparison is the unbiased one. When fusion scores below the image alone the
    bundle still uses it (that is what was asked for), but the user is told how to build
    one without it.
    """
    path = fusion_dir / FUSION_METRICS_FILE
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
        aucs = {name: float(entry["auc"]) for name, entry in report["models"].items()}
        versus_image = report.get("comparisons", {}).get("fusion_vs_image-only", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable fusion comparison (%s); the model card goes without it", path, exc)
        return None
    comparison: dict[str, Any] = {"held_out_auc": aucs, "n_patients": report.get("n_patients")}
    if "delong_p" in versus_image:
        comparison["fusion_vs_image_delong_p"] = float(versus_image["delong_p"])
    fusion_auc, image_auc = aucs.get("fusion"), aucs.get("image-only")
    if fusion_auc is not None and image_auc is not None and fusion_auc < image_auc:
        log.warning(
            "%s: the fusion network's held-out AUC %.4f is below the image classifier's %.4f "
            "(DeLong p = %s); the bundle's P(opacity) is the fused one: build it without --fusion "
            "to use the classifier's",
            fusion_dir, fusion_auc, image_auc,
            f"{comparison['fusion_vs_image_delong_p']:.3g}" if "fusion_vs_image_delong_p" in comparison else "n/a",
        )
    return comparison


def build_bundle(
    out: str | Path,
    classifier_run: str | Path,
    *,
    fusion_dir: str | Path | None = None,
    detector_run: str | Path | None = None,
    cache_dir: str | Path | None = None,
    target_sensitivity: float | None = None,
    detector_postprocess: str | Path | None = None,
) -> Path:
    """Assemble a bundle folder from training outputs.

    Args:
        out: the bundle folder to write (replaced if it exists).
        classifier_run: a ``train-classifier`` run (all its fold models go in).
        fusion_dir: a ``train-fusion`` output folder (optional).
        detector_run: a ``train-detector`` run (optional).
        cache_dir: the prepared cache the classifier was trained on, for the
            metadata the fusion network needs when choosing the threshold (default:
            the path recorded in the run).
        target_sensitivity: choose the operating threshold for this sensitivity on
            held-out patients instead of Youden's J.
        detector_postprocess: box post-processing to use instead of the detector run's
            own: an ``evaluate-detector`` ``report.json`` (its main variant, e.g. tuned
            with classifier gating) or a JSON post-processing config.
    """
    from lungopacity.data.cache import PreparedCache
    from lungopacity.engine.classifier import load_run_models

    out, classifier_run = Path(out), Path(classifier_run)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    models, run_config = load_run_models(classifier_run)
    weights = []
    for i, model in enumerate(models):
        name = f"classifier_{i}.safetensors"
        weights.append({"file": name, "sha256": _save_tensors(model, out / name)})

    held_out = _validation_logits(classifier_run)
    calibration = calibrate(held_out, out / "calibration.png")
    probs = softmax(held_out[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64), calibration.temperature)
    target = (held_out["class"].to_numpy() == LUNG_OPACITY).astype(int)
    opacity_score = probs[:, LUNG_OPACITY]
    card_metrics: dict[str, Any] = {
        "classifier_opacity_auc": float(roc_auc(target, opacity_score)),
        "n_held_out": int(len(held_out)),
        "ece_before": calibration.ece_before,
        "ece_after": calibration.ece_after,
    }

    fusion_entry = None
    if fusion_dir is not None:
        from lungopacity.models.fusion import load_fusion

        fusion_dir = Path(fusion_dir)
        fusion = load_fusion(fusion_dir)
        shutil.copytree(fusion_dir, out / "fusion", ignore=shutil.ignore_patterns("*.png", "*.md"))
        cache_path = Path(cache_dir) if cache_dir else Path(run_config["cache"]["path"])
        cache = PreparedCache(cache_path)
        meta = cache.table.set_index("patientId")[["sex", "age", "view"]]
        rows = held_out[["patientId"]].join(meta, on="patientId")
        for k, key in enumerate(CLASS_KEYS):
            rows[f"p_{key}"] = probs[:, k]
        opacity_score = fusion.predict(rows.drop(columns=["patientId"])).probability
        card_metrics["fused_opacity_auc"] = float(roc_auc(target, opacity_score))
        comparison = _fusion_comparison(fusion_dir)
        if comparison is not None:
            card_metrics["fusion_comparison"] = comparison
        fusion_entry = {
            "dir": "fusion",
            "features": list(fusion.features),
            "sha256": _sha256(out / "fusion" / "fusion.safetensors"),
        }

    if target_sensitivity is not None:
        point = threshold_at_sensitivity(target, opacity_score, target_sensitivity)
        rule = f"sensitivity>={target_sensitivity:g}"
    else:
        point = youden_threshold(target, opacity_score)
        rule = "youden"
    threshold = {
        "value": float(point.threshold),
        "rule": rule,
        "sensitivity": float(point.sensitivity),
        "specificity": float(point.specificity),
        "score": "fused" if fusion_entry else "classifier",
    }

    detector_entry = None
    if detector_run is not None:
        detector_entry = _bundle_detector(Path(detector_run), out)
        if detector_postprocess is not None:
            detector_entry["postprocess"] = read_postprocess_choice(Path(detector_postprocess))
        card_metrics.update({f"detector_{k}": v for k, v in detector_entry.pop("metrics", {}).items()})

    cache_info = run_config.get("cache", {})
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "lungopacity_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "class_names": list(CLASS_NAMES),
        "classifier": {
            "model_config": run_config["model"],
            "input_size": int(run_config["input_size"]),
            "normalization": {"mean": run_config["model"].get("mean"), "std": run_config["model"].get("std")},
            "members": weights,
            "temperature": calibration.temperature,
        },
        "fusion": fusion_entry,
        "detector": detector_entry,
        "threshold": threshold,
        "model_card": {
            "intended_use": (
                "A second read of a frontal chest radiograph for signs of lung opacity (pneumonia). "
                "Not a diagnosis: every result must be reviewed by a qualified clinician."
            ),
            "training_data": {
                "cache": cache_info.get("path"),
                "patients": cache_info.get("n"),
                "image_size": cache_info.get("size"),
                "classifier_backbone": run_config["model"].get("backbone"),
                "classifier_training": run_config.get("train"),
            },
            "validation": card_metrics,
            "calibration": {"temperature": calibration.temperature, "ece_before": calibration.ece_before,
                            "ece_after": calibration.ece_after, "n": calibration.n, "figure": "calibration.png"},
            "limitations": (
                "Trained on the data named above; performance on other populations, devices and views "
                "(lateral, paediatric) is unknown."
            ),
        },
    }
    atomic_write_json(manifest, out / MANIFEST)
    log.info("bundle written to %s (%d classifier member(s)%s%s)", out, len(models),
             ", fusion" if fusion_entry else "", ", detector" if detector_entry else "")
    return out


def _bundle_detector(detector_run: Path, out: Path) -> dict[str, Any]:
    from lungopacity.engine.detector import load_detector_run

    run = load_detector_run(detector_run)
    sha = _save_tensors(run.model, out / "detector.safetensors")
    metrics = {k: v for k, v in (run.config.get("best_metrics") or {}).items() if isinstance(v, (int, float))}
    return {
        "file": "detector.safetensors",
        "sha256": sha,
        "config": run.model.config(),
        "input_size": int(run.model.image_size),
        "postprocess": run.postprocess.to_dict(),
        "metrics": metrics,
    }


def read_postprocess_choice(path: Path) -> dict[str, Any]:
    """A post-processing config from a JSON config or an evaluate-detector report."""
    from lungopacity.engine.postprocess import PostprocessConfig

    if not path.exists():
        raise FileNotFoundError(f"{path}: post-processing file not found")
    data = json.loads(path.read_text())
    if "variants" in data:
        data = data["variants"][data.get("main_variant", "tuned")]["postprocess"]
    return PostprocessConfig.from_dict(data).to_dict()


# ------------------------------------------------------------------------ loading


def read_manifest(path: str | Path) -> dict[str, Any]:
    """``bundle.json`` of a bundle folder, checked for format, version and parts."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle folder (it does not exist or is a file)")
    if not manifest_path.exists():
        raise BundleError(f"{path}: not a bundle ({MANIFEST} missing); build one with `lungopacity bundle`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path}: damaged ({exc})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: not a lungopacity bundle (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format {version} was written by lungopacity {manifest.get('lungopacity_version')}; "
            f"this is lungopacity {__version__}, which reads format {BUNDLE_FORMAT_VERSION}: rebuild the bundle"
        )
    for key in ("classifier", "threshold", "class_names"):
        if not manifest.get(key):
            raise BundleError(f"{manifest_path}: incomplete bundle ({key!r} missing)")
    if list(manifest["class_names"]) != list(CLASS_NAMES):
        raise BundleError(f"{manifest_path}: classes {manifest['class_names']} differ from {list(CLASS_NAMES)}")
    files = [(m["file"], m["sha256"]) for m in manifest["classifier"]["members"]]
    if manifest.get("fusion"):
        files.append((f"{manifest['fusion']['dir']}/fusion.safetensors", manifest["fusion"]["sha256"]))
    if manifest.get("detector"):
        files.append((manifest["detector"]["file"], manifest["detector"]["sha256"]))
    for name, expected in files:
        part = path / name
        if not part.exists():
            raise BundleError(f"{path}: incomplete bundle: {name} is missing")
        if _sha256(part) != expected:
            raise BundleError(f"{path}: damaged bundle: {name} does not match its checksum")
    return manifest


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
        module.load_state_dict(state)
    except Exception as exc:  # a checksum-valid file that does not fit is still a bad bundle
        raise BundleError(f"{path}: weights do not fit the model described in {MANIFEST} ({exc})") from None


def load_classifiers(path: Path, manifest: dict[str, Any], device: torch.device) -> list[OpacityClassifier]:
    models = []
    for member in manifest["classifier"]["members"]:
        model = classifier_from_config(manifest["classifier"]["model_config"])
        _load_weights(model, path / member["file"])
        models.append(model.to(device).eval())
    return models


def load_detector(path: Path, manifest: dict[str, Any], device: torch.device) -> torch.nn.Module | None:
    entry = manifest.get("detector")
    if not entry:
        return None
    from lungopacity.models.detector import detector_from_config

    model = detector_from_config(entry["config"])
    _load_weights(model, path / entry["file"])
    return model.to(device).eval()


def load_fusion_part(path: Path, manifest: dict[str, Any]) -> Any:
    entry = manifest.get("fusion")
    if not entry:
        return None
    from lungopacity.models.fusion import load_fusion

    try:
        return load_fusion(path / entry["dir"])
    except (FileNotFoundError, ValueError) as exc:
        raise BundleError(f"{path}: fusion part unusable ({exc})") from None

