"""BatchNorm folding and the list of weight layers a model has."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

__all__ = [
    "WEIGHT_LAYER_TYPES", "weight_layers", "has_batchnorm", "fold_copy", "assert_eval",
    "state_for_size",
]  # fmt: skip

WEIGHT_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The linear and convolution layers of ``model`` by name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYER_TYPES)}


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fold_copy(model: nn.Module) -> nn.Module:
    """A new module where each BatchNorm after a conv or linear layer is folded into it.

    y = gamma * (W x + b - mean) / sqrt(var + eps) + beta becomes W' x + b' with
    W' = W * gamma / sqrt(var + eps) and b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    The given model is not changed; layer names stay as they were. This traces the model
    (torch.fx), so call it through :func:`qcore.graph.fold_batchnorm`, which holds the
    tracing lock and caches the copy per model.
    """
    work = copy.deepcopy(model).eval()
    try:
        folded = fuse(work, inplace=True)
    except Exception as exc:  # tracing fails on data-dependent control flow
        raise ValueError(
            f"BatchNorm could not be folded because the model cannot be traced ({exc}); "
            "turn BatchNorm folding off."
        ) from exc
    for p in folded.parameters():
        p.requires_grad_(False)
    if hasattr(model, "qcore_spec"):
        folded.qcore_spec = model.qcore_spec
    return folded


def assert_eval(model: nn.Module, doing: str = "compressing") -> None:
    """BatchNorm in training mode would use batch statistics and write its buffers."""
    if getattr(model, "training", False) and has_batchnorm(model):
        raise ValueError(f"The model is in training mode; call model.eval() before {doing} it.")


def state_for_size(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a packed model stores: parameters and buffers, less BN batch counters."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
