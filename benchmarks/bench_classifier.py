"""Classifier benchmarks on the 600 real RSNA images of ``../shared/data/rsna``.

Parts (``--part``, several may be given; default ``c``):

* ``a`` — the offline ImageNet EfficientNet-Lite0 (``--pretrained efficientnet-lite0``) with
  the ``finetune`` recipe, 5-fold at 256 px; binary opacity AUC, abnormal-vs-normal AUC
  and 3-class accuracy from the out-of-fold probabilities (``evaluate_classifier`` on the
  run's own cache uses ``oof.csv``), with 95 % bootstrap intervals.
* ``b`` — ``legacy_xception`` from scratch with the ``paper`` recipe (SGD 0.045, x0.94 every
  2 epochs), the cache's 80/20 split at 128 px, as many epochs as fit ``--minutes``
  (measured from a short probe run), capped by ``--epochs``.
* ``c`` — CPU/GPU throughput: training images/s of both backbones at their sizes and the
  share of step time spent waiting for data (``metrics.jsonl``), from a bounded epoch.

Runs (each prints a Markdown table and writes ``results_<part>.json`` under ``--out``)::

    .venv/bin/python benchmarks/bench_classifier.py --part a --out bench-classifier           # ~15 min (3 epochs x 5 folds)
    .venv/bin/python benchmarks/bench_classifier.py --part b --minutes 20 --out bench-classifier  # ~20 min
    .venv/bin/python benchmarks/bench_classifier.py --part c --max-steps 8 --out bench-classifier
    # smoke of (a): two folds, one bounded epoch
    .venv/bin/python benchmarks/bench_classifier.py --part a --folds 2 --epochs 1 --max-steps 2 --n-boot 200

Caches are prepared once under ``--out`` (``cache_256``, ``cache_128``) and reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lungopacity.data.cache import PreparedCache, prepare_cache
from lungopacity.engine.classifier import ClassifierTrainConfig, train_classifier
from lungopacity.engine.evaluate import evaluate_classifier

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna"
LITE0 = dict(backbone="efficientnet_lite0", pretrained="efficientnet-lite0", recipe="finetune", size=256)
XCEPTION = dict(backbone="legacy_xception", pretrained="none", recipe="paper", size=128)


def cache_for(data: Path, out: Path, size: int, workers: int, folds: int = 5) -> Path:
    """Prepare (or reuse) the cache of ``data`` at ``size`` px with ``folds`` folds under ``out``.

    Training uses the cache's folds, so a k-fold run needs a cache prepared with that k.
    """
    cache = out / (f"cache_{size}" if folds == 5 else f"cache_{size}_{folds}fold")
    start = time.perf_counter()
    result = prepare_cache(data, cache, size=size, workers=workers, folds=folds)
    if result.n_prepared:
        print(f"prepared {result.n_prepared} images at {size} px in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return cache


def _tag_suffix(args: argparse.Namespace) -> str:
    """Runs and results of one part with different settings side by side (``--tag``)."""
    return f"_{args.tag}" if args.tag else ""


def fresh_run_dir(path: Path) -> Path:
    """A benchmark run always starts from scratch (an old one would be refused)."""
    if path.exists():
        shutil.rmtree(path)
    return path


def read_metrics_lines(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def fmt_auc(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}"


def quality_row(name: str, settings: dict[str, Any], epochs_text: str, metrics: dict[str, Any], minutes: float) -> str:
    return (
        f"| {name} | {settings['recipe']} | {settings['size']} | {epochs_text} | {metrics['n']} ({metrics['source']}) "
        f"| {fmt_auc(metrics['opacity_auc'], metrics['opacity_auc_ci'])} "
        f"| {fmt_auc(metrics['abnormal_auc'], metrics['abnormal_auc_ci'])} "
        f"| {metrics['accuracy']:.3f} | {minutes:.1f} |"
    )


QUALITY_HEADER = (
    "| model | recipe | px | epochs | patients (probabilities) | opacity AUC [95 % CI] | abnormal AUC [95 % CI] "
    "| 3-class accuracy | train min |\n|---|---|---|---|---|---|---|---|---|"
)


def part_a(args: argparse.Namespace) -> dict[str, Any]:
    """EfficientNet-Lite0 (offline ImageNet weights), finetune recipe, k-fold OOF at 256 px."""
    cache = cache_for(args.data, args.out, LITE0["size"], args.workers, folds=args.folds)
    run = fresh_run_dir(args.out / f"run_a_lite0_{args.folds}fold{_tag_suffix(args)}")
    config = ClassifierTrainConfig(
        backbone=LITE0["backbone"], pretrained=LITE0["pretrained"], recipe=LITE0["recipe"], folds=args.folds,
        epochs=args.epochs or 3, batch_size=args.batch_size, max_steps_per_epoch=args.max_steps, seed=args.seed,
        lr=args.lr,
        patience=args.patience, device=args.device, num_workers=args.loader_workers,
    )
    start = time.perf_counter()
    train_classifier(cache, run, config)
    minutes = (time.perf_counter() - start) / 60
    metrics = evaluate_classifier(run, cache, "all", run / "evaluation", n_boot=args.n_boot, device=args.device)
    ran: dict[int, int] = {}
    for record in read_metrics_lines(run):
        ran[record["fold"]] = max(ran.get(record["fold"], 0), record["epoch"])
    epochs_text = f"max {config.epochs}, ran {', '.join(str(ran[f]) for f in sorted(ran))}"
    print(f"\n### (a) {config.backbone}, pretrained {config.pretrained}, {args.folds}-fold out-of-fold\n")
    print(QUALITY_HEADER)
    print(quality_row(f"{config.backbone} ({config.pretrained})", LITE0, epochs_text, metrics, minutes))
    return {"config": config.to_dict(), "metrics": metrics, "train_minutes": minutes, "run": str(run)}


def _probe_seconds_per_epoch(cache: Path, base: ClassifierTrainConfig, out: Path, probe_steps: int) -> float:
    """Seconds one full epoch (training + validation) takes, from a short bounded run."""
    probe = fresh_run_dir(out / "probe_b")
    settings = base.to_dict() | {"epochs": 1, "max_steps_per_epoch": probe_steps}
    start = time.perf_counter()
    train_classifier(cache, probe, ClassifierTrainConfig.from_dict(settings))
    total = time.perf_counter() - start
    record = read_metrics_lines(probe)[0]
    prepared = PreparedCache(cache)
    steps_full = max(len(prepared.indices("train")) // base.batch_size, 1)
    eval_seconds = max(total - record["train_seconds"], 0.0) / 2  # validation runs twice in a one-epoch run
    shutil.rmtree(probe)
    return record["train_seconds"] / max(probe_steps, 1) * steps_full + eval_seconds


def part_b(args: argparse.Namespace) -> dict[str, Any]:
    """legacy_xception from scratch, paper recipe, 80/20 split at 128 px, bounded by --minutes."""
    cache = cache_for(args.data, args.out, XCEPTION["size"], args.workers)
    base = ClassifierTrainConfig(
        backbone=XCEPTION["backbone"], pretrained=XCEPTION["pretrained"], recipe=XCEPTION["recipe"], folds=1,
        epochs=1, batch_size=args.batch_size, max_steps_per_epoch=args.max_steps, seed=args.seed,
        patience=args.patience, device=args.device, num_workers=args.loader_workers,
    )
    epoch_seconds = _probe_seconds_per_epoch(cache, base, args.out, probe_steps=3)
    fitting = max(1, math.floor(args.minutes * 60 / epoch_seconds))
    epochs = min(fitting, args.epochs) if args.epochs else fitting
    print(f"(b) about {epoch_seconds:.0f} s per epoch: {epochs} epochs in {args.minutes} min", file=sys.stderr)
    config = ClassifierTrainConfig.from_dict(base.to_dict() | {"epochs": epochs})
    run = fresh_run_dir(args.out / "run_b_xception_paper")
    start = time.perf_counter()
    train_classifier(cache, run, config)
    minutes = (time.perf_counter() - start) / 60
    metrics = evaluate_classifier(run, cache, "val", run / "evaluation", n_boot=args.n_boot, device=args.device)
    ran = len(read_metrics_lines(run))
    print(f"\n### (b) {config.backbone} from scratch, paper recipe, 80/20 split (validation patients)\n")
    print(QUALITY_HEADER)
    print(quality_row(config.backbone, XCEPTION, f"{ran} of {epochs}", metrics, minutes))
    return {"config": config.to_dict(), "metrics": metrics, "train_minutes": minutes, "run": str(run)}


def part_c(args: argparse.Namespace) -> dict[str, Any]:
    """Training throughput and data-wait share of both backbones on one bounded epoch."""
    rows, results = [], []
    for settings in (LITE0, XCEPTION):
        cache = cache_for(args.data, args.out, settings["size"], args.workers)
        run = fresh_run_dir(args.out / f"run_c_{settings['backbone']}")
        config = ClassifierTrainConfig(
            backbone=settings["backbone"], pretrained=settings["pretrained"], recipe=settings["recipe"], folds=1,
            epochs=1, batch_size=args.batch_size, max_steps_per_epoch=args.max_steps or 8, seed=args.seed,
            device=args.device, num_workers=args.loader_workers,
        )
        train_classifier(cache, run, config)
        record = read_metrics_lines(run)[0]
        steps = config.max_steps_per_epoch
        results.append({"backbone": config.backbone, "size": settings["size"], "steps": steps, **record})
        rows.append(
            f"| {config.backbone} | {settings['size']} | {config.batch_size} | {steps} | {record['images_per_s']:.1f} "
            f"| {record['data_wait_fraction']:.1%} | {args.loader_workers} |"
        )
        shutil.rmtree(run)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\n### (c) training throughput on {device} ({torch.get_num_threads()} CPU threads)\n")
    print("| backbone | px | batch | steps | train images/s | data wait share | loader workers |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return {"device": device, "threads": torch.get_num_threads(), "rows": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("a", "b", "c"), action="append", help="a, b and/or c (repeatable; default c)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="RSNA folder (default ../shared/data/rsna)")
    parser.add_argument("--out", type=Path, default=Path("bench-classifier"), help="caches, runs and results")
    parser.add_argument("--epochs", type=int, default=None, help="(a) epochs per fold, default 3 (BENCHMARKS.md); (b) upper bound")
    parser.add_argument("--folds", type=int, default=5, help="(a) k of the k-fold")
    parser.add_argument("--minutes", type=float, default=20.0, help="(b) training budget")
    parser.add_argument("--max-steps", type=int, default=None, help="bound every epoch (smoke runs; (c) default 8)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="(a) peak learning rate (default: the recipe's)")
    parser.add_argument("--tag", default="", help="suffix of the run folder and results file (keeps earlier runs)")
    parser.add_argument("--patience", type=int, default=5, help="early stop after this many epochs without a better AUC")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the AUC intervals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="processes preparing the caches (default: CPUs)")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers during training")
    args = parser.parse_args(argv)
    if not (args.data / "stage_2_train_labels.csv").exists():
        parser.error(f"{args.data}: no RSNA folder there (see ../shared/README.md); pass --data")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    for part in args.part or ["c"]:
        result = {"a": part_a, "b": part_b, "c": part_c}[part](args)
        result["argv"] = sys.argv[1:]
        (args.out / f"results_{part}{_tag_suffix(args)}.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
