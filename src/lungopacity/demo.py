"""The whole chain on the built-in synthetic dataset: what ``make demo`` runs.

demo data -> prepare -> classifier (k-fold) -> evaluation report -> fusion (+ comparison
report) -> detector (+ evaluation, overlays, submission) -> bundle -> predict on a few
images. Sized to finish in about ten minutes on a 2-core CPU. Every step is the same
library function the CLI command of that step calls, so the demo is also a smoke test of
the real pipeline.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """Sizes of the demo (the defaults fit a 2-core CPU in about ten minutes)."""

    n_patients: int = 300
    image_size: int = 256  # the synthetic DICOMs
    cache_size: int = 128  # the prepared images
    seed: int = 0
    classifier_backbone: str = "efficientnet_lite0"
    classifier_pretrained: str = "efficientnet-lite0"
    classifier_folds: int = 3
    classifier_epochs: int = 6
    detector_backbone: str = "efficientnet_lite0"
    detector_pretrained: str = "efficientnet-lite0"
    detector_epochs: int = 6
    n_predict: int = 6


@dataclass
class DemoResult:
    out: Path
    paths: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(
    out: str | Path,
    settings: DemoSettings | None = None,
    *,
    progress_factory: Callable[[], Any] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run every stage under ``out`` and return where the results are.

    Args:
        out: the demo folder (created; stages already finished are redone).
        settings: sizes of the demo.
        progress_factory: makes a progress reporter for the training loops.
        on_step: called with a one-line description before each stage.
    """
    from lungopacity.data.cache import PreparedCache, prepare_cache
    from lungopacity.engine.classifier import ClassifierTrainConfig, train_classifier
    from lungopacity.engine.detector import DetectorTrainConfig, train_detector
    from lungopacity.engine.evaluate_detection import evaluate_detector
    from lungopacity.engine.evaluate import evaluate_classifier
    from lungopacity.engine.fusion import train_fusion_run
    from lungopacity.inference.batch import predict_to_folder
    from lungopacity.engine.bundle import build_bundle
    from lungopacity.inference.predictor import Predictor
    from lungopacity.synthetic import write_demo_dataset

    from lungopacity.errors import ConfigError

    settings = settings or DemoSettings()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(out, "is a file; --out must be a folder (created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out)
    paths = result.paths
    paths.update(
        data=out / "data", cache=out / "cache", classifier=out / "classifier",
        classifier_report=out / "reports" / "classifier", fusion=out / "fusion", detector=out / "detector",
        detector_report=out / "reports" / "detector", model=out / "model", predictions=out / "predictions",
    )
    for key in ("classifier", "fusion", "detector", "model", "predictions"):
        _remove(paths[key])  # a demo re-run starts its training stages afresh

    def step(name: str, description: str) -> Callable[[], None]:
        if on_step:
            on_step(description)
        log.info("demo: %s", description)
        started = time.perf_counter()
        return lambda: result.seconds.__setitem__(name, round(time.perf_counter() - started, 1))

    done = step("data", f"writing {settings.n_patients} synthetic patients ({settings.image_size} px DICOMs)")
    summary = write_demo_dataset(
        paths["data"], n=settings.n_patients, size=settings.image_size, seed=settings.seed, overwrite=True
    )
    result.figures["data"] = summary.describe()
    done()

    done = step("prepare", f"preparing the images at {settings.cache_size} px")
    # The cache's folds are the classifier's k-fold split (training reads them, never redraws them).
    prepare_cache(paths["data"], paths["cache"], size=settings.cache_size, seed=settings.seed,
                  folds=max(2, settings.classifier_folds))
    done()

    done = step("classifier", f"training the classifier ({settings.classifier_backbone}, {settings.classifier_folds}-fold)")
    classifier = train_classifier(
        paths["cache"],
        paths["classifier"],
        ClassifierTrainConfig(
            backbone=settings.classifier_backbone, pretrained=settings.classifier_pretrained,
            epochs=settings.classifier_epochs, batch_size=16, folds=settings.classifier_folds, seed=settings.seed,
            patience=settings.classifier_epochs,
        ),
        progress=progress_factory() if progress_factory else None,
    )
    result.figures["classifier_oof_opacity_auc"] = classifier.metrics["opacity_auc"]
    done()

    done = step("classifier_report", "evaluating the classifier (ROC per class, AUC intervals)")
    metrics = evaluate_classifier(paths["classifier"], paths["cache"], split="all", out_dir=paths["classifier_report"], n_boot=300)
    result.figures["classifier_report"] = {k: metrics[k] for k in ("opacity_auc", "accuracy", "n") if k in metrics}
    done()

    done = step("fusion", "training the fusion network on out-of-fold probabilities")
    fusion = train_fusion_run(
        paths["classifier"] / "oof.csv", paths["fusion"], cache_dir=paths["cache"], seed=settings.seed, n_bootstrap=500
    )
    result.figures["fusion"] = {name: m.get("auc") for name, m in fusion.get("models", {}).items()}
    done()

    done = step("detector", f"training the opacity detector ({settings.detector_backbone})")
    cache = PreparedCache(paths["cache"])
    train_detector(
        paths["cache"],
        paths["detector"],
        DetectorTrainConfig(
            backbone=settings.detector_backbone, pretrained=settings.detector_pretrained,
            epochs=settings.detector_epochs, seed=settings.seed,
        ),
        progress=progress_factory() if progress_factory else None,
    )
    done()

    done = step("detector_report", "evaluating the detector (RSNA metric, overlays, submission)")
    detection = evaluate_detector(
        paths["detector"], paths["cache"], split="val", out_dir=paths["detector_report"],
        classifier_probs=paths["classifier"] / "oof.csv",
    )
    main = detection["variants"][detection["main_variant"]]
    result.figures["detector_report"] = {
        "variant": detection["main_variant"],
        "rsna_map": main["metrics"]["rsna_map"],
        "cross_fitted_rsna_map": main.get("cross_fitted_rsna_map"),
    }
    done()

    done = step("bundle", "assembling the model bundle")
    build_bundle(paths["model"], paths["classifier"], fusion_dir=paths["fusion"], detector_run=paths["detector"],
                 cache_dir=paths["cache"], detector_postprocess=paths["detector_report"] / "report.json")
    done()

    done = step("predict", f"reading {settings.n_predict} images with the bundle")
    val = cache.table.iloc[cache.indices("val")]
    chosen = list(val.sort_values("Target", ascending=False)["path"][: settings.n_predict])
    predictor = Predictor.from_bundle(paths["model"])
    batch = predict_to_folder(predictor, chosen, paths["predictions"], with_images=True)
    result.figures["predict"] = {"images": batch.n_predicted, "positive": batch.n_positive, "errors": batch.n_errors}
    done()

    (out / "demo_summary.json").write_text(
        json.dumps({"paths": {k: str(v) for k, v in paths.items()}, "figures": result.figures,
                    "seconds": result.seconds}, indent=2, default=str)
    )
    return result


def _remove(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)
