"""The served model: input checks, the pyfunc `classifier`, and `mlflow models serve` for real."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from pipeline.data import load_split
from pipeline.serving import COLUMNS, to_batch

from .conftest import run_id_of


@pytest.mark.parametrize(
    "data",
    [
        np.zeros((3, 28, 28), np.uint8),
        np.zeros((3, 1, 28, 28), np.float64),
        np.zeros((3, 784), np.int64),
        pd.DataFrame(np.zeros((3, 784))),
        np.zeros((3, 28, 28)).tolist(),
    ],
    ids=["uint8-NHW", "float-NCHW", "int-flat", "dataframe", "list"],
)
def test_to_batch_accepts_every_documented_form(data) -> None:
    x = to_batch(data)
    assert x.shape == (3, 1, 28, 28) and x.dtype.is_floating_point


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((2, 27, 28)), r"images must have shape .* got \(2, 27, 28\)"),
        (np.zeros((2, 3, 28, 28)), "images must have shape"),
        (np.array([["a"] * 784]), "pixels must be numbers"),
        (pd.DataFrame(np.zeros((1, 10))), "a DataFrame needs 784 pixel columns"),
        (np.full((1, 28, 28), 300.0), r"pixels must lie in \[0, 255\]"),
        (np.full((1, 28, 28), np.nan), r"pixels must lie in \[0, 255\]"),
        (np.zeros((0, 784)), "the batch is empty"),
        ("hello", "expected a numpy array or a DataFrame"),
    ],
)
def test_to_batch_rejects_with_invalid_parameter_value(data, message) -> None:
    with pytest.raises(MlflowException, match=message) as e:
        to_batch(data)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and e.value.get_http_status_code() == 400


def sample_images(work: Path, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_split(work / "data/processed/test.pt")
    return images[:n, 0].numpy(), labels[:n].numpy()  # uint8 (n, 28, 28), (n,)


@pytest.mark.slow
def test_classifier_pyfunc_answers_digit_and_probabilities(in_trained) -> None:
    model = mlflow.pyfunc.load_model(f"runs:/{run_id_of(in_trained)}/classifier")
    images, labels = sample_images(in_trained)
    out = model.predict(images)
    assert list(out.columns) == COLUMNS and len(out) == len(images)
    probs = out[COLUMNS[1:]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (out["digit"] == probs.argmax(1)).all()
    assert (out["digit"].to_numpy() == labels).mean() > 0.9  # the synthetic task is easy
    as_frame = model.predict(pd.DataFrame(images.reshape(len(images), 784)))
    as_float = model.predict(images.astype(np.float32)[:, None])
    pd.testing.assert_frame_equal(out, as_frame)
    pd.testing.assert_frame_equal(out, as_float)
    assert model.metadata.get_output_schema().input_names() == COLUMNS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def server(in_trained, tmp_path):
    """`mlflow models serve` of the run's classifier on 127.0.0.1; its base URL. Killed afterwards."""
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    uri = f"runs:/{run_id_of(in_trained)}/classifier"
    cmd = ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server not up in 90 s:\n" + (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: its own process group
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_models_serve_answers_invocations_and_400s_bad_requests(server, in_trained) -> None:
    images, labels = sample_images(in_trained, n=8)
    status, body = post(f"{server}/invocations", {"inputs": images.tolist()})  # uint8 (8, 28, 28)
    assert status == 200, body
    predictions = body["predictions"]
    assert len(predictions) == 8 and set(predictions[0]) == set(COLUMNS)
    digits = [p["digit"] for p in predictions]
    assert np.mean(np.array(digits) == labels) > 0.8
    assert all(abs(sum(p[c] for c in COLUMNS[1:]) - 1) < 1e-4 for p in predictions)

    flat = images.reshape(8, 784).astype(float)  # 784 float pixel columns
    frame = {"dataframe_split": {"columns": [f"px{i}" for i in range(784)], "data": flat.tolist()}}
    status, body = post(f"{server}/invocations", frame)
    assert status == 200 and [p["digit"] for p in body["predictions"]] == digits

    for bad, message in [
        ({"inputs": np.zeros((2, 27, 28)).tolist()}, "images must have shape"),
        ({"inputs": [["a", "b"]]}, "pixels must be numbers"),
        ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}, "784 pixel columns"),
    ]:
        status, body = post(f"{server}/invocations", bad)
        assert status == 400, body
        assert body["error_code"] == "INVALID_PARAMETER_VALUE" and message in body["message"]
