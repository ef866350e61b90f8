"""Serving the app and driving it in headless Chromium: shared by the browser tests and
``scripts/bench_browser.py``."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("QP_CHROMIUM", "/usr/bin/chromium")


def require_chromium() -> None:
    """At the top of a browser test module: skip it where Chromium is missing, except in CI
    (``QP_REQUIRE_BROWSER``), where a missing browser is a failure."""
    import pytest

    if Path(CHROMIUM).exists():
        return
    if os.environ.get("QP_REQUIRE_BROWSER"):
        raise RuntimeError(f"Chromium is required here but missing at {CHROMIUM}.")
    pytest.skip(f"Chromium not found at {CHROMIUM} (make test installs it where it can).",
                allow_module_level=True)
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(
    timeout: float = 90.0, args: Sequence[str] = (), env: dict | None = None,
    log_path: Path | None = None, script: str = "app.py",
) -> Iterator[str]:
    """Run ``streamlit run app.py`` on a free port; yield its base URL; stop it afterwards.
    ``args`` are more command-line options (``--secrets.files PATH``), ``env`` the
    environment's additions; ``log_path`` keeps the server's output in that file (read it
    while the server runs) instead of a temporary one; ``script`` another page script
    (``scripts/bench_browser.py`` measures a bare one)."""
    port = free_port()
    log = open(log_path, "w+b") if log_path is not None else tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", script, "--server.headless", "true",
         "--server.port", str(port), "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", *args],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                output = log.read().decode(errors="replace")
                raise RuntimeError(f"streamlit exited early:\n{output}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("streamlit did not answer /_stcore/health in time")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def browser_page(viewport=(1400, 1000)):
    """A Playwright page in Debian's headless Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            yield page
        finally:
            browser.close()


def wait_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until Streamlit has finished the current run: its status widget is gone and no
    element of the last run is still shown as stale (``data-stale="true"``) beside the new."""
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stStatusWidget"]')
                 && !document.querySelector('[data-stale="true"]')""",
        timeout=timeout_ms,
    )


def metric_value(page, label: str) -> str:
    """The text of the ``st.metric`` whose label contains ``label``."""
    metric = page.locator('[data-testid="stMetric"]', has_text=label).first
    return metric.locator('[data-testid="stMetricValue"]').inner_text()


def pick_option(page, picker, option, attempts: int = 3) -> None:
    """Open the selectbox ``picker`` (a locator) and click ``option`` (a locator in its
    list). A rerun that redraws the picker while its list opens closes the list: then the
    list is opened again, after the run is over."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(attempts):
        wait_idle(page)
        picker.click()
        try:
            option.click(timeout=10_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise
            page.keyboard.press("Escape")
