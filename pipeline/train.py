"""Stage 3: train the network on the processed data, tracked in MLflow, resumable per epoch."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

from pipeline.common.errors import ParamsError, run_stage, shielded
from pipeline.common.files import atomic_path, check_writable, save_torch
from pipeline.core.engine import TrainingDiverged, build, fit  # noqa: F401 (TrainingDiverged: train's error
from pipeline.core.runtime import autocast_dtype, device_tags, pick_device, release_memory, tune_malloc
from pipeline.data.datasets import read_info
from pipeline.data.splits import load_split
from pipeline.parallel import distributed, launch
from pipeline.parallel.distributed import World
from pipeline.params import MlflowConfig, ModelConfig, TrainConfig, load_section
from pipeline.serving import publish
from pipeline.tracking import checkpoint_run, datasets, provenance, runs, server, store

log = logging.getLogger("pipeline.train")
PARALLEL_KEYS = ("nproc", "nnodes", "rdzv_endpoint")


def fingerprint(model_cfg: ModelConfig, cfg: TrainConfig, data_md5: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: every setting but the epoch count and the number
    of processes and machines (same math on any), and the data."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("epochs", *PARALLEL_KEYS)}
    return {"model": dataclasses.asdict(model_cfg), "train": train, "data_md5": data_md5}


def load_checkpoint(path: Path, expected: dict[str, Any], epochs: int) -> dict[str, Any] | None:
    """The checkpoint at `path` if it was made by the same settings and data, else None (logged)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable: say so and start fresh
        log.warning("ignoring unreadable checkpoint %s (%s); starting fresh", path, e)
        return None
    if state.get("fingerprint") != expected:
        diff = _differences(state.get("fingerprint", {}), expected)
        log.warning("checkpoint %s was made with other settings (%s); starting fresh", path, diff)
        checkpoint_run.end_discarded(state)
        return None
    if len(state["history"]) > epochs:
        log.warning("checkpoint %s is past train.epochs=%d; starting fresh", path, epochs)
        checkpoint_run.end_discarded(state)
        return None
    log.info("resuming from %s after epoch %d", path, len(state["history"]))
    return state


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    keys = sorted(set(old) | set(new))
    parts = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            if sub := _differences(a, b, f"{prefix}{k}."):
                parts.append(sub)
        elif a != b:
            parts.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return ", ".join(parts)


def log_epochs(run_id: str, rows: list[dict[str, float]], kept: str, catch_up: bool = False) -> None:
    """Log the rows (one an epoch). With `catch_up` (a resumed run), only those whose epoch the run
    does not hold yet: a tracking server, down at the time, may not have taken them. Each epoch once."""
    # Shielded: SIGTERM or Ctrl-C is raised after the store's write, not inside it (see errors.shielded).
    with server.answering(f"{kept}; run again once it answers, to resume into run {run_id}"), shielded():
        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_loss")} if catch_up else set()
        for row in rows:
            if int(row["epoch"]) not in logged:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def start_workers(cfg: TrainConfig, checkpoint: Path) -> None:
    """train.nproc x train.nnodes > 1: start this machine's workers through torchrun's elastic agent."""
    launch.check_devices(cfg.nproc, pick_device(cfg.device, "train.device"))
    if cfg.nnodes == 1 or launch.node_rank(cfg.nnodes) == 0:
        store.connect()  # rank 0 will log: a dead server fails now, before any process starts
    try:
        launch.start(cfg.nproc, cfg.nnodes, cfg.rdzv_endpoint, sys.argv[1:])
    except (launch.WorkerFailed, KeyboardInterrupt) as e:
        if checkpoint.is_file():
            note = f"{checkpoint} keeps the last complete epoch; run again to resume (any train.nproc)"
            if isinstance(e, KeyboardInterrupt):
                e.add_note(note)
            else:
                e.args = (f"{e}; {note}",)
        raise


