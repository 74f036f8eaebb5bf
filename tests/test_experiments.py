"""Many experiments: each one MLflow run in the repository's own store, well named, grouped by sweep."""

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from pipeline import train
from pipeline.params import MlflowConfig, ModelConfig, TrainConfig
from pipeline.tracking import runs, store
from pipeline.tracking.evaluation_run import evaluation_run

from .conftest import REPO, evaluations_of, run_main, set_params, train_until_checkpoint


@pytest.fixture
def dvc_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(repo root, working dir) as DVC sets them for a queued experiment: DVC_ROOT names the main
    repository, the stage runs in a temporary copy; no tracking URI is set."""
    root, copy = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmpcopy"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(root))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    return root, copy


def test_runs_land_in_the_repository_store_not_in_the_temporary_copy(dvc_copy, tmp_path) -> None:
    root, copy = dvc_copy
    assert store.connect() == f"sqlite:///{root / 'mlflow.db'}"
    with runs.start_run(MlflowConfig(experiment_name="exps"), "a") as run:
        mlflow.log_text("hello", "note.txt")
        runs.save_run_file(copy / "models/mlflow_run.json", run)
    assert (root / "mlflow.db").is_file() and not (copy / "mlflow.db").exists()
    client = MlflowClient()
    artifact = Path(client.get_run(run.info.run_id).info.artifact_uri.removeprefix("file://")) / "note.txt"
    assert artifact.read_text() == "hello" and artifact.is_relative_to(root / "mlruns")
    assert all(
        Path(e.artifact_location.removeprefix("file://")).is_relative_to(root) for e in client.search_experiments()
    )
    assert not (copy / "mlruns").exists()
    # What DVC commits holds no path of this machine: the default store is recorded as none.
    info = json.loads((copy / "models/mlflow_run.json").read_text())
    assert info["tracking_uri"] is None and info["run_name"] == "a"
    # After `dvc exp apply` in the main workspace the record still finds its run.
    os.chdir(root)
    os.environ.pop("DVC_ROOT")
    with evaluation_run(info) as evaluation:
        assert evaluation.data.tags["mlflow.parentRunId"] == run.info.run_id
    # An explicit MLFLOW_TRACKING_URI still wins.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = other
    try:
        assert store.connect() == other
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_run_names_come_from_dvc_or_the_settings_never_from_the_seeded_rng(monkeypatch) -> None:
    model, cfg = ModelConfig(arch="fast", nf=16), TrainConfig(epochs=2, batch_size=256, lr=0.02)
    names = []
    for _ in range(2):
        random.seed(42)  # what make_deterministic does; MLflow drew its names from this RNG
        names.append(runs.run_name(model, cfg))
    assert names[0] != names[1]
    assert all(re.fullmatch(r"fast-nf16-e2-b256-lr0\.02-[0-9a-f]{4}", n) for n in names), names
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-yawl")
    assert runs.run_name(model, cfg) == "lucid-yawl"


def test_dvc_experiment_tags_and_the_run_mlflow_run_made_takes_the_dvc_name(workdir, monkeypatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-yawl")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abcd")
    with runs.start_run(MlflowConfig(experiment_name="tests"), "lucid-yawl") as run:
        pass
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["dvc.exp_name"] == "lucid-yawl" and tags["dvc.baseline_rev"] == "0123abcd"
    assert run.info.run_name == "lucid-yawl"
    # `mlflow run` creates the run (MLFLOW_RUN_ID) under a random name; the stage renames it.
    made = MlflowClient().create_run(run.info.experiment_id, run_name="capable-auk-759")
    monkeypatch.setenv("MLFLOW_RUN_ID", made.info.run_id)
    with runs.start_run(MlflowConfig(experiment_name="tests"), "lucid-yawl"):
        pass
    assert MlflowClient().get_run(made.info.run_id).info.run_name == "lucid-yawl"


def test_a_sweep_tags_its_runs_and_the_experiment_says_how_to_find_them(workdir) -> None:
    cfg = MlflowConfig(experiment_name="tests", sweep="lr-grid")
    ids = []
    for name in ("a", "b"):
        with runs.start_run(cfg, name) as run:
            ids.append(run.info.run_id)
    with runs.start_run(MlflowConfig(experiment_name="tests"), "not-in-it"):
        pass
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tests")
    found = client.search_runs([experiment.experiment_id], "tags.sweep = 'lr-grid'")  # the UI's filter
    assert sorted(r.info.run_id for r in found) == sorted(ids)
    assert experiment.tags["mlflow.note.content"] == store.DESCRIPTION


WORKER = """
import sys
from pathlib import Path

import mlflow
from pipeline import train
from pipeline.tracking import inputs
from pipeline.tracking import runs
from pipeline.tracking import store
from pipeline.tracking.evaluation_run import evaluation_run
from pipeline.params import MlflowConfig

store.connect()
with runs.start_run(MlflowConfig(experiment_name="parallel", sweep="s"), f"w{sys.argv[1]}") as run:
    for step in range(1, 21):
        mlflow.log_metrics({"loss": 1 / step, "accuracy": step / 20}, step=step)
    mlflow.log_params({f"p{i}": i for i in range(20)})
    mlflow.log_text("x" * 10000, "artifact.txt")
    runs.save_run_file(Path(f"run{sys.argv[1]}.json"), run)
