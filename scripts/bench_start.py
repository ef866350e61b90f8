"""What a fresh start costs: a job in the job pool, and a server's first visitors.

    python scripts/bench_start.py                          # this checkout
    python scripts/bench_start.py --app-dir /tmp/old .     # one block per checkout, in turn

For each checkout (``--app-dir``, default this repository), in a new Python process there:

- **jobs**: a ``pages.jobs.JobPool`` with one worker runs ``--jobs`` small jobs one after
  another (digits-mlp, a one-width layer-sensitivity table, each a new key), ``--gap``
  seconds apart after the pool was made; printed: seconds from submit to result, each.
- **served app**: ``streamlit run app.py`` on a free port, one headless Chromium: seconds
  from opening the Playground to its packed size on screen (the first load after the
  server start); then the Layer sensitivity page on digits-mlp, ``--read`` seconds of a
  user reading it, Run, and seconds from the click to its first chart with the page idle.

Figures vary with the machine's load: compare checkouts run back to back. Exits 1 when a
job fails or a page does not get there within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _jobs(count: int, gap: float, timeout: float) -> int:
    import qcore
    from pages.jobs import JobPool
    from qcore.executors import ref_job

    pool = JobPool(workers=1, per_session=1)
    try:
        time.sleep(gap)
        for i in range(count):
            payload = {**ref_job(qcore.ModelRef("digits-mlp"), qcore.DatasetRef("digits"),
                                 None, None),
                       "bits": [2 + i], "rates": [], "per_channel": False}  # fmt: skip
            t = time.monotonic()
            job = pool.submit(("bench-start", i), "bench", "sensitivity", payload)
            while not job.finished and time.monotonic() - t < timeout:
                time.sleep(0.02)
            if job.state != "done":
                print(f"  job {i + 1}: {job.state} ({job.error})")
                return 1
            print(f"  job {i + 1}: submit to result {time.monotonic() - t:.2f} s", flush=True)
            time.sleep(gap)
    finally:
        close = getattr(pool, "close", None)  # an older checkout's pool has none
        if close is not None:
            close()
    return 0


def _served(read: float, timeout: float) -> int:
    sys.path.insert(0, str(Path.cwd() / "tests"))  # the measured checkout's: it serves itself
    from e2e import browser_page, serve_app, wait_idle

    ms = int(timeout * 1000)
    with serve_app() as url, browser_page() as page:
        t = time.perf_counter()
        page.goto(url, wait_until="domcontentloaded")
        page.locator('[data-testid="stMetric"]', has_text="Packed size").wait_for(timeout=ms)
        print(f"  first load after the server start: {time.perf_counter() - t:.1f} s to the "
              "packed size on screen", flush=True)  # fmt: skip
        wait_idle(page, ms)
        page.goto(f"{url}/sensitivity?model=digits-mlp&dataset=digits",
                  wait_until="domcontentloaded")  # fmt: skip
        run = page.get_by_role("button", name="Run analysis")
        run.wait_for(timeout=ms)
        wait_idle(page, ms)
        time.sleep(read)
        t = time.perf_counter()
        run.click()
        page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=ms)
        wait_idle(page, ms)
        print(f"  Layer sensitivity (digits-mlp), Run pressed {read:g} s after the page "
              f"opened: chart on screen {time.perf_counter() - t:.1f} s after the click")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app-dir", nargs="+", type=Path, default=[ROOT],
                        help="checkouts to measure, in turn (default: this one)")
    parser.add_argument("--jobs", type=int, default=3, help="small jobs in a row (1 to 10)")
    parser.add_argument("--gap", type=float, default=10.0,
                        help="seconds before each job (0 to 60)")
    parser.add_argument("--read", type=float, default=10.0,
                        help="seconds between the page opening and Run (0 to 60)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per wait")
    parser.add_argument("--part", choices=["jobs", "served"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.jobs <= 10:
        parser.error(f"--jobs: expected 1 to 10; got {args.jobs}")
    for name in ("gap", "read"):
        if not 0 <= getattr(args, name) <= 60:
            parser.error(f"--{name}: expected 0 to 60 seconds; got {getattr(args, name)}")
    if args.part == "jobs":
        return _jobs(args.jobs, args.gap, args.timeout)
    if args.part == "served":
        return _served(args.read, args.timeout)
    rc = 0
    for app_dir in args.app_dir:
        app_dir = app_dir.resolve()
        print(f"{app_dir}:", flush=True)
        for part in ("jobs", "served"):  # each in a new process in that checkout
            cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part,
                   "--jobs", str(args.jobs), "--gap", str(args.gap), "--read", str(args.read),
                   "--timeout", str(args.timeout)]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(app_dir)}
            rc |= subprocess.run(cmd, cwd=app_dir, env=env, check=False).returncode
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
