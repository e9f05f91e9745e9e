"""The HTML report in a real browser: it loads, every image decodes, nothing logs an error.

Drives headless Chromium (Debian's ``chromium``) through the Chrome DevTools
Protocol over ``--remote-debugging-pipe``: standard library only, nothing
downloaded at test time. A full-page screenshot is kept under
``test-artifacts/`` (gitignored) for people and CI to look at. Without
Chromium the test skips, unless ``BAYESCIRC_REQUIRE_BROWSER`` is set (CI sets
it, so a missing browser fails there instead of passing silently).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from fit_fixture import make_fit, make_simulation

from bayescirc import reporting

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """A minimal CDP client: JSON messages separated by NUL bytes on fds 3 (to Chrome) and 4 (from Chrome)."""

    def __init__(self, binary: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # The child must see our pipe ends as its fds 3 and 4 (dup first: either end may already be 3 or 4).
        def _setup():
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._log = open(profile.parent / "chromium.log", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--window-size=1280,900", "about:blank"],
            preexec_fn=_setup, close_fds=False, stdout=subprocess.DEVNULL, stderr=self._log)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                return None
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe: "
                                   + Path(self._log.name).read_text(errors="replace")[-2000:])
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline - time.monotonic())
            if reply is None:
                raise TimeoutError(f"no reply to {method} within {timeout} s")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            event = self._read_message(deadline - time.monotonic())
            if event is None:
                raise TimeoutError(f"no {method} event within {timeout} s")
            if event.get("method") == method:
                return event
            self.events.append(event)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (event := self._read_message(max(0.0, deadline - time.monotonic()))) is not None:
            self.events.append(event)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass


def _errors(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions and error-level log entries (e.g. failed loads)."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    return found


def _render(html_path: Path, screenshot: Path, profile: Path) -> tuple[list[dict], list[str], str]:
    binary = _chromium()
    tools = DevTools(binary, profile)
    try:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            tools.send(f"{domain}.enable", session=session)
        tools.send("Page.navigate", {"url": html_path.resolve().as_uri()}, session=session)
        tools.wait_for("Page.loadEventFired")
        tools.drain(0.5)
        probe = ("JSON.stringify({title: document.title, images: Array.from(document.images).map(i => "
                 "({alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))})")
        result = tools.send("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=session)
        page = json.loads(result["result"]["value"])
        size = tools.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = tools.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16000), "scale": 1}},
            session=session)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        tools.drain(0.2)
        return page["images"], _errors(tools.events), page["title"]
    finally:
        tools.close()


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    sim = make_simulation()
    fit = make_fit(sim, divergences=2)
    stability = {"bootstrap": {"conventional": {"jaccard_mean": 0.42}, "bayesian": {"jaccard_mean": 0.81}}}
    out = tmp_path_factory.mktemp("report") / "report.html"
    return reporting.report(fit, out, scores=sim.scores, stability=stability)


@pytest.mark.browser
def test_report_loads_in_headless_chromium_with_all_images_and_no_errors(report_file, tmp_path):
    if _chromium() is None:
        if os.environ.get("BAYESCIRC_REQUIRE_BROWSER"):
            pytest.fail("BAYESCIRC_REQUIRE_BROWSER is set but no chromium binary is on PATH (apt-get install chromium)")
        pytest.skip("headless Chromium not installed (apt-get install chromium); set BAYESCIRC_REQUIRE_BROWSER to fail instead")
    screenshot = ARTIFACTS / "report.png"
    images, errors, title = _render(report_file, screenshot, tmp_path / "profile")
    assert errors == []
    assert "ioi-toy" in title
    expected = report_file.read_text().count("<img ")
    assert len(images) == expected == 8  # trace, rank, energy, decomposition, forest, circuit, ppc, scatter
    broken = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert broken == []
    assert screenshot.read_bytes()[:4] == b"\x89PNG" and screenshot.stat().st_size > 50_000


@pytest.mark.browser
def test_the_browser_check_sees_a_broken_image(tmp_path):
    """The check above can fail: a page with an undecodable image and a console error is caught."""
    if _chromium() is None:
        if os.environ.get("BAYESCIRC_REQUIRE_BROWSER"):
            pytest.fail("BAYESCIRC_REQUIRE_BROWSER is set but no chromium binary is on PATH")
        pytest.skip("headless Chromium not installed (apt-get install chromium)")
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head><title>t</title></head><body>"
                    "<img alt='bad' src='data:image/png;base64,AAAA'><script>console.error('boom')</script></body></html>")
    images, errors, _ = _render(page, tmp_path / "shot.png", tmp_path / "profile")
    assert images[0]["width"] == 0
    assert any("boom" in e for e in errors)