"""


@pytest.mark.slow
@pytest.mark.parametrize("workers", [4])
def test_parallel_stages_share_one_new_sqlite_store(tmp_path, workers) -> None:
    """Real processes at once on a store that does not exist yet (as `dvc queue start -j 4` in a
    fresh clone): each creates the store and the experiment if missing, then logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PYTHONPATH=str(REPO), DVC_ROOT=str(tmp_path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
        )
        for i in range(workers)
    ]
    errors = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)
    assert not any("database is locked" in e for e in errors)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "parallel"]
    runs = client.search_runs([experiment.experiment_id], "tags.sweep = 's'")
    assert sorted(r.info.run_name for r in runs) == [f"w{i}" for i in range(workers)]
    for run in runs:
        assert run.info.status == "FINISHED" and len(run.data.params) == 20
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 21))
        assert (
            client.download_artifacts(run.info.run_id, "artifact.txt", str(tmp_path))
            and len((tmp_path / "artifact.txt").read_text()) == 10000
        )


RACER = """
import sys, time
from pathlib import Path

import mlflow
import numpy as np
import torch
from pipeline.tracking import inputs
from pipeline.tracking import runs
from pipeline.tracking import store
from pipeline.params import MlflowConfig

me, workers, rounds = map(int, sys.argv[1:])
store.connect()
images, labels = torch.zeros(50, 1, 28, 28, dtype=torch.uint8), torch.arange(50) % 10
for r in range(rounds):
    # A barrier: every process starts logging into the round's new experiment at the same moment.
    Path(f"ready-{r}-{me}").touch()
    while len(list(Path().glob(f"ready-{r}-*"))) < workers:
        time.sleep(0.005)
    try:
        with runs.start_run(MlflowConfig(experiment_name=f"race-{r}"), f"w{me}"):
            for k in range(6):  # six first inserts a round, each a chance to collide
                inputs.log_dataset(images[k:], labels[k:], f"split{k}.pt", f"split-{k}", "training")
    except Exception:
        for later in range(r + 1, rounds):  # the others must not wait for us at the next barriers
            Path(f"ready-{later}-{me}").touch()
        raise
"""


@pytest.mark.slow
def test_parallel_runs_log_the_same_datasets_into_a_fresh_experiment_at_once(tmp_path) -> None:
    """4 real processes, 10 rounds: each round all log the same two datasets into a new experiment at
    once (the first insert of a dataset is a race; SQLite refused the loser: UNIQUE constraint)."""
    workers, rounds = 4, 10  # without the retry, some round failed in each of 3 tries
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    # The store exists first (no global tracking URI set here): the racers race on datasets, not its schema.
    MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment("race-setup")
    cmd = [sys.executable, "-c", RACER, "", str(workers), str(rounds)]
    procs = [
        subprocess.Popen(cmd[:3] + [str(i)] + cmd[4:], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        for i in range(workers)
    ]
    errors = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for r in range(rounds):
        runs = client.search_runs([client.get_experiment_by_name(f"race-{r}").experiment_id])
        assert len(runs) == workers and {r.info.status for r in runs} == {"FINISHED"}
        for run in runs:
            assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == [f"split-{k}" for k in range(6)]
        digests = {d.dataset.digest for run in runs for d in run.inputs.dataset_inputs}
        assert len(digests) == 6  # one dataset row each, shared by the runs


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_keeps_the_checkpoint_and_the_next_run_resumes_it(processed, monkeypatch) -> None:
    """`kill`, `timeout`, a batch scheduler: exit 143, one line, run KILLED; then it resumes, each epoch once."""
    set_params(processed, "train", epochs=3, batch_size=4)
    proc = train_until_checkpoint(processed)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate()[1]
    assert proc.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if "terminated" in line]
    assert lines == ["terminated (SIGTERM): ckpt.pt keeps the last complete epoch; run again to resume"], stderr
    assert "Traceback" not in stderr and not (processed / "models/model.pt").exists()
    assert "Warning" not in stderr  # nothing before the stage's own lines (MLflow's type-hint warning was)
    checkpoint = torch.load(processed / "ckpt.pt", weights_only=True)
    client = MlflowClient()
    assert client.get_run(checkpoint["run_id"]).info.status == "KILLED"

    run_main(train, monkeypatch, "--out", "models", "--checkpoint", "ckpt.pt")  # resumes, in this process
    run = client.get_run(checkpoint["run_id"])  # the same run
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3]


def test_the_models_tab_shows_test_metrics_and_the_run_system_metrics(in_trained) -> None:
    client = MlflowClient()
    run = client.get_run(json.loads((in_trained / "models/mlflow_run.json").read_text())["run_id"])
    (evaluation,) = evaluations_of(client, run.info.run_id)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted(m.name for m in models) == ["classifier", "model"]
    for model in models:
        metrics = {m.key: m for m in model.metrics}
        assert metrics["test_accuracy"].value == evaluation.data.metrics["test_accuracy"]
        assert metrics["test_accuracy"].dataset_name == "mnist-test"
        assert metrics["test_accuracy"].run_id == evaluation.info.run_id
        assert metrics["val_accuracy"].step == int(run.data.params["train.epochs"])  # the model's epoch
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["mnist-train"]
    # The evaluation's inputs: the test set and the two models it scored.
    assert [i.dataset.name for i in evaluation.inputs.dataset_inputs] == ["mnist-test"]
    linked = client.get_run(evaluation.info.run_id).inputs.model_inputs  # search_runs leaves them out
    assert {m.model_id for m in linked} == {m.model_id for m in models}
