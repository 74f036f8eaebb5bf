"""The evaluate stage's MLflow run: a run of its own for each evaluation, nested under the run
that trained the model, its metrics linked to the logged models and the test set.

Its own run, because MLflow refuses to change a logged param: logging `evaluate.*` and `register.*`
into the training run broke every re-evaluation with other values (and marked the finished training
run FAILED). Now the training run is never reopened; each evaluation keeps its own params, metrics
and artifacts, and the Models tab lists every evaluation of a model (MLflow 3's model-linked metrics).
The test metrics are also logged on the training run (metrics may be logged again, params may not),
so that the runs table compares experiments by test accuracy next to their training params.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.data.dataset import Dataset
from mlflow.entities import LoggedModelInput, Metric
from mlflow.exceptions import MlflowException
from mlflow.utils.time import get_current_time_millis

from pipeline.common.errors import PipelineError, redact
from pipeline.tracking import inputs, runs, store, tags


@contextmanager
def evaluation_run(info: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """Start the evaluation of the model that the run in `info` (read_run_file) trained, as a child
    of that run; under `mlflow run` (MLFLOW_RUN_ID), log into that run instead. Ends FINISHED,
    KILLED or FAILED; the training run's status and params are not touched."""
    # No URI in the file: train used the repository's own store (see save_run_file). Another URI in a
    # committed file must not choose where this user's MLflow credentials are sent.
    recorded = info.get("tracking_uri")
    if recorded and "MLFLOW_TRACKING_URI" not in os.environ and recorded != store.repo_store_uri():
        raise PipelineError(
            f"the run file names the tracking store {redact(str(recorded))}, not this repository's; set "
            "MLFLOW_TRACKING_URI to it if you trust it (your MLflow credentials go there), then run evaluate again"
        )
    store.connect(None if "MLFLOW_TRACKING_URI" in os.environ else recorded)
    model_run_id = info["run_id"]
    try:
        if run_id := os.environ.get("MLFLOW_RUN_ID"):
            active = mlflow.start_run(run_id=run_id)
        else:
            model_run = MlflowClient().get_run(model_run_id)
            name = f"{model_run.info.run_name}-eval"
            experiment = model_run.info.experiment_id
            active = mlflow.start_run(experiment_id=experiment, run_name=name, tags=tags.evaluation_tags(model_run_id))
    except MlflowException as e:
        raise PipelineError(
            f"cannot start the evaluation of MLflow run {model_run_id} at {mlflow.get_tracking_uri()}: {e.message}"
        ) from e
    with runs.ending(active) as run:
        if run.info.run_id != model_run_id and not run.data.tags.get("model_run_id"):
            mlflow.set_tags(tags.model_run_tag(model_run_id))  # `mlflow run`'s run, the model from another
        yield run


def log_linked(metrics: dict[str, float], model_run_id: str, test_set: Dataset) -> None:
    """Log the test set as an input of the active run, linked to each model `model_run_id` logged,
    `metrics` on those models for that dataset (inputs.log_model_metrics), and on the training run."""
    run = mlflow.active_run()
    client = MlflowClient()
    models = runs.logged_models(client, model_run_id)
    client.log_inputs(run.info.run_id, models=[LoggedModelInput(m.model_id) for m in models])
    inputs.log_model_metrics(metrics, model_run_id, test_set)
    if run.info.run_id != model_run_id:
        # The training run's row in the runs table (and its chart view) compares experiments by
        # test accuracy too. Metrics, unlike params, may be logged again: the latest evaluation
        # is what the table shows, each one keeps its own run. The run's status is not touched.
        now = get_current_time_millis()
        client.log_batch(model_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()], synchronous=True)
