"""The speed options (precision, channels_last, one-cycle schedule, fast arch) and the benchmark."""

import copy
import ctypes
import json

import pytest
import torch

from bench import benchmark
from pipeline import download, preprocess
from pipeline.core import engine, runtime
from pipeline.core.model import FastNet, build_model
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

    def model() -> torch.nn.Module:  # seeded as the train stage seeds it
        return engine.build(ModelConfig(arch=arch, nf=4), cfg, torch.device("cpu"))

    straight = model()
    history = engine.fit(straight, data, data, cfg)
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    # Stop after epoch 1 as a kill would, keeping a copy of the state train saves to its checkpoint.
    states = []
    with pytest.raises(StopIteration):
        engine.fit(model(), data, data, cfg, on_epoch=lambda _, s: (states.append(copy.deepcopy(s)), next(iter([]))))
    assert len(states) == 1
    resumed = model()
    engine.fit(resumed, data, data, cfg, resume=states[0])
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    untrained = model().state_dict()
    assert not all(torch.equal(a[k], untrained[k]) for k in a)


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (<malloc.h>)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


def test_malloc_tuning_keeps_large_buffers_off_mmap() -> None:
    """What tune_malloc is for: a 64 MiB buffer (an activation of a large batch) comes from the heap,
    not from its own mmap, which glibc would unmap on free and fault in again on the next batch."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33: tune_malloc does nothing here")
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = (
        ctypes.c_void_p,
        [ctypes.c_size_t],
        [ctypes.c_void_p],
    )
    runtime.tune_malloc()
    before = libc.mallinfo2().hblkhd  # bytes in mmapped chunks
    buffer = libc.malloc(64 << 20)
    mapped = libc.mallinfo2().hblkhd - before
    libc.free(buffer)
    assert buffer and mapped == 0, f"{mapped} bytes mmapped: glibc's default (threshold at most 32 MiB) is in force"


@pytest.mark.slow
def test_benchmark_runs_tiny(workdir, monkeypatch) -> None:
    """A tiny run so the benchmark cannot rot; its numbers mean nothing here."""
    run_main(download, monkeypatch, "--out", "data/raw")
    run_main(preprocess, monkeypatch, "--raw", "data/raw", "--out", "data/processed")
    run_main(benchmark, monkeypatch, "--steps", "2", "--out", "bench.json")
    results = json.loads((workdir / "bench.json").read_text())
    assert set(results["img_per_s"]) >= {"pipeline loop", "tutorial data path", "ceiling fp32 contiguous"}
    assert all(rate > 0 for rate in results["img_per_s"].values())
    # Each ratio is what its name says, computed from the rates reported beside it.
    rates, ratios = results["img_per_s"], results["ratios"]
    assert len(ratios) == 3
    assert ratios["pipeline loop / tutorial data path"] == pytest.approx(
        rates["pipeline loop"] / rates["tutorial data path"]
    )
    assert ratios["bound: fastest rate / tutorial data path"] == pytest.approx(
        max(rates.values()) / rates["tutorial data path"]
    )
    (same,) = [name for name in ratios if name.startswith("pipeline loop / ceiling")]
    assert ratios[same] == pytest.approx(rates["pipeline loop"] / rates[same.removeprefix("pipeline loop / ")])
