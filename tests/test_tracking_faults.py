"""A real tracking server that dies mid-training, comes back slowly, or answers 5xx for a while."""

import http.client
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from pipeline import train as train_stage
from pipeline.common.errors import PipelineError
from pipeline.tracking import server as tracking_server
from pipeline.tracking import store

from .conftest import REPO, run_main, set_params, train_until_checkpoint
from .helpers.servers import free_port

pytestmark = pytest.mark.slow


class Server:
    """`mlflow server` on a SQLite store and a fixed port, that a test can kill and start again."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--workers", "1"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "a")  # noqa: SIM115 (the server's, closed with it)
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, (
                    self.root / "server.log"
                ).read_text()
                time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a crashed host would: no goodbye to the clients."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """One server for the module: a test that kills it starts it again."""
    s = Server(tmp_path_factory.mktemp("server"))
    s.start()
    yield s
    if s.process.poll() is None:
        s.kill()


class Proxy(ThreadingHTTPServer):
    """Forwards to the server, slowly (`delay` s a request) and answering `status` (503) to the next `failures`."""

    def __init__(self, target: str) -> None:
        self.target, self.delay, self.failures, self.refused, self.status = target, 0.0, 0, 0, 503

        class Handler(BaseHTTPRequestHandler):
            def body(handler) -> bytes:
                if handler.headers.get("Transfer-Encoding", "").lower() != "chunked":  # artifact uploads are
                    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(handler.rfile.readline().split(b";")[0], 16):
                    chunks.append(handler.rfile.read(size))
                    handler.rfile.readline()  # the CRLF after each chunk
                handler.rfile.readline()  # the last, empty line
                return b"".join(chunks)

            def do(handler) -> None:
                body = handler.body()
                time.sleep(self.delay)
                if self.failures:
                    self.failures -= 1
                    self.refused += 1
                    handler.send_response(self.status)
                    handler.send_header("Content-Length", "0")
                    handler.end_headers()
                    return
                conn = http.client.HTTPConnection(self.target, timeout=60)
                headers = {k: v for k, v in handler.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn.request(handler.command, handler.path, body, headers)
                answer = conn.getresponse()
                data = answer.read()
                handler.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        handler.send_header(key, value)
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do

            def log_message(handler, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def run_id_in(log: str) -> str:
    return re.search(r"MLflow run (\w+) at", log)[1]


def test_server_killed_mid_training_then_back_slow_and_failing_for_a_while(
    processed, server, monkeypatch, caplog
) -> None:
    """Killed after epoch 1 of 3: one line, checkpoint kept; back behind a slow proxy that also answers
    503 twice (MLflow retries): the next run resumes into the same run, each epoch logged once."""
    set_params(processed, "train", epochs=3, batch_size=4)  # epochs of a second or more: time to kill
    set_params(processed, "model", nf=32)
    proc = train_until_checkpoint(processed, MLFLOW_TRACKING_URI=server.uri)
    server.kill()  # epoch 1 is done (its checkpoint written); epoch 2 is under way
    killed = time.monotonic()
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1, stderr
    assert time.monotonic() - killed < 20, "the stage took long to stop"
    line = stderr.strip().splitlines()[-1]
    # Refused, or broken if the kill hit a request in flight.
    assert re.match(f"error: MLflow tracking server {server.uri} stopped answering \\(connection (refused|broke)", line)
    assert "ckpt.pt keeps epoch" in line and line.endswith("to resume into run " + run_id_in(stderr))
    assert "Traceback" not in stderr
    checkpoint = torch.load(processed / "ckpt.pt", weights_only=True)
    assert 1 <= len(checkpoint["history"]) < 3 and not (processed / "models/model.pt").exists()

    server.start()
    proxy = Proxy(f"127.0.0.1:{server.port}")
    proxy.delay, proxy.failures = 0.02, 2  # 20 ms on each of the ~100 requests of a run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        run_main(train_stage, monkeypatch, "--out", "models", "--checkpoint", "ckpt.pt")  # in this process
    assert proxy.refused == 2 and "resuming from ckpt.pt" in caplog.text
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(checkpoint["run_id"])
    assert run.info.status == "FINISHED"
    for metric in ("val_loss", "train_loss", "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2, 3], metric
    proxy.shutdown()


def test_a_server_answering_5xx_beyond_the_retries_is_one_clear_error(server, monkeypatch) -> None:
    proxy = Proxy(f"127.0.0.1:{server.port}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    store.connect()
    run = MlflowClient().create_run(MlflowClient().create_experiment("faults"))
    proxy.failures = 1000
    start = time.monotonic()
    with pytest.raises(PipelineError, match=f"server {proxy.uri} stopped answering \\(HTTP 503 after 3 tries\\); kept"):
        with tracking_server.answering("kept"):
            mlflow.MlflowClient().log_metric(run.info.run_id, "loss", 1.0)
    assert time.monotonic() - start < 15  # MLflow's retries, bounded by the pipeline's settings
    assert proxy.refused == 1 + int(tracking_server.HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    proxy.shutdown()


RACER = """
import sys, time
from pathlib import Path

