"""The IDX format of MNIST-style files: encoding, header checks, decoding, checksums."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.common.errors import DataError

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # IDX magic: 0x08 (uint8) then 3 or 1 dimensions


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array (N,) or (N, H, W) in IDX format, big-endian header."""
    assert array.dtype == np.uint8 and array.ndim in (1, 3)
    magic = LABEL_MAGIC if array.ndim == 1 else IMAGE_MAGIC
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array).tobytes()


def check_idx(path: Path, images: bool) -> int:
    """Check an IDX file's header against its kind and size; return its item count."""
    kind, magic, ndim = ("images", IMAGE_MAGIC, 3) if images else ("labels", LABEL_MAGIC, 1)
    size = path.stat().st_size
    header_size = 4 * (1 + ndim)
    if size < header_size:
        raise DataError(f"{path} is truncated: {size} bytes, shorter than an IDX {kind} header")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(header_size), dtype=">i4")
    if header[0] != magic:
        other = {IMAGE_MAGIC: "an images file", LABEL_MAGIC: "a labels file"}.get(int(header[0]), "not IDX uint8")
        raise DataError(f"{path}: IDX magic number {int(header[0])} ({other}), expected {magic} for {kind}")
    dims = [int(d) for d in header[1:]]
    if dims[0] < 1:  # an empty split would fail later, far from its cause (labels.max() of nothing)
        raise DataError(f"{path}: header says {dims[0]} {kind}; expected at least one")
    if images and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = header_size + int(np.prod(dims))
    if size != expected:
        raise DataError(f"{path}: header says {dims[0]} {kind} ({expected} bytes) but the file has {size} bytes")
    return dims[0]


def read_idx(path: Path, images: bool) -> np.ndarray:
    """Check an IDX file (check_idx) and decode it: uint8 (N, 28, 28) images or (N,) labels."""
    n = check_idx(path, images)
    shape = (n, 28, 28) if images else (n,)
    # The format is a header and raw uint8: no decoder needed (torchvision's would cost its 1.2 s import).
    return np.fromfile(path, dtype=np.uint8, offset=4 * (1 + len(shape))).reshape(shape)
