"""The records the pages draw from: a Playground result, the newly wrong images, the
per-layer table (and how its columns are shown), and the results download built from them.

The records hold plain, picklable values, so ``st.cache_data`` can keep them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import streamlit as st

import qcore
from qcore import report, teach
from qcore.config import Settings


@dataclass(frozen=True, eq=False)
class Result:
    """What the Playground shows for one (model, dataset, settings): plain, picklable values."""

    accuracy: float  # simulated: fake-quantized weights in float arithmetic
    float_accuracy: float
    loss: float
    n: int
    size_bytes: int  # packed
    float_size_bytes: int
    ratio: float
    sparsity: float  # pruned + rounded_zero
    pruned: float  # fraction of the compressed layers' weights set to zero by pruning
    rounded_zero: float  # fraction that are zero because rounding made them so
    sqnr_db: float  # whole model: total signal over total error (inf: nothing changed)
    mean_sqnr_db: float  # the mean of the per-layer SQNRs (kept for the JSON download)
    agreement: float  # fraction of test predictions equal to the float model's
    predictions: np.ndarray  # int64 [N]
    confusion: np.ndarray  # int64 [C, C]
    float_confusion: np.ndarray
    layers: pd.DataFrame
    shapes: dict[str, tuple[int, ...]]  # weight shape per compressed layer
    seconds: float  # time to compress and evaluate
    # where each layer's packed bytes go (:func:`size_table`), beside ``layers``
    sizes: pd.DataFrame | None = None
    clip_note: str = ""  # an absolute clip above a layer's max|w| (:func:`qcore.teach.clip_note`)


def make_result(
    comp: qcore.Compressed, m: qcore.Metrics, f: qcore.Metrics, seconds: float
) -> Result:
    """The record of a compressed model ``comp``, its metrics ``m`` and the float ones ``f``."""
    return Result(
        accuracy=m.accuracy,
        float_accuracy=f.accuracy,
        loss=m.loss,
        n=m.n,
        size_bytes=comp.size_bytes,
        float_size_bytes=comp.float_size_bytes,
        ratio=comp.ratio,
        sparsity=comp.sparsity,
        pruned=comp.pruned,
        rounded_zero=comp.rounded_zero,
        sqnr_db=comp.sqnr_db,
        mean_sqnr_db=comp.mean_sqnr_db,
        agreement=qcore.agreement(m, f),
        predictions=m.predictions,
        confusion=m.confusion,
        float_confusion=f.confusion,
        layers=layer_table(comp),
        shapes={s.name: s.shape for s in comp.layers},
        seconds=seconds,
        sizes=size_table(comp),
        clip_note=teach.clip_note(comp),
    )


def layer_table(compressed: qcore.Compressed) -> pd.DataFrame:
    """One row per compressed weight layer (:func:`qcore.report.layer_rows`); the rows of
    the JSON download."""
    return pd.DataFrame(report.layer_rows(compressed))


def size_table(compressed: qcore.Compressed) -> pd.DataFrame:
    """One row per compressed weight layer: where its packed bytes go
    (:attr:`qcore.LayerResult.size_parts`, ``code_bits``, ``index_bits``) and how many
    shared values a k-means layer has (None on a uniform grid or in float)."""
    return pd.DataFrame([{
        "layer": s.name,
        "shared values": None if s.codebook is None else int(s.codebook.numel()),
        "code bits": s.code_bits,
        "index bits": s.index_bits,
        "codebook bytes": s.size_parts["codebook_bytes"],
        "table bytes": s.size_parts["table_bytes"],
    } for s in compressed.layers])  # fmt: skip


def _num(v: float) -> str:
    return f"{v:.4g}".replace("-", "−")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _range_text(lo: Any, hi: Any, groups: int, unit: str = "") -> str:
    """``a … b`` (per tensor), ``a … b over N channels`` (per channel), or ``float32``."""
    if _missing(lo) or _missing(hi):
        return "float32"
    text = _num(lo) if lo == hi else f"{_num(lo)} … {_num(hi)}"
    return text + unit + (f" over {groups} channels" if groups > 1 else "")


def _channels(n: int, shape: str) -> str:
    """`` (32 channels)``, or `` (23 of 32 channels kept)`` when pruning removed some whole
    (the row then describes the kept ones: :func:`qcore.report.layer_row`).

    >>> _channels(32, "32×1×3×3"), _channels(23, "32×1×3×3")
    (' (32 channels)', ' (23 of 32 channels kept)')
    """
    total = int(str(shape).split("×")[0])
    return f" ({n} channels)" if n >= total else f" ({n} of {total} channels kept)"


def layer_display(table: pd.DataFrame, sizes: pd.DataFrame | None = None) -> pd.DataFrame:
    """The per-layer table as the Playground shows it: text where a number needs words
    (an unchanged layer's SQNR, a float layer's grid), the rest as numbers; with ``sizes``
    (:func:`size_table`, same layers) the size columns before the packed bytes."""
    if sizes is not None:
        table = table.merge(sizes, on="layer", how="left", sort=False)
    out = pd.DataFrame({"layer": table["layer"], "kind": table["kind"], "shape": table["shape"],
                        "params": table["params"], "bits": table["bits"]})  # fmt: skip
    out["pruned"] = table["pruned"]
    out["rounded to zero"] = table["rounded to zero"]
    out["SQNR (dB)"] = [
        "unchanged" if _missing(v) else f"{v:.1f}" for v in table["SQNR (dB)"]
    ]
    g = table["channels"].tolist()
    # a k-means layer has a codebook of shared values instead of a grid, scale and zero point
    shared = (table["shared values"].tolist() if "shared values" in table
              else [None] * len(table))  # fmt: skip
    out["grid range"] = [
        f"k-means: {int(k)} shared values" if not _missing(k)
        else _range_text(lo, hi, 1) + ("" if _missing(lo) or n <= 1 else _channels(n, shape))
        for lo, hi, n, k, shape in zip(table["grid low"], table["grid high"], g, shared,
                                       table["shape"], strict=True)
    ]
    out["scale Δ"] = [
        "none (codebook)" if not _missing(k) else _range_text(a, b, n) for a, b, n, k in
        zip(table["scale min"], table["scale max"], g, shared, strict=True)
    ]  # fmt: skip
    out["zero point"] = [
        "none (codebook)" if not _missing(k)
        else ("float32" if bits >= 32 else "none (±α)") if _missing(a)
        else (_num(a) if a == b else f"{_num(a)} … {_num(b)}")
        for a, b, bits, k in zip(table["zero point min"], table["zero point max"],
                                 table["bits"], shared, strict=True)
    ]  # fmt: skip
    for col in SIZE_COLUMNS:
        if col in table:
            out[col] = table[col]
    for col in ("packed bytes", "float32 bytes", "encoding"):
        out[col] = table[col]
    if "rounding changed" in table:  # AdaRound: the share rounded the other way
        out["rounding changed"] = table["rounding changed"]
    return out


def layer_display_order(shown: pd.DataFrame) -> list[str]:
    """The columns of :func:`layer_display`'s table in the order a screen shows them: when
    a codebook or Huffman tables take bytes, where the bytes go comes right after the bit
    width (at 1400 px those columns were past the table's right edge); columns that say
    nothing for every layer (0 bytes everywhere, "none (codebook)" everywhere) are left
    out of the view (the data and the download keep them)."""
    def empty(col: str) -> bool:
        values = shown[col].tolist() if col in shown else []
        return all(v in (0, None, "none (codebook)") for v in values)

    grid = ["pruned", "rounded to zero", "SQNR (dB)", "grid range", "scale Δ", "zero point"]
    sizes = [*SIZE_COLUMNS, "packed bytes", "float32 bytes", "encoding"]
    head = ["layer", "kind", "shape", "params", "bits"]
    bytes_first = not (empty("codebook bytes") and empty("table bytes"))
    order = head + (sizes + grid if bytes_first else grid + sizes)
    return [c for c in order if c in shown and not (c in (*SIZE_COLUMNS[1:], "scale Δ",
                                                          "zero point") and empty(c))]


# The Trade-offs table's columns: SQNR is the whole model's, one definition on every page.
SWEEP_SHOWN = ("bits", "prune", "clip", "scheme", "granularity", "rounding", "equalize",
               "bias_correction", "act_bits", "accuracy", "agreement", "size_bytes", "ratio",
               "sparsity", "sqnr_db", "pareto")  # fmt: skip

# Where each layer's packed bytes go, as the Playground's table shows them.
SIZE_COLUMNS = ("code bits", "index bits", "codebook bytes", "table bytes")


# How the per-layer table's columns are shown, wherever a page draws it.
LAYER_TABLE_COLUMNS = {
    "params": st.column_config.NumberColumn("params", format="localized"),
    "bits": st.column_config.NumberColumn("bits", help="32 = left in float"),
    "sparsity": st.column_config.NumberColumn(
        "sparsity", format="percent", help="pruned + rounded to zero"
    ),
    "pruned": st.column_config.NumberColumn(
        "pruned", format="percent", help="Weights set to exactly zero by pruning."
    ),
    "rounded to zero": st.column_config.NumberColumn(
        "rounded to zero",
        format="percent",
        help="Weights not pruned that quantization rounded to exactly zero.",
    ),
    "SQNR (dB)": st.column_config.NumberColumn(
        "SQNR (dB)", format="%.1f", help="empty = unchanged"
    ),
    "code bits": st.column_config.NumberColumn(
        "code bits", format="localized",
        help="Bits of the stored weights: b bits per kept weight, fewer with Huffman coding "
        "(32 per value for a layer left in float).",
    ),
    "index bits": st.column_config.NumberColumn(
        "index bits", format="localized",
        help="Bits that say where the kept weights are: a bit per weight (mask), the gaps "
        "between kept weights (relative index, Huffman coded if smaller), or a bit per "
        "channel. 0 when the layer is stored dense.",
    ),
    "codebook bytes": st.column_config.NumberColumn(
        "codebook bytes", format="localized",
        help="The k-means codebook: 4 bytes (float32) per shared value. 0 on a uniform grid.",
    ),
    "table bytes": st.column_config.NumberColumn(
        "table bytes", format="localized",
        help="Huffman code tables stored with the layer: 5 bits per symbol, one table for the "
        "codes and one for the relative index where each is Huffman coded.",
    ),
    "packed bytes": st.column_config.NumberColumn("packed bytes", format="localized"),
    "float32 bytes": st.column_config.NumberColumn("float32 bytes", format="localized"),
    "rounding changed": st.column_config.NumberColumn(
        "rounding changed", format="percent",
        help="AdaRound: the share of the layer's kept weights that it rounded the other way "
        "from round-to-nearest (down instead of up, or up instead of down).",
    ),
}

# The Playground's table (:func:`layer_display`): its text columns explained.
LAYER_DISPLAY_COLUMNS = LAYER_TABLE_COLUMNS | {
    "SQNR (dB)": st.column_config.TextColumn(
        "SQNR (dB)",
        help="This layer's 10·log10(‖w‖² / ‖w − q(w)‖²). unchanged = the layer's weights are "
        "the float ones (no error: infinite SQNR).",
    ),
    "grid range": st.column_config.TextColumn(
        "grid range",
        help="The values the codes reach, in weight units: the clip range after the scale and "
        "zero point are rounded. Per-channel scales: the lowest and highest bound over the "
        "channels that keep a weight (a channel pruned whole has none).",
    ),
    "scale Δ": st.column_config.TextColumn(
        "scale Δ",
        help="The step between neighbouring levels, in weight units (at 1 bit: α, the level's "
        "magnitude). Per-channel scales: the smallest and largest over the channels that "
        "keep a weight.",
    ),
    "zero point": st.column_config.TextColumn(
        "zero point",
        help="The code that stands for 0 (0 when symmetric; none at 1 bit, whose levels are "
        "±α). Per-channel scales: the smallest and largest over the channels.",
    ),
}


@dataclass(frozen=True, eq=False)
class NewlyWrong:
    """Test images the float model got right and the compressed model gets wrong."""

    images: np.ndarray  # float32 (K, C, H, W), normalised as in the dataset
    float_pred: list[str]
    now_pred: list[str]
    truth: list[str]
    total: int  # how many such images there are in the test split


def make_newly_wrong(
    ds: qcore.Dataset, before: np.ndarray, now: np.ndarray, limit: int
) -> NewlyWrong:
    """The first ``limit`` images of ``ds`` that predictions ``before`` got right and
    ``now`` gets wrong (both int64 [N]), with class names."""
    y = ds.y.numpy()
    idx = np.flatnonzero((before == y) & (now != y))
    shown = idx[:limit]
    names: Sequence[str] = ds.classes
    return NewlyWrong(
        images=ds.inputs(shown).numpy(),
        float_pred=[names[i] for i in before[shown]],
        now_pred=[names[i] for i in now[shown]],
        truth=[names[i] for i in y[shown]],
        total=int(idx.size),
    )


def results_json(model_name: str, dataset_name: str, settings: Settings, r: Result) -> str:
    """The results download: :func:`qcore.report.results_json` over the record ``r``."""
    return report.results_json(
        model_name,
        dataset_name,
        settings,
        accuracy=r.accuracy,
        float_accuracy=r.float_accuracy,
        agreement=r.agreement,
        loss=r.loss,
        examples=r.n,
        size_bytes=r.size_bytes,
        float_size_bytes=r.float_size_bytes,
        ratio=r.ratio,
        sparsity=r.sparsity,
        pruned=r.pruned,
        rounded_zero=r.rounded_zero,
        sqnr_db=r.sqnr_db,
        mean_sqnr_db=r.mean_sqnr_db,
        layers=r.layers.to_dict("records"),
    )


class Delta(NamedTuple):
    """A metric's delta: its text, colour and arrow (``st.metric``'s arguments)."""

    text: str
    color: str  # "normal" or "off"
    arrow: str  # "auto" or "off"


def points_delta(value: float, reference: float, against: str) -> Delta:
    """The change in percentage points against ``against``, as shown (one decimal): no
    colour and no arrow when it shows as no change.

    >>> points_delta(0.972, 0.985, "mnist-cnn").text
    '-1.3 pts vs mnist-cnn'
    >>> points_delta(0.98, 0.98, "float")
    Delta(text='±0.0 pts vs float', color='off', arrow='off')
    """
    d = round((value - reference) * 100, 1)
    if d == 0:
        return Delta(f"±0.0 pts vs {against}", "off", "off")
    # an ASCII minus: st.metric reads the sign from it (a true minus shows a green up arrow)
    return Delta(f"{d:+.1f} pts vs {against}", "normal", "auto")


def reference_text(base: str | None, reference: float, own_float: float) -> str:
    """What the accuracy is compared with: the float model, or for a fine-tuned model the
    model it came from (and its own unquantized accuracy, labelled as such).

    >>> reference_text(None, 0.985, 0.985)
    'The float model gets 98.5%.'
    >>> reference_text("mnist-cnn", 0.985, 0.85)[:60]
    'Compared with mnist-cnn, the model it was fine-tuned from: 9'
    """
    if base is None:
        return f"The float model gets {reference:.1%}."
    return (f"Compared with {base}, the model it was fine-tuned from: {reference:.1%} in "
            f"float. This fine-tuned model's own weights, unquantized: {own_float:.1%}.")


def wrong_caption(truth: str, float_pred: str, now_pred: str) -> str:
    """The caption under one newly wrong image, a line each (Markdown line breaks).

    >>> wrong_caption("7", "7", "1")
    'true **7**  \\nfloat **7**  \\nnow **1**'
    """
    return f"true **{truth}**  \nfloat **{float_pred}**  \nnow **{now_pred}**"


# --- the teaching panels ----------------------------------------------------------------------


def number(v: float | None) -> str:
    """A number as the journey shows it: 5 significant figures, a true minus sign.

    >>> number(-0.000123456), number(117.826), number(None)
    ('−0.00012346', '117.83', '—')
    """
    if v is None:
        return "—"
    return f"{v:.5g}".replace("-", "−")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a literal bar inside a Markdown table cell


def journey_markdown(j: Any, *, largest: bool = False, stochastic: bool = False) -> str:
    """One weight's way from float to code and back (a ``qcore.teach.Journey``), as a
    Markdown table of steps: what happens, how, the number. ``largest``: the weight was
    picked as the layer's largest |w|; ``stochastic``: the codes were rounded at random."""
    where = f"`{j.layer}[{', '.join(map(str, j.position))}]`"
    which = "the largest |w|" if largest else f"weight #{j.index:,}"
    binary = j.bits == 1
    qmin = j.code - int(j.code_binary, 2)  # the bits store code - qmin
    zp = int(j.zero_point)
    rows: list[tuple[str, str, str]] = [("1. the weight", f"{which}, at {where}",
                                         f"w = **{number(j.weight)}**")]  # fmt: skip
    if j.pruned:
        rows.append(("2. pruning", "among the smallest |w|: set to exactly 0 first",
                     "**pruned** → 0"))  # fmt: skip
    else:
        rows.append(("2. pruning", "kept", "—"))
    inside = j.clip_lo <= j.weight <= j.clip_hi
    rows.append(("3. clip range", "the range asked for; weights outside are cut to its ends",
                 f"[{number(j.clip_lo)}, {number(j.clip_hi)}]: w is "
                 + ("inside" if inside else "**outside: clipped**")))  # fmt: skip
    rows.append(("4. grid range", "what the codes reach: the lowest and highest level",
                 f"[{number(j.grid_lo)}, {number(j.grid_hi)}]"))  # fmt: skip
    if binary:
        rows.append(("5. level α", "α = mean |w| of the clipped weights: levels −α and +α",
                     f"α = {number(j.scale)}"))  # fmt: skip
        if j.pruned:
            rows.append(("6. code", "its sign (the mask makes it 0 anyway)",
                         f"**{number(j.code)}**"))  # fmt: skip
        else:
            rows.append(("6. code", "1 if w ≥ 0, else 0: only the sign is kept",
                         f"**{number(j.code)}**"))  # fmt: skip
        rows.append(("7. stored bits", "1 bit per weight", f"`{j.code_binary}`"))
        rows.append(("8. dequantized", "(2·code − 1)·α" + (", 0 when pruned" if j.pruned else ""),
                     f"**{number(j.dequantized)}**"))  # fmt: skip
    else:
        if j.exponent is None:
            rows.append(("5. step Δ, zero point z",
                         "Δ = grid width / (levels − 1); z = the code that stands for 0",
                         f"Δ = {number(j.scale)}, z = {zp}"))  # fmt: skip
        else:  # fixed point: the step is a power of two, dequantizing a shift
            rows.append(("5. step Δ = 2^−p, zero point z",
                         "Δ = grid width / (levels − 1), raised to a power of two; "
                         "z = the code that stands for 0",
                         f"p = {j.exponent}: Δ = 2^−{j.exponent} = {number(j.scale)}, z = {zp}"
                         if j.exponent >= 0 else
                         f"p = {j.exponent}: Δ = 2^{-j.exponent} = {number(j.scale)}, "
                         f"z = {zp}"))  # fmt: skip
        if j.pruned:
            rows.append(("6. code q", "a pruned weight takes the zero code z",
                         f"**{number(j.code)}**"))  # fmt: skip
        else:
            qmax = -qmin if qmin < 0 else 2**j.bits - 1  # symmetric codes are +-(2^(b-1)-1)
            rows.append(("6. w / Δ + z", "the weight measured in steps", number(j.scaled)))
            if stochastic and j.draw is not None:
                lo, hi = j.neighbours
                how = (f"rounded at random to a neighbour: {lo} with chance "
                       f"{1 - j.p_up:.0%}, {hi} with chance {j.p_up:.0%} (the fraction "
                       f"{number(j.p_up)}); the draw u = {j.draw:.3f} gives "
                       f"floor({number(j.scaled)} + u)")  # fmt: skip
                value = f"**{number(j.code)}**"
            elif stochastic:
                how, value = "rounded up or down at random", f"**{number(j.code)}**"
            else:
                nearest = round(j.scaled)  # half to even, as the quantizer rounds
                how = "rounded to the nearest whole number"
                value = f"**{number(j.code)}**"
                if nearest != j.code:
                    value = f"{number(nearest)}, clamped to **{number(j.code)}**"
            rows.append(("7. code q", f"{how}, kept within [{number(qmin)}, {number(qmax)}]",
                         value))  # fmt: skip
        rows.append((f"{len(rows) + 1}. stored bits",
                     f"q − ({number(qmin)}) = {j.code - qmin}, in {j.bits} binary digits",
                     f"`{j.code_binary}`"))  # fmt: skip
        if j.exponent is not None:
            rows.append(_fixed_point_row(j, len(rows) + 1))
        rows.append((f"{len(rows) + 1}. dequantized",
                     "(q − z)·Δ" if j.exponent is None else
                     f"(q − z)·2^−{j.exponent}: a shift by {j.exponent} binary places",
                     f"**{number(j.dequantized)}**"))  # fmt: skip
    unit = "α" if binary else "step Δ"
    share = f" ({abs(j.error) / j.scale:.2f} of {unit})" if j.scale else ""
    rows.append((f"{len(rows) + 1}. error", "dequantized − w", f"{number(j.error)}{share}"))
    lines = ["| step | what happens | value |", "|---|---|---|"]
    lines += [f"| {_cell(a)} | {_cell(b)} | {_cell(c)} |" for a, b, c in rows]
    return "\n".join(lines)


