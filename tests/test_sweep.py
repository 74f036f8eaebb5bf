"""Sweeps: the file, a worker's trials as MLflow runs, pruning, the best recipe, the train stage's weights."""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline import recipe, train
from pipeline.common.errors import ParamsError, PipelineError
from pipeline.common.system import cores
from pipeline.core import engine
from pipeline.data.splits import load_split
from pipeline.params import ModelConfig, TrainConfig
from pipeline.sweep import budget, workers
from pipeline.sweep import study as studies
from pipeline.sweep import trial as trial_module
from pipeline.sweep.__main__ import show_board
from pipeline.sweep.spec import load_sweep
from pipeline.sweep.study import load, redact

from .helpers.repo import REPO, sh
from .helpers.stages import run_main, set_params
from .helpers.sweeps import write_sweep


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"params": {"train.device": {"type": "categorical", "choices": ["cpu"]}}}, "train.device must be a model.*"),
        ({"params": {"train.lr": {"type": "float", "low": 0.1}}}, "params.train.lr.high must be a number"),
        ({"params": {"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, "log must be true only"),
        ({"params": {"train.lr": {"type": "normal"}}}, "train.lr.type must be one of float, int, categorical"),
        ({"objective": "test_accuracy"}, "objective must be one of val_accuracy, val_loss"),
        ({"sampler": {"name": "cmaes"}}, "sampler.name must be one of tpe, random, grid"),
        ({"pruner": {"name": "median", "patience": 3}}, "pruner: "),
        ({"trials": 0}, "trials must be an integer >= 1"),
        ({"trials": True}, "trials must be an integer >= 1"),
        ({"pruner": {"name": "percentile", "percentile": 200}}, "pruner: Percentile must be"),
        ({"pruner": {"name": "hyperband", "min_resource": "x"}}, "pruner"),
        ({"pruner": {"name": "median", "n_warmup_steps": -1}}, "pruner"),
        (
            {"params": {"train.lr": {"type": "float", "low": 0.1, "high": 1, "log": True, "step": 0.1}}},
            "step must be absent",
        ),
        (
            {"params": {"train.lr": {"type": "float", "low": 0.1, "high": 1, "step": "big"}}},
            "step must be a positive number",
        ),
        (
            {"params": {"train.epochs": {"type": "int", "low": 1, "high": 3, "step": 0.5}}},
            "step must be a positive integer",
        ),
        ({"params": {"train.lr": {"type": "float", "low": 0.1, "high": float("inf")}}}, "high must be a number"),
        ({"params": {"train.lr": {"type": "categorical", "choices": [[0.1]]}}}, "choices must be a list of numbers"),
        ({"sampler": {"name": "tpe", "n_startup": 3}}, "sampler: "),
        ({"sampler": {"name": "tpe", "n_startup_trials": "x"}}, "sampler"),
        ({"sampler": {"name": "tpe", "gamma": 3}}, "sampler"),
        ({"sampler": {"name": "random", "seed": "x"}}, "sampler.seed must be an integer"),
        ({"recipe": "../../x"}, "recipe must be the name of a recipe in recipes/"),
        ({"max_failures": 0}, "max_failures must be an integer >= 1"),
        ({"budget": 3}, "must be a mapping of fixed, heartbeat"),
        ({"fixed": {"train.epochs": 0}}, "train.epochs must be an integer >= 1"),
        ({"seeds": [0, 0]}, "seeds must be a list of distinct integers"),
        ({"seeds": 3}, "seeds must be a list of distinct integers"),
        ({"seeds": [0, 1], "fixed": {"train.seed": 3}}, "seeds must be absent where train.seed is fixed"),
        ({"params": {"train.lr": {"type": "float", "low": 0.001, "high": 0.01}}, "sampler": "grid"}, "grid sampler"),
    ],
)
def test_a_bad_sweep_file_is_refused_before_any_trial_naming_the_key(workdir, changes, message) -> None:
    write_sweep(workdir, **changes)
    with pytest.raises(ParamsError, match=message.replace("*", r"\*").replace("(", r"\(")):
        load_sweep("tiny")


def test_database_passwords_stay_out_of_messages() -> None:
    assert redact("postgresql+psycopg2://optuna:s3cret@db.internal:5432/sweeps") == (
        "postgresql+psycopg2://***@db.internal:5432/sweeps"
    )
    assert redact("sqlite:////repo/sweeps.db") == "sqlite:////repo/sweeps.db"


@pytest.mark.slow
def test_a_worker_prunes_tracks_each_trial_and_its_best_recipe_gives_the_train_stage_weights(
    processed, monkeypatch
) -> None:
    weights: dict[int, dict[str, torch.Tensor]] = {}
    real_fit = trial_module.fit

    def fit(model, *args, **kwargs):  # the trial's own training, its weights kept for the comparison
        history = real_fit(model, *args, **kwargs)
        weights[len(weights)] = {k: v.clone() for k, v in model.state_dict().items()}
        return history

    monkeypatch.setattr(trial_module, "fit", fit)
    write_sweep(processed)
    url = f"sqlite:///{processed / 'sweeps.db'}"
    workers.work(load_sweep("tiny"), url, Path("data/processed"))

    study = load("tiny", url)
    first, second = study.trials
    assert (first.state, second.state) == (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert first.params == {"train.lr": 0.003} and list(second.intermediate_values) == [1]  # stopped after epoch 1
    client = MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs(client.get_experiment_by_name("tests").experiment_id)}
    assert set(runs) == {"tiny-0", "tiny-1"}
    done, pruned = runs["tiny-0"], runs["tiny-1"]
    assert (done.info.status, done.data.tags["sweep.state"]) == ("FINISHED", "COMPLETE")
    assert (pruned.info.status, pruned.data.tags["sweep.state"]) == ("KILLED", "PRUNED")  # the UI shows it stopped
    for run, epochs in ((done, 3), (pruned, 1)):
        assert run.data.tags["sweep"] == "tiny" and run.data.params["train.lr"] == str(
            study.trials[int(run.data.tags["sweep.trial"])].params["train.lr"]
        )
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == list(
            range(1, epochs + 1)
        )
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["mnist-train"]
    val = [m.value for m in client.get_metric_history(done.info.run_id, "val_accuracy")]
    assert first.value == val[-1]

    # The best trial as a recipe; the train stage run on it gives the trial's weights, bit for bit.
    best = yaml.safe_load(Path("recipes/tiny-best.yaml").read_text())
    assert best == {"train": {"lr": 0.003, "epochs": 3}}
    assert recipe.set_flags(recipe.load_recipe("tiny-best")) == ["-S", "train.epochs=3", "-S", "train.lr=0.003"]
    set_params(processed, "train", lr=0.003, epochs=3)
    run_main(train, monkeypatch, "--data", "data/processed", "--out", "models")
    stage = torch.load("models/model.pt", weights_only=True)
    assert stage["history"][-1]["val_accuracy"] == first.value
    assert all(torch.equal(stage["state_dict"][k], v) for k, v in weights[0].items())


def test_with_seeds_each_trial_trains_on_each_seed_in_a_nested_run_and_its_value_is_their_mean(
    processed, capsys
) -> None:
    write_sweep(processed, seeds=[0, 1], fixed={"train.epochs": 2})
    url = f"sqlite:///{processed / 'sweeps.db'}"
    workers.work(load_sweep("tiny"), url, Path("data/processed"))

    first, second = load("tiny", url).trials
    assert first.state == optuna.trial.TrialState.COMPLETE and list(first.intermediate_values) == list(range(1, 5))
    assert second.state == optuna.trial.TrialState.PRUNED and list(second.intermediate_values) == [1]
    client = MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs(client.get_experiment_by_name("tests").experiment_id)}
    assert set(runs) == {"tiny-0", "tiny-0-seed0", "tiny-0-seed1", "tiny-1", "tiny-1-seed0"}
    finals = []
    for name, seed, status in (
        ("tiny-0-seed0", 0, "FINISHED"),
        ("tiny-0-seed1", 1, "FINISHED"),
        ("tiny-1-seed0", 0, "KILLED"),
    ):
        run = runs[name]
        assert run.data.tags["mlflow.parentRunId"] == runs[name.rsplit("-", 1)[0]].info.run_id
        assert (run.info.status, run.data.tags["sweep.seed"], run.data.params["train.seed"]) == (
            status,
            str(seed),
            str(seed),
        )
        finals.append([m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")])
    assert [len(f) for f in finals] == [2, 2, 1] and finals[0] != finals[1]  # each seed its own epochs 1-2
    assert first.value == pytest.approx((finals[0][-1] + finals[1][-1]) / 2)
    parent = runs["tiny-0"].data.metrics
    assert parent["val_accuracy"] == pytest.approx(first.value) and parent["val_accuracy_min"] == min(
        finals[0][-1], finals[1][-1]
    )
    assert (runs["tiny-0"].info.status, runs["tiny-1"].info.status) == ("FINISHED", "KILLED")
    header = Path("recipes/tiny-best.yaml").read_text().splitlines()[0]
    assert f"val_accuracy {first.value:.4f} (mean over seeds 0, 1)" in header
    assert "seed" not in yaml.safe_load(Path("recipes/tiny-best.yaml").read_text())["train"]  # params.yaml's seed
    show_board(load_sweep("tiny"), url, top=10)
    assert "each trial on seeds 0, 1: value = their mean, epochs = theirs summed" in capsys.readouterr().out


@pytest.mark.slow
def test_jobs_2_runs_two_workers_with_the_cores_divided_and_prints_the_leaderboard(processed, capsys) -> None:
    write_sweep(processed, trials=4, sampler={"name": "random", "seed": 0}, pruner="none",
                params={"train.lr": {"type": "float", "low": 0.001, "high": 0.005, "log": True}})  # fmt: skip
    out = sh(processed, sys.executable, "-m", "pipeline.sweep", "run", "tiny", "--jobs", "2", PYTHONPATH=str(REPO))
    assert f"2 workers, {max(1, cores() // 2)} thread(s) each" in out  # the cores divided
    study = load("tiny", f"sqlite:///{processed / 'sweeps.db'}")
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4 and len({t.number for t in finished}) == 4
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both workers took trials
    assert {t.user_attrs["threads"] for t in finished} == {str(max(1, cores() // 2))}
    assert "[worker 0]" in out and "[worker 1]" in out
    show_board(load_sweep("tiny"), f"sqlite:///{processed / 'sweeps.db'}", top=10)
    board = capsys.readouterr().out
    assert "4/4 trials done (4 complete, 0 pruned)" in board and "recipes/tiny-best.yaml" in board
    best = study.best_trial
    assert yaml.safe_load(Path("recipes/tiny-best.yaml").read_text())["train"]["lr"] == best.params["train.lr"]


def test_train_shift_moves_each_image_by_its_own_offset_filling_with_background() -> None:
    images = torch.randint(1, 256, (5, 1, 28, 28), dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [2, 0], [0, -2], [-1, 1], [2, 2]])
    out = engine.shifted(images, offsets, pad=2)
    for image, moved, (dy, dx) in zip(images[:, 0], out[:, 0], offsets.tolist(), strict=True):
        expected = torch.zeros_like(image)
        rows, cols = slice(max(dy, 0), 28 + min(dy, 0)), slice(max(dx, 0), 28 + min(dx, 0))
        expected[rows, cols] = image[max(-dy, 0) : 28 - max(dy, 0), max(-dx, 0) : 28 - max(dx, 0)]
        assert torch.equal(moved, expected), (dy, dx)


def test_train_shift_is_seeded_and_changes_training(processed) -> None:
    train_split, val_split = (load_split(Path(f"data/processed/{s}.pt")) for s in ("train", "val"))
    model_cfg, cfg = ModelConfig(arch="fast", nf=4), TrainConfig(epochs=1, batch_size=64, lr=0.01, device="cpu")

    def weights(shift: int) -> list[torch.Tensor]:
        c = dataclasses.replace(cfg, shift=shift)
        model = engine.build(model_cfg, c, torch.device("cpu"))
        engine.fit(model, train_split, val_split, c)
        return list(model.state_dict().values())

    a, b, plain = weights(2), weights(2), weights(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, plain, strict=True))


def _race_worker(url: str, trials: int, start: object, out: object) -> None:
    """One worker process of the race below: a trial sleeps briefly and returns its number."""
    import time

    study = optuna.load_study(study_name="race", storage=studies.storage(url, heartbeat=60))
    start.wait()  # all workers look at the study at once: each sees room for one more trial
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    def objective(trial: optuna.Trial) -> float:
        time.sleep(0.05)
        return float(trial.number)

    out.put(budget.run_trials(study, objective, trials, max_failures=3, wait=0.01))


def test_more_workers_than_remaining_trials_never_run_over_the_budget(tmp_path) -> None:
    """6 workers, 2 trials left of 3, started together, 4 times: each study ends with exactly 3
    trials trained; the others found the budget spent before they trained (FAIL, `surplus`)."""
    context = multiprocessing.get_context("fork")  # the children run Optuna only: no torch, no MLflow
    surplus = 0
    for attempt in range(4):
        url = f"sqlite:///{tmp_path / f'race{attempt}.db'}"
        study = optuna.create_study(study_name="race", storage=studies.storage(url, heartbeat=60))
        study.add_trial(optuna.trial.create_trial(value=0.0))  # one done already
        start, out = context.Barrier(6), context.Queue()
        procs = [context.Process(target=_race_worker, args=(url, 3, start, out)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * 6
        assert sorted(out.get(timeout=5) for _ in procs) == [3] * 6  # each worker saw the study done
        trials = load("race", url).trials
        trained = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        assert len(trained) == 3, [(t.number, t.state.name) for t in trials]
        assert all(t.user_attrs.get(budget.SURPLUS_ATTR) for t in failed) and len(failed) + 3 == len(trials)
        surplus += len(failed)
    assert surplus > 0  # the race happened (else this test would not see it) and the claim stopped it


@pytest.mark.parametrize(
    ("objective", "values", "best_lr"),
    [
        ("val_accuracy", {0.001: 0.90, 0.01: 0.97, 0.05: 0.50}, 0.01),  # maximized
        ("val_loss", {0.001: 0.30, 0.01: 2.00, 0.05: 0.05}, 0.05),  # minimized
    ],
)
def test_the_best_recipe_is_the_best_trial_not_another(workdir, objective, values, best_lr) -> None:
    """Distinct values, the best neither first nor last, and a pruned trial whose last report beats
    them all: the recipe holds the best complete trial's params and its value."""
    lr = {"type": "float", "low": 1e-4, "high": 0.1, "log": True}
    write_sweep(workdir, objective=objective, params={"train.lr": lr}, sampler={"name": "random", "seed": 0})
    sweep = load_sweep("tiny")
    study = optuna.create_study(direction=sweep.direction)
    space = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 0.1, log=True)}
    for lr_value, value in values.items():
        study.add_trial(optuna.trial.create_trial(params={"train.lr": lr_value}, distributions=space, value=value))
    beyond = 1.0 if sweep.direction == "maximize" else 0.0
    pruned = optuna.trial.TrialState.PRUNED
    study.add_trial(
        optuna.trial.create_trial(
            params={"train.lr": 0.002}, distributions=space, state=pruned, intermediate_values={1: beyond}
        )
    )
    path = studies.write_best_recipe(study, sweep, folder=workdir / "recipes")
    assert yaml.safe_load(path.read_text()) == {"train": {"epochs": 3, "lr": best_lr}}
    assert f"{objective} {values[best_lr]:.4f}" in path.read_text().splitlines()[0]


def test_grid_workers_and_a_resumed_run_take_each_point_once(workdir) -> None:
    """GridSampler gives trial k the k-th point of an order drawn from its seed: two workers side by
    side, then a lone worker that resumes the study, each with its own sampler, cover the grid once
    (with a seed per worker, as TPE gets, two of them took one point twice)."""
    choices = {"train.flip": [False, True], "train.erase": [0, 8]}
    params = {key: {"type": "categorical", "choices": values} for key, values in choices.items()}
    write_sweep(workdir, trials=4, params=params, sampler={"name": "grid", "seed": 0}, pruner="none")
    sweep = load_sweep("tiny")
    study = optuna.create_study()

    def objective(trial: optuna.Trial) -> float:
        for dim in sweep.params:
            dim.suggest(trial)
        return 0.0

    for k, (index, jobs) in enumerate([(0, 2), (1, 2), (0, 1), (0, 1)]):
        study.sampler = sweep.make_sampler(workers.worker_seed(0, index, jobs, trials_so_far=k))  # as work() does
        study.optimize(objective, n_trials=1)
    points = sorted((t.params["train.flip"], t.params["train.erase"]) for t in study.trials)
    assert points == [(False, 0), (False, 8), (True, 0), (True, 8)]


def _study_with_best(sweep, params: dict, value: float = 0.9, **attrs) -> optuna.Study:
    """An in-memory study whose one complete trial holds `params` as written by anyone."""
    study = optuna.create_study(direction=sweep.direction)
    space = {k: optuna.distributions.CategoricalDistribution([v]) for k, v in params.items()}
    study.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=value, user_attrs=attrs))
    return study


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"train.lr": 0.003, "train.device": "cuda:0\n--force"}, "'train.device' is not a key of"),
        ({"train.lr": 0.5}, "train.lr=0.5 is outside"),  # not one of the sweep's choices
        ({"train.lr": "0.003"}, "is outside"),  # a string, not the number
        ({"model.arch": "fast"}, "'model.arch' is not a key of"),
    ],
)
def test_a_best_trial_outside_the_sweeps_space_writes_no_recipe(workdir, params, message) -> None:
    write_sweep(workdir)
    sweep = load_sweep("tiny")
    with pytest.raises(ParamsError, match=message):
        studies.write_best_recipe(_study_with_best(sweep, params), sweep, folder=workdir / "recipes")
    assert not (workdir / "recipes").exists()


