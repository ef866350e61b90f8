"""End to end: the Deep Compression page in a real headless Chromium, from a link that is the
server's first visit to the downloaded file."""

from __future__ import annotations

import re

import pytest
from e2e import browser_page, require_chromium, serve_app, wait_idle
from playwright.sync_api import expect

import qcore
from qcore.export import PREFIX_BYTES

pytestmark = pytest.mark.browser

require_chromium()


def test_deep_compression_runs_and_downloads_the_size_shown(tmp_path):
    with serve_app() as url, browser_page() as page:  # a fresh server: the link comes first
        page.goto(f"{url}/deep?model=digits-mlp&dataset=digits", wait_until="domcontentloaded")
        run = page.get_by_role("button", name="Run Deep Compression")
        run.wait_for(timeout=90_000)
        wait_idle(page)
        body = page.locator("body").inner_text()
        assert "Page not found" not in body, body[:500]
        assert page.locator("h1").first.inner_text() == "Deep Compression"
        run.click()
        chart = page.locator('[data-testid="stPlotlyChart"]',
                             has_text="packed bytes after each stage")  # fmt: skip
        chart.wait_for(timeout=120_000)
        wait_idle(page)
        expect(chart.locator(".js-plotly-plot")).to_have_count(1, timeout=60_000)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert page.locator('[data-testid="stAlert"]', has_text="Error").count() == 0
        caption = page.locator('[data-testid="stCaptionContainer"]',
                               has_text="The packed file:").inner_text()  # fmt: skip
        numbers = re.findall(r"([\d,]+)(?:-byte payload| bytes,)", caption)
        file_bytes, payload = (int(v.replace(",", "")) for v in numbers)
        with page.expect_download() as info:
            page.get_by_role("button", name="Download the packed model").click()
        path = tmp_path / "deep.qpk"
        info.value.save_as(path)
        data = path.read_bytes()
        # the file is the size on the screen: its payload is the packed size shown
        assert len(data) == file_bytes
        header = int.from_bytes(data[8:12], "little")
        assert len(data) - PREFIX_BYTES - header == payload
        assert qcore.read_header(path)["size_bytes"] == payload
        loaded = qcore.load_packed(path).model
        test = qcore.load_dataset("digits", "test")
        assert qcore.evaluate(loaded, test).accuracy > 0.5
        page.screenshot(path=str(tmp_path / "deep.png"), full_page=True)
