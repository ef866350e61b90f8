"""Slider-to-screen latency in a real headless Chromium.

Serves the app, opens the Playground on the default model, and moves the bit-width slider
one step at a time with the keyboard. For each step it measures the time from the key
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


def _step(page, key: str) -> float:
    """Press ``key`` on the bit-width slider; seconds until the new size is shown and idle."""
    old = metric_value(page, SIZE)
    slider = page.locator('input[type="range"][aria-label="Bit width"]')
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
    forward = float_forward_seconds()
    print("mnist-cnn on mnist-5k (1,000 test images), bit-width slider moved one step at a time")
    print(f"  float forward pass over the test split (qcore.evaluate): {forward * 1000:.0f} ms")
    print(f"  new setting, key press to new size on screen: median "
          f"{statistics.median(fresh) * 1000:.0f} ms (min {min(fresh) * 1000:.0f}, "
          f"max {max(fresh) * 1000:.0f}, n={len(fresh)})")
    print(f"  revisited setting (cache): median {statistics.median(cached) * 1000:.0f} ms "
          f"(n={len(cached)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
