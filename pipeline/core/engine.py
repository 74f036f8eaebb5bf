"""Training and evaluation loops over tensors held in memory; no files, no MLflow."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from pipeline.common.errors import PipelineError
from pipeline.core.inference import predict
from pipeline.core.model import build_model
from pipeline.core.runtime import autocast_dtype, make_deterministic
from pipeline.parallel import distributed, graphs
from pipeline.parallel.distributed import ALONE, World
from pipeline.params import ModelConfig, TrainConfig

log = logging.getLogger("pipeline.train")
Split = tuple[torch.Tensor, torch.Tensor]


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Step:
    """How a training step computes, besides the model, optimizer and data: built once (Step.of)
    from the train section, the device and the process group."""

    batch_size: int  # global: the ranks share each batch
    autocast: torch.dtype | None = None  # bf16 autocast, or None: fp32
    label_smoothing: float = 0.0  # cross-entropy against targets smoothed by this much
    shift: int = 0  # augmentation: each image moved by up to this many pixels (0: none)
    world: World = ALONE

    @classmethod
    def of(cls, cfg: TrainConfig, device: torch.device, world: World = ALONE) -> Step:
        autocast = autocast_dtype(cfg.precision, device)
        return cls(cfg.batch_size, autocast, cfg.label_smoothing, cfg.shift, world)

    @property
    def precision(self) -> str:
        """What the step computes in: bf16 (autocast) or fp32."""
        return "bf16" if self.autocast is not None else "fp32"


def build(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The seeded network on `device`; built on the CPU: initial weights depend on the seed only.
    The train stage and every sweep trial start here, so that equal params give equal weights."""
    make_deterministic(cfg.seed)
    model = build_model(model_cfg).to(device)
    if cfg.channels_last:  # NHWC convolutions: faster on CPUs and tensor cores
        model = model.to(memory_format=torch.channels_last)
    return model


