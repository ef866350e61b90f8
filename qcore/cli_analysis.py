"""Command lines for sweeps and sensitivity: ``python -m qcore sweep|sensitivity ...``.

Both write a CSV (``--out``), draw a text progress bar on stderr, and on bad input print
one sentence and return exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from qcore.config import CLIP_MODES, PruneConfig, QuantConfig
from qcore.data import load_dataset
from qcore.models import check_fit, load_model, model_info
from qcore.sensitivity import DEFAULT_BITS, DEFAULT_PRUNE_RATES, layer_sensitivity
from qcore.sweep import SweepGrid, sweep

__all__ = ["main_sweep", "main_sensitivity", "ProgressBar"]

FLOAT_WORDS = ("float", "none", "fp32")


class ProgressBar:
    """A one-line text progress bar: ``label [#####.....] 5/10``, redrawn with ``\\r``."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width

    def __call__(self, done: int, total: int, row: dict) -> None:
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if done >= total else ""
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total}{end}")
        self.stream.flush()


def _bits_arg(text: str) -> int | None:
    if text.lower() in FLOAT_WORDS:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bit widths are whole numbers from 1 to 16 (or 'float'); got {text!r}"
        ) from None


def _float_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="sample model name, e.g. mnist-cnn")
    parser.add_argument("--dataset", help="dataset name (default: the model's own)")
    parser.add_argument("--split", default="test", choices=("test", "calib", "train"),
                        help="split to evaluate on (default: test)")
    parser.add_argument("--clip-mode", default="ratio", choices=CLIP_MODES,
                        help="how --clip is read (default: ratio of max|w|)")
    parser.add_argument("--per-channel", action="store_true",
                        help="one scale per output channel instead of per tensor")
    parser.add_argument("--asymmetric", action="store_true",
                        help="asymmetric codes with a zero point instead of symmetric")
    parser.add_argument("--structured", action="store_true",
                        help="prune whole output channels instead of single weights")
    parser.add_argument("--out", required=True, help="CSV file to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return int(exc.code or 0)


def _load(args: argparse.Namespace):
    model = load_model(args.model)
    dataset = load_dataset(args.dataset or model_info(args.model).dataset, args.split)
    check_fit(model, dataset)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ValueError(f"The folder {str(out.parent)!r} for --out does not exist.")
    return model, dataset, out


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main_sweep(argv: list[str]) -> int:
    """``python -m qcore sweep``: one CSV row per configuration of the grid."""
    parser = argparse.ArgumentParser(
        prog="python -m qcore sweep",
        description="Compress a sample model at every combination of the settings given "
        "and write accuracy, loss, packed size, ratio, sparsity and SQNR per combination.",
    )
    parser.add_argument("--bits", nargs="+", type=_bits_arg, default=[2, 3, 4, 6, 8],
                        help="bit widths; 'float' adds unquantized rows (default: 2 3 4 6 8)")
    parser.add_argument("--prune", nargs="+", type=_float_arg, default=[0.0],
                        help="pruning rates in [0, 1) (default: 0)")
    parser.add_argument("--clip", nargs="+", type=_float_arg, default=[1.0],
                        help="clip values, read as --clip-mode says (default: 1.0)")
    _common(parser)
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    try:
        model, dataset, out = _load(args)
        grid = SweepGrid(
            bits=args.bits, prune_rates=args.prune, clips=args.clip, clip_mode=args.clip_mode,
            symmetric=(not args.asymmetric,), per_channel=(args.per_channel,),
            structured=args.structured,
        )
        progress = None if args.quiet else ProgressBar("sweep")
        df = sweep(model, dataset, grid, progress=progress)
    except ValueError as exc:
        return _fail(str(exc))
    df.to_csv(out, index=False)
    print(f"Wrote {len(df)} rows to {out}.", file=sys.stderr)
    return 0


def main_sensitivity(argv: list[str]) -> int:
    """``python -m qcore sensitivity``: accuracy with one layer at a time compressed."""
    parser = argparse.ArgumentParser(
        prog="python -m qcore sensitivity",
        description="For each layer alone, the accuracy when it is quantized at each bit "
        "width or pruned at each rate (everything else float), with its SQNR.",
    )
    parser.add_argument("--bits", nargs="*", type=int, default=list(DEFAULT_BITS),
                        help="bit widths (default: 2 to 8)")
    parser.add_argument("--prune", nargs="*", type=_float_arg, default=list(DEFAULT_PRUNE_RATES),
                        help="pruning rates in [0, 1) (default: 0.25 0.5 0.75 0.9)")
    parser.add_argument("--clip", type=_float_arg, default=1.0,
                        help="clip value, read as --clip-mode says (default: 1.0)")
    parser.add_argument("--naive", action="store_true",
                        help="recompute the whole model per row (slower, same numbers)")
    _common(parser)
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    try:
        model, dataset, out = _load(args)
        quant = QuantConfig(symmetric=not args.asymmetric, per_channel=args.per_channel,
                            clip=args.clip, clip_mode=args.clip_mode)
        prune = PruneConfig(structured=args.structured)
        progress = None if args.quiet else ProgressBar("sensitivity")
        df = layer_sensitivity(model, dataset, bits=args.bits, prune_rates=args.prune,
                               quant=quant, prune=prune, naive=args.naive, progress=progress)
    except ValueError as exc:
        return _fail(str(exc))
    df.to_csv(out, index=False)
    print(f"Wrote {len(df)} rows to {out} ({df.attrs['method']} method, "
          f"{df.attrs['seconds']:.1f} s).", file=sys.stderr)
    return 0
