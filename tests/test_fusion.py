"""Fusion network: feature encoding, OOF validation, training, save/load, report, real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from lungopacity.engine.fusion import (
    OOF_COLUMNS,
    FusionTrainConfig,
    build_fusion_table,
    cross_fit_scores,
    load_metadata_table,
    predict_fusion,
    train_fusion,
    validate_oof,
)
from lungopacity.errors import ConfigError
from lungopacity.io.rsna import stratified_split
from lungopacity.models.fusion import (
    FUSION_FEATURES,
    METADATA_FEATURES,
    MISSING_FIELDS,
    FeatureEncoder,
    FusionNet,
    load_fusion,
    save_fusion,
)
from lungopacity.reports.fusion import fusion_comparison_report

RSNA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna"

# --------------------------------------------------------------------------- helpers

TRAIN_ROWS = pd.DataFrame(
    {
        "sex": ["M", "F", "M", "M", None],
        "age": [20.0, 40.0, 60.0, None, 150.0],  # 150: a recording error, clipped to 100
        "view": ["AP", "PA", "PA", "LL", None],
        "p_normal": [0.5, 0.2, 0.1, 0.3, 0.3],
        "p_not_normal": [0.3, 0.3, 0.2, 0.3, 0.3],
        "p_lung_opacity": [0.2, 0.5, 0.7, 0.4, 0.4],
    }
)
# Known ages after clipping: 20, 40, 60, 100 -> scaled 0.2, 0.4, 0.6, 1.0.
AGE_MEAN = 0.55
AGE_STD = math.sqrt(((0.2 - 0.55) ** 2 + (0.4 - 0.55) ** 2 + (0.6 - 0.55) ** 2 + (1.0 - 0.55) ** 2) / 4)


def synthetic_tables(n: int = 2400, n_folds: int = 4, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A patient table and an OOF table where view and the image both carry opacity signal.

    Opacity depends on view only (AP 38 %, PA 9 %, as on RSNA); the image probability
    depends on opacity only, plus noise, so the two signals are independent given the label.
    """
    rng = np.random.default_rng(seed)
    view = np.where(rng.random(n) < 0.46, "AP", "PA")
    target = (rng.random(n) < np.where(view == "AP", 0.38, 0.09)).astype(int)
    image_logit = 1.2 * (2 * target - 1) + rng.normal(0.0, 1.6, n)
    p_opacity = 1 / (1 + np.exp(-image_logit))
    share_normal = rng.uniform(0.2, 0.8, n)
    cls = np.where(target == 1, 2, rng.integers(0, 2, n))
    ids = [f"patient-{i:05d}" for i in range(n)]
    table = pd.DataFrame(
        {
            "patientId": ids,
            "sex": rng.choice(["M", "F"], n),
            "age": rng.uniform(5, 90, n).round(),
            "view": view,
            "class": cls,
            "Target": target,
        }
    )
    oof = pd.DataFrame(
        {
            "patientId": ids,
            "fold": np.arange(n) % n_folds,
            "p_normal": (1 - p_opacity) * share_normal,
            "p_not_normal": (1 - p_opacity) * (1 - share_normal),
            "p_lung_opacity": p_opacity,
            "class": cls,
            "Target": target,
        }
    )
    return table, oof[list(OOF_COLUMNS)]


# --------------------------------------------------------------------------- encoding


def test_encoder_fit_statistics_and_exact_encoding() -> None:
    encoder = FeatureEncoder().fit(TRAIN_ROWS)
    assert encoder.features == FUSION_FEATURES
    assert encoder.fraction_male == pytest.approx(3 / 4)  # M, F, M, M known; None ignored
    assert encoder.median_age_years == pytest.approx(50.0)  # median of 20, 40, 60, 100
    assert encoder.fraction_ap == pytest.approx(1 / 3)  # AP, PA, PA known; 'LL' and None ignored
    assert encoder.age_mean == pytest.approx(AGE_MEAN)
    assert encoder.age_std == pytest.approx(AGE_STD)

    rows = [
        {"sex": "M", "age": 20.0, "view": "AP", "p_normal": 0.6, "p_not_normal": 0.3, "p_lung_opacity": 0.1},
        # Missing sex, missing age (NaN), unknown view 'LL': all imputed, none silently 0.
        {"sex": None, "age": float("nan"), "view": "LL", "p_normal": 0.2, "p_not_normal": 0.2, "p_lung_opacity": 0.6},
        # Lower-case codes accepted; age over 100 clipped; unknown sex 'O' is missing.
        {"sex": "O", "age": 120.0, "view": "pa", "p_normal": 0.0, "p_not_normal": 0.5, "p_lung_opacity": 0.5},
        {"sex": "f", "age": None, "view": None, "p_normal": 1.0, "p_not_normal": 0.0, "p_lung_opacity": 0.0},
    ]
    matrix, missing = encoder.encode(rows)
    expected = np.array(
        [
            [1.0, (0.2 - AGE_MEAN) / AGE_STD, 1.0, 0.6, 0.3, 0.1],
            [3 / 4, (0.5 - AGE_MEAN) / AGE_STD, 1 / 3, 0.2, 0.2, 0.6],
            [3 / 4, (1.0 - AGE_MEAN) / AGE_STD, 0.0, 0.0, 0.5, 0.5],
            [0.0, (0.5 - AGE_MEAN) / AGE_STD, 1 / 3, 1.0, 0.0, 0.0],
        ],
        dtype=np.float32,
    )
    assert matrix.dtype == np.float32 and matrix.shape == (4, 6)
    np.testing.assert_allclose(matrix, expected, rtol=1e-6, atol=1e-7)
    assert MISSING_FIELDS == ("sex", "age", "view")
    np.testing.assert_array_equal(
        missing, [[False, False, False], [True, True, True], [True, False, False], [False, True, True]]
    )


