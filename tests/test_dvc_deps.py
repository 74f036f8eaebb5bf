"""dvc.yaml's code deps are each stage's real import closure: a change to any module a stage runs
re-runs that stage, and a module it does not run does not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from .helpers.repo import REPO

PACKAGE = REPO / "pipeline"
# Files a module uses by path rather than by import: MLflow loads the served model's code from it.
BY_PATH = {"pipeline/serving/publish.py": ["pipeline/serving/pyfunc_code.py"]}


def module_file(name: str) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py (or its package's __init__.py); None outside the package."""
    if name != "pipeline" and not name.startswith("pipeline."):
        return None
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"


def nodes(tree: ast.AST):
    """Every node of the tree, like ast.walk, but not inside `if TYPE_CHECKING:` (hints only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imported(path: Path) -> set[Path]:
    """The package's files that `path` imports, at any depth of the file (lazy imports too), except
    type hints' imports under `if TYPE_CHECKING:`."""
    found = set()
    for node in nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.x import y`: y is a submodule or a name in pipeline.x
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            # importing pipeline.a.b runs pipeline/a/__init__.py first: each parent counts
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:i]))
                if file is not None and file.is_file():
                    found.add(file)
    return found


def closure(module: str) -> set[str]:
    """Every file of the package that `python -m <module>` may import, as repo-relative paths;
    empty `__init__.py` files left out (they hold no code to change)."""
    todo, seen = [module_file(module)], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(imported(path) - seen)
        rel = path.relative_to(REPO).as_posix()
        todo.extend(REPO / extra for extra in BY_PATH.get(rel, []))
    return {p.relative_to(REPO).as_posix() for p in seen if p.stat().st_size}


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_s_code_deps_are_exactly_what_it_imports(stage: str) -> None:
    spec = STAGES[stage]
    module = spec["cmd"].split()[2]  # python -m pipeline.<stage> ...
    deps = {d for d in spec["deps"] if d.startswith("pipeline/")}
    needed = closure(module)
    assert not needed - deps, f"dvc.yaml's {stage} stage lacks deps it imports: {sorted(needed - deps)}"
    assert not deps - needed, f"dvc.yaml's {stage} stage lists deps it does not import: {sorted(deps - needed)}"


def test_the_closure_follows_lazy_imports_and_files_used_by_path() -> None:
    assert "pipeline/sweep/workers.py" in closure("pipeline.sweep.__main__")  # imported inside a function
    train = closure("pipeline.train")
    assert "pipeline/serving/pyfunc_code.py" in train  # logged by path with the classifier
    assert "pipeline/parallel/launch.py" in train
    assert "pipeline/sweep/study.py" not in train  # the sweep is not part of the pipeline
    # Type hints are not code that runs: evaluate holds no training, DDP or CUDA-graph code, so a
    # change there leaves every evaluation's run-cache entry valid.
    evaluate = closure("pipeline.evaluate")
    assert not {p for p in evaluate if p.startswith("pipeline/parallel/")} and "pipeline/core/engine.py" not in evaluate


def folder_of(path: Path) -> str:
    """A file's room: its folder under pipeline/ (core, data, ...), or the top-level module itself."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_no_import_cycle_between_folders() -> None:
    """Rooms import one way: no chain of imports leads from a folder back to itself (type hints
    under TYPE_CHECKING aside), so a lower layer never needs a higher one to load."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        edges.setdefault(folder_of(path), set()).update(
            folder_of(dep) for dep in imported(path) if dep.is_relative_to(PACKAGE) and dep.stem != "__init__"
        )
    for start in edges:
        todo, seen = list(edges[start] - {start}), set()
        while todo:
            room = todo.pop()
            assert room != start, f"an import cycle leads from pipeline/{start} back to itself"
            if room not in seen:
                seen.add(room)
                todo.extend(edges.get(room, set()) - {room})
