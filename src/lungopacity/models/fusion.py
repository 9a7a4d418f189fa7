"""The paper's end-to-end fusion network: DICOM metadata + classifier probabilities -> P(opacity).

The six inputs are defined once here (:data:`FUSION_FEATURES`) and used by training,
prediction and the web service alike:

====================  ==============================================================
``sex_male``          1 for 'M', 0 for 'F'
``age``               years, clipped to [0, 100], divided by 100, then standardised
                      with the training mean / std of that scaled age
``view_ap``           1 for 'AP', 0 for 'PA'
``p_normal``          classifier probability of class 0 (Normal)
``p_not_normal``      classifier probability of class 1 (No Lung Opacity / Not Normal)
``p_lung_opacity``    classifier probability of class 2 (Lung Opacity)
====================  ==============================================================

Missing-data rule (the only one): a sex that is not 'M'/'F', an age that is absent,
NaN or negative, and a view that is not 'AP'/'PA' (for example 'LL' or None) are
*missing*. A missing value is replaced by the training-set statistic stored in the
encoder -- the fraction of males, the median (clipped) age, the fraction of AP views --
never by a silent 0, and :meth:`FeatureEncoder.encode` returns a boolean mask
(columns :data:`MISSING_FIELDS`) so every prediction can say which inputs were imputed.
Classifier probabilities are never imputed: a missing one is an error.

Metadata-only mode is the same encoder and network with the three probabilities left
out, chosen by feature name (:data:`METADATA_FEATURES`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lungopacity.constants import CLASS_KEYS
from lungopacity.errors import ConfigError, RunFolderError

logger = logging.getLogger(__name__)

#: The fusion inputs, in network-input order (the paper's six input nodes).
FUSION_FEATURES: tuple[str, ...] = (
    "sex_male",
    "age",
    "view_ap",
    "p_normal",
    "p_not_normal",
    "p_lung_opacity",
)
#: The DICOM-derived features: the input of the metadata-only network.
METADATA_FEATURES: tuple[str, ...] = FUSION_FEATURES[:3]
#: The classifier's class probabilities, in class-code order (columns of ``oof.csv``).
PROBABILITY_FEATURES: tuple[str, ...] = tuple(f"p_{key}" for key in CLASS_KEYS)
#: Columns of the missing mask returned by :meth:`FeatureEncoder.encode`.
MISSING_FIELDS: tuple[str, str, str] = ("sex", "age", "view")

#: Per-patient score columns compared by the fusion report, keyed by the model they come from
#: (written by ``engine.fusion.cross_fit_scores``, read by ``reports.fusion``).
SCORE_COLUMNS: dict[str, str] = {"metadata-only": "p_metadata", "image-only": "p_image", "fusion": "p_fusion"}

#: Ages are clipped to this range (years) before scaling; a few RSNA ages over 100
#: (up to 155) are recording errors.
AGE_CLIP_YEARS: tuple[float, float] = (0.0, 100.0)
#: Scale applied after clipping so the age lies in [0, 1] before standardisation.
AGE_SCALE_YEARS = 100.0

WEIGHTS_FILE = "fusion.safetensors"
CONFIG_FILE = "fusion.json"
FORMAT_VERSION = 1

assert PROBABILITY_FEATURES == FUSION_FEATURES[3:], "probability feature names drifted"


def _normalise_sex(value: Any) -> str | None:
    """'M' or 'F' (case and surrounding spaces ignored), otherwise None (= missing)."""
    if isinstance(value, str):
        text = value.strip().upper()
        if text in ("M", "F"):
            return text
    return None


def _normalise_view(value: Any) -> str | None:
    """'AP' or 'PA' (case and surrounding spaces ignored), otherwise None (= missing)."""
    if isinstance(value, str):
        text = value.strip().upper()
        if text in ("AP", "PA"):
            return text
    return None


def _age_years(value: Any) -> float | None:
    """A usable age in years, or None for absent, NaN, non-numeric or negative values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        years = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(years) or years < 0:
        return None
    return years


def _scaled_age(years: np.ndarray) -> np.ndarray:
    """Clip to :data:`AGE_CLIP_YEARS` and divide by :data:`AGE_SCALE_YEARS`."""
    return np.clip(years, *AGE_CLIP_YEARS) / AGE_SCALE_YEARS