def _fixed_point_row(j: Any, step: int) -> tuple[str, str, str]:
    """The code as a fixed-point number: q − z in two's complement with the binary point
    p places from the right, Q m.n (m integer bits besides the sign, n after the point)."""
    from qcore.teach import fixed_point

    v = j.code - int(j.zero_point)
    width = j.bits if int(j.zero_point) == 0 else j.bits + 1  # q − z may need a bit more
    m, n, text = fixed_point(v, width, j.exponent)
    where = ("" if m >= 0 else
             f"; m < 0: the point sits {-m} place{'s' if m != -1 else ''} left of the "
             "stored bits")  # fmt: skip
    return (f"{step}. fixed point Q{m}.{n}",
            f"q − z = {v} in {width} bits, two's complement, read with the binary point "
            f"{n} places from the right: {m} integer bits besides the sign, {n} fraction "
            f"bits{where}",
            f"`{text}`₂ = {v}·2^−{n} = {number(v * 2.0 ** -n)}")  # fmt: skip


# --- activations: the calibrated range of a layer's input, and one value through it ---------

ACT_OBSERVER_HELP = {  # one line each: how the observer turns calibration data into a range
    "minmax": "the smallest and largest value seen (0 included): one outlier stretches the "
    "whole grid",
    "percentile": "|x| clipped at its 99.99th percentile: the rare outliers are cut off",
    "mse": "the range with the least squared error over the calibration histogram",
    "entropy": "the range whose quantized histogram loses the least information (KL "
    "divergence), as TensorRT calibrates",
}


