"""The dataset as a named thing: the declarations (checked against torchvision's and the real Debian
files), dataset.json from download to evaluate, and class names in every answer."""

import hashlib
import json
import struct
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from torchvision.datasets import MNIST as TorchvisionMNIST
from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

from pipeline import download, evaluate, predict, preprocess
from pipeline.common.errors import DataError
from pipeline.core.checkpoint import DIGITS, load_model
from pipeline.data import sources
from pipeline.data.datasets import DATASETS, FASHION_MNIST, IDX_FILES, MNIST, read_info
from pipeline.data.idx import check_idx, md5
from pipeline.data.splits import load_split

from .helpers.repo import needed
from .helpers.stages import run_main
from .helpers.tracking import evaluations_of, run_id_of

DEBIAN = Path(FASHION_MNIST.local_dir)
# The mirror's gzip headers, as its files carry them (torchvision's MD5s below pin those bytes):
# FNAME set, the file's name and these mtimes; Debian's copies hold the same deflate streams.
MIRROR_MTIME = {"train": 1504176606, "t10k": 1504176627}


def debian_folder() -> Path:
    """Debian's Fashion-MNIST folder; the test fails in CI (skips elsewhere) without the package."""
    found = DEBIAN if (DEBIAN / f"{IDX_FILES[0]}.gz").is_file() else None
    return needed(found, f"{DEBIAN} not found: apt-get install {FASHION_MNIST.local_package}")


@pytest.mark.parametrize("dataset", DATASETS.values(), ids=DATASETS)
def test_each_declaration_is_whole(dataset) -> None:
    assert len(dataset.files) == 4 and set(dataset.mirror_sha256) == set(dataset.files)
    assert all(len(v) == 32 and int(v, 16) >= 0 for v in dataset.md5.values())
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in dataset.mirror_sha256.values())
    assert len(dataset.classes) == 10 and len(set(dataset.classes)) == 10
    assert dataset.mirrors and all(url.startswith(("http://", "https://")) for url in dataset.mirrors)


def test_declarations_agree_with_torchvision() -> None:
    assert list(MNIST.mirrors) == TorchvisionMNIST.mirrors and MNIST.classes == DIGITS
    assert list(FASHION_MNIST.mirrors) == TorchvisionFashionMNIST.mirrors
    assert list(FASHION_MNIST.classes) == TorchvisionFashionMNIST.classes


def mirror_gzip(name: str) -> bytes:
    """The mirror's gzip of `name`, rebuilt from Debian's: the same deflate stream, the mirror's header."""
    debian = (debian_folder() / f"{name}.gz").read_bytes()
    assert debian[:4] == b"\x1f\x8b\x08\x00"  # no FNAME or extra fields: the stream starts at byte 10
    header = b"\x1f\x8b\x08\x08" + struct.pack("<I", MIRROR_MTIME[name.split("-")[0]]) + b"\x00\x03"
    return header + name.encode() + b"\x00" + debian[10:]


def test_fashion_mnist_mirror_pins_hold_for_the_debian_files(mirror) -> None:
    """The mirror's files (their MD5s from torchvision) have the declared SHA-256s, and the mirror
    source takes them, here served on localhost."""
    www, url = mirror
    official = dict(TorchvisionFashionMNIST.resources)
    for name in IDX_FILES:
        data = mirror_gzip(name)
        assert hashlib.md5(data).hexdigest() == official[f"{name}.gz"], name
        (www / f"{name}.gz").write_bytes(data)
    files = sources.from_mirror(url, 5, FASHION_MNIST.mirror_sha256)
    sources.verify(files, FASHION_MNIST.md5, "mirror")


def test_fashion_mnist_downloads_from_the_debian_folder(tmp_path, monkeypatch, caplog) -> None:
    """The download stage with `dataset: fashion-mnist` and no mirror: Debian's files pass the
    checksums; 60,000 training and 10,000 test images; dataset.json names the classes."""
    debian_folder()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"download": {"dataset": "fashion-mnist", "mirrors": []}}))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="pipeline.download"):
        run_main(download, monkeypatch, "--out", "raw")
    assert f"from folder {DEBIAN} (package dataset-fashion-mnist)" in caplog.text
    counts = [check_idx(tmp_path / "raw" / name, images="images" in name) for name in IDX_FILES]
    assert counts == [60000, 60000, 10000, 10000]
    assert {name: md5((tmp_path / "raw" / name).read_bytes()) for name in IDX_FILES} == FASHION_MNIST.md5
    info = read_info(tmp_path / "raw", "download")
    assert (info.name, info.classes, info.files) == ("fashion-mnist", FASHION_MNIST.classes, IDX_FILES)


def test_a_missing_local_folder_is_named_with_its_package(tmp_path) -> None:
    from dataclasses import replace

    from pipeline.params import DownloadConfig

    elsewhere = replace(FASHION_MNIST, local_dir=str(tmp_path / "absent"), mirrors=())
    with pytest.raises(DataError, match=r"no source gave valid fashion-mnist files") as e:
        download.fetch(DownloadConfig(dataset="fashion-mnist", mirrors=[]), elsewhere)
    assert f"folder {tmp_path / 'absent'} (package dataset-fashion-mnist): DataError: neither" in str(e.value)


