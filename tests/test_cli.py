"""The command line: python -m qcore ..."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qcore
from qcore import cli
from qcore.bench import BENCH_CONFIGS
from qcore.cli import main
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
    model = qcore.load_packed(out_file).model
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
    for label in BENCH_CONFIGS:
        assert label in out.stdout
    assert "ratio to float eval" in out.stdout


def _run_fails(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """``main(argv)`` exits 2 with one ``error:`` line on stderr naming ``words``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err
    return err


@pytest.mark.parametrize("command", ["export", "sweep", "sensitivity"])
def test_out_path_checked_before_any_work(command, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(cli, "load_model", no_loading)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (tmp_path / "missing" / "x.out", "does not exist"),
        (tmp_path, "is a folder"),
        (a_file / "x.out", "is a file, not a folder"),
        (tmp_path / "missing" / "deeper" / "x.out", "does not exist"),
    ]
    for out, words in cases:
        _run_fails([command, "--model", "digits-mlp", "--out", str(out)], capsys, "--out", words)
    _run_fails([command, "--model", "digits-mlp", "--out", ""], capsys, "--out", "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_unwritable_folder_is_refused(tmp_path, capsys, monkeypatch):
    # tests run as root, which may write anywhere: pretend the folder is read-only
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != tmp_path)
    _run_fails(["sweep", "--model", "digits-mlp", "--out", str(tmp_path / "x.csv")], capsys,
               "not writable")


def test_write_failure_after_the_check_is_one_sentence(tmp_path, capsys, monkeypatch):
    def full_disk(compressed, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "export_packed", full_disk)
    _run_fails(["export", "--model", "digits-mlp", "--out", str(tmp_path / "m.qpk")], capsys,
               "No space left on device")


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["evaluate", "--bits", "\u0664"], "--bits"),  # Arabic-Indic four
        (["evaluate", "--bits", "\uff18"], "--bits"),  # fullwidth eight
        (["evaluate", "--clip", "0.\u0665"], "--clip"),
        (["evaluate", "--prune", "0.\u0665"], "--prune"),
        (["export", "--bits", "\u0664", "--out", "m.qpk"], "--bits"),
        (["sweep", "--bits", "2", "\u0664", "--out", "x.csv"], "--bits"),
        (["sensitivity", "--bits", "\u0664", "--out", "x.csv"], "--bits"),
        (["bench", "--repeats", "\u0663"], "--repeats"),
    ],
)
def test_non_ascii_digits_are_refused(argv, option, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda name: pytest.fail("loaded a model"))
    command, *rest = argv
    _run_fails([command, "--model" + ("s" if command == "bench" else ""), "digits-mlp", *rest],
               capsys, f"{option}", "got")


def test_per_layer_bits(capsys):
    assert main(["evaluate", "--model", "digits-mlp", "--bits", "8", "--layer-bits", "fc1:3"]) == 0
    out = capsys.readouterr().out
    q = qcore.QuantConfig(bits=8, layer_bits={"fc1": 3})
    c = qcore.compress(qcore.load_model("digits-mlp"), qcore.CompressionConfig(quant=q))
    assert f"packed size         {c.size_bytes:,} B" in out
    _run_fails(["evaluate", "--model", "digits-mlp", "--layer-bits", "nope:3"], capsys, "nope")
    _run_fails(["evaluate", "--model", "digits-mlp", "--layer-bits", "fc1:17"], capsys, "16")
    _run_fails(["evaluate", "--model", "digits-mlp", "--layer-bits", "fc1:\u0664"], capsys,
               "--layer-bits", "got")
    _run_fails(["evaluate", "--model", "digits-mlp", "--bits", "float", "--layer-bits", "fc1:3"],
               capsys, "--layer-bits")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["export", "--model", "nope", "--out", "OUT"], "nope"),
        (["export", "--model", "digits-mlp", "--bits", "0", "--out", "OUT"], "bits"),
        (["sweep", "--model", "digits-mlp", "--bits", "17", "--out", "OUT"], "bits"),
        (["sensitivity", "--model", "nope", "--out", "OUT"], "nope"),
        (["sensitivity", "--model", "digits-mlp", "--bits", "0", "--out", "OUT"], "bits"),
        (["train-samples", "--only", "nope"], "nope"),
    ],
)
def test_value_errors_are_one_line_and_write_nothing(argv, words, tmp_path, capsys):
    out = tmp_path / "x.out"
    _run_fails([str(out) if a == "OUT" else a for a in argv], capsys, words)
    assert not out.exists()


def test_activation_and_fixed_point_options(tmp_path, capsys):
    argv = ["--model", "digits-mlp", "--bits", "4", "--abits", "6", "--aobs", "percentile",
            "--scale", "pow2"]
    assert main(["evaluate", *argv]) == 0
    out = capsys.readouterr().out
    cfg = qcore.Settings(bits=4, abits=6, aobs="percentile", scale="pow2").to_config()
    calib = qcore.load_dataset("digits", "calib")  # activations calibrate on calib, not test
    c = qcore.compress(qcore.load_model("digits-mlp"), cfg, calib=calib)
    m = qcore.evaluate(c.model, qcore.load_dataset("digits", "test"))
    assert f"simulated accuracy  {m.accuracy:.4f}" in out
    assert main(["export", *argv, "--out", str(tmp_path / "a.qpk")]) == 0
    assert qcore.load_packed(tmp_path / "a.qpk").config == cfg
    _run_fails(["evaluate", "--model", "digits-mlp", "--abits", "1"], capsys, "2 bits")
    _run_fails(["evaluate", "--model", "digits-mlp", "--aobs", "kl"], capsys, "--aobs", "minmax")


