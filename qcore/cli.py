"""Command line: ``python -m qcore COMMAND [options]``.

Commands:
  list            the sample models and datasets
  evaluate        compress one model with one configuration and print what it did
  export          write the packed file of one configuration
  train-samples   retrain the sample models (the reproducible recipe)
  bench           time compress + evaluate against a float evaluation
  sweep           evaluate a grid of configurations into a CSV
  sensitivity     per-layer quantization and pruning sensitivity into a CSV
  robustness      accuracy under input noise, FGSM / PGD, weight noise or bit flips
  finetune        quantization-aware fine-tuning, then write the packed file
  deep            Deep Compression (prune, share weights, Huffman), then write the file
  deploy          export to ONNX (QDQ int8) and compare PyTorch and ONNX Runtime
  analyze         why a setting loses accuracy: weights or activations, which layer
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO, TypeVar

from torch import nn

from qcore.args import (
    Parser,
    bits_arg,
    natural,
    number_arg,
    positive,
    rate_arg,
    seed_arg,
    whole_number,
)
from qcore.compress import compress
from qcore.config import (
    ACT_OBSERVERS,
    CLIP_MODES,
    CODEBOOKS,
    ENTROPY_CODINGS,
    MAX_PRUNE,
    ROUNDINGS,
    SCALE_MODES,
    SCOPES,
    CompressionConfig,
    PruneConfig,
    QuantConfig,
    Settings,
    parse_layer_bits,
)
from qcore.data import (
    Dataset,
    DatasetInfo,
    DatasetNotFound,
    dataset_info,
    list_datasets,
    load_dataset,
)
from qcore.evaluate import agreement, evaluate
from qcore.export import export_packed
from qcore.fold import weight_layers
from qcore.models import SAMPLE_DIR, check_fit, list_models, load_model, model_info
from qcore.robustness import PERTURBATIONS, robustness
from qcore.sensitivity import DEFAULT_BITS, DEFAULT_PRUNE_RATES, layer_sensitivity
from qcore.sweep import SweepGrid, sweep

__all__ = [
    "COMMANDS", "Parser", "ProgressBar", "main", "main_sensitivity", "main_sweep", "whole_number",
    "main_finetune",
]

T = TypeVar("T")


def _out_dir_arg(text: str) -> Path:
    """An output folder, checked before any work: named, a folder (or one that can be made
    inside an existing folder), writable."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty; give a folder")
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    folder = out if out.exists() else out.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"the folder {str(folder)!r} is not writable")
    return out


def _out_arg(text: str) -> Path:
    """An output file, checked before any work: its folder exists and takes a new file."""
    out = Path(text)
    folder = out.parent
    if not text:
        raise argparse.ArgumentTypeError("the path is empty; give a file name")
    if out.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name inside it")
    if not folder.exists():
        raise argparse.ArgumentTypeError(f"the folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"the folder {str(folder)!r} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not writable")
    return out


# ---------------------------------------------------------------------------------------------
# Running a command: every mistake a user can make ends as one line on stderr and exit 2.


def _fail(message: str) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 2


def _run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
         argv: list[str]) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return int(exc.code or 0)
    try:
        return body(args)
    except DatasetNotFound as exc:  # on the user's own machine: say where it looked
        return _fail(f"{exc} (It looked in {str(exc.folder)!r}.)")
    except ValueError as exc:  # a user mistake: one sentence, no traceback
        return _fail(str(exc))


def _write(out: Path, write: Callable[[Path], T]) -> T:
    """``write(out)``, with a failure of the file system as a ValueError sentence."""
    try:
        return write(out)
    except OSError as exc:
        raise ValueError(f"Could not write {str(out)!r}: {exc.strerror or exc}.") from exc


