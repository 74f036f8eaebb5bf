"""The tests' fixtures, and the order of the modules; the code behind them lives in tests/helpers/."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.common.system import cores

from .helpers import slurm
from .helpers.data import write_synthetic_source
from .helpers.repo import tiny_params
from .helpers.stages import run_all_stages, run_main

# `make test` runs the modules on pytest-xdist workers (`-n auto --dist loadfile`), each worker
# taking whole modules in collection order: the longest go first, so that no worker is left
# running one of them alone at the end (docs/testing.md, "How long", has the durations).
LONGEST_FIRST = [
    "test_end_to_end.py",
    "test_team_cache.py",
    "test_tracking_server.py",
    "test_experiments.py",
    "test_tracking_faults.py",
    "test_mlflow_project.py",
    "test_distributed.py",
    "test_bad_input_and_interrupts.py",
    "test_sweep.py",
    "test_slurm.py",
    "test_serve.py",
    "test_serving.py",
]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a worker more than the cores. A worker waits about a fifth of its time (servers
    and commands starting, polls): on 2 cores 3 workers took 303 s where 2 took 357 s (2026-12-06)."""
    return cores() + 1


def pytest_configure(config: pytest.Config) -> None:
    """On a worker of `make test`, one torch thread, in its own process and in the commands it runs
    (unless OMP_NUM_THREADS says otherwise): two workers of two threads each on two cores wait on
    each other's threads (a 0.3 s epoch of the tiny training took 16 s so, 2026-12-06)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Everything imported so far (torch, MLflow, the test modules: about 0.5 M objects) lives to
    the end: out of the collector's sight (`gc.freeze`), each full collection walks only what the
    tests made (docs/testing.md, "How long")."""
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The interpreter's teardown collects what is left, a walk of the whole heap: after two of the
    fast tier's modules in one process, from here to its exit took 5.3 s; frozen, 0.3 s."""
    gc.freeze()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    """A folder holding the synthetic IDX files, as a `download.source_dir`."""
    return write_synthetic_source(tmp_path / "source")


@pytest.fixture
def mirror(tmp_path):
    """A plain-HTTP mirror on localhost serving the files of `tmp_path / "www"`."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    (tmp_path / "www").mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path / "www", f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture
def workdir(tmp_path: Path, raw_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with tiny params.yaml and its own MLflow store; the cwd of the test."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(raw_dir), sort_keys=False))
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    # A test that called mlflow.set_tracking_uri() would otherwise win over the env var.
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return work


@pytest.fixture
def processed(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`workdir` after the download and preprocess stages: data/processed holds the splits."""
    from pipeline import download, preprocess

    run_main(download, monkeypatch, "--out", "data/raw")
    run_main(preprocess, monkeypatch, "--raw", "data/raw", "--out", "data/processed")
    return workdir


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All four stages run once, in-process, on synthetic data: a work dir with models/, reports/
    and mlflow.db (run, logged models, registered `mnist-cnn@champion`). Shared: do not modify."""
    return run_all_stages(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def trained_fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As `trained`, with `download.dataset: fashion-mnist` (the synthetic files under its class
    names). Shared: do not modify."""
    return run_all_stages(tmp_path_factory.mktemp("trained_fashion"), dataset="fashion-mnist")


@pytest.fixture
def in_trained(trained: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The `trained` work dir as cwd, its MLflow store as the tracking URI."""
    monkeypatch.chdir(trained)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return trained


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[slurm.SlurmCluster]:
    """A private one-node Slurm (tests/helpers/slurm.py) for the whole session."""
    with slurm.slurm_cluster() as cluster:
        yield cluster
