"""Benchmark: `prepare` against a naive loop, side by side in one run.

The naive loop is what one writes first: for each DICOM, ``pydicom.dcmread(...).pixel_array``
at full resolution, scale to [0, 1], PIL resize to the output size, in one process.
``prepare`` uses worker processes and decodes JPEG Baseline at a reduced scale (JPEG's
DCT scaling) when the output is at most half the original size.

    .venv/bin/python benchmarks/bench_prepare.py --n 200 --image-size 1024 --size 256

Prints images/s of both and the ratio, plus the largest pixel difference between the two
outputs (the reduced decode is a box-filtered downscale, so the images agree closely).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def naive_loop(files: list[Path], size: int) -> np.ndarray:
    import pydicom
    from PIL import Image

    out = np.empty((len(files), size, size), dtype=np.uint8)
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float32) / float(2 ** int(ds.BitsStored) - 1)
        img = Image.fromarray(pixels, mode="F").resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.clip(np.rint(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="demo DICOMs")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the demo DICOMs")
    parser.add_argument("--size", type=int, default=256, help="prepared side length")
    parser.add_argument("--workers", type=int, default=None, help="prepare's worker processes (default: all cores)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    from lungopacity.data.cache import PreparedCache, prepare_cache
    from lungopacity.synthetic import write_demo_dataset

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    data = work / "data"
    if not (data / "stage_2_train_labels.csv").exists():
        write_demo_dataset(data, n=args.n, size=args.image_size, seed=0)
    files = sorted((data / "stage_2_train_images").glob("*.dcm"))
    # Warm the page cache so both contestants read from memory.
    for path in files:
        path.read_bytes()

    start = time.perf_counter()
    naive = naive_loop(files, args.size)
    naive_seconds = time.perf_counter() - start

    cache_dir = work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    start = time.perf_counter()
    prepare_cache(data, cache_dir, size=args.size, workers=args.workers)
    prepare_seconds = time.perf_counter() - start

    cache = PreparedCache(cache_dir)
    order = {Path(p).stem: i for i, p in enumerate(files)}
    prepared = np.stack([cache.image(i) for i in range(len(cache))])
    naive_in_cache_order = naive[[order[pid] for pid in cache.table["patientId"]]]
    diff = np.abs(prepared.astype(int) - naive_in_cache_order.astype(int))

    n = len(files)
    print(f"machine: {os.cpu_count()} cores; {n} DICOMs {args.image_size} px -> {args.size} px")
    print("| method | seconds | images/s |")
    print("|---|---|---|")
    print(f"| naive loop (pydicom + PIL, 1 process) | {naive_seconds:.2f} | {n / naive_seconds:.1f} |")
    print(f"| lungopacity prepare (workers={args.workers or os.cpu_count()}) | {prepare_seconds:.2f} | {n / prepare_seconds:.1f} |")
    print(f"ratio prepare / naive: {naive_seconds / prepare_seconds:.2f}x")
    print(f"pixel difference prepare vs naive: max {diff.max()}, mean {diff.mean():.3f} (of 255)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
