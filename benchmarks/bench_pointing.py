"""Pointing game of the classifier's heatmaps on real data (issue 14, deliverable 1).

On a k-fold classifier run and its own prepared cache (the 600 shared RSNA images), every
opacity-positive patient's heatmap comes from the fold model that never trained on it
(out-of-fold). A hit: the map's maximum lies in a ground-truth box
(:mod:`lungopacity.metrics.pointing`; ties split). Compared, on the same patients:

* the area baseline: the boxes' share of the image (a random point's chance);
* a fixed prior without any model: for fold k, the mean box mask of the positives of the
  other folds (where opacities usually are), its maximum used as the point;
* Grad-CAM variants (``inference.gradcam.grad_cam`` options): final map, earlier stages,
  several stages, Grad-CAM++, horizontal-flip averaging;
* with ``--detector``: the detector's top box (the centre of its highest-scoring raw
  detection lies in a GT box), on the patients of the detector's validation split (the
  only ones it never trained on), next to the heatmaps and the baseline on that subset.

Intervals: 95 % percentile bootstrap over patients (the same resamples design for all).
"gain" is hit - baseline per patient, averaged; "vs final" the paired difference with the
default Grad-CAM.

Commands (the 5-fold run and detector of BENCHMARKS.md "Pointing game")::

    L=".venv/bin/python -m lungopacity.cli"
    $L prepare ../shared/data/rsna --out runs/cache256 --size 256
    $L train-classifier runs/cache256 --out runs/lite0 --backbone efficientnet_lite0 \\
        --pretrained efficientnet-lite0 --folds 5 --epochs 3
    $L train-detector runs/cache256 --out runs/det --pretrained efficientnet-lite0 --size 256 \\
        --epochs 2 --batch-size 8
    .venv/bin/python benchmarks/bench_pointing.py --run runs/lite0 --detector runs/det --out runs/pointing --threads 1

Writes ``OUT/pointing.json`` (every figure and the per-patient hits) and ``OUT/pointing.md``
(the table) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungopacity.data.cache import PreparedCache
from lungopacity.engine.pointing import heatmap_scores, positive_positions
from lungopacity.engine.runs import load_classifier_run
from lungopacity.inference.gradcam import FINAL, grad_cam
from lungopacity.io.submission import read_submission
from lungopacity.metrics.pointing import area_share, box_mask, point_hit, pointing_game, pointing_hit

#: name -> grad_cam keyword arguments.
VARIANTS: dict[str, dict[str, Any]] = {
    "gradcam_final": {"stages": (FINAL,)},
    "gradcam_s32": {"stages": (-1,)},
    "gradcam_s16": {"stages": (-2,)},
    "gradcam_s8": {"stages": (-3,)},
    "gradcam_final+s16": {"stages": (FINAL, -2)},
    "gradcam_final+s16+s8": {"stages": (FINAL, -2, -3)},
    "gradcam++_final": {"stages": (FINAL,), "method": "gradcam++"},
    "gradcam++_s16": {"stages": (-2,), "method": "gradcam++"},
    "gradcam_final_flip": {"stages": (FINAL,), "hflip": True},
    "gradcam_s16_flip": {"stages": (-2,), "hflip": True},
    "gradcam_final+s16_flip": {"stages": (FINAL, -2), "hflip": True},
}
DESCRIPTION = {
    "gradcam_final": "Grad-CAM, final feature map (8 x 8 at 256 px; the runtime's map before this benchmark)",
    "gradcam_s32": "Grad-CAM, last stage output before the head conv (stride 32, 8 x 8)",
    "gradcam_s16": "Grad-CAM, stride-16 stage (16 x 16)",
    "gradcam_s8": "Grad-CAM, stride-8 stage (32 x 32)",
    "gradcam_final+s16": "Grad-CAM, final + stride 16, averaged",
    "gradcam_final+s16+s8": "Grad-CAM, final + stride 16 + stride 8, averaged",
    "gradcam++_final": "Grad-CAM++, final feature map",
    "gradcam++_s16": "Grad-CAM++, stride-16 stage",
    "gradcam_final_flip": "Grad-CAM final, + horizontal flip averaged",
    "gradcam_s16_flip": "Grad-CAM stride 16, + horizontal flip averaged",
    "gradcam_final+s16_flip": "Grad-CAM final + stride 16, + horizontal flip averaged",
}


def _fmt_ci(values: Any) -> str:
    return f"[{values[0]:.3f}, {values[1]:.3f}]"


def prior_hits(cache: PreparedCache, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hits and baselines of the out-of-fold box prior (no model) on ``positives``."""
    size = (cache.size, cache.size)
    masks = {}
    folds = cache.table["fold"].to_numpy().astype(int)
    for i in positives:
        shape = (int(cache.table["orig_h"].iat[i]), int(cache.table["orig_w"].iat[i]))
        masks[int(i)] = box_mask(size, cache.table["boxes"].iat[i], shape).astype(np.float64)
    hits, bases = [], []
    for i in positives:
        others = [masks[int(j)] for j in positives if folds[j] != folds[i]]
        prior = np.mean(others, axis=0)
        shape = (int(cache.table["orig_h"].iat[i]), int(cache.table["orig_w"].iat[i]))
        hits.append(pointing_hit(prior, cache.table["boxes"].iat[i], shape))
        bases.append(area_share(size, cache.table["boxes"].iat[i], shape))
    return np.asarray(hits), np.asarray(bases)