@dataclass(frozen=True)
class ActInfo:
    """The calibrated range of one activation edge, as plain numbers (picklable)."""

    edge: str
    bits: int
    observer: str
    lo: float  # the calibrated range
    hi: float
    observed_min: float  # what the calibration split showed (float model)
    observed_max: float
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    grid_lo: float  # the values the codes reach
    grid_hi: float
    calib_images: int  # images of the calibration split it was calibrated on
    pow2: bool = False  # the scale is a power of two (fixed point)


def make_act_info(act: Any, observer: str, calib_images: int, pow2: bool = False) -> ActInfo:
    """The record of a ``qcore.activations.ActRange``."""
    lo, hi = act.grid_range
    return ActInfo(
        edge=act.edge, bits=act.bits, observer=observer, lo=act.lo, hi=act.hi,
        observed_min=act.observed_min, observed_max=act.observed_max, scale=act.scale,
        zero_point=act.zero_point, qmin=int(act.qparams.qmin), qmax=int(act.qparams.qmax),
        grid_lo=float(lo), grid_hi=float(hi), calib_images=calib_images, pow2=pow2,
    )  # fmt: skip


def act_caption(a: ActInfo, shown_images: int) -> str:
    """What the activation histogram shows and where its range comes from."""
    levels = a.qmax - a.qmin + 1
    bulk = a.hi - a.lo
    seen = a.observed_max - a.observed_min
    text = (
        f"Calibrated on {a.calib_images:,} calibration images (never the test split), "
        f"observer **{a.observer}** ({ACT_OBSERVER_HELP.get(a.observer, '')}): range "
        f"[{number(a.lo)}, {number(a.hi)}], observed [{number(a.observed_min)}, "
        f"{number(a.observed_max)}]. {a.bits} bits: {levels:,} levels, step Δ = "
        f"{number(a.scale)}, zero point z = {a.zero_point}. The bars count the values "
        f"reaching `{a.edge}` on the first {shown_images:,} calibration images, before and "
        "after its quantizer."
    )
    if seen > 0 and bulk < 0.999 * seen:
        text += (
            f" The range covers {bulk / seen:.0%} of what was observed: values beyond it are "
            "clipped to its ends, and the levels sit closer together where most values are."
        )
    elif a.observer == "minmax":
        text += (
            " Under min-max the largest value seen sets the range: if it is a rare outlier "
            "(a ReLU output with one large value), most levels lie where almost no value "
            "falls; percentile, mse or entropy clip it."
        )
    return text


