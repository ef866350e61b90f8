"""End to end: uploading one's own weights in the sidebar of a real headless Chromium.

A refused file shows its sentence and changes nothing; picking what the sentence asks for
reads the file again; accepted weights become a model of this session, picked at once,
whose float accuracy is the one qcore measures."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from e2e import browser_page, metric_value, require_chromium, serve_app, wait_idle
from playwright.sync_api import expect

import qcore
from qcore.upload import load_weights

pytestmark = pytest.mark.browser

require_chromium()

SCREENSHOT = Path(os.environ.get("QP_UPLOAD_SCREENSHOT", "/tmp/upload_page.png"))


def _weights(tmp_path):
    """mnist-cnn's weights with a changed output bias (a model no sample is), and the same
    file without that tensor."""
    sd = {k: v.clone() for k, v in qcore.load_model("mnist-cnn").state_dict().items()}
    sd["fc2.bias"] += torch.linspace(-0.5, 0.5, sd["fc2.bias"].numel())
    good, bad = tmp_path / "my_cnn.pt", tmp_path / "broken.pt"
    torch.save(sd, good)
    torch.save({k: v for k, v in sd.items() if k != "fc2.bias"}, bad)
    return good, bad


def _pick(page, selectbox, option: str) -> None:
    """Choose ``option`` in a Streamlit selectbox."""
    selectbox.click()
    page.get_by_role("option", name=option, exact=True).click()


@pytest.mark.skipif("mnist-cnn" not in qcore.list_models(), reason="sample models not trained")
def test_upload_refuses_a_broken_file_then_adds_the_model(tmp_path):
    good, bad = _weights(tmp_path)
    expected = load_weights(good.read_bytes(), "cnn", "mnist-5k", filename=good.name)
    accuracy = qcore.evaluate(expected.module, qcore.load_dataset("mnist-5k")).accuracy
    with serve_app() as url, browser_page(viewport=(1400, 1600)) as page:
        page.goto(f"{url}/?model=mnist-cnn", wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]').first.wait_for(timeout=90_000)
        wait_idle(page)
        sidebar = page.locator('[data-testid="stSidebar"]')
        sidebar.get_by_text("Upload your own weights").click()
        # the pickers start at the current model's architecture and dataset
        picked = sidebar.locator('[data-testid="stSelectbox"] input')
        expect(picked.nth(2)).to_have_value("cnn (as mnist-cnn)")  # architecture
        expect(picked.nth(3)).to_have_value("mnist-5k")  # trained on
        before = metric_value(page, "Accuracy")

        sidebar.locator('input[type="file"]').first.set_input_files(str(bad))
        alert = sidebar.locator('[data-testid="stAlert"]')
        expect(alert).to_contain_text("lacks 1 of the 8 tensors (fc2.bias)", timeout=60_000)
        wait_idle(page)
        assert metric_value(page, "Accuracy") == before  # nothing changed
        assert picked.first.input_value() == "mnist-cnn (334k)"

        # the right file, said to be trained on digits: its shapes do not fit, and the
        # sentence asks for the dataset it was trained on
        _pick(page, sidebar.locator('[data-testid="stSelectbox"]').nth(3), "digits")
        expect(picked.nth(3)).to_have_value("digits", timeout=60_000)
        wait_idle(page)
        sidebar.locator('input[type="file"]').first.set_input_files(str(good))
        expect(alert).to_contain_text("fc1.weight is 100x3136, not 100x256", timeout=60_000)
        expect(alert).to_contain_text("Pick the dataset the weights were trained on")
        wait_idle(page)
        assert picked.first.input_value() == "mnist-cnn (334k)"
        # picking it is enough: the file in the uploader is read again
        _pick(page, sidebar.locator('[data-testid="stSelectbox"]').nth(3), "mnist-5k")
        expect(picked.first).to_have_value(f"{expected.name} (this session)", timeout=60_000)
        wait_idle(page)
        text = sidebar.inner_text()
        assert "Weights uploaded from my_cnn.pt, the cnn architecture on mnist-5k." in text
        assert f"float accuracy {accuracy:.1%}" in text
        expect(alert).to_have_count(0, timeout=60_000)  # the refusal is gone
        assert re.fullmatch(r"\d+\.\d%", metric_value(page, "Accuracy"))
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(SCREENSHOT), full_page=True)
