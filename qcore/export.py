"""The packed file: the codecs' bytes (exactly ``Compressed.size_bytes``) after a header.

Layout (format 2)::

    MAGIC "QPLAYPK2" (8 bytes) | header length n (uint32, little-endian)
    | SHA-256 of header + payload (32 bytes) | header (n bytes of UTF-8 JSON) | payload

The header holds the format number, the model spec (sample architectures), the
compression config (``CompressionConfig.to_dict()``), the sizes, and a table of tensors in
payload order: name, shape, offset, nbytes and the fields of each tensor's codec (see
:mod:`qcore.codecs`). The payload is the codecs' blocks back to back. A k-means tensor
(kind ``codebook``: its centroids, then their indices) and Huffman-coded streams
(``code_coding`` / ``index_coding`` = ``"huffman"``, each after its code table) are named
by those fields only where they are used, so the format stays 2 and older files read as
before.

Reading treats the file as hostile: the checksum first, then the header's length, depth
and every field, and the model spec against bounds before anything is built (the
architecture is first built on PyTorch's "meta" device, which allocates nothing, and its
tensor shapes compared with the table). Every refusal is a ``ValueError`` with a sentence.
Files of format 1 (before the codecs) are refused with a sentence saying so.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qcore.codecs import _show, decode
from qcore.config import CompressionConfig
from qcore.fold import state_for_size
from qcore.graph import Graph, Variant, fold_batchnorm, graph_of

if TYPE_CHECKING:  # compress imports nothing from here; the import is for the hints only
    from qcore.compress import Compressed

__all__ = ["MAGIC", "FORMAT_VERSION", "Packed", "export_packed", "packed_bytes",
           "load_packed", "read_header", "check_spec"]  # fmt: skip

FORMAT_VERSION = 2
MAGIC = b"QPLAYPK2"
_MAGIC_STEM = b"QPLAYPK"
DIGEST_BYTES = 32
PREFIX_BYTES = len(MAGIC) + 4 + DIGEST_BYTES
MAX_HEADER_BYTES = 1 << 20
# bounds on a model spec read from a file: the sample architectures on inputs up to CIFAR
# size and then some; anything larger is not a file this tool wrote
MAX_CHANNELS, MAX_SIDE, MAX_CLASSES = 4, 64, 1000
MAX_DIMS, MAX_DIGITS = 8, 100  # a tensor's dimensions; the digits of a number in the header


def packed_bytes(compressed: Compressed) -> bytes:
    """The packed file's bytes for a :class:`~qcore.compress.Compressed` model."""
    tensors, blocks, offset = [], [], 0
    for key, shape, enc in compressed.packed_tensors():
        data = enc.encode()
        tensors.append({"name": key, "shape": list(shape), **enc.header(),
                        "offset": offset, "nbytes": len(data)})  # fmt: skip
        blocks.append(data)
        offset += len(data)
    payload = b"".join(blocks)
    header = {
        "format": FORMAT_VERSION,
        "spec": compressed.graph.spec,
        "fold_bn": compressed.config.fold_bn,
        "config": compressed.config.to_dict(),
        "size_bytes": compressed.size_bytes,
        "float_size_bytes": compressed.float_size_bytes,
        "tensors": tensors,
    }
    if compressed.activations:  # calibrated ranges travel with the weights
        header["activations"] = [
            {"edge": e, "bits": r.bits, "symmetric": r.symmetric, "lo": r.lo, "hi": r.hi,
             "scale": r.scale, "zero_point": r.zero_point}
            for e, r in compressed.activations.items()
        ]  # fmt: skip
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    digest = hashlib.sha256(head + payload).digest()
    return MAGIC + struct.pack("<I", len(head)) + digest + head + payload


def export_packed(compressed: Compressed, path: str | os.PathLike) -> int:
    """Write the packed file to ``path``; return the number of bytes written."""
    data = packed_bytes(compressed)
    Path(path).write_bytes(data)
    return len(data)


def _no_constant(name: str) -> Any:
    raise ValueError(f"The packed file's header holds {name}, which is not a number.")


def _bounded_int(text: str) -> int:
    if len(text) > MAX_DIGITS:  # no field needs it, and Python reads at most 4300 digits
        raise ValueError("The packed file's header holds a number too long to read.")
    return int(text)


