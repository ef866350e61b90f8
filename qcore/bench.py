"""``python -m qcore bench``: how much compressing costs next to a float forward pass.

For each sample model, on its own test split: the median time of a float evaluation, of
compress + evaluate for a few configurations, their ratio, and the peak resident memory.
Each model runs in a fresh subprocess so that its peak memory is its own.

``--eval`` measures float evaluation of mnist-cnn several ways (batch sizes through the
graph runtime, the module itself, channels-last, ``torch.compile``); ``--sensitivity``
times layer sensitivity on mnist-cnn the naive way and with prefix reuse.
``--deep`` runs Deep Compression (:mod:`qcore.deep`) on mnist-lenet300 (the paper's recipe,
then with 5-bit codebooks) and mnist-cnn, and prints each stage beside the paper's table.
``--drop`` removes each model's first removable block (:mod:`qcore.blocks`) at 8 bits and
fine-tunes the accuracy back.
``--finetune`` fine-tunes for one epoch (quantization-aware training, distillation,
gradient quantization, prune and retrain) and prints test accuracy before and after, and
the time of one epoch for each sample model.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from qcore.compress import compress
from qcore.config import ActQuantConfig, CompressionConfig, PruneConfig, QuantConfig
from qcore.data import load_dataset
from qcore.evaluate import EVAL_BATCH, evaluate
from qcore.models import list_models, load_model, model_info

if TYPE_CHECKING:
    from torch import nn

    from qcore.deep import DeepCompressionResult

__all__ = ["BENCH_CONFIGS", "bench_model", "bench_eval", "bench_sensitivity", "main_bench"]

BENCH_CONFIGS: dict[str, CompressionConfig] = {
    "8-bit": CompressionConfig(quant=QuantConfig(bits=8)),
    "4-bit per-channel": CompressionConfig(quant=QuantConfig(bits=4, per_channel=True)),
    "4-bit + prune 0.5": CompressionConfig(quant=QuantConfig(bits=4), prune=PruneConfig(rate=0.5)),
    "3-bit mse clip": CompressionConfig(quant=QuantConfig(bits=3, clip_mode="mse")),
    # activations calibrated once (cached), then fake-quantized on every edge each run
    "W8A8 (min-max)": CompressionConfig(quant=QuantConfig(bits=8), act=ActQuantConfig(bits=8)),
}


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_model(name: str, repeats: int = 7) -> dict:
    """Timings (seconds, medians of ``repeats``) and peak memory for one sample model."""
    model = load_model(name)
    data = load_dataset(model_info(name).dataset, "test")
    calib = load_dataset(model_info(name).dataset, "calib")
    for _ in range(3):  # warm-up: first calls pay for allocator and kernel set-up
        evaluate(model, data)
    float_times: list[float] = []
    rows = {}
    for label, cfg in BENCH_CONFIGS.items():
        compress(model, cfg, calib=calib)  # warm-up (the one-time fold and calibration)
        comp_s = _median_seconds(lambda cfg=cfg: compress(model, cfg, calib=calib), repeats)
        # float and compressed runs alternate, so a drift in machine speed hits both alike
        own_float, both = [], []
        for _ in range(repeats):
            own_float.append(_median_seconds(lambda: evaluate(model, data), 1))
            both.append(_median_seconds(
                lambda cfg=cfg: evaluate(compress(model, cfg, calib=calib).model, data), 1))
        float_times += own_float
        both_s = statistics.median(both)
        rows[label] = {"compress_s": comp_s, "compress_eval_s": both_s,
                       "ratio": both_s / statistics.median(own_float)}
    float_s = statistics.median(float_times)
    return {
        "model": name,
        "n": len(data),
        "float_eval_s": float_s,
        "configs": rows,
        "peak_rss_mib": _peak_rss_mib(),
        "threads": torch.get_num_threads(),
    }


def bench_eval(name: str = "mnist-cnn", repeats: int = 7) -> dict[str, float]:
    """Float evaluation of ``name`` on its test split, several ways (median seconds)."""
    model = load_model(name)
    x = load_dataset(model_info(name).dataset, "test").x

    def batches(run: Callable, bs: int, inputs: torch.Tensor = x) -> Callable[[], None]:
        def go() -> None:
            with torch.inference_mode():
                for i in range(0, inputs.shape[0], bs):
                    run(inputs[i : i + bs])
        return go

    data = load_dataset(model_info(name).dataset, "test")
    out: dict[str, float] = {}
    for bs in (len(x), 1000, 512, EVAL_BATCH, 128, 64):
        evaluate(model, data, batch_size=bs)
        out[f"evaluate, batch {bs}"] = _median_seconds(
            lambda bs=bs: evaluate(model, data, batch_size=bs), repeats)
    for bs in (len(x), EVAL_BATCH):
        batches(model, bs)()
        out[f"module itself, batch {bs}"] = _median_seconds(batches(model, bs), repeats)
    cl = load_model(name).to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    for bs in (len(x), EVAL_BATCH):
        batches(cl, bs, xcl)()
        out[f"channels-last module, batch {bs}"] = _median_seconds(batches(cl, bs, xcl), repeats)
    try:
        compiled = torch.compile(load_model(name))
        t = time.perf_counter()
        batches(compiled, EVAL_BATCH)()
        out["torch.compile: first call (compiling)"] = time.perf_counter() - t
        out[f"torch.compile module, batch {EVAL_BATCH}"] = _median_seconds(
            batches(compiled, EVAL_BATCH), repeats)
    except Exception as exc:  # no compiler toolchain: say so, do not fail the benchmark
        print(f"torch.compile unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    return out


def bench_sensitivity(name: str = "mnist-cnn") -> dict[str, float]:
    """Layer sensitivity at 2..8 bits (every layer) the naive way and with prefix reuse."""
    from qcore.sensitivity import layer_sensitivity

    model = load_model(name)
    data = load_dataset(model_info(name).dataset, "test")
    kw = dict(bits=(2, 3, 4, 5, 6, 7, 8), prune_rates=())
    t = time.perf_counter()
    naive = layer_sensitivity(model, data, naive=True, **kw)
    naive_s = time.perf_counter() - t
    t = time.perf_counter()
    fast = layer_sensitivity(model, data, **kw)
    fast_s = time.perf_counter() - t
    if not naive.equals(fast):
        raise AssertionError("the cached sensitivity differs from the naive one")
    return {"rows": len(fast), "naive_s": naive_s, "cached_s": fast_s,
            "speedup": naive_s / fast_s}  # fmt: skip


def bench_finetune(lr: float | None = None) -> Iterator[dict]:
    """One-epoch fine-tuning runs: float, post-training and fine-tuned test accuracy.

    Each row: model, label, float / post-training / fine-tuned accuracy and seconds. The
    last rows time one epoch (2-bit per-channel weights) of every sample model.
    """
    from qcore.finetune import FinetuneConfig, finetune

    ft = FinetuneConfig() if lr is None else FinetuneConfig(lr=lr)
    two = CompressionConfig(quant=QuantConfig(bits=2, per_channel=True))
    w4a4 = CompressionConfig(quant=QuantConfig(bits=4), act=ActQuantConfig(bits=4))
    prune90 = CompressionConfig(quant=None, prune=PruneConfig(rate=0.9, scope="global"))
    runs = [
        ("mnist-cnn", "2-bit per-channel, cross-entropy", two, ft),
        ("mnist-cnn", "2-bit per-channel, distillation", two, replace(ft, distill=True)),
        ("mnist-cnn", "2-bit per-channel, 8-bit gradients", two, replace(ft, grad_bits=8)),
        ("mnist-cnn", "W4A4 (per-tensor, min-max)", w4a4, ft),
        ("mnist-lenet300", "90 % global pruning", prune90, ft),
        ("mnist-lenet300", "90 % global pruning, gradual", prune90,
         replace(ft, prune_schedule="gradual")),
    ]
    runs += [(n, "epoch time (2-bit per-channel)", two, ft) for n in list_models()
             if n != "mnist-cnn"]
    for name, label, cfg, f in runs:
        model, ds = load_model(name), model_info(name).dataset
        train, calib = load_dataset(ds, "train"), load_dataset(ds, "calib")
        test = load_dataset(ds, "test")
        result = finetune(model, train, cfg, f, calib=calib)
        yield {
            "model": name, "label": label, "float": evaluate(model, test).accuracy,
            "post_training": evaluate(compress(model, cfg, calib=calib).model, test).accuracy,
            "fine_tuned": evaluate(compress(result.model, cfg, calib=calib).model,
                                   test).accuracy,
            "seconds": result.seconds, "steps": int(result.history["step"].max()),
            "grad_sqnr_db": float(result.history["grad_sqnr_db"].median()),
        }  # fmt: skip


def bench_deep(name: str, epochs: int | None = None, bits: int | None = None) -> str:
    """Deep Compression on ``name`` (the default recipe, or ``bits`` for every layer), stage
    by stage beside the paper's table: the figures of the README's Deep Compression section."""
    from qcore.deep import CENTROID_EPOCHS, DEFAULT_EPOCHS, deep_compression

    info = model_info(name)
    split = {s: load_dataset(info.dataset, s) for s in ("train", "calib", "test")}
    t = time.perf_counter()
    res = deep_compression(load_model(name), split["train"], split["calib"], bits=bits,
                           epochs=epochs or DEFAULT_EPOCHS, test=split["test"])  # fmt: skip
    seconds = time.perf_counter() - t
    recipe = "default recipe" if bits is None else f"{bits}-bit codebooks everywhere"
    lines = [f"{name} on {info.dataset} ({len(split['train']):,} training images, "
             f"{len(split['test']):,} test images), {recipe}; {epochs or DEFAULT_EPOCHS} "
             f"epochs of retraining after pruning, {CENTROID_EPOCHS} of centroids; "
             f"{seconds:.0f} s on {torch.get_num_threads()} threads",
             *deep_lines(res, load_model(name))]
    return "\n".join(lines)


def deep_lines(res: DeepCompressionResult, model: nn.Module) -> list[str]:
    """A Deep Compression result as text: the stages, the paper's table for the reference
    architecture, bits per weight layer by layer, and where the final bytes go."""
    from qcore.deep import PAPER, STAGE_LABELS, paper_reference

    s = res.stages
    lines = [f"  {'stage':<38} {'kept':>6} {'packed bytes':>13} {'ratio':>7} {'accuracy':>9}"]
    for _, r in s.iterrows():
        lines.append(f"  {r['label']:<38} {r['kept']:6.1%} {r['size_bytes']:13,} "
                     f"{r['ratio']:6.1f}x {r['accuracy']:9.2%}"
                     + ("" if r["applied"] else "  (not applied: larger)"))
    drop = (s["accuracy"].iloc[0] - s["accuracy"].iloc[-1]) * 100
    change = ("unchanged" if drop == 0 else
              f"{abs(drop):.2f} pp {'lower' if drop > 0 else 'higher'}")  # fmt: skip
    lines.append(f"  final: {s['ratio'].iloc[-1]:.1f}x, accuracy {change} "
                 f"(float {s['accuracy'].iloc[0]:.2%} -> {s['accuracy'].iloc[-1]:.2%})")
    reference = paper_reference(model)
    paper = PAPER[reference]
    lines.append(f"  the paper's {reference} (Han et al. 2016, Tables 1-3), full MNIST:")
    for _, r in paper.iterrows():
        size = "" if r["size_kb"] != r["size_kb"] else f"{r['size_kb']:.0f} KB"
        ratio = "" if r["ratio"] != r["ratio"] else f"{r['ratio']:.0f}x"
        err = "" if r["error"] != r["error"] else f"error {r['error']:.2%}"
        lines.append(f"  {STAGE_LABELS[r['stage']]:<38} {r['kept']:6.0%} {size:>13} "
                     f"{ratio:>7} {err}")
    lines.append("  bits per weight, layer by layer (weight bytes x 8 / weights):")
    table = res.layers.pivot(index="layer", columns="stage", values="bits_per_weight")
    for layer in dict.fromkeys(res.layers["layer"]):
        cells = "  ".join(f"{table.loc[layer, st]:6.2f}" for st in dict.fromkeys(s["stage"]))
        lines.append(f"    {layer:<8} pruned {res.prune_rates[layer]:.0%}, "
                     f"{res.bits[layer]} bits: {cells}")
    last = res.layers[res.layers["stage"] == "huffman"]
    lines.append("  after Huffman coding, per kept weight (the paper's Table 2 columns): code "
                 "bits, index bits")
    for _, r in last.iterrows():
        kept = max(r["kept"] * r["weights"], 1)  # a layer pruned away has no kept weight
        code, index = r["code_bits"] / kept, r["index_bits"] / kept
        lines.append(f"    {r['layer']:<8} {code:5.2f} {index:5.2f}")
    parts = {c: int(last[c].sum()) for c in ("code_bytes", "index_bytes", "codebook_bytes",
                                               "table_bytes", "scale_bytes", "bias_bytes")}
    other = res.compressed.size_bytes - sum(parts.values())  # tensors of no weight layer
    lines.append("  final bytes: " + ", ".join(f"{k.removesuffix('_bytes')} {v:,}"
                                                for k, v in parts.items())
                 + f", other float32 {other:,}")
    return lines


def _format(result: dict) -> str:
    lines = [
        f"{result['model']}: float evaluation on {result['n']} test images "
        f"{result['float_eval_s'] * 1000:.1f} ms (median), "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB"
    ]
    for label, r in result["configs"].items():
        lines.append(
            f"  {label:<20} compress {r['compress_s'] * 1000:7.1f} ms   compress+evaluate "
            f"{r['compress_eval_s'] * 1000:7.1f} ms   ratio to float eval {r['ratio']:.2f}"
        )
    return "\n".join(lines)


# Layer removal: each sample model's first removable block, fine-tuned back (epochs, lr)
DROP_RUNS = (("digits-mlp", 10, 1e-2), ("mnist-dwsep", 5, 3e-3), ("mnist-resnet", 5, 1e-3))


def bench_drop() -> Iterator[dict]:
    """Layer removal at 8 bits: the first removable block of each model, its bytes, and test
    accuracy before and after fine-tuning without it."""
    from qcore.blocks import removable_blocks
    from qcore.finetune import FinetuneConfig, finetune

    for name, epochs, lr in DROP_RUNS:
        model, ds = load_model(name), model_info(name).dataset
        train, calib = load_dataset(ds, "train"), load_dataset(ds, "calib")
        test = load_dataset(ds, "test")
        block = next(iter(removable_blocks(model)))
        full = CompressionConfig(quant=QuantConfig(bits=8))
        cfg = replace(full, drop=(block,))
        c = compress(model, cfg)
        result = finetune(model, train, cfg, FinetuneConfig(epochs=epochs, lr=lr), calib=calib)
        yield {
            "model": name, "block": block, "epochs": epochs, "lr": lr,
            "full_bytes": compress(model, full).size_bytes, "bytes": c.size_bytes,
            "full": evaluate(compress(model, full).model, test).accuracy,
            "removed": evaluate(c.model, test).accuracy,
            "fine_tuned": evaluate(compress(result.model, cfg).model, test).accuracy,
            "seconds": result.seconds,
        }  # fmt: skip


def main_bench(argv: list[str]) -> int:
    import argparse

    from qcore.args import Parser, number_arg, whole_number

    parser = Parser(prog="python -m qcore bench", description=__doc__)
    parser.add_argument("--models", nargs="*", default=None, help="default: every sample model")
    parser.add_argument("--repeats", type=whole_number, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: bench one model in-process
    parser.add_argument("--eval", action="store_true",
                        help="float evaluation of mnist-cnn several ways, then stop")
    parser.add_argument("--finetune", action="store_true",
                        help="one-epoch fine-tuning runs and epoch times, then stop")
    parser.add_argument("--lr", type=number_arg, default=None,
                        help="with --finetune: the learning rate (default: FinetuneConfig's)")
    parser.add_argument("--sensitivity", action="store_true",
                        help="layer sensitivity on mnist-cnn, naive and cached, then stop")
    parser.add_argument("--drop", action="store_true",
                        help="layer removal at 8 bits, then fine-tuning it back, then stop")
    parser.add_argument("--deep", action="store_true",
                        help="Deep Compression stage by stage beside the paper, then stop")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("argument --repeats: at least 1 run is needed for a median")
    if args.one:
        print(json.dumps(bench_model(args.one, args.repeats)))
        return 0
    if args.eval:
        print(f"mnist-cnn float evaluation of 1,000 test images, medians of {args.repeats} runs, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for label, seconds in bench_eval(repeats=args.repeats).items():
            print(f"  {label:<40} {seconds * 1000:8.1f} ms")
        return 0
    if args.finetune:
        print(f"one epoch of fine-tuning on each model's train split (FinetuneConfig defaults"
              f"{'' if args.lr is None else f', lr {args.lr:g}'}), test-split accuracy; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for r in bench_finetune(args.lr):
            extra = "" if r["grad_sqnr_db"] != r["grad_sqnr_db"] else (
                f"  gradient SQNR {r['grad_sqnr_db']:.1f} dB (median)")
            print(f"  {r['model']:<15} {r['label']:<36} float {r['float']:.4f}  post-training "
                  f"{r['post_training']:.4f}  fine-tuned {r['fine_tuned']:.4f} "
                  f"({r['fine_tuned'] - r['float']:+.4f})  {r['seconds']:5.1f} s for "
                  f"{r['steps']} steps{extra}", flush=True)
        return 0
    if args.sensitivity:
        r = bench_sensitivity()
        print(f"mnist-cnn layer sensitivity, {r['rows']} rows (every layer at 2..8 bits): "
              f"naive {r['naive_s']:.2f} s, cached {r['cached_s']:.2f} s, "
              f"speed-up {r['speedup']:.2f}x (identical tables)")
        return 0
    if args.drop:
        print("layer removal at 8 bits: packed bytes and test accuracy with every layer, "
              "without the block, and fine-tuned without it")
        for r in bench_drop():
            print(f"  {r['model']:<13} without {r['block']:<11} {r['full_bytes']:>8,} -> "
                  f"{r['bytes']:>8,} B  accuracy {r['full']:.4f} -> {r['removed']:.4f} -> "
                  f"{r['fine_tuned']:.4f} after {r['epochs']} epochs at lr {r['lr']:g} "
                  f"({r['seconds']:.1f} s)", flush=True)
        return 0
    if args.deep:
        runs = ([(n, None) for n in args.models] if args.models else
                [("mnist-lenet300", None), ("mnist-lenet300", 5), ("mnist-cnn", None)])
        for name, bits in runs:
            print(bench_deep(name, bits=bits), flush=True)
        return 0
    names = args.models or list_models()
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        print(f"error: unknown model(s) {', '.join(map(repr, unknown))}; the sample models "
              f"are {', '.join(list_models())}.", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
          f"{args.repeats} runs; each model in its own process")
    for name in names:
        out = subprocess.run(
            [sys.executable, "-m", "qcore", "bench", "--one", name, "--repeats", str(args.repeats)],
            capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr}", file=sys.stderr)
            return 1
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(result) if args.json else _format(result), flush=True)
    return 0
