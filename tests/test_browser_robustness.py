"""End to end: the Robustness page in a real headless Chromium (digits-mlp, a small curve)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from e2e import browser_page, require_chromium, wait_idle
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

require_chromium()

SCREENSHOT = Path(os.environ.get("QP_ROBUST_SCREENSHOT", "/tmp/robust_page.png"))


def test_robustness_page_runs_a_curve_and_shows_images(app_url):
    with browser_page(viewport=(1400, 3000)) as page:
        page.goto(f"{app_url}/robustness?model=digits-mlp&dataset=digits",
                  wait_until="domcontentloaded")  # fmt: skip
        run = page.get_by_role("button", name="Run", exact=True)
        run.wait_for(timeout=120_000)
        wait_idle(page)
        # the first visit of a fresh server (pages/robustness.py hands it to app.py)
        body = page.locator("body").inner_text()
        assert "Page not found" not in body and "does not seem to exist" not in body
        assert page.locator("h1").first.inner_text() == "Robustness"
        strengths = page.get_by_role("textbox", name="FGSM strengths")
        strengths.fill("0 0.05 0.1 0.2")
        strengths.press("Enter")
        wait_idle(page)
        run.click()
        chart = page.locator('[data-testid="stPlotlyChart"]', has_text="FGSM attack")
        chart.wait_for(timeout=120_000)
        page.get_by_text("What the perturbed images look like").wait_for(timeout=120_000)
        # the grid is drawn after its subheader, by the same run: wait for all of it, since the
        # status widget can be gone for a moment between the subheader and the images
        expect(page.locator('[data-testid="stImage"]')).to_have_count(8, timeout=120_000)
        wait_idle(page)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert page.locator('[data-testid="stPlotlyChart"]').count() == 2  # gaussian, FGSM
        summary = page.get_by_text("float32 keeps").first.inner_text()
        assert summary.startswith("At ") and "%" in summary
        assert page.locator('[data-testid="stImage"]').count() == 8
        assert "/robustness" in page.url
        page.screenshot(path=str(SCREENSHOT), full_page=True)
