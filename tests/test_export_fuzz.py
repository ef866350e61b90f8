"""Fuzzing the packed-file loader: a generated corpus of hostile files, each loaded under a
memory cap in a subprocess.

The rule (qcore.export): every refusal is a ``ValueError`` with a sentence, and a file is
either refused or loads to outputs equal to the original's. Here:

- the originals are sample models (digits-mlp, mnist-cnn) compressed with several configs
  covering every codec (dense, channels, mask, relidx; quantized and float), exported and
  loaded *without* a template, so the model is rebuilt from the header's spec;
- the corpus (seeded, deterministic) holds bit flips anywhere (checksum left as it is),
  truncations, bit flips in the payload and in the header with the checksum made right
  again, header field edits (tensor table, model spec, config) made right again, and the
  known hostile cases (huge class counts and input shapes, Infinity tokens, 200,000 nested
  brackets, NaN/inf/absurd scales and values, padded payloads, overlapping tensors, ...);
- one subprocess loads every file in turn: the peak resident memory is reset before each
  load (``/proc/self/clear_refs``) and read after it (``VmHWM``), and ``RLIMIT_DATA`` caps
  the data segment at the same budget so an attempt to allocate more fails there and then.
  glibc's malloc is told to unmap big blocks and trim its heap on free, so memory freed by
  one load is not silently reused by the next and the growth measured is the load's own;
  what the first load of each architecture imports (torch.fx) is done before measuring.

What each file must do:

- ``error``: a clean ``ValueError`` (a bit flipped or the file cut short with the checksum
  left as it is, and the known hostile headers);
- ``error_or_equal``: a ``ValueError`` or a model whose outputs on fixed inputs equal the
  original's, bit for bit (header edits with the checksum made right again);
- ``error_or_finite``: a ``ValueError`` or a model with finite weights and outputs (payload
  bytes changed and the checksum made right: a changed weight is a different, valid file).

Every ``ValueError`` message must be a sentence (a capital letter first, a full stop last,
no traceback, not huge), and no load may grow the process by more than
``4 x the original's float32 size + 50 MiB``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import qcore
from qcore.config import CompressionConfig, PruneConfig, QuantConfig
from qcore.export import MAGIC, PREFIX_BYTES

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
MEMORY_FACTOR, MEMORY_ALLOWANCE = 4, 50 * MIB
MAX_MESSAGE = 500  # characters: a refusal quotes hostile input only in part
# per file: no hostile header may stall the loader. Work is bounded by count, not by the
# clock: the Python calls that loading and one forward pass make (sys.setprofile), at most
# CALL_FACTOR times those of the heaviest file this tool writes itself
CALL_FACTOR = 10

MODELS = ("digits-mlp", "mnist-cnn")
CONFIGS = {
    "dense8": CompressionConfig(quant=QuantConfig(bits=8)),
    "bits2": CompressionConfig(quant=QuantConfig(bits=2)),  # rounded zeros: relidx
    "prune-mask": CompressionConfig(quant=QuantConfig(bits=4), prune=PruneConfig(rate=0.5)),
    "prune-channels": CompressionConfig(
        quant=QuantConfig(bits=5, per_channel=True, symmetric=False),
        prune=PruneConfig(rate=0.5, structured=True),
    ),
    # 16 bits: the widest codes, the heaviest decode of a file this tool writes
    "asym-pc": CompressionConfig(quant=QuantConfig(bits=16, symmetric=False, per_channel=True)),
    "float-pruned": CompressionConfig(quant=None, prune=PruneConfig(rate=0.7)),
    "float-channels": CompressionConfig(quant=None, prune=PruneConfig(rate=0.5, structured=True)),
    # k-means codebooks with Huffman-coded codes and relative indices (code tables)
    "kmeans-huffman": CompressionConfig(
        quant=QuantConfig(bits=5, codebook="kmeans"), prune=PruneConfig(rate=0.9, scope="global"),
        entropy="huffman"),
}

# ---------------------------------------------------------------------------------------------
# The worker: loads every file of the corpus in one process, one JSON line per file.

WORKER = r'''
import gc, json, re, resource, sys

import torch

torch.set_num_threads(1)
from qcore.export import load_packed
from qcore.graph import fold_batchnorm
from qcore.models import ARCHS, build_model

FIELDS = ("VmHWM", "VmRSS", "VmData")


def status():
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) * 1024 for k in FIELDS}


def reset_peak():
    """VmHWM := VmRSS; False where the kernel does not allow it (RLIMIT_DATA still caps)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def out_of_memory(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)[:2000]
        if isinstance(exc, MemoryError) or "allocate memory" in text or "to allocate" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def largest_weight(model):
    """The largest magnitude of the loaded model's float tensors (inf or nan if any is)."""
    top = 0.0
    for t in model.state_dict().values():
        if t.is_floating_point() and t.numel():
            if not bool(torch.isfinite(t).all()):
                return float("inf")
            top = max(top, float(t.abs().max()))
    return top


