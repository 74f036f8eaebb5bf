"""Data-parallel training inside torchrun's processes: the process group, each rank's share of a
batch, BatchNorm over the global batch, DDP. Imports torch only (the launcher: pipeline.parallel.launch)."""

from __future__ import annotations

import copy
import hashlib
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.common.errors import ParamsError, PipelineError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; one process alone is World()."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = "none"


ALONE = World()  # one process, no process group


def under_torchrun() -> bool:
    """Whether a launcher (torchrun, or the one `train.nproc` starts) made this process a worker."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def join(device_name: str, batch_size: int) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on the CPU) and pick this
    rank's device: cuda:LOCAL_RANK, or the CPU."""
    size, rank, local = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    check_batch(batch_size, size)
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name not in ("auto", "cuda", "cpu"):
        raise ParamsError(f"train.device must be auto, cuda or cpu with several processes, got {device_name!r}")
    if device_name == "cuda" and not cuda:
        raise ParamsError("train.device is 'cuda' but this machine has no CUDA device; use auto or cpu")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        if local >= torch.cuda.device_count():
            raise ParamsError(
                f"{os.environ.get('LOCAL_WORLD_SIZE', local + 1)} processes on this machine, but it has "
                f"{torch.cuda.device_count()} CUDA device(s): start at most one per device"
            )
        torch.cuda.set_device(device)
    if size == 1:  # torchrun with one process: nothing to synchronize
        return World(), device
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, device_id=device if cuda else None)
    return World(rank, size, local, backend), device


def leave(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, world_size: int) -> None:
    """train.batch_size is the global batch: every rank takes the same share of it."""
    if batch_size % world_size:
        raise ParamsError(
            f"train.batch_size must be divisible by the number of training processes ({world_size}), got {batch_size}"
        )


def shard(indices: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous share of a global batch: rank r takes part r of `world.size` near-equal
    parts (equal for full batches, as train.batch_size is divisible by the world size)."""
    return indices if world.size == 1 else indices.tensor_split(world.size)[world.rank]


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of `t` over every rank (in place; `t` itself when alone)."""
    if world.size > 1:
        dist.all_reduce(t)
    return t


def all_min(t: torch.Tensor, world: World) -> torch.Tensor:
    """The minimum of `t` over every rank (in place; `t` itself when alone)."""
    if world.size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def broadcast(obj, world: World):
    """Rank 0's `obj` on every rank (pickled: small things only, such as a checkpoint)."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _AllSum(torch.autograd.Function):
    """Sum over ranks that gradients flow through: the backward of a sum is the sum of the grads."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the whole global batch on the CPU, where nn.SyncBatchNorm has no kernels
    (aten::batch_norm_stats is CUDA-only): the same math as one process over the whole batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        x32 = x.float()  # statistics in fp32, also under bf16 autocast
        dims = (0, 2, 3)
        # One all-reduce for the sums and the count of values per channel, one for the variance.
        local = torch.cat([x32.sum(dims), x32.new_tensor([x.numel() // x.shape[1]])])
        total = _AllSum.apply(local)  # (C + 1,)
        count, mean = total[-1], total[:-1] / total[-1]  # (), (C,)
        centred = x32 - mean[None, :, None, None]
        var = _AllSum.apply(centred.square().sum(dims)) / count  # biased, as BatchNorm normalizes
        with torch.no_grad():  # running stats as BatchNorm2d keeps them (unbiased variance)
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        return (y * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)


def _global_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new.to(child.weight.device))
        else:
            _global_batchnorm(child)
    return module


def wrap(model: nn.Module, world: World) -> nn.Module:
    """`model` itself when alone; else DistributedDataParallel over a copy whose BatchNorm layers
    see the whole global batch (nn.SyncBatchNorm on CUDA, GlobalBatchNorm2d on the CPU)."""
    if world.size == 1:
        return model
    net = copy.deepcopy(model)
    cuda = next(model.parameters()).device.type == "cuda"
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if cuda else _global_batchnorm(net)
    return nn.parallel.DistributedDataParallel(net)


def unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


class PeerLost(PipelineError):
    """A collective failed: another training process died or hung up."""


@contextmanager
def failing_together(world: World) -> Iterator[None]:
    """Turn a failed collective (another rank died) into one line. The launcher is about to stop
    this process with SIGTERM: ignore it, so that the cleanup on the way out (the MLflow run ended
    FAILED) is not cut short; the process exits right after."""
    try:
        yield
    except RuntimeError as e:
        if world.size == 1 or not (isinstance(e, dist.DistError) or any(s in str(e) for s in ("gloo", "NCCL"))):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # gloo: "[.../pair.cc:545] Read error [127.0.0.1]:23938: Connection reset by peer. This is ..."
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0]).split(". ")[0][:160]
        raise PeerLost(f"rank {world.rank} lost contact with the other training processes: {reason}") from e


def check_in_sync(model: nn.Module, world: World) -> None:
    """Fail if any rank's weights or buffers differ from rank 0's, bit for bit."""
    if world.size == 1:
        return
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    digests: list[str | None] = [None] * world.size
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {digests}")