def test_metadata_only_mode_is_the_named_subset() -> None:
    full = FeatureEncoder().fit(TRAIN_ROWS)
    metadata_only = FeatureEncoder(features=METADATA_FEATURES).fit(TRAIN_ROWS.drop(columns=["p_normal"]))
    matrix_full, missing_full = full.encode(TRAIN_ROWS)
    matrix_meta, missing_meta = metadata_only.encode(TRAIN_ROWS[["sex", "age", "view"]])
    assert metadata_only.features == ("sex_male", "age", "view_ap")
    np.testing.assert_array_equal(matrix_meta, matrix_full[:, :3])
    np.testing.assert_array_equal(missing_meta, missing_full)
    # Order given by name is normalised to the canonical order; unknown names refused.
    assert FeatureEncoder(features=("view_ap", "sex_male")).features == ("sex_male", "view_ap")
    with pytest.raises(ValueError, match="unknown fusion features"):
        FeatureEncoder(features=("sex_male", "height"))


def test_encoder_state_round_trips_through_json() -> None:
    encoder = FeatureEncoder().fit(TRAIN_ROWS)
    restored = FeatureEncoder.from_dict(json.loads(json.dumps(encoder.to_dict())))
    np.testing.assert_array_equal(restored.encode(TRAIN_ROWS)[0], encoder.encode(TRAIN_ROWS)[0])


def test_encoder_refuses_missing_probabilities_and_unfitted_use() -> None:
    encoder = FeatureEncoder().fit(TRAIN_ROWS)
    broken = TRAIN_ROWS.assign(p_lung_opacity=[0.2, None, 0.7, 0.4, 0.4])
    with pytest.raises(ValueError, match="p_lung_opacity: 1 missing"):
        encoder.encode(broken)
    with pytest.raises(RuntimeError, match="before fit"):
        FeatureEncoder().encode(TRAIN_ROWS)
    with pytest.raises(ValueError, match="no training row has a known age"):
        FeatureEncoder().fit(TRAIN_ROWS.assign(age=None))


# --------------------------------------------------------------------------- network