def _read(data: bytes) -> tuple[dict, bytes]:
    if len(data) < len(MAGIC) or data[: len(_MAGIC_STEM)] != _MAGIC_STEM:
        raise ValueError("This is not a Quantization Playground packed file (bad magic bytes).")
    if data[: len(MAGIC)] == _MAGIC_STEM + b"1":
        raise ValueError(
            "This packed file uses format 1, from an older version of Quantization Playground, "
            "which this version no longer reads; export the model again."
        )
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError("The packed file has an unknown format version.")
    if len(data) < PREFIX_BYTES:
        raise ValueError("The packed file's header is truncated.")
    (n,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    if n > MAX_HEADER_BYTES:
        raise ValueError("The packed file's header is too large.")
    if PREFIX_BYTES + n > len(data):
        raise ValueError("The packed file's header is truncated.")
    digest = data[len(MAGIC) + 4 : PREFIX_BYTES]
    head, payload = data[PREFIX_BYTES : PREFIX_BYTES + n], data[PREFIX_BYTES + n :]
    if hashlib.sha256(head + payload).digest() != digest:
        raise ValueError(
            "The packed file is corrupt: its SHA-256 checksum does not match its contents."
        )
    try:
        header = json.loads(head.decode("utf-8"), parse_constant=_no_constant,
                            parse_int=_bounded_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"The packed file's header is not valid JSON: {exc}.") from exc
    except RecursionError:
        raise ValueError("The packed file's header is nested too deeply.") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise ValueError("The packed file has an unknown format version.")
    if not isinstance(header.get("tensors"), list):
        raise ValueError("The packed file's header lists no tensors.")
    return header, payload


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a packed file (config, model spec, tensor table), checked."""
    header, _ = _read(Path(path).read_bytes())
    return header


def _whole(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def check_spec(spec: Any) -> tuple[str, tuple[int, int, int], int]:
    """(arch, input shape, classes) of a model spec read from a file, within bounds."""
    from qcore.models import ARCHS

    if not isinstance(spec, dict):
        raise ValueError("The packed file's model spec is malformed.")
    arch, shape, classes = spec.get("arch"), spec.get("input_shape"), spec.get("num_classes")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"The packed file names an unknown architecture {_show(arch)}.")
    if not (isinstance(shape, list) and len(shape) == 3 and _whole(shape[0], 1, MAX_CHANNELS)
            and all(_whole(s, 1, MAX_SIDE) for s in shape[1:])):  # fmt: skip
        raise ValueError(
            f"The packed file's input shape {_show(shape)} is not (C, H, W) with C in "
            f"1..{MAX_CHANNELS} and H, W in 1..{MAX_SIDE}."
        )
    if not _whole(classes, 2, MAX_CLASSES):
        raise ValueError(
            f"The packed file's class count {_show(classes)} is not in 2..{MAX_CLASSES}."
        )
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise ValueError("The packed file's model name is malformed.")
    return arch, (shape[0], shape[1], shape[2]), classes


@dataclass(frozen=True, eq=False)
class Packed:
    """A loaded packed file: the rebuilt module and the config it was compressed with."""

    model: Variant  # the rebuilt float32 model's graph (+ its activation points): outputs
    # equal to the compressed model's
    config: CompressionConfig
    header: dict


def _check_sizes(header: dict, payload: bytes) -> None:
    """``size_bytes`` is the payload's length exactly (the export writes exactly that form);
    ``float_size_bytes`` a whole number of float32 values within what any tensor allows."""
    size, float_size = header.get("size_bytes"), header.get("float_size_bytes")
    if size != len(payload) or not _whole(size, 0, len(payload)):
        raise ValueError(
            f"The packed file's size_bytes ({_show(size)}) is not its payload's "
            f"{len(payload):,} bytes."
        )
    if not _whole(float_size, 0, 4 << 31) or float_size % 4:
        raise ValueError(
            f"The packed file's float_size_bytes ({_show(float_size)}) is not a whole number "
            "of float32 values."
        )


def _shapes(model: nn.Module, fold_bn: bool) -> dict[str, tuple[int, ...]]:
    folded = fold_batchnorm(model) if fold_bn else model
    return {k: tuple(v.shape) for k, v in state_for_size(folded).items()}


def load_packed(path: str | os.PathLike, template: nn.Module | None = None) -> Packed:
    """Rebuild the compressed model from a packed file.

    The architecture comes from the file's model spec (sample architectures), or from
    ``template``, which is copied and never changed.
    """
    header, payload = _read(Path(path).read_bytes())
    try:
        config = CompressionConfig.from_dict(header.get("config"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The packed file's config is malformed: {exc}") from exc
    fold_bn = header.get("fold_bn")
    if fold_bn is not config.fold_bn:
        raise ValueError("The packed file's fold_bn does not match its config.")
    _check_sizes(header, payload)
    table = header["tensors"]
    gone = tuple(f"{name}." for name in config.drop)  # removed blocks store nothing
    if template is not None:
        model = copy.deepcopy(template).eval()
    elif header.get("spec") is not None:
        from qcore.models import build_model

        arch, shape, classes = check_spec(header["spec"])
        with torch.device("meta"):  # shapes first, allocating nothing
            expected = _shapes(build_model(arch, shape, classes).eval(), fold_bn)
        expected = {k: v for k, v in expected.items() if not k.startswith(gone)}
        if any(not isinstance(t, dict) or not isinstance(t.get("name"), str)
               or expected.get(t["name"]) != _shape(t)
               for t in table) or len(table) > len(expected) + 64:  # fmt: skip
            raise ValueError("The packed file's tensors do not fit its model spec.")
        model = build_model(arch, shape, classes)
        model.qcore_spec = dict(header["spec"])
        model.eval()
    else:
        raise ValueError("The packed file names no known architecture; pass template=model.")
    if config.drop:
        from qcore.blocks import without_blocks

        model = without_blocks(model, config.drop)
    if fold_bn:
        model = fold_batchnorm(model)
    expected = {k: tuple(v.shape) for k, v in state_for_size(model).items()}
    entries: dict[str, dict] = {}
    for entry in table:
        if not isinstance(entry, dict):
            raise ValueError("The packed file's tensor table is malformed.")
        name = entry.get("name")
        off, nbytes = entry.get("offset"), entry.get("nbytes")
        if not _whole(off, 0, len(payload)) or not _whole(nbytes, 0, len(payload) - off):
            raise ValueError(f"Tensor {_show(name)} lies outside the packed file.")
        if not isinstance(name, str) or name not in expected:
            raise ValueError(
                f"The packed file has a tensor {_show(name)} the architecture lacks."
            )
        if name in entries:
            raise ValueError(f"The packed file lists tensor {name!r} twice.")
        # the shape is checked before decoding, so a hostile shape cannot allocate anything
        if _shape(entry) != expected[name]:
            raise ValueError(
                f"Tensor {name!r} has shape {_show(entry.get('shape'))} but the architecture "
                f"expects {list(expected[name])}."
            )
        entries[name] = entry
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise ValueError(f"The packed file lacks tensors: {', '.join(missing[:5])}.")
    # the tensors tile the payload: none overlaps another, no byte is left over
    end = 0
    for off, nbytes in sorted((e["offset"], e["nbytes"]) for e in entries.values()):
        if off != end:
            raise ValueError("The packed file's tensors overlap or leave bytes between them.")
        end = off + nbytes
    if end != len(payload):
        raise ValueError("The packed file's payload holds bytes no tensor accounts for.")
    state = {}
    for name, entry in entries.items():
        off, nbytes = entry["offset"], entry["nbytes"]
        try:
            state[name] = decode(entry, payload[off : off + nbytes], expected[name], name)
        except (TypeError, KeyError, IndexError, OverflowError, RuntimeError) as exc:
            raise ValueError(f"Tensor {name!r} is malformed in the packed file: {exc}") from exc
    model.load_state_dict(state, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    model = model.eval()
    graph = graph_of(model, fold_bn=False)
    points = {}
    if config.act is not None or "activations" in header:
        points = _activation_points(graph, header, config)
    return Packed(model=Variant(graph, points=points), config=config, header=header)


def _activation_points(graph: Graph, header: dict, config: CompressionConfig) -> dict:
    """The fake-quant points of the file's activation ranges, where they were calibrated."""
    from qcore.activations import ActRange, act_points
    from qcore.affine import QParams, code_range

    table = header.get("activations")
    if config.act is None or not isinstance(table, list) or not table:
        raise ValueError("The packed file's activation ranges do not match its config.")
    known = {"input"} | {n.name for n in graph.nodes}  # any node's output can be an edge
    ranges = {}
    if len(table) > len(known):
        raise ValueError("The packed file lists more activation ranges than the model has edges.")
    for entry in table:
        edge = entry.get("edge") if isinstance(entry, dict) else None
        if not isinstance(edge, str) or edge not in known or edge in ranges:  # typed first:
            raise ValueError(  # a list is unhashable
                f"The packed file names an activation edge the model lacks ({_show(edge)})."
            )
        bits, sym = entry.get("bits"), entry.get("symmetric")
        scale, zp = entry.get("scale"), entry.get("zero_point")
        lo, hi = entry.get("lo"), entry.get("hi")
        if bits != config.act.bits or sym is not config.act.symmetric:
            raise ValueError("The packed file's activation ranges do not match its config.")
        qmin, qmax = code_range(bits, sym)
        if not (isinstance(scale, float) and 0.0 < scale <= 1e30 and _whole(zp, qmin, qmax)
                and all(isinstance(v, float) and abs(v) <= 1e30 for v in (lo, hi))):
            raise ValueError("The packed file holds an invalid activation range.")
        qp = QParams(torch.tensor([scale], dtype=torch.float32), torch.tensor([zp]), qmin, qmax,
                     torch.tensor([lo]), torch.tensor([hi]))
        ranges[entry["edge"]] = ActRange(entry["edge"], lo, hi, lo, hi, qp, bits, sym)
    return act_points(ranges)


def _shape(entry: dict) -> tuple[int, ...] | None:
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:  # before any arithmetic on it
        return None
    if not all(_whole(d, 0, 1 << 31) for d in shape):
        return None
    if math.prod(shape) > 1 << 31:
        return None
    return tuple(shape)
