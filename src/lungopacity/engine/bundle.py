"""Building a model bundle from training runs (``lungopacity bundle``).

The training side writes what :mod:`lungopacity.inference.bundle` reads: weights as
safetensors, the manifest (:class:`lungopacity.inference.manifest.BundleManifest`), the
reliability diagram ``calibration.png`` and the applicability models.

What ``bundle`` decides, and how (all on held-out predictions, never on patients a model
trained on):

* **Which component makes the decision.** With ``--fusion``, the fusion network is kept
  only when its cross-fitted AUC (train-fusion's ``report/fusion_metrics.json``: every
  patient scored by a fusion network trained on the other folds) is **at least** the
  image classifier's out-of-fold AUC on the same patients; otherwise the bundle is
  image-only and the model card says why, with the figures (:data:`FUSION_RULE`). The
  rule compares point estimates rather than asking fusion to be *significantly* worse:
  fusion adds a second model, a dependence on sex / age / view (imputed for a PNG) and a
  second calibration, so it has to earn its place; with a few hundred patients a real
  loss is rarely significant, and "not significantly worse" would keep it then.
* **Calibration of the final P(opacity)**: a temperature fitted on the held-out
  predictions of exactly that probability (:mod:`lungopacity.engine.calibration`); the
  model card's ``calibration`` block and ``calibration.png`` are the same numbers.
* **The operating threshold**: Youden's J (or a target sensitivity) on the calibrated
  held-out final probability.
* **Provenance**: the training data (synthetic or real, source folder, patients per
  class, views, sexes, ages, image sizes) from the cache the run recorded; validation
  figures with 95 % intervals.
* **Applicability**: the per-member feature models and header rules
  (:mod:`lungopacity.engine.applicability`).

The calls into the training code (the run's fold models, the cache) are in
:func:`_run_members`, :func:`_member_held_out_ids` and :func:`_open_cache`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from lungopacity import __version__
from lungopacity.constants import CLASS_NAMES, LUNG_OPACITY
from lungopacity.engine.calibration import (
    CalibrationSummary,
    calibration_summary,
    cross_fitted,
    fit_opacity_temperature,
    fit_probability_temperature,
    opacity_from_logits,
)
from lungopacity.data.cache import PreparedCache
from lungopacity.devices import resolve_device
from lungopacity.engine.checkpoint import atomic_write_json
from lungopacity.engine.runs import LOGIT_COLUMNS, PROBABILITY_COLUMNS, ClassifierRun, load_classifier_run
from lungopacity.errors import ConfigError, RunFolderError
from lungopacity.inference.applicability import APPLICABILITY_FILE
from lungopacity.inference.bundle import sha256_file
from lungopacity.inference.manifest import (
    MANIFEST_FILE,
    MIN_TRAINING_PATIENTS,
    ApplicabilityPart,
    BundleManifest,
    ClassifierPart,
    DetectorPart,
    FusionPart,
    Preprocessing,
    Threshold,
    TrainingData,
    WeightFile,
    scale_probability,
)
from lungopacity.metrics.classification import (
    bootstrap_auc_ci,
    delong_test,
    roc_auc,
    sensitivity_specificity,
    threshold_at_sensitivity,
    youden_threshold,
)

log = logging.getLogger(__name__)



def _save_tensors(module: torch.nn.Module, path: Path) -> str:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    return sha256_file(path)


# ------------------------------------------------------------------ the training side's outputs
# The only calls into the training code; the integrator adapts them to the typed run folders.


def check_ensemble_runs(runs: Sequence[ClassifierRun]) -> None:
    """Several classifier runs can share one bundle only as one architecture on one split.

    A bundle holds one model config for all members (logits averaged), and its held-out
    figures need every patient held out by the same fold in every run; so the runs must
    agree on the model config, the input size, the cache (its patients) and the folds.

    Raises:
        ConfigError: naming the run that differs and how.
    """
    first = runs[0]
    for other in runs[1:]:
        differences = []
        if other.model_config != first.model_config:
            differences.append(f"model {other.model_config.get('backbone')} vs {first.model_config.get('backbone')}"
                               if other.model_config.get("backbone") != first.model_config.get("backbone")
                               else "model config")
        if other.input_size != first.input_size:
            differences.append(f"input size {other.input_size} vs {first.input_size}")
        if (other.cache.patients_hash, other.cache.size, other.cache.window) != \
                (first.cache.patients_hash, first.cache.size, first.cache.window):
            differences.append("prepared cache (patients, size or window)")
        if other.folds != first.folds:
            differences.append(f"folds {other.folds} vs {first.folds}")
        if other.path.resolve() == first.path.resolve():
            differences.append("the same run twice")
        if differences:
            raise ConfigError("--classifier", f"{other.path} cannot join {first.path} in one bundle: "
                                              + ", ".join(differences))


def ensemble_held_out(runs: Sequence[ClassifierRun]) -> pd.DataFrame:
    """The held-out table of the runs' members together: per patient the mean of the runs' logits.

    Each patient's logits in a run come from the fold model that did not train on it;
    with the runs on the same folds, their mean is what the members that never saw the
    patient say together (at run time all members are averaged alike). One run: its table.

    Raises:
        RunFolderError: a run holds out other patients, or the same patient in another fold.
    """
    tables = [r.held_out_predictions() for r in runs]
    if len(tables) == 1:
        return tables[0]
    first = tables[0].set_index("patientId")
    logits = first[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64)
    for r, table in zip(runs[1:], tables[1:]):
        table = table.set_index("patientId")
        if set(table.index) != set(first.index):
            raise RunFolderError(r.held_out_path, f"holds out {len(table)} patients, {runs[0].held_out_path} "
                                                  f"{len(first)}: the runs must be on the same cache and folds")
        table = table.loc[first.index]
        if "fold" in first.columns and (table["fold"].to_numpy() != first["fold"].to_numpy()).any():
            raise RunFolderError(r.held_out_path, "holds patients out in other folds than "
                                                  f"{runs[0].held_out_path}: train on the same cache's folds")
        logits = logits + table[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64)
    logits /= len(tables)
    merged = first.copy()
    merged[list(LOGIT_COLUMNS)] = logits
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    merged[list(PROBABILITY_COLUMNS)] = shifted / shifted.sum(axis=1, keepdims=True)
    return merged.reset_index()


def _member_held_out_ids(run: ClassifierRun, n_members: int) -> list[set[str]]:
    """Per member, the patients it did not train on: its fold's validation predictions."""
    held = []
    for k in range(n_members):
        path = run.val_predictions_path(k)
        if not path.exists():
            raise RunFolderError(path, "missing: the run's validation predictions tell which patients member "
                                       f"{k} did not train on")
        held.append(set(pd.read_csv(path, dtype={"patientId": str}, usecols=["patientId"])["patientId"]))
    return held


