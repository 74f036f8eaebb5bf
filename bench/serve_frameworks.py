"""Serving libraries compared for this model: LitServe, Ray Serve and BentoML against `python -m pipeline.serve`,
on 127.0.0.1.

    python -m bench.serve_frameworks --python litserve=VENV_LIT/bin/python ray=VENV_RAY/bin/python \
        bento=VENV_BENTO/bin/python

Each library serves the same `classifier` (loaded as pipeline.serve loads it: same precision, layout, one torch
thread per worker, 2 workers), parses and answers with the same code (`from_body` or `to_batch`, `answer`) and
batches with its own batcher (LitServe and Ray: up to 64 requests, no wait; BentoML: up to 256 images, its own
adaptive wait), so the rows differ by the library's HTTP and batching path only. None of them is a requirement
of this project: each runs under an interpreter of its own environment (`--python NAME=PATH`, e.g. a venv that
adds the library to this one's packages); a library that its interpreter cannot import is skipped and said so.
In `--rounds` interleaved rounds, 8 clients send JSON bodies of 1 and 64 images to each server in turn
(tests/helpers/load.py), beside the ceiling (the network alone, 1 thread); each row keeps its best round.
Writes bench/serve_frameworks.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import psutil

from bench.benchmark import cpu_model
from tests.helpers.load import REPO, Server, load, request, serve, server_env
from tests.helpers.servers import free_port, stop_group

OUT = Path(__file__).with_name("serve_frameworks.json")
WORKERS = 2  # processes that run the network, 1 torch thread each: the 2 cores divided as pipeline.serve does
MAX_REQUESTS = 64  # per call of the network (the libraries batch requests, pipeline.serve images)
URI_ENV = "BENCH_SERVE_MODEL"  # the model URI, for BentoML's worker processes (they build the services themselves)


def network(uri: str):
    """The served classifier in this worker: 1 torch thread, warmed up."""
    import torch

    from pipeline.serving.server import load as load_classifier

    torch.set_num_threads(1)
    return load_classifier(uri, MAX_REQUESTS)


try:  # not a requirement of the project: only an environment of its own has it (the docstring)
    litserve = importlib.import_module("litserve")
except ImportError:
    litserve = None

if litserve is not None:  # at module level: LitServe pickles the API object into its worker processes

    class LitClassifier(litserve.LitAPI):
        """The classifier as a LitServe API: requests of n images, joined into one call of the network."""

        def __init__(self, uri: str, **kwargs) -> None:
            super().__init__(**kwargs)
            self.uri = uri

        def setup(self, device) -> None:
            self.served = network(self.uri)

        def decode_request(self, request: dict):
            import numpy as np

            from pipeline.serving.pyfunc import to_batch

            return to_batch(np.asarray(request["inputs"]))  # (n, 1, 28, 28)

        def batch(self, inputs: list) -> list:
            return inputs  # requests of several images each: joined in predict

        def predict(self, xs: list) -> list:
            import numpy as np
            import torch

            probs, served = self.served.probabilities(torch.cat(xs))  # (sum n, 10)
            return [(p, served) for p in np.split(probs, np.cumsum([len(x) for x in xs])[:-1])]

        def unbatch(self, output: list) -> list:
            return output

        def encode_response(self, output) -> dict:
            from pipeline.serving.server import answer

            return json.loads(answer(*output))  # FastAPI writes the dict it is given


def run_litserve(uri: str, port: int) -> None:
    """LitServe: API server processes (FastAPI) hand requests to inference worker processes over a queue."""
    api = LitClassifier(uri, max_batch_size=MAX_REQUESTS, batch_timeout=0.0, api_path="/invocations")
    server = litserve.LitServer(api, accelerator="cpu", workers_per_device=WORKERS, fast_queue=True)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


def run_ray(uri: str, port: int) -> None:
    """Ray Serve: an HTTP proxy actor hands requests to replica actors; @serve.batch joins calls in a replica."""
    ray = importlib.import_module("ray")
    serve_ = importlib.import_module("ray.serve")
    import numpy as np
    import torch
    from starlette.requests import Request
    from starlette.responses import Response

    from pipeline.serving.pyfunc import to_batch
    from pipeline.serving.server import answer, from_body

    @serve_.deployment(num_replicas=WORKERS, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
    class Classifier:
        def __init__(self) -> None:
            self.served = network(uri)

        @serve_.batch(max_batch_size=MAX_REQUESTS, batch_wait_timeout_s=0.0)
        async def run(self, xs: list[torch.Tensor]) -> list:
            probs, served = self.served.probabilities(torch.cat(xs))
            return [(p, served) for p in np.split(probs, np.cumsum([len(x) for x in xs])[:-1])]

        async def __call__(self, request: Request) -> Response:
            x = to_batch(from_body(await request.body(), request.headers["content-type"]))
            return Response(answer(*await self.run(x)), media_type="application/json")

    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    serve_.start(http_options={"host": "127.0.0.1", "port": port})
    serve_.run(Classifier.bind(), route_prefix="/invocations")
    while True:  # the driver keeps the application up until it is stopped
        time.sleep(3600)


try:  # as LitServe: only an environment of its own has it
    bentoml = importlib.import_module("bentoml")
except ImportError:
    bentoml = None

if bentoml is not None:  # at module level: BentoML's worker processes import the services by name
    import numpy as np

    QUIET = {"access": {"enabled": False}}  # no log line per request, as for the others

    @bentoml.service(workers=WORKERS, resources={"cpu": "1"}, logging=QUIET, traffic={"max_concurrency": 256})
    class BentoNetwork:
        """The network as a BentoML service: its batchable API joins the arrays of concurrent calls."""

        def __init__(self) -> None:
            self.served = network(os.environ[URI_ENV])

        @bentoml.api(batchable=True, max_batch_size=256, max_latency_ms=10_000)
        def probabilities(self, x: np.ndarray) -> np.ndarray:
            import torch

            return self.served.probabilities(torch.from_numpy(x))[0]  # (N, 1, 28, 28) -> (N, 10)

    @bentoml.service(workers=WORKERS, logging=QUIET, traffic={"max_concurrency": 256})
    class BentoClassifier:
        """MLflow's `{"inputs": ...}` in, its answer out (the typed API takes the key as its parameter); the
        network is a service of its own, as BentoML composes a batched model with per-request code."""

        model = bentoml.depends(BentoNetwork)

        def __init__(self) -> None:
            self.served = network(os.environ[URI_ENV])  # the class names, for the answer

        @bentoml.api(route="/invocations")
        async def invocations(self, inputs: list) -> dict:
            from pipeline.serving.pyfunc import to_batch
            from pipeline.serving.server import answer

            probs = await self.model.to_async.probabilities(to_batch(np.asarray(inputs)).numpy())
            return json.loads(answer(probs, self.served))  # it writes the dict it is given


def run_bento(uri: str, port: int) -> None:
    """BentoML: API server processes call the network's service processes, whose batchable API joins the calls."""
    os.environ[URI_ENV] = uri
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage report
    BentoClassifier.serve_http(port=port, host="127.0.0.1")  # its processes run in the background
    while True:  # until it is stopped, as Ray's
        time.sleep(3600)


