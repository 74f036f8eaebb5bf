"""The MLflow side of a training checkpoint (core/checkpoint.py): its run, resumed only where it
exists and ended when the checkpoint is discarded, so that a checkpoint never traps a user nor leaves
a run RUNNING forever; and each epoch's metrics logged once, also those a dead server missed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from pipeline.common.errors import PipelineError, shielded
from pipeline.core import checkpoint
from pipeline.tracking import server

log = logging.getLogger(__name__)


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


def resume(path: Path, expected: dict[str, Any], epochs: int) -> dict[str, Any] | None:
    """The training checkpoint at `path` to resume (checkpoint.load_training) if this store holds
    its run; the run of one that is discarded ends KILLED."""
    return resumable(checkpoint.load_training(path, expected, epochs, discard=end_discarded), path)


def end_discarded(state: dict[str, Any]) -> None:
    """End the run of a checkpoint that will not be resumed KILLED, if it is still RUNNING (killed
    with SIGKILL, or its machine died): nothing else would ever end it."""
    run = find_run(state.get("run_id"))
    if run is not None and run.info.status == "RUNNING":
        MlflowClient().set_terminated(run.info.run_id, "KILLED")
        log.info("ended MLflow run %s of the discarded checkpoint as KILLED", run.info.run_id)


def log_epochs(run_id: str, rows: list[dict[str, float]], kept: str, catch_up: bool = False) -> None:
    """Log the rows (one an epoch). With `catch_up` (a resumed run), only those whose epoch the run
    does not hold yet: a tracking server, down at the time, may not have taken them. Each epoch once."""
    # Shielded: SIGTERM or Ctrl-C is raised after the store's write, not inside it (see errors.shielded).
    with server.answering(f"{kept}; run again once it answers, to resume into run {run_id}"), shielded():
        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_loss")} if catch_up else set()
        for row in rows:
            if int(row["epoch"]) not in logged:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
