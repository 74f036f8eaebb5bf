"""MLflow look-ups the tests share: a stage's run, its evaluations, a run holding a logged model."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus


def run_id_of(work: Path) -> str:
    """The training run the train stage wrote to work/models/mlflow_run.json."""
    return json.loads((work / "models/mlflow_run.json").read_text())["run_id"]


def evaluations_of(client: MlflowClient, run_id: str) -> list:
    """The evaluation runs of the training run `run_id` (evaluate's own runs, nested under it), newest first."""
    experiment_id = client.get_run(run_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{run_id}'"
    return client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])


def model_run(client: MlflowClient, experiment: str = "registry-tests") -> str:
    """A run holding a logged serving model (`classifier`, no files): what train leaves, minus the training."""
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id = client.create_run(experiment_id).info.run_id
    model = client.create_logged_model(experiment_id, name="classifier", source_run_id=run_id)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.set_terminated(run_id)
    return run_id
