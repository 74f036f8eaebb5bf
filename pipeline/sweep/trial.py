"""One trial: the train stage's computation (engine.build, engine.fit) on the sampled params,
tracked as one MLflow run `<sweep>-<trial number>`, reporting each epoch to Optuna's pruner."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import statistics
from typing import Any

import mlflow
import optuna
import torch
from mlflow.data.dataset import Dataset

from pipeline.common.errors import ParamsError
from pipeline.core.engine import Split, TrainingDiverged, build, fit
from pipeline.core.step import StepConfig
from pipeline.params import MlflowConfig, ModelConfig, TrainConfig, flatten, load_section
from pipeline.sweep.budget import one_line
from pipeline.sweep.spec import Sweep
from pipeline.sweep.study import RUN_ID_ATTR
from pipeline.tracking import inputs, store, tags

log = logging.getLogger(__name__)


class Objective:
    """Called by Optuna once per trial, in a worker that loaded the data once."""

    def __init__(
        self, sweep: Sweep, train: Split, val: Split, dataset: Dataset, device: torch.device, origin: dict[str, str]
    ) -> None:
        """`origin`: the worker's tags.provenance_tags and tags.dvc_tags, on each trial's run."""
        self.sweep, self.train, self.val, self.dataset, self.device = sweep, train, val, dataset, device
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.origin = origin
        # The pipeline's experiment: `tags.sweep = '<name>'` picks the sweep out of it in `mlflow ui`.
        self.experiment_id = store.experiment_id(load_section("mlflow", MlflowConfig).experiment_name)

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            model_cfg, cfg = self.sweep.configs(self.sweep.overrides(trial))
        except ParamsError as e:  # a point of the space that params.yaml's checks refuse
            raise optuna.TrialPruned(f"invalid params: {e}") from None
        step = StepConfig.of(cfg, self.device)
        run_tags = {**self.origin, **tags.compute_tags(self.device, step.precision)}
        run_tags |= tags.trial_tags(self.sweep.name, self.worker, trial.number)
        name = f"{self.sweep.name}-{trial.number}"
        run = mlflow.start_run(experiment_id=self.experiment_id, run_name=name, tags=run_tags)
        attrs = {RUN_ID_ATTR: run.info.run_id, "threads": run_tags["threads"], "device": str(self.device)}
        for key, value in {**attrs, "worker": self.worker}.items():
            trial.set_user_attr(key, value)
        status, state, diverged, failure = "FAILED", "FAIL", False, None
        try:
            mlflow.log_params(flatten(model=model_cfg, train=cfg))
            inputs.log_input(self.dataset, context="training")
            if not self.sweep.seeds:  # the trial's own run holds its epochs
                value = self.train_one(trial, model_cfg, cfg, first_step=0)
            else:  # a nested run per seed; the trial's value is their mean
                value = self.train_seeds(trial, model_cfg, cfg, name, run_tags)
            status, state = "FINISHED", "COMPLETE"
            return value
        except optuna.TrialPruned:
            status, state = "KILLED", "PRUNED"  # stopped early on purpose: KILLED is how the UI shows it
            raise
        except TrainingDiverged as e:  # a learning rate too high is an answer, not a broken worker
            status, state, diverged = "KILLED", "PRUNED", True
            raise optuna.TrialPruned(str(e)) from None
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except Exception as e:  # CUDA out of memory, a bad batch: this trial fails, the worker goes on
            failure = one_line(e)
            raise
        finally:
            mlflow.set_tags(tags.trial_end_tags(state, diverged=diverged, failure=failure))
            mlflow.end_run(status=status)

    def train_seeds(
        self, trial: optuna.Trial, model_cfg: ModelConfig, cfg: TrainConfig, name: str, run_tags: dict[str, str]
    ) -> float:
        """Train on each of the sweep's seeds, each in a nested run `<name>-seed<s>`; the mean of
        their objective, logged with its min and max in the trial's run."""
        values = []
        for i, seed in enumerate(self.sweep.seeds):
            seeded = dataclasses.replace(cfg, seed=seed)
            tags_ = run_tags | {"sweep.seed": str(seed)}
            mlflow.start_run(experiment_id=self.experiment_id, run_name=f"{name}-seed{seed}", nested=True, tags=tags_)
            ended = "KILLED"  # by hand: a `with` block would end it FAILED when its trial is pruned
            try:
                mlflow.log_params(flatten(model=model_cfg, train=seeded))
                values.append(self.train_one(trial, model_cfg, seeded, first_step=i * cfg.epochs))
                ended = "FINISHED"
            finally:
                mlflow.end_run(status=ended)
            log.info("trial %d, seed %d: %s %.4f", trial.number, seed, self.sweep.objective, values[-1])
        objective, mean = self.sweep.objective, statistics.fmean(values)
        mlflow.log_metrics({objective: mean, f"{objective}_min": min(values), f"{objective}_max": max(values)})
        return mean

    def train_one(self, trial: optuna.Trial, model_cfg: ModelConfig, cfg: TrainConfig, first_step: int) -> float:
        """Train on cfg.seed in the active run, each epoch reported to the pruner as step
        first_step + epoch (a seed's epochs after the seeds before it); the last epoch's objective."""
        model = build(model_cfg, cfg, self.device)

        def on_epoch(row: dict[str, float], _state: dict[str, Any]) -> None:
            epoch = int(row["epoch"])
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            value = row[self.sweep.objective]
            trial.report(value, first_step + epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"after epoch {epoch} of seed {cfg.seed}: {self.sweep.objective} {value:.4f}")

        return fit(model, self.train, self.val, cfg, StepConfig.of(cfg, self.device), on_epoch=on_epoch)[-1][
            self.sweep.objective
        ]
