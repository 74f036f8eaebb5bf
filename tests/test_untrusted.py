"""Untrusted inputs: credentials in every form through every message path; files from teammates."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from pipeline.common import credentials, errors
from pipeline.common.errors import DataError, PipelineError
from pipeline.core.checkpoint import load_model, load_training
from pipeline.core.model import Net
from pipeline.data.datasets import read_info
from pipeline.data.idx import idx_bytes, read_idx
from pipeline.serving import registry
from pipeline.sweep import budget
from pipeline.sweep import study as studies

from .helpers.repo import REPO
from .helpers.stages import run_main

# Each form of URL a user may give, and the secrets it holds (as written and as the driver reads them).
FORMS = [
    ("postgresql+psycopg2://optuna:s3cr/et@127.0.0.1:1/sweeps", ["s3cr/et"]),
    ("postgresql://optuna:pa ss word@127.0.0.1:1/sweeps", ["pa ss word"]),
    ("postgresql://optuna@127.0.0.1:1/sweeps?sslmode=disable&password=hunter22", ["hunter22"]),
    ("postgresql://optuna:p%2Fss%20w@127.0.0.1:1/sweeps", ["p%2Fss%20w", "p/ss w"]),
    ("mysql+pymysql://optuna:p@ss:w0rd@127.0.0.1:1/sweeps", ["p@ss:w0rd", "ss:w0rd"]),
    ("https://alice:t0k/en99@mlflow.example/", ["t0k/en99", "alice"]),
    ("https://tokenonly12345@mlflow.example/", ["tokenonly12345"]),
    ("http://mlflow.example:5000/?token=abcd1234", ["abcd1234"]),
    ("https://bob:se cret9@mlflow.example:443/x?password=qwerty99", ["se cret9", "qwerty99"]),
]


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


@pytest.mark.parametrize(("url", "secrets"), FORMS)
def test_no_form_of_a_url_leaks_its_secret_through_any_message_path(url, secrets, monkeypatch) -> None:
    monkeypatch.setattr(credentials, "_remembered", set())
    for var in (*credentials.URL_VARS, *credentials.SECRET_VARS):
        monkeypatch.delenv(var, raising=False)
    texts = {
        "an error naming the URL": credentials.redact(f"cannot reach {url}: connection refused"),
        "the URL alone": credentials.redact_url(url),
        "a file (mlflow_run.json)": credentials.without_credentials(url),
        "an MLflow tag (sweep.failure)": budget.one_line(RuntimeError(f"lost {url}\nmore")),
    }
    record = errors._redacting(logging.LogRecord)(
        "pipeline.sweep", logging.INFO, __file__, 1, "study at %s", (url,), None
    )
    texts["a log line"] = record.getMessage()
    if url.startswith(("postgresql", "mysql")):
        with pytest.raises(PipelineError) as e:
            studies.storage(url, heartbeat=10)  # nothing listens on port 1; mysql: no driver
        texts["the storage error"] = str(e.value)
    else:
        monkeypatch.setattr(os, "environ", dict(os.environ))  # to_env writes MLflow's variables
        assert credentials.split_userinfo(credentials.to_env(url))[1] is None  # user:password went to the env
    for where, text in texts.items():
        assert not leaks(text, secrets), f"{where}: {text}"
    assert "127.0.0.1" in texts["the URL alone"] or "mlflow.example" in texts["the URL alone"]  # the host stays


def test_to_env_reads_a_password_with_a_slash_and_a_space(monkeypatch) -> None:
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert credentials.to_env("https://al%20ice:pa/ss w%40rd@host:5000/path") == "https://host:5000/path"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("al ice", "pa/ss w@rd")


def test_a_remembered_url_is_masked_anywhere_with_its_password(monkeypatch) -> None:
    monkeypatch.setattr(credentials, "_remembered", set())
    credentials.remember("postgresql://u:pa ss word@db/x")
    text = credentials.redact('FATAL: password "pa ss word" for postgresql://u:pa ss word@db/x refused')
    assert "pa ss" not in text and "postgresql://***@db/x" in text


def test_the_sweep_command_prints_the_storage_error_without_the_password() -> None:
    url = "postgresql+psycopg2://optuna:pa ss/w0rd@127.0.0.1:1/sweeps?password=hunter22"
    env = {**os.environ, "SWEEP_STORAGE": url, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.sweep", "show", "fast-search"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and run.stderr.startswith("error: cannot open the study storage"), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not leaks(run.stderr, ["pa ss", "w0rd", "hunter22"])


# Files from a teammate (a commit, a DVC remote, a registry): each bad one is one line, nothing written.


def _info(**changes) -> dict:
    good = {"name": "mnist", "classes": [str(k) for k in range(10)], "files": ["a-idx3", "b-idx1", "c", "d"]}
    return {**good, **changes}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_info(files=["../../etc/passwd", "b", "c", "d"]), "files must be four file names"),
        (_info(files=["/etc/passwd", "b", "c", "d"]), "files must be four file names"),
        (_info(files=[1, 2, 3, 4]), "files must be four file names"),
        (_info(files=["a", "b", "c"]), "files must be four file names"),
        (_info(files="abcd"), "files must be four file names"),
        (_info(classes="0123456789"), "classes must be a list of class names"),
        (_info(classes=["a\nb"] * 10), "classes must be a list of class names"),
        (_info(classes=[]), "classes must be a list of class names"),
        (_info(name=["mnist"]), "name must be letters"),
        (_info(name="../mnist"), "name must be letters"),
        (_info(extra=1), "expected exactly name, classes and files"),
        ([1, 2], "expected exactly name, classes and files"),
    ],
)
def test_a_bad_dataset_json_is_one_line(tmp_path, data, message) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=message) as e:
        read_info(tmp_path, "download")
    assert "\n" not in str(e.value)


def test_the_preprocess_stage_refuses_a_dataset_json_pointing_outside_and_writes_nothing(processed, monkeypatch):
    from pipeline import preprocess

    info = json.loads((processed / "data/raw/dataset.json").read_text())
    info["files"][0] = "../../source/train-images-idx3-ubyte"  # a real IDX file, outside data/raw
    (processed / "data/raw/dataset.json").write_text(json.dumps(info))
    shutil.rmtree(processed / "data/processed")
    with pytest.raises(DataError, match="files must be four file names"):
        run_main(preprocess, monkeypatch, "--raw", "data/raw", "--out", "data/processed")
    assert not list((processed / "data").glob("processed/*.pt"))


def test_idx_files_with_zero_items_are_refused_from_the_header(tmp_path) -> None:
    for images, array in ((True, np.zeros((0, 28, 28), np.uint8)), (False, np.zeros(0, np.uint8))):
        (tmp_path / "x").write_bytes(idx_bytes(array))
        with pytest.raises(DataError, match="header says 0 .*expected at least one"):
            read_idx(tmp_path / "x", images=images)


def _model_file(path, **changes) -> None:
    state = {"state_dict": Net(4).state_dict(), "model": {"arch": "tutorial", "nf": 4}, **changes}
    torch.save(state, path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": {"arch": "tutorial", "nf": 32.0}}, "model.nf must be an integer"),
        ({"model": {"arch": "tutorial", "nf": 4, "depth": 3}}, "unknown key model.depth"),
        ({"model": ["tutorial", 4]}, "model must be a mapping"),
        ({"state_dict": [1, 2]}, "no state_dict mapping"),
        ({"state_dict": {"w": "x"}}, "state_dict must map names to tensors"),
        ({"classes": ["a"] * 9}, "'classes' must be 10 class names"),
        ({"classes": "0123456789"}, "'classes' must be 10 class names"),
        ({"classes": [1] * 10}, "'classes' must be 10 class names"),
    ],
)
def test_a_bad_model_file_is_one_line(tmp_path, changes, message) -> None:
    _model_file(tmp_path / "model.pt", **changes)
    with pytest.raises(DataError, match=message):
        load_model(tmp_path / "model.pt")


def test_a_model_file_holding_a_list_and_a_training_checkpoint_holding_a_list(tmp_path, caplog) -> None:
    torch.save([1, 2, 3], tmp_path / "model.pt")
    with pytest.raises(DataError, match="not a model checkpoint"):
        load_model(tmp_path / "model.pt")
    for bad in ([1, 2], {"history": "x"}, {"fingerprint": {}, "history": [1]}):
        torch.save(bad, tmp_path / "ckpt.pt")
        assert load_training(tmp_path / "ckpt.pt", expected={}, epochs=3) is None
    assert caplog.text.count("not a training state written by train; starting fresh") == 3


@pytest.mark.parametrize(("tag", "accuracy"), [("0.98", 0.98), ("1", 1.0), ("inf", -math.inf), ("nan", -math.inf),
                                                ("1.5", -math.inf), ("-0.1", -math.inf), ("x", -math.inf)])  # fmt: skip
def test_a_registry_accuracy_tag_counts_only_when_finite_in_0_1(tag, accuracy) -> None:
    def version(number: str, value: str) -> ModelVersion:
        return ModelVersion("m", number, 0, tags=[ModelVersionTag(registry.ACCURACY_TAG, value)])

    assert registry.accuracy_of(version("1", tag)) == accuracy
    forged, honest = version("2", tag), version("1", "0.9")
    assert registry.best_version([honest, forged]) is (forged if accuracy > 0.9 else honest)


@pytest.mark.parametrize("name", ["mnist' OR name != '", 'a"b', "a\\b", "a\nb", ""])
def test_a_name_that_could_end_a_filter_quote_is_refused(name) -> None:
    with pytest.raises(PipelineError, match="cannot go into an MLflow search"):
        registry.quoted(name, "register.name")
    assert registry.quoted("mnist-cnn", "register.name") == "'mnist-cnn'"


@pytest.mark.parametrize("classes", [["a"] * 9, "0123456789", [None] * 10])
def test_predict_refuses_a_served_model_whose_classes_are_not_ten_names(monkeypatch, classes) -> None:
    import mlflow

    from pipeline import predict

    model = types.SimpleNamespace(metadata=types.SimpleNamespace(metadata={"classes": classes}))
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda spec: model)
    with pytest.raises(DataError, match="'classes' must be 10 class names"):
        predict.load_predictor("models:/someone-elses@champion")


def test_a_champion_that_cannot_be_read_moves_nothing_even_if_the_rest_answers(monkeypatch) -> None:
    """Only "not found" means no champion: a 503 on that one read stops before any registration or
    alias move, though every other call of the registry would succeed."""
    from mlflow.exceptions import MlflowException

    from pipeline.params import RegisterConfig

    writes = []

    class Registry:
        def get_registered_model(self, name):
            raise MlflowException("HTTP 503", error_code="TEMPORARILY_UNAVAILABLE")

        def get_run(self, run_id):
            return types.SimpleNamespace(info=types.SimpleNamespace(experiment_id="1"))

        def search_logged_models(self, **kwargs):
            return [types.SimpleNamespace(model_uri="models:/m-1")]

        def search_model_versions(self, query):
            return [ModelVersion("mnist-cnn", "1", 0, tags=[ModelVersionTag(registry.ACCURACY_TAG, "0.5")])]

        def set_registered_model_alias(self, *args):
            writes.append(("alias", *args))

    monkeypatch.setattr(registry, "MlflowClient", Registry)
    monkeypatch.setattr(registry.mlflow, "register_model", lambda *a, **k: writes.append(("register", *a)))
    with pytest.raises(PipelineError, match="registering mnist-cnn at .* failed, nothing was moved: HTTP 503"):
        registry.register_if_good("0" * 32, 0.99, RegisterConfig(name="mnist-cnn", min_accuracy=0.5))
    assert writes == []


def test_a_committed_run_file_does_not_choose_where_credentials_go(monkeypatch) -> None:
    """Its tracking_uri is used only when it is the repository's own store (or MLFLOW_TRACKING_URI
    is set, which wins); another is one line saying what to set, before any connection."""
    from pipeline.tracking import evaluation_run as module
    from pipeline.tracking import store

    connected = []
    monkeypatch.setattr(store, "connect", lambda uri=None: connected.append(uri) or (_ for _ in ()).throw(KeyError))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "my-own-token")
    info = {"run_id": "0" * 32, "tracking_uri": "https://attacker.example/?token=theirs123"}
    with pytest.raises(
        PipelineError, match="names the tracking store https://attacker.example/.token=\\*\\*\\*, not"
    ) as e:
        with module.evaluation_run(info):
            pass
    assert connected == [] and "set MLFLOW_TRACKING_URI to it if you trust it" in str(e.value)
    for recorded, expected in ((None, None), (store.repo_store_uri(), store.repo_store_uri())):
        with pytest.raises(KeyError), module.evaluation_run({**info, "tracking_uri": recorded}):
            pass
        assert connected.pop() == expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")  # the user's own choice wins
    with pytest.raises(KeyError), module.evaluation_run(info):
        pass
    assert connected == [None]
