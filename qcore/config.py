"""Configuration records: what to do to a model, kept apart from how it is done.

Two layers live here:

- the frozen configs qcore runs (:class:`QuantConfig`, :class:`PruneConfig`,
  :class:`CompressionConfig`), each with ``to_dict`` (plain, JSON-safe) and ``from_dict``
  (strict: it reads files and links, so it refuses unknown keys and bad values with a
  sentence);
- :class:`Settings`, the flat settings a person gives (the Playground's widgets, a link's
  query, the command line), and the one mapping from them to a :class:`CompressionConfig`.
  Flat values are text: ``Settings.from_flat`` parses them, ``Settings.to_flat`` writes
  them back.

>>> cfg = CompressionConfig(quant=QuantConfig(bits=4), prune=PruneConfig(rate=0.5))
>>> CompressionConfig.from_dict(cfg.to_dict()) == cfg
True
>>> s, warnings = Settings.from_flat({"bits": "4", "prune": "0.5"})
>>> s.to_config() == cfg, warnings
(True, [])
>>> s.to_flat()
{'bits': '4', 'clip': '1', 'clip_mode': 'ratio', 'prune': '0.5'}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

__all__ = [
    "ClipMode", "Rounding", "Scope", "CLIP_MODES", "ROUNDINGS", "SCOPES", "MIN_BITS",
    "MAX_BITS", "MAX_SEED", "check_bits", "QuantConfig", "PruneConfig", "CompressionConfig",
    "FLOAT", "MAX_PRUNE", "ClipRange", "CLIP_RANGES", "Settings", "SETTING_KEYS",
    "parse_bool", "parse_number", "parse_bits", "parse_layer_bits", "parse_flat",
    "ActObserver", "ACT_OBSERVERS", "ActQuantConfig", "ScaleMode", "SCALE_MODES",
    "Codebook", "CODEBOOKS", "Entropy", "ENTROPY_CODINGS",
]  # fmt: skip

ClipMode = Literal["ratio", "absolute", "sigma", "percentile", "mse"]
Rounding = Literal["nearest", "stochastic", "adaround"]
Scope = Literal["layer", "global"]
ActObserver = Literal["minmax", "percentile", "mse", "entropy"]
ScaleMode = Literal["float", "pow2"]
Codebook = Literal["uniform", "kmeans"]
Entropy = Literal["huffman"]

CLIP_MODES: tuple[str, ...] = ("ratio", "absolute", "sigma", "percentile", "mse")
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic", "adaround")
SCOPES: tuple[str, ...] = ("layer", "global")
ACT_OBSERVERS: tuple[str, ...] = ("minmax", "percentile", "mse", "entropy")
SCALE_MODES: tuple[str, ...] = ("float", "pow2")
CODEBOOKS: tuple[str, ...] = ("uniform", "kmeans")
ENTROPY_CODINGS: tuple[str, ...] = ("none", "huffman")  # flat values; "none" is entropy=None
MIN_BITS, MAX_BITS = 1, 16
MAX_SEED = 2**32 - 1  # stochastic rounding seeds a torch.Generator with seed * 1_000_003 + i


def _show(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut short: messages quote hostile input, which may be huge."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        return "a number too long to show"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cut(text: str, limit: int = 40) -> str:
    """Flat text as given, cut short (a link's value may be kilobytes long)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {_show(value)}.")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_bits(bits: object, what: str = "bits") -> int:
    """Return ``bits`` as an int after checking it is a whole number in 1..16."""
    if not _is_number(bits) or (
        isinstance(bits, float) and (not math.isfinite(bits) or bits != int(bits))
    ):
        raise ValueError(f"{what} must be a whole number from 1 to 16; got {_show(bits)}.")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(
            f"{what} must be from {MIN_BITS} to {MAX_BITS}; got {_show(bits)}. "
            "Leave quantization off (quant=None) to keep float32 weights."
        )
    return int(bits)


def _check_finite(name: str, value: object) -> float:
    try:
        ok = _is_number(value) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number; got {_show(value)}.")
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

    ``scale="pow2"`` makes every scale a power of two (fixed point: a weight is stored as
    round(w * 2^p) and dequantized by a shift); the file then stores the exponent in a
    signed byte instead of a float32 scale.

    ``codebook="kmeans"`` shares weights instead (Deep Compression): each layer's kept
    weights are clustered into at most 2^bits centroids by k-means (:mod:`qcore.kmeans`),
    stored as a float32 codebook and a ``bits``-bit index per weight. It is per tensor
    (``per_channel=True`` is refused) and ignores clip, clip_mode, symmetric, rounding and
    scale: the centroids are fitted to the weights themselves.
    """

    bits: int = 8  # 1..16; 1 means sign(w) * mean|w|
    symmetric: bool = True  # codes in [-(2^(b-1)-1), 2^(b-1)-1], zero exact, no zero point
    per_channel: bool = False  # one scale per output channel (dim 0) instead of per tensor
    clip: float = 1.0
    clip_mode: ClipMode = "ratio"
    # "stochastic": seeded; "adaround": learnt per weight on calibration data (qcore.ptq),
    # the codes on the same grid as nearest's: same bits per weight, same file format (a
    # sparse form may win, and the file shrink, where more codes land on zero)
    rounding: Rounding = "nearest"
    seed: int = 0  # for stochastic rounding, so results repeat; 0..2**32-1
    # Per-layer bit widths that override ``bits``, as (layer name, bits) pairs, one per
    # layer; a mapping is accepted and stored sorted so that the config stays hashable.
    layer_bits: tuple[tuple[str, int], ...] = field(default=())
    scale: ScaleMode = "float"  # or "pow2": every scale a power of two
    codebook: Codebook = "uniform"  # or "kmeans": 2^bits shared values per layer

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits))
        _check_choice("codebook", self.codebook, CODEBOOKS)
        if self.codebook == "kmeans" and self.per_channel:
            raise ValueError(
                "A k-means codebook is shared by the whole layer; turn per-channel scales off "
                "to use one."
            )
        _check_choice("scale", self.scale, SCALE_MODES)
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
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be a whole number; got {_show(self.seed)}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be from 0 to {MAX_SEED}; got {_show(self.seed)}.")
        pairs = self.layer_bits.items() if isinstance(self.layer_bits, Mapping) else self.layer_bits
        checked: dict[str, int] = {}
        for pair in pairs:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ValueError(
                    f"layer_bits entries must be (layer name, bits) pairs; got {_show(pair)}."
                )
            name, b = str(pair[0]), pair[1]
            if name in checked:
                raise ValueError(
                    f"layer_bits names layer {_show(name)} twice; give each layer one bit width."
                )
            checked[name] = check_bits(b, f"bits for layer {_show(name)}")
        object.__setattr__(self, "layer_bits", tuple(sorted(checked.items())))

    def bits_for(self, layer: str) -> int:
        """The bit width used for ``layer``: its override if any, else ``bits``."""
        return dict(self.layer_bits).get(layer, self.bits)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe values; ``layer_bits`` as ``[[name, bits], ...]`` sorted by name."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["layer_bits"] = [[n, b] for n, b in self.layer_bits]
        return d

    @classmethod
    def from_dict(cls, d: object) -> QuantConfig:
        """The config ``to_dict`` wrote; missing keys take their defaults.

        Raises ValueError with a sentence for a key it does not know or a bad value.
        """
        values = _known_keys("A quant config", cls, d)
        _check_bools("A quant config", values, ("symmetric", "per_channel"))
        if "layer_bits" in values:
            values["layer_bits"] = _layer_bits_from(values["layer_bits"])
        return cls(**values)


@dataclass(frozen=True)
class PruneConfig:
    """Magnitude pruning: set the fraction ``rate`` of weights with the smallest |w| to zero.

    ``scope="layer"`` prunes floor(rate * n) weights in every layer; ``"global"`` ranks all
    weights of the compressed layers together. ``structured=True`` removes whole output
    channels, smallest L2 norm first, until that share of the weights is gone (global scope
    ranks channels by RMS so that layers of different fan-in compare fairly, and counts
    weights, not channels); a layer's last channel is never removed.
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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: object) -> PruneConfig:
        """The config ``to_dict`` wrote; missing keys take their defaults.

        Raises ValueError with a sentence for a key it does not know or a bad value.
        """
        values = _known_keys("A prune config", cls, d)
        _check_bools("A prune config", values, ("structured",))
        return cls(**values)


