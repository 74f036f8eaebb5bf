"""README.md and docs/*.md stay true: a short front door, links and anchors that resolve, commands
and files that exist, a layout tree and a parameter table that match the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from .helpers.repo import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MAX_README_LINES = 200  # the front door; the reference lives in docs/

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
MODULE = re.compile(r"-m ((?:pipeline|bench)(?:\.\w+)+)")
CITED_FILE = re.compile(r"(?<![\w/.])((?:pipeline|tests|bench)/[\w/]+\.(?:py|sh|json|yaml))\b")


def name(page: Path) -> str:
    return str(page.relative_to(REPO))


def prose(text: str) -> str:
    """The text without fenced blocks and code spans, where brackets are code, not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def test_readme_is_a_short_front_door() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move reference into docs/"


def test_anchor_ids_follow_github() -> None:
    assert {"parameters-paramsyaml", "the-registry-and-the-champion-alias", "mlflow-run"} <= (
        anchors(DOCS / "pipeline.md") | anchors(DOCS / "using-the-model.md") | anchors(DOCS / "running-anywhere.md")
    )


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z+.-]*:", target):  # http:, https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{name(page)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(REPO / t.partition("#")[0]).resolve() for t in LINK.findall(prose(README.read_text()))}
    missing = [name(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_named_modules_and_files_exist(page: Path) -> None:
    text = page.read_text()
    missing = []
    for module in sorted(set(MODULE.findall(text))):
        path = REPO.joinpath(*module.split("."))
        if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
            missing.append(f"python -m {module}")
    missing += [p for p in sorted(set(CITED_FILE.findall(text))) if not (REPO / p).is_file()]
    assert not missing, f"{name(page)} names what does not exist: {missing}"


def layout_tree() -> set[str]:
    """The pipeline/ files that the README's Layout block names, as paths."""
    section = README.read_text().split("## Layout", 1)[1]
    block = FENCE.search(section)
    assert block, "README.md's Layout section has no code block"
    files, inside = set(), False
    for line in block.group(0).splitlines():
        if line.startswith("pipeline/"):
            inside = True
            continue
        if inside and not line.startswith("  "):
            break
        if inside:
            words = line.split()
            folder = f"pipeline/{words[0]}" if words[0].endswith("/") else "pipeline/"
            files |= {folder + w for w in words if w.endswith(".py")}
    return files


def test_layout_tree_names_exactly_the_modules() -> None:
    actual = {name(p) for p in (REPO / "pipeline").rglob("*.py") if p.name != "__init__.py"}
    listed = layout_tree()
    assert listed == actual, (
        f"README.md's Layout: missing {sorted(actual - listed)}, no such file {sorted(listed - actual)}"
    )


def documented_params() -> set[str]:
    """The keys in the first column of docs/pipeline.md's parameter table."""
    section = (DOCS / "pipeline.md").read_text().split("## Parameters", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for row in re.findall(r"^\|([^|\n]*)\|", section, re.M):
        keys |= set(re.findall(r"`([a-z_]+\.[a-z_0-9]+)`", row))
    return keys


def test_parameter_table_holds_exactly_the_keys_of_params_yaml() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = {f"{section}.{key}" for section, values in params.items() for key in values}
    table = documented_params()
    assert len(table) > 20, "docs/pipeline.md's parameter table was not found"
    assert table == keys, (
        f"docs/pipeline.md's parameter table: missing {sorted(keys - table)}, not in params.yaml {sorted(table - keys)}"
    )
