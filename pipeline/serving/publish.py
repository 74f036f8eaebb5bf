"""The served model's logging: the `classifier` pyfunc (and the `model` pt2 it sits beside) in the active MLflow run."""

from __future__ import annotations

import copy
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, Schema

from pipeline.core.checkpoint import save_model
from pipeline.params import ModelConfig
from pipeline.serving.pyfunc import ARTIFACT, PROBABILITIES


def pins(*distributions: str) -> list[str]:
    """Exact pins of installed distributions, for a logged model's requirements (MLflow adds itself)."""
    # Given, not inferred: MLflow infers them by loading the model in a subprocess (4-25 s a run on
    # 2 cores), which also drags in whatever was imported. "+cu130"-style local tags are not on PyPI.
    return [f"{name}=={version(name).split('+')[0]}" for name in distributions]


def log_classifier(
    model: torch.nn.Module, model_cfg: ModelConfig, example: np.ndarray, classes: tuple[str, ...], step: int = 0
) -> None:
    """Log the serving model `classifier` of the active run: weights + this code, no pickle."""
    # Models from code (pyfunc_code.py) with a weights-only checkpoint and the pipeline package
    # as code: loading runs our Net, so any batch size works, and neither the wrapper nor the
    # weights need pickle deserialization (the reason `model` is logged as pt2).
    # The signature names the outputs only: the inputs take several shapes and dtypes (see
    # to_batch), which one MLflow tensor spec cannot express, so to_batch enforces them.
    outputs = [ColSpec("long", "digit"), *(ColSpec("float", c) for c in PROBABILITIES), ColSpec("string", "class")]
    signature = ModelSignature(inputs=None, outputs=Schema(outputs))
    here = Path(__file__).parent  # pipeline/serving; the whole pipeline package travels as code
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model.pt"
        save_model(checkpoint, model, model_cfg, classes=list(classes))
        mlflow.pyfunc.log_model(
            name=ARTIFACT,
            python_model=str(here / "pyfunc_code.py"),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(here.parent)],
            signature=signature,
            input_example=example,
            pip_requirements=pins("torch", "numpy", "pandas", "pyyaml"),  # what pipeline/ imports
            metadata={"classes": list(classes)},
            step=step,
        )


def log_model(
    model: torch.nn.Module, example: torch.Tensor, model_cfg: ModelConfig, step: int, classes: tuple[str, ...]
) -> None:
    """Log the network as `model` (pytorch flavor, logits) and `classifier` (serving: class index, name
    and probabilities) at `step`, the last epoch: MLflow links the run's metrics of that step to both
    (the Models tab). Both carry the class names in their MLmodel metadata."""
    # A CPU copy in the default memory layout: training may run on CUDA and in channels_last.
    cpu_model = copy.deepcopy(model).to(device="cpu", memory_format=torch.contiguous_format).eval()
    x = example.float().numpy()  # (B, 1, 28, 28) raw pixels, B >= 2
    with torch.no_grad():
        y = cpu_model(example.float()).numpy()
    # pt2 (torch.export) on purpose: the archive holds a traced graph and tensors, so
    # `mlflow.pyfunc.load_model` and `mlflow models serve` load it without our code on the path
    # and without allowing pickle deserialization (the "pickle" format needs both). torch.export
    # traces on the CPU copy with this numpy example; a batch of >= 2 keeps the batch dim dynamic.
    mlflow.pytorch.log_model(
        cpu_model,
        name="model",
        serialization_format="pt2",
        signature=infer_signature(x, y),
        input_example=x,
        pip_requirements=pins("torch", "numpy"),
        metadata={"classes": list(classes)},
        step=step,
    )
    log_classifier(cpu_model, model_cfg, example=example[:, 0].numpy(), classes=classes, step=step)  # uint8 (B, 28, 28)
