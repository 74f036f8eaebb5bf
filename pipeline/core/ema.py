"""An exponential moving average of a network's weights (`train.ema`), validated and saved in
place of the last step's weights. Imports torch only."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

# Early on the average would mostly hold the random initial weights: its decay ramps up as
# (1 + n) / (WARMUP + n) after n updates, to train.ema (timm's ModelEmaV2 and TF's
# ExponentialMovingAverage(num_updates=...) do the same).
WARMUP = 10


class EMA:
    """A copy of `model` whose floating-point weights and buffers follow the model's after each
    optimizer step: avg += (1 - decay) * (model - avg); integer buffers (BN's batch count) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model` (the unwrapped network, not its DDP wrapper)."""
        self.updates += 1
        weight = 1 - min(self.decay, (1 + self.updates) / (WARMUP + self.updates))
        theirs = model.state_dict()
        for name, ours in self.model.state_dict().items():
            if ours.is_floating_point():
                ours.lerp_(theirs[name], weight)
            else:
                ours.copy_(theirs[name])

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
