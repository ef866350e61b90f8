"""qcore.ProcessExecutor and qcore.RayExecutor: a sweep run elsewhere equals the in-process
sweep exactly (the ``seconds`` column aside); jobs carry references, never live modules."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

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


# --- the other grids: one job per layer (sensitivity), per strength (robustness) ----------------


def _drop_seconds(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k != "seconds"}


def test_layer_sensitivity_on_processes_equals_in_process(processes) -> None:
    kw = dict(bits=(2, 4), prune_rates=(0.5,), act_bits=(4,))
    ref = qcore.layer_sensitivity(MODEL.load(), DATA.load(), calib=CALIB.load(), **kw)
    calls: list[tuple[int, int]] = []
    df = qcore.layer_sensitivity(MODEL, DATA, calib=CALIB, executor=processes, **kw,
                                 progress=lambda d, t, _r: calls.append((d, t)))  # fmt: skip
    pd.testing.assert_frame_equal(df, ref, check_exact=True)
    assert _drop_seconds(df.attrs) == _drop_seconds(ref.attrs) and df.attrs["method"] == "cached"
    assert calls == [(i, len(ref)) for i in range(1, len(ref) + 1)]
    # activation rows only: the float metrics come from the model itself, as in process
    only_act = dict(bits=(), prune_rates=(), act_bits=(8,), calib=CALIB)
    pd.testing.assert_frame_equal(
        qcore.layer_sensitivity(MODEL, DATA, executor=processes, **only_act),
        qcore.layer_sensitivity(MODEL, DATA, **only_act), check_exact=True)  # fmt: skip


@pytest.mark.parametrize("perturbation, strengths, quantized", [
    ("fgsm", [0, 0.05, 0.1], True), ("bitflip", [0, 0.001], True),
    ("weight_noise", [0, 0.2], False)])  # fmt: skip
def test_robustness_on_processes_equals_in_process(processes, perturbation, strengths,
                                                   quantized) -> None:  # fmt: skip
    config = qcore.Settings(bits=4).to_config() if quantized else None
    ref = qcore.robustness(MODEL.load(), DATA.load(), perturbation, strengths, config=config)
    df = qcore.robustness(MODEL, DATA, perturbation, strengths, config=config,
                          executor=processes)  # fmt: skip
    pd.testing.assert_frame_equal(df, ref, check_exact=True)
    assert df.attrs == ref.attrs


def test_mixed_precisions_sensitivity_pass_on_processes(processes) -> None:
    small = qcore.compress(MODEL.load(), qcore.Settings(bits=2).to_config()).size_bytes
    kw = dict(budget_bytes=small + 1500, candidate_bits=(2, 4, 8))
    ref = qcore.mixed_precision(MODEL.load(), DATA.load(), search_dataset=CALIB.load(), **kw)
    res = qcore.mixed_precision(MODEL, DATA, search_dataset=CALIB, executor=processes, **kw)
    assert res == ref


def test_a_session_model_travels_as_its_hash_and_bytes(processes) -> None:
    from qcore.executors import pack_model, unpack_model
    from qcore.finetune import float_module
    from qcore.models import build_model
    from qcore.refs import UPLOAD_PREFIX, session_model_name, state_sha256

    live = MODEL.load()
    sha = state_sha256(live)
    ref = qcore.ModelRef(session_model_name(sha, UPLOAD_PREFIX), sha256=sha)
    data = pack_model(live)
    df = sweep(ref, DATA, GRID, calib=CALIB, executor=processes, model_bytes=data)
    _same(df, sweep(live, DATA.load(), GRID, calib=CALIB.load()))
    # bytes that are not of the model the hash names are refused with a sentence
    other = build_model("mlp", (1, 8, 8), 10)
    sha_other = state_sha256(other)
    wrong = qcore.ModelRef(session_model_name(sha_other, UPLOAD_PREFIX), sha256=sha_other)
    with pytest.raises(ValueError, match="do not match its SHA-256"):
        sweep(wrong, DATA, GRID, calib=CALIB, executor=processes, model_bytes=data)
    # a model fine-tuned with BatchNorm folded has another structure: rebuilt all the same
    cnn = build_model("cnn", (1, 8, 8), 10)
    cnn.qcore_spec = {"name": "x", "arch": "cnn", "input_shape": [1, 8, 8], "num_classes": 10}
    folded = float_module(cnn, {}, fold_bn=True)
    back = unpack_model(pack_model(folded), state_sha256(folded))
    assert state_sha256(back) == state_sha256(folded) and back.qcore_spec == cnn.qcore_spec
    with pytest.raises(ValueError, match="does not record its architecture"):
        pack_model(torch.nn.Linear(2, 2))
