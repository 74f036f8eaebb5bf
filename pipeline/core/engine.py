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
from pipeline.core import augment, cuda_graphs
from pipeline.core.ema import EMA
from pipeline.core.inference import predict
from pipeline.core.model import build_model
from pipeline.core.runtime import make_deterministic
from pipeline.core.step import StepConfig, forward
from pipeline.parallel import distributed
from pipeline.parallel.distributed import ALONE, World
from pipeline.params import ModelConfig, TrainConfig

log = logging.getLogger(__name__)
Split = tuple[torch.Tensor, torch.Tensor]


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


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


@dataclass
class Training:
    """What a training changes as it goes: the network (DDP-wrapped with several ranks), the
    optimizer and schedule, the shuffling generator, the captured step where there is one, and the
    average of the weights (train.ema) where there is one."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # on the CPU: the same order and augmentation on every device and rank
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    captured: cuda_graphs.CapturedStep | None = None
    ema: EMA | None = None

    @property
    def model(self) -> nn.Module:
        """The network validated and saved: the average of the weights if kept, else the weights."""
        return self.ema.model if self.ema is not None else distributed.unwrap(self.net)

    def state(self, history: list[dict[str, float]]) -> dict[str, Any]:
        """Everything a resumed training needs (a checkpoint's `state`)."""
        return {
            "model": distributed.unwrap(self.net).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
        }


def batch_of(images: torch.Tensor, idx: torch.Tensor, step: StepConfig, generator: torch.Generator) -> tuple:
    """This rank's share of the global batch `idx`: (x, idx), x (B / world, 1, 28, 28) augmented as
    `step.augment` says with numbers drawn from `generator` (nothing drawn without augmentation):
    uint8 when at most shifted, mirrored or erased, float32 when warped (augment.warped)."""
    aug = step.augment
    if not aug.on:
        idx = distributed.shard(idx, step.world)
        return images[idx], idx
    # Drawn for the global batch, then sharded with it: equal on any world size.
    n = len(idx)
    if aug.warps:
        draws = aug.draw(n, generator)  # (n, columns): the shift, angle, zoom, field and flip sign
    else:
        offsets = torch.zeros(n, 2, dtype=torch.long)
        if aug.shift:
            offsets = torch.randint(-aug.shift, aug.shift + 1, (n, 2), generator=generator)
        draws = torch.cat([offsets, aug.draw_flips(n, generator)[:, None].long()], 1)  # (n, 3): dy, dx, flip
    boxes = aug.draw_erase(n, generator)  # (n, 3)
    idx = distributed.shard(idx, step.world)
    draws, boxes = (distributed.shard(t.to(images.device), step.world) for t in (draws, boxes))
    if aug.warps:
        x = augment.warped(images[idx], draws, aug)
    else:
        x = images[idx]
        if aug.flip:
            x = augment.flipped(x, draws[:, 2].bool())
        if aug.shift:
            x = shifted(x, draws[:, :2], aug.shift)
    if aug.erase:
        x = augment.erased(x, boxes)
    return x, idx


def train_one_epoch(
    training: Training, images: torch.Tensor, labels: torch.Tensor, step: StepConfig, desc: str = "train"
) -> dict[str, float]:
    """One pass over (images, labels) in a seeded random order, in global batches of which this rank
    takes its share (see distributed.shard); full batches through `training.captured` (a CUDA graph)
    when there is one. Returns mean loss and accuracy over all ranks, and `first_bad_batch`: the
    1-based batch whose loss was NaN or infinite on any rank, or -1."""
    world, captured = step.world, training.captured
    training.net.train()
    n = len(images)
    # The same seeded CPU permutation on every rank: together the ranks cover each batch once.
    order = torch.randperm(n, generator=training.generator).to(images.device)
    # Sums stay on the device: reading them every batch (.item()) would sync each step.
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    # Index of the first batch whose loss was not finite (n + 1: none), tracked on the device too.
    first_bad = torch.full((), n + 1, dtype=torch.long, device=images.device)
    batches = range(0, n, step.batch_size)
    progress = tqdm(batches, desc=desc, unit="batch", leave=False, disable=None if world.rank == 0 else True)
    if captured is not None:
        captured.start_epoch()
    for batch, start in enumerate(progress, 1):
        idx = order[start : start + step.batch_size]
        m = len(idx)  # this global batch (the last one may be short)
        if captured is not None and m == step.batch_size:
            captured.run(idx)
        else:
            x, idx = batch_of(images, idx, step, training.generator)
            y = labels[idx]
            loss, logits = eager_step(training, x, y, step, m)
            loss_sum += loss * (m / world.size)  # this rank's sum of per-image losses
            correct += (logits.argmax(1) == y).sum()
            first_bad = torch.where((first_bad > n) & ~loss.isfinite(), batch, first_bad)
        if training.ema is not None:  # after the step, outside any captured graph
            training.ema.update(distributed.unwrap(training.net))
        if training.scheduler is not None:
            training.scheduler.step()
    if captured is not None:  # its batches came first: its count is their batch number
        loss_sum, correct = loss_sum + captured.loss_sum, correct + captured.correct
        first_bad = torch.minimum(first_bad, captured.first_bad)
    totals = distributed.all_sum(torch.stack([loss_sum.double(), correct.double()]), world)
    bad = int(distributed.all_min(first_bad, world))
    return {"loss": totals[0].item() / n, "accuracy": totals[1].item() / n, "first_bad_batch": bad if bad <= n else -1}


def eager_step(
    training: Training, x: torch.Tensor, y: torch.Tensor, step: StepConfig, global_batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on this rank's (x, y); returns the (detached) loss and the logits."""
    world = step.world
    if world.size == 1:
        logits, loss = forward(training.net, x, y, step)
    else:  # DDP averages the ranks' gradients: scaled so, it is the gradient of the global mean
        logits, loss = forward(training.net, x, y, step, reduction="sum")
        loss = loss * (world.size / global_batch)
    training.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    training.optimizer.step()
    return loss.detach(), logits


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
    step: StepConfig | None = None,
    *,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float], dict[str, Any]], None] | None = None,
) -> list[dict[str, float]]:
    """Train up to cfg.epochs in steps `step` (default: StepConfig.of(cfg) on the data's device,
    alone), continuing from a `resume` state; after each epoch hand the row of train and val
    loss/accuracy (and timings) and the full training state to `on_epoch`. With several ranks,
    `model` ends with the weights every rank agrees on."""
    step = step if step is not None else StepConfig.of(cfg, train[0].device)
    history: list[dict[str, float]] = list(resume["history"]) if resume is not None else []
    training = start(model, train, cfg, step, resume)
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        row, timings = run_epoch(training, train, val, cfg, step, epoch)
        history.append(row)  # no timings here: the history is part of the reproducible output
        if on_epoch is not None:
            on_epoch({**row, **timings}, training.state(history))
    if training.net is not model:
        distributed.check_in_sync(training.net.module, step.world)
        model.load_state_dict(training.net.module.state_dict())
    if training.ema is not None:  # what was validated is what is saved
        model.load_state_dict(training.ema.model.state_dict())
    return history


