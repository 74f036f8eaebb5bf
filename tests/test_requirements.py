"""Every package the code imports is a declared requirement; test and lint tools stay apart."""

import ast
import re
import sys
from importlib.metadata import packages_distributions

from .helpers.repo import REPO


def declared(name: str) -> set[str]:
    """Distribution names pinned in a requirements file (and the files it includes with -r)."""
    names = set()
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= declared(line[3:].strip())
        elif line:
            names.add(normal(re.split(r"[=<>~!\[; ]", line)[0]))
    return names


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported(folder: str) -> set[str]:
    """Top-level modules that the files under `folder` import, other than the stdlib and our own."""
    modules = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in ("pipeline", "bench", "tests")}


def undeclared(folder: str, requirements: set[str]) -> list[str]:
    distributions = packages_distributions()
    return sorted(m for m in imported(folder) if not {normal(d) for d in distributions.get(m, [m])} & requirements)


def test_every_imported_package_is_declared_and_test_tools_are_not_runtime_requirements() -> None:
    runtime, dev = declared("requirements.txt"), declared("requirements-dev.txt")
    assert {"filelock", "torch", "mlflow"} <= runtime  # the parser reads the file
    assert undeclared("pipeline", runtime) == [] and undeclared("bench", runtime) == []
    assert undeclared("tests", dev) == []
    assert not {"pytest", "ruff"} & runtime and {"pytest", "ruff"} <= dev
    assert "-r requirements.txt" in (REPO / "python_env.yaml").read_text()  # `mlflow run` gets the runtime ones
