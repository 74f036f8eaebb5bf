"""Each stage's logic on tiny synthetic data: preprocess, the model, training, evaluation."""

import json
import os
import random

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from pipeline import download, evaluate, preprocess, train
from pipeline.common.errors import DataError, ParamsError
from pipeline.core import engine
from pipeline.core.engine import Training, train_one_epoch
from pipeline.core.model import Net
from pipeline.core.step import StepConfig
from pipeline.data.datasets import FASHION_MNIST
from pipeline.data.splits import load_split, save_split
from pipeline.params import ModelConfig, TrainConfig

from .conftest import evaluations_of, run_main


def test_split_is_seeded_disjoint_and_complete() -> None:
    a_train, a_val = preprocess.split(100, 10, seed=1)
    b_train, b_val = preprocess.split(100, 10, seed=1)
    assert torch.equal(a_val, b_val) and len(a_val) == 10 and len(a_train) == 90
    assert sorted(torch.cat([a_train, a_val]).tolist()) == list(range(100))
    assert not torch.equal(preprocess.split(100, 10, seed=2)[1], a_val)
    with pytest.raises(ParamsError, match="preprocess.val_size must be in"):
        preprocess.split(100, 100, seed=1)


def test_preprocess_writes_compact_tensors(workdir, monkeypatch) -> None:
    run_main(download, monkeypatch, "--out", "data/raw")
    run_main(preprocess, monkeypatch, "--raw", "data/raw", "--out", "data/processed")
    x, y = load_split(workdir / "data/processed/train.pt")
    vx, vy = load_split(workdir / "data/processed/val.pt")
    tx, ty = load_split(workdir / "data/processed/test.pt")
    assert (len(x), len(vx), len(tx)) == (500, 100, 200)
    assert x.dtype == torch.uint8 and x.shape[1:] == (1, 28, 28) and y.dtype == torch.int64
    indices = torch.load(workdir / "data/processed/val.pt")["indices"]
    assert torch.equal(indices, preprocess.split(600, 100, seed=42)[1])


def test_load_split_refuses_wrong_dtype(tmp_path) -> None:
    save_split(tmp_path / "bad.pt", torch.zeros(3, 28, 28), torch.zeros(3, dtype=torch.long), torch.arange(3))
    with pytest.raises(DataError, match="images must be uint8"):
        load_split(tmp_path / "bad.pt")
    save_split(tmp_path / "bad.pt", torch.zeros(3, 28, 28, dtype=torch.uint8), torch.full((3,), 12), torch.arange(3))
    with pytest.raises(DataError, match=r"labels must lie in \[0, 9\]"):
        load_split(tmp_path / "bad.pt")


@pytest.mark.parametrize("nf", [4, 32])
def test_model_shapes(nf) -> None:
    model = Net(nf)
    assert model(torch.zeros(5, 1, 28, 28, dtype=torch.uint8)).shape == (5, 10)
    assert model.linears[0].in_features == nf * 7 * 7


def tiny_data(n: int = 256):
    from .conftest import synthetic_digits

    x, y = synthetic_digits(n, seed=0)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long()


def test_loss_falls_on_a_learnable_task() -> None:
    torch.manual_seed(0)
    model, (x, y) = Net(8), tiny_data()
    training = Training(model, torch.optim.Adam(model.parameters(), lr=2e-3), torch.Generator().manual_seed(0))
    losses = [train_one_epoch(training, x, y, StepConfig(batch_size=32))["loss"] for _ in range(4)]
    assert losses[-1] < losses[0] * 0.5, losses


def test_same_seed_gives_identical_weights() -> None:
    """Through the train stage's own seeding (engine.build), not a torch.manual_seed of the test's."""
    data = tiny_data(128)

    def once(seed: int) -> dict[str, torch.Tensor]:
        # The global generators scrambled, differently before each run: equal weights for equal
        # seeds can only come from the stage seeding them itself.
        noise = int.from_bytes(os.urandom(4))
        torch.manual_seed(noise)
        random.seed(noise)
        np.random.seed(noise)
        cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, seed=seed)
        model = engine.build(ModelConfig(nf=4), cfg, torch.device("cpu"))
        engine.fit(model, data, data, cfg)
        return model.state_dict()

    a, b, other = once(7), once(7), once(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_confusion_and_per_class() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0])
    m = evaluate.confusion(labels, predicted)
    assert m[0, 0] == 1 and m[0, 1] == 1 and m[1, 1] == 2 and m[2, 0] == 1 and m.sum() == 5
    table = evaluate.per_class(m, FASHION_MNIST.classes).set_index("class")
    assert table.loc["Trouser", "precision"] == pytest.approx(2 / 3) and table.loc["Trouser", "recall"] == 1.0
    assert table.loc["Pullover", "f1"] == 0.0 and table.loc["T-shirt/top", "support"] == 2


@pytest.mark.slow
def test_all_stages_in_process(workdir, monkeypatch) -> None:
    """download -> preprocess -> train -> evaluate on synthetic data; check files and the MLflow run."""
    run_main(download, monkeypatch, "--out", "data/raw")
    run_main(preprocess, monkeypatch, "--raw", "data/raw", "--out", "data/processed")
    run_main(train, monkeypatch, "--data", "data/processed", "--out", "models")
    run_main(evaluate, monkeypatch, "--data", "data/processed", "--models", "models", "--out", "reports")

    history = pd.read_csv(workdir / "models/history.csv")
    assert list(history["epoch"]) == [1, 2]
    metrics = json.loads((workdir / "reports/metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.9  # the synthetic task is easy
    for name in ("per_class.csv", "predictions.csv", "confusion_matrix.png", "misclassified.png"):
        assert (workdir / "reports" / name).stat().st_size > 0
    checkpoint = torch.load(workdir / "models/model.pt", weights_only=True)
    assert checkpoint["model"] == {"arch": "tutorial", "nf": 8} and checkpoint["train"]["epochs"] == 2

    run = MlflowClient().get_run(json.loads((workdir / "models/mlflow_run.json").read_text())["run_id"])
    assert run.data.params["train.lr"] == "0.002" and run.data.tags["device"] == "cpu"
    assert run.info.status == "FINISHED"
    (evaluation,) = evaluations_of(MlflowClient(), run.info.run_id)
    assert evaluation.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert evaluation.info.status == "FINISHED" and evaluation.data.params["evaluate.batch_size"] == "256"
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.predict(torch.zeros(3, 1, 28, 28).numpy()).shape == (3, 10)


def test_evaluate_scores_the_test_split_not_another(in_trained) -> None:
    """metrics.json, predictions.csv and the MLflow metrics all come from data/processed/test.pt."""
    _, test_labels = load_split(in_trained / "data/processed/test.pt")
    _, val_labels = load_split(in_trained / "data/processed/val.pt")
    assert len(test_labels) != len(val_labels)  # the splits are told apart by their size, too
    predictions = pd.read_csv(in_trained / "reports/predictions.csv")
    assert predictions["actual"].tolist() == test_labels.tolist()
    metrics = json.loads((in_trained / "reports/metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx((predictions["actual"] == predictions["predicted"]).mean())
    assert pd.read_csv(in_trained / "reports/per_class.csv")["support"].sum() == len(test_labels)


def test_the_trained_fixture_leaves_no_tracking_uri_behind(trained, monkeypatch) -> None:
    """Its stages set MLflow's global tracking URI; left set, it beat the MLFLOW_TRACKING_URI of later tests."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"
