"""The CUDA path on the CPU: when the captured step is tried, its fallback, its bookkeeping (with the
graph emulated), and bench/gpu_check.py's CPU mode without MLflow, DVC or PyYAML."""

import copy
import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch

from bench import gpu_check
from pipeline.core import cuda_graphs, engine
from pipeline.core.model import build_model
from pipeline.core.step import StepConfig
from pipeline.params import ModelConfig, TrainConfig

from .conftest import REPO
from .test_distributed import tiny_split

# 200 images in batches of 32: 6 full batches (captured) and a short one of 8 (eager) per epoch.
CFG = TrainConfig(epochs=2, batch_size=32, lr=5e-3, seed=3, device="cpu", precision="fp32", schedule="onecycle")


def trained(cfg: TrainConfig = CFG, graphed: bool | None = None, resume: dict | None = None, on_epoch=None):
    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig(arch="fast", nf=8)).to(memory_format=torch.channels_last)  # BatchNorm buffers
    data = tiny_split(200)
    step = dataclasses.replace(StepConfig.of(cfg, data[0].device), cuda_graphs=graphed)
    history = engine.fit(model, data, data, cfg, step, resume=resume, on_epoch=on_epoch)
    return history, model.state_dict()


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_captured_step_is_tried_on_cuda_with_one_process_only() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    wanted = cuda_graphs.wanted
    assert wanted(cuda, 1, None) and not wanted(cuda, 2, None) and not wanted(cuda, 1, False)
    assert not wanted(cpu, 1, None) and not wanted(torch.device("mps"), 1, None)
    assert wanted(cpu, 1, True) and not wanted(cpu, 2, True)  # asked for: tried, may fall back


def test_a_failed_capture_restores_everything_and_trains_eagerly_logged_once(caplog, monkeypatch) -> None:
    """On the CPU, capture fails (capturable Adam needs a GPU) after the warm-up has run forward and
    backward, updated BatchNorm's running stats and created Adam's state: all must be undone."""
    eager = trained()
    states = []

    def stop_after_epoch_1(row: dict, state: dict) -> None:
        states.append(copy.deepcopy(state))
        raise StopIteration

    with pytest.raises(StopIteration):
        trained(on_epoch=stop_after_epoch_1)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        fallback = trained(graphed=True)
        resumed = trained(graphed=True, resume=states[0])  # with Adam's state already there
    assert fallback[0] == eager[0] and same(fallback[1], eager[1])
    assert resumed[0] == eager[0] and same(resumed[1], eager[1])
    failures = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert len(failures) == 2 and all(r.levelname == "WARNING" for r in failures)  # once per training
    assert "training eagerly" in failures[0].getMessage() and "\n" not in failures[0].getMessage()


class ReplayedEagerly:
    """Stands in for a CUDA graph on the CPU: `replay()` runs the recorded step, whose backward
    writes fresh gradients as a replayed graph does (captured after zero_grad(set_to_none=True))."""

    def __init__(self, step) -> None:
        self.step = step
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.step.__self__.optimizer.zero_grad(set_to_none=True)
        self.step()


def test_the_captured_path_bookkeeping_matches_eager(monkeypatch, caplog) -> None:
    """Everything around the graph, with the graph emulated: warm-up undone (Adam's state kept,
    zeroed), batches split between replays and the eager short batch, the schedule's lr and betas
    followed, the sums and the first bad batch: bit for bit the eager loop with the same optimizer."""
    recorded = []

    def record(step):
        recorded.append(ReplayedEagerly(step))
        return recorded[-1]

    monkeypatch.setattr(cuda_graphs, "record", record)
    monkeypatch.setattr(sys.modules["torch.optim.adam"], "_get_capturable_supported_devices", lambda **_: ["cpu"])
    eager = trained()
    with monkeypatch.context() as m:  # the eager loop with the optimizer the graph steps: Adam(capturable=True)
        adam = torch.optim.Adam
        m.setattr(torch.optim, "Adam", lambda *args, **kwargs: adam(*args, capturable=True, **kwargs))
        eager_capturable = trained()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        captured = trained(graphed=True)
    assert "training step captured as a CUDA graph (batch 32)" in caplog.text
    assert recorded[0].replays == 2 * 6  # the full batches; the short ones ran eagerly
    assert captured[0] == eager_capturable[0] and same(captured[1], eager_capturable[1])
    # Capturable Adam computes its bias corrections on the device: the same math, other rounding.
    for a, b in zip(eager[0], captured[0], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    # A loss that turns infinite in the third batch is reported as eager reports it.
    bad = dataclasses_replace(CFG, lr=1e30)
    with pytest.raises(engine.TrainingDiverged) as eager_error:
        trained(bad)
    with pytest.raises(engine.TrainingDiverged) as captured_error:
        trained(bad, graphed=True)
    assert str(captured_error.value) == str(eager_error.value)


def dataclasses_replace(cfg: TrainConfig, **changes) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


BLOCKED = """
import runpy, sys
for name in ("mlflow", "dvc", "yaml", "pandas", "matplotlib"):  # as if not installed: import fails
    sys.modules[name] = None
sys.argv = ["gpu_check", *sys.argv[1:]]
runpy.run_module("bench.gpu_check", run_name="__main__")
"""


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_tiny_without_mlflow_dvc_or_yaml(processed, tmp_path) -> None:
    cmd = [sys.executable, "-c", BLOCKED, "--device", "cpu", "--tiny", "--data", str(processed / "data/processed")]
    result = subprocess.run([*cmd, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = ("environment", "tutorial", "cpu_agreement", "fast_recipe", "step_rate")
    assert all(s in report and "error" not in report[s] for s in sections), report
    assert report["tutorial"]["two_runs_bit_identical"] is True
    assert report["tutorial"]["fast_path"] == "eager (not tried here)"  # auto: CUDA only
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # where the check ran: this checkout's reports/metrics.json, or the stated figure
        assert report["cpu_agreement"]["cpu_test_accuracy"] == gpu_check.cpu_reference()[0]
    rates = report["step_rate"]
    assert len(rates) == 8 and all(rate > 0 for rate in rates.values())
    assert sum("eager (capture failed)" in name for name in rates) == 4  # asked for, fell back on the CPU
    assert "| measurement" in result.stdout and "step rate, fast b256 bf16" in result.stdout
