"""A served model on 127.0.0.1 and the clients that load it: `mlflow models serve` or the batching server
(`python -m pipeline.serve`) in its own process group, plain HTTP requests, and 8 clients sending back to
back. tests/test_serving.py and tests/test_serve.py use it; so does bench/serve_load.py, at length."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from .servers import free_port, stop_group

REPO = Path(__file__).resolve().parents[2]
BODIES = 4  # distinct request bodies per batch size, sent in turn
CONTENT_TYPES = {"json": "application/json", "npy": "application/x-npy"}
UP_LINE = "pipeline.serving.server: serving"  # each batching worker's line once its model is loaded


@dataclass
class Server:
    url: str
    host: str
    port: int
    proc: subprocess.Popen
    log: Path

    def processes(self) -> list[psutil.Process]:
        """The server's process and all its children (uvicorn's supervisor and its workers)."""
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def cpu_s(self) -> float:
        """CPU seconds the server's processes have used so far (user + system)."""
        total = 0.0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = p.cpu_times()
                total += times.user + times.system
        return total

    def rss_mb(self) -> float:
        """Resident memory of the server: its process and all its children."""
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20


def server_env(env: dict[str, str | None] | None = None) -> dict[str, str]:
    """This environment plus `env` (None removes a variable), the venv's bin first on PATH (mlflow starts
    `uvicorn` by name) and this repository on PYTHONPATH (pipeline.serve runs from it)."""
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}"
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), environ.get("PYTHONPATH")) if p)
    return environ


