"""The offline `dvc plots show` page: DVC's template with the locked Vega libraries inlined."""

import json
import sys
from pathlib import Path

import pytest
from dvc_render import VegaRenderer, render_html

from pipeline import plots_page
from pipeline.errors import PipelineError

from .conftest import REPO


def fake_modules(root: Path, versions: dict[str, str]) -> tuple[Path, Path]:
    """A node_modules with a one-line build of each library, and a package-lock.json pinning them."""
    modules = root / "node_modules"
    for name, version in versions.items():
        build = modules / name / plots_page.LIBRARIES[name]
        build.parent.mkdir(parents=True)
        build.write_text(f"window.loaded = (window.loaded || []).concat('{name}');\n//# sourceMappingURL={name}.map\n")
        (modules / name / "package.json").write_text(json.dumps({"name": name, "version": version}))
    lock = {"packages": {f"node_modules/{name}": {"version": v} for name, v in versions.items()}}
    (root / "package-lock.json").write_text(json.dumps(lock))
    return modules, root / "package-lock.json"


VERSIONS = {"vega": "5.1.0", "vega-lite": "5.2.0", "vega-embed": "6.3.0"}


def test_the_page_inlines_the_libraries_in_load_order_and_dvc_fills_it(tmp_path, monkeypatch) -> None:
    modules, lock = fake_modules(tmp_path, VERSIONS)
    out = tmp_path / "page.html"
    monkeypatch.setattr(sys, "argv", ["plots_page", "--modules", str(modules), "--lock", str(lock), "--out", str(out)])
    plots_page.main()
    template = out.read_text()
    starts = [template.index(f"/* {name}@{version} (npm) */") for name, version in VERSIONS.items()]
    assert starts == sorted(starts)  # vega, then vega-lite, then vega-embed
    assert "sourceMappingURL" not in template and "{scripts}" not in template

    # dvc-render fills it: the plot is there, DVC's CDN <script src=...> tags are not.
    renderer = VegaRenderer([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.2}], "loss", x="step", y="loss")
    page = Path(render_html([renderer], tmp_path / "dvc_plots/index.html", html_template=out)).read_text()
    assert "vegaEmbed('#loss'" in page and "window.loaded" in page
    assert "<script src=" not in page and "cdn" not in page.lower()


def test_a_library_other_than_the_locked_version_is_refused(tmp_path) -> None:
    modules, lock = fake_modules(tmp_path, VERSIONS)
    (modules / "vega-lite/package.json").write_text(json.dumps({"version": "5.9.9"}))
    with pytest.raises(PipelineError, match=r"vega-lite is version 5.9.9 but the lock file pins 5.2.0"):
        plots_page.inline_script(modules, "vega-lite", plots_page.locked_versions(lock)["vega-lite"])


def test_missing_node_modules_says_to_run_npm_ci(tmp_path) -> None:
    with pytest.raises(PipelineError, match=r"node_modules/vega is missing: run `npm ci`"):
        plots_page.inline_script(tmp_path / "node_modules", "vega", "5.1.0")


def test_a_library_that_would_close_its_script_tag_is_refused(tmp_path) -> None:
    modules, _ = fake_modules(tmp_path, VERSIONS)
    (modules / "vega" / plots_page.LIBRARIES["vega"]).write_text("const s = '</script>';")
    with pytest.raises(PipelineError, match="cannot be inlined"):
        plots_page.inline_script(modules, "vega", "5.1.0")


def test_the_repo_pins_each_library_exactly_with_an_integrity_hash() -> None:
    """package.json names exact versions; the lock file has them with their sha512, npm ci checks it."""
    declared = json.loads((REPO / "plots/package.json").read_text())["dependencies"]
    packages = json.loads((REPO / "plots/package-lock.json").read_text())["packages"]
    assert set(declared) == set(plots_page.LIBRARIES)
    for name, version in declared.items():
        assert packages[f"node_modules/{name}"]["version"] == version
    assert all(p["integrity"].startswith("sha512-") for key, p in packages.items() if key)
    assert not any("resolved" in p for p in packages.values())  # no registry host in the repo