def start(
    model: nn.Module, train: Split, cfg: TrainConfig, step: StepConfig, resume: dict[str, Any] | None
) -> Training:
    """The optimizer, schedule, generator and weight average for `model`, as they were in `resume`
    if given, and the step captured as a CUDA graph where wanted (cuda_graphs.wanted; a failed
    capture is eager)."""
    if resume is not None:
        model.load_state_dict(resume["model"])
    net = distributed.wrap(model, step.world)  # `model` itself when alone
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    training = Training(net, optimizer, torch.Generator().manual_seed(cfg.seed))
    if cfg.ema:
        training.ema = EMA(model, cfg.ema)
    if cfg.schedule == "onecycle":  # warm up to train.lr, then anneal, stepping every batch
        steps = -(-len(train[0]) // step.batch_size)
        training.scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * steps)
    if resume is not None:
        optimizer.load_state_dict(cuda_graphs.eager_optimizer_state(resume["optimizer"]))
        if training.scheduler is not None:
            training.scheduler.load_state_dict(resume["scheduler"])
        if training.ema is not None:
            training.ema.load_state_dict(resume["ema"])
        training.generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
    capturable = len(train[0]) >= step.batch_size and not step.augment.on  # the graph gathers plain batches
    if capturable and cuda_graphs.wanted(train[0].device, step.world.size, step.cuda_graphs):
        training.captured = cuda_graphs.capture(net, optimizer, *train, step)
    return training


def run_epoch(
    training: Training, train: Split, val: Split, cfg: TrainConfig, step: StepConfig, epoch: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Train one epoch and validate: the history's row and the epoch's timings (seconds)."""
    begin = time.perf_counter()
    tr = train_one_epoch(training, *train, step, desc=f"epoch {epoch}/{cfg.epochs}")
    train_seconds = time.perf_counter() - begin  # train_one_epoch ends reading its sums: synced
    if tr["first_bad_batch"] >= 0:
        raise TrainingDiverged(
            f"loss became NaN or infinite at epoch {epoch}, batch {tr['first_bad_batch']} "
            f"(train.lr={cfg.lr}); no model written"
        )
    va = evaluate(training.model, *val, batch_size=EVAL_BATCH_SIZE, world=step.world)
    row = {
        "epoch": epoch,
        "train_loss": tr["loss"],
        "train_accuracy": tr["accuracy"],
        "val_loss": va["loss"],
        "val_accuracy": va["accuracy"],
    }
    seconds = time.perf_counter() - begin
    log.info(
        "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s",
        *(epoch, cfg.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"], row["val_accuracy"]),
        seconds,
    )
    return row, {"epoch_seconds": seconds, "train_seconds": train_seconds}
