"""The DICOM node behind a real PACS: Orthanc pushes radiographs, the results come back.

For each configuration (``--workers``, several may be given, measured side by side in
one run): a fresh Orthanc (Debian's binary, loopback ports, generated configuration, see
tests/pacs.py) holds ``--n`` radiographs; ``lungopacity listen`` runs as a subprocess;
Orthanc sends all of them to the node in one ``POST /modalities/{node}/store`` (one
association, one instance after another, as a PACS routing rule would); the node reads
each and sends SR + GSPS + Secondary Capture back to Orthanc by C-STORE.

Figures per configuration:

* latency per instance, from its C-STORE arriving at the node (the spooled file's time)
  to Orthanc's success answer to the last of its three results (the node's ``sent``
  record): p50 and p95, and its parts (waiting in the queue, reading = decode + model +
  building the three objects, sending);
* instances per minute, from the first C-STORE received to the last result stored;
* then, with ``--one-by-one K``, K more instances pushed one at a time, each after the
  previous one's results arrived: the latency of a study that does not wait behind others;
* a check through Orthanc's REST API that every study holds exactly one SR, one GSPS and
  one SC.

The radiographs are the shared real RSNA DICOMs (1024 x 1024, JPEG Baseline), each copied
under new UIDs until there are ``--n`` (the pixels repeat; the instances, series and
studies are distinct); without the shared data, synthetic 1024-pixel ones.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pacs.py --bundle demo-run/model --n 50 \\
        --workers 1 --workers 2 --out bench-pacs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pacs import NODE_AET, ORTHANC_AET, NodeProcess, Orthanc, result_instances, wait_until  # noqa: E402

SHARED_DICOMS = REPO.parent / "shared" / "data" / "rsna-dicom" / "stage_2_train_images"


def source_files(folder: Path, n: int, tag: str) -> tuple[list[Path], bool]:
    """``n`` radiographs under fresh UIDs (real RSNA pixels when the shared data is there)."""
    folder.mkdir(parents=True, exist_ok=True)
    originals = sorted(SHARED_DICOMS.glob("*.dcm")) if SHARED_DICOMS.is_dir() else []
    if not originals:
        from lungopacity.synthetic.rsna_writer import write_dicom

        rng = np.random.default_rng(0)
        for i in range(8):
            write_dicom(folder / f"synthetic_{i}.dcm", rng.integers(0, 255, (1024, 1024), dtype=np.uint8),
                        sex="F", age=50, view="PA", patient_id=f"synthetic-{i}", pixel_spacing=0.143)
        originals = sorted(folder.glob("synthetic_*.dcm"))
    paths = []
    for i in range(n):
        ds = pydicom.dcmread(originals[i % len(originals)])
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[tag, str(i), "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[tag, str(i), "series"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[tag, str(i), "sop"])
        path = folder / f"{tag}_{i:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths, (not SHARED_DICOMS.is_dir())


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def run_config(bundle: Path, workers: int, n: int, out: Path, queue: int, one_by_one: bool = False) -> dict[str, Any]:
    """One configuration; ``one_by_one`` pushes each instance alone and waits for its results (no queueing)."""
    folder = out / f"workers{workers}{'-one-by-one' if one_by_one else ''}"
    sources, synthetic = source_files(folder / "sources", n, f"bench-w{workers}-{one_by_one}-{time.time_ns()}")
    with Orthanc(folder / "orthanc") as orthanc:
        uploaded = [orthanc.upload(p.read_bytes()) for p in sources]
        spool = folder / "spool"
        with NodeProcess(bundle, spool, f"127.0.0.1:{orthanc.dicom_port}:{ORTHANC_AET}", workers=workers,
                         queue=queue, log=folder / "node.log") as node:
            orthanc.add_modality("lungopacity", NODE_AET, "127.0.0.1", node.port)
            pushed_at = time.time()
            if one_by_one:
                failed = 0
                for k, up in enumerate(uploaded, start=1):
                    failed += orthanc.store_to("lungopacity", [up["ID"]], timeout=600)["FailedInstancesCount"]
                    wait_until(lambda k=k: len(list((spool / "sent").glob("*.json"))) >= k, 600,
                               f"result set {k} sent (log: {node.log})", interval=0.05)
                answer = {"FailedInstancesCount": failed}
            else:
                answer = orthanc.store_to("lungopacity", [u["ID"] for u in uploaded], timeout=1800)
            push_seconds = time.time() - pushed_at
            wait_until(lambda: len(list((spool / "sent").glob("*.json"))) >= n, 3600,
                       f"{n} result sets sent (log: {node.log})", interval=0.5)
            done_at = time.time()
        records = [json.loads(p.read_text()) for p in (spool / "sent").glob("*.json")]
        complete = 0
        for up in uploaded:
            found = result_instances(orthanc, up["ParentStudy"])
            complete += all(len(found.get(m, [])) == 1 for m in ("SR", "PR", "OT"))
    latency = [r["sent_at"] - r["received_at"] for r in records]
    first, last = min(r["received_at"] for r in records), max(r["sent_at"] for r in records)
    return {
        "mode": "one by one" if one_by_one else "burst",
        "workers": workers,
        "n": n,
        "synthetic_sources": synthetic,
        "failed_pushes": answer.get("FailedInstancesCount"),
        "studies_with_exactly_one_sr_gsps_sc": complete,
        "latency_p50_s": percentile(latency, 50),
        "latency_p95_s": percentile(latency, 95),
        "latency_max_s": max(latency),
        "queue_wait_p50_s": percentile([r["read_started_at"] - r["received_at"] for r in records], 50),
        "read_p50_s": percentile([r["processed_at"] - r["read_started_at"] for r in records], 50),
        "send_p50_s": percentile([r["sent_at"] - r["processed_at"] for r in records], 50),
        "instances_per_minute": 60.0 * n / (last - first),
        "orthanc_push_seconds": push_seconds,
        "wall_seconds_push_to_last_result": done_at - pushed_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--workers", type=int, action="append", help="repeat to compare (default: 1)")
    parser.add_argument("--queue", type=int, default=64)
    parser.add_argument("--one-by-one", type=int, default=10,
                        help="then this many instances pushed one at a time, each after the previous results "
                             "(latency without queueing; 0: skip)")
    parser.add_argument("--out", type=Path, default=Path("bench-pacs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_config(args.bundle, w, args.n, args.out, args.queue) for w in (args.workers or [1])]
    if args.one_by_one:
        rows.append(run_config(args.bundle, 1, args.one_by_one, args.out, args.queue, one_by_one=True))
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "bundle": str(args.bundle),
                                                       "rows": rows}, indent=2))
    print(f"bundle {args.bundle}; {machine}")
    print("| push | workers | instances | latency p50 (s) | p95 (s) | queue wait p50 | read p50 | send p50 "
          "| instances/min | studies with 1 SR+GSPS+SC |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} | {r['n']} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} "
              f"| {r['queue_wait_p50_s']:.2f} | {r['read_p50_s']:.2f} | {r['send_p50_s']:.2f} "
              f"| {r['instances_per_minute']:.1f} | {r['studies_with_exactly_one_sr_gsps_sc']}/{r['n']} |")


if __name__ == "__main__":
    main()