def edges_caption(edges: tuple[tuple[str, str], ...]) -> str:
    """The quantized activation edges by name, each with what it holds."""
    listed = "; ".join(f"`{e}` ({what})" for e, what in edges)
    return (
        f"{len(edges)} quantized edges, where an int8 engine stores a tensor (nothing inside "
        f"a fused group; the logits stay float): {listed}."
    )


def act_journey_markdown(a: ActInfo, x: float, which: str) -> str:
    """One activation value ``x`` through its edge's quantizer, by plain arithmetic:
    code = clamp(round(x / Δ) + z, qmin, qmax), value = (code − z)·Δ."""
    scaled = x / a.scale + a.zero_point
    nearest = round(scaled)  # half to even, as the quantizer rounds
    code = min(max(nearest, a.qmin), a.qmax)
    value = (code - a.zero_point) * a.scale
    inside = a.grid_lo <= x <= a.grid_hi
    rows = [
        ("1. the value", which, f"x = **{number(x)}**"),
        ("2. calibrated range", f"the {a.observer} observer's range for `{a.edge}`; the "
         "codes reach the grid range",
         f"[{number(a.lo)}, {number(a.hi)}], grid [{number(a.grid_lo)}, "
         f"{number(a.grid_hi)}]: x is " + ("inside" if inside else "**outside: clipped**")),
        ("3. step Δ, zero point z", "Δ = range / (levels − 1)"
         + (", raised to a power of two (fixed point)" if a.pow2 else "")
         + "; z = the code that stands for 0", f"Δ = {number(a.scale)}, z = {a.zero_point}"),
        ("4. x / Δ + z", "the value measured in steps", number(scaled)),
        ("5. code q", f"rounded to the nearest whole number, kept within "
         f"[{a.qmin}, {a.qmax}]",
         f"**{code}**" if code == nearest else f"{nearest}, clamped to **{code}**"),
        ("6. dequantized", "(q − z)·Δ: what the next layer receives", f"**{number(value)}**"),
        ("7. error", "dequantized − x",
         number(value - x) + (f" ({abs(value - x) / a.scale:.2f} of step Δ)" if a.scale
                              else "")),
    ]  # fmt: skip
    lines = ["| activation step | what happens | value |", "|---|---|---|"]
    lines += [f"| {_cell(r)} | {_cell(w)} | {_cell(v)} |" for r, w, v in rows]
    return "\n".join(lines)


