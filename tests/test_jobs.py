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


@pytest.fixture
def new_pool():
    """``JobPool(...)``, closed after the test (its spare process ends with it)."""
    made: list[JobPool] = []

    def make(*args, **kwargs) -> JobPool:
        made.append(JobPool(*args, **kwargs))
        return made[-1]

    yield make
    for pool in made:
        pool.close()


def _until(cond, limit_s: float = 300.0) -> None:
    end = time.monotonic() + limit_s  # a bound on waiting, not a timing assertion
    while not cond():
        assert time.monotonic() < end, "the job pool did not get there"
        time.sleep(0.1)


def test_queue_cap_stop_and_result(new_pool) -> None:
    pool = new_pool(workers=1, per_session=1)
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


def test_a_job_runs_below_the_web_process_priority(new_pool, monkeypatch) -> None:
    """Job processes are niced (QP_JOB_NICE, 10 by default): everyone's sliders in the
    web process come first and a job takes the cores they leave."""
    import os

    from pages import worker

    for env, step in ((None, worker.DEFAULT_NICE), ("3", 3)):
        if env is not None:
            monkeypatch.setenv(worker.NICE_ENV, env)
        pool = new_pool(workers=1, per_session=1)
        job = pool.submit(("nice", env), "s1", "sweep", _payload(BIG))
        _until(lambda job=job: job.state == "running" and job.done >= 1)
        want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + step)
        assert os.getpriority(os.PRIO_PROCESS, job._process.pid) == want
        pool.stop(job)


def test_a_jobs_value_error_is_a_sentence(new_pool) -> None:
    pool = new_pool(workers=1, per_session=1)
    bad = {**_payload(GRID), "model": {"name": "no-such-model"}}
    job = pool.submit(("bad",), "s1", "sweep", bad)
    _until(lambda: job.finished)
    assert job.state == "failed" and job.user_error
    assert "no-such-model" in job.error


def _refs(model: qcore.ModelRef, calib: bool = False, model_bytes: bytes | None = None) -> dict:
    from qcore.executors import ref_job

    return ref_job(model, qcore.DatasetRef("digits"),
                   qcore.DatasetRef("digits", "calib") if calib else None, model_bytes)  # fmt: skip


def test_sensitivity_and_finetune_jobs_equal_the_in_process_run(new_pool) -> None:
    from pages.jobs import _finetune_outcome

    pool = new_pool(workers=2, per_session=2)
    model = qcore.ModelRef("digits-mlp")
    sens = pool.submit(("sens",), "s1", "sensitivity", {
        **_refs(model), "bits": [2, 4], "rates": [0.5], "per_channel": False})  # fmt: skip
    settings = qcore.Settings(bits=2)
    ft = qcore.FinetuneConfig(epochs=1)
    tune = pool.submit(("ft",), "s1", "finetune", {
        **_refs(model, calib=True), "config": settings.to_config().to_dict(),
        "ft": ft.to_dict(), "act": False})  # fmt: skip
    # in process, as pages.cache computes them
    live, test = model.load(), qcore.load_dataset("digits")
    calib = qcore.load_dataset("digits", "calib")
    ref_sens = qcore.layer_sensitivity(live, test, bits=(2, 4), prune_rates=(0.5,),
                                       quant=qcore.QuantConfig(per_channel=False))  # fmt: skip
    ref_ft = qcore.finetune(live, qcore.load_dataset("digits", "train"), settings.to_config(),
                            ft, calib=calib)  # fmt: skip
    ref_comp = qcore.compress(ref_ft.model, settings.to_config())

    _until(lambda: sens.finished and tune.finished)
    assert sens.state == tune.state == "done", (sens.error, tune.error)
    pd.testing.assert_frame_equal(sens.result, ref_sens, check_exact=True)
    assert len(tune.rows) == len(ref_ft.history)  # the live rows the page charts
    out = _finetune_outcome(tune.result, settings, ft)  # the model rebuilt, its hash checked
    assert qcore.refs.state_sha256(out.result.model) == qcore.refs.state_sha256(ref_ft.model)
    pd.testing.assert_frame_equal(out.result.history.drop(columns="seconds"),
                                  ref_ft.history.drop(columns="seconds"), check_exact=True)
    assert out.accuracy == qcore.evaluate(ref_comp.model, test).accuracy
    assert out.size_bytes == ref_comp.size_bytes
    assert out.packed_bytes() == qcore.packed_bytes(ref_comp)


