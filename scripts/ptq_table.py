"""The README's post-training remedies table: cross-layer equalization, bias correction and
AdaRound against round-to-nearest, on the sample models (test split, simulated).

    python scripts/ptq_table.py            # every row (AdaRound takes minutes per model)
    python scripts/ptq_table.py --quick    # without the AdaRound rows
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qcore  # noqa: E402
from qcore import CompressionConfig, QuantConfig  # noqa: E402

ROWS = [  # (group, model, quant, remedies)
    ("equalization", "mnist-dwsep", QuantConfig(bits=4, per_channel=True), {}),
    ("equalization", "mnist-dwsep", QuantConfig(bits=4), {}),
    ("equalization", "mnist-dwsep", QuantConfig(bits=4), {"equalize": True}),
    ("equalization", "mnist-dwsep", QuantConfig(bits=3, per_channel=True), {}),
    ("equalization", "mnist-dwsep", QuantConfig(bits=3), {}),
    ("equalization", "mnist-dwsep", QuantConfig(bits=3), {"equalize": True}),
    ("equalization", "mnist-dwsep", QuantConfig(bits=3, clip_mode="mse"), {}),
    ("equalization", "mnist-dwsep", QuantConfig(bits=3, clip_mode="mse"), {"equalize": True}),
    ("bias correction", "mnist-dwsep", QuantConfig(bits=3, per_channel=True), {}),
    ("bias correction", "mnist-dwsep", QuantConfig(bits=3, per_channel=True),
     {"bias_correction": True}),
    ("bias correction", "mnist-dwsep", QuantConfig(bits=3), {"equalize": True}),
    ("bias correction", "mnist-dwsep", QuantConfig(bits=3),
     {"equalize": True, "bias_correction": True}),
    ("bias correction", "mnist-resnet", QuantConfig(bits=3), {}),
    ("bias correction", "mnist-resnet", QuantConfig(bits=3), {"bias_correction": True}),
    ("adaround", "mnist-resnet", QuantConfig(bits=2, per_channel=True, clip_mode="mse"), {}),
    ("adaround", "mnist-resnet",
     QuantConfig(bits=2, per_channel=True, clip_mode="mse", rounding="adaround"), {}),
    ("adaround", "mnist-dwsep", QuantConfig(bits=3, per_channel=True), {}),
    ("adaround", "mnist-dwsep", QuantConfig(bits=3, per_channel=True, rounding="adaround"), {}),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="leave the AdaRound rows out")
    args = parser.parse_args()
    print("| remedy | model | weights | setting | accuracy | packed bytes | seconds |")
    print("|---|---|---|---|---|---|---|")
    for group, name, q, extra in ROWS:
        if args.quick and q.rounding == "adaround":
            continue
        cfg = CompressionConfig(quant=q, **extra)
        ds = qcore.model_info(name).dataset
        model = qcore.load_model(name)
        calib, test = qcore.load_dataset(ds, "calib"), qcore.load_dataset(ds, "test")
        start = time.perf_counter()
        c = qcore.compress(model, cfg, calib=calib)
        seconds = time.perf_counter() - start
        acc = qcore.evaluate(c.model, test).accuracy
        s = qcore.Settings.from_config(cfg)
        weights = (f"W{q.bits} {'per-channel' if q.per_channel else 'per-tensor'}"
                   + (" mse" if q.clip_mode == "mse" else ""))  # fmt: skip
        setting = ", ".join(p for p in (
            "AdaRound" if q.rounding == "adaround" else "nearest",
            "equalized" if s.equalize else "", "bias corrected" if s.bias_correction else "",
        ) if p)  # fmt: skip
        print(f"| {group} | {name} | {weights} | {setting} | {acc:.1%} | {c.size_bytes:,} | "
              f"{seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
