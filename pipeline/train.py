"""Stage 3: train the network on the processed data, tracked in MLflow."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch

from pipeline import tracking
from pipeline.data import load_split
from pipeline.engine import evaluate, train_one_epoch
from pipeline.errors import run_stage
from pipeline.files import atomic_path
from pipeline.model import build_model
from pipeline.params import MlflowConfig, ModelConfig, TrainConfig, load_section
from pipeline.runtime import device_tags, make_deterministic, pick_device

log = logging.getLogger("pipeline.train")


def fit(
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    on_epoch=None,
) -> list[dict[str, float]]:
    """Train for cfg.epochs; after each epoch record train and val loss/accuracy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    # The shuffling generator lives on the CPU, so the order is the same on every device.
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        tr = train_one_epoch(model, *train, cfg.batch_size, optimizer, generator, f"epoch {epoch}/{cfg.epochs}")
        va = evaluate(model, *val, batch_size=1000)
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
            epoch,
            cfg.epochs,
            row["train_loss"],
            row["train_accuracy"],
            row["val_loss"],
            row["val_accuracy"],
            seconds,
        )
        if on_epoch is not None:
            on_epoch({**row, "epoch_seconds": seconds})
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--out", type=Path, default=Path("models"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    tracking.check_tracking_server()  # a dead server fails now, before any work or output
    model_cfg = load_section("model", ModelConfig)
    cfg = load_section("train", TrainConfig)
    mlflow_cfg = load_section("mlflow", MlflowConfig)
    device = pick_device(cfg.device, "train.device")
    train_x, train_y = load_split(args.data / "train.pt")
    val_x, val_y = load_split(args.data / "val.pt")

    make_deterministic(cfg.seed)
    model = build_model(model_cfg).to(device)  # initial weights depend on the seed only
    with tracking.start_run(mlflow_cfg.experiment_name) as run:
        log.info("MLflow run %s at %s; device %s", run.info.run_id, mlflow.get_tracking_uri(), device)
        mlflow.log_params(tracking.flat_params(model=model_cfg, train=cfg))
        data_md5 = hashlib.md5((args.data / "train.pt").read_bytes()).hexdigest()
        tags = {**device_tags(device), "data.train_md5": data_md5}
        if dvc_hash := tracking.dvc_out_hash(args.data.as_posix()):
            tags["data.dvc_md5"] = dvc_hash
        if commit := tracking.git_commit():
            tags["git_commit"] = commit
        mlflow.set_tags(tags)
        tracking.log_dataset(train_x, train_y, source=str(args.data / "train.pt"), name="mnist-train")

        def on_epoch(row: dict[str, float]) -> None:
            metrics = {k: v for k, v in row.items() if k != "epoch"}
            mlflow.log_metrics(metrics, step=int(row["epoch"]))

        history = fit(
            model,
            (train_x.to(device), train_y.to(device)),
            (val_x.to(device), val_y.to(device)),
            cfg,
            on_epoch,
        )

        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out / "history.csv") as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
        mlflow.log_artifact(str(args.out / "history.csv"))
        tracking.log_model(model, example=val_x[:4])
        checkpoint = {
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "model": dataclasses.asdict(model_cfg),
            "train": dataclasses.asdict(cfg),
            "history": history,
        }
        with atomic_path(args.out / "model.pt") as tmp:
            torch.save(checkpoint, tmp)
        tracking.save_run_file(args.out / "mlflow_run.json", run)


if __name__ == "__main__":
    run_stage(main)
