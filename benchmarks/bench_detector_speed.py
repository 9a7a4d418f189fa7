"""CPU training and inference speed of the default opacity detector.

Trains the default detector (RetinaNet over efficientnet_lite0 with the offline
ImageNet weights, FPN 128 channels) on random 256-px images, batch 4, each with one
RSNA-shaped box (one in four without), and reports images per second for training
steps (forward + backward + AdamW) and for eval-mode detection.

    python benchmarks/bench_detector_speed.py [--seconds 10] [--threads N] [--arch retinanet]

Run time is about ``2 * seconds`` plus model building.
"""

from __future__ import annotations

import argparse
import time

import torch

from lungopacity.models.detector import create_detector


def make_batch(batch_size: int, image_size: int, generator: torch.Generator):
    """Random images and targets; every fourth image is a negative (no boxes)."""
    images = [torch.rand(1, image_size, image_size, generator=generator) for _ in range(batch_size)]
    targets = []
    scale = image_size / 1024
    for index in range(batch_size):
        if index % 4 == 3:
            targets.append({"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)})
            continue
        x1, y1 = 200 * scale, 250 * scale
        box = torch.tensor([[x1, y1, x1 + 217 * scale, y1 + 298 * scale]])  # RSNA median box
        targets.append({"boxes": box, "labels": torch.ones(1, dtype=torch.int64)})
    return images, targets


def timed_loop(step, seconds: float) -> tuple[int, float, float]:
    """Run ``step`` after one warm-up call until ``seconds`` have passed.

    Returns (steps, wall seconds, process CPU seconds): on a shared machine the CPU
    time says what the work costs, the wall time what this run got.
    """
    step()
    steps, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while steps == 0 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps, time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="retinanet", choices=("retinanet", "fasterrcnn"))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per phase")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    detector = create_detector(arch=args.arch, pretrained="efficientnet-lite0", image_size=args.image_size)
    parameters = sum(p.numel() for p in detector.parameters())
    optimizer = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad], lr=1e-4)
    images, targets = make_batch(args.batch_size, args.image_size, torch.Generator().manual_seed(0))

    def train_step() -> None:
        losses = detector(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    detector.train()
    train_steps, train_elapsed, train_cpu = timed_loop(train_step, args.seconds)

    def eval_step() -> None:
        with torch.no_grad():
            detector(images)

    detector.eval()
    eval_steps, eval_elapsed, eval_cpu = timed_loop(eval_step, args.seconds)

    print(
        f"{args.arch} / efficientnet_lite0, {parameters / 1e6:.2f} M parameters, "
        f"{args.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} thread(s)"
    )
    print(
        f"train: {train_steps * args.batch_size / train_elapsed:.2f} images/s "
        f"({train_elapsed / train_steps:.2f} s/step, {train_steps} steps; "
        f"{train_steps * args.batch_size / train_cpu:.2f} images per CPU-second)"
    )
    print(
        f"eval:  {eval_steps * args.batch_size / eval_elapsed:.2f} images/s "
        f"({eval_elapsed / eval_steps:.2f} s/batch, {eval_steps} batches; "
        f"{eval_steps * args.batch_size / eval_cpu:.2f} images per CPU-second)"
    )


if __name__ == "__main__":
    main()