def detector_hits(detector_dir: Path, cache: PreparedCache, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Top-box hits on the positives of the detector's validation split (and which positives they are)."""
    table = read_submission(detector_dir / "val_predictions.csv").set_index("patientId")
    config = json.loads((detector_dir / "config.json").read_text())
    ids = cache.table["patientId"].astype(str).to_numpy()
    chosen = np.asarray([i for i in positives if ids[i] in table.index], dtype=np.int64)
    hits = []
    for i in chosen:
        boxes, scores = table.at[ids[i], "boxes"], table.at[ids[i], "scores"]
        if len(scores) == 0:
            hits.append(0.0)
            continue
        x1, y1, x2, y2 = boxes[int(np.argmax(scores))]
        hits.append(float(point_hit((x1 + x2) / 2, (y1 + y2) / 2, cache.table["boxes"].iat[i])))
    info = {"detector_dir": str(detector_dir), "n_val_patients": int(len(table)),
            "train": config.get("train", {})}
    return chosen, np.asarray(hits), info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="k-fold classifier run folder")
    parser.add_argument("--cache", type=Path, help="its prepared cache (default: the run's own)")
    parser.add_argument("--detector", type=Path, help="detector run folder (val_predictions.csv): top-box figure")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--limit", type=int, help="only the first N positives (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reuse", action="store_true",
                        help="take the per-patient hits of variants already in OUT/pointing.json (e.g. to add --detector later)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    run = load_classifier_run(args.run)
    cache = PreparedCache(args.cache or run.cache.path)
    if not run.cache.matches(cache) or not run.is_kfold:
        print("need a k-fold run and its own cache (out-of-fold explanations)", file=sys.stderr)
        return 2
    models = run.load_models("cpu")
    positives = positive_positions(cache, cache.indices())
    if args.limit:
        positives = positives[:args.limit]
    results: dict[str, Any] = {
        "run": str(args.run), "cache": str(cache.path), "n_positive": int(len(positives)),
        "n_patients": int(len(cache.indices())), "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads", "n_boot": args.n_boot, "variants": {},
    }
    per_patient: dict[str, np.ndarray] = {}
    baselines = None
    previous = json.loads((args.out / "pointing.json").read_text()) if args.reuse and (args.out / "pointing.json").is_file() else None
    for name in args.variants:
        kwargs = VARIANTS[name]
        if previous and name in previous["variants"]:
            if previous["per_patient"]["patientId"] != cache.table["patientId"].astype(str).to_numpy()[positives].tolist():
                print("--reuse: the saved results are of other patients", file=sys.stderr)
                return 2
            per_patient[name] = np.asarray(previous["per_patient"][name])
            baselines = np.asarray(previous["per_patient"]["baseline"])
            results["variants"][name] = previous["variants"][name]
            continue
        start = time.perf_counter()
        scores = heatmap_scores(models, cache, positives, input_size=run.input_size, out_of_fold=True,
                                heatmap=lambda ms, x, kw=kwargs: grad_cam(ms, x, **kw), batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        baselines = scores.baselines if baselines is None else baselines
        per_patient[name] = scores.hits
        summary = pointing_game(scores.hits, scores.baselines, n_boot=args.n_boot).to_dict()
        summary["seconds_per_image"] = seconds / max(1, len(positives))
        results["variants"][name] = summary
        print(f"{name}: hit {summary['hit_rate']:.3f} {_fmt_ci(summary['hit_rate_ci'])}, gain {summary['gain']:+.3f} "
              f"{_fmt_ci(summary['gain_ci'])}, {summary['seconds_per_image']:.2f} s/image", flush=True)
    prior, prior_base = prior_hits(cache, positives)
    if baselines is None:
        baselines = prior_base
    per_patient["prior"] = prior
    results["prior"] = pointing_game(prior, prior_base, n_boot=args.n_boot).to_dict()
    results["baseline"] = float(np.mean(baselines))
    if "gradcam_final" in per_patient:
        for name, hits in per_patient.items():
            if name != "gradcam_final":
                results.setdefault("vs_final", {})[name] = pointing_game(hits, per_patient["gradcam_final"], n_boot=args.n_boot).to_dict()

    if args.detector:
        chosen, det, info = detector_hits(args.detector, cache, positives)
        slot = {int(p): k for k, p in enumerate(positives)}
        rows = np.asarray([slot[int(i)] for i in chosen], dtype=np.int64)
        subset = {"n": int(len(chosen)), **info, "detector_top_box": pointing_game(det, baselines[rows], n_boot=args.n_boot).to_dict(),
                  "heatmaps": {name: pointing_game(hits[rows], baselines[rows], n_boot=args.n_boot).to_dict()
                               for name, hits in per_patient.items()}}
        results["detector_subset"] = subset
        per_patient["detector_top_box_subset"] = det

    results["per_patient"] = {"patientId": cache.table["patientId"].astype(str).to_numpy()[positives].tolist(),
                              "baseline": baselines.tolist(), **{k: v.tolist() for k, v in per_patient.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pointing.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "pointing.md").write_text(table)
    print(table)
    return 0


def markdown(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md table of a results dict."""
    lines = [f"{results['n_positive']} opacity-positive patients of {results['n_patients']}, out-of-fold; "
             f"baseline (boxes' share of the image) {results['baseline']:.3f}", "",
             "| heatmap / point | hit rate [95 % CI] | gain over baseline [95 % CI] | vs Grad-CAM final [95 % CI] | s/image |",
             "|---|---|---|---|---|",
             f"| random point (area baseline) | {results['baseline']:.3f} | 0 | | |"]
    prior = results["prior"]
    vs = results.get("vs_final", {})

    def vs_cell(name: str) -> str:
        return f"{vs[name]['gain']:+.3f} {_fmt_ci(vs[name]['gain_ci'])}" if name in vs else ""

    lines.append(f"| fixed prior, no model (out-of-fold mean box mask) | {prior['hit_rate']:.3f} {_fmt_ci(prior['hit_rate_ci'])} | "
                 f"{prior['gain']:+.3f} {_fmt_ci(prior['gain_ci'])} | {vs_cell('prior')} | |")
    for name, summary in results["variants"].items():
        lines.append(f"| {DESCRIPTION.get(name, name)} | {summary['hit_rate']:.3f} {_fmt_ci(summary['hit_rate_ci'])} | "
                     f"{summary['gain']:+.3f} {_fmt_ci(summary['gain_ci'])} | {vs_cell(name)} | {summary['seconds_per_image']:.2f} |")
    subset = results.get("detector_subset")
    if subset:
        det = subset["detector_top_box"]
        lines += ["", f"Detector's validation split: {subset['n']} positive patients (of {subset['n_val_patients']} "
                  f"validation patients), baseline {det['baseline']:.3f}", "",
                  "| on these patients | hit rate [95 % CI] | gain over baseline [95 % CI] |", "|---|---|---|",
                  f"| detector top box (centre of the highest-scoring box in a GT box) | {det['hit_rate']:.3f} "
                  f"{_fmt_ci(det['hit_rate_ci'])} | {det['gain']:+.3f} {_fmt_ci(det['gain_ci'])} |"]
        for name, summary in subset["heatmaps"].items():
            lines.append(f"| {DESCRIPTION.get(name, name)} | {summary['hit_rate']:.3f} {_fmt_ci(summary['hit_rate_ci'])} | "
                         f"{summary['gain']:+.3f} {_fmt_ci(summary['gain_ci'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
