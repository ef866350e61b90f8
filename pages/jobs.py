"""Heavy work off the web process: a bounded pool of worker processes for the analysis
pages, with a queue, a per-session cap, a visible wait, progress that survives a rerun and
a Stop that cancels.

One pool per server process (``QP_JOB_WORKERS`` worker processes at a time, 2 by default;
``0`` runs jobs in the web process, as before). A job is a task name and plain dicts
(``ModelRef`` / ``DatasetRef`` / config dicts, never a live module); each runs in a fresh
process, so Stop ends it at once and a crash cannot reach the server. A session may have
``QP_JOBS_PER_SESSION`` jobs (1 by default) waiting or running. The job outlives the script
run that started it: a rerun (any widget) finds it by its key and draws its progress again.
With ``QCORE_RAY_ADDRESS`` set, a sweep's rows run on that Ray cluster from the job process
(Ray starts in that process's main thread, never in Streamlit's script thread).
Models and datasets made in a session are not sent: those jobs run in the web process.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from qcore.executors import spawnable_main

WORKERS_ENV, PER_SESSION_ENV = "QP_JOB_WORKERS", "QP_JOBS_PER_SESSION"
KEPT_RESULTS = 16  # finished results per process, as pages.cache.ANALYSIS_CACHE_ENTRIES


def _env_int(name: str, default: int) -> int:
    try:
        return max(0, int(os.environ.get(name, default)))
    except ValueError:
        return default


# --- the worker side (a fresh process; imports qcore, never Streamlit) --------------------------


def _sweep(payload: dict, progress: Callable[[int, int, dict], None]) -> Any:
    import qcore
    from qcore.executors import RAY_ADDRESS_ENV, RayExecutor

    address = os.environ.get(RAY_ADDRESS_ENV) or None
    executor = RayExecutor(address=address) if address else None
    data = qcore.DatasetRef.from_dict(payload["dataset"])
    calib = dataclasses.replace(data, split="calib") if payload.get("calib") else None
    grid = qcore.SweepGrid.from_dict(payload["grid"])
    return qcore.sweep(qcore.ModelRef.from_dict(payload["model"]), data, grid, calib=calib,
                       progress=progress, executor=executor)  # fmt: skip


TASKS: dict[str, Callable[[dict, Callable[[int, int, dict], None]], Any]] = {"sweep": _sweep}


def _worker(task: str, payload: dict, conn: Any) -> None:
    """A job process's main: run the task, send ("progress", done, total) as it goes and
    ("ok", result) or ("error", is_value_error, message) at the end."""
    try:
        out = TASKS[task](payload, lambda d, t, _row: conn.send(("progress", d, t)))
        conn.send(("ok", out))
    except ValueError as e:  # a sentence for the user
        conn.send(("error", True, str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the page, not raised here
        conn.send(("error", False, f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


# --- the web side -------------------------------------------------------------------------------


@dataclass(eq=False)
class PoolJob:
    """One job: waiting, running, then done, failed or stopped."""

    key: tuple
    session: str
    task: str
    payload: dict
    state: str = "waiting"  # waiting, running, done, failed, stopped
    done: int = 0
    total: int = 0
    result: Any = None
    error: str | None = None
    user_error: bool = False  # the error is a sentence for the user (a ValueError)
    seq: int = field(default_factory=itertools.count().__next__)
    _process: Any = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "stopped")


class JobPool:
    """At most ``workers`` job processes at once; the rest wait in order of submission."""

    def __init__(self, workers: int, per_session: int) -> None:
        self.workers, self.per_session = workers, per_session
        self._lock = threading.Lock()
        self._waiting: list[PoolJob] = []
        self._running: list[PoolJob] = []
        self._jobs: OrderedDict[tuple, PoolJob] = OrderedDict()  # by key, finished ones kept

    def find(self, key: tuple) -> PoolJob | None:
        with self._lock:
            return self._jobs.get(key)

    def submit(self, key: tuple, session: str, task: str, payload: dict) -> PoolJob:
        """The job for ``key`` (a running or finished one is reused); a ValueError with a
        sentence when the session already has its share of jobs waiting or running."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.state not in ("failed", "stopped"):
                return job
            mine = [j for j in self._waiting + self._running if j.session == session]
            if len(mine) >= self.per_session:
                raise ValueError(
                    f"You already have {len(mine)} job(s) waiting or running (at most "
                    f"{self.per_session} per session); wait for it to finish or stop it."
                )
            job = PoolJob(key, session, task, payload)
            self._jobs[key] = job
            self._jobs.move_to_end(key)
            self._waiting.append(job)
            self._forget_old()
            self._dispatch()
            return job

    def ahead(self, job: PoolJob) -> int:
        """How many jobs wait before ``job`` (0 once it runs)."""
        with self._lock:
            return self._waiting.index(job) if job in self._waiting else 0

    def stop(self, job: PoolJob) -> None:
        """Cancel ``job``: a waiting job leaves the queue, a running one's process ends."""
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.state = "stopped"
            elif job.state == "running":
                job.state = "stopped"
                job._process.kill()

    def stop_session(self, session: str) -> None:
        """Cancel every job of a session (it ended)."""
        with self._lock:
            jobs = [j for j in self._waiting + self._running if j.session == session]
        for j in jobs:
            self.stop(j)

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.finished]
        for k in finished[: max(0, len(finished) - KEPT_RESULTS)]:
            del self._jobs[k]

    def _dispatch(self) -> None:  # with the lock held
        while self._waiting and len(self._running) < self.workers:
            job = self._waiting.pop(0)
            ctx = multiprocessing.get_context("spawn")  # no fork of a threaded server
            recv, send = ctx.Pipe(duplex=False)
            job._process = ctx.Process(target=_worker, args=(job.task, job.payload, send),
                                       daemon=True, name=f"qp-job-{job.seq}")  # fmt: skip
            with spawnable_main():  # not the page script again in the worker
                job._process.start()
            send.close()
            job.state = "running"
            self._running.append(job)
            threading.Thread(target=self._watch, args=(job, recv), daemon=True).start()

    def _watch(self, job: PoolJob, recv: Any) -> None:
        """Read one job's messages until its process ends, then start the next job."""
        try:
            while True:
                try:
                    msg = recv.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "progress":
                    job.done, job.total = msg[1], msg[2]
                elif msg[0] == "ok":
                    job.result = msg[1]
                else:
                    job.user_error, job.error = msg[1], msg[2]
        finally:
            recv.close()
            job._process.join()
            with self._lock:
                if job.state == "running":
                    if job.error is None and job.result is None:
                        job.error = f"The job's process ended (exit code {job._process.exitcode})."
                    job.state = "failed" if job.error is not None else "done"
                self._running.remove(job)
                self._dispatch()


