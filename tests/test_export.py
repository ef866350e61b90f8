"""Tests for qcore.export: exact round trips, size on disk, hostile files."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_bn_model, make_mlp, make_twice_used
from torch import nn

import qcore
from qcore.compress import compress
from qcore.config import CompressionConfig, PruneConfig, QuantConfig
from qcore.export import MAGIC, PREFIX_BYTES, export_packed, load_packed, packed_bytes, read_header

CONFIGS = {
    **{f"bits{b}": CompressionConfig(quant=QuantConfig(bits=b)) for b in (1, 2, 3, 5, 8, 16)},
    "asym4": CompressionConfig(quant=QuantConfig(bits=4, symmetric=False)),
    "asym8-pc": CompressionConfig(quant=QuantConfig(bits=8, symmetric=False, per_channel=True)),
    "sym3-pc": CompressionConfig(quant=QuantConfig(bits=3, per_channel=True)),
    "bits1-pc-pruned": CompressionConfig(
        quant=QuantConfig(bits=1, per_channel=True), prune=PruneConfig(rate=0.6)
    ),
    "mse-asym16": CompressionConfig(
        quant=QuantConfig(bits=16, symmetric=False, clip_mode="mse")
    ),
    "pruned-unstructured": CompressionConfig(
        quant=QuantConfig(bits=4), prune=PruneConfig(rate=0.5)
    ),
    "pruned-sparse": CompressionConfig(
        quant=QuantConfig(bits=6, symmetric=False), prune=PruneConfig(rate=0.95)
    ),
    "pruned-structured": CompressionConfig(
        quant=QuantConfig(bits=5, per_channel=True, symmetric=False),
        prune=PruneConfig(rate=0.5, structured=True),
    ),
    "pruned-global": CompressionConfig(
        quant=QuantConfig(bits=7), prune=PruneConfig(rate=0.8, scope="global")
    ),
    "pruned-global-structured": CompressionConfig(
        quant=QuantConfig(bits=2), prune=PruneConfig(rate=0.4, structured=True, scope="global")
    ),
    "float-pruned": CompressionConfig(quant=None, prune=PruneConfig(rate=0.7)),
    "float-pruned-sparse": CompressionConfig(quant=None, prune=PruneConfig(rate=0.97)),
    "float": CompressionConfig(quant=None),
    "stochastic": CompressionConfig(quant=QuantConfig(bits=3, rounding="stochastic", seed=9)),
    "subset": CompressionConfig(quant=QuantConfig(bits=2), layers=("3", "10")),
    "layer-bits": CompressionConfig(quant=QuantConfig(bits=4, layer_bits={"0": 1, "7": 16})),
    "no-fold": CompressionConfig(quant=QuantConfig(bits=4), prune=PruneConfig(rate=0.3),
                                 fold_bn=False),
    "kmeans4": CompressionConfig(quant=QuantConfig(bits=4, codebook="kmeans")),
    "kmeans1-pruned": CompressionConfig(quant=QuantConfig(bits=1, codebook="kmeans"),
                                        prune=PruneConfig(rate=0.5)),
    "kmeans5-global-huffman": CompressionConfig(
        quant=QuantConfig(bits=5, codebook="kmeans"), prune=PruneConfig(rate=0.9, scope="global"),
        entropy="huffman"),
    "kmeans3-structured-huffman": CompressionConfig(
        quant=QuantConfig(bits=3, codebook="kmeans"), prune=PruneConfig(rate=0.5, structured=True),
        entropy="huffman"),
    "huffman8": CompressionConfig(quant=QuantConfig(bits=8), entropy="huffman"),
    "huffman-asym-pc-sparse": CompressionConfig(
        quant=QuantConfig(bits=6, symmetric=False, per_channel=True),
        prune=PruneConfig(rate=0.95), entropy="huffman"),
    "huffman-float-sparse": CompressionConfig(quant=None, prune=PruneConfig(rate=0.97),
                                              entropy="huffman"),
    "huffman-layer-bits": CompressionConfig(
        quant=QuantConfig(bits=4, codebook="kmeans", layer_bits={"0": 2, "7": 16}),
        prune=PruneConfig(rate=0.6), entropy="huffman"),
}


def header_len(data: bytes) -> int:
    return struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])[0]


def round_trip(model: nn.Module, config: CompressionConfig, path: Path, x: torch.Tensor):
    c = compress(model, config)
    n = export_packed(c, path)
    data = path.read_bytes()
    assert n == len(data) == path.stat().st_size
    head = header_len(data)
    assert head < 64 * 1024
    assert len(data) == c.size_bytes + PREFIX_BYTES + head
    assert data == packed_bytes(c)
    packed = load_packed(path, template=model)
    assert packed.config == config
    loaded = packed.model
    with torch.no_grad():
        assert torch.equal(loaded(x), c.model(x))
    assert not loaded.training
    return c, loaded


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_exact(name: str, tmp_path: Path, images: torch.Tensor) -> None:
    model = make_bn_model(0)
    c, loaded = round_trip(model, CONFIGS[name], tmp_path / "m.qpk", images)
    # every compressed weight comes back bit for bit
    state = loaded.state_dict()
    for k, v in c.replacements().items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_every_bit_width(bits: int, tmp_path: Path, images: torch.Tensor) -> None:
    for sym in (True, False):
        config = CompressionConfig(quant=QuantConfig(bits=bits, symmetric=sym, per_channel=sym),
                                   prune=PruneConfig(rate=0.2 if sym else 0.0))
        round_trip(make_mlp(bits), config, tmp_path / f"m{bits}{sym}.qpk", images)


def test_round_trip_twice_used_and_root_module(tmp_path: Path, images: torch.Tensor) -> None:
    round_trip(make_twice_used(), CONFIGS["pruned-structured"], tmp_path / "a.qpk", images)
    torch.manual_seed(0)
    lin = nn.Linear(36, 3).eval()
    round_trip(lin, CONFIGS["pruned-unstructured"], tmp_path / "b.qpk", images.flatten(1))


def test_template_not_changed(tmp_path: Path, images: torch.Tensor) -> None:
    model = make_bn_model(0)
    c = compress(model, CONFIGS["bits2"])
    export_packed(c, tmp_path / "m.qpk")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_packed(tmp_path / "m.qpk", template=model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_read_header(tmp_path: Path) -> None:
    config = CONFIGS["pruned-structured"]
    c = compress(make_bn_model(0), config)
    export_packed(c, tmp_path / "m.qpk")
    h = read_header(tmp_path / "m.qpk")
    assert h["format"] == 2 and h["fold_bn"] is True
    assert h["size_bytes"] == c.size_bytes and h["float_size_bytes"] == c.float_size_bytes
    assert h["config"]["quant"]["bits"] == 5 and h["config"]["quant"]["symmetric"] is False
    assert h["config"]["prune"] == {"rate": 0.5, "structured": True, "scope": "layer"}
    assert CompressionConfig.from_dict(h["config"]) == config
    kinds = {t["name"]: t["kind"] for t in h["tensors"]}
    assert kinds["0.weight"] == "quant" and kinds["0.bias"] == "float"
    assert sum(t["nbytes"] for t in h["tensors"]) == c.size_bytes


def test_no_template_and_no_spec_raises(tmp_path: Path) -> None:
    export_packed(compress(make_mlp(), CONFIGS["bits8"]), tmp_path / "m.qpk")
    with pytest.raises(ValueError, match="template"):
        load_packed(tmp_path / "m.qpk")


# ---------------------------------------------------------------- hostile files


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, bytes, nn.Module]:
    model = make_bn_model(0)
    c = compress(model, CONFIGS["pruned-unstructured"])
    path = tmp_path / "m.qpk"
    export_packed(c, path)
    return path, path.read_bytes(), model


def rewrite(data: bytes, edit) -> bytes:
    """The file with its header edited and its checksum made right again, so that every
    field check is reached (a file edited without fixing the checksum is refused first)."""
    n = header_len(data)
    header = json.loads(data[PREFIX_BYTES : PREFIX_BYTES + n])
    edit(header)
    head = json.dumps(header).encode()
    payload = data[PREFIX_BYTES + n :]
    return (MAGIC + struct.pack("<I", len(head)) + hashlib.sha256(head + payload).digest()
            + head + payload)


def tensor(header: dict, name: str) -> dict:
    return next(t for t in header["tensors"] if t["name"] == name)


def load_bytes(path: Path, data: bytes, model: nn.Module) -> nn.Module:
    path.write_bytes(data)
    return load_packed(path, template=model).model


def edit_field(name: str, key: str, value):
    def edit(h: dict) -> None:
        tensor(h, name)[key] = value
    return edit


def sealed(head: bytes, payload: bytes) -> bytes:
    """A file with this header and payload and a right checksum."""
    digest = hashlib.sha256(head + payload).digest()
    return MAGIC + struct.pack("<I", len(head)) + digest + head + payload


def nan_scale(data: bytes) -> bytes:
    """The first quantized tensor's scale set to NaN, checksum made right."""
    n = header_len(data)
    header = json.loads(data[PREFIX_BYTES : PREFIX_BYTES + n])
    entry = next(t for t in header["tensors"] if t["kind"] == "quant")
    payload = bytearray(data[PREFIX_BYTES + n :])
    at = entry["offset"] + (1 if entry["encoding"] == "channels" else 0)
    payload[at : at + 4] = struct.pack("<f", float("nan"))
    return sealed(data[PREFIX_BYTES : PREFIX_BYTES + n], bytes(payload))


