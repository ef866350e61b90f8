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
from e2e import browser_page, metric_value, require_chromium, wait_idle
from playwright.sync_api import expect

import qcore
from qcore.upload import load_weights
from qcore.userdata import load_npz

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


def _open_panel(page, link: str, panel: str):
    """Open ``link``, wait for the Playground's numbers, open the sidebar's ``panel``;
    return the sidebar."""
    page.goto(link, wait_until="domcontentloaded")
    page.locator('[data-testid="stMetric"]').first.wait_for(timeout=90_000)
    wait_idle(page)
    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.get_by_text(panel).click()
    return sidebar


def _keeps_its_pickers_after_a_slider_move(page, picked) -> None:
    """Another widget's change must not put a sidebar picker back to its first option."""
    values = [picked.nth(i).input_value() for i in range(picked.count())]
    thumb = page.locator('[data-testid="stSlider"]', has_text="Bit width").get_by_role("slider")
    thumb.focus()
    page.keyboard.press("ArrowLeft")  # 8 -> 7 bits
    expect(page.get_by_text("W7A32 · simulated", exact=True)).to_have_count(1, timeout=60_000)
    wait_idle(page)
    assert [picked.nth(i).input_value() for i in range(picked.count())] == values


def _pick(page, selectbox, option: str) -> None:
    """Choose ``option`` in a Streamlit selectbox."""
    selectbox.click()
    page.get_by_role("option", name=option, exact=True).click()


@pytest.mark.skipif("mnist-cnn" not in qcore.list_models(), reason="sample models not trained")
def test_upload_refuses_a_broken_file_then_adds_the_model(app_url, tmp_path):
    good, bad = _weights(tmp_path)
    expected = load_weights(good.read_bytes(), "cnn", "mnist-5k", filename=good.name)
    accuracy = qcore.evaluate(expected.module, qcore.load_dataset("mnist-5k")).accuracy
    url = app_url  # the shared server: each test is its own browser session
    with browser_page(viewport=(1400, 1600)) as page:
        sidebar = _open_panel(page, f"{url}/?model=mnist-cnn", "Upload your own weights")
        weights_input = sidebar.locator('[data-testid="stFileUploader"]', has_text="Weights file"
                                        ).locator('input[type="file"]').first  # fmt: skip
        # the pickers start at the current model's architecture and dataset
        picked = sidebar.locator('[data-testid="stSelectbox"] input')
        expect(picked.nth(2)).to_have_value("cnn (as mnist-cnn)")  # architecture
        expect(picked.nth(3)).to_have_value("mnist-5k")  # trained on
        before = metric_value(page, "Accuracy")

        weights_input.set_input_files(str(bad))
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
        weights_input.set_input_files(str(good))
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
        _keeps_its_pickers_after_a_slider_move(page, picked)
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(SCREENSHOT), full_page=True)


@pytest.mark.skipif("digits-mlp" not in qcore.list_models(), reason="sample models not trained")
def test_upload_data_refuses_a_bad_file_then_measures_the_model_on_it(app_url, tmp_path):
    """scikit-learn's digits as an .npz: the same splits and normalisation as the embedded
    digits, so digits-mlp scores the same on it."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    good, bad = tmp_path / "my_digits.npz", tmp_path / "no_labels.npz"
    np.savez(good, x=(digits.images / 16.0).astype(np.float32), y=digits.target)
    np.savez(bad, x=digits.images.astype(np.float32))
    expected = load_npz(good.read_bytes(), filename=good.name)
    settings = qcore.Settings(bits=8).to_config()
    compressed = qcore.compress(qcore.load_model("digits-mlp"), settings)
    accuracy = qcore.evaluate(compressed.model, expected.splits["test"]).accuracy
    url = app_url  # the shared server: each test is its own browser session
    with browser_page(viewport=(1400, 1600)) as page:
        sidebar = _open_panel(page, f"{url}/?model=digits-mlp&dataset=digits&bits=8",
                              "Upload your own data")  # fmt: skip
        uploader = sidebar.locator('[data-testid="stFileUploader"]', has_text="Data file")
        uploader.locator('input[type="file"]').first.set_input_files(str(bad))
        alert = sidebar.locator('[data-testid="stAlert"]')
        expect(alert).to_contain_text("it needs x (the images) and y (the labels)",
                                      timeout=60_000)  # fmt: skip
        wait_idle(page)
        picked = sidebar.locator('[data-testid="stSelectbox"] input')
        assert picked.nth(1).input_value() == "digits (the model's own)"

        uploader.locator('input[type="file"]').first.set_input_files(str(good))
        expect(picked.nth(1)).to_have_value(expected.name, timeout=60_000)
        expect(alert).to_contain_text(f"Added {expected.name}: 1,259 train, 179 calib and "
                                      "359 test images of 1x8x8, 10 classes")  # fmt: skip
        wait_idle(page)
        assert metric_value(page, "Accuracy") == f"{accuracy:.1%}"
        assert "Uploaded from my_digits.npz: 1,797 images, 1x8x8, 10 classes." in (
            sidebar.inner_text())
        _keeps_its_pickers_after_a_slider_move(page, picked)
        assert page.locator('[data-testid="stException"]').count() == 0