@dataclass(frozen=True)
class ActQuantConfig:
    """How activations are quantized: calibrated ranges, fake-quantized where values flow.

    Each activation becomes ``(clamp(round(x / scale) + zero_point) - zero_point) * scale``
    with ``bits``-bit codes, per tensor. The range comes from statistics collected on the
    calibration split by ``observer``:

    - ``minmax``: the smallest and largest value seen (0 included).
    - ``percentile``: clip |x| at its ``percentile``-th percentile (one outlier no longer
      stretches the grid).
    - ``mse``: the range with the least squared error on the calibration histogram.
    - ``entropy``: the threshold whose quantized histogram loses the least information
      (KL divergence), as TensorRT calibrates.
    """

    bits: int = 8  # 2..16
    symmetric: bool = False  # asymmetric suits ReLU outputs, which are never negative
    observer: ActObserver = "minmax"
    percentile: float = 99.99  # for observer="percentile", in (0, 100]
    scale: ScaleMode = "float"  # or "pow2": the scale a power of two (fixed point)
    # quantize the logits too (an engine's last layer writing int8); off, they stay float
    output: bool = False

    def __post_init__(self) -> None:
        _check_choice("scale", self.scale, SCALE_MODES)
        bits = check_bits(self.bits, "activation bits")
        if bits < 2:
            raise ValueError("Activations need at least 2 bits; got 1.")
        object.__setattr__(self, "bits", bits)
        _check_choice("observer", self.observer, ACT_OBSERVERS)
        pct = _check_finite("percentile", self.percentile)
        if not 0.0 < pct <= 100.0:
            raise ValueError(f"An activation percentile must be in (0, 100]; got {pct}.")
        object.__setattr__(self, "percentile", pct)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false; got {_show(self.symmetric)}.")
        if not isinstance(self.output, bool):
            raise ValueError(f"output must be true or false; got {_show(self.output)}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe values (``output`` only when set, so older files read the same)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if not self.output:
            del d["output"]
        return d

    @classmethod
    def from_dict(cls, d: object) -> ActQuantConfig:
        """The config ``to_dict`` wrote; missing keys take their defaults."""
        values = _known_keys("An activation config", cls, d)
        _check_bools("An activation config", values, ("symmetric", "output"))
        return cls(**values)


@dataclass(frozen=True)
class CompressionConfig:
    """The whole pipeline: fold BatchNorm, prune, clip, quantize. ``None`` skips a step."""

    quant: QuantConfig | None = field(default_factory=QuantConfig)
    prune: PruneConfig | None = None
    layers: tuple[str, ...] | None = None  # names of weight layers to compress; None = all
    fold_bn: bool = True  # fold BatchNorm into the preceding conv / linear layer first
    act: ActQuantConfig | None = None  # activations stay float unless set (needs calib data)
    # "huffman": weight codes and relative indices may be Huffman coded (where smaller)
    entropy: Entropy | None = None
    # blocks replaced by the identity (layer removal: see qcore.blocks), e.g. ("layer1",)
    drop: tuple[str, ...] = ()
    # cross-layer equalization of consecutive layers through ReLU before quantizing (the
    # float function unchanged); only with quant set (qcore.ptq)
    equalize: bool = False
    # subtract E[(W_q - W) x], measured on the calibration split, from each bias (qcore.ptq)
    bias_correction: bool = False

    def __post_init__(self) -> None:
        for key in ("equalize", "bias_correction"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false; got {_show(getattr(self, key))}.")
        if isinstance(self.drop, str) or not all(
            isinstance(n, str) and n for n in self.drop
        ):
            raise ValueError("drop must be a list of block names, such as ['layer1'].")
        object.__setattr__(self, "drop", tuple(dict.fromkeys(self.drop)))
        if self.quant is not None and not isinstance(self.quant, QuantConfig):
            raise ValueError("quant must be a QuantConfig or None.")
        if self.prune is not None and not isinstance(self.prune, PruneConfig):
            raise ValueError("prune must be a PruneConfig or None.")
        if self.act is not None and not isinstance(self.act, ActQuantConfig):
            raise ValueError("act must be an ActQuantConfig or None.")
        if self.entropy is not None and self.entropy != "huffman":
            raise ValueError(f"entropy must be None or huffman; got {_show(self.entropy)}.")
        if self.layers is not None:
            if isinstance(self.layers, str):
                raise ValueError("layers must be a list of layer names, not a single string.")
            # duplicates would be compressed and counted twice
            object.__setattr__(self, "layers", tuple(dict.fromkeys(str(n) for n in self.layers)))

    @property
    def prunes(self) -> bool:
        return self.prune is not None and self.prune.rate > 0.0

    @property
    def keeps_float(self) -> bool:
        """Whether the model runs as it is: no quantized weights or activations, no pruning,
        no block removed (folding BatchNorm alone changes no output)."""
        return self.quant is None and not self.prunes and self.act is None and not self.drop

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe values: nested dicts for quant and prune (or None), layers a list."""
        d = {
            "quant": None if self.quant is None else self.quant.to_dict(),
            "prune": None if self.prune is None else self.prune.to_dict(),
            "layers": None if self.layers is None else list(self.layers),
            "fold_bn": self.fold_bn,
        }
        if self.act is not None:  # absent when off, so files without activations read the same
            d["act"] = self.act.to_dict()
        if self.entropy is not None:  # absent when off, for the same reason
            d["entropy"] = self.entropy
        if self.drop:  # absent when nothing is removed, for the same reason
            d["drop"] = list(self.drop)
        for key in ("equalize", "bias_correction"):  # absent when off, for the same reason
            if getattr(self, key):
                d[key] = True
        return d

    @classmethod
    def from_dict(cls, d: object) -> CompressionConfig:
        """The config ``to_dict`` wrote; missing keys take their defaults.

        Raises ValueError with a sentence for a key it does not know or a bad value.
        """
        values = _known_keys("A compression config", cls, d)
        _check_bools("A compression config", values, ("fold_bn", "equalize", "bias_correction"))
        if values.get("quant") is not None:
            values["quant"] = QuantConfig.from_dict(values["quant"])
        if values.get("prune") is not None:
            values["prune"] = PruneConfig.from_dict(values["prune"])
        if values.get("act") is not None:
            values["act"] = ActQuantConfig.from_dict(values["act"])
        layers = values.get("layers")
        if layers is not None:
            if not isinstance(layers, list | tuple) or not all(isinstance(n, str) for n in layers):
                raise ValueError(
                    f"A compression config's layers must be a list of layer names or null; "
                    f"got {_show(layers)}."
                )
        drop = values.get("drop", ())
        if not isinstance(drop, list | tuple) or len(drop) > 256:
            raise ValueError(f"A compression config's drop must be a list of block names; "
                             f"got {_show(drop)}.")  # fmt: skip
        values["drop"] = tuple(drop)
        return cls(**values)


def _known_keys(what: str, cls: type, d: object) -> dict[str, Any]:
    """``d`` as a dict after checking it is a mapping of ``cls``'s field names only."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{what} must be a mapping of settings (a JSON object); got {_show(d)}.")
    known = [f.name for f in fields(cls) if f.init]
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ValueError(
            f"{what} has no setting {_show(unknown[0])}; the settings are: {', '.join(known)}."
        )
    return dict(d)


def _check_bools(what: str, values: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in values and not isinstance(values[key], bool):
            raise ValueError(f"{what}'s {key} must be true or false; got {_show(values[key])}.")


def _layer_bits_from(raw: object) -> tuple[tuple[str, int], ...]:
    """``[[name, bits], ...]`` (or ``{name: bits}``) as pairs, checking only the types."""
    pairs = list(raw.items()) if isinstance(raw, Mapping) else raw
    if not isinstance(pairs, list | tuple) or not all(
        isinstance(p, list | tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs
    ):
        raise ValueError(
            f"A quant config's layer_bits must be a list of [layer name, bits] pairs; "
            f"got {_show(raw)}."
        )
    return tuple((p[0], p[1]) for p in pairs)


# ---------------------------------------------------------------------------------------------
# Flat settings: what a person sets (widgets, a link, the command line) as plain values, and
# the one mapping from them to a CompressionConfig.

FLOAT = "float"  # the flat value of ``bits`` that means "no quantization"
MAX_PRUNE = 0.99  # the highest pruning rate a person may set (1.0 would remove everything)


@dataclass(frozen=True)
class ClipRange:
    """The clip values a person may set in one clip mode, and where that mode starts."""

    lo: float
    hi: float
    default: float


CLIP_RANGES: dict[str, ClipRange] = {
    "ratio": ClipRange(lo=0.01, hi=1.0, default=1.0),  # of max|w|; 1.0 = no clipping
    "absolute": ClipRange(lo=0.005, hi=2.0, default=0.5),  # weight units
    "sigma": ClipRange(lo=0.5, hi=8.0, default=3.0),  # standard deviations
    "percentile": ClipRange(lo=50.0, hi=100.0, default=99.9),  # of |w|
    "mse": ClipRange(lo=0.01, hi=1.0, default=1.0),  # unused: the range is searched
}


@dataclass(frozen=True)
class Settings:
    """Flat compression settings, in the units a person uses (hashable, link-friendly)."""

    bits: int | None = 8  # None = float, no quantization
    clip: float = 1.0
    clip_mode: str = "ratio"
    prune: float = 0.0
    symmetric: bool = True
    per_channel: bool = False
    rounding: str = "nearest"
    structured: bool = False
    scope: str = "layer"
    fold_bn: bool = True
    layers: tuple[str, ...] | None = None  # None = every weight layer
    # per-layer bit widths overriding ``bits``, as (layer, bits) pairs in model order; set by
    # the Mixed precision page or a link (``layer_bits=fc1:4,fc2:8``)
    layer_bits: tuple[tuple[str, int], ...] = ()
    scale: str = "float"  # "pow2": power-of-two scales (fixed point), weights and activations
    abits: int | None = None  # activation bits; None = activations stay float
    aobs: str = "minmax"  # the activation observer (range policy)
    codebook: str = "uniform"  # "kmeans": weights share 2^bits k-means centroids per layer
    entropy: str = "none"  # "huffman": codes and relative indices Huffman coded where smaller
    drop: tuple[str, ...] = ()  # blocks replaced by the identity (layer removal)
    equalize: bool = False  # cross-layer equalization before quantizing
    bias_correction: bool = False  # empirical bias correction on the calibration split

    @property
    def needs_calib(self) -> bool:
        """Whether compressing reads the calibration split (activations, bias correction,
        AdaRound), so a cache must key it by dataset."""
        return self.abits is not None or (self.bits is not None and (
            self.bias_correction or (self.rounding == "adaround" and self.codebook != "kmeans")))

    def to_config(self) -> CompressionConfig:
        """The qcore config; raises ValueError with a user sentence for a bad combination."""
        if self.layers is not None and not self.layers:
            raise ValueError("Pick at least one layer to compress (Advanced → Layers).")
        quant = None
        if self.bits is not None:
            quant = QuantConfig(
                bits=self.bits,
                symmetric=self.symmetric,
                # a k-means codebook is shared by the whole layer: it takes no per-channel
                # scales (see ``notes``, which says so)
                per_channel=self.per_channel and self.codebook != "kmeans",
                clip=self.clip,
                clip_mode=self.clip_mode,
                rounding=self.rounding,
                layer_bits=self.layer_bits,
                scale=self.scale,
                codebook=self.codebook,
            )
        prune = None
        if self.prune > 0:
            prune = PruneConfig(rate=self.prune, structured=self.structured, scope=self.scope)
        act = None
        if self.abits is not None:
            act = ActQuantConfig(bits=self.abits, observer=self.aobs, scale=self.scale)
        _check_choice("entropy", self.entropy, ENTROPY_CODINGS)
        return CompressionConfig(quant=quant, prune=prune, layers=self.layers,
                                 fold_bn=self.fold_bn, act=act, drop=self.drop,
                                 entropy=None if self.entropy == "none" else self.entropy,
                                 equalize=self.equalize, bias_correction=self.bias_correction)

    @classmethod
    def from_config(
        cls, config: CompressionConfig, layer_names: Sequence[str] | None = None
    ) -> Settings:
        """The settings whose ``to_config()`` is ``config``; ``layer_bits`` in the order of
        ``layer_names`` when given (settings keep model order), else by name."""
        q, p = config.quant, config.prune
        if q is not None and q.seed != 0:
            raise ValueError(
                f"This config uses rounding seed {q.seed}; flat settings always use seed 0."
            )
        a = config.act
        if a is not None and (a.symmetric or a.percentile != ActQuantConfig().percentile
                              or a.output):  # fmt: skip
            raise ValueError(
                "Flat settings use asymmetric activations, the default percentile and float "
                "logits; this config differs."
            )
        if q is not None and a is not None and q.scale != a.scale:
            raise ValueError("Flat settings use one scale mode for weights and activations.")
        s = cls(
            layers=config.layers,
            fold_bn=config.fold_bn,
            drop=config.drop,
            prune=0.0 if p is None else p.rate,
            structured=False if p is None else p.structured,
            scope="layer" if p is None else p.scope,
            abits=None if a is None else a.bits,
            aobs="minmax" if a is None else a.observer,
            scale=(q.scale if q is not None else a.scale if a is not None else "float"),
            entropy="none" if config.entropy is None else config.entropy,
            equalize=config.equalize,
            bias_correction=config.bias_correction,
        )
        if q is None:
            return replace(s, bits=None)
        order = {n: i for i, n in enumerate(layer_names or ())}
        pairs = sorted(q.layer_bits, key=lambda nb: (order.get(nb[0], len(order)), nb[0]))
        return replace(
            s,
            bits=q.bits,
            clip=q.clip,
            clip_mode=q.clip_mode,
            symmetric=q.symmetric,
            per_channel=q.per_channel,
            rounding=q.rounding,
            layer_bits=tuple(pairs),
            codebook=q.codebook,
        )

    def to_flat(self) -> dict[str, str]:
        """Flat text values (a link's query): the main sliders always, the others when not
        default. ``Settings.from_flat`` reads them back."""
        q = {
            "bits": FLOAT if self.bits is None else str(self.bits),
            "clip": f"{self.clip:g}",
            "clip_mode": self.clip_mode,
            "prune": f"{self.prune:g}",
        }
        default = Settings()
        for key in ("symmetric", "per_channel", "structured", "fold_bn", "equalize",
                    "bias_correction"):
            if getattr(self, key) != getattr(default, key):
                q[key] = "true" if getattr(self, key) else "false"
        for key in ("rounding", "scope", "scale", "aobs", "codebook", "entropy"):
            if getattr(self, key) != getattr(default, key):
                q[key] = getattr(self, key)
        if self.abits is not None:
            q["abits"] = str(self.abits)
        if self.layers is not None:
            q["layers"] = ",".join(self.layers)
        if self.layer_bits:
            q["layer_bits"] = ",".join(f"{n}:{b}" for n, b in self.layer_bits)
        if self.drop:
            q["drop"] = ",".join(self.drop)
        return q

    @classmethod
    def from_flat(
        cls,
        flat: Mapping[str, str],
        layer_names: Sequence[str] = (),
        *,
        model: str = "the model",
        source: str = "link",
        blocks: Sequence[str] | None = None,
    ) -> tuple[Settings, list[str]]:
        """Settings from flat text values, and a warning sentence for each bad or unknown
        one (which keeps its default). See :func:`parse_flat`."""
        values, warnings = parse_flat(flat, layer_names, model=model, source=source,
                                      blocks=blocks)
        return cls(**values), warnings

    def canonical(self) -> Settings:
        """The same compression with unused options reset, so equal results share a cache key."""
        d = Settings()
        s = self
        # first, as the 1-bit rule below reads it: overrides of float layers change nothing
        if s.layer_bits and s.layers is not None:
            s = replace(s, layer_bits=tuple(p for p in s.layer_bits if p[0] in s.layers))
        if s.bits is None:
            s = replace(
                s,
                clip=d.clip,
                clip_mode=d.clip_mode,
                symmetric=d.symmetric,
                per_channel=d.per_channel,
                rounding=d.rounding,
                layer_bits=d.layer_bits,
                codebook=d.codebook,
                equalize=d.equalize,  # the float function is unchanged by equalization
            )
            if s.prune == 0 and not s.drop:  # float weights: no error for a bias to correct
                s = replace(s, bias_correction=d.bias_correction)
        elif s.codebook == "kmeans":  # the centroids ignore range, rounding and scale mode
            s = replace(s, clip=d.clip, clip_mode=d.clip_mode, symmetric=d.symmetric,
                        rounding=d.rounding, per_channel=d.per_channel)  # fmt: skip
            if s.abits is None:
                s = replace(s, scale=d.scale)
        elif s.clip_mode == "mse":
            s = replace(s, clip=d.clip)
        if s.bits == 1 and not s.layer_bits:  # sign(w) * alpha: no range, no rounding choice
            s = replace(s, symmetric=d.symmetric, rounding=d.rounding)
        if s.prune == 0:
            s = replace(s, structured=d.structured, scope=d.scope)
        if s.abits is None:
            s = replace(s, aobs=d.aobs)
            if s.bits is None:  # no scale anywhere
                s = replace(s, scale=d.scale)
        if s.drop:  # the order blocks were picked in changes nothing
            s = replace(s, drop=tuple(sorted(s.drop)))
        return s

    def notes(self) -> tuple[str, ...]:
        """A sentence for each choice these settings set but cannot use together with another,
        saying what is used instead (``to_config`` resolves each clash this way everywhere:
        page, link, CLI).

        >>> Settings(bits=4, per_channel=True, codebook="kmeans").notes()[0][:45]
        'A k-means codebook is shared by a whole layer'
        """
        out = []
        if self.bits is not None and self.codebook == "kmeans" and self.per_channel:
            out.append("A k-means codebook is shared by a whole layer, so per-channel scales "
                       "do not apply: each layer gets one codebook (per-tensor).")
        return tuple(out)

    def label(self) -> str:
        """A short description, e.g. ``4 bits · clip 1 · symmetric · per-tensor · prune 0.5``."""
        if self.bits is None:
            parts = ["float32"]
        elif self.codebook == "kmeans":
            parts = [
                f"{self.bits} bits" + (" (per-layer: " + ", ".join(
                    f"{n} {b}" for n, b in self.layer_bits) + ")" if self.layer_bits else ""),
                "k-means codebook",
            ]  # fmt: skip
        else:
            mode = "" if self.clip_mode == "ratio" else f" ({self.clip_mode})"
            parts = [
                f"{self.bits} bits" + (" (per-layer: " + ", ".join(
                    f"{n} {b}" for n, b in self.layer_bits) + ")" if self.layer_bits else ""),
                f"clip {self.clip:g}{mode}",
                "symmetric" if self.symmetric else "asymmetric",
                "per-channel" if self.per_channel else "per-tensor",
            ]  # fmt: skip
        if self.abits is not None:
            parts.append(f"activations {self.abits} bits ({self.aobs})")
        if self.scale == "pow2" and (self.codebook != "kmeans" or self.abits is not None):
            parts.append("power-of-two scales")
        if self.entropy == "huffman":
            parts.append("Huffman coded")
        if self.bits is not None and self.rounding == "adaround" and self.codebook != "kmeans":
            parts.append("AdaRound")
        if self.equalize:
            parts.append("equalized")
        if self.bias_correction:
            parts.append("bias corrected")
        parts.append(f"prune {self.prune:g}")
        if self.drop:
            parts.append("without " + ", ".join(self.drop))
        return " · ".join(parts)

    def weight_widths(self, layer_names: Sequence[str] | None = None) -> tuple[int, ...]:
        """The distinct bit widths the compressed layers store, ascending (``(32,)`` in
        float). Without ``layer_names`` (and with every layer compressed) a layer the
        per-layer bits leave out is assumed to take ``bits``.

        >>> Settings(bits=8, layer_bits=(("a", 4), ("b", 4))).weight_widths(["a", "b"])
        (4,)
        >>> Settings(bits=8, layer_bits=(("a", 4), ("b", 6))).weight_widths(["a", "b", "c"])
        (4, 6, 8)
        """
        if self.bits is None:
            return (32,)
        names = self.layers if self.layers is not None else layer_names
        over = dict(self.layer_bits)
        if names is None:  # unknown layers: the slider's width sets those not listed
            return tuple(sorted({self.bits, *over.values()}))
        return tuple(sorted({over.get(n, self.bits) for n in names})) or (self.bits,)

    def weight_bits_text(self, layer_names: Sequence[str] | None = None) -> str:
        """The weights' widths in words: ``4 bits``, ``4 to 6 bits (per layer)``, ``32``."""
        w = self.weight_widths(layer_names)
        if len(w) == 1:
            return f"{w[0]} bits"
        return f"{w[0]} to {w[-1]} bits (per layer)"

    def wa_label(self, layer_names: Sequence[str] | None = None) -> str:
        """Weight and activation widths as stored, e.g. ``W4A8``, ``W4-6 mixedA32``
        (``W32`` / ``A32`` for float). Pass the model's ``layer_names`` so that per-layer
        bits covering every layer read as what they store.

        >>> Settings(bits=8, abits=8, layer_bits=(("a", 4),)).wa_label(["a"])
        'W4A8'
        >>> Settings(bits=8, layer_bits=(("a", 4), ("b", 6))).wa_label(["a", "b"])
        'W4-6 mixed A32'
        """
        w = self.weight_widths(layer_names)
        a = f"A{32 if self.abits is None else self.abits}"
        if len(w) == 1:
            return f"W{w[0]}{a}"
        return f"W{w[0]}-{w[-1]} mixed {a}"

    def slug(self) -> str:
        """A short file-name tag, e.g. ``4bit-prune0.5``."""
        parts = ["float" if self.bits is None else f"{self.bits}bit"]
        if self.layer_bits and self.bits is not None:
            parts.append("mixed")
        if self.codebook == "kmeans" and self.bits is not None:
            parts.append("kmeans")
        if self.entropy == "huffman":
            parts.append("huffman")
        if self.abits is not None:
            parts.append(f"a{self.abits}")
        if self.bits is not None and self.rounding == "adaround" and self.codebook != "kmeans":
            parts.append("adaround")
        if self.equalize:
            parts.append("cle")
        if self.bias_correction:
            parts.append("bc")
        if self.prune > 0:
            parts.append(f"prune{self.prune:g}")
        if self.drop:
            parts.append(f"drop{len(self.drop)}")
        return "-".join(parts)


SETTING_KEYS: tuple[str, ...] = tuple(Settings.__dataclass_fields__)

# Parsing flat text. Whole numbers are plain ASCII digits only: ``"²".isdigit()`` is True
# and ``int("٤")`` is 4, and a value that reads one way in one place must read the same
# way everywhere (or be refused everywhere).

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_FLOAT_WORDS = (FLOAT, "fp32", "32", "none")


def parse_bool(text: str) -> bool:
    """``true/1/yes/on`` or ``false/0/no/off`` (any case); else ValueError."""
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"Expected true or false; got {_show(text)}.")


_PLAIN_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def parse_number(text: str) -> float:
    """A finite number written plainly in ASCII (``"0.5"``, ``"1e-3"``); else ValueError.

    Only digits, one point and an exponent: no ``9_9.5`` or ``inf`` that ``float`` takes.

    >>> parse_number(" 0.5 "), parse_number("1e-3")
    (0.5, 0.001)
    """
    t = text.strip()
    try:
        if not _PLAIN_NUMBER.fullmatch(t):
            raise ValueError
        v = float(t)
        if not math.isfinite(v):
            raise ValueError
    except ValueError:
        raise ValueError(f"Expected a finite number; got {_show(text)}.") from None
    return v


def _whole(text: str) -> int | None:
    """A small whole number in plain ASCII digits, or None."""
    t = text.strip()
    return int(t) if re.fullmatch(r"[0-9]{1,3}", t) else None


def parse_bits(text: str) -> int | None:
    """A bit width 1..16, or None for ``float`` (also ``fp32``, ``32``, ``none``).

    >>> parse_bits("4"), parse_bits("float")
    (4, None)
    """
    t = text.strip().lower()
    if t in _FLOAT_WORDS:
        return None
    b = _whole(t)
    if b is None or not MIN_BITS <= b <= MAX_BITS:
        raise ValueError(f"bits must be a whole number from 1 to 16, or float; got {_show(text)}.")
    return b


def parse_layer_bits(text: str, layer_names: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``"fc1:4,fc2:8"`` as (layer, bits) pairs in the order of ``layer_names``.

    Each layer must be one of ``layer_names`` and appear once, with bits 1 to 16.

    >>> parse_layer_bits("fc2:8, fc1:4", ["fc1", "fc2"])
    (('fc1', 4), ('fc2', 8))
    """
    found: dict[str, int] = {}
    for part in text.split(","):
        name, sep, raw = (x.strip() for x in part.partition(":"))
        b = _whole(raw)
        if not sep or name not in layer_names or name in found or b is None:
            break
        if not MIN_BITS <= b <= MAX_BITS:
            break
        found[name] = b
    else:
        return tuple((n, found[n]) for n in layer_names if n in found)
    example = f"{layer_names[0] if layer_names else 'fc1'}:4"
    raise ValueError(
        f"Expected pairs such as {example}, bits 1 to 16, layers {', '.join(layer_names)}; "
        f"got {_show(text)}."
    )


def parse_flat(
    flat: Mapping[str, str],
    layer_names: Sequence[str] = (),
    *,
    model: str = "the model",
    source: str = "link",
    blocks: Sequence[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Validate flat text settings: the valid ones as :class:`Settings` field values, and
    a warning sentence for each bad or unknown one.

    Only keys present and valid appear in the result; the caller keeps the default of the
    others. ``layer_names`` are the model's weight layers, in model order (``layers`` and
    ``layer_bits`` must name them); ``model`` and ``source`` name them in the warnings.
    ``blocks`` are the model's removable blocks (``drop`` must name them); when None, any
    dotted name is taken and checked when the model is compressed.
    A linked ``clip_mode`` other than ratio brings that mode's default clip along.

    >>> values, warnings = parse_flat({"bits": "3", "clip_mode": "sigma", "colour": "red"})
    >>> values
    {'bits': 3, 'clip_mode': 'sigma', 'clip': 3.0}
    >>> warnings
    ['The link has an unknown setting `colour`; it was ignored.']
    """
    values: dict[str, Any] = {}
    warnings = [f"The {source} has an unknown setting `{key}`; it was ignored."
                for key in flat if key not in SETTING_KEYS]  # fmt: skip

    def take(key: str, parse: Callable[[str], Any], expected: str) -> None:
        """values[key] from the text, or a warning naming what was expected."""
        raw = flat.get(key)
        if raw is None:
            return
        try:
            values[key] = parse(raw)
        except ValueError:
            warnings.append(
                f"The {source}'s `{key}={_cut(raw)}` is not valid ({expected}); using the "
                "default."
            )

    take("bits", parse_bits, "a whole number from 1 to 16, or float")
    take("clip_mode", _one_of(CLIP_RANGES), "one of " + ", ".join(CLIP_RANGES))
    mode = values.get("clip_mode", "ratio")
    if mode != "ratio":
        values["clip"] = CLIP_RANGES[mode].default  # the default clip of the linked mode
    r = CLIP_RANGES[mode]
    take("clip", _within(r.lo, r.hi), f"a number from {r.lo:g} to {r.hi:g} in {mode} mode")
    take("prune", _within(0.0, MAX_PRUNE), f"a rate from 0 to {MAX_PRUNE:g}")
    for key in _BOOL_KEYS:
        take(key, parse_bool, "true or false")
    take("abits", _act_bits, "a whole number from 2 to 16, or float")
    for key, choices in _CHOICE_KEYS:
        take(key, _one_of(choices), "one of " + ", ".join(choices))

    known = list(layer_names)
    take("layers", lambda raw: _layers(raw, known),
         f"comma-separated layers of {model}: " + ", ".join(known))  # fmt: skip
    example = f"{known[0] if known else 'fc1'}:4"
    take("layer_bits", lambda raw: parse_layer_bits(raw, known),
         f"pairs such as {example}, bits 1 to 16, layers {', '.join(known)}")  # fmt: skip
    can = ", ".join(blocks) if blocks else "none"
    take("drop", lambda raw: _drop(raw, blocks),
         f"comma-separated removable blocks of {model}: {can}")  # fmt: skip
    # settings valid one by one but not together (k-means with per-channel scales) are kept
    # as given: Settings.to_config resolves them and Settings.notes says how
    return values, warnings


_BOOL_KEYS = ("symmetric", "per_channel", "structured", "fold_bn", "equalize", "bias_correction")
_CHOICE_KEYS = (("rounding", ROUNDINGS), ("scope", SCOPES), ("scale", SCALE_MODES),
                ("aobs", ACT_OBSERVERS), ("codebook", CODEBOOKS),
                ("entropy", ENTROPY_CODINGS))  # fmt: skip


def _one_of(choices: Collection[str]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(raw)
        return raw

    return parse


def _within(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        v = parse_number(raw)
        if not lo <= v <= hi:
            raise ValueError(raw)
        return v

    return parse


def _act_bits(raw: str) -> int | None:
    b = parse_bits(raw)
    if b is not None and b < 2:
        raise ValueError(raw)
    return b


def _layers(raw: str, known: Sequence[str]) -> tuple[str, ...]:
    """Comma-separated layer names, all of the model's, in model order."""
    picked = [n.strip() for n in raw.split(",") if n.strip()]
    if not picked or not all(n in known for n in picked):
        raise ValueError(raw)
    return tuple(n for n in known if n in picked)


def _drop(raw: str, blocks: Sequence[str] | None) -> tuple[str, ...]:
    """Comma-separated removable blocks (any dotted names when the blocks are unknown)."""
    picked = list(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if blocks is not None and all(n in blocks for n in picked):
        return tuple(n for n in blocks if n in picked)
    if blocks is None and all(_BLOCK_NAME.fullmatch(n) for n in picked):
        return tuple(picked)
    raise ValueError(raw)


_BLOCK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
