"""Pieces the training loop (:mod:`.loop`) and the evaluations share: devices, distributed set-up,
progress, per-epoch seeds, recipes."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from lungopacity.devices import resolve_device
from lungopacity.errors import ConfigError

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What a loop reports to; the CLI passes a tqdm-backed one, the library a silent one."""

    def start(self, description: str, total: int) -> None: ...

    def update(self, n: int = 1, **postfix: Any) -> None: ...

    def close(self) -> None: ...


class SilentProgress:
    """Progress that only logs at the end of each bar."""

    def start(self, description: str, total: int) -> None:
        self.description = description

    def update(self, n: int = 1, **postfix: Any) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class DistributedContext:
    """Who this process is in a (possibly one-process) training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1).

    gloo on the CPU, NCCL on CUDA. A plain ``python`` run is a one-process context.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    context = DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    log.info("distributed: rank %d of %d", context.rank, context.world_size)
    return context


def training_context(device_name: str, progress: Progress | None) -> tuple[torch.device, DistributedContext, Progress]:
    """The device, the distributed context (joined under torchrun) and rank 0's progress reporter."""
    device = resolve_device(device_name)
    context = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return device, context, (progress if (progress is not None and context.is_main) else SilentProgress())


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, context: DistributedContext) -> bool:
    """Rank 0's decision (e.g. early stop) for every rank."""
    if not context.enabled:
        return flag
    # NCCL moves only CUDA tensors; gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


# ------------------------------------------------------------------- resumable training


def epoch_seed(seed: int, epoch: int, fold: int = 0) -> int:
    """The seed of one epoch's shuffle, augmentation and dropout.

    Derived from (seed, fold, epoch) alone, so an epoch replayed after a resume draws
    exactly what it drew the first time.
    """
    return (seed * 1_000_003 + fold * 10_007 + epoch) % (2**31)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (metrics.jsonl)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------ recipes

RECIPES = ("paper", "finetune")


def build_optimizer(
    recipe: str, parameters: Any, *, lr: float | None, weight_decay: float | None
) -> torch.optim.Optimizer:
    """The optimiser of a recipe.

    ``paper``: SGD, momentum 0.9, lr 0.045 (the paper's Xception recipe).
    ``finetune``: AdamW, lr 1e-3, weight decay 1e-4 — what transfer learning from
    ImageNet weights wants (see BENCHMARKS.md for the comparison that chose it).

    ``parameters`` may be parameter groups; a group's ``lr_scale`` (as in timm's
    optimiser factory) multiplies the recipe's rate for that group, and the per-step
    schedule then scales every group alike, so the ratio holds throughout training.
    """
    optimizer: torch.optim.Optimizer
    if recipe == "paper":
        optimizer = torch.optim.SGD(parameters, lr=lr or 0.045, momentum=0.9, weight_decay=weight_decay if weight_decay is not None else 4e-5)
    elif recipe == "finetune":
        optimizer = torch.optim.AdamW(parameters, lr=lr or 1e-3, weight_decay=weight_decay if weight_decay is not None else 1e-4)
    else:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return optimizer


def build_scheduler(
    recipe: str, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule.

    ``paper``: x0.94 every 2 epochs (a step function of the epoch).
    ``finetune``: one epoch of linear warm-up (at most 10 % of training), then cosine
    decay to zero.
    """
    if recipe == "paper":
        factor: Callable[[int], float] = lambda step: 0.94 ** ((step // max(steps_per_epoch, 1)) // 2)  # noqa: E731
    elif recipe == "finetune":
        total = max(steps_per_epoch * epochs, 1)
        warmup = max(1, min(steps_per_epoch, total // 10))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    else:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
