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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import streamlit as st

PREPARING_AFTER_S = 0.3  # with no progress report by then, it is a cache miss: show the bar


def run_with_progress(fn: Callable[..., Any], *args: Any, text: str) -> Any:
    """``fn(*args, _progress=...)`` in a worker thread, with a progress bar on a cache miss.

    ``fn`` calls ``_progress(done, total, row)`` as it goes; its ValueError reaches the
    caller.
    """
    updates: queue.SimpleQueue = queue.SimpleQueue()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qp-analysis")
    bar = None
    try:
        future = pool.submit(fn, *args, _progress=lambda d, t, _row: updates.put((d, t)))
        start = time.perf_counter()
        while True:
            try:
                done, total = updates.get(timeout=0.05)
            except queue.Empty:
                if future.done():
                    break
                if bar is None and time.perf_counter() - start > PREPARING_AFTER_S:
                    bar = st.progress(0.0, text=f"{text} (preparing)")
                continue
            if bar is None:
                bar = st.progress(0.0, text=text)
            bar.progress(min(done / max(total, 1), 1.0), text=f"{text} {done}/{total}")
        return future.result()
    finally:
        pool.shutdown(wait=False)  # on a rerun mid-way the worker still fills the cache
        if bar is not None:
            bar.empty()
