"""Detector benchmark: train on a prepared cache, score the held-out split with and without gating.

Two datasets:

* ``demo`` — synthetic phantoms (``lungopacity.synthetic.write_demo_dataset``), written
  once into ``WORK/demo-data``;
* ``real`` — the 600 real RSNA images in ``../shared/data/rsna`` (1024 px JPEGs + labels).

Both are prepared into ``WORK/cache-<data>-<size>`` (reused when present), the detector is
trained on the cache's train split and evaluated on its val split (held out; the
post-processing is re-tuned there and reported cross-fitted too). Gating needs P(opacity):
``--classifier-probs CSV`` (patientId,p_lung_opacity, e.g. a classifier run's
``fold_0/val_predictions.csv``), or ``--classifier-epochs N`` trains a small classifier on
the same cache first and uses its validation predictions.

CPU time is bounded by ``--epochs`` x ``--max-steps`` x ``--batch-size``. Examples::

    # 1-minute smoke (demo data)
    .venv/bin/python benchmarks/bench_detector.py demo --n 40 --size 128 --epochs 1 --max-steps 3
    # real data, held-out split, gating by a classifier trained here
    .venv/bin/python benchmarks/bench_detector.py real --size 256 --epochs 8 --batch-size 8 \\
        --pretrained efficientnet-lite0 --classifier-epochs 4

The summary (metrics, settings, timings) is printed as JSON and written to
``WORK/bench-<data>-<size>-<stamp>/summary.json`` beside the report folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "rsna"


def _prepare(args: argparse.Namespace, work: Path) -> Path:
    from lungopacity.data.cache import prepare_cache

    if args.data == "demo":
        data_dir = work / f"demo-data-{args.n}-{args.demo_size}-{args.seed}"
        if not (data_dir / "stage_2_train_labels.csv").exists():
            from lungopacity.synthetic import write_demo_dataset

            write_demo_dataset(data_dir, n=args.n, size=args.demo_size, seed=args.seed, overwrite=True)
    else:
        data_dir = REAL_DATA
        if not (data_dir / "stage_2_train_labels.csv").exists():
            sys.exit(f"real RSNA data not found at {data_dir} (see ../shared/README.md)")
    if args.data == "real":
        cache_dir = work / f"cache-real-{args.size}"
    else:
        cache_dir = work / f"cache-demo-{args.n}-{args.demo_size}-{args.size}-{args.seed}"
    prepare_cache(data_dir, cache_dir, size=args.size, workers=args.workers, seed=args.seed)
    return cache_dir


def _train_classifier(args: argparse.Namespace, cache_dir: Path, out: Path) -> Path:
    from lungopacity.engine.classifier import ClassifierTrainConfig, train_classifier

    config = ClassifierTrainConfig(
        backbone=args.classifier_backbone,
        pretrained=args.pretrained if args.classifier_backbone == args.backbone else "none",
        epochs=args.classifier_epochs, batch_size=args.batch_size, seed=args.seed, device=args.device,
        max_steps_per_epoch=args.max_steps,
    )
    result = train_classifier(cache_dir, out, config)
    return result.run_dir / "fold_0" / "val_predictions.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("data", choices=("demo", "real"))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lungopacity-bench-detector",
                        help="scratch folder (caches, runs; reused between runs)")
    parser.add_argument("--n", type=int, default=200, help="demo: patients")
    parser.add_argument("--demo-size", type=int, default=512, help="demo: side of the written images")
    parser.add_argument("--size", type=int, default=256, help="prepared cache side (network input)")
    parser.add_argument("--image-size", type=int, default=None, help="detector image_size (default: --size)")
    parser.add_argument("--arch", default="retinanet", choices=("retinanet", "fasterrcnn"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--pretrained", default="none", help="none | efficientnet-lite0 | timm | PATH")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-steps", type=int, default=None, help="steps per epoch (default: the whole train split)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--fpn-channels", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--workers", type=int, default=2, help="cache preparation processes")
    parser.add_argument("--classifier-probs", type=Path, default=None, help="CSV patientId,p_lung_opacity for gating")
    parser.add_argument("--classifier-epochs", type=int, default=0, help="train a classifier for gating (0: no)")
    parser.add_argument("--classifier-backbone", default="efficientnet_lite0")
    parser.add_argument("--hflip-tta", action="store_true")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lungopacity.engine.detector import DetectorTrainConfig, train_detector
    from lungopacity.engine.evaluate_detection import evaluate_detector

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench_dir = work / f"bench-{args.data}-{args.size}-{stamp}"
    timings: dict[str, float] = {}

    start = time.perf_counter()
    cache_dir = _prepare(args, work)
    timings["prepare_s"] = time.perf_counter() - start

    probs = args.classifier_probs
    if probs is None and args.classifier_epochs > 0:
        start = time.perf_counter()
        probs = _train_classifier(args, cache_dir, bench_dir / "classifier")
        timings["classifier_s"] = time.perf_counter() - start

    config = DetectorTrainConfig(
        arch=args.arch, backbone=args.backbone, pretrained=args.pretrained, size=args.image_size,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
        max_steps_per_epoch=args.max_steps, fpn_channels=args.fpn_channels, patience=max(args.epochs, 1),
    )
    start = time.perf_counter()
    result = train_detector(cache_dir, bench_dir / "detector", config)
    timings["train_s"] = time.perf_counter() - start

    start = time.perf_counter()
    report = evaluate_detector(bench_dir / "detector", cache_dir, "val", bench_dir / "report", probs,
                               device=args.device, hflip_tta=args.hflip_tta)
    timings["evaluate_s"] = time.perf_counter() - start

    history = [json.loads(line) for line in (bench_dir / "detector" / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "data": args.data,
        "cache": str(cache_dir),
        "settings": vars(args) | {"work": str(args.work), "classifier_probs": str(probs) if probs else None},
        "torch_threads": torch.get_num_threads(),
        "device": str(config.device),
        "n_val": report["n_patients"],
        "n_val_positive": report["n_positive"],
        "best_epoch": result.best_epoch,
        "val_rsna_map_by_epoch": [round(r["val_rsna_map"], 4) for r in history],
        "images_per_s": [round(r["images_per_s"], 2) for r in history],
        "variants": {
            name: {
                "postprocess": v["postprocess_description"],
                "rsna_map": v["metrics"]["rsna_map"],
                "cross_fitted_rsna_map": v.get("cross_fitted_rsna_map"),
                "sensitivity_at_fppi": v["metrics"]["sensitivity_at_fppi"],
            }
            for name, v in report["variants"].items()
        },
        "by_view": {view: m["rsna_map"] for view, m in report["by_view"].items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "report": str(bench_dir / "report"),
    }
    (bench_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
