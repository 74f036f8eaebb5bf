"""Determinism: same params, data and machine give the same bits; what a device change keeps."""

import copy
import hashlib
import importlib
import json
import os
import platform

import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline import preprocess, train
from pipeline.core import engine, runtime
from pipeline.params import ModelConfig, TrainConfig
from pipeline.tracking import tags as run_tags

from .helpers.stages import run_main


@pytest.fixture
def restore_determinism():
    """make_deterministic() flips process-wide switches; put them back for the other tests."""
    algorithms, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    fill = torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(algorithms)
    torch.backends.cudnn.benchmark = benchmark
    torch.utils.deterministic.fill_uninitialized_memory = fill


def test_make_deterministic_turns_every_switch(monkeypatch, restore_determinism) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    runtime.make_deterministic(3)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert not torch.utils.deterministic.fill_uninitialized_memory
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    a = torch.rand(3)
    runtime.make_deterministic(3)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["tutorial", "fast3", "wide", "deep"])
def test_no_op_reads_memory_it_did_not_write(arch, precision, restore_determinism) -> None:
    """make_deterministic turns off PyTorch's NaN fill of new tensors: a step that read such memory
    would come out different (or NaN) with the fill on. Each network trained with every kind of
    augmentation and a weight average, both ways: the same bits."""
    images = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(96) % 10
    model_cfg = ModelConfig(arch=arch, nf=4)
    augment = {"shift": 2, "rotate": 10.0, "scale": 0.1, "elastic": 0.5, "flip": True, "erase": 6}
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01, precision=precision, device="cpu", ema=0.9, **augment)

    def trained(fill: bool) -> tuple[list, dict]:
        model = engine.build(model_cfg, cfg, torch.device("cpu"))  # make_deterministic: fill off
        torch.utils.deterministic.fill_uninitialized_memory = fill
        history = engine.fit(model, (images, labels), (images[:32], labels[:32]), cfg)
        return history, model.state_dict()

    (history_filled, filled), (history, unfilled) = trained(True), trained(False)
    assert history == history_filled and all(row["train_loss"] < 10 for row in history)  # NaN fails too
    assert filled.keys() == unfilled.keys() and all(torch.equal(filled[k], unfilled[k]) for k in filled)


def test_cublas_workspace_is_set_on_import_before_cuda_starts(monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    importlib.reload(runtime)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.cuda.is_initialized()  # importing the stages starts no CUDA context


def test_cuda_runs_are_tagged_with_versions_and_device_name(monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91300)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert runtime.gpu_driver_version() is None or torch.cuda.is_available()  # no NVIDIA driver: None, no error
    monkeypatch.setattr(runtime, "gpu_driver_version", lambda: "570.124.06")
    tags = run_tags.device_tags(torch.device("cuda"))
    assert tags == {
        "device": "cuda",
        "torch_version": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "host": platform.node(),
        "cuda_version": "13.0",
        "cudnn_version": "91300",
        "device_name": "NVIDIA H100 80GB HBM3",
        "gpu_driver_version": "570.124.06",
    }
    tags = {"device": "cpu", "torch_version": torch.__version__, "threads": str(torch.get_num_threads())}
    tags |= {"host": platform.node(), "device_name": runtime.cpu_name()}
    tags["cpu_native_bf16"] = "true" if runtime.cpu_has_native_bf16() else "false"
    assert run_tags.device_tags(torch.device("cpu")) == tags
    assert tags["device_name"]  # the CPU's model name: a cache hit's run says which chip computed it


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_training_twice_gives_bit_identical_weights_and_metrics(processed, monkeypatch, restore_determinism) -> None:
    for out in ("models_a", "models_b"):
        run_main(train, monkeypatch, "--data", "data/processed", "--out", out)
    a, b = (torch.load(processed / out / "model.pt", weights_only=True) for out in ("models_a", "models_b"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["history"] == b["history"]  # floats compared exactly
    assert pd.read_csv("models_a/history.csv").equals(pd.read_csv("models_b/history.csv"))
    client = MlflowClient()
    runs = [json.loads((processed / out / "mlflow_run.json").read_text())["run_id"] for out in ("models_a", "models_b")]
    metrics = [client.get_run(r).data.metrics for r in runs]
    timed = ("epoch_seconds", "train_seconds", "system/")  # wall-clock and machine load differ between runs
    assert runs[0] != runs[1] and {k: v for k, v in metrics[0].items() if not k.startswith(timed)} == {
        k: v for k, v in metrics[1].items() if not k.startswith(timed)
    }


class StopTraining(Exception):
    """Raised in place of fit(): the test needs everything train does before the first step."""


def test_data_split_and_initial_weights_do_not_depend_on_the_device(
    processed, workdir, monkeypatch, restore_determinism
) -> None:
    """CPU vs CUDA cannot be bit-identical after training; what comes before must be.

    On a CPU-only machine "cuda" is played by the meta device: a model built on the device
    instead of on the CPU before the move would have no values, and the comparison would fail.
    """
    initial: dict[str, dict[str, torch.Tensor]] = {}
    real_build = engine.build_model

    def recording_build(cfg):
        model = real_build(cfg)
        initial[device] = copy.deepcopy(model.state_dict())
        return model

    def stop(*args, **kwargs):
        raise StopTraining

    monkeypatch.setattr(engine, "build_model", recording_build)
    monkeypatch.setattr(train, "fit", stop)
    monkeypatch.setattr(train, "pick_device", lambda name, key: torch.device("meta" if name == "cuda" else name))
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    for device in ("cpu", "cuda"):
        params["train"]["device"] = device
        (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        with pytest.raises(StopTraining):
            run_main(train, monkeypatch, "--data", "data/processed", "--out", f"models_{device}")

    cpu, cuda = initial["cpu"], initial["cuda"]
    assert all(t.device.type == "cpu" for t in cuda.values())
    assert all(torch.equal(cpu[k], cuda[k]) for k in cpu)
    runs = MlflowClient().search_runs([r.experiment_id for r in MlflowClient().search_experiments()])
    assert {r.data.tags["device"] for r in runs} == {"cpu", "meta"}
    assert len({r.data.tags["data.train_md5"] for r in runs}) == 1  # the same bytes went in
    # The split is the seeded CPU permutation, whatever trains on it.
    assert torch.equal(
        torch.load(processed / "data/processed/val.pt")["indices"], preprocess.split(600, 100, seed=42)[1]
    )
    first = {name: md5(processed / "data/processed" / name) for name in ("train.pt", "val.pt", "test.pt")}
    run_main(preprocess, monkeypatch, "--raw", "data/raw", "--out", "processed_again")
    assert {name: md5(workdir / "processed_again" / name) for name in first} == first


def test_a_device_that_is_not_there_is_a_params_error(monkeypatch) -> None:
    from pipeline.common.errors import ParamsError
    from pipeline.core.runtime import pick_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ParamsError, match=r"train.device is 'cuda' but this machine has 0 CUDA device\(s\)"):
        pick_device("cuda", "train.device")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ParamsError, match="evaluate.device is 'mps' but MPS is not available"):
        pick_device("mps", "evaluate.device")
    assert pick_device("cpu", "train.device") == torch.device("cpu")
