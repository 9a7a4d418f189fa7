"""Detector scored out of fold on every patient of a k-fold cache (issue 17, deliverable 3).

One detector per fold of the cache (``train-detector --fold K``: trained on the other
folds, validated on fold K) is trained, or reused when its run folder is complete
(``val_summary.json``), or resumed when it is not. Each fold model then predicts its own
held-out fold, plainly and with horizontal-flip test-time augmentation (its boxes fused
by WBF/NMS like any other set), so every patient has detections from the one model that
never saw it. By default the fold's LAST epoch predicts (``--weights last``): best.pt
was chosen by the metric on the very patients scored here.

With the classifier's out-of-fold probabilities (``oof.csv`` of a k-fold run on the same
cache: patientId, p_not_normal, p_lung_opacity) three gatings are compared:

* ``none``: the detector's own score;
* ``opacity``: score x P(opacity) (today's ``gating="multiply"``);
* ``rsna2nd``: score x (P(opacity) + 0.1 x P(not normal)), the 2nd place's gate (computed
  here and passed to ``gating="multiply"`` as the patient's factor).

Every figure is cross-fitted on the cache's folds: the settings applied to fold K's
patients (threshold, and whatever else the row leaves free: fusion IoU, shrink,
gating, TTA) are tuned on the other folds' out-of-fold detections only, so no patient's
figure comes from settings chosen on it. The RSNA metric is then computed once over all
patients (``--max-boxes 0 1 2 3`` also cross-fits a cap on the boxes kept per image, best
first), with a patient bootstrap 95 % interval (``--bootstrap`` draws; the interval
holds the tuned settings fixed, so it leaves out the tuning's own variance).

WBF across the five fold models (the deployment recipe) cannot be scored out of fold: each
patient has exactly one fold model that never saw it. What can be: several ``--runs``
folders, each with its own model per fold (another seed, size or epoch count), whose
fold-k models all trained on the same patients; their boxes on fold k are pooled per
patient and fused (NMS, or WBF with the pool's model count), an out-of-fold ensemble.

Command (2-core CPU, 3 epochs per fold: about 8 CPU minutes each)::

    flock /work/wt/cpu.lock env PYTHONPATH=src .venv/bin/python benchmarks/bench_detector_oof.py \\
        --cache /work/runs/v/cache256 --runs /work/runs/detoof \\
        --classifier-oof /work/runs/v/lite0_256/oof.csv --epochs 3 --out /work/runs/detoof/oof.json

The folds train like the README's detector recipe (RetinaNet over an EfficientNet-Lite0
FPN, ``--pretrained efficientnet-lite0``, the cache's 256 px), with ``--epochs`` per fold.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

GATINGS = ("none", "opacity", "rsna2nd")
FUSION_IOUS = {"none": (0.0,), "nms": (0.25, 0.35, 0.45), "wbf": (0.35, 0.45, 0.55)}
SHRINK_GRID = (1.0, 0.95, 0.9, 0.875, 0.85, 0.8)
SHRINK_ROWS: dict[str, tuple[float, ...]] = {"1.0": (1.0,), "0.875": (0.875,), "tuned": SHRINK_GRID}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------ fold models


def train_folds(args: argparse.Namespace, runs: Path, seed: int, n_folds: int) -> dict[int, float]:
    """Train (or resume, or reuse) one detector per fold; returns the training seconds per fold."""
    from lungopacity.engine.detector import DetectorTrainConfig, train_detector

    seconds = {}
    for k in range(n_folds):
        run_dir = runs / f"fold_{k}"
        if (run_dir / "val_summary.json").is_file():
            say(f"fold {k}: complete run in {run_dir}, reused")
        elif args.no_train:
            say(f"fold {k}: no complete run in {run_dir}; left out (--no-train)")
            continue
        else:
            resume = (run_dir / "config.json").is_file()
            say(f"fold {k}: {'resuming' if resume else 'training'} in {run_dir} ({args.epochs} epochs)")
            config = DetectorTrainConfig(
                pretrained=args.pretrained, size=args.size, epochs=args.epochs, batch_size=args.batch_size,
                patience=max(args.epochs, 1), fold=k, device=args.device, seed=seed,
            )
            train_detector(args.cache, run_dir, None if resume else config, resume=resume)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        seconds[k] = float(sum(r.get("train_seconds", 0.0) + r.get("val_seconds", 0.0) for r in records))
        say(f"fold {k}: validation RSNA metric by epoch "
            f"{', '.join(format(r['val_rsna_map'], '.3f') for r in records)} ({seconds[k] / 60:.1f} min)")
    return seconds


def fold_predictions(args: argparse.Namespace, runs: Path, cache: Any, k: int, positions: np.ndarray,
                     tta: bool) -> Any:
    """Fold k's model's detections on its held-out positions (cached beside the run)."""
    from lungopacity.engine.detector import BoxPredictions, load_detector_run, predict_boxes
    from lungopacity.io.submission import read_submission, write_submission

    run_dir = runs / f"fold_{k}"
    path = run_dir / f"oof_{args.weights}_{'hflip' if tta else 'plain'}.csv"
    ids = cache.table["patientId"].astype(str).to_numpy()[positions].tolist()
    if path.is_file():
        table = read_submission(path).set_index("patientId")
        if set(table.index) == set(ids):
            return BoxPredictions(ids, positions, [table.at[i, "boxes"] for i in ids],
                                  [table.at[i, "scores"] for i in ids], n_sets=2 if tta else 1)
    run = load_detector_run(run_dir, args.device)
    model = run.load_model(weights=args.weights)
    start = time.perf_counter()
    predictions = predict_boxes(model, cache, positions, batch_size=16, device=args.device, hflip_tta=tta)
    say(f"{run_dir}: {len(positions)} held-out patients predicted{' with hflip TTA' if tta else ''} "
        f"in {time.perf_counter() - start:.0f} s")
    write_submission(path, predictions.patient_ids, predictions.boxes, predictions.scores)
    return predictions


# -------------------------------------------------------------------- scoring


def gate_values(probs: pd.DataFrame, ids: list[str]) -> dict[str, np.ndarray | None]:
    table = probs.set_index("patientId").loc[ids]
    p_opacity = table["p_lung_opacity"].to_numpy(dtype=np.float64)
    p_not_normal = table["p_not_normal"].to_numpy(dtype=np.float64)
    return {"none": None, "opacity": p_opacity, "rsna2nd": p_opacity + 0.1 * p_not_normal}


def fuse_all(boxes: list[np.ndarray], scores: list[np.ndarray], fusion: str, iou: float, n_models: int):
    """Every patient's boxes fused once (no gating, shrink or threshold: the scores are >= 0)."""
    from lungopacity.postprocess import PostprocessConfig, apply_postprocess_all

    return apply_postprocess_all(boxes, scores, None, PostprocessConfig(fusion=fusion, fusion_iou=iou, n_models=n_models))


