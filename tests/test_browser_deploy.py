"""End to end: the Deploy page in a real headless Chromium (digits-mlp at W8A8)."""

from __future__ import annotations

import pytest
from e2e import browser_page, require_chromium, wait_idle

pytestmark = pytest.mark.browser

require_chromium()


def test_deploy_page_names_integer_layers_and_measures(app_url):
    with browser_page(viewport=(1400, 2000)) as page:
        page.goto(f"{app_url}/deploy?model=digits-mlp&dataset=digits&bits=8&abits=8",
                  wait_until="domcontentloaded")  # fmt: skip
        measure = page.get_by_role("button", name="Measure accuracy and latency")
        measure.wait_for(timeout=120_000)
        wait_idle(page)
        body = page.locator("body").inner_text()
        assert "Page not found" not in body and "does not seem to exist" not in body
        assert page.locator("h1").first.inner_text() == "Deploy"
        assert "1 of 2 layers run ONNX Runtime integer kernels: fc1." in body
        assert page.get_by_role("button", name="Download the ONNX file").count() == 1
        measure.click()
        page.locator('[data-testid="stDataFrame"]').wait_for(timeout=180_000)
        page.get_by_text("ran ONNX Runtime integer kernels").wait_for(timeout=60_000)
        wait_idle(page)
        assert page.locator('[data-testid="stException"]').count() == 0
        body = page.locator("body").inner_text()
        assert "Latency: wall-clock milliseconds" in body and "thread(s)" in body
        assert "/deploy" in page.url
