"""scripts/load_test.py's bounds and its memory reading (the run itself is a script: the
README gives its table)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import load_test  # noqa: E402


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
