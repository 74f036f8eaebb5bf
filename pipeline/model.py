"""The tutorial's network: three 3x3 convs with ReLU and max-pooling, then three linear layers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.data import IMAGE_SIZE, NUM_CLASSES
from pipeline.params import ModelConfig


class Net(nn.Module):
    """Takes raw pixels (B, 1, 28, 28) in [0, 255], any dtype; returns logits (B, 10)."""

    def __init__(self, nf: int = 32) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, nf, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(nf, nf, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, nf, 14, 14)
            nn.Conv2d(nf, nf, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, nf, 7, 7)
        )
        side = IMAGE_SIZE // 4  # two 2x2 poolings
        self.linears = nn.Sequential(
            nn.Linear(nf * side * side, 100),
            nn.ReLU(),
            nn.Linear(100, 50),
            nn.ReLU(),
            nn.Linear(50, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling lives in the model, so every user of it (evaluate, MLflow serving) feeds raw
        # pixels: (x / 255 - 0.5) / 0.5 maps [0, 255] to [-1, 1] as the tutorial's Normalize.
        x = x.float() / 127.5 - 1.0
        x = self.convs(x)
        x = x.flatten(1)  # (B, nf * 7 * 7)
        return self.linears(x)


def build_model(cfg: ModelConfig) -> Net:
    """Build the network the model section describes."""
    return Net(cfg.nf)


def load_checkpoint(path: Path) -> Net:
    """Rebuild the network from a checkpoint {'state_dict', 'model': config} on the CPU, in eval mode."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(**checkpoint["model"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
