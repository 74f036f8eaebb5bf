"""The processed tensor files that preprocess writes and train/evaluate read."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.common.errors import DataError
from pipeline.common.files import save_torch
from pipeline.data.datasets import IMAGE_SIZE, NUM_CLASSES


def save_split(path: Path, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
    """Save uint8 images (N, 28, 28), int64 labels (N,) and their indices in the source file."""
    save_torch(path, {"images": images.contiguous(), "labels": labels, "indices": indices})


def load_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load and check one split: uint8 images (N, 1, 28, 28) and int64 labels (N,)."""
    if not path.is_file():
        raise DataError(f"{path} not found; run the preprocess stage first")
    try:
        data = torch.load(path, weights_only=True)
        images, labels = data["images"], data["labels"]
    except Exception as e:
        raise DataError(f"{path} is not a processed split file ({type(e).__name__}: {e})") from e
    shape = (IMAGE_SIZE, IMAGE_SIZE)
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != shape:
        raise DataError(f"{path}: images must be uint8 (N, 28, 28), got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
        raise DataError(f"{path}: labels must be int64 ({len(images)},), got {labels.dtype} {tuple(labels.shape)}")
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < NUM_CLASSES):
        raise DataError(f"{path}: labels must lie in [0, {NUM_CLASSES - 1}]")
    return images.unsqueeze(1), labels  # (N, 1, 28, 28)