class Scorer:
    """Cross-fitted scoring over the cache's folds of pre-fused detections."""

    def __init__(self, gt: list[np.ndarray], fold_of: np.ndarray, gates: dict[str, np.ndarray | None],
                 fused: dict[tuple[bool, str, float], tuple[list[np.ndarray], list[np.ndarray]]],
                 max_boxes: tuple[int | None, ...] = (None,)) -> None:
        self.gt, self.fold_of, self.gates, self.fused = gt, fold_of, gates, fused
        self.max_boxes = max_boxes  # per-image caps tuned with the threshold (None: no cap)
        self.folds = sorted(set(fold_of.tolist()))

    def _tune(self, idx: np.ndarray, options: list[tuple[bool, str, str, float]], shrinks: tuple[float, ...]):
        """Best (value, option, PostprocessConfig) on patients idx over options x shrinks x threshold."""
        from lungopacity.postprocess import tune_postprocess

        best = None
        for option in options:
            tta, gating, fusion, iou = option
            boxes, scores = self.fused[(tta, fusion, iou)]
            p = self.gates[gating]
            for cap in self.max_boxes:
                config, table = tune_postprocess(
                    [self.gt[i] for i in idx], [boxes[i] for i in idx], [scores[i] for i in idx],
                    None if p is None else p[idx], gating_options=("none",) if p is None else ("multiply",),
                    fusion_options=(("none", 0.0),), shrink_options=shrinks, max_boxes_options=(cap,),
                )
                value = float(table["rsna_map"].iloc[0])
                if best is None or value > best[0]:
                    best = (value, option, config)
        assert best is not None
        return best

    def cross_fit(self, options: list[tuple[bool, str, str, float]], shrinks: tuple[float, ...]) -> dict[str, Any]:
        """Tune on the other folds, apply to each fold; the RSNA metric per patient out of fold."""
        from lungopacity.metrics.rsna_map import per_image_precision
        from lungopacity.postprocess import apply_postprocess_all

        n = len(self.gt)
        out_boxes: list[np.ndarray] = [np.zeros((0, 4))] * n
        out_scores: list[np.ndarray] = [np.zeros(0)] * n
        chosen = []
        for k in self.folds:
            tune_idx, test_idx = np.flatnonzero(self.fold_of != k), np.flatnonzero(self.fold_of == k)
            _, (tta, gating, fusion, iou), config = self._tune(tune_idx, options, shrinks)
            boxes, scores = self.fused[(tta, fusion, iou)]
            p = self.gates[gating]
            b, s = apply_postprocess_all([boxes[i] for i in test_idx], [scores[i] for i in test_idx],
                                         None if p is None else p[test_idx], config)
            for j, i in enumerate(test_idx):
                out_boxes[i], out_scores[i] = b[j], s[j]
            chosen.append({"fold": int(k), "tta": tta, "gating": gating, "fusion": fusion, "fusion_iou": iou,
                           "shrink": config.shrink, "score_threshold": config.score_threshold,
                           "max_boxes": config.max_boxes})
        per_image = per_image_precision(self.gt, out_boxes, out_scores)
        return {"per_image": per_image, "rsna_map": float(np.nanmean(per_image)), "chosen": chosen,
                "n_boxes": int(sum(len(b) for b in out_boxes))}

    def tuned_on_all(self, options, shrinks) -> dict[str, Any]:
        value, (tta, gating, fusion, iou), config = self._tune(np.arange(len(self.gt)), options, shrinks)
        return {"rsna_map_in_sample": value, "tta": tta, "gating": gating, "fusion": fusion, "fusion_iou": iou,
                "shrink": config.shrink, "score_threshold": config.score_threshold, "max_boxes": config.max_boxes}


