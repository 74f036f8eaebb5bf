from pathlib import Path

import pytest
import yaml

from pipeline import params as P
from pipeline.common.errors import ParamsError
from pipeline.data.datasets import DATASETS

from .helpers.repo import REPO

SECTIONS = {
    "download": P.DownloadConfig,
    "preprocess": P.PreprocessConfig,
    "model": P.ModelConfig,
    "train": P.TrainConfig,
    "evaluate": P.EvaluateConfig,
    "mlflow": P.MlflowConfig,
    "register": P.RegisterConfig,
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("section", SECTIONS)
def test_repo_params_load_and_name_every_field(section: str) -> None:
    cfg = P.load_section(section, SECTIONS[section], REPO / "params.yaml")
    # params.yaml spells out every key, so `dvc params diff` shows every setting.
    assert set(repo_params()[section]) == set(vars(cfg))


def test_defaults_are_the_tutorial_recipe() -> None:
    train = P.load_section("train", P.TrainConfig, REPO / "params.yaml")
    assert (train.epochs, train.batch_size, train.lr, train.betas) == (10, 64, 1e-4, [0.5, 0.999])
    assert P.load_section("model", P.ModelConfig, REPO / "params.yaml").nf == 32
    assert P.load_section("preprocess", P.PreprocessConfig, REPO / "params.yaml").val_size == 5000


def test_dvc_yaml_lists_the_sections_each_stage_reads() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["download"]["params"] == ["download"]
    assert stages["preprocess"]["params"] == ["preprocess"]
    assert stages["train"]["params"] == ["model", "train", "mlflow"]
    assert stages["evaluate"]["params"] == ["model", "evaluate", "register"]


BAD = [
    ("train", "lr", -1, "train.lr must be a positive number, got -1"),
    ("train", "lr", 0, "train.lr must be a positive number"),
    ("train", "lr", "fast", "train.lr must be a number, got 'fast'"),
    ("train", "epochs", 0, "train.epochs must be an integer >= 1, got 0"),
    ("train", "epochs", 2.5, "train.epochs must be an integer, got 2.5"),
    ("train", "epochs", True, "train.epochs must be an integer, got True"),
    ("train", "batch_size", 0, "train.batch_size must be an integer >= 1"),
    ("train", "betas", [0.5], "train.betas must be two numbers in [0, 1)"),
    ("train", "betas", [0.5, 1.0], "train.betas must be two numbers in [0, 1)"),
    ("train", "device", "tpu", "train.device must be one of auto, cpu, cuda, mps"),
    ("train", "seed", "x", "train.seed must be an integer"),
    ("model", "nf", 0, "model.nf must be an integer >= 1"),
    ("model", "arch", "resnet", "model.arch must be one of tutorial, fast, fast3, wide, deep, vgg, got 'resnet'"),
    ("train", "precision", "fp16", "train.precision must be one of auto, fp32, bf16, got 'fp16'"),
    ("train", "schedule", "cosine", "train.schedule must be one of constant, onecycle"),
    ("train", "channels_last", "yes", "train.channels_last must be a bool, got 'yes'"),
    ("preprocess", "val_size", 0, "preprocess.val_size must be an integer >= 1"),
    ("evaluate", "batch_size", -5, "evaluate.batch_size must be an integer >= 1"),
    ("evaluate", "device", "gpu", "evaluate.device must be one of"),
    ("download", "mirrors", [1], "download.mirrors[0] must be a str, got 1"),
    ("download", "source_dir", 5, "download.source_dir must be a str, got 5"),
    ("download", "dataset", "cifar10", "download.dataset must be one of mnist, fashion-mnist, got 'cifar10'"),
    ("download", "dataset", None, "download.dataset must be a str, got None"),
    ("download", "cache_dir", None, "download.cache_dir must be a str, got None"),
    ("preprocess", "seed", 1.5, "preprocess.seed must be an integer, got 1.5"),
    ("train", "lr", float("nan"), "train.lr must be a positive number, got nan"),
    ("register", "min_accuracy", 1.5, "register.min_accuracy must be a test accuracy in [0, 1], got 1.5"),
    ("register", "name", "", "register.name must be a non-empty string"),
    ("download", "timeout", 0, "download.timeout must be a positive number"),
    ("download", "checksums", {"a": "b"}, "download.checksums must be null or a mapping with exactly the keys"),
    ("download", "checksums", "abc", "download.checksums must be a mapping, got 'abc'"),
    ("download", "mirrors", "http://x", "download.mirrors must be a list of str"),
    ("mlflow", "experiment_name", " ", "mlflow.experiment_name must be a non-empty string"),
    ("register", "name", "", "register.name must be a non-empty string"),
    ("register", "min_accuracy", 1.5, "register.min_accuracy must be a test accuracy in [0, 1], got 1.5"),
    ("register", "min_accuracy", "high", "register.min_accuracy must be a number"),
]


@pytest.mark.parametrize(("section", "key", "value", "message"), BAD, ids=[f"{s}.{k}={v}" for s, k, v, _ in BAD])
def test_bad_value_names_key_expected_and_found(tmp_path, section, key, value, message) -> None:
    data = repo_params()
    data[section][key] = value
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        P.load_section(section, SECTIONS[section], write(tmp_path, data))


def test_unknown_key_is_an_error(tmp_path) -> None:
    data = repo_params()
    data["train"]["learning_rate"] = 0.1
    with pytest.raises(ParamsError, match="unknown key train.learning_rate"):
        P.load_section("train", P.TrainConfig, write(tmp_path, data))


def test_missing_section_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(ParamsError, match="no 'train' section"):
        P.load_section("train", P.TrainConfig, write(tmp_path, {"model": {"nf": 8}}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        P.load_section("train", P.TrainConfig, bad)
    with pytest.raises(ParamsError, match="not found"):
        P.load_section("train", P.TrainConfig, tmp_path / "missing.yaml")


def test_ints_are_accepted_for_floats_and_missing_keys_take_defaults(tmp_path) -> None:
    cfg = P.load_section("train", P.TrainConfig, write(tmp_path, {"train": {"lr": 1, "betas": [0, 0.9]}}))
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.betas == [0.0, 0.9] and cfg.epochs == 10


def test_own_checksums_need_a_folder_and_are_checked_as_md5s(tmp_path) -> None:
    data = repo_params()
    sums = {name: "0" * 32 for name in DATASETS["fashion-mnist"].files}
    data["download"].update(dataset="fashion-mnist", checksums=sums)
    with pytest.raises(
        ParamsError, match="download.source_dir must be the folder of your files when download.checksums is set"
    ):
        P.load_section("download", P.DownloadConfig, write(tmp_path, data))
    data["download"]["source_dir"] = str(tmp_path)
    assert P.load_section("download", P.DownloadConfig, write(tmp_path, data)).checksums == sums
    data["download"]["checksums"] = {**sums, "t10k-labels-idx1-ubyte": "ABC"}
    with pytest.raises(ParamsError, match="download.checksums.t10k-labels-idx1-ubyte must be a 32-digit lowercase hex"):
        P.load_section("download", P.DownloadConfig, write(tmp_path, data))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_each_dataset_is_a_valid_choice(tmp_path, name) -> None:
    data = repo_params()
    data["download"]["dataset"] = name
    assert P.load_section("download", P.DownloadConfig, write(tmp_path, data)).dataset == name
