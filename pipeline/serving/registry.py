"""MLflow Model Registry: register a good enough model, keep the `champion` alias on the best version.

Safe on a shared server without a lock there: every evaluation, wherever it runs, registers first
and then points the alias at the best registered version, reading the registry again after each
move until the alias stays on the best. Whichever evaluation writes last has read every version
registered before its write, so racing evaluations on several machines end on the best version.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.common.errors import PipelineError, redact
from pipeline.params import RegisterConfig
from pipeline.serving.pyfunc import ARTIFACT
from pipeline.tracking.runs import logged_models, quoted

# The serving model (pipeline/serving/pyfunc.py) is the one registered: it takes what a client sends
# (28x28 images or 784-column rows) and answers digit + probabilities, which is what a
# `models:/<name>@champion` user wants. The run's `model` (pytorch flavor, logits) stays in the run.
ALIAS = "champion"
ACCURACY_TAG = "test_accuracy"
SETTLE_ROUNDS = 10  # moves of the alias before giving up; racing evaluations settle in two or three


def accuracy_of(version: ModelVersion) -> float:
    """The version's test accuracy tag; -inf without a valid one, a finite number in [0, 1] (it never
    beats a version that has one: a tag of `inf`, written by anyone, must not keep the alias forever)."""
    try:
        value = float(version.tags.get(ACCURACY_TAG, "nan"))
    except (TypeError, ValueError):
        value = math.nan
    return value if math.isfinite(value) and 0 <= value <= 1 else -math.inf


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version the alias points at; None only when the model or the alias does not exist. Any
    other error (a timeout, HTTP 5xx, 403) is raised: it must not read as "no champion"."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(ALIAS)
    return None if version is None else client.get_model_version(name, version)


def champion_accuracy(client: MlflowClient, name: str) -> float | None:
    """Test accuracy of the version the alias points at; None when there is no champion yet."""
    version = champion(client, name)
    return None if version is None else accuracy_of(version)


def best_version(versions: list[ModelVersion]) -> ModelVersion:
    """Highest test accuracy; among equals the oldest, so that a tie never moves the alias."""
    return max(versions, key=lambda v: (accuracy_of(v), -int(v.version)))


def settle_champion(client: MlflowClient, name: str) -> ModelVersion:
    """Point the alias at the best registered version, re-reading after each move; return it."""
    for _ in range(SETTLE_ROUNDS):
        best = best_version(client.search_model_versions(f"name = {quoted(name, 'register.name')}"))
        current = champion(client, name)
        if current is not None and str(current.version) == str(best.version):
            return best
        client.set_registered_model_alias(name, ALIAS, best.version)
    raise PipelineError(f"the '{ALIAS}' alias of {name} kept moving ({SETTLE_ROUNDS} tries); run evaluate again")


def serving_model_uri(client: MlflowClient, run_id: str) -> str:
    """URI of the run's logged serving model (models:/m-...), the form MLflow 3 registers."""
    found = logged_models(client, run_id, ARTIFACT)
    if not found:
        raise PipelineError(f"run {run_id} has no logged model '{ARTIFACT}'; rerun the train stage")
    return found[-1].model_uri


@contextmanager
def one_line(name: str) -> Iterator[None]:
    """Any registry error: one line naming the model and the store, and nothing more is moved."""
    try:
        yield
    except MlflowException as e:
        where = redact(mlflow.get_registry_uri())
        raise PipelineError(f"registering {name} at {where} failed, nothing was moved: {redact(e.message)}") from e


def register_if_good(run_id: str, accuracy: float, cfg: RegisterConfig) -> str:
    """Register the run's serving model when accuracy >= cfg.min_accuracy (once: a re-evaluation
    finds its version), then keep the alias on the best version; return what was done."""
    if accuracy < cfg.min_accuracy:
        return f"not registered: test accuracy {accuracy:.4f} is below register.min_accuracy {cfg.min_accuracy}"
    client = MlflowClient()
    with one_line(cfg.name):
        before = champion(client, cfg.name)  # an unreadable champion stops here, before any write
        uri = serving_model_uri(client, run_id)
        known = [
            v for v in client.search_model_versions(f"name = {quoted(cfg.name, 'register.name')}") if v.source == uri
        ]
        if known:
            version, done = known[0], f"{cfg.name} version {known[0].version} is this model, registered before"
        else:
            version = mlflow.register_model(uri, cfg.name, tags={ACCURACY_TAG: str(accuracy)})
            done = f"registered {cfg.name} version {version.version} (test accuracy {accuracy:.4f})"
        after = settle_champion(client, cfg.name)
    if str(after.version) != str(version.version):
        return f"{done}; '{ALIAS}' stays: its test accuracy {accuracy_of(after):.4f} is not beaten"
    if before is None:
        return f"{done}; alias '{ALIAS}' now points to it (no champion before)"
    if str(before.version) == str(version.version):
        return f"{done}; alias '{ALIAS}' still points to it"
    return f"{done}; alias '{ALIAS}' now points to it (previous champion's {accuracy_of(before):.4f})"
