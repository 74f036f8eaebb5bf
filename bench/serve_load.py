"""Load on the served model: `mlflow models serve` on 127.0.0.1 driven by concurrent clients.

    python -m bench.serve_load                          # models:/mnist-cnn@champion, 8 clients, 30 s per batch size
    python -m bench.serve_load --seconds 5 --model runs:/<run_id>/classifier

For each batch size (1 and 64 images) the clients send requests back to back for `--seconds`
after a warm-up; it reports images/s, p50/p99 latency, errors, and the resident memory of the
server's processes at the start and end of the measurement. Prints a table and writes
bench/serve_results.json. MLFLOW_TRACKING_URI as for the pipeline (default sqlite:///mlflow.db).
The clients run on the same machine as the server and take part of its CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import psutil

from bench.benchmark import cpu_model

OUT = Path(__file__).with_name("serve_results.json")
BODIES = 4  # distinct request bodies per batch size, sent in turn


@dataclass
class Server:
    url: str
    host: str
    port: int
    proc: subprocess.Popen

    def rss_mb(self) -> float:
        """Resident memory of the server: the `mlflow models serve` process and all its children."""
        root = psutil.Process(self.proc.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model_uri: str, log: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Iterator[Server]:
    """`mlflow models serve` of `model_uri` on a free port of 127.0.0.1, stopped (with its workers) on exit."""
    port = free_port()
    environ = {**os.environ, **(env or {})}
    # mlflow starts `uvicorn` by name: the venv's bin goes first on PATH.
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}"
    cmd = ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", "127.0.0.1", port, proc)
    try:
        deadline = time.monotonic() + timeout
        while not ping(server):
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the CLI and uvicorn
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ping(server: Server) -> bool:
    try:
        status, _ = request(server, b"", method="GET", path="/ping", timeout=2)
        return status == 200
    except OSError:
        return False


def request(
    server: Server,
    body: bytes,
    content_type: str | None = "application/json",
    method: str = "POST",
    path: str = "/invocations",
    timeout: float = 60,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, bytes]:
    """One HTTP request; (status, body). With `conn`, on that kept-alive connection."""
    c = conn or http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    headers = {} if content_type is None else {"Content-Type": content_type}
    try:
        c.request(method, path, body=body, headers=headers)
        response = c.getresponse()
        return response.status, response.read()
    finally:
        if conn is None:
            c.close()


def bodies(batch: int, seed: int = 0) -> list[bytes]:
    """JSON requests of `batch` random uint8 28x28 images: a CNN's work does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    return [json.dumps({"inputs": rng.integers(0, 256, (batch, 28, 28)).tolist()}).encode() for _ in range(BODIES)]


