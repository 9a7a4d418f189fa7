"""Out-of-fold opacity AUCs of k-fold classifier runs on the same patients, and their ensemble.

Each run's ``oof.csv`` (written by ``train-classifier``) holds one held-out P(opacity) per
patient. The runs must cover the same patients (the same cache and folds, e.g. two backbones
trained with the README's commands). Prints each run's AUC with its bootstrap interval, the
ensemble (mean of the runs' probabilities), and the paired DeLong test of each row against
the first run:

    python benchmarks/bench_oof_compare.py runs/lite0 runs/lite1 [--out compare.json]

``--group LABEL=RUN,RUN,...`` adds a row for an ensemble of those runs scored as a bundle
of them scores it (the mean of their logits, then the softmax), and ``--reference LABEL``
tests every row against that row instead of the first run:

    python benchmarks/bench_oof_compare.py runs/a_s0 runs/b_s0 --group a=runs/a_s0,runs/a_s1 \
        --group b=runs/b_s0,runs/b_s1 --reference a
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from lungopacity.engine.calibration import opacity_from_logits
from lungopacity.engine.runs import LOGIT_COLUMNS
from lungopacity.metrics.classification import bootstrap_auc_ci, delong_test

OOF_COLUMN = "p_lung_opacity"


def read_oof(run: Path) -> pd.DataFrame:
    if not (run / "oof.csv").is_file():
        raise SystemExit(f"{run / 'oof.csv'}: missing (train-classifier writes it when every fold is done)")
    return pd.read_csv(run / "oof.csv", dtype={"patientId": str}).drop_duplicates("patientId").set_index("patientId")


def group_scores(spec: str, patients: pd.Index) -> tuple[str, np.ndarray]:
    """LABEL=RUN,RUN,...: P(opacity) of the mean of the runs' logits, on ``patients``."""
    label, _, paths = spec.partition("=")
    if not label or not paths:
        raise SystemExit(f"--group {spec!r}: expected LABEL=RUN,RUN,...")
    logits = []
    for path in paths.split(","):
        oof = read_oof(Path(path))
        if not patients.isin(oof.index).all():
            raise SystemExit(f"--group {label}: {path} does not cover the same patients")
        logits.append(oof.loc[patients, list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64))
    return label, opacity_from_logits(np.mean(logits, axis=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="k-fold classifier run folders (the first is the reference)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--group", action="append", default=[], metavar="LABEL=RUN,RUN",
                        help="an ensemble row: the mean of these runs' logits (repeatable)")
    parser.add_argument("--reference", default=None, help="the row every other is tested against (default: the first run)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    tables = []
    for k, run in enumerate(args.runs):
        oof = read_oof(run)
        name = run.name if sum(r.name == run.name for r in args.runs) == 1 else f"{run.name} ({k + 1})"
        tables.append(oof[["Target", OOF_COLUMN]].rename(columns={OOF_COLUMN: name}))
    joined = pd.concat([t[[t.columns[1]]] for t in tables], axis=1, join="inner")
    if any(len(t) != len(joined) for t in tables):
        raise SystemExit(f"the runs cover different patients ({[len(t) for t in tables]} vs {len(joined)} shared)")
    y = tables[0].loc[joined.index, "Target"].to_numpy().astype(int)
    scores = {column: joined[column].to_numpy() for column in joined.columns}
    if len(args.runs) > 1:
        scores["ensemble (mean P)"] = joined.mean(axis=1).to_numpy()
    for spec in args.group:
        label, score = group_scores(spec, joined.index)
        scores[label] = score
    reference = args.reference or next(iter(scores))
    if reference not in scores:
        raise SystemExit(f"--reference {reference!r}: not a row ({', '.join(scores)})")
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