CLIP_AXIS_TITLE = "clip magnitude c: the range is [−c, c] (weight units)"


def clip_curve_caption(curve: Any) -> str:
    """A sentence under the error curve: the error now and at the least-error magnitude."""
    (c_now, e_now), (c_best, e_best) = curve.current, curve.optimum
    text = (
        f"Now: c = {number(c_now)}, squared error {number(e_now)}. Least error at "
        f"c = {number(c_best)} ({number(e_best)}), near what the mse clip mode picks. A "
        "smaller c clips more weights; a larger one makes the step, and every rounding, "
        f"coarser. max|w| = {number(curve.max_abs)}: beyond it nothing is clipped."
    )
    if c_now > curve.max_abs:
        empty, levels = curve.empty
        text += (f" c = {number(c_now)} is above max|w| ({number(curve.max_abs)}): {empty} of "
                 f"the {levels} levels hold no weight.")
    return f"{text} {curve.note}".strip()


def error_caption(h: Any) -> str:
    """What the error histogram shows (a ``qcore.teach.ErrorHistogram``), in numbers."""
    text = (f"{h.kept:,} kept weights of {h.layer}. Inside the grid the error is rounding: "
            f"it never exceeds half a step (Δ/2 = {number(h.half_step)}) and spreads "
            "evenly over [−Δ/2, Δ/2].")
    if h.clipped:
        text += (f" {h.clipped:,} weights lie beyond the grid's ends and were clipped: their "
                 "error is their distance past the end, the tails beyond ±Δ/2.")
    else:
        text += " No weight lies beyond the grid, so nothing was clipped."
    return text


