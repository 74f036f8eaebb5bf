"""`mlflow run`: the MLproject matches params.yaml and dvc.yaml, and one `mlflow run` is one run."""

import sys

import pytest
import yaml
from mlflow import MlflowClient

from .helpers.repo import REPO, sh, synthetic_repo

MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def test_main_defaults_are_the_params_yaml_values() -> None:
    main = MLPROJECT["entry_points"]["main"]
    defaults = {name: spec["default"] for name, spec in main["parameters"].items() if name not in ("push", "force")}
    assert defaults == {key: PARAMS["train"][key] for key in ("epochs", "batch_size", "lr", "seed", "device", "nproc")}
    for name in defaults:
        assert f"-S train.{name}={{{name}}}" in main["command"]


def test_each_stage_entry_point_runs_what_dvc_runs() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, spec in stages.items():
        assert MLPROJECT["entry_points"][stage]["command"] == spec["cmd"]


def test_python_env_installs_the_pinned_requirements() -> None:
    env = yaml.safe_load((REPO / MLPROJECT["python_env"]).read_text())
    assert env["dependencies"] == ["-r requirements.txt"]
    assert str(env["python"]).startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert all("==" in dep for dep in env["build_dependencies"])


@pytest.mark.slow
def test_mlflow_run_is_one_run_holding_train_and_test_metrics_and_the_model(tmp_path) -> None:
    """On 2 data-parallel processes (gloo): every worker gets `mlflow run`'s MLFLOW_RUN_ID, rank 0 alone logs."""
    repo = synthetic_repo(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = ["mlflow", "run", str(repo), "--env-manager", "local", "--experiment-name", "tests"]
    cmd += ["-P", "epochs=1", "-P", "batch_size=32", "-P", "lr=0.002", "-P", "device=cpu", "-P", "nproc=2"]
    sh(tmp_path, *cmd, MLFLOW_TRACKING_URI=uri)

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # train and evaluate joined it
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "1" and run.data.params["train.epochs"] == "1"
    assert run.data.params["train.device"] == "cpu" and run.data.params["evaluate.device"] == "cpu"
    assert run.data.params["train.nproc"] == "2"
    assert run.data.tags["world_size"] == "2" and run.data.tags["backend"] == "gloo"
    assert {"train_loss", "val_accuracy", "test_accuracy", "test_macro_f1"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted(m.name for m in models) == ["classifier", "model"]
    assert {m.source_run_id for m in models} == {run.info.run_id}
    assert "up to date" in sh(repo, "dvc", "status")
