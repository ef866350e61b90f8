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

A model made in a session (uploaded ``up-…`` or fine-tuned ``ft-…``) cannot be loaded by
name; it travels as its hash and its bytes: ``ModelRef(..., sha256=...)`` with
``model_bytes=qcore.executors.pack_model(module)``. The worker rebuilds the architecture
from the bytes (the module's ``qcore_spec`` and its state dict, read with
``torch.load(weights_only=True)``, loaded strictly) and checks the state's SHA-256
(:func:`qcore.refs.state_sha256`) before using it (:func:`unpack_model`). Uploaded datasets
are not sent: their hash is of the uploaded file, which the server does not keep.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import torch

from qcore.refs import DatasetRef, ModelRef, state_sha256

__all__ = ["Executor", "ProcessExecutor", "RayExecutor", "load_refs", "check_refs",
           "pack_model", "unpack_model", "RAY_ADDRESS_ENV"]  # fmt: skip

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


def pack_model(model: Any) -> bytes:
    """A model's bytes for a worker: its ``qcore_spec`` (architecture, input shape, classes)
    and its state dict, written with ``torch.save`` (read back by :func:`unpack_model`).
    The model is not changed."""
    spec = getattr(model, "qcore_spec", None)
    if not isinstance(spec, dict) or not isinstance(spec.get("arch"), str):
        raise ValueError(
            "This model does not record its architecture (qcore_spec), so a worker cannot "
            "rebuild it; run it without a worker."
        )
    buf = io.BytesIO()
    state = {k: t.detach().to("cpu") for k, t in model.state_dict().items()}
    torch.save({"spec": dict(spec), "state": state}, buf)
    return buf.getvalue()


def unpack_model(data: bytes, sha256: str | None = None) -> Any:
    """The float model (eval mode) from :func:`pack_model`'s bytes: the architecture built
    from the spec (in its folded form when the state is that of a model fine-tuned with
    BatchNorm folded), the state loaded strictly, and its SHA-256
    (:func:`qcore.refs.state_sha256`) checked against ``sha256`` when given."""
    from qcore.finetune import float_module
    from qcore.fold import has_batchnorm
    from qcore.models import build_model

    try:
        obj = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        spec, state = dict(obj["spec"]), obj["state"]
        model = build_model(spec["arch"], tuple(spec["input_shape"]), int(spec["num_classes"]))
        if set(model.state_dict()) != set(state) and has_batchnorm(model):
            model = float_module(model, {}, fold_bn=True)  # fine-tuning's folded structure
        model.load_state_dict(state, strict=True)
    except Exception as e:  # unreadable bytes, another architecture
        raise ValueError(f"The model's bytes sent with the job could not be read: {e}") from e
    model = model.float().eval()
    model.qcore_spec = spec  # type: ignore[assignment]
    if sha256 is not None and state_sha256(model) != sha256:
        raise ValueError(
            "The model's bytes sent with the job do not match its SHA-256; it was changed on "
            "the way. Run it again."
        )
    return model


_UNPACKED: OrderedDict[str, Any] = OrderedDict()  # session models by SHA-256, newest last
_UNPACKED_KEPT = 4
_UNPACKED_LOCK = threading.Lock()


def _session_model(ref: ModelRef, data: bytes | None) -> Any:
    """A session model rebuilt from the bytes its job carries, kept for the worker's next jobs."""
    with _UNPACKED_LOCK:
        held = _UNPACKED.get(ref.sha256)  # type: ignore[arg-type]
        if held is not None:
            _UNPACKED.move_to_end(ref.sha256)  # type: ignore[arg-type]
            return held
    if data is None:
        ref.load()  # a ValueError: a session model cannot be loaded by name
    model = unpack_model(data, ref.sha256)  # type: ignore[arg-type]
    with _UNPACKED_LOCK:
        _UNPACKED[ref.sha256] = model  # type: ignore[index]
        while len(_UNPACKED) > _UNPACKED_KEPT:
            _UNPACKED.popitem(last=False)
    return model


