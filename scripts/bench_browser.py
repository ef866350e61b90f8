"""Slider-to-screen latency in a real headless Chromium.

Serves the app, opens the Playground on the default model, and moves the bit-width slider
one step at a time with the keyboard (then again with 8-bit activations on, and then the
activation slider itself). For each step it measures the time from the key
press to the moment the new "Packed size" is on screen and Streamlit is idle again. The
first pass visits settings no session has computed; the second pass revisits them and is
served from the cache. Prints the medians next to the float forward pass time of qcore,
their ratios to it, and where the time of a step goes:

- server script: the page's whole script run (``QP_TIMINGS``, pages/timing.py); headline:
  from its start to the moment the numbers are handed to the browser; and inside it
  compress, evaluate, the layer section (histograms, journey, error curve), the detail
  tabs (table, images, confusion matrix) and the downloads;
- sent: bytes the server sent the browser over the websocket during the step;
- browser after last message: from the last message of the step to the moment the new
  size is on screen and Streamlit is idle;
- browser busy: the page's main-thread time in the step (Chrome's ``TaskDuration``), which
  includes handling each message as it arrives: the browser's share, most of which
  overlaps the server's;
- a second browser opening the Playground on the warm server: time until its numbers show;
- Streamlit alone: the same slider step and opening on a bare page (one slider, one
  metric, and for one opening a plotly chart), the floor under every figure above.

    .venv/bin/python scripts/bench_browser.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from e2e import browser_page, metric_value, serve_app, wait_idle  # noqa: E402

SIZE = "Packed size"
PHASES = ("script", "headline", "compress", "evaluate", "layer section", "details tabs",
          "downloads")


class MainThread:
    """The page's main-thread time so far, from Chrome's own counter (``TaskDuration``)."""

    def __init__(self, page):
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.send("Performance.enable")

    def busy(self) -> float:
        metrics = self.cdp.send("Performance.getMetrics")["metrics"]
        return next(m["value"] for m in metrics if m["name"] == "TaskDuration")


class Recorder:
    """Websocket messages the browser receives and the server's QP_TIMING lines, per step."""

    def __init__(self, page, log_path: Path):
        self.frames: list[tuple[float, int]] = []
        self.log_path = log_path
        self.log_offset = 0
        self.steps: list[dict] = []
        self.busy_at_start = 0.0
        self.main = MainThread(page)
        page.on("websocket", self._socket)

    def _socket(self, ws) -> None:
        def got(payload) -> None:
            self.frames.append((time.perf_counter(), len(payload)))

        ws.on("framereceived", got)

    def _server_lines(self) -> list[dict]:
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            text = f.read()
            self.log_offset = f.tell()
        out = []
        for line in text.decode(errors="replace").splitlines():
            if line.startswith("QP_TIMING "):
                out.append(json.loads(line[len("QP_TIMING "):]))
        return out

    def begin(self) -> float:
        self._server_lines()  # skip what came before
        self.frames.clear()
        self.busy_at_start = self.main.busy()
        return time.perf_counter()

    def end(self, start: float, shown: float, idle: float, kind: str) -> None:
        time.sleep(0.05)  # let the last log line land
        runs = self._server_lines()
        frames = [f for f in self.frames if f[0] >= start]
        last = max((t for t, _ in frames), default=start)
        step = {"kind": kind, "shown": shown, "sent": sum(n for _, n in frames),
                "browser": max(0.0, idle - (last - start)), "runs": len(runs),
                "busy": self.main.busy() - self.busy_at_start}
        for k in PHASES:
            step[k] = sum(r.get(k, 0.0) for r in runs)
        self.steps.append(step)


REC: Recorder | None = None


def _step(page, key: str, label: str = "Bit width", kind: str = "") -> float:
    """Press ``key`` on the slider ``label``; seconds until the new size is shown and idle."""
    old = metric_value(page, SIZE)
    slider = page.locator(f'input[type="range"][aria-label="{label}"]')
    slider.focus()
    start = REC.begin() if REC else time.perf_counter()
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
    if REC and kind:
        REC.end(start, shown, time.perf_counter() - start, kind)
    return shown


def _act_step(page, key: str, want: str) -> float:
    """Press ``key`` on the activation slider; seconds until the headline reads ``want``
    (e.g. "W8A7 · simulated": the new accuracy is drawn with it) and Streamlit is idle.
    The packed size does not change with activations, so it cannot be waited for."""
    slider = page.locator('input[type="range"][aria-label="Activations"]')
    slider.focus()
    start = REC.begin() if REC else time.perf_counter()
    page.keyboard.press(key)
    page.get_by_text(want, exact=True).wait_for(timeout=120_000)
    shown = time.perf_counter() - start
    wait_idle(page)
    if REC:
        REC.end(start, shown, time.perf_counter() - start, "act")
    return shown


