"""pipeline/core/checkpoint.py: the model file's format, and the training checkpoint's resume rules."""

import dataclasses
import logging

import pytest
import torch

from pipeline.common.errors import DataError
from pipeline.core import checkpoint
from pipeline.core.model import build_model
from pipeline.params import ModelConfig, TrainConfig

MODEL = ModelConfig(arch="fast", nf=4)
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MODEL)


def test_a_model_file_round_trips_weights_config_and_class_names(tmp_path) -> None:
    net = network()
    checkpoint.save_model(tmp_path / "a.pt", net, MODEL, history=[{"epoch": 1}])
    checkpoint.save_model(tmp_path / "b.pt", net, MODEL, classes=FASHION)
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert list(raw) == ["state_dict", "model", "history"]  # no "classes" key unless given: MNIST's files unchanged
    assert raw["model"] == {"arch": "fast", "nf": 4} and raw["history"] == [{"epoch": 1}]
    loaded, classes = checkpoint.load_model(tmp_path / "a.pt", expected=MODEL)
    assert classes == tuple("0123456789") and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    assert checkpoint.load_model(tmp_path / "b.pt")[1] == tuple(FASHION)


def test_a_model_file_is_refused_naming_what_is_wrong(tmp_path) -> None:
    with pytest.raises(DataError, match="not found; run the train stage first"):
        checkpoint.load_model(tmp_path / "none.pt")
    checkpoint.save_model(tmp_path / "m.pt", network(), MODEL)
    with pytest.raises(DataError, match="model.nf=4 in the file but 8 in params.yaml"):
        checkpoint.load_model(tmp_path / "m.pt", expected=ModelConfig(arch="fast", nf=8))
    checkpoint.save_model(tmp_path / "c.pt", network(), MODEL, classes=["a", "b"])
    with pytest.raises(DataError, match="'classes' must be 10 class names"):
        checkpoint.load_model(tmp_path / "c.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="is not a model checkpoint written by train"):
        checkpoint.load_model(tmp_path / "junk.pt")


def test_the_fingerprint_ignores_only_what_resuming_may_change() -> None:
    cfg = TrainConfig(epochs=2)
    base = checkpoint.fingerprint(MODEL, cfg, "md5")
    same = dataclasses.replace(cfg, epochs=5, nproc=2, nnodes=2, rdzv_endpoint="node0:29500")
    assert checkpoint.fingerprint(MODEL, same, "md5") == base
    assert checkpoint.fingerprint(MODEL, dataclasses.replace(cfg, lr=0.5), "md5") != base
    assert checkpoint.fingerprint(MODEL, cfg, "other") != base
    other = checkpoint.fingerprint(ModelConfig(arch="fast", nf=8), dataclasses.replace(cfg, lr=0.5), "md5")
    assert checkpoint.differences(other, base) == "model.nf: 8 -> 4, train.lr: 0.5 -> 0.0001"
    assert checkpoint.differences(base, base) == ""


def test_a_training_checkpoint_resumes_only_with_the_same_settings_and_data(tmp_path, caplog) -> None:
    path, cfg = tmp_path / "ckpt.pt", TrainConfig(epochs=3)
    expected = checkpoint.fingerprint(MODEL, cfg, "md5")
    discarded: list[dict] = []
    assert checkpoint.load_training(path, expected, 3, discarded.append) is None  # none yet
    checkpoint.save_training(path, {"history": [{"epoch": 1}]}, expected, "run-1", rows=[{"epoch": 1}])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # written atomically: no temporary left
    with caplog.at_level(logging.INFO, logger="pipeline"):
        state = checkpoint.load_training(path, expected, 3, discarded.append)
        assert state["run_id"] == "run-1" and state["rows"] == [{"epoch": 1}] and not discarded
        assert "resuming from" in caplog.text and "after epoch 1" in caplog.text

        other = checkpoint.fingerprint(MODEL, dataclasses.replace(cfg, lr=0.5), "md5")
        assert checkpoint.load_training(path, other, 3, discarded.append) is None
        assert "made with other settings (train.lr: 0.0001 -> 0.5)" in caplog.text
        assert checkpoint.load_training(path, expected, 0, discarded.append) is None
        assert "past train.epochs=0" in caplog.text
        assert [d["run_id"] for d in discarded] == ["run-1", "run-1"]  # each discarded one, to end its run

        path.write_bytes(b"truncated")
        assert checkpoint.load_training(path, expected, 3, discarded.append) is None
        assert "ignoring unreadable checkpoint" in caplog.text and len(discarded) == 2  # no run to end
