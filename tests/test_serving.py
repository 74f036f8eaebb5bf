"""The served model: input checks, the pyfunc `classifier`, and `mlflow models serve` for real."""

import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from pipeline.common.system import cores
from pipeline.core.checkpoint import load_model
from pipeline.core.inference import precision_setting, prepare
from pipeline.core.runtime import cpu_has_native_bf16
from pipeline.data.splits import load_split
from pipeline.serving import pyfunc
from pipeline.serving.pyfunc import COLUMNS, MAX_BATCH, PROBABILITIES, to_batch

from .helpers.load import Server, load, request, serve
from .helpers.malformed import MLFLOW_500, malformed_requests
from .helpers.tracking import run_id_of

CHAMPION = "models:/mnist-cnn@champion"


@pytest.mark.parametrize(
    "data",
    [
        np.zeros((3, 28, 28), np.uint8),
        np.zeros((3, 1, 28, 28), np.float64),
        np.zeros((3, 784), np.int64),
        pd.DataFrame(np.zeros((3, 784))),
        np.zeros((3, 28, 28)).tolist(),
        np.array([[0, 255.0, 7] * 261 + [1]] * 3, dtype=object),
    ],
    ids=["uint8-NHW", "float-NCHW", "int-flat", "dataframe", "list", "object-numbers"],
)
def test_to_batch_accepts_every_documented_form(data) -> None:
    x = to_batch(data)
    assert x.shape == (3, 1, 28, 28) and x.dtype.is_floating_point


def test_to_batch_takes_the_limit_and_the_range_ends() -> None:
    x = to_batch(np.tile(np.array([0.0, 255.0]), (MAX_BATCH, 392)))
    assert x.shape == (MAX_BATCH, 1, 28, 28) and x.min() == 0 and x.max() == 255  # kept as sent, not rescaled


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
        (np.zeros((MAX_BATCH + 1, 784)), f"a request holds at most {MAX_BATCH} images, got {MAX_BATCH + 1}"),
        (np.ones((1, 784), bool), "pixels must be numbers .* got dtype bool"),
        (np.zeros((1, 784), complex), "pixels must be numbers .* got dtype complex"),
        (np.array([[None] * 784]), "pixels must be numbers .* got NoneType None"),
        (pd.DataFrame([["7"] * 784]), "pixels must be numbers .* got str '7'"),
        (np.array([[10**400] + [0] * 783], dtype=object), "got an integer too large for a float"),
        (np.full((1, 784), -1), r"pixels must lie in \[0, 255\] .* got values from -1 to -1"),
        (np.full((1, 784), 1e39), r"pixels must lie in \[0, 255\] .* got values from 1e\+39 to 1e\+39"),
        (np.full((1, 784), -np.inf), "got NaN or infinity"),
    ],
)
def test_to_batch_rejects_with_invalid_parameter_value(data, message) -> None:
    with pytest.raises(MlflowException, match=message) as e:
        to_batch(data)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and e.value.get_http_status_code() == 400


def test_a_huge_batch_is_refused_before_anything_is_converted() -> None:
    rows = [[0] * 784] * 100_000  # converting it takes seconds: np.asarray reads 78 million numbers
    for data in (rows, pd.DataFrame(np.zeros((100_000, 784), np.uint8))):
        start = time.perf_counter()
        with pytest.raises(MlflowException, match="at most 256 images, got 100000"):
            to_batch(data)
        assert time.perf_counter() - start < 0.01


def test_workers_divide_the_cores_and_an_explicit_setting_wins(monkeypatch) -> None:
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MLFLOW_MODELS_WORKERS", raising=False)
    try:
        assert pyfunc.server_workers() is None  # not under `mlflow models serve`: threads untouched
        assert pyfunc.divide_threads() == before
        monkeypatch.setattr(pyfunc, "cores", lambda: 16)
        for workers, threads in [(1, 16), (2, 8), (3, 5), (16, 1), (32, 1)]:
            monkeypatch.setenv("MLFLOW_MODELS_WORKERS", str(workers))  # what --workers N sets
            assert pyfunc.server_workers() == workers and pyfunc.divide_threads() == threads
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert pyfunc.divide_threads() == 3
    finally:
        torch.set_num_threads(before)


