"""qcore.upload: weights a user trained for one of our architectures, read without running
anything in the file, checked strictly and named by their content.

The rule: a file either loads to a module whose state is exactly the saved one (float32,
finite, every tensor of the architecture and no other), or is refused with a ValueError
whose sentence says what to do. No other exception, and nothing in the file is executed.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile

import pytest
import torch
from conftest import _randomise_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from torch import nn

import qcore
import qcore.upload as upload
from qcore.models import ARCHS, build_model
from qcore.refs import ModelRef, state_sha256
from qcore.upload import load_weights

needs_sample = pytest.mark.skipif(
    "mnist-cnn" not in qcore.list_models(), reason="sample models not trained yet"
)


# --- helpers ---------------------------------------------------------------------------------


def make_model(arch: str, dataset: str, seed: int = 0) -> nn.Module:
    """A freshly built model with seeded weights; BatchNorm's running statistics and counts
    are set to non-default values, so a round trip that dropped them would show."""
    info = qcore.dataset_info(dataset)
    torch.manual_seed(seed)
    model = build_model(arch, info.input_shape, info.num_classes)
    _randomise_bn(model, seed + 1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_batches_tracked.fill_(7)
    return model.eval()


def torch_bytes(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def mlp_state() -> dict[str, torch.Tensor]:
    return make_model("mlp", "digits").state_dict()


def refused(data: bytes, arch: str = "mlp", dataset: str = "digits", **kw) -> str:
    """The refusal's sentence for ``data`` (the test fails if the file is accepted)."""
    with pytest.raises(ValueError) as e:
        load_weights(data, arch, dataset, **kw)
    return str(e.value)


# every architecture builds for digits' 8x8 inputs; two also on MNIST's 28x28
ROUND_TRIPS = [(a, "digits") for a in ARCHS] + [(a, "mnist-5k") for a in ("mlp", "cnn")]


