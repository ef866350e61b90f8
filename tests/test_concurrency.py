"""Tracing and running models from many threads at once (sessions of one server).

torch.fx replaces ``nn.Module.__call__`` process-wide while it traces, so before the
tracing lock a model run in one thread while another traced came out wrong or failed
(``module is not installed as a submodule``), and threads tracing the same fresh model
could get a graph that returns an fx Proxy.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

import qcore
from qcore.graph import Variant, fold_batchnorm, graph_of, running, tracing
from qcore.models import build_model

SHAPE = (1, 28, 28)


def _fresh_cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", SHAPE, 10).eval()


def test_tracing_while_another_thread_evaluates_changes_no_result() -> None:
    model = qcore.load_model("mnist-cnn")
    data = qcore.load_dataset("mnist-5k", "test")
    small = dataclasses.replace(data, x=data.x[:256], y=data.y[:256], indices=data.indices[:256])
    reference = qcore.evaluate(model, small)
    stop = threading.Event()
    errors: list[BaseException] = []
    traced = [0]

    def tracer() -> None:
        seed = 100
        while not stop.is_set():
            try:
                m = _fresh_cnn(seed)
                graph_of(m)  # folds BatchNorm (a trace) and traces again
                graph_of(m, fold_bn=False)
                traced[0] += 1
            except BaseException as exc:  # noqa: BLE001 - every failure is a finding
                errors.append(exc)
            seed += 1

    t = threading.Thread(target=tracer)
    t.start()
    results = []
    try:
        for _ in range(12):
            try:
                m = qcore.evaluate(model, small)
                results.append(m.predictions.tolist() == reference.predictions.tolist())
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert traced[0] >= 1  # the two really overlapped
    assert results == [True] * 12


def test_threads_tracing_one_fresh_model_share_one_real_graph() -> None:
    model = _fresh_cnn(7)
    barrier = threading.Barrier(6)
    graphs: list = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            barrier.wait()
            graphs.append(graph_of(model))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert len(graphs) == 6 and all(g is graphs[0] for g in graphs)
    x = torch.randn(2, *SHAPE)
    out = Variant(graphs[0])(x)
    assert isinstance(out, torch.Tensor) and not isinstance(out, torch.fx.Proxy)
    with torch.no_grad():
        assert torch.allclose(out, fold_batchnorm(model)(x), atol=1e-5)


def test_a_trace_waits_for_runs_and_runs_wait_for_a_trace() -> None:
    """The lock itself: while a run holds the shared side, a trace does not start; while a
    trace holds the exclusive side, a run does not start; both sides are re-entrant."""
    order: list[str] = []
    in_run = threading.Event()
    release_run = threading.Event()

    def runner() -> None:
        with running():
            with running():  # nested runs in one thread do not block themselves
                order.append("run start")
                in_run.set()
                release_run.wait(5)
                order.append("run end")

    def tracer() -> None:
        in_run.wait(5)
        with tracing():
            with tracing():
                order.append("trace")

    a, b = threading.Thread(target=runner), threading.Thread(target=tracer)
    a.start()
    b.start()
    in_run.wait(5)
    b.join(0.2)  # the trace must still be waiting for the run
    assert b.is_alive() and order == ["run start"]
    release_run.set()
    a.join()
    b.join()
    assert order == ["run start", "run end", "trace"]