@st.cache_resource(show_spinner=False)
def pool() -> JobPool:
    """The server process's one pool, shared by every session."""
    return JobPool(_env_int(WORKERS_ENV, 2), max(1, _env_int(PER_SESSION_ENV, 1)))


def _session_id() -> str:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else "no-session"


class _SessionJobs:
    """Kept in st.session_state: when the session's state goes, its jobs are cancelled."""

    def __init__(self, p: JobPool, session: str) -> None:
        weakref.finalize(self, p.stop_session, session)


def run(key: tuple, task: str, payload: dict, *, text: str, restart: bool = False,
        every_s: float = 0.3) -> Any:  # fmt: skip
    """The result of ``task`` for ``payload``, run in the pool: draws "waiting for a worker
    (N ahead)" or a progress bar and a Stop button until it is done; stops the script run
    (with a sentence) if the job was stopped or failed. A stopped job starts again only
    with ``restart`` (the page's run button). A ValueError from the job, or from the
    per-session cap, reaches the caller."""
    p, session = pool(), _session_id()
    if "_qp_jobs" not in st.session_state:
        st.session_state["_qp_jobs"] = _SessionJobs(p, session)
    job = p.find(key)
    if job is None or (restart and job.state in ("failed", "stopped")):
        job = p.submit(key, session, task, payload)
    status, stop_slot = st.empty(), st.empty()
    if not job.finished and stop_slot.button("Stop", key=f"stop_{task}", icon=":material/stop:"):
        p.stop(job)
    while not job.finished:
        ahead = p.ahead(job)
        if job.state == "waiting":
            status.info(f"Waiting for a worker ({ahead} ahead).", icon=":material/hourglass:")
        else:
            frac = job.done / job.total if job.total else 0.0
            label = f"{text} {job.done}/{job.total}" if job.total else f"{text} (starting)"
            status.progress(min(frac, 1.0), text=label)
        time.sleep(every_s)
    status.empty()
    stop_slot.empty()
    if job.state == "stopped":
        st.info("Stopped. Press the run button to start it again.", icon=":material/stop:")
        st.stop()
    if job.state == "failed":
        if job.user_error:
            raise ValueError(job.error)
        st.error(f"The job failed: {job.error}")
        st.stop()
    return job.result


def run_sweep(model: Any, data: Any, params: Any, restart: bool = False) -> Any:
    """The Trade-offs sweep in the pool (``pages.cache.run_sweep`` in process for models or
    data made in a session, or with ``QP_JOB_WORKERS=0``); ``restart``: the run button."""
    from pages import cache

    grid = params.grid()  # a ValueError with a sentence before anything starts
    if model.is_session or data.is_session or pool().workers == 0:
        return cache.run_sweep(model, data, params)
    # activations calibrated, AdaRound and bias correction learnt on the calibration split
    needs = params.needs_calib or any(b is not None for b in params.act_bits)
    payload = {"model": model.to_dict(), "dataset": data.to_dict(), "grid": grid.to_dict(),
               "calib": needs}  # fmt: skip
    key = ("sweep", model, data, params)
    return run(key, "sweep", payload, text="Sweeping…", restart=restart)
