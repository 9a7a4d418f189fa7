"""Classifier variants side by side on the same 5 folds: out-of-fold opacity AUCs (issue 17).

Every variant is a k-fold ``train_classifier`` run on caches prepared from the same
folder with ``prepare --folds 5`` (the same patients in the same folds at every size), so
each row's ``oof.csv`` holds one held-out P(opacity) per patient of the same 600 and the
rows can be compared pairwise (DeLong) against the README's recipe, the first variant.
Rows:

* one per trained variant (backbone, input size, label smoothing, CLAHE contrast
  normalisation of the cache);
* ``+ flip TTA`` for each: the same fold models, each held-out image also predicted
  mirrored, logits averaged (costs inference only);
* ensembles across backbones (and seeds): the mean of the runs' out-of-fold logits, as a
  bundle of several runs averages them;
* with ``--detector-runs`` (the fold runs of ``bench_detector_oof.py``): the detector's top
  box score per patient, out of fold, alone and rank-averaged with the reference and with
  the largest ensemble (a patient with no box scores 0).

Runs already complete (``oof.csv`` present) are reused, so the script resumes after an
interruption and a row can be added later. Caches: ``CACHES/cache{size}`` made with
``lungopacity prepare ../shared/data/rsna --out CACHES/cache256 --size 256 --folds 5`` (and
320, 384); the CLAHE cache is derived from ``cache256`` by this script.

    python benchmarks/bench_classifier_variants.py --caches runs/v --runs runs/v \
        [--only lite0_256 lite1_256] [--out runs/v/variants.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lungopacity.constants import LUNG_OPACITY
from lungopacity.data.cache import PreparedCache
from lungopacity.engine.classifier import ClassifierTrainConfig, fold_positions, predict_logits, train_classifier
from lungopacity.engine.runs import LOGIT_COLUMNS, load_classifier_run
from lungopacity.metrics.classification import bootstrap_auc_ci, delong_test, roc_auc, softmax

#: The README's small-data recipe; every variant changes one or two of these.
BASE = ClassifierTrainConfig(
    backbone="efficientnet_lite0", pretrained="efficientnet-lite0", folds=5, epochs=3,
)


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    cache: str = "cache256"  # folder name under --caches
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self) -> ClassifierTrainConfig:
        return replace(BASE, **self.overrides)


VARIANTS: tuple[Variant, ...] = (
    Variant("lite0_256", "Lite0, 256 px (README recipe)"),
    Variant("lite1_256", "Lite1, 256 px", overrides={"backbone": "efficientnet_lite1",
                                                    "pretrained": "efficientnet-lite1"}),
    Variant("lite2_256", "Lite2, 256 px", overrides={"backbone": "efficientnet_lite2",
                                                    "pretrained": "efficientnet-lite2"}),
    Variant("lite0_320", "Lite0, 320 px", cache="cache320"),
    Variant("lite0_256_clahe", "Lite0, 256 px, CLAHE on the cache", cache="cache256_clahe"),
    Variant("lite0_256_ls", "Lite0, 256 px, label smoothing 0.1", overrides={"label_smoothing": 0.1}),
    Variant("lite0_384", "Lite0, 384 px", cache="cache384"),
    Variant("lite0_256_seed1", "Lite0, 256 px, seed 1", overrides={"seed": 1}),
    Variant("lite0_256_seed2", "Lite0, 256 px, seed 2", overrides={"seed": 2}),
    Variant("lite0_256_box", "Lite0, 256 px, box-supervised activation map (weight 1)",
            overrides={"box_supervision": 1.0}),
    Variant("lite0_256_mixup", "Lite0, 256 px, mixup (alpha 0.4)", overrides={"mixup": 0.4}),
)

#: Backbone ensembles (mean of out-of-fold P(opacity)); a row appears when all its runs exist.
ENSEMBLES: tuple[tuple[str, ...], ...] = (
    ("lite0_256", "lite1_256"),
    ("lite0_256", "lite2_256"),
    ("lite1_256", "lite2_256"),
    ("lite0_256", "lite1_256", "lite2_256"),
    ("lite0_256", "lite1_256", "lite2_256", "lite0_320"),
    ("lite0_256", "lite0_256_seed1"),
    ("lite0_256", "lite0_256_seed1", "lite0_256_seed2"),
    ("lite0_256", "lite0_256_box"),
    ("lite0_256", "lite0_384"),
    ("lite0_256", "lite0_256_mixup"),
    ("lite0_256", "lite1_256", "lite2_256", "lite0_320", "lite0_256_clahe", "lite0_256_ls", "lite0_256_seed1",
     "lite0_256_seed2"),
)


def clahe_cache(source: Path, target: Path, clip_limit: float = 0.01) -> Path:
    """A copy of a prepared cache with CLAHE applied to every image (8 x 8 tiles, skimage).

    The 4th place of the challenge normalised contrast this way. It is applied to the
    cache's uint8 images, i.e. after the reader's window policy, so the rest of the pixel
    path is unchanged.
    """
    from skimage.exposure import equalize_adapthist

    if (target / "images.npy").exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns("images.npy"))
    images = np.load(source / "images.npy", mmap_mode="r")
    out = np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=np.uint8, shape=images.shape)
    for i in range(len(images)):
        out[i] = np.round(equalize_adapthist(images[i], clip_limit=clip_limit) * 255.0).astype(np.uint8)
    out.flush()
    del out
    meta = json.loads((partial / "meta.json").read_text())
    meta["contrast"] = f"CLAHE clip_limit={clip_limit} (bench_classifier_variants)"
    (partial / "meta.json").write_text(json.dumps(meta, indent=2))
    partial.rename(target)
    return target


class _Mirrored(nn.Module):
    """The wrapped model applied to the horizontally mirrored image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.flip(x, dims=(-1,)))