def test_the_best_recipe_header_holds_no_line_of_the_study(workdir) -> None:
    write_sweep(workdir)
    sweep = load_sweep("tiny")
    attrs = {"device": "cpu\nmodel:\n  arch: tutorial\n#", "threads": "2\ntrain: {lr: 9}"}
    path = studies.write_best_recipe(_study_with_best(sweep, {"train.lr": 0.003}, **attrs), sweep, workdir / "r")
    text = path.read_text()
    assert yaml.safe_load(text) == {"train": {"epochs": 3, "lr": 0.003}}
    assert "ran on ? with ? thread(s)" in text and len(text.splitlines()) == 4 + 3  # the header, then the YAML


@pytest.mark.parametrize("changed", ["sweep", "recipe"])
def test_show_refuses_a_study_whose_sweep_file_or_base_recipe_changed(workdir, capsys, changed) -> None:
    (workdir / "recipes").mkdir()
    (workdir / "recipes" / "base.yaml").write_text("train:\n  batch_size: 64\n")
    write_sweep(workdir, recipe="base")
    url = f"sqlite:///{workdir / 'sweeps.db'}"
    study = studies.open_study(load_sweep("tiny"), url, seed=None, attrs={})
    space = {"train.lr": optuna.distributions.CategoricalDistribution([0.003, 1e-6])}
    study.add_trial(optuna.trial.create_trial(params={"train.lr": 0.003}, distributions=space, value=0.9))
    show_board(load_sweep("tiny"), url, top=5)  # unchanged: the board and the recipe
    assert yaml.safe_load((workdir / "recipes/tiny-best.yaml").read_text())["train"]["batch_size"] == 64
    if changed == "sweep":
        write_sweep(workdir, recipe="base", fixed={"train.epochs": 5})
    else:
        (workdir / "recipes" / "base.yaml").write_text("train:\n  batch_size: 32\n")
    before = (workdir / "recipes/tiny-best.yaml").read_text()
    file = "sweeps/tiny.yaml" if changed == "sweep" else "recipes/base.yaml"
    with pytest.raises(ParamsError, match=f"{file} changed since study 'tiny' ran .*start a new study"):
        show_board(load_sweep("tiny"), url, top=5)
    assert (workdir / "recipes/tiny-best.yaml").read_text() == before


