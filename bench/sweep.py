"""Sweeps, measured in one run on one machine: adaptive search against a grid, K workers side by
side against one, and what a trial costs beyond its epochs; and a recipe's test accuracy per seed.

    python -m bench.sweep                    # search, throughput, overhead (about 10 min on 2 cores)
    python -m bench.sweep --seeds accurate   # recipes/accurate.yaml on 5 seeds: test accuracy, training time
    python -m bench.sweep --seeds best --jobs 2 --rounds 1   # 2 seeds side by side, 1 thread each

Writes bench/sweep_results.json (--seeds: bench/recipe_<name>.json). Needs data/processed (`dvc repro
preprocess`; --data for another dataset's). The search's studies and MLflow runs go to a temporary
folder; --seeds logs each seed as a run in the repository's store (or MLFLOW_TRACKING_URI), tagged
`recipe` and `recipe.seed`, so that `mlflow ui` compares them. Not a test: the numbers depend on the
machine and its load (a shared host drifts by up to 50%), so each seed records the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from statistics import median
from typing import Any

import torch
import yaml

from bench.benchmark import cpu_model
from pipeline.common.system import cores
from pipeline.core.engine import EVAL_BATCH_SIZE, build, evaluate, fit
from pipeline.core.runtime import cpu_has_native_bf16, tune_malloc
from pipeline.core.step import StepConfig
from pipeline.data.datasets import read_info
from pipeline.data.splits import load_split
from pipeline.params import PRECISIONS, MlflowConfig, configs, flatten, load_section
from pipeline.recipe import load_recipe

SEEDS = (0, 1, 2, 3, 42)
# The fast recipe's space made discrete, so that the grid can cover it: 4 x 3 x 2 = 24 points.
SPACE = {
    "train.lr": {"type": "categorical", "choices": [0.005, 0.01, 0.02, 0.04]},
    "model.nf": {"type": "categorical", "choices": [8, 16, 24]},
    "train.label_smoothing": {"type": "categorical", "choices": [0.0, 0.1]},
}
SEARCHES = {
    "tpe-median": {"sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 4},
                   "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0}},
    "grid": {"sampler": {"name": "grid", "seed": 0}, "pruner": "none"},
}  # fmt: skip


def write_sweep(folder: Path, name: str, trials: int, **settings: Any) -> None:
    body = {"recipe": "fast", "params": SPACE, "objective": "val_accuracy", "trials": trials, **settings}
    (folder / f"{name}.yaml").write_text(f"# {name} (bench/sweep.py)\n" + yaml.safe_dump(body, sort_keys=False))


def worker(folder: Path, name: str, storage: str, jobs: int) -> float:
    """`python -m pipeline.sweep run` as a user starts it; its wall time."""
    cmd = [sys.executable, "-m", "pipeline.sweep", "run", name, "--jobs", str(jobs), "--sweeps", str(folder)]
    start = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, "SWEEP_STORAGE": storage}, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    seconds = time.perf_counter() - start
    Path(f"recipes/{name}-best.yaml").unlink(missing_ok=True)  # the bench's sweeps leave no recipe behind
    return seconds


def trials_of(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage).trials


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker processes that ended
    return usage.ru_utime + usage.ru_stime


def search(folder: Path, trials: int) -> dict[str, Any]:
    """The same number of trials over the same space: TPE with median pruning against the grid."""
    out = {}
    for name, settings in SEARCHES.items():
        write_sweep(folder, name, trials, **settings)
        storage = f"sqlite:///{folder / f'{name}.db'}"
        before = cpu_seconds()
        wall = worker(folder, name, storage, jobs=1)
        done = [t for t in trials_of(storage, name) if t.state.name in ("COMPLETE", "PRUNED")]
        complete = [t.value for t in done if t.state.name == "COMPLETE"]
        epochs = sum(len(t.intermediate_values) for t in done)
        out[name] = {
            "best_val_accuracy": max(complete),
            "cpu_seconds": round(cpu_seconds() - before, 1),
            "wall_seconds": round(wall, 1),
            "trials": len(done),
            "pruned": sum(t.state.name == "PRUNED" for t in done),
            "epochs_run": epochs,
            "epochs_pruned": 2 * len(done) - epochs,  # the fast recipe trains 2 epochs
        }
        print(f"search {name}: {out[name]}", flush=True)
    return out


def throughput(folder: Path, trials: int, rounds: int) -> dict[str, Any]:
    """Trials per minute with K = 1 and K = 2 workers (rounds interleaved, each K keeping its best),
    and each trial's cost beyond its epochs (from K = 1: Optuna's trial time minus MLflow's epochs)."""
    from mlflow import MlflowClient

    write_sweep(folder, "rate", trials, sampler={"name": "random", "seed": 0}, pruner="none")
    best: dict[int, dict[str, float]] = {}
    overheads: list[float] = []
    for r in range(rounds):
        for jobs in (1, 2):
            storage = f"sqlite:///{folder / f'rate-{jobs}-{r}.db'}"
            wall = worker(folder, "rate", storage, jobs)
            done = trials_of(storage, "rate")
            first = min(t.datetime_start for t in done)
            span = (max(t.datetime_complete for t in done) - first).total_seconds()
            rate = {"wall_seconds": wall, "trials_per_minute": 60 * len(done) / wall,
                    "steady_trials_per_minute": 60 * len(done) / span}  # fmt: skip
            print(f"round {r + 1}: K={jobs}: {rate}", flush=True)
            if jobs not in best or rate["trials_per_minute"] > best[jobs]["trials_per_minute"]:
                best[jobs] = rate
            if jobs == 1:
                client = MlflowClient()
                for t in done:
                    epochs = client.get_metric_history(t.user_attrs["mlflow_run_id"], "epoch_seconds")
                    overheads.append(
                        (t.datetime_complete - t.datetime_start).total_seconds() - sum(m.value for m in epochs)
                    )
    return {
        "trials": trials,
        "K1": best[1],
        "K2": best[2],
        "K2 / K1 trials per minute": best[2]["trials_per_minute"] / best[1]["trials_per_minute"],
        "overhead_seconds_per_trial": {
            "median": round(median(overheads), 3),
            "max": round(max(overheads), 3),
            # A worker's first trial also opens the store and warms up: the steady cost is the rest's.
            "max after a worker's first trial": round(max(o for i, o in enumerate(overheads) if i % trials), 3),
        },
    }


