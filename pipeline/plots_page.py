"""Write the HTML template of `dvc plots show`/`diff`: DVC's own page, with Vega, Vega-Lite and
Vega-Embed inlined instead of loaded from a CDN, so that every plot draws with no network. The
libraries come from the vl-convert-python wheel (requirements.txt pins it, and so their versions):
no Node.js needed. `make setup` runs it once."""

from __future__ import annotations

import argparse
import logging
from importlib.metadata import version
from pathlib import Path

import vl_convert
from dvc_render.html import HTML, PAGE_HTML

from pipeline.common.errors import PipelineError, run_stage
from pipeline.common.files import atomic_path

log = logging.getLogger("pipeline.plots_page")

# DVC's chart templates are Vega-Lite 5 specs: the newest Vega-Lite 5 that the wheel carries.
VEGA_LITE = "5.21"
# The libraries as page globals: DVC's inline scripts call `vegaEmbed('#<plot id>', spec)`. Vega-Embed
# 7 draws SVG unless told otherwise; DVC's own page (Vega-Embed 6) draws on a canvas, and so does ours.
SNIPPET = """window.vega = vega;
window.vegaLite = vegaLite;
const embed = (el, spec, opts) => vegaEmbed(el, spec, { renderer: "canvas", ...opts });
window.vegaEmbed = Object.assign(embed, vegaEmbed);"""
# The placeholders dvc-render fills; {scripts} (its CDN <script> tags) is the one we replace.
PLACEHOLDERS = [HTML.SCRIPTS_PLACEHOLDER, HTML.PLOTS_PLACEHOLDER, HTML.REFRESH_PLACEHOLDER]


def versions(vega_lite: str = VEGA_LITE) -> dict[str, str]:
    """The version of each library in the bundle (Vega-Lite's as major.minor)."""
    if vega_lite not in vl_convert.get_vegalite_versions():
        carried = ", ".join(vl_convert.get_vegalite_versions())
        raise PipelineError(f"vl-convert-python carries no Vega-Lite {vega_lite} (it has {carried})")
    return {
        "vega": vl_convert.get_vega_version(),
        "vega-lite": vega_lite,
        "vega-embed": vl_convert.get_vega_embed_version(),
    }


def inline_script(code: str, label: str) -> str:
    """`code` as an inline <script>, inside a function: the bundle's top-level names (minified
    `n`, `t`, ...) stay out of the globals that DVC's inline scripts share."""
    if "</script" in code.lower():
        raise PipelineError(f"the {label} bundle contains '</script' and cannot be inlined")
    return f"<script>/* {label} */\n(() => {{\n{code}\n}})();\n</script>"


def page(scripts: list[str]) -> str:
    """dvc-render's page with `scripts` where its CDN tags would go."""
    for placeholder in PLACEHOLDERS:
        if PAGE_HTML.count(f"{{{placeholder}}}") != 1:
            raise PipelineError(f"dvc-render's page no longer has one {{{placeholder}}}; update {__name__}")
    html = PAGE_HTML.replace(f"{{{HTML.SCRIPTS_PLACEHOLDER}}}", "\n".join(scripts))
    # dvc-render fills the template with str.replace: the libraries must not contain a placeholder.
    for placeholder in PLACEHOLDERS[1:]:
        if html.count(f"{{{placeholder}}}") != 1:
            raise PipelineError(f"an inlined library contains {{{placeholder}}}; it would be replaced")
    return html


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("plots/page.html"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    libraries = ", ".join(f"{name}@{v}" for name, v in versions().items())
    label = f"{libraries} (vl-convert-python {version('vl-convert-python')})"
    html = page([inline_script(vl_convert.javascript_bundle(SNIPPET, vl_version=VEGA_LITE), label)])
    with atomic_path(args.out) as tmp:
        tmp.write_text(html, encoding="utf8")
    log.info("wrote %s (%d kB) with %s", args.out, len(html) // 1000, label)


if __name__ == "__main__":
    run_stage(main)
