"""End to end: compare mode on the Playground and the Debug page's model graph, in a real
headless Chromium (digits-mlp: quick)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from e2e import browser_page, require_chromium, wait_idle

pytestmark = pytest.mark.browser

require_chromium()

ACCURACY = "Accuracy (simulated"
SCREENSHOT = Path(os.environ.get("QP_COMPARE_SCREENSHOT", "/tmp/compare_page.png"))


def _accuracies(page) -> list[str]:
    """The value of every accuracy card on screen, in page order."""
    cards = page.locator('[data-testid="stMetric"]', has_text=ACCURACY)
    return [c.locator('[data-testid="stMetricValue"]').inner_text() for c in cards.all()]


def test_debug_page_draws_the_model_graph(app_url):
    """First in this module: a /debug link as the first visit after a server start."""
    with browser_page(viewport=(1400, 2400)) as page:
        page.goto(f"{app_url}/debug?model=digits-mlp&bits=3&abits=4",
                  wait_until="domcontentloaded")  # fmt: skip
        graph = page.locator('[data-testid="stGraphVizChart"] svg')
        graph.wait_for(timeout=180_000)
        wait_idle(page)
        assert page.locator("h1").first.inner_text() == "Debug a setting"
        body = page.locator("body").inner_text()
        assert "Page not found" not in body and "does not seem to exist" not in body
        text = graph.text_content()
        assert "fc1" in text and "fc2" in text and "dB" in text
        assert page.get_by_text("Weights cost").count() == 1
        assert page.locator('[data-testid="stException"]').count() == 0


def test_compare_pins_a_then_a_slider_moves_b_and_both_are_shown(app_url):
    with browser_page(viewport=(1400, 1600)) as page:
        page.goto(f"{app_url}/?model=digits-mlp&bits=3", wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]', has_text=ACCURACY).wait_for(timeout=120_000)
        wait_idle(page)
        [a_accuracy] = _accuracies(page)
        page.get_by_role("button", name="Compare").click()
        page.get_by_text("A (pinned) · W3A32").wait_for(timeout=120_000)
        wait_idle(page)
        assert _accuracies(page) == [a_accuracy, a_accuracy]  # B starts as A

        thumb = page.locator('input[type="range"][aria-label="Bit width"]')
        thumb.focus()
        page.keyboard.press("ArrowLeft")  # 3 bits -> 2 bits: B moves, A stays
        page.get_by_text("B (live) · W2A32").wait_for(timeout=120_000)
        wait_idle(page)
        shown = _accuracies(page)
        assert shown[0] == a_accuracy and shown[1] != a_accuracy
        assert page.locator('[data-testid="stMetric"]').count() == 10  # five numbers each
        deltas = page.locator('[data-testid="stMetricDelta"]').all_inner_texts()
        assert len(deltas) == 5 and all(d.strip().endswith("vs A") for d in deltas)
        # the link carries A and B
        query = parse_qs(urlparse(page.url).query)
        assert query["bits"] == ["2"]
        assert parse_qs(query["a"][0])["bits"] == ["3"]
        # the overlaid histogram and the images where A and B disagree
        page.get_by_text("Test images where A and B disagree").wait_for()
        chart = page.locator('[data-testid="stPlotlyChart"]', has_text="compressed weights of A")
        assert chart.locator("g.barlayer path").count() > 0
        assert page.locator('[data-testid="stImage"]').count() > 0
        # presentation layout: the sidebar collapsed, the numbers large
        sidebar = page.locator('[data-testid="stSidebar"]')
        assert sidebar.get_attribute("data-collapsed") == "true"
        size = page.locator('[data-testid="stMetricValue"]').first.evaluate(
            "e => parseFloat(getComputedStyle(e).fontSize)")
        assert size >= 40
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(SCREENSHOT), full_page=True)
