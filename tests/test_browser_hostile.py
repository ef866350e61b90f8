"""End to end, in a real headless Chromium: what a visitor's browser fetches and renders when
a link or a file name is hostile (issue 23). Every request stays on the app's own server
(the favicon included), a link combining settings no config takes falls back with a
warning, and a refused file's name is text: no bold, no link, no image, no KaTeX."""

from __future__ import annotations

import pytest
from e2e import browser_page, require_chromium, wait_idle
from playwright.sync_api import expect

import qcore

pytestmark = pytest.mark.browser

require_chromium()

HOSTILE = "**bold** [click](https://evil.example/x) ![t](https://evil.example/t.png) $$x^2$$"


@pytest.mark.skipif("mnist-cnn" not in qcore.list_models(), reason="sample models not trained")
def test_a_hostile_link_and_file_name_fetch_and_render_nothing_else(app_url) -> None:
    requests: list[str] = []
    url = app_url  # the shared server: each test is its own browser session
    with browser_page(viewport=(1400, 1600)) as page:
        page.on("request", lambda r: requests.append(r.url))
        page.goto(f"{url}/?model=mnist-cnn&bits=4&codebook=kmeans&per_channel=true",
                  wait_until="domcontentloaded")  # fmt: skip
        page.locator('[data-testid="stMetric"]').first.wait_for(timeout=90_000)
        wait_idle(page)
        assert page.locator('[data-testid="stException"]').count() == 0
        expect(page.get_by_text("per-channel scales do not apply", exact=False)).to_have_count(1)
        icons = page.evaluate(
            "() => [...document.querySelectorAll('link[rel~=\"icon\"]')].map(l => l.href)"
        )
        assert icons and all(i.startswith(url) for i in icons), icons

        sidebar = page.locator('[data-testid="stSidebar"]')
        sidebar.get_by_text("Upload your own data").click()
        uploader = sidebar.locator('[data-testid="stFileUploader"]', has_text="Data file")
        uploader.locator('input[type="file"]').first.set_input_files(
            {"name": HOSTILE + ".npz", "mimeType": "application/octet-stream",
             "buffer": b"PK\x03\x04 not an archive"}  # fmt: skip
        )
        alert = sidebar.locator('[data-testid="stAlert"]')
        expect(alert).to_contain_text("is a damaged .npz (zip) archive", timeout=60_000)
        wait_idle(page)
        # the name reads as typed, and none of it became an element
        assert HOSTILE in alert.inner_text().replace("\u2060", "")  # an invisible joiner
        for tag in ("a", "img", "strong", ".katex"):
            assert alert.locator(tag).count() == 0, tag
        outside = [u for u in requests if not u.startswith((url, "data:", "blob:"))]
        assert outside == []  # fonts.gstatic.com was asked for the favicon before
