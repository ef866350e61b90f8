"""scripts/load_test.py's and scripts/upload_storm.py's bounds, tables and memory reading
(the runs themselves are scripts: the README gives their tables)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import qcore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import load_test  # noqa: E402
import upload_storm  # noqa: E402


def _own_mb() -> float:
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) / 1024


def test_rss_counts_the_process_and_its_children() -> None:
    assert load_test.rss_mb(os.getpid()) >= 0.9 * _own_mb() > 0
    child = subprocess.Popen([sys.executable, "-c", "print(1, flush=True); input()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "1\n"  # started and idle
        kid = load_test.rss_mb(child.pid)
        assert kid > 1
        assert load_test.rss_mb(os.getpid()) >= 0.9 * (_own_mb() + kid)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("argv", [["--users", "0"], ["--users", "51"], ["--seconds", "0"],
                                  ["--seconds", "601"]])  # fmt: skip
def test_bounds_are_refused_before_anything_starts(argv, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        load_test.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("--users takes counts from 1 to 50." in err) or ("--seconds is from 1 to 600." in err)


# --- scripts/upload_storm.py ---------------------------------------------------------------


@pytest.mark.parametrize(("argv", "said"), [
    (["--sessions", "0"], "--sessions is from 1 to 50."),
    (["--sessions", "51"], "--sessions is from 1 to 50."),
    (["--uploads", "-1"], "--uploads is from 0 to --sessions."),
    (["--sessions", "3", "--uploads", "4"], "--uploads is from 0 to --sessions."),
    (["--timeout", "9"], "--timeout is from 10 to 600 seconds."),
    (["--timeout", "601"], "--timeout is from 10 to 600 seconds."),
    (["--settle", "-1"], "--settle is from 0 to 120 seconds."),
    (["--app-dir", "/"], "/ has no app.py."),
])  # fmt: skip
def test_storm_bounds_are_refused_before_anything_starts(argv, said, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        upload_storm.main(argv)
    assert e.value.code == 2
    assert said in capsys.readouterr().err


def test_storm_defaults_are_the_audits_storm_on_this_checkout(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(upload_storm, "CHROMIUM", sys.executable)  # any file that exists
    args = upload_storm.parse_args([])
    assert (args.sessions, args.uploads, args.app_dir, args.model) == (15, 8, [ROOT],
                                                                       "mnist-cnn")  # fmt: skip
    (tmp_path / "app.py").write_text("")
    args = upload_storm.parse_args(["--app-dir", str(tmp_path), ".", "--sessions", "3",
                                    "--uploads", "3"])  # fmt: skip
    assert args.app_dir == [tmp_path.resolve(), Path.cwd().resolve()]


def test_storm_table() -> None:
    row = upload_storm.Row(
        checkout="/tmp/old (1dca3eb)", sessions=15, uploads=8, accepted=6, refused=1,
        exceptions=15, timeouts=0, tracebacks=14, rss_start=1234.4, rss_end=2345.6,
        seconds=201.2, refusals=Counter({"cannot be used as inputs to control flow": 1}),
        log_errors=Counter({"NameError": 14}),
    )  # fmt: skip
    new = upload_storm.Row("/work/new (abc)", 3, 2, 2, 0, 0, 0, 0, 900.0, 990.5, 71.0)
    assert upload_storm.table([row, new]).splitlines() == [
        "| checkout | sessions | uploads | accepted | refused | exception pages | timeouts "
        "| server tracebacks | rss start MB | rss end MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| /tmp/old (1dca3eb) | 15 | 8 | 6 | 1 | 15 | 0 | 14 | 1234 | 2346 |",
        "| /work/new (abc) | 3 | 2 | 2 | 0 | 0 | 0 | 0 | 900 | 990 |",
        "",
        "- /tmp/old (1dca3eb): 201 s; refusals: 1 x 'cannot be used as inputs to control "
        "flow'; exceptions in the server log: 14 NameError",
        "- /work/new (abc): 71 s; refusals: none; exceptions in the server log: none",
    ]


def test_storm_counts_the_server_logs_tracebacks() -> None:
    log = """  You can now view your Streamlit app in your browser.
2025-01-01 12:00:00.000 Uncaught app execution
Traceback (most recent call last):
  File "x.py", line 1, in <module>
NameError: module is not installed as a submodule
Traceback (most recent call last):
  File "y.py", line 2, in f
torch.fx.proxy.TraceError: symbolically traced variables cannot be used
Traceback (most recent call last):
NameError: again
"""
    assert upload_storm.server_errors(log) == (3, Counter({"NameError": 2,
                                                           "torch.fx.proxy.TraceError": 1}))
    assert upload_storm.server_errors("all fine\n") == (0, Counter())


def test_storm_names_a_checkout_by_its_commit(tmp_path) -> None:
    assert upload_storm.checkout_name(tmp_path) == str(tmp_path)  # not a git checkout
    name = upload_storm.checkout_name(ROOT)
    assert name.startswith(f"{ROOT} (") and name.endswith(")")


@pytest.mark.skipif("digits-mlp" not in qcore.list_models(), reason="sample models not trained")
def test_storm_uploads_are_valid_and_each_a_new_model(tmp_path) -> None:
    from qcore.upload import load_weights

    paths, arch, dataset = upload_storm.make_weights(tmp_path, "digits-mlp", 2)
    assert (arch, dataset) == ("mlp", "digits")
    names = {load_weights(p.read_bytes(), arch, dataset, filename=p.name).name for p in paths}
    assert len(names) == 2 and all(n.startswith("up-") for n in names)


@pytest.mark.parametrize(("argv", "said"), [
    (["--jobs", "0"], "--jobs: expected 1 to 10; got 0"),
    (["--gap", "-1"], "--gap: expected 0 to 60 seconds; got -1.0"),
    (["--read", "61"], "--read: expected 0 to 60 seconds; got 61.0"),
])  # fmt: skip
def test_start_bench_bounds_are_refused_before_anything_starts(argv, said, capsys) -> None:
    import bench_start

    with pytest.raises(SystemExit) as e:
        bench_start.main(argv)
    assert e.value.code == 2 and said in capsys.readouterr().err
