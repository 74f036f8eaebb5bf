"""The offline `dvc plots show` page: DVC's template with the Vega libraries of the
vl-convert-python wheel inlined, built by `make setup` with no Node.js."""

import os
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from dvc_render import VegaRenderer, render_html

from pipeline import plots_page
from pipeline.common.errors import PipelineError

from .helpers.browser import Browser, chromium
from .helpers.repo import REPO, copy_repo, needed


def fill(template: Path, folder: Path) -> Path:
    """What `dvc plots diff` does with the template: one chart, a loss curve per revision."""
    points = [
        {"step": s, "loss": (1 if rev == "HEAD" else 0.6) / s, "rev": rev}
        for s in range(1, 6)
        for rev in ("HEAD", "workspace")
    ]
    renderer = VegaRenderer(points, "loss", x="step", y="loss")
    return Path(render_html([renderer], folder / "index.html", html_template=template))


def test_the_page_inlines_the_bundle_once_and_dvc_fills_it(tmp_path, monkeypatch) -> None:
    calls = []

    def bundle(snippet: str, vl_version: str) -> str:
        calls.append((snippet, vl_version))
        return "window.loaded = true;"

    monkeypatch.setattr(plots_page.vl_convert, "javascript_bundle", bundle)
    out = tmp_path / "page.html"
    monkeypatch.setattr(sys, "argv", ["plots_page", "--out", str(out)])
    plots_page.main()
    # One bundle, of the Vega-Lite 5 that DVC's templates are written for, exposing all three globals.
    ((snippet, vl_version),) = calls
    assert vl_version == plots_page.VEGA_LITE and vl_version.startswith("5.")
    assert all(f"window.{name} = " in snippet for name in ("vega", "vegaLite", "vegaEmbed"))
    template = out.read_text()
    label = f"vega-lite@{plots_page.VEGA_LITE}, vega-embed@"
    assert label in template and f"(vl-convert-python {version('vl-convert-python')})" in template
    assert "(() => {\nwindow.loaded = true;\n})();" in template and "{scripts}" not in template

    # dvc-render fills it: the plot is there, DVC's CDN <script src=...> tags are not.
    page = fill(out, tmp_path / "dvc_plots").read_text()
    assert "vegaEmbed('#loss'" in page and "window.loaded" in page
    assert "<script src=" not in page and "cdn" not in page.lower()


def test_a_vega_lite_the_wheel_does_not_carry_is_refused() -> None:
    with pytest.raises(PipelineError, match=r"vl-convert-python carries no Vega-Lite 4.17 \(it has .*5\."):
        plots_page.versions("4.17")


def test_a_library_that_would_close_its_script_tag_is_refused() -> None:
    with pytest.raises(PipelineError, match="cannot be inlined"):
        plots_page.inline_script("const s = '</script>';", "vega")


def test_requirements_pin_the_wheel_exactly_and_it_is_the_installed_one() -> None:
    """The wheel's version fixes the libraries' versions: it must be pinned, and be what runs."""
    (pin,) = re.findall(r"^vl-convert-python==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert pin == version("vl-convert-python")
    assert not (REPO / "plots/package.json").exists()  # the npm route is gone


@pytest.mark.slow
def test_make_setup_without_node_builds_a_page_that_draws_offline(tmp_path) -> None:
    """`make setup` in a repo copy whose PATH has make and nothing else (no node, no npm), with
    this venv as the installed one; then the page, filled as DVC does, draws in headless Chromium."""
    binary = needed(chromium(), "no headless browser: `apt-get install chromium` (.ci/run does)")
    repo = copy_repo(tmp_path / "repo")
    (repo / "plots/page.html").unlink(missing_ok=True)
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "make").symlink_to(shutil.which("make"))
    venv = Path(sys.prefix)  # the Makefile puts its bin/ first on PATH
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["PATH"] = str(tools)
    for tool in ("node", "npm", "npx"):
        assert shutil.which(tool, path=f"{venv / 'bin'}{os.pathsep}{tools}") is None, tool

    # A fresh machine's set-up: pip and the page, nothing of Node.js (dry run: no install here).
    fresh = subprocess.run(["make", "-n", "setup", "VENV=fresh"], cwd=repo, env=env, capture_output=True, text=True)
    assert fresh.returncode == 0 and "pip install -r requirements-dev.txt" in fresh.stdout, fresh.stdout + fresh.stderr
    assert "python -m pipeline.plots_page" in fresh.stdout and not re.search(r"\b(npm|node|npx)\b", fresh.stdout)

    # The real one, this venv standing for the installed one (-o: its pip step is not redone).
    start = time.monotonic()
    setup = subprocess.run(
        ["make", "-o", f"{venv}/.installed", "setup", f"VENV={venv}"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert time.monotonic() - start < 30
    template = repo / "plots/page.html"
    assert "vega-embed@" in template.read_text()

    with Browser(binary, timeout=20) as browser:
        visit = browser.visit(fill(template, tmp_path / "dvc_plots"), ready=1)
    (tmp_path / "page.png").write_bytes(visit.screenshot)  # to look at when this fails
    ((plot,),) = [visit.plots]
    assert plot["id"] == "loss" and plot["canvas"] and plot["coloured"] > 100, plot  # the curve, not just axes
    local = (tmp_path / "dvc_plots").resolve().as_uri() + "/"
    assert all(url.startswith(local) for url in visit.requests), visit.requests
    assert not visit.errors, visit.errors
    assert not [w for w in visit.warnings if "Vega-Lite" in w], visit.warnings  # no version mismatch