def wait_up(server: Server, up: str, count: int, timeout: float = 120) -> None:
    """Until /ping answers and `up` is in the log `count` times (with several workers, the first answers /ping
    before the others have loaded the model); fail with the log if the server exits or hangs."""
    deadline = time.monotonic() + timeout
    while not ping(server) or server.log.read_text().count(up) < count:
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {server.proc.returncode}:\n{server.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not up in {timeout:.0f} s:\n{server.log.read_text()[-3000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def serve(
    model_uri: str,
    log: Path,
    env: dict[str, str | None] | None = None,
    timeout: float = 120,
    workers: int = 1,
    batching: list[str] | None = None,
) -> Iterator[Server]:
    """`mlflow models serve --workers N` of `model_uri` on a free port of 127.0.0.1, stopped with its workers;
    with `batching` (its extra arguments, maybe none), `python -m pipeline.serve --workers N` instead."""
    port = free_port()
    if batching is None:
        cmd = ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1"]
        up = "Application startup complete"
    else:
        cmd = [sys.executable, "-m", "pipeline.serve", "--model", model_uri, "--host", "127.0.0.1", *batching]
        up = UP_LINE
    cmd += ["-p" if batching is None else "--port", str(port), "--workers", str(workers)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=server_env(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", "127.0.0.1", port, proc, log)
    try:
        wait_up(server, up, workers, timeout)
        yield server
    finally:
        stop_group(proc, grace=20)  # its own process group: the CLI and uvicorn's workers


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


def bodies(batch: int, seed: int = 0, kind: str = "json") -> list[bytes]:
    """Requests of `batch` random uint8 28x28 images, as JSON or .npy: a CNN's work does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (batch, 28, 28)).astype(np.uint8) for _ in range(BODIES)]
    if kind == "json":
        return [json.dumps({"inputs": x.tolist()}).encode() for x in images]
    out = []
    for x in images:
        buffer = io.BytesIO()
        np.save(buffer, x)
        out.append(buffer.getvalue())
    return out


def client(server: Server, batch: int, payloads: list[bytes], until: float, out: dict, kind: str = "json") -> None:
    """Send requests back to back until `until`; append latencies (s) and errors to `out`."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    i, mine = 0, []
    while time.perf_counter() < until:
        start = time.perf_counter()
        try:
            status, data = request(server, payloads[i % len(payloads)], CONTENT_TYPES[kind], conn=conn)
            if status != 200:
                raise ValueError(f"HTTP {status}: {data[:200]!r}")
            if len(json.loads(data)["predictions"]) != batch:
                raise ValueError(f"not {batch} predictions: {data[:200]!r}")
            mine.append(time.perf_counter() - start)
        except (OSError, ValueError, KeyError, http.client.HTTPException) as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        i += 1
    conn.close()
    out["latencies"] += mine
    out["by_client"].append(mine)  # one connection's: with several workers, each connection stays with one


def drive(
    server: Server, batch: int, clients: int, seconds: float, kind: str = "json"
) -> tuple[dict, float, list[tuple[float, float]]]:
    """`clients` threads sending batches for `seconds`: ({latencies, errors}, elapsed s, [(s, server RSS MB)])."""
    payloads = bodies(batch, kind=kind)
    out: dict = {"latencies": [], "errors": [], "by_client": []}
    start = time.perf_counter()
    until = start + seconds
    threads = [
        threading.Thread(target=client, args=(server, batch, payloads, until, out, kind)) for _ in range(clients)
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


def own_cpu_s() -> float:
    """CPU seconds this process has used so far (user + system, all its threads: the clients)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load(server: Server, batch: int, clients: int, seconds: float, warmup: float, kind: str = "json") -> dict:
    """Batches of `batch` images (JSON or .npy) from `clients` at once for `warmup` s, then measured for `seconds`."""
    drive(server, batch, clients, warmup, kind)  # first requests of a size grow the allocator's pools
    rss_start = server.rss_mb()
    server_cpu, clients_cpu = server.cpu_s(), own_cpu_s()
    out, elapsed, rss = drive(server, batch, clients, seconds, kind)
    server_cpu, clients_cpu = server.cpu_s() - server_cpu, own_cpu_s() - clients_cpu
    lat = np.array(out["latencies"]) * 1000  # ms
    n = len(lat)
    return result_row(
        server, batch, kind, clients, elapsed, n,
        latency_ms=tuple(round(float(x), 1) for x in (*np.percentile(lat, [50, 99]), lat.max())) if n else None,
        cpu_s=(server_cpu, clients_cpu), errors=out["errors"], rss=rss, rss_start=rss_start,
        # Each client's (connection's) own p50, slowest first: a worker with more connections shows as a group.
        p50_ms_by_client=sorted((round(1000 * float(np.median(c)), 1) for c in out["by_client"] if c), reverse=True),
    )  # fmt: skip


def result_row(
    server: Server,
    batch: int,
    kind: str,
    clients: int,
    elapsed: float,
    requests: int,
    latency_ms: tuple[float, float, float] | None,
    cpu_s: tuple[float, float],
    errors: list[str] | int,
    rss: list[tuple[float, float]],
    rss_start: float,
    p50_ms_by_client: list[float] | None = None,
) -> dict:
    """One measured load as a results row, whoever sent it (`load`'s Python threads or bench/serve_load.py's
    wrk): `requests` answered in `elapsed` s, their (p50, p99, max) latency in ms, (server, clients) CPU
    seconds, the errors (or their count), and the server's RSS sampled during the run as [(s, MB)]."""
    n = requests
    t, mb = np.array(rss).T
    slope = np.polyfit(t, mb, 1)[0] * 60 if len(t) > 2 else 0.0  # MB per minute: a leak shows as a steady rise
    p50, p99, most = latency_ms or (None, None, None)
    server_cpu, clients_cpu = cpu_s
    return {
        "batch": batch,
        "body": kind,
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": n,
        "images_per_s": round(n * batch / elapsed, 1),
        "requests_per_s": round(n / elapsed, 1),
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": most,
        **({} if p50_ms_by_client is None else {"p50_ms_by_client": p50_ms_by_client}),
        # CPU per request, milliseconds: where a request's cost lies when clients and server share the cores.
        "server_cpu_ms_per_request": round(1000 * server_cpu / n, 3) if n else None,
        "clients_cpu_ms_per_request": round(1000 * clients_cpu / n, 3) if n else None,
        "errors": errors if isinstance(errors, int) else len(errors),
        "error_examples": [] if isinstance(errors, int) else errors[:5],
        "rss_start_mb": round(rss_start),
        "rss_end_mb": round(server.rss_mb()),
        "rss_max_mb": round(mb.max()),
        "rss_trend_mb_per_min": round(float(slope), 1),
    }
