"""The pipeline: fold BatchNorm -> prune (mask) -> clip -> quantize -> encode.

``compress`` never changes the model it is given and never copies its tensors per call.
The result is one :class:`LayerResult` per compressed layer (mask, qparams, codes in the
smallest integer dtype, the packed form) and a :class:`qcore.graph.Variant` that runs the
model's shared traced graph with the dequantized weights, derived from codes and qparams
when it runs. ``size_bytes`` is the sum of what the codecs write.
With ``QuantConfig(codebook="kmeans")`` a layer's kept weights share a k-means codebook
(:mod:`qcore.kmeans`) instead of a uniform grid: its record holds the codebook and the
centroid index of each weight, and no qparams.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from qcore.activations import ActRange, act_points, calibrate_placed, placement
from qcore.blocks import without_blocks
from qcore.codecs import (
    Encoded,
    encode_codebook,
    encode_float,
    encode_quantized,
    float_bytes,
    float_values,
)
from qcore.config import CompressionConfig
from qcore.data import Dataset
from qcore.fold import state_for_size, weight_layers
from qcore.graph import Graph, Variant, graph_of, param_key
from qcore.kmeans import kmeans_codebook
from qcore.prune import global_masks, layer_mask
from qcore.ptq import Equalization, adaround_layer, bias_corrections, check_calib, equalize
from qcore.quant import QParams, dequantize_codes, quantize_prechecked
from qcore.refs import Progress

__all__ = ["LayerResult", "Compressed", "compress", "replacements_of", "sqnr_db"]


@dataclass(frozen=True, eq=False)
class LayerResult:
    """What compression did to one weight layer: one record, everything derived from it."""

    name: str
    kind: str  # "linear" or "conv"
    shape: tuple[int, ...]
    float_weight: torch.Tensor  # the shared (folded) float weight, not a copy
    mask: torch.Tensor | None  # bool, True = kept; None when unpruned
    qparams: QParams | None  # None when left in float or shared by a k-means codebook
    # int8/int16/int32, the weight's shape; pruned at the zero code (with a codebook: the
    # centroid of each weight, 0 where pruned)
    codes: torch.Tensor | None
    bits: int  # 32 when left in float
    per_channel: bool
    symmetric: bool
    bias: torch.Tensor | None  # the bias it runs with when changed (channels removed), else None
    encoded: Encoded  # the weight's packed form
    params: int  # weights + bias
    sparsity: float  # fraction of weights exactly zero afterwards: pruned + rounded_zero
    sqnr_db: float  # 10*log10(||w||^2 / ||w - q(w)||^2); inf when nothing changed
    size_bytes: int  # packed bytes of weight + bias
    float_bytes: int
    act: ActRange | None = None  # the calibrated range of its input (activations on)
    pruned: float = 0.0  # fraction of weights the pruning mask removed
    rounded_zero: float = 0.0  # fraction kept by pruning whose compressed value is exactly 0
    weight_energy: float = 0.0  # ||w||^2 (float64), the numerator of sqnr_db
    error_energy: float = 0.0  # ||w - q(w)||^2 (float64), its denominator
    codebook: torch.Tensor | None = None  # (C,) float32 shared values (k-means), else None
    # AdaRound: the share of the layer's weights whose code differs from round-to-nearest's
    rounding_changed: float | None = None

    @property
    def scales(self) -> torch.Tensor | None:
        """The step of each group's grid (G,), alpha at 1 bit; None when left in float."""
        return None if self.qparams is None else self.qparams.scale.clone()

    @property
    def zero_points(self) -> torch.Tensor | None:
        """Each group's integer zero point (G,), 0 when symmetric; None when left in float."""
        return None if self.qparams is None else self.qparams.zero_point.clone()

    @property
    def grid_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The lowest and highest level of each group's grid, each (G,): the range the codes
        really cover, ((qmin - zero_point) * scale, (qmax - zero_point) * scale), or
        (-alpha, alpha) at 1 bit; None when left in float.

        With asymmetric codes the zero point is rounded to an integer, which shifts the grid
        off the requested clip range [qparams.lo, qparams.hi] by up to half a step.
        """
        qp = self.qparams
        if qp is None:
            return None
        if qp.binary:
            return -qp.scale, qp.scale.clone()
        zp = qp.zero_point.float()
        # the same float32 sums and products as dequantize_codes, so the levels sit exactly
        # on these ends
        return (qp.qmin - zp) * qp.scale, (qp.qmax - zp) * qp.scale

    @property
    def encoding(self) -> str:
        """How the weight is stored: "dense", "channels", "mask" or "relidx"."""
        return self.encoded.encoding

    @property
    def changed(self) -> bool:
        return self.qparams is not None or self.mask is not None or self.codebook is not None

    @property
    def dequantized(self) -> torch.Tensor:
        """The weight the compressed model runs with (derived, not stored)."""
        if self.codebook is not None:
            return _shared(self.codebook, self.codes, self.mask)
        return _weight_after(self.float_weight, self.mask, self.qparams, self.codes)

    @property
    def size_parts(self) -> dict[str, int]:
        """Where the layer's packed bytes go; the values sum to ``size_bytes``.

        ``code_bytes``: the weight codes (or float32 values of a float layer);
        ``index_bytes``: where the kept weights are (mask, relative index, channel bitmap);
        ``codebook_bytes``: the k-means centroids; ``table_bytes``: Huffman code tables;
        ``scale_bytes``: scales, zero points, exponents; ``bias_bytes``: the float32 bias.
        """
        e = self.encoded
        return {
            "code_bytes": e.bytes_of("codes") + e.bytes_of("values"),
            "index_bytes": e.bytes_of("mask") + e.bytes_of("relidx") + e.bytes_of("channels"),
            "codebook_bytes": e.bytes_of("codebook"),
            "table_bytes": e.bytes_of("table"),
            "scale_bytes": e.bytes_of("scales") + e.bytes_of("zero_points")
            + e.bytes_of("exponents"),
            "bias_bytes": self.size_bytes - e.nbytes(),
        }  # fmt: skip

    @property
    def code_bits(self) -> int:
        """Bits of the weight codes (float32 values of a float layer), before padding."""
        return self.encoded.bits_of("codes", "values")

    @property
    def index_bits(self) -> int:
        """Bits that say where the kept weights are (mask, relative index, channel bitmap)."""
        return self.encoded.bits_of("mask", "relidx", "channels")


def _shared(codebook: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A shared-weight layer: each weight its centroid, pruned weights exactly zero."""
    if codebook.numel() == 0:  # every weight pruned
        return torch.zeros(codes.shape)
    values = codebook[codes.long()]
    return values if mask is None else torch.where(mask, values, torch.zeros(()))


