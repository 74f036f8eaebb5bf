"""MLflow glue: start or rejoin the run, tags, dataset input, model logging."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import re
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import mlflow
import torch
import yaml
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.data.dataset import Dataset
from mlflow.entities import ExperimentTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from pipeline import credentials
from pipeline.errors import PipelineError
from pipeline.files import write_json
from pipeline.params import MlflowConfig, ModelConfig, TrainConfig
from pipeline.serving import log_classifier, pins

T = TypeVar("T")


def flat_params(**sections: Any) -> dict[str, Any]:
    """{'train': TrainConfig(lr=..)} -> {'train.lr': ..}, the names used in params.yaml."""
    out = {}
    for section, cfg in sections.items():
        for key, value in dataclasses.asdict(cfg).items():
            out[f"{section}.{key}"] = value
    return out


def git_commit(ignore: tuple[str, ...] = ()) -> str | None:
    """The current commit, with '-dirty' when tracked files other than `ignore` differ from it."""
    # Ignore what DVC itself changes: params.yaml in an experiment (the run logs the params) and
    # the stage's own outputs, which DVC removes before the stage runs.
    exclude = [f":(exclude){path}" for path in ignore]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *exclude]
        dirty = subprocess.run(status, capture_output=True, text=True)
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
RETRY_CODES = (429, 500, 502, 503, 504)  # what MLflow's client retries too


def _reason(error: Exception, timeout: float) -> str:
    """The short cause of a failed request; MLflow's own message is a long urllib3 chain."""
    text = str(error)
    known = {
        "Timeout": f"no answer within {timeout:g} s",
        "NewConnectionError": "connection refused (is the server running, is the port right?)",
        "NameResolutionError": "unknown host name",
        "SSLError": "TLS handshake failed",
        "Connection broken": "the connection broke mid-request",
        "RemoteDisconnected": "the server closed the connection",
    }
    for marker, reason in known.items():
        if marker in text:
            return reason
    if status := re.search(r"too many (\d{3}) error responses", text):  # MLflow's retries used up
        return f"HTTP {status[1]} after {1 + int(os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'])} tries"
    return text.splitlines()[0][:200] if text else type(error).__name__


def check_tracking_server(uri: str | None = None, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail within `timeout` seconds, naming the URI, if an http(s) tracking server is down or wrong."""
    uri = uri or mlflow.get_tracking_uri()
    if urlparse(uri).scheme not in ("http", "https"):
        return  # local stores (sqlite, a folder) fail at once on their own
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # one line at the end, not each retry

    def probe(retries: int):
        # The user's credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN) come from the env.
        return http_request(
            get_default_host_creds(uri),
            PROBE_ENDPOINT,
            "GET",
            max_retries=retries,
            backoff_factor=float(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]),
            timeout=timeout,
            params={"max_results": 1},
            raise_on_status=False,
        )

    try:
        response = probe(retries=0)  # nobody there: say so at once
        if response.status_code in RETRY_CODES:  # there, but busy or failing: MLflow's bounded retries
            response = probe(retries=int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]))
    except Exception as e:  # refused, timed out, unknown host, TLS: MLflow wraps them all
        raise PipelineError(f"MLflow tracking server {uri} is unreachable: {_reason(e, timeout)}") from e
    if response.status_code in RETRY_CODES:
        tries = 1 + int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
        raise PipelineError(f"MLflow tracking server {uri} answers HTTP {response.status_code} ({tries} tries)")
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


STORE_FILE = "mlflow.db"  # MLflow's own default store, `sqlite:///mlflow.db`, kept at the repository root
ARTIFACTS_DIR = "mlruns"  # and its artifacts, beside it
DESCRIPTION = (
    "MNIST CNN trained by the DVC pipeline (download -> preprocess -> train -> evaluate). One run per "
    "`dvc repro` / `dvc exp run`, named after the DVC experiment; test metrics are linked to the logged "
    "models. Runs of one sweep share the tag `sweep`: filter with tags.sweep = '<name>'."
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


def run_name(model_cfg: ModelConfig, cfg: TrainConfig) -> str:
    """The DVC experiment's name when DVC runs one, else the settings that set runs apart and a
    random suffix (from the OS: Python's `random` is seeded, so MLflow's own names repeat)."""
    if name := os.environ.get("DVC_EXP_NAME"):
        return name
    return f"{model_cfg.arch}-nf{model_cfg.nf}-e{cfg.epochs}-b{cfg.batch_size}-lr{cfg.lr:g}-{uuid.uuid4().hex[:4]}"


def dvc_tags() -> dict[str, str]:
    """The DVC experiment that made the run: its name and the commit it started from."""
    names = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


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
        tags = dvc_tags() | ({"sweep": cfg.sweep} if cfg.sweep else {})
        if tags.get("dvc.exp_name") and active.info.run_name != name:  # `mlflow run`'s run: use the DVC name
            tags["mlflow.runName"] = name
        mlflow.set_tags(tags)
    except MlflowException as e:
        raise PipelineError(f"MLflow tracking at {mlflow.get_tracking_uri()} failed: {e.message}") from e
    with _ending(active) as run:
        yield run


@contextmanager
def _ending(active: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
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


@contextmanager
def answering(kept: str) -> Iterator[None]:
    """Turn a tracking server that stops answering (down, or errors after MLflow's bounded retries)
    into one line naming it and saying what is `kept`, instead of MLflow's traceback."""
    try:
        yield
    except MlflowException as e:
        uri = mlflow.get_tracking_uri()
        if urlparse(uri).scheme not in ("http", "https"):
            raise
        timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]))
        raise PipelineError(f"MLflow tracking server {uri} stopped answering ({_reason(e, timeout)}); {kept}") from e


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
    run = mlflow.active_run()
    models = MlflowClient().search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{model_run_id}'"
    )
    if not models:
        raise PipelineError(f"run {model_run_id} logged no model; rerun the train stage")
    # One timestamp for all: the run's own metric table then holds each value once, not once per model.
    timestamp = int(time.time() * 1000)
    for model in models:
        racing(lambda m=model: mlflow.log_metrics(metrics, timestamp=timestamp, model_id=m.model_id, dataset=dataset))


def log_model(model: torch.nn.Module, example: torch.Tensor, model_cfg: ModelConfig, step: int) -> None:
    """Log the network as `model` (pytorch flavor, logits) and `classifier` (serving, digit + probabilities)
    at `step`, the last epoch: MLflow links the run's metrics of that step to both (the Models tab)."""
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
        pip_requirements=pins("torch", "numpy"),
        step=step,
    )
    log_classifier(cpu_model, model_cfg, example=example[:, 0].numpy(), step=step)  # uint8 (B, 28, 28)
