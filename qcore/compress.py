"""The pipeline: fold BatchNorm -> prune (mask) -> clip -> quantize -> encode.

``compress`` never changes the model it is given and never copies its tensors per call.
The result is one :class:`LayerResult` per compressed layer (mask, qparams, codes in the
smallest integer dtype, the packed form) and a :class:`CompressedModel` that runs the
model's shared traced graph (:mod:`qcore.graph`) with the dequantized weights, derived
from codes and qparams when it runs. ``size_bytes`` is the sum of what the codecs write.
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

from qcore.activations import ActRange, act_points, activation_edges, calibrate
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
from qcore.graph import Graph, graph_of, param_key
from qcore.kmeans import kmeans_codebook
from qcore.prune import global_masks, layer_mask
from qcore.ptq import Equalization, adaround_layer, bias_corrections, check_calib, equalize
from qcore.quant import QParams, dequantize_codes, quantize_prechecked
from qcore.refs import Progress

__all__ = ["CompressedModel", "LayerResult", "Compressed", "compress", "sqnr_db"]


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


class CompressedModel(nn.Module):
    """The shared traced graph run with a variant's weights; no tensor of the model copied.

    The dequantized weights are derived from the layer records when it runs, so a cached
    variant holds codes and masks, not a second float copy. It runs in eval mode only:
    the graph computes BatchNorm with running statistics and never writes them.
    """

    def __init__(
        self,
        graph: Graph,
        layers: tuple[LayerResult, ...],
        activations: Mapping[str, ActRange] | None = None,
    ):
        super().__init__()
        object.__setattr__(self, "_graph", graph)  # held by reference, not registered
        self._layers = layers
        self._points = act_points(dict(activations or {}))  # fake-quantized edges
        nn.Module.train(self, False)

    @property
    def graph(self) -> Graph:
        return self._graph

    @property
    def points(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The fake-quantized activation edges (empty when activations stay float)."""
        return dict(self._points)

    def replacements(self) -> dict[str, torch.Tensor]:
        """The tensors that differ from the float model, by state-dict key (made anew)."""
        out = {}
        for r in self._layers:
            if r.changed:
                out[param_key(r.name, "weight")] = r.dequantized
            if r.bias is not None:
                out[param_key(r.name, "bias")] = r.bias
        return out

    def runner(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function x -> logits with the weights derived once (for many batches)."""
        tensors, points = self.replacements(), self._points
        return lambda x: self._graph.run(x, tensors, points)

    def train(self, mode: bool = True) -> CompressedModel:
        if mode:
            raise RuntimeError(
                "A compressed model shares its tensors with the float model and runs in eval "
                "mode only; fine-tune through the graph runtime instead."
            )
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._graph.run(x, self.replacements(), self._points)


@dataclass(frozen=True, eq=False)
class Compressed:
    """A compressed model and its accounting. ``size_bytes`` is what the export writes."""

    model: CompressedModel
    config: CompressionConfig
    layers: tuple[LayerResult, ...]
    size_bytes: int
    float_size_bytes: int
    # calibrated activation ranges by graph edge ("input", "<layer>.input", additions);
    # empty when activations stay float
    activations: Mapping[str, ActRange] = field(default_factory=dict)
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
        compressed layer, so a layer is weighted by its energy (inf when nothing changed)."""
        return _db(sum(s.weight_energy for s in self.layers),
                   sum(s.error_energy for s in self.layers))

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
        return self.model.replacements()

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


def _check_weights(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ValueError(
            f"Layer {name!r} has NaN or infinite weights; the model cannot be compressed."
        )


def _zero_pruned(codes: torch.Tensor, mask: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Codes with every pruned weight at its group's zero code (so it dequantizes to 0)."""
    g = qp.zero_point.numel()
    zero = qp.zero_point.to(codes.dtype)[:, None].expand(g, codes.numel() // g)
    return torch.where(mask.reshape(g, -1), codes.reshape(g, -1), zero).reshape(codes.shape)


def compress(
    model: nn.Module,
    config: CompressionConfig | None = None,
    calib: Dataset | None = None,
    progress: Progress | None = None,
) -> Compressed:
    """Compress ``model`` as ``config`` says and account for every byte (see DESIGN.md).

    With ``config.act`` set, activations are calibrated on ``calib`` (a calibration
    split, never the test split) and fake-quantized on every edge of
    :func:`qcore.activations.activation_edges`. ``config.equalize``,
    ``config.bias_correction`` and ``QuantConfig(rounding="adaround")`` are the remedies
    of :mod:`qcore.ptq`; the last two learn from ``calib`` too. ``progress(done, total,
    row)`` is told after each layer AdaRound finishes.
    """
    config = CompressionConfig() if config is None else config
    if not isinstance(config, CompressionConfig):
        raise ValueError("config must be a CompressionConfig.")
    if config.act is not None and calib is None:
        raise ValueError(
            "Quantizing activations needs calibration data: pass calib= the dataset's "
            "'calib' split (never the test split)."
        )
    # removed blocks: the graph of the model with them replaced by the identity, so their
    # weights are neither run nor stored (named layers inside them are simply gone)
    base = without_blocks(model, config.drop)
    graph = graph_of(base, config.fold_bn)
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
    adaround = q is not None and q.rounding == "adaround" and q.codebook == "uniform"
    if adaround:
        check_calib(calib, "AdaRound")
    if config.bias_correction:
        check_calib(calib, "Bias correction")
    weights = {n: graph.params[param_key(n, "weight")] for n in names}
    for n, w in weights.items():
        _check_weights(n, w)
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

    activations = {}
    if config.act is not None:  # cached per (graph, data, config): weights do not matter
        activations = calibrate(graph, calib, config.act, activation_edges(graph, names),
                                replacements=float_repl)
    points = act_points(activations)
    running: dict[str, torch.Tensor] = dict(float_repl)  # what the variant runs with so far
    results = []
    for i, n in enumerate(names):
        w, mask = weights[n], masks.get(n)
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
            if adaround:
                if qparams.binary:
                    raise ValueError(
                        "AdaRound chooses between two neighbouring levels; it needs at least "
                        "2 bits (pick nearest rounding at 1 bit)."
                    )
                nearest = codes
                codes = adaround_layer(graph, n, w, biases[n], qparams, calib, float_repl,
                                       running, points, mask, gen)
                kept = mask if mask is not None else torch.ones(w.shape, dtype=torch.bool)
                rounding_changed = float((codes != nearest)[kept].float().mean()) if bool(
                    kept.any()) else 0.0
                res = res._replace(values=_weight_after(w, mask, qparams, codes))
                if progress is not None:
                    progress(i + 1, len(names), {"layer": n})
            # the quantizer already dequantized (pruned weights zero): the same values as
            # ``_weight_after`` gives from the stored codes, so the stats need no second pass
            new = res.values
        else:
            new = _weight_after(w, mask, None, None)
        running[param_key(n, "weight")] = new
        if q is None:
            encoded = encode_float(new, config.entropy)
        elif codebook is not None:
            encoded = encode_codebook(codes, codebook, bits, mask=mask, entropy=config.entropy)
        else:
            encoded = encode_quantized(codes, qparams, bits, per_channel=per_channel,
                                       symmetric=q.symmetric, mask=mask,
                                       pow2=q.scale == "pow2", entropy=config.entropy)
        bias = biases[n]
        bias_numel = 0 if bias is None else bias.numel()
        n_zero = int((new == 0).sum())
        n_pruned = 0 if mask is None else int((~mask).sum())  # pruned weights are all zero
        sig, err = _energies(w, new)
        new_bias = None if n not in biases_changed(equalized) else bias
        if bias is not None and mask is not None and config.prune.structured:
            # a removed output channel is gone, bias included
            alive = mask.reshape(mask.shape[0], -1).any(dim=1)
            new_bias = torch.where(alive, bias, torch.zeros(()))
        if new_bias is not None:
            running[param_key(n, "bias")] = new_bias
        results.append(LayerResult(
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
            act=activations.get(f"{n}.input"), codebook=codebook,
            rounding_changed=rounding_changed,
        ))  # fmt: skip

    if config.bias_correction:  # b - E[(W_q - W) x] on the calibration split, layer by layer
        fixed = bias_corrections(
            graph, names, weights, {r.name: r.dequantized for r in results},
            {r.name: r.bias if r.bias is not None else biases[r.name] for r in results},
            calib, running, points,
        )
        results = [replace(r, bias=fixed[r.name]) if r.name in fixed else r for r in results]
    layers = tuple(results)
    size_bytes = sum(enc.nbytes() for _, _, enc in _packed_tensors(graph, layers))
    float_size = sum(float_bytes(v.numel()) for v in state_for_size(model).values())
    return Compressed(
        model=CompressedModel(graph, layers, activations),
        config=config,
        layers=layers,
        size_bytes=size_bytes,
        float_size_bytes=float_size,
        activations=activations,
        equalization=equalized,
    )


def biases_changed(equalized: Equalization | None) -> frozenset[str]:
    """The layers whose float bias equalization rescaled."""
    return frozenset() if equalized is None else frozenset(equalized.biases)

