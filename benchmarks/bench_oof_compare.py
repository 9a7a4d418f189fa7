"""Out-of-fold opacity AUCs of k-fold classifier runs on the same patients, and their ensemble.

Each run's ``oof.csv`` (written by ``train-classifier``) holds one held-out P(opacity) per
patient. The runs must cover the same patients (the same cache and folds, e.g. two backbones
trained with the README's commands). Prints each run's AUC with its bootstrap interval, the
ensemble (mean of the runs' probabilities), and the paired DeLong test of each row against
the first run:

    python benchmarks/bench_oof_compare.py runs/lite0 runs/lite1 [--out compare.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from lungopacity.metrics.classification import bootstrap_auc_ci, delong_test

OOF_COLUMN = "p_lung_opacity"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="k-fold classifier run folders (the first is the reference)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    tables = []
    for k, run in enumerate(args.runs):
        oof = pd.read_csv(run / "oof.csv", dtype={"patientId": str}).drop_duplicates("patientId")
        name = run.name if sum(r.name == run.name for r in args.runs) == 1 else f"{run.name} ({k + 1})"
        tables.append(oof.set_index("patientId")[["Target", OOF_COLUMN]].rename(columns={OOF_COLUMN: name}))
    joined = pd.concat([t[[t.columns[1]]] for t in tables], axis=1, join="inner")
    if any(len(t) != len(joined) for t in tables):
        raise SystemExit(f"the runs cover different patients ({[len(t) for t in tables]} vs {len(joined)} shared)")
    y = tables[0].loc[joined.index, "Target"].to_numpy().astype(int)
    scores = {column: joined[column].to_numpy() for column in joined.columns}
    if len(args.runs) > 1:
        scores["ensemble (mean P)"] = joined.mean(axis=1).to_numpy()
    reference = next(iter(scores))
    rows = []
    print(f"{len(y)} patients out of fold ({int(y.sum())} with opacity)")
    for name, score in scores.items():
        interval = bootstrap_auc_ci(y, score, n_boot=args.n_boot)
        row = {"name": name, **interval._asdict()}
        line = f"{name}: opacity AUC {interval.auc:.3f} [{interval.lo:.3f}, {interval.hi:.3f}]"
        if name != reference:
            test = delong_test(y, score, scores[reference])
            row.update(delta=test.auc_a - test.auc_b, p=test.p)
            line += f"; vs {reference}: {test.auc_a - test.auc_b:+.3f}, DeLong p = {test.p:.3f}"
        rows.append(row)
        print(line)
    if args.out:
        args.out.write_text(json.dumps({"n": int(len(y)), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
