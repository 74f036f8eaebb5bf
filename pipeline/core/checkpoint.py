"""The two files train writes from a network, in one place (torch only, no MLflow):

- the model file (`models/model.pt`, and the served model's copy of it): the state dict, the
  ModelConfig that made it and the class names; save_model / load_model.
- the training checkpoint (resumed after the last complete epoch): the training state with the
  fingerprint of the settings and data that made it; fingerprint / load_training / save_training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.common.errors import DataError
from pipeline.common.files import save_torch
from pipeline.core.model import build_model
from pipeline.data.datasets import NUM_CLASSES
from pipeline.params import ModelConfig, TrainConfig

log = logging.getLogger(__name__)
DIGITS = tuple(str(k) for k in range(NUM_CLASSES))  # the class names of model files that store none (MNIST's)
# Settings a resumed training may change: the epoch count, and the number of processes and machines
# (the same math on any; see distributed.shard).
RESUMABLE_KEYS = ("epochs", "nproc", "nnodes", "rdzv_endpoint")


def save_model(path: Path, model: nn.Module, model_cfg: ModelConfig, classes: list[str] | None = None, **extra) -> None:
    """Write the weights (on the CPU) with the config that made them, atomically; `classes` (the
    dataset's class names) when given, `extra` entries (train's settings, history) beside them."""
    state: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": dataclasses.asdict(model_cfg),
        **extra,
    }
    if classes is not None:
        state["classes"] = list(classes)
    save_torch(path, state)


def load_model(path: Path, expected: ModelConfig | None = None) -> tuple[nn.Module, tuple[str, ...]]:
    """The network of a model file, on the CPU in eval mode, and its class names (the ten digits for
    files that store none); with `expected`, refuse a file made with other model settings."""
    if not path.is_file():
        raise DataError(f"{path} not found; run the train stage first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path} is not a model checkpoint written by train ({type(e).__name__}: {e})") from e
    saved = _model_config(path, checkpoint)
    if expected is not None and saved != expected:
        diff = ", ".join(
            f"model.{k}={getattr(saved, k)!r} in the file but {v!r} in params.yaml"
            for k, v in dataclasses.asdict(expected).items()
            if getattr(saved, k) != v
        )
        raise DataError(f"{path} was trained with other model settings ({diff}); re-run the train stage")
    classes = checkpoint.get("classes", DIGITS)
    if not isinstance(classes, list | tuple) or len(classes) != NUM_CLASSES or not all(_name(c) for c in classes):
        raise DataError(f"{path}: 'classes' must be {NUM_CLASSES} class names, got {classes!r:.200}")
    model = build_model(saved)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as e:
        raise DataError(f"{path}: weights do not fit the network of {saved} ({str(e)[:300]})") from e
    return model.eval(), tuple(classes)


def _model_config(path: Path, checkpoint: Any) -> ModelConfig:
    """The ModelConfig of a model file, every field checked as params.yaml's own (a file may come
    from anyone: `"nf": 32.0` must not reach the network's constructor)."""
    from pipeline.params import parse_section  # params' YAML loading stays out of the compute core's imports

    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DataError(f"{path} is not a model checkpoint written by train (no state_dict mapping)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint["state_dict"].items()):
        raise DataError(f"{path}: state_dict must map names to tensors")
    try:
        return parse_section("model", ModelConfig, checkpoint.get("model"), path)
    except ValueError as e:  # ParamsError: the field's name and what was expected
        raise DataError(f"{path}: its model settings are not valid: {e}") from None


def _name(value: Any) -> bool:
    """A class name as plots and answers show it: a short printable string."""
    return isinstance(value, str) and 0 < len(value) <= 100 and value.isprintable()


def file_md5(path: Path) -> str:
    """The MD5 of a file, streamed: no second copy of the data in memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def fingerprint(model_cfg: ModelConfig, cfg: TrainConfig, data_md5: str) -> dict[str, Any]:
    """What a training checkpoint must match to be resumed: every setting but RESUMABLE_KEYS, and the data."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_KEYS}
    return {"model": dataclasses.asdict(model_cfg), "train": train, "data_md5": data_md5}


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """The keys whose values differ, `a.b: old -> new`, comma-separated ('' if none)."""
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            if sub := differences(a, b, f"{prefix}{k}."):
                parts.append(sub)
        elif a != b:
            parts.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return ", ".join(parts)


def load_training(
    path: Path, expected: dict[str, Any], epochs: int, discard: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any] | None:
    """The training checkpoint at `path` if the same settings and data made it (see fingerprint) and
    it is not past `epochs`, else None, saying why. A readable one that is not resumed goes to `discard`."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable: say so and start fresh
        log.warning("ignoring unreadable checkpoint %s (%s); starting fresh", path, e)
        return None
    not_ours = "ignoring checkpoint %s: not a training state written by train; starting fresh"
    if not (isinstance(state, dict) and isinstance(state.get("fingerprint"), dict)):
        log.warning(not_ours, path)
        return None
    if state["fingerprint"] != expected:
        diff = differences(state["fingerprint"], expected)
        log.warning("checkpoint %s was made with other settings (%s); starting fresh", path, diff)
    elif not _training_state(state):  # what fit and train read of it, before they read it
        log.warning(not_ours, path)
        return None
    elif len(state["history"]) > epochs:
        log.warning("checkpoint %s is past train.epochs=%d; starting fresh", path, epochs)
    else:
        log.info("resuming from %s after epoch %d", path, len(state["history"]))
        return state
    if discard is not None:
        discard(state)
    return None


def _training_state(state: Any) -> bool:
    """Whether `state` has the fields train reads of it, and fit's fields of the right type."""
    kinds = {"history": list, "fingerprint": dict, "run_id": str}
    optional = {
        "rows": list,
        "model": dict,
        "optimizer": dict,
        "scheduler": dict,
        "ema": dict,
        "generator": torch.Tensor,
        "torch_rng": torch.Tensor,
    }
    if not isinstance(state, dict) or not all(isinstance(state.get(k), t) for k, t in kinds.items()):
        return False
    typed = all(state.get(k) is None or isinstance(state[k], t) for k, t in optional.items())
    return typed and all(isinstance(r, dict) for r in state["history"])


def save_training(path: Path, state: dict[str, Any], expected: dict[str, Any], run_id: str, rows: list) -> None:
    """Write fit's state after an epoch, atomically, with every epoch's logged `rows`, the fingerprint
    it must match to be resumed, and the MLflow run it belongs to."""
    save_torch(path, {**state, "rows": rows, "fingerprint": expected, "run_id": run_id})
