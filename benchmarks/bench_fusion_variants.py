"""Fusion variants on the imaged RSNA patients: does metadata add anything to the image classifier?

Issue 17, deliverable 2. Every score is cross-fitted by the image classifier's own folds
(its ``oof.csv``): no model scores a patient it was fitted on. Each row gets its opacity
AUC, a bootstrap interval and the paired DeLong test against the image alone:

* ``image``: the classifier's out-of-fold ``p_lung_opacity`` (the reference);
* (a) *the prior*: a metadata model (sex, age, view through the project's
  ``FeatureEncoder``) fitted on the labelled patients WITHOUT images (26,084 of the
  26,684 in ``metadata.csv``; no imaged patient, checked), alone and as an input:
  Bayes (``logit p_image + logit prior - logit base rate``, nothing fitted on the imaged
  patients), a cross-fitted logistic regression on the two logits, and the paper's
  network with the prior as a 7th input (the six features as ``FeatureEncoder`` defines
  them, the prior appended; trained exactly as ``train_fusion`` trains, which the script
  checks by reproducing ``cross_fit_scores`` without the 7th column);
* (b) metadata fed into the classifier's penultimate layer (the 4th place's design): the
  pooled image features concatenated with the encoded sex / age / view before the final
  linear layer, trained with the image run's own settings, folds and seeds
  (``engine.loop.EpochLoop`` through a subclass of the classifier's training task);
  its head starts as the image model's head with zero weights on the metadata, so at
  the first step both networks compute the same function; (b') is the same with the
  metadata weights at ``--boost`` (100) times the learning rate: with the recipe's
  AdamW at 1e-3 over 90 steps they can move by about 0.1 at most, too little to carry
  the logit differences that sex / age / view make;
* (c) the paper's fusion network as it is (``engine.fusion.cross_fit_scores``, 6 inputs).

(b) and (b') each train 5 folds x the image run's epochs (7-9 minutes on 2 CPU cores for
Lite0 at 256 px, 3 epochs) into ``--penultimate-run`` / ``--penultimate-boost-run`` and are
reused from their ``oof.csv`` afterwards (``--penultimate-only`` trains them and stops);
the rest takes seconds. Needs scikit-learn (the dev extra) and the
shared data folder; run from the repository root:

    python benchmarks/bench_fusion_variants.py --image-run runs/lite0_256 --cache runs/cache256 \\
        [--data ../shared/data/rsna] [--penultimate-run runs/fusion_variants/penultimate] \\
        [--penultimate-boost-run runs/fusion_variants/penultimate_boost] [--seeds 0 1 2] \\
        [--out fusion_variants.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader

from lungopacity.data.cache import PreparedCache
from lungopacity.data.datasets import CacheDataset, collate_samples
from lungopacity.data.preprocess import network_input
from lungopacity.engine.classifier import _ClassifierTask, _loop_settings, fold_positions
from lungopacity.engine.common import training_context
from lungopacity.engine.config import ClassifierTrainConfig
from lungopacity.engine.fusion import (
    OOF_COLUMNS,
    FusionTrainConfig,
    build_fusion_table,
    cross_fit_scores,
    load_metadata_table,
    train_fusion,
    validate_oof,
)
from lungopacity.engine.loop import EpochLoop, LoopFiles, StepContext, load_best_weights
from lungopacity.io.rsna import stratified_split
from lungopacity.metrics.classification import bootstrap_auc_ci, delong_test
from lungopacity.models.classifier import OpacityClassifier
from lungopacity.models.fusion import METADATA_FEATURES, FeatureEncoder, FusionNet

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna"
IMAGE_COLUMN = "p_lung_opacity"
#: Probabilities are clipped to [EPS, 1 - EPS] before a logit.
EPS = 1e-6
#: A variant replaces the image alone only with a higher AUC and DeLong p below this.
ALPHA = 0.05
#: The recipes' default learning rates (engine.common.build_optimizer).
RECIPE_LR = {"finetune": 1e-3, "paper": 0.045}


# ------------------------------------------------------------------------ pure helpers


def logit(p: np.ndarray | float) -> np.ndarray:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[EPS, 1 - EPS]``."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def bayes_combination(p_image: np.ndarray, prior: np.ndarray, base_rate: float) -> np.ndarray:
    """Posterior when the image and the metadata are independent evidence given the label.

    ``logit p = logit p_image + logit prior - logit base_rate``: the image's likelihood
    ratio (its odds over the base rate it was trained at) times the prior odds. Nothing is
    fitted; ``base_rate`` shifts every logit by the same amount, so it moves calibration,
    not the AUC.
    """
    return sigmoid(logit(p_image) + logit(prior) - logit(base_rate))


def cross_fitted(folds: np.ndarray, fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Held-out scores: for each fold ``k``, ``fit_predict(train_mask, test_mask)`` fits on the
    other folds and returns scores for fold ``k``'s rows (in their order)."""
    folds = np.asarray(folds)
    out = np.full(len(folds), np.nan)
    for fold in np.unique(folds):
        test = folds == fold
        out[test] = fit_predict(~test, test)
    if np.isnan(out).any():
        raise ValueError("cross-fitting left rows without a score")
    return out


