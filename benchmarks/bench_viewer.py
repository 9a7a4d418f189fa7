"""Pictures for people, before and after: web readings and ``predict``, side by side in one run.

Run (under ``flock /work/wt/cpu.lock`` on the shared machine)::

    git worktree add --detach /tmp/old 20511ce
    PYTHONPATH=src .venv/bin/python benchmarks/bench_viewer.py --bundle runs/viewer/demo/model \\
        --old-src /tmp/old/src --dicoms /work/shared/data/rsna-dicom/stage_2_train_images --out /tmp/bench

Each measurement runs in a subprocess with ``PYTHONPATH`` set to the old or the new
source tree (the same scripts, the same bundle, the same inputs), old and new
interleaved:

* the web service (benchmarks/bench_service_load.py): a 1024 x 1024 PNG uploaded
  ``--requests`` times at concurrency 1 and 8 with pictures (``images=true``, the
  default: the old code embeds an overlay and a heatmap PNG, the new one a display JPEG
  and the boxes as numbers), and, new only, with ``heatmap=true`` (what the page asks
  for when the heatmap is switched on); p50/p95 latency and the answer's size;
* ``lungopacity predict`` on the ``--dicoms`` folder with and without pictures
  (``--no-images``): the wall time of the whole command (start-up, bundle loading and
  all), best of ``--repeats`` after one warm-up run of each tree, and the bytes of
  pictures written.

The figures go to ``OUT/figures.json`` and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW_SRC = HERE.parent / "src"


def run_env(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def service(src: Path, bundle: Path, out: Path, name: str, concurrency: int, requests: int,
            query: str = "", image: Path | None = None) -> dict:
    result = out / f"service_{name}.json"
    command = [sys.executable, str(HERE / "bench_service_load.py"), "--bundle", str(bundle),
               "--concurrency", str(concurrency), "--requests", str(requests), "--time-limit", "300",
               "--json-out", str(result)]
    if query:
        command += ["--query", query]
    if image is not None:
        command += ["--image", str(image)]
    completed = subprocess.run(command, env=run_env(src), capture_output=True, text=True, timeout=900)
    print(completed.stdout.strip(), file=sys.stderr)
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{name}: bench_service_load failed")
    return json.loads(result.read_text())


def predict(src: Path, bundle: Path, dicoms: Path, out: Path, images: bool) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "lungopacity.cli", "predict", str(dicoms), "--bundle", str(bundle),
               "--out", str(out), "--device", "cpu", "--images" if images else "--no-images"]
    began = time.perf_counter()
    completed = subprocess.run(command, env=run_env(src), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - began
    if completed.returncode != 0:
        print(completed.stdout[-2000:], completed.stderr[-3000:], file=sys.stderr)
        raise SystemExit("predict failed")
    pictures = sum(f.stat().st_size for f in (out / "overlays").glob("*.png")) if (out / "overlays").exists() else 0
    return wall, pictures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--old-src", type=Path, required=True, help="src/ of the old checkout (e.g. main at 20511ce)")
    parser.add_argument("--dicoms", type=Path, required=True, help="folder of DICOMs for predict")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=30, help="uploads per service measurement")
    parser.add_argument("--repeats", type=int, default=2, help="predict runs per variant (best is kept)")
    parser.add_argument("--dicom-upload", type=Path, help="also time one real DICOM upload at concurrency 1")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trees = {"old": args.old_src.resolve(), "new": NEW_SRC}
    figures: dict = {"service": {}, "predict": {}}

    for concurrency in (1, 8):
        n = args.requests if concurrency == 1 else max(args.requests, 4 * concurrency)
        for code in ("old", "new"):
            key = f"{code}_c{concurrency}"
            figures["service"][key] = service(trees[code], args.bundle, args.out, key, concurrency, n)
        key = f"new_heatmap_c{concurrency}"
        figures["service"][key] = service(NEW_SRC, args.bundle, args.out, key, concurrency, n, "heatmap=true")
    if args.dicom_upload:
        for code in ("old", "new"):
            key = f"{code}_dicom_c1"
            figures["service"][key] = service(trees[code], args.bundle, args.out, key, 1, args.requests,
                                              image=args.dicom_upload)

    for code in ("old", "new"):  # warm the file cache and the imports; not counted
        predict(trees[code], args.bundle, args.dicoms, args.out / f"predict_warmup_{code}", False)
    for repeat in range(args.repeats):
        for images in (False, True):
            for code in ("old", "new"):
                key = f"{code}_{'images' if images else 'no_images'}"
                wall, pictures = predict(trees[code], args.bundle, args.dicoms, args.out / f"predict_{key}", images)
                print(f"predict {key} #{repeat + 1}: {wall:.1f} s, pictures {pictures / 1e6:.1f} MB", file=sys.stderr)
                entry = figures["predict"].setdefault(key, {"walls_s": [], "picture_bytes": pictures})
                entry["walls_s"].append(wall)
    for entry in figures["predict"].values():
        entry["best_s"] = min(entry["walls_s"])
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2))

    s = figures["service"]
    print("| web request (1024 x 1024 PNG) | p50 | p95 | answer |")
    print("|---|---|---|---|")
    for key, label in (("old_c1", "old, pictures, concurrency 1"), ("new_c1", "new, pictures, concurrency 1"),
                       ("new_heatmap_c1", "new, pictures + heatmap, concurrency 1"),
                       ("old_c8", "old, pictures, concurrency 8"), ("new_c8", "new, pictures, concurrency 8"),
                       ("new_heatmap_c8", "new, pictures + heatmap, concurrency 8"),
                       ("old_dicom_c1", "old, real 1024 DICOM, concurrency 1"),
                       ("new_dicom_c1", "new, real 1024 DICOM, concurrency 1")):
        if key in s:
            f = s[key]
            print(f"| {label} | {f['p50_s'] * 1000:.0f} ms | {f['p95_s'] * 1000:.0f} ms | "
                  f"{f['answer_bytes_median'] / 1000:.0f} kB |")
    p = figures["predict"]
    print()
    print("| predict, 16 real DICOMs | wall (best) | pictures written | with / without pictures |")
    print("|---|---|---|---|")
    for code in ("old", "new"):
        base = p[f"{code}_no_images"]["best_s"]
        for kind in ("no_images", "images"):
            f = p[f"{code}_{kind}"]
            print(f"| {code}, {kind.replace('_', ' ')} | {f['best_s']:.1f} s | {f['picture_bytes'] / 1e6:.1f} MB | "
                  f"{f['best_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
