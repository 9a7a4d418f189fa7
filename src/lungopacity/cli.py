"""The ``lungopacity`` command line: a thin Typer layer over the library.

Every command parses options, calls one library function, and prints what it did
and where the results are. Errors the user can fix — everything the library raises
on purpose (:class:`lungopacity.errors.LungOpacityError`: bad files, bad tables, bad
settings, damaged bundles or runs) and file-system errors — are printed as one line
on stderr and exit with status 1, without a traceback (status 2 is Click's, for
usage errors).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer

from lungopacity import __version__

app = typer.Typer(
    name="lungopacity",
    help=(
        "Lung opacity (pneumonia) identification on chest X-rays.\n\n"
        "Typical order: demo-data (or the RSNA download) -> prepare -> train-classifier -> "
        "evaluate-classifier -> train-fusion -> train-detector -> evaluate-detector -> bundle -> "
        "predict / serve / listen."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain Click messages: a usage error is one line on stderr, readable in logs and CI.
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., Any])

#: -v / -vv: the library's log lines at INFO / DEBUG; by default only its warnings.
LOG_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)


def _setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=LOG_LEVELS[min(max(verbosity, 0), len(LOG_LEVELS) - 1)],
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


# Options with a fixed set of values: a wrong value is a usage error (exit 2) listing them.
class Recipe(str, Enum):
    paper = "paper"
    finetune = "finetune"


class Balance(str, Enum):
    none = "none"
    loss = "loss"
    sampler = "sampler"


class Select(str, Enum):
    best = "best"
    last = "last"


class Weights(str, Enum):
    best = "best"
    last = "last"


class Arch(str, Enum):
    retinanet = "retinanet"
    fasterrcnn = "fasterrcnn"


class ClassifierSplit(str, Enum):
    val = "val"
    all = "all"


class DetectorSplit(str, Enum):
    val = "val"
    train = "train"
    all = "all"
    oof = "oof"


class Runtime(str, Enum):
    torch = "torch"
    onnx = "onnx"


class Sex(str, Enum):
    M = "M"
    F = "F"


class View(str, Enum):
    AP = "AP"
    PA = "PA"


class Window(str, Enum):
    auto = "auto"
    none = "none"
    file = "file"


def _check_device(value: str) -> str:
    from lungopacity.devices import DEVICE_HELP, DEVICE_PATTERN

    if not DEVICE_PATTERN.match(value.strip().lower()):
        raise typer.BadParameter(f"{value!r} is not a device; use {DEVICE_HELP}")
    return value.strip().lower()


def _device_option() -> Any:
    from lungopacity.devices import DEVICE_HELP

    return typer.Option("auto", "--device", callback=_check_device, help=DEVICE_HELP)


def _check_positive(value: float) -> float:
    if not value > 0:  # also refuses nan
        raise typer.BadParameter(f"{value} is not > 0")
    return value


def _ema_option() -> Any:
    return typer.Option(
        0.0, "--ema", min=0.0, max=0.999999,
        help="Per-step decay of an exponential moving average of the weights, which each epoch evaluates "
        "and the checkpoints keep (e.g. 0.99; 0 disables; it did not pay on the shared images, BENCHMARKS.md).",
    )


def _value(choice: Enum | None) -> Any:
    return None if choice is None else choice.value


PRETRAINED_HELP = (
    "none | efficientnet-lite0 / -lite1 / -lite2 (offline ImageNet weights, for the matching efficientnet_liteN "
    "backbone; the 'weights' extra) | timm (timm's hub, online) | PATH to a .safetensors/.pth/.pt/.bin file."
)


#: Exit status of a command that failed on a library error (Click uses 2 for usage errors).
EXIT_LIBRARY_ERROR = 1


def user_errors(func: F) -> F:
    """Turn the library's errors into one line on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from lungopacity.errors import LungOpacityError

        try:
            return func(*args, **kwargs)
        except LungOpacityError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=EXIT_LIBRARY_ERROR) from None
        except OSError as exc:  # a path that does not exist, no permission, disk full
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
            raise typer.Exit(code=EXIT_LIBRARY_ERROR) from None

    return wrapper  # type: ignore[return-value]


class _Progress:
    """A tqdm bar fed by the library's ``progress(done, total)`` callbacks."""

    def __init__(self, desc: str, unit: str = "img") -> None:
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, initial=done, dynamic_ncols=True)
        else:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _TqdmProgress:
    """The engine's Progress protocol as tqdm bars (one per epoch / prediction pass)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def start(self, description: str, total: int) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=description, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"lungopacity {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="Show the library's log lines: -v for INFO, -vv for DEBUG."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Lung opacity identification on chest radiographs (RSNA Pneumonia Detection Challenge format)."""
    _setup_logging(verbose)


