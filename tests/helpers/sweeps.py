"""Sweep files for tests: a tiny 2-trial grid that prunes, with any key changed."""

from __future__ import annotations

from pathlib import Path

import yaml

# Two learning rates on a 2-point grid, the good one first (grid seed 1): the second trial is
# behind the first after epoch 1 and the median pruner stops it there.
TINY = {
    "params": {"train.lr": {"type": "categorical", "choices": [0.003, 1e-6]}},
    "fixed": {"train.epochs": 3},
    "objective": "val_accuracy",
    "trials": 2,
    "sampler": {"name": "grid", "seed": 1},
    "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
    "heartbeat": 1,
}


def write_sweep(folder: Path, name: str = "tiny", **changes) -> Path:
    """folder/sweeps/<name>.yaml: the tiny sweep with `changes` (top-level keys) applied."""
    path = folder / "sweeps" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({**TINY, **changes}, sort_keys=False))
    return path