def _weight_after(
    w: torch.Tensor, mask: torch.Tensor | None, qp: QParams | None, codes: torch.Tensor | None
) -> torch.Tensor:
    """The compressed weight: dequantized codes, or the float weight with pruned ones zero."""
    if qp is None:
        return w if mask is None else torch.where(mask, w, torch.zeros((), dtype=w.dtype))
    g = qp.scale.numel()
    values = dequantize_codes(codes.reshape(g, -1), qp).reshape(w.shape)
    if qp.binary and mask is not None:  # no zero code at 1 bit
        values = values * mask
    return values


def replacements_of(layers: tuple[LayerResult, ...]) -> dict[str, torch.Tensor]:
    """The tensors that differ from the float model, by state-dict key (derived anew from
    the layer records: codes and qparams, masks, codebooks, changed biases)."""
    out = {}
    for r in layers:
        if r.changed:
            out[param_key(r.name, "weight")] = r.dequantized
        if r.bias is not None:
            out[param_key(r.name, "bias")] = r.bias
    return out


@dataclass(frozen=True, eq=False)
class Compressed:
    """A compressed model and its accounting. ``size_bytes`` is what the export writes."""

    model: Variant  # the shared graph run with the compressed weights and activation points
    config: CompressionConfig
    layers: tuple[LayerResult, ...]
    size_bytes: int
    float_size_bytes: int
    # calibrated activation ranges by graph edge ("input", each fused group's output);
    # empty when activations stay float
    activations: Mapping[str, ActRange] = field(default_factory=dict)
    # ||w||^2 (float64) of the weight layers inside removed blocks (``config.drop``): gone
    # from the network, so each counts as all error in the whole model's SQNR
    removed_energy: float = 0.0
    removed: tuple[str, ...] = ()  # those layers' names
    # cross-layer equalization: the pairs equalized and those left alone (None when off)
    equalization: Equalization | None = None

    @property
    def graph(self) -> Graph:
        return self.model.graph

    @property
    def ratio(self) -> float:
        return self.float_size_bytes / self.size_bytes if self.size_bytes else math.inf

    @property
    def pruned(self) -> float:
        """Fraction of all compressed weights the pruning masks removed."""
        total = sum(math.prod(s.shape) for s in self.layers)
        return _count(self.layers, "pruned") / total if total else 0.0

    @property
    def rounded_zero(self) -> float:
        """Fraction of all compressed weights kept by pruning but exactly zero afterwards."""
        total = sum(math.prod(s.shape) for s in self.layers)
        return _count(self.layers, "rounded_zero") / total if total else 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over all weight layers: ``pruned + rounded_zero``."""
        return self.pruned + self.rounded_zero

    @property
    def sqnr_db(self) -> float:
        """The whole model's SQNR: 10*log10(sum ||w||^2 / sum ||w - q(w)||^2) over every
        compressed layer, so a layer is weighted by its energy (inf when nothing changed).
        The weights of a removed block are all error: q(w) = 0 for each of them."""
        return _db(sum(s.weight_energy for s in self.layers) + self.removed_energy,
                   sum(s.error_energy for s in self.layers) + self.removed_energy)

    @property
    def mean_sqnr_db(self) -> float:
        """Mean of the per-layer SQNRs over the layers that changed (inf if none did).

        Deprecated in favour of :attr:`sqnr_db`: one badly quantized layer barely moves a
        mean of decibels, while it dominates the whole model's error.
        """
        finite = [s.sqnr_db for s in self.layers if math.isfinite(s.sqnr_db)]
        return sum(finite) / len(finite) if finite else math.inf

    def layer(self, name: str) -> LayerResult:
        for s in self.layers:
            if s.name == name:
                return s
        names = ", ".join(s.name for s in self.layers)
        raise ValueError(f"No layer named {name!r}; layers are {names}.")

    def replacements(self) -> dict[str, torch.Tensor]:
        """The tensors that differ from the (folded) float model, by state-dict key."""
        return replacements_of(self.layers)

    def packed_tensors(self) -> list[tuple[str, tuple[int, ...], Encoded]]:
        """What the export writes, in order: (state-dict key, shape, packed form)."""
        return _packed_tensors(self.graph, self.layers)


def _packed_tensors(
    graph: Graph, layers: tuple[LayerResult, ...]
) -> list[tuple[str, tuple[int, ...], Encoded]]:
    """Every tensor of the (folded) model in its packed form: compressed weights through
    their codecs, everything else (biases, unfolded BatchNorm) as float32 values."""
    weights = {param_key(r.name, "weight"): r for r in layers}
    biases = {param_key(r.name, "bias"): r.bias for r in layers if r.bias is not None}
    out = []
    for key, value in graph.params.items():
        enc = weights[key].encoded if key in weights else float_values(biases.get(key, value))
        out.append((key, tuple(value.shape), enc))
    return out


def _count(layers: tuple[LayerResult, ...], fraction: str) -> int:
    """The number of weights a per-layer fraction stands for, summed over the layers (each
    fraction is an exact count over the layer's size, so rounding recovers the count)."""
    return sum(round(getattr(s, fraction) * math.prod(s.shape)) for s in layers)


def _energies(w: torch.Tensor, q: torch.Tensor) -> tuple[float, float]:
    """(||w||^2, ||w - q||^2) in float64."""
    return float((w.double() ** 2).sum()), float(((w.double() - q.double()) ** 2).sum())


def _db(sig: float, err: float) -> float:
    if err == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / err)