def _rows_to_frame(rows: pd.DataFrame | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Accept a table, one row as a mapping, or a sequence of row mappings."""
    if isinstance(rows, pd.DataFrame):
        return rows
    if isinstance(rows, Mapping):
        return pd.DataFrame([dict(rows)])
    return pd.DataFrame([dict(row) for row in rows])


@dataclass
class FeatureEncoder:
    """Turns metadata rows (+ classifier probabilities) into the fusion input matrix.

    Fit it on the training rows only (:meth:`fit`); its state is a small JSON-serialisable
    dict (:meth:`to_dict` / :meth:`from_dict`) saved next to the network weights.

    Attributes:
        features: the feature names used, a subset of :data:`FUSION_FEATURES` in that order.
        fraction_male: training fraction of 'M' among rows with a known sex (imputation value).
        median_age_years: training median of the clipped known ages (imputation value).
        fraction_ap: training fraction of 'AP' among rows with a known view (imputation value).
        age_mean, age_std: mean and std of the clipped, /100-scaled known training ages.
    """

    features: tuple[str, ...] = FUSION_FEATURES
    fraction_male: float | None = None
    median_age_years: float | None = None
    fraction_ap: float | None = None
    age_mean: float | None = None
    age_std: float | None = None

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        unknown = [name for name in self.features if name not in FUSION_FEATURES]
        if unknown:
            raise ConfigError(f"unknown fusion features {unknown}; known: {list(FUSION_FEATURES)}")
        if not self.features:
            raise ConfigError("a FeatureEncoder needs at least one feature")
        if len(set(self.features)) != len(self.features):
            raise ConfigError(f"duplicate fusion features in {list(self.features)}")
        # One canonical order, so a saved network can never be fed columns shuffled.
        self.features = tuple(name for name in FUSION_FEATURES if name in self.features)

    @classmethod
    def for_mode(cls, use_probabilities: bool) -> FeatureEncoder:
        """An unfitted encoder for the fusion (6 inputs) or metadata-only (3 inputs) network."""
        return cls(features=FUSION_FEATURES if use_probabilities else METADATA_FEATURES)

    @property
    def n_features(self) -> int:
        """Number of network inputs (columns of :meth:`encode`'s matrix)."""
        return len(self.features)

    @property
    def uses_probabilities(self) -> bool:
        """True when any classifier probability is an input."""
        return any(name in PROBABILITY_FEATURES for name in self.features)

    @property
    def is_fitted(self) -> bool:
        """True once every statistic the used features need is known."""
        needed = self._needed_statistics()
        return all(getattr(self, name) is not None for name in needed)

    def _needed_statistics(self) -> list[str]:
        needed = []
        if "sex_male" in self.features:
            needed.append("fraction_male")
        if "age" in self.features:
            needed += ["median_age_years", "age_mean", "age_std"]
        if "view_ap" in self.features:
            needed.append("fraction_ap")
        return needed

    def fit(self, rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> FeatureEncoder:
        """Learn the imputation values and the age standardisation from training rows.

        Args:
            rows: a table (or row mappings) with columns ``sex``, ``age``, ``view`` (those
                the used features need).

        Returns:
            self, fitted.

        Raises:
            ValueError: a used field has no known value in any row, or a column is absent.
        """
        frame = _rows_to_frame(rows)
        if "sex_male" in self.features:
            sexes = [_normalise_sex(v) for v in self._column(frame, "sex")]
            known = [s for s in sexes if s is not None]
            if not known:
                raise ConfigError("cannot fit the feature encoder: no training row has a known sex")
            self.fraction_male = float(np.mean([s == "M" for s in known]))
        if "age" in self.features:
            ages = [_age_years(v) for v in self._column(frame, "age")]
            known_ages = np.array([a for a in ages if a is not None], dtype=np.float64)
            if known_ages.size == 0:
                raise ConfigError("cannot fit the feature encoder: no training row has a known age")
            clipped = np.clip(known_ages, *AGE_CLIP_YEARS)
            self.median_age_years = float(np.median(clipped))
            scaled = _scaled_age(known_ages)
            self.age_mean = float(scaled.mean())
            std = float(scaled.std())
            # One distinct training age: standardising would divide by zero; centring suffices.
            self.age_std = std if std > 1e-8 else 1.0
        if "view_ap" in self.features:
            views = [_normalise_view(v) for v in self._column(frame, "view")]
            known_views = [v for v in views if v is not None]
            if not known_views:
                raise ConfigError("cannot fit the feature encoder: no training row has a known view")
            self.fraction_ap = float(np.mean([v == "AP" for v in known_views]))
        logger.info(
            "fitted fusion encoder on %d rows: fraction_male=%s median_age=%s fraction_ap=%s",
            len(frame), self.fraction_male, self.median_age_years, self.fraction_ap,
        )
        return self

    @staticmethod
    def _column(frame: pd.DataFrame, name: str) -> list[Any]:
        if name not in frame.columns:
            raise ConfigError(f"fusion input table has no column {name!r} (columns: {list(frame.columns)})")
        return frame[name].tolist()

    def encode(
        self, rows: pd.DataFrame | Mapping[str, Any] | Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode rows into the network input and say which metadata were missing.

        Args:
            rows: a table, one row mapping (e.g. an image header dict plus ``p_*`` keys)
                or a sequence of row mappings, with ``sex``/``age``/``view`` and, when
                used, ``p_normal``/``p_not_normal``/``p_lung_opacity``.

        Returns:
            ``(features, missing)``: ``features`` float32 ``(n, n_features)`` in
            :attr:`features` order; ``missing`` bool ``(n, 3)`` in :data:`MISSING_FIELDS`
            order (sex, age, view), True where the value was absent/unknown and imputed.
            The mask covers all three fields even when a field is not a used feature.

        Raises:
            RuntimeError: the encoder is not fitted.
            ValueError: a needed column is absent, or a probability is missing or outside [0, 1].
        """
        if not self.is_fitted:
            raise RuntimeError("FeatureEncoder.encode called before fit (or from_dict)")
        frame = _rows_to_frame(rows)
        n = len(frame)
        sex_values = frame["sex"].tolist() if "sex" in frame.columns else [None] * n
        age_values = frame["age"].tolist() if "age" in frame.columns else [None] * n
        view_values = frame["view"].tolist() if "view" in frame.columns else [None] * n
        sexes = [_normalise_sex(v) for v in sex_values]
        ages = [_age_years(v) for v in age_values]
        views = [_normalise_view(v) for v in view_values]
        missing = np.array(
            [[s is None, a is None, v is None] for s, a, v in zip(sexes, ages, views)], dtype=bool
        ).reshape(n, len(MISSING_FIELDS))

        columns: list[np.ndarray] = []
        for name in self.features:
            if name == "sex_male":
                self._column(frame, "sex")
                columns.append(
                    np.array([self.fraction_male if s is None else float(s == "M") for s in sexes])
                )
            elif name == "age":
                self._column(frame, "age")
                years = np.array([self.median_age_years if a is None else a for a in ages], dtype=np.float64)
                columns.append((_scaled_age(years) - self.age_mean) / self.age_std)
            elif name == "view_ap":
                self._column(frame, "view")
                columns.append(np.array([self.fraction_ap if v is None else float(v == "AP") for v in views]))
            else:
                probabilities = pd.to_numeric(pd.Series(self._column(frame, name)), errors="coerce").to_numpy(
                    dtype=np.float64
                )
                if np.isnan(probabilities).any():
                    raise ConfigError(f"{name}: {int(np.isnan(probabilities).sum())} missing classifier probabilities")
                if (probabilities < -1e-6).any() or (probabilities > 1 + 1e-6).any():
                    raise ConfigError(f"{name}: classifier probabilities outside [0, 1]")
                columns.append(probabilities)
        matrix = np.stack(columns, axis=1).astype(np.float32) if n else np.zeros((0, self.n_features), np.float32)
        return matrix, missing

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (plain floats, the feature list)."""
        return {
            "features": list(self.features),
            "fraction_male": self.fraction_male,
            "median_age_years": self.median_age_years,
            "fraction_ap": self.fraction_ap,
            "age_mean": self.age_mean,
            "age_std": self.age_std,
            "age_clip_years": list(AGE_CLIP_YEARS),
            "age_scale_years": AGE_SCALE_YEARS,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> FeatureEncoder:
        """Rebuild an encoder from :meth:`to_dict` output."""
        if "age_clip_years" in state and tuple(state["age_clip_years"]) != AGE_CLIP_YEARS:
            raise ConfigError(
                f"saved encoder clips ages to {state['age_clip_years']}, this version to {AGE_CLIP_YEARS}"
            )
        if "age_scale_years" in state and float(state["age_scale_years"]) != AGE_SCALE_YEARS:
            raise ConfigError(
                f"saved encoder scales ages by {state['age_scale_years']}, this version by {AGE_SCALE_YEARS}"
            )
        return cls(
            features=tuple(state["features"]),
            fraction_male=state.get("fraction_male"),
            median_age_years=state.get("median_age_years"),
            fraction_ap=state.get("fraction_ap"),
            age_mean=state.get("age_mean"),
            age_std=state.get("age_std"),
        )


class FusionNet(nn.Module):
    """Small fully connected network: ReLU hidden layers, He init, one logit output.

    ``forward`` returns logits of shape ``(B,)``; the sigmoid of a logit is P(opacity)
    (apply it with :meth:`predict_proba`, or train with ``BCEWithLogitsLoss``).
    """

    def __init__(self, n_inputs: int, hidden: Sequence[int] = (16, 8), dropout: float = 0.0) -> None:
        super().__init__()
        if n_inputs < 1:
            raise ConfigError(f"n_inputs must be >= 1, got {n_inputs}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.n_inputs = int(n_inputs)
        self.hidden = tuple(int(h) for h in hidden)
        self.dropout = float(dropout)
        layers: list[nn.Module] = []
        width = self.n_inputs
        for units in self.hidden:
            if units < 1:
                raise ConfigError(f"hidden layer sizes must be >= 1, got {self.hidden}")
            linear = nn.Linear(width, units)
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU()]
            if self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
            width = units
        output = nn.Linear(width, 1)
        # He-style fan-in scaling with unit gain: the output feeds a sigmoid, not a ReLU.
        nn.init.kaiming_normal_(output.weight, nonlinearity="linear")
        nn.init.zeros_(output.bias)
        layers.append(output)
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` for inputs ``(B, n_inputs)``."""
        return self.layers(features).squeeze(-1)

    def architecture(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable."""
        return {"n_inputs": self.n_inputs, "hidden": list(self.hidden), "dropout": self.dropout}

    @torch.no_grad()
    def predict_proba(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """P(opacity) as float64 ``(B,)`` for encoded inputs ``(B, n_inputs)`` (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            tensor = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
            if tensor.ndim != 2 or tensor.shape[1] != self.n_inputs:
                raise ConfigError(f"expected features of shape (B, {self.n_inputs}), got {tuple(tensor.shape)}")
            return torch.sigmoid(self(tensor)).double().cpu().numpy()
        finally:
            self.train(was_training)


@dataclass
class FusionPrediction:
    """Predictions of a fusion model: P(opacity) per row and which metadata were imputed."""

    probability: np.ndarray
    missing: np.ndarray  # bool (n, 3), columns MISSING_FIELDS

    def missing_fields(self, index: int) -> list[str]:
        """Names of the missing (imputed) inputs of row ``index``."""
        return [name for name, flag in zip(MISSING_FIELDS, self.missing[index]) if flag]


@dataclass
class FusionModel:
    """A trained network with the encoder it was trained with (what is saved and loaded)."""

    net: FusionNet
    encoder: FeatureEncoder
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> tuple[str, ...]:
        """The input feature names, in network-input order."""
        return self.encoder.features

    def predict(self, rows: pd.DataFrame | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> FusionPrediction:
        """Encode rows (table, one mapping or mappings) and return P(opacity) + missing mask."""
        matrix, missing = self.encoder.encode(rows)
        return FusionPrediction(probability=self.net.predict_proba(matrix), missing=missing)


def _json_safe(value: Any) -> Any:
    """Plain-Python copy of metrics (NumPy scalars/arrays become floats/lists; NaN -> None)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_fusion(
    path_dir: str | Path, net: FusionNet, encoder: FeatureEncoder, metrics: Mapping[str, Any] | None = None
) -> Path:
    """Write ``fusion.safetensors`` (weights) and ``fusion.json`` (features, encoder, architecture, metrics).

    Returns:
        The folder written.
    """
    if net.n_inputs != encoder.n_features:
        raise ConfigError(f"network takes {net.n_inputs} inputs but the encoder produces {encoder.n_features}")
    if not encoder.is_fitted:
        raise ConfigError("refusing to save an unfitted FeatureEncoder")
    folder = Path(path_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    config = {
        "format_version": FORMAT_VERSION,
        "features": list(encoder.features),
        "encoder": encoder.to_dict(),
        "architecture": net.architecture(),
        "missing_fields": list(MISSING_FIELDS),
        "metrics": _json_safe(dict(metrics or {})),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    logger.info("saved fusion model (%s) to %s", ", ".join(encoder.features), folder)
    return folder


def load_fusion(path_dir: str | Path, device: str | torch.device = "cpu") -> FusionModel:
    """Restore what :func:`save_fusion` wrote; the network is returned in eval mode.

    Raises:
        FileNotFoundError: a file is absent.
        ValueError: the files disagree with each other or with this version.
    """
    folder = Path(path_dir)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise RunFolderError(path, "fusion model file not found")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{config_path}: format_version {config.get('format_version')}, expected {FORMAT_VERSION}")
    encoder = FeatureEncoder.from_dict(config["encoder"])
    if list(encoder.features) != list(config["features"]):
        raise ConfigError(f"{config_path}: features {config['features']} disagree with the encoder's")
    architecture = config["architecture"]
    net = FusionNet(architecture["n_inputs"], hidden=architecture["hidden"], dropout=architecture["dropout"])
    if net.n_inputs != encoder.n_features:
        raise ConfigError(f"{config_path}: network takes {net.n_inputs} inputs, encoder gives {encoder.n_features}")
    net.load_state_dict(load_file(str(weights_path)))
    net.to(device).eval()
    return FusionModel(net=net, encoder=encoder, metrics=config.get("metrics") or {})
