"""Load-test the web service on the loopback interface: latency percentiles and throughput.

Run: ``.venv/bin/python benchmarks/bench_service_load.py --bundle MODEL [--image FILE]``
or, as a smoke run without a model, ``... --fake``.

The service runs in a separate process (uvicorn on 127.0.0.1, a free port) so that the
client's threads do not compete with it for the interpreter lock. This process sends
``--requests`` uploads (default 200) from ``--concurrency`` threads (default 8) and stops
early at ``--time-limit`` seconds. It reports the answers by status, p50/p95/max latency
and requests per second, and the server's own mean queue wait and handling time.

``--fake`` serves the deterministic ``FakePredictor`` of tests/test_service.py, slowed by
``--fake-seconds`` per reading to stand in for a model.

``--query`` adds a query string to every upload (e.g. ``heatmap=true``); the report gives
the answers' sizes too, and ``--json-out FILE`` writes the figures as JSON (what
benchmarks/bench_viewer.py collects). The script runs against whichever ``lungopacity``
is on the path, so the same script measures an older checkout (``PYTHONPATH=OLD/src``).

``--slow-clients N`` adds hostile clients for the whole run: N connections that send an
upload's headers and then one byte every ``--slow-every`` seconds (default 2). They hold
upload slots, not inference workers, and the server cuts each off after its stall
timeout (``--stall-timeout``); the report says how they ended. The server runs the
production configuration (``service.server.uvicorn_config``).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import select
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def synthetic_radiograph(size: int = 1024, seed: int = 0) -> bytes:
    """An RSNA-sized grey PNG with smooth structure and noise (about 1 MB)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-(((xs - 0.32) / 0.15) ** 2 + ((ys - 0.5) / 0.3) ** 2)) + np.exp(
        -(((xs - 0.68) / 0.15) ** 2 + ((ys - 0.5) / 0.3) ** 2)
    )
    pixels = 0.75 - 0.45 * lungs + rng.normal(0, 0.03, size=(size, size))
    buffer = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def _serve_child(options: dict[str, Any], port_out: Any) -> None:
    """Child process: build the app, bind 127.0.0.1:0, report the port, serve until killed."""
    import logging

    import uvicorn

    from lungopacity.service import create_app, uvicorn_config

    logging.basicConfig(level=logging.WARNING)
    if options["fake"]:
        sys.path.insert(0, str(REPO / "tests"))
        from test_service import FakePredictor

        class TimedFake(FakePredictor):
            def read(self, *args: Any, **kwargs: Any) -> Any:
                time.sleep(options["fake_seconds"])
                return super().read(*args, **kwargs)

        source: Any = TimedFake()
    else:
        source = options["bundle"]
    app = create_app(
        source,
        device=options["device"],
        max_concurrent=options["max_concurrent"],
        max_queue=options["max_queue"],
        stall_timeout=options["stall_timeout"],
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port_out.send(sock.getsockname()[1])
    port_out.close()
    uvicorn.Server(uvicorn_config(app, log_level="warning", access_log=False)).run(sockets=[sock])


def slow_client(port: int, every: float, stop: threading.Event, outcome: list[str]) -> None:
    """Send an upload's headers, then one body byte every ``every`` s until answered or stopped.

    Reconnects after each answer, so it keeps holding a slot for the whole run.
    """
    body = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n' + b"\0" * 10_000
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {len(body) + 8}\r\n\r\n").encode()
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(head)
                for i in range(len(body)):
                    if stop.is_set():
                        return
                    if select.select([conn], [], [], every)[0]:
                        answer = conn.recv(64)
                        outcome.append(answer[9:12].decode("ascii", "replace") if answer else "closed")
                        break
                    conn.sendall(body[i : i + 1])
        except OSError as exc:
            outcome.append(type(exc).__name__)


def wait_ready(client: Any, url: str, timeout: float) -> str:
    """Poll /readyz until the model is loaded; return its version."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            response = client.get(url + "/readyz", timeout=5)
            if response.status_code == 200:
                return response.json()["model_version"]
            last = response.text
        except Exception as exc:  # noqa: BLE001 - the server may still be starting
            last = repr(exc)
        time.sleep(0.2)
    raise SystemExit(f"the service did not become ready in {timeout:.0f} s: {last}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="model bundle to serve")
    source.add_argument("--fake", action="store_true", help="serve the test FakePredictor (smoke run)")
    parser.add_argument("--image", type=Path, help="file to upload (default: a synthetic 1024x1024 PNG; 256x256 with --fake)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=120.0, help="stop sending after this many seconds")
    parser.add_argument("--max-concurrent", type=int, default=2, help="the server's inference workers")
    parser.add_argument("--max-queue", type=int, default=8, help="the server's waiting line")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fake-seconds", type=float, default=0.05, help="sleep per fake reading")
    parser.add_argument("--no-images", action="store_true", help="ask for no pictures (images=false)")
    parser.add_argument("--query", default="", help="extra query string for every upload, e.g. heatmap=true")
    parser.add_argument("--json-out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--slow-clients", type=int, default=0, help="hostile clients trickling 1 byte at a time")
    parser.add_argument("--slow-every", type=float, default=2.0, help="seconds between a slow client's bytes")
    parser.add_argument("--stall-timeout", type=float, default=10.0, help="the server's upload stall timeout")
    args = parser.parse_args()
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 64 or not 0 <= args.slow_clients <= 64:
        raise SystemExit("--requests must be in 1..10000, --concurrency in 1..64 and --slow-clients in 0..64")

    import httpx

    # The fake's own picture drawing costs seconds on a 1024-pixel image; its smoke run
    # uses a small one so that it measures the service, not the fake.
    payload = args.image.read_bytes() if args.image else synthetic_radiograph(256 if args.fake else 1024)
    options = {
        "fake": args.fake, "bundle": str(args.bundle) if args.bundle else None, "device": args.device,
        "fake_seconds": args.fake_seconds, "max_concurrent": args.max_concurrent, "max_queue": args.max_queue,
        "stall_timeout": args.stall_timeout,
    }
    context = mp.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    server = context.Process(target=_serve_child, args=(options, sender), daemon=True)
    server.start()
    stop_slow = threading.Event()
    slow_outcomes: list[str] = []
    try:
        if not receiver.poll(120):
            raise SystemExit("the service process did not start")
        url = f"http://127.0.0.1:{receiver.recv()}"
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        with httpx.Client(limits=limits, timeout=120) as client:
            version = wait_ready(client, url, timeout=300)
            print(f"service {url}, model {version}; upload {len(payload) / 1e6:.2f} MB; "
                  f"{args.requests} requests at concurrency {args.concurrency}; "
                  f"server workers {args.max_concurrent}, queue {args.max_queue}; "
                  f"{args.slow_clients} slow clients (1 byte / {args.slow_every:g} s, stall timeout {args.stall_timeout:g} s)")
            port = int(url.rsplit(":", 1)[1])
            slow_threads = [
                threading.Thread(target=slow_client, args=(port, args.slow_every, stop_slow, slow_outcomes), daemon=True)
                for _ in range(args.slow_clients)
            ]
            for thread in slow_threads:
                thread.start()
            time.sleep(1.0 if slow_threads else 0.0)  # let them take their upload slots
            client.post(url + "/v1/predict", files={"file": ("warmup", payload)})  # first call pays one-off costs
            deadline = time.monotonic() + args.time_limit
            lock = threading.Lock()
            latencies: list[float] = []
            statuses: Counter[str] = Counter()
            server_side: list[tuple[float, float]] = []
            query = "&".join(q for q in ("images=false" if args.no_images else "", args.query) if q)
            target = url + "/v1/predict" + ("?" + query if query else "")
            sizes: list[int] = []

            def one(_: int) -> None:
                if time.monotonic() > deadline:
                    with lock:
                        statuses["skipped (time limit)"] += 1
                    return
                began = time.perf_counter()
                try:
                    response = client.post(target, files={"file": ("upload", payload)})
                    status = str(response.status_code)
                    size = len(response.content)
                    timings = response.json().get("timings") if response.status_code == 200 else None
                except Exception as exc:  # noqa: BLE001 - counted as an error
                    status, timings = type(exc).__name__, None
                elapsed = time.perf_counter() - began
                with lock:
                    statuses[status] += 1
                    if status == "200":
                        latencies.append(elapsed)
                        sizes.append(size)
                        server_side.append((timings["queue_wait"], timings["server_total"]))

            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - started
    finally:
        stop_slow.set()
        server.terminate()
        server.join(timeout=10)

    errors = sum(n for status, n in statuses.items() if status != "200")
    print(f"answers: {dict(sorted(statuses.items()))}; errors: {errors}")
    if latencies:
        print(f"latency (200s): p50 {percentile(latencies, 50) * 1000:.0f} ms, "
              f"p95 {percentile(latencies, 95) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
        print(f"server side: mean queue wait {statistics.mean(q for q, _ in server_side) * 1000:.0f} ms, "
              f"mean handling {statistics.mean(t for _, t in server_side) * 1000:.0f} ms")
    print(f"throughput: {len(latencies) / wall:.2f} requests/s ({len(latencies)} ok in {wall:.1f} s)")
    if sizes:
        print(f"answer size: median {statistics.median(sizes) / 1000:.1f} kB, max {max(sizes) / 1000:.1f} kB")
    if args.json_out:
        import json

        figures = {
            "requests": args.requests, "concurrency": args.concurrency, "query": target.split("/v1/predict", 1)[1],
            "upload_bytes": len(payload), "ok": len(latencies), "errors": errors, "wall_s": wall,
            "p50_s": percentile(latencies, 50) if latencies else None,
            "p95_s": percentile(latencies, 95) if latencies else None,
            "max_s": max(latencies) if latencies else None,
            "throughput_rps": len(latencies) / wall if wall else None,
            "answer_bytes_median": statistics.median(sizes) if sizes else None,
            "server_handling_mean_s": statistics.mean(t for _, t in server_side) if server_side else None,
        }
        args.json_out.write_text(json.dumps(figures, indent=2))
    if args.slow_clients:
        print(f"slow clients' answers: {dict(sorted(Counter(slow_outcomes).items()))}")


if __name__ == "__main__":
    main()
