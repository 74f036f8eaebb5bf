"""pipeline/tracking/tags.py: the names and values of every run tag (users filter on them)."""

import subprocess
import sys

import torch
from mlflow.utils import mlflow_tags

from pipeline.parallel.distributed import World
from pipeline.tracking import tags

from .helpers.repo import REPO


def test_provenance_tags_leave_out_what_is_unknown() -> None:
    assert tags.provenance_tags("abc", None) == {"data.train_md5": "abc"}
    full = tags.provenance_tags("abc", "1234-dirty", dvc_md5="def")
    assert full == {"data.train_md5": "abc", "data.dvc_md5": "def", "git_commit": "1234-dirty"}


def test_compute_tags_name_the_device_precision_and_world() -> None:
    cpu = tags.compute_tags(torch.device("cpu"), "fp32")
    assert cpu == {**tags.device_tags(torch.device("cpu")), "precision": "fp32"}
    assert cpu["device"] == "cpu" and cpu["threads"] == str(torch.get_num_threads())
    ddp = tags.compute_tags(torch.device("cpu"), "bf16", World(rank=0, size=2, backend="gloo"))
    assert ddp["world_size"] == "2" and ddp["backend"] == "gloo" and ddp["precision"] == "bf16"


def test_dvc_and_start_tags_come_from_the_environment() -> None:
    env = {"DVC_EXP_NAME": "tidy-lamb", "DVC_EXP_BASELINE_REV": "c0ffee", "OTHER": "x"}
    assert tags.dvc_tags(env) == {"dvc.exp_name": "tidy-lamb", "dvc.baseline_rev": "c0ffee"}
    assert tags.dvc_tags({"DVC_EXP_NAME": ""}) == {}
    # `mlflow run` named the run itself: the DVC experiment's name replaces it.
    assert tags.start_tags("tidy-lamb", "brave-owl-12", None, env)["mlflow.runName"] == "tidy-lamb"
    assert "mlflow.runName" not in tags.start_tags("tidy-lamb", "tidy-lamb", None, env)
    assert tags.start_tags("fast-nf16", "other", "lr-search", {}) == {"sweep": "lr-search"}


def test_evaluation_tags_nest_the_run_under_the_model_s_with_mlflow_s_own_names() -> None:
    made = tags.evaluation_tags("r1", {"DVC_EXP_NAME": "e"})
    assert made == {mlflow_tags.MLFLOW_PARENT_RUN_ID: "r1", "model_run_id": "r1", "dvc.exp_name": "e"}
    assert tags.RUN_NAME == mlflow_tags.MLFLOW_RUN_NAME


def test_trial_tags_from_start_to_end() -> None:
    start = tags.trial_tags("lr-search", "host:42", 7)
    assert start == {"sweep": "lr-search", "sweep.worker": "host:42", "sweep.trial": "7", "sweep.state": "RUNNING"}
    assert tags.trial_end_tags("COMPLETE") == {"sweep.state": "COMPLETE"}
    assert tags.trial_end_tags("PRUNED", diverged=True) == {"sweep.state": "PRUNED", "sweep.diverged": "true"}
    assert tags.trial_end_tags("FAIL", failure="gone")["sweep.failure"] == "gone"


def test_the_tags_module_loads_without_mlflow_or_serving() -> None:
    """bench/gpu_check reads device_tags on a bare GPU box; tracking never imports serving."""
    loaded = "sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow' or m.startswith('pipeline.serving'))"
    code = f"import sys, pipeline.tracking.tags; print({loaded})"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