# ------------------------------------------------------------------------------ calibration


def calibrate_image(held_out: pd.DataFrame) -> CalibrationSummary:
    """Temperature scaling of the classifier's held-out logits, judged on P(opacity).

    The temperature minimises the binary NLL of P(opacity); the cross-fitted ECE refits
    it with each fold left out (``fold`` column), or on five seeded groups without one.
    """
    logits = held_out[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64)
    target = (held_out["class"].to_numpy() == LUNG_OPACITY).astype(int)
    temperature = fit_opacity_temperature(logits, target)
    groups = held_out["fold"].to_numpy() if "fold" in held_out.columns and held_out["fold"].nunique() > 1 \
        else np.random.default_rng(0).integers(0, 5, len(held_out))
    after_cross = cross_fitted(fit_opacity_temperature, lambda t, z, _: opacity_from_logits(z, t), groups,
                               logits, target)
    return calibration_summary(
        target, opacity_from_logits(logits), opacity_from_logits(logits, temperature), temperature=temperature,
        quantity="opacity_probability = image_probability (classifier ensemble)",
        method="temperature scaling of the classifier logits: T minimises the binary negative log-likelihood "
               "of P(opacity) = softmax(logits / T)[Lung Opacity] on the out-of-fold predictions",
        after_cross_fitted=after_cross,
    )


