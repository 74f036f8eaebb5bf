"""The store and the experiment: the repository's own SQLite store, MLFLOW_TRACKING_URI, the lock."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import ExperimentTag
from mlflow.exceptions import MlflowException

from pipeline.common import credentials
from pipeline.tracking.server import check_tracking_server

STORE_FILE = "mlflow.db"  # MLflow's own default store, `sqlite:///mlflow.db`, kept at the repository root
ARTIFACTS_DIR = "mlruns"  # and its artifacts, beside it


DESCRIPTION = (
    "CNN trained by the DVC pipeline (download -> preprocess -> train -> evaluate) on the dataset that "
    "params.yaml's download.dataset names (MNIST or Fashion-MNIST): each run's dataset inputs are named "
    "<dataset>-train and <dataset>-test. One run per `dvc repro` / `dvc exp run`, named after the DVC "
    "experiment; test metrics are linked to the logged models. Runs of one sweep share the tag `sweep`: "
    "filter with tags.sweep = '<name>'."
)


def repo_root() -> Path:
    """The main repository's root: DVC_ROOT when DVC runs the stage, also inside the temporary
    copies of queued and --temp experiments (.dvc/tmp/exps/...), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def repo_store_uri() -> str:
    return f"sqlite:///{repo_root() / STORE_FILE}"


def connect(uri: str | None = None) -> str:
    """Point MLflow at `uri`, else MLFLOW_TRACKING_URI, else the repository's own store; probe a
    server. Return the URI."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or repo_store_uri()
    uri = credentials.to_env(uri)  # user:password@ goes to MLflow's env variables, out of every message and file
    mlflow.set_tracking_uri(uri)
    check_tracking_server(uri)
    return uri


@contextmanager
def store_lock() -> Iterator[None]:
    """Serialize what parallel stages (`dvc queue start -j N`) must not do at once: create the
    SQLite store (its schema migrations) and the experiment, register a model and move its alias."""
    path = repo_root() / ".cache" / "mlflow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path, timeout=300):
        yield


def experiment_id(name: str) -> str:
    """Id of the experiment `name`, created with a description if new."""
    tags = {"mlflow.note.content": DESCRIPTION}
    with store_lock():
        in_repo = mlflow.get_tracking_uri() == repo_store_uri()
        new_store = in_repo and not (repo_root() / STORE_FILE).exists()  # a client would create it, wrongly
        if not new_store and (experiment := MlflowClient().get_experiment_by_name(name)) is not None:
            return experiment.experiment_id
        if in_repo:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # only this store needs it

            # Create the store and the experiment as MLflow does when started at the repository
            # root, artifacts in mlruns/<experiment id> there: its default is relative to the working
            # directory, and DVC deletes the working directory of a queued experiment.
            store = SqlAlchemyStore(repo_store_uri(), (repo_root() / ARTIFACTS_DIR).as_uri())
            return store.create_experiment(name, tags=[ExperimentTag(k, v) for k, v in tags.items()])
        try:
            return MlflowClient().create_experiment(name, tags=tags)
        except MlflowException as e:  # created meanwhile by a worker on another machine
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return MlflowClient().get_experiment_by_name(name).experiment_id
