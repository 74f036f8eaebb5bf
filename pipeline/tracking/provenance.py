"""Where a run comes from: the git commit, DVC's hashes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def git_commit(ignore: tuple[str, ...] = ()) -> str | None:
    """The current commit, with '-dirty' when tracked files other than `ignore` differ from it."""
    # Ignore what DVC itself changes: params.yaml in an experiment (the run logs the params) and
    # the stage's own outputs, which DVC removes before the stage runs.
    exclude = [f":(exclude){path}" for path in ignore]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *exclude]
        dirty = subprocess.run(status, capture_output=True, text=True)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def dvc_out_hash(path: str, lock_file: Path = Path("dvc.lock")) -> str | None:
    """The hash DVC recorded in dvc.lock for the output at `path`, if any."""
    if not lock_file.is_file():
        return None
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5")
    return None