def seed_run(name: str, seed: int, data: Path, threads: int, precision: str = "auto") -> dict[str, Any]:
    """The recipe trained on `seed` (on the CPU, `threads` threads) as the train stage trains it, and
    tested; logged as a run `<recipe>-seed<seed>` tagged `recipe` in the pipeline's experiment."""
    import mlflow

    from pipeline.core.checkpoint import file_md5
    from pipeline.tracking import inputs, provenance, store, tags

    torch.set_num_threads(threads)
    tune_malloc()
    model_cfg, cfg = configs(load_recipe(name))
    cfg = dataclasses.replace(cfg, seed=seed, device="cpu", precision=precision)
    device = torch.device("cpu")
    step = StepConfig.of(cfg, device)
    train, val, test = (load_split(data / f"{s}.pt") for s in ("train", "val", "test"))
    store.connect()
    experiment = store.experiment_id(load_section("mlflow", MlflowConfig).experiment_name)
    commit = provenance.git_commit(ignore=("params.yaml", "dvc.lock", "bench")) or "unknown"
    run_tags = tags.compute_tags(device, step.precision) | tags.provenance_tags(file_md5(data / "train.pt"), commit)
    rows: list[dict[str, float]] = []
    load = os.getloadavg()[0]
    model = build(model_cfg, cfg, device)
    started_ms = int(time.time() * 1000)  # the run's start in MLflow: its Duration is the training's
    start = time.perf_counter()
    fit(model, train, val, cfg, step, on_epoch=lambda row, _state: rows.append(row))
    seconds = time.perf_counter() - start
    result = {
        "train_seconds": seconds,
        "test_accuracy": evaluate(model, *test, batch_size=EVAL_BATCH_SIZE)["accuracy"],
        "val_accuracy": rows[-1]["val_accuracy"],
        "threads": threads,
        "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],  # 1-minute, at start and end
    }
    created = mlflow.MlflowClient().create_run(
        experiment, start_time=started_ms, tags=run_tags, run_name=f"{name}-seed{seed}"
    )
    with mlflow.start_run(run_id=created.info.run_id) as run:
        mlflow.set_tags(tags.recipe_tags(name, seed))
        mlflow.log_params(flatten(model=model_cfg, train=cfg))
        split = read_info(data, "preprocess").split_name("train")
        inputs.log_input(inputs.dataset(*train, source=str(data / "train.pt"), name=split), context="training")
        for row in rows:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        mlflow.log_metrics({"test_accuracy": result["test_accuracy"], "train_seconds": seconds}, step=cfg.epochs)
    return result | {"run_id": run.info.run_id}


