"""The pipeline: fold BatchNorm -> prune (mask) -> clip -> quantize -> size.

``compress`` never changes the model it is given and never copies its tensors per call:
the compressed weights are a new dict of tensors that :class:`CompressedModel` runs in a
structural copy of the shared (folded) float module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qcore.config import CompressionConfig
from qcore.fold import _assert_eval, fold_batchnorm, state_for_size, weight_layers
from qcore.prune import global_masks, layer_mask
from qcore.quant import QuantResult, quantize_checked
from qcore.size import TensorSize, float_bytes, packed_weight_size

__all__ = [
    "CompressedModel",
    "LayerStats",
    "Compressed",
    "compress",
    "sqnr_db",
    "param_key",
    "shallow_copy_with",
]


def param_key(layer: str, attr: str) -> str:
    """The state-dict key of ``attr`` in ``layer`` ("" is the root module itself)."""
    return f"{layer}.{attr}" if layer else attr


def shallow_copy_with(
    module: nn.Module, overrides: dict[str, torch.Tensor], prefix: str = ""
) -> nn.Module:
    """A structural copy of ``module`` that shares every tensor, with ``overrides`` swapped in.

    Each submodule gets its own parameter, buffer, hook and child tables (new dicts over the
    same tensors), so running or changing the copy never touches the shared module, and two
    sessions can run different compressed variants of one model at the same time.
    """
    new = object.__new__(type(module))  # no __init__: the tables are filled in below
    new.__dict__ = {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    for name in module._parameters:
        key = param_key(prefix, name)
        if key in overrides:
            new._parameters[name] = nn.Parameter(overrides[key], requires_grad=False)
    for name in module._buffers:
        key = param_key(prefix, name)
        if key in overrides:
            new._buffers[name] = overrides[key]
    for name, child in module._modules.items():
        if child is not None:
            new._modules[name] = shallow_copy_with(child, overrides, param_key(prefix, name))
    return new


class CompressedModel(nn.Module):
    """A float module with some of its tensors replaced, sharing all the others.

    Built from a structural copy of the shared (folded) float module: no tensor is copied
    and the shared module is never changed, not even for the length of a forward pass
    (which ``functional_call`` would do, and which is unsafe with several sessions).
    It runs in eval mode only, since training-mode BatchNorm would write to shared buffers.
    """

    def __init__(self, base: nn.Module, overrides: dict[str, torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "_base", base)  # held by reference, not registered
        self._overrides = dict(overrides)
        self.net = shallow_copy_with(base, self._overrides)
        nn.Module.train(self, False)  # eval mode, this wrapper and its copy alike

    @property
    def base(self) -> nn.Module:
        return self._base

    @property
    def overrides(self) -> dict[str, torch.Tensor]:
        return dict(self._overrides)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every tensor the model runs with: the base state with the overrides applied."""
        return state_for_size(self.net)

    def train(self, mode: bool = True) -> CompressedModel:
        if mode:
            raise RuntimeError(
                "A compressed model shares its tensors with the float model and runs in eval "
                "mode only; fine-tune a copy of the float model instead."
            )
        return super().train(False)

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


@dataclass(frozen=True)
class LayerStats:
    """What compression did to one weight layer."""

    name: str
    kind: str  # "linear" or "conv"
    shape: tuple[int, ...]
    params: int  # weights + bias
    bits: int  # 32 when left in float
    sparsity: float  # fraction of weights that are exactly zero afterwards
    sqnr_db: float  # 10*log10(||w||^2 / ||w - q(w)||^2); inf when nothing changed
    size_bytes: int  # packed bytes of weight + bias
    float_bytes: int
    encoding: str  # "dense", "mask" or "relidx"


