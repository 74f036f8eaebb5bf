"""Device choice, seeding and determinism, shared by train and evaluate."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from pipeline.params import ParamsError

# cuBLAS reads this once, when CUDA creates its first handle; setting it at import, before any
# stage touches CUDA, is what makes matrix products deterministic on the GPU. ":4096:8" is the
# value the PyTorch reproducibility notes give.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pick_device(name: str, key: str) -> torch.device:
    """Resolve `auto` (CUDA, else MPS, else CPU) or check that an explicit device exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise ParamsError(f"{key} is {name!r} but this machine has {count} CUDA device(s); use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ParamsError(f"{key} is 'mps' but MPS is not available here; use auto or cpu")
    return device


def make_deterministic(seed: int) -> None:
    """Seed every generator and ask for deterministic kernels (also on CUDA)."""
    # Again here for callers that changed the env after import; too late only if CUDA ran already.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def device_tags(device: torch.device) -> dict[str, str]:
    """What ran the work: device, and the torch/CUDA/cuDNN versions."""
    tags = {"device": str(device), "torch_version": torch.__version__}
    if device.type == "cuda":
        tags["cuda_version"] = str(torch.version.cuda)
        tags["cudnn_version"] = str(torch.backends.cudnn.version())
        tags["device_name"] = torch.cuda.get_device_name(device)
    return tags