def calibrate_fusion(scores: pd.DataFrame) -> CalibrationSummary:
    """Temperature scaling of the fusion network's cross-fitted output (``p_fusion``, ``Target``, ``fold``)."""
    probability = scores["p_fusion"].to_numpy(dtype=np.float64)
    target = scores["Target"].to_numpy(dtype=int)
    temperature = fit_probability_temperature(probability, target)
    after_cross = cross_fitted(fit_probability_temperature, lambda t, p, _: scale_probability(p, t),
                               scores["fold"].to_numpy(), probability, target)
    return calibration_summary(
        target, probability, scale_probability(probability, temperature), temperature=temperature,
        quantity="opacity_probability = fused probability (fusion network)",
        method="temperature scaling of the fusion network's output, sigmoid(logit(p) / T), T minimising the "
               "binary negative log-likelihood on its cross-fitted predictions (each patient scored by a "
               "network trained on the other folds)",
        after_cross_fitted=after_cross,
    )


# ------------------------------------------------------------------------------- fusion rule

#: Written by train-fusion: held-out (cross-fitted) AUCs of metadata-only, image-only and fusion,
#: and the per-patient scores they come from.
FUSION_METRICS_FILE = Path("report") / "fusion_metrics.json"
FUSION_SCORES_FILE = Path("report") / "cross_fitted_scores.csv"
FUSION_RULE = (
    "fusion is kept iff its cross-fitted AUC (train-fusion's report/fusion_metrics.json) is at least the image "
    "classifier's out-of-fold AUC on the same patients; otherwise the bundle is image-only"
)


@dataclass
class FusionEvidence:
    """The cross-fitted comparison of fusion with the image alone, and the per-patient scores."""

    fusion_auc: float
    image_auc: float
    delong_p: float | None
    n_patients: int
    source: str
    scores: pd.DataFrame  # patientId, fold, Target, p_image, p_fusion
    aucs: dict[str, float]

    @property
    def keep(self) -> bool:
        return self.fusion_auc >= self.image_auc

    def card(self) -> dict[str, Any]:
        kept = self.keep
        p = "n/a" if self.delong_p is None else f"{self.delong_p:.3g}"
        reason = (
            f"fusion kept: its cross-fitted AUC {self.fusion_auc:.4f} is at least the image classifier's "
            f"{self.image_auc:.4f} on the same {self.n_patients} patients (DeLong p = {p})"
            if kept else
            f"fusion dropped, the image classifier decides: the fusion network's cross-fitted AUC "
            f"{self.fusion_auc:.4f} is below the image classifier's {self.image_auc:.4f} on the same "
            f"{self.n_patients} patients (DeLong p = {p})"
        )
        return {"component": "fusion" if kept else "image", "rule": FUSION_RULE, "fusion_kept": kept,
                "reason": reason, "held_out_auc": self.aucs, "fusion_vs_image_delong_p": self.delong_p,
                "n_patients": self.n_patients, "evidence": self.source}


