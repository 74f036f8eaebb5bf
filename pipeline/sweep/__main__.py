"""Sweeps: `run` starts a worker (or --jobs K of them) on a study; `show` prints its leaderboard.

    python -m pipeline.sweep list                       # the sweeps in sweeps/
    python -m pipeline.sweep run fast-search --jobs 2   # K trials at a time, the cores divided
    python -m pipeline.sweep show fast-search           # the leaderboard, and recipes/<sweep>-best.yaml
    dvc exp run $(python -m pipeline.recipe fast-search-best)   # the best trial, through DVC

More machines join the same study with the same command and a shared database:
    --storage postgresql://user@host/db (or SWEEP_STORAGE), MLFLOW_TRACKING_URI=http://team-server
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pandas as pd

from pipeline import recipe
from pipeline.common import credentials
from pipeline.common.errors import ParamsError, run_stage
from pipeline.sweep import study as studies
from pipeline.sweep.spec import SWEEPS, load_sweep


def _worker(value: str) -> tuple[int, int]:
    index, _, jobs = value.partition("/")
    if not (index.isdigit() and jobs.isdigit() and int(index) < int(jobs)):
        raise argparse.ArgumentTypeError(f"expected INDEX/JOBS such as 0/2, got {value!r}")
    return int(index), int(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the sweeps in sweeps/")
    storage_help = "the Optuna study's database (default: $SWEEP_STORAGE, else sqlite:///sweeps.db at the repo root)"
    run = commands.add_parser("run", help="start a worker on the sweep's study")
    run.add_argument("name", help="a sweep in sweeps/ (sweeps/<name>.yaml)")
    run.add_argument("--jobs", type=int, default=1, help="trials side by side on this machine (default 1)")
    run.add_argument("--storage", default=os.environ.get("SWEEP_STORAGE"), help=storage_help)
    run.add_argument("--data", type=Path, default=Path("data/processed"), help="the preprocess stage's output")
    run.add_argument("--sweeps", type=Path, default=SWEEPS, help="the folder of sweep files (default sweeps/)")
    run.add_argument("--worker", type=_worker, default=None, help=argparse.SUPPRESS)  # set by --jobs
    show = commands.add_parser("show", help="print the leaderboard and write recipes/<name>-best.yaml")
    show.add_argument("name")
    show.add_argument("--storage", default=os.environ.get("SWEEP_STORAGE"), help=storage_help)
    show.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    show.add_argument("--sweeps", type=Path, default=SWEEPS, help="the folder of sweep files (default sweeps/)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("pipeline.core.engine").setLevel(logging.WARNING)  # per-epoch lines: MLflow has them

    if args.command == "list":
        for path in sorted(SWEEPS.glob("*.yaml")):
            summary = recipe.summary(path).removeprefix(f"{path.stem}: ")
            print(f"{path.stem:20s} {summary}")
        return
    sweep = load_sweep(args.name, args.sweeps)
    url = args.storage or studies.default_storage()
    credentials.remember(url)  # masked in every message from here on, its password too
    if args.command == "show":
        return show_board(sweep, url, args.top)
    if args.jobs < 1:
        raise ParamsError(f"--jobs must be an integer >= 1, got {args.jobs}")
    if args.jobs > 1 and args.worker is None:  # the parent of K workers: no torch, no MLflow here
        from pipeline.sweep import local

        local.start_local(sweep, url, args.data, args.jobs, args.sweeps)
        return show_board(sweep, url, top=5)
    from pipeline.sweep import workers  # torch, MLflow and the data: a worker's

    workers.work(sweep, url, args.data, *(args.worker or (0, 1)))


def show_board(sweep, url: str, top: int) -> None:
    study = studies.load(sweep.name, url)
    studies.check_versions(study, sweep)  # a changed file's recipe: and fixed: would mix with the old params
    done = {s.name: studies.count(study, s) for s in studies.DONE}
    running = studies.count(study, studies.TrialState.RUNNING)
    rows = studies.leaderboard(study, top)
    print(f"sweep {sweep.name}: {sum(done.values())}/{sweep.trials} trials done ({done['COMPLETE']} complete, "
          f"{done['PRUNED']} pruned), {running} running; objective {sweep.objective} ({sweep.direction})")  # fmt: skip
    if sweep.seeds:
        print(f"each trial on seeds {', '.join(map(str, sweep.seeds))}: value = their mean, epochs = theirs summed")
    if rows:
        options = ("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format)
        with pd.option_context(*options):
            print(pd.DataFrame(rows).set_index("trial").to_string())
    if path := studies.write_best_recipe(study, sweep):
        best = study.best_trial
        print(f"best: trial {best.number}, {sweep.objective} {best.value:.4f} -> {path}")
        print(f"reproduce it through DVC: python -m pipeline.recipe {sweep.name}-best --run")


if __name__ == "__main__":
    run_stage(main)
