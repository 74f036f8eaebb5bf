"""The batching server (`python -m pipeline.serve`): its parsing and batching in process, then the real
server on 127.0.0.1 (own process group): the classifier's answers for every body, the hostile requests,
the alias moved under load, a registry that cannot be read."""

import asyncio
import contextlib
import gc
import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.pyfunc import scoring_server

from pipeline.serving.batching import INLINE_IMAGES, Batcher, BatchLimits
from pipeline.serving.pyfunc import PIXELS, to_batch
from pipeline.serving.server import BadRequest, freeze, from_body
from pipeline.serving.settings import ServeSettings

from .helpers.load import UP_LINE, Server, request, wait_up
from .helpers.malformed import malformed_requests
from .helpers.repo import REPO
from .helpers.servers import free_port, stop_group

CHAMPION = "models:/mnist-cnn@champion"
POLL_S = 0.5
BODY_TIMEOUT_S = 2.0
HEAD_TIMEOUT_S = 2.0
REQUESTS_PER_CONNECTION = 50  # the served fixture's: its clients reconnect now and then, as a proxy's would


def images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28)).astype(np.uint8)


def npy(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


def npy_head(shape: tuple[int, ...]) -> bytes:
    """A .npy header declaring a float64 array of `shape`, as np.save writes it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def bodies(x: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """The same images in every body the server takes: {name: (body, content type)}."""
    flat = x.reshape(len(x), PIXELS)
    columns = [f"px{i}" for i in range(PIXELS)]
    csv = ",".join(columns) + "\n" + "".join(",".join(map(str, row)) + "\n" for row in flat)
    as_json = {
        "inputs": {"inputs": x.tolist()},
        "instances": {"instances": x[:, None].tolist()},
        "dataframe_split": {"dataframe_split": {"columns": columns, "data": flat.tolist()}},
        "dataframe_records": {"dataframe_records": [dict(zip(columns, row, strict=True)) for row in flat.tolist()]},
    }
    out = {name: (json.dumps(body).encode(), "application/json") for name, body in as_json.items()}
    out["csv"] = csv.encode(), "text/csv"
    out["npy float"] = npy(x.astype(np.float32)), "application/x-npy"
    out["raw uint8"] = x.tobytes(), "application/octet-stream"
    return out


def test_every_body_gives_the_classifier_the_same_images() -> None:
    x = images()
    expected = to_batch(x)
    for name, (body, content_type) in bodies(x).items():
        assert torch.equal(to_batch(from_body(body, content_type)), expected), name


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b'{"inputs": ' + b"[" * 100_000 + b"0" + b"]" * 100_000 + b"}", "application/json", 400, "nested too deep"),
        (b'{"inputs": [[' + b"9" * 5000 + b"]]}", "application/json", 400, "not valid JSON"),
        (b'{"inputs": [[0]], "instances": [[0]]}', "application/json", 400, "exactly one of the keys"),
        (b"{}", "application/json; charset=latin-1", 415, "only charset=utf-8"),
        (b"{}", "application/xml", 415, "is not accepted"),
        (b"\x00" * 785, "application/octet-stream", 400, "N x 784 uint8 pixels"),
        (b"not npy", "application/x-npy", 400, "not a .npy array"),
        (npy(np.array([{"a": 1}], dtype=object)), "application/x-npy", 400, "not a .npy array"),  # no unpickling
        (b"\xff\xfe", "text/csv", 400, "not CSV"),
        (npy_head((10**9, 784)) + b"\x00" * 64, "application/x-npy", 400, "more than the body holds"),
    ],
)
def test_bodies_that_are_not_images_are_refused_with_a_status_and_a_reason(body, content_type, status, message):
    with pytest.raises(BadRequest, match=message) as e:
        from_body(body, content_type)
    assert e.value.status == status


def test_settings_are_checked_with_their_names() -> None:
    with pytest.raises(ValueError, match="--workers must be at least 1, got 0"):
        ServeSettings(CHAMPION, 0, 64, 2, 16, 10, 10, 10)
    with pytest.raises(ValueError, match=r"--max-wait-ms must be in \[0, 1000\], got 5000"):
        ServeSettings(CHAMPION, 1, 64, 5000, 16, 10, 10, 10)
    with pytest.raises(ValueError, match=r"--poll-s must be 0 \(never\) or more, got -1"):
        ServeSettings(CHAMPION, 1, 64, 0, 16, -1, 10, 10)
    with pytest.raises(ValueError, match="--body-timeout-s must be positive, got 0"):
        ServeSettings(CHAMPION, 1, 64, 0, 16, 10, 0, 10)
    with pytest.raises(ValueError, match="--head-timeout-s must be positive, got -1"):
        ServeSettings(CHAMPION, 1, 64, 0, 16, 10, 10, -1)
    with pytest.raises(ValueError, match=r"--requests-per-connection must be 0 \(no limit\) or more, got -1"):
        ServeSettings(CHAMPION, 1, 64, 0, 16, 10, 10, 10, -1)


def test_concurrent_requests_become_one_call_within_the_cap() -> None:
    calls: list[int] = []

    def run(x: torch.Tensor):
        calls.append(len(x))
        time.sleep(0.01)  # the network busy: the next requests queue meanwhile
        return x.flatten(1)[:, :1].numpy(), "v1"  # each image's first pixel: which answer went to whom

    async def main() -> list:
        batcher = Batcher(run, BatchLimits(max_images=24, max_wait_s=0.005))
        batcher.start()
        sizes = [1, 2, 3] * 4 + [20, 20]  # 24 + 40 images: small batches run in the loop, big ones in the thread
        requests = [torch.full((n, 1, 28, 28), float(i)) for i, n in enumerate(sizes)]
        alone = torch.full((2, 1, 28, 28), -1.0)
        answers = [await batcher.submit(alone)]  # nobody to join it: a batch of 2
        answers += await asyncio.gather(*(batcher.submit(x) for x in requests))
        await batcher.stop()
        return list(zip([alone, *requests], answers, strict=True))

    for x, (probs, tag) in asyncio.run(main()):
        assert tag == "v1" and probs.shape == (len(x), 1) and (probs == x[0, 0, 0, 0].item()).all()
    assert calls[0] == 2 and sum(calls) == 66 and max(calls) <= 24 and len(calls) <= 6  # merged, never over the cap
    assert max(calls) > INLINE_IMAGES and min(calls) <= INLINE_IMAGES  # both ways of running one


def test_a_failed_batch_fails_its_requests_and_the_next_batch_runs() -> None:
    def run(x: torch.Tensor):
        if (x < 0).any():
            raise RuntimeError("boom")
        return x.flatten(1)[:, :1].numpy(), "v1"

    async def main() -> tuple:
        batcher = Batcher(run, BatchLimits(max_images=1, max_wait_s=0))
        batcher.start()
        bad = await asyncio.gather(batcher.submit(torch.full((1, 1, 28, 28), -1.0)), return_exceptions=True)
        good = await batcher.submit(torch.ones(1, 1, 28, 28))
        await batcher.stop()
        return bad[0], good

    bad, (probs, _) = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and probs.item() == 1.0


def test_a_lone_request_waits_for_nobody_and_requests_that_come_together_wait_for_more() -> None:
    calls: list[int] = []

    def run(x: torch.Tensor):
        calls.append(len(x))
        return x.flatten(1)[:, :1].numpy(), "v1"

    async def main() -> tuple[float, float]:
        batcher = Batcher(run, BatchLimits(max_images=64, max_wait_s=0.3))
        batcher.start()
        one, clock = torch.zeros(1, 1, 28, 28), asyncio.get_running_loop().time
        start = clock()
        await batcher.submit(one)  # nothing came with it before: no wait
        alone = clock() - start
        await asyncio.gather(batcher.submit(one), batcher.submit(one))  # one call of 2: the next one waits
        start = clock()
        first = asyncio.ensure_future(batcher.submit(one))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, batcher.submit(one))  # came 50 ms after the first: joined its call
        waited = clock() - start
        await batcher.stop()
        return alone, waited

    alone, waited = asyncio.run(main())
    assert calls == [1, 2, 2] and alone < 0.2 and 0.25 < waited < 2, (calls, alone, waited)


def test_the_wait_ends_once_every_request_that_can_come_has_come() -> None:
    calls: list[int] = []

    def run(x: torch.Tensor):
        calls.append(len(x))
        return x.flatten(1)[:, :1].numpy(), "v1"

    async def main() -> float:
        # 3 clients (open connections), a wait of up to 0.3 s: the third arriving closes the call at once.
        batcher = Batcher(run, BatchLimits(max_images=64, max_wait_s=0.3), expected=lambda: 3)
        batcher.start()
        one, clock = torch.zeros(1, 1, 28, 28), asyncio.get_running_loop().time
        await asyncio.gather(*(batcher.submit(one) for _ in range(3)))  # together: the next call may wait
        start = clock()
        first = [asyncio.ensure_future(batcher.submit(one)) for _ in range(2)]
        await asyncio.sleep(0.05)
        await asyncio.gather(*first, batcher.submit(one))  # the third, 50 ms later: no wait after it
        waited = clock() - start
        await batcher.stop()
        return waited

    waited = asyncio.run(main())
    assert calls == [3, 3] and 0.04 < waited < 0.2, (calls, waited)


class Node:
    """An object in a reference cycle: only the garbage collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_frozen_objects_stay_out_of_collections_until_a_new_model_is_frozen() -> None:
    old = Node()  # stands for a model's objects, which hold cycles
    gone = weakref.ref(old)
    try:
        freeze()  # the server's start: everything loaded is frozen
        assert gc.get_freeze_count() > 0
        del old  # the alias moved: the old model is dropped
        gc.collect()
        assert gone() is not None  # frozen: no full pass sees it (that is what freeze is for)
        freeze(again=True)  # the new model frozen in its place
        assert gone() is None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


# The real server. One for the module, serving a copy of the trained registry (the alias is moved in it).


def start(registry: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{registry}",
        "INFERENCE_PRECISION": "fp32",  # numbers compared with the in-process classifier: same on any CPU
        "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool",  # each poll opens the database anew (the dead-registry test)
        "PYTHONPATH": str(REPO),
    }
    cmd = [sys.executable, "-m", "pipeline.serve", "--host", "127.0.0.1", *args]
    with log.open("w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def served(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """`python -m pipeline.serve --workers 2` of a copy of the trained registry's champion; (server, registry)."""
    root = tmp_path_factory.mktemp("serve")
    registry = root / "mlflow.db"
    shutil.copy(trained / "mlflow.db", registry)  # the artifacts stay where the runs wrote them (absolute URIs)
    port, log = free_port(), root / "serve.log"
    settings = ["--poll-s", str(POLL_S), "--max-body-mb", "4", "--body-timeout-s", str(BODY_TIMEOUT_S)]
    settings += ["--head-timeout-s", str(HEAD_TIMEOUT_S), "--requests-per-connection", str(REQUESTS_PER_CONNECTION)]
    proc = start(registry, log, "--workers", "2", "--port", str(port), *settings)
    server = Server(f"http://127.0.0.1:{port}", "127.0.0.1", port, proc, log)
    try:
        wait_up(server, UP_LINE, count=2)
        yield server, registry
    finally:
        stop_group(proc)  # the server and its workers


def post(server: Server, body: bytes, content_type: str | None) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of one request on a fresh connection."""
    import http.client

    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request("POST", "/invocations", body=body, headers={"Content-Type": content_type} if content_type else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


@pytest.mark.slow
def test_the_server_answers_every_body_as_the_classifier_does_in_process(served, trained, monkeypatch) -> None:
    server, _ = served
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained / 'mlflow.db'}")
    monkeypatch.setenv("INFERENCE_PRECISION", "fp32")
    model = mlflow.pyfunc.load_model(CHAMPION)
    x = images(7)
    reference = scoring_server.invocations(json.dumps({"inputs": x.tolist()}), "application/json", model, None)
    expected = json.loads(reference.response)  # MLflow's own request path, in this process
    for name, (body, content_type) in bodies(x).items():
        status, answer, headers = post(server, body, content_type)
        assert status == 200 and headers["x-model-version"] == "1", (name, answer)
        got, want = pd.DataFrame(answer["predictions"]), pd.DataFrame(expected["predictions"])
        assert list(got.columns) == list(want.columns) and (got["digit"] == want["digit"]).all(), name
        assert (got["class"] == want["class"]).all(), name
        assert np.allclose(got.filter(like="prob_"), want.filter(like="prob_"), atol=1e-6), name
    for path, body in [("/ping", "\n"), ("/health", "\n"), ("/version", mlflow.__version__)]:  # as MLflow answers
        status, text = request(server, b"", method="GET", path=path)
        assert status == 200 and text.decode() == body


@pytest.mark.slow
def test_a_kept_alive_connection_is_closed_after_its_share_of_answers_so_that_clients_spread(served) -> None:
    import http.client

    server, _ = served
    body = json.dumps({"inputs": images(1).tolist()}).encode()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)  # reconnects by itself once closed
    closed = []
    for _ in range(2 * REQUESTS_PER_CONNECTION):
        conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["predictions"]) == 1
        closed.append(response.getheader("connection") == "close")
    conn.close()
    n = REQUESTS_PER_CONNECTION
    assert [i + 1 for i, c in enumerate(closed) if c] == [n, 2 * n]  # the n-th answer of each connection


@pytest.mark.slow
def test_the_command_refuses_bad_settings_and_a_missing_alias_in_one_line(trained, tmp_path) -> None:
    registry = tmp_path / "mlflow.db"
    shutil.copy(trained / "mlflow.db", registry)
    bad = start(registry, tmp_path / "bad.log", "--workers", "0")
    missing = start(registry, tmp_path / "missing.log", "--model", "models:/mnist-cnn@nope")
    assert bad.wait(60) == 2 and "--workers must be at least 1, got 0" in (tmp_path / "bad.log").read_text()
    assert missing.wait(60) == 1
    said = (tmp_path / "missing.log").read_text()
    assert "error: cannot serve models:/mnist-cnn@nope: " in said and "Traceback" not in said, said


def send_raw(server: Server, start: bytes, chunks: list[bytes]) -> bytes:
    """Send a request's head and then its chunks while the server reads them; the answer's first bytes."""
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(start)
        with contextlib.suppress(OSError):  # the server answers and closes before reading it all
            for chunk in chunks:
                s.sendall(chunk)
        return s.recv(4096)


def head(length: int | None) -> bytes:
    """The head of a JSON request declaring a body of `length` bytes."""
    headers = f"Host: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
    return f"POST /invocations HTTP/1.1\r\n{headers}\r\n".encode()


@pytest.mark.slow
def test_hostile_requests_get_4xx_with_one_line_and_cost_nothing(served) -> None:
    server, _ = served
    cases = malformed_requests()  # the ones mlflow models serve gets; it answers 4 of them with 500
    for name, body, content_type in cases:
        status, text = request(server, body, content_type)
        assert 400 <= status < 500, (name, status, text[:300])
        message = json.loads(text)["message"]
        assert message and "\n" not in message and "Traceback" not in message, (name, message)
    # Bodies over the limit (4 MB here, above every case above) get 413: one declared as 1 GB from its
    # header, unread; one sent in chunks (no length declared) once 4 MB of it has come. The server then
    # closes the connection, so a client may see it reset before the answer: raw sockets here.
    assert send_raw(server, head(10**9), []).startswith(b"HTTP/1.1 413")
    chunked = head(None).replace(b"Content-Length: None", b"Transfer-Encoding: chunked")
    assert send_raw(server, chunked, [b"10000\r\n" + b" " * 2**16 + b"\r\n"] * 80).startswith(b"HTTP/1.1 413")
    # Clients that leave mid-body: nothing to answer, nothing logged, the server still serves.
    cpu = server.cpu_s()
    for _ in range(20):
        with socket.create_connection((server.host, server.port), timeout=10) as s:
            s.sendall(head(500_000))
            s.sendall(b'{"inputs": [[' + b"0, " * 10_000)
    time.sleep(0.5)
    assert server.cpu_s() - cpu < 1.0
    status, answer, _ = post(server, json.dumps({"inputs": images(2).tolist()}).encode(), "application/json")
    assert status == 200 and len(answer["predictions"]) == 2
    assert "Traceback" not in server.log.read_text() and "Exception" not in server.log.read_text()


def trickle(server: Server, out: list[tuple[float, bytes, bytes]], first: bytes, drip: bytes) -> None:
    """A client sending `first`, then `drip` every 0.1 s (slowloris): (seconds to the answer, the answer, what
    followed)."""
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        start = time.monotonic()
        s.sendall(first)
        answer = b""
        while not answer and time.monotonic() - start < 30:
            with contextlib.suppress(OSError):
                if drip:
                    s.sendall(drip)
            if select.select([s], [], [], 0.1)[0]:
                answer = s.recv(4096)
        took = time.monotonic() - start
        rest = b""
        with contextlib.suppress(OSError):  # the server closes: b"" (or a reset, for the bytes it left unread)
            while chunk := s.recv(4096):
                rest += chunk
        out.append((took, answer, rest))


def slow_clients_are_cut_while_the_others_are_served(
    server: Server, clients: list[tuple[bytes, bytes]], timeout_s: float, message: str
) -> None:
    """Each (first, drip) client trickles at once; each must get 408 saying `message`, then a closed connection,
    `timeout_s` after it began; one-image requests sent meanwhile are answered, each within a second."""
    slow: list[tuple[float, bytes, bytes]] = []
    tricklers = [threading.Thread(target=trickle, args=(server, slow, *client)) for client in clients]
    for t in tricklers:
        t.start()
    body = json.dumps({"inputs": images(1).tolist()}).encode()
    served_meanwhile = []
    while any(t.is_alive() for t in tricklers):
        start = time.monotonic()
        status, answer, _ = post(server, body, "application/json")
        served_meanwhile.append((status, len(answer["predictions"]), time.monotonic() - start))
    for t in tricklers:
        t.join()
    assert len(slow) == len(clients)
    for took, answer, rest in slow:  # the answer, then the connection closed (the reading above ended)
        response_head, _, payload = (answer + rest).partition(b"\r\n\r\n")
        assert response_head.startswith(b"HTTP/1.1 408") and b"connection: close" in response_head.lower(), answer
        assert json.loads(payload)["message"].startswith(message), payload
        assert timeout_s - 0.1 <= took < timeout_s + 3, took  # the server may accept before the client's clock starts
    assert len(served_meanwhile) >= 10, served_meanwhile  # not blocked: answered while the clients trickled
    assert all(status == 200 and n == 1 and seconds < 1 for status, n, seconds in served_meanwhile), served_meanwhile


@pytest.mark.slow
def test_a_body_that_trickles_in_is_cut_at_the_timeout_while_the_others_are_served(served) -> None:
    server, _ = served
    bodies_trickling = [(head(10_000), b" ")] * 8  # JSON whitespace: never a complete body; more than the workers
    slow_clients_are_cut_while_the_others_are_served(
        server, bodies_trickling, BODY_TIMEOUT_S, "the body did not arrive within 2 s ("
    )


@pytest.mark.slow
def test_a_head_that_trickles_in_or_never_comes_is_cut_at_the_timeout_while_the_others_are_served(served) -> None:
    server, _ = served
    header_growing = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a")  # a header never ended
    line_growing = (b"POST /invo", b"c")  # the request line never ended
    silent = (b"", b"")  # a connection that sends nothing
    clients = [header_growing] * 4 + [line_growing] * 2 + [silent] * 2
    slow_clients_are_cut_while_the_others_are_served(
        server, clients, HEAD_TIMEOUT_S, "the request head did not arrive within 2 s"
    )


@pytest.mark.slow
def test_the_alias_moves_under_load_without_a_failed_request(served, monkeypatch) -> None:
    server, registry = served
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registry}")
    client = mlflow.MlflowClient()
    first = client.get_model_version_by_alias("mnist-cnn", "champion")
    versions: list[str] = []
    failures: list[str] = []
    done = threading.Event()
    body = json.dumps({"inputs": images(1).tolist()}).encode()

    def send() -> None:
        while not done.is_set():
            try:
                status, answer, headers = post(server, body, "application/json")
                assert status == 200 and len(answer["predictions"]) == 1, (status, answer)
                versions.append(headers["x-model-version"])
            except Exception as e:  # every failure counts
                failures.append(repr(e))

    clients = [threading.Thread(target=send) for _ in range(8)]
    for t in clients:
        t.start()
    # Under load first: 20 answers from version 1 (after a fixed second, one full run on a busy host
    # had no answer yet, and its first came from the new version).
    loaded_by = time.monotonic() + 30
    while len(versions) < 20 and not failures and time.monotonic() < loaded_by:
        time.sleep(0.05)
    moved = time.monotonic()
    second = mlflow.register_model(first.source, "mnist-cnn")  # the same classifier as a new version
    client.set_registered_model_alias("mnist-cnn", "champion", second.version)
    deadline = moved + 30
    line = f"alias moved: models:/mnist-cnn/{second.version} now answers (was version 1)"
    # Both workers switched (each says so once), then 20 answers in a row from the new version: 20 from the
    # first worker to switch alone could come while the other still answers from the old one.
    while time.monotonic() < deadline and not (
        server.log.read_text().count(line) == 2 and versions[-20:] == [str(second.version)] * 20
    ):
        time.sleep(0.1)
    took = time.monotonic() - moved
    done.set()
    for t in clients:
        t.join()
    assert not failures, failures[:5]
    assert versions[0] == "1" and versions[-1] == str(second.version) and took < 10, (took, versions[-30:])
    assert server.log.read_text().count(line) == 2  # each worker says it once


@pytest.mark.slow
def test_a_registry_that_cannot_be_read_keeps_the_model_serving_with_one_log_line(served) -> None:
    server, registry = served
    saved = registry.with_suffix(".saved")
    os.replace(registry, saved)
    registry.write_bytes(b"not a database" * 100)  # every read of the registry fails from now on
    try:
        time.sleep(6 * POLL_S)  # several polls
        for _ in range(10):
            status, answer, _ = post(server, json.dumps({"inputs": images(1).tolist()}).encode(), "application/json")
            assert status == 200 and len(answer["predictions"]) == 1
        assert server.log.read_text().count("unreadable, the current model keeps serving") == 2  # once per worker
    finally:
        os.replace(saved, registry)
    deadline = time.monotonic() + 10
    while server.log.read_text().count("registry readable again") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log.read_text().count("registry readable again") == 2
