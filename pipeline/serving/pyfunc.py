"""The served model: an MLflow pyfunc that takes 28x28 images and answers, per image, the class index
(`digit`), the probabilities `prob_0`..`prob_9` and the class name (`class`)."""

from __future__ import annotations

import logging
import numbers
import os
import sys
from pathlib import Path
from typing import NoReturn

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.common.system import cores
from pipeline.core.checkpoint import load_model
from pipeline.core.inference import prepare
from pipeline.data.datasets import IMAGE_SIZE, NUM_CLASSES

log = logging.getLogger("pipeline.serving.pyfunc")


ARTIFACT = "classifier"
PIXELS = IMAGE_SIZE * IMAGE_SIZE  # 784 columns in a DataFrame row, row-major


PROBABILITIES = [f"prob_{k}" for k in range(NUM_CLASSES)]
# `digit` is the class index (MNIST's digit itself), named so before there were other datasets;
# `class` (the dataset's class name, from the checkpoint) comes last: clients that read the first
# eleven columns by position see what they always did.
COLUMNS = ["digit", *PROBABILITIES, "class"]
SHAPES = "(N, 28, 28), (N, 1, 28, 28) or (N, 784)"


# Images per request. Bounds a request's time and memory: on the 2-core development CPU a batch of
# 256 (about 1 MB of JSON) takes about 0.4 s with the tutorial network at nf 32, and a single batch
# of 4096 held the server for 5.7 s and grew it by 200 MB. Clients send larger sets in batches.
MAX_BATCH = 256
NUMBERS = "pixels must be numbers (uint8 0-255 or float on the same scale)"


RANGE = "pixels must lie in [0, 255] (white digit on black, like MNIST)"


def _bad(message: str) -> NoReturn:
    # INVALID_PARAMETER_VALUE is what the scoring server turns into HTTP 400 with this message.
    raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def to_batch(data) -> torch.Tensor:
    """Check a batch of images and return it as float (N, 1, 28, 28) raw pixels in [0, 255]."""
    # The count first, before anything is converted or scanned: a request of 100,000 rows is refused
    # in microseconds, not after seconds of converting and checking every pixel.
    if isinstance(data, list | pd.DataFrame) or (isinstance(data, np.ndarray) and data.ndim > 0):
        if len(data) > MAX_BATCH:
            _bad(f"a request holds at most {MAX_BATCH} images, got {len(data)}: send them in smaller batches")
    if isinstance(data, pd.DataFrame):
        if data.shape[1] != PIXELS:
            _bad(f"a DataFrame needs {PIXELS} pixel columns (a 28x28 image row by row), got {data.shape[1]}")
        data = data.to_numpy()
    elif isinstance(data, list):
        try:
            data = np.asarray(data)
        except ValueError as e:
            _bad(f"images must be a regular array of numbers: {e}")
    if not isinstance(data, np.ndarray):
        _bad(f"expected a numpy array or a DataFrame of images, got {type(data).__name__}")
    if data.dtype.kind == "O":  # a DataFrame of mixed columns, or JSON null among the pixels
        for v in data.flat:
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                _bad(f"{NUMBERS}, got {type(v).__name__} {v!r:.40}")
    elif data.dtype.kind not in "uif":  # bool, complex, str, bytes, dates
        _bad(f"{NUMBERS}, got dtype {data.dtype}")
    if data.shape[1:] not in ((PIXELS,), (IMAGE_SIZE, IMAGE_SIZE), (1, IMAGE_SIZE, IMAGE_SIZE)):
        _bad(f"images must have shape {SHAPES}, got {data.shape}")
    if len(data) == 0:
        _bad("the batch is empty")
    try:
        x = data.astype(np.float64)  # float64 first: 1e39 is out of range here, not an inf of float32
    except OverflowError:  # a JSON integer beyond float64 (more than 308 digits)
        _bad(f"{RANGE}, got an integer too large for a float")
    if not np.isfinite(x).all():
        _bad(f"{RANGE}, got NaN or infinity")
    if x.min() < 0 or x.max() > 255:
        _bad(f"{RANGE}, got values from {x.min():g} to {x.max():g}")
    return torch.from_numpy(x.astype(np.float32).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE))


class DigitClassifier(mlflow.pyfunc.PythonModel):
    """Images in, a DataFrame out: `digit` (class index), `prob_0`..`prob_9` and `class` per image."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        threads = divide_threads()
        model, classes = load_model(Path(context.artifacts["checkpoint"]))
        self.inference = prepare(model)
        self.classes = np.array(classes, dtype=object)  # the ten digits for models logged before class names
        line = f"classifier runs in {self.inference.describe()}, {threads} torch thread(s)"
        if workers := server_workers():  # the server configures no logging of ours: straight to its log
            print(f"{__name__}: {line} ({cores()} cores / {workers} worker(s))", file=sys.stderr, flush=True)
        else:
            log.info(line)

    # np.ndarray is one of the hints MLflow derives no schema from: it hands the request's array (or
    # the DataFrame of a `dataframe_split` request) through unchanged, and to_batch checks it.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        probs = self.inference.probabilities(to_batch(model_input)).numpy()  # (N, 10)
        table = pd.DataFrame(probs, columns=PROBABILITIES)
        table.insert(0, "digit", probs.argmax(1))
        table["class"] = self.classes[probs.argmax(1)]
        return table


def server_workers() -> int | None:
    """How many workers `mlflow models serve` started on this machine; None outside that server."""
    if value := os.environ.get("MLFLOW_MODELS_WORKERS", "").strip():  # MLflow's variable for --workers
        return int(value) if value.isdigit() and int(value) > 0 else None
    # `--workers N` reaches only uvicorn's command line: that is this process with one worker, the
    # parent of the worker processes with more (uvicorn's supervisor). Linux only: elsewhere None.
    for pid in ("self", str(os.getppid())):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if any(Path(a).name == "uvicorn" for a in argv[:2]) and "--workers" in argv[:-1]:
            value = argv[argv.index("--workers") + 1]
            return int(value) if value.isdigit() and int(value) > 0 else None
    return None


def divide_threads() -> int:
    """In `mlflow models serve --workers N`: torch threads = cores / N, as sweep workers divide them."""
    # N workers of `cores` threads each would oversubscribe the CPU and spin-wait in OpenMP. An
    # explicit OMP_NUM_THREADS (torch reads it at import) wins; outside the server nothing changes.
    workers = server_workers()
    if workers and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, cores() // workers))
    return torch.get_num_threads()
