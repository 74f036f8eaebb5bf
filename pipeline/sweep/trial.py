"""One trial: the train stage's computation (engine.build, engine.fit) on the sampled params,
tracked as one MLflow run `<sweep>-<trial number>`, reporting each epoch to Optuna's pruner."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import mlflow
import optuna
import torch
from mlflow.data.dataset import Dataset

from pipeline.common.errors import ParamsError
from pipeline.core.engine import Split, TrainingDiverged, build, fit
from pipeline.core.runtime import autocast_dtype, device_tags
from pipeline.params import MlflowConfig, load_section
from pipeline.sweep.spec import Sweep
from pipeline.sweep.study import RUN_ID_ATTR
from pipeline.tracking import datasets, provenance, store

log = logging.getLogger("pipeline.sweep")


class Objective:
    """Called by Optuna once per trial, in a worker that loaded the data once."""

    def __init__(
        self, sweep: Sweep, train: Split, val: Split, dataset: Dataset, device: torch.device, tags: dict[str, str]
    ) -> None:
        self.sweep, self.train, self.val, self.dataset, self.device = sweep, train, val, dataset, device
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.tags = {**tags, **device_tags(device), "sweep": sweep.name, "sweep.worker": self.worker}
        # The pipeline's experiment: `tags.sweep = '<name>'` picks the sweep out of it in `mlflow ui`.
        self.experiment_id = store.experiment_id(load_section("mlflow", MlflowConfig).experiment_name)

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            model_cfg, cfg = self.sweep.configs(self.sweep.overrides(trial))
        except ParamsError as e:  # a point of the space that params.yaml's checks refuse
            raise optuna.TrialPruned(f"invalid params: {e}") from None
        precision = "bf16" if autocast_dtype(cfg.precision, self.device) else "fp32"
        tags = {**self.tags, "precision": precision, "sweep.trial": str(trial.number), "sweep.state": "RUNNING"}
        name = f"{self.sweep.name}-{trial.number}"
        run = mlflow.start_run(experiment_id=self.experiment_id, run_name=name, tags=tags)
        attrs = {RUN_ID_ATTR: run.info.run_id, "threads": tags["threads"], "device": str(self.device)}
        for key, value in {**attrs, "worker": self.worker}.items():
            trial.set_user_attr(key, value)
        status, state = "FAILED", "FAIL"
        try:
            mlflow.log_params(provenance.flat_params(model=model_cfg, train=cfg))
            datasets.log_input(self.dataset, context="training")
            model = build(model_cfg, cfg, self.device)

            def on_epoch(row: dict[str, float], _state: dict[str, Any]) -> None:
                epoch = int(row["epoch"])
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                value = row[self.sweep.objective]
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"after epoch {epoch}: {self.sweep.objective} {value:.4f}")

            history = fit(model, self.train, self.val, cfg, on_epoch=on_epoch)
            status, state = "FINISHED", "COMPLETE"
            return history[-1][self.sweep.objective]
        except optuna.TrialPruned:
            status, state = "KILLED", "PRUNED"  # stopped early on purpose: KILLED is how the UI shows it
            raise
        except TrainingDiverged as e:  # a learning rate too high is an answer, not a broken worker
            status, state = "KILLED", "PRUNED"
            mlflow.set_tag("sweep.diverged", "true")
            raise optuna.TrialPruned(str(e)) from None
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            mlflow.set_tag("sweep.state", state)
            mlflow.end_run(status=status)
