"""Command line: ``python -m qcore COMMAND [options]``.

Commands:
  list            the sample models and datasets
  evaluate        compress one model with one configuration and print what it did
  export          write the packed file of one configuration
  train-samples   retrain the sample models (the reproducible recipe)
  bench           time compress + evaluate against a float evaluation
  sweep           evaluate a grid of configurations into a CSV
  sensitivity     per-layer quantization and pruning sensitivity into a CSV
"""

from __future__ import annotations

import argparse
import math
import sys


def _compression_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--dataset", default=None, help="default: the model's own dataset")
    parser.add_argument("--bits", default="8", help="1..16, or 'float' for no quantization")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--clip-mode", default="ratio")
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--per-channel", action="store_true")
    parser.add_argument("--rounding", default="nearest")
    parser.add_argument("--prune", type=float, default=0.0)
    parser.add_argument("--structured", action="store_true")
    parser.add_argument("--scope", default="layer")
    parser.add_argument("--no-fold-bn", action="store_true")


def _config(args):
    from qcore.config import CompressionConfig, PruneConfig, QuantConfig

    quant = None
    if args.bits != "float":
        try:
            bits = int(args.bits)
        except ValueError:
            raise ValueError(f"--bits must be 1..16 or 'float'; got {args.bits!r}.") from None
        quant = QuantConfig(bits=bits, symmetric=not args.asymmetric, per_channel=args.per_channel,
                            clip=args.clip, clip_mode=args.clip_mode, rounding=args.rounding)
    prune = PruneConfig(rate=args.prune, structured=args.structured, scope=args.scope)
    return CompressionConfig(quant=quant, prune=prune if args.prune > 0 else None,
                             fold_bn=not args.no_fold_bn)


def _load(args):
    import qcore

    model = qcore.load_model(args.model)
    info = qcore.model_info(args.model)
    data = qcore.load_dataset(args.dataset or info.dataset, "test")
    qcore.check_fit(info, data)
    return model, data


def _cmd_list(argv: list[str]) -> int:
    import qcore

    argparse.ArgumentParser(prog="python -m qcore list").parse_args(argv)
    print("models:")
    for name in qcore.list_models():
        i = qcore.model_info(name)
        print(f"  {name:<16} {i.arch:<9} on {i.dataset:<9} {i.params:>8,} params  "
              f"float test accuracy {i.float_accuracy:.4f}")
    print("datasets:")
    for name in qcore.list_datasets():
        d = qcore.dataset_info(name)
        print(f"  {name:<14} {d.description}")
    return 0


def _cmd_evaluate(argv: list[str]) -> int:
    import qcore

    parser = argparse.ArgumentParser(prog="python -m qcore evaluate")
    _compression_args(parser)
    args = parser.parse_args(argv)
    cfg = _config(args)
    model, data = _load(args)
    base = qcore.evaluate(model, data)
    c = qcore.compress(model, cfg)
    m = qcore.evaluate(c.model, data)
    print(f"float accuracy      {base.accuracy:.4f}")
    print(f"simulated accuracy  {m.accuracy:.4f} ({m.accuracy - base.accuracy:+.4f}), "
          f"agreement with float {qcore.agreement(base, m):.4f}")
    print(f"packed size         {c.size_bytes:,} B of {c.float_size_bytes:,} B float "
          f"({c.ratio:.2f}x smaller)")
    print(f"sparsity            {c.sparsity:.4f}; mean SQNR {c.mean_sqnr_db:.2f} dB")
    for s in c.layers:
        sq = f"{s.sqnr_db:6.1f}" if math.isfinite(s.sqnr_db) else "   inf"
        print(f"  {s.name:<22} {str(s.shape):<18} {s.bits:>2} bits  sparsity {s.sparsity:.3f}  "
              f"SQNR {sq} dB  {s.size_bytes:>9,} B ({s.encoding})")
    return 0


def _cmd_export(argv: list[str]) -> int:
    import qcore

    parser = argparse.ArgumentParser(prog="python -m qcore export")
    _compression_args(parser)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    model, _ = _load(args)
    c = qcore.compress(model, _config(args))
    n = qcore.export_packed(c, args.out)
    print(f"wrote {args.out}: {n:,} bytes ({c.size_bytes:,} packed + {n - c.size_bytes:,} header)")
    return 0


def _cmd_train_samples(argv: list[str]) -> int:
    from qcore.train import main_train_samples

    return main_train_samples(argv)


def _cmd_bench(argv: list[str]) -> int:
    from qcore.bench import main_bench

    return main_bench(argv)


def _cmd_sweep(argv: list[str]) -> int:
    from qcore.cli_analysis import main_sweep

    return main_sweep(argv)


def _cmd_sensitivity(argv: list[str]) -> int:
    from qcore.cli_analysis import main_sensitivity

    return main_sensitivity(argv)


COMMANDS = {
    "list": _cmd_list,
    "evaluate": _cmd_evaluate,
    "export": _cmd_export,
    "train-samples": _cmd_train_samples,
    "bench": _cmd_bench,
    "sweep": _cmd_sweep,
    "sensitivity": _cmd_sensitivity,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ValueError as exc:  # a user mistake: one sentence, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
