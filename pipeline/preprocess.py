"""Stage 2: decode the IDX files, split a seeded validation set off, save compact tensors."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from pipeline.common.errors import DataError, ParamsError, run_stage
from pipeline.common.files import check_writable
from pipeline.data.idx import read_idx
from pipeline.data.splits import NUM_CLASSES, save_split
from pipeline.params import PreprocessConfig, load_section

log = logging.getLogger("pipeline.preprocess")


def read_pair(raw: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one images/labels pair: uint8 (N, 28, 28) and int64 (N,)."""
    images_file, labels_file = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    for path in (images_file, labels_file):
        if not path.is_file():
            raise DataError(f"{path} not found; run the download stage first")
    images = torch.from_numpy(read_idx(images_file, images=True))
    labels = torch.from_numpy(read_idx(labels_file, images=False)).long()
    if len(images) != len(labels):
        raise DataError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels")
    if int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{labels_file}: labels must lie in [0, 9], found {int(labels.max())}")
    return images, labels


def split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of range(n) into (train indices, val indices), each sorted."""
    if not 1 <= val_size < n:
        raise ParamsError(f"preprocess.val_size must be in [1, {n - 1}] for {n} images, got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--out", type=Path, default=Path("data/processed"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = load_section("preprocess", PreprocessConfig)
    check_writable(args.out)
    images, labels = read_pair(args.raw, "train")
    test_images, test_labels = read_pair(args.raw, "t10k")
    train_idx, val_idx = split(len(images), cfg.val_size, cfg.seed)
    save_split(args.out / "train.pt", images[train_idx], labels[train_idx], train_idx)
    save_split(args.out / "val.pt", images[val_idx], labels[val_idx], val_idx)
    save_split(args.out / "test.pt", test_images, test_labels, torch.arange(len(test_images)))
    log.info("train %d, val %d, test %d images -> %s", len(train_idx), len(val_idx), len(test_images), args.out)


if __name__ == "__main__":
    run_stage(main)
