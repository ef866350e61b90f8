"""Upload storm: many browser sessions on one server, several uploading weights at once.

    python scripts/upload_storm.py                                  # 15 sessions, 8 uploads
    python scripts/upload_storm.py --app-dir /tmp/oldmain .         # one row per checkout
    python scripts/upload_storm.py --sessions 3 --uploads 2         # a quick trial

For each checkout (``--app-dir``, default this repository) starts ``streamlit run app.py``
there on a free loopback port and opens ``--sessions`` Playground sessions (each its own
Streamlit session, in one headless Chromium) on ``--model``. ``--uploads`` of them open the
sidebar's "Upload your own weights" panel and, at the same moment, give it a valid state
dict (a freshly initialised model of ``--model``'s architecture, its own seed each, so each
is a new model the server has not seen); meanwhile the other sessions keep moving the
bit-width slider (every move compresses and runs the model). The slider sessions stop
``--settle`` seconds after the last upload has its answer; then every session must be idle
within ``--timeout`` seconds.

Counted: uploads accepted (the model picker shows the new ``up-…`` model) and refused (the
panel's refusal, whose text is listed under the table); sessions that showed Streamlit's
exception box (``stException``) at any point, and sessions that did not finish in time (a
page that never opened, an upload with no answer, a session not idle at the end); the
server log's tracebacks (with the exception names under the table); the resident memory of
the server process and its children once every session had its numbers, and after the
storm. Prints ``| checkout | sessions | uploads | accepted | refused | exception pages |
timeouts | server tracebacks | rss start MB | rss end MB |``. Bounded: at most 50 sessions,
``--timeout`` at most 600 s per wait, and each row is stopped after a fixed total; the server
stops at the end. Exits 1 when any session showed an exception or timed out, or the server
logged a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

from e2e import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402
from load_test import METRIC_JS, rss_mb, start_server  # noqa: E402

MAX_SESSIONS = 50
MIN_TIMEOUT, MAX_TIMEOUT = 10, 600
MAX_SETTLE = 120
EXCEPTION = '[data-testid="stException"]'
IDLE_JS = """() => !document.querySelector('[data-testid="stStatusWidget"]')
                  && !document.querySelector('[data-stale="true"]')"""
# The upload's answer, once the session is idle: an exception box, the new model picked
# (its picker option is "up-… (this session)"), or a refusal in the upload panel. Tolerant
# of the panel's wording: any sidebar expander whose title says upload and weights.
OUTCOME_JS = """() => {
    if (document.querySelector('[data-testid="stException"]')) return 'exception';
    if (document.querySelector('[data-testid="stStatusWidget"]')
        || document.querySelector('[data-stale="true"]')) return null;
    const bar = document.querySelector('[data-testid="stSidebar"]');
    if (!bar) return null;
    const pick = bar.querySelector('[data-testid="stSelectbox"] input');
    if (pick && pick.value.startsWith('up-')) return 'accepted';
    const panel = [...bar.querySelectorAll('[data-testid="stExpander"]')].find(e =>
        /upload.*weights/i.test((e.querySelector('summary') || e).innerText));
    const alert = panel && panel.querySelector('[data-testid="stAlert"]');
    return alert ? 'refused:' + alert.innerText.trim() : null;
}"""
PANEL_TITLE = re.compile(r"upload.*weights", re.I)
EXCEPTION_LINE = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception|Warning|Exit)):", re.M)


@dataclass
class Session:
    role: str  # "upload" or "slider"
    opened: bool = False
    outcome: str = ""  # an upload's: "accepted", "refused", "" (none, or no answer)
    refusal: str = ""
    upload_s: float = 0.0
    moves: int = 0
    misses: int = 0  # slider moves not drawn in time
    exception: bool = False
    timeout: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class Row:
    checkout: str
    sessions: int
    uploads: int
    accepted: int
    refused: int
    exceptions: int
    timeouts: int
    tracebacks: int
    rss_start: float
    rss_end: float
    seconds: float = 0.0
    refusals: Counter = field(default_factory=Counter)
    log_errors: Counter = field(default_factory=Counter)


def make_weights(folder: Path, model: str, count: int) -> tuple[list[Path], str, str]:
    """``count`` state dicts of ``model``'s architecture, freshly initialised with seeds 0,
    1, …, saved with torch.save in ``folder``; the files, the architecture and the dataset."""
    import torch

    import qcore
    from qcore.models import build_model

    info = qcore.model_info(model)
    data = qcore.dataset_info(info.dataset)
    paths = []
    for seed in range(count):
        torch.manual_seed(seed)
        net = build_model(info.arch, data.input_shape, data.num_classes)
        paths.append(folder / f"storm_{info.arch}_{seed}.pt")
        torch.save(net.state_dict(), paths[-1])
    return paths, info.arch, info.dataset


def server_errors(log: str) -> tuple[int, Counter]:
    """The number of tracebacks in a server log and how often each exception name ends a
    line of it (``NameError: module is not installed…`` counts one ``NameError``)."""
    return log.count("Traceback (most recent call last)"), Counter(EXCEPTION_LINE.findall(log))


def checkout_name(app_dir: Path) -> str:
    """``app_dir`` and its commit (``-dirty`` with changes not committed), for the table."""
    try:
        rev = subprocess.run(["git", "-C", str(app_dir), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{app_dir} ({rev})" if rev else str(app_dir)


HEADER = ("| checkout | sessions | uploads | accepted | refused | exception pages | timeouts "
          "| server tracebacks | rss start MB | rss end MB |")  # fmt: skip


def table(rows: list[Row]) -> str:
    """The rows as a markdown table, then one line per row naming its refusals and the
    exceptions in its server log."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r.checkout} | {r.sessions} | {r.uploads} | {r.accepted} | {r.refused} "
            f"| {r.exceptions} | {r.timeouts} | {r.tracebacks} | {r.rss_start:.0f} "
            f"| {r.rss_end:.0f} |"
        )
    notes = []
    for r in rows:
        said = "; ".join(f"{n} x {text!r}" for text, n in r.refusals.most_common()) or "none"
        logged = ", ".join(f"{n} {name}" for name, n in r.log_errors.most_common()) or "none"
        notes.append(f"- {r.checkout}: {r.seconds:.0f} s; refusals: {said}; "
                     f"exceptions in the server log: {logged}")  # fmt: skip
    return "\n".join(lines + [""] + notes)


