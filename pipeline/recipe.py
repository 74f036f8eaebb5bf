"""Named recipes: recipes/<name>.yaml as the `-S key=value` overrides that `dvc exp run` takes.

    dvc exp run $(python -m pipeline.recipe fast)
    dvc exp run --queue $(python -m pipeline.recipe fast) -S 'train.seed=0,1,2,3,42'
    python -m pipeline.recipe          # lists the recipes

params.yaml stays the one place settings live: a recipe only fills in `-S` flags, so
`dvc exp show` and MLflow show the values the experiment really ran with.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from pipeline.common.errors import ParamsError, run_stage
from pipeline.params import ModelConfig, TrainConfig, parse_section, read_params

RECIPES = Path("recipes")
SECTIONS = {"model": ModelConfig, "train": TrainConfig}  # what a recipe may set


def names(folder: Path = RECIPES) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_recipe(name: str, folder: Path = RECIPES, params: Path = Path("params.yaml")) -> dict[str, dict[str, Any]]:
    """The recipe's sections, checked as params.yaml's own: keys known, values valid with the rest."""
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"no recipe {name!r} ({path} not found); recipes: {', '.join(names(folder)) or 'none'}")
    recipe = read_params(path)
    current = read_params(params)
    for section, values in recipe.items():
        if section not in SECTIONS:
            raise ParamsError(f"{path}: a recipe sets {', '.join(SECTIONS)}, not {section!r}")
        parse_section(section, SECTIONS[section], values, path)  # unknown keys, wrong types
        parse_section(section, SECTIONS[section], {**(current.get(section) or {}), **values}, path)
    return recipe


def flag_value(value: Any) -> str:
    """A value as `-S` reads it (YAML), with no spaces, so that $(...) keeps each flag one word."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...").replace(" ", "")


def set_flags(recipe: dict[str, dict[str, Any]]) -> list[str]:
    """['-S', 'model.arch=fast', '-S', ...] for `dvc exp run`."""
    flags = []
    for section, values in recipe.items():
        for key, value in values.items():
            flags += ["-S", f"{section}.{key}={flag_value(value)}"]
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a recipe in recipes/ (none: list them)")
    args = parser.parse_args()
    if args.name is None:
        for name in names():
            summary = (RECIPES / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")  # its first line
            print(f"{name:15s} {summary}")
        return
    print(" ".join(set_flags(load_recipe(args.name))))


if __name__ == "__main__":
    run_stage(main)