def sqnr_bits_caption(df: pd.DataFrame) -> str:
    """The rule of thumb against the layer's measured SQNR, in numbers."""
    b = df["bits"].to_numpy()
    db = df["sqnr_db"].to_numpy(dtype=float)
    upper = b >= 4  # where the rule holds: rounding noise only, spread over a step
    slope = (float(np.polyfit(b[upper], db[upper], 1)[0]) if upper.sum() >= 2
             else float("nan"))  # fmt: skip
    text = ("Each extra bit halves the step Δ, so the rounding noise power falls to a "
            "quarter: 10·log10(4) = 6.02 dB more SQNR per bit (the dashed line, through this "
            "layer's own width).")
    if math.isfinite(slope):
        text += f" Measured from 4 bits up, this layer gains {slope:.2f} dB per bit."
    below = df[(df["bits"] < 4) & (df["sqnr_db"] < df["rule_db"] - 1.0)]
    if len(below):
        worst = below.iloc[0]
        text += (f" At {int(worst['bits'])} bits it lies "
                 f"{float(worst['rule_db'] - worst['sqnr_db']):.1f} dB below the line: with "
                 "so few levels the error is no longer an even spread over one step.")
    return text


# --- deploy: one row per runtime --------------------------------------------------------------


def deploy_frame(d: Any) -> pd.DataFrame:
    """The rows of a ``qcore.onnx.Deployment`` as the page shows them."""
    rows = []
    for r in d.rows:
        row = {"runtime": r.runtime, "test accuracy": f"{r.accuracy:.2%}",
               "agrees with float": f"{r.agrees_with_float:.2%}",
               "agrees with simulated": f"{r.agrees_with_simulated:.2%}"}  # fmt: skip
        for lat in r.latency:
            row[f"batch {lat.batch_size}: median ms"] = round(lat.median_ms, 2)
            row[f"batch {lat.batch_size}: p90 ms"] = round(lat.p90_ms, 2)
        row["file bytes"] = "—" if r.file_bytes is None else f"{r.file_bytes:,}"
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True, eq=False)
class Disagreements:
    """Test images on which two settings (A and B) predict different classes."""

    images: np.ndarray  # float32 (K, C, H, W), normalised as in the dataset
    a_pred: list[str]
    b_pred: list[str]
    truth: list[str]
    total: int  # how many such images there are in the split


