"""Background work with a progress bar: a cached computation that takes seconds runs in a
worker thread while the script thread draws its progress.

A progress bar cannot be drawn from inside an ``st.cache_data`` function: Streamlit records
every element call made there and replays it on a cache hit, and a bar created outside the
function cannot be replayed (CacheReplayClosureError). So the cached function runs in a
worker thread and reports to a queue (its ``_progress`` argument, unhashed because of the
leading underscore); the script thread drains the queue into the bar. A hit returns at once
and draws no bar; a miss draws one. A rerun mid-way stops only the drawing: the worker
finishes and fills the cache, so the next run finds the result.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import streamlit as st

PREPARING_AFTER_S = 0.3  # with no progress report by then, it is a cache miss: show the bar


def run_with_progress(fn: Callable[..., Any], *args: Any, text: str) -> Any:
    """``fn(*args, _progress=...)`` in a worker thread, with a progress bar on a cache miss.

    ``fn`` calls ``_progress(done, total, row)`` as it goes; a row with a ``"phase"``
    names the step under way, and the bar says it. Its ValueError reaches the caller.
    """
    updates: queue.SimpleQueue = queue.SimpleQueue()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qp-analysis")
    bar = None
    try:
        future = pool.submit(fn, *args, _progress=lambda d, t, row: updates.put(
            (d, t, row.get("phase") if isinstance(row, dict) else None)))
        start = time.perf_counter()
        while True:
            try:
                done, total, phase = updates.get(timeout=0.05)
            except queue.Empty:
                if future.done():
                    break
                if bar is None and time.perf_counter() - start > PREPARING_AFTER_S:
                    bar = st.progress(0.0, text=f"{text} (preparing)")
                continue
            if bar is None:
                bar = st.progress(0.0, text=text)
            bar.progress(min(done / max(total, 1), 1.0), text=progress_text(text, done, total,
                                                                           phase))
        return future.result()
    finally:
        pool.shutdown(wait=False)  # on a rerun mid-way the worker still fills the cache
        if bar is not None:
            bar.empty()


def progress_text(text: str, done: int, total: int, phase: str | None = None) -> str:
    """The bar's words: the phase under way when the work names it, and the steps.

    >>> progress_text("Measuring…", 3, 24), progress_text("Measuring…", 25, 40, "Trying")
    ('Measuring… 3/24', 'Trying… step 25 of 40')
    """
    if phase:
        return f"{phase}… step {done} of {total}"
    return f"{text} {done}/{total}"


# --- a job that outlives a script run, with live rows and a stop button ------------------------
# Training takes longer than a run may block a session's other widgets, and its Stop button
# must reach it: the job lives in st.session_state, so the run that a button press starts
# finds it, signals it or draws its rows. The worker never calls Streamlit.


class Job:
    """``fn(*args, progress=..., should_stop=...)`` in a worker thread.

    ``fn`` reports with ``progress(done, total, row)``; the rows are kept in order for the
    page to draw (a live chart), and ``stop()`` makes ``should_stop()`` true.
    """

    def __init__(self, key: Any, fn: Callable[..., Any], *args: Any) -> None:
        self.key = key
        self.rows: list[dict] = []  # appended by the worker only (list.append is atomic)
        self.done, self.total = 0, 0
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qp-job")
        self._future = self._pool.submit(
            fn, *args, progress=self._progress, should_stop=self._stop.is_set
        )
        self._pool.shutdown(wait=False)  # the thread ends with fn

    def _progress(self, done: int, total: int, row: dict) -> None:
        self.rows.append(dict(row))
        self.done, self.total = done, total

    def snapshot(self) -> list[dict]:
        """The rows so far (a copy: the worker may append while the page reads)."""
        return list(self.rows)

    def stop(self) -> None:
        """Ask ``fn`` to stop (it polls ``should_stop`` between steps)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def running(self) -> bool:
        return not self._future.done()

    def result(self) -> Any:
        """What ``fn`` returned (its exception, such as a ValueError, is raised here)."""
        return self._future.result()


def watch(job: Job, draw: Callable[[Job], None], every_s: float = 0.4) -> None:
    """Call ``draw(job)`` now and every ``every_s`` seconds while the job runs, then once
    more when it has ended. A button pressed meanwhile ends this run, not the job."""
    drawn = -1
    while True:
        running = job.running  # read before the rows: the last draw sees every row
        if len(job.rows) != drawn:
            drawn = len(job.rows)
            draw(job)
        if not running:
            return
        time.sleep(every_s)
