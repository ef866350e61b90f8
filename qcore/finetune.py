"""Quantization-aware fine-tuning: train with the compressed forward pass in the loop.

``finetune(model, train, config, ft)`` trains copies of the float weights and biases of
the layers ``config`` compresses, through the model's shared graph (:mod:`qcore.graph`):
each step the weights are pruned and fake-quantized exactly as :func:`qcore.compress`
would do it for their current values, with a straight-through gradient (:mod:`qcore.ste`),
and the graph runs with them as replacement tensors. The shared model and its graph are
never written; the result is a new float module whose compression with the same config
is the fine-tuned compressed model.

- Scales are re-chosen every step from the current weights by the config's range policy
  (clip mode, per-channel, symmetric or not, 1-bit alpha, power-of-two); with
  ``learn_scales=True`` each 2+-bit layer's steps are learned instead (LSQ, Esser et al.
  2020) and at the end the weights are clipped to the learned ranges, so that
  ``compress`` re-chooses (to float rounding) the same grid.
- Activations (``config.act``): fake-quantized with a straight-through gradient at the
  edges ``compress`` uses, with ranges calibrated on the ``calib`` split from the current
  float weights at the start of each epoch (the same calibration ``compress`` runs).
- Pruning: ``oneshot`` keeps the masks ``compress`` chooses on the starting weights;
  ``gradual`` raises the rate along Zhu & Gupta's cubic schedule
  s_t = s_f (1 - (1 - t / T)^3), T = 3/4 of the steps, recomputing the masks by magnitude
  16 times on the way; the last quarter trains with the final masks. Pruned weights are
  exactly zero and get no gradient.
- Weight sharing (``codebook="kmeans"``, Deep Compression's centroid fine-tuning): the
  trained tensors are each layer's centroids, the assignments of weights to centroids
  fixed; a layer runs with ``centroids[codes]`` (pruned weights zero), so autograd sums
  the gradients of all weights sharing a centroid into it and the sharing survives
  training. The returned module holds only those shared values, from which ``compress``
  re-derives exactly the trained codebook. The masks stay fixed (oneshot only).
- Distillation: loss = alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE, with
  p = softmax(logits / T) and the float model as teacher (Hinton et al., 2015).
- ``grad_bits``: every gradient is quantized to b bits with stochastic rounding before
  the optimizer step; the history's ``grad_sqnr_db`` shows how much of it survives.
- Adam with a cosine learning-rate decay to zero. Shuffling and stochastic rounding use
  ``torch.Generator``s seeded from ``ft.seed``: the same seed gives the same history on CPU.
- Calibration-split accuracy is the accuracy of ``compress`` on the current weights,
  measured at the end of each epoch (and at the start: the post-training accuracy).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from qcore.activations import ActRange
from qcore.compress import Compressed, compress
from qcore.config import (
    MAX_SEED,
    CompressionConfig,
    PruneConfig,
    _check_bools,
    _check_choice,
    _check_finite,
    _known_keys,
    _show,
)
from qcore.data import Dataset
from qcore.evaluate import evaluate
from qcore.fold import has_batchnorm, state_for_size
from qcore.graph import Graph, Variant, fold_batchnorm, graph_of, param_key
from qcore.prune import global_masks, layer_mask
from qcore.quant import _groups, quantize_prechecked
from qcore.refs import Progress
from qcore.ste import (
    fake_quantize_ste,
    inside_clip,
    lsq_quantize,
    quantize_gradient,
    straight_through,
)

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "PRUNE_SCHEDULES", "cubic_rate",
           "shared_weight"]  # fmt: skip

PruneSchedule = Literal["oneshot", "gradual"]
PRUNE_SCHEDULES: tuple[str, ...] = ("oneshot", "gradual")
MAX_EPOCHS = 1000
GRADUAL_END = 0.75  # the gradual schedule reaches the final rate after this share of steps
GRADUAL_UPDATES = 16  # how many times the gradual schedule recomputes the masks


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune: optimiser, loss and the training-time options."""

    epochs: int = 1
    lr: float = 1e-3  # peak Adam learning rate (cosine decay to 0); measured, see README
    batch_size: int = 64
    seed: int = 0  # shuffling, stochastic gradient rounding; 0..2**32-1
    distill: bool = False  # learn from the float model's soft outputs as well as the labels
    temperature: float = 4.0  # softens both distributions in the distillation term
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha goes to cross-entropy
    grad_bits: int | None = None  # quantize gradients to 2..16 bits; None = float32
    prune_schedule: PruneSchedule = "oneshot"  # or "gradual": Zhu & Gupta's cubic ramp
    learn_scales: bool = False  # learn each layer's quantization steps (LSQ)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be a whole number; got {_show(v)}.")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise ValueError(f"epochs must be from 1 to {MAX_EPOCHS}; got {self.epochs}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {self.batch_size}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be from 0 to {MAX_SEED}; got {self.seed}.")
        lr = _check_finite("lr", self.lr)
        if lr <= 0:
            raise ValueError(f"The learning rate must be above 0; got {lr}.")
        object.__setattr__(self, "lr", lr)
        t = _check_finite("temperature", self.temperature)
        if t <= 0:
            raise ValueError(f"The distillation temperature must be above 0; got {t}.")
        object.__setattr__(self, "temperature", t)
        a = _check_finite("alpha", self.alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha (the distillation weight) must be in [0, 1]; got {a}.")
        object.__setattr__(self, "alpha", a)
        g = self.grad_bits
        if g is not None:
            if not isinstance(g, int) or isinstance(g, bool) or not 2 <= g <= 16:
                raise ValueError(
                    f"grad_bits must be a whole number from 2 to 16, or None for float "
                    f"gradients; got {_show(g)}."
                )
        _check_choice("prune_schedule", self.prune_schedule, PRUNE_SCHEDULES)
        for name in ("distill", "learn_scales"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false; got {_show(getattr(self, name))}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: object) -> FinetuneConfig:
        """The config ``to_dict`` wrote; missing keys take their defaults.

        Raises ValueError with a sentence for a key it does not know or a bad value.
        """
        values = _known_keys("A fine-tuning config", cls, d)
        _check_bools("A fine-tuning config", values, ("distill", "learn_scales"))
        return cls(**values)


@dataclass(frozen=True, eq=False)
class FinetuneResult:
    """A fine-tuned model and how training went."""

    model: nn.Module  # a new float module (eval mode); compress it with ``config``
    history: pd.DataFrame  # one row per step (and a step-0 row): see HISTORY_COLUMNS
    config: CompressionConfig
    ft: FinetuneConfig
    stopped: bool  # True when should_stop ended it early
    seconds: float


# epoch, step: 1-based (a step-0 row holds the starting calib accuracy when calib is given);
# loss, train_accuracy: of the batch, through the compressed forward pass;
# calib_accuracy: compress() on the current weights, at the end of each epoch, else NaN;
# lr: the learning rate of the step; prune_rate: the rate the masks apply;
# grad_sqnr_db: 10 log10(||g||^2 / ||g - q(g)||^2) over all gradients (NaN without grad_bits)
HISTORY_COLUMNS = ("epoch", "step", "loss", "train_accuracy", "calib_accuracy", "lr",
                   "prune_rate", "grad_sqnr_db", "seconds")  # fmt: skip


def cubic_rate(final: float, t: int, end: int) -> float:
    """Zhu & Gupta's gradual pruning rate at step ``t``: final * (1 - (1 - t / end)^3).

    >>> cubic_rate(0.9, 0, 10), cubic_rate(0.9, 5, 10), cubic_rate(0.9, 12, 10)
    (0.0, 0.7875, 0.9)
    """
    frac = min(max(t, 0), end) / max(end, 1)
    return final * (1.0 - (1.0 - frac) ** 3)


def _masks(
    weights: Mapping[str, torch.Tensor], p: PruneConfig | None
) -> dict[str, torch.Tensor]:
    """The masks ``compress`` chooses for these weights (none when the rate is 0)."""
    if p is None or p.rate <= 0.0:
        return {}
    if p.scope == "global":
        return global_masks(weights, p)
    return {n: layer_mask(w, p) for n, w in weights.items()}


class _Adam:
    """Adam (Kingma & Ba, 2015) over a list of leaf tensors, with a learning rate per step.

    Written out (a few lines) rather than ``torch.optim.Adam``, whose first use imports
    ``torch._dynamo`` (seconds on a small machine, before the first step of a short run).
    """

    def __init__(self, params: list[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params, (self.b1, self.b2), self.eps, self.t = params, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        c1, c2 = 1.0 - self.b1**self.t, 1.0 - self.b2**self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1.0 - self.b1)
            v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1.0 - self.b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def shared_weight(
    centroids: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """A shared-weight layer ``centroids[codes]``, pruned weights exactly zero.

    Differentiable in ``centroids``: dL/dc_k is the sum of dL/dw over the kept weights
    assigned to centroid k (Deep Compression's shared-weight update). A layer with every
    weight pruned has no centroid at all and is all zeros.
    """
    if centroids.numel() == 0:
        return centroids.new_zeros(codes.shape)
    w = centroids[codes.long()]
    return w if mask is None else torch.where(mask, w, torch.zeros((), dtype=w.dtype))


class _TrainState:
    """The trained tensors of the compressed layers; :meth:`variant` runs them.

    The forward pass is a :class:`qcore.graph.Variant` whose replacement tensors are
    recomputed from the trained ones at every call (pruned, fake-quantized with the
    straight-through estimator), so gradients reach them.
    """

    def __init__(self, graph: Graph, base: Compressed, learn_scales: bool):
        self.graph = graph
        self.config = base.config
        self.names = [r.name for r in base.layers]
        self.structured = self.config.prunes and self.config.prune.structured
        self.weights: dict[str, torch.Tensor] = {}
        self.biases: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {r.name: r.mask for r in base.layers
                                               if r.mask is not None}  # fmt: skip
        for n in self.names:
            w = graph.params[param_key(n, "weight")]
            m = self.masks.get(n)
            w = w.clone() if m is None else w * m
            self.weights[n] = w.requires_grad_(True)
            b = graph.params.get(param_key(n, "bias"))
            if b is not None:
                self.biases[n] = b.clone().requires_grad_(True)
        # LSQ: one learned step per group, from the scales compress chose at the start
        self.steps: dict[str, torch.Tensor] = {}
        self.zero_points: dict[str, torch.Tensor] = {}
        if learn_scales and self.config.quant is not None:
            for r in base.layers:
                if r.qparams is not None and not r.qparams.binary:
                    self.steps[r.name] = r.qparams.scale.clone().requires_grad_(True)
                    self.zero_points[r.name] = r.qparams.zero_point.clone()
        # weight sharing: the centroids are trained, each weight's centroid fixed
        self.centroids: dict[str, torch.Tensor] = {}
        self.codes: dict[str, torch.Tensor] = {}
        for r in base.layers:
            if r.codebook is not None:
                self.centroids[r.name] = r.codebook.clone().requires_grad_(True)
                self.codes[r.name] = r.codes.long()
        self.points: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.set_activations(base.activations)

    def trainables(self) -> list[torch.Tensor]:
        free = [w for n, w in self.weights.items() if n not in self.centroids]
        return [*free, *self.biases.values(), *self.steps.values(), *self.centroids.values()]

    def set_activations(self, ranges: Mapping[str, ActRange]) -> None:
        """Straight-through fake-quant points on the calibrated edges."""
        def point(r: ActRange) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda t: fake_quantize_ste(t.reshape(1, -1), r.qparams).reshape(t.shape)
        self.points = {e: point(r) for e, r in ranges.items()}

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """New masks; the weights they prune become exactly zero (and stay so)."""
        self.masks = masks
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for n, m in self.masks.items():
            self.weights[n].mul_(m)

    def _layer_weight(self, i: int, n: str) -> torch.Tensor:
        """The weight layer ``n`` runs with: pruned, then fake-quantized (straight-through).

        The forward value is what ``compress`` gives for the current weight (same range
        policy, codes and rounding seed); the gradient passes inside the clip range.
        """
        w, mask, q = self.weights[n], self.masks.get(n), self.config.quant
        if n in self.centroids:
            return shared_weight(self.centroids[n], self.codes[n], mask)
        if q is None:
            return w if mask is None else w * mask
        if n in self.steps:  # learned steps (LSQ)
            per_channel = q.per_channel and w.dim() >= 2
            bits = q.bits_for(n)
            qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if q.symmetric else (
                0, 2**bits - 1)
            values = lsq_quantize(_groups(w, per_channel), self.steps[n], self.zero_points[n],
                                  qmin, qmax).reshape(w.shape)  # fmt: skip
            return values if mask is None else values * mask
        gen = torch.Generator().manual_seed(q.seed * 1_000_003 + i)  # as compress seeds it
        res = quantize_prechecked(w, q, bits=q.bits_for(n), mask=mask, generator=gen)
        passes = inside_clip(_groups(w, res.per_channel), res.qparams).reshape(w.shape)
        if mask is not None:
            passes = passes & mask
        return straight_through(w, res.values, passes)

    def _bias(self, n: str) -> torch.Tensor:
        b, mask = self.biases[n], self.masks.get(n)
        if self.structured and mask is not None:  # a removed channel loses its bias too
            alive = mask.reshape(mask.shape[0], -1).any(dim=1)
            return torch.where(alive, b, torch.zeros((), dtype=b.dtype))
        return b

    def replacements(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, n in enumerate(self.names):
            out[param_key(n, "weight")] = self._layer_weight(i, n)
            if n in self.biases:
                out[param_key(n, "bias")] = self._bias(n)
        return out

    def variant(self) -> Variant:
        """The compressed forward pass over the current trained tensors."""
        return Variant(self.graph, self.replacements, self.points)

    @torch.no_grad()
    def float_tensors(self) -> dict[str, torch.Tensor]:
        """The trained float tensors by state-dict key: pruned weights zero, removed
        channels without bias, and (LSQ) weights clipped to their learned ranges."""
        out = {}
        q = self.config.quant
        for n in self.names:
            w = self.weights[n].detach().clone()
            if n in self.centroids:
                w = shared_weight(self.centroids[n], self.codes[n], self.masks.get(n)).detach()
            if n in self.steps:
                per_channel = q.per_channel and w.dim() >= 2
                w2, s, zp = _groups(w, per_channel), self.steps[n].detach(), self.zero_points[n]
                bits = q.bits_for(n)
                qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if q.symmetric else (
                    0, 2**bits - 1)
                lo, hi = ((qmin - zp) * s)[:, None], ((qmax - zp) * s)[:, None]
                w = torch.minimum(torch.maximum(w2, lo), hi).reshape(w.shape)
            if n in self.masks:
                w = w * self.masks[n]
            out[param_key(n, "weight")] = w
            if n in self.biases:
                out[param_key(n, "bias")] = self._bias(n).detach().clone()
        return out


def float_module(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                  fold_bn: bool) -> nn.Module:
    """A new module of ``model``'s own structure with ``tensors`` (state-dict keys of the
    graph) swapped in.

    With BatchNorm folded, the trained weights are the folded ones: each folded BatchNorm
    becomes ``nn.Identity`` and its conv / linear layer takes the folded weight and bias,
    so folding the result again changes nothing. The module keeps its submodules' names,
    so removed blocks (``config.drop``) stay in it, untouched: ``compress`` removes them again.
    """
    out = copy.deepcopy(model)
    if fold_bn and has_batchnorm(model):
        folded = state_for_size(fold_batchnorm(model))
        traced = graph_of(model, fold_bn=False)
        for node in traced.nodes:
            if node.op != "call_module":
                continue
            bn = traced.module.get_submodule(node.target)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            if any(k.startswith(f"{node.target}.") for k in folded):
                continue  # not folded (its layer's output is used elsewhere too)
            layer = out.get_submodule(node.args[0].target)
            if layer.bias is None:  # folding gives every layer a bias
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]),
                                          requires_grad=layer.weight.requires_grad)
            out.set_submodule(node.target, nn.Identity())
        state = state_for_size(out)
        if set(state) != set(folded):  # a structure the folding changed otherwise
            out = copy.deepcopy(fold_batchnorm(model))
        tensors = {**folded, **tensors}
    if hasattr(model, "qcore_spec"):
        out.qcore_spec = copy.deepcopy(model.qcore_spec)
    state = out.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(v)
    return out.eval()


def _check_splits(train: Dataset, calib: Dataset | None) -> None:
    if getattr(train, "split", None) in ("test", "calib"):
        raise ValueError(f"Fine-tune on a train split, not on the {train.split!r} split.")
    if len(train) == 0:
        raise ValueError("The training split is empty; there is nothing to fine-tune on.")
    if calib is not None and getattr(calib, "split", None) == "test":
        raise ValueError(
            "Fine-tuning reports on the calibration split, never the test split; pass the "
            "'calib' split."
        )


def _sqnr_db(sig: float, err: float) -> float:
    if err == 0.0:
        return math.inf
    return -math.inf if sig == 0.0 else 10.0 * math.log10(sig / err)


def _check_arguments(config: CompressionConfig, ft: FinetuneConfig, train: Dataset,
                     calib: Dataset | None) -> None:  # fmt: skip
    if not isinstance(config, CompressionConfig):
        raise ValueError("config must be a CompressionConfig.")
    if not isinstance(ft, FinetuneConfig):
        raise ValueError("ft must be a FinetuneConfig.")
    _check_splits(train, calib)
    if (config.quant is not None and config.quant.codebook == "kmeans" and config.prunes
            and ft.prune_schedule == "gradual"):
        raise ValueError("Centroid fine-tuning keeps the pruning masks and the weights' "
                         "centroids fixed; use prune_schedule='oneshot' with a k-means "
                         "codebook.")


def _loss(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, ft: FinetuneConfig,
          teacher_graph: Graph) -> torch.Tensor:  # fmt: skip
    """Cross-entropy, or with distillation alpha * T^2 * KL(teacher || student) + (1 - alpha)
    * CE, the teacher being the float model's graph on the same batch."""
    loss = F.cross_entropy(logits, y)
    if not ft.distill:
        return loss
    with torch.no_grad():
        teacher = teacher_graph.run(x)
    temp = ft.temperature
    kl = F.kl_div(F.log_softmax(logits / temp, dim=1), F.log_softmax(teacher / temp, dim=1),
                  reduction="batchmean", log_target=True)  # fmt: skip
    return ft.alpha * temp * temp * kl + (1.0 - ft.alpha) * loss


def _quantize_gradients(params: list[torch.Tensor], bits: int, gen: torch.Generator) -> float:
    """Every gradient replaced by its ``bits``-bit stochastic rounding; their SQNR in dB."""
    sig = err = 0.0
    for t in params:
        if t.grad is None:
            continue
        g = t.grad
        qg, _ = quantize_gradient(g, bits, gen)
        sig += float((g.double() ** 2).sum())
        err += float(((g.double() - qg.double()) ** 2).sum())
        t.grad = qg
    return _sqnr_db(sig, err)


def _gradual_step(student: _TrainState, prune: PruneConfig, step: int, prune_end: int,
                  interval: int, rate_now: float) -> float:  # fmt: skip
    """The cubic schedule's rate at ``step`` (updated every ``interval`` steps); new masks
    when it moved. Returns the rate in force."""
    at = min(prune_end, (step // interval) * interval)
    if step >= prune_end:
        at = prune_end
    rate = cubic_rate(prune.rate, at, prune_end)
    if rate != rate_now:
        p = PruneConfig(rate=rate, structured=prune.structured, scope=prune.scope)
        student.set_masks(_masks({k: v.detach() for k, v in student.weights.items()}, p))
    return rate


def _train_step(student: _TrainState, opt: _Adam, x: torch.Tensor, y: torch.Tensor,
                ft: FinetuneConfig, teacher_graph: Graph, grad_gen: torch.Generator,
                lr: float) -> tuple[torch.Tensor, torch.Tensor, float]:  # fmt: skip
    """One optimiser step on a batch: (logits, loss, gradient SQNR in dB or nan)."""
    logits = student.variant()(x)
    loss = _loss(logits, y, x, ft, teacher_graph)
    opt.zero_grad()
    loss.backward()
    grad_db = math.nan
    if ft.grad_bits is not None:
        grad_db = _quantize_gradients(opt.params, ft.grad_bits, grad_gen)
    opt.step(lr)
    student.apply_masks()  # Adam moves nothing without a gradient; kept exact anyway
    return logits, loss, grad_db


def _end_of_epoch(model: nn.Module, student: _TrainState, config: CompressionConfig,
                  calib: Dataset | None, row: dict, recalibrate: bool) -> nn.Module:  # fmt: skip
    """The float module of the trained tensors, compressed as ``config`` says: its calib
    accuracy goes into ``row``, and (activations on) its ranges into the student."""
    snapshot = float_module(model, student.float_tensors(), config.fold_bn)
    now = compress(snapshot, config, calib=calib)
    if calib is not None:
        row["calib_accuracy"] = evaluate(now.model, calib).accuracy
    if config.act is not None and recalibrate:  # recalibrated ranges
        student.set_activations(now.activations)
    return snapshot


def finetune(
    model: nn.Module,
    train: Dataset,
    config: CompressionConfig,
    ft: FinetuneConfig | None = None,
    *,
    calib: Dataset | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``train`` with ``config``'s compression in the forward pass.

    ``calib`` (the dataset's calib split) is needed when ``config.act`` is set and gives
    the ``calib_accuracy`` column; the test split is never touched. ``progress(done,
    total, row)`` is called after every step with the history row just added;
    ``should_stop()`` is polled before every batch and ends training there. The model
    given is never changed.
    """
    t0 = time.perf_counter()
    ft = FinetuneConfig() if ft is None else ft
    _check_arguments(config, ft, train, calib)
    # validates the config against the model (layers, bits, NaN weights, calib for
    # activations) and gives the starting masks, ranges and post-training accuracy
    base = compress(model, config, calib=calib)
    graph = base.graph  # without the removed blocks, if any
    teacher_graph = graph_of(model, config.fold_bn)  # the whole float model
    gradual = config.prunes and ft.prune_schedule == "gradual"
    student = _TrainState(graph, base, ft.learn_scales)
    if gradual:
        student.set_masks({})

    params = student.trainables()
    opt = _Adam(params)
    n = len(train)
    per_epoch = math.ceil(n / ft.batch_size)
    total = ft.epochs * per_epoch
    shuffle = torch.Generator().manual_seed(ft.seed)
    grad_gen = torch.Generator().manual_seed(ft.seed * 1_000_003 + 1)
    prune_end = max(1, round(GRADUAL_END * total))
    interval = max(1, prune_end // GRADUAL_UPDATES)
    rate_now = config.prune.rate if config.prunes and not gradual else 0.0

    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any], done: int) -> None:
        rows.append(row)
        if progress is not None:
            progress(done, total, dict(row))

    if calib is not None:  # the post-training model: compress's own, at the final rate
        add({"epoch": 0, "step": 0, "loss": math.nan, "train_accuracy": math.nan,
             "calib_accuracy": evaluate(base.model, calib).accuracy, "lr": math.nan,
             "prune_rate": config.prune.rate if config.prunes else 0.0, "grad_sqnr_db": math.nan,
             "seconds": time.perf_counter() - t0}, 0)  # fmt: skip

    step, stopped, snapshot = 0, False, None
    for epoch in range(1, ft.epochs + 1):
        order = torch.randperm(n, generator=shuffle)
        for b in range(per_epoch):
            if should_stop is not None and should_stop():
                stopped = True
                break
            step += 1
            if gradual:
                rate_now = _gradual_step(student, config.prune, step, prune_end, interval,
                                         rate_now)  # fmt: skip
            idx = order[b * ft.batch_size : (b + 1) * ft.batch_size]
            x, y = train.inputs(idx), train.y[idx]
            lr = ft.lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / total))  # cosine decay
            logits, loss, grad_db = _train_step(student, opt, x, y, ft, teacher_graph, grad_gen,
                                                lr)  # fmt: skip
            row = {"epoch": epoch, "step": step, "loss": float(loss.detach()),
                   "train_accuracy": float((logits.detach().argmax(1) == y).float().mean()),
                   "calib_accuracy": math.nan, "lr": lr, "prune_rate": rate_now,
                   "grad_sqnr_db": grad_db, "seconds": 0.0}  # fmt: skip
            if b == per_epoch - 1:  # end of the epoch: the compressed model as it now is
                snapshot = _end_of_epoch(model, student, config, calib, row, epoch < ft.epochs)
            row["seconds"] = time.perf_counter() - t0
            add(row, step)
        if stopped:
            break

    if stopped or snapshot is None:
        if gradual:  # the final rate, so that compress finds these masks
            student.set_masks(_masks({k: v.detach() for k, v in student.weights.items()},
                                     config.prune))  # fmt: skip
        snapshot = float_module(model, student.float_tensors(), config.fold_bn)
    history = pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))
    return FinetuneResult(model=snapshot, history=history, config=config, ft=ft,
                          stopped=stopped, seconds=time.perf_counter() - t0)
