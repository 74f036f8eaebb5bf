"""Stage 3: train the network on the processed data, tracked in MLflow, resumable per epoch.

Every process prepares alike (prepare) and computes alike (compute); rank 0, or the only process,
also resumes, tracks and writes (write), while the other ranks of a DDP run compute only (follow).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from torch import nn

from pipeline.common.errors import ParamsError, run_stage
from pipeline.common.files import atomic_path, check_writable
from pipeline.core import checkpoint
from pipeline.core.engine import Split, build, fit
from pipeline.core.runtime import pick_device, release_memory, tune_malloc
from pipeline.core.step import StepConfig
from pipeline.data.datasets import read_info
from pipeline.data.splits import load_split
from pipeline.parallel import distributed, launch
from pipeline.parallel.distributed import World
from pipeline.params import MlflowConfig, ModelConfig, TrainConfig, flatten, load_section
from pipeline.serving import publish
from pipeline.tracking import checkpoint_run, inputs, provenance, runs, server, store, tags

log = logging.getLogger("pipeline.train")
OnEpoch = Callable[[dict[str, float], dict[str, Any]], None] | None  # fit's: each epoch's row and state


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where the stage reads and writes (its command line, from dvc.yaml)."""

    data: Path  # the processed splits
    out: Path  # model.pt, history.csv, mlflow_run.json
    checkpoint: Path  # the last complete epoch, while training runs


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What every rank reads before training: the splits, on the CPU, and the fingerprint that a
    checkpoint (and the other ranks' settings) must match."""

    train: Split
    val: Split
    data_md5: str
    expected: dict[str, Any]


def prepare(data: Path, model_cfg: ModelConfig, cfg: TrainConfig) -> Prepared:
    """Load the train and val splits and fingerprint them with the settings (checkpoint.fingerprint)."""
    train, val = load_split(data / "train.pt"), load_split(data / "val.pt")
    md5 = checkpoint.file_md5(data / "train.pt")
    return Prepared(train, val, md5, checkpoint.fingerprint(model_cfg, cfg, md5))


def compute(
    model: nn.Module, data: Prepared, cfg: TrainConfig, step: StepConfig, resume: dict | None, on_epoch: OnEpoch = None
) -> list[dict[str, float]]:
    """fit on the step's device, every rank failing together (one rank's error stops all)."""
    device = next(model.parameters()).device
    train, val = [tuple(t.to(device) for t in split) for split in (data.train, data.val)]
    with distributed.failing_together(step.world):
        return fit(model, train, val, cfg, step, resume=resume, on_epoch=on_epoch)


def follow(paths: Paths, model_cfg: ModelConfig, cfg: TrainConfig, world: World, device: torch.device) -> None:
    """A rank other than 0: compute only. Rank 0 reads the checkpoint, talks to MLflow and writes."""
    logging.getLogger("pipeline").setLevel(logging.WARNING)  # rank 0 reports progress
    data = prepare(paths.data, model_cfg, cfg)
    theirs, resume = distributed.broadcast(None, world)
    if data.expected != theirs:  # another machine's params.yaml or data: the ranks would not compute the same thing
        raise ParamsError(
            f"rank {world.rank}: params.yaml or {paths.data} differ from rank 0's "
            f"({checkpoint.differences(theirs, data.expected)}); every machine needs the same params and data"
        )
    compute(build(model_cfg, cfg, device), data, cfg, StepConfig.of(cfg, device, world), resume)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--checkpoint", type=Path, default=Path(".cache/train/checkpoint.pt"))
    args = parser.parse_args()
    paths = Paths(args.data, args.out, args.checkpoint)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    tune_malloc()
    model_cfg = load_section("model", ModelConfig)
    cfg = load_section("train", TrainConfig)
    mlflow_cfg = load_section("mlflow", MlflowConfig)
    if not distributed.under_torchrun():
        if cfg.nproc * cfg.nnodes > 1:
            device = pick_device(cfg.device, "train.device")
            return launch.start_workers(cfg, device, paths.checkpoint, connect=store.connect)
        world, device = distributed.ALONE, pick_device(cfg.device, "train.device")
    else:  # a worker of torchrun (by hand, or started by launch.start_workers above)
        world, device = distributed.join(cfg.device, cfg.batch_size)
    try:
        if world.rank == 0:
            write(paths, model_cfg, cfg, mlflow_cfg, world, device)
        else:
            follow(paths, model_cfg, cfg, world, device)
    finally:
        distributed.leave(world)


def write(
    paths: Paths, model_cfg: ModelConfig, cfg: TrainConfig, mlflow_cfg: MlflowConfig, world: World, device: torch.device
) -> None:
    """Rank 0, or the only process: train, and log, checkpoint and save what it trained."""
    check_writable(paths.out, paths.checkpoint.parent)  # before hours of training, not after
    store.connect()  # the repository's store, or a server that fails now if dead, before any work
    data = prepare(paths.data, model_cfg, cfg)
    dataset = read_info(paths.data, "preprocess")
    resume = checkpoint_run.resume(paths.checkpoint, data.expected, cfg.epochs)
    distributed.broadcast((data.expected, resume), world)  # the other ranks check their settings against ours
    step = StepConfig.of(cfg, device, world)
    model = build(model_cfg, cfg, device)
    run_id = resume["run_id"] if resume else None
    with runs.start_run(mlflow_cfg, runs.run_name(model_cfg, cfg), run_id=run_id, system_metrics=True) as run:
        log.info("MLflow run %s at %s; device %s", run.info.run_id, mlflow.get_tracking_uri(), device)
        if resume is None:
            mlflow.log_params(flatten(model=model_cfg, train=cfg))
            inputs.log_dataset(*data.train, str(paths.data / "train.pt"), dataset.split_name("train"), "training")
        mlflow.set_tags(run_tags(paths, data, step, device))
        history = train_logged(paths, model, data, cfg, step, resume)
        example = data.val[0][:4]
        del data
        release_memory()  # the training buffers, before torch.export needs its own (peak RSS)
        save_outputs(paths, model, Trained(model_cfg, cfg, history, dataset.classes, example), run)
    paths.checkpoint.unlink(missing_ok=True)  # done: the next run starts fresh


def run_tags(paths: Paths, data: Prepared, step: StepConfig, device: torch.device) -> dict[str, str]:
    """How the run computed and where its code and data come from (tracking.tags)."""
    commit = provenance.git_commit(ignore=("params.yaml", "dvc.lock", paths.out.as_posix()))
    dvc_md5 = provenance.dvc_out_hash(paths.data.as_posix())
    return tags.compute_tags(device, step.precision, step.world) | tags.provenance_tags(data.data_md5, commit, dvc_md5)


def train_logged(
    paths: Paths, model: nn.Module, data: Prepared, cfg: TrainConfig, step: StepConfig, resume: dict | None
) -> list[dict[str, float]]:
    """compute, checkpointing and logging each epoch as it ends (in the active run); first, on
    resume, the epochs whose metrics a dead server did not take. Each epoch's row, timings too, is
    logged once."""
    run_id = mlflow.active_run().info.run_id
    rows = list(resume.get("rows", [])) if resume else []
    if rows:
        checkpoint_run.log_epochs(run_id, rows, kept=f"{paths.checkpoint} is kept", catch_up=True)

    def on_epoch(row: dict[str, float], state: dict[str, Any]) -> None:
        rows.append(row)
        # The checkpoint first: whatever happens to the server next, this epoch is not lost.
        checkpoint.save_training(paths.checkpoint, state, data.expected, run_id, rows)
        checkpoint_run.log_epochs(run_id, [row], kept=f"{paths.checkpoint} keeps epoch {int(row['epoch'])}")

    try:
        return compute(model, data, cfg, step, resume, on_epoch)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: pipeline.common.errors.run_stage prints this note
        if paths.checkpoint.is_file():
            e.add_note(f"{paths.checkpoint} keeps the last complete epoch; run again to resume")
        raise


@dataclasses.dataclass(frozen=True)
class Trained:
    """What the outputs say besides the weights: the settings, the history, the class names, and a
    few validation images (the logged models' input example)."""

    model_cfg: ModelConfig
    cfg: TrainConfig
    history: list[dict[str, float]]
    classes: tuple[str, ...]
    example: torch.Tensor  # (4, 1, 28, 28) uint8


def save_outputs(paths: Paths, model: nn.Module, trained: Trained, run: mlflow.ActiveRun) -> None:
    """history.csv and the logged models, then model.pt and the run file for evaluate."""
    with atomic_path(paths.out / "history.csv") as tmp:
        pd.DataFrame(trained.history).to_csv(tmp, index=False)
    with server.answering(f"{paths.checkpoint} keeps the trained weights: run again to log them"):
        mlflow.log_artifact(str(paths.out / "history.csv"))
        last = trained.cfg.epochs  # the models' step: MLflow links that epoch's metrics to them
        publish.log_model(model, trained.example, trained.model_cfg, step=last, classes=trained.classes)
    settings = dataclasses.asdict(trained.cfg)
    # The class names last: what predict and the served model answer.
    checkpoint.save_model(
        paths.out / "model.pt", model, trained.model_cfg, list(trained.classes), train=settings, history=trained.history
    )
    runs.save_run_file(paths.out / "mlflow_run.json", run)


if __name__ == "__main__":
    run_stage(main)