CALLS = 0


def count_call(frame, event, arg):
    global CALLS
    CALLS += 1


def load_and_run(path, x):
    """Load ``path`` and run it on ``x``: (packed, output, Python calls made)."""
    global CALLS
    CALLS = 0
    sys.setprofile(count_call)
    try:
        packed = load_packed(path)
        with torch.no_grad():
            y = packed.model(x)
    finally:
        sys.setprofile(None)
    return packed, y, CALLS


job = json.load(open(sys.argv[1]))
refs = {}
most_calls = 0
for oid, o in job["originals"].items():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, *o["input_shape"], generator=gen)
    for _ in range(2):  # twice: lazy initialisation and code pages are warm before measuring
        _, y, calls = load_and_run(o["path"], x)
        refs[oid] = (x, y)
    most_calls = max(most_calls, calls)
# what a first load of each architecture imports and initialises (torch.fx for BatchNorm
# folding: 100+ MiB once) is the process's, not any one file's
for arch in ARCHS:
    with torch.device("meta"):
        fold_batchnorm(build_model(arch, (1, 28, 28), 10).eval()).state_dict()
gc.collect()
gc.freeze()  # what exists now is never scanned again: a collection per file stays cheap
soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
with open(sys.argv[2], "w") as out:
    for case in job["cases"]:
        x, ref = refs[case["orig"]]
        budget = job["originals"][case["orig"]]["budget"]
        rec = {"file": case["file"]}
        packed = y = None
        gc.collect()
        resettable = reset_peak()
        before = status()
        cap = before["VmData"] + budget
        resource.setrlimit(resource.RLIMIT_DATA, (cap if hard == resource.RLIM_INFINITY
                                                  else min(cap, hard), hard))
        try:
            packed, y, calls = load_and_run(case["path"], x)
            rec.update(outcome="loaded", equal=y.shape == ref.shape and bool(torch.equal(y, ref)),
                       finite=bool(torch.isfinite(y).all()),
                       largest_weight=largest_weight(packed.model))
        except ValueError as exc:
            if out_of_memory(exc):
                rec.update(outcome="out_of_memory", type=type(exc).__name__, message=str(exc)[:300])
            else:
                rec.update(outcome="value_error", message=str(exc))
        except BaseException as exc:  # noqa: B036 - everything else is a finding
            rec.update(outcome="out_of_memory" if out_of_memory(exc) else "other_exception",
                       type=type(exc).__name__, message=str(exc)[:300])
        finally:
            resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        rec["calls"], rec["call_budget"] = CALLS, job["call_factor"] * most_calls
        rec["growth"] = status()["VmHWM"] - before["VmRSS"] if resettable else None
        del packed, y
        out.write(json.dumps(rec) + "\n")
        out.flush()
