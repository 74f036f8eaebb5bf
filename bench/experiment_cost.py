"""What an experiment costs besides its training, measured on real stage processes and real DVC.

    python -m bench.experiment_cost              # needs data/raw and data/processed (`dvc repro preprocess`)

1. Each stage as its own process (`python -m pipeline.<stage>`, as DVC runs it) on the real data
   with the `fast` recipe, in a scratch folder with its own MLflow store (created beforehand, as
   in any repo after its first run): wall time; for train also the epochs' time, so that its fixed
   cost is wall minus epochs. Each stage runs `--rounds` times; the best round counts (other load
   on a shared machine only ever slows a run down).
2. `dvc exp run $(python -m pipeline.recipe fast)` in a scratch copy of the repository whose
   download and preprocess are cached: wall time against the training time inside it. Then a
   no-op `dvc repro` there.
3. MLflow's system metrics: CPU time its sampling thread takes per second, as a share of the
   cores training uses.

Prints a table and writes bench/experiment_cost.json. Not a test: the numbers depend on the machine.

    python -m bench.experiment_cost --against HEAD~1   # 1. only, this tree's code beside that revision's

measures step 1 with the working tree's code and with a git revision's, rounds alternating between
them, and writes bench/experiment_cost_against.json with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

from pipeline.recipe import load_recipe, set_flags

REPO = Path(__file__).resolve().parents[1]
EPOCH_LINE = re.compile(r"epoch \d+/\d+: .* \| ([\d.]+) s$", re.M)  # train's per-epoch log line


def env(root: Path, code: Path = REPO) -> dict[str, str]:
    """The stages' environment: this interpreter's venv first on PATH, the store under `root`, the
    pipeline's code from `code`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}"
    return {**environ, "DVC_ROOT": str(root), "PYTHONPATH": str(code)}


