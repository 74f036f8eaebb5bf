"""A run's lifecycle: its name, start or rejoin, tags, how it ends, and the run file train leaves for evaluate."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.exceptions import MlflowException

from pipeline.common import credentials
from pipeline.common.errors import PipelineError
from pipeline.common.files import write_json
from pipeline.params import MlflowConfig, ModelConfig, TrainConfig
from pipeline.tracking import tags
from pipeline.tracking.server import answering
from pipeline.tracking.store import experiment_id, repo_store_uri


def run_name(model_cfg: ModelConfig, cfg: TrainConfig) -> str:
    """The DVC experiment's name when DVC runs one, else the settings that set runs apart and a
    random suffix (from the OS: Python's `random` is seeded, so MLflow's own names repeat)."""
    if name := os.environ.get("DVC_EXP_NAME"):
        return name
    return f"{model_cfg.arch}-nf{model_cfg.nf}-e{cfg.epochs}-b{cfg.batch_size}-lr{cfg.lr:g}-{uuid.uuid4().hex[:4]}"


# MLflow's own system metrics (CPU, memory, disk, network; GPUs through nvidia-ml-py): on for the
# train stage unless the user turns them off with MLflow's own switch, and sampled every 2 s unless
# set (MLflow's default, 10 s, logs none for a short training). Their cost: bench/experiment_cost.py.
SYSTEM_METRICS_INTERVAL = 2.0


def system_metrics_wanted() -> bool:
    """MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING if the user set it, else on."""
    value = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    return value is None or value.strip().lower() in ("true", "1")


@contextmanager
def start_run(
    cfg: MlflowConfig, name: str, run_id: str | None = None, system_metrics: bool = False
) -> Iterator[mlflow.ActiveRun]:
    """Reopen `run_id`, join the run `mlflow run` made (MLFLOW_RUN_ID), or start run `name` in the
    experiment; tag it with its DVC experiment and its sweep."""
    system_metrics = system_metrics and system_metrics_wanted()
    if system_metrics:
        if "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ:
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)
        # Best effort: no start/stop chatter, and no errors of their own when the server is gone
        # (the stage says that itself, in one line).
        logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
    try:
        if run_id := run_id or os.environ.get("MLFLOW_RUN_ID"):
            active = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        else:
            active = mlflow.start_run(
                experiment_id=experiment_id(cfg.experiment_name), run_name=name, log_system_metrics=system_metrics
            )
        mlflow.set_tags(tags.start_tags(name, active.info.run_name, cfg.sweep))
    except MlflowException as e:
        raise PipelineError(f"MLflow tracking at {mlflow.get_tracking_uri()} failed: {e.message}") from e
    with ending(active) as run:
        yield run


@contextmanager
def ending(active: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    """End the run FINISHED, or KILLED on Ctrl-C or SIGTERM, or FAILED on any other error."""
    try:
        yield active
    except BaseException as e:
        # Recorded if the store still answers; a dead server must not hide the error that stopped us.
        try:
            mlflow.end_run(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")  # SIGTERM: one too
        except MlflowException:
            pass
        raise
    with answering("the run's final status was not recorded"):
        mlflow.end_run()


def quoted(value: str, what: str) -> str:
    """`value` inside single quotes for an MLflow filter string; one that could end the quote refused."""
    if not isinstance(value, str) or not value or not value.isprintable() or any(c in value for c in "'\"\\"):
        raise PipelineError(f"{what} {str(value)[:80]!r} cannot go into an MLflow search: no quotes or backslashes")
    return f"'{value}'"


def logged_models(client: MlflowClient, run_id: str, name: str | None = None) -> list[LoggedModel]:
    """The models that run `run_id` logged (only the one called `name` when given), oldest first."""
    run = client.get_run(run_id)
    where = f"source_run_id = {quoted(run_id, 'run id')}" + (
        f" AND name = {quoted(name, 'model name')}" if name else ""
    )
    return client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=where)


def read_run_file(path: Path) -> dict[str, Any]:
    """What train recorded of its run (see save_run_file)."""
    if not path.is_file():
        raise PipelineError(f"{path} not found; run the train stage first")
    return json.loads(path.read_text())


def save_run_file(path: Path, run: mlflow.ActiveRun) -> None:
    """Record the run for the evaluate stage and for `dvc exp show` (a DVC metrics file).

    The repository's own store is recorded as no URI, not as its absolute path: DVC commits this
    file with each experiment, and the path of a temporary copy or of another machine would be wrong
    after `dvc exp apply`, `dvc exp branch` or a clone.
    """
    uri = mlflow.get_tracking_uri()
    write_json(
        path,
        {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": None if uri == repo_store_uri() else credentials.without_credentials(uri),
        },
    )
