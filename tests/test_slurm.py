"""Job arrays on a real one-node Slurm: tasks run side by side."""

from pathlib import Path

import pytest

from . import slurm
from .slurm import submit_array

pytestmark = pytest.mark.slow
slurm_cluster = slurm.slurm_cluster  # the fixture, here by name (an import would trip ruff's F811)

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
