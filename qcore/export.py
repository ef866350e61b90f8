"""The packed file: exactly the bytes ``Compressed.size_bytes`` counts, plus a header.

Layout::

    MAGIC (8 bytes) | header length (uint32, little-endian) | header (UTF-8 JSON) | payload

The payload holds, tensor after tensor in the header's order:

- ``float``: float32 values, little-endian.
- ``quant``: float32 scales (one per group), int32 zero points (asymmetric only), the
  codes of the kept weights as unsigned ``bits``-bit integers (code - qmin), MSB first,
  then the sparse index (a 1-bit mask, or relative-index entries of ``index_width`` bits).
- ``sparse-float``: float32 kept values, then the sparse index as above.

Each block starts on a byte boundary. The header says what each tensor is and where it
lies; ``load_packed`` checks every field and every offset before it reads anything.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcore.compress import param_key
from qcore.fold import fold_batchnorm, state_for_size
from qcore.quant import QParams, code_range, dequantize_codes
from qcore.size import positions_from_stream, relative_index_stream

__all__ = ["MAGIC", "export_packed", "packed_bytes", "load_packed", "read_header"]

MAGIC = b"QPLAYPK1"
MAX_HEADER_BYTES = 1 << 20
FORMAT_VERSION = 1


def _pack_uint(values: np.ndarray, width: int) -> bytes:
    """Unsigned integers as a big-endian bit stream of ``width`` bits each."""
    if values.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_uint(buf: bytes, width: int, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))[: count * width]
    weights = (np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)).astype(np.int64)
    return bits.reshape(count, width).astype(np.int64) @ weights


def _index_block(mask_flat: torch.Tensor, encoding: str, width: int) -> bytes:
    if encoding == "mask":
        return np.packbits(mask_flat.numpy().astype(np.uint8)).tobytes()
    return _pack_uint(relative_index_stream(mask_flat, width).numpy(), width)


def _config_dict(compressed) -> dict:
    return dataclasses.asdict(compressed.config)


def packed_bytes(compressed) -> bytes:
    """The packed file's bytes for a :class:`~qcore.compress.Compressed` model."""
    base = compressed.model.base
    state = compressed.model.full_state()
    tensors, payload = [], io.BytesIO()
    layer_of = {param_key(n, "weight"): n for n in compressed.sizes}
    for key, value in state.items():
        layer = layer_of.get(key)
        size = None if layer is None else compressed.sizes[layer]
        start = payload.tell()
        entry: dict = {"name": key, "shape": list(value.shape)}
        if size is None:
            entry["kind"] = "float"
            payload.write(value.detach().float().contiguous().numpy().astype("<f4").tobytes())
        else:
            mask = compressed.masks.get(layer)
            flat_mask = None if mask is None else mask.reshape(-1)
            kept_idx = None if size.encoding == "dense" else torch.nonzero(flat_mask).reshape(-1)
            res = compressed.quant.get(layer)
            if res is None:
                entry["kind"] = "sparse-float"
                vals = value.reshape(-1)[kept_idx]
                payload.write(vals.float().numpy().astype("<f4").tobytes())
            else:
                qp = res.qparams
                entry.update(kind="quant", bits=res.bits, symmetric=res.symmetric,
                             binary=qp.binary, per_channel=res.per_channel,
                             groups=int(qp.scale.numel()))
                payload.write(qp.scale.numpy().astype("<f4").tobytes())
                if not res.symmetric and not qp.binary:
                    payload.write(qp.zero_point.numpy().astype("<i4").tobytes())
                codes = res.codes.reshape(-1)
                if kept_idx is not None:
                    codes = codes[kept_idx]
                payload.write(_pack_uint((codes - qp.qmin).numpy(), res.bits))
            entry.update(encoding=size.encoding, index_width=size.index_width, kept=size.kept)
            if size.encoding != "dense":
                payload.write(_index_block(flat_mask, size.encoding, size.index_width))
        entry["offset"], entry["nbytes"] = start, payload.tell() - start
        tensors.append(entry)
    body = payload.getvalue()
    if len(body) != compressed.size_bytes:  # the size on screen must be the size on disk
        raise AssertionError(
            f"packed payload is {len(body)} bytes but size_bytes says {compressed.size_bytes}"
        )
    header = {
        "format": FORMAT_VERSION,
        "spec": getattr(base, "qcore_spec", None),
        "fold_bn": compressed.config.fold_bn,
        "config": _config_dict(compressed),
        "size_bytes": compressed.size_bytes,
        "float_size_bytes": compressed.float_size_bytes,
        "tensors": tensors,
    }
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack("<I", len(head)) + head + body