def _fusion_evidence(fusion_dir: Path, held_out: pd.DataFrame, table: pd.DataFrame, seed: int) -> FusionEvidence:
    """Train-fusion's comparison and cross-fitted scores (recomputed when the folder predates the scores file)."""
    scores_path = fusion_dir / FUSION_SCORES_FILE
    if scores_path.exists():
        scores = pd.read_csv(scores_path, dtype={"patientId": str})
        source = str(FUSION_SCORES_FILE)
    else:
        from lungopacity.engine.fusion import OOF_COLUMNS, cross_fit_scores

        log.info("%s: no %s; cross-fitting the fusion network again (seed %d)", fusion_dir, FUSION_SCORES_FILE, seed)
        meta = table.set_index("patientId")[["sex", "age", "view"]]
        rows = held_out[["patientId", "class", "Target"]].join(meta, on="patientId")
        scores = cross_fit_scores(rows, held_out[list(OOF_COLUMNS)], seed=seed)
        source = "cross-fitted again at bundle time (engine.fusion.cross_fit_scores)"
    missing = [c for c in ("patientId", "fold", "Target", "p_image", "p_fusion") if c not in scores.columns]
    if missing:
        raise RunFolderError(scores_path, f"lacks columns {missing}")
    labels = scores["Target"].to_numpy(dtype=int)
    aucs = {"image-only": roc_auc(labels, scores["p_image"]), "fusion": roc_auc(labels, scores["p_fusion"])}
    delong_p: float | None = float(delong_test(labels, scores["p_fusion"], scores["p_image"]).p)
    n_patients = len(scores)
    metrics_path = fusion_dir / FUSION_METRICS_FILE
    if metrics_path.exists():
        try:  # the report is what the user read: its figures are the ones the rule applies to
            report = json.loads(metrics_path.read_text())
            aucs = {name: float(entry["auc"]) for name, entry in report["models"].items()}
            versus = report.get("comparisons", {}).get("fusion_vs_image-only", {})
            delong_p = float(versus["delong_p"]) if "delong_p" in versus else None
            n_patients = int(report.get("n_patients", n_patients))
            source = f"{FUSION_METRICS_FILE} ({source} for the calibration)"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable (%s); the comparison is recomputed from the scores", metrics_path, exc)
    return FusionEvidence(aucs["fusion"], aucs["image-only"], delong_p, n_patients, source, scores, aucs)


# ------------------------------------------------------------------------------ provenance

#: Source files sampled to tell synthetic from real training data.
PROVENANCE_SAMPLE = 16


def _synthetic(paths: list[str]) -> tuple[bool | None, str]:
    """Whether sampled source files are lungopacity's synthetic phantoms, and the evidence."""
    from lungopacity.io.dicom import read_dicom_header
    from lungopacity.io.images import sniff_format

    existing = [Path(p) for p in paths if isinstance(p, str) and Path(p).is_file()]
    if not existing:
        return None, f"none of the {len(paths)} sampled source files exists any more"
    dicoms, marked = 0, 0
    for path in existing:
        with open(path, "rb") as handle:
            if sniff_format(handle.read(256)) != "dicom":
                continue
        dicoms += 1
        try:
            marked += bool(read_dicom_header(path).get("synthetic"))
        except Exception:  # noqa: BLE001 - an unreadable sample is not evidence either way
            dicoms -= 1
    if dicoms == 0:
        return False, (f"the {len(existing)} sampled source files are PNG/JPEG, which cannot carry the synthetic "
                       "marker; lungopacity's phantoms are always DICOMs with it")
    if marked == 0:
        return False, f"none of {dicoms} sampled source DICOMs carries the lungopacity synthetic marker"
    return True, f"{marked} of {dicoms} sampled source DICOMs carry the lungopacity synthetic marker"


def _counts(values: pd.Series, names: list[str]) -> dict[str, int]:
    """Patients per value: ``names`` first (zero when absent), then any other value, ``unknown`` for missing."""
    text = values.astype(object).where(values.notna(), "unknown").astype(str)
    counts = text.value_counts()
    out = {name: int(counts.get(name, 0)) for name in names}
    out.update({str(k): int(v) for k, v in sorted(counts.items()) if k not in out})
    return out


