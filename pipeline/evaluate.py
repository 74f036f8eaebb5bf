"""Stage 4: score the trained model on the test set; write metrics, tables and plots."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pipeline import registry, tracking  # noqa: E402
from pipeline.data import NUM_CLASSES, load_split  # noqa: E402
from pipeline.engine import predict  # noqa: E402
from pipeline.errors import (
    DataError,  # noqa: E402
    run_stage,
)
from pipeline.files import atomic_path, write_json  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.params import EvaluateConfig, ModelConfig, RegisterConfig, load_section  # noqa: E402
from pipeline.runtime import pick_device  # noqa: E402

log = logging.getLogger("pipeline.evaluate")


def load_model(path: Path, expected: ModelConfig, device: torch.device) -> torch.nn.Module:
    """Rebuild the network from the checkpoint, refusing one made with other model settings."""
    if not path.is_file():
        raise DataError(f"{path} not found; run the train stage first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["model"]
    except Exception as e:
        raise DataError(f"{path} is not a model checkpoint written by train ({type(e).__name__}: {e})") from e
    if saved != dataclasses.asdict(expected):
        diff = ", ".join(
            f"model.{k}={saved.get(k)!r} in the file but {v!r} in params.yaml"
            for k, v in dataclasses.asdict(expected).items()
            if saved.get(k) != v
        )
        raise DataError(f"{path} was trained with other model settings ({diff}); re-run the train stage")
    model = build_model(expected)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as e:
        raise DataError(f"{path}: weights do not fit the network of {expected} ({str(e)[:300]})") from e
    return model.to(device).eval()


def confusion(labels: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Counts (10, 10): row = true class, column = predicted class."""
    return torch.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES**2).view(NUM_CLASSES, -1)


def per_class(matrix: torch.Tensor) -> pd.DataFrame:
    """Precision, recall, F1 and support of each class from a confusion matrix."""
    m = matrix.double()
    tp = m.diag()
    precision = tp / m.sum(0).clamp(min=1)
    recall = tp / m.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return pd.DataFrame(
        {
            "class": range(NUM_CLASSES),
            "precision": precision.numpy(),
            "recall": recall.numpy(),
            "f1": f1.numpy(),
            "support": m.sum(1).long().numpy(),
        }
    )


def plot_confusion(matrix: torch.Tensor, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(matrix.numpy(), cmap="Blues")
    for (i, j), count in zip(
        torch.cartesian_prod(torch.arange(10), torch.arange(10)).tolist(), matrix.flatten().tolist(), strict=True
    ):
        color = "white" if count > matrix.max().item() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=color)
    ax.set(xlabel="predicted", ylabel="true", xticks=range(10), yticks=range(10), title="Confusion matrix (test)")
    fig.colorbar(im, ax=ax)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_misclassified(
    images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, path: Path, n: int = 36
) -> None:
    wrong = (predicted != labels).nonzero().flatten()[:n]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist(), strict=False):
        ax.imshow(images[i, 0].numpy(), cmap="gray")
        ax.set_title(f"true {labels[i].item()} / pred {predicted[i].item()}", fontsize=7)
    fig.suptitle(f"{int((predicted != labels).sum())} misclassified test digits (first {len(wrong)})")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


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
    images, labels = load_split(args.data / "test.pt")
    model = load_model(args.models / "model.pt", model_cfg, device)

    with tracking.resume_run(args.models / "mlflow_run.json") as run:
        logits = predict(model, images.to(device), cfg.batch_size).cpu()
        predicted = logits.argmax(1)
        metrics = {
            "test_loss": F.cross_entropy(logits, labels).item(),
            "test_accuracy": (predicted == labels).float().mean().item(),
        }
        matrix = confusion(labels, predicted)
        table = per_class(matrix)
        metrics["test_macro_f1"] = float(table["f1"].mean())
        log.info("test accuracy %.4f, loss %.4f", metrics["test_accuracy"], metrics["test_loss"])

        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out / "per_class.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
        with atomic_path(args.out / "predictions.csv") as tmp:
            pd.DataFrame({"actual": labels.numpy(), "predicted": predicted.numpy()}).to_csv(tmp, index=False)
        plot_confusion(matrix, args.out / "confusion_matrix.png")
        plot_misclassified(images, labels, predicted, args.out / "misclassified.png")
        write_json(args.out / "metrics.json", metrics)

        mlflow.log_params(tracking.flat_params(evaluate=cfg, register=register_cfg))
        mlflow.log_metrics(metrics)
        for name in ("metrics.json", "per_class.csv", "confusion_matrix.png", "misclassified.png"):
            mlflow.log_artifact(str(args.out / name), artifact_path="evaluation")
        log.info(registry.register_if_good(run.info.run_id, metrics["test_accuracy"], register_cfg))


if __name__ == "__main__":
    run_stage(main)
