"""The Optuna study of a sweep: where it lives, which trials count, the leaderboard, the best recipe."""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from pipeline import recipe
from pipeline.common.credentials import redact
from pipeline.common.errors import ParamsError, PipelineError
from pipeline.common.files import atomic_path
from pipeline.sweep.spec import Sweep
from pipeline.sweep.spec import configs as sweep_configs

log = logging.getLogger(__name__)
STORE_FILE = "sweeps.db"  # one machine's default study store, beside mlflow.db at the repository root
RUN_ID_ATTR = "mlflow_run_id"  # the trial's user attribute naming its MLflow run
DONE = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards the sweep's `trials`
MAX_RETRY = 2  # a trial whose worker died is run again by another worker, at most this often
# What the database says when another worker created the same tables a moment before.
CREATE_RACES = ("UNIQUE constraint failed: alembic_version", "already exists", "duplicate key value")

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, retry callback


def default_storage() -> str:
    # The repository's root as tracking.store.repo_root finds it, without importing MLflow here: the
    # `--jobs` parent and `show` stay light (4 s of imports each).
    root = Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    return f"sqlite:///{root / STORE_FILE}"


def end_stale_run(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose worker stopped beating (SIGKILL, a lost machine): end its MLflow run FAILED,
    then queue the trial again (Optuna's retry callback) for another worker."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import tags  # here too: `sweep show` and the `--jobs` parent stay light

    if run_id := trial.user_attrs.get(RUN_ID_ATTR):
        try:
            client = MlflowClient()
            failure = "the worker stopped answering (heartbeat); trial retried"
            for key, value in tags.trial_end_tags("FAIL", failure=failure).items():
                client.set_tag(run_id, key, value)
            client.set_terminated(run_id, "FAILED")
        except MlflowException as e:  # the run is best effort; the study must go on
            log.warning("could not end MLflow run %s of stale trial %d: %s", run_id, trial.number, e.message)
    log.warning("trial %d: its worker stopped answering; failed, and queued again", trial.number)
    optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)(study, trial)


def storage(url: str, heartbeat: int, tries: int = 5) -> optuna.storages.RDBStorage:
    """The study's database (SQLite on one machine, PostgreSQL or MySQL for several) with heartbeats:
    a running trial beats every `heartbeat` s; after 2x without one it is failed and retried."""
    for attempt in range(1, tries + 1):
        try:
            return optuna.storages.RDBStorage(
                url,
                # SQLite: a writer waits for another worker's write instead of failing at once.
                engine_kwargs={"connect_args": {"timeout": 60}}
                if url.startswith("sqlite")
                else {"pool_pre_ping": True},
                heartbeat_interval=heartbeat,
                grace_period=2 * heartbeat,
                heartbeat_stale_trial_callback=end_stale_run,
            )
        except Exception as e:  # bad URL, missing driver, server down: SQLAlchemy's words, on one line
            # Workers started together on a new database (a Slurm array) race to create its tables:
            # the losers find them made by the winner on the next try.
            if attempt < tries and any(race in str(e) for race in CREATE_RACES):
                time.sleep(0.2 * attempt)
                continue
            raise PipelineError(f"cannot open the study storage {redact(url)}: {str(e).splitlines()[0]}") from e
    raise AssertionError("unreachable")


def open_study(sweep: Sweep, url: str, seed: int | None, attrs: dict[str, str]) -> optuna.Study:
    """Create or join the study named after the sweep; refuse one made from another version of
    the sweep file, its base recipe or other data (`attrs`), whose trials would not compare."""
    study = optuna.create_study(
        study_name=sweep.name,
        storage=storage(url, sweep.heartbeat),
        sampler=sweep.make_sampler(seed),
        pruner=sweep.make_pruner(),
        direction=sweep.direction,
        load_if_exists=True,
    )
    for key, value in {**versions(sweep), **attrs}.items():
        found = study.user_attrs.get(key)
        if found is None:
            study.set_user_attr(key, value)  # the first worker records them; the others compare
        elif found != value:
            raise ParamsError(
                f"study {sweep.name!r} in {redact(url)} was made with another {key} ({str(found)[:12]}, "
                f"here {value[:12]}); use the same {sweep.path} and data, or a new sweep name, or delete it: "
                f"optuna delete-study --study-name {sweep.name} --storage <url>"
            )
    return study


def versions(sweep: Sweep) -> dict[str, str]:
    """The digests of the files a study's trials came from: the sweep file and its base recipe."""
    return {"sweep_file_sha256": sweep.digest} | ({"base_recipe_sha256": sweep.base_digest} if sweep.base else {})


def check_versions(study: optuna.Study, sweep: Sweep) -> None:
    """Refuse a study whose sweep file or base recipe has changed since: its best params and the new
    file's `recipe:` and `fixed:` would make a recipe that no trial ran."""
    for key, now in versions(sweep).items():
        then = study.user_attrs.get(key)
        if then is None and key == "base_recipe_sha256":  # a study from before it was recorded
            log.warning(
                "study %r does not record its base recipe: recipes/%s.yaml is not checked", sweep.name, sweep.base
            )
            continue
        if then != now:
            file = sweep.path if key == "sweep_file_sha256" else f"recipes/{sweep.base}.yaml"
            raise ParamsError(
                f"{file} changed since study {sweep.name!r} ran (sha256 {str(then)[:12]} then, {now[:12]} now); "
                f"restore it, or start a new study: copy the sweep to a new name and run that"
            )


def load(sweep_name: str, url: str) -> optuna.Study:
    """An existing study, for the leaderboard."""
    try:
        return optuna.load_study(study_name=sweep_name, storage=storage(url, heartbeat=60))
    except KeyError:
        raise ParamsError(f"no study {sweep_name!r} in {redact(url)}; start a worker first") from None


def fail_stale(study: optuna.Study) -> None:
    """Fail (and queue again) the running trials whose worker stopped beating."""
    optuna.storages.fail_stale_trials(study)


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def leaderboard(study: optuna.Study, top: int) -> list[dict[str, Any]]:
    """The finished trials, best first, then the pruned ones by their last reported value."""
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    rows = []
    for t in study.get_trials(deepcopy=False, states=DONE):
        value = t.value if t.state == TrialState.COMPLETE else _last(t)
        seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append(
            {"trial": t.number, "state": t.state.name, "value": value, "epochs": len(t.intermediate_values),
             "seconds": round(seconds, 1), **t.params, "mlflow_run": t.user_attrs.get(RUN_ID_ATTR, "")}
        )  # fmt: skip
    rows.sort(key=lambda r: (r["state"] != "COMPLETE", r["value"] is None, sign * (r["value"] or 0)))
    return rows[:top]


def _last(trial: FrozenTrial) -> float | None:
    values = trial.intermediate_values
    return values[max(values)] if values else None


def write_best_recipe(study: optuna.Study, sweep: Sweep, folder: Path = Path("recipes")) -> Path | None:
    """recipes/<sweep>-best.yaml: the base recipe with the best trial's params, each checked against
    the sweep's space and params.yaml's rules first; None while no trial has completed."""
    if count(study, TrialState.COMPLETE) == 0:
        return None
    best = study.best_trial
    sections = best_sections(best, sweep)
    threads, device = best.user_attrs.get("threads"), best.user_attrs.get("device")
    threads = threads if isinstance(threads, str) and threads.isdigit() and len(threads) < 5 else "?"
    device = device if isinstance(device, str) and recipe.DEVICE.fullmatch(device) else "?"  # no newline, no '#'
    over = f" (mean over seeds {', '.join(map(str, sweep.seeds))})" if sweep.seeds else ""
    header = (
        f"# {sweep.name}-best: trial {best.number} of sweep {sweep.name}, {sweep.objective} {best.value:.4f}{over}\n"
        f"# Written {datetime.date.today()} by `python -m pipeline.sweep` from study {sweep.name!r}; the trial\n"
        f"# ran on {device} with {threads} thread(s) (OMP_NUM_THREADS={threads} gives the same weights there).\n"
        f"# Run it: python -m pipeline.recipe {sweep.name}-best --run\n"
    )
    path = folder / f"{sweep.name}-best.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(sections, sort_keys=False))
    return path


def best_sections(best: FrozenTrial, sweep: Sweep) -> dict[str, dict[str, Any]]:
    """The best trial's recipe: its params only from the sweep's space, each a point of it, then the
    whole through params.yaml's checks and the recipe's (a study may have been written by anyone)."""
    space = {d.key: d for d in sweep.params}
    where = f"study {sweep.name!r}, trial {best.number}"
    for key, value in best.params.items():
        if key not in space:
            raise ParamsError(f"{where}: {str(key)[:60]!r} is not a key of {sweep.path}'s params; nothing written")
        if not space[key].contains(value):
            raise ParamsError(f"{where}: {key}={repr(value)[:60]} is outside {sweep.path}'s space; nothing written")
    if not math.isfinite(best.value):
        raise ParamsError(f"{where}: its value {best.value} is not a finite number; nothing written")
    sections = sweep.recipe_values({**sweep.fixed, **best.params})
    sweep_configs(sections)
    for section, values in sections.items():
        for key, value in values.items():
            recipe.check_value(f"{section}.{key}", value, where)
    return sections
