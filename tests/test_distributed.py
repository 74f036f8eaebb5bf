"""Data-parallel training on the CPU (gloo): the same math as one process, one writer, failures.

Spawned workers import this module: it imports the compute core only (no MLflow) at the top.
"""

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.common.errors import ParamsError, PipelineError
from pipeline.common.system import cores
from pipeline.core import engine
from pipeline.core.model import build_model
from pipeline.core.step import StepConfig
from pipeline.parallel import distributed, launch
from pipeline.parallel.distributed import World
from pipeline.params import ModelConfig, TrainConfig

from .conftest import run_main, set_params, synthetic_digits, train_until_checkpoint

# Per-epoch losses of 2 ranks vs 1 process on this tiny task: the same math, so only float
# rounding differs (measured: about 1e-7 relative; the real data's figure: docs/distributed.md).
TINY_TOLERANCE = 1e-4
CFG = TrainConfig(epochs=3, batch_size=32, lr=2e-3, seed=3, device="cpu", precision="fp32")


def tiny_split(n: int = 192) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = synthetic_digits(n, seed=0)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long()


def trained(arch: str, world: World = distributed.ALONE) -> tuple[list[dict], dict[str, torch.Tensor]]:
    torch.manual_seed(CFG.seed)
    model = build_model(ModelConfig(arch=arch, nf=8)).to(memory_format=torch.channels_last)
    data = tiny_split()
    history = engine.fit(model, data, data, CFG, StepConfig.of(CFG, torch.device("cpu"), world))
    return history, model.state_dict()


def ddp_worker(rank: int, size: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=size)
    world = World(rank, size, rank, "gloo")
    # fast: BatchNorm over the global batch; each arch twice, for determinism at a fixed world size
    results = {(arch, i): trained(arch, world) for arch in ("tutorial", "fast") for i in (0, 1)}
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_split_each_global_batch_into_equal_contiguous_shares() -> None:
    batch = torch.randperm(100)[:64]
    shares = [distributed.shard(batch, World(r, 4)) for r in range(4)]
    assert [len(s) for s in shares] == [16] * 4 and torch.equal(torch.cat(shares), batch)
    last = batch[:6]  # a short last batch: near-equal shares, still covering it once
    assert torch.equal(torch.cat([distributed.shard(last, World(r, 4)) for r in range(4)]), last)
    assert distributed.shard(batch, distributed.ALONE) is batch


