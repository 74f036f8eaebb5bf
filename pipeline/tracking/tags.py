"""Every tag the pipeline puts on an MLflow run, built here and nowhere else: small functions that
return dicts, which the train stage, the evaluation run and the sweep's trials set.

Users filter on these names (`tags.sweep = 'lr-search'`, `tags.git_commit`, `tags.device`): a
renamed tag breaks their searches. Imports torch but not MLflow (bench/gpu_check reads
device_tags on a bare GPU box).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from pipeline.core import runtime

if TYPE_CHECKING:  # a type hint only: tracking imports no training code
    from pipeline.parallel.distributed import World

# MLflow's reserved tags (mlflow.utils.mlflow_tags), spelled out so that this module loads without MLflow.
PARENT_RUN_ID = "mlflow.parentRunId"  # nests a run under another in the UI
RUN_NAME = "mlflow.runName"


def device_tags(device: torch.device) -> dict[str, str]:
    """What ran the work: device, and the torch/CUDA/cuDNN versions and the GPU's driver."""
    # Threads too: the CPU's sums split across them, so equal weights need equal thread counts.
    tags = {"device": str(device), "torch_version": torch.__version__, "threads": str(torch.get_num_threads())}
    # Where: DVC's run-cache serves a result to any machine with the same params, code and data
    # (docs/caching.md), so the run says which machine and chip computed it.
    tags["host"] = platform.node()
    if device.type == "cpu":
        tags["device_name"] = runtime.cpu_name()
        tags["cpu_native_bf16"] = str(runtime.cpu_has_native_bf16()).lower()
    if device.type == "cuda":
        tags["cuda_version"] = str(torch.version.cuda)
        tags["cudnn_version"] = str(torch.backends.cudnn.version())
        tags["device_name"] = torch.cuda.get_device_name(device)
        tags["gpu_driver_version"] = runtime.gpu_driver_version() or "unknown"
    return tags


def compute_tags(device: torch.device, precision: str, world: World | None = None) -> dict[str, str]:
    """How the training computed: the device (device_tags), `precision` (bf16 or fp32) and, for the
    train stage, the number of processes and their backend."""
    tags = {**device_tags(device), "precision": precision}
    if world is not None:
        tags |= {"world_size": str(world.size), "backend": world.backend}
    return tags


def provenance_tags(data_md5: str, commit: str | None, dvc_md5: str | None = None) -> dict[str, str]:
    """Where the run comes from: the MD5 of train.pt, the git commit (provenance.git_commit), and
    the hash DVC recorded for the data; those unknown are left out."""
    tags = {"data.train_md5": data_md5}
    if dvc_md5:
        tags["data.dvc_md5"] = dvc_md5
    if commit:
        tags["git_commit"] = commit
    return tags


def dvc_tags(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The DVC experiment that made the run: its name and the commit it started from."""
    names = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
    return {tag: environ[var] for var, tag in names.items() if environ.get(var)}


def start_tags(name: str, started_as: str, sweep: str | None, environ: Mapping[str, str] = os.environ) -> dict:
    """The tags of a run the train stage starts or rejoins as `name` (MLflow named it `started_as`):
    its DVC experiment and its sweep (params.yaml's mlflow.sweep); a run `mlflow run` made takes the DVC name."""
    tags = dvc_tags(environ) | ({"sweep": sweep} if sweep else {})
    if tags.get("dvc.exp_name") and started_as != name:
        tags[RUN_NAME] = name
    return tags


def model_run_tag(model_run_id: str) -> dict[str, str]:
    """The run that trained the model an evaluation run scores."""
    return {"model_run_id": model_run_id}


def cache_hit_tags(exp_name: str, model_run_id: str) -> dict[str, str]:
    """An `mlflow run` whose training DVC restored from its run-cache: its DVC experiment, the hit,
    and the run that trained the model (pipeline.project)."""
    return {**dvc_tags({"DVC_EXP_NAME": exp_name}), "dvc.run_cache": "hit", **model_run_tag(model_run_id)}


def evaluation_tags(model_run_id: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """An evaluation run's: nested under the run that trained the model, and its DVC experiment."""
    return {PARENT_RUN_ID: model_run_id, **model_run_tag(model_run_id), **dvc_tags(environ)}


def trial_tags(sweep: str, worker: str, number: int) -> dict[str, str]:
    """A sweep trial's run (beside its compute and provenance tags): the sweep, the worker process
    that runs it (host:pid) and the trial's number; RUNNING until trial_end_tags."""
    return {"sweep": sweep, "sweep.worker": worker, "sweep.trial": str(number), "sweep.state": "RUNNING"}


def recipe_tags(recipe: str, seed: int) -> dict[str, str]:
    """A run of a recipe on one of several seeds (bench/sweep.py --seeds): `tags.recipe = 'best'`
    picks a recipe's seeds out of the experiment, to compare in the chart view."""
    return {"recipe": recipe, "recipe.seed": str(seed)}


def trial_end_tags(state: str, diverged: bool = False, failure: str | None = None) -> dict[str, str]:
    """How a trial ended: Optuna's state (COMPLETE, PRUNED, FAIL), whether its loss diverged, and why it failed."""
    tags = {"sweep.state": state}
    if diverged:
        tags["sweep.diverged"] = "true"
    if failure:
        tags["sweep.failure"] = failure
    return tags
