"""The tracking preflight: a server that is down, silent or not MLflow fails in seconds, by name."""

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.common.errors import PipelineError
from pipeline.tracking import provenance, runs, server
from pipeline.tracking.evaluation_run import evaluation_run

from .helpers.repo import REPO
from .helpers.servers import free_port


@pytest.fixture
def silent_server():
    """A socket that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def other_web_server():
    """Some web server that is not MLflow: 404 with an HTML page for every path."""

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>nothing here</html>")

        def log_message(self, *args) -> None:  # keep pytest's output clean
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_refused_connection_names_the_uri_at_once() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(PipelineError, match=f"{uri} is unreachable: connection refused"):
        server.check_tracking_server(uri)
    assert time.perf_counter() - start < 5


def test_silent_server_times_out_instead_of_hanging(silent_server) -> None:
    start = time.perf_counter()
    with pytest.raises(PipelineError, match=f"{silent_server} is unreachable: no answer within 1 s"):
        server.check_tracking_server(silent_server, timeout=1)
    assert time.perf_counter() - start < 5


def test_a_server_that_is_not_mlflow_is_named(other_web_server) -> None:
    with pytest.raises(PipelineError, match=f"{other_web_server} does not answer as an MLflow .* HTTP 404"):
        server.check_tracking_server(other_web_server)


def test_local_stores_need_no_probe_and_http_retries_are_bounded(monkeypatch) -> None:
    server.check_tracking_server("sqlite:///nowhere/mlflow.db")  # no request, no error
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's choice wins
    with pytest.raises(PipelineError):
        server.check_tracking_server(f"http://127.0.0.1:{free_port()}")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == server.HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


@pytest.mark.slow
def test_train_with_a_dead_server_fails_fast_and_writes_nothing(workdir, monkeypatch) -> None:
    """The real stage as DVC runs it: exit 1, one line naming the URI, no output files."""
    uri = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--data", "data/processed", "--out", "models"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 1
    assert f"error: MLflow tracking server {uri} is unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(workdir / "models").exists()
    assert seconds < 30, seconds  # mostly importing torch and mlflow; the probe itself is instant


def test_under_mlflow_run_evaluate_logs_into_that_run_and_links_the_model_run(workdir, monkeypatch) -> None:
    """`mlflow run -e evaluate` (or train restored from DVC's cache): one run in the UI, not two."""
    mlflow.set_experiment("tests")
    model_run = MlflowClient().create_run(mlflow.get_experiment_by_name("tests").experiment_id)
    this_run = MlflowClient().create_run(model_run.info.experiment_id)
    run_file = workdir / "mlflow_run.json"
    run_file.write_text(f'{{"run_id": "{model_run.info.run_id}", "tracking_uri": "unused"}}')
    monkeypatch.setenv("MLFLOW_RUN_ID", this_run.info.run_id)
    with evaluation_run(runs.read_run_file(run_file)) as run:
        mlflow.log_metric("test_accuracy", 0.5)
    assert run.info.run_id == this_run.info.run_id
    logged = MlflowClient().get_run(this_run.info.run_id).data
    assert logged.metrics["test_accuracy"] == 0.5 and logged.tags["model_run_id"] == model_run.info.run_id
    assert "test_accuracy" not in MlflowClient().get_run(model_run.info.run_id).data.metrics


def test_git_commit_is_dirty_exactly_when_tracked_files_other_than_the_ignored_ones_differ(
    tmp_path, monkeypatch
) -> None:
    from .helpers.repo import sh

    sh(tmp_path, "git", "init", "-q")
    for name in ("train.py", "params.yaml"):
        (tmp_path / name).write_text("x = 1\n")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "first")
    head = sh(tmp_path, "git", "rev-parse", "HEAD").strip()
    monkeypatch.chdir(tmp_path)
    assert provenance.git_commit(ignore=("params.yaml",)) == head
    (tmp_path / "params.yaml").write_text("x = 2\n")  # what DVC changes in an experiment
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert provenance.git_commit(ignore=("params.yaml",)) == head
    (tmp_path / "train.py").write_text("x = 2\n")  # the code
    assert provenance.git_commit(ignore=("params.yaml",)) == f"{head}-dirty"
    assert provenance.git_commit() == f"{head}-dirty"
