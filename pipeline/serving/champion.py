"""The model a server runs, and following the registry's alias: load a version, notice when the alias moves."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient

from pipeline.common.errors import redact
from pipeline.core.inference import Inference
from pipeline.data.splits import IMAGE_SIZE

log = logging.getLogger("pipeline.serving.champion")

ALIASED = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)")


@dataclass(frozen=True)
class Served:
    """A loaded `classifier`: its network as the pyfunc runs it, its class names, and which model it is."""

    inference: Inference
    classes: np.ndarray  # (10,) object: the class name of each index
    version: str  # the registry version ("3"), or the URI for a model that is not from the registry
    uri: str

    def probabilities(self, x: torch.Tensor) -> tuple[np.ndarray, Served]:
        """Raw pixels (N, 1, 28, 28) -> (probabilities (N, 10) float32, self): what the batcher runs."""
        return self.inference.probabilities(x).numpy(), self


def resolve(uri: str) -> tuple[str, str]:
    """(the URI of one fixed model, its version): `models:/name@alias` -> `models:/name/<version>`."""
    if m := ALIASED.fullmatch(uri):
        version = MlflowClient().get_model_version_by_alias(m["name"], m["alias"]).version
        return f"models:/{m['name']}/{version}", str(version)
    if m := re.fullmatch(r"models:/([^/@]+)/(\d+)", uri):
        return uri, m[2]
    return uri, uri


def load(uri: str, max_images: int) -> Served:
    """Load the `classifier` behind `uri` (an alias is resolved first) and warm it up at the batch sizes it will see."""
    fixed, version = resolve(uri)
    python_model = mlflow.pyfunc.load_model(fixed).unwrap_python_model()  # a DigitClassifier: load_context ran
    served = Served(python_model.inference, python_model.classes, version, fixed)
    for n in sorted({1, max_images}):  # the first call of a size builds oneDNN's kernels: not in a request
        served.probabilities(torch.zeros(n, 1, IMAGE_SIZE, IMAGE_SIZE))
    return served


class AliasWatch:
    """Reads the version an alias points at; one log line when the registry cannot be read, one when it can again."""

    def __init__(self, uri: str) -> None:
        m = ALIASED.fullmatch(uri)
        self.name, self.alias = (m["name"], m["alias"]) if m else (None, None)
        self.unreachable = False

    @property
    def active(self) -> bool:
        return self.name is not None

    def version(self) -> str | None:
        """The alias's version now; None when the registry cannot be read (the current model keeps serving)."""
        try:
            version = str(MlflowClient().get_model_version_by_alias(self.name, self.alias).version)
        except Exception as e:  # unreachable, 5xx, the alias deleted: keep serving what we have
            if not self.unreachable:
                where = redact(mlflow.get_registry_uri())
                log.warning("registry at %s unreadable, the current model keeps serving: %s", where, one_line(e))
            self.unreachable = True
            return None
        if self.unreachable:
            log.info("registry readable again")
        self.unreachable = False
        return version


def one_line(e: BaseException) -> str:
    """An exception's message, first line only, shortened."""
    text = str(getattr(e, "message", None) or e).strip().splitlines()
    return redact(text[0][:300]) if text else type(e).__name__
