"""The Robustness figures of the README: float, 8-bit, 4-bit and 4-bit clipped at ratio 0.5
under every perturbation, for mnist-cnn and mnist-resnet, as a Markdown table.

    python scripts/robustness_table.py [--limit 500] [--models mnist-cnn mnist-resnet]

Input perturbations run on the first ``--limit`` test images (PGD takes tens of seconds
per curve on two CPU cores); the weight perturbations and the clean row use the whole
test split. Accuracies are simulated (fake-quant), in percent.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qcore  # noqa: E402

VARIANTS = (  # label, quant config (None = float)
    ("float", None),
    ("8-bit", qcore.QuantConfig(bits=8)),
    ("4-bit", qcore.QuantConfig(bits=4)),
    ("4-bit clip 0.5", qcore.QuantConfig(bits=4, clip=0.5)),
)
CURVES = (  # perturbation, strengths, on the first --limit images?
    ("gaussian", (0.25, 0.5, 1.0), True),
    ("fgsm", (0.05, 0.1, 0.2), True),
    ("pgd", (0.05, 0.1, 0.2), True),
    ("weight_noise", (0.1, 0.2, 0.4), False),
    ("bitflip", (1e-4, 1e-3, 1e-2), False),
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mnist-cnn", "mnist-resnet"])
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    for name in args.models:
        model = qcore.load_model(name)
        data = qcore.load_dataset(qcore.model_info(name).dataset, "test")
        head = replace(data, x=data.x[: args.limit], y=data.y[: args.limit],
                       indices=data.indices[: args.limit])
        cols = ["clean (full split)"]
        for p, ss, sub in CURVES:
            cols += [f"{p} {s:g}" + (" *" if sub else "") for s in ss]
        print(f"\n### {name} on {data.name} (test split: {len(data.y)} images; "
              f"* = first {len(head.y)})\n")
        print("| variant | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        t0 = time.perf_counter()
        for label, q in VARIANTS:
            comp = qcore.compress(model, qcore.CompressionConfig(quant=q))
            target = model if q is None else comp.model
            cells = [f"{qcore.evaluate(target, data).accuracy * 100:.1f}"]
            for p, ss, sub in CURVES:
                df = qcore.robustness(comp if p == "bitflip" else target,
                                      head if sub else data, p, ss, seeds=args.seeds)
                cells += [f"{a * 100:.1f}" for a in df["accuracy"]]
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        print(f"\n({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
