"""How one training step computes: its settings (StepConfig) and its forward pass and loss, shared
by the eager loop (core/engine.py) and the captured one (core/cuda_graphs.py). Imports torch only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.core.augment import Augment
from pipeline.core.runtime import autocast_dtype
from pipeline.parallel.distributed import ALONE, World
from pipeline.params import TrainConfig


@dataclass(frozen=True)
class StepConfig:
    """Settings of a training step besides the model, optimizer and data: built once (StepConfig.of)
    from the train section, the device and the process group."""

    batch_size: int  # global: the ranks share each batch
    autocast: torch.dtype | None = None  # bf16 autocast, or None: fp32
    label_smoothing: float = 0.0  # cross-entropy against targets smoothed by this much
    augment: Augment = Augment()  # what the training images go through (default: nothing)
    world: World = ALONE
    cuda_graphs: bool | None = None  # capture the step: None on CUDA with one process (cuda_graphs.wanted)

    @classmethod
    def of(cls, cfg: TrainConfig, device: torch.device, world: World = ALONE) -> StepConfig:
        autocast = autocast_dtype(cfg.precision, device)
        augment = Augment(cfg.shift, cfg.rotate, cfg.scale, cfg.elastic, cfg.flip, cfg.erase)
        return cls(cfg.batch_size, autocast, cfg.label_smoothing, augment, world)

    @property
    def precision(self) -> str:
        """What the step computes in: bf16 (autocast) or fp32."""
        return "bf16" if self.autocast is not None else "fp32"


def forward(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: StepConfig, reduction: str = "mean", cache: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, 10) and cross-entropy loss of a batch x (B, 1, 28, 28), y (B,), in the step's
    precision. `cache=False` inside a CUDA graph: no autocast weight cache there (PyTorch's notes)."""
    on = step.autocast is not None
    with torch.autocast(x.device.type, dtype=step.autocast or torch.bfloat16, enabled=on, cache_enabled=cache):
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction=reduction, label_smoothing=step.label_smoothing)
    return logits, loss
