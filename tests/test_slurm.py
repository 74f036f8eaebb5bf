"""Job arrays on a real one-node Slurm: tasks run side by side, and the sweep script starts workers."""

import json
import os
import sys
from pathlib import Path

import pytest

from . import slurm
from .conftest import REPO
from .slurm import submit_array

pytestmark = pytest.mark.slow
slurm_cluster = slurm.slurm_cluster  # the fixture, here by name (an import would trip ruff's F811)
SWEEP_SCRIPT = REPO / "sweeps/slurm-array.sbatch"

# Each task sleeps 1 s between two timestamps; tasks that ran at once have overlapping intervals.
TIMED_TASK = """#!/bin/bash
start=$(date +%s.%N)
sleep 1
echo "$SLURM_ARRAY_TASK_ID $SLURM_CPUS_ON_NODE $start $(date +%s.%N)" > "task-$SLURM_ARRAY_TASK_ID.txt"
"""
# Stands in for the real worker: reports what `python -m pipeline.sweep ...` was started with.
STAND_IN_WORKER = """import json, os, sys
env = {k: os.environ.get(k) for k in ("SLURM_ARRAY_TASK_ID", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS")}
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "python": sys.executable, **env}))
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


def test_sweep_script_starts_the_worker_in_the_submit_dir(slurm_cluster, tmp_path: Path) -> None:
    repo = tmp_path / "repo"  # no .venv in it: the `python` on the exported PATH must run the worker
    (repo / "pipeline/sweep").mkdir(parents=True)
    (repo / "pipeline/__init__.py").touch()
    (repo / "pipeline/sweep/__init__.py").touch()
    (repo / "pipeline/sweep/__main__.py").write_text(STAND_IN_WORKER)
    venv_bin = Path(sys.executable).parent
    env = {**slurm_cluster.env, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    env.update(SWEEP_STORAGE="postgresql://u@db/optuna", MLFLOW_TRACKING_URI="http://mlflow:5000")
    args = ["fast-search", "--jobs", "1"]
    status, outputs = submit_array(
        slurm_cluster, SWEEP_SCRIPT, args, n=2, submit_dir=repo, out_dir=tmp_path / "out", env=env
    )
    assert status == 0, outputs
    runs = [json.loads(out.splitlines()[-1]) for out in outputs]
    assert [r["SLURM_ARRAY_TASK_ID"] for r in runs] == ["0", "1"]
    for run in runs:
        assert run["argv"] == ["run", "fast-search", "--storage", "postgresql://u@db/optuna", "--jobs", "1"]
        assert run["cwd"] == str(repo)  # not the job's --chdir: the script cds to $SLURM_SUBMIT_DIR
        assert run["python"] == str(venv_bin / "python")
        assert run["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert run["OMP_NUM_THREADS"] == "1"  # the task's one CPU, not the node's two


def test_sweep_script_without_storage_fails_and_says_why(slurm_cluster, tmp_path: Path) -> None:
    env = {k: v for k, v in slurm_cluster.env.items() if k != "SWEEP_STORAGE"}
    status, [output] = submit_array(
        slurm_cluster, SWEEP_SCRIPT, ["fast-search"], n=1, submit_dir=REPO, out_dir=tmp_path, env=env
    )
    assert status == 2
    assert "SWEEP_STORAGE is not set" in output
