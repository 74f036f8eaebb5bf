"""Job arrays on a real one-node Slurm: tasks run side by side, and the sweep script starts workers."""

import os
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from pipeline.sweep.study import load

from .helpers.repo import REPO
from .helpers.slurm import submit_array
from .helpers.sweeps import write_sweep

pytestmark = pytest.mark.slow
SWEEP_SCRIPT = REPO / "sweeps/slurm-array.sbatch"

# Each task sleeps 1 s between two timestamps; tasks that ran at once have overlapping intervals.
TIMED_TASK = """#!/bin/bash
start=$(date +%s.%N)
sleep 1
echo "$SLURM_ARRAY_TASK_ID $SLURM_CPUS_ON_NODE $start $(date +%s.%N)" > "task-$SLURM_ARRAY_TASK_ID.txt"
"""


def test_array_tasks_run_side_by_side_on_one_cpu_each(slurm_cluster, tmp_path: Path) -> None:
    script = tmp_path / "timed.sh"
    script.write_text(TIMED_TASK)
    status, _ = submit_array(slurm_cluster, script, [], n=2, submit_dir=tmp_path, out_dir=tmp_path / "out")
    assert status == 0
    rows = [f.read_text().split() for f in sorted((tmp_path / "out").glob("task-*.txt"))]
    assert [(task, cpus) for task, cpus, *_ in rows] == [("0", "1"), ("1", "1")]
    (start0, end0), (start1, end1) = [(float(a), float(b)) for *_, a, b in rows]
    assert max(start0, start1) < min(end0, end1), f"the two tasks ran one after the other: {rows}"


def test_a_job_array_of_two_sweep_workers_completes_every_trial_of_one_study(slurm_cluster, processed) -> None:
    """The real sweeps/slurm-array.sbatch: 2 array tasks, each a worker (one CPU, one thread) on one study."""
    write_sweep(processed, trials=6, sampler={"name": "random", "seed": 0}, pruner="none",
                params={"train.lr": {"type": "float", "low": 0.001, "high": 0.005, "log": True}})  # fmt: skip
    venv_bin = Path(sys.executable).parent  # no .venv in the submit dir: the exported PATH's python runs
    study_url, store = f"sqlite:///{processed / 'sweeps.db'}", f"sqlite:///{processed / 'mlflow.db'}"
    env = {**slurm_cluster.env, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    env.update(SWEEP_STORAGE=study_url, MLFLOW_TRACKING_URI=store)
    status, outputs = submit_array(
        slurm_cluster, SWEEP_SCRIPT, ["tiny"], n=2, submit_dir=processed, out_dir=processed / "slurm", env=env
    )
    assert status == 0, outputs
    finished = [t for t in load("tiny", study_url).trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.number for t in finished) == list(range(6))  # each trial once, all complete
    assert len({t.user_attrs["worker"] for t in finished}) == 2, outputs  # both tasks took trials
    assert {t.user_attrs["threads"] for t in finished} == {"1"}  # the task's one CPU, not the node's two
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id], "tags.sweep = 'tiny'")
    assert sorted(r.info.run_name for r in runs) == [f"tiny-{i}" for i in range(6)]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all("postgres" not in out and "Traceback" not in out for out in outputs)


def test_sweep_script_without_storage_fails_and_says_why(slurm_cluster, tmp_path: Path) -> None:
    env = {k: v for k, v in slurm_cluster.env.items() if k != "SWEEP_STORAGE"}
    status, [output] = submit_array(
        slurm_cluster, SWEEP_SCRIPT, ["fast-search"], n=1, submit_dir=REPO, out_dir=tmp_path, env=env
    )
    assert status == 2
    assert "SWEEP_STORAGE is not set" in output