def _load(args: argparse.Namespace, split: str = "test") -> tuple[nn.Module, Dataset]:
    """The model and the split, after checking from the records that they fit: ``--model``
    (or ``--weights`` for its architecture) on ``--dataset`` (or the ``--data`` file)."""
    info = model_info(args.model)
    target = _data_info(args)
    if args.weights is not None:
        return _own_model(args.weights, info.arch, target), _split(args, split)
    check_fit(info, target)
    return load_model(args.model), _split(args, split)


def _data_info(args: argparse.Namespace) -> DatasetInfo:
    """What ``--data`` or ``--dataset`` (default: the model's own) holds, without its data."""
    if getattr(args, "data", None) is not None:
        if args.dataset:
            raise ValueError("Give --dataset or --data, not both.")
        return _own_data(args.data).info
    return dataset_info(args.dataset or model_info(args.model).dataset)


def _split(args: argparse.Namespace, split: str) -> Dataset:
    if getattr(args, "data", None) is not None:
        return _own_data(args.data).splits[split]
    return load_dataset(args.dataset or model_info(args.model).dataset, split)


_OWN_DATA: dict[Path, Any] = {}  # --data files read in this process, by path


def _own_data(path: Path) -> Any:
    """A .npz file of images and labels, read by :func:`qcore.userdata.load_npz`."""
    from qcore.userdata import load_npz

    if path not in _OWN_DATA:
        _OWN_DATA[path] = load_npz(_read_upload(path, "data files"), filename=path.name)
    return _OWN_DATA[path]


def _own_model(path: Path, arch: str, dataset: str | DatasetInfo) -> nn.Module:
    """A weights file (safetensors or torch.save) read by :mod:`qcore.upload`'s checks."""
    from qcore.upload import load_weights

    data = _read_upload(path, "weights files")
    return load_weights(data, arch, dataset, filename=path.name).module


def _read_upload(path: Path, what: str) -> bytes:
    """The bytes of a user's file: a regular file only (a device or a FIFO could be endless
    or never end), its size checked against the upload cap before reading and at most the
    cap and one byte read."""
    from qcore.upload import MAX_UPLOAD_BYTES, check_size

    label = repr(str(path))
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # before open(): a FIFO blocks there
            raise ValueError(f"{label} is not a regular file; give the path of a file.")
        check_size(path.stat().st_size, label, what)
        with path.open("rb") as f:
            data = f.read(MAX_UPLOAD_BYTES + 1)  # the file may grow after the check
    except OSError as exc:
        raise ValueError(f"Could not read {label}: {exc.strerror or exc}.") from exc
    check_size(len(data), label, what)
    return data


