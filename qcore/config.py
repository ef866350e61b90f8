"""Configuration records: what to do to a model, kept apart from how it is done."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

ClipMode = Literal["ratio", "absolute", "sigma", "percentile", "mse"]
Rounding = Literal["nearest", "stochastic"]
Scope = Literal["layer", "global"]

CLIP_MODES: tuple[str, ...] = ("ratio", "absolute", "sigma", "percentile", "mse")
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
SCOPES: tuple[str, ...] = ("layer", "global")
MIN_BITS, MAX_BITS = 1, 16


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


def check_bits(bits: object, what: str = "bits") -> int:
    """Return ``bits`` as an int after checking it is a whole number in 1..16."""
    if (
        isinstance(bits, bool)
        or not isinstance(bits, int | float)
        or not math.isfinite(bits)
        or bits != int(bits)
    ):
        raise ValueError(f"{what} must be a whole number from 1 to 16; got {bits!r}.")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(
            f"{what} must be from {MIN_BITS} to {MAX_BITS}; got {bits}. "
            "Leave quantization off (quant=None) to keep float32 weights."
        )
    return int(bits)


def _check_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class QuantConfig:
    """How weights are quantized.

    Each weight becomes ``(code - zero_point) * scale`` with an integer ``code`` of
    ``bits`` bits. The clip setting chooses the range the codes cover; what the number
    means depends on ``clip_mode``:

    - ``ratio``: fraction of max|w| in (0, 1]; 1.0 means no clipping (the default).
    - ``absolute``: clip to [-clip, clip] in weight units (clip > 0).
    - ``sigma``: clip at ``clip`` standard deviations of the weights (clip > 0).
    - ``percentile``: clip at the ``clip``-th percentile of |w|, in (0, 100].
    - ``mse``: search the range that minimises the squared error; ``clip`` is ignored.
    """

    bits: int = 8  # 1..16; 1 means sign(w) * mean|w|
    symmetric: bool = True  # codes in [-(2^(b-1)-1), 2^(b-1)-1], zero exact, no zero point
    per_channel: bool = False  # one scale per output channel (dim 0) instead of per tensor
    clip: float = 1.0
    clip_mode: ClipMode = "ratio"
    rounding: Rounding = "nearest"
    seed: int = 0  # for stochastic rounding, so results repeat
    # Per-layer bit widths that override ``bits``, as (layer name, bits) pairs; a mapping
    # is accepted and stored sorted so that the config stays hashable.
    layer_bits: tuple[tuple[str, int], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits))
        _check_choice("clip_mode", self.clip_mode, CLIP_MODES)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        clip = _check_finite("clip", self.clip)
        object.__setattr__(self, "clip", clip)
        if self.clip_mode == "ratio" and not 0.0 < clip <= 1.0:
            raise ValueError(
                f"A clip ratio must be in (0, 1], where 1.0 means no clipping; got {clip}."
            )
        if self.clip_mode in ("absolute", "sigma") and clip <= 0.0:
            raise ValueError(f"A clip threshold in {self.clip_mode} mode must be > 0; got {clip}.")
        if self.clip_mode == "percentile" and not 0.0 < clip <= 100.0:
            raise ValueError(f"A clip percentile must be in (0, 100]; got {clip}.")
        pairs = self.layer_bits.items() if isinstance(self.layer_bits, Mapping) else self.layer_bits
        checked = []
        for pair in pairs:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ValueError(
                    f"layer_bits entries must be (layer name, bits) pairs; got {pair!r}."
                )
            name, b = pair
            checked.append((str(name), check_bits(b, f"bits for layer {name!r}")))
        object.__setattr__(self, "layer_bits", tuple(sorted(checked)))

    def bits_for(self, layer: str) -> int:
        """The bit width used for ``layer``: its override if any, else ``bits``."""
        return dict(self.layer_bits).get(layer, self.bits)


@dataclass(frozen=True)
class PruneConfig:
    """Magnitude pruning: set the fraction ``rate`` of weights with the smallest |w| to zero.

    ``scope="layer"`` prunes floor(rate * n) weights in every layer; ``"global"`` ranks all
    weights of the compressed layers together. ``structured=True`` removes whole output
    channels, smallest L2 norm first (global scope ranks channels by RMS so that layers of
    different fan-in compare fairly).
    """

    rate: float = 0.0  # in [0, 1)
    structured: bool = False
    scope: Scope = "layer"

    def __post_init__(self) -> None:
        rate = _check_finite("rate", self.rate)
        if not 0.0 <= rate < 1.0:
            raise ValueError(
                f"A pruning rate must be at least 0 and below 1 (1 would remove every weight); "
                f"got {rate}."
            )
        object.__setattr__(self, "rate", rate)
        _check_choice("scope", self.scope, SCOPES)


@dataclass(frozen=True)
class CompressionConfig:
    """The whole pipeline: fold BatchNorm, prune, clip, quantize. ``None`` skips a step."""

    quant: QuantConfig | None = field(default_factory=QuantConfig)
    prune: PruneConfig | None = None
    layers: tuple[str, ...] | None = None  # names of weight layers to compress; None = all
    fold_bn: bool = True  # fold BatchNorm into the preceding conv / linear layer first

    def __post_init__(self) -> None:
        if self.quant is not None and not isinstance(self.quant, QuantConfig):
            raise ValueError("quant must be a QuantConfig or None.")
        if self.prune is not None and not isinstance(self.prune, PruneConfig):
            raise ValueError("prune must be a PruneConfig or None.")
        if self.layers is not None:
            if isinstance(self.layers, str):
                raise ValueError("layers must be a list of layer names, not a single string.")
            # duplicates would be compressed and counted twice
            object.__setattr__(self, "layers", tuple(dict.fromkeys(str(n) for n in self.layers)))

    @property
    def prunes(self) -> bool:
        return self.prune is not None and self.prune.rate > 0.0
