"""The speed options (precision, channels_last, one-cycle schedule, fast arch) and the benchmark."""

import copy
import json

import pytest
import torch

from bench import benchmark
from pipeline import download, preprocess, runtime, train
from pipeline.model import FastNet, build_model
from pipeline.params import ModelConfig, TrainConfig

from .conftest import run_main
from .test_stages import tiny_data


def test_fast_arch_contract_matches_the_tutorial_net() -> None:
    model = build_model(ModelConfig(arch="fast", nf=4))
    assert isinstance(model, FastNet)
    assert model(torch.zeros(3, 1, 28, 28, dtype=torch.uint8)).shape == (3, 10)


def test_auto_precision_is_bf16_only_where_native(monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert runtime.autocast_dtype("fp32", cpu) is None
    assert runtime.autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.autocast_dtype("auto", cpu) is None
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.autocast_dtype("auto", cpu) is torch.bfloat16


@pytest.mark.parametrize("arch", ["tutorial", "fast"])
def test_onecycle_bf16_channels_last_learns_and_resumes_identically(arch) -> None:
    cfg = TrainConfig(epochs=3, batch_size=32, lr=5e-3, seed=3, schedule="onecycle", precision="bf16")
    data = tiny_data(192)

    def model() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        return build_model(ModelConfig(arch=arch, nf=4)).to(memory_format=torch.channels_last)

    straight = model()
    history = train.fit(straight, data, data, cfg)
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    # Stop after epoch 1 as a kill would, keeping a copy of the state train saves to its checkpoint.
    states = []
    with pytest.raises(StopIteration):
        train.fit(model(), data, data, cfg, on_epoch=lambda _, s: (states.append(copy.deepcopy(s)), next(iter([]))))
    assert len(states) == 1
    resumed = model()
    train.fit(resumed, data, data, cfg, resume=states[0])
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    untrained = model().state_dict()
    assert not all(torch.equal(a[k], untrained[k]) for k in a)


def test_malloc_tuning_is_harmless() -> None:
    runtime.tune_malloc()
    assert torch.ones(1000).sum() == 1000


@pytest.mark.slow
def test_benchmark_runs_tiny(workdir, monkeypatch) -> None:
    """A tiny run so the benchmark cannot rot; its numbers mean nothing here."""
    run_main(download, monkeypatch, "--out", "data/raw")
    run_main(preprocess, monkeypatch, "--raw", "data/raw", "--out", "data/processed")
    run_main(benchmark, monkeypatch, "--steps", "2", "--out", "bench.json")
    results = json.loads((workdir / "bench.json").read_text())
    assert set(results["img_per_s"]) >= {"pipeline loop", "tutorial data path", "ceiling fp32 contiguous"}
    assert all(rate > 0 for rate in results["img_per_s"].values())
    assert len(results["ratios"]) == 3
    assert (
        results["ratios"]["bound: fastest rate / tutorial data path"]
        >= results["ratios"]["pipeline loop / tutorial data path"]
    )