@app.command("demo-data")
@user_errors
def demo_data(
    out: Path = typer.Argument(..., help="Folder to write the RSNA-format dataset into."),
    n: int = typer.Option(200, "--n", min=1, help="Number of patients."),
    size: int = typer.Option(1024, "--size", min=64, help="Image side length in pixels (RSNA: 1024)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same bytes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the DICOMs of an earlier run in OUT."),
) -> None:
    """Write a synthetic RSNA-format dataset of phantom chest radiographs.

    The folder has the official layout: stage_2_train_labels.csv,
    stage_2_detailed_class_info.csv and DICOMs (JPEG Baseline, CR) in
    stage_2_train_images/. Lung Opacity patients carry 1-4 soft opacities whose boxes are
    the labels; the class, sex, age and view mix follows RSNA.
    """
    from lungopacity.synthetic import write_demo_dataset

    bar = _Progress("demo-data")
    try:
        summary = write_demo_dataset(out, n=n, size=size, seed=seed, overwrite=overwrite, progress=bar)
    finally:
        bar.close()
    typer.echo(f"wrote {summary.n} synthetic patients to {out} ({summary.describe()})")


@app.command("prepare")
@user_errors
def prepare(
    data_dir: Path = typer.Argument(..., help="RSNA-format folder (CSV labels + stage_2_train_images/ or images/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder to write (resumable)."),
    size: int = typer.Option(256, "--size", min=32, help="Side length of the prepared images."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes (default: all cores)."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of patients in the validation split."),
    folds: int = typer.Option(5, "--folds", min=2, help="Number of cross-validation folds stored in the index."),
    seed: int = typer.Option(0, "--seed", help="Seed of the patient-level split."),
    metadata_csv: Optional[Path] = typer.Option(
        None, "--metadata-csv", help="Sex/age/view table for non-DICOM images (default DATA_DIR/metadata.csv)."
    ),
    window: Window = typer.Option(
        Window.auto, "--window",
        help="DICOM windowing: auto applies the file's VOI LUT, or its Window Center/Width when BitsStored > 8 "
        "(what a radiologist's viewer shows) | none: the full stored range | file: whatever window the file has. "
        "Recorded in the cache; runs and the bundle carry it, so predict and serve read images the same way.",
    ),
) -> None:
    """Decode and resize every image once into a memory-mapped uint8 cache.

    Runs in parallel worker processes and shows progress. Re-running skips finished
    work; an interrupted run continues where it stopped; files that fail to decode are
    listed in OUT/errors.csv and skipped.
    """
    from lungopacity.data.cache import prepare_cache

    bar = _Progress("prepare")
    try:
        result = prepare_cache(
            data_dir, out, size=size, workers=workers, val_fraction=val_fraction, folds=folds, seed=seed,
            metadata_csv=metadata_csv, window=window.value, progress=bar,
        )
    finally:
        bar.close()
    typer.echo(
        f"prepared {result.n_total} images at {size} px in {out} "
        f"({result.n_prepared} now, {result.n_skipped} already done, {result.n_failed} failed"
        + (f": see {out / 'errors.csv'}" if result.n_failed else "")
        + f") in {result.seconds:.1f} s"
    )


