"""Evaluate a trained detector on a prepared cache: metric, FROC, views, cases, submission.

:func:`evaluate_detector` predicts the boxes of a split, post-processes them in up to
three variants and writes a report folder:

* ``stored`` — the post-processing tuned on the validation split when the detector was
  trained (``postprocess.json`` of the run; no gating);
* ``tuned`` — re-tuned on the evaluated patients without gating;
* ``gated`` — re-tuned with gating by the classifier's P(opacity) (only with
  ``classifier_probs``).

Settings tuned on the patients they are scored on flatter themselves, so each re-tuned
variant also reports a cross-fitted metric (tuned on one half, scored on the other;
:func:`lungopacity.postprocess.cross_fitted_rsna_map`), the number to quote.

``split="oof"`` evaluates k-fold detectors (``train-detector --fold K`` for every fold of
the cache) on every patient, each predicted by the one fold model that did not train on
it, with its last epoch by default (``best.pt`` was chosen on those very patients). There
is no ``stored`` variant (each fold's stored settings were tuned on its own held-out
patients); the re-tuned variants are cross-fitted by the cache's folds, with a patient
bootstrap interval, and with classifier probabilities a ``chosen`` variant lets the grid
pick gating or none per fold: the main variant, whose settings tuned on all patients are
written to ``postprocess.json`` for ``bundle --detector-postprocess``.

The folder gets ``report.json``, ``report.md``, ``per_patient.csv``,
``postprocess_grid_<variant>.csv``, ``best_cases.png`` and ``worst_cases.png`` (every box of
each patient over the image: ground truth green, predictions orange with scores) and
``submission.csv`` (the main variant: gated when probabilities are given, else stored),
plus ``submission_<variant>.csv`` for the others, and the same as COCO JSON for detection
tools (pycocotools, FiftyOne, CVAT): ``coco_ground_truth.json`` (a dataset) and
``coco_detections.json`` (the main variant's detections, a results list).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lungopacity.data.cache import PreparedCache
from lungopacity.engine.common import Progress, resolve_device
from lungopacity.engine.detector import (
    BoxPredictions,
    detector_positions,
    gt_boxes,
    load_detector_run,
    predict_boxes,
)
from lungopacity.engine.runs import DetectorRun
from lungopacity.errors import ConfigError
from lungopacity.io.coco import write_coco_dataset, write_coco_results
from lungopacity.io.errors import DataFormatError
from lungopacity.io.submission import write_submission
from lungopacity.metrics import bootstrap_rsna_map_ci
from lungopacity.postprocess import (
    PostprocessConfig,
    apply_postprocess_all,
    cross_fitted_per_image,
    save_postprocess,
    tune_postprocess,
)
from lungopacity.reports.detection import (
    case_sheet,
    detection_metrics,
    metrics_by_view,
    note_sheet,
    select_cases,
    write_report,
)

log = logging.getLogger(__name__)

COCO_GROUND_TRUTH, COCO_DETECTIONS = "coco_ground_truth.json", "coco_detections.json"
#: The main variant's post-processing, tuned on the evaluated patients (for ``bundle``).
POSTPROCESS_OUT = "postprocess.json"
SPLITS = ("val", "train", "all", "oof")

PROBABILITY_COLUMN = "p_lung_opacity"


def read_opacity_probabilities(path: str | Path, patient_ids: Sequence[str]) -> np.ndarray:
    """P(opacity) for each patient from a CSV with ``patientId`` and ``p_lung_opacity``
    (a classifier run's ``oof.csv``, ``val_predictions.csv`` or a predictions table).

    Raises:
        DataFormatError: missing columns, duplicate patients, values outside [0, 1], or
            patients of ``patient_ids`` that the file lacks.
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, "file not found")
    try:
        table = pd.read_csv(path, dtype={"patientId": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, f"not a readable CSV ({exc})") from None
    missing_columns = [c for c in ("patientId", PROBABILITY_COLUMN) if c not in table.columns]
    if missing_columns:
        raise DataFormatError(path, f"missing column(s) {', '.join(missing_columns)}; found {','.join(table.columns)}")
    duplicated = table["patientId"].duplicated()
    if duplicated.any():
        raise DataFormatError(path, f"patient {table['patientId'][duplicated].iloc[0]} appears more than once")
    values = pd.to_numeric(table[PROBABILITY_COLUMN], errors="coerce")
    bad = values.isna() | (values < 0) | (values > 1)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataFormatError(path, f"line {i + 2}: {PROBABILITY_COLUMN} must be a probability in [0, 1], "
                                    f"got {table[PROBABILITY_COLUMN].iloc[i]!r}")
    by_id = dict(zip(table["patientId"], values.to_numpy(dtype=np.float64)))
    absent = [pid for pid in patient_ids if pid not in by_id]
    if absent:
        raise DataFormatError(path, f"has no {PROBABILITY_COLUMN} for {len(absent)} of the {len(patient_ids)} "
                                    f"evaluated patients, e.g. {absent[0]}")
    return np.array([by_id[pid] for pid in patient_ids], dtype=np.float64)


def out_of_fold_predictions(
    det_runs: Sequence[DetectorRun | str | Path],
    cache: PreparedCache,
    *,
    weights: str = "last",
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    hflip_tta: bool = False,
    progress: Progress | None = None,
) -> tuple[BoxPredictions, np.ndarray, list[DetectorRun]]:
    """Every patient of the cache's folds predicted by the fold run that held it out.

    Args:
        det_runs: one ``train-detector --fold K`` run per fold of ``cache`` (folders or loaded runs).
        weights: ``"last"`` (the final epoch) or ``"best"`` (chosen on the held-out fold).

    Returns:
        The predictions in cache order, each patient's fold, and the runs by fold.

    Raises:
        ConfigError: a run without a fold, two runs of one fold, a run trained on another
            cache, or a fold of the cache without its run.
    """
    by_fold: dict[int, DetectorRun] = {}
    for item in det_runs:
        run = item if isinstance(item, DetectorRun) else load_detector_run(item, device=device)
        fold = run.train.fold
        if fold is None:
            raise ConfigError(str(run.path), "not a fold run (train-detector --fold K); --split oof takes one per fold")
        if fold in by_fold:
            raise ConfigError(str(run.path), f"holds out fold {fold}, as {by_fold[fold].path} does")
        if not run.cache.matches(cache):
            raise ConfigError(str(run.path), f"trained on another cache ({run.cache.path}); its fold {fold} is not "
                                             f"{cache.path}'s")
        by_fold[fold] = run
    usable = cache.indices()
    column = pd.to_numeric(cache.table["fold"].iloc[usable], errors="coerce").to_numpy()
    present = sorted({int(v) for v in column[np.isfinite(column)]})
    missing = [k for k in present if k not in by_fold]
    if not present:
        raise ConfigError(str(cache.path), "has no folds (prepare --folds K)")
    if missing:
        raise ConfigError("--split oof", f"no run for fold(s) {', '.join(map(str, missing))} of {cache.path} "
                                         f"(given folds {', '.join(map(str, sorted(by_fold)))})")
    extra = [k for k in by_fold if k not in present]
    if extra:
        raise ConfigError(str(by_fold[extra[0]].path), f"holds out fold {extra[0]}, which {cache.path} lacks "
                                                       f"(folds {present[0]}..{present[-1]})")
    parts: list[tuple[int, BoxPredictions]] = []
    for fold in present:
        run = by_fold[fold]
        _, held_out = detector_positions(cache, fold)
        model = run.load_model(weights=weights)
        parts.append((fold, predict_boxes(model, cache, held_out, batch_size=batch_size, device=run.device,
                                          hflip_tta=hflip_tta, amp=True, progress=progress)))
        log.info("fold %d: %d held-out patients predicted by %s (%s.pt)", fold, len(held_out), run.path, weights)
    positions = np.concatenate([p.positions for _, p in parts])
    order = np.argsort(positions, kind="stable")
    flat = lambda attr: [x for _, p in parts for x in getattr(p, attr)]  # noqa: E731
    ids, boxes, scores = flat("patient_ids"), flat("boxes"), flat("scores")
    folds = np.concatenate([np.full(len(p.positions), k) for k, p in parts])
    predictions = BoxPredictions([ids[i] for i in order], positions[order], [boxes[i] for i in order],
                                 [scores[i] for i in order], n_sets=parts[0][1].n_sets)
    return predictions, folds[order], [by_fold[k] for k in present]


def _variant(
    name: str,
    config: PostprocessConfig,
    gt: list[np.ndarray],
    raw_boxes: list[np.ndarray],
    raw_scores: list[np.ndarray],
    p_opacity: np.ndarray | None,
    cross_fitted: float | None,
    description_note: str,
) -> dict[str, Any]:
    boxes, scores = apply_postprocess_all(raw_boxes, raw_scores, p_opacity if config.gating != "none" else None, config)
    unthresholded = PostprocessConfig.from_dict({**config.to_dict(), "score_threshold": -np.inf})
    ranked_boxes, ranked_scores = apply_postprocess_all(
        raw_boxes, raw_scores, p_opacity if config.gating != "none" else None, unthresholded
    )
    metrics = detection_metrics(gt, boxes, scores, ranked_boxes, ranked_scores)
    return {
        "name": name,
        "postprocess": config.to_dict(),
        "postprocess_description": config.describe() + description_note,
        "cross_fitted_rsna_map": cross_fitted,
        "metrics": metrics,
        "_boxes": boxes,
        "_scores": scores,
        "_ranked": (ranked_boxes, ranked_scores),
    }


def evaluate_detector(
    det_run: str | Path | Sequence[str | Path],
    cache_dir: str | Path,
    split: str = "val",
    out_dir: str | Path = "detector-report",
    classifier_probs: str | Path | None = None,
    *,
    device: str = "auto",
    batch_size: int = 16,
    hflip_tta: bool = False,
    n_cases: int = 8,
    cross_fit: bool = True,
    seed: int = 0,
    weights: str | None = None,
    n_boot: int = 1000,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate a detector run on a cache split and write the report folder (module docstring).

    Args:
        det_run: a run folder of :func:`lungopacity.engine.detector.train_detector`; with
            ``split="oof"``, one fold run per fold of the cache.
        cache_dir: a prepared cache.
        split: ``"val"``, ``"train"``, ``"all"`` or ``"oof"`` (every patient by its fold's run).
        out_dir: the report folder.
        classifier_probs: CSV with ``patientId, p_lung_opacity`` for gating.
        device: where to run the detector.
        batch_size: images per forward pass.
        hflip_tta: add the mirrored image's boxes (fused by the post-processing).
        n_cases: patients in each of the best / worst contact sheets.
        cross_fit: also compute the cross-fitted metric of the re-tuned variants.
        seed: seed of the cross-fitting split (and of the bootstrap).
        weights: ``"best"`` or ``"last"`` checkpoint (default: best, last for ``"oof"``).
        n_boot: patient bootstrap resamples of the cross-fitted metric's interval.
        progress: progress reporter.

    Returns:
        The report (as written to ``report.json``).
    """
    if split not in SPLITS:
        raise ConfigError("--split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
    det_runs = [Path(det_run)] if isinstance(det_run, (str, Path)) else [Path(p) for p in det_run]
    if not det_runs:
        raise ConfigError("no detector run given")
    if len(det_runs) > 1 and split != "oof":
        raise ConfigError("--split", f"{len(det_runs)} detector runs are evaluated together only with --split oof "
                                     "(one train-detector --fold K run per fold)")
    weights = weights or ("last" if split == "oof" else "best")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    runs = [load_detector_run(path, device=torch_device) for path in det_runs]
    cache = PreparedCache(cache_dir)
    fold_of: np.ndarray | None = None
    if split == "oof":
        predictions, fold_of, runs = out_of_fold_predictions(
            runs, cache, weights=weights, device=torch_device, batch_size=batch_size, hflip_tta=hflip_tta,
            progress=progress,
        )
        positions = predictions.positions
    else:
        positions = cache.indices(None if split == "all" else split)
        if len(positions) == 0:
            raise ConfigError(f"{cache.path}: no prepared patients in split {split!r}")
    for run in runs:
        if run.cache.window != cache.window:
            log.warning("%s: prepared with window policy %r, but the run was trained on images prepared with %r; "
                        "the figures describe images the model was not trained to see", cache.path, cache.window,
                        run.cache.window)
    run = runs[0]
    if split != "oof":
        if run.cache.patients_hash and not run.cache.matches(cache):
            log.warning("%s: the detector was trained on another cache (%s); its val split may overlap this one's "
                        "train", cache.path, run.cache.path)
        model = run.model if weights == "best" else run.load_model(weights=weights)
        predictions = predict_boxes(model, cache, positions, batch_size=batch_size, device=torch_device,
                                    hflip_tta=hflip_tta, amp=True, progress=progress)
    ids = predictions.patient_ids
    gt = gt_boxes(cache, positions)
    p_opacity = read_opacity_probabilities(classifier_probs, ids) if classifier_probs is not None else None
    n_sets = predictions.n_sets

    variants: dict[str, dict[str, Any]] = {}
    if split != "oof":  # in oof, each fold's stored settings were tuned on its own held-out patients
        stored = PostprocessConfig.from_dict({**run.postprocess.to_dict(), "n_models": n_sets})
        variants["stored"] = _variant("stored", stored, gt, predictions.boxes, predictions.scores, None, None,
                                      " (tuned on the training run's val split)")
    grids: dict[str, pd.DataFrame] = {}
    gatings = {"tuned": ("none",), "gated": ("multiply",)}
    if split == "oof" and p_opacity is not None:
        gatings["chosen"] = ("none", "multiply")
    for name, gating_options in gatings.items():
        probs = None if gating_options == ("none",) else p_opacity
        if gating_options != ("none",) and probs is None:
            continue
        try:
            config, grid = tune_postprocess(gt, predictions.boxes, predictions.scores, probs,
                                            gating_options=gating_options, n_models=n_sets)
        except ValueError as exc:
            log.warning("variant %s not tuned: %s", name, exc)
            continue
        grids[name] = grid
        crossed, interval, per_fold = None, None, None
        if cross_fit:
            try:
                per_image, chosen = cross_fitted_per_image(
                    gt, predictions.boxes, predictions.scores, probs, seed=seed, fold_of=fold_of,
                    gating_options=gating_options, n_models=n_sets,
                )
                counted = np.isfinite(per_image)
                crossed = float(per_image[counted].mean()) if counted.any() else float("nan")
                if split == "oof":
                    interval = list(bootstrap_rsna_map_ci(per_image, n_boot, seed=seed))
                    per_fold = [c.describe() for c in chosen]
            except ValueError as exc:
                log.warning("variant %s not cross-fitted: %s", name, exc)
                crossed = float("nan")
        variant = _variant(name, config, gt, predictions.boxes, predictions.scores, probs, crossed,
                           " (tuned on these patients)")
        if interval is not None:
            variant["cross_fitted_rsna_map_ci95"] = interval
            variant["cross_fitted_settings_by_fold"] = per_fold
        variants[name] = variant
    if split == "oof":
        main_name = "chosen" if "chosen" in variants else "tuned"
        if main_name not in variants:
            raise ConfigError(f"{cache.path}: the post-processing could not be tuned on these patients")
    else:
        main_name = "gated" if "gated" in variants else "stored"
    main = variants[main_name]
    # Files: submissions, grids, per-patient table, best / worst cases.
    files: dict[str, str] = {}
    for name, variant in variants.items():
        path = out_dir / ("submission.csv" if name == main_name else f"submission_{name}.csv")
        write_submission(path, ids, variant["_boxes"], variant["_scores"])
        files[f"submission ({name})"] = path.name
    sizes = [(int(h), int(w)) for h, w in zip(cache.table["orig_h"].iloc[positions], cache.table["orig_w"].iloc[positions])]
    write_coco_dataset(out_dir / COCO_GROUND_TRUTH, ids, sizes, gt)
    write_coco_results(out_dir / COCO_DETECTIONS, ids, main["_boxes"], main["_scores"])
    files["COCO ground truth"], files[f"COCO detections ({main_name})"] = COCO_GROUND_TRUTH, COCO_DETECTIONS
    for name, grid in grids.items():
        grid.to_csv(out_dir / f"postprocess_grid_{name}.csv", index=False)
        files[f"post-processing grid ({name})"] = f"postprocess_grid_{name}.csv"
    save_postprocess(
        out_dir / POSTPROCESS_OUT, PostprocessConfig.from_dict(main["postprocess"]), variant=main_name,
        tuned_on=split, n_patients=len(ids), rsna_map_in_sample=main["metrics"]["rsna_map"],
        rsna_map_cross_fitted=main.get("cross_fitted_rsna_map"),
        rsna_map_cross_fitted_ci95=main.get("cross_fitted_rsna_map_ci95"),
        runs=[str(r.path) for r in runs], weights=weights,
        classifier_probs=str(classifier_probs) if classifier_probs is not None else None,
    )
    files[f"post-processing ({main_name}), for bundle --detector-postprocess"] = POSTPROCESS_OUT
    table = cache.table.iloc[positions]
    views = table["view"].tolist()
    per_patient = pd.DataFrame({
        "patientId": ids,
        "view": [v if isinstance(v, str) else "" for v in views],
        "n_gt": [len(g) for g in gt],
        "n_raw": [len(b) for b in predictions.boxes],
        "max_raw_score": [float(s.max()) if len(s) else np.nan for s in predictions.scores],
    })
    if p_opacity is not None:
        per_patient["p_lung_opacity"] = p_opacity
    for name, variant in variants.items():
        per_patient[f"n_pred_{name}"] = [len(b) for b in variant["_boxes"]]
        per_patient[f"score_{name}"] = variant["metrics"]["per_image"]
    per_patient.to_csv(out_dir / "per_patient.csv", index=False)
    files["per-patient scores"] = "per_patient.csv"

    per_image = main["metrics"]["per_image"]
    best, worst = select_cases(per_image, per_patient["n_gt"].to_numpy(),
                               per_patient[f"n_pred_{main_name}"].to_numpy(), n_cases)
    for label, chosen in (("best_cases.png", best), ("worst_cases.png", worst)):
        if len(chosen) == 0:  # too few scored patients for two sheets without sharing one
            text = (f"No patient for this sheet: {len(best) + len(worst)} scored patient(s),\n"
                    "each shown on one sheet only.")
            (out_dir / label).write_bytes(note_sheet(text))
            files[label.replace("_", " ").replace(".png", "")] = label
            continue
        images = [cache.image(int(positions[i])).astype(np.float32) / 255.0 for i in chosen]
        scales = [cache.scale(int(positions[i])) for i in chosen]
        titles = [f"{ids[i][:8]} {per_image[i]:.2f}" for i in chosen]
        sheet = case_sheet(images, scales, [gt[i] for i in chosen], [main["_boxes"][i] for i in chosen],
                           [main["_scores"][i] for i in chosen], titles)
        (out_dir / label).write_bytes(sheet)
        files[label.replace("_", " ").replace(".png", "")] = label

    ranked_boxes, ranked_scores = main["_ranked"]
    files["report"] = "report.md"
    report: dict[str, Any] = {
        "run": str(runs[0].path) if len(runs) == 1 else [str(r.path) for r in runs],
        "weights": weights,
        "cache": str(cache.path),
        "split": split,
        "n_patients": len(ids),
        "n_positive": int(sum(len(g) > 0 for g in gt)),
        "classifier_probs": str(classifier_probs) if classifier_probs is not None else None,
        "hflip_tta": hflip_tta,
        "main_variant": main_name,
        "tuning_note": (
            "Every patient was predicted by the fold model that did not train on it. Re-tuned variants are "
            "tuned on all these patients; their cross-fitted metric (each fold's patients post-processed with "
            "the settings tuned on the other folds, with a patient-bootstrap 95 % interval) is the unbiased one."
            if split == "oof" else
            "Re-tuned variants are tuned on the evaluated patients; their cross-fitted metric "
            "(tuned on one half, scored on the other) is the unbiased one."
        ),
        "variants": {
            name: {k: v for k, v in variant.items() if not k.startswith("_") and k != "metrics"}
            | {"metrics": {k: v for k, v in variant["metrics"].items() if k != "per_image"}}
            for name, variant in variants.items()
        },
        "by_view": metrics_by_view(views, gt, main["_boxes"], main["_scores"], ranked_boxes, ranked_scores),
        "files": files,
    }
    write_report(out_dir, report)
    log.info("detector evaluation of %s on %s (%s, %d patients): RSNA metric %.4f (%s); report in %s",
             ", ".join(str(r.path) for r in runs), cache.path, split, len(ids), main["metrics"]["rsna_map"], main_name,
             out_dir)
    return report
