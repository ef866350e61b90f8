"""``python -m qcore bench``: how much compressing costs next to a float forward pass.

For each sample model, on its own test split: the median time of a float evaluation, of
compress + evaluate for a few configurations, their ratio, and the peak resident memory.
Each model runs in a fresh subprocess so that its peak memory is its own.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from qcore.compress import compress
from qcore.config import CompressionConfig, PruneConfig, QuantConfig
from qcore.data import load_dataset
from qcore.evaluate import evaluate
from qcore.models import list_models, load_model, model_info

__all__ = ["BENCH_CONFIGS", "bench_model", "main_bench"]

BENCH_CONFIGS: dict[str, CompressionConfig] = {
    "8-bit": CompressionConfig(quant=QuantConfig(bits=8)),
    "4-bit per-channel": CompressionConfig(quant=QuantConfig(bits=4, per_channel=True)),
    "4-bit + prune 0.5": CompressionConfig(quant=QuantConfig(bits=4), prune=PruneConfig(rate=0.5)),
    "3-bit mse clip": CompressionConfig(quant=QuantConfig(bits=3, clip_mode="mse")),
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
    evaluate(model, data)  # warm-up: first calls pay for allocator and kernel set-up
    float_s = _median_seconds(lambda: evaluate(model, data), repeats)
    rows = {}
    for label, cfg in BENCH_CONFIGS.items():
        compress(model, cfg)  # warm-up (and the one-time BatchNorm fold)
        comp_s = _median_seconds(lambda cfg=cfg: compress(model, cfg), repeats)
        both_s = _median_seconds(
            lambda cfg=cfg: evaluate(compress(model, cfg).model, data), repeats
        )
        rows[label] = {"compress_s": comp_s, "compress_eval_s": both_s, "ratio": both_s / float_s}
    return {
        "model": name,
        "n": len(data),
        "float_eval_s": float_s,
        "configs": rows,
        "peak_rss_mib": _peak_rss_mib(),
        "threads": torch.get_num_threads(),
    }


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


def main_bench(argv: list[str]) -> int:
    import argparse

    from qcore.cli import Parser, whole_number

    parser = Parser(prog="python -m qcore bench", description=__doc__)
    parser.add_argument("--models", nargs="*", default=None, help="default: every sample model")
    parser.add_argument("--repeats", type=whole_number, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: bench one model in-process
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("argument --repeats: at least 1 run is needed for a median")
    if args.one:
        print(json.dumps(bench_model(args.one, args.repeats)))
        return 0
    names = args.models or list_models()
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        print(f"Unknown model(s): {', '.join(unknown)}; known: {', '.join(list_models())}.",
              file=sys.stderr)
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
