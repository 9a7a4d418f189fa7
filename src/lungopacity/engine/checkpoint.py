"""Checkpoints that lose nothing and run nothing: atomic writes, safe loading, the training state.

A checkpoint is written to a temporary file ``.NAME.tmp-PID`` in the same folder and
renamed over the old one (``os.replace`` is atomic on POSIX), so a run killed at any
moment leaves either the previous checkpoint or the new one, never half a file. A run
killed *during* a write (SIGKILL, out of memory) leaves its temporary file behind;
:func:`remove_stale_temp_files` deletes those when the next run starts.

Checkpoints are read with ``torch.load(weights_only=True)``: only tensors, numbers,
strings, booleans, None, lists, tuples and dicts come back, so a crafted ``last.pt`` cannot
run code. Everything this package stores is in those forms: the training and model
configs as plain dicts, metrics with Python floats, and the random generators' states as
tensors and lists (:func:`rng_state`). A file that is truncated, damaged or holds anything
else raises :class:`~lungopacity.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungopacity.errors import CheckpointError

log = logging.getLogger(__name__)

#: Version of what the training loop stores (``format_version`` in last.pt and best.pt).
#: 2: weights-only-loadable RNG states and configs; 1 (unversioned) held NumPy arrays.
CHECKPOINT_FORMAT_VERSION = 2

_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the previous checkpoint at ``path`` is untouched
        raise


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``.NAME.tmp-PID``) that a killed writer left in ``folder``.

    A run folder has one writer at a time (rank 0 of one training job), so any temporary
    file of another process is an interrupted write: the complete file it was to replace
    is still there. Returns the files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for candidate in folder.iterdir():
        match = _TEMP_FILE.match(candidate.name)
        if not match or int(match["pid"]) == os.getpid() or not candidate.is_file():
            continue
        size = candidate.stat().st_size
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
        log.info("%s: removed the temporary file of an interrupted write (%d bytes)", candidate, size)
    return removed


# -------------------------------------------------------------------- plain values


def to_plain(value: Any) -> Any:
    """``value`` as plain Python (dicts, lists, str, int, float, bool, None) for checkpoints.

    NumPy scalars become Python numbers, arrays and tuples lists, paths strings; tensors
    are kept. Used for configs, metrics and history so that ``weights_only`` loading
    accepts them.
    """
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------- loading

# NumPy scalars (not arrays): checkpoints written before format 2 hold a few in their
# metrics. Rebuilding one from its dtype and bytes runs no code.
_NUMPY_SCALAR_GLOBALS: list[Any] = [np.dtype]
with contextlib.suppress(AttributeError):
    _NUMPY_SCALAR_GLOBALS.append(np._core.multiarray.scalar)  # type: ignore[attr-defined]
with contextlib.suppress(AttributeError):
    _NUMPY_SCALAR_GLOBALS += [
        getattr(np.dtypes, name)
        for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType")
        if hasattr(np.dtypes, name)
    ]


@contextlib.contextmanager
def _numpy_scalars_allowed() -> Iterator[None]:
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if safe_globals is None:
        yield
        return
    with safe_globals(_NUMPY_SCALAR_GLOBALS):
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    required: Iterable[str] = (),
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``: no code in the file can run.

    Args:
        path: a ``.pt`` file written by this package.
        map_location: where the tensors go.
        required: keys the checkpoint must hold (e.g. ``("model", "model_config")``).

    Raises:
        CheckpointError: the file is missing, truncated or damaged, holds anything other
            than tensors and plain values (refused unread), or lacks a required key.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    try:
        with _numpy_scalars_allowed():
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(
                path,
                "refused: it holds objects other than tensors and plain values (not a checkpoint this version "
                "of lungopacity wrote, or tampered with); it was not run",
            ) from None
        raise CheckpointError(path, f"damaged or truncated ({_first_line(exc)})") from None
    except Exception as exc:  # zip reader, EOF, storage errors: every way a damaged file fails
        raise CheckpointError(path, f"damaged or truncated ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(path, f"not a lungopacity checkpoint (holds a {type(checkpoint).__name__})")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise CheckpointError(path, f"incomplete checkpoint: lacks {', '.join(missing)}")
    return checkpoint


# ---------------------------------------------------------------- random generators


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step touches, as tensors and lists."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [int(version), [int(k) for k in internal], gauss_next],
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(k) for k in internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["bit_generator"],
        np.asarray(numpy_state["keys"].numpy() if isinstance(numpy_state["keys"], torch.Tensor) else numpy_state["keys"],
                   dtype=np.uint32),
        int(numpy_state["pos"]),
        int(numpy_state["has_gauss"]),
        float(numpy_state["cached_gaussian"]),
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
