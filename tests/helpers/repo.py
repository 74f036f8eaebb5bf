"""The repo under test: its root, temporary copies of it, and commands run in them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .data import synthetic_checksums, write_synthetic_source

REPO = Path(__file__).resolve().parents[2]


def tiny_params(source_dir: Path) -> dict:
    """The repo's params.yaml shrunk: local synthetic source, a few epochs, CPU."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # Own checksums: the synthetic files are the only source tried (no mirror, no wheel, no network).
    params["download"].update(source_dir=str(source_dir), checksums=synthetic_checksums())
    params["preprocess"]["val_size"] = 100
    params["train"].update(epochs=2, batch_size=32, lr=0.002, device="cpu")
    params["model"]["nf"] = 8
    params["evaluate"]["device"] = "cpu"
    params["mlflow"]["experiment_name"] = "tests"
    params["register"]["min_accuracy"] = 0.5  # the synthetic task reaches it: evaluate registers
    return params


def needed(what, message: str):
    """`what`, or skip the test saying `message`; in CI (CI=true) fail instead: it must run there."""
    if what is None:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return what


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


def synthetic_repo(root: Path) -> Path:
    """A git copy of the repo under `root` whose params read synthetic IDX files from root/source."""
    source = write_synthetic_source(root / "source")
    repo = copy_repo(root / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(source), sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "copy")
    return repo