def export_packed(compressed, path: str | os.PathLike) -> int:
    """Write the packed file to ``path``; return the number of bytes written."""
    data = packed_bytes(compressed)
    Path(path).write_bytes(data)
    return len(data)


def _read(data: bytes) -> tuple[dict, bytes]:
    if len(data) < len(MAGIC) + 4 or data[: len(MAGIC)] != MAGIC:
        raise ValueError("This is not a Quantization Playground packed file (bad magic bytes).")
    (n,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if n > MAX_HEADER_BYTES or start + n > len(data):
        raise ValueError("The packed file's header is truncated or too large.")
    try:
        header = json.loads(data[start : start + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"The packed file's header is not valid JSON: {exc}.") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise ValueError("The packed file has an unknown format version.")
    if not isinstance(header.get("tensors"), list):
        raise ValueError("The packed file's header lists no tensors.")
    return header, data[start + n :]


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a packed file (config, model spec, tensor table)."""
    header, _ = _read(Path(path).read_bytes())
    return header


class _Reader:
    def __init__(self, buf: bytes, name: str):
        self.buf, self.pos, self.name = buf, 0, name

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"The packed data for {self.name!r} is truncated.")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out


def _decode(entry: dict, blob: bytes) -> torch.Tensor:
    name = str(entry.get("name"))
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"Tensor {name!r} has a malformed shape in the packed file.")
    numel = int(np.prod(shape)) if shape else 1
    r = _Reader(blob, name)
    kind = entry.get("kind")
    if kind == "float":
        vals = np.frombuffer(r.take(4 * numel), dtype="<f4")
        return _done(r, torch.from_numpy(vals.astype(np.float32)).reshape(shape))
    if kind not in ("quant", "sparse-float"):
        raise ValueError(f"Tensor {name!r} has an unknown kind {kind!r}.")
    encoding, kept = entry.get("encoding"), int(entry.get("kept", -1))
    width = int(entry.get("index_width", 0))
    if encoding not in ("dense", "mask", "relidx") or not 0 <= kept <= numel:
        raise ValueError(f"Tensor {name!r} has a malformed sparse encoding.")
    if encoding == "relidx" and not 1 <= width <= 16:
        raise ValueError(f"Tensor {name!r} has an invalid index width {width}.")
    if kind == "sparse-float":
        vals = torch.from_numpy(np.frombuffer(r.take(4 * kept), dtype="<f4").astype(np.float32))
    else:
        bits, groups = int(entry.get("bits", 0)), int(entry.get("groups", 0))
        binary, symmetric = bool(entry.get("binary")), bool(entry.get("symmetric"))
        if not 1 <= bits <= 16 or groups < 1 or (binary != (bits == 1)):
            raise ValueError(f"Tensor {name!r} has invalid quantization fields.")
        if entry.get("per_channel") and (not shape or groups != shape[0]):
            raise ValueError(f"Tensor {name!r} has {groups} scales for {shape[:1]} channels.")
        if not entry.get("per_channel") and groups != 1:
            raise ValueError(f"Tensor {name!r} has {groups} scales but is per-tensor.")
        scale = torch.from_numpy(np.frombuffer(r.take(4 * groups), dtype="<f4").astype(np.float32))
        zp = torch.zeros(groups, dtype=torch.int64)
        if not symmetric and not binary:
            zp = torch.from_numpy(np.frombuffer(r.take(4 * groups), dtype="<i4").astype(np.int64))
        qmin, qmax = code_range(bits, symmetric)
        codes = torch.from_numpy(_unpack_uint(r.take((bits * kept + 7) // 8), bits, kept)) + qmin
    positions = _positions(entry, r, numel, kept, encoding, width, name)
    if kind == "quant":
        qp = QParams(scale, zp, qmin, qmax, -scale, scale, binary=binary)
        # every kept weight's group: its output channel, or group 0 per tensor
        per_weight = numel // groups
        group_of = positions // per_weight if groups > 1 else torch.zeros_like(positions)
        # dequantize_codes works on rows of groups; here each kept weight is its own row
        per_row = qp._replace(scale=qp.scale[group_of], zero_point=qp.zero_point[group_of])
        vals = dequantize_codes(codes[:, None], per_row).reshape(-1)
    out = torch.zeros(numel)
    out[positions] = vals
    return _done(r, out.reshape(shape))


def _done(r: _Reader, t: torch.Tensor) -> torch.Tensor:
    """``t`` if its block was read to the end (a header lying about bits or counts is not)."""
    if r.pos != len(r.buf):
        raise ValueError(f"The packed data for {r.name!r} does not match its header.")
    return t


def _positions(entry, r: _Reader, numel: int, kept: int, encoding: str, width: int, name: str):
    if encoding == "dense":
        if kept != numel:
            raise ValueError(f"Tensor {name!r} is dense but lists {kept} of {numel} weights.")
        return torch.arange(numel)
    if encoding == "mask":
        bits = np.unpackbits(np.frombuffer(r.take((numel + 7) // 8), dtype=np.uint8))[:numel]
        pos = torch.from_numpy(np.nonzero(bits)[0].astype(np.int64))
    else:
        n_entries = (len(r.buf) - r.pos) * 8 // width
        stream = torch.from_numpy(_unpack_uint(r.take(len(r.buf) - r.pos), width, n_entries))
        pos = positions_from_stream(stream, width)[:kept]
    if pos.numel() != kept or (kept and int(pos.max()) >= numel):
        raise ValueError(f"The sparse index of tensor {name!r} does not match its weights.")
    return pos


def load_packed(path: str | os.PathLike, template: nn.Module | None = None) -> nn.Module:
    """Rebuild a float module from a packed file; its outputs equal the compressed model's.

    The architecture comes from the file's model spec (sample architectures), or from
    ``template``, which is copied and never changed.
    """
    header, payload = _read(Path(path).read_bytes())
    spec = header.get("spec")
    if template is not None:
        model = copy.deepcopy(template).eval()
    elif isinstance(spec, dict):
        from qcore.models import build_model

        try:
            model = build_model(spec["arch"], tuple(spec["input_shape"]), int(spec["num_classes"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"The packed file's model spec is malformed: {exc}.") from exc
        model.qcore_spec = spec
        model.eval()
    else:
        raise ValueError("The packed file names no known architecture; pass template=model.")
    if header.get("fold_bn"):
        model = fold_batchnorm(model)
    expected = state_for_size(model)
    state = {}
    for entry in header["tensors"]:
        if not isinstance(entry, dict):
            raise ValueError("The packed file's tensor table is malformed.")
        name = entry.get("name")
        off, nbytes = entry.get("offset"), entry.get("nbytes")
        if not isinstance(off, int) or not isinstance(nbytes, int) or off < 0 or nbytes < 0 \
                or off + nbytes > len(payload):
            raise ValueError(f"Tensor {name!r} lies outside the packed file.")
        if not isinstance(name, str) or name not in expected:
            raise ValueError(f"The packed file has a tensor {name!r} the architecture lacks.")
        # check the shape before decoding, so a hostile shape cannot allocate a huge tensor
        if entry.get("shape") != list(expected[name].shape):
            raise ValueError(
                f"Tensor {name!r} has shape {entry.get('shape')} but the architecture expects "
                f"{list(expected[name].shape)}."
            )
        try:
            t = _decode(entry, payload[off : off + nbytes])
        except (TypeError, KeyError, IndexError, OverflowError, RuntimeError) as exc:
            raise ValueError(f"Tensor {name!r} is malformed in the packed file: {exc}") from exc
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"Tensor {name!r} has shape {tuple(t.shape)} but the architecture expects "
                f"{tuple(expected[name].shape)}."
            )
        state[name] = t
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"The packed file lacks tensors: {', '.join(missing[:5])}.")
    model.load_state_dict(state, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
