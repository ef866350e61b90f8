"""qcore.ProcessExecutor and qcore.RayExecutor: a sweep run elsewhere equals the in-process
sweep exactly (the ``seconds`` column aside); jobs carry references, never live modules."""

from __future__ import annotations

import pandas as pd
import pytest

import qcore
from qcore.executors import ProcessExecutor, RayExecutor
from qcore.sweep import SWEEP_COLUMNS, SweepGrid, sweep

MODEL, DATA, CALIB = (qcore.ModelRef("digits-mlp"), qcore.DatasetRef("digits"),
                      qcore.DatasetRef("digits", "calib"))  # fmt: skip
# float rows, pruning, and activation rows (which calibrate on the calib split)
GRID = SweepGrid(bits=[2, 4, None], prune_rates=[0.0, 0.5], act_bits=[None, 8])


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"),
                                  check_exact=True)  # fmt: skip
    assert a.attrs == b.attrs


@pytest.fixture(scope="module")
def in_process() -> pd.DataFrame:
    # the model and data passed as live objects: the reference table
    return sweep(MODEL.load(), DATA.load(), GRID, calib=CALIB.load())


@pytest.fixture(scope="module")
def processes():
    with ProcessExecutor(workers=2) as ex:
        yield ex


def test_refs_in_process_equal_live_objects(in_process) -> None:
    _same(sweep(MODEL, DATA, GRID, calib=CALIB), in_process)
    assert list(in_process.columns) == list(SWEEP_COLUMNS)
    assert len(in_process) == len(GRID) == 12  # 3 bits (float included) x 2 rates x 2 act


def test_process_executor_equals_in_process(in_process, processes) -> None:
    calls: list[tuple[int, int]] = []
    df = sweep(MODEL, DATA, GRID, calib=CALIB, executor=processes,
               progress=lambda done, total, row: calls.append((done, total)))  # fmt: skip
    _same(df, in_process)
    assert calls == [(i, len(GRID)) for i in range(1, len(GRID) + 1)]
    assert (df["seconds"] > 0).all()
    # the pool is kept: a second sweep reuses the workers and their loaded models
    _same(sweep(MODEL, DATA, GRID, calib=CALIB, executor=processes), in_process)


def test_map_keeps_job_order_and_raises_a_jobs_error(processes) -> None:
    seen: list[int] = []
    out = processes.map(qcore.ModelRef.from_dict, [{"name": f"m{i}"} for i in range(5)],
                        lambda i, _r: seen.append(i))  # fmt: skip
    assert out == [qcore.ModelRef(f"m{i}") for i in range(5)]
    assert sorted(seen) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="needs a model name"):
        processes.map(qcore.ModelRef.from_dict, [{"name": "a"}, {"name": ""}])


def test_jobs_carry_references_not_modules(processes) -> None:
    with pytest.raises(ValueError, match="qcore.ModelRef and qcore.DatasetRef"):
        sweep(MODEL.load(), DATA, GRID, executor=processes)
    with pytest.raises(ValueError, match="qcore.ModelRef and qcore.DatasetRef"):
        sweep(MODEL, DATA.load(), GRID, executor=processes)
    session = qcore.ModelRef("up-" + "a" * 12, sha256="a" * 64)
    with pytest.raises(ValueError, match="a worker cannot load it by name"):
        sweep(session, DATA, GRID, executor=processes)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_sizes_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="whole number of at least 1"):
        ProcessExecutor(workers=bad)
    with pytest.raises(ValueError, match="whole number of at least 1"):
        RayExecutor(num_cpus=bad)


def test_ray_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="leave it out with an address"):
        RayExecutor(address="auto", num_cpus=2)
    with pytest.raises(ValueError, match="a cluster address"):
        RayExecutor(address="")
    assert repr(RayExecutor()) == "RayExecutor(address=None, num_cpus=None)"
    assert qcore.RayExecutor is RayExecutor and qcore.ProcessExecutor is ProcessExecutor


def test_ray_executor_equals_in_process(in_process) -> None:
    pytest.importorskip("ray")
    calls: list[int] = []
    with RayExecutor(num_cpus=2) as ex:
        df = sweep(MODEL, DATA, GRID, calib=CALIB, executor=ex,
                   progress=lambda done, total, row: calls.append(done))  # fmt: skip
    _same(df, in_process)
    assert calls == list(range(1, len(GRID) + 1))