RUN = {"litserve": run_litserve, "ray": run_ray, "bento": run_bento}


@contextlib.contextmanager
def library_server(name: str, python: str, uri: str, log: Path, timeout: float = 300):
    """`python -m bench.serve_frameworks --serve NAME` under `python`; (Server, seconds until it answered)."""
    port = free_port()
    cmd = [python, "-m", "bench.serve_frameworks", "--serve", name, "--model", uri, "--port", str(port)]
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=server_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", "127.0.0.1", port, proc, log)
    try:
        while True:  # up once it answers a request: every worker's model loaded by then or soon after
            with contextlib.suppress(OSError):
                if request(server, b'{"inputs": [[' + b"0," * 783 + b"0]]}", timeout=5)[0] == 200:
                    break
            if proc.poll() is not None or time.monotonic() - start > timeout:
                raise RuntimeError(f"{name} did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server, time.monotonic() - start
    finally:
        stop_group(proc, grace=20)
        for p in psutil.process_iter():  # Ray's actors leave the group but stay in the session: stopped too
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) == proc.pid:
                    p.kill()


def importable(python: str, name: str) -> str | None:
    """None when `python` imports the library, else why not (one line)."""
    module = {"ray": "ray.serve", "bento": "bentoml"}.get(name, name)  # a name of RUN
    done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/mnist-cnn@champion")
    parser.add_argument("--python", nargs="*", default=[], help="NAME=INTERPRETER for litserve, ray and bento")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--serve", choices=list(RUN), help=argparse.SUPPRESS)  # a library's server process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        RUN[args.serve](args.model, args.port)
        return
    from bench.serve_load import best_of, in_process

    pythons = {name: sys.executable for name in RUN} | dict(p.split("=", 1) for p in args.python)
    skipped = {name: why for name in RUN if (why := importable(pythons[name], name))}
    ceiling = in_process(args.model, [WORKERS], seconds=min(args.seconds, 5))[f"network {1}"]
    load_before = os.getloadavg()[0]
    rows: dict[tuple[str, int], list[dict]] = {}
    started: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = {}
        for name in (n for n in RUN if n not in skipped):
            server, seconds = stack.enter_context(library_server(name, pythons[name], args.model, Path(tmp) / name))
            servers[name], started[name] = server, round(seconds, 1)
        start = time.monotonic()
        servers["pipeline.serve"] = stack.enter_context(
            serve(args.model, Path(tmp) / "ours.log", workers=WORKERS, batching=[])
        )
        started["pipeline.serve"] = round(time.monotonic() - start, 1)
        for r in range(args.rounds):
            for batch in (1, 64):
                rows.setdefault(("ceiling: the network alone, 1 thread", batch), []).append(ceiling(batch))
                for name, server in servers.items():
                    result = load(server, batch, args.clients, args.seconds, args.warmup, "json")
                    rows.setdefault((name, batch), []).append({"row": name, **result})
                print(f"round {r + 1} of {args.rounds}, batch {batch} done", file=sys.stderr)
    results = [best_of(rs) for rs in rows.values()]
    for r in results:
        top = max(x["images_per_s"] for x in results if x["batch"] == r["batch"] and x["row"].startswith("ceiling"))
        r["of_ceiling"] = round(r["images_per_s"] / top, 2)
    report = {
        "date": date.today().isoformat(),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "seconds_to_first_answer": started,
        "skipped": skipped,
        "rounds": args.rounds,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(
            f"{r['row']:<40} {r['batch']:>3} {r['images_per_s']:>9} img/s {r['of_ceiling']:>5}x  "
            f"p50 {r['p50_ms']} p99 {r['p99_ms']} ms, errors {r['errors']}"
        )
    print(json.dumps({"started_s": started, "skipped": skipped}))


if __name__ == "__main__":
    main()
