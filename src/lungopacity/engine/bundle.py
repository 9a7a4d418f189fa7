"""Building a model bundle from training runs (``lungopacity bundle``).

The training side writes what :mod:`lungopacity.inference.bundle` reads: weights as
safetensors, the manifest (:class:`lungopacity.inference.manifest.BundleManifest`) with the
calibration temperature fitted on held-out predictions, the operating threshold, the
box post-processing, the SHA-256 of every weight file and the model card, and the
reliability diagram ``calibration.png``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from lungopacity import __version__
from lungopacity.constants import CLASS_KEYS, CLASS_NAMES, LUNG_OPACITY
from lungopacity.engine.checkpoint import atomic_write_json
from lungopacity.errors import RunFolderError
from lungopacity.inference.bundle import sha256_file
from lungopacity.inference.manifest import (
    MANIFEST_FILE,
    BundleManifest,
    ClassifierPart,
    DetectorPart,
    FusionPart,
    Preprocessing,
    Threshold,
    WeightFile,
)
from lungopacity.metrics.classification import (
    expected_calibration_error,
    fit_temperature,
    roc_auc,
    softmax,
    threshold_at_sensitivity,
    youden_threshold,
)

log = logging.getLogger(__name__)

LOGIT_COLUMNS = tuple(f"logit_{key}" for key in CLASS_KEYS)


def _save_tensors(module: torch.nn.Module, path: Path) -> str:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    return sha256_file(path)


def _validation_logits(classifier_run: Path) -> pd.DataFrame:
    """The run's held-out logits: oof.csv (k-fold) or the validation predictions of fold 0."""
    for candidate in (classifier_run / "oof.csv", classifier_run / "fold_0" / "val_predictions.csv"):
        if candidate.exists():
            table = pd.read_csv(candidate, dtype={"patientId": str})
            if all(c in table.columns for c in LOGIT_COLUMNS):
                return table
    raise RunFolderError(classifier_run, "no held-out predictions (oof.csv or fold_0/val_predictions.csv)")


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
        from lungopacity.reports.calibration import reliability_figure

        reliability_figure(labels, before, after, figure)
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
    members = []
    for i, model in enumerate(models):
        name = f"classifier_{i}.safetensors"
        members.append(WeightFile(name, _save_tensors(model, out / name)))

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
        fusion_entry = FusionPart("fusion", tuple(fusion.features), sha256_file(out / "fusion" / "fusion.safetensors"))

    if target_sensitivity is not None:
        point = threshold_at_sensitivity(target, opacity_score, target_sensitivity)
        rule = f"sensitivity>={target_sensitivity:g}"
    else:
        point = youden_threshold(target, opacity_score)
        rule = "youden"
    threshold = Threshold(
        value=float(point.threshold), rule=rule, sensitivity=float(point.sensitivity),
        specificity=float(point.specificity), score="fused" if fusion_entry else "classifier",
    )

    detector_entry = None
    if detector_run is not None:
        detector_entry, detector_metrics = _bundle_detector(Path(detector_run), out)
        if detector_postprocess is not None:
            detector_entry = replace(detector_entry, postprocess=read_postprocess_choice(Path(detector_postprocess)))
        card_metrics.update({f"detector_{k}": v for k, v in detector_metrics.items()})

    cache_info = run_config.get("cache", {})
    manifest = BundleManifest(
        lungopacity_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        classifier=ClassifierPart(
            model_config=run_config["model"],
            preprocessing=Preprocessing(
                prepared_size=int(run_config["cache"]["size"]), input_size=int(run_config["input_size"]),
                window=str(run_config["cache"].get("window", "none")),
            ),
            members=tuple(members),
            temperature=calibration.temperature,
        ),
        fusion=fusion_entry,
        detector=detector_entry,
        threshold=threshold,
        model_card={
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
    )
    # What is written is what the runtime will accept: check it with the reader's own schema.
    BundleManifest.from_dict(json.loads(json.dumps(manifest.to_dict(), default=str)), out / MANIFEST_FILE)
    atomic_write_json(manifest.to_dict(), out / MANIFEST_FILE)
    log.info("bundle written to %s (%d classifier member(s)%s%s)", out, len(models),
             ", fusion" if fusion_entry else "", ", detector" if detector_entry else "")
    return out


def _bundle_detector(detector_run: Path, out: Path) -> tuple[DetectorPart, dict[str, float]]:
    """The detector's part of the manifest (its weights saved into ``out``) and its validation figures."""
    from lungopacity.engine.detector import load_detector_run

    run = load_detector_run(detector_run)
    sha = _save_tensors(run.model, out / "detector.safetensors")
    summary_path = detector_run / "val_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    metrics = {k: float(v) for k, v in summary.items()
               if k in ("best_val_rsna_map", "val_rsna_map_postprocessed", "n_val") and isinstance(v, (int, float))}
    # The detector takes the prepared image as it is and resizes inside itself (model_config.image_size).
    prepared = int(run.config["input_size"])
    part = DetectorPart(
        weights=WeightFile("detector.safetensors", sha),
        model_config=run.model.config(),
        preprocessing=Preprocessing(prepared_size=prepared, input_size=prepared,
                                    window=str(run.config.get("cache", {}).get("window", "none"))),
        postprocess=run.postprocess.to_dict(),
    )
    return part, metrics


def read_postprocess_choice(path: Path) -> dict[str, Any]:
    """A post-processing config from a JSON config or an evaluate-detector report."""
    from lungopacity.postprocess import PostprocessConfig

    if not path.exists():
        raise RunFolderError(path, "post-processing file not found")
    data = json.loads(path.read_text())
    if "variants" in data:
        data = data["variants"][data.get("main_variant", "tuned")]["postprocess"]
    return PostprocessConfig.from_dict(data).to_dict()