def test_an_uploaded_models_job_runs_in_a_worker_from_its_bytes(new_pool) -> None:
    import io
    import os

    import torch

    from qcore.executors import pack_model
    from qcore.upload import load_weights

    buf = io.BytesIO()
    torch.save(qcore.load_model("digits-mlp").state_dict(), buf)
    up = load_weights(buf.getvalue(), qcore.model_info("digits-mlp").arch, "digits",
                      filename="mine.pt")  # fmt: skip
    ref = qcore.ModelRef(up.name, sha256=up.sha256)
    pool = new_pool(workers=2, per_session=2)
    job = pool.submit(("up",), "s1", "sweep", {
        **_refs(ref, model_bytes=pack_model(up.module)), "grid": GRID.to_dict()})  # fmt: skip
    # bytes of other weights under this hash are refused in the worker
    other = pack_model(qcore.load_model("digits-mlp"))  # same weights: same hash, accepted
    bad_model = qcore.load_model("digits-mlp")
    with torch.no_grad():
        bad_model.fc1.weight[0, 0] += 1
    bad = pool.submit(("bad",), "s2", "sweep", {
        **_refs(ref, model_bytes=pack_model(bad_model)), "grid": GRID.to_dict()})  # fmt: skip
    _until(lambda: job.finished and bad.finished)
    assert job.state == "done", job.error
    assert job._process.pid != os.getpid()  # it ran in a job process, not here
    expected = qcore.sweep(up.module, qcore.load_dataset("digits"), GRID)
    pd.testing.assert_frame_equal(job.result.drop(columns="seconds"),
                                  expected.drop(columns="seconds"), check_exact=True)  # fmt: skip
    assert bad.state == "failed" and bad.user_error
    assert "do not match its SHA-256" in bad.error
    assert other  # (a sample's bytes pack too)


def test_a_gentle_stop_ends_fine_tuning_with_the_model_so_far(new_pool) -> None:
    pool = new_pool(workers=1, per_session=1)
    ft = qcore.FinetuneConfig(epochs=20)
    job = pool.submit(("ft-long",), "s1", "finetune", {
        **_refs(qcore.ModelRef("digits-mlp"), calib=True),
        "config": qcore.Settings(bits=2).to_config().to_dict(), "ft": ft.to_dict(),
        "act": False})  # fmt: skip
    _until(lambda: job.done >= 3)
    pool.stop(job, gentle=True)
    assert job.stopping and job.state == "running"
    _until(lambda: job.finished)
    assert job.state == "done" and job.result["stopped"]
    assert 3 <= int(job.result["history"]["step"].max()) < job.total


def test_a_job_runs_in_the_process_started_ahead_for_it(new_pool, monkeypatch) -> None:
    """The pool keeps one job process started ahead, imports done: the next job runs in
    it (one process per job still), a new spare starts, and close() ends the spare."""
    import os

    from pages import jobs

    pool = new_pool(workers=1, per_session=2)
    spare = pool._spare.process
    assert spare.is_alive() and spare.pid != os.getpid()
    first = pool.submit(("s1",), "s1", "sweep", _payload(GRID))
    assert first._process is spare  # the job went to the process already running
    _until(lambda: first.finished)
    assert first.state == "done", first.error
    _until(lambda: not spare.is_alive(), 60)  # a job process runs one job and ends
    nxt = pool._spare.process
    assert nxt is not spare and nxt.is_alive()
    second = pool.submit(("s2",), "s1", "sweep", _payload(GRID))
    assert second._process is nxt
    _until(lambda: second.finished)
    pd.testing.assert_frame_equal(first.result.drop(columns="seconds"),
                                  second.result.drop(columns="seconds"), check_exact=True)
    last = pool._spare.process
    pool.close()
    assert not last.is_alive() and pool._spare is None

    # QP_JOB_SPARE=0: no process waits; each job starts its own
    monkeypatch.setenv(jobs.SPARE_ENV, "0")
    jobs.pool.clear()
    try:
        none = jobs.pool()
        assert none._spare is None and not none.keeps_spare
        job = none.submit(("s3",), "s1", "sweep", _payload(GRID))
        _until(lambda: job.finished)
        assert job.state == "done" and none._spare is None
    finally:
        jobs.pool.clear()
    # the server's pool is closed when its cache entry goes: its spare ends
    monkeypatch.delenv(jobs.SPARE_ENV)
    cached = jobs.pool()
    spare = cached._spare.process
    jobs.pool.clear()
    assert not spare.is_alive() and cached._spare is None


def test_a_job_process_imports_no_streamlit() -> None:
    """A job process runs pages.worker's main, and that module (with what a job imports
    before it comes) loads torch and qcore but not Streamlit."""
    import subprocess
    import sys
    from pathlib import Path

    from pages import jobs, worker

    assert jobs._job_main is worker._job_main and worker._job_main.__module__ == "pages.worker"
    code = ("import sys, pages.worker, qcore, qcore.executors; "
            "print(sorted(m for m in ('streamlit', 'torch', 'qcore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "['qcore', 'torch']"
