"""Load test: many people moving Playground sliders at once on one server.

    python scripts/load_test.py --users 1 5 10 20 --seconds 60
    python scripts/load_test.py --users 5 --seconds 60 --finetune   # a fine-tune beside them

Starts the app on a free loopback port, then for each user count opens that many browser
sessions (each its own Streamlit session, in one headless Chromium) for ``--seconds``. Each
user opens the Playground at its own pruning rate (a deep link) and walks the bit-width
slider one step at a time (its own seeded random walk, 1 bit to 8 bits); a move's time runs
from the key press to the new packed size on screen with the run finished. An error is a
move not drawn within ``--move-timeout`` seconds, or an exception shown on the page.
Prints ``| users | moves | p50 ms | p95 ms | errors | rss start MB | rss end MB |``, where
rss is the resident memory of the server process and its children (job processes) when
the users had loaded the page and when they stopped. Bounded: at most 50 users per row
and 600 seconds per row; the server stops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from e2e import CHROMIUM, CHROMIUM_FLAGS, free_port  # noqa: E402

MAX_USERS, MAX_SECONDS = 50, 600
METRIC_JS = """([label, old]) => {
    const m = [...document.querySelectorAll('[data-testid="stMetric"]')]
        .find(e => e.innerText.includes(label));
    const v = m && m.querySelector('[data-testid="stMetricValue"]');
    return !!v && v.innerText !== old
        && !document.querySelector('[data-testid="stStatusWidget"]')
        && !document.querySelector('[data-stale="true"]');
}"""


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MB (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])  # kB
        except OSError:
            pass
    return total / 1024


def start_server(env: dict, cwd: Path = ROOT) -> tuple[subprocess.Popen, str, object]:
    """``streamlit run app.py`` of the checkout ``cwd`` on a free loopback port, once it
    answers ``/_stcore/health``; the process, its URL and its log (a temporary file holding
    its standard output and error)."""
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"streamlit exited early:\n{log.read().decode(errors='replace')}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().decode().strip() == "ok":
                    return proc, url, log
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("streamlit did not answer /_stcore/health in 120 s")
        time.sleep(0.3)


async def open_playground(browser, url: str, prune: float, timeout_s: float):
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    await page.goto(f"{url}/?prune={prune:.2f}", wait_until="domcontentloaded",
                    timeout=timeout_s * 1000)  # fmt: skip
    metric = page.locator('[data-testid="stMetric"]', has_text="Packed size")
    await metric.wait_for(timeout=timeout_s * 1000)
    await page.wait_for_function(METRIC_JS, arg=["Packed size", ""], timeout=timeout_s * 1000)
    return context, page


async def walk(page, seed: int, deadline: float, timeout_s: float) -> tuple[list[float], int]:
    """Move the bit-width slider one step at a time until ``deadline``; the move times in
    ms and the number of errors."""
    rng = random.Random(seed)
    slider = page.locator('input[type="range"][aria-label="Bit width"]')
    value = page.locator('[data-testid="stMetric"]', has_text="Packed size").locator(
        '[data-testid="stMetricValue"]'
    )
    times, errors = [], 0
    while time.monotonic() < deadline:
        try:
            bits = await slider.get_attribute("aria-valuetext", timeout=timeout_s * 1000) or ""
            if bits == "1 bit":
                key = "ArrowRight"
            elif bits == "8 bits":
                key = "ArrowLeft"
            else:
                key = rng.choice(["ArrowLeft", "ArrowRight"])
            old = await value.inner_text(timeout=timeout_s * 1000)
            await slider.focus(timeout=timeout_s * 1000)
            start = time.perf_counter()
            await page.keyboard.press(key)
            await page.wait_for_function(METRIC_JS, arg=["Packed size", old],
                                         timeout=timeout_s * 1000)  # fmt: skip
            times.append((time.perf_counter() - start) * 1000)
        except Exception:  # noqa: BLE001 - a move not drawn in time counts as an error
            errors += 1
            continue
        if await page.locator('[data-testid="stException"]').count():
            errors += 1
            await page.reload(wait_until="domcontentloaded")
    return times, errors


async def finetune(browser, url: str, timeout_s: float):
    """One more session that starts a fine-tune on the Fine-tune page and leaves it running."""
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    await page.goto(f"{url}/finetune", wait_until="domcontentloaded")
    train = page.get_by_role("button", name="Train")
    await train.wait_for(timeout=timeout_s * 1000)
    epochs = page.get_by_role("spinbutton", name="Epochs")
    await epochs.fill("20")  # longer than the row: it runs for the whole measurement
    await epochs.press("Enter")
    await page.wait_for_timeout(1500)
    await train.click()
    await page.get_by_role("button", name="Stop").and_(
        page.locator(":enabled")).wait_for(timeout=timeout_s * 1000)  # fmt: skip
    return context


async def one_row(url: str, pid: int, users: int, seconds: float, timeout_s: float,
                  with_finetune: bool) -> dict:  # fmt: skip
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=CHROMIUM_FLAGS)  # fmt: skip
        try:
            extra = [await finetune(browser, url, timeout_s)] if with_finetune else []
            tries = await asyncio.gather(*(
                open_playground(browser, url, (i % 10) * 0.05, timeout_s * 4)
                for i in range(users)), return_exceptions=True)  # fmt: skip
            opened = [t for t in tries if not isinstance(t, BaseException)]
            failed_opens = len(tries) - len(opened)  # a user who never got the page: an error
            rss_start = rss_mb(pid)
            deadline = time.monotonic() + seconds
            walks = await asyncio.gather(*(
                walk(page, 1000 + i, deadline, timeout_s) for i, (_, page) in enumerate(opened)
            ))  # fmt: skip
            rss_end = rss_mb(pid)
            for context, _ in opened:
                await context.close()
            for context in extra:
                await context.close()
        finally:
            await browser.close()
    times = sorted(t for ts, _ in walks for t in ts)
    q = statistics.quantiles(times, n=20, method="inclusive") if len(times) > 1 else times * 19
    return {"users": users, "moves": len(times), "p50": statistics.median(times) if times else 0,
            "p95": q[18] if times else 0, "errors": sum(e for _, e in walks) + failed_opens,
            "rss_start": rss_start, "rss_end": rss_end}  # fmt: skip


def _line(r: dict) -> str:
    return (f"| {r['users']} | {r['moves']} | {r['p50']:.0f} | {r['p95']:.0f} | {r['errors']} "
            f"| {r['rss_start']:.0f} | {r['rss_end']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--move-timeout", type=float, default=30.0, help="seconds per move")
    ap.add_argument("--finetune", action="store_true",
                    help="one more session runs a fine-tune during every row")
    args = ap.parse_args(argv)
    if not all(1 <= u <= MAX_USERS for u in args.users):
        ap.error(f"--users takes counts from 1 to {MAX_USERS}.")
    if not 1 <= args.seconds <= MAX_SECONDS:
        ap.error(f"--seconds is from 1 to {MAX_SECONDS}.")
    if not Path(CHROMIUM).exists():
        ap.error(f"Chromium not found at {CHROMIUM} (set QP_CHROMIUM).")
    proc, url, log = start_server({})
    rows = []
    try:
        for users in args.users:
            rows.append(asyncio.run(one_row(url, proc.pid, users, args.seconds,
                                            args.move_timeout, args.finetune)))  # fmt: skip
            print(f"  {_line(rows[-1])}", file=sys.stderr, flush=True)  # kept if a later row fails
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    title = " (a fine-tune running beside)" if args.finetune else ""
    print(f"\n{args.seconds:g} s per row, {os.cpu_count()} CPUs{title}\n")
    print("| users | moves | p50 ms | p95 ms | errors | rss start MB | rss end MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(_line(r))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