# --- the command line run as a user runs it: a process, its exit code, its stderr -----------


def _qcore(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qcore", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


CARELESS = [
    # devices and pipes are never read: /dev/zero read until memory ran out, a FIFO hung
    (["evaluate", "--model", "digits-mlp", "--weights", "/dev/zero"],
     "error: '/dev/zero' is not a regular file; give the path of a file.\n"),
    (["evaluate", "--model", "digits-mlp", "--data", "/dev/zero"],
     "error: '/dev/zero' is not a regular file; give the path of a file.\n"),
    (["evaluate", "--model", "digits-mlp", "--weights", "FIFO"], "is not a regular file"),
    # a folder for train-samples that is no folder, or no name at all, before 125 s of work
    (["train-samples", "--out", "/dev/full"], "argument --out: '/dev/full' is not a folder"),
    (["train-samples", "--out", ""], "argument --out: the path is empty; give a folder"),
    # values a link refuses are refused here too
    (["evaluate", "--model", "digits-mlp", "--prune", "-0.5"],
     "argument --prune: expected a pruning rate from 0 to 0.99; got '-0.5'"),
    (["evaluate", "--model", "digits-mlp", "--scope", "bogus"],
     "argument --scope: invalid choice: 'bogus'"),
    (["robustness", "--model", "digits-mlp", "--seed", "-1"],
     "argument --seed: expected a seed from 0 to 4294967295; got '-1'"),
    (["bench", "--finetune", "--lr", "0.0\u0665"],
     "argument --lr: Expected a finite number; got '0.0\u0665'."),
    (["bench", "--models", "nope"], "unknown model(s) 'nope'; the sample models are"),
    (["frobnicate"], "unknown command 'frobnicate'; the commands are list, evaluate,"),
]  # fmt: skip


@pytest.fixture(scope="module")
def careless_runs(tmp_path_factory) -> list:
    """Every CARELESS command line run as a user runs it, each in its own empty folder,
    three processes at a time (each spends seconds importing torch): a list, in CARELESS's
    order, of (the finished process or the exception that ended the run, its folder)."""
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("careless")
    fifo = base / "fifo"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it for reading would wait forever

    def run(i: int) -> tuple:
        work = base / f"work{i}"
        work.mkdir()
        argv = [str(fifo) if a == "FIFO" else a for a in CARELESS[i][0]]
        try:
            return _qcore(argv, cwd=work), work
        except subprocess.TimeoutExpired as e:  # a hang fails that command line's test
            return e, work

    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(run, range(len(CARELESS))))


@pytest.mark.parametrize("i", range(len(CARELESS)),
                         ids=[f"argv{i}" for i in range(len(CARELESS))])  # fmt: skip
def test_careless_command_lines_end_in_one_error_line(careless_runs, i: int) -> None:
    out, work = careless_runs[i]
    words = CARELESS[i][1]
    assert isinstance(out, subprocess.CompletedProcess), out
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert words in out.stderr and "Traceback" not in out.stderr
    assert list(work.iterdir()) == []  # nothing written where the command ran


def test_a_user_file_is_read_to_the_cap_and_one_byte_at_most(tmp_path, monkeypatch) -> None:
    import qcore.upload

    big = tmp_path / "w.pt"
    big.write_bytes(b"\0" * 1000)
    monkeypatch.setattr(qcore.upload, "MAX_UPLOAD_BYTES", 999)
    with pytest.raises(ValueError, match="is 1,000 bytes; weights files are capped at 999"):
        cli._read_upload(big, "weights files")


def test_bench_does_not_import_the_command_line() -> None:
    # qcore.cli imports qcore.bench for `bench` and `deep`; bench takes its parser from
    # qcore.args, so the two modules no longer import each other
    import ast

    tree = ast.parse((ROOT / "qcore" / "bench.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "qcore.cli" not in imported and "qcore.args" in imported


def test_deploy_prints_the_runtime_rows_and_writes_the_onnx_files(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = ["deploy", "--model", "digits-mlp", "--bits", "8", "--abits", "8", "--out", str(out),
            "--seconds", "0.01"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    model, test = qcore.load_model("digits-mlp"), qcore.load_dataset("digits", "test")
    calib = qcore.load_dataset("digits", "calib")
    c = qcore.compress(model, qcore.Settings(bits=8, abits=8).to_config(), calib=calib)
    sim = qcore.evaluate(c.model, test)
    real = qcore.run_onnx(out, test)
    rows = {line.split("  ")[0].strip(): line for line in text.splitlines()}
    assert set(rows) >= {"float PyTorch", "float ONNX Runtime", "int8 ONNX Runtime (W8A8)",
                         "simulated W8A8 (PyTorch fake-quant)"}
    int8 = rows["int8 ONNX Runtime (W8A8)"].split()
    assert int8[4] == f"{real.accuracy:.4f}"  # accuracy, then agreement with float and sim
    assert int8[6] == f"{qcore.agreement(real, sim):.4f}"
    assert int8[-1] == f"{out.stat().st_size:,}"
    assert rows["float PyTorch"].split()[2] == f"{qcore.evaluate(model, test).accuracy:.4f}"
    assert "batch 1 " in text and "batch 256" in text
    assert "1 of 2 layers ran ONNX Runtime integer kernels: fc1." in text
    assert qcore.cpu_int8().sentence() in text
    assert (tmp_path / "m.float.onnx").is_file()
    _run_fails(["deploy", "--model", "digits-mlp", "--out", str(out), "--seconds", "0"],
               capsys, "--seconds")
