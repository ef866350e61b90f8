"""The command line: python -m qcore ..."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qcore
from qcore.__main__ import main
from qcore.export import read_header

ROOT = Path(__file__).resolve().parent.parent


def test_list_prints_every_model_and_dataset(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in qcore.list_models() + qcore.list_datasets():
        assert name in out
    info = qcore.model_info("mnist-cnn")
    assert f"{info.float_accuracy:.4f}" in out


def test_evaluate_prints_the_same_numbers_as_the_api(capsys):
    assert main(["evaluate", "--model", "digits-mlp", "--bits", "4", "--prune", "0.5"]) == 0
    out = capsys.readouterr().out
    cfg = qcore.CompressionConfig(quant=qcore.QuantConfig(bits=4), prune=qcore.PruneConfig(0.5))
    c = qcore.compress(qcore.load_model("digits-mlp"), cfg)
    m = qcore.evaluate(c.model, qcore.load_dataset("digits", "test"))
    assert f"simulated accuracy  {m.accuracy:.4f}" in out
    assert f"packed size         {c.size_bytes:,} B" in out


def test_export_writes_a_file_that_loads(tmp_path, capsys):
    out_file = tmp_path / "m.qpk"
    assert main(["export", "--model", "digits-mlp", "--bits", "3", "--out", str(out_file)]) == 0
    header = read_header(out_file)
    assert header["config"]["quant"]["bits"] == 3
    model = qcore.load_packed(out_file)
    c = qcore.compress(
        qcore.load_model("digits-mlp"), qcore.CompressionConfig(quant=qcore.QuantConfig(bits=3))
    )
    x = qcore.load_dataset("digits", "test").x[:50]
    assert torch.equal(model(x), c.model(x))
    assert f"{c.size_bytes:,} packed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--model", "nope"], "nope"),
        (["evaluate", "--model", "digits-mlp", "--bits", "0"], "bits"),
        (["evaluate", "--model", "digits-mlp", "--bits", "four"], "--bits"),
        (["evaluate", "--model", "digits-mlp", "--prune", "1.5"], "pruning rate"),
        (["evaluate", "--model", "mnist-cnn", "--dataset", "digits"], "28x28"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_unknown_command_prints_help():
    assert main(["frobnicate"]) == 2


def test_module_entry_point_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "qcore", "list"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    assert "mnist-cnn" in out.stdout


def test_bench_prints_timings_for_a_model():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "qcore", "bench", "--models", "digits-mlp", "--repeats", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=300,
    )
    assert "digits-mlp: float evaluation on 359 test images" in out.stdout
    for label in qcore.bench.BENCH_CONFIGS:
        assert label in out.stdout
    assert "ratio to float eval" in out.stdout
