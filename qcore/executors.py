"""Executors: run a grid's independent rows in other processes or on a Ray cluster.

A grid (``qcore.sweep``'s configurations, ``qcore.robustness``'s strengths) is a list of
jobs that do not depend on each other. An executor runs ``fn(job)`` for each job somewhere
else and hands the results back in the jobs' order:

    with qcore.ProcessExecutor(workers=2) as ex:
        df = qcore.sweep(qcore.ModelRef("mnist-cnn"), qcore.DatasetRef("mnist-5k"), grid,
                         executor=ex)

A job is a plain dict of references (``ModelRef.to_dict()``, ``DatasetRef.to_dict()``) and
config dicts (``CompressionConfig.to_dict()``), never a live module: a worker rebuilds the
model and the data from the references once and keeps them (:func:`load_refs`). ``fn`` is a
module-level function of qcore, sent by name. Each job runs with the torch thread count of
the process that submitted it, so a row computed elsewhere equals the in-process row exactly.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import torch

from qcore.refs import DatasetRef, ModelRef

__all__ = ["Executor", "ProcessExecutor", "RayExecutor", "load_refs", "RAY_ADDRESS_ENV"]

RAY_ADDRESS_ENV = "QCORE_RAY_ADDRESS"  # where the app's jobs find a Ray cluster
_ROOT = Path(__file__).resolve().parent.parent  # the folder holding qcore/, for workers
OnResult = Callable[[int, Any], None]  # on_result(job index, result), in completion order


class Executor(Protocol):
    """What the grids need: ``map(fn, jobs, on_result)`` -> results in the jobs' order."""

    def map(
        self, fn: Callable[[dict], Any], jobs: Sequence[dict], on_result: OnResult | None = None
    ) -> list[Any]: ...