def sample_images(work: Path, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_split(work / "data/processed/test.pt")
    return images[:n, 0].numpy(), labels[:n].numpy()  # uint8 (n, 28, 28), (n,)


@pytest.mark.slow
def test_classifier_pyfunc_answers_digit_and_probabilities(in_trained) -> None:
    model = mlflow.pyfunc.load_model(f"runs:/{run_id_of(in_trained)}/classifier")
    images, labels = sample_images(in_trained)
    out = model.predict(images)
    assert list(out.columns) == COLUMNS and len(out) == len(images)
    probs = out[PROBABILITIES].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (out["digit"] == probs.argmax(1)).all()
    assert (out["class"] == out["digit"].astype(str)).all()  # MNIST's class names are its digits
    assert (out["digit"].to_numpy() == labels).mean() > 0.9  # the synthetic task is easy
    as_frame = model.predict(pd.DataFrame(images.reshape(len(images), 784)))
    as_float = model.predict(images.astype(np.float32)[:, None])
    pd.testing.assert_frame_equal(out, as_frame)
    pd.testing.assert_frame_equal(out, as_float)
    assert model.metadata.get_output_schema().input_names() == COLUMNS
    with pytest.raises(MlflowException, match=r"pixels must lie in \[0, 255\] .* got values from 0 to 256"):
        model.predict(np.where(images > 0, 256, 0))  # refused, as served, never clipped


@pytest.mark.slow
def test_the_fast_path_predicts_as_fp32(in_trained, monkeypatch) -> None:
    """channels_last and bf16 autocast (forced: `auto` takes it only where bf16 is native) against the
    fp32 network in the default layout, as served before: >= 99.9% equal predictions, accuracy within
    0.05 points. On the real MNIST test set: docs/using-the-model.md, "Serve it"."""
    images, labels = load_split(in_trained / "data/processed/test.pt")
    reference = prepare(load_model(in_trained / "models/model.pt")[0], "fp32", channels_last=False)
    expected = reference.probabilities(images).argmax(1)
    for precision in ("fp32", "bf16", "auto"):
        fast = prepare(load_model(in_trained / "models/model.pt")[0], precision)
        got = fast.probabilities(images).argmax(1)
        assert (got == expected).float().mean() >= 0.999, precision
        assert abs((got == labels).float().mean() - (expected == labels).float().mean()) <= 0.0005, precision
    monkeypatch.setenv("INFERENCE_PRECISION", "fp32")  # the setting that keeps the served model in fp32
    model = mlflow.pyfunc.load_model(f"runs:/{run_id_of(in_trained)}/classifier")
    assert model.unwrap_python_model().inference.describe() == "fp32, channels_last"
    monkeypatch.setenv("INFERENCE_PRECISION", "fp16")
    with pytest.raises(ValueError, match="INFERENCE_PRECISION must be one of auto, fp32, bf16, got 'fp16'"):
        mlflow.pyfunc.load_model(f"runs:/{run_id_of(in_trained)}/classifier")


@pytest.fixture(scope="module")
def server(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`mlflow models serve --workers 2` of the registered `mnist-cnn@champion` on 127.0.0.1, once for this module."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # No OMP_NUM_THREADS (`make test` sets 1): the workers divide the cores themselves, as tested below.
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{trained / 'mlflow.db'}", "OMP_NUM_THREADS": None}
    with serve(CHAMPION, log, env=env, workers=2) as server:
        yield server


@pytest.mark.slow
def test_each_worker_runs_its_share_of_the_cores_in_the_fast_layout(server) -> None:
    said = set(re.findall(r"pipeline\.serving\.pyfunc: (.*)", server.log.read_text()))  # one line per worker, alike
    # INFERENCE_PRECISION if set (the suite runs once with each), else auto: bf16 where native.
    setting = precision_setting()
    precision = "bf16 autocast" if setting == "bf16" or (setting == "auto" and cpu_has_native_bf16()) else "fp32"
    threads, n = max(1, cores() // 2), cores()
    assert said == {
        f"classifier runs in {precision}, channels_last, {threads} torch thread(s) ({n} cores / 2 worker(s))"
    }
    assert server.log.read_text().count("pipeline.serving.pyfunc: ") == 2


@pytest.mark.slow
def test_a_100000_row_request_is_refused_in_well_under_a_second_of_server_time(server) -> None:
    frame = pd.DataFrame(np.zeros((100_000, 784), np.uint8), columns=[f"px{i}" for i in range(784)])
    body = io.BytesIO()
    frame.to_parquet(body)  # 0.5 MB: MLflow reads it in a fraction of a second, then the model's checks run
    cpu = server.cpu_s()
    status, text = request(server, body.getvalue(), "application/vnd.apache.parquet")
    used = server.cpu_s() - cpu
    assert status == 400 and "at most 256 images, got 100000" in json.loads(text)["message"]
    assert used < 1.0, f"{used:.2f} s of server CPU"


def post(server: Server, payload: dict) -> tuple[int, dict]:
    status, body = request(server, json.dumps(payload).encode())
    return status, json.loads(body)


@pytest.mark.slow
def test_models_serve_answers_invocations_and_400s_bad_requests(server, in_trained) -> None:
    images, labels = sample_images(in_trained, n=8)
    status, body = post(server, {"inputs": images.tolist()})  # uint8 (8, 28, 28)
    assert status == 200, body
    predictions = body["predictions"]
    assert len(predictions) == 8 and set(predictions[0]) == set(COLUMNS)
    digits = [p["digit"] for p in predictions]
    assert np.mean(np.array(digits) == labels) > 0.8
    assert all(abs(sum(p[c] for c in PROBABILITIES) - 1) < 1e-4 for p in predictions)
    assert all(p["class"] == str(p["digit"]) for p in predictions)

    flat = images.reshape(8, 784).astype(float)  # 784 float pixel columns
    frame = {"dataframe_split": {"columns": [f"px{i}" for i in range(784)], "data": flat.tolist()}}
    status, body = post(server, frame)
    assert status == 200 and [p["digit"] for p in body["predictions"]] == digits

    for bad, message in [
        ({"inputs": np.zeros((2, 27, 28)).tolist()}, "images must have shape"),
        ({"inputs": [["a", "b"]]}, "pixels must be numbers"),
        ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}, "784 pixel columns"),
    ]:
        status, body = post(server, bad)
        assert status == 400, body
        assert body["error_code"] == "INVALID_PARAMETER_VALUE" and message in body["message"]


@pytest.mark.slow
def test_load_8_clients_no_errors_and_flat_memory(server, in_trained) -> None:
    """bench/py, tiny: batches of 1 and 64 from 8 clients at once, for a second each."""
    results = [load(server, batch, clients=8, seconds=1.5, warmup=0.5) for batch in (1, 64)]
    for r in results:
        assert r["errors"] == 0, r["error_examples"]
        assert r["requests"] >= 8
        # Latencies measured as the clients see them: 8 clients sending back to back keep 8 requests in
        # flight, so the mean latency is 8 / (requests per second) (Little's law); the median is near it.
        assert 0.25 < r["p50_ms"] / (1000 * r["clients"] / r["requests_per_s"]) < 1.5, r
        # Flat: after the warm-up the server holds what it needs; more would be a leak per request.
        assert r["rss_end_mb"] - r["rss_start_mb"] < 50, r


@pytest.mark.slow
def test_malformed_requests_get_4xx_with_a_message_and_the_server_stays_up(server, in_trained) -> None:
    cases = malformed_requests()
    assert len(cases) >= 200 and len({name for name, _, _ in cases}) == len(cases)
    answers = {}
    for name, body, content_type in cases:
        status, text = request(server, body, content_type)
        answers[name] = status, text.decode(errors="replace")
    unexpected = {
        name: (status, text[:300])
        for name, (status, text) in answers.items()
        if not (status == 500 if name in MLFLOW_500 else 400 <= status < 500)
    }
    assert not unexpected, unexpected
    for name, (status, text) in answers.items():
        if 400 <= status < 500:  # a message a person can act on, not a stack trace
            message = json.loads(text)["message"] if text.startswith("{") else text
            assert message and "Traceback" not in message and "unexpected error" not in message, (name, text[:300])
    ours = {name: json.loads(text)["message"] for name, (status, text) in answers.items() if "Error: " in text}
    assert "images must have shape" in ours["shape (28, 28)"]
    strings = [message for name, message in ours.items() if name.startswith("pixel") and name.endswith('"a"')]
    assert strings and all("pixels must be numbers" in message for message in strings)
    assert f"at most {MAX_BATCH} images, got {MAX_BATCH + 1}" in ours[f"batch of {MAX_BATCH + 1}"]
    assert "pixels must lie in [0, 255]" in ours["DataFrame pixel = 256"]
    images, _ = sample_images(in_trained, n=4)
    status, body = post(server, {"inputs": images.tolist()})  # still serving
    assert status == 200 and len(body["predictions"]) == 4

    # Not refused (docs/troubleshooting.md): numpy reads JSON true/false among numbers as 1/0 before our code runs.
    answers = [request(server, f'{{"inputs": [[{"0, " * 783}{last}]]}}'.encode()) for last in ("true", "1")]
    assert answers[0][0] == 200 and answers[0] == answers[1]
