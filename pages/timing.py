"""Where a page run's time goes, for ``scripts/bench_browser.py``.

Off unless the server runs with ``QP_TIMINGS=1``. Then each script run prints one line to
standard error when it ends::

    QP_TIMING {"page": "Playground", "script": 0.212, "compress": 0.081, "evaluate": 0.094, ...}

``script`` is the whole run in seconds; the other keys are the seconds spent inside
:func:`phase` blocks of that name (a phase that did not run, e.g. a cache hit, is absent),
or for a :func:`mark`, the seconds from the start of the run to that point.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator

ENABLED = bool(os.environ.get("QP_TIMINGS"))
_LOCAL = threading.local()  # one script run per thread at a time


def start_run() -> None:
    if ENABLED:
        _LOCAL.start = time.perf_counter()
        _LOCAL.phases = {}


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the time of the block under ``name`` (nothing when timings are off)."""
    if not ENABLED or getattr(_LOCAL, "phases", None) is None:
        yield
        return
    t = time.perf_counter()
    try:
        yield
    finally:
        _LOCAL.phases[name] = _LOCAL.phases.get(name, 0.0) + time.perf_counter() - t


def mark(name: str) -> None:
    """Record the seconds from the start of the run to now under ``name`` (e.g. "headline":
    when the page's main numbers were handed to the browser)."""
    if ENABLED and getattr(_LOCAL, "phases", None) is not None:
        _LOCAL.phases.setdefault(name, time.perf_counter() - _LOCAL.start)


def end_run(page: str) -> None:
    phases = getattr(_LOCAL, "phases", None)
    if not ENABLED or phases is None:
        return
    record = {"page": page, "script": time.perf_counter() - _LOCAL.start}
    record.update({k: round(v, 4) for k, v in phases.items()})
    record["script"] = round(record["script"], 4)
    _LOCAL.phases = None
    print(f"QP_TIMING {json.dumps(record)}", file=sys.stderr, flush=True)