class ProgressBar:
    """A one-line text progress bar: ``label [#####.....] 5/10``, redrawn with ``\\r``."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label, self.stream, self.width = label, stream or sys.stderr, width

    def __call__(self, done: int, total: int, row: dict) -> None:
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if done >= total else ""
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total}{end}")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------
# list, evaluate, export, train-samples


def _list_parser() -> argparse.ArgumentParser:
    return Parser(prog="python -m qcore list")


def _list(args: argparse.Namespace) -> int:
    print("models:")
    for name in list_models():
        i = model_info(name)
        print(f"  {name:<16} {i.arch:<9} on {i.dataset:<9} {i.params:>8,} params  "
              f"float test accuracy {i.float_accuracy:.4f}")
    print("datasets:")
    for name in list_datasets():
        print(f"  {name:<14} {dataset_info(name).description}")
    return 0


def _weights_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, default=None, metavar="FILE",
                        help="your own trained weights (safetensors or torch.save state dict) "
                        "for --model's architecture on --dataset's inputs and classes")
    parser.add_argument("--data", type=Path, default=None, metavar="FILE",
                        help="your own images and labels (.npz with x and y) instead of "
                        "--dataset, split 70/10/20 into train, calib and test")


def _compression_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--dataset", default=None, help="default: the model's own dataset")
    _weights_arg(parser)
    parser.add_argument("--bits", type=bits_arg, default=8,
                        help="1..16, or 'float' for no quantization")
    parser.add_argument("--layer-bits", default="", metavar="LAYER:BITS,...",
                        help="bit widths for single layers, e.g. fc1:4,fc2:8")
    parser.add_argument("--clip", type=number_arg, default=1.0)
    parser.add_argument("--clip-mode", default="ratio", choices=CLIP_MODES)
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--per-channel", action="store_true")
    parser.add_argument("--rounding", default="nearest", choices=ROUNDINGS,
                        help="nearest, stochastic, or adaround (learnt on the calib split)")
    parser.add_argument("--prune", type=rate_arg, default=0.0,
                        help=f"pruning rate from 0 to {MAX_PRUNE:g}")
    parser.add_argument("--structured", action="store_true")
    parser.add_argument("--scope", default="layer", choices=SCOPES)
    parser.add_argument("--no-fold-bn", action="store_true")
    parser.add_argument("--abits", type=bits_arg, default=None,
                        help="activation bits 2..16 (calibrated on the calib split); "
                             "default float")
    parser.add_argument("--aobs", default="minmax", choices=ACT_OBSERVERS,
                        help="activation observer (range policy)")
    parser.add_argument("--scale", default="float", choices=SCALE_MODES,
                        help="'pow2' for power-of-two (fixed-point) scales")
    parser.add_argument("--codebook", default="uniform", choices=CODEBOOKS,
                        help="'kmeans' for 2^bits shared weights per layer (k-means codebook)")
    parser.add_argument("--entropy", default="none", choices=ENTROPY_CODINGS,
                        help="'huffman' to Huffman code the weight codes and sparse index")
    parser.add_argument("--drop", default="", metavar="BLOCK,...",
                        help="blocks to remove (run as the identity), e.g. layer1")
    parser.add_argument("--equalize", action="store_true",
                        help="cross-layer equalization before quantizing (float function kept)")
    parser.add_argument("--bias-correction", action="store_true",
                        help="subtract each layer's mean output shift, measured on the calib "
                             "split, from its bias")


def _config(args: argparse.Namespace, model: nn.Module) -> CompressionConfig:
    """The config through the flat settings a link uses, so both read the same."""
    layer_bits: tuple[tuple[str, int], ...] = ()
    if args.layer_bits:
        if args.bits is None:
            raise ValueError("--layer-bits needs quantization; give --bits a width, not 'float'.")
        try:
            layer_bits = parse_layer_bits(args.layer_bits, list(weight_layers(model)))
        except ValueError as exc:
            raise ValueError(f"--layer-bits: {exc}") from None
    return Settings(
        bits=args.bits, clip=args.clip, clip_mode=args.clip_mode, prune=args.prune,
        symmetric=not args.asymmetric, per_channel=args.per_channel, rounding=args.rounding,
        structured=args.structured, scope=args.scope, fold_bn=not args.no_fold_bn,
        layer_bits=layer_bits, abits=args.abits, aobs=args.aobs, scale=args.scale,
        codebook=args.codebook, entropy=args.entropy,
        drop=tuple(n.strip() for n in args.drop.split(",") if n.strip()),
        equalize=args.equalize, bias_correction=args.bias_correction,
    ).to_config()


def _calib(args: argparse.Namespace, cfg: CompressionConfig) -> Dataset | None:
    """The calibration split, when activations are quantized, biases corrected or rounding
    learnt (never the test split)."""
    q = cfg.quant
    adaround = q is not None and q.rounding == "adaround" and q.codebook == "uniform"
    if cfg.act is None and not cfg.bias_correction and not adaround:
        return None
    return _split(args, "calib")


def _evaluate_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m qcore evaluate")
    _compression_args(parser)
    return parser


def _evaluate(args: argparse.Namespace) -> int:
    model, data = _load(args)
    cfg = _config(args, model)
    base = evaluate(model, data)
    c = compress(model, cfg, calib=_calib(args, cfg), progress=_layer_progress(cfg))
    m = evaluate(c.model, data)
    print(f"float accuracy      {base.accuracy:.4f}")
    print(f"simulated accuracy  {m.accuracy:.4f} ({m.accuracy - base.accuracy:+.4f}), "
          f"agreement with float {agreement(base, m):.4f}")
    print(f"packed size         {c.size_bytes:,} B of {c.float_size_bytes:,} B float "
          f"({c.ratio:.2f}x smaller)")
    print(f"sparsity            {c.sparsity:.4f}; SQNR (whole model) {c.sqnr_db:.2f} dB "
          f"(mean of the layers' SQNRs {c.mean_sqnr_db:.2f} dB)")
    for s in c.layers:
        sq = f"{s.sqnr_db:6.1f}" if math.isfinite(s.sqnr_db) else "   inf"
        ada = "" if s.rounding_changed is None else f"  rounding changed {s.rounding_changed:.3f}"
        print(f"  {s.name:<22} {str(s.shape):<18} {s.bits:>2} bits  sparsity {s.sparsity:.3f}  "
              f"SQNR {sq} dB  {s.size_bytes:>9,} B ({s.encoding}){ada}")
    if c.equalization is not None:
        eq = c.equalization
        print("equalized pairs     " + (", ".join(f"{a}->{b}" for a, b in eq.pairs) or "none"))
        for a, b, why in eq.skipped:
            print(f"  not equalized {a}->{b}: {why}")
    return 0


def _layer_progress(cfg: CompressionConfig):
    """AdaRound takes seconds per layer: say which layer is done, on stderr."""
    q = cfg.quant
    if q is None or q.rounding != "adaround" or q.codebook != "uniform":
        return None
    return lambda done, total, row: print(f"AdaRound {done}/{total}: {row['layer']}",
                                          file=sys.stderr, flush=True)


def _export_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m qcore export")
    _compression_args(parser)
    parser.add_argument("--out", type=_out_arg, required=True, help="packed file to write")
    return parser


def _export(args: argparse.Namespace) -> int:
    if args.weights is not None:
        model = _own_model(args.weights, model_info(args.model).arch, _data_info(args))
    else:
        if args.dataset or args.data:  # nothing is evaluated, but the data must fit the model
            check_fit(model_info(args.model), _data_info(args))
        model = load_model(args.model)
    cfg = _config(args, model)
    c = compress(model, cfg, calib=_calib(args, cfg))
    n = _write(args.out, lambda out: export_packed(c, out))
    print(f"wrote {args.out}: {n:,} bytes ({c.size_bytes:,} packed + {n - c.size_bytes:,} header)")
    return 0


def _deploy_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m qcore deploy",
                    description="Export to ONNX in QDQ form and compare float PyTorch, float "
                    "ONNX Runtime, the simulation and the int8 file: accuracy, agreement, "
                    "latency at batch 1 and 256, file bytes.")  # fmt: skip
    _compression_args(parser)
    parser.add_argument("--out", type=_out_arg, required=True, help="ONNX file to write")
    parser.add_argument("--seconds", type=number_arg, default=0.5,
                        help="time spent timing each runtime at each batch size")
    return parser


def _deploy(args: argparse.Namespace) -> int:
    from qcore.onnx import deploy

    model, data = _load(args)
    cfg = _config(args, model)
    if not 0.0 < args.seconds <= 60.0:
        raise ValueError(f"--seconds must be in (0, 60]; got {args.seconds}.")
    c = compress(model, cfg, calib=_calib(args, cfg))
    label = Settings.from_config(cfg).wa_label()
    float_out = args.out.with_name(args.out.stem + ".float.onnx")
    d = _write(args.out, lambda out: deploy(model, c, data, out, float_out, label,
                                            seconds=args.seconds))  # fmt: skip
    sizes = [lat.batch_size for lat in d.rows[0].latency]
    head = "".join(f"  batch {b:<3} ms (p90)" for b in sizes)
    print(f"{'runtime':<42} accuracy  agrees float  agrees sim{head}  file bytes")
    for r in d.rows:
        lat = "".join(f"  {x.median_ms:8.2f} ({x.p90_ms:7.2f})" for x in r.latency)
        size = "-" if r.file_bytes is None else f"{r.file_bytes:,}"
        print(f"{r.runtime:<42} {r.accuracy:8.4f}  {r.agrees_with_float:12.4f}  "
              f"{r.agrees_with_simulated:10.4f}{lat}  {size:>10}")
    print(d.integer_sentence())
    threads = d.rows[0].latency[0].threads
    print(f"{threads} thread(s). {d.cpu.sentence()}")
    print(f"wrote {args.out} ({d.export.size_bytes:,} bytes) and {float_out} "
          f"({d.float_export.size_bytes:,} bytes); open them in Netron to see the graph")
    return 0


def _train_samples_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m qcore train-samples", description="Train the sample models.")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="train only these models")
    parser.add_argument("--out", type=_out_dir_arg, default=SAMPLE_DIR, help="output folder")
    return parser


def _train_samples(args: argparse.Namespace) -> int:
    from qcore.train import train_samples

    t0 = time.perf_counter()
    _write(args.out, lambda out: train_samples(out, args.only))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------
# sweep and sensitivity: a CSV each, a progress bar on stderr


def _analysis_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="sample model name, e.g. mnist-cnn")
    parser.add_argument("--dataset", help="dataset name (default: the model's own)")
    _weights_arg(parser)
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
    parser.add_argument("--out", type=_out_arg, required=True, help="CSV file to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _sweep_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m qcore sweep",
        description="Compress a sample model at every combination of the settings given "
        "and write accuracy, loss, packed size, ratio, sparsity and SQNR per combination.",
    )
    parser.add_argument("--bits", nargs="+", type=bits_arg, default=[2, 3, 4, 6, 8],
                        help="bit widths; 'float' adds unquantized rows (default: 2 3 4 6 8)")
    parser.add_argument("--prune", nargs="+", type=rate_arg, default=[0.0],
                        help="pruning rates in [0, 1) (default: 0)")
    parser.add_argument("--clip", nargs="+", type=number_arg, default=[1.0],
                        help="clip values, read as --clip-mode says (default: 1.0)")
    _analysis_args(parser)
    return parser


def _sweep(args: argparse.Namespace) -> int:
    grid = SweepGrid(
        bits=args.bits, prune_rates=args.prune, clips=args.clip, clip_mode=args.clip_mode,
        symmetric=(not args.asymmetric,), per_channel=(args.per_channel,),
        structured=args.structured,
    )
    model, dataset = _load(args, args.split)
    progress = None if args.quiet else ProgressBar("sweep")
    df = sweep(model, dataset, grid, progress=progress)
    _write(args.out, lambda out: df.to_csv(out, index=False))
    print(f"Wrote {len(df)} rows to {args.out}.", file=sys.stderr)
    return 0


def _sensitivity_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m qcore sensitivity",
        description="For each layer alone, the accuracy when it is quantized at each bit "
        "width or pruned at each rate (everything else float), with its SQNR.",
    )
    parser.add_argument("--bits", nargs="*", type=whole_number, default=list(DEFAULT_BITS),
                        help="bit widths (default: 2 to 8)")
    parser.add_argument("--prune", nargs="*", type=rate_arg, default=list(DEFAULT_PRUNE_RATES),
                        help="pruning rates in [0, 1) (default: 0.25 0.5 0.75 0.9)")
    parser.add_argument("--clip", type=number_arg, default=1.0,
                        help="clip value, read as --clip-mode says (default: 1.0)")
    parser.add_argument("--naive", action="store_true",
                        help="recompute the whole model per row (slower, same numbers)")
    _analysis_args(parser)
    return parser


def _sensitivity(args: argparse.Namespace) -> int:
    quant = QuantConfig(symmetric=not args.asymmetric, per_channel=args.per_channel,
                        clip=args.clip, clip_mode=args.clip_mode)
    prune = PruneConfig(structured=args.structured)
    model, dataset = _load(args, args.split)
    progress = None if args.quiet else ProgressBar("sensitivity")
    df = layer_sensitivity(model, dataset, bits=args.bits, prune_rates=args.prune,
                           quant=quant, prune=prune, naive=args.naive, progress=progress)
    _write(args.out, lambda out: df.to_csv(out, index=False))
    print(f"Wrote {len(df)} rows to {args.out} ({df.attrs['method']} method, "
          f"{df.attrs['seconds']:.1f} s).", file=sys.stderr)
    return 0


def _finetune_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m qcore finetune",
        description="Fine-tune a sample model with its compression in the forward pass "
        "(quantization-aware training) on the train split, print float, post-training and "
        "fine-tuned test accuracy, and write the packed file of the fine-tuned model.",
    )
    _compression_args(parser)
    parser.add_argument("--epochs", type=natural, default=1)
    parser.add_argument("--lr", type=number_arg, default=None,
                        help="peak learning rate (default: FinetuneConfig's)")
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument("--seed", type=seed_arg, default=0)
    parser.add_argument("--distill", action="store_true",
                        help="learn from the float model's outputs too (distillation)")
    parser.add_argument("--temperature", type=number_arg, default=4.0)
    parser.add_argument("--alpha", type=number_arg, default=0.5,
                        help="weight of the distillation term (default: 0.5)")
    parser.add_argument("--grad-bits", type=whole_number, default=None,
                        help="quantize gradients to 2..16 bits (stochastic rounding)")
    parser.add_argument("--gradual", action="store_true",
                        help="raise the pruning rate gradually (cubic schedule)")
    parser.add_argument("--learn-scales", action="store_true",
                        help="learn the quantization steps (LSQ)")
    parser.add_argument("--out", type=_out_arg, required=True, help="packed file to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _finetune(args: argparse.Namespace) -> int:
    from qcore.finetune import FinetuneConfig, finetune

    ft = FinetuneConfig(
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, distill=args.distill,
        temperature=args.temperature, alpha=args.alpha, grad_bits=args.grad_bits,
        prune_schedule="gradual" if args.gradual else "oneshot", learn_scales=args.learn_scales,
        **({} if args.lr is None else {"lr": args.lr}),
    )  # fmt: skip
    model, test = _load(args)
    cfg = _config(args, model)
    train, calib = _split(args, "train"), _split(args, "calib")
    progress = None if args.quiet else ProgressBar("fine-tune")
    result = finetune(model, train, cfg, ft, calib=calib, progress=progress)
    before = compress(model, cfg, calib=calib)
    after = compress(result.model, cfg, calib=calib)
    base = evaluate(model, test).accuracy
    ptq = evaluate(before.model, test).accuracy
    tuned = evaluate(after.model, test).accuracy
    steps = int(result.history["step"].max())
    print(f"float accuracy         {base:.4f}")
    print(f"post-training accuracy {ptq:.4f} ({ptq - base:+.4f})")
    print(f"fine-tuned accuracy    {tuned:.4f} ({tuned - base:+.4f}), {steps} steps in "
          f"{result.seconds:.1f} s")
    print(f"packed size            {after.size_bytes:,} B of {after.float_size_bytes:,} B float "
          f"({after.ratio:.2f}x smaller)")
    n = _write(args.out, lambda out: export_packed(after, out))
    print(f"wrote {args.out}: {n:,} bytes ({after.size_bytes:,} packed + "
          f"{n - after.size_bytes:,} header)")
    return 0


def main_finetune(argv: list[str]) -> int:
    """``python -m qcore finetune``: quantization-aware fine-tuning into a packed file."""
    return _run(_finetune_parser(), _finetune, argv)


def _deep_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m qcore deep",
        description="Deep Compression (Han et al. 2016) on a sample model: prune and "
        "retrain, share weights through k-means codebooks and retrain the centroids, then "
        "Huffman code; print each stage's packed bytes and test accuracy beside the paper's "
        "table, and write the final packed file. Without --prune-rate and --bits, the "
        "paper's per-layer recipe (LeNet-300-100, LeNet-5) or the rule after it.",
    )
    parser.add_argument("--model", required=True, help="a sample model (see: list)")
    parser.add_argument("--dataset", default=None, help="default: the model's own")
    _weights_arg(parser)
    parser.add_argument("--prune-rate", type=number_arg, default=None,
                        help="one pruning rate for every layer, 0 to 0.99 (default: recipe)")
    parser.add_argument("--bits", type=whole_number, default=None,
                        help="one codebook width for every layer, 1 to 16 (default: recipe)")
    parser.add_argument("--epochs", type=natural, default=None,
                        help="retraining epochs after pruning (default: 2)")
    parser.add_argument("--centroid-epochs", type=natural, default=None,
                        help="centroid retraining epochs (default: 1)")
    parser.add_argument("--seed", type=seed_arg, default=0)
    parser.add_argument("--out", type=_out_arg, required=True, help="packed file to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _deep(args: argparse.Namespace) -> int:
    from qcore.bench import deep_lines
    from qcore.deep import CENTROID_EPOCHS, DEFAULT_EPOCHS, deep_compression

    model, test = _load(args)
    name = test.name
    train, calib = _split(args, "train"), _split(args, "calib")
    epochs = DEFAULT_EPOCHS if args.epochs is None else args.epochs
    centroid_epochs = CENTROID_EPOCHS if args.centroid_epochs is None else args.centroid_epochs
    progress = None if args.quiet else ProgressBar("deep compression")
    res = deep_compression(model, train, calib, prune_rate=args.prune_rate, bits=args.bits,
                           epochs=epochs, centroid_epochs=centroid_epochs, seed=args.seed,
                           progress=progress, test=test)  # fmt: skip
    who = (args.model if args.weights is None
           else f"{args.weights.name} ({args.model}'s architecture)")  # fmt: skip
    print(f"{who} on {name}: {len(train.y):,} training images, {len(test.y):,} test "
          f"images; {epochs} epochs of retraining after pruning, {centroid_epochs} of centroids")
    print("\n".join(deep_lines(res, model)))
    c = res.compressed
    n = _write(args.out, lambda out: export_packed(c, out))
    print(f"wrote {args.out}: {n:,} bytes ({c.size_bytes:,} packed + {n - c.size_bytes:,} header)")
    return 0


def _robustness_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m qcore robustness",
        description="Accuracy of the float model (no --bits) or of one compressed "
        "configuration as a perturbation grows, on the test split: gaussian input noise "
        "(std in normalised input units), FGSM / PGD (epsilon in pixel units 0..1, white "
        "box), weight_noise (relative std) or bitflip (fraction of stored bits).",
    )
    _compression_args(parser)
    parser.set_defaults(bits=None)  # without --bits: the float model
    parser.add_argument("--perturbation", default="fgsm", choices=PERTURBATIONS)
    parser.add_argument("--strengths", nargs="+", type=number_arg,
                        default=[0.0, 0.05, 0.1, 0.2], help="default: 0 0.05 0.1 0.2")
    parser.add_argument("--seed", type=seed_arg, default=0)
    parser.add_argument("--seeds", type=positive, default=3,
                        help="draws averaged for weight_noise and bitflip (default: 3)")
    parser.add_argument("--steps", type=positive, default=10, help="PGD steps (default: 10)")
    parser.add_argument("--limit", type=whole_number, default=None,
                        help="only the first N test images (default: all)")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _robustness(args: argparse.Namespace) -> int:
    model, data = _load(args)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be 1 or more; got {args.limit}.")
        data = replace(data, x=data.x[: args.limit], y=data.y[: args.limit],
                       indices=data.indices[: args.limit])
    cfg = _config(args, model)
    plain = cfg.keeps_float
    target = model
    if not plain or args.perturbation == "bitflip":  # bit flips need the stored form
        target = compress(model, cfg, calib=_calib(args, cfg))
    label = "float32" if plain else Settings.from_config(cfg, list(weight_layers(model))).label()
    progress = None if args.quiet else ProgressBar(args.perturbation)
    df = robustness(target, data, args.perturbation, args.strengths, seed=args.seed,
                    seeds=args.seeds, steps=args.steps, progress=progress)
    df.insert(0, "variant", label)
    if args.csv:
        print(df.to_csv(index=False), end="")
        return 0
    print(f"{args.model} ({label}) on {data.name} test split, {len(data.y)} images; "
          f"strength = {df.attrs['unit']}")
    print(df.drop(columns=["perturbation", "variant"]).to_string(
        index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def _analyze_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m qcore analyze",
        description="Why one configuration loses accuracy, on the test split: float, "
        "weights only, activations only and both; then per compressed layer its output's "
        "SQNR when only it is compressed (local) and in the compressed model (cumulative), "
        "and the accuracy with only it compressed and with all but it compressed.",
    )
    _compression_args(parser)
    parser.add_argument("--csv", action="store_true",
                        help="print the summary as CSV, a blank line, then the layers as CSV")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _analyze(args: argparse.Namespace) -> int:
    from qcore.debug import analyze, summary_sentence

    model, data = _load(args)
    cfg = _config(args, model)
    progress = None if args.quiet else ProgressBar("analyze")
    a = analyze(model, cfg, data, calib=_calib(args, cfg), progress=progress)
    if args.csv:
        print(a.summary.to_csv(index=False))
        print(a.layers.to_csv(index=False), end="")
        return 0
    label = Settings.from_config(cfg, list(weight_layers(model))).label()
    print(f"{args.model} ({label}) on {data.name} test split, {a.n:,} images, "
          f"{a.seconds:.1f} s; accuracy simulated")
    print(summary_sentence(a.summary))
    print(a.summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print()
    print(a.layers.drop(columns=["index"]).to_string(
        index=False, float_format=lambda v: f"{v:.4f}"))
    best = a.best_float_layer
    if best is not None:
        print(f"Keeping {best} in float wins the most: "
              f"{a.float_keeping[best] * 100:+.1f} pp.")
    return 0


def main_sweep(argv: list[str]) -> int:
    """``python -m qcore sweep``: one CSV row per configuration of the grid."""
    return _run(_sweep_parser(), _sweep, argv)


def main_sensitivity(argv: list[str]) -> int:
    """``python -m qcore sensitivity``: accuracy with one layer at a time compressed."""
    return _run(_sensitivity_parser(), _sensitivity, argv)


def _bench(argv: list[str]) -> int:
    from qcore.bench import main_bench

    try:
        return main_bench(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return int(exc.code or 0)
    except ValueError as exc:
        return _fail(str(exc))


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "list": lambda argv: _run(_list_parser(), _list, argv),
    "evaluate": lambda argv: _run(_evaluate_parser(), _evaluate, argv),
    "export": lambda argv: _run(_export_parser(), _export, argv),
    "train-samples": lambda argv: _run(_train_samples_parser(), _train_samples, argv),
    "bench": _bench,
    "sweep": main_sweep,
    "sensitivity": main_sensitivity,
    "robustness": lambda argv: _run(_robustness_parser(), _robustness, argv),
    "finetune": main_finetune,
    "deep": lambda argv: _run(_deep_parser(), _deep, argv),
    "deploy": lambda argv: _run(_deploy_parser(), _deploy, argv),
    "analyze": lambda argv: _run(_analyze_parser(), _analyze, argv),
}


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m qcore COMMAND ...``; return the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] not in COMMANDS:
        return _fail(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} "
                     "(see python -m qcore --help).")
    return COMMANDS[argv[0]](argv[1:])