def cross_fitted_logistic(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """P(y=1) of a logistic regression (scikit-learn defaults) fitted on the other folds."""
    x = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
    y = np.asarray(y)

    def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        return LogisticRegression().fit(x[train], y[train]).predict_proba(x[test])[:, 1]

    return cross_fitted(folds, fit_predict)


def compare(y: np.ndarray, scores: dict[str, np.ndarray], reference: str, n_boot: int, seed: int) -> list[dict]:
    """AUC with bootstrap interval for each score and DeLong against ``reference``."""
    rows = []
    for key, score in scores.items():
        interval = bootstrap_auc_ci(y, score, n_boot=n_boot, seed=seed)
        row: dict[str, Any] = {"key": key, "auc": interval.auc, "lo": interval.lo, "hi": interval.hi}
        if key != reference:
            test = delong_test(y, score, scores[reference])
            row.update(delta=test.auc_a - test.auc_b, z=test.z, p=test.p)
        rows.append(row)
    return rows


def choose(rows: list[dict], reference: str, alpha: float = ALPHA) -> str:
    """The variant with the highest AUC among those above the reference with DeLong p < alpha;
    the reference when there is none."""
    better = [r for r in rows if r["key"] != reference and r["delta"] > 0 and r["p"] < alpha]
    return max(better, key=lambda r: r["auc"])["key"] if better else reference


# ------------------------------------------------- (a) the paper's network, 7 inputs


def train_fusion_net(
    train_rows: pd.DataFrame, extra: np.ndarray | None, config: FusionTrainConfig
) -> tuple[FeatureEncoder, FusionNet]:
    """The paper's 6-input network trained as ``engine.fusion.train_fusion`` trains it, with
    optionally one more input column (``extra``, one value per row) after the six.

    Same encoder fitting, seeded Target-stratified early-stopping split, initialisation,
    Adam, mini-batch order, monitor and restored best weights; with ``extra=None`` it
    reproduces ``train_fusion`` (checked in :func:`main`).
    """
    table = build_fusion_table(train_rows, train_rows[list(OOF_COLUMNS)])
    labels = table["Target"].to_numpy(dtype=np.int64)
    encoder = FeatureEncoder.for_mode(True).fit(table)
    matrix = encoder.encode(table)[0]
    if extra is not None:
        matrix = np.column_stack([matrix, np.asarray(extra, dtype=np.float32)]).astype(np.float32)
    split = stratified_split(table[["patientId", "Target"]], config.val_fraction, config.seed, stratify_col="Target")
    is_val = split.to_numpy() == "val"
    x_fit, y_fit = torch.from_numpy(matrix[~is_val]), torch.from_numpy(labels[~is_val].astype(np.float32))
    x_val, y_val = torch.from_numpy(matrix[is_val]), torch.from_numpy(labels[is_val].astype(np.float32))
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        try:
            torch.manual_seed(config.seed)
            net = FusionNet(matrix.shape[1], hidden=config.hidden, dropout=config.dropout)
            order = torch.Generator().manual_seed(config.seed)
            optimiser = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            loss_fn = nn.BCEWithLogitsLoss()
            best_score, best_state, waited = -math.inf, copy.deepcopy(net.state_dict()), 0
            n_fit = len(y_fit)
            for _epoch in range(config.max_epochs):
                net.train()
                if config.batch_size is None or config.batch_size >= n_fit:
                    batches = [torch.arange(n_fit)]
                else:
                    batches = list(torch.randperm(n_fit, generator=order).split(config.batch_size))
                for batch in batches:
                    optimiser.zero_grad()
                    loss_fn(net(x_fit[batch]), y_fit[batch]).backward()
                    optimiser.step()
                net.eval()
                with torch.no_grad():
                    val_loss = float(loss_fn(net(x_val), y_val))
                if config.monitor != "loss":
                    raise ValueError("this benchmark mirrors monitor='loss' only")
                if -val_loss > best_score + 1e-6:
                    best_score, best_state, waited = -val_loss, copy.deepcopy(net.state_dict()), 0
                else:
                    waited += 1
                    if waited >= config.patience:
                        break
        finally:
            torch.set_num_threads(previous_threads)
    net.load_state_dict(best_state)
    return encoder, net.eval()


def cross_fit_fusion_net(
    table: pd.DataFrame, extra: np.ndarray | None, config: FusionTrainConfig
) -> np.ndarray:
    """Cross-fitted P(opacity) of :func:`train_fusion_net` over ``table['fold']`` (a fusion table)."""
    folds = table["fold"].to_numpy()

    def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        encoder, net = train_fusion_net(table[train], None if extra is None else extra[train], config)
        matrix = encoder.encode(table[test])[0]
        if extra is not None:
            matrix = np.column_stack([matrix, extra[test]]).astype(np.float32)
        return net.predict_proba(matrix)

    return cross_fitted(folds, fit_predict)


# ----------------------------------------- (b) metadata in the penultimate layer


class PenultimateMetadataClassifier(nn.Module):
    """The image classifier with the encoded metadata concatenated to its pooled features.

    ``logits = W [dropout(pool(features(x))), metadata] + b``, the final linear layer kept
    as two blocks of ``W`` (``image_head`` on the pooled features, ``metadata_head`` on the
    metadata, no bias of its own) so that the optimiser can give the metadata weights
    their own learning rate. ``image_head`` starts as the image model's fresh head and
    ``metadata_head`` at zero: at the first step the network computes what the image
    classifier computes.
    """

    def __init__(self, classifier: OpacityClassifier, n_metadata: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.image_head = copy.deepcopy(classifier.model.get_classifier())
        self.n_metadata = int(n_metadata)
        self.metadata_head = nn.Linear(self.n_metadata, self.image_head.out_features, bias=False)
        nn.init.zeros_(self.metadata_head.weight)
        classifier.model.reset_classifier(0)  # pooled (and dropped-out) features out; the heads above classify

    def forward(self, x: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        pooled = self.classifier.forward_head(self.classifier.forward_features(x), pre_logits=True)
        return self.image_head(pooled) + self.metadata_head(metadata.to(pooled.dtype))

    def config(self) -> dict[str, Any]:
        return {"design": "penultimate metadata", "classifier": self.classifier.config(),
                "metadata_features": list(METADATA_FEATURES)}


class PenultimateTask(_ClassifierTask):
    """The classifier's training task, the batch's metadata (by cache position) fed to the head."""

    def __init__(self, *args: Any, metadata: torch.Tensor, metadata_lr_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metadata = metadata  # float32 (len(cache.table), len(METADATA_FEATURES))
        self.metadata_lr_scale = float(metadata_lr_scale)

    def trainable_parameters(self, model: nn.Module) -> Any:
        if self.metadata_lr_scale == 1.0:
            return model.parameters()
        base_lr = self.config.lr or RECIPE_LR[self.config.recipe]
        metadata = [model.metadata_head.weight]  # type: ignore[union-attr]
        rest = [p for p in model.parameters() if p is not model.metadata_head.weight]  # type: ignore[union-attr]
        return [{"params": rest}, {"params": metadata, "lr": base_lr * self.metadata_lr_scale}]

    def build_model(self) -> nn.Module:
        return PenultimateMetadataClassifier(super().build_model(), self.metadata.shape[1])

    def train_step(self, batch: dict[str, Any], step: StepContext) -> dict[str, torch.Tensor]:
        x = network_input(batch["image"], size=self.config.size, device=step.device, channels_last=step.channels_last)
        if step.augment:
            x, _ = step.augment(x)
        y = batch["label"].to(step.device)
        metadata = self.metadata[batch["position"]].to(step.device)
        with step.autocast():
            logits = step.model(x, metadata)
            loss = F.cross_entropy(logits.float(), y, weight=self.loss_weights,
                                   label_smoothing=self.config.label_smoothing)
        return {"loss": loss}

    @torch.no_grad()
    def predict_val(self, model: nn.Module) -> np.ndarray:
        model.eval().to(self.device)
        loader = DataLoader(CacheDataset(self.cache, self.val_positions), batch_size=self.config.eval_batch_size,
                            shuffle=False, collate_fn=collate_samples)
        out = []
        for batch in loader:
            x = network_input(batch["image"], size=self.config.size, device=self.device, channels_last=True)
            out.append(model(x, self.metadata[batch["position"]].to(self.device)).float().cpu().numpy())
        return np.concatenate(out)


def train_penultimate(
    cache_dir: Path, run_dir: Path, config: ClassifierTrainConfig, metadata_lr_scale: float = 1.0
) -> pd.DataFrame:
    """Train (or resume) the penultimate-metadata classifier on the cache's folds; its ``oof.csv``."""
    cache = PreparedCache(cache_dir)
    config.validate()
    parts = fold_positions(cache, config.folds)
    device, context, progress = training_context(config.device, None)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(
        {"design": "penultimate metadata (4th place)", "train": config.to_dict(), "cache": str(cache_dir),
         "metadata_features": list(METADATA_FEATURES), "metadata_lr_scale": metadata_lr_scale}, indent=2) + "\n")
    tables = []
    for fold, (train_positions, val_positions) in enumerate(parts):
        started = time.perf_counter()
        encoder = FeatureEncoder(features=METADATA_FEATURES).fit(cache.table.iloc[train_positions])
        metadata = torch.from_numpy(encoder.encode(cache.table)[0])
        task = PenultimateTask(cache, fold, train_positions, val_positions, config, device, metadata=metadata,
                              metadata_lr_scale=metadata_lr_scale)
        files = LoopFiles(folder=run_dir / f"fold_{fold}", metrics=run_dir / "metrics.jsonl", fold=fold)
        loop = EpochLoop(task, _loop_settings(config), files, device=device, context=context, progress=progress)
        result = loop.fit(resume=True)
        best = load_best_weights(files.best, loop.model, device)
        logits = result.best_payload if result.best_payload is not None else task.predict_val(loop.model)
        table = task.predictions_table(logits)
        tables.append(table)
        print(f"(b) fold {fold}: best epoch {best['epoch']}, val opacity AUC {best['metrics']['val_opacity_auc']:.4f}"
              f" ({time.perf_counter() - started:.0f} s)", flush=True)
    oof = pd.concat(tables, ignore_index=True)
    oof.to_csv(run_dir / "oof.csv", index=False)
    return oof


# --------------------------------------------------------------------------- the run


def imaged_patients(cache: PreparedCache) -> pd.DataFrame:
    """``patientId, sex, age, view, Target, class`` of the cache's usable patients."""
    table = cache.table.iloc[cache.indices()][["patientId", "sex", "age", "view", "Target", "class"]]
    return table.assign(patientId=table["patientId"].astype(str)).reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-run", type=Path, required=True, help="k-fold classifier run (oof.csv, config.json)")
    parser.add_argument("--cache", type=Path, required=True, help="the prepared cache that run trained on")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="RSNA folder with metadata.csv")
    parser.add_argument("--penultimate-run", type=Path, default=None,
                        help="folder of variant (b): trained there unless its oof.csv exists; omitted: no (b)")
    parser.add_argument("--penultimate-boost-run", type=Path, default=None,
                        help="folder of variant (b'): (b) with the metadata weights at --boost x the learning rate")
    parser.add_argument("--boost", type=float, default=100.0, help="learning-rate factor of the metadata weights in (b')")
    parser.add_argument("--penultimate-only", action="store_true", help="train (b) / (b') where missing and stop")
    parser.add_argument("--prior", choices=("net", "logistic"), default="net",
                        help="which prior model feeds the combinations (both are reported alone)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the networks; the table is the first's, the others give the spread")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    wall: dict[str, float] = {}

    cache = PreparedCache(args.cache)
    image_config = ClassifierTrainConfig.from_dict(json.loads((args.image_run / "config.json").read_text())["train"])
    for key, run_dir, scale in (("penultimate", args.penultimate_run, 1.0),
                                ("penultimate_boost", args.penultimate_boost_run, args.boost)):
        if run_dir is None or (run_dir / "oof.csv").exists():
            continue
        started = time.perf_counter()
        train_penultimate(args.cache, run_dir, image_config, metadata_lr_scale=scale)
        seconds = time.perf_counter() - started
        (run_dir / "timing.json").write_text(json.dumps({"train_s": seconds}) + "\n")
        print(f"({key}) trained in {seconds:.0f} s: {run_dir / 'oof.csv'}", flush=True)
    if args.penultimate_only:
        return

    started = time.perf_counter()
    table = imaged_patients(cache)
    oof = pd.read_csv(args.image_run / "oof.csv", dtype={"patientId": str})
    validate_oof(oof, table)
    fusion_table = build_fusion_table(table, oof)  # table order, with fold and p_*
    y = fusion_table["Target"].to_numpy(dtype=np.int64)
    folds = fusion_table["fold"].to_numpy()
    p_image = fusion_table[IMAGE_COLUMN].to_numpy(dtype=np.float64)

    # The prior: fitted on every labelled patient without an image.
    everyone = load_metadata_table(args.data)
    everyone = everyone.assign(patientId=everyone["patientId"].astype(str))
    image_files = {p.stem for p in (args.data / "images").iterdir()} if (args.data / "images").is_dir() else set()
    imaged = set(table["patientId"]) | image_files
    prior_train = everyone[~everyone["patientId"].isin(imaged)].reset_index(drop=True)
    overlap = set(prior_train["patientId"]) & imaged
    if overlap or not set(table["patientId"]) <= set(everyone["patientId"]):
        raise SystemExit(f"prior training set overlaps the imaged patients ({len(overlap)}) or misses some")
    base_rate = float(prior_train["Target"].mean())
    prior_encoder = FeatureEncoder(features=METADATA_FEATURES).fit(prior_train)
    prior_lr = LogisticRegression().fit(prior_encoder.encode(prior_train)[0], prior_train["Target"])
    p_prior_lr = prior_lr.predict_proba(prior_encoder.encode(table)[0])[:, 1]
    print(f"{len(table)} imaged patients ({int(y.sum())} with opacity), {len(np.unique(folds))} folds; "
          f"prior fitted on {len(prior_train)} patients without images ({base_rate:.1%} with opacity; "
          f"{len(everyone)} labelled, {len(imaged)} imaged excluded, overlap {len(overlap)})")

    names = {
        "image": "(0) image alone (classifier OOF p_lung_opacity)",
        "prior_net": "(a) prior alone: metadata-only net fitted on the patients without images",
        "prior_lr": "(a) prior alone: logistic regression fitted on the patients without images",
        "bayes": "(a) image + prior, Bayes: logit p_img + logit prior - logit base rate (no fit)",
        "stack_lr": "(a) image + prior, logistic regression on the two logits (cross-fitted)",
        "net7": "(a) paper's network + prior as 7th input (cross-fitted)",
        "penultimate": "(b) metadata in the classifier's penultimate layer (4th place; OOF)",
        "penultimate_boost": f"(b') as (b), the metadata weights at {args.boost:g}x the learning rate (OOF)",
        "paper": "(c) paper's network as it is, 6 inputs (cross-fitted)",
        "meta_600": "(ref) metadata-only net fitted on the imaged training folds (cross-fitted)",
    }
    per_seed: dict[int, dict[str, np.ndarray]] = {}
    checks: dict[str, Any] = {"prior_overlap": len(overlap), "prior_n": len(prior_train), "base_rate": base_rate}
    for seed in args.seeds:
        config = FusionTrainConfig(seed=seed)
        prior_net = train_fusion(prior_train, config=FusionTrainConfig(use_probabilities=False, seed=seed))
        p_prior_net = prior_net.model.predict(table).probability
        prior = p_prior_net if args.prior == "net" else p_prior_lr
        crossed = cross_fit_scores(table, oof, config).set_index("patientId").reindex(fusion_table["patientId"])
        mirror = cross_fit_fusion_net(fusion_table, None, config)
        gap = float(np.abs(mirror - crossed["p_fusion"].to_numpy()).max())
        checks.setdefault("mirror_max_abs_gap", {})[seed] = gap
        if gap > 1e-5:
            raise SystemExit(f"the 7-input network's training does not reproduce train_fusion (gap {gap:.2e})")
        scores = {
            "image": p_image,
            "prior_net": p_prior_net,
            "prior_lr": p_prior_lr,
            "bayes": bayes_combination(p_image, prior, base_rate),
            "stack_lr": cross_fitted_logistic(np.column_stack([logit(p_image), logit(prior)]), y, folds),
            "net7": cross_fit_fusion_net(fusion_table, prior.astype(np.float32), config),
            "paper": crossed["p_fusion"].to_numpy(dtype=np.float64),
            "meta_600": crossed["p_metadata"].to_numpy(dtype=np.float64),
        }
        per_seed[seed] = scores
    wall["fusion_variants_s"] = time.perf_counter() - started

    scores = dict(per_seed[args.seeds[0]])
    for key, run_dir in (("penultimate", args.penultimate_run), ("penultimate_boost", args.penultimate_boost_run)):
        if run_dir is None:
            continue
        penultimate = pd.read_csv(run_dir / "oof.csv", dtype={"patientId": str})
        validate_oof(penultimate, table)
        penultimate = penultimate.set_index("patientId").reindex(fusion_table["patientId"])
        if not (penultimate["fold"].to_numpy() == folds).all():
            raise SystemExit(f"{run_dir}: trained on other folds than the image run")
        scores[key] = penultimate[IMAGE_COLUMN].to_numpy(dtype=np.float64)
        timing = run_dir / "timing.json"
        if timing.exists():
            wall[f"{key}_train_s"] = json.loads(timing.read_text())["train_s"]
    order = [k for k in names if k in scores]
    rows = compare(y, {k: scores[k] for k in order}, "image", args.n_boot, seed=0)
    chosen = choose(rows, "image")

    print(f"\n{'variant':<84} {'AUC':>6} {'95% interval':>16} {'vs image':>9} {'DeLong p':>9}")
    for row in rows:
        mark = " <- chosen" if row["key"] == chosen else ""
        versus = f"{row['delta']:+9.3f} {row['p']:9.3f}" if "p" in row else f"{'':>9} {'':>9}"
        print(f"{names[row['key']]:<84} {row['auc']:6.3f} [{row['lo']:.3f}, {row['hi']:.3f}] {versus}{mark}")
    spread: dict[str, dict[int, dict[str, float]]] = {}
    if len(args.seeds) > 1:
        print("\nseed spread of the seeded variants (AUC, DeLong p vs image):")
        for key in ("prior_net", "bayes", "stack_lr", "net7", "paper", "meta_600"):
            cells = []
            for seed in args.seeds:
                test = delong_test(y, per_seed[seed][key], p_image)
                spread.setdefault(key, {})[seed] = {"auc": test.auc_a, "p": test.p}
                cells.append(f"seed {seed}: {test.auc_a:.3f} (p {test.p:.3f})")
            print(f"  {key:<10} " + "; ".join(cells))
    print(f"\nchosen: {names[chosen]} (rule: highest AUC above the image with DeLong p < {ALPHA}, else the image)")
    print("wall: " + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()))
    if args.out:
        args.out.write_text(json.dumps({
            "n": int(len(y)), "n_positive": int(y.sum()), "prior": args.prior, "seeds": args.seeds,
            "rows": [{**row, "name": names[row["key"]]} for row in rows], "chosen": chosen,
            "seed_spread": spread, "checks": checks, "wall_s": wall,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
