"""A real browser for tests: Debian's headless Chromium, driven through chromedriver.

chromedriver speaks the W3C WebDriver protocol, plain JSON over HTTP, so `requests` drives it and no
browser-automation library is needed. Each `chromium()` is a fresh browser with an empty profile of its
own (no cookies, no cached credentials), stopped on exit. Pages and their own scripts run as for a user;
what a test reads (`title`, `text`, `visible`) is what that user would see.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from launch.processes import LOOPBACK, free_port, stop_process, wait_for_port, wait_until

# The browser's own flags: headless; no sandbox (the tests run as root, where Chromium refuses to start
# with one, and it only ever loads the tests' own pages); and nothing that reaches out to Google's
# services on its own (QUIC, first-run pages, background updates, sync).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Debian's packages (tests/debian-packages.txt, installed by `make test`): the program, the driver.
PACKAGES = {"chromium": "chromium", "chromedriver": "chromium-driver"}
# A WebDriver element reference is an object under this key (W3C WebDriver, "Elements").
_ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"
_COMMAND_TIMEOUT_S = 120.0  # a page load on a loaded 2-core machine; chromedriver answers when done


def missing() -> str | None:
    """Why no browser can run here (a package not installed), or None."""
    absent = [package for program, package in PACKAGES.items() if shutil.which(program) is None]
    if not absent:
        return None
    names = " and ".join(absent)
    return f"Debian's {names} not installed (`make test` installs it: tests/debian-packages.txt)"


class WebDriverError(RuntimeError):
    """chromedriver refused a command: its W3C error code and message."""


class Browser:
    """One WebDriver session: a headless Chromium window."""

    def __init__(self, endpoint: str, session_id: str) -> None:
        self._session = f"{endpoint}/session/{session_id}"

    def _command(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.request(method, f"{self._session}{path}", json=body, timeout=_COMMAND_TIMEOUT_S)
        value = response.json()["value"]
        if response.status_code != 200:
            raise WebDriverError(f"{value.get('error')}: {value.get('message', '').splitlines()[0]}")
        return value

    def get(self, url: str) -> None:
        """Navigate as if typed in the address bar; returns once the page has loaded. Credentials in the
        URL (`http://user:password@host/...`) answer an HTTP authentication challenge, as a user's would."""
        self._command("POST", "/url", {"url": url})

    def script(self, body: str, *args: Any) -> Any:
        """Run a function body in the page (`arguments[i]` are `args`); what it returns."""
        return self._command("POST", "/execute/sync", {"script": body, "args": list(args)})

    @property
    def location(self) -> str:
        """The address of the document shown (Chromium's own error pages are `chrome-error://...`)."""
        return str(self.script("return window.location.href"))

    @property
    def title(self) -> str:
        return str(self._command("GET", "/title"))

    @property
    def text(self) -> str:
        """The page's visible text."""
        return str(self.script("return document.body ? document.body.innerText : ''"))

    def visible(self, selector: str) -> list[bool]:
        """For each element `selector` matches: whether it is shown (laid out and not hidden)."""
        return [bool(shown) for shown in self.script(_VISIBLE, selector)]

    def click(self, selector: str) -> None:
        """A user's click on the first element `selector` matches (it must be shown)."""
        found = self._command("POST", "/element", {"using": "css selector", "value": selector})
        self._command("POST", f"/element/{found[_ELEMENT_KEY]}/click", {})

    def wait_for(self, body: str, *args: Any, timeout: float = 60.0, what: str = "the page") -> None:
        """Until `script(body, *args)` is truthy: pages that fill themselves in by script."""
        wait_until(lambda: bool(self.script(body, *args)), timeout, 0.2, what)


_VISIBLE = """
return Array.from(document.querySelectorAll(arguments[0])).map(function (el) {
    var style = window.getComputedStyle(el);
    return el.getClientRects().length > 0 && style.visibility !== 'hidden';
});
"""


@contextmanager
def chromium(profile: Path) -> Iterator[Browser]:
    """A fresh headless Chromium (its profile in the empty directory `profile`), closed on exit.
    Call `missing()` first: this raises if the packages are not installed."""
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    port = free_port()
    with open(profile.parent / f"{profile.name}-chromedriver.log", "ab") as log:
        driver = subprocess.Popen(
            [str(shutil.which("chromedriver")), f"--port={port}"], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port(port, 60)
        endpoint = f"http://{LOOPBACK}:{port}"
        options = {
            "binary": shutil.which("chromium"),
            "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"],
        }
        capabilities = {"browserName": "chrome", "goog:chromeOptions": options}
        created = requests.post(
            f"{endpoint}/session",
            json={"capabilities": {"alwaysMatch": capabilities}},
            timeout=_COMMAND_TIMEOUT_S,
        ).json()["value"]
        if "sessionId" not in created:
            raise WebDriverError(f"no browser session: {created.get('message', created)}")
        try:
            yield Browser(endpoint, created["sessionId"])
        finally:  # closes the browser; chromedriver itself is stopped below
            requests.delete(f"{endpoint}/session/{created['sessionId']}", timeout=_COMMAND_TIMEOUT_S)
    finally:
        stop_process(driver)
