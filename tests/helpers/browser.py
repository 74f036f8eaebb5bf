"""Headless Chromium, the system's own (no browser download), driven by Playwright: open a page,
wait until it has drawn, and report what it drew, requested and complained about."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import ConsoleMessage, Request, sync_playwright

FLAGS = [
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # Belt and braces: whatever the page asks for, no host name resolves, so nothing leaves.
    "--host-resolver-rules=MAP * ~NOTFOUND",
]

# Run in the page: per plot <div> DVC wrote, what is in it. A canvas counts the pixels that are
# clearly coloured (lines, cells), not the grey and black of axes and text.
PROBE = """() => [...document.body.children].filter(e => e.tagName === 'DIV').map(div => {
  const canvas = div.querySelector('canvas'), svg = div.querySelector('svg');
  let coloured = 0;
  if (canvas && canvas.width && canvas.height) {
    const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 0; i < d.length; i += 4) {
      const [r, g, b] = [d[i], d[i + 1], d[i + 2]];
      if (d[i + 3] > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 40) coloured++;
    }
  }
  return {id: div.id, canvas: !!canvas, svg: svg ? svg.querySelectorAll('path, rect').length : 0,
          coloured, images: [...div.querySelectorAll('img')].map(i => i.complete ? i.naturalWidth : 0)};
})"""


def chromium() -> str | None:
    """Debian's `chromium` (or Chrome) on PATH, or None."""
    return next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)


@dataclass
class Visit:
    """What one page did: per-plot probe results, every URL it requested, its script errors and
    failed loads, its warnings (Vega logs some for DVC's own templates), and a screenshot."""

    plots: list[dict] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    screenshot: bytes = b""

    def console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "assert"):
            self.errors.append(f"{message.text} ({message.location.get('url', '')})")
        elif message.type == "warning":
            self.warnings.append(message.text)

    def failed(self, request: Request) -> None:
        self.errors.append(f"{request.url}: {request.failure}")


class Browser:
    """One headless Chromium (the binary given: no download); `visit()` pages with it; use as a
    context manager."""

    def __init__(self, binary: str, timeout: float = 30.0) -> None:
        self.binary, self.timeout = binary, timeout

    def __enter__(self) -> Browser:
        self.playwright = sync_playwright().start()
        # Playwright adds --no-sandbox (chromium_sandbox=False): we run as root in CI.
        self.browser = self.playwright.chromium.launch(
            executable_path=self.binary, args=FLAGS, timeout=self.timeout * 1000
        )
        return self

    def __exit__(self, *exc) -> None:
        self.browser.close()
        self.playwright.stop()

    def visit(self, page: Path, ready: int) -> Visit:
        """Open `page` in a new tab; wait until `ready` plots have drawn (or the timeout); report."""
        visit = Visit()
        context = self.browser.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(self.timeout * 1000)
        tab = context.new_page()
        tab.on("request", lambda request: visit.requests.append(request.url))
        tab.on("requestfailed", visit.failed)
        tab.on("pageerror", lambda error: visit.errors.append(f"{error.name}: {error.message}"))
        tab.on("console", visit.console)
        tab.goto(page.resolve().as_uri(), wait_until="load")
        deadline = time.monotonic() + self.timeout
        while True:
            visit.plots = tab.evaluate(PROBE)
            drawn = [p for p in visit.plots if p["coloured"] or p["svg"] or (p["images"] and all(p["images"]))]
            if len(drawn) >= ready or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        visit.screenshot = tab.screenshot(full_page=True)
        context.close()
        return visit