async def open_session(browser, link: str, upload: bool, timeout_s: float):
    """A new browser context on ``link``, once the Playground shows its numbers; for an
    uploading session, with the upload panel open. The context, page and file input."""
    context = await browser.new_context(viewport={"width": 1400, "height": 1200})
    page = await context.new_page()
    ms = timeout_s * 1000
    await page.goto(link, wait_until="domcontentloaded", timeout=ms)
    await page.locator('[data-testid="stMetric"]', has_text="Packed size").wait_for(timeout=ms)
    await page.wait_for_function(METRIC_JS, arg=["Packed size", ""], timeout=ms)
    if not upload:
        return context, page, None
    panel = page.locator('[data-testid="stSidebar"] [data-testid="stExpander"]').filter(
        has=page.locator("summary", has_text=PANEL_TITLE)
    ).first
    await panel.locator("summary").click(timeout=ms)
    file_input = panel.locator('[data-testid="stFileUploader"] input[type="file"]').first
    await file_input.wait_for(state="attached", timeout=ms)
    await page.wait_for_function(IDLE_JS, timeout=ms)
    return context, page, file_input


async def keep_moving(page, s: Session, seed: int, go: asyncio.Event, stop: asyncio.Event,
                      timeout_s: float) -> None:  # fmt: skip
    """Move the bit-width slider one step at a time from ``go`` until ``stop``; stop early
    at an exception box."""
    rng = random.Random(seed)
    slider = page.locator('input[type="range"][aria-label="Bit width"]')
    value = page.locator('[data-testid="stMetric"]', has_text="Packed size").locator(
        '[data-testid="stMetricValue"]'
    )
    ms = timeout_s * 1000
    await go.wait()
    while not stop.is_set():
        if await page.locator(EXCEPTION).count():
            s.exception = True
            return
        try:
            bits = await slider.get_attribute("aria-valuetext", timeout=ms) or ""
            key = {"1 bit": "ArrowRight", "8 bits": "ArrowLeft"}.get(
                bits, rng.choice(["ArrowLeft", "ArrowRight"]))  # fmt: skip
            old = await value.first.inner_text(timeout=ms)
            await slider.focus(timeout=ms)
            await page.keyboard.press(key)
            await page.wait_for_function(METRIC_JS, arg=["Packed size", old], timeout=ms)
            s.moves += 1
        except Exception as e:  # noqa: BLE001 - a move not drawn in time is counted
            s.misses += 1
            s.notes.append(f"move: {type(e).__name__}")
            if s.misses >= 3:  # the page is gone: the final check says what it shows
                return


