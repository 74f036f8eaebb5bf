"""The real pipeline: `dvc repro` in a temporary copy of the repo, on synthetic data, tiny params."""

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from .helpers.browser import Browser, Visit, chromium
from .helpers.repo import needed, sh, sh_env, synthetic_repo
from .helpers.tracking import evaluations_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git+DVC copy of the repo whose params point at synthetic IDX files; `dvc repro` run once."""
    root = tmp_path_factory.mktemp("e2e")
    repo = synthetic_repo(root)
    (root / "first-repro.log").write_text(sh(repo, "dvc", "repro"))
    return repo


def test_repro_writes_every_declared_output(repo) -> None:
    output = (repo.parent / "first-repro.log").read_text()
    for stage in ("download", "preprocess", "train", "evaluate"):
        assert f"Running stage '{stage}'" in output
    assert "Warning" not in output  # e.g. MLflow's "Add type hints to the `predict` method"
    for path in (
        "data/raw/train-images-idx3-ubyte",
        "data/processed/train.pt",
        "models/model.pt",
        "models/history.csv",
        "models/mlflow_run.json",
        "reports/metrics.json",
        "reports/confusion_matrix.png",
        "reports/misclassified.png",
        "reports/per_class.csv",
    ):
        assert (repo / path).is_file(), path
    assert (repo / "mlflow.db").is_file()  # MLflow's default store at the repo root


def test_second_repro_does_nothing_and_status_is_clean(repo) -> None:
    out = sh(repo, "dvc", "repro")
    assert "Running stage" not in out and "up to date" in out
    assert "up to date" in sh(repo, "dvc", "status")


def test_mlflow_run_holds_the_whole_story(repo, monkeypatch) -> None:
    info = json.loads((repo / "models/mlflow_run.json").read_text())
    # The env var, not mlflow.set_tracking_uri: that global outlives the test and would win over
    # the MLFLOW_TRACKING_URI that later tests set.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.nf"] == "8"
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    (evaluation,) = evaluations_of(client, run.info.run_id)  # evaluate's own run, nested under train's
    assert evaluation.data.params["evaluate.batch_size"] == "256"
    assert evaluation.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert {"git_commit", "device", "torch_version", "data.train_md5", "data.dvc_md5"} <= set(run.data.tags)
    assert run.inputs.dataset_inputs[0].dataset.name == "mnist-train"
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in artifacts and "evaluation/metrics.json" in artifacts
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    import numpy as np

    assert model.predict(np.zeros((3, 1, 28, 28), dtype=np.float32)).shape == (3, 10)


def test_dvc_metrics_params_and_plots(repo) -> None:
    assert "test_accuracy" in sh(repo, "dvc", "metrics", "show")
    sh(repo, "dvc", "params", "diff")
    out = sh(repo, "dvc", "plots", "show", "--json")
    assert "loss" in out and "confusion" in out


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def client_of(repo: Path) -> MlflowClient:
    """A client of the repository's own store, which every experiment logs to."""
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}", registry_uri=f"sqlite:///{repo / 'mlflow.db'}")


def runs_named(repo: Path, name: str) -> list:
    client = client_of(repo)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], f"attributes.run_name = '{name}'")


def test_dvc_exp_run_in_a_temporary_copy_logs_to_the_repo_store(repo) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "lr")
    out = sh(repo, "dvc", "exp", "run", "--temp", "-n", "short", "-S", "train.epochs=1")
    assert "Running stage 'train'" in out
    assert "train.epochs" in sh(repo, "dvc", "exp", "show", "--no-pager", "--csv")
    (run,) = runs_named(repo, "short")  # named after the experiment, in the repo's mlflow.db
    assert run.info.status == "FINISHED" and run.data.tags["dvc.exp_name"] == "short"
    assert run.data.tags["dvc.baseline_rev"] == sh(repo, "git", "rev-parse", "HEAD").strip()
    assert not run.data.tags["git_commit"].endswith("-dirty")  # params.yaml differs, the code does not
    (evaluation,) = evaluations_of(client_of(repo), run.info.run_id)
    assert "test_accuracy" in evaluation.data.metrics and evaluation.data.tags["dvc.exp_name"] == "short"