from mlflow import MlflowClient
from pipeline.serving import registry
from pipeline.tracking import store
from pipeline.params import RegisterConfig

run_id, accuracy, role, meet = sys.argv[1], float(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
store.connect()
if role == "stale":  # decides first and writes last: the write that used to leave the worse champion
    move = MlflowClient.set_registered_model_alias

    def late(self, *args):
        MlflowClient.set_registered_model_alias = move
        (meet / "decided").touch()
        while not (meet / "other-done").exists():
            time.sleep(0.05)
        return move(self, *args)

    MlflowClient.set_registered_model_alias = late
else:
    while not (meet / "decided").exists():
        time.sleep(0.05)
with store.store_lock():  # each clone's own lock: no help across clones
    print(registry.register_if_good(run_id, accuracy, RegisterConfig(name="shared", min_accuracy=0.5)))
(meet / f"{role}-done").touch()
(meet / "other-done").touch()
"""


def test_two_clones_racing_on_one_server_leave_the_champion_on_the_better_version(server, tmp_path) -> None:
    """Two evaluations on two clones (their own cwd, their own file lock) against one `mlflow server`,
    in the worst order: the worse model's decides first and moves the alias last."""
    from .test_registry import model_run

    client = MlflowClient(server.uri)
    worse, better = model_run(client, "racing"), model_run(client, "racing")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(MLFLOW_TRACKING_URI=server.uri, PYTHONPATH=str(REPO))
    procs = []
    for role, run_id, accuracy in (("stale", worse, "0.93"), ("fresh", better, "0.95")):
        (tmp_path / role).mkdir()
        cmd = [sys.executable, "-c", RACER, run_id, accuracy, role, str(tmp_path)]
        procs.append(
            subprocess.Popen(cmd, cwd=tmp_path / role, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    champion = client.get_model_version_by_alias("shared", "champion")
    assert champion.tags["test_accuracy"] == "0.95" and champion.run_id == better
    assert len(client.search_model_versions("name = 'shared'")) == 2


@pytest.mark.parametrize("status", [503, 403])
def test_a_champion_that_cannot_be_read_stops_the_registration_and_moves_nothing(server, monkeypatch, status) -> None:
    """Only "not found" means no champion: a server error or a refusal is one line, and nothing is registered."""
    from pipeline.params import RegisterConfig
    from pipeline.serving.registry import register_if_good

    from .test_registry import model_run

    client = MlflowClient(server.uri)
    name = f"guarded-{status}"
    first, better = model_run(client, "guarded"), model_run(client, "guarded")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    assert "no champion before" in register_if_good(first, 0.90, RegisterConfig(name=name, min_accuracy=0.5))

    proxy = Proxy(f"127.0.0.1:{server.port}")
    proxy.status, proxy.failures = status, 1000
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(PipelineError, match=f"^registering {name} at {proxy.uri} failed, nothing was moved: "):
        register_if_good(better, 0.99, RegisterConfig(name=name, min_accuracy=0.5))
    proxy.shutdown()
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert client.get_model_version_by_alias(name, "champion").run_id == first
