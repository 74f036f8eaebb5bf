"""The MLflow run a training checkpoint belongs to: resumed only where it exists, ended when the
checkpoint is discarded, so that a checkpoint never traps a user nor leaves a run RUNNING forever."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from pipeline.common.errors import PipelineError

log = logging.getLogger("pipeline.train")


def find_run(run_id: str | None) -> Run | None:
    """The run in the current store; None if it has no such run or the run was deleted."""
    if not run_id:
        return None
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise PipelineError(f"cannot read MLflow run {run_id} at {mlflow.get_tracking_uri()}: {e.message}") from e
    return None if run.info.lifecycle_stage == "deleted" else run


def resumable(resume: dict[str, Any] | None, path: Path) -> dict[str, Any] | None:
    """`resume` (a checkpoint train would resume), unless the current store lacks its run: another
    tracking URI, or a deleted run. Then training starts fresh, saying why in one line."""
    if resume is None or find_run(resume.get("run_id")) is not None:
        return resume
    log.warning(
        "checkpoint %s belongs to MLflow run %s, which %s does not hold (another tracking URI, or a deleted run); "
        "starting fresh",
        path,
        resume.get("run_id"),
        mlflow.get_tracking_uri(),
    )
    return None


def end_discarded(state: dict[str, Any]) -> None:
    """End the run of a checkpoint that will not be resumed KILLED, if it is still RUNNING (killed
    with SIGKILL, or its machine died): nothing else would ever end it."""
    run = find_run(state.get("run_id"))
    if run is not None and run.info.status == "RUNNING":
        MlflowClient().set_terminated(run.info.run_id, "KILLED")
        log.info("ended MLflow run %s of the discarded checkpoint as KILLED", run.info.run_id)
