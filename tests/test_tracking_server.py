"""A team's tracking server for real: PostgreSQL backend, proxied artifacts, the pipeline logging to it."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import mlflow
import numpy as np
import optuna
import psycopg2
import pytest
from mlflow import MlflowClient

from pipeline import download, preprocess

from .helpers import servers
from .helpers.repo import REPO, needed, sh, sh_env, synthetic_repo
from .helpers.servers import DB_USER, postgres_bin
from .helpers.stages import run_main
from .helpers.sweeps import write_sweep
from .helpers.tracking import evaluations_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[int, str]]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a password-protected `mlflow` database."""
    bindir = needed(postgres_bin(), "PostgreSQL not found in /usr/lib/postgresql/*/bin; `apt-get install postgresql`")
    with servers.postgres(bindir) as found:
        yield found


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on PostgreSQL with proxied artifacts; yields its URI and artifact folder."""
    with servers.mlflow_server(*postgres, tmp_path_factory.mktemp("server")) as found:
        yield found


def test_pipeline_logs_run_history_artifacts_and_model_to_the_server(
    workdir, monkeypatch, postgres, mlflow_server
) -> None:
    uri, artifacts = mlflow_server
    run_main(download, monkeypatch, "--out", "data/raw")
    run_main(preprocess, monkeypatch, "--raw", "data/raw", "--out", "data/processed")
    # train and evaluate as DVC runs them: fresh processes that see only the env.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # Credentials in the URI, as a team server behind basic auth takes them: they must reach no file,
    # log or message (this server has no auth and ignores them).
    secret = secrets.token_hex(8)
    env.update(MLFLOW_TRACKING_URI=uri.replace("://", f"://alice:{secret}@"), PYTHONPATH=str(REPO))
    for argv in (
        ["train", "--data", "data/processed", "--out", "models"],
        ["evaluate", "--data", "data/processed", "--models", "models", "--out", "reports"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", f"pipeline.{argv[0]}", *argv[1:]],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert secret not in result.stdout + result.stderr and uri in result.stdout + result.stderr
    assert json.loads((workdir / "models/mlflow_run.json").read_text())["tracking_uri"] == uri
    assert not [p for p in workdir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]

    run_id = json.loads((workdir / "models/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2]
    metrics = json.loads((workdir / "reports/metrics.json").read_text())
    (evaluation,) = evaluations_of(client, run_id)
    assert evaluation.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    # Proxied artifacts: the client speaks HTTP only; the server writes to --artifacts-destination.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert "history.csv" in {a.path for a in client.list_artifacts(run_id)}
    assert "evaluation/metrics.json" in {a.path for a in client.list_artifacts(evaluation.info.run_id, "evaluation")}
    assert list(artifacts.rglob("history.csv")) and list(artifacts.rglob("confusion_matrix.png"))
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted(m.name for m in models) == ["classifier", "model"]
    assert {m.source_run_id for m in models} == {run_id}

    # The model comes back from the server and predicts.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert model.predict(np.zeros((2, 1, 28, 28), dtype=np.float32)).shape == (2, 10)

    # And the run really lives in PostgreSQL.
    pg_port, password = postgres
    with closing(
        psycopg2.connect(host="127.0.0.1", port=pg_port, user=DB_USER, password=password, dbname="mlflow")
    ) as c:
        cursor = c.cursor()
        cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cursor.fetchall() == [("FINISHED",)]


def study_trials(url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="tiny", storage=url).trials
    except KeyError:  # not created yet
        return []


def test_two_clones_share_a_postgresql_study_and_the_server_and_a_killed_worker_loses_nothing(
    tmp_path, monkeypatch, postgres, mlflow_server
) -> None:
    """Two workers, each in its own clone (as on two machines), on one PostgreSQL study and one real
    `mlflow server`; one is SIGKILLed mid-trial. The other fails that trial once its heartbeats stop,
    ends its MLflow run FAILED and runs it again: the study still reaches its trials, each complete once."""
    uri, _ = mlflow_server
    pg_port, password = postgres
    with closing(
        psycopg2.connect(host="127.0.0.1", port=pg_port, user=DB_USER, password=password, dbname="postgres")
    ) as c:
        c.autocommit = True
        c.cursor().execute("CREATE DATABASE optuna")
    study_url = f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{pg_port}/optuna"  # the password from PGPASSWORD
    (tmp_path / "a").mkdir()
    a = synthetic_repo(tmp_path / "a")
    monkeypatch.chdir(a)
    run_main(download, monkeypatch, "--out", "data/raw")
    run_main(preprocess, monkeypatch, "--raw", "data/raw", "--out", "data/processed")
    sh(tmp_path, "git", "clone", "-q", str(a), "b")
    b = tmp_path / "b"
    shutil.copytree(a / "data", b / "data")  # `dvc pull` on a real second machine
    for clone in (a, b):  # 4 trials of 30 epochs (a few seconds each), heartbeat 1 s: stale after 2 s
        write_sweep(clone, trials=4, fixed={"train.epochs": 30}, pruner="none", sampler={"name": "random", "seed": 0},
                    params={"train.lr": {"type": "float", "low": 0.001, "high": 0.005, "log": True}})  # fmt: skip
    env = sh_env(MLFLOW_TRACKING_URI=uri, PGPASSWORD=password, SWEEP_STORAGE=study_url, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pipeline.sweep", "run", "tiny"]
    workers = {
        name: subprocess.Popen(cmd, cwd=clone, env=env, stderr=subprocess.PIPE, text=True)
        for name, clone in (("a", a), ("b", b))
    }
    victim = f":{workers['b'].pid}"
    deadline = time.monotonic() + 180
    while not any(
        t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(victim)
        for t in study_trials(f"postgresql+psycopg2://{DB_USER}:{password}@127.0.0.1:{pg_port}/optuna")
    ):
        assert workers["b"].poll() is None and time.monotonic() < deadline, workers["b"].stderr.read()
        time.sleep(0.1)
    workers["b"].kill()  # SIGKILL: no handler runs, nothing ends its run or its trial
    workers["b"].wait()
    _, err = workers["a"].communicate(timeout=300)
    assert workers["a"].returncode == 0, err
    assert password not in err

    trials = study_trials(f"postgresql+psycopg2://{DB_USER}:{password}@127.0.0.1:{pg_port}/optuna")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    (killed,) = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert killed.user_attrs["worker"].endswith(victim) and len(complete) == 4
    assert [t.system_attrs.get("failed_trial") for t in complete].count(killed.number) == 1  # run again, once
    assert "its worker stopped answering" in err
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.sweep = 'tiny'")
    status = {"COMPLETE": "FINISHED", "FAIL": "FAILED"}
    assert sorted(r.info.run_name for r in runs) == sorted(f"tiny-{t.number}" for t in trials)
    for run in runs:  # each MLflow run ended as its trial did; none left RUNNING
        trial = trials[int(run.data.tags["sweep.trial"])]
        assert run.info.status == status[trial.state.name], (run.info.run_name, trial.state)
        assert run.data.tags["sweep.state"] == trial.state.name