def test_parallel_params_are_validated_with_their_keys() -> None:
    cases = {
        "train.nproc must be an integer >= 1, got 0": {"nproc": 0},
        "train.device must be auto, cuda or cpu with several training processes, got 'cuda:1'": {
            "nproc": 2,
            "device": "cuda:1",
        },
        "train.rdzv_endpoint must be null or host:port of node 0, got 'gpu0'": {"nnodes": 2, "rdzv_endpoint": "gpu0"},
        "train.batch_size must be divisible by the number of training processes, train.nproc x train.nnodes = 6": {
            "nproc": 3,
            "nnodes": 2,
            "rdzv_endpoint": "gpu0:29500",
        },
    }
    for message, values in cases.items():
        with pytest.raises(ParamsError, match=re.escape(message)):
            TrainConfig(**values)
    assert TrainConfig(nproc=2, nnodes=2, rdzv_endpoint="gpu0.internal:29500", batch_size=64).nnodes == 2


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_agree_and_repeat_bit_for_bit(tmp_path) -> None:
    mp.spawn(ddp_worker, args=(2, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for arch in ("tutorial", "fast"):
        (h0, w0), (h1, w1) = ranks[0][arch, 0], ranks[1][arch, 0]
        assert all(torch.equal(w0[k], w1[k]) for k in w0), f"{arch}: ranks differ"  # buffers too
        assert h0 == h1
        again = ranks[0][arch, 1][1]
        assert all(torch.equal(w0[k], again[k]) for k in w0), f"{arch}: not deterministic on 2 ranks"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each rank: fast also when other work shares the cores
        try:
            alone, _ = trained(arch)
        finally:
            torch.set_num_threads(threads)
        assert [r["epoch"] for r in h0] == [1, 2, 3]
        for a, b in zip(alone, h0, strict=True):
            for key in ("train_loss", "val_loss"):
                assert b[key] == pytest.approx(a[key], rel=TINY_TOLERANCE), (arch, a, b)
        assert alone[-1]["train_loss"] < alone[0]["train_loss"]  # it learned: the comparison means something


def test_bad_parallel_settings_fail_in_one_line_before_any_work(processed, monkeypatch) -> None:
    from mlflow import MlflowClient

    from pipeline import train

    def fails(match: str, error: type[Exception] = ParamsError) -> None:
        start = time.monotonic()
        with pytest.raises(error, match=match) as e:
            run_main(train, monkeypatch, "--out", "models")
        assert "\n" not in str(e.value) and time.monotonic() - start < 10
        assert not (processed / "models").exists()

    set_params(processed, "train", nproc=2, batch_size=33)
    fails(r"train.batch_size must be divisible by the number of training processes.* = 2, got 33")
    set_params(processed, "train", nproc=cores() + 1, batch_size=32 * cores() + 32)
    fails(rf"train.nproc is {cores() + 1} but this machine has {cores()} CPU")
    set_params(processed, "train", nproc=1, nnodes=2, batch_size=32, rdzv_endpoint=None)
    fails("train.rdzv_endpoint must be host:port of node 0 when train.nnodes is 2")
    set_params(processed, "train", rdzv_endpoint="no-such-host.invalid:29500")
    fails("train.rdzv_endpoint no-such-host.invalid:29500: unknown host", PipelineError)
    set_params(processed, "train", rdzv_endpoint="192.0.2.1:29500")  # TEST-NET-1: no machine's own address
    fails("node 0 hosts the rendezvous, but 192.0.2.1:29500 is not an address of this machine", PipelineError)
    with socket_listening() as port:  # node 1 where node 0's port answers: the check passes...
        launch.check_endpoint(f"127.0.0.1:{port}", rank=1, wait=1)
    # ... and where nothing listens it gives up after its wait (60 s in use, 0.5 s here).
    monkeypatch.setattr(launch, "RDZV_WAIT", 0.5)
    monkeypatch.setenv("NODE_RANK", "1")
    set_params(processed, "train", rdzv_endpoint=f"127.0.0.1:{port}")
    fails(rf"train.rdzv_endpoint 127.0.0.1:{port} is unreachable from this machine after 0.5 s", PipelineError)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ParamsError, match=r"train.nproc is 2 but this machine has 1 CUDA device\(s\)"):
        launch.check_devices(2, torch.device("cuda"))
    assert MlflowClient().search_experiments(filter_string="name = 'tests'") == []  # no run was started


class socket_listening:
    """A listening TCP socket on 127.0.0.1; yields its port, closed on exit."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


@pytest.mark.slow
def test_two_process_stage_one_run_a_killed_rank_stops_the_job_and_it_resumes_on_one(processed, monkeypatch) -> None:
    """The real train stage with train.nproc=2 (torchrun's agent, gloo); SIGKILL rank 1 in epoch 2."""
    from mlflow import MlflowClient

    from pipeline import train

    set_params(processed, "train", epochs=2, batch_size=4, nproc=2)
    set_params(processed, "model", nf=32)  # slow enough to be killed mid-training
    proc = train_until_checkpoint(processed)
    (rank1,) = [pid for pid in children(proc.pid) if b"RANK=1" in environ(pid)]
    killed = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    stderr = proc.communicate(timeout=120)[1]
    seconds = time.monotonic() - killed
    assert proc.returncode == 1 and seconds < 30, (seconds, stderr)
    last = stderr.strip().splitlines()[-1]
    expected = (
        f"error: training process rank 1 (pid {rank1}) was killed by SIGKILL; the launcher stopped the others; "
        "ckpt.pt keeps the last complete epoch; run again to resume (any train.nproc)"
    )
    assert last == expected, stderr
    assert "Traceback" not in stderr and not (processed / "models").exists()
    checkpoint = torch.load(processed / "ckpt.pt", weights_only=True)
    assert len(checkpoint["history"]) == 1
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])  # one writer, one run
    assert run.info.run_id == checkpoint["run_id"] and run.info.status in ("FAILED", "KILLED")
    assert run.data.tags["world_size"] == "2" and run.data.tags["backend"] == "gloo"
    assert run.data.params["train.nproc"] == "2"

    set_params(processed, "train", nproc=1)  # resumes on another world size, in the same run
    run_main(train, monkeypatch, "--out", "models", "--checkpoint", "ckpt.pt")
    (run,) = client.search_runs([run.info.experiment_id])
    assert run.info.run_id == checkpoint["run_id"] and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    saved = torch.load(processed / "models/model.pt", weights_only=True)
    assert saved["history"][: len(checkpoint["history"])] == checkpoint["history"]
    assert not (processed / "ckpt.pt").exists()


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
