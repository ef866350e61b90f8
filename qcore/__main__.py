"""``python -m qcore``: the command line lives in :mod:`qcore.cli`."""

from qcore.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
