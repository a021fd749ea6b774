"""Load check of `stablecascade serve` (not a timed test): N concurrent clients against the HTTP API.

Starts `python -m stablecascade.cli serve` with the built-in nano model on 127.0.0.1, lets `--clients` threads each
send `--requests` text-to-image jobs with ?wait=true (64x64, 1 Stage C + 1 Stage B step unless told otherwise), and
reports accepted / 429 / other answers, p50/p95 latency of the accepted ones, the server's RSS before and after, and
whether every accepted job's images can still be fetched afterwards (finished jobs are kept --keep-seconds).

    python bench/bench_load_server.py --clients 16 --requests 3
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=3, help="jobs per client, one after another")
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--steps", type=int, default=1, help="Stage C steps per job (Stage B: 1)")
    args = p.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "stablecascade.cli", "serve", "--port", str(port),
                               "--max-queue", str(args.max_queue), "--prior", "nano", "--decoder", "nano"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(timeout=600) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if client.get(f"{base}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not come up")
                time.sleep(0.2)
            rss_before = rss_mb(server.pid)

            answers, latencies, accepted = collections.Counter(), [], []
            lock = threading.Lock()

            def run_client(c: int) -> None:
                with httpx.Client(timeout=600) as own:
                    for r in range(args.requests):
                        body = {"prompt": "a red circle at the top left on a blue background", "seed": c * 100 + r,
                                "width": 64, "height": 64, "prior_steps": args.steps, "decoder_steps": 1}
                        start = time.perf_counter()
                        try:
                            reply = own.post(f"{base}/v1/txt2img?wait=true", json=body)
                            status = reply.status_code
                        except httpx.HTTPError as e:
                            status = type(e).__name__
                        elapsed = time.perf_counter() - start
                        with lock:
                            answers[status] += 1
                            if status == 200:
                                latencies.append(elapsed)
                                accepted.append(reply.json())

            started = time.perf_counter()
            threads = [threading.Thread(target=run_client, args=(c,)) for c in range(args.clients)]
            for t in threads:
                t.start()
            health_during = []
            while any(t.is_alive() for t in threads):  # /health must keep answering under load
                t0 = time.perf_counter()
                client.get(f"{base}/health")
                health_during.append(time.perf_counter() - t0)
                time.sleep(0.5)
            for t in threads:
                t.join()
            wall = time.perf_counter() - started

            fetched = sum(client.get(f"{base}{image['url']}").status_code == 200
                          for job in accepted for image in job["images"])
            images = sum(len(job["images"]) for job in accepted)
            rss_after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)

    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    result = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "clients": args.clients, "requests_per_client": args.requests,
        "max_queue": args.max_queue, "wall_s": round(wall, 1),
        "accepted": answers.get(200, 0), "rejected_429": answers.get(429, 0),
        "errors": {str(k): v for k, v in answers.items() if k not in (200, 429)},
        "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_p95_s": round(q[18], 2) if latencies else None,
        "health_max_s": round(max(health_during), 3) if health_during else None,
        "rss_before_mb": round(rss_before), "rss_after_mb": round(rss_after),
        "images_fetched": f"{fetched}/{images}",
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