def test_fusion_net_he_init_and_outputs() -> None:
    torch.manual_seed(0)
    wide = FusionNet(2000, hidden=(400,))
    first = wide.layers[0].weight.detach()
    assert first.std().item() == pytest.approx(math.sqrt(2 / 2000), rel=0.03)  # kaiming normal, ReLU gain
    assert torch.count_nonzero(wide.layers[0].bias) == 0

    net = FusionNet(6)
    assert [m.out_features for m in net.layers if isinstance(m, torch.nn.Linear)] == [16, 8, 1]
    features = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    probability = net.predict_proba(features)
    assert probability.shape == (5,)
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(features))).numpy()
    np.testing.assert_allclose(probability, expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        net.predict_proba(features[:, :3])


# --------------------------------------------------------------------------- OOF table


def test_validate_oof_accepts_one_row_per_patient_and_refuses_the_rest() -> None:
    table, oof = synthetic_tables(n=40)
    validate_oof(oof, table)  # every patient exactly once: accepted

    duplicated = pd.concat([oof, oof.iloc[[3]]], ignore_index=True)
    with pytest.raises(ValueError, match="1 duplicate patients.*patient-00003"):
        validate_oof(duplicated, table)
    with pytest.raises(ValueError, match="misses 1 of the 40 patients.*patient-00007"):
        validate_oof(oof.drop(index=7), table)
    foreign = pd.concat([oof, oof.iloc[[0]].assign(patientId="stranger")], ignore_index=True)
    with pytest.raises(ValueError, match="1 patients absent from the data table: stranger"):
        validate_oof(foreign, table)
    with pytest.raises(ValueError, match="do not sum to 1.*patient-00002"):
        validate_oof(oof.assign(p_normal=oof["p_normal"].where(oof.index != 2, 0.9)), table)
    with pytest.raises(ValueError, match="NaN values.*p_not_normal"):
        validate_oof(oof.assign(p_not_normal=oof["p_not_normal"].where(oof.index != 5)), table)
    with pytest.raises(ValueError, match="lacks columns \\['fold'\\]"):
        validate_oof(oof.drop(columns=["fold"]), table)
    flipped = oof.assign(Target=1 - oof["Target"], **{"class": np.where(oof["Target"] == 1, 0, 2)})
    with pytest.raises(ValueError, match="Target differs from the data table for 40 patients"):
        validate_oof(flipped, table)


def test_training_refuses_an_oof_table_that_does_not_cover_each_patient_once() -> None:
    table, oof = synthetic_tables(n=60)
    with pytest.raises(ValueError, match="duplicate patients"):
        train_fusion(table, pd.concat([oof, oof.iloc[[0]]], ignore_index=True), FusionTrainConfig(max_epochs=2))
    with pytest.raises(ValueError, match="misses 1"):
        train_fusion(table, oof.iloc[1:], FusionTrainConfig(max_epochs=2))
    with pytest.raises(ValueError, match="out-of-fold table"):
        train_fusion(table, None, FusionTrainConfig(use_probabilities=True, max_epochs=2))


def test_build_fusion_table_joins_probabilities_by_patient() -> None:
    table, oof = synthetic_tables(n=30)
    shuffled = oof.sample(frac=1.0, random_state=1)
    joined = build_fusion_table(table, shuffled)
    assert joined["patientId"].tolist() == table["patientId"].tolist()
    np.testing.assert_array_equal(joined["p_lung_opacity"].to_numpy(), oof["p_lung_opacity"].to_numpy())
    np.testing.assert_array_equal(joined["fold"].to_numpy(), oof["fold"].to_numpy())


# --------------------------------------------------------------------------- training


def test_early_stopping_restores_the_best_weights_and_is_reproducible() -> None:
    table, oof = synthetic_tables(n=800)
    result = train_fusion(table, oof, FusionTrainConfig(seed=3, max_epochs=60, patience=10))
    best = min(result.history, key=lambda h: h["val_loss"])
    assert result.best_epoch == best["epoch"]
    val_rows = table.set_index("patientId").loc[result.val_ids].reset_index()
    val_rows = val_rows.merge(oof.drop(columns=["class", "Target"]), on="patientId")
    probability = result.model.predict(val_rows).probability
    loss = torch.nn.functional.binary_cross_entropy(
        torch.tensor(probability), torch.tensor(val_rows["Target"].to_numpy(), dtype=torch.float64)
    ).item()
    assert loss == pytest.approx(best["val_loss"], rel=1e-4)  # the kept weights are the best epoch's
    assert result.val_auc == pytest.approx(roc_auc_score(val_rows["Target"], probability), abs=1e-9)
    assert len(set(result.train_ids) & set(result.val_ids)) == 0
    assert len(result.train_ids) + len(result.val_ids) == len(table)

    # The keyword shorthand is the same config.
    again = train_fusion(table, oof, seed=3, max_epochs=60, patience=10)
    np.testing.assert_array_equal(again.model.predict(val_rows).probability, probability)


def test_fusion_config_round_trips_and_refuses_bad_settings() -> None:
    config = FusionTrainConfig(seed=4, hidden=(8,), batch_size=None, monitor="auc")
    assert FusionTrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert FusionTrainConfig.from_dict({"seed": 2, "from_a_newer_version": 1}) == FusionTrainConfig(seed=2)
    table, oof = synthetic_tables(n=200)
    for bad, option in (({"monitor": "f1"}, "monitor"), ({"val_fraction": 1.0}, "val_fraction"),
                        ({"batch_size": 0}, "batch_size"), ({"patience": 0}, "max_epochs/patience")):
        with pytest.raises(ConfigError, match=f"^{option}: "):
            train_fusion(table, oof, FusionTrainConfig(**bad))
    with pytest.raises(TypeError, match="unknown fusion training setting"):
        train_fusion(table, oof, epochs=3)


@pytest.fixture(scope="module")
def cross_fitted() -> pd.DataFrame:
    table, oof = synthetic_tables(n=2400, n_folds=4)
    return cross_fit_scores(table, oof, FusionTrainConfig(seed=0, max_epochs=200, patience=15))


def test_fusion_beats_image_only_when_view_carries_independent_signal(cross_fitted: pd.DataFrame) -> None:
    assert cross_fitted[["p_metadata", "p_fusion"]].notna().all().all()
    target = cross_fitted["Target"]
    auc_image = roc_auc_score(target, cross_fitted["p_image"])
    auc_metadata = roc_auc_score(target, cross_fitted["p_metadata"])
    auc_fusion = roc_auc_score(target, cross_fitted["p_fusion"])
    # View alone: AP 38 % vs PA 9 % gives an AUC near 0.72; the image alone about 0.77.
    assert 0.67 < auc_metadata < 0.77
    assert auc_fusion >= auc_image + 0.01  # about +0.03 here
    assert auc_fusion >= auc_metadata + 0.05


def test_fusion_comparison_report_files_and_figures(cross_fitted: pd.DataFrame, tmp_path: Path) -> None:
    metrics = fusion_comparison_report(cross_fitted, tmp_path, n_bootstrap=300, seed=0)
    for name in ("fusion_report.md", "fusion_roc.png", "fusion_metrics.json"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "fusion_metrics.json").read_text()) == metrics
    for model, column in (("metadata-only", "p_metadata"), ("image-only", "p_image"), ("fusion", "p_fusion")):
        entry = metrics["models"][model]
        assert entry["auc"] == pytest.approx(roc_auc_score(cross_fitted["Target"], cross_fitted[column]), abs=1e-12)
        assert entry["ci95"][0] < entry["auc"] < entry["ci95"][1]
    comparison = metrics["comparisons"]["fusion_vs_image-only"]
    assert comparison["auc_difference"] == pytest.approx(
        metrics["models"]["fusion"]["auc"] - metrics["models"]["image-only"]["auc"]
    )
    assert comparison["delong_p"] < 0.01  # the synthetic gain is large
    assert comparison["bootstrap_difference_ci95"][0] > 0
    with Image.open(tmp_path / "fusion_roc.png") as png:
        assert png.size[0] > 300 and png.size[1] > 300
    assert "| fusion |" in (tmp_path / "fusion_report.md").read_text()


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    table, oof = synthetic_tables(n=400)
    result = train_fusion(table, oof, FusionTrainConfig(seed=1, max_epochs=20, patience=5))
    folder = result.save(tmp_path / "fusion")
    loaded = load_fusion(folder)
    assert loaded.features == FUSION_FEATURES
    assert loaded.encoder.to_dict() == result.encoder.to_dict()
    assert loaded.metrics["best_epoch"] == result.best_epoch
    config = json.loads((folder / "fusion.json").read_text())
    assert config["features"] == list(FUSION_FEATURES)
    assert config["architecture"] == {"n_inputs": 6, "hidden": [16, 8], "dropout": 0.0}

    before = predict_fusion(result.model, table, oof)
    after = predict_fusion(loaded, table, oof)
    np.testing.assert_array_equal(after["p_opacity"].to_numpy(), before["p_opacity"].to_numpy())

    # One header-style row (as the web service has it), with an unknown view.
    header = {"sex": "F", "age": 33.0, "view": None, "p_normal": 0.5, "p_not_normal": 0.3, "p_lung_opacity": 0.2}
    prediction = loaded.predict(header)
    assert prediction.missing_fields(0) == ["view"]
    assert prediction.probability[0] == result.model.predict(header).probability[0]


