"""End to end: the served app in a real headless Chromium."""

from __future__ import annotations

import re

import pytest
from e2e import (
    browser_page,
    metric_value,
    pick_option,
    require_chromium,
    serve_app,
    wait_idle,
)

pytestmark = pytest.mark.browser

require_chromium()

ACCURACY = "Accuracy (simulated"


def _slider(page, label: str):
    # Streamlit's slider is an <input type="range"> labelled with the widget's label
    return page.locator(f'input[type="range"][aria-label="{label}"]')


def _wait_metric_change(page, label: str, old: str, timeout_ms: int = 60_000) -> str:
    page.wait_for_function(
        """([label, old]) => {
            const m = [...document.querySelectorAll('[data-testid="stMetric"]')]
                .find(e => e.innerText.includes(label));
            if (!m) return false;
            const v = m.querySelector('[data-testid="stMetricValue"]');
            return v && v.innerText !== old;
        }""",
        arg=[label, old],
        timeout=timeout_ms,
    )
    wait_idle(page)
    return metric_value(page, label)


def test_playground_slider_changes_accuracy_and_draws_histogram(app_url, tmp_path):
    with browser_page() as page:
        page.goto(app_url, wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]', has_text=ACCURACY).wait_for(timeout=90_000)
        wait_idle(page)
        before_acc = metric_value(page, ACCURACY)
        before_size = metric_value(page, "Packed size")
        assert re.fullmatch(r"\d+\.\d%", before_acc)
        # the histogram is a real plotly chart with drawn bars
        page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot').first.wait_for()
        assert page.locator('[data-testid="stPlotlyChart"] g.barlayer path').count() > 0

        thumb = _slider(page, "Bit width")
        assert thumb.get_attribute("aria-valuetext") == "8 bits"
        thumb.focus()
        for _ in range(7):  # 8 bits -> 1 bit
            page.keyboard.press("ArrowLeft")
        after_size = _wait_metric_change(page, "Packed size", before_size)
        after_acc = metric_value(page, ACCURACY)
        assert after_acc != before_acc
        assert float(after_acc.rstrip("%")) < float(before_acc.rstrip("%"))
        assert after_size != before_size
        assert thumb.get_attribute("aria-valuetext") == "1 bit"
        assert "bits=1" in page.url
        assert page.locator('[data-testid="stPlotlyChart"] g.barlayer path').count() > 0
        shot = tmp_path / "playground-1bit.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000


def test_activation_slider_changes_accuracy_and_the_label(app_url):
    with browser_page() as page:
        page.goto(app_url, wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]', has_text=ACCURACY).wait_for(timeout=90_000)
        wait_idle(page)
        before = metric_value(page, ACCURACY)
        assert page.get_by_text("W8A32 · simulated", exact=True).count() == 1
        thumb = _slider(page, "Activations")
        assert thumb.get_attribute("aria-valuetext") == "float32"
        thumb.focus()
        for _ in range(20):  # float32 -> 2 bits (14 steps): the coarsest activations
            if thumb.get_attribute("aria-valuetext") == "2 bits":
                break
            page.keyboard.press("ArrowLeft")
            page.wait_for_timeout(50)  # a press during a rerun's redraw may be lost
        page.get_by_text("W8A2 · simulated", exact=True).wait_for(timeout=120_000)
        wait_idle(page)
        after = metric_value(page, ACCURACY)
        assert thumb.get_attribute("aria-valuetext") == "2 bits"
        assert after != before
        assert float(after.rstrip("%")) < float(before.rstrip("%"))
        assert "abits=2" in page.url
        errors = page.locator('[data-testid="stException"]')
        assert errors.count() == 0, errors.all_inner_texts()


def test_deep_link_opens_that_configuration(app_url):
    with browser_page() as page:
        page.goto(f"{app_url}/?model=digits-mlp&dataset=digits&bits=6&prune=0.5",
                  wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]', has_text="Sparsity").wait_for(timeout=90_000)
        wait_idle(page)
        # pruning makes half the weights zero; 6-bit rounding may zero a few more
        sparsity = float(metric_value(page, "Sparsity").rstrip("%"))
        assert 50.0 <= sparsity < 55.0
        assert _slider(page, "Bit width").get_attribute("aria-valuetext") == "6 bits"
        assert "Trained on digits" in page.locator("[data-testid=stSidebar]").inner_text()
        assert page.locator('[data-testid="stAlert"]', has_text="Traceback").count() == 0


