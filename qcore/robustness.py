"""Robustness: accuracy of a model (float or compressed) as a perturbation grows.

One row per strength s, on the split given (pass the test split):

- ``gaussian``: every input gets noise N(0, s^2) added **in the normalised units the model
  reads** (``x = (pixel - mean) / std`` per channel, see :mod:`qcore.data`; on MNIST
  s = 1 is 0.31 of the full pixel range), then is clamped to the valid range
  [(0 - mean) / std, (1 - mean) / std] of each channel.
- ``fgsm`` / ``pgd``: L-infinity attacks whose epsilon s is **in pixel units** (the range
  [0, 1]; s = 0.1 lets each pixel move by a tenth of black-to-white), converted to s / std
  per channel in the normalised units. White box: gradients of the cross-entropy flow
  through the very variant tested (the graph runtime, :mod:`qcore.graph`); fake-quantized
  activations pass the gradient straight through (STE), as rounding has zero gradient
  almost everywhere. FGSM takes one step of s * sign(grad); PGD starts at a uniform random
  point of the ball and takes ``steps`` steps of 2.5 * s / steps, each projected back
  onto the ball and the valid pixel range.
- ``weight_noise``: every weight of every weight layer (linear and convolution) becomes
  w * (1 + s * N(0, 1)), the compressed model's dequantized weights for a compressed
  model; the mean over ``seeds`` draws.
- ``bitflip``: a fraction s of the stored bits of a :class:`qcore.Compressed` flipped at
  random (exactly round(s * total bits), without repeats; the mean over ``seeds`` draws).
  A quantized layer stores b bits per kept (unpruned) weight: its code, two's complement
  for symmetric codes (a flip may give -2^(b-1), one code below the grid, which the
  hardware would also read), plain binary for asymmetric and 1-bit codes. A k-means layer
  stores b bits per kept weight too, its index into the codebook; an index a flip sends
  past the codebook's last centroid reads as 0. Bits are counted at their fixed width b,
  Huffman coding or not (a flip in a Huffman stream would also shift every code after it,
  which this does not model). A layer left in
  float stores the 32 bits of each float32 word (sign, exponent, mantissa), so
  ``qcore.compress(model, qcore.CompressionConfig(quant=None))`` gives the float model's
  own story. A flip that makes a logit inf or NaN counts that prediction as wrong.

Strength 0 is the clean model, evaluated exactly as :func:`qcore.evaluate` does.
``agreement`` is the fraction of examples whose prediction equals the clean prediction of
the same model. Nothing handed in is changed; every draw comes from ``seed``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from qcore.compress import Compressed, LayerResult, _weight_after, compress
from qcore.config import CompressionConfig
from qcore.data import Dataset
from qcore.evaluate import EVAL_BATCH
from qcore.executors import (
    Executor,
    check_refs,
    load_args,
    load_refs,
    ref_job,
    refs_key,
    worker_memo,
)
from qcore.fold import assert_eval
from qcore.graph import Variant, param_key
from qcore.refs import DatasetRef, ModelRef, Progress

__all__ = [
    "PERTURBATIONS",
    "INPUT_PERTURBATIONS",
    "WEIGHT_PERTURBATIONS",
    "robustness",
    "perturb_inputs",
    "flip_bits",
    "noisy_weights",
    "valid_range",
    "strength_unit",
    "check_strengths",
    "parse_strengths",
]

INPUT_PERTURBATIONS = ("gaussian", "fgsm", "pgd")
WEIGHT_PERTURBATIONS = ("weight_noise", "bitflip")
PERTURBATIONS = INPUT_PERTURBATIONS + WEIGHT_PERTURBATIONS
MAX_STEPS = 200
MAX_SEEDS = 50
_FLOAT_MASKS = torch.tensor([1 << i for i in range(31)] + [-(2**31)], dtype=torch.int32)


def strength_unit(perturbation: str) -> str:
    """What a strength of ``perturbation`` measures, in words (for tables and axes)."""
    return {
        "gaussian": "noise std (normalised input units)",
        "fgsm": "epsilon (pixel units, 0..1)",
        "pgd": "epsilon (pixel units, 0..1)",
        "weight_noise": "relative weight noise std",
        "bitflip": "fraction of stored bits flipped",
    }[_check_perturbation(perturbation)]


def _check_perturbation(perturbation: object) -> str:
    if perturbation not in PERTURBATIONS:
        raise ValueError(
            f"Unknown perturbation {perturbation!r}; choose one of {', '.join(PERTURBATIONS)}."
        )
    return str(perturbation)


def check_strengths(perturbation: str, strengths: Sequence[float]) -> list[float]:
    """The strengths as floats; ValueError with a sentence for one out of range."""
    try:
        values = [float(s) for s in strengths]
    except (TypeError, ValueError):
        raise ValueError(f"Strengths must be numbers; got {strengths!r}.") from None
    if not values:
        raise ValueError("Give at least one strength.")
    top = 1.0 if perturbation in ("fgsm", "pgd", "bitflip") else math.inf
    for s in values:
        if not math.isfinite(s) or s < 0 or s > top:
            what = "from 0 to 1" if top == 1.0 else "0 or more"
            raise ValueError(
                f"A {perturbation} strength must be a finite number {what}; got {s:g}."
            )
    return values


def parse_strengths(perturbation: str, text: str, name: str | None = None) -> tuple[float, ...]:
    """Strengths from text ("0 0.05 0.1" or "0, 0.05"), sorted without repeats, checked as
    :func:`robustness` checks them; ``name`` names the perturbation in the message.

    >>> parse_strengths("fgsm", "0.1, 0 0.1 0.05")
    (0.0, 0.05, 0.1)
    """
    from qcore.config import parse_number

    name = name or _check_perturbation(perturbation)
    parts = text.replace(",", " ").split()
    if not parts:
        raise ValueError(f"Give at least one strength for {name}.")
    try:
        values = tuple(sorted({parse_number(p) for p in parts}))
    except ValueError as e:
        raise ValueError(f"{name} strengths: {e}") from None
    check_strengths(perturbation, values)
    return values


# ---------------------------------------------------------------------------------------------
# The model as something to run: graph, replacement tensors, points


def _straight_through(point: Callable[[torch.Tensor], torch.Tensor]):
    def ste(t: torch.Tensor) -> torch.Tensor:
        return t + (point(t) - t).detach()

    return ste


def _variant(model: nn.Module | Compressed) -> Variant:
    """The model tested, as a variant whose replacement tensors are derived once."""
    if not isinstance(model, nn.Module | Compressed):
        raise ValueError(
            f"model must be a torch nn.Module or a qcore.Compressed; got {type(model).__name__}."
        )
    if not isinstance(model, Variant | Compressed):
        assert_eval(model, "testing robustness")
    v = Variant.of(model)  # a ValueError naming the line torch.fx cannot trace
    return v.with_tensors(v.replacements())


def _weight_keys(variant: Variant) -> list[str]:
    return [param_key(n, "weight") for n in variant.graph.layers]


def _with_ste(variant: Variant) -> Variant:
    """Forward the rounded activations, pass the gradient straight through them."""
    return variant.with_points({k: _straight_through(p) for k, p in variant.points.items()})


# ---------------------------------------------------------------------------------------------
# Inputs: the valid range, noise, attacks


def valid_range(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo, hi, std), each (1, C, 1, 1): the normalised images of pixels 0 and 1 per channel,
    and the std that turns pixel units into normalised units."""
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if mean is None or std is None:
        raise ValueError(
            "Input perturbations need the dataset's normalisation (mean and std per channel) "
            "to keep inputs in the valid pixel range; pass a qcore Dataset."
        )
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    # the same float32 operations as qcore.data, so a pixel of 0 or 1 sits exactly on an end
    return (0.0 - m) / s, (1.0 - m) / s, s