def test_metadata_only_model_round_trip(tmp_path: Path) -> None:
    table, _ = synthetic_tables(n=300)
    result = train_fusion(table, config=FusionTrainConfig(use_probabilities=False, seed=0, max_epochs=10, patience=5))
    save_fusion(tmp_path, result.net, result.encoder, {"note": np.float32(0.5)})
    loaded = load_fusion(tmp_path)
    assert loaded.features == METADATA_FEATURES
    assert loaded.metrics == {"note": 0.5}
    np.testing.assert_array_equal(loaded.predict(table).probability, result.model.predict(table).probability)


# --------------------------------------------------------------------------- real RSNA data


@pytest.mark.skipif(not (RSNA_DIR / "metadata.csv").is_file(), reason=f"real RSNA tables absent ({RSNA_DIR})")
def test_metadata_network_on_real_rsna_matches_or_beats_logistic_regression() -> None:
    table = load_metadata_table(RSNA_DIR)
    assert len(table) == 26_684
    split = stratified_split(table, val_fraction=0.2, seed=0, stratify_col="Target").to_numpy()
    train, test = table[split == "train"], table[split == "val"]

    encoder = FeatureEncoder(features=METADATA_FEATURES).fit(train)
    logistic = LogisticRegression().fit(encoder.encode(train)[0], train["Target"])
    auc_logistic = roc_auc_score(test["Target"], logistic.predict_proba(encoder.encode(test)[0])[:, 1])
    assert 0.695 <= auc_logistic <= 0.725  # the known baseline (0.70-0.72) on such splits

    result = train_fusion(train, config=FusionTrainConfig(use_probabilities=False, seed=0))
    auc_network = roc_auc_score(test["Target"], result.model.predict(test).probability)
    assert 0.69 <= auc_network <= 0.74
    assert auc_network >= auc_logistic - 0.005
