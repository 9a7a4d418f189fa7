"""The prepared-image cache: every image decoded and resized once, kept as uint8.

A cache folder holds

* ``images.npy`` — uint8 ``(N, S, S)``, a NumPy ``.npy`` file opened as a memory map;
* ``status.npy`` — uint8 ``(N,)``: 0 pending, 1 done, 2 failed (what makes it resumable);
* ``index.csv`` — the patient table (see docs/ARCHITECTURE.md) plus ``row``, ``orig_h``,
  ``orig_w``, ``split``, ``fold``, with boxes as JSON lists of xyxy in original pixels;
* ``errors.csv`` — ``patientId,path,error`` for files that failed to decode;
* ``meta.json`` — size, count, source folder, split settings, the window policy, state.

Images are resized to ``S x S`` whatever their aspect ratio (RSNA images are square);
``orig_h``/``orig_w`` map boxes between prepared and original pixels.

Work is done in chunks by worker processes that write straight into the memory map;
the parent marks a chunk done in ``status.npy`` only after the worker has flushed it,
so a run killed at any point resumes by redoing at most the chunks in flight.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungopacity import __version__
from lungopacity.data.preprocess import WINDOW_POLICIES, decode_prepared
from lungopacity.errors import ConfigError
from lungopacity.io.errors import DataFormatError, ImageReadError
from lungopacity.io.rsna import load_rsna, make_splits

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
IMAGES_FILE, STATUS_FILE, INDEX_FILE, META_FILE, ERRORS_FILE = (
    "images.npy",
    "status.npy",
    "index.csv",
    "meta.json",
    "errors.csv",
)


def prepare_one(path: str | Path, size: int, window: str = "none") -> np.ndarray:
    """Decode one image file and resize it as the cache does (uint8 ``size x size``)."""
    return decode_prepared(path, size, window=window)[0]


# ----------------------------------------------------------------- worker processes

_worker_images: np.ndarray | None = None


def _worker_init(images_path: str) -> None:
    global _worker_images
    _worker_images = np.load(images_path, mmap_mode="r+")


def _worker_chunk(
    rows: Sequence[int], paths: Sequence[str], size: int, window: str = "none"
) -> list[tuple[int, str | None]]:
    """Prepare a chunk into the shared memory map; return (row, error or None) per image."""
    assert _worker_images is not None
    results: list[tuple[int, str | None]] = []
    for row, path in zip(rows, paths):
        try:
            _worker_images[row] = prepare_one(path, size, window)
            results.append((row, None))
        except ImageReadError as exc:
            results.append((row, exc.cause))
        except Exception as exc:  # a bad file must not stop the batch; it is reported
            results.append((row, f"{type(exc).__name__}: {exc}"))
    _worker_images.flush()
    return results


# -------------------------------------------------------------------- the cache


def _boxes_to_json(boxes: np.ndarray) -> str:
    return json.dumps([[round(float(v), 3) for v in box] for box in np.asarray(boxes).reshape(-1, 4)])


def _boxes_from_json(text: str) -> np.ndarray:
    return np.asarray(json.loads(text) if text else [], dtype=np.float32).reshape(-1, 4)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class PrepareResult:
    """What one ``prepare`` run did."""

    cache_dir: Path
    n_total: int
    n_prepared: int
    n_skipped: int
    n_failed: int
    seconds: float


class PreparedCache:
    """Read access to a prepared cache folder.

    Attributes:
        path: the folder.
        size: side length S of the prepared images.
        table: the index (patient table + ``row, orig_h, orig_w, split, fold, status``),
            with ``boxes`` as float32 (N, 4) xyxy in original pixels.
        images: uint8 ``(N, S, S)`` memory map.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            raise DataFormatError(self.path, "not a prepared cache (meta.json missing); run `lungopacity prepare` first")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.size = int(self.meta["size"])
        # Caches from before the window policy were read without one.
        self.window = str(self.meta.get("window", "none"))
        table = pd.read_csv(self.path / INDEX_FILE, dtype={"patientId": str, "sex": object, "view": object})
        table["boxes"] = [_boxes_from_json(t) for t in table["boxes"].fillna("")]
        for column in ("sex", "view"):
            table[column] = table[column].astype(object).where(table[column].notna(), None)
        status = np.load(self.path / STATUS_FILE)
        table["status"] = np.where(status[table["row"]] == DONE, "ok", np.where(status[table["row"]] == FAILED, "failed", "pending"))
        self.table = table
        self.images: np.ndarray = np.load(self.path / IMAGES_FILE, mmap_mode="r")

    @property
    def complete(self) -> bool:
        """True when every image is either prepared or reported as failed."""
        return bool((self.table["status"] != "pending").all())

    def __len__(self) -> int:
        return len(self.table)

    def indices(self, split: str | None = None, folds: Sequence[int] | None = None, exclude_folds: Sequence[int] | None = None) -> np.ndarray:
        """Row positions of usable (prepared) patients, optionally of one split or some folds."""
        mask = (self.table["status"] == "ok").to_numpy().copy()
        if split not in (None, "all"):
            if split not in ("train", "val"):
                raise ConfigError(f"split must be 'train', 'val' or 'all', got {split!r}")
            mask &= (self.table["split"] == split).to_numpy()
        if folds is not None:
            mask &= self.table["fold"].isin(list(folds)).to_numpy()
        if exclude_folds is not None:
            mask &= ~self.table["fold"].isin(list(exclude_folds)).to_numpy()
        return np.flatnonzero(mask)

    def image(self, i: int) -> np.ndarray:
        """uint8 ``S x S`` image of table position ``i``."""
        return np.asarray(self.images[int(self.table["row"].iat[i])])

    def scale(self, i: int) -> tuple[float, float]:
        """(sx, sy): prepared pixels per original pixel for table position ``i``."""
        return self.size / float(self.table["orig_w"].iat[i]), self.size / float(self.table["orig_h"].iat[i])

    def boxes_prepared(self, i: int) -> np.ndarray:
        """Boxes of table position ``i`` in prepared pixels (xyxy)."""
        sx, sy = self.scale(i)
        return self.table["boxes"].iat[i] * np.array([sx, sy, sx, sy], dtype=np.float32)

    def boxes_to_original(self, boxes: np.ndarray, i: int) -> np.ndarray:
        """Boxes (xyxy) in prepared pixels of position ``i`` -> original pixels."""
        sx, sy = self.scale(i)
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / np.array([sx, sy, sx, sy], dtype=np.float32)


