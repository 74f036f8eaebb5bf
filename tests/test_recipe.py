"""Recipes: files of overrides that become `dvc exp run -S` flags, checked like params.yaml."""

import shlex
import subprocess
import sys

import pytest
import yaml

from pipeline import recipe
from pipeline.common.errors import ParamsError

from .conftest import REPO


def test_every_recipe_is_valid_and_becomes_one_word_flags() -> None:
    assert {"fast", "tutorial-fast"} <= set(recipe.names(REPO / "recipes"))
    for name in recipe.names(REPO / "recipes"):
        written = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
        flags = recipe.set_flags(recipe.load_recipe(name, REPO / "recipes", REPO / "params.yaml"))
        assert flags[::2] == ["-S"] * (len(flags) // 2)
        assert all(" " not in flag for flag in flags)  # $(...) splits on spaces
        for flag in flags[1::2]:  # DVC reads each value as YAML
            key, value = flag.split("=", 1)
            section, field = key.split(".")
            assert yaml.safe_load(value) == written[section][field]


def test_the_command_prints_the_flags_and_lists_recipes() -> None:
    run = subprocess.run([sys.executable, "-m", "pipeline.recipe", "fast"], cwd=REPO, capture_output=True, text=True)
    assert "-S model.arch=fast" in run.stdout and "-S train.betas=[0.9,0.999]" in run.stdout
    assert shlex.split(run.stdout)[0] == "-S"
    listing = subprocess.run([sys.executable, "-m", "pipeline.recipe"], cwd=REPO, capture_output=True, text=True)
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert names == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml")) and "fast" in names


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  learning_rate: 0.1\n", "unknown key train.learning_rate"),
        ("train:\n  lr: -1\n", "train.lr must be a positive number"),
        ("evaluate:\n  batch_size: 8\n", "a recipe sets model, train, not 'evaluate'"),
    ],
)
def test_a_bad_recipe_names_the_key(tmp_path, text, message) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ParamsError, match=message):
        recipe.load_recipe("bad", tmp_path, REPO / "params.yaml")
    with pytest.raises(ParamsError, match="no recipe 'none'.*recipes: bad"):
        recipe.load_recipe("none", tmp_path, REPO / "params.yaml")