'''

# ---------------------------------------------------------------------------------------------
# Building files


def split(data: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    return data[PREFIX_BYTES : PREFIX_BYTES + n], data[PREFIX_BYTES + n :]


def seal(head: bytes, payload: bytes) -> bytes:
    """A file with this header and payload and a right checksum."""
    digest = hashlib.sha256(head + payload).digest()
    return MAGIC + struct.pack("<I", len(head)) + digest + head + payload


def dump(header) -> bytes:
    # allow_nan: inf and nan are written as the JSON tokens Infinity and NaN
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def edit_header(data: bytes, edit) -> bytes:
    """The file with ``edit(header)`` applied and its checksum made right."""
    head, payload = split(data)
    header = json.loads(head)
    edit(header)
    return seal(dump(header), payload)


def edit_payload(data: bytes, edit) -> bytes:
    """The file with ``edit(header, payload: bytearray)`` applied, checksum made right."""
    head, payload = split(data)
    buf = bytearray(payload)
    edit(json.loads(head), buf)
    return seal(head, bytes(buf))


def flip(buf: bytes, bit: int) -> bytes:
    out = bytearray(buf)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def channels_of(entry: dict) -> int:
    return entry["shape"][0] if len(entry["shape"]) >= 2 else 0


def first_value_at(entry: dict) -> int:
    """Payload offset of a tensor's first float32 (its first scale, or its first value)."""
    skip = math.ceil(channels_of(entry) / 8) if entry["encoding"] == "channels" else 0
    return entry["offset"] + skip


def set_float(which, value: float):
    def edit(header: dict, buf: bytearray) -> None:
        entry = which(header["tensors"])
        at = first_value_at(entry)
        buf[at : at + 4] = struct.pack("<f", value)
    return edit


def set_int32(which, value: int, index: int = 0):
    def edit(header: dict, buf: bytearray) -> None:
        entry = which(header["tensors"])
        at = first_value_at(entry) + 4 * entry["groups"] + 4 * index  # after the scales
        buf[at : at + 4] = struct.pack("<i", value)
    return edit


def quant(tensors):
    """The first quantized tensor: its first float32 is a scale, or a codebook's centroid."""
    return next(t for t in tensors if t["kind"] in ("quant", "codebook"))


def huffman_coded(tensors):
    return next(t for t in tensors if t.get("index_coding") == "huffman")


def quant_dense_asym(tensors):
    return next(t for t in tensors if t["kind"] == "quant" and not t["symmetric"]
                and t["encoding"] == "dense")  # fmt: skip


def float_tensor(tensors):
    return next(t for t in tensors if t["kind"] == "float")


def sparse(tensors):
    return next(t for t in tensors if t["encoding"] in ("relidx", "mask", "channels"))


def relidx(tensors):
    return next(t for t in tensors if t["encoding"] == "relidx")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def raw_spec_field(data: bytes, key: str, text: str) -> bytes:
    """The header with the spec's ``key`` replaced by raw JSON ``text``, checksum made right."""
    head, payload = split(data)
    header = json.loads(head)
    header["spec"][key] = "@@RAW@@"
    return seal(dump(header).replace(b'"@@RAW@@"', text.encode()), payload)


def pad_payload(extra: int, owner) -> Callable[[bytes], bytes]:
    """``extra`` zero bytes after the block of the tensor ``owner`` picks, counted in its
    nbytes (the tensors after it moved along), or at the payload's end and nobody's; the
    checksum made right."""
    def make(data: bytes) -> bytes:
        head, payload = split(data)
        header = json.loads(head)
        if owner is not None:
            entry = owner(header["tensors"])
            end = entry["offset"] + entry["nbytes"]
            payload = payload[:end] + bytes(extra) + payload[end:]
            entry["nbytes"] += extra
            for t in header["tensors"]:
                if t["offset"] >= end and t is not entry:
                    t["offset"] += extra
        else:
            payload += bytes(extra)
        return seal(dump(header), payload)
    return make


def shift_offset(delta: int):
    """A dense float tensor read ``delta`` bytes later: it overlaps its neighbour."""
    def edit(header: dict) -> None:
        for t in header["tensors"][:-1]:
            if t["kind"] == "float" and t["encoding"] == "dense":
                t["offset"] += delta
                return
    return edit


def swap_offsets(header: dict) -> None:
    a, b = header["tensors"][0], header["tensors"][1]
    a["offset"], b["offset"] = b["offset"], a["offset"]


def set_spec(**values):
    def edit(header: dict) -> None:
        header["spec"].update(values)
    return edit


def set_entry(which, **values):
    def edit(header: dict) -> None:
        which(header["tensors"]).update(values)
    return edit


def explicit_cases(config: str) -> list[tuple[str, str, Callable]]:
    """(what, expect, make(data) -> bytes): the known hostile files, per original."""
    cases: list[tuple[str, str, Callable]] = []
    hdr = lambda f: (lambda d: edit_header(d, f))  # noqa: E731
    pay = lambda f: (lambda d: edit_payload(d, f))  # noqa: E731
    if config == "dense8":  # the spec and the whole file: once per model
        cases += [
            ("spec num_classes=10**9", "error", hdr(set_spec(num_classes=10**9))),
            ("spec num_classes=Infinity", "error", lambda d: raw_spec_field(d, "num_classes",
                                                                             "Infinity")),
            ("spec num_classes=-Infinity", "error",
             lambda d: raw_spec_field(d, "num_classes", "-Infinity")),
            ("spec num_classes=NaN", "error", lambda d: raw_spec_field(d, "num_classes", "NaN")),
            ("spec num_classes=1e999", "error", lambda d: raw_spec_field(d, "num_classes",
                                                                          "1e999")),
            ("spec num_classes=10.0", "error", hdr(set_spec(num_classes=10.0))),
            ("spec num_classes=true", "error", hdr(set_spec(num_classes=True))),
            ("spec num_classes of 4000 digits", "error",
             lambda d: raw_spec_field(d, "num_classes", "9" * 4000)),
            ("spec num_classes of 5000 digits", "error",
             lambda d: raw_spec_field(d, "num_classes", "9" * 5000)),
            ("spec input_shape=[1,3000,3000]", "error", hdr(set_spec(input_shape=[1, 3000, 3000]))),
            ("spec input_shape=[1,10**9,10**9]", "error",
             hdr(set_spec(input_shape=[1, 10**9, 10**9]))),
            ("spec input_shape=[0,28,28]", "error", hdr(set_spec(input_shape=[0, 28, 28]))),
            ("spec input_shape=[1,28]", "error", hdr(set_spec(input_shape=[1, 28]))),
            ("spec input_shape=[1,8,8,1]", "error", hdr(set_spec(input_shape=[1, 8, 8, 1]))),
            ("spec input_shape=[1,Infinity,8]", "error",
             lambda d: raw_spec_field(d, "input_shape", "[1,Infinity,8]")),
            ("spec input_shape='28'", "error", hdr(set_spec(input_shape="28"))),
            ("spec arch unknown", "error", hdr(set_spec(arch="transformer"))),
            ("spec arch a list", "error", hdr(set_spec(arch=["cnn"]))),
            ("spec arch a dict", "error", hdr(set_spec(arch={"cnn": 1}))),
            ("spec arch other", "error", hdr(set_spec(arch="lenet300"))),
            ("spec num_classes 11", "error", hdr(set_spec(num_classes=11))),
            ("spec name a list", "error", hdr(set_spec(name=["x"]))),
            ("spec name 100k chars", "error", hdr(set_spec(name="x" * 100_000))),
            ("spec name nested 200000 deep", "error",
             lambda d: raw_spec_field(d, "name", nested(200_000))),
            ("spec arch nested 900 deep", "error",
             lambda d: raw_spec_field(d, "arch", nested(900))),
            ("spec arch nested 990 deep", "error",
             lambda d: raw_spec_field(d, "arch", nested(990))),
            ("spec missing", "error", hdr(lambda h: h.pop("spec"))),
            ("spec a list", "error", hdr(lambda h: h.update(spec=[1, 2]))),
            ("spec an int", "error", hdr(lambda h: h.update(spec=7))),
            ("header 200000 nested brackets", "error",
             lambda d: seal(nested(200_000).encode(), split(d)[1])),
            ("header 200000 nested braces", "error",
             lambda d: seal(b'{"a":' * 200_000 + b"1" + b"}" * 200_000, split(d)[1])),
            ("header a 5000-digit number", "error",
             lambda d: seal(split(d)[0][:-1] + b',"x":' + b"7" * 5000 + b"}", split(d)[1])),
            ("header Infinity token", "error_or_equal",
             lambda d: seal(split(d)[0][:-1] + b',"x":Infinity}', split(d)[1])),
            ("header size 1 MiB + 1", "error",
             lambda d: seal(split(d)[0][:-1] + b',"x":"' + b"a" * MIB + b'"}', split(d)[1])),
            ("header just under 1 MiB", "error_or_equal",
             lambda d: seal(split(d)[0][:-1] + b',"x":"' + b"a" * (MIB - len(split(d)[0]) - 8)
                            + b'"}', split(d)[1])),
            ("tensor table of 50000 dicts", "error",
             hdr(lambda h: h["tensors"].extend({} for _ in range(50_000)))),
            ("tensor table of 300000 ints", "error",
             hdr(lambda h: h["tensors"].extend(range(300_000)))),
            ("tensor name a list", "error",
             hdr(lambda h: h["tensors"][0].update(name=[h["tensors"][0]["name"]]))),
            ("tensor name a dict", "error", hdr(lambda h: h["tensors"][-1].update(name={}))),
            ("tensor shape of 90000 large dims", "error",
             hdr(lambda h: h["tensors"][0].update(shape=[2**31] * 90_000))),
            ("tensor shape of 400000 twos", "error",
             hdr(lambda h: h["tensors"][0].update(shape=[2] * 400_000))),
            ("tensor shape [2**40, 2**40]", "error",
             hdr(lambda h: h["tensors"][0].update(shape=[2**40, 2**40]))),
            ("tensor offset 10**400", "error",
             hdr(lambda h: h["tensors"][0].update(offset=10**400))),
            ("tensor offset 1e308", "error", hdr(lambda h: h["tensors"][0].update(offset=1e308))),
            ("tensor offset Infinity", "error",
             hdr(lambda h: h["tensors"][0].update(offset=math.inf))),
            ("tensor nbytes NaN", "error", hdr(lambda h: h["tensors"][0].update(nbytes=math.nan))),
            ("tensor kept -1", "error", hdr(lambda h: h["tensors"][0].update(kept=-1))),
            ("tensors duplicated", "error", hdr(lambda h: h["tensors"].extend(h["tensors"]))),
            ("tensors reversed", "error_or_equal", hdr(lambda h: h["tensors"].reverse())),
            ("tensors empty", "error", hdr(lambda h: h["tensors"].clear())),
            ("offset overlaps its neighbour by 4", "error_or_equal", hdr(shift_offset(4))),
            ("offset overlaps its neighbour by -4", "error_or_equal", hdr(shift_offset(-4))),
            ("offsets of two tensors swapped", "error_or_equal", hdr(swap_offsets)),
            ("payload padded, bytes nobody owns", "error", pad_payload(64, None)),
            ("config quant bits 3 (a lie)", "error_or_equal",
             hdr(lambda h: h["config"]["quant"].update(bits=3))),
            ("config clip Infinity", "error", hdr(lambda h: h["config"]["quant"].update(
                clip=math.inf))),
            ("config clip NaN", "error", hdr(lambda h: h["config"]["quant"].update(clip=math.nan))),
            ("config seed 10**30", "error", hdr(lambda h: h["config"]["quant"].update(
                seed=10**30))),
            ("config unknown key", "error", hdr(lambda h: h["config"].update(evil=1))),
            ("config a list", "error", hdr(lambda h: h.update(config=[1]))),
            ("config missing", "error", hdr(lambda h: h.pop("config"))),
            ("fold_bn lie", "error", hdr(lambda h: h.update(fold_bn=False))),
            ("format 1 in header", "error", hdr(lambda h: h.update(format=1))),
            ("format '2'", "error", hdr(lambda h: h.update(format="2"))),
            ("size fields lie", "error_or_equal",
             hdr(lambda h: h.update(size_bytes=-1, float_size_bytes=10**100))),
            ("older magic", "error", lambda d: MAGIC[:-1] + b"1" + d[len(MAGIC) :]),
            ("unknown magic version", "error", lambda d: MAGIC[:-1] + b"9" + d[len(MAGIC) :]),
            ("header length 0xFFFFFFFF", "error",
             lambda d: MAGIC + struct.pack("<I", 0xFFFFFFFF) + d[len(MAGIC) + 4 :]),
            ("header length 0", "error", lambda d: seal(b"", split(d)[0] + split(d)[1])),
            ("empty file", "error", lambda d: b""),
            ("a PNG", "error", lambda d: b"\x89PNG\r\n\x1a\n" + bytes(100)),
            ("header not UTF-8", "error", lambda d: seal(b'{"a":"\xff\xfe"}', split(d)[1])),
            ("header with a NUL", "error", lambda d: seal(split(d)[0] + b"\x00", split(d)[1])),
        ]
    if config != "dense8" and config != "asym-pc":  # sparse tensors: padded, lies
        cases += [
            ("payload padded 4 MiB, given to a sparse tensor", "error_or_finite",
             pad_payload(4 * MIB, sparse)),
            ("sparse kept 0", "error_or_equal", hdr(set_entry(sparse, kept=0))),
        ]
        for enc in ("dense", "channels", "mask", "relidx"):
            cases.append((f"sparse encoding -> {enc}", "error_or_equal",
                          hdr(set_entry(sparse, encoding=enc, index_width=4))))
    if config in ("bits2", "float-pruned"):  # relidx: every width, every bit count
        cases.append(("payload padded 4 MiB, given to a relidx tensor", "error_or_finite",
                      pad_payload(4 * MIB, relidx)))
        cases.append(("payload padded 1 byte, given to a relidx tensor", "error_or_equal",
                      pad_payload(1, relidx)))
        for w in range(1, 17):
            cases.append((f"relidx index_width {w}", "error_or_equal",
                          hdr(set_entry(relidx, index_width=w))))
        if config == "bits2":
            for b in (1, 3, 4, 8, 16):
                cases.append((f"relidx bits {b}", "error_or_equal",
                              hdr(lambda h, b=b: relidx(h["tensors"]).update(
                                  bits=b, binary=b == 1))))
    if config == "kmeans-huffman":  # codebook sizes and code tables that lie
        for key, values in (("centroids", (0, 1, 31, 32, 33, 2**31)),
                            ("code_symbols", (0, 1, 31, 32, 33)),
                            ("index_symbols", (0, 1, 2, 2**16, 2**16 + 1)),
                            ("index_width", (1, 2, 8, 16)),
                            ("code_coding", ("zip", None, 1)),
                            ("index_coding", ("zip", None))):
            for v in values:
                cases.append((f"huffman tensor {key}={v!r}", "error_or_equal",
                              hdr(set_entry(huffman_coded, **{key: v}))))
    every = config in ("dense8", "float-pruned")  # every value here, a few elsewhere
    if not config.startswith("float"):  # scales
        values = (math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1e-45, 1e-30, 1e30, 2e30, 3e38,
                  3.4028234e38) if every else (math.nan, -1.0, 2e30, 3.4028234e38)  # fmt: skip
        for v in values:
            cases.append((f"scale {v!r}", "error_or_finite", pay(set_float(quant, v))))
    if config == "asym-pc":  # zero points
        for v in (-(2**31), 2**31 - 1, -1, 0, 2**16 - 1, 2**16):  # 16-bit codes: 0..65535
            cases.append((f"zero point {v}", "error_or_finite",
                          pay(set_int32(quant_dense_asym, v))))
    values = (math.nan, math.inf, -math.inf, 3.4028234e38, -3.4028234e38, 1e30, 2e30,
              1e-45) if every else (math.inf, -3.4028234e38)  # fmt: skip
    for v in values:
        cases.append((f"float value {v!r}", "error_or_finite", pay(set_float(float_tensor, v))))
    return cases


# ---------------------------------------------------------------------------------------------
# Random header edits


def field_values(entry: dict, key: str, payload_len: int, names: list[str]) -> list:
    generic = [None, True, False, -1, 0, 1, 2, 7, 8, 15, 16, 17, 2**31, 2**63, 10**30, 1.5,
               1e308, math.inf, math.nan, "x", "8", [], [1], {}]  # fmt: skip
    shape = entry["shape"]
    specific = {
        "shape": [shape[::-1], [math.prod(shape)], [shape[0] + 1, *shape[1:]],
                  [shape[0] - 1, *shape[1:]], [*shape, 1], shape[:-1], [2**31, 2**31]],
        "offset": [entry["offset"] + d for d in (-4, -1, 1, 4)] + [payload_len],
        "nbytes": [entry["nbytes"] + d for d in (-4, -1, 1, 4)] + [payload_len],
        "bits": [entry.get("bits", 8) + d for d in (-1, 1)] + [1, 16],
        "kept": [entry["kept"] + d for d in (-1, 1)] + [math.prod(shape)],
        "groups": [entry.get("groups", 1) + d for d in (-1, 1)] + [1, shape[0]],
        "encoding": ["dense", "channels", "mask", "relidx", "zip"],
        "index_width": list(range(1, 17)),
        "kind": ["quant", "float", "pickle"],
        "name": names,
        "symmetric": [True, False], "binary": [True, False], "per_channel": [True, False],
    }[key]
    return specific * 2 + generic  # field-specific values twice as likely


TENSOR_KEYS = ("shape", "offset", "nbytes", "bits", "kept", "groups", "encoding",
               "index_width", "kind", "name", "symmetric", "binary", "per_channel")  # fmt: skip
SPEC_EDITS = {
    "arch": ["mlp", "lenet300", "cnn", "dwsep", "resnet", "MLP", "", None, 3],
    "input_shape": [[1, 28, 28], [1, 8, 8], [1, 29, 29], [1, 4, 16], [4, 4, 4], [3, 32, 32],
                    [1, 64, 64], [1, 65, 65], [5, 8, 8], [1, 1, 1], [1, 8, 8.0]],
    "num_classes": [1, 2, 9, 10, 11, 100, 1000, 1001, 10.5, "10", None],
    "name": ["", "evil", None, 3, ["x"]],
    "extra": [1, None, {"a": [1]}],
}
CONFIG_EDITS = [
    ("quant", "bits", [1, 4, 16, 17, 0, 8.0, 8.5, "8", None]),
    ("quant", "clip", [0.5, 0.0, -1.0, 1e300, "1"]),
    ("quant", "clip_mode", ["mse", "sigma", "evil", None]),
    ("quant", "symmetric", [True, False, 1, None]),
    ("quant", "per_channel", [True, False, "yes"]),
    ("quant", "rounding", ["stochastic", "up"]),
    ("quant", "seed", [1, -1, 2**40]),
    ("quant", "layer_bits", [[["fc1", 4]], [["fc1", 0]], [["fc1", 4], ["fc1", 5]], "x", [[1]]]),
    ("prune", "rate", [0.0, 0.99, 1.0, -0.1, math.inf]),
    ("prune", "structured", [True, False, 0]),
    ("prune", "scope", ["global", "row"]),
    (None, "layers", [["fc1"], [], "fc1", [1], None]),
    (None, "fold_bn", [False, None, 1]),
]


def random_header_edit(rng: random.Random, header: dict, payload_len: int) -> str:
    """Edit ``header`` in place at random; return what was done."""
    tensors = header["tensors"]
    roll = rng.random()
    if roll < 0.65:
        entry = rng.choice(tensors)
        name, key = entry["name"], rng.choice(TENSOR_KEYS)
        if rng.random() < 0.08:
            entry.pop(key, None)
            return f"tensor {name} del {key}"
        names = [t["name"] for t in tensors if t is not entry] + ["evil", name + "x"]
        value = rng.choice(field_values(entry, key, payload_len, names))
        entry[key] = value
        return f"tensor {name} {key}={value!r}"
    if roll < 0.85:
        key = rng.choice(list(SPEC_EDITS))
        value = rng.choice(SPEC_EDITS[key])
        header["spec"][key] = value
        return f"spec {key}={value!r}"
    section, key, values = rng.choice(CONFIG_EDITS)
    value = rng.choice(values)
    where = header["config"] if section is None else header["config"].get(section)
    if not isinstance(where, dict):  # float configs have no quant section: set it whole
        header["config"][section] = {key: value}
    else:
        where[key] = value
    if key == "fold_bn" and rng.random() < 0.5:
        header["fold_bn"] = value  # both, so the lie is consistent
    return f"config {section}.{key}={value!r}"


# ---------------------------------------------------------------------------------------------
# The corpus


def build_corpus(root: Path) -> dict:
    """Write the originals and the corpus under ``root``; return the worker's job."""
    rng = random.Random(20_240_611)
    originals, cases = {}, []

    def add(oid: str, family: str, what: str, expect: str, data: bytes) -> None:
        name = f"{len(cases):04d}.qpk"
        (root / name).write_bytes(data)
        cases.append({"file": name, "path": str(root / name), "orig": oid, "family": family,
                      "what": what, "expect": expect})  # fmt: skip

    for model_name in MODELS:
        model = qcore.load_model(model_name)
        for config_name, config in CONFIGS.items():
            oid = f"{model_name}/{config_name}"
            c = qcore.compress(model, config)
            path = root / f"orig-{model_name}-{config_name}.qpk"
            qcore.export_packed(c, path)
            x = torch.randn(4, *model.qcore_spec["input_shape"],
                            generator=torch.Generator().manual_seed(0))
            with torch.no_grad():  # the original itself loads, from its spec, exactly
                assert torch.equal(qcore.load_packed(path).model(x), c.model(x)), oid
            data = path.read_bytes()
            head, payload = split(data)
            header = json.loads(head)
            originals[oid] = {
                "path": str(path),
                "input_shape": list(model.qcore_spec["input_shape"]),
                "budget": MEMORY_FACTOR * c.float_size_bytes + MEMORY_ALLOWANCE,
                "encodings": sorted({f"{t['kind']}/{t['encoding']}" for t in header["tensors"]}),
                "size": len(data),
            }
            n = len(head)
            # bit flips, checksum left as it is: magic, length, digest, header, payload
            spots = [("magic", rng.randrange(8 * len(MAGIC))),
                     ("length", 8 * len(MAGIC) + rng.randrange(32)),
                     ("digest", 8 * (len(MAGIC) + 4) + rng.randrange(256))]
            spots += [("header", 8 * PREFIX_BYTES + rng.randrange(8 * n)) for _ in range(2)]
            spots += [("payload", 8 * (PREFIX_BYTES + n) + rng.randrange(8 * len(payload)))
                      for _ in range(2)]  # fmt: skip
            # the checksum (or the header's framing) refuses every one of these
            for where, bit in spots:
                add(oid, "flip", f"bit {bit} ({where})", "error", flip(data, bit))
            # truncations: at the prefix's edges, in the header, in the payload
            cuts = {rng.randrange(len(data)) for _ in range(3)}
            if config_name == "dense8":
                cuts |= {0, 1, 7, 8, 11, 12, PREFIX_BYTES - 1, PREFIX_BYTES, PREFIX_BYTES + n - 1,
                         PREFIX_BYTES + n, len(data) - 1}
            for cut in sorted(cuts):
                add(oid, "truncate", f"to {cut} bytes", "error", data[:cut])
            for cut in sorted(rng.sample(range(len(payload)), 1)):  # and sealed again
                add(oid, "truncate-sealed", f"payload to {cut} bytes", "error",
                    seal(head, payload[:cut]))
            # payload bit flips, checksum made right: a different file, which may be valid
            for _ in range(6):
                bit = rng.randrange(8 * len(payload))
                add(oid, "payload-flip-sealed", f"payload bit {bit}", "error_or_finite",
                    seal(head, flip(payload, bit)))
            # exponent bits of the first scale / value, checksum made right
            entry = quant(header["tensors"]) if c.config.quant else float_tensor(header["tensors"])
            at = first_value_at(entry)
            for bit in (1, 2, 3):  # little-endian: byte 3 holds the sign and exponent
                b = 8 * (at + 3) + bit
                add(oid, "payload-flip-sealed", f"exponent bit {bit} of {entry['name']}",
                    "error_or_finite", seal(head, flip(payload, b)))
            # header bit flips, checksum made right
            for _ in range(2):
                bit = rng.randrange(8 * n)
                add(oid, "header-flip-sealed", f"header bit {bit}", "error_or_equal",
                    seal(flip(head, bit), payload))
            # header field edits, checksum made right
            for _ in range(12):
                edited = json.loads(head)
                what = random_header_edit(rng, edited, len(payload))
                add(oid, "header-edit", what, "error_or_equal", seal(dump(edited), payload))
            # the known hostile files
            for what, expect, make in explicit_cases(config_name):
                add(oid, "explicit", what, expect, make(data))
    return {"originals": originals, "cases": cases, "call_factor": CALL_FACTOR}


# ---------------------------------------------------------------------------------------------
# The test


def is_sentence(message: str) -> bool:
    return (
        len(message) >= 10
        and message[0].isupper()
        and message.endswith(".")
        and "Traceback" not in message
        and 'File "' not in message
        and len(message) <= MAX_MESSAGE
    )


def verdict(case: dict, rec: dict) -> str | None:
    """Why this file's outcome breaks the rule, or None."""
    outcome = rec["outcome"]
    if outcome == "value_error":
        if not is_sentence(rec["message"]):
            return f"the refusal is not a sentence: {rec['message'][:200]!r}"
        return None
    if outcome != "loaded":
        return f"{outcome} {rec.get('type')}: {rec.get('message', '')[:200]}"
    if case["expect"] == "error":
        return "loaded, should be refused"
    if case["expect"] == "error_or_equal" and not rec["equal"]:
        return "loaded with outputs different from the original's"
    if case["expect"] == "error_or_finite" and not (rec["finite"]
                                                    and math.isfinite(rec["largest_weight"])):
        return f"loaded with non-finite outputs (largest weight {rec['largest_weight']:.3g})"
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc (Linux)")
def test_hostile_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    job = build_corpus(corpus)
    cases = job["cases"]
    # the originals cover every codec
    seen = set().union(*(o["encodings"] for o in job["originals"].values()))
    for enc in ("quant/dense", "quant/channels", "quant/mask", "quant/relidx", "float/dense",
                "float/channels", "float/relidx"):
        assert enc in seen, (enc, seen)
    assert len(cases) >= 300

    job_path, results_path = tmp_path / "job.json", tmp_path / "results.jsonl"
    job_path.write_text(json.dumps(job))
    (tmp_path / "worker.py").write_text(WORKER)
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths),
        # big blocks unmapped and the heap trimmed on free: what one load frees is given back,
        # so the next load's growth is its own
        "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(job_path),
                           str(results_path)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    lines = results_path.read_text().splitlines() if results_path.exists() else []
    if proc.returncode != 0:
        stuck = cases[len(lines)] if len(lines) < len(cases) else None
        pytest.fail(f"the worker died (rc {proc.returncode}) on {stuck}:\n{proc.stderr[-3000:]}")
    results = [json.loads(line) for line in lines]
    assert [r["file"] for r in results] == [c["file"] for c in cases]

    failures, counts, peak = [], Counter(), Counter()
    for case, rec in zip(cases, results, strict=True):
        orig = job["originals"][case["orig"]]
        kind = rec["outcome"]
        if kind == "loaded":
            kind += "-equal" if rec["equal"] else "-finite" if rec["finite"] else "-nonfinite"
        counts[kind] += 1
        peak[case["orig"]] = max(peak[case["orig"]], rec["growth"] or 0)
        why = verdict(case, rec)
        if rec["growth"] is not None and rec["growth"] > orig["budget"]:
            why = f"grew by {rec['growth'] / MIB:.1f} MiB (budget {orig['budget'] / MIB:.1f})"
        if rec["calls"] > rec["call_budget"]:
            why = f"made {rec['calls']:,} Python calls (budget {rec['call_budget']:,})"
        if why:
            failures.append(f"{case['file']} {case['orig']} {case['family']} "
                            f"[{case['what'][:80]}]: {why}")
    report = f"{len(cases)} files: {dict(sorted(counts.items()))}\npeak growth (MiB): " + ", ".join(
        f"{k} {v / MIB:.1f}" for k, v in peak.items())
    (tmp_path / "report.txt").write_text(report + "\n" + "\n".join(failures) + "\n")
    if failures:
        pytest.fail(report + "\n" + "\n".join(failures), pytrace=False)
    # the harness sees both sides: refusals, and edited files that load
    assert counts["value_error"] > len(cases) // 2, report
    assert counts["loaded-equal"] and counts["loaded-finite"], report
    shutil.rmtree(corpus)  # a few hundred MiB; kept only when the test fails
