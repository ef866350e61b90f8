"""Slider-to-screen latency in a real headless Chromium.

Serves the app, opens the Playground on the default model, and moves the bit-width slider
one step at a time with the keyboard (then again with 8-bit activations on, and then the
activation slider itself). For each step it measures the time from the key
press to the moment the new "Packed size" is on screen and Streamlit is idle again. The
first pass visits settings no session has computed; the second pass revisits them and is
served from the cache. Prints the medians next to the float forward pass time of qcore.

    .venv/bin/python scripts/bench_browser.py [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from e2e import browser_page, metric_value, serve_app, wait_idle  # noqa: E402

SIZE = "Packed size"


def _step(page, key: str, label: str = "Bit width") -> float:
    """Press ``key`` on the slider ``label``; seconds until the new size is shown and idle."""
    old = metric_value(page, SIZE)
    slider = page.locator(f'input[type="range"][aria-label="{label}"]')
    slider.focus()
    start = time.perf_counter()
    page.keyboard.press(key)
    page.wait_for_function(
        """([label, old]) => {
            const m = [...document.querySelectorAll('[data-testid="stMetric"]')]
                .find(e => e.innerText.includes(label));
            const v = m && m.querySelector('[data-testid="stMetricValue"]');
            return v && v.innerText !== old;
        }""",
        arg=[SIZE, old],
        timeout=120_000,
    )
    shown = time.perf_counter() - start
    wait_idle(page)
    return shown


def _act_step(page, key: str, want: str) -> float:
    """Press ``key`` on the activation slider; seconds until the headline reads ``want``
    (e.g. "W8A7 · simulated": the new accuracy is drawn with it) and Streamlit is idle.
    The packed size does not change with activations, so it cannot be waited for."""
    slider = page.locator('input[type="range"][aria-label="Activations"]')
    slider.focus()
    start = time.perf_counter()
    page.keyboard.press(key)
    page.get_by_text(want, exact=True).wait_for(timeout=120_000)
    shown = time.perf_counter() - start
    wait_idle(page)
    return shown


def float_forward_seconds(repeats: int = 5) -> float:
    import qcore

    model = qcore.load_model("mnist-cnn")
    data = qcore.load_dataset("mnist-5k", "test")
    qcore.evaluate(model, data)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        qcore.evaluate(model, data)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="slider steps per pass (<= 7)")
    args = parser.parse_args()
    steps = max(1, min(args.steps, 7))
    with serve_app() as url, browser_page() as page:
        page.goto(url, wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]', has_text=SIZE).wait_for(timeout=120_000)
        wait_idle(page)
        fresh = [_step(page, "ArrowLeft") for _ in range(steps)]  # 8 -> 8-steps bits, uncached
        for _ in range(steps):  # walk back to 8 bits, then over the same path again: cached
            _step(page, "ArrowRight")
        cached = [_step(page, "ArrowLeft") for _ in range(steps)]
        # activations on (W8A8): the weight slider (calibration cached per activation
        # config, so these never recalibrate), then the activation slider (each new width
        # calibrates once)
        page.goto(f"{url}/?abits=8", wait_until="domcontentloaded")
        page.get_by_text("W8A8 · simulated", exact=True).wait_for(timeout=120_000)
        wait_idle(page)
        w8a8 = [_step(page, "ArrowLeft") for _ in range(steps)]  # W7A8, W6A8, ...
        for _ in range(steps):
            _step(page, "ArrowRight")  # back to W8A8
        act_steps = min(steps, 6)  # A8 -> A7 ... A2
        acts = [_act_step(page, "ArrowLeft", f"W8A{8 - i} · simulated")
                for i in range(1, act_steps + 1)]
    forward = float_forward_seconds()
    print("mnist-cnn on mnist-5k (1,000 test images), bit-width slider moved one step at a time")
    print(f"  float forward pass over the test split (qcore.evaluate): {forward * 1000:.0f} ms")
    print(f"  new setting, key press to new size on screen: median "
          f"{statistics.median(fresh) * 1000:.0f} ms (min {min(fresh) * 1000:.0f}, "
          f"max {max(fresh) * 1000:.0f}, n={len(fresh)})")
    print(f"  revisited setting (cache): median {statistics.median(cached) * 1000:.0f} ms "
          f"(n={len(cached)})")
    print(f"  activations on (W8A8 start), bit-width slider, new setting: median "
          f"{statistics.median(w8a8) * 1000:.0f} ms (min {min(w8a8) * 1000:.0f}, "
          f"max {max(w8a8) * 1000:.0f}, n={len(w8a8)})")
    print(f"  activation slider (A8 -> A{8 - act_steps}, each width calibrated anew): median "
          f"{statistics.median(acts) * 1000:.0f} ms (min {min(acts) * 1000:.0f}, "
          f"max {max(acts) * 1000:.0f}, n={len(acts)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