def make_disagreements(
    ds: qcore.Dataset, a: np.ndarray, b: np.ndarray, limit: int
) -> Disagreements:
    """The first ``limit`` images of ``ds`` where predictions ``a`` and ``b`` (int64 [N])
    differ, with class names."""
    idx = np.flatnonzero(a != b)
    shown = idx[:limit]
    names: Sequence[str] = ds.classes
    y = ds.y.numpy()
    return Disagreements(
        images=ds.x[shown].numpy(),
        a_pred=[names[i] for i in a[shown]],
        b_pred=[names[i] for i in b[shown]],
        truth=[names[i] for i in y[shown]],
        total=int(idx.size),
    )


def format_bytes(n: float) -> str:
    """A byte count in three significant figures: "840 B", "9.50 kB", "127 kB", "1.33 MB".

    >>> format_bytes(840), format_bytes(9500), format_bytes(126_640), format_bytes(1_334_104)
    ('840 B', '9.50 kB', '127 kB', '1.33 MB')
    """
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            v = n / scale
            decimals = 0 if v >= 100 else 1 if v >= 10 else 2
            return f"{v:.{decimals}f} {unit}"
    return f"{int(n)} B"


def sensitivity_summary(df: pd.DataFrame) -> str:
    """The most and least sensitive layers, in a sentence.

    Judged by the accuracy drop at the lowest bit width tried (ties: the mean drop over all
    bit widths); without bit widths, by the drop at the highest pruning rate.
    """
    quant = df[df["kind"] == "quant"]
    if len(quant):
        part, at = quant, quant["setting"].min()
        where = f"at {at:g} bits"
    else:
        part = df[df["kind"] == "prune"]
        if not len(part):
            raise ValueError("The sensitivity table has no rows.")
        at = part["setting"].max()
        where = f"pruned {at:.0%}"
    mean = part.groupby("layer", sort=False)["drop"].mean()
    low = part[part["setting"] == at].set_index("layer")["drop"]
    ranked = sorted(low.index, key=lambda n: (low[n], mean[n]))  # least sensitive first
    most, least = ranked[-1], ranked[0]
    if most == least:
        return f"Only one layer: {most} (drop {low[most] * 100:.1f} pts {where})."
    return (
        f"Most sensitive: {most} (drop {low[most] * 100:.1f} pts {where}); "
        f"least sensitive: {least} (drop {low[least] * 100:.1f} pts {where})."
    )