def follow(args: argparse.Namespace, model_cfg: ModelConfig, cfg: TrainConfig, world: World, device) -> None:
    """A rank other than 0: compute only. Rank 0 reads the checkpoint, talks to MLflow and writes."""
    logging.getLogger("pipeline").setLevel(logging.WARNING)  # rank 0 reports progress
    train_split = tuple(t.to(device) for t in load_split(args.data / "train.pt"))
    val_split = tuple(t.to(device) for t in load_split(args.data / "val.pt"))
    with open(args.data / "train.pt", "rb") as f:
        ours = fingerprint(model_cfg, cfg, hashlib.file_digest(f, "md5").hexdigest())
    theirs, resume = distributed.broadcast(None, world)
    if ours != theirs:  # another machine's params.yaml or data: the ranks would not compute the same thing
        raise ParamsError(
            f"rank {world.rank}: params.yaml or {args.data} differ from rank 0's ({_differences(theirs, ours)}); "
            "every machine needs the same params and data"
        )
    model = build(model_cfg, cfg, device)
    with distributed.failing_together(world):
        fit(model, train_split, val_split, cfg, resume, world=world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--checkpoint", type=Path, default=Path(".cache/train/checkpoint.pt"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    tune_malloc()
    model_cfg = load_section("model", ModelConfig)
    cfg = load_section("train", TrainConfig)
    mlflow_cfg = load_section("mlflow", MlflowConfig)
    if not distributed.under_torchrun():
        if cfg.nproc * cfg.nnodes > 1:
            return start_workers(cfg, args.checkpoint)
        world, device = distributed.ALONE, pick_device(cfg.device, "train.device")
    else:  # a worker of torchrun (by hand, or started by start_workers above)
        world, device = distributed.join(cfg.device, cfg.batch_size)
    try:
        if world.rank == 0:
            write(args, model_cfg, cfg, mlflow_cfg, world, device)
        else:
            follow(args, model_cfg, cfg, world, device)
    finally:
        distributed.leave(world)


def write(
    args: argparse.Namespace,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    mlflow_cfg: MlflowConfig,
    world: World,
    device: torch.device,
) -> None:
    """Rank 0, or the only process: train, and log, checkpoint and save what it trained."""
    check_writable(args.out, args.checkpoint.parent)  # before hours of training, not after
    store.connect()  # the repository's store, or a server that fails now if dead, before any work
    train_x, train_y = load_split(args.data / "train.pt")
    val_x, val_y = load_split(args.data / "val.pt")
    dataset = read_info(args.data, "preprocess")
    with open(args.data / "train.pt", "rb") as f:
        data_md5 = hashlib.file_digest(f, "md5").hexdigest()  # streamed: no second copy in memory
    expected = fingerprint(model_cfg, cfg, data_md5)
    resume = checkpoint_run.resumable(load_checkpoint(args.checkpoint, expected, cfg.epochs), args.checkpoint)
    distributed.broadcast((expected, resume), world)  # the other ranks check their settings against ours

    model = build(model_cfg, cfg, device)
    run_id = resume["run_id"] if resume else None
    name = runs.run_name(model_cfg, cfg)
    with runs.start_run(mlflow_cfg, name, run_id=run_id, system_metrics=True) as run:
        log.info("MLflow run %s at %s; device %s", run.info.run_id, mlflow.get_tracking_uri(), device)
        if resume is None:
            mlflow.log_params(provenance.flat_params(model=model_cfg, train=cfg))
            datasets.log_dataset(train_x, train_y, str(args.data / "train.pt"), f"{dataset.name}-train", "training")
        precision = "bf16" if autocast_dtype(cfg.precision, device) else "fp32"
        tags = {**device_tags(device), "precision": precision, "data.train_md5": data_md5}
        tags |= {"world_size": str(world.size), "backend": world.backend}
        if dvc_hash := provenance.dvc_out_hash(args.data.as_posix()):
            tags["data.dvc_md5"] = dvc_hash
        if commit := provenance.git_commit(ignore=("params.yaml", "dvc.lock", args.out.as_posix())):
            tags["git_commit"] = commit
        mlflow.set_tags(tags)
        # Every epoch's metrics, timings too: the checkpoint keeps them, so that epochs whose logging
        # a dead server interrupted are logged on resume, each once (log_epochs).
        rows = list(resume.get("rows", [])) if resume else []
        if rows:  # resumed: first the epochs whose metrics a dead server did not take
            log_epochs(run.info.run_id, rows, kept=f"{args.checkpoint} is kept", catch_up=True)

        def on_epoch(row: dict[str, float], state: dict[str, Any]) -> None:
            rows.append(row)
            # The checkpoint first: whatever happens to the server next, this epoch is not lost.
            save_torch(args.checkpoint, {**state, "rows": rows, "fingerprint": expected, "run_id": run.info.run_id})
            log_epochs(run.info.run_id, [row], kept=f"{args.checkpoint} keeps epoch {int(row['epoch'])}")

        train_split = (train_x.to(device), train_y.to(device))
        try:
            with distributed.failing_together(world):
                history = fit(model, train_split, (val_x.to(device), val_y.to(device)), cfg, resume, on_epoch, world)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: pipeline.errors.run_stage prints this note
            if args.checkpoint.is_file():
                e.add_note(f"{args.checkpoint} keeps the last complete epoch; run again to resume")
            raise

        del train_split, train_x, train_y
        release_memory()  # the training buffers, before torch.export needs its own (peak RSS)
        with atomic_path(args.out / "history.csv") as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
        with server.answering(f"{args.checkpoint} keeps the trained weights: run again to log them"):
            mlflow.log_artifact(str(args.out / "history.csv"))
            publish.log_model(model, example=val_x[:4], model_cfg=model_cfg, step=cfg.epochs, classes=dataset.classes)
        checkpoint = {
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "model": dataclasses.asdict(model_cfg),
            "train": dataclasses.asdict(cfg),
            "history": history,
            "classes": list(dataset.classes),  # what predict and the served model answer
        }
        save_torch(args.out / "model.pt", checkpoint)
        runs.save_run_file(args.out / "mlflow_run.json", run)
    args.checkpoint.unlink(missing_ok=True)  # done: the next run starts fresh


if __name__ == "__main__":
    run_stage(main)