def training_data(cache: Any, table: pd.DataFrame) -> TrainingData:
    """The model card's provenance block from the cache the classifier was trained on."""
    step = max(1, len(table) // PROVENANCE_SAMPLE)
    synthetic, evidence = _synthetic(table["path"].iloc[::step].head(PROVENANCE_SAMPLE).tolist())
    source = cache.meta.get("source")
    ages = pd.to_numeric(table["age"], errors="coerce").dropna()
    return TrainingData(
        synthetic=synthetic,
        synthetic_evidence=evidence,
        source_folder=Path(str(source)).name if source else None,
        n_patients=int(len(table)),
        patients_per_class={CLASS_NAMES[int(k)]: int(v) for k, v in table["class"].value_counts().sort_index().items()},
        views=_counts(table["view"], ["AP", "PA"]),
        sexes=_counts(table["sex"], ["F", "M"]),
        age_range=(float(ages.min()), float(ages.max())) if len(ages) else None,
        image_rows=(float(table["orig_h"].min()), float(table["orig_h"].max())),
        image_cols=(float(table["orig_w"].min()), float(table["orig_w"].max())),
        prepared_size=int(cache.size),
    )


def _limitations(data: TrainingData, decision_source: str) -> list[str]:
    out = []
    if data.synthetic:
        out.append("Trained on synthetic phantoms: a demonstration of the software, not a model for real images.")
    if data.n_patients < MIN_TRAINING_PATIENTS:
        out.append(f"Trained on {data.n_patients:,} patients (fewer than {MIN_TRAINING_PATIENTS:,}): the figures "
                   "below have wide intervals.")
    ages = f"{data.age_range[0]:g}-{data.age_range[1]:g} years" if data.age_range else "unknown ages"
    out += [
        f"Frontal ({'/'.join(k for k in data.views if k != 'unknown')}) chest radiographs of {ages} only; other "
        "views, ages outside that range and other modalities get no decision (applicability gate).",
        f"One source ({data.source_folder or 'unknown'}): performance on other hospitals, devices and populations "
        "is unknown.",
        "The validation figures are out-of-fold: each patient was scored by the one fold model that did not train "
        "on it; the bundle averages all fold models, which usually does slightly better. The threshold was chosen "
        "on these same patients, so sensitivity and specificity are optimistic.",
    ]
    if decision_source == "fusion":
        out.append("The decision uses sex, age and view; a missing value is imputed with the training statistic "
                   "(reported per reading), which makes the reading less reliable.")
    return out


def _wilson(successes: int, n: int, z: float = 1.959964) -> list[float] | None:
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(centre - half), float(centre + half)]


def _validation(target: np.ndarray, final: np.ndarray, image: np.ndarray, threshold: float,
                decision_source: str, n_boot: int = 2000) -> dict[str, Any]:
    final_ci = bootstrap_auc_ci(target, final, n_boot=n_boot, seed=0)
    image_ci = bootstrap_auc_ci(target, image, n_boot=n_boot, seed=0)
    sensitivity, specificity = sensitivity_specificity(target, final, threshold)
    n_pos, n_neg = int(target.sum()), int((1 - target).sum())
    called = final >= threshold
    return {
        "final_auc": final_ci.auc, "final_auc_ci95": [final_ci.lo, final_ci.hi],
        "image_auc": image_ci.auc, "image_auc_ci95": [image_ci.lo, image_ci.hi],
        "sensitivity": sensitivity, "sensitivity_ci95": _wilson(int((called & (target == 1)).sum()), n_pos),
        "specificity": specificity, "specificity_ci95": _wilson(int((~called & (target == 0)).sum()), n_neg),
        "threshold": threshold, "n_held_out": int(target.size), "n_opacity": n_pos,
        "decision_source": decision_source,
        "method": (
            "held-out predictions only: the classifier's out-of-fold predictions (each patient scored by the fold "
            "model that did not train on it)"
            + (", fused by networks cross-fitted on the other folds" if decision_source == "fusion" else "")
            + f"; AUC intervals: {n_boot} stratified bootstrap resamples of patients (seed 0); sensitivity and "
              "specificity intervals: Wilson score, at the bundle's threshold (chosen on these patients)"
        ),
    }


# --------------------------------------------------------------------------------- the build


