"""Training the fusion network (metadata + out-of-fold classifier probabilities -> P(opacity)).

The network must never see probabilities from a classifier that was trained on the same
patient, or it learns to trust over-confident in-sample scores. It is therefore trained
only on the classifier's out-of-fold table (``oof.csv``, see ``docs/ARCHITECTURE.md``),
which :func:`validate_oof` checks covers every patient of the data table exactly once.

Typical use::

    table = load_rsna(folder)                       # or load_metadata_table(folder)
    oof = pd.read_csv("oof.csv")
    result = train_fusion(table, oof, FusionTrainConfig(seed=1))   # 6-input fusion network
    result.save("runs/fusion")                      # -> models.fusion.load_fusion
    scores = cross_fit_scores(table, oof)           # honest per-patient scores for the report
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lungopacity.constants import LUNG_OPACITY
from lungopacity.errors import ConfigError, RunFolderError
from lungopacity.io.rsna import METADATA_CSV, load_label_tables, read_metadata_csv, stratified_split
from lungopacity.metrics.classification import roc_auc
from lungopacity.models.fusion import (
    MISSING_FIELDS,
    PROBABILITY_FEATURES,
    SCORE_COLUMNS,
    FeatureEncoder,
    FusionModel,
    FusionNet,
    save_fusion,
)

logger = logging.getLogger(__name__)

#: Columns of the classifier's out-of-fold table, in file order.
OOF_COLUMNS: tuple[str, ...] = ("patientId", "fold", *PROBABILITY_FEATURES, "class", "Target")
#: Columns the metadata / patient table must have.
TABLE_COLUMNS: tuple[str, ...] = ("patientId", "sex", "age", "view", "Target")
#: Per-patient cross-fitted scores written into ``OUT/report/`` by :func:`train_fusion_run`.
CROSS_FITTED_SCORES_FILE = "cross_fitted_scores.csv"
#: Largest allowed |p_normal + p_not_normal + p_lung_opacity - 1|.
PROBABILITY_SUM_TOLERANCE = 1e-3


def _examples(values: Iterable[Any], limit: int = 3) -> str:
    listed = list(values)
    shown = ", ".join(str(v) for v in listed[:limit])
    return shown + (f" (+{len(listed) - limit} more)" if len(listed) > limit else "")


def validate_oof(
    oof_df: pd.DataFrame,
    patients: pd.DataFrame | Iterable[str] | None = None,
    *,
    atol: float = PROBABILITY_SUM_TOLERANCE,
) -> None:
    """Refuse an out-of-fold table that does not hold every patient exactly once.

    Args:
        oof_df: ``patientId, fold, p_normal, p_not_normal, p_lung_opacity, class, Target``.
        patients: the data table (a DataFrame with ``patientId``, and ``Target`` checked
            against the table's when present) or the patient ids it must cover; None skips
            the coverage check.
        atol: tolerance on the sum of the three probabilities.

    Raises:
        ValueError: naming the problem -- absent columns, NaN values, duplicate patients,
            probabilities outside [0, 1] or not summing to 1, class/Target codes that are
            invalid or disagree, patients missing from (or foreign to) the data table.
    """
    absent = [c for c in OOF_COLUMNS if c not in oof_df.columns]
    if absent:
        raise ConfigError(f"out-of-fold table lacks columns {absent} (expected {list(OOF_COLUMNS)})")
    if oof_df.empty:
        raise ConfigError("out-of-fold table is empty")
    nan_counts = {c: int(oof_df[c].isna().sum()) for c in OOF_COLUMNS if oof_df[c].isna().any()}
    if nan_counts:
        raise ConfigError(f"out-of-fold table has NaN values: {nan_counts}")
    ids = oof_df["patientId"].astype(str)
    duplicated = ids[ids.duplicated()].unique()
    if len(duplicated):
        raise ConfigError(
            f"out-of-fold table has {len(duplicated)} duplicate patients (each must appear exactly once): "
            f"{_examples(duplicated)}"
        )
    probabilities = oof_df[list(PROBABILITY_FEATURES)].to_numpy(dtype=np.float64)
    if not np.isfinite(probabilities).all():
        raise ConfigError("out-of-fold table has non-finite probabilities")
    if (probabilities < -1e-6).any() or (probabilities > 1 + 1e-6).any():
        bad = ids[((probabilities < -1e-6) | (probabilities > 1 + 1e-6)).any(axis=1)]
        raise ConfigError(f"out-of-fold probabilities outside [0, 1] for {len(bad)} patients: {_examples(bad)}")
    sums = probabilities.sum(axis=1)
    off = np.abs(sums - 1.0) > atol
    if off.any():
        worst = int(np.argmax(np.abs(sums - 1.0)))
        raise ConfigError(
            f"out-of-fold probabilities do not sum to 1 (tolerance {atol}) for {int(off.sum())} patients, "
            f"e.g. {ids.iloc[worst]} sums to {sums[worst]:.6f}: {_examples(ids[off])}"
        )
    classes = oof_df["class"].to_numpy()
    targets = oof_df["Target"].to_numpy()
    if not np.isin(classes, (0, 1, 2)).all():
        raise ConfigError(f"out-of-fold class must be 0, 1 or 2; found {sorted(set(classes.tolist()) - {0, 1, 2})}")
    if not np.isin(targets, (0, 1)).all():
        raise ConfigError(f"out-of-fold Target must be 0 or 1; found {sorted(set(targets.tolist()) - {0, 1})}")
    disagree = (classes == LUNG_OPACITY) != (targets == 1)
    if disagree.any():
        raise ConfigError(f"out-of-fold class and Target disagree for {int(disagree.sum())} patients: "
                         f"{_examples(ids[disagree])}")
    folds = oof_df["fold"].to_numpy(dtype=np.float64)
    if (folds < 0).any() or (folds % 1 != 0).any():
        raise ConfigError("out-of-fold fold must be a non-negative integer")
    if patients is None:
        return
    if isinstance(patients, pd.DataFrame):
        table_ids = patients["patientId"].astype(str)
    else:
        table_ids = pd.Series([str(p) for p in patients])
    expected, present = set(table_ids), set(ids)
    missing = sorted(expected - present)
    extra = sorted(present - expected)
    if missing:
        raise ConfigError(
            f"out-of-fold table misses {len(missing)} of the {len(expected)} patients of the data table: "
            f"{_examples(missing)}"
        )
    if extra:
        raise ConfigError(
            f"out-of-fold table holds {len(extra)} patients absent from the data table: {_examples(extra)}"
        )
    if isinstance(patients, pd.DataFrame) and "Target" in patients.columns:
        table_target = pd.Series(patients["Target"].to_numpy(), index=table_ids)
        mismatch = table_target.reindex(ids).to_numpy() != targets
        if mismatch.any():
            raise ConfigError(f"out-of-fold Target differs from the data table for {int(mismatch.sum())} patients: "
                             f"{_examples(ids[mismatch])}")


def build_fusion_table(features_df: pd.DataFrame, oof_df: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per patient: the metadata columns plus, with ``oof_df``, fold and probabilities.

    Args:
        features_df: the patient (or metadata) table: ``patientId, sex, age, view, Target``.
        oof_df: the classifier's out-of-fold table, validated with :func:`validate_oof`.

    Returns:
        ``features_df``'s rows in its order, with ``fold``, ``p_*`` (and ``class`` when the
        data table has none) from ``oof_df`` when given.
    """
    absent = [c for c in TABLE_COLUMNS if c not in features_df.columns]
    if absent:
        raise ConfigError(f"fusion data table lacks columns {absent} (needs {list(TABLE_COLUMNS)})")
    ids = features_df["patientId"].astype(str)
    if ids.duplicated().any():
        raise ConfigError(f"fusion data table has duplicate patients: {_examples(ids[ids.duplicated()].unique())}")
    if not features_df["Target"].isin((0, 1)).all():
        raise ConfigError("fusion data table: Target must be 0 or 1 for every patient")
    keep = ["sex", "age", "view", "Target"] + (["class"] if "class" in features_df.columns else [])
    table = features_df[keep].copy()
    table.insert(0, "patientId", ids.to_numpy())
    table = table.reset_index(drop=True)
    if oof_df is None:
        return table
    validate_oof(oof_df, features_df)
    oof = oof_df.assign(patientId=oof_df["patientId"].astype(str)).set_index("patientId")
    oof = oof.reindex(table["patientId"])
    table["fold"] = oof["fold"].to_numpy(dtype=int)
    if "class" not in table.columns:
        table["class"] = oof["class"].to_numpy(dtype=int)
    for name in PROBABILITY_FEATURES:
        table[name] = oof[name].to_numpy(dtype=np.float64)
    return table


def load_metadata_table(folder: str | Path) -> pd.DataFrame:
    """Labels + metadata of every patient of an RSNA folder, no images needed.

    Joins ``load_label_tables(folder)`` with ``read_metadata_csv(folder/metadata.csv)``;
    patients without a metadata row keep sex/age/view missing (imputed by the encoder).

    Returns:
        ``patientId, class, Target, sex, age, view``.
    """
    folder = Path(folder)
    labels = load_label_tables(folder)
    metadata = read_metadata_csv(folder / METADATA_CSV).set_index("patientId")
    metadata = metadata.reindex(labels["patientId"])
    n_without = int(metadata.isna().all(axis=1).sum())
    if n_without:
        logger.warning("%d of %d labelled patients have no metadata row", n_without, len(labels))
    table = labels[["patientId", "class", "Target"]].copy()
    for column in ("sex", "age", "view"):
        table[column] = metadata[column].to_numpy()
    return table


@dataclass
class FusionResult:
    """A trained fusion (or metadata-only) network and how its training went.

    Attributes:
        model: network + fitted encoder (+ the metrics below), ready to ``predict``/``save``.
        history: one dict per epoch: ``epoch, train_loss, val_loss, val_auc``.
        best_epoch: the epoch whose weights were kept (0-based).
        val_auc, val_loss: internal-validation AUC / BCE at ``best_epoch``.
        train_ids, val_ids: patients of the internal fit / early-stopping parts.
    """

    model: FusionModel
    history: list[dict[str, float]]
    best_epoch: int
    val_auc: float
    val_loss: float
    train_ids: list[str] = field(repr=False)
    val_ids: list[str] = field(repr=False)

    @property
    def net(self) -> FusionNet:
        """The trained network (best weights restored)."""
        return self.model.net

    @property
    def encoder(self) -> FeatureEncoder:
        """The encoder fitted on the training rows."""
        return self.model.encoder

    def save(self, path_dir: str | Path) -> Path:
        """Save with :func:`lungopacity.models.fusion.save_fusion` (metrics included)."""
        return save_fusion(path_dir, self.model.net, self.model.encoder, self.model.metrics)


def _validation_mask(table: pd.DataFrame, val_fraction: float, seed: int) -> np.ndarray:
    """Seeded split of the training rows, stratified by Target, for early stopping only."""
    split = stratified_split(table[["patientId", "Target"]], val_fraction, seed, stratify_col="Target")
    return (split.to_numpy() == "val")


@contextlib.contextmanager
def _single_intra_op_thread() -> Iterator[None]:
    """Run torch ops on one thread, restoring the caller's setting afterwards.

    The matrices here are at most 1024 x 16: splitting them over threads only adds
    synchronisation, which on a busy 2-core machine made training about 6x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _safe_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    if labels.min() == labels.max():
        return float("nan")
    return roc_auc(labels, scores)


@dataclass(frozen=True)
class FusionTrainConfig:
    """Everything that decides a fusion (or metadata-only) network's training.

    Attributes:
        use_probabilities: 6-input fusion (True) or 3-input metadata-only network (False).
        seed: seeds the split, the initialisation and the mini-batch order.
        val_fraction: share of rows held out for early stopping, in (0, 1).
        max_epochs, patience: epoch limit and early-stopping patience.
        lr, weight_decay: Adam settings.
        hidden, dropout: :class:`FusionNet` architecture.
        batch_size: None for full batch, else shuffled mini-batches of this size.
        monitor: ``"loss"`` (validation BCE, lower is better) or ``"auc"`` (higher is better).
    """

    use_probabilities: bool = True
    seed: int = 0
    val_fraction: float = 0.2
    max_epochs: int = 500
    patience: int = 30
    lr: float = 1e-2
    weight_decay: float = 1e-4
    hidden: tuple[int, ...] = (16, 8)
    dropout: float = 0.0
    batch_size: int | None = 1024
    monitor: str = "loss"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionTrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "hidden" in values:
            values["hidden"] = tuple(int(h) for h in values["hidden"])
        return cls(**values)

    def validate(self) -> None:
        """Raise :class:`ConfigError` (naming the setting) for a value training cannot use."""
        if self.monitor not in ("loss", "auc"):
            raise ConfigError("monitor", f"must be 'loss' or 'auc', got {self.monitor!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction", f"must lie in (0, 1), got {self.val_fraction}")
        if self.max_epochs < 1 or self.patience < 1:
            raise ConfigError("max_epochs/patience", "must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1 or None, got {self.batch_size}")


def _fusion_config(config: FusionTrainConfig | None, overrides: dict[str, Any]) -> FusionTrainConfig:
    config = config or FusionTrainConfig()
    unknown = sorted(set(overrides) - {f.name for f in fields(FusionTrainConfig)})
    if unknown:
        raise TypeError(f"unknown fusion training setting(s) {', '.join(unknown)}")
    if "hidden" in overrides:
        overrides = {**overrides, "hidden": tuple(overrides["hidden"])}
    return replace(config, **overrides) if overrides else config


def train_fusion(
    features_df: pd.DataFrame,
    oof_df: pd.DataFrame | None = None,
    config: FusionTrainConfig | None = None,
    **overrides: Any,
) -> FusionResult:
    """Train the fusion network (or, with ``use_probabilities=False``, the metadata-only one).

    Adam on binary cross-entropy over shuffled mini-batches of 1024 rows (the whole table
    at once when it is smaller, or with ``batch_size=None``; the data are tiny: 26,684 x 6
    at most). On the real RSNA metadata (six 80/20 splits) mini-batches gave a slightly
    better held-out AUC than full-batch steps: +0.006 against +0.004 on average over a
    logistic regression. A seeded, Target-stratified ``val_fraction`` of the given rows is
    held out for early stopping: training stops after ``patience`` epochs without improvement of the
    monitored validation quantity and the best weights are restored. The default monitor
    is the validation loss because it is smooth; the validation AUC jumps between nearly
    equal rankings of the few hundred distinct metadata combinations and can stop too
    early. The encoder is fitted on all given rows (the training set).

    Args:
        features_df: patient table ``patientId, sex, age, view, Target`` (e.g. ``load_rsna``
            or :func:`load_metadata_table` output), training patients only.
        oof_df: the classifier's out-of-fold table for exactly these patients; required
            when ``config.use_probabilities``, ignored otherwise.
        config: the settings (:class:`FusionTrainConfig`; default: its defaults).
        **overrides: individual settings replacing ``config``'s, by field name
            (``train_fusion(t, o, seed=3)`` is ``train_fusion(t, o, FusionTrainConfig(seed=3))``).

    Returns:
        A :class:`FusionResult`; ``result.model.metrics`` records the validation figures.

    Raises:
        ConfigError: a setting out of range.
        ValueError: a table without both classes, an invalid OOF table.
    """
    config = _fusion_config(config, overrides)
    config.validate()
    use_probabilities, seed, val_fraction = config.use_probabilities, config.seed, config.val_fraction
    max_epochs, patience, lr, weight_decay = config.max_epochs, config.patience, config.lr, config.weight_decay
    hidden, dropout, batch_size, monitor = config.hidden, config.dropout, config.batch_size, config.monitor
    if use_probabilities and oof_df is None:
        raise ConfigError("the fusion network needs the classifier's out-of-fold table (oof_df); "
                         "pass use_probabilities=False for the metadata-only network")
    table = build_fusion_table(features_df, oof_df if use_probabilities else None)
    labels = table["Target"].to_numpy(dtype=np.int64)
    if labels.min() == labels.max():
        raise ConfigError("training the fusion network needs patients with and without opacity")

    encoder = FeatureEncoder.for_mode(use_probabilities).fit(table)
    matrix, _ = encoder.encode(table)
    is_val = _validation_mask(table, val_fraction, seed)
    if is_val.all() or not is_val.any():
        raise ConfigError(f"{len(table)} rows are too few to hold out {val_fraction:.0%} for early stopping")
    x_fit, y_fit = torch.from_numpy(matrix[~is_val]), torch.from_numpy(labels[~is_val].astype(np.float32))
    x_val, y_val_np = torch.from_numpy(matrix[is_val]), labels[is_val]
    y_val = torch.from_numpy(y_val_np.astype(np.float32))
    if monitor == "auc" and y_val_np.min() == y_val_np.max():
        raise ConfigError("monitor='auc' needs both classes in the validation part; use more rows or monitor='loss'")

    # A private RNG stream: training is reproducible without touching the caller's global seed.
    with torch.random.fork_rng(devices=[]), _single_intra_op_thread():
        torch.manual_seed(seed)
        net = FusionNet(encoder.n_features, hidden=hidden, dropout=dropout)
        order_generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        history: list[dict[str, float]] = []
        best_score, best_epoch, best_state = -math.inf, -1, copy.deepcopy(net.state_dict())
        best_val_loss, best_val_auc = math.nan, math.nan
        epochs_without_gain = 0
        n_fit = len(y_fit)
        for epoch in range(max_epochs):
            net.train()
            if batch_size is None or batch_size >= n_fit:
                batches = [torch.arange(n_fit)]
            else:
                batches = list(torch.randperm(n_fit, generator=order_generator).split(batch_size))
            epoch_loss = 0.0
            for batch in batches:
                optimiser.zero_grad()
                loss = loss_fn(net(x_fit[batch]), y_fit[batch])
                loss.backward()
                optimiser.step()
                epoch_loss += loss.item() * len(batch)
            net.eval()
            with torch.no_grad():
                val_logits = net(x_val)
                val_loss = float(loss_fn(val_logits, y_val))
            val_auc = _safe_auc(y_val_np, val_logits.numpy())
            history.append(
                {"epoch": epoch, "train_loss": epoch_loss / n_fit, "val_loss": val_loss, "val_auc": val_auc}
            )
            score = -val_loss if monitor == "loss" else val_auc
            if score > best_score + 1e-6:
                best_score, best_epoch, best_state = score, epoch, copy.deepcopy(net.state_dict())
                best_val_loss, best_val_auc = val_loss, val_auc
                epochs_without_gain = 0
            else:
                epochs_without_gain += 1
                if epochs_without_gain >= patience:
                    break
    net.load_state_dict(best_state)
    net.eval()
    ids = table["patientId"].tolist()
    metrics = {
        "mode": "fusion" if use_probabilities else "metadata-only",
        "features": list(encoder.features),
        "n_train": int((~is_val).sum()),
        "n_val": int(is_val.sum()),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "monitor": monitor,
        "val_auc": best_val_auc,
        "val_loss": best_val_loss,
        "seed": seed,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
    }
    logger.info(
        "%s network: best epoch %d of %d, validation AUC %.4f, loss %.4f",
        metrics["mode"], best_epoch, len(history), best_val_auc, best_val_loss,
    )
    return FusionResult(
        model=FusionModel(net=net, encoder=encoder, metrics=metrics),
        history=history,
        best_epoch=best_epoch,
        val_auc=best_val_auc,
        val_loss=best_val_loss,
        train_ids=[pid for pid, v in zip(ids, is_val) if not v],
        val_ids=[pid for pid, v in zip(ids, is_val) if v],
    )


def predict_fusion(model: FusionModel, features_df: pd.DataFrame, oof_df: pd.DataFrame | None = None) -> pd.DataFrame:
    """P(opacity) per patient from a trained (or loaded) fusion model.

    Args:
        model: a :class:`~lungopacity.models.fusion.FusionModel`.
        features_df: ``patientId, sex, age, view`` (+ the ``p_*`` columns when the model
            uses them and ``oof_df`` is None).
        oof_df: probabilities to join by patientId (validated against ``features_df``).

    Returns:
        ``patientId, p_opacity, missing_sex, missing_age, missing_view``.
    """
    rows = features_df
    if oof_df is not None:
        validate_oof(oof_df, features_df)
        probabilities = oof_df.assign(patientId=oof_df["patientId"].astype(str)).set_index("patientId")
        probabilities = probabilities.reindex(features_df["patientId"].astype(str))[list(PROBABILITY_FEATURES)]
        rows = features_df.drop(columns=[c for c in PROBABILITY_FEATURES if c in features_df.columns]).copy()
        for name in PROBABILITY_FEATURES:
            rows[name] = probabilities[name].to_numpy()
    prediction = model.predict(rows)
    out = pd.DataFrame({"patientId": features_df["patientId"].astype(str).to_numpy(),
                        "p_opacity": prediction.probability})
    for column, name in enumerate(MISSING_FIELDS):
        out[f"missing_{name}"] = prediction.missing[:, column]
    return out


def cross_fit_scores(
    features_df: pd.DataFrame,
    oof_df: pd.DataFrame,
    config: FusionTrainConfig | None = None,
    *,
    seed: int | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Held-out metadata-only, image-only and fusion scores for every patient.

    For each fold ``k`` of the OOF table, a metadata-only and a fusion network are trained
    on the other folds and score fold ``k``; the image-only score is the classifier's
    out-of-fold ``p_lung_opacity``. All three scores are thus out-of-sample and on the
    same patients, which is what :func:`lungopacity.reports.fusion.fusion_comparison_report`
    compares.

    Args:
        features_df: patient table, exactly the patients of ``oof_df``.
        oof_df: the classifier's out-of-fold table (>= 2 folds).
        config: settings of every network trained (``use_probabilities`` is set per network).
        seed: shorthand for ``config.seed``.
        **overrides: further :class:`FusionTrainConfig` fields replacing ``config``'s.

    Returns:
        ``patientId, fold, class, Target, p_metadata, p_image, p_fusion``.
    """
    if seed is not None:
        overrides = {**overrides, "seed": seed}
    config = _fusion_config(config, overrides)
    table = build_fusion_table(features_df, oof_df)
    folds = sorted(table["fold"].unique().tolist())
    if len(folds) < 2:
        raise ConfigError(f"cross-fitting needs at least 2 folds in the out-of-fold table, found {folds}")
    out = table[["patientId", "fold", "class", "Target"]].copy()
    metadata_column, image_column, fusion_column = (
        SCORE_COLUMNS["metadata-only"], SCORE_COLUMNS["image-only"], SCORE_COLUMNS["fusion"]
    )
    out[metadata_column] = np.nan
    out[image_column] = table["p_lung_opacity"].to_numpy()
    out[fusion_column] = np.nan
    for fold in folds:
        held_out = (table["fold"] == fold).to_numpy()
        train_rows, test_rows = table[~held_out], table[held_out]
        metadata = train_fusion(train_rows, config=replace(config, use_probabilities=False))
        fusion = train_fusion(train_rows, train_rows[list(OOF_COLUMNS)], replace(config, use_probabilities=True))
        out.loc[held_out, metadata_column] = metadata.model.predict(test_rows).probability
        out.loc[held_out, fusion_column] = fusion.model.predict(test_rows).probability
        logger.info("cross-fit fold %s: %d training, %d held-out patients", fold, int((~held_out).sum()),
                    int(held_out.sum()))
    return out



def train_fusion_run(
    oof_csv: str | Path,
    out_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    n_bootstrap: int = 2000,
    config: FusionTrainConfig | None = None,
) -> dict[str, Any]:
    """What ``lungopacity train-fusion`` does: train, save, and write the comparison report.

    The patients are those of the classifier's out-of-fold table; their sex / age / view
    come from the prepared cache the classifier was trained on (``cache_dir``) or from an
    RSNA folder's label tables and ``metadata.csv`` (``data_dir``). The network is saved
    to ``out_dir`` (``fusion.safetensors``, ``fusion.json``); ``out_dir/report`` holds the
    metadata-only / image-only / fusion comparison on held-out (cross-fitted) scores, and
    those scores per patient (``cross_fitted_scores.csv``).

    ``config`` sets the networks' training (default :class:`FusionTrainConfig` with
    ``seed``); ``seed`` also seeds the bootstrap of the report.

    Returns:
        The comparison metrics (AUCs with intervals, the paired tests).
    """
    from lungopacity.reports.fusion import fusion_comparison_report

    if (cache_dir is None) == (data_dir is None):
        raise ConfigError("give exactly one of cache_dir (a prepared cache) or data_dir (an RSNA folder)")
    oof_path = Path(oof_csv)
    if not oof_path.exists():
        raise RunFolderError(oof_path, "out-of-fold table not found (train the classifier with --folds K)")
    oof = pd.read_csv(oof_path, dtype={"patientId": str})
    if cache_dir is not None:
        from lungopacity.data.cache import PreparedCache

        cache = PreparedCache(cache_dir)
        table = cache.table.iloc[cache.indices()][["patientId", "sex", "age", "view", "Target", "class"]]
    else:
        table = load_metadata_table(data_dir)  # type: ignore[arg-type]
        table = table[table["patientId"].isin(set(oof["patientId"]))]
    table = table.reset_index(drop=True)
    validate_oof(oof, table)
    config = config or FusionTrainConfig(seed=seed)
    result = train_fusion(table, oof, replace(config, use_probabilities=True))
    out_dir = Path(out_dir)
    result.save(out_dir)
    scores = cross_fit_scores(table, oof, config)
    metrics = fusion_comparison_report(scores, out_dir / "report", n_bootstrap=n_bootstrap, seed=seed)
    # The per-patient held-out scores: `bundle` applies its keep-fusion rule to them and calibrates on them.
    scores.to_csv(out_dir / "report" / CROSS_FITTED_SCORES_FILE, index=False)
    logger.info("fusion saved to %s; comparison report in %s", out_dir, out_dir / "report")
    return metrics
