"""Load on the served model: `mlflow models serve` and the batching server (`python -m pipeline.serve`)
on 127.0.0.1, driven by concurrent clients.

    python -m bench.serve_load                          # models:/mnist-cnn@champion, 8 clients, 30 s per batch size
    python -m bench.serve_load --seconds 5 --model runs:/<run_id>/classifier --baseline runs:/<old>/classifier
    python -m bench.serve_load --workers --batching-workers 2 --seconds 120 --rounds 1   # the batching server alone

One `mlflow models serve` per `--workers` count (1 and 2) and one batching server per
`--batching-workers` count (2), sent JSON and .npy bodies, all started first. In each of `--rounds` rounds, for
each batch size (1 and 64 images), it measures the ceiling (the served network alone, in this
process, on every core), then each server in turn: the clients send requests back to back for
`--seconds` after a warm-up. A row reports images/s, p50/p99 latency, errors, and the resident
memory of the server's processes at the start and end; each row is its best round by images/s,
so the machine's other load moves the rows of one run alike. `ratios` sets each server's images/s
against the best network-alone row of the same batch size. Prints a table and writes
bench/serve_results.json. MLFLOW_TRACKING_URI as for the pipeline (default sqlite:///mlflow.db).
The clients run on the same machine as the server and take part of its CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np

from bench.benchmark import cpu_model
from pipeline.common.system import cores
from pipeline.core.runtime import cpu_has_native_bf16
from tests.helpers.load import CONTENT_TYPES, Server, bodies, load, request, result_row, serve

OUT = Path(__file__).with_name("serve_results.json")
# oneDNN's, MKL's and ATen's caps on the instruction set, with fp32: how a CPU without native bf16 is emulated here.
EMULATION = ("INFERENCE_PRECISION", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


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


def in_process(model_uri: str, workers: list[int], seconds: float) -> dict[str, Callable[[int], dict]]:
    """The ceiling and the steps to the server, in this process on every core, one caller at a time:
    the network alone (as the model runs it), the pyfunc's predict on an array, MLflow's `invocations`
    (the JSON request parsed, predicted, the answer written; no HTTP)."""
    import mlflow
    import torch
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(model_uri)
    inference = model.unwrap_python_model().inference
    rng = np.random.default_rng(0)

    def rate(name: str, batch: int, call: Callable[[], object]) -> dict:
        call()  # first call of a size: allocator pools, oneDNN kernels
        lat, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            call()
            lat.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        ms = np.array(lat) * 1000
        return {"row": name, "batch": batch, "clients": 1, "requests": len(lat),
                "images_per_s": round(len(lat) * batch / elapsed, 1), "requests_per_s": round(len(lat) / elapsed, 1),
                "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
                "errors": 0}  # fmt: skip

    def network(batch: int, threads: int) -> dict:
        x = torch.from_numpy(rng.integers(0, 256, (batch, 1, 28, 28)).astype(np.float32))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            name = f"ceiling: the network alone ({inference.describe()}, {threads} thread(s))"
            return rate(name, batch, lambda: inference.probabilities(x))
        finally:
            torch.set_num_threads(before)

    def pyfunc(batch: int) -> dict:
        images = rng.integers(0, 256, (batch, 28, 28)).astype(np.uint8)
        return rate("in-process: pyfunc predict (checks, network, table)", batch, lambda: model.predict(images))

    def invocations(batch: int) -> dict:
        body = bodies(batch)[0]
        call = lambda: scoring_server.invocations(body, "application/json", model, None)  # noqa: E731
        assert call().status == 200
        return rate("in-process: MLflow's invocations (JSON in, predict, JSON out)", batch, call)

    # One ceiling per thread count a worker gets (cores / workers): with 2 workers on 2 cores the
    # machine's ceiling is about twice the 1-thread row, when nothing else runs.
    per_worker = sorted({cores(), *(max(1, cores() // n) for n in workers)}, reverse=True)
    ceilings = {f"network {t}": functools.partial(network, threads=t) for t in per_worker}
    return {**ceilings, "pyfunc": pyfunc, "invocations": invocations}


# wrk's script: every request the same POST, and at the end one JSON line of what wrk measured (microseconds).
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "%(content_type)s"
local f = assert(io.open("%(body)s", "rb")); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, "max_us": %%d, '
    .. '"errors": %%d}\\n', summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def wrk_load(server: Server, batch: int, clients: int, seconds: float, warmup: float, kind: str, tmp: Path) -> dict:
    """As tests/helpers/load.load, with wrk (a C load generator: one thread, `clients` kept-alive connections)
    sending the requests instead of Python threads, so the clients take little of the shared cores."""
    body, content_type = bodies(batch, kind=kind)[0], CONTENT_TYPES[kind]
    status, answer = request(server, body, content_type)  # wrk counts statuses; the answer is checked here
    assert status == 200 and len(json.loads(answer)["predictions"]) == batch, answer[:200]
    (tmp / "body").write_bytes(body)
    script = tmp / "wrk.lua"
    script.write_text(WRK_SCRIPT % {"content_type": content_type, "body": tmp / "body"})
    url = server.url + "/invocations"

    def run(s: float) -> tuple[dict, list[tuple[float, float]]]:
        cmd = ["wrk", "-t1", f"-c{clients}", f"-d{s:g}s", "--timeout", "60s", "-s", str(script), url]
        proc, rss, start = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True), [], time.perf_counter()
        while proc.poll() is None:  # the server's memory during the run
            rss.append((time.perf_counter() - start, server.rss_mb()))
            time.sleep(0.25)
        return json.loads(proc.stdout.read().strip().splitlines()[-1]), rss

    run(warmup)
    server_cpu, wrk_cpu = server.cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    rss_start = server.rss_mb()
    out, rss = run(seconds)
    server_cpu, after = server.cpu_s() - server_cpu, resource.getrusage(resource.RUSAGE_CHILDREN)
    clients_cpu = after.ru_utime + after.ru_stime - wrk_cpu.ru_utime - wrk_cpu.ru_stime
    latency_ms = tuple(round(out[k] / 1000, 1) for k in ("p50_us", "p99_us", "max_us"))
    return result_row(server, batch, kind, clients, out["duration_us"] / 1e6, out["requests"], latency_ms,
                      (server_cpu, clients_cpu), out["errors"], rss or [(0.0, rss_start)], rss_start)  # fmt: skip


def best_of(rounds: list[dict]) -> dict:
    """The round with the most images/s, with how many rounds there were and their spread."""
    best = max(rounds, key=lambda r: r["images_per_s"])
    return {**best, "rounds_images_per_s": [r["images_per_s"] for r in rounds]}


def ratios(results: list[dict]) -> dict[str, dict[str, float]]:
    """Each server row's images/s over the best network-alone row of its batch size (the ceiling), and
    its p99 over its p50: {batch: {row: ratio}}; the issue's targets are >= 0.7 at 64, >= 1.0 at 1."""
    out: dict[str, dict[str, float]] = {}
    for batch in sorted({r["batch"] for r in results}):
        rows = [r for r in results if r["batch"] == batch]
        ceiling = max((r["images_per_s"] for r in rows if r["row"].startswith("ceiling")), default=None)
        if not ceiling:
            continue
        out[str(batch)] = {
            r["row"]: {
                "of_ceiling": round(r["images_per_s"] / ceiling, 2),
                "p99_over_p50": round(r["p99_ms"] / r["p50_ms"], 1),
            }
            for r in rows
            if "rss_start_mb" in r and r["p50_ms"]
        }
    return out


