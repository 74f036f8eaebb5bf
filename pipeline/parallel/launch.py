"""Starting the training processes with PyTorch's own elastic launcher (torchrun's agent) when
train.nproc x train.nnodes > 1, and what is checked before: devices, the rendezvous endpoint."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.common.errors import ParamsError, PipelineError, Terminated
from pipeline.common.system import cores
from pipeline.params import TrainConfig

RDZV_WAIT = 60.0  # seconds a machine of node rank > 0 waits for node 0's rendezvous endpoint


def check_devices(nproc: int, device: torch.device) -> None:
    """One process per CUDA device, or per CPU core."""
    if device.type == "cuda":
        have, what = torch.cuda.device_count(), "CUDA device(s)"
    elif device.type == "cpu":
        have, what = cores(), "CPU core(s) (train.device is cpu)"
    else:
        raise ParamsError(f"train.nproc > 1 needs CUDA or the CPU; train.device resolved to {device.type}")
    if nproc > have:
        raise ParamsError(f"train.nproc is {nproc} but this machine has {have} {what}")


def node_rank(nnodes: int) -> int:
    """This machine's place among train.nnodes: NODE_RANK, 0 (the machine that runs DVC) if unset."""
    value = os.environ.get("NODE_RANK", "0")
    if not value.isdigit() or int(value) >= nnodes:
        raise ParamsError(f"NODE_RANK must be an integer in [0, {nnodes - 1}] (train.nnodes={nnodes}), got {value!r}")
    return int(value)


def check_endpoint(endpoint: str, rank: int, wait: float | None = None) -> None:
    """Node 0 must be the endpoint's host with its port free; other nodes must reach it (waiting up
    to `wait` seconds for node 0 to start). One-line error otherwise, before any work."""
    wait = RDZV_WAIT if wait is None else wait
    host, port = endpoint.rsplit(":", 1)
    key = f"train.rdzv_endpoint {endpoint}"
    try:
        address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise PipelineError(f"{key}: unknown host {host!r} ({e.strerror})") from None
    family, _, _, _, sockaddr = address
    if rank == 0:  # this machine hosts the rendezvous: it must own the address and the port
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as e:
                why = "is not an address of this machine" if e.errno == errno.EADDRNOTAVAIL else e.strerror
                raise PipelineError(
                    f"{key}: node 0 hosts the rendezvous, but {host}:{port} {why}; run node 0 "
                    "(NODE_RANK=0, the machine that runs DVC) on that host, or pick a free port"
                ) from None
        return
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection(sockaddr[:2], timeout=min(5.0, wait)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise PipelineError(
                    f"{key} is unreachable from this machine after {wait:g} s ({e.strerror or e}); "
                    "is node 0 running, and is the port open?"
                ) from None
            time.sleep(min(1.0, wait))


class WorkerFailed(PipelineError):
    """A training process failed; the launcher stopped the others."""


def start(nproc: int, nnodes: int, endpoint: str | None, argv: list[str]) -> None:
    """Start `python -m pipeline.train argv` on nproc processes of this machine with torchrun's own
    elastic agent (single machine: --standalone; several: static rendezvous at node 0's endpoint)
    and wait. A failed process stops the others; the failure becomes one line."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = ["--nproc-per-node", str(nproc), "--max-restarts", "0"]
    if nnodes == 1:
        args += ["--standalone", "--nnodes", "1"]
    else:
        host, port = endpoint.rsplit(":", 1)  # validated by params
        rank = node_rank(nnodes)
        check_endpoint(endpoint, rank)
        args += ["--nnodes", str(nnodes), "--node-rank", str(rank), "--rdzv-backend", "static"]
        args += ["--master-addr", host, "--master-port", port]
    # torchrun would set 1 thread per process; share this machine's cores among them instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores() // nproc)))
    try:
        torchrun.run(torchrun.parse_args([*args, "-m", "pipeline.train", *argv]))
    except ChildFailedError as e:
        raise WorkerFailed(_failure(e.failures)) from None
    except SignalException as e:  # the agent stopped the workers; end as Ctrl-C or SIGTERM does
        raise (KeyboardInterrupt if e.sigval == signal.SIGINT else Terminated)() from None


def start_workers(cfg: TrainConfig, device: torch.device, kept: Path, connect: Callable[[], None]) -> None:
    """train.nproc x train.nnodes > 1: start this machine's workers through torchrun's elastic agent
    on `device` (train.device as the caller resolved it), on the machine of rank 0 after `connect`
    (rank 0 will log: a dead server fails now, before any process starts). A failure says that
    `kept`, the training checkpoint, resumes the last epoch."""
    check_devices(cfg.nproc, device)
    if cfg.nnodes == 1 or node_rank(cfg.nnodes) == 0:
        connect()
    try:
        start(cfg.nproc, cfg.nnodes, cfg.rdzv_endpoint, sys.argv[1:])
    except (WorkerFailed, KeyboardInterrupt) as e:
        if kept.is_file():
            note = f"{kept} keeps the last complete epoch; run again to resume (any train.nproc)"
            if isinstance(e, KeyboardInterrupt):
                e.add_note(note)
            else:
                e.args = (f"{e}; {note}",)
        raise


def _failure(failures: dict) -> str:
    """One line for the process that failed first: killed by a signal if any was, else the lowest rank."""
    # In the order the agent saw them; the processes it stopped itself (SIGTERM) and those that
    # failed because a peer had died (an exit status) come after a process killed from outside.
    order = {rank: i for i, rank in enumerate(failures)}
    rank, f = min(
        failures.items(),
        key=lambda item: (item[1].signal_name() == "SIGTERM", item[1].exitcode >= 0, order[item[0]]),
    )
    how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with status {f.exitcode}"
    return f"training process rank {rank} (pid {f.pid}) {how}; the launcher stopped the others"