def load_model_ref(d: dict, model_bytes: bytes | None = None) -> Any:
    """The model a job names (``ModelRef.to_dict()``), loaded once per worker process; a
    session model from ``model_bytes`` (:func:`pack_model`), its SHA-256 checked."""
    m = ModelRef.from_dict(d)
    return _model(m.name, None) if m.sha256 is None else _session_model(m, model_bytes)


def load_dataset_ref(d: dict) -> Any:
    """The dataset split a job names (``DatasetRef.to_dict()``), loaded once per worker."""
    r = DatasetRef.from_dict(d)
    return _dataset(r.name, r.split, r.sha256)


def load_refs(job: dict) -> tuple[Any, Any, Any]:
    """The (model, dataset, calib) a job names under ``model``, ``dataset`` and ``calib``
    (``calib`` may be None), loaded once per worker process and shared by its jobs. A
    session model comes with its bytes under ``model_bytes``."""
    model = load_model_ref(job["model"], job.get("model_bytes"))
    calib = None if job.get("calib") is None else load_dataset_ref(job["calib"])
    return model, load_dataset_ref(job["dataset"]), calib


def check_refs(model: object, dataset: object, calib: object = None,
               model_bytes: bytes | None = None) -> None:  # fmt: skip
    """Raise ValueError unless the model and data are references a worker can load (a
    session model only with its ``model_bytes``)."""
    if not isinstance(model, ModelRef) or not isinstance(dataset, DatasetRef) or not (
        calib is None or isinstance(calib, DatasetRef)
    ):
        raise ValueError(
            "With an executor, pass the model and the data as qcore.ModelRef and "
            "qcore.DatasetRef (e.g. ModelRef('mnist-cnn'), DatasetRef('mnist-5k')): jobs "
            "carry references that a worker loads, never live modules."
        )
    if model.sha256 is not None and model_bytes is None:
        raise ValueError(
            f"{model.name} was made or uploaded in a session; a worker cannot load it by "
            "name. Pass its bytes (model_bytes=qcore.executors.pack_model(module)), run "
            "without an executor, or pick a sample model."
        )
    for ref in (dataset, calib):
        if ref is not None and ref.sha256 is not None:
            raise ValueError(
                f"{ref.name} was uploaded in a session; a worker cannot load it by name. "
                "Run without an executor, or pick a known dataset."
            )


def ref_job(model: ModelRef, dataset: DatasetRef, calib: DatasetRef | None = None,
            model_bytes: bytes | None = None) -> dict:  # fmt: skip
    """The references part of a job, as :func:`load_refs` reads it."""
    job: dict = {"model": model.to_dict(), "dataset": dataset.to_dict(),
                 "calib": None if calib is None else calib.to_dict()}  # fmt: skip
    if model_bytes is not None:
        job["model_bytes"] = model_bytes
    return job


_MEMO: OrderedDict[tuple, Any] = OrderedDict()
_MEMO_KEPT = 8


def worker_memo(key: tuple, fn: Callable[[], Any]) -> Any:
    """``fn()`` once per worker process for ``key`` (e.g. the float model's metrics, which
    every job of a grid compares with), the newest :data:`_MEMO_KEPT` kept."""
    with _UNPACKED_LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
    value = fn()
    with _UNPACKED_LOCK:
        _MEMO[key] = value
        while len(_MEMO) > _MEMO_KEPT:
            _MEMO.popitem(last=False)
    return value


def refs_key(job: dict) -> tuple[str, str, str]:
    """A job's references as a hashable key (never its bytes)."""
    return tuple(json.dumps(job.get(k), sort_keys=True)  # type: ignore[return-value]
                 for k in ("model", "dataset", "calib"))  # fmt: skip


def load_args(model: Any, dataset: Any, calib: Any = None,
              model_bytes: bytes | None = None) -> tuple[Any, Any, Any]:  # fmt: skip
    """Refs loaded in process (a grid run without an executor takes refs or live objects;
    a session model's ref with its ``model_bytes``)."""
    if isinstance(model, ModelRef):
        model = load_model_ref(model.to_dict(), model_bytes)
    dataset = dataset.load() if isinstance(dataset, DatasetRef) else dataset
    calib = calib.load() if isinstance(calib, DatasetRef) else calib
    return model, dataset, calib

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
