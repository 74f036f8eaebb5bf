"""Datasets as MLflow inputs, and metrics linked to the logged models; safe when runs race on one store."""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.data.dataset import Dataset
from mlflow.exceptions import MlflowException

from pipeline.common.errors import PipelineError
from pipeline.tracking import runs

T = TypeVar("T")


def dataset(images: torch.Tensor, labels: torch.Tensor, source: str, name: str) -> Dataset:
    """A split as an MLflow dataset (digest, schema, source path)."""
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that a path is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_numpy(features=images.numpy(), targets=labels.numpy(), source=source, name=name)


# What a store says when another process inserted the same row first: SQLite, PostgreSQL, MySQL,
# and a tracking server passing its store's error on.
RACE_MARKERS = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry", "IntegrityError")
RACE_RETRIES = 5


JITTER = random.SystemRandom()  # not `random` itself: stages seed it, and racers would wait alike


def racing(write: Callable[[], T]) -> T:
    """Run a store write that concurrent runs can race on (the first insert of a dataset, a metric
    linked to one): when another process inserted the same row first, the store refuses ours;
    once it is there, a second try reuses it. Other errors go up at once."""
    for attempt in range(RACE_RETRIES):
        try:
            return write()
        except MlflowException as e:
            if attempt == RACE_RETRIES - 1 or not any(m in str(e) for m in RACE_MARKERS):
                raise
            time.sleep(JITTER.uniform(0.05, 0.2) * (attempt + 1))  # the other writer commits meanwhile
    raise AssertionError("unreachable")


def log_input(data: Dataset, context: str) -> None:
    """Log `data` as an input of the active run; safe when other runs log it into the experiment at once."""
    racing(lambda: mlflow.log_input(data, context=context))


def log_dataset(images: torch.Tensor, labels: torch.Tensor, source: str, name: str, context: str) -> Dataset:
    """Log a split as an MLflow dataset input of the active run (digest, schema, source path)."""
    data = dataset(images, labels, source, name)
    log_input(data, context)
    return data


def log_model_metrics(metrics: dict[str, float], model_run_id: str, dataset: Dataset) -> None:
    """Log `metrics` to the active run, linked to `dataset` and to each model that run `model_run_id`
    logged, so that the Models tab shows them."""
    models = runs.logged_models(MlflowClient(), model_run_id)
    if not models:
        raise PipelineError(f"run {model_run_id} logged no model; rerun the train stage")
    # One timestamp for all: the run's own metric table then holds each value once, not once per model.
    timestamp = int(time.time() * 1000)
    for model in models:
        racing(lambda m=model: mlflow.log_metrics(metrics, timestamp=timestamp, model_id=m.model_id, dataset=dataset))
