"""Tiny synthetic MNIST: learnable 28x28 digits, as arrays, tensors or real IDX files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.datasets import IDX_FILES
from pipeline.data.idx import idx_bytes, md5


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 28, 28) where class k is a bright 8x8 block at a spot set by k, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        r, c = 2 + 12 * (k // 5), 5 * (k % 5)
        images[i, r : r + 8, c : c + 8] = 255
    return images, labels


def synthetic_files(n_train: int = 600, n_test: int = 200) -> dict[str, bytes]:
    """The four IDX files, uncompressed, keyed by their official names."""
    train_x, train_y = synthetic_digits(n_train, seed=0)
    test_x, test_y = synthetic_digits(n_test, seed=1)
    return dict(zip(IDX_FILES, map(idx_bytes, [train_x, train_y, test_x, test_y]), strict=True))


def synthetic_checksums() -> dict[str, str]:
    """The MD5 of each file `synthetic_files()` writes, as `download.checksums` declares them."""
    return {name: md5(data) for name, data in synthetic_files().items()}


def write_synthetic_source(folder: Path) -> Path:
    """`folder` created, holding the synthetic IDX files: a `download.source_dir`."""
    folder.mkdir()
    for name, data in synthetic_files().items():
        (folder / name).write_bytes(data)
    return folder


def tiny_split(n: int = 192) -> tuple[torch.Tensor, torch.Tensor]:
    """n synthetic digits as a split: images (n, 1, 28, 28) uint8, labels (n,) int64."""
    x, y = synthetic_digits(n, seed=0)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long()