@app.command("train-classifier")
@user_errors
def train_classifier_command(
    cache: Path = typer.Argument(..., help="Prepared cache folder (from `lungopacity prepare`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to create (or to continue with --resume)."),
    backbone: str = typer.Option(
        "efficientnet_lite0", "--backbone",
        help="Any timm model name (default: the best measured on real data, BENCHMARKS.md; the paper's: legacy_xception).",
    ),
    pretrained: str = typer.Option(
        "auto", "--pretrained",
        help="auto (the offline ImageNet weights of efficientnet_lite0/1/2, none for other backbones) | " + PRETRAINED_HELP,
    ),
    size: Optional[int] = typer.Option(
        None, "--size", min=32, help="Network input side in pixels (default: the cache's size; one resize on the device)."
    ),
    epochs: int = typer.Option(
        3, "--epochs", min=1,
        help="Training epochs per fold (early stopping may end sooner); 3: the measured recipe for 480 images "
        "per fold (BENCHMARKS.md).",
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per training step (per process under DDP)."),
    recipe: Recipe = typer.Option(
        Recipe.finetune, "--recipe", help="paper (SGD 0.045, x0.94 every 2 epochs) | finetune (AdamW, warm-up + cosine)."
    ),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="Override the recipe's peak learning rate."),
    folds: int = typer.Option(
        5, "--folds", min=1,
        help="K >= 2: train on the cache's K folds (prepare --folds K, 5 by default) and write out-of-fold "
        "probabilities for every patient (oof.csv, what train-fusion and the bundle's calibration use); "
        "1: the cache's train/val split only.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, shuffling, augmentation and dropout."),
    balance: Balance = typer.Option(
        Balance.none, "--balance", help="Class balance: none | loss (class-weighted) | sampler (balanced batches)."
    ),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Scale/shift/rotation, brightness/contrast/gamma."),
    hflip: bool = typer.Option(False, "--hflip", help="Also flip horizontally (off by default: anatomy is not symmetric)."),
    patience: int = typer.Option(5, "--patience", min=1, help="Early stopping: epochs without a better validation AUC."),
    select: Select = typer.Option(
        Select.best, "--select",
        help="Weights each fold keeps: best (best validation AUC; chosen on the patients of oof.csv, optimistic) "
        "| last (the final epoch, no early stopping).",
    ),
    grad_clip: float = typer.Option(5.0, "--grad-clip", min=0.0, help="Gradient norm clip (0 disables)."),
    box_supervision: float = typer.Option(
        0.0, "--box-supervision", min=0.0,
        help="Weight of a loss that trains the head's opacity activation map against the boxes (0 disables; "
        "BENCHMARKS.md).",
    ),
    mixup: float = typer.Option(
        0.0, "--mixup", min=0.0,
        help="Mixup's Beta(alpha, alpha): each training image blended with another, the loss with it "
        "(0 disables; BENCHMARKS.md).",
    ),
    ema: float = _ema_option(),
    backbone_lr_scale: float = typer.Option(
        1.0, "--backbone-lr-scale", callback=_check_positive,
        help="The backbone's learning rate as a share of the head's (e.g. 0.1; 1: one rate for all; "
        "it did not pay on the shared images, BENCHMARKS.md).",
    ),
    drop_path: float = typer.Option(
        0.0, "--drop-path", min=0.0, max=0.99,
        help="Stochastic depth: drop each residual block per sample with a rate rising with depth to this "
        "value (timm's drop_path_rate; EfficientNet yes, legacy_xception no; 0 disables; BENCHMARKS.md).",
    ),
    freeze_bn: bool = typer.Option(
        False, "--freeze-bn",
        help="Keep batch-norm statistics at the pretrained values (scale and shift still learn). Needs a lower "
        "--lr than the recipe's (1e-4: 1e-3 barely learns; BENCHMARKS.md).",
    ),
    device: str = _device_option(),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes (0: in the main process)."),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps-per-epoch", min=1, help="Bound each epoch to this many steps (smoke runs, benchmarks)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out where it stopped."),
) -> None:
    """Train the 3-class classifier (Normal / Not Normal / Lung Opacity) on a prepared cache.

    Writes OUT/config.json, OUT/metrics.jsonl, atomic checkpoints per fold
    (last.pt every epoch, best.pt by validation opacity AUC or, with --select last, the
    last epoch) and, with --folds K, OUT/oof.csv with out-of-fold probabilities for every
    patient; OUT/tensorboard/ when the tensorboard package is installed. Run it under
    `torchrun --nproc_per_node N` for distributed data-parallel training.
    """
    from lungopacity.engine.classifier import ClassifierTrainConfig, train_classifier
    from lungopacity.models.pretrained import PRETRAINED_NONE, offline_weights_for

    if pretrained == "auto":
        pretrained = offline_weights_for(backbone) or PRETRAINED_NONE
    config = ClassifierTrainConfig(
        backbone=backbone, pretrained=pretrained, size=size, epochs=epochs, batch_size=batch_size,
        recipe=recipe.value, lr=lr, folds=folds, seed=seed, balance=balance.value, augment=augment, hflip=hflip,
        patience=patience, select=select.value, grad_clip=grad_clip, box_supervision=box_supervision, mixup=mixup, ema=ema,
        backbone_lr_scale=backbone_lr_scale, drop_path=drop_path, freeze_bn=freeze_bn, device=device, num_workers=workers,
        max_steps_per_epoch=max_steps,
    )
    result = train_classifier(cache, out, config, resume=resume, progress=_TqdmProgress())
    m = result.metrics
    typer.echo(
        f"classifier run {out}: validation opacity AUC {m['opacity_auc']:.4f}, abnormal AUC {m['abnormal_auc']:.4f}, "
        f"accuracy {m['accuracy']:.3f} over {m['n']} patients"
        + (f"; out-of-fold table {result.oof_path}" if result.oof_path else "")
    )