@dataclass(frozen=True, eq=False)
class Compressed:
    """A compressed model and its accounting. ``size_bytes`` is what the export writes."""

    model: CompressedModel
    config: CompressionConfig
    layers: tuple[LayerStats, ...]
    size_bytes: int
    float_size_bytes: int
    quant: dict[str, QuantResult] = field(repr=False)  # per compressed layer (if quantized)
    masks: dict[str, torch.Tensor] = field(repr=False)  # per pruned layer
    sizes: dict[str, TensorSize] = field(repr=False)  # per compressed weight tensor
    source_weights: dict[str, torch.Tensor] = field(repr=False)  # float weights, pre-pruning

    @property
    def ratio(self) -> float:
        return self.float_size_bytes / self.size_bytes if self.size_bytes else math.inf

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over all weight layers."""
        total = sum(math.prod(s.shape) for s in self.layers)
        zeros = sum(s.sparsity * math.prod(s.shape) for s in self.layers)
        return zeros / total if total else 0.0

    @property
    def mean_sqnr_db(self) -> float:
        """Mean SQNR over the layers that changed (inf if none did)."""
        finite = [s.sqnr_db for s in self.layers if math.isfinite(s.sqnr_db)]
        return sum(finite) / len(finite) if finite else math.inf

    def layer(self, name: str) -> LayerStats:
        for s in self.layers:
            if s.name == name:
                return s
        names = ", ".join(s.name for s in self.layers)
        raise ValueError(f"No layer named {name!r}; layers are {names}.")


def sqnr_db(w: torch.Tensor, q: torch.Tensor) -> float:
    """10 * log10(||w||^2 / ||w - q||^2) in dB; inf when q equals w.

    >>> sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]))   # 25 / 1
    13.979400086720377
    """
    err = float(((w.double() - q.double()) ** 2).sum())
    sig = float((w.double() ** 2).sum())
    if err == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / err)


def _check_weights(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ValueError(
            f"Layer {name!r} has NaN or infinite weights; the model cannot be compressed."
        )


def compress(model: nn.Module, config: CompressionConfig | None = None) -> Compressed:
    """Compress ``model`` as ``config`` says and account for every byte (see DESIGN.md)."""
    config = CompressionConfig() if config is None else config
    if not isinstance(config, CompressionConfig):
        raise ValueError("config must be a CompressionConfig.")
    _assert_eval(model)
    base = fold_batchnorm(model) if config.fold_bn else model
    all_layers = weight_layers(base)
    if not all_layers:
        raise ValueError("The model has no linear or convolution layers to compress.")
    names = list(all_layers) if config.layers is None else list(config.layers)
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
    weights = {n: all_layers[n].weight.detach() for n in names}
    for n, w in weights.items():
        _check_weights(n, w)

    masks: dict[str, torch.Tensor] = {}
    if config.prunes:
        p = config.prune
        if p.scope == "global":
            masks = global_masks(weights, p)
        else:
            masks = {n: layer_mask(w, p) for n, w in weights.items()}

    overrides: dict[str, torch.Tensor] = {}
    quant: dict[str, QuantResult] = {}
    sizes: dict[str, TensorSize] = {}
    stats = []
    for i, n in enumerate(names):
        w, mask = weights[n], masks.get(n)
        layer = all_layers[n]
        if q is not None:
            gen = torch.Generator().manual_seed(q.seed * 1_000_003 + i)
            res = quantize_checked(w, q, bits=q.bits_for(n), mask=mask, generator=gen)
            new = res.values
            quant[n] = res
            groups = res.qparams.scale.numel()
            size = packed_weight_size(w.numel(), res.bits, groups=groups,
                                      symmetric=q.symmetric, mask=mask)
        else:
            new = w if mask is None else torch.where(mask, w, torch.zeros((), dtype=w.dtype))
            size = packed_weight_size(w.numel(), 32, groups=0, symmetric=True, mask=mask,
                                      quantized=False)
        if new is not w:
            overrides[param_key(n, "weight")] = new
        bias = getattr(layer, "bias", None)
        bias_numel = 0 if bias is None else bias.numel()
        if bias is not None and mask is not None and config.prune.structured:
            # a removed output channel is gone, bias included
            alive = mask.reshape(mask.shape[0], -1).any(dim=1)
            overrides[param_key(n, "bias")] = torch.where(alive, bias.detach(), torch.zeros(()))
        sizes[n] = size
        stats.append(LayerStats(
            name=n,
            kind="conv" if w.dim() > 2 else "linear",
            shape=tuple(w.shape),
            params=w.numel() + bias_numel,
            bits=size.bits,
            sparsity=float((new == 0).sum()) / w.numel(),
            sqnr_db=sqnr_db(w, new),
            size_bytes=size.total + float_bytes(bias_numel),
            float_bytes=float_bytes(w.numel() + bias_numel),
            encoding=size.encoding,
        ))

    counted = {param_key(n, a) for n in names for a in ("weight", "bias")}
    rest = sum(float_bytes(v.numel()) for k, v in state_for_size(base).items() if k not in counted)
    size_bytes = sum(s.size_bytes for s in stats) + rest
    float_size = sum(float_bytes(v.numel()) for v in state_for_size(model).values())
    return Compressed(
        model=CompressedModel(base, overrides),
        config=config,
        layers=tuple(stats),
        size_bytes=size_bytes,
        float_size_bytes=float_size,
        quant=quant,
        masks=masks,
        sizes=sizes,
        source_weights=weights,
    )