def shifted(images: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image of (B, 1, H, W) moved by its own (dy, dx) row of `offsets` (B, 2), |d| <= pad;
    the pixels moved in are 0, the background."""
    b, _, h, w = images.shape
    width = w + 2 * pad
    # Zeros and a copy, not F.pad: on uint8 its threads took 22 ms a batch on a busy CPU (0.15 ms so).
    padded = images.new_zeros(b, h + 2 * pad, width)
    padded[:, pad : pad + h, pad : pad + w] = images[:, 0]
    rows = torch.arange(pad, pad + h, device=images.device)[:, None]  # (H, 1)
    cols = torch.arange(pad, pad + w, device=images.device)[None, :]  # (1, W)
    source = (rows * width + cols).view(1, h * w) - (offsets[:, :1] * width + offsets[:, 1:])  # (B, H * W)
    return padded.view(b, -1).gather(1, source).view(b, 1, h, w)


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    step: Step,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    captured: graphs.CapturedStep | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over (images, labels) in a seeded random order, in global batches of which this rank
    takes its share (see distributed.shard); full batches through `captured` (a CUDA graph) when
    given. A `step.shift` offset for each image is drawn from `generator` (none at 0, which draws
    nothing). Returns mean loss and accuracy over all ranks, and `first_bad_batch`: the 1-based
    batch whose loss was NaN or infinite on any rank, or -1."""
    batch_size, shift, world, autocast = step.batch_size, step.shift, step.world, step.autocast
    model.train()
    n = len(images)
    # The same seeded CPU permutation on every rank: together the ranks cover each batch once.
    order = torch.randperm(n, generator=generator).to(images.device)
    # Sums stay on the device: reading them every batch (.item()) would sync each step.
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    # Index of the first batch whose loss was not finite (n + 1: none), tracked on the device too.
    first_bad = torch.full((), n + 1, dtype=torch.long, device=images.device)
    batches = range(0, n, batch_size)
    progress = tqdm(batches, desc=desc, unit="batch", leave=False, disable=None if world.rank == 0 else True)
    if captured is not None:
        captured.start_epoch()
    for batch, start in enumerate(progress, 1):
        idx = order[start : start + batch_size]
        m = len(idx)  # this global batch (the last one may be short)
        if captured is not None and m == batch_size:
            captured.run(idx)
            if scheduler is not None:
                scheduler.step()
            continue
        if shift:  # offsets drawn for the global batch, then sharded with it: equal on any world size
            offsets = torch.randint(-shift, shift + 1, (m, 2), generator=generator).to(images.device)
            part = distributed.shard(torch.cat([idx[:, None], offsets], 1), world)  # (B / world, 3)
            idx, offsets = part[:, 0], part[:, 1:]
            x = shifted(images[idx], offsets, shift)
        else:
            idx = distributed.shard(idx, world)
            x = images[idx]
        y = labels[idx]  # x: (B / world, 1, 28, 28) uint8, y: (B / world,)
        with torch.autocast(images.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = model(x)
            if world.size == 1:
                loss = F.cross_entropy(logits, y, label_smoothing=step.label_smoothing)
            else:  # DDP averages the ranks' gradients: scaled so, it is the gradient of the global mean
                loss = F.cross_entropy(logits, y, reduction="sum", label_smoothing=step.label_smoothing)
                loss = loss * (world.size / m)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * (m / world.size)  # this rank's sum of per-image losses
        correct += (logits.argmax(1) == y).sum()
        first_bad = torch.where((first_bad > n) & ~loss.detach().isfinite(), batch, first_bad)
    if captured is not None:  # its batches came first: its count is their batch number
        loss_sum, correct = loss_sum + captured.loss_sum, correct + captured.correct
        first_bad = torch.minimum(first_bad, captured.first_bad)
    totals = distributed.all_sum(torch.stack([loss_sum.double(), correct.double()]), world)
    bad = int(distributed.all_min(first_bad, world))
    return {"loss": totals[0].item() / n, "accuracy": totals[1].item() / n, "first_bad_batch": bad if bad <= n else -1}


# Inference batch of the per-epoch validation: larger is no faster on a CPU, and each 1000 images
# cost about 100 MB per activation of the tutorial network.
EVAL_BATCH_SIZE = 256


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, world: World = ALONE
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of the model on (images, labels); with several ranks each
    takes a contiguous share and the sums are added up."""
    if world.size == 1:
        logits = predict(model, images, batch_size)
        return {
            "loss": F.cross_entropy(logits, labels).item(),
            "accuracy": (logits.argmax(1) == labels).float().mean().item(),
        }
    part = distributed.shard(torch.arange(len(images), device=images.device), world)
    logits = predict(model, images[part], batch_size)
    loss = F.cross_entropy(logits, labels[part], reduction="sum")
    sums = distributed.all_sum(torch.stack([loss.double(), (logits.argmax(1) == labels[part]).sum().double()]), world)
    return {"loss": sums[0].item() / len(images), "accuracy": sums[1].item() / len(images)}


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    step: Step | None = None,
    *,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float], dict[str, Any]], None] | None = None,
    cuda_graphs: bool | None = None,
) -> list[dict[str, float]]:
    """Train up to cfg.epochs in steps `step` (default: Step.of(cfg) on the data's device, alone),
    continuing from a `resume` state; after each epoch hand the row of train and val loss/accuracy
    and the full training state to `on_epoch`. With several ranks, `model` ends with the weights
    every rank agrees on. `cuda_graphs`: capture the step (None: on CUDA with one process; a failed
    capture falls back to eager, logged once)."""
    step = step if step is not None else Step.of(cfg, train[0].device)
    world = step.world
    history: list[dict[str, float]] = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        history = list(resume["history"])
    net = distributed.wrap(model, world)  # `model` itself when alone
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    scheduler = None
    if cfg.schedule == "onecycle":  # warm up to train.lr, then anneal, stepping every batch
        steps = -(-len(train[0]) // step.batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps)
    # The shuffling generator lives on the CPU, so the order is the same on every device and rank.
    generator = torch.Generator().manual_seed(cfg.seed)
    if resume is not None:
        optimizer.load_state_dict(graphs.eager_optimizer_state(resume["optimizer"]))
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
    captured = None
    capturable = len(train[0]) >= step.batch_size and step.shift == 0  # the graph gathers unshifted batches
    if graphs.wanted(train[0].device, world.size, cuda_graphs) and capturable:
        captured = graphs.capture(net, optimizer, *train, step.batch_size, step.autocast, step.label_smoothing)
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        start = time.perf_counter()
        desc = f"epoch {epoch}/{cfg.epochs}"
        tr = train_one_epoch(net, *train, step, optimizer, generator, scheduler, captured, desc)
        train_seconds = time.perf_counter() - start  # train_one_epoch ends reading its sums: synced
        if tr["first_bad_batch"] >= 0:
            raise TrainingDiverged(
                f"loss became NaN or infinite at epoch {epoch}, batch {tr['first_bad_batch']} "
                f"(train.lr={cfg.lr}); no model written"
            )
        va = evaluate(distributed.unwrap(net), *val, batch_size=EVAL_BATCH_SIZE, world=world)
        row = {
            "epoch": epoch,
            "train_loss": tr["loss"],
            "train_accuracy": tr["accuracy"],
            "val_loss": va["loss"],
            "val_accuracy": va["accuracy"],
        }
        history.append(row)  # no timings here: the history is part of the reproducible output
        seconds = time.perf_counter() - start
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s",
            *(epoch, cfg.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"], row["val_accuracy"]),
            seconds,
        )
        if on_epoch is not None:
            state = {
                "model": distributed.unwrap(net).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
            }
            on_epoch({**row, "epoch_seconds": seconds, "train_seconds": train_seconds}, state)
    if net is not model:
        distributed.check_in_sync(net.module, world)
        model.load_state_dict(net.module.state_dict())
    return history
