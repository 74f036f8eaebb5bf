"""The pipeline's stages run for tests: in-process on a work dir, or the train stage as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .data import write_synthetic_source
from .repo import REPO, tiny_params


def run_main(module, monkeypatch: pytest.MonkeyPatch, *argv: str) -> None:
    """Run a stage's main() in-process with these command-line arguments."""
    monkeypatch.setattr("sys.argv", [module.__name__, *argv])
    module.main()


def set_params(workdir: Path, section: str, **values) -> None:
    """Update one section of workdir/params.yaml with `values`."""
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params[section].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_all_stages(root: Path, **download: object) -> Path:
    """The four stages, in-process, on synthetic data in root/source (download section updated with
    `download`): a work dir root/work with data/, models/, reports/ and its own mlflow.db."""
    from pipeline import download as download_stage
    from pipeline import evaluate, preprocess, train

    source, work = write_synthetic_source(root / "source"), root / "work"
    work.mkdir()
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
            run_main(module, mp, *argv)
    return work


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
