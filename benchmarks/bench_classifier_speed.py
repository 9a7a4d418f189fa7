"""CPU training speed of the image classifier (forward + backward + AdamW step).

Measures images per second for random one-channel batches, by default for the two
configurations the project uses on CPU: legacy_xception at 128 px and efficientnet_lite0
at 256 px, batch 16, two threads. Each configuration runs one untimed warm-up step (oneDNN
builds its kernels on first use) and then as many steps as fit in ``--seconds``.

    python benchmarks/bench_classifier_speed.py [--seconds 10] [--threads 2] [--batch 16]

Run time is about ``(number of configurations) * (seconds + one step + model building)``.
The numbers are only comparable on an otherwise idle machine: the 1-minute load average
is printed with them.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from lungopacity.models.classifier import create_classifier

DEFAULT_CONFIGURATIONS: tuple[tuple[str, int], ...] = (("legacy_xception", 128), ("efficientnet_lite0", 256))


def training_images_per_second(backbone: str, image_size: int, batch_size: int, seconds: float) -> tuple[float, int]:
    """Images per second of training steps, and the number of timed steps."""
    torch.manual_seed(0)
    model = create_classifier(backbone, pretrained="none").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch_size, 1, image_size, image_size)
    labels = torch.randint(0, model.num_classes, (batch_size,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()  # warm-up, not timed
    steps = 0
    start = time.perf_counter()
    while True:
        step()
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return steps * batch_size / elapsed, steps


def main() -> None:
    """Parse arguments, run each configuration and print one line per configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=16, help="batch size")
    parser.add_argument(
        "--config",
        action="append",
        metavar="BACKBONE:SIZE",
        help="timm backbone and image size (repeatable); default legacy_xception:128 and efficientnet_lite0:256",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configurations = (
        [(name, int(size)) for name, size in (entry.rsplit(":", 1) for entry in args.config)]
        if args.config
        else list(DEFAULT_CONFIGURATIONS)
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for backbone, image_size in configurations:
        rate, steps = training_images_per_second(backbone, image_size, args.batch, args.seconds)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"{backbone:>20s} {image_size:4d} px: {rate:7.1f} images/s training "
            f"({steps} steps of {args.batch}; load average {load:.1f})"
        )


if __name__ == "__main__":
    main()
