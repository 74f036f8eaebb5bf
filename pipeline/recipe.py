"""Named recipes: recipes/<name>.yaml as the `-S key=value` overrides that `dvc exp run` takes.

    python -m pipeline.recipe fast --run                  # dvc exp run with the recipe's flags, no shell between
    python -m pipeline.recipe fast --run -n fast-1 --queue   # other arguments go on to dvc exp run
    dvc exp run $(python -m pipeline.recipe fast)         # the same through the shell
    python -m pipeline.recipe                             # lists the recipes

params.yaml stays the one place settings live: a recipe only fills in `-S` flags, so
`dvc exp show` and MLflow show the values the experiment really ran with. Every value is checked
as params.yaml's own, and a string may hold only letters, digits and `_ . : + -`: no whitespace,
control or glob characters, which `$(...)` would split or expand into other flags or files.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.common.errors import ParamsError, run_stage
from pipeline.params import ModelConfig, TrainConfig, configs, parse_section, read_params

RECIPES = Path("recipes")
SECTIONS = {"model": ModelConfig, "train": TrainConfig}  # what a recipe may set
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a recipe's or a sweep's name: a file in its folder
SAFE_STRING = re.compile(r"[A-Za-z0-9_.:+-]+")  # what a string value may hold
SAFE_WORD = re.compile(r"[A-Za-z0-9_.:+=,-]+")  # what a printed flag may hold: no split, no glob
DEVICE = re.compile(r"auto|cpu|cuda|cuda:[0-9]{1,3}|mps")


def check_name(name: str, what: str) -> None:
    """A recipe's or sweep's name: letters, digits, `_ . -`, not starting with `.` (no `../x`)."""
    if not isinstance(name, str) or NAME.fullmatch(name) is None:
        raise ParamsError(f"the {what} name must be letters, digits, '_', '.', '-' (not first), got {name!r}")


def names(folder: Path = RECIPES) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def summary(path: Path) -> str:
    """A recipe's or sweep's first line, its summary ('' for an empty file)."""
    lines = path.read_text(errors="replace").splitlines()
    return lines[0].lstrip("# ") if lines else ""


def load_recipe(name: str, folder: Path = RECIPES, params: Path = Path("params.yaml")) -> dict[str, dict[str, Any]]:
    """The recipe's sections, checked as params.yaml's own: keys known, values valid with the rest."""
    check_name(name, "recipe")
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"no recipe {name!r} ({path} not found); recipes: {', '.join(names(folder)) or 'none'}")
    recipe = read_params(path)
    for section, values in recipe.items():
        if section not in SECTIONS:
            raise ParamsError(f"{path}: a recipe sets {', '.join(SECTIONS)}, not {str(section)[:40]!r}")
        if not isinstance(values, dict):
            raise ParamsError(f"{path}: {section} must be a mapping of keys to values, got {type(values).__name__}")
        parse_section(section, SECTIONS[section], values, path)  # unknown keys, wrong types
        for key, value in values.items():
            check_value(f"{section}.{key}", value, path)
    configs(recipe, params)  # valid with the rest of params.yaml
    return recipe


def check_value(key: str, value: Any, path: Path | str) -> None:
    """Refuse a value that a shell or DVC could read as more than one value: strings of safe
    characters only; `train.device` one of its known forms."""
    if key.endswith(".device") and not (isinstance(value, str) and DEVICE.fullmatch(value)):
        raise ParamsError(f"{path}: {key} must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
    for item in value if isinstance(value, list | tuple) else [value]:
        if isinstance(item, str) and SAFE_STRING.fullmatch(item) is None:
            raise ParamsError(
                f"{path}: {key} must hold only letters, digits and '_ . : + -' (no whitespace, control "
                f"or glob characters), got {item!r}"
            )


def flag_value(value: Any) -> str:
    """A value as `-S` reads it (YAML), with no spaces: `[0.9,0.999]`."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...").replace(" ", "")


def set_flags(recipe: dict[str, dict[str, Any]]) -> list[str]:
    """['-S', 'model.arch=fast', '-S', ...] for `dvc exp run`, as an argument list."""
    flags = []
    for section, values in recipe.items():
        for key, value in values.items():
            flags += ["-S", f"{section}.{key}={flag_value(value)}"]
    return flags


def shell_flags(recipe: dict[str, dict[str, Any]], params: Path = Path("params.yaml")) -> list[str]:
    """set_flags for `$(...)`: each flag one word that no shell splits or expands. A list
    (`[0.9,0.999]` is a glob) goes item by item (`train.betas.0=0.9`) onto params.yaml's list of the
    same length; other values a shell would expand are refused, naming the key."""
    current = read_params(params)
    flags = []
    for section, values in recipe.items():
        for key, value in values.items():
            words = [f"{section}.{key}={flag_value(value)}"]
            if isinstance(value, list) and len(value) == len((current.get(section) or {}).get(key) or ()):
                words = [f"{section}.{key}.{i}={flag_value(item)}" for i, item in enumerate(value)]
            for word in words:
                if SAFE_WORD.fullmatch(word) is None:
                    raise ParamsError(
                        f"{word} is not safe inside $(...) (a shell would split or expand it); "
                        "run the recipe with `python -m pipeline.recipe NAME --run`"
                    )
                flags += ["-S", word]
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a recipe in recipes/ (none: list them)")
    parser.add_argument("--run", action="store_true", help="run `dvc exp run` with the flags (other arguments: its)")
    args, dvc_args = parser.parse_known_args()
    if dvc_args and not args.run:
        parser.error(f"unrecognized arguments: {' '.join(dvc_args)} (arguments for dvc exp run need --run)")
    if args.name is None:
        for name in names():
            print(f"{name:15s} {summary(RECIPES / f'{name}.yaml')}")
        return
    recipe = load_recipe(args.name)
    if not args.run:
        print(" ".join(shell_flags(recipe)))
        return
    cmd = [sys.executable, "-m", "dvc", "exp", "run", *[a for a in dvc_args if a != "--"], *set_flags(recipe)]
    print(f"running: dvc {' '.join(cmd[3:])}", file=sys.stderr)
    sys.exit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    run_stage(main)