def test_bad_query_warns_and_falls_back(app_url):
    with browser_page() as page:
        page.goto(f"{app_url}/?model=no-such-model&bits=banana", wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]', has_text=ACCURACY).wait_for(timeout=90_000)
        wait_idle(page)
        warning = page.locator('[data-testid="stAlert"]').first.inner_text()
        assert "no-such-model" in warning or "banana" in warning
        assert page.locator("text=Traceback").count() == 0


ANALYSIS_PAGES = [  # URL path, its Run button, text its chart draws
    ("tradeoffs", "Run sweep", "Pareto front"),
    ("sensitivity", "Run analysis", "Accuracy drop (points)"),
    ("mixed", "Find per-layer bits", "Bits per layer"),
]


def test_analysis_pages_run_and_draw_their_charts(app_url):
    link = "?model=digits-mlp&dataset=digits"
    with browser_page() as page:
        for path, button, chart_text in ANALYSIS_PAGES:
            page.goto(f"{app_url}/{path}{link}", wait_until="domcontentloaded")
            run = page.get_by_role("button", name=button)
            run.wait_for(timeout=60_000)
            wait_idle(page)
            run.click()
            chart = page.locator('[data-testid="stPlotlyChart"]', has_text=chart_text)
            chart.wait_for(timeout=60_000)
            wait_idle(page)
            assert chart.locator(".js-plotly-plot").count() == 1, path
            assert page.locator('[data-testid="stException"]').count() == 0, path
            assert "digits-mlp" in page.url and f"/{path}" in page.url
        # the mixed-precision choice opens in the Playground, per-layer bits and all
        page.get_by_role("button", name="Open in Playground").click()
        note = page.locator('[data-testid="stAlert"]', has_text="Per-layer bit widths are active")
        note.wait_for(timeout=60_000)
        wait_idle(page)
        # back on the Playground ("/"), whose link now carries the bits (fc1:N,fc2:M, escaped)
        page.wait_for_url(re.compile(r"/\?.*layer_bits=fc1%3A\d+%2Cfc2%3A\d+"))
        assert _slider(page, "Bit width").count() == 1


def test_two_sessions_at_once_each_see_their_own_numbers(app_url):
    """A hosted app: two people on different settings of one shared model at the same time."""
    import qcore

    model = qcore.load_model("mnist-cnn")
    test = qcore.load_dataset("mnist-5k", "test")
    expected = {}
    for bits in (2, 3):
        c = qcore.compress(model, qcore.CompressionConfig(quant=qcore.QuantConfig(bits=bits)))
        expected[bits] = f"{qcore.evaluate(c.model, test).accuracy:.1%}"
    assert expected[2] != expected[3]
    with browser_page() as first:
        second = first.context.browser.new_page(viewport={"width": 1400, "height": 1000})
        pages = {2: first, 3: second}
        for bits, page in pages.items():  # both runs are in flight together on the server
            page.goto(f"{app_url}/?bits={bits}", wait_until="commit")
        for bits, page in pages.items():
            page.locator('[data-testid="stMetric"]', has_text=ACCURACY).wait_for(timeout=90_000)
            wait_idle(page)
            assert metric_value(page, ACCURACY) == expected[bits]
        # one session moves its slider; the other's numbers stay its own
        size_at_3 = metric_value(second, "Packed size")
        _slider(second, "Bit width").focus()
        second.keyboard.press("ArrowRight")  # 3 -> 4 bits
        _wait_metric_change(second, "Packed size", size_at_3)
        first.reload(wait_until="commit")
        first.locator('[data-testid="stMetric"]', has_text=ACCURACY).wait_for(timeout=90_000)
        wait_idle(first)
        assert metric_value(first, ACCURACY) == expected[2]
        assert "bits=4" in second.url and "bits=2" in first.url


def _no_page_not_found(page) -> None:
    body = page.locator("body").inner_text()
    assert "Page not found" not in body and "does not seem to exist" not in body, body[:500]
    assert page.locator('[role="dialog"]').count() == 0