def sqnr_db(w: torch.Tensor, q: torch.Tensor) -> float:
    """10 * log10(||w||^2 / ||w - q||^2) in dB; inf when q equals w.

    >>> sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]))   # 25 / 1
    13.979400086720377
    """
    return _db(*_energies(w, q))


def _zero_pruned(codes: torch.Tensor, mask: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Codes with every pruned weight at its group's zero code (so it dequantizes to 0)."""
    g = qp.zero_point.numel()
    zero = qp.zero_point.to(codes.dtype)[:, None].expand(g, codes.numel() // g)
    return torch.where(mask.reshape(g, -1), codes.reshape(g, -1), zero).reshape(codes.shape)


def _layer_names(model: nn.Module, graph: Graph, config: CompressionConfig) -> list[str]:
    """The weight layers ``config`` compresses that the graph still runs (checked)."""
    all_layers = weight_layers(model)
    if not graph.layers:
        raise ValueError("The model has no linear or convolution layers to compress.")
    names = list(graph.layers) if config.layers is None else list(config.layers)
    unknown = [n for n in names if n not in all_layers]
    if unknown:
        raise ValueError(
            f"Unknown layer(s) {', '.join(map(repr, unknown))}; the model's weight layers are "
            f"{', '.join(all_layers)}."
        )
    q = config.quant
    if q is not None:
        extra = [n for n, _ in q.layer_bits if n not in all_layers]
        if extra:
            raise ValueError(
                f"Per-layer bits name unknown layer(s) {', '.join(map(repr, extra))}; the "
                f"model's weight layers are {', '.join(all_layers)}."
            )
    names = [n for n in names if n in graph.layers]
    if not names:
        raise ValueError("Every layer picked to compress lies in a removed block.")
    return names


def _compress_layer(
    i: int,
    n: str,
    w: torch.Tensor,
    mask: torch.Tensor | None,
    config: CompressionConfig,
    bias: torch.Tensor | None,
    act: ActRange | None,
    energy: float,
    *,
    bias_changed: bool = False,
    adaround: Callable[[QParams, torch.Generator], torch.Tensor] | None = None,
) -> LayerResult:
    """One weight layer (the ``i``-th compressed) quantized, encoded and accounted;
    ``energy`` is ||w||^2 of its float weight (cached per graph). ``bias_changed``: the
    float bias is not the graph's (equalization rescaled it), so the record carries it.
    ``adaround(qparams, generator)`` gives the learned codes instead of nearest rounding."""
    q = config.quant
    qparams = codes = codebook = rounding_changed = None
    bits, per_channel = 32, False
    if q is not None and q.codebook == "kmeans":
        bits = q.bits_for(n)
        shared = kmeans_codebook(w, bits, mask)
        codebook, codes, new = shared.codebook, shared.codes, shared.values
    elif q is not None:
        gen = torch.Generator().manual_seed(q.seed * 1_000_003 + i)
        res = quantize_prechecked(w, q, bits=q.bits_for(n), mask=mask, generator=gen)
        qparams, bits, per_channel, codes = res.qparams, res.bits, res.per_channel, res.codes
        if mask is not None and not qparams.binary:
            codes = _zero_pruned(codes, mask, qparams)
        # the quantizer already dequantized (pruned weights zero): the same values as
        # ``_weight_after`` gives from the stored codes, so the stats need no second pass
        new = res.values
        if adaround is not None:
            if qparams.binary:
                raise ValueError(
                    "AdaRound chooses between two neighbouring levels; it needs at least "
                    "2 bits (pick nearest rounding at 1 bit)."
                )
            nearest, codes = codes, adaround(qparams, gen)
            kept = mask if mask is not None else torch.ones(w.shape, dtype=torch.bool)
            rounding_changed = (float((codes != nearest)[kept].float().mean())
                                if bool(kept.any()) else 0.0)  # fmt: skip
            new = _weight_after(w, mask, qparams, codes)
    else:
        new = _weight_after(w, mask, None, None)
    if q is None:
        encoded = encode_float(new, config.entropy)
    elif codebook is not None:
        encoded = encode_codebook(codes, codebook, bits, mask=mask, entropy=config.entropy)
    else:
        encoded = encode_quantized(codes, qparams, bits, per_channel=per_channel,
                                   symmetric=q.symmetric, mask=mask,
                                   pow2=q.scale == "pow2", entropy=config.entropy)
    bias_numel = 0 if bias is None else bias.numel()
    n_zero = int((new == 0).sum())
    n_pruned = 0 if mask is None else int((~mask).sum())  # pruned weights are all zero
    sig, err = energy, float(((w.double() - new.double()) ** 2).sum())  # as _energies
    new_bias = bias if bias_changed else None
    if bias is not None and mask is not None and config.prune.structured:
        # a removed output channel is gone, bias included
        alive = mask.reshape(mask.shape[0], -1).any(dim=1)
        new_bias = torch.where(alive, bias, torch.zeros(()))
    return LayerResult(
        name=n, kind="conv" if w.dim() > 2 else "linear", shape=tuple(w.shape),
        float_weight=w, mask=mask, qparams=qparams, codes=codes, bits=bits,
        per_channel=per_channel, symmetric=True if q is None else q.symmetric,
        bias=new_bias, encoded=encoded, params=w.numel() + bias_numel,
        # the sum of the two parts, so sparsity == pruned + rounded_zero exactly (it can
        # differ from n_zero / n by one ulp)
        sparsity=n_pruned / w.numel() + (n_zero - n_pruned) / w.numel(),
        pruned=n_pruned / w.numel(), rounded_zero=(n_zero - n_pruned) / w.numel(),
        sqnr_db=_db(sig, err), weight_energy=sig, error_energy=err,
        size_bytes=encoded.nbytes() + float_bytes(bias_numel),
        float_bytes=float_bytes(w.numel() + bias_numel),
        act=act, codebook=codebook, rounding_changed=rounding_changed,
    )  # fmt: skip


def compress(
    model: nn.Module,
    config: CompressionConfig | None = None,
    calib: Dataset | None = None,
    progress: Progress | None = None,
) -> Compressed:
    """Compress ``model`` as ``config`` says and account for every byte (see DESIGN.md).

    With ``config.act`` set, activations are calibrated on ``calib`` (a calibration
    split, never the test split) and fake-quantized on every edge of
    :func:`qcore.activations.placement` (where an integer engine stores tensors).
    ``config.equalize``, ``config.bias_correction`` and ``QuantConfig(rounding="adaround")``
    are the remedies of :mod:`qcore.ptq`; the last two learn from ``calib`` too.
    ``progress(done, total, row)`` is told after each layer AdaRound finishes.
    """
    config = CompressionConfig() if config is None else config
    if not isinstance(config, CompressionConfig):
        raise ValueError("config must be a CompressionConfig.")
    if config.act is not None and calib is None:
        raise ValueError(
            "Quantizing activations needs calibration data: pass calib= the dataset's "
            "'calib' split (never the test split)."
        )
    q = config.quant
    adaround = q is not None and q.rounding == "adaround" and q.codebook == "uniform"
    if adaround:
        check_calib(calib, "AdaRound")
    if config.bias_correction:
        check_calib(calib, "Bias correction")
    # removed blocks: the graph of the model with them replaced by the identity, so their
    # weights are neither run nor stored (named layers inside them are simply gone)
    base = without_blocks(model, config.drop)
    graph = graph_of(base, config.fold_bn)
    names = _layer_names(model, graph, config)
    weights = {n: graph.params[param_key(n, "weight")] for n in names}
    for n in names:
        if not graph.float_stats(param_key(n, "weight"))[0]:
            raise ValueError(
                f"Layer {n!r} has NaN or infinite weights; the model cannot be compressed."
            )
    biases = {n: graph.params.get(param_key(n, "bias")) for n in names}
    equalized, float_repl = None, {}
    if config.equalize and q is not None:  # new float tensors, the same function
        equalized = equalize(graph, names, weights, biases)
        weights = {**weights, **equalized.weights}
        biases = {**biases, **equalized.biases}
        float_repl = {param_key(n, "weight"): v for n, v in equalized.weights.items()}
        float_repl.update({param_key(n, "bias"): v for n, v in equalized.biases.items()})

    masks: dict[str, torch.Tensor] = {}
    if config.prunes:
        p = config.prune
        if p.scope == "global":
            masks = global_masks(weights, p)
        else:
            masks = {n: layer_mask(w, p) for n, w in weights.items()}

    activations, act_inputs = {}, {}
    if config.act is not None:  # cached per (graph, data, config): weights do not matter
        activations = calibrate_placed(graph, calib, config.act, names,
                                       replacements=float_repl)  # fmt: skip
        act_inputs = placement(graph, names, config.act.output).inputs
    points = act_points(activations)
    running: dict[str, torch.Tensor] = dict(float_repl)  # what the variant runs with so far
    results = []
    for i, n in enumerate(names):
        w = weights[n]
        learn = None
        if adaround:
            def learn(qp: QParams, gen: torch.Generator, n=n, w=w) -> torch.Tensor:
                return adaround_layer(graph, n, w, biases[n], qp, calib, float_repl, running,
                                      points, masks.get(n), gen)  # fmt: skip
        energy = (float((w.double() ** 2).sum()) if n in (equalized.weights if equalized else {})
                  else graph.float_stats(param_key(n, "weight"))[1])  # fmt: skip
        r = _compress_layer(i, n, w, masks.get(n), config, biases[n],
                            activations.get(act_inputs.get(n) or ""), energy,
                            bias_changed=n in biases_changed(equalized), adaround=learn)
        running[param_key(n, "weight")] = r.dequantized
        if r.bias is not None:
            running[param_key(n, "bias")] = r.bias
        if adaround and progress is not None:
            progress(i + 1, len(names), {"layer": n})
        results.append(r)

    if config.bias_correction:  # b - E[(W_q - W) x] on the calibration split, layer by layer
        fixed = bias_corrections(
            graph, names, weights, {r.name: r.dequantized for r in results},
            {r.name: r.bias if r.bias is not None else biases[r.name] for r in results},
            calib, running, points,
        )
        results = [replace(r, bias=fixed[r.name]) if r.name in fixed else r for r in results]
    layers = tuple(results)
    removed: tuple[str, ...] = ()
    removed_energy = 0.0
    if config.drop:  # the same folding as the compressed layers, so the energies add up
        full = graph_of(model, config.fold_bn)
        removed = tuple(n for n in full.layers if n not in graph.layers)
        removed_energy = sum(full.float_stats(param_key(n, "weight"))[1] for n in removed)
    size_bytes = sum(enc.nbytes() for _, _, enc in _packed_tensors(graph, layers))
    float_size = sum(float_bytes(v.numel()) for v in state_for_size(model).values())
    return Compressed(
        # weights derived from the records when it runs: no second float copy is cached
        model=Variant(graph, lambda: replacements_of(layers), points),
        config=config,
        layers=layers,
        size_bytes=size_bytes,
        float_size_bytes=float_size,
        activations=activations,
        removed_energy=removed_energy,
        removed=removed,
        equalization=equalized,
    )


def biases_changed(equalized: Equalization | None) -> frozenset[str]:
    """The layers whose float bias equalization rescaled."""
    return frozenset() if equalized is None else frozenset(equalized.biases)
