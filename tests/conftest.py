"""Tiny synthetic MNIST: real IDX files of learnable 28x28 digits, and params to match."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data.datasets import IDX_FILES as FILES
from pipeline.data.idx import idx_bytes, md5

from .helpers.servers import stop_group  # noqa: F401 (the tests' own name for it)

REPO = Path(__file__).resolve().parents[1]


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 28, 28) where class k is a bright 8x8 block at a spot set by k, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        r, c = 2 + 12 * (k // 5), 5 * (k % 5)
        images[i, r : r + 8, c : c + 8] = 255
    return images, labels


def synthetic_files(n_train: int = 600, n_test: int = 200) -> dict[str, bytes]:
    """The four IDX files, uncompressed, keyed by their official names."""
    train_x, train_y = synthetic_digits(n_train, seed=0)
    test_x, test_y = synthetic_digits(n_test, seed=1)
    return dict(zip(FILES, map(idx_bytes, [train_x, train_y, test_x, test_y]), strict=True))


def tiny_params(source_dir: Path) -> dict:
    """The repo's params.yaml shrunk: local synthetic source, a few epochs, CPU."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    files = synthetic_files()
    # Own checksums: the synthetic files are the only source tried (no mirror, no wheel, no network).
    params["download"].update(source_dir=str(source_dir), checksums={k: md5(v) for k, v in files.items()})
    params["preprocess"]["val_size"] = 100
    params["train"].update(epochs=2, batch_size=32, lr=0.002, device="cpu")
    params["model"]["nf"] = 8
    params["evaluate"]["device"] = "cpu"
    params["mlflow"]["experiment_name"] = "tests"
    params["register"]["min_accuracy"] = 0.5  # the synthetic task reaches it: evaluate registers
    return params


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    """A folder holding the synthetic IDX files, as a `download.source_dir`."""
    folder = tmp_path / "source"
    folder.mkdir()
    for name, data in synthetic_files().items():
        (folder / name).write_bytes(data)
    return folder


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


def run_all_stages(root: Path, **download: object) -> Path:
    """The four stages, in-process, on synthetic data in root/source (download section updated with
    `download`): a work dir root/work with data/, models/, reports/ and its own mlflow.db."""
    from pipeline import download as download_stage
    from pipeline import evaluate, preprocess, train

    source, work = root / "source", root / "work"
    source.mkdir()
    work.mkdir()
    for name, data in synthetic_files().items():
        (source / name).write_bytes(data)
    params = tiny_params(source)
    params["download"].update(download)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = [
        (download_stage, ["--out", "data/raw"]),
        (preprocess, ["--raw", "data/raw", "--out", "data/processed"]),
        (train, ["--data", "data/processed", "--out", "models"]),
        (evaluate, ["--data", "data/processed", "--models", "models", "--out", "reports"]),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # a tiny training: sample it often
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        # The stages call mlflow.set_tracking_uri(): put MLflow's global back on exit, or it would win
        # over the MLFLOW_TRACKING_URI of every later test.
        mp.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
        for module, argv in stages:
            mp.setattr("sys.argv", [module.__name__, *argv])
            module.main()
    return work


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


def run_id_of(work: Path) -> str:
    return json.loads((work / "models/mlflow_run.json").read_text())["run_id"]


def evaluations_of(client, run_id: str) -> list:
    """The evaluation runs of the training run `run_id` (evaluate's own runs, nested under it), newest first."""
    experiment_id = client.get_run(run_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{run_id}'"
    return client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])


def copy_repo(dest: Path) -> Path:
    """Copy the tracked parts of the repo (no data, no venv) to `dest`."""
    # The repo's own outputs and caches, at its root only: pipeline/data/ is code.
    at_root = {"data", "models", "reports", "mlflow.db", "mlartifacts", "dvc_plots", "bench", "tmp", "cache"}
    at_root.add("dvc.lock")  # the committed lock of the real data: the copy builds its own
    anywhere = shutil.ignore_patterns(".venv", ".git", ".cache", "__pycache__", ".pytest_cache", ".ruff_cache")

    def ignore(folder: str, names: list[str]) -> set[str]:
        return set(anywhere(folder, names)) | (at_root & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def sh_env(**env: str) -> dict[str, str]:
    """The environment of commands run in a repo copy: the venv first on PATH, no MLflow settings."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ['PATH']}"
    environ.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return {**environ, **env}


def sh(repo: Path, *cmd: str, ok: bool = True, **env: str) -> str:
    """Run a command in a repo copy with the venv first on PATH; return its output, fail loudly."""
    result = subprocess.run(cmd, cwd=repo, env=sh_env(**env), capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == ok, f"{' '.join(cmd)} exited {result.returncode}:\n{output[-3000:]}"
    return output


def needed(what, message: str):
    """`what`, or skip the test saying `message`; in CI (CI=true) fail instead: it must run there."""
    if what is None:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return what


def synthetic_repo(root: Path) -> Path:
    """A git copy of the repo under `root` whose params read synthetic IDX files from root/source."""
    source = root / "source"
    source.mkdir()
    for name, data in synthetic_files().items():
        (source / name).write_bytes(data)
    repo = copy_repo(root / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(source), sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "copy")
    return repo


def run_main(module, monkeypatch: pytest.MonkeyPatch, *argv: str) -> None:
    """Run a stage's main() in-process with these command-line arguments."""
    monkeypatch.setattr("sys.argv", [module.__name__, *argv])
    module.main()


def set_params(workdir: Path, section: str, **values) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params[section].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def processed(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`workdir` after the download and preprocess stages: data/processed holds the splits."""
    from pipeline import download, preprocess

    run_main(download, monkeypatch, "--out", "data/raw")
    run_main(preprocess, monkeypatch, "--raw", "data/raw", "--out", "data/processed")
    return workdir


def train_until_checkpoint(workdir: Path, out: str = "models", **env: str) -> subprocess.Popen:
    """The train stage as its own process (stderr piped), returned once its first checkpoint
    (`ckpt.pt`) has landed: epoch 1 is done, epoch 2 under way (with slow enough params)."""
    cmd = [sys.executable, "-m", "pipeline.train", "--out", out, "--checkpoint", "ckpt.pt"]
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    proc = subprocess.Popen(cmd, cwd=workdir, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # imports alone take seconds on a loaded machine
    while not (workdir / "ckpt.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc
