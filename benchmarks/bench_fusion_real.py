"""Metadata-only fusion network vs logistic regression on the real RSNA tables.

For each seed: a stratified 80/20 patient split by Target of all 26,684 patients
(``io.rsna.stratified_split``), the same encoded features (sex, age, view) for both
models, AUC on the held-out 20 %. Needs scikit-learn (the dev extra) and the shared
data folder; run from the repository root:

    python benchmarks/bench_fusion_real.py [--data ../shared/data/rsna] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sklearn.linear_model import LogisticRegression

from lungopacity.engine.fusion import FusionTrainConfig, load_metadata_table, train_fusion
from lungopacity.io.rsna import stratified_split
from lungopacity.metrics.classification import roc_auc
from lungopacity.models.fusion import METADATA_FEATURES, FeatureEncoder

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="RSNA folder with metadata.csv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    table = load_metadata_table(args.data)
    print(f"{len(table)} patients, {table['Target'].mean():.1%} with opacity ({args.data})")
    print("seed  logistic_auc  network_auc  difference  best_epoch  train_s")
    for seed in args.seeds:
        split = stratified_split(table, val_fraction=0.2, seed=seed, stratify_col="Target").to_numpy()
        train, test = table[split == "train"], table[split == "val"]
        encoder = FeatureEncoder(features=METADATA_FEATURES).fit(train)
        logistic = LogisticRegression().fit(encoder.encode(train)[0], train["Target"])
        auc_logistic = roc_auc(test["Target"], logistic.predict_proba(encoder.encode(test)[0])[:, 1])
        started = time.perf_counter()
        result = train_fusion(train, config=FusionTrainConfig(use_probabilities=False, seed=seed))
        seconds = time.perf_counter() - started
        auc_network = roc_auc(test["Target"], result.model.predict(test).probability)
        print(f"{seed:>4}  {auc_logistic:12.4f}  {auc_network:11.4f}  {auc_network - auc_logistic:+10.4f}"
              f"  {result.best_epoch:>10}  {seconds:7.1f}")


if __name__ == "__main__":
    main()
