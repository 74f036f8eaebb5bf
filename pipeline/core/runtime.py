"""Device choice, seeding and determinism, shared by train and evaluate."""

from __future__ import annotations

import ctypes
import os
import platform
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.common.errors import ParamsError

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
    """Seed every generator and ask for deterministic kernels (also on CUDA), without filling new memory."""
    # Again here for callers that changed the env after import; too late only if CUDA ran already.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN, a guard against ops that read memory
    # nobody wrote. None of ours does (tests/test_runtime.py trains each network both ways, bit for
    # bit the same), and on the CPU the fills cost a few per cent of `best`'s step time (1.00-1.07x
    # in bench/augment_cost.py's "PyTorch's fill" row; PyTorch's notes call them a cost too).
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False


def gpu_driver_version() -> str | None:
    """The NVIDIA driver's version through NVML (nvidia-ml-py, which MLflow's GPU metrics use too)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # not installed, no NVIDIA driver
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def tune_malloc() -> None:
    """Keep glibc from returning memory to the OS after every step (measured 1.25-1.75x here).

    Training allocates and frees the same large activation buffers every batch; with glibc's
    defaults each one is mmap'd and unmapped again, costing page faults. Same effect as the
    MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_ variables, set from inside.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 256 << 20)


def release_memory() -> None:
    """Hand the heap's free pages back to the OS (tune_malloc keeps them); call between phases."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (else the platform's word for it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for autocast, or None for plain fp32; `auto` picks bf16 only where it is native."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