def flip_tta_oof(run_dir: Path, cache_dir: Path) -> pd.DataFrame:
    """``patientId, Target, p``: each fold's selected model on its held-out images and their mirror images."""
    run = load_classifier_run(run_dir)
    cache = PreparedCache(cache_dir)
    models = run.load_models("cpu")
    parts = []
    for fold, (_, val) in enumerate(fold_positions(cache, run.folds)):
        model = models[fold].eval()
        logits = predict_logits([model, _Mirrored(model)], cache, val, size=run.input_size)  # type: ignore[list-item]
        parts.append(pd.DataFrame({
            "patientId": cache.table["patientId"].to_numpy()[val],
            "Target": cache.table["Target"].to_numpy()[val].astype(int),
            "p": softmax(logits.astype(np.float64))[:, LUNG_OPACITY],
        }))
    return pd.concat(parts, ignore_index=True)


def read_oof(run_dir: Path) -> pd.DataFrame:
    oof = pd.read_csv(run_dir / "oof.csv", dtype={"patientId": str})
    logit_columns = [c for c in oof.columns if c.startswith("logit_")]
    return oof.rename(columns={"p_lung_opacity": "p"})[["patientId", "Target", "p", "p_normal", "class",
                                                         *logit_columns]]


def detector_top_scores(detector_runs: Path) -> pd.DataFrame:
    """``patientId, p``: each patient's highest out-of-fold box score (0 without a box)."""
    from lungopacity.io.submission import read_submission

    files = sorted(detector_runs.glob("fold_*/oof_last_plain.csv"))
    if not files:
        raise SystemExit(f"no fold_*/oof_last_plain.csv in {detector_runs} (run bench_detector_oof.py)")
    tables = [read_submission(path) for path in files]
    table = pd.concat(tables, ignore_index=True).drop_duplicates("patientId")
    top = [float(np.max(scores)) if len(scores) else 0.0 for scores in table["scores"]]
    return pd.DataFrame({"patientId": table["patientId"].astype(str), "p": top})


