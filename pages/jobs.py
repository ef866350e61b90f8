"""Heavy work off the web process: a bounded pool of worker processes for the analysis
pages, with a queue, a per-session cap, a visible wait, progress that survives a rerun and
a Stop that cancels.

One pool per server process (``QP_JOB_WORKERS`` worker processes at a time, 2 by default;
``0`` runs jobs in the web process, as before). A job is a task name and plain dicts
(``ModelRef`` / ``DatasetRef`` / config dicts, never a live module); each runs in a fresh
process of its own with the web process's torch thread count, so Stop ends it at once, a
crash cannot reach the server, and its numbers equal the in-process run's. That process was
started ahead (``QP_JOB_SPARE``, on by default): it waits with torch and qcore imported, so
a job starts at once instead of after seconds of imports. A session may have
``QP_JOBS_PER_SESSION`` jobs (1 by default) waiting or running. The job outlives the
script run that started it: a rerun (any widget) finds it by its key and draws its progress
again.

What runs where. In a job process (``pages.worker.TASKS``): the Trade-offs sweep (``sweep``; with
``QCORE_RAY_ADDRESS`` set its rows go on to that Ray cluster, Ray started in the job
process's main thread, never in Streamlit's script thread), layer sensitivity
(``sensitivity``), mixed precision and its uniform widths (``mixed``), fine-tuning
(``finetune``: Stop asks it to end after the batch; the model comes back as state bytes and
SHA-256 and is rebuilt here), Deep Compression (``deep``: its packed file comes back) and a
Robustness run's curves (``robustness``). In the web process: the Playground's slider path
and everything drawn from one setting, and every job on a dataset uploaded in a session
(its hash is of the file, which the server does not keep). A model made in a session
(uploaded ``up-…``, fine-tuned ``ft-…``) goes to the worker as its hash and bytes
(``qcore.executors.pack_model``); the worker rebuilds it and checks the hash.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
import torch

from pages.progress import progress_text
from pages.worker import GENTLE_STOP, _env_int, _job_main  # the job processes' side
from qcore.executors import spawnable_main

WORKERS_ENV, PER_SESSION_ENV = "QP_JOB_WORKERS", "QP_JOBS_PER_SESSION"
SPARE_ENV = "QP_JOB_SPARE"  # 0: no process started ahead (each job waits for its imports)
KEPT_RESULTS = 16  # finished results per process, as pages.cache.ANALYSIS_CACHE_ENTRIES


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
    phase: str | None = None  # the step under way, when the task names it
    rows: list[dict] = field(default_factory=list)  # progress rows (worker.LIVE_ROWS tasks)
    stopping: bool = False  # a gentle Stop was asked for: the task ends after its step
    result: Any = None
    error: str | None = None
    user_error: bool = False  # the error is a sentence for the user (a ValueError)
    _process: Any = None
    _stop: Any = None  # a multiprocessing Event the task polls (GENTLE_STOP tasks)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "stopped")


@dataclass(eq=False)
class _Process:
    """A started job process waiting for its job: the pipe its job goes down (``start``),
    the one its messages come back on (``recv``) and the event a gentle Stop sets."""

    process: Any
    start: Any
    recv: Any
    stop: Any


def _start_process() -> _Process:
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded server
    start_recv, start_send = ctx.Pipe(duplex=False)
    recv, send = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    process = ctx.Process(target=_job_main, args=(start_recv, send, stop), daemon=True,
                          name="qp-job")  # fmt: skip
    with spawnable_main():  # not the page script again in the worker
        process.start()
    start_recv.close()
    send.close()
    return _Process(process, start_send, recv, stop)


class JobPool:
    """At most ``workers`` job processes at once; the rest wait in order of submission.
    With ``spare`` (``QP_JOB_SPARE``, on by default) one more process is started ahead and
    waits, imports done, for the next job, so a job starts in well under a second instead
    of after a new process's imports (seconds); it costs that idle process's memory."""

    def __init__(self, workers: int, per_session: int, spare: bool = True) -> None:
        self.workers, self.per_session = workers, per_session
        self.keeps_spare = spare and workers > 0
        self._lock = threading.Lock()
        self._waiting: list[PoolJob] = []
        self._running: list[PoolJob] = []
        self._jobs: OrderedDict[tuple, PoolJob] = OrderedDict()  # by key, finished ones kept
        self._spare: _Process | None = _start_process() if self.keeps_spare else None

    def close(self) -> None:
        """Stop every job and end the spare process (when the cached pool is cleared, and
        in tests; a server's pool lives as long as the server, its processes end with it)."""
        with self._lock:
            jobs = self._waiting + self._running
        for j in jobs:
            self.stop(j)
        with self._lock:
            spare, self._spare, self.keeps_spare = self._spare, None, False
        if spare is not None:  # it holds no job: nothing is lost
            spare.process.kill()
            spare.process.join(timeout=10)
            spare.start.close()
            spare.recv.close()

    def find(self, key: tuple) -> PoolJob | None:
        with self._lock:
            return self._jobs.get(key)

    def submit(self, key: tuple, session: str, task: str, payload: dict,
               fresh: bool = False) -> PoolJob:  # fmt: skip
        """The job for ``key`` (a running or finished one is reused, a finished one not with
        ``fresh``); a ValueError with a sentence when the session already has its share of
        jobs waiting or running."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.state not in ("failed", "stopped") and not (
                fresh and job.finished
            ):
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

    def stop(self, job: PoolJob, gentle: bool = False) -> None:
        """Cancel ``job``: a waiting job leaves the queue, a running one's process ends (with
        ``gentle``, a task of GENTLE_STOP is asked to end after its step and return what it
        has: the job then finishes as done)."""
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.state = "stopped"
            elif job.state == "running" and gentle and job.task in GENTLE_STOP:
                job.stopping = True
                job._stop.set()
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
            spare, self._spare = self._spare, None
            if spare is None or not spare.process.is_alive():
                spare = _start_process()
            job._process, job._stop = spare.process, spare.stop
            job.state = "running"
            self._running.append(job)
            threading.Thread(target=self._watch, args=(job, spare), daemon=True).start()
        if self.keeps_spare and self._spare is None:
            self._spare = _start_process()  # ready for the next job

    def _watch(self, job: PoolJob, proc: _Process) -> None:
        """Send the job to its process (here, not under the lock: a big payload waits for
        a process still importing), read its messages until the process ends, then start
        the next job."""
        recv = proc.recv
        try:
            try:
                proc.start.send((job.task, job.payload, torch.get_num_threads()))
            except OSError:  # the process is gone (stopped, or died): reported below
                pass
            except Exception as e:  # noqa: BLE001 - a payload that cannot travel
                job.error = f"{type(e).__name__}: {e}"
            finally:
                proc.start.close()
            while True:
                try:
                    msg = recv.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "progress":
                    if msg[4] is not None:
                        job.rows.append(msg[4])  # before done: a reader sees every row
                    job.done, job.total, job.phase = msg[1], msg[2], msg[3]
                elif msg[0] == "ok":
                    job.result = msg[1]
                else:
                    job.user_error, job.error = msg[1], msg[2]
        finally:
            recv.close()
            answered = job.error is not None or job.result is not None
            if not answered:  # its exit code says why
                job._process.join()
            with self._lock:
                if job.state == "running":
                    if not answered:
                        job.error = f"The job's process ended (exit code {job._process.exitcode})."
                    job.state = "failed" if job.error is not None else "done"
                self._running.remove(job)
                self._dispatch()
            # a process that answered is done: the next job need not wait for its exit (an
            # interpreter with torch loaded takes about a second to end)
            job._process.join()


@st.cache_resource(show_spinner=False, on_release=JobPool.close)
def pool() -> JobPool:
    """The server process's one pool, shared by every session (clearing the cache closes
    it: its jobs stop and its spare process ends)."""
    return JobPool(_env_int(WORKERS_ENV, 2), max(1, _env_int(PER_SESSION_ENV, 1)),
                   spare=_env_int(SPARE_ENV, 1) > 0)


def _session_id() -> str:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else "no-session"


class _SessionJobs:
    """Kept in st.session_state: when the session's state goes, its jobs are cancelled."""

    def __init__(self, p: JobPool, session: str) -> None:
        weakref.finalize(self, p.stop_session, session)


