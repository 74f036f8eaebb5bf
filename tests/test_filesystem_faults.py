"""The world around a stage fails for real: a full disk, an unwritable folder, a foreign cache."""

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline import evaluate, train
from pipeline.common.errors import PipelineError

from .helpers.repo import REPO, tiny_params
from .helpers.stages import run_main, set_params


@contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    """`mount args... target` for the block; where mounting is not allowed, skip the test saying why,
    but fail it in CI (CI=true), which must run it."""
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        message = f"cannot mount a test filesystem here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run this test, never skip it
        pytest.skip(message)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def tiny_disk(target: Path, kib: int) -> contextmanager:
    """A real filesystem of `kib` KiB (tmpfs) at `target`."""
    return mounted(target, "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs")


def read_only(target: Path) -> contextmanager:
    """`target` bind-mounted read-only on itself: even root cannot write there."""
    return mounted(target, "--bind", "-o", "ro", str(target))


@pytest.fixture
def trained_here(processed, monkeypatch) -> Path:
    """The `processed` work dir after a tiny training: models/ and the MLflow run exist."""
    run_main(train, monkeypatch, "--out", "models")
    return processed


def test_a_full_disk_under_reports_names_the_file_keeps_the_old_output_and_leaves_no_temp(
    trained_here, monkeypatch
) -> None:
    reports = trained_here / "reports"
    with tiny_disk(reports, kib=48):  # the tables fit, the two images do not
        (reports / "metrics.json").write_text('{"test_accuracy": 0.5}\n')  # from an earlier run
        with pytest.raises(PipelineError, match=r"no space left on the device to write reports/\S+\.png"):
            run_main(evaluate, monkeypatch, "--models", "models", "--out", "reports")
        assert (reports / "metrics.json").read_text() == '{"test_accuracy": 0.5}\n'  # written last: intact
        assert not [p for p in reports.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_fails_the_run(
    processed, monkeypatch
) -> None:
    """A checkpoint is ~570 kB here: on 900 kB the first fits, the second (written beside it) does not."""
    set_params(processed, "train", epochs=3)
    with tiny_disk(processed / "ckpt", kib=900):
        with pytest.raises(PipelineError, match=r"no space left on the device to write ckpt/ckpt.pt"):
            run_main(train, monkeypatch, "--out", "models", "--checkpoint", "ckpt/ckpt.pt")
        assert [p.name for p in (processed / "ckpt").iterdir()] == ["ckpt.pt"]  # no temporary file left
        kept = torch.load(processed / "ckpt/ckpt.pt", weights_only=True)
    assert len(kept["history"]) == 1  # epoch 1's, whole: the next run resumes from it
    assert MlflowClient().get_run(kept["run_id"]).info.status == "FAILED"
    assert not (processed / "models/model.pt").exists()


def test_an_unwritable_output_folder_fails_before_any_work(trained_here, monkeypatch) -> None:
    reports = trained_here / "reports"
    reports.mkdir()
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: pytest.fail("worked before checking its output"))
    with read_only(reports):
        with pytest.raises(PipelineError, match="cannot write reports: Read-only file system"):
            run_main(evaluate, monkeypatch, "--models", "models", "--out", "reports")
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before checking its output"))
    with read_only(trained_here / "models"):
        with pytest.raises(PipelineError, match="cannot write models: Read-only file system"):
            run_main(train, monkeypatch, "--out", "models")


def test_a_wheel_cache_owned_by_someone_else_is_named(tmp_path) -> None:
    """download with a cache folder that belongs to another user (nobody, mode 0755)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and util-linux's setpriv to own a folder as another user")
    params = tiny_params(tmp_path)
    params["download"].update(source_dir=None, checksums=None, mirrors=[], cache_dir="cache")  # MNIST's wheel
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "cache").mkdir()
    os.chown(tmp_path / "cache", 65534, 65534)
    # Root without CAP_DAC_OVERRIDE obeys permission bits, as any other user would.
    drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    result = subprocess.run(
        [*drop, sys.executable, "-m", "pipeline.download", "--out", "data/raw"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    assert "cannot write cache: Permission denied" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data/raw").exists()