HOSTILE = {
    "bad magic": lambda d: b"NOTMAGIC" + d[8:],
    "empty": lambda d: b"",
    "only magic": lambda d: MAGIC,
    "truncated payload": lambda d: d[:-10],
    "truncated header": lambda d: d[:20],
    "huge header length": lambda d: MAGIC + struct.pack("<I", 0xFFFFFFF0) + d[12:],
    "garbage json": lambda d: sealed(b"{not ", b""),
    "non-utf8 header": lambda d: sealed(b"\xff\xfe", b""),
    "deep nesting": lambda d: sealed(b"[" * 200_000 + b"]" * 200_000, b""),
    "bit flip in payload": lambda d: d[:-40] + bytes([d[-40] ^ 4]) + d[-39:],
    "bit flip in header": lambda d: d[:60] + bytes([d[60] ^ 1]) + d[61:],
    "older format": lambda d: MAGIC[:-1] + b"1" + d[len(MAGIC):],
    "json list": lambda d: rewrite(d, lambda h: h.clear()),
    "wrong version": lambda d: rewrite(d, lambda h: h.update(format=3)),
    "nan scale": lambda d: nan_scale(d),
    "config lie": lambda d: rewrite(d, lambda h: h["config"].update(fold_bn=False)),
    "unknown config key": lambda d: rewrite(d, lambda h: h["config"].update(evil=1)),
    "no tensors": lambda d: rewrite(d, lambda h: h.update(tensors=None)),
    "tensor not a dict": lambda d: rewrite(d, lambda h: h["tensors"].append(3)),
    "offset past end": lambda d: rewrite(d, edit_field("0.weight", "offset", 10**9)),
    "negative offset": lambda d: rewrite(d, edit_field("0.weight", "offset", -4)),
    "offset not int": lambda d: rewrite(d, edit_field("0.weight", "offset", "0")),
    "nbytes too short": lambda d: rewrite(d, edit_field("7.weight", "nbytes", 3)),
    "nbytes too long": lambda d: rewrite(d, edit_field("0.bias", "nbytes", 20)),
    "wrong shape": lambda d: rewrite(d, edit_field("7.weight", "shape", [12, 95])),
    "huge shape": lambda d: rewrite(d, edit_field("0.bias", "shape", [2**40, 2**40])),
    "shape not list": lambda d: rewrite(d, edit_field("0.bias", "shape", 4)),
    "bits lie": lambda d: rewrite(d, edit_field("7.weight", "bits", 3)),
    "bits lie up": lambda d: rewrite(d, edit_field("0.weight", "bits", 8)),
    "bits 17": lambda d: rewrite(d, edit_field("0.weight", "bits", 17)),
    "bits list": lambda d: rewrite(d, edit_field("0.weight", "bits", [4])),
    "kept lie": lambda d: rewrite(d, edit_field("7.weight", "kept", 10)),
    "kept none": lambda d: rewrite(d, edit_field("7.weight", "kept", None)),
    "groups lie": lambda d: rewrite(d, edit_field("0.weight", "groups", 4)),
    "binary lie": lambda d: rewrite(d, edit_field("0.weight", "binary", True)),
    "encoding lie": lambda d: rewrite(d, edit_field("7.weight", "encoding", "dense")),
    "unknown encoding": lambda d: rewrite(d, edit_field("7.weight", "encoding", "zip")),
    "index width 0": lambda d: rewrite(
        d, lambda h: tensor(h, "7.weight").update(encoding="relidx", index_width=0)
    ),
    "unknown kind": lambda d: rewrite(d, edit_field("0.bias", "kind", "pickle")),
    "unknown tensor": lambda d: rewrite(d, edit_field("0.bias", "name", "evil")),
    "name not str": lambda d: rewrite(d, edit_field("0.bias", "name", ["0.bias"])),
    "missing tensor": lambda d: rewrite(d, lambda h: h["tensors"].pop()),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_raise_value_error(case: str, packed, tmp_path: Path) -> None:
    path, data, model = packed
    bad = HOSTILE[case](data)
    with pytest.raises(ValueError):
        load_bytes(tmp_path / "bad.qpk", bad, model)


def test_read_header_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"hello world, not a packed file")
    with pytest.raises(ValueError, match="magic"):
        read_header(tmp_path / "x")
    (tmp_path / "y").write_bytes(MAGIC + struct.pack("<I", 2**21) + bytes(32) + b"{}")
    with pytest.raises(ValueError, match="too large"):
        read_header(tmp_path / "y")