def run(key: tuple, task: str, payload: dict | Callable[[], dict], *, text: str,
        restart: bool = False, every_s: float = 0.3) -> Any:  # fmt: skip
    """The result of ``task`` for ``payload`` (or for what a callable returns, built only
    when the job must start), run in the pool: draws "waiting for a worker (N ahead)" or a
    progress bar and a Stop button until it is done; stops the script run (with a
    sentence) if the job was stopped or failed. A stopped job starts again only with
    ``restart`` (the page's run button). A ValueError from the job, or from the
    per-session cap, reaches the caller."""
    p, session = pool(), _session_id()
    if "_qp_jobs" not in st.session_state:
        st.session_state["_qp_jobs"] = _SessionJobs(p, session)
    job = p.find(key)
    if job is None or (restart and job.state in ("failed", "stopped")):
        job = p.submit(key, session, task, payload() if callable(payload) else payload)
    status, stop_slot = st.empty(), st.empty()
    if not job.finished and stop_slot.button("Stop", key=f"stop_{task}", icon=":material/stop:"):
        p.stop(job)
    while not job.finished:
        ahead = p.ahead(job)
        if job.state == "waiting":
            status.info(f"Waiting for a worker ({ahead} ahead).", icon=":material/hourglass:")
        else:
            frac = job.done / job.total if job.total else 0.0
            label = (progress_text(text, job.done, job.total, job.phase) if job.total
                     else f"{text} (starting)")  # fmt: skip
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