async def upload(page, file_input, path: Path, s: Session, go: asyncio.Event,
                 timeout_s: float) -> None:  # fmt: skip
    """At ``go``, give the panel ``path``; wait for its answer."""
    await go.wait()
    start = time.perf_counter()
    try:
        await file_input.set_input_files(str(path), timeout=timeout_s * 1000)
        answer = await page.wait_for_function(OUTCOME_JS, polling=250,
                                              timeout=timeout_s * 1000)  # fmt: skip
        outcome = await answer.json_value()
    except Exception as e:  # noqa: BLE001 - no answer in time
        s.timeout = True
        s.notes.append(f"upload: {type(e).__name__}")
        return
    s.upload_s = time.perf_counter() - start
    if outcome == "exception":
        s.exception = True
    elif outcome == "accepted":
        s.outcome = "accepted"
    else:
        s.outcome, s.refusal = "refused", outcome.removeprefix("refused:")


async def storm(url: str, pid: int, args, files: list[Path]) -> tuple[list[Session], float,
                                                                       float]:  # fmt: skip
    from playwright.async_api import async_playwright

    n, k, t = args.sessions, args.uploads, args.timeout
    sessions = [Session("upload" if i < k else "slider") for i in range(n)]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=CHROMIUM_FLAGS)  # fmt: skip
        try:
            links = [f"{url}/?model={args.model}" if s.role == "upload" else
                     f"{url}/?model={args.model}&prune={(i % 10) * 0.05:.2f}"
                     for i, s in enumerate(sessions)]  # fmt: skip
            opens = await asyncio.gather(
                *(open_session(browser, link, s.role == "upload", t * 3)
                  for link, s in zip(links, sessions, strict=True)),
                return_exceptions=True,
            )  # fmt: skip
            for s, o in zip(sessions, opens, strict=True):
                s.opened = not isinstance(o, BaseException)
                if not s.opened:
                    s.timeout = True
                    s.notes.append(f"open: {type(o).__name__}: {str(o).splitlines()[0][:120]}")
            rss_start = rss_mb(pid)
            go, stop = asyncio.Event(), asyncio.Event()
            uploads, walks = [], []
            for i, (s, o) in enumerate(zip(sessions, opens, strict=True)):
                if not s.opened:
                    continue
                _, page, file_input = o
                if s.role == "upload":
                    uploads.append(upload(page, file_input, files[i], s, go, t))
                else:
                    walks.append(asyncio.ensure_future(keep_moving(page, s, 1000 + i, go,
                                                                   stop, t)))  # fmt: skip
            go.set()  # every upload's set_input_files starts in this same turn of the loop
            await asyncio.gather(*uploads)
            await asyncio.sleep(args.settle)
            stop.set()
            await asyncio.gather(*walks)
            for s, o in zip(sessions, opens, strict=True):
                if not s.opened:
                    continue
                page = o[1]
                try:
                    await page.wait_for_function(IDLE_JS, polling=250, timeout=t * 1000)
                except Exception:  # noqa: BLE001 - still running
                    s.timeout = True
                    s.notes.append("not idle at the end")
                if await page.locator(EXCEPTION).count():
                    s.exception = True
                    text = await page.locator(EXCEPTION).first.inner_text()
                    s.notes.append("exception: " + " ".join(text.split())[:160])
            rss_end = rss_mb(pid)
            for o in opens:
                if not isinstance(o, BaseException):
                    await o[0].close()
        finally:
            await browser.close()
    return sessions, rss_start, rss_end


