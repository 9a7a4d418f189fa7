"""The ``lungopacity`` command line: a thin Typer layer over the library.

Every command parses options, calls one library function, and prints what it did
and where the results are. Errors the user can fix (bad files, bad tables) are printed
as one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer

app = typer.Typer(
    name="lungopacity",
    help=(
        "Lung opacity (pneumonia) identification on chest X-rays.\n\n"
        "Typical order: demo-data (or the RSNA download) -> prepare -> train-classifier -> "
        "train-fusion -> train-detector -> bundle -> predict / serve."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def user_errors(func: F) -> F:
    """Turn the library's input errors into one line on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from lungopacity.io.errors import DataFormatError, ImageReadError

        try:
            return func(*args, **kwargs)
        except (DataFormatError, ImageReadError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None

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


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    """Lung opacity identification on chest radiographs (RSNA Pneumonia Detection Challenge format)."""
    _setup_logging(verbose)


@app.command("demo-data")
@user_errors
def demo_data(
    out: Path = typer.Argument(..., help="Folder to write the RSNA-format dataset into."),
    n: int = typer.Option(200, "--n", min=1, help="Number of patients."),
    size: int = typer.Option(1024, "--size", min=64, help="Image side length in pixels (RSNA: 1024)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same bytes."),
) -> None:
    """Write a synthetic RSNA-format dataset of phantom chest radiographs.

    The folder has the official layout: stage_2_train_labels.csv,
    stage_2_detailed_class_info.csv and DICOMs (JPEG Baseline, CR) in
    stage_2_train_images/. Lung Opacity patients carry 1-4 soft opacities whose boxes are
    the labels; the class, sex, age and view mix follows RSNA.
    """
    from lungopacity.synthetic import write_demo_dataset

    summary = write_demo_dataset(out, n=n, size=size, seed=seed)
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
            metadata_csv=metadata_csv, progress=bar,
        )
    finally:
        bar.close()
    typer.echo(
        f"prepared {result.n_total} images at {size} px in {out} "
        f"({result.n_prepared} now, {result.n_skipped} already done, {result.n_failed} failed"
        + (f": see {out / 'errors.csv'}" if result.n_failed else "")
        + f") in {result.seconds:.1f} s"
    )


if __name__ == "__main__":  # pragma: no cover
    app()
