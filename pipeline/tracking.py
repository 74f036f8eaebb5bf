"""MLflow glue: start or rejoin the run, tags, dataset input, model logging."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import torch
import yaml
from mlflow.models import infer_signature
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from pipeline.errors import PipelineError
from pipeline.files import write_json
from pipeline.params import ModelConfig
from pipeline.serving import log_classifier


def flat_params(**sections: Any) -> dict[str, Any]:
    """{'train': TrainConfig(lr=..)} -> {'train.lr': ..}, the names used in params.yaml."""
    out = {}
    for section, cfg in sections.items():
        for key, value in dataclasses.asdict(cfg).items():
            out[f"{section}.{key}"] = value
    return out


def git_commit() -> str | None:
    """The current commit, with '-dirty' when the work tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def dvc_out_hash(path: str, lock_file: Path = Path("dvc.lock")) -> str | None:
    """The hash DVC recorded in dvc.lock for the output at `path`, if any."""
    if not lock_file.is_file():
        return None
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5")
    return None


# MLflow's own defaults retry a failed request 7 times with exponential backoff and wait 120 s
# for each answer: minutes of silence when the server dies mid-run. Fewer, shorter tries turn
# that into an error in seconds; values the user exported still win (setdefault).
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",  # per request; a model upload on a slow link needs some
}
PROBE_TIMEOUT = 5.0  # seconds; a healthy server answers one search in milliseconds
PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"


def _reason(error: Exception, timeout: float) -> str:
    """The short cause of a failed request; MLflow's own message is a long urllib3 chain."""
    text = str(error)
    known = {
        "Timeout": f"no answer within {timeout:g} s",
        "NewConnectionError": "connection refused (is the server running, is the port right?)",
        "NameResolutionError": "unknown host name",
        "SSLError": "TLS handshake failed",
    }
    for marker, reason in known.items():
        if marker in text:
            return reason
    return text.splitlines()[0][:200] if text else type(error).__name__


def check_tracking_server(uri: str | None = None, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail within `timeout` seconds, naming the URI, if an http(s) tracking server is down or wrong."""
    uri = uri or mlflow.get_tracking_uri()
    if urlparse(uri).scheme not in ("http", "https"):
        return  # local stores (sqlite, a folder) fail at once on their own
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        # The user's credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN) come from the env.
        response = http_request(
            get_default_host_creds(uri),
            PROBE_ENDPOINT,
            "GET",
            max_retries=0,
            timeout=timeout,
            params={"max_results": 1},
            raise_on_status=False,
        )
    except Exception as e:  # refused, timed out, unknown host, TLS: MLflow wraps them all
        raise PipelineError(f"MLflow tracking server {uri} is unreachable: {_reason(e, timeout)}") from e
    if response.status_code in (401, 403):
        raise PipelineError(
            f"MLflow tracking server {uri} refused the credentials (HTTP {response.status_code}); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    try:
        ok = response.status_code == 200 and isinstance(response.json(), dict)
    except ValueError:  # an HTML page: some other web server answers at this address
        ok = False
    if not ok:
        raise PipelineError(
            f"{uri} does not answer as an MLflow tracking server "
            f"(GET {PROBE_ENDPOINT} gave HTTP {response.status_code}); check MLFLOW_TRACKING_URI"
        )


@contextmanager
def start_run(experiment_name: str, run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Reopen `run_id`, join the run `mlflow run` made (MLFLOW_RUN_ID), or start one in the experiment."""
    try:
        if run_id := run_id or os.environ.get("MLFLOW_RUN_ID"):
            active = mlflow.start_run(run_id=run_id)
        else:
            mlflow.set_experiment(experiment_name)
            active = mlflow.start_run()
    except mlflow.exceptions.MlflowException as e:
        raise PipelineError(f"MLflow tracking at {mlflow.get_tracking_uri()} failed: {e}") from e
    with _ending(active) as run:
        yield run


@contextmanager
def _ending(active: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    """End the run FINISHED, or KILLED on Ctrl-C, or FAILED on any other error."""
    with active as run:
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            raise


@contextmanager
def resume_run(run_file: Path) -> Iterator[mlflow.ActiveRun]:
    """Reopen the run that train recorded in `run_file`, or the one `mlflow run` made."""
    if not run_file.is_file():
        raise PipelineError(f"{run_file} not found; run the train stage first")
    info = json.loads(run_file.read_text())
    if "MLFLOW_TRACKING_URI" not in os.environ:
        mlflow.set_tracking_uri(info["tracking_uri"])
    check_tracking_server()
    # Under `mlflow run` its run is the one the user looks at: log there even when the model
    # came from an earlier run (evaluate alone, or train restored from DVC's cache), and link it.
    run_id = os.environ.get("MLFLOW_RUN_ID") or info["run_id"]
    try:
        active = mlflow.start_run(run_id=run_id)
    except mlflow.exceptions.MlflowException as e:
        raise PipelineError(f"cannot reopen MLflow run {run_id} at {mlflow.get_tracking_uri()}: {e}") from e
    with _ending(active) as run:
        if run_id != info["run_id"]:
            mlflow.set_tag("model_run_id", info["run_id"])
        yield run


def save_run_file(path: Path, run: mlflow.ActiveRun) -> None:
    """Record the run id and tracking URI for the evaluate stage."""
    write_json(
        path,
        {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        },
    )


def log_dataset(images: torch.Tensor, labels: torch.Tensor, source: str, name: str) -> None:
    """Log the training data as an MLflow dataset input (digest, schema, source path)."""
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that a path is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_numpy(features=images.numpy(), targets=labels.numpy(), source=source, name=name)
    mlflow.log_input(dataset, context="training")


def log_model(model: torch.nn.Module, example: torch.Tensor, model_cfg: ModelConfig) -> None:
    """Log the network as `model` (pytorch flavor, logits) and `classifier` (serving, digit + probabilities)."""
    # A CPU copy in the default memory layout: training may run on CUDA and in channels_last.
    cpu_model = copy.deepcopy(model).to(device="cpu", memory_format=torch.contiguous_format).eval()
    x = example.float().numpy()  # (B, 1, 28, 28) raw pixels, B >= 2
    with torch.no_grad():
        y = cpu_model(example.float()).numpy()
    # pt2 (torch.export) on purpose: the archive holds a traced graph and tensors, so
    # `mlflow.pyfunc.load_model` and `mlflow models serve` load it without our code on the path
    # and without allowing pickle deserialization (the "pickle" format needs both). torch.export
    # traces on the CPU copy with this numpy example; a batch of >= 2 keeps the batch dim dynamic.
    mlflow.pytorch.log_model(
        cpu_model,
        name="model",
        serialization_format="pt2",
        signature=infer_signature(x, y),
        input_example=x,
        pip_requirements=model_requirements(),
    )
    log_classifier(cpu_model, model_cfg, example=example[:, 0].numpy())  # uint8 (B, 28, 28)


def model_requirements() -> list[str]:
    """Exact pins to serve the pt2 model: torch and numpy (MLflow adds itself)."""
    # Given, not inferred: inference loads the model in a subprocess (~25 s a run on 2 cores) and
    # drags in whatever was imported (tqdm, pandas). "+cu130"-style local tags are not on PyPI.
    return [f"torch=={version('torch').split('+')[0]}", f"numpy=={version('numpy')}"]