def _index_frame(table: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    index = table.drop(columns=["boxes"]).copy()
    index["boxes"] = [_boxes_to_json(b) for b in table["boxes"]]
    index["row"] = np.arange(len(index))
    merged = index.merge(splits, on="patientId", how="left", validate="one_to_one")
    return merged


def prepare_cache(
    data_dir: str | Path,
    out: str | Path,
    *,
    size: int = 256,
    workers: int | None = None,
    val_fraction: float = 0.2,
    folds: int = 5,
    seed: int = 0,
    metadata_csv: str | Path | None = None,
    window: str = "auto",
    chunk_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareResult:
    """Decode and resize every image of an RSNA folder once into a cache folder.

    A second run on the same folder with the same settings skips finished work; a
    run that was interrupted continues where it stopped. A file that fails to decode
    is written to ``errors.csv`` and skipped.

    Args:
        data_dir: an RSNA-format folder (see :func:`lungopacity.io.rsna.load_rsna`).
        out: the cache folder.
        size: side length of the prepared images.
        workers: worker processes (default: CPU count); 1 works in this process.
        val_fraction, folds, seed: the patient-level split stored in the index.
        metadata_csv: metadata table for non-DICOM images (default ``data_dir/metadata.csv``).
        window: the readers' window policy (:data:`lungopacity.data.preprocess.WINDOW_POLICIES`):
            ``auto`` (default) applies a DICOM's VOI LUT, or its window when BitsStored > 8,
            as a radiologist's viewer shows it; recorded in ``meta.json``, carried by the
            runs and the bundle, so ``predict`` and the service read images the same way.
        chunk_size: images per task handed to a worker.
        progress: called as ``progress(done, total)`` after each chunk.

    Raises:
        DataFormatError: bad tables, or ``out`` holds a cache made with other settings.
    """
    if window not in WINDOW_POLICIES:
        raise ConfigError("--window", f"must be one of {', '.join(WINDOW_POLICIES)}, got {window!r}")
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = load_rsna(data_dir, metadata_csv=metadata_csv)
    splits = make_splits(table, val_fraction=val_fraction, k=folds, seed=seed)
    index = _index_frame(table, splits)
    settings = {
        "size": int(size),
        "n": int(len(index)),
        "val_fraction": float(val_fraction),
        "folds": int(folds),
        "seed": int(seed),
        "patients_hash": _hash_ids(index["patientId"]),
        "window": window,
    }
    meta_path, images_path, status_path = out / META_FILE, out / IMAGES_FILE, out / STATUS_FILE
    resuming = meta_path.exists() and images_path.exists() and status_path.exists()
    if resuming:
        old = json.loads(meta_path.read_text())
        differing = [k for k, v in settings.items() if old.get(k, "none" if k == "window" else None) != v]
        if differing:
            raise DataFormatError(
                out,
                f"holds a cache prepared with other settings ({', '.join(differing)} differ); "
                "choose another --out or delete it",
            )
        images = np.load(images_path, mmap_mode="r+")
        status = np.load(status_path, mmap_mode="r+")
    else:
        images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(len(index), size, size))
        status = np.lib.format.open_memmap(status_path, mode="w+", dtype=np.uint8, shape=(len(index),))
        images.flush()
        status.flush()
    meta = {
        **settings,
        "format_version": CACHE_FORMAT_VERSION,
        "lungopacity_version": __version__,
        "source": str(Path(data_dir).resolve()),
        "state": "in-progress",
    }
    _atomic_write_text(meta_path, json.dumps(meta, indent=2))
    index.to_csv(out / (INDEX_FILE + ".tmp"), index=False)
    os.replace(out / (INDEX_FILE + ".tmp"), out / INDEX_FILE)

    pending = np.flatnonzero(np.asarray(status) == PENDING)
    n_skipped = len(index) - len(pending)
    if n_skipped:
        log.info("%s: resuming; %d of %d images already prepared or reported", out, n_skipped, len(index))
    paths = index["path"].to_numpy()
    ids = index["patientId"].to_numpy()
    errors_path = out / ERRORS_FILE
    new_errors = not errors_path.exists()
    n_failed = 0
    done_count = n_skipped

    def record(results: list[tuple[int, str | None]], errors_writer: Any) -> None:
        nonlocal n_failed, done_count
        for row, error in results:
            if error is None:
                status[row] = DONE
            else:
                status[row] = FAILED
                n_failed += 1
                errors_writer.writerow([ids[row], paths[row], error])
                log.warning("%s: %s (skipped)", paths[row], error)
        status.flush()
        done_count += len(results)
        if progress:
            progress(done_count, len(index))

    chunks = [pending[i : i + chunk_size] for i in range(0, len(pending), chunk_size)]
    workers = workers or os.cpu_count() or 1
    with open(errors_path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new_errors:
            writer.writerow(["patientId", "path", "error"])
        if progress:
            progress(done_count, len(index))
        if workers <= 1 or len(chunks) <= 1:
            _worker_init(str(images_path))
            for chunk in chunks:
                record(_worker_chunk(chunk.tolist(), paths[chunk].tolist(), size, window), writer)
                handle.flush()
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(str(images_path),)) as pool:
                # Keep a bounded number of chunks in flight so progress and resumption stay fine-grained.
                queue = iter(chunks)
                in_flight = set()
                for chunk in queue:
                    in_flight.add(pool.submit(_worker_chunk, chunk.tolist(), paths[chunk].tolist(), size, window))
                    if len(in_flight) >= 2 * workers:
                        finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                        for future in finished:
                            record(future.result(), writer)
                        handle.flush()
                for future in in_flight:
                    record(future.result(), writer)
                handle.flush()
    images.flush()
    meta["state"] = "complete"
    meta["n_failed"] = int((np.asarray(status) == FAILED).sum())
    _atomic_write_text(meta_path, json.dumps(meta, indent=2))
    seconds = time.perf_counter() - start
    result = PrepareResult(out, len(index), len(pending) - n_failed, n_skipped, n_failed, seconds)
    log.info(
        "%s: %d images (%d prepared now, %d already done, %d failed) in %.1f s",
        out, result.n_total, result.n_prepared, result.n_skipped, result.n_failed, seconds,
    )
    return result


def _hash_ids(ids: pd.Series) -> str:
    import hashlib

    return hashlib.sha1("\n".join(ids.astype(str)).encode()).hexdigest()[:16]
