"""Tiny trainings in-process: the compute core on synthetic digits, no files, no MLflow."""

from __future__ import annotations

import torch

from pipeline.core import engine
from pipeline.core.model import build_model
from pipeline.params import ModelConfig, TrainConfig

from .data import tiny_split


def fit_tiny(cfg: TrainConfig, arch: str = "fast", n: int = 192, **fit) -> tuple[list[dict], dict]:
    """A seeded `nf=8` net (channels_last) fitted on n synthetic digits (also its validation split):
    (its history, its weights). `fit` goes to `engine.fit` as it is."""
    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig(arch=arch, nf=8)).to(memory_format=torch.channels_last)
    data = tiny_split(n)
    history = engine.fit(model, data, data, cfg, **fit)
    return history, model.state_dict()
