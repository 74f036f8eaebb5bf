"""The network at inference: channels_last, and bf16 autocast where the chip computes bf16 natively.

Chosen the way training chooses (`pipeline.core.runtime.autocast_dtype`): `auto` is bf16 only on a CPU
with AVX512-BF16 or AMX (or a CUDA GPU with bf16), fp32 elsewhere, where emulated bf16 is slower.
The served model and `pipeline.predict` read the setting from INFERENCE_PRECISION.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from pipeline.core.runtime import autocast_dtype
from pipeline.params import PRECISIONS

ENV = "INFERENCE_PRECISION"


def precision_setting(value: str | None = None) -> str:
    """`value`, else $INFERENCE_PRECISION, else auto; checked against auto | fp32 | bf16."""
    value = value or os.environ.get(ENV) or "auto"
    if value not in PRECISIONS:
        raise ValueError(f"{ENV} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Inference:
    """A network ready to predict: eval mode, channels_last or not, bf16 autocast or fp32 (None)."""

    net: torch.nn.Module
    autocast: torch.dtype | None
    channels_last: bool

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels (N, 1, 28, 28) -> class probabilities (N, 10), float32."""
        on = self.autocast is not None
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=on):
            logits = self.net(x)  # (N, 1, 28, 28) is the same memory in either layout: no copy needed
        return torch.softmax(logits.float(), dim=1)

    def describe(self) -> str:
        precision = "bf16 autocast" if self.autocast else "fp32"
        return f"{precision}, {'channels_last' if self.channels_last else 'default layout'}"


def prepare(net: torch.nn.Module, precision: str | None = None, channels_last: bool = True) -> Inference:
    """`net` in eval mode, with the layout and precision to run it in; precision None: $INFERENCE_PRECISION or auto."""
    # channels_last always: on the 2-core development CPU the network took 1.4x less time for a batch
    # of 1, 1.6-2.9x less for 64 and 1.9x less for 256 than in the default layout (docs/performance.md).
    device = next(net.parameters()).device
    net = net.eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return Inference(net, autocast_dtype(precision_setting(precision), device), channels_last)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits (N, 10) for images (N, 1, 28, 28), in order, computed in batches. Here, not beside
    the training loop: evaluate needs this alone, and its DVC deps (the run-cache key) then hold no
    training or DDP code."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
