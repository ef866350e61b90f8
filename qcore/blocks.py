"""Layer removal ("fewer layers"): a block whose input and output shapes match can be
replaced by the identity, so the network skips it and its weights leave the file.

A block is any submodule that holds weights, is called once on one tensor and returns a
tensor of that tensor's shape: a residual block (``layer1`` of mnist-resnet), or a single
3x3 convolution that keeps its channels. :func:`removable_blocks` finds them from the
traced graph and one forward pass on a zero image; :func:`without_blocks` gives the model
with them replaced by ``nn.Identity`` (a shallow copy: the other tensors are shared, the
model passed in is never changed). ``CompressionConfig(drop=("layer1",))`` runs the
compressed model through the graph of that copy, so the packed size loses the block's
bytes and fine-tuning can win back the accuracy.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn

from qcore.fold import WEIGHT_LAYER_TYPES, state_for_size

__all__ = ["Block", "removable_blocks", "without_blocks"]

# model -> {names: the model without those blocks}; one copy per model and choice
_DROPPED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], nn.Module]] = (
    weakref.WeakKeyDictionary()
)
# model -> {input shape: its removable blocks}
_BLOCKS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], dict[str, Block]]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Block:
    """A removable block: its name, the shape it keeps, its weight layers and parameters."""

    name: str
    shape: tuple[int, ...]  # of one sample (no batch dimension)
    layers: tuple[str, ...]  # the weight layers inside it
    params: int  # parameters and buffers it holds (what removing it saves, in numbers)


def _input_shape(model: nn.Module) -> tuple[int, ...] | None:
    spec = getattr(model, "qcore_spec", None)
    if isinstance(spec, dict) and isinstance(spec.get("input_shape"), list | tuple):
        return tuple(int(d) for d in spec["input_shape"])
    return None


def removable_blocks(
    model: nn.Module, input_shape: tuple[int, ...] | None = None, *, nested: bool = False
) -> dict[str, Block]:
    """The blocks of ``model`` that can be replaced by the identity, in model order.

    ``input_shape`` is one sample's shape (C, H, W); sample models carry it in their spec.
    Without ``nested``, only the outermost ones are listed (``layer1``, not also
    ``layer1.conv1`` inside it); :func:`without_blocks` accepts either.
    """
    shape = input_shape or _input_shape(model)
    if shape is None:
        raise ValueError("The model's input shape is unknown; pass input_shape=(C, H, W).")
    shape = tuple(shape)
    with _LOCK:
        blocks = _BLOCKS.get(model, {}).get(shape)
    if blocks is None:
        blocks = _find(model, shape)
        with _LOCK:
            _BLOCKS.setdefault(model, {})[shape] = blocks
    if nested:
        return dict(blocks)  # a copy: the cached table stays as found
    return {k: v for k, v in blocks.items()
            if not any(k.startswith(f"{o}.") for o in blocks)}  # fmt: skip


def _find(model: nn.Module, shape: tuple[int, ...]) -> dict[str, Block]:
    """Every removable block (any depth), for inputs of one sample's ``shape``."""
    from qcore.graph import graph_of

    graph = graph_of(model, fold_bn=False)
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    members: dict[str, set[fx.Node]] = {}
    for n in nodes:
        for path in n.meta.get("nn_module_stack", {}):
            members.setdefault(path, set()).add(n)
    # one forward pass on a zero image, keeping every value, for the shapes
    with torch.inference_mode():
        x = torch.zeros((1, *shape))
        _, values = graph.run(x, keep=nodes + [graph.input])
    sizes = {name: p.numel() for name, p in state_for_size(model).items()}
    out: dict[str, Block] = {}
    for path in sorted(members, key=lambda p: min(graph.order[n] for n in members[p])):
        inside = members[path]
        module = model.get_submodule(path)
        layers = tuple(f"{path}.{n}" if n else path for n, m in module.named_modules()
                       if isinstance(m, WEIGHT_LAYER_TYPES))  # fmt: skip
        if not layers:
            continue
        ins = {a for n in inside for a in n.all_input_nodes
               if a not in inside and a.op != "get_attr"}  # fmt: skip
        outs = [n for n in inside if any(u not in inside for u in n.users)]
        if len(ins) != 1 or len(outs) != 1:
            continue
        src, dst = values.get(next(iter(ins))), values.get(outs[0])
        if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)):
            continue
        if src.shape != dst.shape:
            continue
        params = sum(v for k, v in sizes.items() if k.startswith(f"{path}."))
        out[path] = Block(path, tuple(src.shape[1:]), layers, params)
    return out


def without_blocks(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """``model`` with each named block replaced by ``nn.Identity`` (``model`` itself when
    ``names`` is empty). A shallow copy made once per (model, names) and reused: the
    other submodules and every kept tensor are the model's own, so never mutate it.

    Raises ValueError naming the blocks that can be removed when a name is not one.
    """
    names = tuple(dict.fromkeys(names))
    if not names:
        return model
    key = tuple(sorted(names))
    with _LOCK:
        done = _DROPPED.get(model, {}).get(key)
    if done is not None:
        return done
    blocks = removable_blocks(model, nested=True)
    bad = [n for n in names if n not in blocks and not _is_identity(model, n)]
    if bad:
        top = removable_blocks(model)
        can = ", ".join(top) if top else "none (no block keeps its input's shape)"
        raise ValueError(
            f"Cannot remove {', '.join(map(repr, bad))}: a removable block holds weights and "
            f"keeps its input's shape. This model's removable blocks: {can}."
        )
    inner = [n for n in names if any(n.startswith(f"{o}.") for o in names)]
    if inner:
        raise ValueError(
            f"{', '.join(map(repr, inner))} lies inside another removed block; remove one "
            "or the other."
        )
    out = _shallow(model)
    for name in names:
        *path, leaf = name.split(".")
        parent = out
        for part in path:  # copy the chain of parents, so the model's own stay as they are
            child = _shallow(parent._modules[part])
            parent._modules[part] = child
            parent = child
        parent._modules[leaf] = nn.Identity()
    with _LOCK:
        _DROPPED.setdefault(model, {})[key] = out
    return out


def _is_identity(model: nn.Module, name: str) -> bool:
    """Already removed (a model that was fine-tuned without the block): nothing to do."""
    try:
        return isinstance(model.get_submodule(name), nn.Identity)
    except AttributeError:
        return False


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose submodule table can change; tensors are shared."""
    out = copy.copy(module)
    out._modules = dict(module._modules)
    out._parameters = dict(module._parameters)
    out._buffers = dict(module._buffers)
    return out


def describe(block: Block) -> str:
    """``layer1 (16x28x28, 4,672 parameters)``"""
    return f"{block.name} ({'x'.join(map(str, block.shape))}, {block.params:,} parameters)"

