"""Headless Chromium driven over the DevTools protocol on a pipe (no port, no extra package):
open a page, wait until it has drawn, and report what it drew, requested and complained about."""

from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = [
    "--headless=new",
    "--no-sandbox",  # we run as root in CI
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # Belt and braces: whatever the page asks for, no host name resolves, so nothing leaves.
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--window-size=1400,1000",
    "--remote-debugging-pipe",  # the protocol on fds 3 (to Chromium) and 4 (from it)
]

# Run in the page: per plot <div> DVC wrote, what is in it. A canvas counts the pixels that are
# clearly coloured (lines, cells), not the grey and black of axes and text.
PROBE = """(() => [...document.body.children].filter(e => e.tagName === 'DIV').map(div => {
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
}))()"""


def above_4(fd: int) -> int:
    """`fd` moved to a number above 4, so that putting the pipes on 3 and 4 overwrites neither."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def chromium() -> str | None:
    """Debian's `chromium` (or Chrome) on PATH, or None."""
    return next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)


@dataclass
class Visit:
    """What one page did: per-plot probe results, every URL it requested, its script errors and
    failed loads, its warnings (Vega logs some for DVC's own templates), and a screenshot."""

    plots: list[dict]
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    screenshot: bytes = b""


class Browser:
    """One headless Chromium; `visit()` pages with it; use as a context manager."""

    def __init__(self, binary: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()
        to_chrome, from_chrome = above_4(to_chrome), above_4(from_chrome)
        # Chromium reads commands on fd 3 and writes replies on fd 4: bash puts the pipes there
        # (dash's redirections take one-digit fds only; preexec_fn is unsafe with threads).
        redirect = f"3<&{to_chrome} 4>&{from_chrome} {to_chrome}<&- {from_chrome}>&-"
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" {redirect}', "bash", binary, *FLAGS]
            + [f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(to_chrome, from_chrome),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._ids = itertools.count(1)
        self._buffer = b""
        self.events: list[dict] = []

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._out)
        os.close(self._in)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer within {self.timeout} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command, keep the events that arrive meanwhile, return its result."""
        id_ = next(self._ids)
        message = {"id": id_, "method": method, "params": params} | ({"sessionId": session} if session else {})
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == id_:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def evaluate(self, session: str, expression: str):
        """The value of a JavaScript expression in the page; its exception, if it throws."""
        reply = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression[:60]}...: {reply['exceptionDetails']['exception']['description']}")
        return reply["result"]["value"]

    def visit(self, page: Path, ready: int) -> Visit:
        """Open `page` in a new tab; wait until `ready` plots have drawn (or the timeout); report."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable", session)
        self.events.clear()
        self.call("Page.navigate", session, url=page.resolve().as_uri())
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._read(deadline))
        while True:
            plots = self.evaluate(session, PROBE)
            drawn = [p for p in plots if p["coloured"] or p["svg"] or (p["images"] and all(p["images"]))]
            if len(drawn) >= ready or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        size = self.call("Page.getLayoutMetrics", session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.call("Page.captureScreenshot", session, clip=clip, captureBeyondViewport=True)["data"]
        visit = Visit(plots=plots, screenshot=base64.b64decode(shot))
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Network.requestWillBeSent":
                visit.requests.append(params["request"]["url"])
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                visit.errors.append(details.get("exception", {}).get("description") or details["text"])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert", "warning"):
                text = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                (visit.warnings if params["type"] == "warning" else visit.errors).append(text)
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                text = f"{params['entry']['text']} ({params['entry'].get('url', '')})"
                (visit.warnings if params["entry"]["level"] == "warning" else visit.errors).append(text)
        self.call("Target.closeTarget", targetId=target)
        return visit
