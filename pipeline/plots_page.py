"""Write the HTML template of `dvc plots show`/`diff`: DVC's own page, with Vega, Vega-Lite and
Vega-Embed inlined from the npm packages pinned in plots/package-lock.json instead of loaded
from a CDN, so that every plot draws with no network. `make setup` runs it after `npm ci`."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from dvc_render.html import HTML, PAGE_HTML

from pipeline.errors import PipelineError, run_stage
from pipeline.files import atomic_path

log = logging.getLogger("pipeline.plots_page")

# Each package's browser build, in load order: vega-lite needs vega, vega-embed needs both.
LIBRARIES = {
    "vega": "build/vega.min.js",
    "vega-lite": "build/vega-lite.min.js",
    "vega-embed": "build/vega-embed.min.js",
}
# The placeholders dvc-render fills; {scripts} (its CDN <script> tags) is the one we replace.
PLACEHOLDERS = [HTML.SCRIPTS_PLACEHOLDER, HTML.PLOTS_PLACEHOLDER, HTML.REFRESH_PLACEHOLDER]


def locked_versions(lock: Path) -> dict[str, str]:
    """The version package-lock.json pins for each library."""
    packages = json.loads(lock.read_text())["packages"]
    try:
        return {name: packages[f"node_modules/{name}"]["version"] for name in LIBRARIES}
    except KeyError as e:
        raise PipelineError(f"{lock} pins no {e.args[0]}; it must list {', '.join(LIBRARIES)}") from None


def inline_script(modules: Path, name: str, version: str) -> str:
    """One library's build as an inline <script>, after checking it is the locked version."""
    package = modules / name
    if not (package / "package.json").is_file():
        raise PipelineError(f"{package} is missing: run `npm ci` in {modules.parent} (make setup does)")
    installed = json.loads((package / "package.json").read_text())["version"]
    if installed != version:
        raise PipelineError(
            f"{package} is version {installed} but the lock file pins {version}: run `npm ci` in {modules.parent}"
        )
    code = (package / LIBRARIES[name]).read_text(encoding="utf8")
    # The source map is not shipped with the page; without the comment no tool goes looking for it.
    code = re.sub(r"\n//# sourceMappingURL=\S+\s*$", "\n", code)
    if "</script" in code.lower():
        raise PipelineError(f"{package / LIBRARIES[name]} contains '</script' and cannot be inlined")
    return f"<script>/* {name}@{version} (npm) */\n{code}</script>"


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
    parser.add_argument("--modules", type=Path, default=Path("plots/node_modules"))
    parser.add_argument("--lock", type=Path, default=Path("plots/package-lock.json"))
    parser.add_argument("--out", type=Path, default=Path("plots/page.html"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    versions = locked_versions(args.lock)
    html = page([inline_script(args.modules, name, version) for name, version in versions.items()])
    with atomic_path(args.out) as tmp:
        tmp.write_text(html, encoding="utf8")
    libraries = ", ".join(f"{name}@{version}" for name, version in versions.items())
    log.info("wrote %s (%d kB) with %s", args.out, len(html) // 1000, libraries)


if __name__ == "__main__":
    run_stage(main)
