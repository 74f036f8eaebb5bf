"""Recipes: files of overrides that become `dvc exp run -S` flags, checked like params.yaml."""

import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline import recipe
from pipeline.common.errors import ParamsError

from .helpers.repo import REPO


def test_every_recipe_is_valid_and_its_shell_flags_set_exactly_its_values(tmp_path) -> None:
    """Each flag one word of safe characters, and DVC's own -S parser, applied to params.yaml, gives
    params.yaml with the recipe on top."""
    from dvc.utils.hydra import apply_overrides

    assert {"fast", "tutorial-fast"} <= set(recipe.names(REPO / "recipes"))
    for name in recipe.names(REPO / "recipes"):
        written = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
        flags = recipe.shell_flags(
            recipe.load_recipe(name, REPO / "recipes", REPO / "params.yaml"), REPO / "params.yaml"
        )
        assert flags[::2] == ["-S"] * (len(flags) // 2)
        assert all(recipe.SAFE_WORD.fullmatch(flag) for flag in flags[1::2])  # $(...) neither splits nor globs
        params = tmp_path / f"{name}.yaml"
        shutil.copy(REPO / "params.yaml", params)
        apply_overrides(params, flags[1::2])
        expected = yaml.safe_load((REPO / "params.yaml").read_text())
        for section, values in written.items():
            expected[section].update(values)
        assert yaml.safe_load(params.read_text()) == expected


def test_the_command_prints_the_flags_and_lists_recipes() -> None:
    run = subprocess.run([sys.executable, "-m", "pipeline.recipe", "fast"], cwd=REPO, capture_output=True, text=True)
    assert "-S model.arch=fast" in run.stdout and "-S train.betas.0=0.9 -S train.betas.1=0.999" in run.stdout
    assert shlex.split(run.stdout)[0] == "-S"
    listing = subprocess.run([sys.executable, "-m", "pipeline.recipe"], cwd=REPO, capture_output=True, text=True)
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert names == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml")) and "fast" in names


def test_run_calls_dvc_exp_run_with_an_argument_list(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(recipe.subprocess, "run", lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["recipe", "fast", "--run", "-n", "fast-1", "--queue"])
    with pytest.raises(SystemExit) as exit_:
        recipe.main()
    assert exit_.value.code == 0
    [cmd] = calls
    assert cmd[1:5] == ["-m", "dvc", "exp", "run"] and cmd[5:8] == ["-n", "fast-1", "--queue"]
    assert "train.betas=[0.9,0.999]" in cmd and cmd[8:10] == ["-S", "model.arch=fast"]


def test_a_string_with_glob_or_space_is_refused_and_a_list_of_another_length_needs_run() -> None:
    for value in ("fa*st", "fa?t", "[ab]", "a b", "a\x00b", "ünï"):
        with pytest.raises(ParamsError, match="model.arch must hold only letters"):
            recipe.check_value("model.arch", value, "recipes/x.yaml")
    with pytest.raises(ParamsError, match=r"train.betas=\[0.9,0.99,0.9\] is not safe inside"):
        recipe.shell_flags({"train": {"betas": [0.9, 0.99, 0.9]}}, REPO / "params.yaml")


@pytest.mark.parametrize("name", ["../../x", "../recipes/fast", ".hidden", "a/b", "", "x" * 101, "fast\n"])
def test_a_recipe_name_is_a_file_in_recipes(tmp_path, name) -> None:
    with pytest.raises(ParamsError, match="the recipe name must be letters"):
        recipe.load_recipe(name, REPO / "recipes", REPO / "params.yaml")


def test_an_empty_file_is_listed_without_a_traceback(tmp_path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    assert recipe.summary(tmp_path / "empty.yaml") == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  learning_rate: 0.1\n", "unknown key train.learning_rate"),
        ("train:\n  lr: -1\n", "train.lr must be a positive number"),
        ("evaluate:\n  batch_size: 8\n", "a recipe sets model, train, not 'evaluate'"),
        # values that `$(...)` would split into other flags, and files that are no recipe
        ('train:\n  device: "cuda:0\\n--force\\n--copy-paths\\n/etc/passwd"\n', "train.device must be auto, cpu"),
        ("train:\n  device: cuda:x\n", "train.device must be auto, cpu, cuda, cuda:N or mps"),
        ('model:\n  arch: "fast --force"\n', "model.arch must"),
        ('train:\n  schedule: "onecycle\\t"\n', "train.schedule must"),
        ("", "must hold a mapping of sections, got NoneType"),
        ("train: 3\n", "train must be a mapping"),
    ],
)
def test_a_bad_recipe_or_a_value_that_could_become_flags_is_refused_naming_the_key(tmp_path, text, message) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ParamsError, match=message):
        recipe.load_recipe("bad", tmp_path, REPO / "params.yaml")
    with pytest.raises(ParamsError, match="no recipe 'none'.*recipes: bad"):
        recipe.load_recipe("none", tmp_path, REPO / "params.yaml")