def _check_workers(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1; got {value!r}.")
    return value


def _run_job(fn: Callable[[dict], Any], job: dict, threads: int) -> Any:
    """``fn(job)`` with ``threads`` torch threads (a worker's default may differ)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(job)


@lru_cache(maxsize=4)
def _model(name: str, sha256: str | None) -> Any:
    return ModelRef(name, sha256).load()


@lru_cache(maxsize=8)
def _dataset(name: str, split: str, sha256: str | None) -> Any:
    return DatasetRef(name, split, sha256).load()


def load_refs(job: dict) -> tuple[Any, Any, Any]:
    """The (model, dataset, calib) a job names under ``model``, ``dataset`` and ``calib``
    (``calib`` may be None), loaded once per worker process and shared by its jobs."""
    m = ModelRef.from_dict(job["model"])
    d = DatasetRef.from_dict(job["dataset"])
    c = None if job.get("calib") is None else DatasetRef.from_dict(job["calib"])
    calib = None if c is None else _dataset(c.name, c.split, c.sha256)
    return _model(m.name, m.sha256), _dataset(d.name, d.split, d.sha256), calib


def check_refs(model: object, dataset: object, calib: object = None) -> None:
    """Raise ValueError unless the model and data are references a worker can load."""
    if not isinstance(model, ModelRef) or not isinstance(dataset, DatasetRef) or not (
        calib is None or isinstance(calib, DatasetRef)
    ):
        raise ValueError(
            "With an executor, pass the model and the data as qcore.ModelRef and "
            "qcore.DatasetRef (e.g. ModelRef('mnist-cnn'), DatasetRef('mnist-5k')): jobs "
            "carry references that a worker loads, never live modules."
        )
    for ref in (model, dataset, calib):
        if ref is not None and ref.sha256 is not None:
            raise ValueError(
                f"{ref.name} was made or uploaded in a session; a worker cannot load it by "
                "name. Run without an executor, or pick a sample model and dataset."
            )

_MAIN_LOCK = threading.Lock()


@contextlib.contextmanager
def spawnable_main() -> Iterator[None]:
    """Start spawned processes inside this: a new process re-runs the parent's main script
    first, unless it is a module (``python -m``). Under Streamlit the main module is the
    app's page script, which must not run again in a worker, so a bare stand-in is the main
    module while processes start (a worker imports what its job names, nothing else). The
    script's own globals are not touched: it keeps running as it was."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None \
            or getattr(main, "__file__", None) is None:  # fmt: skip
        yield
        return
    stand_in = types.ModuleType("__main__")
    with _MAIN_LOCK:
        sys.modules["__main__"] = stand_in
        try:
            yield
        finally:
            if sys.modules.get("__main__") is stand_in:
                sys.modules["__main__"] = main


class ProcessExecutor:
    """Jobs on a pool of ``workers`` local worker processes (started fresh, not forked, so
    a web server's threads and locks never reach them). The pool starts on the first
    :meth:`map` and is kept, with each worker's loaded models, until :meth:`close`."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = _check_workers("workers", workers)
        self._pool: ProcessPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"ProcessExecutor(workers={self.workers})"

    def map(
        self, fn: Callable[[dict], Any], jobs: Sequence[dict], on_result: OnResult | None = None
    ) -> list[Any]:
        """``fn(job)`` for each job on the workers; the results in the jobs' order. A job's
        exception is raised here and the jobs not yet started are cancelled."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
        threads = torch.get_num_threads()
        with spawnable_main():  # the pool starts its processes on submit
            futures = [self._pool.submit(_run_job, fn, job, threads) for job in jobs]
        index = {f: i for i, f in enumerate(futures)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(done, key=index.__getitem__):
                    result = f.result()
                    if on_result is not None:
                        on_result(index[f], result)
        finally:
            for f in pending:
                f.cancel()
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop the worker processes (jobs not yet started are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RayExecutor:
    """Jobs as Ray tasks: ``address=None`` starts a local Ray instance (``num_cpus`` of
    this machine's cores, all by default); otherwise it connects to a running cluster,
    e.g. ``"auto"`` or ``"ray://head:10001"`` after ``ray start --head``. Ray (pinned in
    requirements.txt) is imported on first use; its ``init`` installs signal handlers, so
    call :meth:`map` from a main thread (the app runs it in a job process). Every worker
    must import qcore: a local instance puts this checkout on the workers' path; a
    cluster's nodes need it installed."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        if address is not None and (not isinstance(address, str) or not address):
            raise ValueError(
                f"address is None (a local Ray) or a cluster address; got {address!r}."
            )
        if num_cpus is not None:
            _check_workers("num_cpus", num_cpus)
        if address is not None and num_cpus is not None:
            raise ValueError("num_cpus sizes a local Ray instance; leave it out with an address.")
        self.address, self.num_cpus = address, num_cpus
        self._started = False

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, num_cpus={self.num_cpus!r})"

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise ValueError(
                "RayExecutor needs Ray: pip install -r requirements.txt (it pins ray), "
                "or use ProcessExecutor."
            ) from None
        if not ray.is_initialized():
            path = os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)
            ray.init(
                address=self.address,
                num_cpus=self.num_cpus,
                include_dashboard=False,
                logging_level="warning",
                log_to_driver=False,
                runtime_env=None if self.address else {"env_vars": {"PYTHONPATH": path}},
            )
            self._started = True
        return ray

    def map(
        self, fn: Callable[[dict], Any], jobs: Sequence[dict], on_result: OnResult | None = None
    ) -> list[Any]:
        """``fn(job)`` for each job as a Ray task; the results in the jobs' order. On an
        error or an interrupt the tasks still running are cancelled."""
        ray = self._ray()
        task = ray.remote(num_cpus=1, max_retries=0)(_run_job)
        threads = torch.get_num_threads()
        refs = [task.remote(fn, job, threads) for job in jobs]
        index = {r: i for i, r in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for r in done:
                    results[index[r]] = ray.get(r)
                    if on_result is not None:
                        on_result(index[r], results[index[r]])
        finally:
            for r in pending:
                ray.cancel(r, force=True)
        return results

    def close(self) -> None:
        """Disconnect from Ray (a local instance this executor started stops)."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
