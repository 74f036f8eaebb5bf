"""What this machine gives the process: its CPU count."""

from __future__ import annotations

import os


def cores() -> int:
    """The CPUs this process may run on (a Slurm or container cpuset counts, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