def bootstrap(per_image: np.ndarray, draws: int) -> tuple[float, float]:
    from lungopacity.metrics import bootstrap_rsna_map_ci

    return bootstrap_rsna_map_ci(per_image, draws, seed=0)


# ----------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cache", type=Path, required=True, help="prepared k-fold cache (prepare --folds K)")
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="folder of the fold runs (fold_K); several: an ensemble per fold (seed = --seed + i)")
    parser.add_argument("--classifier-oof", type=Path, required=True, help="a k-fold classifier run's oof.csv")
    parser.add_argument("--out", type=Path, required=True, help="JSON summary to write")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pretrained", default="efficientnet-lite0")
    parser.add_argument("--size", type=int, default=None, help="detector image_size (default: the cache's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--weights", choices=("last", "best"), default="last",
                        help="checkpoint that predicts the held-out fold (best: chosen on those patients)")
    parser.add_argument("--no-tta", action="store_true", help="skip the hflip test-time augmentation rows")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient bootstrap draws")
    parser.add_argument("--no-train", action="store_true",
                        help="score only the folds whose runs are complete (fewer patients) instead of training")
    parser.add_argument("--max-boxes", type=int, nargs="+", default=[0],
                        help="per-image box caps cross-fitted with the threshold (0: no cap; e.g. 0 1 2 3)")
    parser.add_argument("--write-postprocess", type=Path, default=None,
                        help="also write the post-processing the product can run (no TTA; gating none or x P(opacity)), "
                             "tuned on every patient's out-of-fold detections, for `bundle --detector-postprocess`")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for --classifier-oof to appear")
    args = parser.parse_args()

    import torch

    from lungopacity.data.cache import PreparedCache
    from lungopacity.engine.detector import detector_positions, gt_boxes

    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    cache = PreparedCache(args.cache)
    n_folds = int(cache.meta.get("folds") or 0)
    if n_folds < 2:
        sys.exit(f"{args.cache} has no folds (prepare --folds K)")
    seconds_by_run = [train_folds(args, runs, args.seed + i, n_folds) for i, runs in enumerate(args.runs)]
    # A fold counts when every run has it; its training time is the ensemble's (summed).
    folds = sorted(set.intersection(*(set(s) for s in seconds_by_run)))
    train_seconds = {k: sum(s[k] for s in seconds_by_run) for k in folds}
    if len(folds) < 2:
        sys.exit(f"only {len(folds)} complete fold runs in {args.runs}; cross-fitting needs 2")

    # Out-of-fold detections: fold k's model on fold k's patients.
    ttas = (False,) if args.no_tta else (False, True)
    positions, fold_of = [], []
    predictions: dict[bool, tuple[list[np.ndarray], list[np.ndarray]]] = {t: ([], []) for t in ttas}
    for k in folds:
        _, val = detector_positions(cache, k)
        positions.append(val)
        fold_of.append(np.full(len(val), k))
        for tta in ttas:
            # Every run's fold-k model saw the same training patients and none of fold k's,
            # so their fusion per patient is an out-of-fold ensemble.
            sets = [fold_predictions(args, runs, cache, k, val, tta) for runs in args.runs]
            for j in range(len(val)):
                predictions[tta][0].append(np.concatenate([np.asarray(p.boxes[j]).reshape(-1, 4) for p in sets]))
                predictions[tta][1].append(np.concatenate([np.asarray(p.scores[j]).reshape(-1) for p in sets]))
    positions_all, fold_all = np.concatenate(positions), np.concatenate(fold_of)
    ids = cache.table["patientId"].astype(str).to_numpy()[positions_all].tolist()
    gt = gt_boxes(cache, positions_all)
    say(f"out-of-fold detections for {len(ids)} patients ({sum(len(g) > 0 for g in gt)} with opacity)")

    waited = 0.0
    while not args.classifier_oof.is_file() and waited < args.wait:
        time.sleep(30)
        waited += 30
    if not args.classifier_oof.is_file():
        sys.exit(f"{args.classifier_oof} not found")
    probs = pd.read_csv(args.classifier_oof, dtype={"patientId": str})
    missing = set(ids) - set(probs["patientId"])
    if missing:
        sys.exit(f"{args.classifier_oof} lacks {len(missing)} of the patients")
    same_folds = bool((probs.set_index("patientId").loc[ids, "fold"].to_numpy() == fold_all).all())
    gates = gate_values(probs, ids)

    start = time.perf_counter()
    n_runs = len(args.runs)
    fused = {}
    for tta in ttas:
        for fusion, ious in FUSION_IOUS.items():
            for iou in ious:
                fused[(tta, fusion, iou)] = fuse_all(*predictions[tta], fusion, iou, n_runs * (2 if tta else 1))
    scorer = Scorer(gt, fold_all, gates, fused, tuple(None if m == 0 else m for m in args.max_boxes))
    say(f"fused every set in {time.perf_counter() - start:.0f} s; scoring the variants, cross-fitted")

    rows = []
    for tta, gating, fusion, shrink_name in itertools.product(ttas, GATINGS, FUSION_IOUS, SHRINK_ROWS):
        options = [(tta, gating, fusion, iou) for iou in FUSION_IOUS[fusion]]
        result = scorer.cross_fit(options, SHRINK_ROWS[shrink_name])
        low, high = bootstrap(result["per_image"], args.bootstrap)
        rows.append({"tta": tta, "gating": gating, "fusion": fusion, "shrink": shrink_name,
                     "rsna_map": result["rsna_map"], "ci95": [low, high], "n_boxes": result["n_boxes"],
                     "chosen_per_fold": [{k: c[k] for k in ("fusion_iou", "shrink", "score_threshold", "max_boxes")}
                                         for c in result["chosen"]]})
        say(f"{'hflip' if tta else 'plain':5} {gating:8} {fusion:4} shrink {shrink_name:5}: "
            f"{result['rsna_map']:.4f} [{low:.4f}, {high:.4f}]")

    every = [(tta, g, f, iou) for tta in ttas for g in GATINGS for f, ious in FUSION_IOUS.items() for iou in ious]
    full = scorer.cross_fit(every, SHRINK_GRID)
    full_ci = bootstrap(full["per_image"], args.bootstrap)
    deploy = scorer.tuned_on_all(every, SHRINK_GRID)
    picks = Counter((c["tta"], c["gating"], c["fusion"]) for c in full["chosen"])
    say(f"everything chosen by cross-fitting: RSNA metric {full['rsna_map']:.4f} "
        f"[{full_ci[0]:.4f}, {full_ci[1]:.4f}] on {len(ids)} patients; per fold {full['chosen']}")
    say(f"tuned on all {len(ids)} (deployment settings, in-sample {deploy['rsna_map_in_sample']:.4f}): {deploy}")
    product = None
    if args.write_postprocess is not None:
        from lungopacity.postprocess import save_postprocess

        # What the predictor runs: one pass per member (no TTA), gating by P(opacity) or none.
        runnable = [(False, g, f, iou) for g in ("none", "opacity") for f, ious in FUSION_IOUS.items() for iou in ious]
        product_cf = scorer.cross_fit(runnable, SHRINK_GRID)
        value, (_, gating, fusion, iou), config = scorer._tune(np.arange(len(gt)), runnable, SHRINK_GRID)
        config = replace(config, gating="multiply" if gating == "opacity" else "none", fusion=fusion,
                         fusion_iou=iou, n_models=n_runs)
        save_postprocess(args.write_postprocess, config, rsna_map_in_sample=value,
                         rsna_map_cross_fitted=product_cf["rsna_map"], n_patients=len(ids),
                         runs=[str(r) for r in args.runs], classifier_oof=str(args.classifier_oof))
        product = {"path": str(args.write_postprocess), "config": config.to_dict(), "rsna_map_in_sample": value,
                   "rsna_map_cross_fitted": product_cf["rsna_map"],
                   "ci95_cross_fitted": list(bootstrap(product_cf["per_image"], args.bootstrap))}
        say(f"post-processing the product runs (cross-fitted {product_cf['rsna_map']:.4f}) written to "
            f"{args.write_postprocess}: {config.describe()}")

    # The library's own estimate, for comparison: random 5-way split, default grid, today's gating.
    from lungopacity.postprocess import cross_fitted_rsna_map

    library_cf = cross_fitted_rsna_map(gt, *predictions[False], gates["opacity"], folds=5, seed=0)

    per_fold = {}
    for k in folds:
        per_fold[k] = {"train_minutes": train_seconds[k] / 60, "runs": []}
        for runs in args.runs:
            summary = json.loads((runs / f"fold_{k}" / "val_summary.json").read_text())
            records = [json.loads(line) for line in (runs / f"fold_{k}" / "metrics.jsonl").read_text().splitlines()
                       if line.strip()]
            per_fold[k]["runs"].append({
                "run": str(runs / f"fold_{k}"), "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
                "val_rsna_map_by_epoch": [r["val_rsna_map"] for r in records],
                "images_per_s": [r["images_per_s"] for r in records], "n_val": summary["n_val"]})

    out = {
        "cache": str(args.cache), "runs": [str(r) for r in args.runs], "classifier_oof": str(args.classifier_oof),
        "classifier_folds_match_detector_folds": same_folds,
        "folds_scored": folds, "n_folds": n_folds, "n_patients": len(ids), "n_positive": int(sum(len(g) > 0 for g in gt)),
        "n_boxes_gt": int(sum(len(g) for g in gt)),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "per_fold": per_fold,
        "variants": rows,
        "chosen_by_cross_fitting": {"rsna_map": full["rsna_map"], "ci95": list(full_ci), "per_fold": full["chosen"],
                                    "n_boxes": full["n_boxes"],
                                    "picks": {f"{'hflip' if t else 'plain'}/{g}/{f}": c for (t, g, f), c in picks.items()}},
        "deployment_settings_tuned_on_all": deploy,
        "written_postprocess": product,
        "library_cross_fitted_rsna_map_5_random_folds_opacity_gating_plain": library_cf,
        "not_measured": "WBF across the five fold models: each patient has one fold model that never saw it "
                        "(several --runs measure an ensemble of models trained on the same folds instead)",
        "wall_s": time.perf_counter() - wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float))

    def cell(r: dict[str, Any]) -> str:
        return f"{r['rsna_map']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"

    by_key = {(r["tta"], r["gating"], r["fusion"], r["shrink"]): r for r in rows}
    print(f"\nRSNA metric on all {len(ids)} patients out of fold, cross-fitted on the folds [patient bootstrap 95 % CI]")
    print("| gating | fusion | shrink | " + " | ".join("hflip TTA" if t else "no TTA" for t in ttas) + " |")
    print("|---|---|---|" + "---|" * len(ttas))
    for gating, fusion, shrink_name in itertools.product(GATINGS, FUSION_IOUS, SHRINK_ROWS):
        cells = " | ".join(cell(by_key[(t, gating, fusion, shrink_name)]) for t in ttas)
        print(f"| {gating} | {fusion} | {shrink_name} | {cells} |")
    print(f"| **everything chosen by cross-fitting** | | | **{full['rsna_map']:.3f}** "
          f"[{full_ci[0]:.3f}, {full_ci[1]:.3f}] |")
    for c in full["chosen"]:
        print(f"  fold {c['fold']}: {'hflip' if c['tta'] else 'plain'}, gating {c['gating']}, {c['fusion']} "
              f"{c['fusion_iou']:g}, shrink {c['shrink']:g}, score >= {c['score_threshold']:.4f}, "
              f"at most {c['max_boxes'] or 'any'} boxes")
    print(f"\nwritten {args.out} ({out['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