def test_a_trial_that_raises_fails_alone_and_failures_in_a_row_stop_the_worker(caplog) -> None:
    study = optuna.create_study()

    def objective(trial: optuna.Trial) -> float:
        if trial.number in (1, 2):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")
        return float(trial.number)

    assert budget.run_trials(study, objective, budget=3, max_failures=3, wait=0.01) == 3
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert "trial 1 failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in caplog.text
    assert all(r.exc_info is None for r in failed) and "more lines" not in caplog.text  # one line, no traceback

    def broken(trial: optuna.Trial) -> float:
        raise ValueError("bad batch")

    with pytest.raises(PipelineError, match="2 trials in a row failed here .*ValueError: bad batch"):
        budget.run_trials(optuna.create_study(), broken, budget=3, max_failures=2, wait=0.01)


@pytest.mark.slow
def test_a_trial_that_raises_ends_its_mlflow_run_failed_and_the_worker_goes_on(processed, monkeypatch) -> None:
    real_fit, calls = trial_module.fit, []

    def fit(*args, **kwargs):  # the first trial runs out of memory; the others train
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(trial_module, "fit", fit)
    write_sweep(processed, fixed={"train.epochs": 1}, pruner="none")
    url = f"sqlite:///{processed / 'sweeps.db'}"
    workers.work(load_sweep("tiny"), url, Path("data/processed"))
    study = load("tiny", url)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    client = MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs(client.get_experiment_by_name("tests").experiment_id)}
    failed = runs["tiny-0"]
    assert (failed.info.status, failed.data.tags["sweep.state"]) == ("FAILED", "FAIL")
    assert failed.data.tags["sweep.failure"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert {runs[n].info.status for n in ("tiny-1", "tiny-2")} == {"FINISHED"}


def test_a_study_from_before_the_base_recipes_digest_is_shown_with_a_warning(workdir, caplog) -> None:
    (workdir / "recipes").mkdir()
    (workdir / "recipes" / "base.yaml").write_text("train:\n  batch_size: 64\n")
    write_sweep(workdir, recipe="base")
    url = f"sqlite:///{workdir / 'sweeps.db'}"
    study = studies.open_study(load_sweep("tiny"), url, seed=None, attrs={})
    study.set_user_attr("base_recipe_sha256", None)  # as a study made before it was recorded
    space = {"train.lr": optuna.distributions.CategoricalDistribution([0.003, 1e-6])}
    study.add_trial(optuna.trial.create_trial(params={"train.lr": 0.003}, distributions=space, value=0.9))
    show_board(load_sweep("tiny"), url, top=5)
    assert "does not record its base recipe: recipes/base.yaml is not checked" in caplog.text
    assert yaml.safe_load((workdir / "recipes/tiny-best.yaml").read_text())["train"]["batch_size"] == 64


def _open_storage(url: str, start: object, out: object) -> None:
    start.wait()
    try:
        studies.storage(url, heartbeat=60)
        out.put("ok")
    except Exception as e:  # the failure to see: one line, our PipelineError or another
        out.put(f"{type(e).__name__}: {e}")


def test_workers_that_open_a_new_sqlite_study_store_at_once_all_open_it(tmp_path) -> None:
    """Slurm starts a job array's workers together, with no parent to create the store first: one
    lost the race to create its tables ("UNIQUE constraint failed: alembic_version")."""
    context = multiprocessing.get_context("fork")
    for attempt in range(3):  # without the retry, the first round already failed
        url, start, out = f"sqlite:///{tmp_path / f'new{attempt}.db'}", context.Barrier(4), context.Queue()
        procs = [context.Process(target=_open_storage, args=(url, start, out)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [out.get(timeout=5) for _ in procs] == ["ok"] * 4