@pytest.mark.parametrize(("path", "title", "button"), [
    ("tradeoffs", "Trade-offs", "Run sweep"),
    ("sensitivity", "Layer sensitivity", "Run analysis"),
    ("mixed", "Mixed precision", "Find per-layer bits"),
])  # fmt: skip
def test_a_page_link_is_the_first_visit_after_a_server_start(path, title, button, tmp_path):
    """Teachers share links such as /tradeoffs?model=mnist-cnn; the first one a fresh
    server sees used to get Streamlit's "Page not found" notice (see pages/__init__.py)."""
    with serve_app() as url, browser_page() as page:  # a fresh server: nothing ran yet
        page.goto(f"{url}/{path}?model=mnist-cnn", wait_until="domcontentloaded")
        run = page.get_by_role("button", name=button)
        navs = set()
        for _ in range(900):  # while the first run loads, Streamlit's v1 page list stays hidden
            navs.add(page.locator('[data-testid="stSidebarNav"]').count())
            if run.count():
                break
            page.wait_for_timeout(100)
        run.wait_for(timeout=30_000)
        wait_idle(page)
        page.wait_for_timeout(1_500)  # the notice, if any, arrives with the first run
        _no_page_not_found(page)
        assert navs == {0}
        assert page.locator("h1").first.inner_text() == title
        assert f"/{path}" in page.url and "model=mnist-cnn" in page.url
        # the app's own navigation, not a list of the modules in pages/
        links = page.locator('[data-testid="stTopNavLink"]').all_inner_texts()
        assert [t.split("\n")[-1].strip() for t in links] == [
            "Playground", "Trade-offs", "Layer sensitivity", "Debug", "Mixed precision",
            "Fine-tune", "Deep Compression", "Robustness", "Deploy",
        ], links
        page.screenshot(path=str(tmp_path / f"first-{path}.png"), full_page=True)
        # and the page still works after that first run
        page.get_by_role("link", name="Playground").click()
        page.locator('[data-testid="stMetric"]', has_text=ACCURACY).wait_for(timeout=90_000)
        wait_idle(page)
        _no_page_not_found(page)
        assert page.locator("h1").first.inner_text() == "Quantization Playground"


def _combobox(page, label: str):
    # Streamlit's selectbox is a combobox <input> labelled with the widget's label
    return page.get_by_role("combobox", name=label, exact=True)


def _pick(page, label: str, option: str) -> None:
    """Choose the option whose text contains ``option`` in the selectbox ``label``."""
    pick_option(page, _combobox(page, label),
                page.get_by_role("option").filter(has_text=option).first)  # fmt: skip
    wait_idle(page)


def test_layer_picker_follows_a_model_change(app_url):
    """Item 9: fc1 picked on mnist-cnn, then mnist-dwsep: the picker shows one of its layers."""
    import qcore

    dwsep_layers = set(qcore.weight_layers(qcore.load_model("mnist-dwsep")))
    with browser_page() as page:
        page.goto(f"{app_url}/?model=mnist-cnn", wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]', has_text=ACCURACY).wait_for(timeout=90_000)
        wait_idle(page)
        _pick(page, "Layer", "fc1")
        assert _combobox(page, "Layer").input_value() == "fc1"
        _pick(page, "Model", "mnist-dwsep")
        page.wait_for_url(re.compile(r"model=mnist-dwsep"), timeout=60_000)
        # the new model's histogram is drawn (a chart titled with one of its layers) ...
        page.wait_for_function(
            """(names) => [...document.querySelectorAll('[data-testid="stPlotlyChart"] .gtitle')]
                .some(e => names.includes(e.textContent.trim().split(',')[0]))""",
            arg=sorted(dwsep_layers),
            timeout=90_000,
        )
        wait_idle(page)
        page.wait_for_timeout(500)
        # ... and the picker above it names a layer of the new model, not the old fc1
        shown = _combobox(page, "Layer").input_value()
        assert shown in dwsep_layers, (shown, sorted(dwsep_layers))
        titles = page.locator('[data-testid="stPlotlyChart"] .gtitle').all_text_contents()
        assert any(t.split(",")[0].strip() == shown for t in titles), (shown, titles)