def one_row(app_dir: Path, args, files: list[Path]) -> Row:
    start = time.monotonic()
    # the checkout's own qcore and pages, whatever is installed in the environment
    proc, url, log = start_server({"PYTHONPATH": str(app_dir)}, cwd=app_dir)
    limit = args.timeout * 5 + args.settle + 120  # opening (3 x), uploads, end; then slack
    try:
        sessions, rss_start, rss_end = asyncio.run(
            asyncio.wait_for(storm(url, proc.pid, args, files), timeout=limit))
    except TimeoutError:
        raise SystemExit(f"{app_dir}: the storm did not end within {limit:.0f} s") from None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        text = log.read().decode(errors="replace")
        log.close()
    if args.keep_log:
        name = re.sub(r"[^\w.-]+", "_", str(app_dir)).strip("_")
        Path(args.keep_log, f"upload_storm_{name}.log").write_text(text)
    for i, s in enumerate(sessions):
        print(f"  session {i} ({s.role}): outcome={s.outcome or '-'} upload_s={s.upload_s:.1f} "
              f"moves={s.moves} misses={s.misses} exception={s.exception} "
              f"timeout={s.timeout} {'; '.join(s.notes)}", file=sys.stderr)  # fmt: skip
    tracebacks, names = server_errors(text)
    return Row(
        checkout=checkout_name(app_dir), sessions=len(sessions), uploads=args.uploads,
        accepted=sum(s.outcome == "accepted" for s in sessions),
        refused=sum(s.outcome == "refused" for s in sessions),
        exceptions=sum(s.exception for s in sessions),
        timeouts=sum(s.timeout for s in sessions), tracebacks=tracebacks,
        rss_start=rss_start, rss_end=rss_end, seconds=time.monotonic() - start,
        refusals=Counter(s.refusal for s in sessions if s.refusal), log_errors=names,
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app-dir", type=Path, nargs="+", default=[ROOT],
                    help="checkouts to measure, one row each (default: this repository)")
    ap.add_argument("--sessions", type=int, default=15)
    ap.add_argument("--uploads", type=int, default=8, help="sessions that upload at once")
    ap.add_argument("--model", default="mnist-cnn",
                    help="the sample model every session opens; uploads are its architecture")
    ap.add_argument("--timeout", type=float, default=180.0,
                    help="seconds for each wait: an upload's answer, a slider move, the end")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds the sliders keep moving after the last upload's answer")
    ap.add_argument("--keep-log", metavar="FOLDER",
                    help="write each server's log into FOLDER")
    args = ap.parse_args(argv)
    if not 1 <= args.sessions <= MAX_SESSIONS:
        ap.error(f"--sessions is from 1 to {MAX_SESSIONS}.")
    if not 0 <= args.uploads <= args.sessions:
        ap.error("--uploads is from 0 to --sessions.")
    if not MIN_TIMEOUT <= args.timeout <= MAX_TIMEOUT:
        ap.error(f"--timeout is from {MIN_TIMEOUT} to {MAX_TIMEOUT} seconds.")
    if not 0 <= args.settle <= MAX_SETTLE:
        ap.error(f"--settle is from 0 to {MAX_SETTLE} seconds.")
    args.app_dir = [d.resolve() for d in args.app_dir]
    for d in args.app_dir:
        if not (d / "app.py").is_file():
            ap.error(f"{d} has no app.py.")
    if args.keep_log and not Path(args.keep_log).is_dir():
        ap.error(f"--keep-log: {args.keep_log} is not a folder.")
    if not Path(CHROMIUM).exists():
        ap.error(f"Chromium not found at {CHROMIUM} (set QP_CHROMIUM).")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import qcore

    if args.model not in qcore.list_models():
        raise SystemExit(f"--model: {args.model} is not a sample model here "
                         f"({', '.join(qcore.list_models())}).")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="upload_storm_") as folder:
        files, arch, dataset = make_weights(Path(folder), args.model, args.uploads)
        for app_dir in args.app_dir:
            rows.append(one_row(app_dir, args, files))
            print("  " + table(rows[-1:]).splitlines()[2], file=sys.stderr, flush=True)
    print(f"\n{args.sessions} sessions on {args.model}, {args.uploads} of them uploading "
          f"fresh {arch} weights for {dataset} at once, the others moving the bit-width "
          f"slider; {os.cpu_count()} CPUs\n")  # fmt: skip
    print(table(rows))
    bad = any(r.exceptions or r.timeouts or r.tracebacks for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