def test_preprocess_needs_the_dataset_file_of_download(processed, monkeypatch) -> None:
    (processed / "data/raw/dataset.json").unlink()
    with pytest.raises(DataError, match=r"data/raw/dataset.json not found; run the download stage"):
        run_main(preprocess, monkeypatch, "--raw", "data/raw", "--out", "data/processed")


def test_older_checkpoints_answer_with_the_ten_digits(in_trained, tmp_path) -> None:
    checkpoint = torch.load(in_trained / "models/model.pt", weights_only=True)
    assert checkpoint["classes"] == list(DIGITS)
    del checkpoint["classes"]
    torch.save(checkpoint, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt")[1] == DIGITS
    _, classes = predict.load_predictor(str(tmp_path / "old.pt"))
    assert classes == DIGITS


def test_mnist_reports_keep_their_format(in_trained) -> None:
    """Class names that are the digits write the same CSV bytes as the indices did."""
    assert read_info(in_trained / "data/processed", "preprocess").name == "mnist"
    predictions = (in_trained / "reports/predictions.csv").read_text().splitlines()
    actual, predicted = zip(*(line.split(",") for line in predictions[1:]), strict=True)
    _, labels = load_split(in_trained / "data/processed/test.pt")
    assert predictions[0] == "actual,predicted" and list(actual) == [str(k) for k in labels.tolist()]
    assert set(predicted) <= set(DIGITS)
    assert pd.read_csv(in_trained / "reports/per_class.csv")["class"].tolist() == list(range(10))


def test_the_plots_name_the_classes() -> None:
    labels, predicted = torch.tensor([0, 9, 6, 6]), torch.tensor([6, 7, 6, 0])
    fig = evaluate.confusion_figure(evaluate.confusion(labels, predicted), FASHION_MNIST.classes)
    (ax, _colorbar) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == list(FASHION_MNIST.classes)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(FASHION_MNIST.classes)
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    grid = evaluate.misclassified_figure(images, labels, predicted, FASHION_MNIST.classes)
    captions = [t.get_text() for t in grid.axes[0].texts]
    assert captions == ["true T-shirt/top\npred Shirt", "true Ankle boot\npred Sneaker", "true Shirt\npred T-shirt/top"]
    digits = evaluate.misclassified_figure(images, labels, predicted, DIGITS)
    assert [t.get_text() for t in digits.axes[0].texts][0] == "true 0 / pred 6"  # MNIST's captions as before


@pytest.mark.slow
def test_class_names_reach_reports_tracking_predict_and_the_served_model(trained_fashion, monkeypatch, capsys) -> None:
    work, classes = trained_fashion, FASHION_MNIST.classes
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    assert read_info(work / "data/processed", "preprocess").classes == classes
    assert torch.load(work / "models/model.pt", weights_only=True)["classes"] == list(classes)

    images, labels = load_split(work / "data/processed/test.pt")
    table = pd.read_csv(work / "reports/predictions.csv")
    assert table["actual"].tolist() == [classes[k] for k in labels.tolist()]  # what `dvc plots` draws
    assert set(table["predicted"]) <= set(classes)
    assert pd.read_csv(work / "reports/per_class.csv")["class"].tolist() == list(classes)

    client = MlflowClient()
    run = client.get_run(run_id_of(work))
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["fashion-mnist-train"]
    (evaluation,) = evaluations_of(client, run.info.run_id)
    assert [i.dataset.name for i in evaluation.inputs.dataset_inputs] == ["fashion-mnist-test"]

    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/classifier")
    assert served.metadata.metadata["classes"] == list(classes)
    out = served.predict(images[:8, 0].numpy())
    assert out["class"].tolist() == [classes[k] for k in out["digit"]]
    assert (out["digit"].to_numpy() == labels[:8].numpy()).mean() > 0.5  # the synthetic task is easy

    # predict: the class name on the command line, from the checkpoint and from the logged models.
    picture = work / "item.png"
    Image.fromarray(images[0, 0].numpy()).save(picture)
    monkeypatch.setattr("sys.argv", ["predict", str(picture), "--model", "models/model.pt"])
    predict.main()
    name, probability = capsys.readouterr().out.strip().removeprefix(f"{picture}: ").rsplit(" (", 1)
    assert name in classes and 0 < float(probability.rstrip(")")) <= 1
    for uri in (f"runs:/{run.info.run_id}/model", f"runs:/{run.info.run_id}/classifier"):
        assert predict.load_predictor(uri)[1] == classes
    (result,) = predict.predict_files([picture], *predict.load_predictor("models/model.pt"))
    assert result["class"] == classes[result["digit"]] == name


@pytest.mark.slow
def test_evaluate_refuses_a_model_of_other_classes(trained_fashion, trained, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(trained)  # MNIST's params and model, Fashion-MNIST's data
    data, out = str(trained_fashion / "data/processed"), str(tmp_path / "reports")
    with pytest.raises(DataError, match="was trained on other classes than fashion-mnist's; re-run train"):
        run_main(evaluate, monkeypatch, "--data", data, "--models", "models", "--out", out)


def test_dataset_json_is_read_with_clear_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="dataset.json not found; run the preprocess stage"):
        read_info(tmp_path, "preprocess")
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x", "classes": [1, 2]}))
    with pytest.raises(DataError, match="is not a dataset description"):
        read_info(tmp_path, "preprocess")
