"""Training and evaluation loops over tensors held in memory; no files, no MLflow."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    desc: str = "train",
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    autocast: torch.dtype | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """One pass over (images, labels) in a seeded random order.

    The loss is cross-entropy against targets smoothed by `label_smoothing`. Returns mean loss and
    accuracy, and `first_bad_batch`: the 1-based batch whose loss was NaN or
    infinite, or -1.
    """
    model.train()
    n = len(images)
    order = torch.randperm(n, generator=generator).to(images.device)
    # Sums stay on the device: reading them every batch (.item()) would sync each step.
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    # Index of the first batch whose loss was not finite (-1: none), tracked on the device too.
    first_bad = torch.full((), -1, dtype=torch.long, device=images.device)
    for batch, start in enumerate(tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False, disable=None), 1):
        idx = order[start : start + batch_size]
        x, y = images[idx], labels[idx]  # (B, 1, 28, 28) uint8, (B,)
        with torch.autocast(images.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        first_bad = torch.where((first_bad < 0) & ~loss.detach().isfinite(), batch, first_bad)
    return {"loss": loss_sum.item() / n, "accuracy": correct.item() / n, "first_bad_batch": int(first_bad)}


# Inference batch of the per-epoch validation: larger is no faster on a CPU, and each 1000 images
# cost about 100 MB per activation of the tutorial network.
EVAL_BATCH_SIZE = 256


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits (N, 10) for images (N, 1, 28, 28), in order, computed in batches."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy and accuracy of the model on (images, labels)."""
    logits = predict(model, images, batch_size)
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (logits.argmax(1) == labels).float().mean().item(),
    }