@app.command("evaluate-classifier")
@user_errors
def evaluate_classifier_command(
    run: Path = typer.Argument(..., help="Classifier run folder."),
    cache: Path = typer.Option(..., "--cache", help="Prepared cache to evaluate on."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder (metrics.json, report.md, PNGs)."),
    split: ClassifierSplit = typer.Option(
        ClassifierSplit.val, "--split", help="val: the cache's validation split; all: every patient."
    ),
    n_boot: int = typer.Option(1000, "--n-boot", min=0, help="Bootstrap resamples for the 95 % intervals."),
    pointing: bool = typer.Option(
        True, "--pointing/--no-pointing",
        help="When the patients have opacity boxes, also play the pointing game with the heatmap "
        "(does its maximum lie in a box, against a random point).",
    ),
    device: str = _device_option(),
) -> None:
    """Evaluate a classifier: ROC per class (the paper's Figure 7), AUCs with 95 % intervals,
    accuracy and confusion matrix, operating points, opacity AUC by view, and the pointing
    game of the heatmap when the data has boxes.

    With --split all it scores every patient of any prepared cache (a dataset the model
    never saw). On the cache a k-fold run trained on, out-of-fold probabilities are used.
    """
    from lungopacity.engine.evaluate import evaluate_classifier

    metrics = evaluate_classifier(run, cache, split=split.value, out_dir=out, n_boot=n_boot, device=device,
                                  progress=_TqdmProgress(), pointing=pointing)
    typer.echo(
        f"{metrics['n']} patients: opacity AUC {metrics['opacity_auc']:.4f}, accuracy {metrics['accuracy']:.3f}; "
        f"report {out / 'report.md'}"
    )
    game = metrics.get("pointing")
    if game:
        typer.echo(
            f"pointing game, {game['n']} patients with boxes: heatmap maximum in a box {game['hit_rate']:.3f}, "
            f"random point {game['baseline']:.3f}"
        )


@app.command("train-detector")
@user_errors
def train_detector_command(
    cache: Path = typer.Argument(..., help="Prepared cache folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Detector run folder (or the one to --resume)."),
    arch: Arch = typer.Option(Arch.retinanet, "--arch", help="retinanet (one stage, the default) | fasterrcnn."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", help="Any timm model with features_only."),
    pretrained: str = typer.Option("none", "--pretrained", help=PRETRAINED_HELP),
    size: Optional[int] = typer.Option(
        None, "--size", min=32, help="Side the detector resizes its input to (default: the cache's size)."
    ),
    epochs: int = typer.Option(12, "--epochs", min=1, help="Training epochs (early stopping may end sooner)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per training step."),
    lr: float = typer.Option(3e-4, "--lr", min=0.0, help="Peak learning rate (AdamW, warm-up + cosine)."),
    fold: Optional[int] = typer.Option(
        None, "--fold", min=0,
        help="Validate on the cache's fold K (prepare --folds) and train on the others (default: its train/val split).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, shuffling and augmentation."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Box-aware scale/shift/rotation + intensity."),
    hflip: bool = typer.Option(False, "--hflip", help="Also flip horizontally (boxes move along; it lowered the metric on the shared images, BENCHMARKS.md)."),
    patience: int = typer.Option(5, "--patience", min=1, help="Early stopping: epochs without a better validation metric."),
    ema: float = _ema_option(),
    device: str = _device_option(),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes (0: in the main process)."),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps-per-epoch", min=1, help="Bound each epoch to this many steps (smoke runs, benchmarks)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out where it stopped."),
) -> None:
    """Train the opacity detector (RetinaNet over a timm backbone with an FPN) on all patients.

    Negatives train too (zero box loss). Checkpoints every epoch (atomic), best by the
    RSNA metric on the validation split; post-processing tuned on validation is stored
    in OUT/postprocess.json.
    """
    from lungopacity.engine.detector import DetectorTrainConfig, train_detector

    config = DetectorTrainConfig(
        arch=arch.value, backbone=backbone, pretrained=pretrained, size=size, epochs=epochs, batch_size=batch_size, lr=lr,
        fold=fold, seed=seed, augment=augment, hflip=hflip, patience=patience, ema=ema, device=device,
        num_workers=workers, max_steps_per_epoch=max_steps,
    )
    result = train_detector(cache, out, config, resume=resume, progress=_TqdmProgress())
    typer.echo(
        f"detector run {out}: best validation RSNA metric {result.best_val_map:.4f} (epoch {result.best_epoch}); "
        f"with post-processing ({result.postprocess.describe()}) {result.val_map_postprocessed:.4f}"
    )


@app.command("evaluate-detector")
@user_errors
def evaluate_detector_command(
    runs: list[Path] = typer.Argument(
        ..., help="Detector run folder; with --split oof, one train-detector --fold K run per fold."
    ),
    cache: Path = typer.Option(..., "--cache", help="Prepared cache to evaluate on."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder."),
    split: DetectorSplit = typer.Option(
        DetectorSplit.val, "--split",
        help="val: the cache's validation split | train | all: every patient | oof: every patient, each by "
             "the fold run that held it out.",
    ),
    classifier_probs: Optional[Path] = typer.Option(
        None, "--classifier-probs", help="CSV with patientId,p_lung_opacity (e.g. RUN/oof.csv) for gating."
    ),
    weights: Optional[Weights] = typer.Option(
        None, "--weights", help="Checkpoint: best (chosen on the validation patients) or last "
                                "(default: best; last with --split oof)."
    ),
    device: str = _device_option(),
) -> None:
    """Evaluate the detector: the RSNA metric, precision per IoU threshold, sensitivity at
    0.5/1/2 false positives per image, by view, overlays of the best and worst cases
    (the paper's Figure 10), with and without classifier gating; writes the submission and
    the main variant's post-processing (OUT/postprocess.json, for bundle --detector-postprocess).
    """
    from lungopacity.engine.evaluate_detection import evaluate_detector

    report = evaluate_detector(runs, cache, split=split.value, out_dir=out, classifier_probs=classifier_probs,
                               device=device, weights=weights.value if weights else None)
    main = report["variants"][report["main_variant"]]
    cross = main.get("cross_fitted_rsna_map")
    interval = main.get("cross_fitted_rsna_map_ci95")
    typer.echo(
        f"{report['n_patients']} patients: RSNA metric {main['metrics']['rsna_map']:.4f} ({report['main_variant']}"
        + (f", cross-fitted {cross:.4f}" if cross is not None else "")
        + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")
        + f"); report {out / 'report.md'}, submission {out / 'submission.csv'}, "
        + f"post-processing {out / 'postprocess.json'}"
    )


@app.command("score")
@user_errors
def score_command(
    labels_csv: Path = typer.Argument(..., help="Labels in the official stage_2_train_labels.csv format."),
    submission_csv: Path = typer.Argument(..., help="Submission: patientId,PredictionString."),
    class_info: Optional[Path] = typer.Option(None, "--class-info", help="stage_2_detailed_class_info.csv (optional)."),
) -> None:
    """Print the RSNA challenge metric of a submission (mean over IoU 0.40-0.75 of TP/(TP+FP+FN))."""
    from lungopacity.io.submission import score_submission

    result = score_submission(labels_csv, submission_csv, class_info)
    typer.echo(
        f"RSNA metric {result['rsna_map']:.4f} over {result['n_scored']} scored patients "
        f"({result['n_missing']} labelled patients without a row counted as no prediction)"
    )


@app.command("train-fusion")
@user_errors
def train_fusion_command(
    oof: Path = typer.Option(..., "--oof", help="Out-of-fold table of a k-fold classifier run (RUN/oof.csv)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the fusion network and its report."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="The prepared cache the classifier trained on."),
    data: Optional[Path] = typer.Option(None, "--data", help="Or: the RSNA folder (label CSVs + metadata.csv)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the network's initialisation and the cross-fitting splits."),
    n_bootstrap: int = typer.Option(2000, "--n-bootstrap", min=0, help="Bootstrap resamples for the AUC intervals."),
) -> None:
    """Train the paper's fusion network: sex, age, view + the 3 class probabilities -> P(opacity).

    Trained on out-of-fold probabilities only. Writes OUT/fusion.safetensors,
    OUT/fusion.json and OUT/report/ (metadata-only vs image-only vs fusion: AUCs with
    95 % intervals, paired tests, the three ROC curves).
    """
    from lungopacity.engine.fusion import train_fusion_run

    if (cache is None) == (data is None):
        raise typer.BadParameter("give exactly one of --cache or --data", param_hint="--cache/--data")
    metrics = train_fusion_run(oof, out, cache_dir=cache, data_dir=data, seed=seed, n_bootstrap=n_bootstrap)
    models = metrics.get("models", {})
    parts = [f"{name} AUC {m.get('auc', float('nan')):.4f}" for name, m in models.items() if isinstance(m, dict)]
    typer.echo(f"fusion network saved to {out}; held-out comparison: {', '.join(parts)}; report {out / 'report'}")


@app.command("bundle")
@user_errors
def bundle_command(
    classifier: list[Path] = typer.Option(
        ..., "--classifier",
        help="Classifier run folder (train-classifier --out); repeat it to put several runs of one architecture "
        "on the same cache and folds (e.g. seeds) into one ensemble.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write (replaced if present)."),
    fusion: Optional[Path] = typer.Option(None, "--fusion", help="Fusion folder (train-fusion --out)."),
    detector: Optional[list[Path]] = typer.Option(
        None, "--detector",
        help="Detector run folder (train-detector --out); repeat it for several members of one architecture "
        "(e.g. seeds), whose boxes are pooled and fused (needs --detector-postprocess with NMS or WBF).",
    ),
    cache: Optional[Path] = typer.Option(None, "--cache", help="The classifier's cache (default: as recorded in the run)."),
    sensitivity: Optional[float] = typer.Option(
        None, "--sensitivity", min=0.0, max=1.0,
        help="Choose the operating threshold for this sensitivity on held-out patients (default: Youden's J).",
    ),
    detector_postprocess: Optional[Path] = typer.Option(
        None, "--detector-postprocess",
        help="Box post-processing from an evaluate-detector report.json (e.g. tuned with gating) or a "
        "post-processing JSON (bench_detector_oof.py --write-postprocess: tuned out of fold on pooled members).",
    ),
    device: str = _device_option(),
) -> None:
    """Assemble one model bundle: weights (safetensors) and one JSON config with the model card.

    Keeps the fusion network only when its cross-fitted AUC is at least the image
    classifier's; calibrates the final P(opacity) on held-out predictions (reliability
    diagram OUT/calibration.png); chooses the operating threshold; records the training
    data's provenance; fits the applicability gate on the training images.
    """
    from lungopacity.engine.bundle import build_bundle
    from lungopacity.inference.bundle import read_manifest

    path = build_bundle(out, classifier, fusion_dir=fusion, detector_run=detector or None, cache_dir=cache,
                        target_sensitivity=sensitivity, detector_postprocess=detector_postprocess, device=device)
    manifest = read_manifest(path)
    card = manifest.model_card
    validation, calibration = card["validation"], card["calibration"]
    low, high = validation["final_auc_ci95"]
    typer.echo(f"bundle written to {path}: decision by {manifest.decision_source} ({card['decision']['reason']}); "
               f"held-out AUC {validation['final_auc']:.4f} [{low:.4f}, {high:.4f}]; ECE of P(opacity) "
               f"{calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f}")
    for warning in manifest.warnings():
        typer.echo(f"warning: {warning}")


@app.command("predict")
@user_errors
def predict_command(
    inputs: list[str] = typer.Argument(..., help="Files, folders or glob patterns of DICOM, PNG or JPEG images."),
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Model bundle folder."),
    out: Path = typer.Option(
        ..., "--out", "-o",
        help="Folder for predictions.csv/json, submission.csv, errors.csv, overlays. Running again into the same "
             "folder continues an interrupted run (finished files are skipped).",
    ),
    metadata_csv: Optional[Path] = typer.Option(
        None, "--metadata-csv", help="id,sex,age,view per image (RSNA's metadata.csv columns work too)."
    ),
    sex: Optional[Sex] = typer.Option(
        None, "--sex", help="M or F: fills the sex of every input whose header lacks it."
    ),
    age: Optional[str] = typer.Option(
        None, "--age", help="Age in years (0-120): fills the age of every input whose header lacks it."
    ),
    view: Optional[View] = typer.Option(
        None, "--view", help="AP or PA: fills the view of every input whose header lacks it."
    ),
    override: bool = typer.Option(
        False, "--override", help="Let --sex/--age/--view and the metadata CSV replace values the header has."
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per forward pass."),
    device: str = _device_option(),
    runtime: Runtime = typer.Option(
        Runtime.torch, "--runtime", help="torch | onnx (ONNX Runtime, after `lungopacity export-onnx`)."
    ),
    images: bool = typer.Option(True, "--images/--no-images", help="Write overlay and Grad-CAM PNGs."),
    coco: bool = typer.Option(False, "--coco", help="Also write the boxes as a COCO dataset (OUT/coco.json)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard the results already in --out and start afresh."),
    dicom_out: Optional[Path] = typer.Option(
        None, "--dicom-out",
        help="Also write DICOM results of each DICOM input into DIR/<id>/: SR (TID 1500), GSPS (boxes), "
             "Secondary Capture (overlay burned in), in the source's study. PNG/JPEG inputs get none.",
    ),
) -> None:
    """Read X-rays with a bundle: the final P(opacity), its source, decision, uncertainty and boxes.

    An image that fails the applicability check (not a frontal chest radiograph like the
    training images) gets no decision, with the reasons. Results are written as each batch
    finishes; a file that cannot be read goes to OUT/errors.csv with the reason and the
    batch goes on. docs/OUTPUTS.md defines every column.
    """
    from lungopacity.inference.batch import predict_to_folder
    from lungopacity.inference.predictor import Predictor

    predictor = Predictor.from_bundle(bundle, device=device, runtime=runtime.value)
    bar = _Progress("predict")
    try:
        result = predict_to_folder(predictor, inputs, out, metadata_csv=metadata_csv, sex=_value(sex), age=age,
                                   view=_value(view),
                                   override=override, batch_size=batch_size, with_images=images, coco=coco,
                                   overwrite=overwrite, progress=bar, dicom_out=dicom_out)
    finally:
        bar.close()
    for image_id, reasons in result.no_decision[:MAX_LISTED]:
        typer.echo(f"{image_id}: no decision: {'; '.join(reasons)}")
    if result.n_no_decision > MAX_LISTED:
        typer.echo(f"... and {result.n_no_decision - MAX_LISTED} more without a decision (see predictions.csv)")
    images_read = f"{result.n_predicted} image{'s' if result.n_predicted != 1 else ''} read"
    skipped = f" ({result.n_skipped} finished by an earlier run)" if result.n_skipped else ""
    typer.echo(
        f"{images_read}{skipped}: {result.n_positive} with opacity, {result.n_no_decision} without a decision, "
        f"{result.n_uncertain} uncertain; {result.n_errors} error{'s' if result.n_errors != 1 else ''}; "
        f"results in {out}/predictions.csv"
        + (f", errors in {out}/errors.csv" if result.n_errors else "")
    )
    for warning in result.model_warnings:
        typer.echo(f"warning: {warning}")
    if dicom_out is not None:
        notes = [f"{n} {what}" for n, what in ((result.n_not_dicom, "not DICOM"), (result.n_dicom_failed, "failed"))
                 if n]
        typer.echo(f"DICOM results (SR, GSPS, SC) for {result.n_dicom} image{'s' if result.n_dicom != 1 else ''} "
                   f"in {dicom_out}" + (f" ({', '.join(notes)}: see the log)" if notes else ""))


#: Images without a decision listed by `predict` (the rest are in predictions.csv).
MAX_LISTED = 20


@app.command("export-onnx")
@user_errors
def export_onnx_command(bundle: Path = typer.Argument(..., help="Model bundle folder.")) -> None:
    """Export the bundle's classifier and RetinaNet detector as ONNX into BUNDLE/onnx/.

    Then `lungopacity predict --runtime onnx` runs them with ONNX Runtime.
    """
    from lungopacity.inference.onnx import export_onnx

    written = export_onnx(bundle)
    for name, path in written.items():
        typer.echo(f"{name}: {path}")


@app.command("serve")
@user_errors
def serve_command(
    bundle: Path = typer.Option(..., "--bundle", "-b", envvar="LUNGOPACITY_BUNDLE", help="Model bundle folder."),
    host: str = typer.Option(
        "127.0.0.1", "--host", envvar="LUNGOPACITY_HOST",
        help="Address to listen on; 0.0.0.0 for every interface (then set a token and --allowed-host).",
    ),
    port: int = typer.Option(8000, "--port", envvar="LUNGOPACITY_PORT", min=1, max=65535, help="TCP port to listen on."),
    max_upload_mb: float = typer.Option(50.0, "--max-upload-mb", envvar="LUNGOPACITY_MAX_UPLOAD_MB", min=0.001, help="Largest accepted upload."),
    concurrency: int = typer.Option(2, "--concurrency", envvar="LUNGOPACITY_CONCURRENCY", min=1, help="Inferences run at once."),
    queue: int = typer.Option(
        8, "--queue", envvar="LUNGOPACITY_QUEUE", min=0, help="Received uploads that may wait for an inference; more get 503.",
    ),
    max_uploads: int = typer.Option(
        32, "--max-uploads", envvar="LUNGOPACITY_MAX_UPLOADS", min=1, help="Uploads being received at once; more get 503.",
    ),
    upload_timeout: float = typer.Option(
        120.0, "--upload-timeout", envvar="LUNGOPACITY_UPLOAD_TIMEOUT", min=0.1,
        help="Seconds an upload may take in all; slower ones get 408.",
    ),
    stall_timeout: float = typer.Option(
        10.0, "--stall-timeout", envvar="LUNGOPACITY_STALL_TIMEOUT", min=0.1,
        help="An upload that sends less than 1 KB in this many seconds gets 408.",
    ),
    header_timeout: float = typer.Option(
        10.0, "--header-timeout", envvar="LUNGOPACITY_HEADER_TIMEOUT", min=0.1,
        help="Seconds a request's headers may take; slower connections get 408 and are closed.",
    ),
    keep_alive_timeout: int = typer.Option(
        5, "--keep-alive-timeout", envvar="LUNGOPACITY_KEEP_ALIVE_TIMEOUT", min=1,
        help="Seconds an idle kept-alive connection stays open.",
    ),
    token: Optional[str] = typer.Option(
        None, "--token", envvar="LUNGOPACITY_TOKEN", show_default=False,
        help="Require 'Authorization: Bearer TOKEN' on every API call (the page asks for it). "
        "Prefer the environment variable: a command line is visible to other users.",
    ),
    allowed_hosts: list[str] = typer.Option(
        [], "--allowed-host", envvar="LUNGOPACITY_ALLOWED_HOSTS", show_default=False,
        help="A host name or address clients use to reach the server, besides localhost names and loopback "
        "addresses (repeatable; '*.example.org' for a domain, '*' for any). Other Host headers get 421. "
        "The environment variable takes several, separated by spaces or commas.",
    ),
) -> None:
    """Serve the web page and HTTP API for reading one chest X-ray at a time."""
    from lungopacity.inference.bundle import read_manifest
    from lungopacity.service.app import serve
    from lungopacity.service.security import is_loopback_host

    read_manifest(bundle)  # a missing or damaged bundle stops here, as one line, before the server starts
    hosts = [name for entry in allowed_hosts for name in entry.replace(",", " ").split()]
    if not token and not is_loopback_host(host):
        typer.echo(
            f"warning: serving on {host} without a token: anyone who can reach port {port} can use the API; "
            "set LUNGOPACITY_TOKEN (or --token).",
            err=True,
        )
    if not is_loopback_host(host) and not hosts:
        typer.echo(
            "note: only requests for localhost names and loopback addresses are answered (421 otherwise); "
            "add the name clients use with --allowed-host.",
            err=True,
        )
    typer.echo(f"serving {bundle} at http://{host}:{port}/ (API: POST /v1/predict, docs: /docs, metrics: /metrics)")
    serve(bundle, host=host, port=port, max_upload_bytes=int(max_upload_mb * 2**20),
          max_concurrent=concurrency, max_queue=queue, max_uploads=max_uploads,
          upload_timeout=upload_timeout, stall_timeout=stall_timeout, header_timeout=header_timeout,
          keep_alive_timeout=keep_alive_timeout, token=token or None, allowed_hosts=hosts)


@app.command("listen")
@user_errors
def listen_command(
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Model bundle folder."),
    ae_title: str = typer.Option("LUNGOPACITY", "--ae-title", help="The node's AE title (what the PACS calls it)."),
    port: int = typer.Option(11112, "--port", min=0, max=65535, help="DICOM port to listen on (0: a free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 for every interface."),
    send_to: str = typer.Option(..., "--send-to", help="HOST:PORT:AET that receives the results by C-STORE."),
    stow: Optional[str] = typer.Option(None, "--stow", help="DICOMweb root URL; results also go by STOW-RS."),
    spool: Path = typer.Option(Path("lungopacity-spool"), "--spool",
                               help="Folder that holds received instances and results until they are sent."),
    workers: int = typer.Option(1, "--workers", min=1, help="Threads reading instances."),
    queue: int = typer.Option(32, "--queue", min=1,
                              help="Instances waiting to be read; one more is refused as out of resources."),
    allowed_ae: Optional[list[str]] = typer.Option(
        None, "--allowed-ae", help="Calling AE title allowed to send (repeat the option; default: any)."),
    device: str = _device_option(),
) -> None:
    """Run a DICOM node: receive radiographs by C-STORE, read them, send SR + GSPS + SC back.

    Accepts CR, DX and Secondary Capture images; keeps every received instance in the
    spool until its results are delivered, so a restart loses and repeats nothing.
    Stops on SIGTERM or Ctrl-C.
    """
    import signal

    from lungopacity.inference.predictor import Predictor
    from lungopacity.node import DicomNode, NodeConfig, parse_destination

    config = NodeConfig(ae_title=ae_title, port=port, host=host, destination=parse_destination(send_to),
                        stow_url=stow, spool=spool, workers=workers, queue_size=queue,
                        allowed_ae=tuple(allowed_ae or ()))
    node = DicomNode(Predictor.from_bundle(bundle, device=device), config)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: node.request_stop())
    node.start()
    typer.echo(f"listening as {config.ae_title} on {host}:{node.port}; results to {config.destination}"
               + (f" and {stow}" if stow else "") + f"; spool {spool}")
    try:
        node.wait()
    finally:
        node.stop()
        counts = node.counts()
        typer.echo(f"stopped; the spool holds {counts.get('received', 0)} to read and "
                   f"{counts.get('processed', 0)} to send (a restart with the same --spool continues)")


@app.command("demo")
@user_errors
def demo_command(
    out: Path = typer.Option(Path("demo-run"), "--out", "-o", help="Folder for everything the demo writes."),
    n: int = typer.Option(300, "--n", min=30, help="Synthetic patients."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data and of every training step: the same seed, the same run."),
) -> None:
    """Run the whole chain on the built-in synthetic dataset (what `make demo` runs).

    demo data -> prepare -> classifier (k-fold) -> evaluation -> fusion -> detector ->
    evaluation -> bundle -> predict. About ten minutes on a 2-core CPU.
    """
    from lungopacity.demo import DemoSettings, run_demo

    result = run_demo(
        out, DemoSettings(n_patients=n, seed=seed), progress_factory=_TqdmProgress,
        on_step=lambda text: typer.echo(f"== {text}"),
    )
    p, f = result.paths, result.figures
    typer.echo("")
    typer.echo(f"demo finished in {sum(result.seconds.values()):.0f} s; everything is under {out}/")
    typer.echo(f"  data (RSNA format)      {p['data']}   [{f.get('data', '')}]")
    typer.echo(f"  classifier report       {p['classifier_report']}/report.md   {f.get('classifier_report', '')}")
    typer.echo(f"  fusion comparison       {p['fusion']}/report/fusion_report.md   {f.get('fusion', '')}")
    typer.echo(f"  detector report         {p['detector_report']}/")
    typer.echo(f"  model bundle            {p['model']}")
    typer.echo(f"  predictions, overlays   {p['predictions']}/predictions.csv, {p['predictions']}/overlays/")
    typer.echo(f"  serve it                .venv/bin/lungopacity serve --bundle {p['model']}")


if __name__ == "__main__":  # pragma: no cover
    app()