def _open_seconds(browser, url: str) -> float:
    """A new browser page opening the Playground: seconds until its packed size shows."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        start = time.perf_counter()
        page.goto(url, wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]', has_text=SIZE).wait_for(timeout=120_000)
        return time.perf_counter() - start
    finally:
        page.close()


def _breakdown(steps: list[dict], kind: str, title: str) -> str:
    rows = [s for s in steps if s["kind"] == kind]
    if not rows:
        return ""

    def med(k: str) -> float:
        return statistics.median(r[k] for r in rows)

    server = ", ".join(f"{k} {med(k) * 1000:.0f}" for k in PHASES[1:])
    return (f"  {title}: key to screen {med('shown') * 1000:.0f} ms = server script "
            f"{med('script') * 1000:.0f} ms ({server}) + sent {med('sent') / 1024:.0f} kB + "
            f"browser after last message {med('browser') * 1000:.0f} ms; browser main thread "
            f"busy {med('busy') * 1000:.0f} ms (medians, n={len(rows)})")


# Streamlit's own cost, with nothing of this app: one slider and one metric (and, for the
# opening time, one plotly chart under them, as the Playground has)
FLOOR_APP = """import streamlit as st
bits = st.select_slider("Bit width", options=list(range(1, 17)), value=8)
st.metric("Packed size", f"{bits * 1000:,} B")
if st.query_params.get("chart"):
    import plotly.graph_objects as go
    st.plotly_chart(go.Figure(go.Bar(x=[1, 2], y=[bits, 3])))
"""


def streamlit_floor(steps: int) -> tuple[float, float, float, float]:
    """On a bare page (:data:`FLOOR_APP`) served the same way: the median key-to-screen of
    the slider and the page's main-thread time in it, and a new browser's opening time
    without and with one plotly chart."""
    global REC
    REC = None  # the Playground's recorder belongs to a closed page
    folder = Path(tempfile.mkdtemp())
    (folder / "floor.py").write_text(FLOOR_APP)
    with serve_app(script=str(folder / "floor.py")) as url, browser_page() as page:
        page.goto(url, wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]', has_text=SIZE).wait_for(timeout=120_000)
        wait_idle(page)
        main = MainThread(page)
        moves, busy = [], []
        for key in ["ArrowLeft"] * steps + ["ArrowRight"] * steps:
            before = main.busy()
            moves.append(_step(page, key))
            busy.append(main.busy() - before)
        browser = page.context.browser
        plain = statistics.median(_open_seconds(browser, url) for _ in range(3))
        chart = statistics.median(_open_seconds(browser, f"{url}/?chart=1") for _ in range(3))
    return statistics.median(moves), statistics.median(busy), plain, chart


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
    global REC
    log_path = Path(tempfile.mkdtemp()) / "server.log"
    with serve_app(env={"QP_TIMINGS": "1"}, log_path=log_path) as url, browser_page() as page:
        REC = Recorder(page, log_path)
        t = time.perf_counter()
        page.goto(url, wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]', has_text=SIZE).wait_for(timeout=120_000)
        first_load = time.perf_counter() - t
        wait_idle(page)
        second_open = _open_seconds(page.context.browser, url)
        fresh = [_step(page, "ArrowLeft", kind="new") for _ in range(steps)]  # 8 -> 8-steps
        for _ in range(steps):  # walk back to 8 bits, then over the same path again: cached
            _step(page, "ArrowRight")
        cached = [_step(page, "ArrowLeft", kind="cached") for _ in range(steps)]
        # activations on (W8A8): the weight slider (calibration cached per activation
        # config, so these never recalibrate), then the activation slider (each new width
        # calibrates once)
        page.goto(f"{url}/?abits=8", wait_until="domcontentloaded")
        page.get_by_text("W8A8 · simulated", exact=True).wait_for(timeout=120_000)
        wait_idle(page)
        w8a8 = [_step(page, "ArrowLeft", kind="w8a8") for _ in range(steps)]  # W7A8, ...
        for _ in range(steps):
            _step(page, "ArrowRight")  # back to W8A8
        act_steps = min(steps, 6)  # A8 -> A7 ... A2
        acts = [_act_step(page, "ArrowLeft", f"W8A{8 - i} · simulated")
                for i in range(1, act_steps + 1)]
    recorded = REC.steps
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
    print(f"  first load after the server start: {first_load:.1f} s; a second browser opening "
          f"the Playground on the warm server: {second_open:.1f} s (target <= 3 s)")
    floor_move, floor_busy, floor_open, floor_chart = streamlit_floor(steps)
    print(f"Streamlit alone on this machine (a bare page: one slider, one metric): key press "
          f"to new metric median {floor_move * 1000:.0f} ms (browser main thread busy "
          f"{floor_busy * 1000:.0f} ms); a new browser opening it "
          f"{floor_open:.1f} s, {floor_chart:.1f} s with one plotly chart under the metric")
    fwd = forward
    print("ratios to the float forward pass (targets: new <= 1.3, revisited <= 0.6, "
          "activation slider <= 2):")
    print(f"  new setting {statistics.median(fresh) / fwd:.2f}x, revisited "
          f"{statistics.median(cached) / fwd:.2f}x, activation slider "
          f"{statistics.median(acts) / fwd:.2f}x")
    print("where the time goes (ms; server phases from QP_TIMINGS, pages/timing.py):")
    for kind, title in (("new", "new setting"), ("cached", "revisited setting"),
                        ("w8a8", "W8A8, bit-width slider"), ("act", "activation slider")):
        line = _breakdown(recorded, kind, title)
        if line:
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
