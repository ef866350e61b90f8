"""Mixed precision: a bit width per layer that fits a packed-size budget.

Packed sizes add up layer by layer (each layer is packed on its own), so the size of any
assignment is exact without compressing it: rest + sum_k size_k(b_k), with size_k(b) read
from one ``compress`` per candidate bit width. The search treats the accuracy cost of a
layer as additive too, taking it from :func:`qcore.sensitivity.layer_sensitivity` (the
drop when only that layer is quantized), and solves the knapsack exactly: layer by layer
it keeps the (size, cost) pairs no other pair beats in both, and at the end the cheapest
pair within the budget. It does this twice, once with the accuracy drop as the cost (loss
increase breaking ties) and once with the loss increase (smoother on small splits), then
compresses and evaluates both answers and every uniform bit width, for real.
The best mixed answer is returned unless a uniform one is better, so the result is never
worse than the best uniform choice within the same budget.

Two splits are kept apart: the *search* split (``search_dataset``, the calibration split
on the pages) on which the bits are chosen, and the evaluation split (``dataset``, the
test split) on which the returned accuracies are measured. A claim that the choice beats
a uniform width is made on the evaluation split only (:attr:`MixedPrecisionResult.beats`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import pandas as pd
from torch import nn

from qcore.compress import Compressed, compress
from qcore.config import ActQuantConfig, CompressionConfig, QuantConfig, check_bits
from qcore.data import Dataset
from qcore.evaluate import EVAL_BATCH, Metrics, evaluate
from qcore.executors import Executor, check_refs, load_args
from qcore.fold import weight_layers
from qcore.graph import fold_batchnorm
from qcore.refs import DatasetRef, ModelRef, Progress
from qcore.sensitivity import layer_sensitivity

__all__ = ["DEFAULT_CANDIDATE_BITS", "MixedPrecisionResult", "UniformChoice",
           "mixed_precision", "knapsack_bits"]

DEFAULT_CANDIDATE_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class UniformChoice:
    """One candidate bit width used for every layer: its packed size and its accuracies."""

    bits: int
    size_bytes: int  # packed bytes with every layer at ``bits``
    fits: bool  # size_bytes <= the budget
    search_accuracy: float  # simulated top-1 on the search split, where choices are made
    test_accuracy: float | None  # simulated top-1 on the evaluation (test) split; None when
    # it does not fit


@dataclass(frozen=True)
class MixedPrecisionResult:
    """Per-layer bit widths within a budget, next to every uniform width.

    ``accuracy``, ``uniform_accuracy`` and ``test_accuracy`` in ``uniform`` are measured
    on the evaluation (test) split; ``search_accuracy`` on the search split the bits were
    chosen on.
    """

    layer_bits: dict[str, int]  # layer name -> bits, in model order
    size_bytes: int  # packed bytes of the chosen assignment
    accuracy: float  # simulated top-1 of the chosen assignment on the evaluation split
    budget_bytes: int
    uniform_bits: int  # the fitting uniform width with the best search accuracy
    uniform_size_bytes: int
    uniform_accuracy: float  # its accuracy on the evaluation split
    note: str  # for the user: which number comes from which split
    chose_uniform: bool = False  # True when no mixed assignment beat the uniform one
    loss: float = math.nan
    uniform_loss: float = math.nan
    float_accuracy: float = math.nan
    float_size_bytes: int = 0
    config: QuantConfig = field(default_factory=QuantConfig)  # reproduces the choice
    uniform: tuple[UniformChoice, ...] = ()  # every candidate width, ascending
    beats: tuple[int, ...] = ()  # fitting uniform widths with strictly lower test accuracy
    search_accuracy: float = math.nan  # the chosen assignment's accuracy on the search split

    @property
    def ratio(self) -> float:
        return self.float_size_bytes / self.size_bytes if self.size_bytes else math.inf


def knapsack_bits(
    sizes: Mapping[str, Mapping[int, int]],
    costs: Mapping[str, Mapping[int, float]],
    budget: int,
    tiebreak: Mapping[str, Mapping[int, float]] | None = None,
) -> dict[str, int] | None:
    """The bits per layer of least total cost whose total size is at most ``budget``.

    ``sizes[k][b]`` and ``costs[k][b]`` are layer k's bytes and cost at ``b`` bits; costs
    add up over layers. Exact: after each layer only the (size, cost) pairs that no other
    pair beats in both are kept. Among equal costs the ``tiebreak`` sum, then the larger
    size, wins. ``None`` when nothing fits.

    >>> sizes = {"a": {2: 10, 8: 40}, "b": {2: 10, 8: 40}}
    >>> costs = {"a": {2: 0.5, 8: 0.0}, "b": {2: 0.1, 8: 0.0}}
    >>> knapsack_bits(sizes, costs, 50)
    {'a': 8, 'b': 2}
    """
    names = list(sizes)
    tiebreak = tiebreak or {k: dict.fromkeys(sizes[k], 0.0) for k in names}
    min_after = [0] * (len(names) + 1)  # smallest size of the layers after position i
    for i in range(len(names) - 1, -1, -1):
        min_after[i] = min_after[i + 1] + min(sizes[names[i]].values())
    # state: (size, cost, tiebreak, bits per layer so far)
    states: list[tuple[int, float, float, tuple[int, ...]]] = [(0, 0.0, 0.0, ())]
    for i, k in enumerate(names):
        grown = [
            (s + sizes[k][b], c + costs[k][b], t + tiebreak[k][b], bits + (b,))
            for s, c, t, bits in states
            for b in sorted(sizes[k])
            if s + sizes[k][b] + min_after[i + 1] <= budget
        ]
        # keep the pairs not beaten in both size and (cost, tiebreak)
        grown.sort(key=lambda st: (st[0], st[1], st[2]))
        states, best = [], None
        for st in grown:
            if best is None or (st[1], st[2]) < best:
                states.append(st)
                best = (st[1], st[2])
        if not states:
            return None
    s, c, t, bits = min(states, key=lambda st: (st[1], st[2], -st[0]))
    return dict(zip(names, bits, strict=True))


def _evaluate(model, dataset, quant: QuantConfig, fold_bn: bool, batch_size: int,
              act: ActQuantConfig | None, calib: Dataset | None):
    c = compress(model, CompressionConfig(quant=quant, fold_bn=fold_bn, act=act), calib=calib)
    return c, evaluate(c.model, dataset, batch_size=batch_size)


def _check_arguments(quant: QuantConfig | None, candidate_bits: Iterable[int] | int,
                     budget_bytes: object) -> tuple[QuantConfig, list[int], int]:  # fmt: skip
    """The scheme template, the sorted candidate widths and the budget in bytes (checked)."""
    quant = QuantConfig() if quant is None else quant
    if not isinstance(quant, QuantConfig):
        raise ValueError("quant must be a QuantConfig (or None for the default scheme).")
    if isinstance(candidate_bits, int):
        candidate_bits = (candidate_bits,)
    cands = sorted({check_bits(b, "candidate bits") for b in candidate_bits})
    if not cands:
        raise ValueError("Give at least one candidate bit width, e.g. 2 4 8.")
    if (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int | float)
            or not math.isfinite(budget_bytes) or budget_bytes <= 0):
        raise ValueError(f"The budget must be a positive number of bytes; got {budget_bytes!r}.")
    return quant, cands, int(budget_bytes)


def _assignments(sens: pd.DataFrame, names: list[str], sizes: dict[str, dict[int, int]],
                 budget: int) -> list[dict[str, int]]:  # fmt: skip
    """The knapsack's per-layer bits within ``budget`` (bytes of the weight layers), once
    minimising the summed accuracy drops (ties by loss) and once the summed loss increases
    (ties by drop), from the one-layer-at-a-time sensitivity table."""
    drop: dict[str, dict[int, float]] = {k: {} for k in names}
    dloss: dict[str, dict[int, float]] = {k: {} for k in names}
    for r in sens.itertuples(index=False):
        drop[r.layer][int(r.setting)] = float(r.drop)
        dloss[r.layer][int(r.setting)] = float(r.loss_increase)
    out = []
    for costs, ties in ((drop, dloss), (dloss, drop)):
        bits = knapsack_bits(sizes, costs, budget, ties)
        if bits is not None:  # None cannot happen once the smallest size fits: a guard
            out.append(bits)
    return out


def mixed_precision(
    model: nn.Module | ModelRef,
    dataset: Dataset | DatasetRef,
    budget_bytes: int,
    candidate_bits: Iterable[int] = DEFAULT_CANDIDATE_BITS,
    *,
    quant: QuantConfig | None = None,
    search_dataset: Dataset | DatasetRef | None = None,
    fold_bn: bool = True,
    batch_size: int = EVAL_BATCH,
    progress: Progress | None = None,
    act: ActQuantConfig | None = None,
    calib: Dataset | DatasetRef | None = None,
    executor: Executor | None = None,
    model_bytes: bytes | None = None,
) -> MixedPrecisionResult:
    """Per-layer bit widths from ``candidate_bits`` that fit ``budget_bytes`` (packed).

    ``quant`` is the scheme template (symmetric, per channel, clip); its ``bits`` are
    replaced. The search (sensitivity and the final pick) runs on ``search_dataset``,
    by default ``dataset``; pass a calibration split to keep the test split unseen. The
    accuracies returned are on ``dataset``. The result is never worse on the search data
    than the best uniform width that fits; on ``dataset`` it may be, and ``beats`` and
    ``note`` say so honestly. ``progress(done, total, {"phase": ...})`` counts every step
