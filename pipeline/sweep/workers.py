"""Sweep workers: one process runs trials one after another until the study has its trials;
`--jobs K` starts K of them on this machine with the cores (or GPUs) divided between them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from pipeline.core.checkpoint import file_md5
from pipeline.core.runtime import pick_device, tune_malloc
from pipeline.data.datasets import read_info
from pipeline.data.splits import load_split
from pipeline.sweep import budget
from pipeline.sweep import study as studies
from pipeline.sweep.spec import Sweep
from pipeline.sweep.trial import Objective
from pipeline.tracking import inputs, provenance, store, tags

log = logging.getLogger(__name__)
# Indexes that cluster schedulers give the workers of one submission: Slurm job arrays, Kubernetes
# indexed Jobs. They keep the workers' sampler seeds apart.
ARRAY_INDEX_VARS = ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")


def worker_seed(base: int | None, local_index: int, jobs: int, trials_so_far: int) -> int | None:
    """Each worker its own sampler seed (equal seeds would propose equal first trials); a lone
    first worker keeps the sweep file's seed, so a one-worker sweep is reproducible."""
    if base is None:
        return None
    array = next((int(os.environ[v]) for v in ARRAY_INDEX_VARS if os.environ.get(v, "").isdigit()), 0)
    return base + trials_so_far + local_index + jobs * array


def work(sweep: Sweep, url: str, data: Path, local_index: int = 0, jobs: int = 1) -> None:
    """Run trials until the study holds sweep.trials complete or pruned ones (budget.run_trials)."""
    tune_malloc()
    store.connect()  # MLFLOW_TRACKING_URI, else the repository's store; a dead server fails now
    device = pick_device("auto", "the sweep's device")
    train, val = load_split(data / "train.pt"), load_split(data / "val.pt")
    md5 = file_md5(data / "train.pt")
    commit = provenance.git_commit(ignore=("params.yaml", "dvc.lock", "recipes")) or "unknown"
    study = studies.open_study(sweep, url, seed=None, attrs={"data.train_md5": md5})
    study.sampler = sweep.make_sampler(worker_seed(sweep.sampler.get("seed", 0), local_index, jobs, len(study.trials)))
    name = read_info(data, "preprocess").split_name("train")
    dataset = inputs.dataset(*train, source=str(data / "train.pt"), name=name)
    run_tags = tags.provenance_tags(md5, commit) | tags.dvc_tags()
    objective = Objective(sweep, _to(train, device), _to(val, device), dataset, device, run_tags)
    threads, where = torch.get_num_threads(), studies.redact(url)
    log.info("worker on %s with %d thread(s), study %r at %s", device, threads, sweep.name, where)
    done = budget.run_trials(study, objective, sweep.trials, sweep.max_failures)
    if path := studies.write_best_recipe(study, sweep):
        log.info("study %r done: %d trials; best trial %d, %s %.4f; wrote %s", sweep.name, done,
                 study.best_trial.number, sweep.objective, study.best_value, path)  # fmt: skip


def _to(split: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return split[0].to(device), split[1].to(device)
