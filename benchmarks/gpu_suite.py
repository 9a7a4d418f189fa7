"""GPU suite: training and inference speed through the project's own code, in one run.

What it measures (one row each, every row with its settings, in ``--out``):

* ``classifier_engine`` — ``train_classifier`` (the project's EpochLoop) for 2 epochs with a
  bounded ``max_steps_per_epoch``; the row's images/s and data-wait share are the SECOND
  epoch's ``images_per_s`` / ``data_wait_fraction`` from the run's ``metrics.jsonl``
  (warm-up and cudnn autotuning stay in epoch 1); peak GPU memory is
  ``torch.cuda.max_memory_allocated`` over the whole run (validation included).
  ``legacy_xception`` at 299 px and ``efficientnet_lite0`` at 256 / 512 px, AMP and
  channels_last, batch 32-256, from a 512-px cache of synthetic images
  (``write_demo_dataset`` + ``prepare_cache``; ``--size`` below 512 is the engine's one
  resize, on the device). The engine rows keep the user defaults (augmentation on, gradient
  clipping 5); one variant turns both off, one uses 4 loader workers, one turns AMP off.
* ``classifier_bare`` — the same step as a bare timm loop: the same network from
  ``create_classifier``, one batch already on the device, AMP (autocast + GradScaler),
  channels_last, AdamW, cross-entropy, the engine's epoch-2 step count, timed between two
  ``torch.cuda.synchronize()``. The engine row carries ``engine_over_bare`` = engine img/s /
  bare img/s.
* ``detector_engine`` — ``train_detector`` (RetinaNet, EfficientNet-Lite0 backbone, 512 px),
  read the same way.
* ``classifier_inference`` — the bare classifier forward pass (eval, no grad) with AMP +
  channels_last (timm's benchmark setting, comparable to the published anchor) and in
  float32 NCHW (what ``Predictor`` does today).
* ``predict`` — ``Predictor.predict_images`` with a bundle on the device (built with
  ``build_bundle`` from this run's first classifier and detector runs, or ``--bundle``),
  PyTorch and ONNX Runtime (CUDAExecutionProvider when onnxruntime offers it, else the CPU
  provider, and the row says which), batch 1 and 64, images decoded once beforehand.
* ``ddp`` — one ``torchrun --nproc_per_node N`` classifier run over the machine's N GPUs;
  skipped, with the reason, on a one-GPU machine; ``--ddp-cpu N`` runs it over gloo with N
  CPU processes instead, so that the path is checked without GPUs (a slow test does).
* ``setup`` — the synthetic data, the cache and the bundle (their seconds).

Everything goes to ``--out``: ``results.json`` (all rows), ``results.md`` (tables ready for
BENCHMARKS.md: the card, driver, CUDA and torch versions, and the ratios to the anchors:
timm's published legacy_xception 299 px figures, 385.6 img/s training on an RTX 3090 with
AMP and 2,267.9 img/s inference on an RTX 4090 with AMP), and ``suite.log``. Both result
files are rewritten after every row, so a run stopped by its time limit still returns what
it measured. ``--budget-s`` stops adding rows when the next one would not fit (the skipped
rows are listed); each row runs in its own try/except, so a configuration that fails (an
out-of-memory at batch 256, say) is a row with its error, not a dead suite.

    # CPU check of every path (part of make test, tests/test_gpu_suite.py), under a minute:
    PYTHONPATH=src python benchmarks/gpu_suite.py --smoke --out /tmp/gpu-smoke

    # On a machine with a GPU (about 6 minutes on an H100/H200 with the default budget):
    PYTHONPATH=src python benchmarks/gpu_suite.py --out OUT --work /tmp/gpu-suite --budget-s 360

On this workplace's device machine (nvidia-h200: Python 3.12 with torch, torchvision, timm,
onnx, onnxruntime (CPU), pandas, scipy, safetensors, matplotlib, tqdm, typer, pillow; no
pydicom, no internet), pydicom travels as a wheel. Once, here, in the repository root::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl pydicom==3.0.2

then one device call (``carry: [".whl"]``, ``timeout_s: 450``, which leaves room in the 15
minutes of device time for the machine's start and one rerun of up to 300 s)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit;
    export PYTHONUNBUFFERED=1; nvidia-smi; python3 benchmarks/gpu_suite.py --out $OUT \\
        --work /tmp/gpu-suite --budget-s 360

The results come back under ``$OUT`` (results.json, results.md, suite.log). A rerun at once
on the still-warm machine reuses ``/tmp/gpu-suite`` (no data generation, and ``--only
predict`` takes the classifier and detector runs left there) and can take ``--only`` and a
smaller ``--budget-s`` (e.g. ``--only classifier --budget-s 240`` with ``timeout_s: 300``).
A CPU smoke run uses one torch thread (its numbers mean nothing; two OpenMP threads on two
loaded cores thrashed).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu_suite")

RESULTS_FORMAT = 1
KINDS = ("setup", "classifier_engine", "classifier_bare", "detector_engine", "classifier_inference", "predict", "ddp")
#: --only groups -> kinds.
GROUPS = {
    "classifier": ("classifier_engine", "classifier_bare"),
    "detector": ("detector_engine",),
    "inference": ("classifier_inference",),
    "predict": ("predict",),
    "ddp": ("ddp",),
}

# timm's published benchmark files (huggingface/pytorch-image-models, results/).
ANCHORS: dict[str, dict[str, Any]] = {
    "train": {
        "model": "legacy_xception", "image_size": 299, "images_per_s": 385.56, "batch": 128,
        "card": "RTX 3090", "precision": "AMP, NCHW, 3-channel input",
        "source": "results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv (row `xception`, the model timm now "
                  "names legacy_xception)",
    },
    "inference": {
        "model": "legacy_xception", "image_size": 299, "images_per_s": 2267.92, "batch": 768,
        "card": "RTX 4090", "precision": "AMP, NCHW, 3-channel input",
        "source": "results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv",
    },
}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ClassifierCase:
    """One classifier training configuration (an engine row and, with ``bare``, its bare twin)."""

    backbone: str
    size: int
    batch: int
    amp: bool = True
    channels_last: bool = True
    num_workers: int = 0
    augment: bool = True
    grad_clip: float = 5.0
    bare: bool = True
    tag: str = ""

    @property
    def name(self) -> str:
        parts = [self.backbone, f"{self.size}px", f"b{self.batch}"]
        if not self.amp:
            parts.append("fp32")
        if not self.channels_last:
            parts.append("nchw")
        if self.num_workers:
            parts.append(f"w{self.num_workers}")
        if not self.augment:
            parts.append("noaug")
        if not self.grad_clip:
            parts.append("noclip")
        if self.tag:
            parts.append(self.tag)
        return "-".join(parts)


@dataclass(frozen=True)
class DetectorCase:
    batch: int
    size: int | None = None  # None: the cache's size
    arch: str = "retinanet"
    backbone: str = "efficientnet_lite0"
    amp: bool = True
    channels_last: bool = True
    num_workers: int = 0

    @property
    def name(self) -> str:
        return (f"{self.arch}-{self.backbone}-b{self.batch}" + (f"-{self.size}px" if self.size else "")
                + ("" if self.channels_last else "-nchw") + ("" if self.amp else "-fp32")
                + (f"-w{self.num_workers}" if self.num_workers else ""))


@dataclass(frozen=True)
class InferenceCase:
    backbone: str
    size: int
    batch: int
    amp: bool
    channels_last: bool

    @property
    def name(self) -> str:
        return f"{self.backbone}-{self.size}px-b{self.batch}-{'amp' if self.amp else 'fp32'}-" + (
            "cl" if self.channels_last else "nchw")


@dataclass
class Plan:
    """Everything one run does, in priority order (the budget cuts from the end)."""

    n_images: int
    source_size: int
    cache_size: int
    val_fraction: float
    folds: int
    epoch_images: int  # images per bounded epoch (max_steps_per_epoch = epoch_images // batch)
    min_steps: int
    bare_warmup: int
    inference_steps: int
    predict_batches: tuple[int, ...]
    predict_images: dict[int, int]  # batch -> images per measurement
    repeats: int
    eval_batch_size: int
    first: list[ClassifierCase]  # the main configurations (the first one also goes into the bundle)
    detectors: list[DetectorCase]
    inference: list[InferenceCase]
    later: list[ClassifierCase | DetectorCase]  # the batch sweep and the variants
    ddp_case: ClassifierCase
    ddp_cpu_processes: int  # on the CPU: DDP over gloo with this many processes (--ddp-cpu; 0: only with >= 2 GPUs)


def gpu_plan() -> Plan:
    xception = [ClassifierCase("legacy_xception", 299, b) for b in (64, 32, 128, 256)]
    lite256 = [ClassifierCase("efficientnet_lite0", 256, b) for b in (128, 32, 256)]
    lite512 = [ClassifierCase("efficientnet_lite0", 512, b) for b in (64, 128, 256)]
    return Plan(
        n_images=2304, source_size=512, cache_size=512, val_fraction=0.05, folds=5, epoch_images=2048, min_steps=8,
        bare_warmup=5, inference_steps=20, predict_batches=(1, 64), predict_images={1: 32, 64: 64}, repeats=3,
        eval_batch_size=128,
        first=[xception[0], lite256[0], lite512[0]],
        detectors=[DetectorCase(16)],
        inference=[
            InferenceCase("legacy_xception", 299, 256, amp=True, channels_last=True),
            InferenceCase("legacy_xception", 299, 256, amp=False, channels_last=False),
        ],
        # The largest batches and the variants that split the engine's cost come before the rest of the sweep.
        later=[
            xception[3],
            ClassifierCase("legacy_xception", 299, 64, augment=False, grad_clip=0.0, bare=False),
            lite256[2],
            ClassifierCase("efficientnet_lite0", 256, 128, num_workers=4, bare=False),
            # channels_last off: the detector's weights are channels_last on CUDA, but torchvision batches
            # the image list into a fresh NCHW tensor, so the first convolution converts every step.
            DetectorCase(16, channels_last=False),
            xception[1], xception[2], lite512[1], lite512[2], lite256[1],
            ClassifierCase("legacy_xception", 299, 64, amp=False),
            DetectorCase(32),
        ],
        ddp_case=xception[0],
        ddp_cpu_processes=0,
    )


def smoke_plan() -> Plan:
    lite = ClassifierCase("efficientnet_lite0", 48, 4)  # 48 < the 64-px cache: the engine's resize runs
    return Plan(
        n_images=32, source_size=64, cache_size=64, val_fraction=0.25, folds=2, epoch_images=8, min_steps=2,
        bare_warmup=1, inference_steps=2, predict_batches=(1, 4), predict_images={1: 2, 4: 4}, repeats=1,
        eval_batch_size=16,
        first=[lite], detectors=[DetectorCase(4)],
        inference=[InferenceCase("efficientnet_lite0", 48, 4, amp=True, channels_last=True)],
        later=[], ddp_case=lite, ddp_cpu_processes=0,
    )


def parse_classifier_case(text: str) -> ClassifierCase:
    """``BACKBONE:SIZE:BATCH`` -> a case (the --classifier option)."""
    try:
        backbone, size, batch = text.rsplit(":", 2)
        return ClassifierCase(backbone, int(size), int(batch))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classifier: expected BACKBONE:SIZE:BATCH, got {text!r}") from None


# ------------------------------------------------------------------------- the suite


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Suite:
    """Runs rows under a time budget, records them, rewrites the result files after each."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        import torch

        self.args, self.plan = args, plan
        self.out: Path = args.out
        self.work: Path = args.work
        self.start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.device = torch.device(_resolve_device(args.device))
        self.environment: dict[str, Any] = {}
        self.bundle: Path | None = None  # set by the bundle row
        self.onnx_error: str | None = None
        self.cache_dir = self.work / "cache"
        self.data_dir = self.work / "data"
        self.run_root = self.work / "runs"
        self.kinds = set(KINDS) if not args.only else {"setup", *(k for g in args.only for k in GROUPS[g])}
        self.defaults = ({"setup": 5, "classifier_engine": 5, "classifier_bare": 3, "detector_engine": 10,
                          "classifier_inference": 3, "predict": 5, "ddp": 30} if args.smoke else
                         {"setup": 60, "classifier_engine": 25, "classifier_bare": 10, "detector_engine": 60,
                          "classifier_inference": 10, "predict": 25, "ddp": 90})

    # ------------------------------------------------------------------ timing

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def estimate(self, kind: str) -> float:
        """Seconds the next row of ``kind`` may take: the longest one so far, else a default."""
        seen = [r["seconds"] for r in self.rows if r["kind"] == kind and r["status"] == "ok" and r.get("seconds")]
        return max(seen) if seen else float(self.defaults.get(kind, 30))

    def say(self, message: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {message}"
        print(line, flush=True)
        log.info("%s", message)

    # -------------------------------------------------------------------- rows

    def row(self, kind: str, name: str, settings: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one measurement unless the budget or --only says no; never raises."""
        record: dict[str, Any] = {"kind": kind, "name": name, "settings": settings, "status": "skipped",
                                  "images_per_s": None, "data_wait_fraction": None, "peak_memory_mib": None,
                                  "seconds": None}
        if kind not in self.kinds:
            record["reason"] = "not selected (--only)"
            return self._keep(record)
        remaining = self.args.budget_s - self.elapsed()
        needed = self.estimate(kind)
        if needed > remaining:
            record["reason"] = f"budget: {remaining:.0f} s left of --budget-s {self.args.budget_s:g}, a {kind} row takes about {needed:.0f} s"
            self.say(f"skip {kind} {name} ({record['reason']})")
            return self._keep(record)
        self.say(f"start {kind} {name}")
        self._reset_memory()
        started = time.perf_counter()
        try:
            record.update(measure())
            record["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one failing configuration is a row, not a dead suite
            record["status"] = "error"
            record["error"] = _first_line(exc)
            log.error("%s %s failed:\n%s", kind, name, traceback.format_exc())
        record["seconds"] = round(time.perf_counter() - started, 3)
        if record.get("peak_memory_mib") is None:
            record["peak_memory_mib"] = self._peak_memory_mib()
        self._release_memory()
        self.say(describe_row(record))
        return self._keep(record)

    def skip(self, kind: str, name: str, settings: dict[str, Any], reason: str) -> dict[str, Any]:
        record = {"kind": kind, "name": name, "settings": settings, "status": "skipped", "reason": reason,
                  "images_per_s": None, "data_wait_fraction": None, "peak_memory_mib": None, "seconds": None}
        if kind in self.kinds:
            self.say(f"skip {kind} {name} ({reason})")
        else:
            record["reason"] = "not selected (--only)"
        return self._keep(record)

    def _keep(self, record: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(record)
        self.write()
        return record

    def _reset_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak_memory_mib(self) -> float | None:
        import torch

        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def _release_memory(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------- results

    def results(self) -> dict[str, Any]:
        measured = [r for r in self.rows if r["status"] != "skipped"]
        return {
            "format": RESULTS_FORMAT,
            "suite": "benchmarks/gpu_suite.py",
            "smoke": bool(self.args.smoke),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "environment": self.environment,
            "device": str(self.device),
            "budget_s": self.args.budget_s,
            "elapsed_s": round(self.elapsed(), 2),
            "anchors": ANCHORS,
            "plan": _plain(asdict(self.plan)),
            "rows": self.rows,
            "n_measured": len(measured),
            "skipped": [f"{r['kind']} {r['name']}: {r.get('reason', '')}" for r in self.rows if r["status"] == "skipped"],
            "errors": [f"{r['kind']} {r['name']}: {r.get('error', '')}" for r in self.rows if r["status"] == "error"],
        }

    def write(self) -> None:
        results = self.results()
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.out / "results.json", json.dumps(_plain(results), indent=2, allow_nan=False))
        _atomic_write(self.out / "results.md", render_markdown(results))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """JSON-safe: tuples to lists, non-finite floats to None, paths to strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return _finite_or_none(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return value


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return name


# --------------------------------------------------------------------- environment


def environment_info(device: Any) -> dict[str, Any]:
    import timm
    import torch
    import torchvision

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = list(onnxruntime.get_available_providers())
    except ImportError:
        info["onnxruntime"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": torch.cuda.get_device_name(device), "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        })
        try:
            query = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=False)
            info["nvidia_smi"] = query.stdout.strip()
            first = query.stdout.strip().splitlines()[0].split(",") if query.stdout.strip() else []
            if len(first) >= 2:
                info["driver"] = first[1].strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"not available ({exc})"
    else:
        info["gpu"] = None
    return info


# ------------------------------------------------------------------------------ data


def _write_shard(args: tuple[str, int, int, int]) -> str:
    from lungopacity.synthetic import write_demo_dataset

    out, n, size, seed = args
    write_demo_dataset(out, n, size=size, seed=seed, overwrite=True)
    return out


def make_dataset(suite: Suite) -> dict[str, Any]:
    """The synthetic RSNA folder (phantoms written in parallel shards, then merged) and its cache."""
    from lungopacity.data.cache import PreparedCache, prepare_cache
    from lungopacity.synthetic.rsna_writer import CLASS_INFO_CSV, IMAGES_DIR, LABELS_CSV

    plan, data, cache_dir = suite.plan, suite.data_dir, suite.cache_dir
    images = data / IMAGES_DIR
    reused = (data / LABELS_CSV).exists() and images.is_dir() and len(list(images.glob("*.dcm"))) == plan.n_images
    t0 = time.perf_counter()
    if not reused:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
        workers = max(1, min(os.cpu_count() or 1, 16, plan.n_images // 8 or 1))
        per = math.ceil(plan.n_images / workers)
        counts = [min(per, plan.n_images - k * per) for k in range(workers)]
        shards = [(str(suite.work / "shards" / f"shard_{k}"), n, plan.source_size, 1000 + k)
                  for k, n in enumerate(counts) if n > 0]
        if len(shards) == 1:
            _write_shard(shards[0])
        else:
            with ProcessPoolExecutor(max_workers=len(shards), mp_context=get_context("spawn")) as pool:
                list(pool.map(_write_shard, shards))
        images.mkdir(parents=True)
        labels, classes, seen = [], [], set()
        for shard, *_ in shards:
            shard_path = Path(shard)
            for dcm in (shard_path / IMAGES_DIR).glob("*.dcm"):
                if dcm.name in seen:
                    raise RuntimeError(f"{dcm.name}: the same patient id in two shards")
                seen.add(dcm.name)
                os.replace(dcm, images / dcm.name)
            labels += (shard_path / LABELS_CSV).read_text().splitlines()[1:]
            classes += (shard_path / CLASS_INFO_CSV).read_text().splitlines()[1:]
        (data / LABELS_CSV).write_text("\n".join(["patientId,x,y,width,height,Target", *labels]) + "\n")
        (data / CLASS_INFO_CSV).write_text("\n".join(["patientId,class", *classes]) + "\n")
        shutil.rmtree(suite.work / "shards", ignore_errors=True)
    t1 = time.perf_counter()
    result = prepare_cache(data, cache_dir, size=plan.cache_size, workers=os.cpu_count() or 1,
                           val_fraction=plan.val_fraction, folds=plan.folds, seed=0)
    cache = PreparedCache(cache_dir)
    train, val = len(cache.indices("train")), len(cache.indices("val"))
    if result.n_failed:
        raise RuntimeError(f"{cache_dir}: {result.n_failed} synthetic images failed to prepare")
    return {"write_seconds": round(t1 - t0, 2), "prepare_seconds": round(time.perf_counter() - t1, 2),
            "data_reused": reused, "n_train": train, "n_val": val, "cache": str(cache_dir)}


# -------------------------------------------------------------------- classifier rows


def steps_for(plan: Plan, batch: int) -> int:
    return max(plan.min_steps, plan.epoch_images // batch)


def _epoch_records(metrics: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _second_epoch(records: list[dict[str, Any]], metrics: Path) -> dict[str, Any]:
    second = [r for r in records if r.get("epoch") == 2]
    if not second:
        raise RuntimeError(f"{metrics}: no epoch-2 line (epochs {[r.get('epoch') for r in records]})")
    return second[-1]


def classifier_config(suite: Suite, case: ClassifierCase, device: str | None = None) -> Any:
    from lungopacity.engine.config import ClassifierTrainConfig

    plan = suite.plan
    return ClassifierTrainConfig(
        backbone=case.backbone, pretrained="none", size=None if case.size == plan.cache_size else case.size,
        epochs=2, batch_size=case.batch, recipe="finetune", folds=1, seed=0, augment=case.augment,
        grad_clip=case.grad_clip, amp=case.amp, channels_last=case.channels_last, device=device or str(suite.device),
        num_workers=case.num_workers, max_steps_per_epoch=steps_for(plan, case.batch),
        eval_batch_size=plan.eval_batch_size, patience=5,
    )


def classifier_settings(suite: Suite, case: ClassifierCase) -> dict[str, Any]:
    cuda = suite.device.type == "cuda"
    return {"backbone": case.backbone, "image_size": case.size, "cache_size": suite.plan.cache_size,
            "batch": case.batch, "amp": case.amp and cuda, "channels_last": case.channels_last,
            "num_workers": case.num_workers, "augment": case.augment, "grad_clip": case.grad_clip,
            "max_steps_per_epoch": steps_for(suite.plan, case.batch), "epochs": 2}


def measure_classifier_engine(suite: Suite, case: ClassifierCase) -> dict[str, Any]:
    from lungopacity.engine.classifier import train_classifier

    run = suite.run_root / f"classifier-{case.name}"
    shutil.rmtree(run, ignore_errors=True)
    train_classifier(suite.cache_dir, run, classifier_config(suite, case))
    metrics = run / "metrics.jsonl"
    records = _epoch_records(metrics)
    second = _second_epoch(records, metrics)
    seen = second["images_per_s"] * second["train_seconds"]
    return {
        "images_per_s": second["images_per_s"], "data_wait_fraction": second["data_wait_fraction"],
        "timed_seconds": second["train_seconds"], "steps": round(seen / case.batch),
        "epoch1_images_per_s": records[0]["images_per_s"], "skipped_steps": second.get("skipped_steps", 0),
        "train_seconds_total": sum(r["train_seconds"] for r in records), "run_dir": str(run),
    }


def measure_classifier_bare(suite: Suite, case: ClassifierCase, steps: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from lungopacity.constants import CLASS_NAMES
    from lungopacity.models.classifier import create_classifier

    device = suite.device
    amp = case.amp and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the engine's training_context sets it
    torch.manual_seed(0)
    model = create_classifier(case.backbone, pretrained="none", num_classes=len(CLASS_NAMES), in_chans=1,
                              drop_rate=0.2).to(device)
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(case.batch, 1, case.size, case.size, generator=generator).to(device)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(CLASS_NAMES), (case.batch,), generator=generator).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(suite.plan.bare_warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    return {"images_per_s": steps * case.batch / seconds, "timed_seconds": seconds, "steps": steps,
            "warmup_steps": suite.plan.bare_warmup}


def run_classifier_case(suite: Suite, case: ClassifierCase) -> dict[str, Any]:
    settings = classifier_settings(suite, case)
    engine = suite.row("classifier_engine", case.name, settings, lambda: measure_classifier_engine(suite, case))
    _add_anchor_ratio(engine, "train")
    if case.bare:
        steps = engine.get("steps") or steps_for(suite.plan, case.batch)
        bare_settings = {**settings, "augment": False, "grad_clip": 0.0, "num_workers": None, "steps": steps}
        bare = suite.row("classifier_bare", case.name, bare_settings, lambda: measure_classifier_bare(suite, case, steps))
        _add_anchor_ratio(bare, "train")
        if engine["status"] == "ok" and bare["status"] == "ok":
            engine["bare_images_per_s"] = bare["images_per_s"]
            engine["engine_over_bare"] = engine["images_per_s"] / bare["images_per_s"]
            suite.say(f"  engine / bare = {engine['engine_over_bare']:.3f}")
            suite.write()
    return engine


def _add_anchor_ratio(row: dict[str, Any], which: str) -> None:
    anchor = ANCHORS[which]
    settings = row["settings"]
    if (row["status"] == "ok" and settings.get("backbone") == anchor["model"]
            and settings.get("image_size") == anchor["image_size"]):
        row["vs_anchor"] = row["images_per_s"] / anchor["images_per_s"]


# ---------------------------------------------------------------------- detector rows


def measure_detector(suite: Suite, case: DetectorCase) -> dict[str, Any]:
    from lungopacity.engine.config import DetectorTrainConfig
    from lungopacity.engine.detector import train_detector

    plan = suite.plan
    run = suite.run_root / f"detector-{case.name}"
    shutil.rmtree(run, ignore_errors=True)
    config = DetectorTrainConfig(
        arch=case.arch, backbone=case.backbone, pretrained="none", size=case.size, epochs=2, batch_size=case.batch,
        amp=case.amp, channels_last=case.channels_last, device=str(suite.device), num_workers=case.num_workers,
        max_steps_per_epoch=steps_for(plan, case.batch), eval_batch_size=min(plan.eval_batch_size, 32), patience=5,
    )
    train_detector(suite.cache_dir, run, config)
    metrics = run / "metrics.jsonl"
    records = _epoch_records(metrics)
    second = _second_epoch(records, metrics)
    seen = second["images_per_s"] * second["train_seconds"]
    return {
        "images_per_s": second["images_per_s"], "data_wait_fraction": second["data_wait_fraction"],
        "timed_seconds": second["train_seconds"], "steps": round(seen / case.batch),
        "epoch1_images_per_s": records[0]["images_per_s"], "skipped_steps": second.get("skipped_steps", 0),
        "val_seconds": second.get("val_seconds"), "run_dir": str(run),
    }


def detector_settings(suite: Suite, case: DetectorCase) -> dict[str, Any]:
    cuda = suite.device.type == "cuda"
    return {"arch": case.arch, "backbone": case.backbone, "image_size": case.size or suite.plan.cache_size,
            "batch": case.batch, "amp": case.amp and cuda, "channels_last": case.channels_last and cuda,
            "num_workers": case.num_workers, "augment": True, "grad_clip": 10.0,
            "max_steps_per_epoch": steps_for(suite.plan, case.batch), "epochs": 2}


# --------------------------------------------------------------------- inference rows


def measure_inference(suite: Suite, case: InferenceCase) -> dict[str, Any]:
    import torch

    from lungopacity.constants import CLASS_NAMES
    from lungopacity.models.classifier import create_classifier

    device = suite.device
    amp = case.amp and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as timm's benchmark does
    torch.manual_seed(0)
    model = create_classifier(case.backbone, pretrained="none", num_classes=len(CLASS_NAMES), in_chans=1).to(device).eval()
    x = torch.rand(case.batch, 1, case.size, case.size, generator=torch.Generator().manual_seed(0)).to(device)
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            model(x)

    for _ in range(3):
        forward()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(suite.plan.inference_steps):
        forward()
    sync(device)
    seconds = time.perf_counter() - t0
    return {"images_per_s": suite.plan.inference_steps * case.batch / seconds, "timed_seconds": seconds,
            "steps": suite.plan.inference_steps}


# ---------------------------------------------------------------------- predict rows


def _finished_run(run: Path, marker: str) -> Path | None:
    """``run`` when an earlier call of the suite finished it (its ``marker`` file exists)."""
    return run if (run / "config.json").is_file() and (run / marker).is_file() else None


def build_suite_bundle(suite: Suite, classifier_run: Path | None, detector_run: Path | None) -> dict[str, Any]:
    from lungopacity.engine.bundle import build_bundle
    from lungopacity.inference.onnx import export_onnx

    bundle = suite.work / "bundle"
    t0 = time.perf_counter()
    if suite.args.bundle:
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(suite.args.bundle, bundle)  # export_onnx writes into the bundle: never into the user's
        source = str(suite.args.bundle)
    else:
        assert classifier_run is not None
        build_bundle(bundle, classifier_run, detector_run=detector_run, cache_dir=suite.cache_dir)
        source = f"built from {classifier_run.name}" + (f" + {detector_run.name}" if detector_run else "")
    t1 = time.perf_counter()
    onnx_error = None
    try:
        export_onnx(bundle)
    except Exception as exc:  # noqa: BLE001 - the torch rows can still run
        onnx_error = _first_line(exc)
        log.error("ONNX export failed:\n%s", traceback.format_exc())
    suite.bundle = bundle
    suite.onnx_error = onnx_error
    result = {"bundle": str(bundle), "source": source, "build_seconds": round(t1 - t0, 2),
              "export_seconds": round(time.perf_counter() - t1, 2)}
    if onnx_error:
        result["onnx_export_error"] = onnx_error
    return result


def _cuda_onnx_sessions(predictor: Any) -> str:
    """Give the predictor's ONNX models CUDA sessions when onnxruntime offers the provider.

    ``OnnxModels`` creates CPU sessions only; the suite swaps them here (and says so in
    the row) rather than changing the library.
    """
    import onnxruntime as ort

    models = predictor.onnx
    if predictor.device.type != "cuda" or "CUDAExecutionProvider" not in ort.get_available_providers():
        return models.classifier.get_providers()[0]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = [("CUDAExecutionProvider", {"device_id": predictor.device.index or 0}), "CPUExecutionProvider"]
    folder = Path(predictor.path) / "onnx"
    models.classifier = ort.InferenceSession(str(folder / "classifier.onnx"), options, providers=providers)
    if models.detector is not None:
        models.detector = ort.InferenceSession(str(folder / "detector.onnx"), options, providers=providers)
    return models.classifier.get_providers()[0]


def run_predict_rows(suite: Suite) -> None:
    plan = suite.plan
    bundle = suite.bundle
    for runtime in ("torch", "onnx"):
        for batch in plan.predict_batches:
            name = f"{runtime}-b{batch}"
            settings = {"runtime": runtime, "batch": batch, "n_images": plan.predict_images[batch],
                        "repeats": plan.repeats, "cudnn_benchmark": False}
            if bundle is None:
                suite.skip("predict", name, settings, "no bundle (its classifier or detector run failed or was skipped)")
            elif runtime == "onnx" and suite.onnx_error:
                suite.skip("predict", name, settings, f"ONNX export failed: {suite.onnx_error}")
            else:
                suite.row("predict", name, settings, lambda r=runtime, b=batch: measure_predict(suite, r, b))


def measure_predict(suite: Suite, runtime: str, batch: int) -> dict[str, Any]:
    import torch

    from lungopacity.inference.predictor import Predictor
    from lungopacity.synthetic.rsna_writer import IMAGES_DIR

    plan = suite.plan
    # What `lungopacity predict` runs with: the library never turns cudnn autotuning on for inference.
    torch.backends.cudnn.benchmark = False
    predictor = Predictor.from_bundle(suite.bundle, device=suite.device, runtime=runtime)
    provider = _cuda_onnx_sessions(predictor) if runtime == "onnx" else None
    files = sorted((suite.data_dir / IMAGES_DIR).glob("*.dcm"))[: plan.predict_images[batch]]
    images = [predictor.load(f, name=str(f)) for f in files]  # decoded once, outside the timing
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    predictor.predict_images(chunks[0])  # warm-up
    sync(suite.device)
    times, classify, detect = [], [], []
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        predictions = [p for chunk in chunks for p in predictor.predict_images(chunk)]
        sync(suite.device)
        times.append(time.perf_counter() - t0)
        classify += [p.timings["classify"] for p in predictions]
        detect += [p.timings["detect"] for p in predictions]
    seconds = statistics.median(times)
    result = {"images_per_s": len(images) / seconds, "ms_per_image": 1e3 * seconds / len(images),
              "classify_ms_per_image": 1e3 * statistics.fmean(classify),
              "detect_ms_per_image": 1e3 * statistics.fmean(detect), "timed_seconds": seconds,
              "n_images": len(images), "has_detector": bool(predictor.detectors)}
    if provider is not None:
        result["provider"] = provider
    return result


# ------------------------------------------------------------------------------ DDP


def run_ddp_row(suite: Suite, single: dict[str, Any] | None) -> None:
    import torch

    plan, case = suite.plan, suite.plan.ddp_case
    gpus = torch.cuda.device_count() if suite.device.type == "cuda" else 0
    if gpus >= 2:
        processes, device, backend = gpus, "auto", "nccl"
    elif suite.device.type == "cpu" and plan.ddp_cpu_processes >= 2:
        processes, device, backend = plan.ddp_cpu_processes, "cpu", "gloo"
    else:
        processes, device, backend = 0, "", ""
    settings = {**classifier_settings(suite, case), "processes": processes, "backend": backend}
    name = f"{case.name}-x{processes or gpus}"
    if not processes:
        if suite.device.type == "cuda":
            reason = f"{gpus} GPU on this machine: a DDP run needs two or more"
        else:
            reason = "no GPU: DDP runs on two or more GPUs, or over gloo on the CPU with --ddp-cpu N"
        suite.skip("ddp", name, settings, reason)
        return

    def measure() -> dict[str, Any]:
        run = suite.run_root / f"ddp-{case.name}"
        shutil.rmtree(run, ignore_errors=True)
        config = classifier_config(suite, case, device=device)
        config_path = suite.work / "ddp_config.json"
        config_path.write_text(json.dumps(config.to_dict()))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if backend == "gloo":
            env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   str(Path(__file__).resolve()), "--ddp-worker", str(config_path), str(suite.cache_dir), str(run)]
        log.info("DDP: %s", " ".join(command))
        timeout = max(60.0, suite.args.budget_s - suite.elapsed() + 60.0)
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        log.info("DDP output:\n%s\n%s", done.stdout[-4000:], done.stderr[-8000:])
        if done.returncode != 0:
            raise RuntimeError(f"torchrun exited with {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:300]}")
        metrics = run / "metrics.jsonl"
        records = _epoch_records(metrics)
        second = _second_epoch(records, metrics)
        seen = second["images_per_s"] * second["train_seconds"] / processes
        result = {"images_per_s": second["images_per_s"], "data_wait_fraction": second["data_wait_fraction"],
                  "timed_seconds": second["train_seconds"], "steps": round(seen / case.batch),
                  "per_process_images_per_s": second["images_per_s"] / processes, "run_dir": str(run),
                  "peak_memory_mib": None}
        if single and single.get("status") == "ok":
            result["single_images_per_s"] = single["images_per_s"]
            result["scaling_efficiency"] = second["images_per_s"] / (processes * single["images_per_s"])
        return result

    suite.row("ddp", name, settings, measure)


def ddp_worker(config_path: str, cache_dir: str, run_dir: str) -> None:
    """One rank of the DDP row (started by torchrun)."""
    import torch

    from lungopacity.engine.classifier import train_classifier
    from lungopacity.engine.config import ClassifierTrainConfig

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {os.environ.get('RANK', '?')} %(name)s: %(message)s")
    log.info("worker started")
    if os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(1)
    config = ClassifierTrainConfig.from_dict(json.loads(Path(config_path).read_text()))
    train_classifier(cache_dir, run_dir, config)


# ------------------------------------------------------------------------- the run


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    plan = smoke_plan() if args.smoke else gpu_plan()
    if args.classifier:
        plan.first, plan.later = list(args.classifier), []
        plan.ddp_case = plan.first[0]
    if args.n_images:
        plan.n_images = args.n_images
    if args.ddp_cpu:
        plan.ddp_cpu_processes = args.ddp_cpu
    suite = Suite(args, plan)
    suite.environment = environment_info(suite.device)
    env = suite.environment
    suite.say(f"device {suite.device} ({env.get('gpu') or 'CPU'}), torch {env['torch']} (CUDA {env['torch_cuda']}), "
              f"timm {env['timm']}, {env['gpu_count']} GPU(s), driver {env.get('driver', '-')}, budget {args.budget_s:g} s"
              + (" [smoke]" if args.smoke else ""))
    if args.smoke and suite.device.type == "cpu":
        import torch

        # The numbers of a CPU smoke run mean nothing; one thread keeps shared cores from
        # thrashing (two OpenMP threads on two loaded cores ran 50x slower here).
        torch.set_num_threads(1)
    suite.write()

    data = suite.row("setup", "data", {"n_images": plan.n_images, "source_size": plan.source_size,
                                        "cache_size": plan.cache_size, "val_fraction": plan.val_fraction},
                     lambda: make_dataset(suite))
    if data["status"] != "ok":
        for kind in KINDS[1:]:
            suite.skip(kind, "all", {}, f"no data: the setup row was {data['status']} ({data.get('reason') or data.get('error')})")
        return suite.results()

    engines = [run_classifier_case(suite, case) for case in plan.first]
    detectors = [suite.row("detector_engine", c.name, detector_settings(suite, c), lambda c=c: measure_detector(suite, c))
                 for c in plan.detectors]
    for case in plan.inference:
        row = suite.row("classifier_inference", case.name,
                        {"backbone": case.backbone, "image_size": case.size, "batch": case.batch,
                         "amp": case.amp and suite.device.type == "cuda", "channels_last": case.channels_last,
                         "steps": plan.inference_steps, "cudnn_benchmark": suite.device.type == "cuda"},
                        lambda c=case: measure_inference(suite, c))
        _add_anchor_ratio(row, "inference")

    # The bundle: this run's first classifier (and detector) run, or --bundle.
    # (A rerun with --only predict and the same --work takes the runs an earlier call left there.)
    classifier_run = next((Path(r["run_dir"]) for r in engines if r["status"] == "ok"), None) or _finished_run(
        suite.run_root / f"classifier-{plan.first[0].name}", "fold_0/val_predictions.csv")
    detector_run = next((Path(r["run_dir"]) for r in detectors if r["status"] == "ok"), None) or (
        _finished_run(suite.run_root / f"detector-{plan.detectors[0].name}", "postprocess.json") if plan.detectors else None)
    if "predict" in suite.kinds and (args.bundle or classifier_run):
        suite.row("setup", "bundle", {"bundle": str(args.bundle) if args.bundle else None},
                  lambda: build_suite_bundle(suite, classifier_run, detector_run))
    run_predict_rows(suite)

    single = next((r for r in engines if r["name"] == plan.ddp_case.name), None)
    run_ddp_row(suite, single)

    for case in plan.later:
        if isinstance(case, DetectorCase):
            suite.row("detector_engine", case.name, detector_settings(suite, case), lambda c=case: measure_detector(suite, c))
        else:
            run_classifier_case(suite, case)

    results = suite.results()
    suite.say(f"done: {results['n_measured']} rows measured, {len(results['skipped'])} skipped, "
              f"{len(results['errors'])} errors; results in {suite.out}")
    return results


# ------------------------------------------------------------------------- reports


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _gib(value: Any) -> str:
    return "-" if value is None else f"{value / 1024:.1f}"


def describe_row(row: dict[str, Any]) -> str:
    """One progress line for a finished row."""
    head = f"{row['status']:>7s} {row['kind']} {row['name']}"
    if row["status"] == "error":
        return f"{head}: {row.get('error')} ({row.get('seconds')} s)"
    if row["status"] == "skipped":
        return f"{head}: {row.get('reason')}"
    parts = []
    if row.get("images_per_s") is not None:
        parts.append(f"{row['images_per_s']:.1f} img/s")
    if row.get("data_wait_fraction") is not None:
        parts.append(f"data wait {_pct(row['data_wait_fraction'])}")
    if row.get("peak_memory_mib") is not None:
        parts.append(f"peak {row['peak_memory_mib'] / 1024:.2f} GiB")
    if row.get("provider"):
        parts.append(row["provider"])
    if row.get("vs_anchor") is not None:
        parts.append(f"{row['vs_anchor']:.2f}x anchor")
    parts.append(f"{row['seconds']:.1f} s")
    return f"{head}: " + ", ".join(parts)


def render_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables ready for BENCHMARKS.md."""
    env, rows = results["environment"], results["rows"]
    # Tables hold the rows that ran (measured or failed); skipped rows are listed at the end.
    by_kind = {kind: [r for r in rows if r["kind"] == kind and r["status"] != "skipped"] for kind in KINDS}
    train_anchor, infer_anchor = ANCHORS["train"], ANCHORS["inference"]
    lines = [
        "# GPU suite results" + (" (smoke run on the CPU: the numbers mean nothing)" if results["smoke"] else ""),
        "",
        f"- card: **{env.get('gpu') or 'none (CPU)'}**" + (f", {env['gpu_memory_gib']} GiB" if env.get("gpu_memory_gib") else "")
        + f"; GPUs: {env.get('gpu_count', 0)}; driver {env.get('driver', '-')}; CUDA (torch) {env.get('torch_cuda') or '-'}; "
          f"cuDNN {env.get('cudnn') or '-'}",
        (f"- torch {env.get('torch')}, torchvision {env.get('torchvision')}, timm {env.get('timm')}, "
        f"onnxruntime {env.get('onnxruntime') or '-'} (providers: {', '.join(env.get('onnxruntime_providers') or []) or '-'}); "
        f"Python {env.get('python')}, {env.get('cpu_count')} CPU cores"),
        f"- command: `{results['command']}`; {results['elapsed_s']:.0f} s of a {results['budget_s']:g} s budget",
        (f"- anchors (timm's published benchmark files): {train_anchor['model']} {train_anchor['image_size']} px trains at "
        f"{train_anchor['images_per_s']:g} img/s on an {train_anchor['card']} ({train_anchor['precision']}, batch "
        f"{train_anchor['batch']}) and infers at {infer_anchor['images_per_s']:,g} img/s on an {infer_anchor['card']} "
        f"({infer_anchor['precision']}, batch {infer_anchor['batch']}); ours are 1-channel networks with 3 classes"),
        "",
        "## Classifier training",
        "",
        ("Engine: `train_classifier`, epoch 2 of 2 (`metrics.jsonl`), augmentation and clipping as users get them unless "
        "the row says otherwise. Bare: the same network and step on one batch already on the device."),
        "",
        ("| backbone | px | batch | AMP | channels_last | workers | engine img/s | bare img/s | engine / bare | data wait "
        "| peak GiB engine / bare | vs 3090 anchor (engine, bare) | row s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bare_by_name = {r["name"]: r for r in by_kind["classifier_bare"]}
    for row in by_kind["classifier_engine"]:
        s, bare = row["settings"], bare_by_name.get(row["name"], {})
        variant = [] if s.get("augment", True) else ["no augmentation"]
        if not s.get("grad_clip", 5.0):
            variant.append("no clipping")
        engine_cell = _status_cell(row, _fmt(row.get("images_per_s")))
        bare_cell = _status_cell(bare, _fmt(bare.get("images_per_s"))) if bare else "-"
        anchor = " / ".join(_fmt(r.get("vs_anchor"), 2) + ("x" if r.get("vs_anchor") else "") for r in (row, bare) if r)
        lines.append(
            f"| {s.get('backbone', row['name'])}{' (' + ', '.join(variant) + ')' if variant else ''} "
            f"| {s.get('image_size', '-')} | {s.get('batch', '-')} "
            f"| {_fmt(s.get('amp'))} | {_fmt(s.get('channels_last'))} | {s.get('num_workers', '-')} | {engine_cell} | {bare_cell} "
            f"| {_fmt(row.get('engine_over_bare'), 2)} | {_pct(row.get('data_wait_fraction'))} "
            f"| {_gib(row.get('peak_memory_mib'))} / {_gib(bare.get('peak_memory_mib'))} | {anchor or '-'} "
            f"| {_fmt(row.get('seconds'), 0)} |")
    _none_ran(lines, by_kind["classifier_engine"])
    lines += ["", "## Detector training", "",
              "`train_detector`, epoch 2 of 2 (`metrics.jsonl`).", "",
              "| arch | backbone | px | batch | AMP | channels_last | img/s | data wait | peak GiB | row s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in by_kind["detector_engine"]:
        s = row["settings"]
        lines.append(f"| {s.get('arch', '-')} | {s.get('backbone', '-')} | {s.get('image_size', '-')} | {s.get('batch', '-')} "
                     f"| {_fmt(s.get('amp'))} | {_fmt(s.get('channels_last'))} | {_status_cell(row, _fmt(row.get('images_per_s')))} "
                     f"| {_pct(row.get('data_wait_fraction'))} | {_gib(row.get('peak_memory_mib'))} | {_fmt(row.get('seconds'), 0)} |")
    _none_ran(lines, by_kind["detector_engine"])
    lines += ["", "## Inference", "",
              ("Bare classifier forward (eval, no grad, one batch on the device); `predict`: `Predictor.predict_images` on "
              "images decoded beforehand (classifier, calibration, detector, post-processing), median of the repeats."), "",
              ("| what | runtime / provider | batch | AMP | channels_last | img/s | ms/img | classify ms/img | detect ms/img "
              "| peak GiB | vs 4090 anchor |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in by_kind["classifier_inference"]:
        s = row["settings"]
        lines.append(f"| forward {s.get('backbone', '-')} {s.get('image_size', '-')} px | torch | {s.get('batch', '-')} "
                     f"| {_fmt(s.get('amp'))} | {_fmt(s.get('channels_last'))} | {_status_cell(row, _fmt(row.get('images_per_s')))} "
                     f"| {_fmt(1e3 / row['images_per_s'], 2) if row.get('images_per_s') else '-'} | - | - "
                     f"| {_gib(row.get('peak_memory_mib'))} | {_fmt(row.get('vs_anchor'), 2)}{'x' if row.get('vs_anchor') else ''} |")
    for row in by_kind["predict"]:
        s = row["settings"]
        runtime = s.get("runtime", "-") + (f" / {row['provider']}" if row.get("provider") else "")
        lines.append(f"| predict | {runtime} | {s.get('batch', '-')} | no | no | {_status_cell(row, _fmt(row.get('images_per_s')))} "
                     f"| {_fmt(row.get('ms_per_image'), 2)} | {_fmt(row.get('classify_ms_per_image'), 2)} "
                     f"| {_fmt(row.get('detect_ms_per_image'), 2)} | {_gib(row.get('peak_memory_mib'))} | - |")
    _none_ran(lines, by_kind["classifier_inference"] + by_kind["predict"])
    lines += ["", "## Distributed (DDP)", "",
              "| configuration | processes | backend | img/s (all) | per process | single-device img/s | scaling efficiency |",
              "|---|---|---|---|---|---|---|"]
    for row in by_kind["ddp"]:
        s = row["settings"]
        lines.append(f"| {row['name']} | {s.get('processes', '-')} | {s.get('backend') or '-'} "
                     f"| {_status_cell(row, _fmt(row.get('images_per_s')))} | {_fmt(row.get('per_process_images_per_s'))} "
                     f"| {_fmt(row.get('single_images_per_s'))} | {_pct(row.get('scaling_efficiency'))} |")
    _none_ran(lines, by_kind["ddp"])
    setup = by_kind["setup"]
    if setup:
        lines += ["", "## Setup", ""]
        for row in setup:
            extra = {k: v for k, v in row.items() if k.endswith("_seconds") or k in ("n_train", "n_val", "source", "data_reused")}
            lines.append(f"- {row['name']}: {row['status']}, {_fmt(row.get('seconds'))} s "
                         + ", ".join(f"{k} {v}" for k, v in extra.items()) + (f" ({row['error']})" if row.get("error") else ""))
    if results["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
    if results["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def _none_ran(lines: list[str], rows: list[dict[str, Any]]) -> None:
    if not rows:
        lines.append("| (no row ran: see Skipped) |")


def _status_cell(row: dict[str, Any], value: str) -> str:
    if not row:
        return "-"
    if row.get("status") == "error":
        return f"error: {row.get('error', '')[:80]}"
    if row.get("status") == "skipped":
        return "skipped"
    return value


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results.json, results.md and suite.log go here")
    parser.add_argument("--work", type=Path, default=None,
                        help="data, cache, runs and bundle (reused when it already holds the data); default: a temporary folder")
    parser.add_argument("--smoke", action="store_true", help="the same code paths at tiny sizes (the CPU check)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop adding rows when the next would not fit (default 360; smoke 600)")
    parser.add_argument("--only", action="append", choices=sorted(GROUPS), default=None,
                        help="run only these groups (repeatable); the setup rows always run")
    parser.add_argument("--classifier", action="append", type=parse_classifier_case, default=None,
                        metavar="BACKBONE:SIZE:BATCH", help="replace the classifier grid (repeatable)")
    parser.add_argument("--bundle", type=Path, default=None, help="time predict with this bundle instead of building one")
    parser.add_argument("--n-images", type=int, default=None, help="synthetic images (default 2304; smoke 32)")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cuda:0, cpu")
    parser.add_argument("--ddp-cpu", type=int, default=0, metavar="N",
                        help="without GPUs, run the DDP row over gloo with N CPU processes (checks the path)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--ddp-worker", nargs=3, metavar=("CONFIG", "CACHE", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker is None and args.out is None:
        parser.error("--out is required")
    if args.budget_s is None:
        args.budget_s = 600.0 if args.smoke else 360.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ddp_worker:
        ddp_worker(*args.ddp_worker)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    temporary = args.work is None
    if temporary:
        args.work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    args.work.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.out / "suite.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    root.addHandler(console)
    try:
        results = run_suite(args)
    finally:
        if temporary and not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)
    return 0 if results["n_measured"] or results["skipped"] else 1


if __name__ == "__main__":
    sys.exit(main())