def test_changing_an_evaluate_param_re_evaluates_only_and_keeps_the_training_run_finished(repo) -> None:
    """`dvc exp run -S evaluate.batch_size=128` after a finished pipeline: evaluate alone runs, in a run
    of its own; the training run stays FINISHED with its params; both evaluations stay on the model."""
    client = client_of(repo)
    run_id = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    before = client.get_run(run_id)
    out = sh(repo, "dvc", "exp", "run", "--temp", "-n", "rebatch", "-S", "evaluate.batch_size=128")
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.data.params == before.data.params
    assert not any(key.startswith(("evaluate.", "register.")) for key in after.data.params)
    evaluations = evaluations_of(client, run_id)
    assert [e.data.params["evaluate.batch_size"] for e in evaluations] == ["128", "256"]
    assert {e.info.status for e in evaluations} == {"FINISHED"}
    assert evaluations[0].data.tags["dvc.exp_name"] == "rebatch"
    (classifier,) = client.search_logged_models(
        experiment_ids=[after.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = 'classifier'"
    )
    linked = {m.run_id for m in classifier.metrics if m.key == "test_accuracy" and m.dataset_name == "mnist-test"}
    assert linked == {e.info.run_id for e in evaluations}
    # The model is registered once, and `champion` is on the best version.
    versions = client.search_model_versions("name = 'mnist-cnn'")
    assert len([v for v in versions if v.run_id == run_id]) == 1
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    assert float(champion.tags["test_accuracy"]) == max(float(v.tags["test_accuracy"]) for v in versions)


def start_queue(repo: Path, jobs: int, **env: str) -> None:
    """`dvc queue start -j jobs`; its workers keep running in the background (no pipes to wait on)."""
    cmd = ["dvc", "queue", "start", "-j", str(jobs)]
    subprocess.run(cmd, cwd=repo, env=sh_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def wait_for_queue(repo: Path, timeout: float = 600) -> str:
    """`dvc queue status` once nothing is queued or running and the workers have exited.

    Idle workers stop ~10 s after the queue empties; a `dvc queue start` meanwhile can lose its
    task to their shutdown (treeverse/dvc-task#77, treeverse/dvc#10562), hence the wait.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sh(repo, "dvc", "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status) and "0 active, 0 idle" in status:
            return status
        time.sleep(2)  # each `dvc queue status` costs a core for about a second
    raise AssertionError(f"queue still busy after {timeout} s:\n{status}")


def test_a_queued_sweep_runs_in_parallel_each_experiment_one_named_run_in_the_repo_store(repo) -> None:
    """A 2-point grid with `dvc exp run --queue -S a,b` run by 2 workers on the embedded SQLite store."""
    out = sh(repo, "dvc", "exp", "run", "--queue", "-S", "mlflow.sweep=grid", "-S", "train.lr=0.002,0.004")
    assert out.count("Queued experiment") == 2
    start_queue(repo, 2, OMP_NUM_THREADS="1")  # docs/experiments.md's command: the cores divided between 2 workers
    status = wait_for_queue(repo)
    assert status.count("Success") >= 2 and "Failed" not in status, status

    client = client_of(repo)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.sweep = 'grid'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.002", "0.004"]
    assert {r.data.tags["threads"] for r in runs} == {"1"}  # DVC's queue workers pass the environment on
    # (Whether DVC's two workers overlapped depends on how fast each started; the store's parallel
    # writers are tested for certain in tests/test_experiments.py.)
    a = runs[0]
    # Each run's name is its DVC experiment's, and `dvc exp show` shows which run each made.
    shown = sh(repo, "dvc", "exp", "show", "--no-pager", "--csv")
    for run in runs:
        assert run.info.run_name == run.data.tags["dvc.exp_name"]
        assert f"{run.info.run_name}," in shown and run.info.run_id in shown
        # Artifacts live at the repo root, not in the deleted temporary copy: the model loads.
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        assert {m.name for m in models} == {"model", "classifier"}
        assert all(Path(m.artifact_location.removeprefix("file://")).is_relative_to(repo / "mlruns") for m in models)
        assert all((Path(m.artifact_location.removeprefix("file://")) / "MLmodel").is_file() for m in models)

    # After `dvc exp apply`, the run file DVC committed with the experiment names a run that exists.
    sh(repo, "dvc", "exp", "apply", a.info.run_name)
    info = json.loads((repo / "models/mlflow_run.json").read_text())
    assert info["run_id"] == a.info.run_id and info["tracking_uri"] is None
    assert "up to date" in sh(repo, "dvc", "status")


def test_dvc_queue_kill_leaves_no_run_running(repo) -> None:
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "long", "-S", "mlflow.sweep=null", "-S", "train.epochs=2000")
    start_queue(repo, 1)
    deadline = time.monotonic() + 300
    while not runs_named(repo, "long") and time.monotonic() < deadline:  # training has started
        time.sleep(0.5)
    assert runs_named(repo, "long"), sh(repo, "dvc", "queue", "status") + sh(
        repo, "dvc", "queue", "logs", "long", ok=False
    )
    sh(repo, "dvc", "queue", "kill", "long")
    wait_for_queue(repo)
    (run,) = runs_named(repo, "long")
    assert run.info.status == "KILLED"


def vega_specs(page: Path) -> dict[str, dict]:
    """The Vega-Lite spec of each interactive plot in a page DVC wrote, by plot id."""
    found = re.findall(r"var spec = (\{.*?\});\s*vegaEmbed\('#([^']+)'", page.read_text(), re.S)
    return {plot_id: json.loads(spec) for spec, plot_id in found}


def check_drawn_offline(visit: Visit, folder: Path, images: int) -> None:
    """Every plot drew (a canvas with coloured marks, or loaded images); nothing left the machine."""
    for plot in visit.plots:
        if plot["id"].endswith("_png"):
            assert len(plot["images"]) == images and all(plot["images"]), plot
        else:
            assert plot["canvas"] and plot["coloured"] > 100, plot  # lines or cells, not just axes
    local = folder.resolve().as_uri() + "/"
    assert all(url.startswith(local) for url in visit.requests), visit.requests
    assert not visit.errors, visit.errors


def test_plots_show_and_diff_draw_offline_in_a_browser(repo, tmp_path) -> None:
    """`dvc plots show` and `dvc plots diff HEAD <exp>` in headless Chromium with no network:
    each plot of dvc.yaml once, titled and labelled, drawn; the diff overlays both revisions."""
    binary = needed(chromium(), "no headless browser: `apt-get install chromium` (.ci/run does)")
    template = repo / "plots/page.html"  # .dvc/config's plots.html_template, copied from the checkout
    needed(template if template.is_file() else None, "no plots/page.html: run `make setup` first")
    plots = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]  # {id: props} or an image's path
    drawn = {name: props for plot in plots if isinstance(plot, dict) for name, props in plot.items()}
    images = [plot for plot in plots if isinstance(plot, str)]
    assert set(drawn) == {"loss", "accuracy", "confusion"} and images == ["reports/misclassified.png"]

    experiments = sh(repo, "dvc", "exp", "list", "--name-only").split()
    if not experiments:  # run on its own (-k): make what test_dvc_exp_run_with_set_param makes
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", "results")
        sh(repo, "dvc", "exp", "run", "-S", "train.epochs=1")
        experiments = sh(repo, "dvc", "exp", "list", "--name-only").split()
    experiment = experiments[-1]
    sh(repo, "dvc", "plots", "show", "-o", str(tmp_path / "show"))
    sh(repo, "dvc", "plots", "diff", "HEAD", experiment, "-o", str(tmp_path / "diff"))
    with Browser(binary, timeout=20) as browser:
        show = browser.visit(tmp_path / "show/index.html", ready=len(plots))
        diff = browser.visit(tmp_path / "diff/index.html", ready=len(plots))
    (repo.parent / "plots-show.png").write_bytes(show.screenshot)  # to look at when this fails
    (repo.parent / "plots-diff.png").write_bytes(diff.screenshot)

    for name, visit, revisions in (("show", show, {"workspace"}), ("diff", diff, {"HEAD", experiment})):
        ids = [plot["id"] for plot in visit.plots]
        assert ids == [*drawn, "reports_misclassified_png"], ids  # each plot once, in dvc.yaml's order
        check_drawn_offline(visit, tmp_path / name, images=len(revisions))
        specs = vega_specs(tmp_path / name / "index.html")
        assert set(specs) == set(drawn), specs.keys()
        for plot_id, spec in specs.items():
            props, text = drawn[plot_id], json.dumps(spec)
            assert spec["title"]["text"] == props["title"]
            assert f'"title": "{props["x_label"]}"' in text and f'"title": "{props["y_label"]}"' in text
            # `diff` overlays the revisions in each chart: their points share one spec.
            assert {point["rev"] for point in spec["data"]["values"]} == revisions, plot_id


def test_retraining_gives_the_same_bytes_and_a_second_repro_at_once_stops_with_dvc_lock_message(repo) -> None:
    """Same params, data and machine through the real stage: the same bytes (weights and every
    train/val metric). Meanwhile a second `dvc repro` stops at once; the first finishes whole."""
    # Trained here first: what an earlier test left may come from a queued experiment trained with
    # OMP_NUM_THREADS=1, and another thread count sums in another order.
    sh(repo, "dvc", "repro", "--force", "--single-item", "train")
    before = {p: md5(repo / p) for p in ("models/model.pt", "models/history.csv")}
    first = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", "train"],
        cwd=repo,
        env=sh_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (repo / ".dvc/tmp/rwlock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # the first holds the repository lock while its stage runs
    start = time.monotonic()
    out = sh(repo, "dvc", "repro", ok=False)
    assert time.monotonic() - start < 10, "the second repro waited instead of stopping"
    assert "is busy, it is being blocked by" in out and "dvc repro --force" in out, out  # DVC names the holder
    assert first.wait(timeout=300) == 0, first.stdout.read()
    assert {p: md5(repo / p) for p in before} == before  # the first's outputs, whole and identical
    sh(repo, "dvc", "repro")  # evaluate, for the new run the first made


def test_dvc_remote_carries_results_to_a_fresh_clone(repo, tmp_path) -> None:
    """push from this clone, pull into a new one: nothing to reproduce there."""
    sh(repo, "dvc", "repro")  # whatever the tests above changed, bring the workspace up to date
    sh(repo, "dvc", "remote", "add", "--default", "--force", "shared", str(tmp_path / "remote"))
    # Every output is cached, the run file and metrics too (run-cache hits need them in the remote):
    # git holds dvc.lock and the .gitignore files only.
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results")
    assert sh(repo, "git", "ls-files", "models", "reports").split() == ["models/.gitignore", "reports/.gitignore"]
    sh(repo, "dvc", "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models/model.pt").exists()
    sh(clone, "dvc", "pull")
    for path in ("models/model.pt", "models/mlflow_run.json", "reports/metrics.json", "models/history.csv"):
        assert md5(clone / path) == md5(repo / path), path
    out = sh(clone, "dvc", "repro")
    assert "Running stage" not in out and "up to date" in out
    assert "up to date" in sh(clone, "dvc", "status")


def test_changing_lr_reruns_train_only_a_failure_leaves_no_output_and_dvc_redoes_it(repo) -> None:
    """Training that diverges: an error naming the epoch, no model, `dvc status` says train changed;
    the data stages, whose params did not change, do not run, then or after the fix. (The module's last
    test: it leaves the workspace to be reproduced.)"""
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["train"]["lr"] = 1e30
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "train.lr" in sh(repo, "dvc", "params", "diff")
    out = sh(repo, "dvc", "repro", ok=False)
    assert "Running stage 'train'" in out
    assert "Running stage 'download'" not in out and "Running stage 'preprocess'" not in out
    assert "error: loss became NaN or infinite at epoch 1" in out and "Traceback" not in out
    assert not (repo / "models/model.pt").exists()  # DVC removed it; train wrote no new one
    assert not list((repo / "models").glob(".*.tmp"))  # and no half-written file is left
    status = sh(repo, "dvc", "status")
    assert "train:" in status and "up to date" not in status
    (repo / "params.yaml").write_text(original)
    status = sh(repo, "dvc", "status")  # what the next `dvc repro` runs (retraining is tested above)
    assert "train:" in status and "evaluate:" in status and "deleted:" in status
    assert "download:" not in status and "preprocess:" not in status
