"""Out-of-fold AUC of a k-fold classifier run with each fold's best epoch against its last.

``train-classifier --select best`` (the default) keeps each fold's epoch with the best
validation opacity AUC, chosen on the very patients whose probabilities then make up
``oof.csv``; ``--select last`` keeps the final epoch, which no held-out patient chose. Both
checkpoints are in every fold folder (``best.pt``, ``last.pt``), so one trained run gives
both figures: each fold's two models predict that fold's validation patients, and the
pooled out-of-fold opacity AUCs are compared (bootstrap intervals, paired DeLong test).

    python benchmarks/bench_select.py --run runs/lite0 [--cache CACHE] [--out select.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lungopacity.constants import LUNG_OPACITY
from lungopacity.data.cache import PreparedCache
from lungopacity.engine.classifier import predict_logits
from lungopacity.engine.loop import load_best_model
from lungopacity.engine.runs import load_classifier_run
from lungopacity.metrics.classification import bootstrap_auc_ci, delong_test, softmax
from lungopacity.models.classifier import classifier_from_config


def fold_probabilities(run_dir: Path, cache_dir: Path | None) -> pd.DataFrame:
    """``patientId, fold, Target, p_best, p_last``: P(opacity) of each held-out patient by both checkpoints."""
    run = load_classifier_run(run_dir)
    cache = PreparedCache(cache_dir or run.cache.path)
    position_of = {pid: i for i, pid in enumerate(cache.table["patientId"])}
    rows = []
    for fold in range(run.folds):
        held_out = pd.read_csv(run.fold_dir(fold) / "val_predictions.csv", dtype={"patientId": str})
        positions = np.array([position_of[pid] for pid in held_out["patientId"]])
        by_checkpoint = {}
        for name, path in (("best", run.best_checkpoints[fold]), ("last", run.last_checkpoints[fold])):
            model, checkpoint = load_best_model(path, classifier_from_config, "cpu", run.model_config)
            logits = predict_logits([model.eval()], cache, positions, size=run.input_size)  # type: ignore[list-item]
            by_checkpoint[name] = softmax(logits.astype(np.float64))[:, LUNG_OPACITY]
            by_checkpoint[f"epoch_{name}"] = int(checkpoint["epoch"])
        print(f"fold {fold}: {len(positions)} patients, best epoch {by_checkpoint['epoch_best']}, "
              f"last epoch {by_checkpoint['epoch_last']}")
        rows.append(pd.DataFrame({
            "patientId": held_out["patientId"], "fold": fold,
            "Target": cache.table["Target"].to_numpy()[positions].astype(int),
            "p_best": by_checkpoint["best"], "p_last": by_checkpoint["last"],
        }))
    return pd.concat(rows, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a k-fold classifier run folder")
    parser.add_argument("--cache", type=Path, default=None, help="its prepared cache (default: the run's)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    table = fold_probabilities(args.run, args.cache)
    y = table["Target"].to_numpy()
    best = bootstrap_auc_ci(y, table["p_best"].to_numpy(), n_boot=args.n_boot)
    last = bootstrap_auc_ci(y, table["p_last"].to_numpy(), n_boot=args.n_boot)
    test = delong_test(y, table["p_best"].to_numpy(), table["p_last"].to_numpy())
    figures = {
        "run": str(args.run), "n": int(len(table)), "n_positive": int(y.sum()),
        "best": best._asdict(), "last": last._asdict(),
        "delong_best_vs_last": test._asdict(),
    }
    print(f"{len(table)} patients out of fold ({int(y.sum())} with opacity)")
    print(f"select best: opacity AUC {best.auc:.3f} [{best.lo:.3f}, {best.hi:.3f}]")
    print(f"select last: opacity AUC {last.auc:.3f} [{last.lo:.3f}, {last.hi:.3f}]")
    print(f"best - last: {test.auc_a - test.auc_b:+.3f}, DeLong p = {test.p:.3f}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
