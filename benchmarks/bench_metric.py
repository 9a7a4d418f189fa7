"""Time the vectorised RSNA metric against a per-image loop on an RSNA-sized dataset.

Run: ``.venv/bin/python benchmarks/bench_metric.py [--images 26684] [--seed 0] [--repeats 3]``

The synthetic set looks like RSNA's training set: about 70 % of the images have no
ground truth, the others 1-4 boxes; every image gets 0-5 predictions, some jittered copies
of ground truth (hits at varying IoU), some random boxes. The loop reference is
:func:`lungopacity.metrics.image_precision` called image by image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lungopacity.metrics import image_precision, rsna_map


def random_boxes(rng: np.random.Generator, n: int, image_size: float = 1024.0) -> np.ndarray:
    """``n`` xyxy boxes of 80-400 px sides inside the image."""
    sizes = rng.uniform(80.0, 400.0, size=(n, 2))
    corners = rng.uniform(0.0, 1.0, size=(n, 2)) * (image_size - sizes)
    return np.concatenate([corners, corners + sizes], axis=1)


def synthetic_dataset(
    n_images: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """RSNA-like ground truth, predictions and confidences (xyxy boxes)."""
    rng = np.random.default_rng(seed)
    gt, preds, scores = [], [], []
    for _ in range(n_images):
        n_gt = 0 if rng.random() < 0.7 else int(rng.choice([1, 2, 3, 4], p=[0.45, 0.45, 0.07, 0.03]))
        truth = random_boxes(rng, n_gt)
        n_pred = int(rng.integers(0, 6))
        n_copies = min(n_gt, n_pred)
        jitter = rng.normal(0.0, 25.0, size=(n_copies, 4))
        copies = truth[:n_copies] + jitter
        copies[:, 2:] = np.maximum(copies[:, 2:], copies[:, :2] + 1.0)
        predicted = np.concatenate([copies, random_boxes(rng, n_pred - n_copies)], axis=0)
        gt.append(truth)
        preds.append(predicted[rng.permutation(n_pred)])
        scores.append(rng.random(n_pred))
    return gt, preds, scores


def loop_reference(gt, preds, scores) -> float:
    """Dataset score from the per-image implementation, one image at a time."""
    values = [image_precision(g, p, s) for g, p, s in zip(gt, preds, scores)]
    counted = [v for v in values if v is not None]
    return float(np.mean(counted))


def best_time(function, repeats: int) -> tuple[float, float]:
    """Smallest wall time over ``repeats`` calls, and the last result."""
    best = float("inf")
    result = float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=26684)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    gt, preds, scores = synthetic_dataset(args.images, args.seed)
    n_with_gt = sum(1 for g in gt if len(g))
    n_preds = sum(len(p) for p in preds)
    print(
        f"{args.images} images ({n_with_gt} with ground truth, "
        f"{sum(len(g) for g in gt)} GT boxes, {n_preds} predictions), seed {args.seed}"
    )
    vector_time, vector_score = best_time(lambda: rsna_map(gt, preds, scores), args.repeats)
    loop_time, loop_score = best_time(lambda: loop_reference(gt, preds, scores), args.repeats)
    print(f"vectorised rsna_map : {vector_time:8.3f} s  {args.images / vector_time:12,.0f} images/s  score {vector_score:.12f}")
    print(f"loop image_precision: {loop_time:8.3f} s  {args.images / loop_time:12,.0f} images/s  score {loop_score:.12f}")
    print(f"speed-up: {loop_time / vector_time:.1f}x   |difference| = {abs(vector_score - loop_score):.2e}")


if __name__ == "__main__":
    main()