def _batch_generator(seed: int, *parts: int) -> torch.Generator:
    key = seed
    for p in parts:
        key = key * 1_000_003 + p
    return torch.Generator().manual_seed(key % (2**63))


def _input_grad(variant: Variant, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(_with_ste(variant)(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _perturb_batch(
    variant: Variant,
    perturbation: str,
    strength: float,
    x: torch.Tensor,
    y: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    gen: torch.Generator,
    steps: int,
    signs: dict[int, torch.Tensor] | None = None,
    batch: int = 0,
) -> torch.Tensor:
    """One batch perturbed. ``signs`` keeps FGSM's gradient sign per batch: it does not
    depend on epsilon, so one backward pass serves every strength of a curve."""
    lo, hi, std = bounds
    if perturbation == "gaussian":
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return torch.clamp(x + strength * noise, lo, hi)
    eps = strength / std  # pixel units -> normalised units, per channel
    if perturbation == "fgsm":
        if signs is None or batch not in signs:
            sign = _input_grad(variant, x, y).sign().to(torch.int8)
            if signs is not None:
                signs[batch] = sign
        else:
            sign = signs[batch]
        return torch.clamp(x + eps * sign.to(x.dtype), lo, hi)
    # PGD: random start in the ball, steps of 2.5 * eps / steps, projected each time
    start = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * eps
    adv = torch.clamp(x + start, lo, hi)
    alpha = 2.5 * eps / steps
    for _ in range(steps):
        adv = adv + alpha * _input_grad(variant, adv, y).sign()
        adv = torch.clamp(torch.minimum(torch.maximum(adv, x - eps), x + eps), lo, hi)
    return adv.detach()


def perturb_inputs(
    model: nn.Module | Compressed,
    dataset: Dataset,
    perturbation: str,
    strength: float,
    *,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    steps: int = 10,
) -> torch.Tensor:
    """The perturbed inputs (normalised, like ``dataset.x``) that :func:`robustness` feeds
    the model for ``gaussian``, ``fgsm`` or ``pgd`` at one strength; ``indices`` picks
    examples (default all). The same seed gives the same tensor as inside ``robustness``
    when every example is taken."""
    perturbation = _check_perturbation(perturbation)
    if perturbation not in INPUT_PERTURBATIONS:
        raise ValueError(f"{perturbation} perturbs weights, not inputs.")
    (strength,) = check_strengths(perturbation, [strength])
    _check_steps(steps)
    variant = _variant(model)
    bounds = valid_range(dataset)
    idx = torch.arange(len(dataset.y)) if indices is None else torch.as_tensor(indices)
    out = []
    for b, i in enumerate(range(0, len(idx), EVAL_BATCH)):
        sel = idx[i : i + EVAL_BATCH]
        x, y = dataset.inputs(sel), dataset.y[sel]
        if strength == 0:
            out.append(x.clone())
            continue
        gen = _batch_generator(seed, _strength_key(strength), b)
        out.append(_perturb_batch(variant, perturbation, strength, x, y, bounds, gen, steps))
    return torch.cat(out) if out else dataset.inputs(slice(0, 0)).clone()


def _check_steps(steps: object) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"PGD steps must be a whole number from 1 to {MAX_STEPS}; got {steps!r}.")


def _strength_key(strength: float) -> int:
    return int(round(strength * 1e6))


# ---------------------------------------------------------------------------------------------
# Weights: multiplicative noise and bit flips


def noisy_weights(
    model: nn.Module | Compressed, strength: float, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Every weight-layer weight as w * (1 + strength * N(0, 1)), new tensors by state-dict
    key (the compressed model's dequantized weights for a compressed model)."""
    variant = _variant(model)
    return _noisy(variant, strength, torch.Generator().manual_seed(seed))


def _noisy(variant: Variant, strength: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for key in _weight_keys(variant):
        w = variant.weight(key)
        out[key] = w * (1.0 + strength * torch.randn(w.shape, generator=gen, dtype=w.dtype))
    return out


def _stored_bits(r: LayerResult) -> tuple[torch.Tensor, int]:
    """(flat indices of the kept weights, bits per weight) of one compressed layer."""
    kept = (
        torch.arange(math.prod(r.shape))
        if r.mask is None
        else torch.nonzero(r.mask.reshape(-1)).reshape(-1)
    )
    return kept, (32 if r.qparams is None and r.codebook is None else r.bits)


def flip_bits(compressed: Compressed, fraction: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights after flipping ``round(fraction * stored bits)`` distinct stored bits at
    random, as new tensors by state-dict key (see the module docstring for what a layer
    stores). Nothing of ``compressed`` changes."""
    if not isinstance(compressed, Compressed):
        raise ValueError(_BITFLIP_NEEDS_COMPRESSED)
    (fraction,) = check_strengths("bitflip", [fraction])
    layers = [(r, *_stored_bits(r)) for r in compressed.layers]
    sizes = [len(kept) * bits for _, kept, bits in layers]
    total = sum(sizes)
    k = round(fraction * total)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=gen)[:k] if k else torch.empty(0, dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    start = 0
    for (r, kept, bits), size in zip(layers, sizes, strict=True):
        mine = chosen[(chosen >= start) & (chosen < start + size)] - start
        start += size
        if len(mine) == 0:
            continue
        # the bits of one weight are distinct, so their sum is their OR
        flips = torch.zeros(math.prod(r.shape), dtype=torch.int64)
        flips.index_add_(0, kept[mine // bits], torch.ones_like(mine) << (mine % bits))
        out[param_key(r.name, "weight")] = _flipped_weight(r, flips.reshape(r.shape), bits)
    return out


def _flipped_weight(r: LayerResult, flips: torch.Tensor, bits: int) -> torch.Tensor:
    if r.codebook is not None:  # k-means: b-bit indices into the codebook
        index = r.codes.to(torch.int64) ^ flips
        book = r.codebook
        inside = index < book.numel()
        values = torch.where(inside, book[index.clamp(max=max(book.numel() - 1, 0))],
                             torch.zeros(())) if book.numel() else torch.zeros(r.shape)
        return values if r.mask is None else torch.where(r.mask, values, torch.zeros(()))
    if r.qparams is None:  # float32 words: XOR their bit patterns
        w = r.dequantized.contiguous()
        word = w.view(torch.int32)
        mask, zero = torch.zeros_like(word), torch.zeros((), dtype=torch.int32)
        for b in range(32):  # 32 vectorised passes, one per bit position
            on = ((flips >> b) & 1).bool()
            if bool(on.any()):
                mask = mask | torch.where(on, _FLOAT_MASKS[b], zero)
        return (word ^ mask).view(torch.float32)
    qp = r.qparams
    codes = r.codes.to(torch.int64)
    if qp.binary or qp.qmin >= 0:  # plain binary codes
        new = codes ^ flips
    else:  # two's complement in b bits
        full = (1 << bits) - 1
        u = (codes & full) ^ flips
        new = torch.where(u >= (1 << (bits - 1)), u - (1 << bits), u)
    return _weight_after(r.float_weight, r.mask, qp, new)


_BITFLIP_NEEDS_COMPRESSED = (
    "Bit flips act on stored bits, which only a compressed model has: pass the "
    "qcore.Compressed from qcore.compress (for the float model's own float32 bits, pass "
    "qcore.compress(model, qcore.CompressionConfig(quant=None)))."
)


# ---------------------------------------------------------------------------------------------
# The curve


def _predict(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row, -1 (never a class) where a logit is inf or NaN."""
    pred = logits.argmax(dim=1)
    return torch.where(torch.isfinite(logits).all(dim=1), pred, torch.full_like(pred, -1))


def _target(model: nn.Module, config: CompressionConfig | None, calib: Dataset | None,
            perturbation: str) -> nn.Module | Compressed:  # fmt: skip
    """What the perturbation runs on: the model itself, or it compressed with ``config``
    (the stored form for bit flips, else the variant)."""
    if config is None:
        return model
    c = compress(model, config, calib=calib)
    return c if perturbation == "bitflip" else c.model


def _robustness_job(job: dict) -> tuple[dict, float]:
    """One strength's row and the clean accuracy, as that row of the in-process table."""
    model, dataset, calib = load_refs(job)
    config = None if job["config"] is None else CompressionConfig.from_dict(job["config"])
    key = ("robustness-target", *refs_key(job), json.dumps(job["config"], sort_keys=True),
           job["perturbation"] == "bitflip")  # fmt: skip
    target = worker_memo(key, lambda: _target(model, config, calib, job["perturbation"]))
    df = robustness(target, dataset, job["perturbation"], [job["strength"]], seed=job["seed"],
                    steps=job["steps"], seeds=job["seeds"])  # fmt: skip
    return df.to_dict("records")[0], df.attrs["clean_accuracy"]


def robustness(
    model: nn.Module | Compressed | ModelRef,
    dataset: Dataset | DatasetRef,
    perturbation: str,
    strengths: Sequence[float],
    *,
    seed: int = 0,
    progress: Progress | None = None,
    steps: int = 10,
    seeds: int = 3,
    config: CompressionConfig | None = None,
    calib: Dataset | DatasetRef | None = None,
    executor: Executor | None = None,
    model_bytes: bytes | None = None,
) -> pd.DataFrame:
    """Accuracy and agreement with the clean prediction at each strength (one row each).

    Columns: ``strength``, ``accuracy`` (mean over draws for weight perturbations),
    ``agreement``, ``accuracy_min`` and ``accuracy_max`` (over draws), ``draws``, ``n``
    and ``perturbation``. ``df.attrs`` holds ``clean_accuracy`` and ``unit``. See the
    module docstring for what each perturbation and its strength mean.

    With ``config`` the model is compressed first (activations calibrated on ``calib``) and
    the perturbation runs on that variant (bit flips on its stored form). ``model`` and
    ``dataset`` (and ``calib``) may be refs; with an ``executor`` they must be, and each
    strength runs there as one job: the same table as in process. A session model's bytes
    go as ``model_bytes``.
    """
    perturbation = _check_perturbation(perturbation)
    values = check_strengths(perturbation, strengths)
    _check_run(steps, seed, seeds, config)
    if executor is not None:
        check_refs(model, dataset, calib, model_bytes)
        if perturbation == "bitflip" and config is None:
            raise ValueError(_BITFLIP_NEEDS_COMPRESSED)
        refs = ref_job(model, dataset, calib, model_bytes)  # type: ignore[arg-type]
        jobs = [{**refs, "config": None if config is None else config.to_dict(),
                 "perturbation": perturbation, "strength": s, "seed": seed, "steps": steps,
                 "seeds": seeds} for s in values]  # fmt: skip
        return _on_executor(executor, jobs, perturbation, progress)
    model, dataset, calib = load_args(model, dataset, calib, model_bytes)
    if config is not None:
        model = _target(model, config, calib, perturbation)
    if perturbation == "bitflip" and not isinstance(model, Compressed):
        raise ValueError(_BITFLIP_NEEDS_COMPRESSED)
    variant = _variant(model)  # a clear sentence for an untraceable model
    bounds = valid_range(dataset) if perturbation in INPUT_PERTURBATIONS else None
    x_all, y_all = dataset.inputs(), dataset.y
    n = int(len(y_all))
    if n == 0:
        raise ValueError("The dataset is empty; there is nothing to evaluate.")
    batches = [(i, min(i + EVAL_BATCH, n)) for i in range(0, n, EVAL_BATCH)]
    draws = 1 if perturbation in ("gaussian", "fgsm", "pgd") else seeds
    total = sum(1 if s == 0 else draws for s in values) * len(batches)
    done = 0

    def tick(row: dict) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, row)

    clean_run = variant.runner()
    with torch.inference_mode():
        clean = torch.cat([_predict(clean_run(x_all[a:b])) for a, b in batches])
    clean_acc = int((clean == y_all).sum()) / n

    rows = []
    signs: dict[int, torch.Tensor] = {}  # FGSM's gradient signs, shared by the strengths
    for s in values:
        if s == 0:  # the clean model, evaluated as qcore.evaluate does
            for _ in batches:
                tick({"strength": s})
            accs, agrees = [clean_acc], [1.0]
        else:
            accs, agrees = [], []
            for d in range(draws):
                pred = _draw(variant, perturbation, s, x_all, y_all, batches, bounds, model,
                             seed, d, steps, lambda s=s: tick({"strength": s}),
                             signs)  # fmt: skip
                accs.append(int((pred == y_all).sum()) / n)
                agrees.append(int((pred == clean).sum()) / n)
        rows.append({
            "perturbation": perturbation, "strength": s,
            "accuracy": float(np.mean(accs)), "agreement": float(np.mean(agrees)),
            "accuracy_min": min(accs), "accuracy_max": max(accs),
            "draws": len(accs), "n": n,
        })  # fmt: skip
    df = pd.DataFrame(rows)
    df.attrs.update({"clean_accuracy": clean_acc, "unit": strength_unit(perturbation),
                     "perturbation": perturbation})  # fmt: skip
    return df


def _check_run(steps: int, seed: int, seeds: int, config: CompressionConfig | None) -> None:
    """Refuse a bad number of attack steps, seed, number of draws or config."""
    _check_steps(steps)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be a whole number; got {seed!r}.")
    if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= MAX_SEEDS:
        raise ValueError(f"seeds must be a whole number from 1 to {MAX_SEEDS}; got {seeds!r}.")
    if config is not None and not isinstance(config, CompressionConfig):
        raise ValueError("config must be a CompressionConfig (or None for the model itself).")


def _on_executor(executor: Executor, jobs: list[dict], perturbation: str,
                 progress: Progress | None) -> pd.DataFrame:  # fmt: skip
    """One job per strength on ``executor``; the rows in order, as in process."""
    done = [0]

    def on_result(_i: int, out: tuple[dict, float]) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(jobs), out[0])

    outs = executor.map(_robustness_job, jobs, on_result)
    df = pd.DataFrame([row for row, _ in outs])
    df.attrs.update({"clean_accuracy": outs[0][1], "unit": strength_unit(perturbation),
                     "perturbation": perturbation})  # fmt: skip
    return df


def _draw(
    variant: Variant,
    perturbation: str,
    s: float,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    batches: list[tuple[int, int]],
    bounds,
    model,
    seed: int,
    d: int,
    steps: int,
    tick: Callable[[], None],
    signs: dict[int, torch.Tensor],
) -> torch.Tensor:
    """Predictions of one draw of one strength over every batch."""
    preds = []
    if perturbation in INPUT_PERTURBATIONS:
        for b, (lo, hi) in enumerate(batches):
            gen = _batch_generator(seed, _strength_key(s), b)
            x, y = x_all[lo:hi], y_all[lo:hi]
            adv = _perturb_batch(variant, perturbation, s, x, y, bounds, gen, steps, signs, b)
            with torch.inference_mode():
                preds.append(_predict(variant(adv)))
            tick()
        return torch.cat(preds)
    draw_seed = (seed * 1_000_003 + _strength_key(s)) * 1_000_003 + d
    if perturbation == "weight_noise":
        changed = _noisy(variant, s, torch.Generator().manual_seed(draw_seed % (2**63)))
    else:
        changed = flip_bits(model, s, draw_seed % (2**63))
    run = variant.with_tensors({**variant.replacements(), **changed}).runner()
    with torch.inference_mode():
        for lo, hi in batches:
            preds.append(_predict(run(x_all[lo:hi])))
            tick()
    return torch.cat(preds)
