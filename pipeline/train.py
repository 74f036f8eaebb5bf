"""Stage 3: train the network on the processed data, tracked in MLflow, resumable per epoch."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

from pipeline import tracking
from pipeline.data import load_split
from pipeline.engine import EVAL_BATCH_SIZE, evaluate, train_one_epoch
from pipeline.errors import PipelineError, run_stage
from pipeline.files import atomic_path
from pipeline.model import build_model
from pipeline.params import MlflowConfig, ModelConfig, TrainConfig, load_section
from pipeline.runtime import autocast_dtype, device_tags, make_deterministic, pick_device, release_memory, tune_malloc

log = logging.getLogger("pipeline.train")
Split = tuple[torch.Tensor, torch.Tensor]


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


def fit(
    model: torch.nn.Module,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float], dict[str, Any]], None] | None = None,
) -> list[dict[str, float]]:
    """Train up to cfg.epochs, continuing from a `resume` state; after each epoch record train and
    val loss/accuracy and hand the row and the full training state to `on_epoch`."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    scheduler = None
    if cfg.schedule == "onecycle":  # warm up to train.lr, then anneal, stepping every batch
        steps = -(-len(train[0]) // cfg.batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps)
    # The shuffling generator lives on the CPU, so the order is the same on every device.
    generator = torch.Generator().manual_seed(cfg.seed)
    autocast = autocast_dtype(cfg.precision, train[0].device)
    history: list[dict[str, float]] = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        history = list(resume["history"])
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        start = time.perf_counter()
        desc = f"epoch {epoch}/{cfg.epochs}"
        tr = train_one_epoch(
            model, *train, cfg.batch_size, optimizer, generator, desc, scheduler, autocast, cfg.label_smoothing
        )
        if tr["first_bad_batch"] >= 0:
            raise TrainingDiverged(
                f"loss became NaN or infinite at epoch {epoch}, batch {tr['first_bad_batch']} "
                f"(train.lr={cfg.lr}); no model written"
            )
        va = evaluate(model, *val, batch_size=EVAL_BATCH_SIZE)
        row = {
            "epoch": epoch,
            "train_loss": tr["loss"],
            "train_accuracy": tr["accuracy"],
            "val_loss": va["loss"],
            "val_accuracy": va["accuracy"],
        }
        history.append(row)  # no timings here: the history is part of the reproducible output
        seconds = time.perf_counter() - start
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s",
            *(epoch, cfg.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"], row["val_accuracy"]),
            seconds,
        )
        if on_epoch is not None:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
            }
            on_epoch({**row, "epoch_seconds": seconds}, state)
    return history


def fingerprint(model_cfg: ModelConfig, cfg: TrainConfig, data_md5: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: every setting but the epoch count, and the data."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "epochs"}
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
        return None
    if len(state["history"]) > epochs:
        log.warning("checkpoint %s is past train.epochs=%d; starting fresh", path, epochs)
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
    device = pick_device(cfg.device, "train.device")
    tracking.connect()  # the repository's store, or a server that fails now if dead, before any work
    train_x, train_y = load_split(args.data / "train.pt")
    val_x, val_y = load_split(args.data / "val.pt")
    with open(args.data / "train.pt", "rb") as f:
        data_md5 = hashlib.file_digest(f, "md5").hexdigest()  # streamed: no second copy in memory
    expected = fingerprint(model_cfg, cfg, data_md5)
    resume = load_checkpoint(args.checkpoint, expected, cfg.epochs)

    make_deterministic(cfg.seed)
    model = build_model(model_cfg).to(device)  # built on the CPU: initial weights depend on the seed only
    if cfg.channels_last:  # NHWC convolutions: faster on CPUs and tensor cores
        model = model.to(memory_format=torch.channels_last)
    run_id = resume["run_id"] if resume else None
    name = tracking.run_name(model_cfg, cfg)
    with tracking.start_run(mlflow_cfg, name, run_id=run_id, system_metrics=True) as run:
        log.info("MLflow run %s at %s; device %s", run.info.run_id, mlflow.get_tracking_uri(), device)
        if resume is None:
            mlflow.log_params(tracking.flat_params(model=model_cfg, train=cfg))
            tracking.log_dataset(train_x, train_y, str(args.data / "train.pt"), "mnist-train", "training")
        precision = "bf16" if autocast_dtype(cfg.precision, device) else "fp32"
        tags = {**device_tags(device), "precision": precision, "data.train_md5": data_md5}
        if dvc_hash := tracking.dvc_out_hash(args.data.as_posix()):
            tags["data.dvc_md5"] = dvc_hash
        if commit := tracking.git_commit(ignore=("params.yaml", "dvc.lock", args.out.as_posix())):
            tags["git_commit"] = commit
        mlflow.set_tags(tags)

        def on_epoch(row: dict[str, float], state: dict[str, Any]) -> None:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
            with atomic_path(args.checkpoint) as tmp:
                torch.save({**state, "fingerprint": expected, "run_id": run.info.run_id}, tmp)

        train_split = (train_x.to(device), train_y.to(device))
        try:
            history = fit(model, train_split, (val_x.to(device), val_y.to(device)), cfg, resume, on_epoch)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: pipeline.errors.run_stage prints this note
            if args.checkpoint.is_file():
                e.add_note(f"{args.checkpoint} keeps the last complete epoch; run again to resume")
            raise

        del train_split, train_x, train_y
        release_memory()  # the training buffers, before torch.export needs its own (peak RSS)
        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out / "history.csv") as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
        mlflow.log_artifact(str(args.out / "history.csv"))
        tracking.log_model(model, example=val_x[:4], model_cfg=model_cfg, step=cfg.epochs)
        checkpoint = {
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "model": dataclasses.asdict(model_cfg),
            "train": dataclasses.asdict(cfg),
            "history": history,
        }
        with atomic_path(args.out / "model.pt") as tmp:
            torch.save(checkpoint, tmp)
        tracking.save_run_file(args.out / "mlflow_run.json", run)
    args.checkpoint.unlink(missing_ok=True)  # done: the next run starts fresh


if __name__ == "__main__":
    run_stage(main)