def deep_layer_bits(layers: pd.DataFrame) -> pd.DataFrame:
    """Bits per weight of each layer after each stage: one row per layer, one column per
    stage (in the pipeline's order), from ``qcore.deep_compression(...).layers``."""
    order = list(dict.fromkeys(layers["stage"]))
    table = layers.pivot(index="layer", columns="stage", values="bits_per_weight")
    rows = list(dict.fromkeys(layers["layer"]))
    return table.loc[rows, order].reset_index().rename_axis(columns=None)


def deep_comparison(stages: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Our stages and the paper's side by side, one row per stage: our weights kept (%),
    packed bytes, ratio and top-1 error (%), then the paper's as text ("—" where the paper
    publishes no number). ``paper`` is one of ``qcore.deep.PAPER``."""
    theirs = paper.set_index("stage")

    def text(stage: str, column: str, fmt: str) -> str:
        v = theirs[column].get(stage)
        return "—" if v is None or v != v else fmt.format(v)  # v != v: NaN

    return pd.DataFrame({
        "stage": list(stages["label"]),
        "kept": 100 * stages["kept"].to_numpy(dtype=float),
        "size_bytes": stages["size_bytes"].to_numpy(),
        "ratio": stages["ratio"].to_numpy(dtype=float),
        "error": 100 * (1 - stages["accuracy"].to_numpy(dtype=float)),
        "paper_kept": [text(s, "kept", "{:.0%}") for s in stages["stage"]],
        "paper_size": [text(s, "size_kb", "{:.0f} KB") for s in stages["stage"]],
        "paper_ratio": [text(s, "ratio", "{:.0f}x") for s in stages["stage"]],
        "paper_error": [text(s, "error", "{:.2%}") for s in stages["stage"]],
    })  # fmt: skip


def robustness_summary(curves: Mapping[str, pd.DataFrame], perturbation: str) -> str:
    """What the curves show, in a sentence computed from the rows: each variant's accuracy
    against the first one's (the float model) at one strength, the largest at which the
    first still keeps at least half its clean accuracy (else the smallest above 0)."""
    labels = list(curves)
    if not labels:
        raise ValueError("There are no curves to summarise.")
    base = curves[labels[0]].set_index("strength")["accuracy"]
    nonzero = [s for s in base.index if s > 0]
    if not nonzero:
        return "Only strength 0 was measured: the clean accuracy, nothing perturbed."
    clean = float(base.get(0.0, base.iloc[0]))
    kept = [s for s in nonzero if base[s] >= clean / 2]
    at = max(kept) if kept else min(nonzero)
    word = "epsilon" if perturbation in ("fgsm", "pgd") else "strength"
    if perturbation == "bitflip":
        word = "a flipped fraction of"
    parts = []
    for label in labels[1:]:
        rows = curves[label].set_index("strength")["accuracy"]
        if at not in rows.index:
            continue
        d = 100 * (float(rows[at]) - float(base[at]))
        verdict = "no change" if abs(d) < 0.05 else f"{d:+.1f} pts"
        parts.append(f"{label} keeps {100 * float(rows[at]):.1f} % ({verdict})")
    head = f"At {word} {at:g}, {labels[0]} keeps {100 * float(base[at]):.1f} %"
    if not parts:
        return head + "."
    return head + "; " + "; ".join(parts) + "."