of every phase (compressing, measuring the uniform widths, each layer alone, the choices,
the test split) and names the phase. With ``act``,
    every candidate is measured with its activations quantized too (calibrated on
    ``calib``, by default ``search_dataset``); the per-layer costs stay weight-only.

    ``model`` and the datasets may be refs. With an ``executor`` they must be: the
    sensitivity pass (each layer alone at each width, the independent grid inside) runs
    there, one job per layer, and the rest here; the result is the same as in process.
    """
    quant, cands, budget = _check_arguments(quant, candidate_bits, budget_bytes)
    refs = None
    if executor is not None:
        search_ref = dataset if search_dataset is None else search_dataset
        check_refs(model, dataset, search_ref, model_bytes)
        check_refs(model, search_ref, calib, model_bytes)
        refs = (model, search_ref)
    if isinstance(search_dataset, DatasetRef) and search_dataset == dataset:
        search_dataset = None  # the same split: not held out
    model, dataset, search_dataset = load_args(model, dataset, search_dataset, model_bytes)
    calib = calib.load() if isinstance(calib, DatasetRef) else calib
    search = dataset if search_dataset is None else search_dataset
    calib = search if calib is None else calib
    if act is None:
        calib = None

    base = fold_batchnorm(model) if fold_bn else model
    names = list(weight_layers(base))
    if not names:
        raise ValueError("The model has no linear or convolution layers to quantize.")
    held_out = search is not dataset
    report = _Phases(progress, [
        len(cands), 1 + len(cands), len(names) * len(cands), 2,
        len(cands) + 1 if held_out else 0,
    ])  # fmt: skip
    run = _Search(model, search, quant, fold_bn, batch_size, act, calib, report)
    per_bits, sizes, rest = run.each_width(cands, names, budget)
    ref = evaluate(model, dataset, batch_size=batch_size)
    report.step(1, "Measuring the float model")
    searched, uniform, ub = run.uniform_widths(per_bits, budget)

    sens = layer_sensitivity(
        *(refs or (model, search)), bits=cands, prune_rates=(), quant=quant, fold_bn=fold_bn,
        batch_size=batch_size, executor=executor, model_bytes=model_bytes,
        progress=None if progress is None else report.inner(
            2, f"Measuring each layer alone on {_split_name(search)}"),
    )  # fmt: skip
    best = run.best_assignment(_assignments(sens, names, sizes, budget - rest), names, cands)
    mixed_ok = best is not None and (
        (best[2].accuracy, -best[2].loss) >= (uniform[ub].accuracy, -uniform[ub].loss)
    )
    if mixed_ok:
        q, c, m = best
    else:
        q, c, m = replace(quant, bits=ub, layer_bits=()), per_bits[ub], uniform[ub]
    m_search = m
    tested, m = run.on_test_split(dataset, per_bits, uniform, ub, c, m, mixed_ok)
    report.finish()
    um = tested[ub]
    if c.size_bytes > budget:  # sizes are additive by construction; never expected
        raise RuntimeError("The chosen bits do not fit the budget after all; please report.")
    layer_bits = {k: q.bits_for(k) for k in names}
    choices = tuple(
        UniformChoice(bits=b, size_bytes=per_bits[b].size_bytes, fits=b in uniform,
                      search_accuracy=searched[b].accuracy,
                      test_accuracy=tested[b].accuracy if b in tested else None)
        for b in cands
    )  # fmt: skip
    beats = tuple(u.bits for u in choices if u.fits and u.test_accuracy < m.accuracy)
    same = sorted(set(layer_bits.values()))
    note = _note(
        budget=budget, kind="mixed" if len(same) > 1 else "uniform" if mixed_ok else "fallback",
        bits=same[0], ub=ub, size=c.size_bytes, accuracy=m.accuracy,
        search_accuracy=m_search.accuracy, uniform_search=uniform[ub].accuracy,
        choices=choices, beats=beats,
        search_split=_split_name(search), test_split=_split_name(dataset),
        held_out=held_out,
    )  # fmt: skip
    return MixedPrecisionResult(
        layer_bits=layer_bits,
        size_bytes=c.size_bytes,
        accuracy=m.accuracy,
        budget_bytes=budget,
        uniform_bits=ub,
        uniform_size_bytes=per_bits[ub].size_bytes,
        uniform_accuracy=um.accuracy,
        note=note,
        chose_uniform=not mixed_ok,
        loss=m.loss,
        uniform_loss=um.loss,
        float_accuracy=ref.accuracy,
        float_size_bytes=c.float_size_bytes,
        config=q,
        uniform=choices,
        beats=beats,
        search_accuracy=m_search.accuracy,
    )


@dataclass
class _Search:
    """The steps of :func:`mixed_precision` that compress and measure candidates: on the
    search split, with the same scheme template, folding, batch size and activations."""

    model: nn.Module
    search: Dataset
    quant: QuantConfig
    fold_bn: bool
    batch_size: int
    act: ActQuantConfig | None
    calib: Dataset | None
    report: _Phases

    def each_width(self, cands: list[int], names: list[str], budget: int
                   ) -> tuple[dict[int, Compressed], dict[str, dict[int, int]], int]:  # fmt: skip
        """Every layer compressed at each candidate width (one compress per width): the
        compressed models, each layer's exact packed size per width, and the bytes outside
        the layers (the same at every width). Raises when even the lowest width overflows."""
        per_bits = {}
        for b in cands:
            per_bits[b] = compress(self.model, CompressionConfig(
                quant=replace(self.quant, bits=b, layer_bits=()), fold_bn=self.fold_bn,
                act=self.act), calib=self.calib)  # fmt: skip
            self.report.step(0, f"Compressing every layer at {b} bits")
        sizes = {k: {b: per_bits[b].layer(k).size_bytes for b in cands} for k in names}
        c0 = per_bits[cands[0]]
        rest = c0.size_bytes - sum(sizes[k][cands[0]] for k in names)
        if budget < c0.size_bytes:
            raise ValueError(
                f"A budget of {budget:,} bytes is below the smallest possible packed size, "
                f"{c0.size_bytes:,} bytes (every layer at {cands[0]} bits); raise the budget "
                "or add a lower candidate bit width."
            )
        return per_bits, sizes, rest

    def uniform_widths(self, per_bits: dict[int, Compressed], budget: int
                       ) -> tuple[dict[int, Metrics], dict[int, Metrics], int]:  # fmt: skip
        """Every uniform width on the search split; those that fit; the best that fits (the
        reference the per-layer choice must reach)."""
        searched = {}
        for b, c in per_bits.items():
            searched[b] = evaluate(c.model, self.search, batch_size=self.batch_size)
            self.report.step(1, f"Measuring uniform {b} bits on {_split_name(self.search)}")
        uniform = {b: r for b, r in searched.items() if per_bits[b].size_bytes <= budget}
        ub = max(uniform, key=lambda b: (uniform[b].accuracy, -uniform[b].loss, -b))
        return searched, uniform, ub

    def best_assignment(self, assignments: Iterable[dict[str, int]], names: list[str],
                        cands: list[int]
                        ) -> tuple[QuantConfig, Compressed, Metrics] | None:  # fmt: skip
        """Each distinct per-layer choice measured on the search split; the best (accuracy,
        then loss, then the smaller size), or None when no choice fits."""
        tried = {}
        for bits in assignments:
            key = tuple(bits[k] for k in names)
            if key not in tried:
                q = replace(self.quant, bits=cands[-1], layer_bits=bits)
                c, m = _evaluate(self.model, self.search, q, self.fold_bn, self.batch_size,
                                 self.act, self.calib)  # fmt: skip
                tried[key] = (q, c, m)
            self.report.step(3, "Trying the per-layer choices that fit the budget")
        if not tried:
            return None
        return tried[max(tried, key=lambda k: (tried[k][2].accuracy, -tried[k][2].loss,
                                               -tried[k][1].size_bytes))]  # fmt: skip

    def on_test_split(self, dataset: Dataset, per_bits: dict[int, Compressed],
                      uniform: dict[int, Metrics], ub: int, chosen: Compressed,
                      m: Metrics, mixed_ok: bool
                      ) -> tuple[dict[int, Metrics], Metrics]:  # fmt: skip
        """Every fitting uniform width and the choice on the evaluation split (the search
        runs themselves when the search split is the evaluation split)."""
        held_out = self.search is not dataset
        tested = {}
        for b in uniform:
            tested[b] = (evaluate(per_bits[b].model, dataset, batch_size=self.batch_size)
                         if held_out else uniform[b])  # fmt: skip
            if held_out:
                self.report.step(4, f"Measuring uniform {b} bits on {_split_name(dataset)}")
        if held_out:
            m = tested[ub] if not mixed_ok else evaluate(chosen.model, dataset,
                                                         batch_size=self.batch_size)
            self.report.step(4, f"Measuring the choice on {_split_name(dataset)}")
        return tested, m


class _Phases:
    """Progress over the search's phases, each a number of steps: ``progress(done, total,
    {"phase": name})`` counts every step of every phase, so the bar ends when the work does."""

    def __init__(self, progress: Progress | None, sizes: list[int]):
        self.progress, self.sizes = progress, list(sizes)
        self.done = [0] * len(sizes)

    def _emit(self, phase: str) -> None:
        if self.progress is not None:
            self.progress(sum(self.done), sum(self.sizes), {"phase": phase})

    def step(self, i: int, phase: str) -> None:
        """One step of phase ``i`` done (a phase that runs over its size grows)."""
        self.done[i] += 1
        self.sizes[i] = max(self.sizes[i], self.done[i])
        self._emit(phase)

    def inner(self, i: int, phase: str) -> Progress:
        """A ``progress`` for work that reports its own (done, total): phase ``i``."""

        def report(done: int, total: int, row: dict) -> None:
            self.sizes[i], self.done[i] = total, done
            self._emit(phase)

        return report

    def finish(self) -> None:
        """Phases that ran fewer steps than planned (choices already tried) end here."""
        self.sizes = list(self.done)
        self._emit("Done")


def _split_name(data: Dataset) -> str:
    split = getattr(data, "split", "") or "evaluation"
    return f"the {'calibration' if split == 'calib' else split} split"


def _widths(bits: Iterable[int]) -> str:
    """"2 bits", "2 and 3 bits", "2, 3 and 4 bits"."""
    b = [str(x) for x in bits]
    return (b[0] if len(b) == 1 else ", ".join(b[:-1]) + " and " + b[-1]) + " bits"


def _note(
    *,
    budget: int,
    kind: str,
    bits: int,
    ub: int,
    size: int,
    accuracy: float,
    search_accuracy: float,
    uniform_search: float,
    choices: tuple[UniformChoice, ...],
    beats: tuple[int, ...],
    search_split: str,
    test_split: str,
    held_out: bool,
) -> str:
    """What was chosen where, and how it compares on the test split with each fitting
    uniform width; never "beats" of a width that reaches the same test accuracy.

    ``kind``: "fallback" (no mixed assignment beat uniform ``ub`` bits, which is returned),
    "uniform" (the search itself gave every layer ``bits``) or "mixed".
    """
    if kind == "fallback":
        first = (f"No mixed assignment scored better on {search_split}, where the bits are "
                 f"chosen, than uniform {ub} bits ({uniform_search:.2%} there), so uniform "
                 f"{ub} bits is returned: {accuracy:.2%} on {test_split} in {size:,} bytes.")
    elif kind == "uniform":
        first = (f"Within {budget:,} bytes the best choice on {search_split} is uniform, every "
                 f"layer at {bits} bits: {accuracy:.2%} on {test_split} in {size:,} bytes.")
    elif not held_out:  # one dataset: one number per choice
        first = (f"Chosen and measured on {test_split}, mixed precision reaches "
                 f"{accuracy:.2%} in {size:,} bytes, against {uniform_search:.2%} for "
                 f"uniform {ub} bits.")
    else:
        first = (f"Chosen on {search_split} ({search_accuracy:.2%} there, against "
                 f"{uniform_search:.2%} for uniform {ub} bits), mixed precision reaches "
                 f"{accuracy:.2%} on {test_split} in {size:,} bytes.")
    itself = bits if kind != "mixed" else None  # a uniform answer is not compared with itself
    others = []
    for u in choices:
        if not u.fits or u.bits == itself or u.bits in beats:
            continue
        than = ("smaller" if u.size_bytes < size
                else "larger" if u.size_bytes > size else "the same size")
        how = (f"the same {u.test_accuracy:.2%}" if u.test_accuracy == accuracy
               else f"{u.test_accuracy:.2%}, more")
        others.append(f"uniform {u.bits} bits ({u.size_bytes:,} bytes, {than}) reaches {how}")
    parts = []
    if beats:
        parts.append(f"it beats uniform {_widths(beats)}")
    parts += others
    if not parts:
        return first
    rest = "; ".join(parts)
    return f"{first} On {test_split} {rest}."
