"""MLflow Model Registry: register a good enough model, move the `champion` alias to a better one."""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError
from pipeline.params import RegisterConfig
from pipeline.serving import ARTIFACT

# The serving model (pipeline/serving.py) is the one registered: it takes what a client sends
# (28x28 images or 784-column rows) and answers digit + probabilities, which is what a
# `models:/<name>@champion` user wants. The run's `model` (pytorch flavor, logits) stays in the run.
ALIAS = "champion"
ACCURACY_TAG = "test_accuracy"


def champion_accuracy(client: MlflowClient, name: str) -> float | None:
    """Test accuracy of the version the alias points at; None when there is no champion yet."""
    try:
        version = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None  # no such model or no such alias
    return float(version.tags.get(ACCURACY_TAG, "nan"))


def serving_model_uri(client: MlflowClient, run_id: str) -> str:
    """URI of the run's logged serving model (models:/m-...), the form MLflow 3 registers."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{ARTIFACT}'"
    )
    if not found:
        raise PipelineError(f"run {run_id} has no logged model '{ARTIFACT}'; rerun the train stage")
    return found[-1].model_uri


def register_if_good(run_id: str, accuracy: float, cfg: RegisterConfig) -> str:
    """Register the run's serving model when accuracy >= cfg.min_accuracy; return what was done."""
    if accuracy < cfg.min_accuracy:
        return f"not registered: test accuracy {accuracy:.4f} is below register.min_accuracy {cfg.min_accuracy}"
    client = MlflowClient()
    try:
        best = champion_accuracy(client, cfg.name)
        version = mlflow.register_model(serving_model_uri(client, run_id), cfg.name, tags={ACCURACY_TAG: str(accuracy)})
        # NaN (a champion without the tag) compares False: then the new version takes over.
        if best is None or not accuracy <= best:
            client.set_registered_model_alias(cfg.name, ALIAS, version.version)
            before = "no champion before" if best is None else f"previous champion's {best:.4f}"
            moved = f"; alias '{ALIAS}' now points to it ({before})"
        else:
            moved = f"; '{ALIAS}' stays: its test accuracy {best:.4f} is not beaten"
    except MlflowException as e:
        raise PipelineError(f"registering {cfg.name} at {mlflow.get_tracking_uri()} failed: {e.message}") from e
    return f"registered {cfg.name} version {version.version} (test accuracy {accuracy:.4f}){moved}"