def data_label(data: Path) -> str:
    """Where the data came from, without this machine's paths (the results file is committed): the
    folder under the working directory, or the dataset's name for a folder elsewhere (--data)."""
    try:
        return str(data.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return f"{read_info(data, 'preprocess').name}: the processed data of another clone (--data)"


def seeds(name: str, data: Path, rounds: int, jobs: int, precision: str = "auto") -> dict[str, Any]:
    """A recipe on each seed: test accuracy (deterministic) and training time (best of `rounds`);
    `jobs` seeds side by side, in processes of cores / jobs threads each."""
    threads = max(1, cores() // jobs)
    runs: dict[int, dict[str, Any]] = {}
    # Spawned: each process sets its thread count before torch starts its thread pool.
    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        for _ in range(rounds):
            args = [(name, seed, data, threads, precision) for seed in SEEDS]
            pending = [pool.apply_async(seed_run, a) for a in args]
            for seed, run in zip(SEEDS, (p.get() for p in pending), strict=True):  # each as it ends, in order
                if seed in runs:
                    assert run["test_accuracy"] == runs[seed]["test_accuracy"], (name, seed)  # deterministic
                    run["train_seconds"] = min(run["train_seconds"], runs[seed]["train_seconds"])
                runs[seed] = run
                print(f"{name} seed {seed}: {run}", flush=True)
    accuracies = [r["test_accuracy"] for r in runs.values()]
    return {
        "recipe": name,
        "data": data_label(data),
        "native_bf16": cpu_has_native_bf16(),
        "precision": precision,
        "jobs": jobs,
        "threads": threads,
        "test_accuracy_min": min(accuracies),
        "test_accuracy_median": median(accuracies),
        "test_accuracy_max": max(accuracies),
        "train_seconds_max": max(r["train_seconds"] for r in runs.values()),
        "seeds": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12, help="trials of each search (default 12)")
    parser.add_argument("--rate-trials", type=int, default=6, help="trials of each throughput run (default 6)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the throughput runs")
    parser.add_argument("--seeds", metavar="RECIPE", help="instead: this recipe on seeds 0, 1, 2, 3, 42")
    parser.add_argument("--only", choices=["search", "throughput"], help="one part; the other's results are kept")
    parser.add_argument("--jobs", type=int, default=1, help="--seeds: seeds trained side by side (cores divided)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="--seeds: train.precision")
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    args = parser.parse_args()
    header = {"date": date.today().isoformat(), "cpu": cpu_model(), "cores": cores(), "torch": torch.__version__}
    if args.seeds:
        results = {**header, **seeds(args.seeds, args.data, args.rounds, args.jobs, args.precision)}
        suffix = "" if args.precision == "auto" else f"_{args.precision}"
        out = Path(f"bench/recipe_{args.seeds}{suffix}.json")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
            out = Path("bench/sweep_results.json")
            results = json.loads(out.read_text()) if args.only and out.is_file() else {}
            results |= header
            if args.only != "throughput":
                results["search"] = search(folder, args.trials)
            if args.only != "search":
                results["throughput"] = throughput(folder, args.rate_trials, args.rounds)
    print(json.dumps(results, indent=2))
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
