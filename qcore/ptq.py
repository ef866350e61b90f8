"""Post-training remedies for quantized weights: equalization, bias correction, AdaRound.

Pure functions over a traced :class:`~qcore.graph.Graph` and plain tensors; nothing here
changes the graph or its shared float tensors, and no module is built.

**Cross-layer equalization** (Nagel et al. 2019, data-free quantization). For two weight
layers with only a positively homogeneous function between them (ReLU, pooling, flatten:
f(x / s) = f(x) / s for s > 0), output channel i of the first may be divided by s_i and
input channel i of the second multiplied by it without changing the network's function.
With r1_i the range (max|w|) of the first layer's output channel i and r2_i that of the
second layer's input channel i, ``s_i = sqrt(r1_i * r2_i) / r2_i`` makes both ranges
``sqrt(r1_i * r2_i)``, so one per-tensor grid fits every channel about as well. Chains
(A -> B -> C) are swept until the scales settle. Pairs across a residual addition, with a
non-positively-homogeneous activation between them (GELU, ReLU6, ...), or whose first
output also feeds another node are left alone and listed with the reason.

**Empirical bias correction** (Nagel 2019, section 4.2): quantizing W shifts a layer's
mean output by E[(W_q - W) x]; measured per output channel over the calibration split
(inputs from the model with the earlier layers already compressed), it is subtracted from
the bias.

**AdaRound** (Nagel et al. 2020): per layer, each weight rounds down or up on the same grid
as round-to-nearest; which way is learnt. With floor codes c = floor(w / s) and a plain
tensor V (requires_grad) the soft weight is

    w~ = s * (clamp(c + h(V) + z, qmin, qmax) - z)
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)

and Adam minimises ``||f(W~ x_q + b) - f(W x + b)||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)``
over calibration batches (x_q: the input with the earlier layers rounded, x: the float
input; f the ReLU that follows the layer, if any), beta annealed from 20 to 2 so every h
ends at 0 or 1. The final codes are ``c + (V >= 0)``: integer codes of the nearest grid.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from qcore.affine import QParams, code_dtype
from qcore.graph import Graph, Points, param_key

__all__ = [
    "Equalization", "equalize", "find_pairs", "bias_corrections", "check_calib",
    "adaround_layer", "adaround_codes", "layer_inputs", "channel_ranges", "ADAROUND_ITERS",
    "equalization_ranges",
    "ADAROUND_BATCH", "ADAROUND_SAMPLES",
]  # fmt: skip

EQUALIZE_SWEEPS = 50  # chains converge in a few sweeps; this bounds the loop
ADAROUND_ITERS = 250  # Adam steps per layer (the paper: 10,000; 1,000 gained < 1 pp here)
ADAROUND_BATCH = 32  # calibration images per step
ADAROUND_SAMPLES = 1024  # at most this many calibration images are kept per layer
ADAROUND_LR = 1e-2
ADAROUND_REG = 0.01  # lambda, the rounding regulariser's weight (the paper's and AIMET's)
ADAROUND_WARMUP = 0.2  # share of the steps before the regulariser starts
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch
BETA_START, BETA_END = 20.0, 2.0
CALIB_BATCH = 256

# nodes a scale passes through unchanged per channel: f(x / s) = f(x) / s for s > 0
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d,
                        nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)  # fmt: skip
_HOMOGENEOUS_FNS = {F.relu, torch.relu, torch.flatten, F.max_pool2d, F.avg_pool2d,
                    F.adaptive_avg_pool2d, "relu", "flatten"}  # fmt: skip
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}


class _Captured(Exception):  # noqa: N818 - a signal, not an error: the wanted input was seen
    pass


# ------------------------------------------------------------------ equalization


@dataclass(frozen=True)
class Equalization:
    """Equalized float tensors of the layers, and which pairs were or were not equalized."""

    weights: Mapping[str, torch.Tensor]  # layer -> equalized weight (new tensors)
    biases: Mapping[str, torch.Tensor]  # layer -> equalized bias (the first of a pair)
    pairs: tuple[tuple[str, str], ...]  # (first, second) layers equalized, in graph order
    skipped: tuple[tuple[str, str, str], ...]  # (first, second, why not)
    scales: Mapping[str, torch.Tensor]  # first layer -> the product of its scales s (C,)


def _module(graph: Graph, node: fx.Node) -> nn.Module | None:
    return graph.module.get_submodule(node.target) if node.op == "call_module" else None


def _is_layer(graph: Graph, node: fx.Node) -> bool:
    return node.op == "call_module" and node.target in graph.layers


def _homogeneous(graph: Graph, node: fx.Node) -> bool:
    mod = _module(graph, node)
    if mod is not None:
        return isinstance(mod, _HOMOGENEOUS_MODULES) and not (
            isinstance(mod, nn.Flatten) and mod.start_dim != 1
        )
    if node.op not in ("call_function", "call_method") or node.target not in _HOMOGENEOUS_FNS:
        return False
    if node.target in (torch.flatten, "flatten"):  # channels stay apart only from dim 1 on
        return (list(node.args[1:2]) or [node.kwargs.get("start_dim", 0)])[0] == 1
    return True


def _describe(graph: Graph, node: fx.Node) -> str:
    mod = _module(graph, node)
    if node.op in ("call_function", "call_method") and node.target in _ADDS:
        return f"a residual addition ({node.name}) lies between them"
    what = type(mod).__name__ if mod is not None else getattr(node.target, "__name__",
                                                             str(node.target))
    return f"{what} ({node.name}) between them is not positively homogeneous"


def _behind(graph: Graph, node: fx.Node) -> list[str]:
    """The weight layers whose output reaches ``node`` (through any single-input nodes)."""
    found, todo, seen = [], [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_layer(graph, n) and n is not node:
            found.append(n.target)
            continue
        todo.extend(n.all_input_nodes)
    return found


def find_pairs(
    graph: Graph, layers: Sequence[str]
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """Consecutive weight-layer pairs that can be equalized, and those that cannot (why)."""
    picked = set(layers)
    pairs, skipped = [], []
    for node in graph.nodes:
        if not _is_layer(graph, node) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        second, a, why, shared = node.target, node.args[0], None, None
        while not _is_layer(graph, a) and a.op != "placeholder":
            if not _homogeneous(graph, a):
                why = _describe(graph, a)
                break
            if len(a.users) > 1:
                shared = shared or f"the output of {a.name} also feeds another node"
            if not a.args or not isinstance(a.args[0], fx.Node):
                why = "no weight layer feeds it directly"
                break
            a = a.args[0]
        if a.op == "placeholder":
            continue  # the first layer: nothing before it
        if why is None and len(a.users) > 1:
            shared = shared or f"the output of {a.target} also feeds another node"
        why = why or shared
        firsts = [a.target] if _is_layer(graph, a) else _behind(graph, a)
        for first in firsts:
            if first not in picked and second not in picked:
                continue
            if why is not None:
                skipped.append((first, second, why))
            elif first not in picked or second not in picked:
                skipped.append((first, second, "one of them is not compressed"))
            else:
                pairs.append((first, second))
    return pairs, skipped


def _in_channel_index(mod: nn.Module, w: torch.Tensor, channels: int) -> torch.Tensor | None:
    """For each weight of the second layer viewed as (Cout, K), the first layer's output
    channel it multiplies, (Cout, K); None if the shapes do not line up."""
    if isinstance(mod, nn.Linear):
        out, inp = w.shape
        if inp % channels:
            return None
        return (torch.arange(inp) // (inp // channels)).expand(out, inp)
    groups = getattr(mod, "groups", 1)
    cout, cpg = w.shape[0], w.shape[1]
    if cpg * groups != channels or cout % groups:
        return None
    opg = cout // groups
    idx = (torch.arange(cout) // opg)[:, None] * cpg + torch.arange(cpg)[None, :]  # (Cout, cpg)
    spatial = math.prod(w.shape[2:])
    return idx.repeat_interleave(spatial, dim=1)  # (Cout, cpg * k * k), row-major as reshape


def channel_ranges(w: torch.Tensor) -> torch.Tensor:
    """max|w| per output channel (dim 0), (C,)."""
    return w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)


def equalization_ranges(compressed) -> dict[str, dict[str, np.ndarray]]:
    """Per equalized layer of a ``Compressed`` model, each output channel's weight min and
    max before and after equalization (AIMET's picture), as numpy arrays (C,) under the
    keys ``before min``, ``before max``, ``after min``, ``after max``; {} when off."""
    eq = compressed.equalization
    if eq is None:
        return {}
    out = {}
    for name, after in eq.weights.items():
        before = compressed.graph.params[param_key(name, "weight")]
        b2, a2 = before.reshape(before.shape[0], -1), after.reshape(after.shape[0], -1)
        out[name] = {"before min": b2.amin(1).numpy(), "before max": b2.amax(1).numpy(),
                     "after min": a2.amin(1).numpy(), "after max": a2.amax(1).numpy()}
    return out


def equalize(
    graph: Graph,
    layers: Sequence[str],
    weights: Mapping[str, torch.Tensor],
    biases: Mapping[str, torch.Tensor | None],
) -> Equalization:
    """Cross-layer equalization of every equalizable pair among ``layers`` (see module doc).

    ``weights`` and ``biases`` are the float tensors by layer; they are not changed.
    """
    pairs, skipped = find_pairs(graph, layers)
    w = {n: weights[n] for p in pairs for n in p}
    b = {p[0]: biases.get(p[0]) for p in pairs}
    index = {}
    for first, second in list(pairs):
        idx = _in_channel_index(graph.layers[second], weights[second], weights[first].shape[0])
        if idx is None:
            pairs.remove((first, second))
            skipped.append((first, second, "their channels do not line up"))
        else:
            index[(first, second)] = idx
    total = {first: torch.ones(weights[first].shape[0]) for first, _ in pairs}
    for _ in range(EQUALIZE_SWEEPS):
        biggest = 0.0
        for first, second in pairs:
            idx = index[(first, second)]
            w1, w2 = w[first], w[second]
            r1 = channel_ranges(w1)
            m = w2.abs().reshape(w2.shape[0], -1)
            r2 = torch.zeros_like(r1).scatter_reduce(0, idx.reshape(-1), m.reshape(-1), "amax")
            s = torch.sqrt(r1 * r2) / r2
            s = torch.where((r1 > 0) & (r2 > 0) & torch.isfinite(s), s, torch.ones(()))
            shape1 = (-1,) + (1,) * (w1.dim() - 1)
            w[first] = w1 / s.reshape(shape1)
            if b.get(first) is not None:
                b[first] = b[first] / s
            w[second] = (w2.reshape(w2.shape[0], -1) * s[idx]).reshape(w2.shape)
            total[first] = total[first] * s
            biggest = max(biggest, float(s.log().abs().max()) if s.numel() else 0.0)
        if biggest < 1e-6:
            break
    return Equalization(
        weights=w,
        biases={n: v for n, v in b.items() if v is not None},
        pairs=tuple(pairs),
        skipped=tuple(skipped),
        scales=total,
    )


# ------------------------------------------------------------------ layer inputs


def check_calib(calib, what: str) -> None:
    if calib is None:
        raise ValueError(
            f"{what} needs calibration data: pass calib= the dataset's 'calib' split (never "
            "the test split)."
        )
    if getattr(calib, "split", None) == "test":
        raise ValueError(
            f"{what} learns from the calibration split, never from the test split; pass the "
            "'calib' split."
        )
    if len(calib.x) == 0:
        raise ValueError(f"The calibration split is empty; {what} has nothing to learn from.")


def layer_inputs(
    graph: Graph,
    layer: str,
    x: torch.Tensor,
    replacements: Mapping[str, torch.Tensor] | None = None,
    points: Points | None = None,
    batch_size: int = CALIB_BATCH,
) -> torch.Tensor:
    """What ``layer`` reads when the graph runs on ``x`` (stopping there), (N, ...)."""
    edge = f"{layer}.input"
    inner = (points or {}).get(edge)
    seen: list[torch.Tensor] = []

    def capture(t: torch.Tensor) -> torch.Tensor:
        seen.append((inner(t) if inner is not None else t).detach())
        raise _Captured

    pts = {**(points or {}), edge: capture}
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            try:
                graph.run(x[i : i + batch_size], replacements, pts)
            except _Captured:
                continue
            raise ValueError(f"Layer {layer!r} is not run by the model; it cannot be calibrated.")
    return torch.cat(seen)


def _layer_fn(mod: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                                          torch.Tensor]:  # fmt: skip
    if isinstance(mod, nn.Linear):
        return lambda x, w, b: F.linear(x, w, b)
    return lambda x, w, b: mod._conv_forward(x, w, b)


def _followed_by_relu(graph: Graph, layer: str) -> bool:
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == layer)
    if len(node.users) != 1:
        return False
    (user,) = node.users
    mod = _module(graph, user)
    return isinstance(mod, nn.ReLU) or (
        user.op in ("call_function", "call_method") and user.target in (F.relu, torch.relu, "relu")
    )


# ------------------------------------------------------------------ bias correction


def bias_corrections(
    graph: Graph,
    order: Sequence[str],
    weights: Mapping[str, torch.Tensor],
    compressed: Mapping[str, torch.Tensor],
    biases: Mapping[str, torch.Tensor | None],
    calib,
    replacements: Mapping[str, torch.Tensor] | None = None,
    points: Points | None = None,
) -> dict[str, torch.Tensor]:
    """Corrected biases ``b - E[(W_q - W) x]`` per layer with a bias, in ``order``.

    ``weights`` are the float weights, ``compressed`` the ones the variant runs with,
    ``replacements`` every tensor the variant replaces (its weights and biases); each
    layer's inputs ``x`` come from the calibration split run through the variant with the
    earlier layers' biases already corrected.
    """
    check_calib(calib, "Bias correction")
    repl = dict(replacements or {})
    out: dict[str, torch.Tensor] = {}
    for name in order:
        b = biases.get(name)
        if b is None:
            continue
        dw = compressed[name] - weights[name]
        if not bool((dw != 0).any()):
            continue
        x = layer_inputs(graph, name, calib.inputs(), repl, points)
        fn = _layer_fn(graph.layers[name])
        with torch.no_grad():
            total = torch.zeros(b.shape[0], dtype=torch.float64)
            for i in range(0, x.shape[0], CALIB_BATCH):
                y = fn(x[i : i + CALIB_BATCH], dw, None)  # (B, C, ...)
                total += y.double().transpose(0, 1).reshape(b.shape[0], -1).sum(dim=1)
            per = x.shape[0] * (math.prod(y.shape[2:]) if y.dim() > 2 else 1)
            shift = (total / per).float()
        out[name] = b - shift
        repl[param_key(name, "bias")] = out[name]
    return out


# ------------------------------------------------------------------ AdaRound


def _h(v: torch.Tensor) -> torch.Tensor:
    """The rectified sigmoid: in [0, 1], exactly 0 or 1 beyond the stretch."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def adaround_codes(
    w: torch.Tensor,
    qp: QParams,
    x_q: torch.Tensor,
    target: torch.Tensor,
    layer_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    relu: bool = False,
    iters: int | None = None,
    batch_size: int = ADAROUND_BATCH,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integer codes of ``w`` on the grid ``qp`` (each the floor or the ceiling of w / s),
    learnt so that ``layer_fn(x_q, w_q, bias)`` reconstructs ``target`` (see module doc).

    ``w`` is viewed as (G, K) with one scale per group, as ``qp`` holds; pruned weights
    (``mask`` False) take the zero code. Returns codes of ``w``'s shape in the grid's dtype.
    """
    if qp.binary:
        raise ValueError("AdaRound chooses between two grid levels; it needs at least 2 bits.")
    iters = ADAROUND_ITERS if iters is None else iters
    # learning needs autograd even when the caller runs under inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        return _adaround(w.clone(), qp, x_q.clone(), target.clone(), layer_fn, bias, mask, relu,
                         iters, batch_size, generator)  # fmt: skip


def _adaround(w, qp, x_q, target, layer_fn, bias, mask, relu, iters, batch_size, generator):
    g = qp.scale.numel()
    w = w.detach().float()
    w2 = w.reshape(g, -1)
    s, z = qp.scale.float().clone()[:, None], qp.zero_point.float().clone()[:, None]
    floor = torch.floor(w2 / s)
    rest = (w2 / s - floor).clamp(0.0, 1.0)
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    v = torch.log(p / (1 - p)).requires_grad_(True)  # h(v) == rest at the start
    keep = None if mask is None else mask.reshape(g, -1).float()
    fixed = None if bias is None else bias.detach().clone()
    target = F.relu(target) if relu else target
    opt = torch.optim.Adam([v], lr=ADAROUND_LR)
    n = x_q.shape[0]
    warm = int(iters * ADAROUND_WARMUP)
    for t in range(iters):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        soft = s * ((floor + _h(v) + z).clamp(qp.qmin, qp.qmax) - z)
        if keep is not None:
            soft = soft * keep
        out = layer_fn(x_q[idx], soft.reshape(w.shape), fixed)
        if relu:
            out = F.relu(out)
        rec = (out - target[idx]).pow(2).reshape(out.shape[0], -1).sum(dim=1).mean()
        if t < warm:
            loss = rec
        else:
            rel = (t - warm) / max(iters - warm, 1)
            beta = BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(rel * math.pi))
            h = _h(v) if keep is None else _h(v)[keep.bool()]
            loss = rec + ADAROUND_REG * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        codes = (floor + (v >= 0).float() + z).clamp(qp.qmin, qp.qmax)
        if keep is not None:
            codes = torch.where(keep.bool(), codes, z.expand_as(codes))
    return codes.to(code_dtype(qp.qmin, qp.qmax)).reshape(w.shape)


def adaround_layer(
    graph: Graph,
    name: str,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    qp: QParams,
    calib,
    float_replacements: Mapping[str, torch.Tensor],
    replacements: Mapping[str, torch.Tensor],
    points: Points | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """AdaRound codes of layer ``name``: float targets from the float model (with
    ``float_replacements``, e.g. equalized tensors), inputs from the variant so far."""
    check_calib(calib, "AdaRound")
    x = calib.inputs(slice(0, ADAROUND_SAMPLES))
    fn = _layer_fn(graph.layers[name])
    x_float = layer_inputs(graph, name, x, float_replacements)
    x_q = layer_inputs(graph, name, x, replacements, points)
    with torch.no_grad():
        target = torch.cat([fn(x_float[i : i + CALIB_BATCH], w, bias)
                            for i in range(0, x.shape[0], CALIB_BATCH)])  # fmt: skip
    return adaround_codes(w, qp, x_q, target, fn, bias, mask,
                          relu=_followed_by_relu(graph, name), generator=generator)

