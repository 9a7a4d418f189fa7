"""Benchmark: `predict` latency and throughput against the bare model forward pass.

For each runtime (PyTorch, ONNX Runtime) and batch size (1, 16), side by side in one run:

* **bare forward** — the networks alone on ready tensors: the classifier ensemble and the
  detector (for ONNX: the ONNX sessions plus the detector's NumPy decoding);
* **predict (decoded)** — ``Predictor.predict_images`` on images already read: resizing,
  calibration, fusion, detection, post-processing, result objects;
* **predict (files)** — ``Predictor.predict_paths``: the above plus reading the DICOMs.

The overhead of everything around the networks is predict (decoded) / bare - 1.

    .venv/bin/python benchmarks/bench_predict.py --bundle demo-run/model \
        --images 'demo-run/data/stage_2_train_images/*.dcm' --n 32
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("demo-run/model"))
    parser.add_argument("--images", default="demo-run/data/stage_2_train_images/*.dcm")
    parser.add_argument("--n", type=int, default=32, help="images per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lungopacity.inference.onnx import export_onnx
    from lungopacity.inference.predictor import Predictor

    files = sorted(Path(p) for p in glob.glob(args.images))[: args.n]
    if not files:
        raise SystemExit(f"no images match {args.images}")
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    bundle = work / "model"
    shutil.copytree(args.bundle, bundle)
    export_onnx(bundle)

    rows = []
    for runtime in ("torch", "onnx"):
        predictor = Predictor.from_bundle(bundle, runtime=runtime)
        images = [predictor.load(f, name=str(f)) for f in files]
        for batch in (1, 16):
            chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
            x_cls = [predictor.classifier_input(c) for c in chunks]
            has_detector = bool(predictor.detectors) or (predictor.onnx is not None and predictor.onnx.has_detector)
            x_det = [predictor.detector_input(c) for c in chunks] if has_detector else []

            def bare() -> None:
                with torch.no_grad():
                    for i, x in enumerate(x_cls):
                        predictor.classify(x)
                        if has_detector:
                            predictor.detect(x_det[i])

            def decoded() -> None:
                for chunk in chunks:
                    predictor.predict_images(chunk)

            def from_files() -> None:
                predictor.predict_paths(files, batch_size=batch)

            t_bare = timed(bare, args.repeats) / len(files)
            t_decoded = timed(decoded, args.repeats) / len(files)
            t_files = timed(from_files, args.repeats) / len(files)
            rows.append((runtime, batch, t_bare, t_decoded, t_files))

    print(f"machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; {len(files)} images; bundle {args.bundle}")
    print("| runtime | batch | bare forward ms/img | predict (decoded) ms/img | overhead | predict (files) ms/img | images/s (files) |")
    print("|---|---|---|---|---|---|---|")
    for runtime, batch, t_bare, t_decoded, t_files in rows:
        print(
            f"| {runtime} | {batch} | {t_bare * 1e3:.1f} | {t_decoded * 1e3:.1f} | {100 * (t_decoded / t_bare - 1):+.1f} % "
            f"| {t_files * 1e3:.1f} | {1 / t_files:.1f} |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
