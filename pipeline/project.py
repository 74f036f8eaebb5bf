"""`mlflow run`'s main entry point: the pipeline as one DVC experiment named like the MLflow run,
using the team's cache, then pushed back where the team sees it.

With a default DVC remote, the stages whose params, code and data anyone pushed before are restored
from its run-cache instead of run (docs/caching.md); the MLflow run then names the run that trained
the model (tag `model_run_id`) and carries its test metrics. With a git remote `origin` (MLflow's
clone of a git URI has one) the experiment is pushed there, and its outputs and run-cache to the DVC
remote: `dvc exp show` on the team's machines lists it, `dvc exp pull` brings its model. A push that
fails is one warning, not a failed run: what was trained is logged in MLflow already.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.utils.time import get_current_time_millis

from pipeline.common.credentials import without_credentials
from pipeline.common.errors import PipelineError, run_stage
from pipeline.tracking import store, tags

log = logging.getLogger("pipeline.project")
RUN_FILE, METRICS_FILE = Path("models/mlflow_run.json"), Path("reports/metrics.json")  # dvc.yaml's outputs


def output(*cmd: str) -> str | None:
    """What a command printed, or None where it failed or printed nothing."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def remotes() -> tuple[str | None, str | None]:
    """The URL of the git remote `origin` and the name of the default DVC remote, where set."""
    return output("git", "remote", "get-url", "origin"), output("dvc", "remote", "default")


def check(*cmd: str) -> None:
    """Run a command, its output to our terminal; stop with one line if it fails."""
    if (code := subprocess.run(cmd).returncode) != 0:
        raise PipelineError(f"`{' '.join(cmd)}` failed (exit {code})")


def team_cache(dvc_remote: str | None) -> bool:
    """Whether to run with the team's cache: a default DVC remote whose run-cache can be fetched now.
    One that cannot (unreachable, refused, no credentials) is one warning, and the pipeline runs
    without it: `dvc exp run --pull` would stop at it before any stage."""
    if dvc_remote is None:
        return False
    from dvc.repo import Repo  # the fetch that `dvc exp run --pull` starts with, by DVC itself

    try:
        with Repo() as repo:
            repo.stage_cache.pull(None)
    except Exception as e:  # any remote's error, in DVC's words, on one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("DVC remote '%s' cannot be read (%s): running without the team's cache", dvc_remote, reason)
        return False
    return True


def run_experiment(name: str, sets: list[str], pull: bool, force: bool) -> None:
    """The data stages as needed; train and evaluate restored from the run-cache unless `force`."""
    pulling = ["--pull"] if pull else []  # the team's data and runs, from the DVC remote
    if force:
        check("dvc", "repro", *pulling, "preprocess")
        check("dvc", "exp", "run", "-n", name, "--force", "--downstream", "train", *sets)
    else:
        check("dvc", "exp", "run", *pulling, "-n", name, *sets)


def note_cache_hit(run_id: str, name: str) -> None:
    """If train was restored from DVC's run-cache (the run file names another run), make this run
    say so: the run that trained the model, and its test metrics, as a row of the runs table."""
    trained_by = json.loads(RUN_FILE.read_text())["run_id"]
    if trained_by == run_id:
        return
    client = MlflowClient()
    run_tags = [RunTag(key, value) for key, value in tags.cache_hit_tags(name, trained_by).items()]
    metrics = []
    if "test_accuracy" not in client.get_run(run_id).data.metrics:  # evaluate did not run into it
        now = get_current_time_millis()
        metrics = [Metric(key, value, now, 0) for key, value in json.loads(METRICS_FILE.read_text()).items()]
    client.log_batch(run_id, metrics=metrics, tags=run_tags, synchronous=True)
    log.info("restored from DVC's run-cache: nothing trained; MLflow run %s trained this model", trained_by)


def push(name: str, origin: str | None, dvc_remote: str | None) -> None:
    """Push the experiment to git `origin`, its outputs and run-cache to the DVC remote; a refusal
    is one warning (the MLflow run holds the model either way)."""
    here = Path.cwd()
    if origin is None:
        log.info("no git remote 'origin': experiment %s stays in %s", name, here)
        return
    cache = ["--run-cache"] if dvc_remote else ["--no-cache"]
    cmd = ["dvc", "exp", "push", *cache, "origin", name]
    result = subprocess.run(cmd, capture_output=True, text=True)
    where = without_credentials(origin) + (f" and DVC remote '{dvc_remote}'" if dvc_remote else "")
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = lines[-1].removeprefix("ERROR: ").strip() if lines else f"exit {result.returncode}"  # logs redact
        log.warning(
            "could not push experiment %s to %s: %s. It stays in %s: `%s` there when the remote takes it",
            *(name, where, reason, here, " ".join(cmd)),
        )
        return
    log.info("pushed experiment %s to %s", name, where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE", help="as dvc exp run -S")
    parser.add_argument("--name", help="the DVC experiment's name (default: the MLflow run's, MLFLOW_RUN_ID)")
    parser.add_argument("--push", choices=("true", "false"), default="true", help="push the experiment back")
    parser.add_argument("--force", choices=("true", "false"), default="false", help="train even on a cache hit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        store.connect()
        name = args.name or MlflowClient().get_run(run_id).info.run_name
    elif not (name := args.name):
        raise PipelineError("no experiment name: run under `mlflow run` (MLFLOW_RUN_ID) or pass --name")
    origin, dvc_remote = remotes()
    sets = [flag for value in args.set_param for flag in ("-S", value)]
    run_experiment(name, sets, pull=team_cache(dvc_remote), force=args.force == "true")
    if run_id:
        note_cache_hit(run_id, name)
    if args.push == "true":
        push(name, origin, dvc_remote)


if __name__ == "__main__":
    run_stage(main)