def add_detector_rows(tables: dict[str, pd.DataFrame], descriptions: dict[str, str], detector_runs: Path) -> None:
    """The detector's top box score, and its rank mean with the reference and the largest ensemble."""
    from scipy.stats import rankdata

    reference = next(iter(tables))
    top = detector_top_scores(detector_runs).set_index("patientId")
    base = tables[reference].set_index("patientId")
    top = top.loc[base.index]
    tables["detector top box"] = pd.DataFrame({"patientId": base.index, "Target": base["Target"].to_numpy(),
                                               "p": top["p"].to_numpy()})
    descriptions["detector top box"] = "the detector's highest box score (5 fold detectors, out of fold)"
    ensembles = [name for name in tables if descriptions[name].startswith("ensemble")]
    for name in [reference, *ensembles[-1:]]:
        table = tables[name].set_index("patientId").loc[base.index]
        rank_mean = (rankdata(table["p"].to_numpy()) + rankdata(top["p"].to_numpy())) / (2 * len(table))
        combined = f"{name} & detector top box"
        tables[combined] = pd.DataFrame({"patientId": base.index, "Target": base["Target"].to_numpy(), "p": rank_mean})
        descriptions[combined] = f"rank mean of {name} and the detector's top box score"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", type=Path, required=True, help="folder holding cache256, cache320, cache384")
    parser.add_argument("--runs", type=Path, required=True, help="folder for the variants' run folders")
    parser.add_argument("--only", nargs="+", default=None, help="train only these variants (others: reuse if present)")
    parser.add_argument("--no-train", action="store_true", help="only report the runs that exist")
    parser.add_argument("--no-report", action="store_true", help="only train (the table needs all runs' TTA passes)")
    parser.add_argument("--detector-runs", type=Path, default=None,
                        help="folder of bench_detector_oof.py's fold_K runs (their oof_last_plain.csv)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    from lungopacity.cli import _TqdmProgress  # the CLI's bars, so long runs show progress

    seconds: dict[str, float] = {}
    timing_file = args.runs / "variant_seconds.json"
    if timing_file.exists():
        seconds.update(json.loads(timing_file.read_text()))
    for variant in VARIANTS:
        run_dir = args.runs / variant.name
        if (run_dir / "oof.csv").exists() or args.no_train or (args.only and variant.name not in args.only):
            continue
        cache_dir = args.caches / variant.cache
        if variant.cache.endswith("_clahe"):
            clahe_cache(args.caches / variant.cache.removesuffix("_clahe"), cache_dir)
        print(f"training {variant.name}: {variant.description} on {cache_dir}", flush=True)
        started = time.perf_counter()
        train_classifier(cache_dir, run_dir, variant.config(), resume=run_dir.exists(), progress=_TqdmProgress())
        seconds[variant.name] = time.perf_counter() - started
        timing_file.write_text(json.dumps(seconds, indent=2))
    if args.no_report:
        return

    tables: dict[str, pd.DataFrame] = {}
    descriptions: dict[str, str] = {}
    for variant in VARIANTS:
        run_dir = args.runs / variant.name
        if not (run_dir / "oof.csv").exists():
            continue
        tables[variant.name] = read_oof(run_dir)
        descriptions[variant.name] = variant.description
        tta_file = run_dir / "oof_flip_tta.csv"
        if not tta_file.exists():
            flip_tta_oof(run_dir, args.caches / variant.cache).to_csv(tta_file, index=False)
        tables[f"{variant.name}+tta"] = pd.read_csv(tta_file, dtype={"patientId": str})
        descriptions[f"{variant.name}+tta"] = variant.description + " + flip TTA"
    for members in ENSEMBLES:
        if all(m in tables for m in members):
            name = " + ".join(members) if len(members) <= 4 else f"all {len(members)} runs"
            # Logits averaged, as the bundle averages its members (engine.bundle.ensemble_held_out).
            index = tables[members[0]]["patientId"]
            logits = np.mean([tables[m].set_index("patientId").loc[index, list(LOGIT_COLUMNS)].to_numpy(np.float64)
                              for m in members], axis=0)
            tables[name] = pd.DataFrame({
                "patientId": index.to_numpy(), "p": softmax(logits)[:, LUNG_OPACITY],
                "Target": tables[members[0]]["Target"].to_numpy(),
            })
            descriptions[name] = "ensemble (mean logits) of " + ", ".join(members)
    if not tables:
        raise SystemExit(f"no finished variant runs in {args.runs}")
    if args.detector_runs is not None:
        add_detector_rows(tables, descriptions, args.detector_runs)

    reference = next(iter(tables))
    ref = tables[reference].set_index("patientId")
    rows = []
    print(f"{len(ref)} patients out of fold ({int(ref['Target'].sum())} with opacity); reference {reference}")
    for name, table in tables.items():
        table = table.set_index("patientId").loc[ref.index]
        if len(table) != len(ref):
            raise SystemExit(f"{name} covers other patients than {reference}")
        y = table["Target"].to_numpy().astype(int)
        interval = bootstrap_auc_ci(y, table["p"].to_numpy(), n_boot=args.n_boot)
        row: dict[str, Any] = {"name": name, "description": descriptions[name], **interval._asdict()}
        if "p_normal" in table:
            row["abnormal_auc"] = float(roc_auc((table["class"] != 0).astype(int), 1.0 - table["p_normal"]))
        if name in seconds:
            row["train_seconds"] = seconds[name]
        line = f"{name:>45}: opacity AUC {interval.auc:.3f} [{interval.lo:.3f}, {interval.hi:.3f}]"
        if name != reference:
            test = delong_test(y, table["p"].to_numpy(), ref["p"].to_numpy())
            row.update(delta=test.auc_a - test.auc_b, p=test.p)
            line += f"  {test.auc_a - test.auc_b:+.3f} vs {reference}, DeLong p = {test.p:.3f}"
        rows.append(row)
        print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps({"n": int(len(ref)), "reference": reference, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