def client(server: Server, batch: int, payloads: list[bytes], until: float, out: dict) -> None:
    """Send requests back to back until `until`; append latencies (s) and errors to `out`."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    i = 0
    while time.perf_counter() < until:
        start = time.perf_counter()
        try:
            status, data = request(server, payloads[i % len(payloads)], conn=conn)
            if status != 200:
                raise ValueError(f"HTTP {status}: {data[:200]!r}")
            if len(json.loads(data)["predictions"]) != batch:
                raise ValueError(f"not {batch} predictions: {data[:200]!r}")
            out["latencies"].append(time.perf_counter() - start)
        except (OSError, ValueError, KeyError, http.client.HTTPException) as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        i += 1
    conn.close()


def drive(server: Server, batch: int, clients: int, seconds: float) -> tuple[dict, float, list[tuple[float, float]]]:
    """`clients` threads sending batches for `seconds`: ({latencies, errors}, elapsed s, [(s, server RSS MB)])."""
    payloads = bodies(batch)
    out: dict = {"latencies": [], "errors": []}
    start = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(server, batch, payloads, start + seconds, out)) for _ in range(clients)
    ]
    for t in threads:
        t.start()
    rss = [(0.0, server.rss_mb())]
    while any(t.is_alive() for t in threads):  # sample the server's memory during the run
        time.sleep(0.25)
        rss.append((time.perf_counter() - start, server.rss_mb()))
    for t in threads:
        t.join()
    return out, time.perf_counter() - start, rss


def load(server: Server, batch: int, clients: int, seconds: float, warmup: float) -> dict:
    """Batches of `batch` images from `clients` at once for `warmup` s, then measured for `seconds`."""
    drive(server, batch, clients, warmup)  # first requests of a size grow the allocator's pools
    rss_start = server.rss_mb()
    out, elapsed, rss = drive(server, batch, clients, seconds)
    t, mb = np.array(rss).T
    slope = np.polyfit(t, mb, 1)[0] * 60 if len(t) > 2 else 0.0  # MB per minute: a leak shows as a steady rise
    lat = np.array(out["latencies"]) * 1000  # ms
    n = len(lat)
    return {
        "batch": batch,
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": n,
        "images_per_s": round(n * batch / elapsed, 1),
        "requests_per_s": round(n / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if n else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if n else None,
        "max_ms": round(float(lat.max()), 1) if n else None,
        "errors": len(out["errors"]),
        "error_examples": out["errors"][:5],
        "rss_start_mb": round(rss_start),
        "rss_end_mb": round(server.rss_mb()),
        "rss_max_mb": round(mb.max()),
        "rss_trend_mb_per_min": round(float(slope), 1),
    }


def describe(model_uri: str) -> dict:
    """Which model: the registry version and its run's network settings, when the URI names them."""
    from mlflow import MlflowClient

    client = MlflowClient()
    info: dict = {"uri": model_uri}
    if m := re.fullmatch(r"models:/([^/@]+)@(.+)", model_uri):
        version = client.get_model_version_by_alias(m[1], m[2])
        info.update(version=version.version, run_id=version.run_id, test_accuracy=version.tags.get("test_accuracy"))
    elif m := re.match(r"runs:/([^/]+)/", model_uri):
        info["run_id"] = m[1]
    if info.get("run_id"):
        params = client.get_run(info["run_id"]).data.params
        info.update(arch=params.get("model.arch"), nf=params.get("model.nf"))
    return info


def table(results: list[dict]) -> str:
    lines = [
        "batch  clients  requests  images/s  p50 ms  p99 ms  errors  server RSS MB: start -> end (max), trend/min",
        *(
            f"{r['batch']:>5}  {r['clients']:>7}  {r['requests']:>8}  {r['images_per_s']:>8}  {r['p50_ms']:>6}  "
            f"{r['p99_ms']:>6}  {r['errors']:>6}  {r['rss_start_mb']:,} -> {r['rss_end_mb']:,} ({r['rss_max_mb']:,}), "
            f"{r['rss_trend_mb_per_min']:+}"
            for r in results
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/mnist-cnn@champion", help="MLflow model URI to serve")
    parser.add_argument("--seconds", type=float, default=30, help="measured seconds per batch size")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of load before each measurement")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="images per request")
    parser.add_argument("--out", type=Path, default=OUT, help="results file")
    args = parser.parse_args()
    model = describe(args.model)
    load_before = os.getloadavg()[0]  # other work on the machine moves these numbers: recorded with them
    with tempfile.TemporaryDirectory() as tmp, serve(args.model, Path(tmp) / "serve.log") as server:
        idle = round(server.rss_mb())
        results = [load(server, b, args.clients, args.seconds, args.warmup) for b in args.batches]
    report = {
        "date": date.today().isoformat(),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "model": model,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "server_rss_idle_mb": idle,
        "warmup_seconds": args.warmup,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"model {model}; server idle RSS {idle:,} MB; load average {report['load_average_1min']}", file=sys.stderr)
    print(table(results))
    if any(r["errors"] for r in results):
        sys.exit(f"errors: {[e for r in results for e in r['error_examples']]}")


if __name__ == "__main__":
    main()
