"""End to end, issue 18: what only a browser shows (a tab's title, a button's label cut
short at 1024 px, the clip-mode picker at 800 px)."""

from __future__ import annotations

import pytest
from e2e import browser_page, require_chromium, wait_idle

pytestmark = pytest.mark.browser

require_chromium()


def test_each_page_has_its_own_tab_title(app_url):
    with browser_page() as page:
        page.goto(f"{app_url}/?model=digits-mlp&dataset=digits", wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]').first.wait_for(timeout=120_000)
        wait_idle(page)
        assert page.title() == "Quantization Playground"
        page.goto(f"{app_url}/tradeoffs?model=digits-mlp&dataset=digits",
                  wait_until="domcontentloaded")  # fmt: skip
        page.get_by_role("button", name="Run sweep").wait_for(timeout=120_000)
        wait_idle(page)
        page.wait_for_function("() => document.title.startsWith('Trade-offs')",
                               timeout=30_000)  # fmt: skip
        assert page.title() == "Trade-offs · Quantization Playground"


@pytest.mark.parametrize("width", [1024, 800])
def test_labels_are_not_cut_short_on_a_narrow_screen(app_url, width):
    with browser_page(viewport=(width, 1400)) as page:
        page.goto(f"{app_url}/?model=digits-mlp&dataset=digits&bits=8&layer_bits=fc1:4",
                  wait_until="domcontentloaded")  # fmt: skip
        button = page.get_by_role("button", name="Clear per-layer bits")
        button.wait_for(timeout=120_000)
        wait_idle(page)
        # the label's text fits its button: nothing hidden behind an ellipsis
        cut = button.evaluate("""b => [...b.querySelectorAll('*'), b].some(
            e => e.scrollWidth > e.clientWidth + 1)""")
        assert not cut
        picker = page.get_by_role("combobox", name="Clip mode", exact=True)
        assert picker.input_value() == "ratio"
        # the whole option fits its box: an input whose text overflows scrolls
        assert picker.evaluate("e => e.scrollWidth <= e.clientWidth + 1")