def test_unchanged_rewrite_still_loads(packed, tmp_path: Path, images: torch.Tensor) -> None:
    path, data, model = packed
    loaded = load_bytes(tmp_path / "same.qpk", rewrite(data, lambda h: None), model)
    with torch.no_grad():
        assert torch.equal(loaded(images), load_packed(path, template=model).model(images))


def test_bits_lie_on_dense_tensor(tmp_path: Path) -> None:
    model = make_mlp(0)
    export_packed(compress(model, CONFIGS["bits8"]), tmp_path / "m.qpk")
    data = (tmp_path / "m.qpk").read_bytes()
    for bits in (4, 7):  # fewer bits would leave bytes unread: the header lies
        with pytest.raises(ValueError, match="does not match its header"):
            load_bytes(tmp_path / "bad.qpk", rewrite(data, edit_field("1.weight", "bits", bits)),
                       model)


# ---------------------------------------------------------------- size on screen == file


def random_config(rng, layer_names: list[str]) -> CompressionConfig:
    """A random valid configuration (seeded), covering every encoding and scheme."""
    quant = None
    if rng.random() < 0.85:
        mode = rng.choice(["ratio", "absolute", "sigma", "percentile", "mse"])
        clip = {"ratio": rng.uniform(0.3, 1.0), "absolute": rng.uniform(0.05, 1.0),
                "sigma": rng.uniform(1.0, 5.0), "percentile": rng.uniform(90, 100),
                "mse": 1.0}[mode]  # fmt: skip
        layer_bits = {}
        if rng.random() < 0.3:
            layer_bits = {n: rng.randint(1, 16) for n in rng.sample(layer_names, 1)}
        quant = QuantConfig(bits=rng.randint(1, 16), symmetric=rng.random() < 0.6,
                            per_channel=rng.random() < 0.4, clip=clip, clip_mode=mode,
                            layer_bits=layer_bits)  # fmt: skip
    prune = None
    if rng.random() < 0.6:
        prune = PruneConfig(rate=rng.choice([0.01, 0.2, 0.5, 0.9, 0.98]),
                            structured=rng.random() < 0.4,
                            scope=rng.choice(["layer", "global"]))  # fmt: skip
    layers = None
    if rng.random() < 0.2:
        layers = tuple(rng.sample(layer_names, max(1, len(layer_names) // 2)))
    if quant is not None and rng.random() < 0.3:  # k-means codebooks are per tensor
        quant = replace(quant, codebook="kmeans", per_channel=False)
    return CompressionConfig(quant=quant, prune=prune, layers=layers,
                             fold_bn=rng.random() < 0.8,
                             entropy="huffman" if rng.random() < 0.4 else None)


@pytest.mark.parametrize("name", qcore.list_models())
def test_size_bytes_is_the_payload_on_every_sample_model(name: str, tmp_path: Path) -> None:
    """20 random configs per sample model: size_bytes == the payload the file holds, the
    header says so too, and the file loads to the compressed model's outputs."""
    import random

    rng = random.Random(f"size-{name}")
    model = qcore.load_model(name)
    x = qcore.load_dataset(qcore.model_info(name).dataset).x[:16]
    layer_names = list(qcore.weight_layers(model))
    for i in range(20):
        config = random_config(rng, layer_names)
        c = compress(model, config)
        data = packed_bytes(c)
        head = header_len(data)
        assert len(data) - PREFIX_BYTES - head == c.size_bytes, config
        assert c.size_bytes == sum(r.size_bytes for r in c.layers) + sum(
            e.nbytes() for k, _, e in c.packed_tensors()
            if k.rsplit(".", 1)[0] not in {r.name for r in c.layers})
        path = tmp_path / f"{i}.qpk"
        path.write_bytes(data)
        packed = load_packed(path)  # rebuilt from the file's model spec
        assert packed.config == config
        with torch.inference_mode():
            assert torch.equal(packed.model(x), c.model(x)), config


@pytest.mark.parametrize("name", ["kmeans5-global-huffman", "huffman-asym-pc-sparse",
                                  "kmeans3-structured-huffman", "pruned-structured", "float"])
def test_size_parts_sum_to_each_layer_and_the_file(name: str) -> None:
    c = compress(make_bn_model(0), CONFIGS[name])
    for r in c.layers:
        parts = r.size_parts
        assert all(v >= 0 for v in parts.values())
        assert sum(parts.values()) == r.size_bytes, r.name
        assert parts["code_bytes"] == (r.code_bits + 7) // 8 or r.encoded.kind == "float"
        assert parts["bias_bytes"] == 4 * (r.params - r.float_weight.numel())
        if r.codebook is not None:
            assert parts["codebook_bytes"] == 4 * r.codebook.numel()
        if r.encoded.header().get("code_coding") is None and r.encoded.header().get(
                "index_coding") is None:
            assert parts["table_bytes"] == 0
    data = packed_bytes(c)
    assert len(data) - PREFIX_BYTES - header_len(data) == c.size_bytes


def test_huffman_never_makes_a_file_larger() -> None:
    """entropy="huffman" only allows Huffman coding: each tensor keeps the smaller form."""
    model = make_bn_model(0)
    for name in ("kmeans4", "pruned-sparse", "bits8", "float-pruned-sparse", "pruned-global"):
        plain = compress(model, CONFIGS[name])
        coded = compress(model, replace(CONFIGS[name], entropy="huffman"))
        assert coded.size_bytes <= plain.size_bytes, name
        for a, b in zip(plain.layers, coded.layers, strict=True):
            assert b.size_bytes <= a.size_bytes
            assert torch.equal(a.dequantized, b.dequantized)  # the same weights


def _resealed(data: bytes, edit) -> bytes:
    """``data`` with ``edit(header)`` applied and its checksum made right again."""
    (n,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    header = json.loads(data[PREFIX_BYTES : PREFIX_BYTES + n])
    payload = data[PREFIX_BYTES + n :]
    edit(header)
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + hashlib.sha256(head + payload).digest() \
        + head + payload


@pytest.mark.parametrize("field, value, words", [
    # was a TypeError (a list is unhashable) from deep inside the loader
    ("edge", [1], "names an activation edge the model lacks ([1])"),
    ("edge", {"a": 1}, "names an activation edge the model lacks ({'a': 1})"),
    ("edge", None, "names an activation edge the model lacks (None)"),
    # were accepted: the header's sizes must be the file's own
    ("size_bytes", "relidx", "size_bytes ('relidx') is not its payload's"),
    ("size_bytes", -(2**31), "size_bytes (-2147483648) is not its payload's"),
    ("size_bytes", {}, "size_bytes ({}) is not its payload's"),
    ("size_bytes", None, "size_bytes (None) is not its payload's"),
    ("float_size_bytes", "relidx", "float_size_bytes ('relidx') is not a whole number"),
    ("float_size_bytes", -(2**31), "float_size_bytes (-2147483648) is not a whole number"),
    ("float_size_bytes", {}, "float_size_bytes ({}) is not a whole number"),
    ("float_size_bytes", 4 * 10**12, "float_size_bytes (4000000000000) is not a whole"),
    ("float_size_bytes", 6, "float_size_bytes (6) is not a whole number of float32"),
    ("float_size_bytes", True, "float_size_bytes (True) is not a whole number"),
])  # fmt: skip
def test_every_header_field_is_typed_and_bounded(tmp_path: Path, field, value, words) -> None:
    from qcore.config import ActQuantConfig

    model = make_mlp(0)
    calib = qcore.Dataset(name="c", split="calib", x=torch.randn(32, 1, 6, 6),
                          y=torch.zeros(32, dtype=torch.long), classes=("a", "b", "c"),
                          description="", mean=(0.0,), std=(1.0,), indices=torch.arange(32))
    cfg = CompressionConfig(quant=QuantConfig(bits=4), act=ActQuantConfig(bits=8))
    c = compress(model, cfg, calib=calib)
    data = packed_bytes(c)
    good = tmp_path / "good.qpk"
    good.write_bytes(data)
    assert load_packed(good, template=model).header["size_bytes"] == c.size_bytes

    def edit(header: dict) -> None:
        if field == "edge":
            header["activations"][0]["edge"] = value
        else:
            header[field] = value

    bad = tmp_path / "bad.qpk"
    bad.write_bytes(_resealed(data, edit))
    with pytest.raises(ValueError) as e:
        load_packed(bad, template=model)
    assert words in str(e.value), str(e.value)