def build_bundle(
    out: str | Path,
    classifier_run: str | Path | Sequence[str | Path],
    *,
    fusion_dir: str | Path | None = None,
    detector_run: str | Path | Sequence[str | Path] | None = None,
    cache_dir: str | Path | None = None,
    target_sensitivity: float | None = None,
    detector_postprocess: str | Path | None = None,
    device: str = "cpu",
    max_gate_images: int | None = None,
) -> Path:
    """Assemble a bundle folder from training outputs (see the module docstring for what it decides).

    Args:
        out: the bundle folder to write (replaced if it exists).
        classifier_run: a ``train-classifier`` run (all its fold models go in), or several
            runs of one architecture on the same cache and folds (e.g. seeds): all their
            fold models go in and the held-out logits are averaged (:func:`ensemble_held_out`).
        fusion_dir: a ``train-fusion`` output folder (optional; kept only by :data:`FUSION_RULE`).
        detector_run: a ``train-detector`` run (optional), or several of one architecture
            and input (e.g. seeds): each is a member whose boxes are pooled with the others'
            and merged by the post-processing's fusion, so several runs need
            ``detector_postprocess`` with NMS or WBF (tuned on the pooled detections, e.g.
            ``benchmarks/bench_detector_oof.py --write-postprocess``).
        cache_dir: the prepared cache the classifier was trained on (default: the path
            recorded in the run): provenance, metadata and the applicability fit.
        target_sensitivity: choose the operating threshold for this sensitivity on
            held-out patients instead of Youden's J.
        detector_postprocess: box post-processing to use instead of the detector run's
            own: an ``evaluate-detector`` ``report.json`` (its main variant, e.g. tuned
            with classifier gating) or a JSON post-processing config.
        device: where the members compute the features of the applicability fit
            (``auto``: a GPU when there is one).
        max_gate_images: images per member for the applicability fit and threshold
            (default :data:`lungopacity.engine.applicability.MAX_IMAGES`).
    """
    from lungopacity.engine.applicability import MAX_IMAGES, PERCENTILE, fit_members, header_rules

    out = Path(out)
    device = str(resolve_device(device))  # "auto" (the CLI's default) is not a torch device
    run_paths = [Path(classifier_run)] if isinstance(classifier_run, (str, Path)) else [Path(r) for r in classifier_run]
    if not run_paths:
        raise ConfigError("--classifier", "give at least one classifier run")
    runs = [load_classifier_run(path) for path in run_paths]
    run = runs[0]
    check_ensemble_runs(runs)
    run_models = [member_run.load_models() for member_run in runs]
    models = [model for member_models in run_models for model in member_models]
    cache = PreparedCache(Path(cache_dir) if cache_dir else run.cache.path)
    table = cache.table.iloc[cache.indices()].reset_index(drop=True)
    held_out = ensemble_held_out(runs)
    held_ids = [ids for member_run, member_models in zip(runs, run_models)
                for ids in _member_held_out_ids(member_run, len(member_models))]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    members = []
    for i, model in enumerate(models):
        name = f"classifier_{i}.safetensors"
        members.append(WeightFile(name, _save_tensors(model, out / name)))

    target = (held_out["class"].to_numpy() == LUNG_OPACITY).astype(int)
    image_calibration = calibrate_image(held_out)
    logits = held_out[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64)
    image_probability = opacity_from_logits(logits, image_calibration.temperature)

    fusion_entry, decision_card = None, {"component": "image", "fusion_kept": False,
                                         "reason": "built without a fusion network (no --fusion)"}
    calibration, final, final_target, final_image = image_calibration, image_probability, target, image_probability
    if fusion_dir is not None:
        from lungopacity.models.fusion import load_fusion

        fusion_dir = Path(fusion_dir)
        fusion = load_fusion(fusion_dir)
        evidence = _fusion_evidence(fusion_dir, held_out, table, int(fusion.metrics.get("seed", 0)))
        decision_card = evidence.card()
        if evidence.keep:
            shutil.copytree(fusion_dir, out / "fusion", ignore=shutil.ignore_patterns("*.png", "*.md", "*.csv"))
            calibration = calibrate_fusion(evidence.scores)
            scores = evidence.scores
            final = scale_probability(scores["p_fusion"].to_numpy(), calibration.temperature)
            final_target = scores["Target"].to_numpy(dtype=int)
            final_image = scores["p_image"].to_numpy(dtype=np.float64)  # the same patients, out-of-fold
            fusion_entry = FusionPart("fusion", tuple(fusion.features), sha256_file(out / "fusion" / "fusion.safetensors"),
                                      calibration.temperature)
            log.info("%s", decision_card["reason"])
        else:
            log.warning("%s: %s", fusion_dir, decision_card["reason"])
    decision_source = "fusion" if fusion_entry else "image"

    from lungopacity.reports.calibration import reliability_figure

    calibration_card = calibration.to_dict()
    calibration_card["figure"] = "calibration.png"
    if fusion_entry is not None:
        calibration_card["image_probability"] = {k: v for k, v in image_calibration.to_dict().items()
                                                 if k not in ("before", "after")}
    reliability_figure(calibration_card, out / "calibration.png")

    if target_sensitivity is not None:
        point = threshold_at_sensitivity(final_target, final, target_sensitivity)
        rule = f"sensitivity>={target_sensitivity:g}"
    else:
        point = youden_threshold(final_target, final)
        rule = "youden"
    threshold = Threshold(value=float(point.threshold), rule=rule, sensitivity=float(point.sensitivity),
                          specificity=float(point.specificity), score=decision_source)
    validation = _validation(final_target, final, final_image, threshold.value, decision_source)

    detector_entry, detector_paths = None, []
    if detector_run is not None:
        detector_paths = ([Path(detector_run)] if isinstance(detector_run, (str, Path))
                          else [Path(r) for r in detector_run])
        detector_entry, detector_metrics = _bundle_detectors(detector_paths, out, detector_postprocess)
        validation.update({f"detector_{k}": v for k, v in detector_metrics.items()})

    input_size = run.input_size
    fits = fit_members(models, held_ids, table, cache.image, input_size, device=device,
                       max_images=max_gate_images or MAX_IMAGES)
    tensors: dict[str, torch.Tensor] = {}
    for k, fit in enumerate(fits):
        tensors.update(fit.model.tensors(f"member_{k}"))
    save_file(tensors, str(out / APPLICABILITY_FILE))
    applicability = ApplicabilityPart(
        weights=WeightFile(APPLICABILITY_FILE, sha256_file(out / APPLICABILITY_FILE)),
        method="ppca-mahalanobis", n_components=max(int(f.model.components.shape[0]) for f in fits),
        percentile=PERCENTILE, thresholds=tuple(f.threshold for f in fits),
        n_fit=tuple(f.n_fit for f in fits), n_held_out=tuple(f.n_held_out for f in fits),
        header=header_rules(table, [v for v in table["view"].dropna().unique()]),
    )

    data = training_data(cache, table)
    manifest = BundleManifest(
        lungopacity_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        classifier=ClassifierPart(
            model_config=run.model_config,
            preprocessing=Preprocessing(
                prepared_size=run.cache.size, input_size=input_size, window=run.cache.window,
            ),
            members=tuple(members),
            temperature=image_calibration.temperature,
        ),
        fusion=fusion_entry,
        detector=detector_entry,
        threshold=threshold,
        applicability=applicability,
        model_card={
            "intended_use": (
                "A second read of a frontal chest radiograph for signs of lung opacity (pneumonia), for "
                "clinicians and trained volunteers. Not a diagnosis: every result must be reviewed by a "
                "qualified clinician together with the clinical picture."
            ),
            "training_data": data.to_dict(),
            "model": {"classifier_backbone": run.model_config.get("backbone"), "members": len(members),
                      "classifier_training": run.train.to_dict(),
                      "classifier_runs": [{"path": str(r.path), "seed": r.train.seed, "members": len(m)}
                                          for r, m in zip(runs, run_models)],
                      "detector_runs": [str(p) for p in detector_paths]},
            "decision": decision_card,
            "validation": validation,
            "calibration": calibration_card,
            "applicability": {
                "rule": "no decision when a header check fails (modality CR/DX, body part chest, view "
                        f"{'/'.join(applicability.header.views)}, age inside the training range, image size and "
                        "aspect) or when the mean over members of feature distance / threshold exceeds 1",
                "held_out_rejection_rate": float(np.mean(np.concatenate([f.held_out_distance for f in fits]) > 1.0)),
            },
            "limitations": _limitations(data, decision_source),
        },
    )
    # What is written is what the runtime will accept: check it with the reader's own schema.
    BundleManifest.from_dict(json.loads(json.dumps(manifest.to_dict(), default=str)), out / MANIFEST_FILE)
    atomic_write_json(manifest.to_dict(), out / MANIFEST_FILE)
    for warning in manifest.warnings():
        log.warning("%s: %s", out, warning)
    log.info("bundle written to %s (%d classifier member(s), decision by %s%s)", out, len(models), decision_source,
             ", detector" if detector_entry else "")
    return out