# --- 1. round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch,dataset", ROUND_TRIPS)
def test_round_trip_in_both_formats(arch: str, dataset: str) -> None:
    info = qcore.dataset_info(dataset)
    original = make_model(arch, dataset)
    sd = original.state_dict()
    x = torch.randn(6, *info.input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = original(x)
    names = set()
    for data in (torch_bytes(sd), st_save(sd)):
        u = load_weights(data, arch, dataset)
        assert not u.module.training
        got = u.module.state_dict()
        assert list(got) == list(sd)
        for k, v in sd.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        with torch.no_grad():
            assert torch.equal(u.module(x), want)
        assert u.sha256 == state_sha256(u.module) == state_sha256(original)
        assert u.name == "up-" + u.sha256[:12]
        assert (u.arch, u.dataset, u.params) == (arch, dataset, qcore.models.count_params(original))
        assert u.module.qcore_spec == {
            "name": u.name, "arch": arch, "input_shape": list(info.input_shape),
            "num_classes": info.num_classes,
        }  # fmt: skip
        ref = ModelRef(u.name, sha256=u.sha256)
        assert ref.is_session
        names.add(u.name)
    assert len(names) == 1  # torch.save and safetensors of the same weights: one model


def test_other_weights_are_another_model_and_the_filename_is_kept() -> None:
    a = load_weights(torch_bytes(mlp_state()), "mlp", "digits", filename="mine.pt")
    b = load_weights(torch_bytes(make_model("mlp", "digits", seed=5).state_dict()), "mlp",
                     "digits")  # fmt: skip
    assert a.name != b.name and a.filename == "mine.pt"
    assert load_weights(torch_bytes(mlp_state()), "mlp", qcore.dataset_info("digits")).name == (
        a.name
    )  # a DatasetInfo works as well as a name


# --- 2. accepted variants --------------------------------------------------------------------


def _optimizer_state(model: nn.Module) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("wrap", ["state_dict", "model_state_dict", "model", "module.",
                                  "module.+state_dict"])  # fmt: skip
def test_checkpoints_and_data_parallel_prefixes_are_accepted(wrap: str) -> None:
    model = make_model("mlp", "digits")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    inner = {"module." + k: v for k, v in sd.items()} if wrap.startswith("module.") else sd
    if wrap == "module.":
        obj = inner
    else:
        key = wrap.split("+")[-1]
        obj = {key: inner, "optimizer": _optimizer_state(model), "epoch": 3}
    u = load_weights(torch_bytes(obj), "mlp", "digits")
    got = u.module.state_dict()
    assert list(got) == list(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
    assert u.name == load_weights(torch_bytes(sd), "mlp", "digits").name


def test_data_parallel_prefix_in_safetensors() -> None:
    sd = mlp_state()
    u = load_weights(st_save({"module." + k: v for k, v in sd.items()}), "mlp", "digits")
    assert all(torch.equal(u.module.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_other_float_dtypes_become_float32(dtype: torch.dtype, fmt: str) -> None:
    model = make_model("resnet", "digits")
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    data = torch_bytes(sd) if fmt == "torch" else st_save(sd)
    got = load_weights(data, "resnet", "digits").module.state_dict()
    for k, v in sd.items():
        if v.is_floating_point():
            assert got[k].dtype == torch.float32 and torch.equal(got[k], v.to(torch.float32)), k
        else:  # BatchNorm's num_batches_tracked stays an integer count
            assert got[k].dtype == torch.int64 and torch.equal(got[k], v), k


@needs_sample
def test_the_sample_cnn_uploaded_scores_as_the_sample() -> None:
    sample = qcore.load_model("mnist-cnn")
    data = qcore.load_dataset("mnist-5k")
    u = load_weights(torch_bytes(sample.state_dict()), "cnn", "mnist-5k", filename="cnn.pt")
    assert u.sha256 == state_sha256(sample)
    assert qcore.evaluate(u.module, data).accuracy == qcore.evaluate(sample, data).accuracy
    with torch.no_grad():
        assert torch.equal(u.module(data.x[:64]), sample(data.x[:64]))


# --- 3. refusals: what cannot be read --------------------------------------------------------


def test_empty_and_text_and_non_bytes_are_refused() -> None:
    assert "is empty" in refused(b"")
    assert "'w.pt' is empty" in refused(b"", filename="w.pt")
    for text in (b"hello, these are my weights\n", b'{"fc1.weight": [1, 2, 3]}', b"\x00" * 64):
        msg = refused(text)
        assert "neither a safetensors file nor a torch.save file" in msg
        assert ".safetensors" in msg and ".pt" in msg
    with pytest.raises(ValueError, match="bytes"):
        load_weights("a path, not bytes", "mlp", "digits")  # type: ignore[arg-type]
    # bytearray and memoryview are bytes too
    data = torch_bytes(mlp_state())
    assert load_weights(bytearray(data), "mlp", "digits").name == (
        load_weights(memoryview(data), "mlp", "digits").name
    )


class _Touch:
    """A pickle that, when loaded, runs a shell command creating ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


class _Open:
    """A pickle that, when loaded, creates ``path`` by opening it for writing."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("hostile", [_Touch, _Open])
def test_pickles_are_refused_and_nothing_in_them_runs(tmp_path, hostile) -> None:
    marker = tmp_path / "ran"
    payload = hostile(str(marker))
    # the payload does work: calling what unpickling would call creates the marker (done
    # here directly, so the test itself never unpickles untrusted data)
    call, args = payload.__reduce__()
    result = call(*args)
    if hasattr(result, "close"):
        result.close()
    assert marker.exists()
    marker.unlink()
    for protocol in (2, 3, 4, 5):  # a plain pickle.dumps, any binary protocol
        msg = refused(pickle.dumps({"fc1.weight": payload}, protocol=protocol))
        assert "plain pickle" in msg and "never loaded" in msg
    msg = refused(pickle.dumps(payload, protocol=0))  # text protocol: not a format we read
    assert "neither a safetensors file nor a torch.save file" in msg
    # inside a torch.save zip: the restricted unpickler refuses the global
    msg = refused(torch_bytes({"fc1.weight": torch.zeros(1), "x": payload}))
    assert "more than weights" in msg and "torch.save(model.state_dict(), path)" in msg
    assert not marker.exists()


def test_a_whole_pickled_module_is_more_than_weights() -> None:
    msg = refused(torch_bytes(make_model("mlp", "digits")))
    assert "holds more than weights" in msg and "never loaded" in msg
    assert "torch.save(model.state_dict(), path)" in msg


def test_the_old_torch_save_format_is_refused() -> None:
    data = torch_bytes(mlp_state(), _use_new_zipfile_serialization=False)
    msg = refused(data)
    assert "plain pickle" in msg and "before 1.6" in msg and "safetensors" in msg


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_is_refused() -> None:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(make_model("mlp", "digits")), buf)
    msg = refused(buf.getvalue())
    assert "TorchScript" in msg and "torch.save(model.state_dict(), path)" in msg


def test_a_torch_save_of_something_else_is_refused() -> None:
    msg = refused(torch_bytes([torch.zeros(3)]))
    assert "holds a list, not a state dict" in msg
    assert "holds no tensors" in refused(torch_bytes({}))


def _zip(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, body in entries.items():
            z.writestr(name, body)
    return buf.getvalue()


def test_a_zip_that_unpacks_past_the_cap_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(upload, "MAX_UNPACKED_BYTES", 1000)
    data = _zip({"archive/data.pkl": b"\0" * 3000})  # 3,000 bytes, packed to far fewer
    assert len(data) < 1000
    msg = refused(data)
    assert "unpacks to" in msg and "allowed for a weights file" in msg


def test_a_zip_whose_table_lies_about_sizes_is_refused_before_reading() -> None:
    # the real cap: a tiny stored entry whose central directory claims 200 MiB
    data = bytearray(_zip({"archive/data.pkl": b"x" * 10}, zipfile.ZIP_STORED))
    at = data.index(b"PK\x01\x02")
    data[at + 24 : at + 28] = struct.pack("<I", 200 * 2**20)  # uncompressed size
    assert zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[0].file_size == 200 * 2**20
    msg = refused(bytes(data))
    assert msg == (
        "The archive unpacks to 200 MiB, more than the 100 MiB allowed for a weights file."
    )


def test_a_zip_with_too_many_entries_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(upload, "MAX_ZIP_ENTRIES", 5)
    msg = refused(_zip({f"archive/data/{i}": b"" for i in range(6)}))
    assert msg.startswith("The archive has 6 entries;") and "a few hundred at most" in msg
    # at the limit the table is fine (the archive is then refused for what it holds)
    assert "entries" not in refused(_zip({f"archive/data/{i}": b"" for i in range(5)}))


def test_a_damaged_zip_is_refused() -> None:
    data = torch_bytes(mlp_state())
    msg = refused(data[: len(data) // 2])
    assert "damaged zip archive" in msg and "save it again" in msg


def _with_pickle(pkl: bytes) -> bytes:
    """A torch.save file of mlp_state() whose data.pkl is ``pkl`` (the zip's CRCs valid)."""
    with zipfile.ZipFile(io.BytesIO(torch_bytes(mlp_state()))) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    return _zip({**entries, name: pkl}, zipfile.ZIP_STORED)


def _data_pkl() -> bytes:
    with zipfile.ZipFile(io.BytesIO(torch_bytes(mlp_state()))) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def test_a_damaged_pickle_inside_the_zip_is_not_called_more_than_weights() -> None:
    data = torch_bytes(mlp_state())
    pkl = _data_pkl()
    at = data.index(pkl) + len(pkl) - 1  # the pickle's final STOP opcode, stored as is
    bad = data[:at] + b"!" + data[at + 1 :]  # "!" is no pickle opcode; the CRC now fails
    msg = refused(bad)  # only tensors, but damaged: not "a pickled object such as a model"
    assert "more than weights" not in msg and "whole model" not in msg
    assert "damaged zip archive" in msg
    # the same damage with the zip's checksums made right: the pickle itself is refused
    msg = refused(_with_pickle(pkl[:-1] + b"!"))
    assert "more than weights" not in msg and "whole model" not in msg
    assert msg.startswith("The pickle in the file is damaged (") and msg.endswith(
        "save the weights again."
    )


@pytest.mark.parametrize("pkl, what", [
    # a key nested a million tuples deep: hashing it recursively would crash the process
    (b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"K\x01s.", "nests objects deeper"),
    # a key nested a thousand deep: str() of it raises RecursionError
    (b"\x80\x02}" + b")" + b"\x85" * 1_000 + b"K\x01s.", "nests objects deeper"),
    # T(i+1) = (T(i), T(i)) through memo references: 1 kB on disk, 2^40 objects expanded
    (b"\x80\x02})q\x000" + b"h\x00h\x00\x86q\x000" * 40 + b"h\x00K\x01s.",
     "expands to more objects"),
])  # fmt: skip
def test_crafted_pickles_are_refused_before_torch_reads_them(pkl: bytes, what: str) -> None:
    msg = refused(_with_pickle(pkl))
    assert msg.startswith(f"The pickle in the file {what} than any state dict"), msg
    assert len(msg) < 300


def _flooded(filler: bytes, n: int, method: int = zipfile.ZIP_STORED) -> bytes:
    """A valid torch.save file of mlp_state() whose pickle repeats ``filler`` (no-op pairs)
    ``n`` times after its first memo write: torch would load it, after a long walk."""
    pkl = _data_pkl()
    at = pkl.index(b"q\x00") + 2  # after "} BINPUT 0": the state dict is on the stack
    flood = pkl[:at] + filler * n + pkl[at:]
    with zipfile.ZipFile(io.BytesIO(torch_bytes(mlp_state()))) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    name = next(k for k in entries if k.endswith("data.pkl"))
    return _zip({**entries, name: flood}, method)


def test_a_pickle_flooded_with_no_ops_is_refused_by_its_size() -> None:
    # 10 million BINPUTs: 20 MB unpacked from a 20 kB upload (the audit's had 49 million,
    # walked for 81 s and then accepted); refused from the size alone, before any walk
    data = _flooded(b"q\x00", 10_000_000, zipfile.ZIP_DEFLATED)
    assert len(data) < 200_000
    assert refused(data) == (
        "The pickle in the file unpacks to more than 1,048,576 bytes; a state dict's takes a "
        "few kB (its tensors are stored beside it), so this is a crafted file. Save the "
        "weights with torch.save(model.state_dict(), path)."
    )


def test_a_pickle_of_too_many_instructions_is_refused() -> None:
    # BINGET 0, POP: 3 bytes for two instructions that change nothing; 150,000 pairs are
    # 450 kB, under the size bound, and 300,000 instructions, over the count bound
    data = _flooded(b"h\x000", 150_000)
    assert refused(data, filename="f.pt") == (
        "The pickle in 'f.pt' has more than 100,000 instructions; a state dict's has a few "
        "thousand, so this is a crafted file. Save the weights with "
        "torch.save(model.state_dict(), path)."
    )
    # (torch's loader refuses POP, but only after our walk had taken 27 s for the audit's);
    # a few thousand no-op BINPUTs are a state dict like any other
    plain = load_weights(torch_bytes(mlp_state()), "mlp", "digits")
    assert load_weights(_flooded(b"q\x00", 5_000), "mlp", "digits").name == plain.name


def test_every_sample_architectures_pickle_passes_the_scan() -> None:
    # the bounds leave room: the largest state dict here (resnet, with a checkpoint and an
    # optimizer state around it) is far below them
    for arch in ARCHS:
        model = make_model(arch, "mnist-5k")
        opt = torch.optim.Adam(model.parameters())
        model(torch.randn(2, 1, 28, 28)).sum().backward()
        opt.step()
        data = torch_bytes({"model": model.state_dict(), "optimizer": opt.state_dict()})
        assert load_weights(data, arch, "mnist-5k").params == sum(
            p.numel() for p in model.parameters()
        )


def test_a_file_over_the_cap_is_refused(monkeypatch) -> None:
    data = torch_bytes(mlp_state())
    monkeypatch.setattr(upload, "MAX_UPLOAD_BYTES", len(data) - 1)
    msg = refused(data, filename="big.pt")
    assert msg.startswith("'big.pt' is ") and "weights files are capped at" in msg
    monkeypatch.setattr(upload, "MAX_UPLOAD_BYTES", len(data))  # exactly at the cap: fine
    load_weights(data, "mlp", "digits")


def test_the_real_cap_message() -> None:
    # one byte over: the sentence says by how much. The cap is the browser's: 50 of its
    # megabytes (10^6 bytes) are 50,000,000 bytes (it was 50 MiB here, and the browser
    # refused files between the two)
    msg = refused(b"\0" * (50_000_000 + 1))
    assert msg == ("The file is 50,000,001 bytes; weights files are capped at 50,000,000 "
                   "bytes (50 MB).")  # fmt: skip


# --- 3. refusals: files that do not fit the architecture -------------------------------------


def test_missing_and_extra_tensors_are_named_and_counted() -> None:
    sd = mlp_state()
    less = {k: v for k, v in sd.items() if k != "fc2.bias"}
    msg = refused(torch_bytes(less))
    assert "does not hold the weights of architecture 'mlp'" in msg
    assert "it lacks 1 of the 4 tensors (fc2.bias)" in msg
    assert "Pick the architecture it was trained as." in msg
    more = dict(sd, **{"fc3.weight": torch.zeros(2, 2), "fc3.bias": torch.zeros(2)})
    msg = refused(st_save(more))
    # (safetensors does not keep the file's order of names, so either order)
    assert any(f"it has 2 the architecture does not ({n})" in msg
               for n in ("fc3.weight, fc3.bias", "fc3.bias, fc3.weight"))  # fmt: skip
    both = dict(less, **{"head.weight": torch.zeros(1)})
    msg = refused(torch_bytes(both))
    assert "lacks 1 of the 4 tensors (fc2.bias); it has 1 the architecture does not" in msg
    # weights of another architecture: every name listed is counted, five are shown
    msg = refused(torch_bytes(make_model("resnet", "digits").state_dict()), "mlp")
    assert "it lacks 4 of the 4 tensors" in msg and " more)" in msg


def test_wrong_shapes_name_the_tensor_and_both_shapes() -> None:
    mnist = torch_bytes(make_model("mlp", "mnist-5k").state_dict())
    msg = refused(mnist, "mlp", "digits")
    assert "tensors of the file do not fit 'mlp' on digits (1x8x8 inputs, 10 classes)" in msg
    assert "fc1.weight is 64x784, not 64x64" in msg
    assert "Pick the dataset the weights were trained on" in msg
    msg = refused(torch_bytes(make_model("cnn", "mnist-5k").state_dict()), "cnn", "cifar10")
    assert "on cifar10 (3x32x32 inputs, 10 classes)" in msg
    assert "conv1.weight is 32x1x3x3, not 32x3x3x3" in msg
    assert "fc1.weight is 100x3136, not 100x4096" in msg
    # a scalar where a vector belongs
    sd = dict(mlp_state(), **{"fc2.bias": torch.tensor(0.5)})
    assert "fc2.bias is a scalar, not 10" in refused(st_save(sd))


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_bad_values_are_refused() -> None:
    sd = mlp_state()
    msg = refused(torch_bytes(dict(sd, **{"fc1.weight": torch.ones(64, 64, dtype=torch.int64)})))
    assert msg == "Tensor fc1.weight of the file holds torch.int64, not floating-point values."
    msg = refused(st_save(dict(sd, **{"fc1.bias": torch.ones(64, dtype=torch.bool)})))
    assert "fc1.bias of the file holds torch.bool, not floating-point values" in msg
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = sd["fc2.weight"].clone()
        w[3, 7] = bad
        bad_sd = dict(sd, **{"fc2.weight": w})
        for data in (torch_bytes(bad_sd), st_save(bad_sd)):
            assert refused(data) == "Tensor fc2.weight of the file holds NaN or infinite values."
    # an inf that appears only when float64 is brought down to float32
    big = sd["fc2.bias"].to(torch.float64)
    big[0] = 1e300
    msg = refused(st_save(dict(sd, **{"fc2.bias": big})))
    assert "fc2.bias of the file holds NaN or infinite values" in msg
    # BatchNorm's count must stay an integer
    rsd = make_model("resnet", "digits").state_dict()
    key = next(k for k in rsd if k.endswith("num_batches_tracked"))
    msg = refused(torch_bytes(dict(rsd, **{key: torch.tensor(1.0)})), "resnet")
    assert f"{key} of the file holds torch.float32, not an integer count" in msg
    # complex and sparse tensors are not plain weights
    c = dict(sd, **{"fc2.bias": torch.zeros(10, dtype=torch.complex64)})
    assert "fc2.bias of the file is not a plain dense real tensor" in refused(torch_bytes(c))
    s = dict(sd, **{"fc2.weight": sd["fc2.weight"].to_sparse()})
    assert "fc2.weight of the file is not a plain dense real tensor" in refused(torch_bytes(s))


def test_non_tensor_entries_are_refused() -> None:
    sd = mlp_state()
    msg = refused(torch_bytes(dict(sd, note="trained on my laptop", epochs=3)))
    assert "holds entries that are not named tensors ('note', 'epochs')" in msg
    assert "maps parameter names to tensors" in msg
    assert "not named tensors (0)" in refused(torch_bytes({0: torch.zeros(2)}))
    # a checkpoint whose state dict holds a non-tensor is not unwrapped
    msg = refused(torch_bytes({"state_dict": dict(sd, step=1)}))
    assert "not named tensors ('state_dict')" in msg


def test_unknown_architecture_and_dataset() -> None:
    data = torch_bytes(mlp_state())
    msg = refused(data, "transformer")
    assert msg == f"Unknown architecture 'transformer'; known ones are: {', '.join(ARCHS)}."
    with pytest.raises(ValueError, match="no-such-data"):
        load_weights(data, "mlp", "no-such-data")
    assert set(upload.architectures()) == set(ARCHS)
    assert all(isinstance(v, str) and v for v in upload.architectures().values())


def test_damaged_safetensors_are_refused() -> None:
    sd = mlp_state()
    good = st_save(sd)
    n = int.from_bytes(good[:8], "little")
    header = good[8 : 8 + n].decode()
    body = good[8 + n :]
    # offsets past the end of the data: the header is rewritten with the same length
    end = str(len(body))
    past = str(len(body) + 4000)
    bad = header.replace(end + "]", past + "]", 1)
    assert bad != header
    bad = bad.ljust(n + len(past) - len(end))
    data = struct.pack("<Q", len(bad)) + bad.encode() + body
    msg = refused(data)
    assert "is not a readable safetensors file" in msg
    # cut short in the tensor data
    assert "is not a readable safetensors file" in refused(good[: len(good) - 100])
    # cut short in the header: no longer a safetensors file at all
    assert "neither a safetensors file" in refused(good[: 8 + n // 2])
    # a header that is not JSON
    junk = b"{" + b"x" * (n - 1)
    assert "is not a readable safetensors file" in refused(good[:8] + junk + body)


# --- 4. fuzz: damaged files load or are refused, nothing else --------------------------------

FUZZ_STATE = mlp_state()
FUZZ_FILES = {"torch": torch_bytes(FUZZ_STATE), "safetensors": st_save(FUZZ_STATE)}
EXPECTED = {k: tuple(v.shape) for k, v in FUZZ_STATE.items()}


@st.composite
def damaged(draw, fmt: str) -> bytes:
    data = bytearray(FUZZ_FILES[fmt])
    if draw(st.booleans()):
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    # flips anywhere, or in the first few hundred bytes (headers, the zip's first entries)
    near = draw(st.booleans())
    top = min(len(data), 400) if near else len(data)
    for at, bit in draw(st.lists(st.tuples(st.integers(0, top - 1), st.integers(0, 7)),
                                 min_size=1, max_size=6)):  # fmt: skip
        data[at] ^= 1 << bit
    return bytes(data)


def _check_fuzzed(data: bytes) -> None:
    try:
        u = load_weights(data, "mlp", "digits")
    except ValueError as e:
        msg = str(e)
        assert msg and msg[0].isupper() and msg.endswith(".") and "Traceback" not in msg
        assert len(msg) < 1000
        return
    got = u.module.state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == EXPECTED
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in got.values())
    assert u.sha256 == state_sha256(u.module) and u.name == "up-" + u.sha256[:12]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@settings(deadline=None, max_examples=60)
@given(data=damaged("torch"))
def test_fuzz_torch_save(data: bytes) -> None:
    _check_fuzzed(data)


@settings(deadline=None, max_examples=60)
@given(data=damaged("safetensors"))
def test_fuzz_safetensors(data: bytes) -> None:
    _check_fuzzed(data)


# --- 5. the shared thing is untouched --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_loading_leaves_the_source_alone_and_gives_fresh_modules(fmt: str) -> None:
    model = make_model("dwsep", "digits")
    sd = model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    data = torch_bytes(sd) if fmt == "torch" else st_save(sd)
    a = load_weights(data, "dwsep", "digits")
    b = load_weights(data, "dwsep", "digits")
    assert a.module is not b.module and a.name == b.name
    with torch.no_grad():  # changing one loaded model changes neither the other nor the source
        for p in a.module.parameters():
            p.add_(1.0)
    assert all(torch.equal(sd[k], v) for k, v in before.items())
    assert all(torch.equal(b.module.state_dict()[k], v) for k, v in before.items())
    assert state_sha256(model) == b.sha256 != state_sha256(a.module)
    # the loaded tensors own their memory: none is a view of another
    ptrs = [t.untyped_storage().data_ptr() for t in a.module.state_dict().values()]
    assert len(set(ptrs)) == len(ptrs)


# --- 6. the command line: --weights ----------------------------------------------------------


def test_cli_evaluates_and_exports_own_weights(tmp_path, capsys) -> None:
    from qcore.cli import main

    model = make_model("mlp", "digits", seed=3)  # weights no sample model has
    path = tmp_path / "mine.safetensors"
    path.write_bytes(st_save(model.state_dict()))
    test = qcore.load_dataset("digits", "test")
    float_acc = qcore.evaluate(model, test).accuracy
    args = ["--model", "digits-mlp", "--weights", str(path), "--bits", "4"]
    assert main(["evaluate", *args]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"float accuracy      {float_acc:.4f}"
    qpk = tmp_path / "mine.qpk"
    assert main(["export", *args, "--out", str(qpk)]) == 0
    capsys.readouterr()
    own = load_weights(path.read_bytes(), "mlp", "digits", filename=path.name)
    c = qcore.compress(own.module, qcore.Settings(bits=4).to_config())
    assert qpk.read_bytes() == qcore.packed_bytes(c)  # the API's file of them, byte for byte
    assert qcore.read_header(qpk)["spec"]["name"] == own.name
    x = test.x[:64]
    assert torch.equal(qcore.load_packed(qpk).model(x), c.model(x))


@pytest.mark.parametrize("extra, words", [
    (["--dataset", "mnist-5k"],
     ["do not fit 'mlp' on mnist-5k", "fc1.weight is 64x64, not 64x784"]),
    (["--model", "mnist-cnn"], ["does not hold the weights of architecture 'cnn'"]),
])  # fmt: skip
def test_cli_refuses_weights_that_do_not_fit(extra, words, tmp_path, capsys) -> None:
    from qcore.cli import main

    path = tmp_path / "mine.pt"
    torch.save(make_model("mlp", "digits").state_dict(), path)
    assert main(["evaluate", "--model", "digits-mlp", "--weights", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


def test_cli_missing_weights_file_is_one_sentence(tmp_path, capsys) -> None:
    from qcore.cli import main

    missing = tmp_path / "nope.pt"
    assert main(["evaluate", "--model", "digits-mlp", "--weights", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: Could not read {str(missing)!r}: No such file or directory.\n"


# --- 7. what a review found: kinds of tensor, duplicates, headers, long keys -----------------


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["meta", "nested"])
def test_tensors_without_trustworthy_shapes_are_refused(kind: str) -> None:
    sd = mlp_state()
    w = sd["fc1.weight"]
    sd["fc1.weight"] = (torch.empty(w.shape, device="meta") if kind == "meta"
                        else torch.nested.nested_tensor([w[0], w[1]]))  # fmt: skip
    msg = refused(torch_bytes(sd))
    assert msg == ("Tensor fc1.weight of the file is not a plain dense real tensor in memory; "
                   "save the weights of a model on the CPU.")  # fmt: skip


def test_a_name_twice_through_the_module_prefix_is_refused() -> None:
    sd = mlp_state()
    sd["module.fc1.weight"] = sd["fc1.weight"] + 1
    msg = refused(torch_bytes(sd))
    assert msg == "The file holds fc1.weight twice (with and without the 'module.' prefix)."


def test_a_huge_safetensors_header_is_refused_before_parsing() -> None:
    header = b'{"__metadata__":{"pad":"' + b"x" * (2 * 2**20) + b'"}}'
    data = len(header).to_bytes(8, "little") + header
    msg = refused(data)
    assert msg.startswith(f"The safetensors header of the file is {len(header):,} bytes")


def test_long_and_many_strange_keys_stay_a_short_sentence() -> None:
    state = {("k" * 10_000, i): torch.zeros(1) for i in range(50)}
    msg = refused(torch_bytes(state))
    assert "not named tensors" in msg and msg.count("...") >= 1 and len(msg) < 600


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_pickle_protocol_torch_cannot_read_safely_is_named() -> None:
    data = torch_bytes(mlp_state(), pickle_protocol=4)  # FRAME: not in torch's safe loader
    msg = refused(data)
    assert msg == ("The file uses a pickle instruction PyTorch's safe loader does not read "
                   "(Unsupported operand 149); save it with torch.save's default pickle "
                   "protocol, or as safetensors.")  # fmt: skip


def test_one_upload_cap_for_the_browser_the_server_and_qcore() -> None:
    import tomllib

    from qcore.upload import MAX_UPLOAD_BYTES, MAX_UPLOAD_MB

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, ".streamlit", "config.toml"), "rb") as f:
        config = tomllib.load(f)
    # the browser counts a megabyte as 10^6 bytes; Streamlit's server as 2^20, a looser cap
    assert config["server"]["maxUploadSize"] == MAX_UPLOAD_MB == 50
    assert MAX_UPLOAD_BYTES == MAX_UPLOAD_MB * 10**6 == 50_000_000
    sidebar = open(os.path.join(root, "pages", "sidebar.py")).read()
    assert sidebar.count("max_upload_size=MAX_UPLOAD_MB") == 2  # both uploaders say so
