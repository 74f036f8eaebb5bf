"""DVC's queue side by side: 4 fast-recipe experiments with `dvc queue start -j 1`, with `-j 2`
and with `OMP_NUM_THREADS=1 dvc queue start -j 2`, timed in one run on one machine.

    python -m bench.queue          # about 5 minutes on 2 cores

Works in a temporary clone of this repository (its committed state) with this checkout's
data/processed; writes bench/queue_results.json. Each configuration trains other seeds, so that no
experiment is restored from DVC's run cache instead of run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bench.benchmark import cpu_model
from pipeline.common.system import cores

CONFIGS = {  # name: (jobs, extra environment)
    "-j 1": (1, {}),
    "-j 2": (2, {}),
    "OMP_NUM_THREADS=1, -j 2": (2, {"OMP_NUM_THREADS": "1"}),
}
EXPERIMENTS = 4


def sh(repo: Path, *cmd: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OMP_", "DVC_"))}
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ['PATH']}"
    result = subprocess.run(cmd, cwd=repo, env={**environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}: {result.stdout}{result.stderr}"
    return result.stdout


def queue_seconds(repo: Path, jobs: int, env: dict[str, str], seeds: list[int]) -> float:
    """Queue the experiments, start the workers, wait until all are done; the wall time from the start."""
    recipe = sh(repo, sys.executable, "-m", "pipeline.recipe", "fast").split()
    sh(repo, "dvc", "exp", "run", "--queue", *recipe, "-S", f"train.seed={','.join(map(str, seeds))}")
    start = time.perf_counter()
    sh(repo, "dvc", "queue", "start", "-j", str(jobs), **env)
    while True:
        status = sh(repo, "dvc", "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status) and "0 active, 0 idle" in status:
            break
        time.sleep(0.5)
    seconds = time.perf_counter() - start
    assert status.count("Success") >= len(seeds) and "Failed" not in status, status
    sh(repo, "dvc", "queue", "remove", "--success")
    return seconds


def main() -> None:
    source = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        sh(source, "git", "clone", "-q", str(source), str(repo))
        shutil.copytree(source / "data", repo / "data")
        sh(repo, "dvc", "commit", "-f", "-q", "download", "preprocess")  # the data in place, as `dvc pull` leaves it
        sh(repo, "git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qam", "data")
        results = {}
        for k, (name, (jobs, env)) in enumerate(CONFIGS.items()):
            seeds = [100 * k + i for i in range(EXPERIMENTS)]
            results[name] = round(queue_seconds(repo, jobs, env, seeds), 1)
            print(f"{name}: {results[name]} s for {EXPERIMENTS} experiments", flush=True)
    out = {
        "date": date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": cores(),
        "experiments": EXPERIMENTS,
        "wall_seconds": results,
        "ratios to -j 1": {name: round(s / results["-j 1"], 2) for name, s in results.items()},
    }
    print(json.dumps(out, indent=2))
    Path("bench/queue_results.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