def _bundle_detectors(
    detector_runs: list[Path], out: Path, postprocess_path: str | Path | None,
) -> tuple[DetectorPart, dict[str, float]]:
    """The detector's part of the manifest (each member's weights saved into ``out``) and
    the validation figures of its first member."""
    from lungopacity.engine.detector import load_detector_run

    if not detector_runs:
        raise ConfigError("--detector", "give at least one detector run")
    runs = [load_detector_run(path) for path in detector_runs]
    first = runs[0]
    # The detector takes the prepared image as it is and resizes inside itself (model_config.image_size).
    prepared = int(first.config["input_size"])
    window = str(first.config.get("cache", {}).get("window", "none"))
    for path, run in zip(detector_runs[1:], runs[1:]):
        if run.model.config() != first.model.config():
            raise ConfigError("--detector", f"{path} is not the architecture of {detector_runs[0]} "
                                            f"({run.model.config()} vs {first.model.config()})")
        if (int(run.config["input_size"]), str(run.config.get("cache", {}).get("window", "none"))) != (prepared, window):
            raise ConfigError("--detector", f"{path} was trained on another prepared size or window than "
                                            f"{detector_runs[0]}")
    if postprocess_path is not None:
        postprocess = read_postprocess_choice(Path(postprocess_path))
    elif len(runs) == 1:
        postprocess = first.postprocess.to_dict()
    else:
        raise ConfigError("--detector-postprocess", f"{len(runs)} detectors need the post-processing tuned on "
                                                    "their pooled boxes (with NMS or WBF)")
    if len(runs) > 1 and postprocess.get("fusion", "none") == "none":
        raise ConfigError("--detector-postprocess", f"{len(runs)} detectors need NMS or WBF to merge their boxes; "
                                                    f"{postprocess_path} has no fusion")
    postprocess["n_models"] = len(runs)
    members = []
    for i, run in enumerate(runs):
        name = "detector.safetensors" if i == 0 else f"detector_{i}.safetensors"
        members.append(WeightFile(name, _save_tensors(run.model, out / name)))
    summary_path = detector_runs[0] / "val_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    metrics = {k: float(v) for k, v in summary.items()
               if k in ("best_val_rsna_map", "val_rsna_map_postprocessed", "n_val") and isinstance(v, (int, float))}
    part = DetectorPart(
        members=tuple(members),
        model_config=first.model.config(),
        preprocessing=Preprocessing(prepared_size=prepared, input_size=prepared, window=window),
        postprocess=postprocess,
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
    elif isinstance(data.get("postprocess"), dict):  # save_postprocess: the config beside its provenance
        data = data["postprocess"]
    return PostprocessConfig.from_dict(data).to_dict()