# --- what the pages call: in the pool, or in this process --------------------------------------


def in_pool(data: Any) -> bool:
    """Whether a job on ``data`` runs in the pool: not with ``QP_JOB_WORKERS=0``, and not
    for a dataset uploaded in a session (its hash is of the file, which the server does not
    keep, so a worker could not check what it was sent). Models made in a session go, as
    their bytes and hash."""
    return not data.is_session and pool().workers > 0


def refs_payload(model: Any, data: Any, calib: bool = False) -> dict:
    """A job's references: the model, the test split and (``calib``) the calibration split;
    a session model's bytes under ``model_bytes`` (qcore.executors.pack_model; the worker
    rebuilds it and checks its SHA-256)."""
    from pages import cache
    from qcore.executors import pack_model, ref_job

    calib_ref = dataclasses.replace(data, split="calib") if calib else None
    model_bytes = pack_model(cache.get_model(model)) if model.is_session else None
    return ref_job(model, data, calib_ref, model_bytes)


def run_sweep(model: Any, data: Any, params: Any, restart: bool = False) -> Any:
    """The Trade-offs sweep in the pool (``pages.cache.run_sweep`` in process for uploaded
    data, or with ``QP_JOB_WORKERS=0``); ``restart``: the run button."""
    from pages import cache

    grid = params.grid()  # a ValueError with a sentence before anything starts
    if not in_pool(data):
        return cache.run_sweep(model, data, params)
    # activations calibrated, AdaRound and bias correction learnt on the calibration split
    needs = params.needs_calib or any(b is not None for b in params.act_bits)
    return run(("sweep", model, data, params), "sweep",
               lambda: {**refs_payload(model, data, needs), "grid": grid.to_dict()},
               text="Sweeping…", restart=restart)  # fmt: skip


