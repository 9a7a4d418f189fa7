"""Fuzz the image reader: N mutated files, outcomes, peak memory and time per case.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_fuzz.py --n 10000 --out fuzz.json

Cases come from ``tests/fuzzing.py`` (seeded: the same ``--seed`` gives the same bytes):
mutations of real-format seed files (synthetic RSNA JPEG DICOM, 12/16-bit, Deflated, RLE,
JPEG 2000, JPEG-LS, JPEG Lossless and 12-bit JPEG DICOMs, PNG/JPEG/TIFF, the 16 shared
real DICOMs when present) and decompression bombs. Each case is read with
``lungopacity.io.read_image`` at the default limits (``DEFAULT_MAX_PIXELS``).

Workers run chunks of cases in subprocesses under an address-space limit (``--rlimit-gb``,
so a runaway case cannot take the shared machine: it becomes a MemoryError outcome).
Per case a worker resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), reads,
and records ``VmHWM - VmRSS(before)``: the peak memory the read itself added. A worker
that dies or hangs marks its current case ``crash``/``hang`` and the run goes on.

``--variant before`` runs the same cases against the reader of another commit
(``--before-ref``, default the commit before the hardening), extracted with ``git archive``
into a temporary folder; its ``apply_window`` flag stands in for the window policies
(``auto``/``file`` -> True). A reference table reads a few large, valid or hostile files
alone in fresh processes, before and after, and gives the peak memory per decoded
megapixel.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BEFORE_REF = "20104f3"
#: glibc: serve every allocation over 64 KiB by mmap and give freed memory back, so that
#: each case's peak RSS shows its own allocations rather than heap left by earlier cases.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


# --------------------------------------------------------------------------- worker side


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _reader(variant: str):
    from lungopacity.io import read_image

    if variant == "after":
        return read_image

    def before(data, *, name, window, min_size):  # the old signature: apply_window only
        return read_image(data, name=name, apply_window=window != "none", min_size=min_size)

    return before


def _classify(exc: BaseException) -> str:
    from lungopacity.io import ImageReadError

    if isinstance(exc, MemoryError):
        return "memory_error"
    if isinstance(exc, ImageReadError):
        return "memory_error" if "memory" in str(exc).lower() and "needs more" in str(exc).lower() else "refused"
    kind = type(exc)
    return f"escape:{kind.__name__ if kind.__module__ == 'builtins' else kind.__module__ + '.' + kind.__name__}"


def worker(corpus: Path, start: int, end: int, seed: int, variant: str, out: Path) -> None:
    import logging
    import warnings

    import numpy as np

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    sys.path.insert(0, str(REPO / "tests"))
    from fuzzing import iter_cases

    with open(corpus, "rb") as fh:
        seeds, bombs = pickle.load(fh)
    read = _reader(variant)
    can_reset = _reset_peak()
    with open(out, "a") as results:
        for case in iter_cases(end, seed=seed, seeds=seeds, bombs=bombs):
            if case.index < start:
                continue
            can_reset and _reset_peak()
            before = _status("VmRSS")
            t0 = time.perf_counter()
            record = {"i": case.index, "seed": case.seed, "mutation": case.mutation, "bytes": len(case.data)}
            try:
                pixels, header = read(case.data, name=f"case{case.index}", window=case.window, min_size=case.min_size)
                lo, hi = float(pixels.min()), float(pixels.max())
                if not (np.isfinite(lo) and np.isfinite(hi)):
                    outcome = "nonfinite"
                elif lo < 0 or hi > 1 or pixels.dtype != np.float32:
                    outcome = "out_of_range"
                else:
                    outcome = "ok"
                record["decoded_px"] = int(pixels.size)
                del pixels
            except BaseException as exc:  # noqa: BLE001 - classifying is the point
                if isinstance(exc, KeyboardInterrupt):
                    raise
                outcome = _classify(exc)
                if outcome.startswith("escape"):
                    record["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            record["s"] = time.perf_counter() - t0
            record["peak"] = max(0, _status("VmHWM") - before) if can_reset else None
            record["outcome"] = outcome
            results.write(json.dumps(record) + "\n")
            results.flush()


def _limit_memory(gb: float):
    def apply() -> None:
        import resource

        limit = int(gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


# --------------------------------------------------------------------------- parent side


def extract_before(ref: str, into: Path) -> Path:
    """The package as it was at ``ref``, importable from ``into/src``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src/lungopacity"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def run_variant(variant: str, src: Path, corpus: Path, args: argparse.Namespace, workdir: Path) -> list[dict]:
    results_path = workdir / f"{variant}.jsonl"
    results_path.unlink(missing_ok=True)
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = 0
    done: dict[int, dict] = {}
    while start < args.n:
        end = min(args.n, start + args.chunk)
        cmd = [sys.executable, __file__, "--worker", str(corpus), str(start), str(end), str(args.seed), variant, str(results_path)]
        status = "ok"
        try:
            proc = subprocess.run(cmd, env=env, preexec_fn=_limit_memory(args.rlimit_gb), timeout=args.chunk_timeout,
                                  capture_output=True)
            if proc.returncode != 0:
                status = "crash"
        except subprocess.TimeoutExpired:
            status = "hang"
        done = {r["i"]: r for r in _load(results_path)}
        if status != "ok":
            missing = next((i for i in range(start, end) if i not in done), None)
            if missing is not None:
                done[missing] = {"i": missing, "outcome": status, "seed": "?", "mutation": "?", "s": None, "peak": None}
                with open(results_path, "a") as fh:
                    fh.write(json.dumps(done[missing]) + "\n")
                start = missing + 1
                continue
        start = end
        print(f"  {variant}: {len(done)}/{args.n} cases", file=sys.stderr, flush=True)
    return [done[i] for i in sorted(done)]


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(records: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    times = sorted(r["s"] for r in records if r.get("s") is not None)
    peaks = sorted(r["peak"] for r in records if r.get("peak") is not None)
    per_mpx = sorted(
        r["peak"] / (r["decoded_px"] / 1e6) / 1e6
        for r in records
        if r["outcome"] == "ok" and r.get("peak") is not None and r.get("decoded_px", 0) >= 1_000_000
    )

    def q(values: list[float], p: float) -> float | None:
        return values[min(len(values) - 1, int(p * len(values)))] if values else None

    escapes = {}
    for r in records:
        if r["outcome"].startswith("escape") or r["outcome"] in ("nonfinite", "memory_error", "crash", "hang"):
            key = f"{r['outcome']} {r.get('seed')}/{r.get('mutation')}"
            escapes[key] = escapes.get(key, 0) + 1
    return {
        "cases": len(records),
        "outcomes": dict(sorted(counts.items())),
        "time_s": {"median": q(times, 0.5), "p99": q(times, 0.99), "max": times[-1] if times else None,
                   "mean": statistics.fmean(times) if times else None, "total": sum(times)},
        "peak_mb": {"median": q(peaks, 0.5) and q(peaks, 0.5) / 1e6, "p99": q(peaks, 0.99) and q(peaks, 0.99) / 1e6,
                    "max": peaks[-1] / 1e6 if peaks else None, "over_1gb": sum(p > 1e9 for p in peaks)},
        "peak_mb_per_decoded_mpx": {"n": len(per_mpx), "median": q(per_mpx, 0.5), "max": per_mpx[-1] if per_mpx else None},
        "breaches": dict(sorted(escapes.items(), key=lambda kv: -kv[1])[:40]),
        "largest_peaks": [
            {k: r.get(k) for k in ("i", "seed", "mutation", "outcome", "peak", "s", "decoded_px")}
            for r in sorted(records, key=lambda r: -(r.get("peak") or 0))[:8]
        ],
        "slowest": [
            {k: r.get(k) for k in ("i", "seed", "mutation", "outcome", "peak", "s")}
            for r in sorted(records, key=lambda r: -(r.get("s") or 0))[:5]
        ],
    }


# --------------------------------------------------------------------------- reference files


def reference_files(workdir: Path) -> dict[str, tuple[Path, dict]]:
    """Large files read alone, before and after: path and read_image keyword arguments."""
    import io
    import struct

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from fuzzing import SHARED_DICOMS, _dataset, _deflated_dicom, _encapsulated, _save

    files: dict[str, tuple[Path, dict]] = {}

    def put(name: str, data: bytes, **kwargs) -> None:
        path = workdir / f"ref_{name}"
        path.write_bytes(data)
        files[name] = (path, kwargs)

    real = sorted(SHARED_DICOMS.glob("*.dcm"))
    if real:
        put("rsna_jpeg_dicom_1024", real[0].read_bytes())
    rng = np.random.default_rng(0)
    side = 4096
    ramp = (np.add.outer(np.arange(side), np.arange(side)) * 7 % 4096).astype(np.uint16)
    put("dicom_u16_4096_uncompressed", _save(_dataset(ramp, bits_stored=12)))
    put("dicom_deflate_u8_8192_valid", _deflated_dicom((8192, 8192)))
    rgb = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    rgb[:, :, 1] = rgb[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    put("png_rgb_4096", buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=80)
    put("jpeg_rgb_4096", buf.getvalue())
    # The probe's cases: a tiny RGB JPEG declaring 8190 x 8190 ...
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=50)
    tiny = bytearray(buf.getvalue())
    i = tiny.find(b"\xff\xc0")
    tiny[i + 5 : i + 9] = struct.pack(">HH", 8190, 8190)
    put("jpeg_rgb_735B_declares_8190", bytes(tiny))
    # ... a DICOM-wrapped JPEG declaring 9000 x 9000 (refused by the service's 8192^2 limit) ...
    small = rng.integers(0, 255, (1024, 1024), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, format="JPEG", quality=95)
    jpeg = bytearray(buf.getvalue())
    i = jpeg.find(b"\xff\xc0")
    jpeg[i + 5 : i + 9] = struct.pack(">HH", 9000, 9000)
    ds = _dataset(np.zeros((2, 2), np.uint8), bits_stored=8)
    ds.Rows, ds.Columns = 9000, 9000
    put("dicom_jpeg_declares_9000_limit_8192sq", _encapsulated(ds, bytes(jpeg), "1.2.840.10008.1.2.4.50"), max_pixels=8192 * 8192)
    # ... and a ~557 KB Deflated DICOM inflating to ~575 MB (16-bit, declared over the limit).
    put("dicom_deflate_bomb_575MB", _deflated_dicom((16960, 16960), pixel_bytes=575_000_000))
    return files


REF_SCRIPT = r"""
import json, sys, time, warnings, logging
warnings.simplefilter("ignore"); logging.disable(logging.WARNING)
path, variant, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
from lungopacity.io import read_image
data = open(path, "rb").read()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key): return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
t0 = time.perf_counter()
try:
    pixels, header = read_image(data, name="ref", **kwargs)
    outcome, decoded = "ok", int(pixels.size)
except MemoryError:
    outcome, decoded = "memory_error", 0
except Exception as exc:
    outcome, decoded = type(exc).__name__ + ": " + str(exc)[:90], 0
print(json.dumps({"outcome": outcome, "decoded_px": decoded, "peak": status("VmHWM") - before,
                  "s": time.perf_counter() - t0, "file_bytes": len(data)}))
"""


def run_references(srcs: dict[str, Path], workdir: Path, rlimit_gb: float) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for name, (path, kwargs) in reference_files(workdir).items():
        table[name] = {}
        for variant, src in srcs.items():
            env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, "-c", REF_SCRIPT, str(path), variant, json.dumps(kwargs)], env=env,
                                  capture_output=True, text=True, preexec_fn=_limit_memory(rlimit_gb), timeout=600)
            try:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                row = {"outcome": f"process died (rc {proc.returncode})", "peak": None, "decoded_px": 0}
            if row.get("decoded_px"):
                row["mb_per_decoded_mpx"] = row["peak"] / 1e6 / (row["decoded_px"] / 1e6)
            table[name][variant] = row
            print(f"  ref {name} {variant}: {row}", file=sys.stderr, flush=True)
    return table


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        corpus, start, end, seed, variant, out = sys.argv[2:8]
        worker(Path(corpus), int(start), int(end), int(seed), variant, Path(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--chunk", type=int, default=500, help="cases per worker process")
    parser.add_argument("--chunk-timeout", type=float, default=1800)
    parser.add_argument("--variant", choices=("after", "before", "both"), default="both")
    parser.add_argument("--before-ref", default=DEFAULT_BEFORE_REF)
    parser.add_argument("--bomb-scale", type=int, default=4, help="bombs inflate to up to ~72 MB x scale")
    parser.add_argument("--rlimit-gb", type=float, default=4.0, help="address-space limit of each worker")
    parser.add_argument("--no-references", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "src"))
    from fuzzing import make_bombs, make_seeds

    with tempfile.TemporaryDirectory(prefix="bench_fuzz_") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        seeds, bombs = make_seeds(), make_bombs(scale=args.bomb_scale)
        corpus = workdir / "corpus.pkl"
        corpus.write_bytes(pickle.dumps((seeds, bombs)))
        print(f"corpus: {len(seeds)} seeds, {len(bombs)} bombs ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        srcs = {"after": REPO / "src"}
        if args.variant in ("before", "both"):
            srcs["before"] = extract_before(args.before_ref, workdir)
        if args.variant == "before":
            srcs.pop("after")
        summary: dict = {"n": args.n, "seed": args.seed, "bomb_scale": args.bomb_scale, "rlimit_gb": args.rlimit_gb,
                         "before_ref": args.before_ref, "seeds": sorted(seeds), "bombs": sorted(bombs), "variants": {}}
        for variant, src in srcs.items():
            t = time.perf_counter()
            records = run_variant(variant, src, corpus, args, workdir)
            summary["variants"][variant] = {**summarise(records), "wall_s": time.perf_counter() - t}
        if not args.no_references:
            summary["references"] = run_references(srcs, workdir, args.rlimit_gb)
    text = json.dumps(summary, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
