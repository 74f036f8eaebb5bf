"""Stage 2: decode the IDX files, split a seeded validation set off, save compact tensors (and
dataset.json, the dataset's name and class names, for the stages after)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from pipeline.common.errors import DataError, ParamsError, run_stage
from pipeline.common.files import check_writable
from pipeline.data.datasets import NUM_CLASSES, read_info, write_info
from pipeline.data.idx import read_idx
from pipeline.data.splits import save_split
from pipeline.params import PreprocessConfig, load_section

log = logging.getLogger("pipeline.preprocess")


def read_pair(images_file: Path, labels_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one images/labels pair: uint8 (N, 28, 28) and int64 (N,)."""
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
    info = read_info(args.raw, "download")
    if len(info.classes) != NUM_CLASSES:  # the networks' output layer
        raise DataError(f"{args.raw}: {info.name} has {len(info.classes)} classes; the networks predict {NUM_CLASSES}")
    files = [args.raw / name for name in info.files]  # train images, train labels, test images, test labels
    images, labels = read_pair(*files[:2])
    test_images, test_labels = read_pair(*files[2:])
    train_idx, val_idx = split(len(images), cfg.val_size, cfg.seed)
    save_split(args.out / "train.pt", images[train_idx], labels[train_idx], train_idx)
    save_split(args.out / "val.pt", images[val_idx], labels[val_idx], val_idx)
    save_split(args.out / "test.pt", test_images, test_labels, torch.arange(len(test_images)))
    write_info(args.out, info)
    sizes = len(train_idx), len(val_idx), len(test_images)
    log.info("%s: train %d, val %d, test %d images -> %s", info.name, *sizes, args.out)


if __name__ == "__main__":
    run_stage(main)