def run_sensitivity(model: Any, data: Any, bits: tuple[int, ...], rates: tuple[float, ...],
                    per_channel: bool, restart: bool = False) -> Any:  # fmt: skip
    """The layer sensitivity table (``pages.cache.run_sensitivity`` when not pooled)."""
    from pages import cache

    cache.check_sensitivity_choice(bits, rates)
    if not in_pool(data):
        return cache.run_sensitivity(model, data, bits, rates, per_channel)
    return run(("sensitivity", model, data, bits, rates, per_channel), "sensitivity",
               lambda: {**refs_payload(model, data), "bits": list(bits), "rates": list(rates),
                        "per_channel": per_channel},
               text="Testing each layer…", restart=restart)  # fmt: skip


def run_mixed(model: Any, data: Any, budget_bytes: int, candidates: tuple[int, ...],
              per_channel: bool, restart: bool = False) -> tuple[Any, Any]:  # fmt: skip
    """The mixed-precision choice and every uniform width's sweep row on the test split."""
    from pages import cache
    from pages.progress import run_with_progress

    if not candidates:
        raise ValueError("Pick at least one candidate bit width.")
    params = cache.SweepParams(bits=candidates, prune_rates=(0.0,), per_channel=(per_channel,))
    if not in_pool(data):
        res = cache.run_mixed(model, data, budget_bytes, candidates, per_channel)
        uniform = run_with_progress(cache.sweep_table, model, data, params,
                                    text="Measuring every uniform bit width on the test "
                                    "split…")  # fmt: skip
        return res, uniform
    return run(("mixed", model, data, budget_bytes, candidates, per_channel), "mixed",
               lambda: {**refs_payload(model, data, calib=True), "budget_bytes": budget_bytes,
                        "candidates": list(candidates), "per_channel": per_channel,
                        "grid": params.grid().to_dict()},
               text="Measuring each layer on the calibration split…",
               restart=restart)  # fmt: skip


def run_deep(model: Any, data: Any, prune_rate: float | None, bits: int | None, epochs: int,
             restart: bool = False) -> Any:  # fmt: skip
    """The Deep Compression result as a ``pages.cache.DeepOutcome`` (its packed file built
    in the worker, or on the download's click in process)."""
    from pages import cache

    if not in_pool(data):
        res = cache.run_deep(model, data, prune_rate, bits, epochs)
        return cache.DeepOutcome(
            result=res, size_bytes=res.compressed.size_bytes,
            file_bytes=cache.deep_packed_size(model, data, prune_rate, bits, epochs),
            download=cache.deep_packed_download(model, data, prune_rate, bits, epochs),
        )  # fmt: skip
    out = run(("deep", model, data, prune_rate, bits, epochs), "deep",
              lambda: {**refs_payload(model, data, calib=True), "prune_rate": prune_rate,
                       "bits": bits, "epochs": epochs, "max_train": cache.DEEP_MAX_TRAIN},
              text="Pruning, sharing and retraining…", restart=restart)  # fmt: skip
    packed = out["packed"]
    return cache.DeepOutcome(result=out["result"], size_bytes=out["size_bytes"],
                             file_bytes=len(packed), download=lambda: packed)  # fmt: skip


def run_robustness(model: Any, data: Any, variants: tuple, params: tuple,
                   restart: bool = False) -> dict[tuple, Any]:  # fmt: skip
    """Every curve of a Robustness run: ``{(params, settings): table, or the sentence of
    its ValueError}`` (one job for them all, since a session runs one job at a time)."""
    from pages import cache

    if not in_pool(data):
        out: dict[tuple, Any] = {}
        for prm in params:
            for s in variants:
                try:
                    out[prm, s] = cache.run_robustness(model, data, s, prm)
                except ValueError as e:
                    out[prm, s] = str(e)
        return out

    def payload() -> dict:
        vs = [{"config": s.to_config().to_dict(), "keeps_float": s.to_config().keeps_float,
               "needs_calib": s.needs_calib, "label": s.label()} for s in variants]  # fmt: skip
        ps = [{"perturbation": p.perturbation, "strengths": list(p.strengths),
               "limit": p.limit, "steps": p.steps} for p in params]  # fmt: skip
        calib = any(s.needs_calib for s in variants)
        return {**refs_payload(model, data, calib), "variants": vs, "params": ps}

    res = run(("robustness", model, data, variants, params), "robustness", payload,
              text="Perturbing…", restart=restart)  # fmt: skip
    return {(p, s): res[i, j] for i, p in enumerate(params) for j, s in enumerate(variants)}