def timed(cmd: list[str], cwd: Path, environ: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr


def recipe_params(recipe: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in load_recipe(recipe, REPO / "recipes", REPO / "params.yaml").items():
        params[section].update(values)
    params["mlflow"]["experiment_name"] = "bench"
    return params


def stage_costs(raw: Path, recipe: str, rounds: int, codes: dict[str, Path] | None = None) -> dict[str, dict]:
    """Best-of-`rounds` wall time of preprocess, train and evaluate as processes, and train's epoch
    time, for each of `codes` (name: the pipeline's code; default this tree's), each in its own
    scratch folder and MLflow store; the rounds alternate the codes' order (a shared machine's
    load moves them alike). Returns {name: {stage: row}}."""
    codes = codes or {"this tree": REPO}
    stages = {
        "preprocess": ["--raw", str(raw.resolve()), "--out", "data/processed"],
        "train": ["--data", "data/processed", "--out", "models", "--checkpoint", "ckpt.pt"],
        "evaluate": ["--data", "data/processed", "--models", "models", "--out", "reports"],
    }
    best: dict[str, dict[str, dict[str, float]]] = {name: {} for name in codes}
    with tempfile.TemporaryDirectory() as tmp:
        works = {name: Path(tmp) / str(i) for i, name in enumerate(codes)}
        for work in works.values():
            work.mkdir()
            (work / "params.yaml").write_text(yaml.safe_dump(recipe_params(recipe), sort_keys=False))
        for round_ in range(rounds + 1):  # round 0 creates each MLflow store and is not counted
            for name in list(codes)[:: 1 if round_ % 2 == 0 else -1]:
                environ = env(works[name], codes[name])
                for stage, argv in stages.items():
                    seconds, log = timed([sys.executable, "-m", f"pipeline.{stage}", *argv], works[name], environ)
                    epochs = sum(float(s) for s in EPOCH_LINE.findall(log))
                    row = {"wall": seconds, "epochs": epochs, "fixed": seconds - epochs}
                    print(
                        f"round {round_} ({name}): {stage:10s} wall {seconds:6.2f} s, epochs {epochs:5.2f} s",
                        flush=True,
                    )
                    if round_ and (stage not in best[name] or row["fixed"] < best[name][stage]["fixed"]):
                        best[name][stage] = row
    return best


def scratch_repo(dest: Path) -> Path:
    """A git copy of the repository's files (committed or not) sharing its DVC cache: download
    and preprocess restore from DVC's run cache instead of running."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    environ = env(dest) | {
        f"GIT_{who}_{what}": "bench" for who in ("AUTHOR", "COMMITTER") for what in ("NAME", "EMAIL")
    }
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "bench"],
        ["dvc", "config", "--local", "cache.dir", str(REPO / ".dvc" / "cache")],
        ["dvc", "repro", "preprocess"],
    ):
        timed(cmd, dest, environ)
    return dest


def exp_run_cost(recipe: str) -> dict[str, float]:
    """Wall time of `dvc exp run` of the recipe with the data stages cached, against its training."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = scratch_repo(Path(tmp) / "repo")
        environ = env(repo)
        flags = set_flags(load_recipe(recipe, repo / "recipes", repo / "params.yaml"))
        # The store and experiment exist in any repository after its first run: create them first.
        create = "from pipeline import tracking; tracking.connect(); tracking.experiment_id('mnist-cnn')"
        timed([sys.executable, "-c", create], repo, environ)
        seconds, log = timed(["dvc", "exp", "run", *flags], repo, environ)
        assert "Running stage 'preprocess'" not in log, log
        epochs = sum(float(s) for s in EPOCH_LINE.findall(log))
        noop, out = timed(["dvc", "repro"], repo, environ)
        assert "up to date" in out, out
        return {"wall": seconds, "epochs": epochs, "ratio": seconds / epochs, "noop_repro": noop}


def system_metrics_share(seconds: float = 20.0) -> dict[str, float]:
    """CPU time MLflow's system-metrics thread takes (sampling every 2 s, as train does), as a share
    of the cores that training keeps busy."""
    import mlflow
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_system_metrics_sampling_interval(2)
        with mlflow.start_run(log_system_metrics=False):
            pass  # the store exists: what follows is the monitor alone
        idle_start = time.process_time()
        time.sleep(seconds)
        idle = time.process_time() - idle_start
        start = time.process_time()
        with mlflow.start_run(log_system_metrics=True):
            time.sleep(seconds)
        busy = time.process_time() - start - idle
    cores = torch.get_num_threads()
    return {"cpu_seconds_per_second": busy / seconds, "share_of_training_cores": busy / seconds / cores}


def side_by_side(raw: Path, recipe: str, rounds: int, rev: str) -> dict:
    """The stages' costs with this working tree's code and with git revision `rev`'s (stage_costs:
    rounds alternating); the best round of each."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        best = stage_costs(raw, recipe, rounds, {"this tree": REPO, rev: Path(tmp)})
    ours, theirs = best["this tree"], best[rev]
    ratio = {stage: ours[stage]["fixed"] / theirs[stage]["fixed"] for stage in ours}
    return {"stages_seconds": ours, "against": rev, "against_seconds": theirs, "fixed_cost_ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--against", metavar="REV", help="the stages only: this tree's code beside revision REV's, rounds alternating"
    )
    args = parser.parse_args()
    if args.against:
        results = {"date": date.today().isoformat(), "recipe": args.recipe}
        results |= side_by_side(args.raw, args.recipe, args.rounds, args.against)
        write(results, args.out or Path("bench/experiment_cost_against.json"))
        return
    results = {
        "date": date.today().isoformat(),
        "recipe": args.recipe,
        "stages_seconds": stage_costs(args.raw, args.recipe, args.rounds)["this tree"],
        "dvc_exp_run_seconds": exp_run_cost(args.recipe),
        "system_metrics": system_metrics_share(),
    }
    write(results, args.out or Path("bench/experiment_cost.json"))


def write(results: dict, out: Path) -> None:
    print(json.dumps(results, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
