"""The job pool (pages/jobs.py): a bounded number of worker processes, a queue in order of
submission, a per-session cap, Stop that cancels, and results equal to the in-process run."""

from __future__ import annotations

import time

import pandas as pd
import pytest

import qcore
from pages.jobs import JobPool

GRID = qcore.SweepGrid(bits=[2, 8], prune_rates=[0.0, 0.5])
BIG = qcore.SweepGrid(bits=[1, 2, 3, 4, 5, 6, 7, 8], prune_rates=[0.0, 0.25, 0.5, 0.75],
                      clips=[1.0, 0.8, 0.6])  # minutes of work: stopped long before the end


def _payload(grid: qcore.SweepGrid) -> dict:
    return {"model": {"name": "digits-mlp"}, "dataset": {"name": "digits", "split": "test"},
            "grid": grid.to_dict()}  # fmt: skip


def _until(cond, limit_s: float = 300.0) -> None:
    end = time.monotonic() + limit_s  # a bound on waiting, not a timing assertion
    while not cond():
        assert time.monotonic() < end, "the job pool did not get there"
        time.sleep(0.1)


def test_queue_cap_stop_and_result() -> None:
    pool = JobPool(workers=1, per_session=1)
    first = pool.submit(("a",), "s1", "sweep", _payload(GRID))
    second = pool.submit(("b",), "s2", "sweep", _payload(BIG))
    third = pool.submit(("c",), "s3", "sweep", _payload(BIG))
    assert (first.state, second.state, third.state) == ("running", "waiting", "waiting")
    assert (pool.ahead(first), pool.ahead(second), pool.ahead(third)) == (0, 0, 1)
    # the same key is the same job, whoever asks (and does not count twice)
    assert pool.submit(("a",), "s1", "sweep", _payload(GRID)) is first
    with pytest.raises(ValueError, match=r"already have 1 job\(s\) waiting or running"):
        pool.submit(("d",), "s1", "sweep", _payload(GRID))
    pool.stop(second)  # a waiting job leaves the queue
    assert second.state == "stopped" and pool.ahead(third) == 0

    _until(lambda: first.finished)
    assert first.state == "done", first.error
    ref = qcore.sweep(qcore.ModelRef("digits-mlp"), qcore.DatasetRef("digits"), GRID)
    pd.testing.assert_frame_equal(first.result.drop(columns="seconds"),
                                  ref.drop(columns="seconds"), check_exact=True)  # fmt: skip
    assert first.done == first.total == len(GRID)

    # the next job starts by itself; Stop ends its process mid-way
    _until(lambda: third.state == "running" and third.done >= 1)
    assert third.done < third.total == len(BIG)
    pool.stop(third)
    assert third.state == "stopped"
    _until(lambda: not third._process.is_alive())
    assert third.result is None
    # s1's job is over, so s1 may start another; a stopped key starts afresh
    again = pool.submit(("c",), "s1", "sweep", _payload(GRID))
    assert again is not third and again.state == "running"
    pool.stop_session("s1")
    assert again.state == "stopped"


def test_a_jobs_value_error_is_a_sentence() -> None:
    pool = JobPool(workers=1, per_session=1)
    bad = {**_payload(GRID), "model": {"name": "no-such-model"}}
    job = pool.submit(("bad",), "s1", "sweep", bad)
    _until(lambda: job.finished)
    assert job.state == "failed" and job.user_error
    assert "no-such-model" in job.error
