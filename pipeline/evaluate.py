"""Stage 4: score the trained model on the test set; write metrics, tables and plots."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # the object API: files only, no display backend needed
from torch.nn import functional as F

from pipeline.common.errors import DataError, run_stage
from pipeline.common.files import atomic_path, check_writable, write_json
from pipeline.core.checkpoint import load_model
from pipeline.core.inference import predict
from pipeline.core.runtime import pick_device
from pipeline.data.datasets import IMAGE_SIZE, NUM_CLASSES, read_info
from pipeline.data.splits import load_split
from pipeline.params import EvaluateConfig, ModelConfig, RegisterConfig, flatten, load_section
from pipeline.serving import registry
from pipeline.tracking import inputs, runs, store
from pipeline.tracking.evaluation_run import evaluation_run, log_linked

log = logging.getLogger("pipeline.evaluate")


def confusion(labels: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Counts (10, 10): row = true class, column = predicted class."""
    return torch.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES**2).view(NUM_CLASSES, -1)


def per_class(matrix: torch.Tensor, classes: tuple[str, ...]) -> pd.DataFrame:
    """Precision, recall, F1 and support of each class (by name) from a confusion matrix."""
    m = matrix.double()
    tp = m.diag()
    precision = tp / m.sum(0).clamp(min=1)
    recall = tp / m.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return pd.DataFrame(
        {
            "class": classes,
            "precision": precision.numpy(),
            "recall": recall.numpy(),
            "f1": f1.numpy(),
            "support": m.sum(1).long().numpy(),
        }
    )


def long_names(classes: tuple[str, ...]) -> bool:
    """Names longer than MNIST's digits: the plots tilt or wrap them."""
    return max(map(len, classes)) > 2


def confusion_figure(matrix: torch.Tensor, classes: tuple[str, ...]) -> Figure:
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    im = ax.imshow(matrix.numpy(), cmap="Blues")
    for (i, j), count in zip(
        torch.cartesian_prod(torch.arange(10), torch.arange(10)).tolist(), matrix.flatten().tolist(), strict=True
    ):
        color = "white" if count > matrix.max().item() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=color)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    tilt = {"rotation": 45, "ha": "right", "rotation_mode": "anchor"} if long_names(classes) else {}
    ax.set_xticks(range(NUM_CLASSES), classes, **tilt)
    ax.set_yticks(range(NUM_CLASSES), classes)
    fig.colorbar(im, ax=ax)
    return fig


def misclassified_figure(
    images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, classes: tuple[str, ...], n: int = 36
) -> Figure:
    """The first `n` misclassified test images, 6 a row, each captioned with true and predicted class."""
    wrong = (predicted != labels).nonzero().flatten()[:n]
    lines = 2 if long_names(classes) else 1  # long names: true and predicted on lines of their own
    cols, side, gap = 6, IMAGE_SIZE, 6 + 6 * lines  # the gap below each image holds its caption
    rows = max(1, -(-len(wrong) // cols))
    # One image of all of them on one axes: 36 axes of one image each took ~5x as long to draw.
    mosaic = torch.full((rows * (side + gap), cols * (side + 4)), 255, dtype=torch.uint8)  # (H, W) white
    fig = Figure(figsize=(cols * 1.4, rows * 1.6 * (side + gap) / (side + 12)))  # 1.6 in a row of one-line captions
    ax = fig.subplots()
    for k, i in enumerate(wrong.tolist()):
        top, left = (k // cols) * (side + gap), (k % cols) * (side + 4) + 2
        mosaic[top : top + side, left : left + side] = images[i, 0]
        true, pred = classes[labels[i]], classes[predicted[i]]
        caption = f"true {true}\npred {pred}" if lines == 2 else f"true {true} / pred {pred}"
        ax.text(left + side / 2, top + side + gap / 2, caption, ha="center", va="center", fontsize=7)
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=255)
    ax.axis("off")
    ax.set_title(f"{int((predicted != labels).sum())} misclassified test images (first {len(wrong)})")
    return fig


def save_png(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def write_reports(
    out: Path, test: tuple[torch.Tensor, torch.Tensor], logits: torch.Tensor, classes: tuple[str, ...]
) -> dict[str, float]:
    """The test metrics of `logits` (N, 10) on the test split, written with the per-class table, the
    predictions, and the two figures into `out`; returns the metrics (metrics.json's)."""
    images, labels = test
    predicted = logits.argmax(1)
    matrix = confusion(labels, predicted)
    table = per_class(matrix, classes)
    metrics = {
        "test_loss": F.cross_entropy(logits, labels).item(),
        "test_accuracy": (predicted == labels).float().mean().item(),
        "test_macro_f1": float(table["f1"].mean()),
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "per_class.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(out / "predictions.csv") as tmp:
        names = np.array(classes, dtype=object)  # class names: `dvc plots` labels the confusion matrix with them
        pd.DataFrame({"actual": names[labels.numpy()], "predicted": names[predicted.numpy()]}).to_csv(tmp, index=False)
    save_png(confusion_figure(matrix, classes), out / "confusion_matrix.png")
    save_png(misclassified_figure(images, labels, predicted, classes), out / "misclassified.png")
    write_json(out / "metrics.json", metrics)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = load_section("evaluate", EvaluateConfig)
    model_cfg = load_section("model", ModelConfig)
    register_cfg = load_section("register", RegisterConfig)
    device = pick_device(cfg.device, "evaluate.device")
    check_writable(args.out)
    images, labels = load_split(args.data / "test.pt")
    dataset = read_info(args.data, "preprocess")
    model, classes = load_model(args.models / "model.pt", expected=model_cfg)
    model = model.to(device)
    if classes != dataset.classes:
        raise DataError(f"{args.models / 'model.pt'} was trained on other classes than {dataset.name}'s; re-run train")

    info = runs.read_run_file(args.models / "mlflow_run.json")
    with evaluation_run(info):  # a run of its own, under the training run
        logits = predict(model, images.to(device), cfg.batch_size).cpu()
        metrics = write_reports(args.out, (images, labels), logits, classes)
        log.info("test accuracy %.4f, loss %.4f", metrics["test_accuracy"], metrics["test_loss"])
        mlflow.log_params(flatten(evaluate=cfg, register=register_cfg))
        source, name = str(args.data / "test.pt"), dataset.split_name("test")
        test_set = inputs.log_dataset(images, labels, source, name, "evaluation")
        log_linked(metrics, info["run_id"], test_set)
        for name in ("metrics.json", "per_class.csv", "confusion_matrix.png", "misclassified.png"):
            mlflow.log_artifact(str(args.out / name), artifact_path="evaluation")
        with store.store_lock():  # parallel experiments: one registration and alias move at a time
            log.info(registry.register_if_good(info["run_id"], metrics["test_accuracy"], register_cfg))


if __name__ == "__main__":
    run_stage(main)
