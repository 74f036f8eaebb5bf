"""DVC's run-cache, measured: a cold experiment, the same again, another one, going back to the
first, and a teammate's run of it from the team's remote; the wall time and trainings of each.

    python -m bench.cache          # about 2 minutes on 2 cores

Works in temporary clones of this repository (its committed state) with this checkout's data/
(`make repro` or `dvc repro preprocess` first), the `fast` recipe, a bare git origin, a DVC remote
in a local folder and one tracking store that both clones log to; writes bench/cache_results.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bench.benchmark import cpu_model
from pipeline.common.system import cores

TRAINED = "Running stage 'train'"


def sh(repo: Path, *cmd: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ['PATH']}"
    for who in ("AUTHOR", "COMMITTER"):  # experiments are git commits
        environ |= {f"GIT_{who}_NAME": "bench", f"GIT_{who}_EMAIL": "bench@localhost"}
    result = subprocess.run(cmd, cwd=repo, env={**environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}: {result.stdout}{result.stderr}"
    return result.stdout + result.stderr


def timed(repo: Path, *cmd: str, **env: str) -> dict:
    """Wall seconds of a command, and how many trainings it ran."""
    start = time.perf_counter()
    out = sh(repo, *cmd, **env)
    return {"seconds": round(time.perf_counter() - start, 1), "trainings": out.count(TRAINED)}


def team(root: Path, source: Path) -> Path:
    """Alice's clone with this checkout's data committed, a DVC remote and a bare origin."""
    alice = root / "alice"
    sh(source, "git", "clone", "-q", str(source), str(alice))
    shutil.copytree(source / "data", alice / "data")
    sh(alice, "dvc", "commit", "-f", "-q", "download", "preprocess")  # the data in place, as `dvc pull` leaves it
    sh(alice, "dvc", "remote", "add", "--default", "team", str(root / "dvc-remote"))
    sh(alice, "git", "commit", "-qam", "data and the team's DVC remote")
    sh(alice, "dvc", "push", "-q")  # the data, as a team's remote holds it
    sh(root, "git", "clone", "-q", "--bare", str(alice), str(root / "origin.git"))
    sh(alice, "git", "remote", "set-url", "origin", str(root / "origin.git"))
    return alice


def main() -> None:
    source = Path.cwd()
    assert (source / "data/processed/train.pt").is_file(), "no data/: run `dvc repro preprocess` first"
    recipe = sh(source, sys.executable, "-m", "pipeline.recipe", "fast").split()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'team.db'}"}  # the team's tracking store
        alice = team(root, source)
        run = ["dvc", "exp", "run", *recipe]
        rows["cold experiment"] = timed(alice, *run, "-n", "cold", **store)
        rows["the same again"] = timed(alice, *run, "-n", "again", **store)
        rows["another (train.lr=0.01)"] = timed(alice, *run, "-n", "other", "-S", "train.lr=0.01", **store)
        rows["going back to the first"] = timed(alice, *run, "-n", "back", **store)
        rows["push (dvc exp push --run-cache)"] = timed(alice, "dvc", "exp", "push", "--run-cache", "origin", "cold")
        bob = root / "bob"
        sh(root, "git", "clone", "-q", str(root / "origin.git"), str(bob))
        rows["a teammate's, from the remote"] = timed(bob, "dvc", "exp", "run", "--pull", *recipe, "-n", "bob", **store)
        same = [json.loads((r / "models/mlflow_run.json").read_text())["run_id"] for r in (alice, bob)]
        assert same[0] == same[1], same  # bob's experiment names alice's MLflow run
    cold = rows["cold experiment"]["seconds"]
    for row in rows.values():
        row["ratio to cold"] = round(row["seconds"] / cold, 2)
    out = {"date": date.today().isoformat(), "cpu": cpu_model(), "cores": cores(), "recipe": "fast", "rows": rows}
    print(json.dumps(out, indent=2))
    Path("bench/cache_results.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
