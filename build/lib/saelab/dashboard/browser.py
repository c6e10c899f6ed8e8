"""Headless Chromium for the dashboard's tests and screenshots, with no dependency beyond the standard library.

Two ways in: `dump_dom(url)` runs `chromium --headless --dump-dom` (the page's DOM after its scripts ran), and
`Chromium` speaks the Chrome DevTools Protocol over `--remote-debugging-pipe` (JSON messages ending in a NUL
byte on file descriptors 3 and 4: no websocket client, no port), which can type into the search box, press
Enter, read the page back and take screenshots.

    python -m saelab.dashboard.browser <dashboard dir or index.html> out.png [--fragment latent=12]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_EXEC_WITH_PIPES = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
                    "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")
FLAGS = ("--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-background-networking", "--disable-sync", "--hide-scrollbars",
         "--mute-audio", "--disable-dev-shm-usage")


class BrowserError(RuntimeError):
    """Chromium could not be started, or did not answer in time."""


def find_chromium() -> str | None:
    """A Chromium or Chrome binary: $SAELAB_CHROMIUM, else the first of CANDIDATES on PATH."""
    given = os.environ.get("SAELAB_CHROMIUM")
    if given:
        return given if Path(given).is_file() else shutil.which(given)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def file_url(path: Path, fragment: str = "", query: str = "") -> str:
    """file:// URL of a dashboard (its folder or its index.html), with an optional ?query and #fragment."""
    path = Path(path).absolute()
    if path.is_dir():
        path = path / "index.html"
    return path.as_uri() + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else "")


def _browser_env(profile: str) -> dict[str, str]:
    """Chromium's environment: HOME and XDG folders inside its throw-away profile, so it writes nothing else
    (crash-report settings, dconf) anywhere."""
    return {**os.environ, "HOME": profile, "XDG_CONFIG_HOME": profile, "XDG_CACHE_HOME": profile}


def dump_dom(url: str, binary: str | None = None, budget_ms: int = 5000, timeout: float = 60,
             workdir: Path | None = None) -> str:
    """The serialised DOM after the page loaded and its scripts ran (virtual time lets them settle). The
    browser's temporary profile goes under `workdir` (default: the system's temporary folder)."""
    binary = binary or find_chromium()
    if binary is None:
        raise BrowserError("no chromium binary found")
    with tempfile.TemporaryDirectory(prefix="saelab-chromium-", dir=workdir) as profile:
        result = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                                 "--dump-dom", url], capture_output=True, text=True, timeout=timeout,
                                env=_browser_env(profile))
    if result.returncode != 0:
        raise BrowserError(f"chromium --dump-dom exited {result.returncode}: {result.stderr[-500:]}")
    return result.stdout


class Chromium:
    """A headless Chromium driven through the DevTools protocol on a pipe. Use as a context manager."""

    def __init__(self, binary: str | None = None, timeout: float = 30, workdir: Path | None = None):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise BrowserError("no chromium binary found")
        self.timeout = timeout
        self._next_id = 0
        self._buffer = b""
        self._profile = tempfile.TemporaryDirectory(prefix="saelab-chromium-", dir=workdir)
        # The protocol reads commands on fd 3 and writes replies on fd 4. A tiny Python exec wrapper puts the pipe
        # ends there (numbers >= 10 in the meantime, so nothing is overwritten), then becomes Chromium.
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        child_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)
        command = [self.binary, *FLAGS, f"--user-data-dir={self._profile.name}", "--remote-debugging-pipe",
                   "about:blank"]
        try:
            self.process = subprocess.Popen([sys.executable, "-c", _EXEC_WITH_PIPES, str(child_r), str(child_w),
                                             *command], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, pass_fds=(child_r, child_w),
                                            env=_browser_env(self._profile.name))
        finally:
            os.close(child_r)
            os.close(child_w)

    # -- the protocol -----------------------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.time()
            if left <= 0:
                raise BrowserError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium closed the protocol pipe (exit code {self.process.poll()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """One command; returns its result (events arriving meanwhile are dropped: pages are polled instead)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.time() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def open(self, url: str, width: int = 1280, height: int = 900) -> Page:
        """A new tab showing `url`, its viewport `width` x `height` CSS pixels."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        self.send("Page.navigate", {"url": url}, session)
        page.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")
        return page

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                with contextlib.suppress(BrowserError, OSError):
                    self.send("Browser.close")
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            for fd in (self._to_browser, self._from_browser):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """One tab: evaluate JavaScript, wait for a condition, type, press keys, take a screenshot."""

    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, self.session)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15) -> Any:
        """Poll until `expression` is truthy; return its value."""
        deadline = time.time() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.time() > deadline:
                raise BrowserError(f"timed out waiting for {expression}")
            time.sleep(0.05)

    def type_text(self, selector: str, text: str) -> None:
        """Focus the element and type `text` as keyboard input would."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", {"text": text})

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13,
                                                 **({"text": "\r"} if kind == "keyDown" else {})})

    def screenshot(self) -> bytes:
        """PNG of the viewport."""
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])


def small_png(png: bytes, colors: int = 96) -> bytes:
    """The screenshot as a palette PNG: flat UI colours survive, the file shrinks several-fold."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def screenshot(dashboard: Path, out: Path, fragment: str = "", width: int = 1280, height: int = 900,
               colors: int = 96, binary: str | None = None, workdir: Path | None = None) -> Path:
    """Write a PNG of the dashboard (at `#fragment`, e.g. latent=12) once the page has rendered."""
    with Chromium(binary, workdir=workdir) as browser:
        page = browser.open(file_url(dashboard, fragment), width, height)
        page.wait_for("['summary', 'message'].includes(document.body.dataset.view) || "
                      "document.body.dataset.view.startsWith('latent:')")
        png = page.screenshot()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(small_png(png, colors) if colors else png)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m saelab.dashboard.browser",
                                     description="Screenshot a dashboard with headless Chromium.")
    parser.add_argument("dashboard", type=Path, help="a dashboard folder or its index.html")
    parser.add_argument("png", type=Path)
    parser.add_argument("--fragment", default="", help="e.g. latent=12 (default: the overview)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--colors", type=int, default=96, help="palette size; 0 keeps full colour")
    args = parser.parse_args(argv)
    out = screenshot(args.dashboard, args.png, args.fragment, args.width, args.height, args.colors)
    print(f"{out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
