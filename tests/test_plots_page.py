"""The offline `dvc plots show` page: DVC's template with the Vega libraries of the
vl-convert-python wheel inlined, built by `make setup` with no Node.js."""

import re
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from dvc_render import VegaRenderer, render_html

from pipeline import plots_page
from pipeline.errors import PipelineError

from .conftest import REPO


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
