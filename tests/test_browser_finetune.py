"""End to end: the Fine-tune page in a real headless Chromium (digits-mlp at 2 bits): one
epoch to the result table and Open in Playground; a longer run's live curves and Stop."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
from e2e import browser_page, metric_value, require_chromium, wait_idle
from playwright.sync_api import expect

import qcore

pytestmark = pytest.mark.browser

require_chromium()

SCREENSHOT = Path(os.environ.get("QP_FT_SCREENSHOT", "/tmp/ft_page.png"))
LIVE_SCREENSHOT = SCREENSHOT.with_name(SCREENSHOT.stem + "_live.png")
PLAYGROUND_SCREENSHOT = SCREENSHOT.with_name(SCREENSHOT.stem + "_playground.png")
LINK = "/finetune?model=digits-mlp&dataset=digits&bits=2"
# a run long enough on any machine that Stop comes before its end: 20 epochs of mnist-cnn
# (55 batches of 64 an epoch); digits-mlp's 400 steps can end before Stop is pressed
LONG_LINK = "/finetune?model=mnist-cnn&bits=2"
LONG_STEPS = 20 * math.ceil(len(qcore.load_dataset("mnist-5k", "train").y) / 64)


def _open_page(page, app_url: str, link: str = LINK):
    page.goto(app_url + link, wait_until="domcontentloaded")
    train = page.get_by_role("button", name="Train", exact=True)
    train.wait_for(timeout=60_000)
    wait_idle(page)
    return train


def test_one_epoch_shows_the_table_then_opens_in_the_playground(app_url):
    with browser_page(viewport=(1400, 1800)) as page:
        train = _open_page(page, app_url)
        assert page.get_by_text("W2A32", exact=True).count() == 1  # the setting's label
        train.click()
        table = page.locator('[data-testid="stDataFrame"]')
        table.wait_for(timeout=60_000)
        wait_idle(page)
        assert page.locator('[data-testid="stException"]').count() == 0
        acc = metric_value(page, "Accuracy, fine-tuned")
        assert re.fullmatch(r"\d+\.\d%", acc)
        chart = page.locator('[data-testid="stPlotlyChart"]', has_text="Training curves")
        expect(chart.locator(".js-plotly-plot")).to_have_count(1, timeout=60_000)
        chart.locator("g.scatterlayer path.js-line").nth(1).wait_for(timeout=60_000)
        assert chart.locator("g.scatterlayer path.js-line").count() >= 2  # loss, accuracy
        expect(page.get_by_role("button", name="Download the fine-tuned packed model")
               ).to_have_count(1, timeout=60_000)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        page.get_by_role("button", name="Open in Playground").click()
        sidebar = page.locator("[data-testid=stSidebar]")
        sidebar.get_by_text("A model of this session", exact=False).wait_for(timeout=60_000)
        wait_idle(page)
        assert metric_value(page, "Accuracy (simulated") == acc  # the same model, same setting
        page.screenshot(path=str(PLAYGROUND_SCREENSHOT), full_page=True)
        picker = page.get_by_role("combobox", name="Model", exact=True)
        name = re.fullmatch(r"(ft-[0-9a-f]{12}) \(this session\)", picker.input_value()).group(1)
        # another widget's change keeps the session model picked (see pages.sidebar)
        size = metric_value(page, "Packed size")
        page.locator('input[type="range"][aria-label="Bit width"]').focus()
        page.keyboard.press("ArrowRight")  # 2 -> 3 bits
        page.wait_for_url(re.compile(r"bits=3"), timeout=60_000)
        wait_idle(page)
        assert metric_value(page, "Packed size") != size
        assert picker.input_value() == f"{name} (this session)" and f"model={name}" in page.url
        assert page.locator('[data-testid="stException"]').count() == 0


def test_a_long_run_draws_live_curves_and_stops(app_url):
    with browser_page(viewport=(1400, 1400)) as page:
        train = _open_page(page, app_url, LONG_LINK)
        epochs = page.get_by_role("spinbutton", name="Epochs")
        epochs.fill("20")
        epochs.press("Enter")
        wait_idle(page)
        train.click()
        live = page.locator('[data-testid="stPlotlyChart"]', has_text="Training (live)")
        live.wait_for(timeout=60_000)
        page.get_by_text(re.compile(rf"Training… step \d+ of {LONG_STEPS}")).wait_for(
            timeout=30_000)
        page.wait_for_timeout(1500)  # the curves grow
        page.screenshot(path=str(LIVE_SCREENSHOT), full_page=True)
        page.get_by_role("button", name="Stop", exact=True).click()
        stopped = page.get_by_text(re.compile(r"Stopped after step \d+"))
        stopped.wait_for(timeout=60_000)
        wait_idle(page)
        step = int(re.search(r"step (\d+)", stopped.inner_text()).group(1))
        assert 0 < step < LONG_STEPS
        page.locator('[data-testid="stPlotlyChart"]', has_text="Training curves").wait_for()
        page.locator('[data-testid="stDataFrame"]').wait_for()  # the stopped model's table
        wait_idle(page)
        assert page.get_by_role("button", name="Train", exact=True).is_enabled()
        assert page.get_by_role("button", name="Stop", exact=True).is_disabled()
        assert page.locator('[data-testid="stException"]').count() == 0
