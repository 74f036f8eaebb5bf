"""`--jobs K` on one machine: K worker processes (`python -m pipeline.sweep run ... --worker i/K`),
the cores or GPUs divided between them. Imports neither torch nor MLflow: the workers do."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from pipeline.common.errors import PipelineError
from pipeline.common.system import cores
from pipeline.sweep import study as studies
from pipeline.sweep.spec import Sweep

log = logging.getLogger(__name__)


def gpus() -> list[str]:
    """The GPUs the workers may use, as CUDA_VISIBLE_DEVICES names them (or all NVML counts)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import pynvml  # nvidia-ml-py: light, unlike torch.cuda

        pynvml.nvmlInit()
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no NVIDIA driver
        return []


def start_local(sweep: Sweep, url: str, data: Path, jobs: int, folder: Path) -> None:
    """K worker processes on this machine: each gets cores / K threads, or its own GPU on CUDA."""
    devices, threads = gpus(), max(1, cores() // jobs)
    if devices and jobs > len(devices):
        log.warning("%d jobs on %d GPU(s): some GPUs run several trials at once", jobs, len(devices))
    log.info("%d workers, %s each", jobs, f"one GPU and {threads} thread(s)" if devices else f"{threads} thread(s)")
    studies.open_study(sweep, url, seed=None, attrs={})  # created once, before the workers race to
    procs = []
    for i in range(jobs):
        # The storage URL through the environment: a password in it stays out of `ps`.
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "SWEEP_STORAGE": url}
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
        cmd = [sys.executable, "-m", "pipeline.sweep", "run", sweep.name, "--data", str(data), "--sweeps", str(folder)]
        cmd += ["--worker", f"{i}/{jobs}"]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=_prefix, args=(proc, f"[worker {i}] "), daemon=True).start()
        procs.append(proc)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt as e:  # Ctrl-C reached the workers too (one process group); SIGTERM did not
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        e.add_note("the study keeps every finished trial; run the command again to go on")
        raise
    if failed := [f"worker {i} exited {c}" for i, c in enumerate(codes) if c]:
        kept = "the study keeps every finished trial: run the command again to go on"
        raise PipelineError(f"{', '.join(failed)}; {kept}")


def _prefix(proc: subprocess.Popen, prefix: str) -> None:
    """A worker's log lines on our stderr, each marked with the worker (its stderr is a pipe, so
    its per-batch progress bars stay off)."""
    for line in proc.stderr:
        sys.stderr.write(prefix + line)