def table(results: list[dict]) -> str:
    lines = [
        f"{'row':<80} batch  clients  images/s  p50 ms  p99 ms  errors  server RSS MB: start -> end (max), trend/min",
        *(
            f"{r.get('row', 'served'):<80} {r['batch']:>5}  {r['clients']:>7}  {r['images_per_s']:>8}  "
            f"{r['p50_ms']:>6}  {r['p99_ms']:>6}  {r['errors']:>6}"
            + (
                f"  {r['rss_start_mb']:,} -> {r['rss_end_mb']:,} ({r['rss_max_mb']:,}), {r['rss_trend_mb_per_min']:+}"
                if "rss_start_mb" in r
                else ""
            )
            for r in results
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/mnist-cnn@champion", help="MLflow model URI to serve")
    parser.add_argument("--baseline", help="another model URI served beside it (1 worker): the before of a change")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="one mlflow models serve per count")
    parser.add_argument("--batching-workers", type=int, nargs="*", default=[2], help="one pipeline.serve per count")
    parser.add_argument(
        "--batching-args",
        nargs="*",
        default=[""],
        help="one pipeline.serve per value and count, e.g. '--max-wait-ms 1'",
    )
    parser.add_argument("--seconds", type=float, default=30, help="measured seconds per batch size and server")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of load before each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each row keeps its best")
    parser.add_argument(
        "--bodies", nargs="+", choices=list(CONTENT_TYPES), default=list(CONTENT_TYPES), help="of pipeline.serve"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="images per request")
    parser.add_argument(
        "--drivers",
        nargs="+",
        choices=["python", "wrk"],
        default=["python"],
        help="who sends the requests: Python threads (http.client), and/or wrk (a C load generator, if installed)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="results file")
    args = parser.parse_args()
    if "wrk" in args.drivers and not shutil.which("wrk"):
        parser.error("--drivers wrk needs wrk on PATH (Debian: apt-get install wrk)")
    model = describe(args.model)
    load_before = os.getloadavg()[0]  # other work on the machine moves these numbers: recorded with them
    steps = in_process(args.model, args.workers + args.batching_workers, seconds=min(args.seconds, 5))
    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = {}  # all up at once, measured in turn: each round sees the same machine for all
        for n in args.workers:
            log = Path(tmp) / f"serve-{n}.log"
            server = stack.enter_context(serve(args.model, log, workers=n))
            servers[f"served: mlflow models serve --workers {n}"] = server, log, "json"
        if args.baseline:
            log = Path(tmp) / "baseline.log"
            servers[f"before: {args.baseline}, --workers 1"] = (
                stack.enter_context(serve(args.baseline, log)),
                log,
                "json",
            )
        for n, extra in itertools.product(args.batching_workers, args.batching_args):
            log = Path(tmp) / f"batching-{n}-{len(servers)}.log"
            server = stack.enter_context(serve(args.model, log, workers=n, batching=shlex.split(extra)))
            for kind in args.bodies:
                servers[" ".join(f"batching: pipeline.serve --workers {n} {extra}".split()) + f", {kind}"] = (
                    server,
                    log,
                    kind,
                )
        idle = {name: round(server.rss_mb()) for name, (server, _, _) in servers.items()}
        inference = {  # what each worker said it runs (the pyfunc's or the batching server's line in its log)
            name: sorted(set(re.findall(r"pipeline\.serving\.(?:pyfunc|server): (.*)", log.read_text())))
            for name, (_, log, _) in servers.items()
        }
        for r in range(args.rounds):
            for batch in args.batches:
                for step, measure in steps.items():
                    runs.setdefault((step, batch), []).append(measure(batch))
                for (name, (server, _, kind)), driver in itertools.product(servers.items(), args.drivers):
                    if driver == "wrk":
                        result = wrk_load(server, batch, args.clients, args.seconds, args.warmup, kind, Path(tmp))
                        name = f"{name} (wrk)"
                    else:
                        result = load(server, batch, args.clients, args.seconds, args.warmup, kind)
                    runs.setdefault((name, batch), []).append({"row": name, **result})
                print(f"round {r + 1} of {args.rounds}, batch {batch} done", file=sys.stderr)
    results = [best_of(rounds) for rounds in runs.values()]  # batch by batch, in the order measured
    report = {
        "date": date.today().isoformat(),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores ({cores()} usable), "
        f"{'native bf16' if cpu_has_native_bf16() else 'no native bf16'}",
        "model": model,
        # What the run was told to emulate or pin (e.g. fp32 under an AVX2 cap: a CPU without native bf16).
        "environment": {k: os.environ[k] for k in EMULATION if k in os.environ},
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "server_rss_idle_mb": idle,
        "server_inference": inference,
        "warmup_seconds": args.warmup,
        "rounds": args.rounds,
        "results": results,
        "ratios": ratios(results),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"model {model}; server idle RSS {idle} MB; load average {report['load_average_1min']}", file=sys.stderr)
    print(table(results))
    print(json.dumps(report["ratios"], indent=1))
    if any(r["errors"] for r in results):
        sys.exit(f"errors: {[e for r in results for e in r.get('error_examples', [])]}")


if __name__ == "__main__":
    main()