class PoolRun:
    """A fine-tuning job in the pool, with the interface of ``pages.progress.Job`` (rows,
    done, total, stop, stopping, running, result) so that the page draws either alike."""

    def __init__(self, key: Any, job: PoolJob, settings: Any, ft: Any) -> None:
        self.key, self._job, self._settings, self._ft = key, job, settings, ft
        self._outcome: Any = None

    rows = property(lambda self: self._job.rows)
    done = property(lambda self: self._job.done)
    total = property(lambda self: self._job.total)
    stopping = property(lambda self: self._job.stopping)
    running = property(lambda self: not self._job.finished)

    @property
    def ahead(self) -> int | None:
        """Jobs waiting before this one while it waits for a worker; None once it runs."""
        return pool().ahead(self._job) if self._job.state == "waiting" else None

    @property
    def starting(self) -> bool:
        """Whether it runs but has not reported yet (the worker loads the model and data)."""
        return self._job.state == "running" and not self._job.total

    def snapshot(self) -> list[dict]:
        return list(self._job.rows)

    def stop(self) -> None:
        """End training after this batch (a waiting job leaves the queue)."""
        pool().stop(self._job, gentle=True)

    def result(self) -> Any:
        """The ``pages.cache.FinetuneOutcome`` (the model rebuilt from its bytes, its
        SHA-256 checked); a ValueError with a sentence if the job failed or was cancelled."""
        job = self._job
        if job.state == "stopped":
            raise ValueError("The training was cancelled before it started or finished.")
        if job.state == "failed":
            raise ValueError(job.error if job.user_error else f"The job failed: {job.error}")
        if self._outcome is None:
            self._outcome = _finetune_outcome(job.result, self._settings, self._ft)
        return self._outcome


def _finetune_outcome(out: dict, settings: Any, ft: Any) -> Any:
    import qcore
    from pages import cache
    from qcore.executors import unpack_model

    model = unpack_model(out["model_bytes"], out["sha256"])
    res = qcore.FinetuneResult(model=model, history=out["history"], config=settings.to_config(),
                               ft=ft, stopped=out["stopped"], seconds=out["seconds"])  # fmt: skip
    return cache.FinetuneOutcome(result=res, compressed=None, accuracy=out["accuracy"],
                                 float_accuracy=out["float_accuracy"], n=out["n"],
                                 size_bytes=out["size_bytes"], packed=out["packed"])  # fmt: skip


def start_finetune(key: Any, model: Any, data: Any, settings: Any, ft: Any) -> Any:
    """Start a fine-tuning run: a ``PoolRun`` in the pool, else a ``pages.progress.Job`` in
    this process (uploaded data, or ``QP_JOB_WORKERS=0``). A ValueError with a sentence when
    the session already has its share of jobs."""
    from pages import cache
    from pages.progress import Job

    if not in_pool(data):
        # loaded here, where a spinner can be drawn: the worker thread only reads them
        for load in (cache.train_dataset, cache.get_calib_dataset, cache.get_dataset):
            load(data)
        return Job(key, cache.finetune_run, model, data, settings, ft)
    p = pool()
    if "_qp_jobs" not in st.session_state:
        st.session_state["_qp_jobs"] = _SessionJobs(p, _session_id())
    payload = {**refs_payload(model, data, calib=True), "config": settings.to_config().to_dict(),
               "ft": ft.to_dict(), "act": settings.abits is not None}  # fmt: skip
    job = p.submit(("finetune", *key), _session_id(), "finetune", payload, fresh=True)
    return PoolRun(key, job, settings, ft)
