"""qcore.userdata: a user's own images and labels in a NumPy .npz file, read safely, split
and normalised like the embedded sets.

The rule: a file either becomes a dataset whose splits hold exactly its images and labels,
or is refused with a ValueError whose sentence says what to do.
"""

from __future__ import annotations

import io
import re
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_upload import _zip, mlp_state, refused, torch_bytes

import qcore
import qcore.userdata as userdata
from qcore.models import build_model


def npz_bytes(**arrays) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_digits_as_npz_are_the_embedded_digits_exactly() -> None:
    import hashlib

    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    data = npz_bytes(x=(d.images / 16.0).astype(np.float32), y=d.target)
    up = userdata.load_npz(data, filename="d.npz")
    assert up.name == "ud-" + hashlib.sha256(data).hexdigest()[:12] and up.sha256.startswith(
        up.name[3:]
    )
    assert qcore.DatasetRef(up.name, "calib", sha256=up.sha256).is_session
    assert up.info.input_shape == (1, 8, 8) and up.info.num_classes == 10
    assert up.info.source == "uploaded"
    for split in ("train", "calib", "test"):
        ours, embedded = up.splits[split], qcore.load_dataset("digits", split)
        assert torch.equal(ours.indices, embedded.indices)
        assert torch.equal(ours.y, embedded.y)
        assert torch.allclose(ours.x, embedded.x, atol=1e-5)
        assert dict(up.info.splits)[split] == len(embedded)


def test_channels_last_uint8_with_class_names() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 6, 5, 3), dtype=np.uint8)
    y = np.arange(60) % 3
    up = userdata.load_npz(npz_bytes(x=x, y=y, classes=np.array(["cat", "dog", "eel"])))
    assert up.info.input_shape == (3, 6, 5)
    train = up.splits["train"]
    assert train.classes == ("cat", "dog", "eel")
    pixels = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    raw = pixels[train.indices]
    mean = raw.mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(train.mean), mean, atol=1e-6)
    std = raw.std(dim=(0, 2, 3))
    expected = (raw - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    assert train.x.dtype == torch.uint8  # kept as pixels: normalised per batch
    assert torch.allclose(train.inputs(), expected, atol=1e-5)
    # every image is in exactly one split
    seen = torch.cat([up.splits[s].indices for s in ("train", "calib", "test")])
    assert sorted(seen.tolist()) == list(range(60))


@pytest.mark.parametrize("arrays, words", [
    (dict(x=np.zeros((30, 8, 8))), "it needs x (the images) and y (the labels)"),
    (dict(x=np.zeros((30, 2, 8, 8, 1)), y=np.zeros(30, int)), "give (N, H, W), (N, C, H, W)"),
    (dict(x=np.zeros((30, 8, 8)), y=np.zeros(29, int)), "give 30 whole numbers"),
    (dict(x=np.zeros((30, 8, 8)), y=np.full(30, 0.5)), "give 30 whole numbers"),
    (dict(x=np.zeros((30, 8, 8)), y=np.zeros(30, int)), "with K from 2 to 1000"),
    (dict(x=np.zeros((30, 8, 8)), y=np.arange(30) % 2 - 1), "run from -1 to 0"),
    (dict(x=np.full((30, 8, 8), 2.0), y=np.arange(30) % 2), "values in [0, 1]"),
    (dict(x=np.full((30, 8, 8), np.nan), y=np.arange(30) % 2), "values in [0, 1]"),
    (dict(x=np.zeros((10, 8, 8)), y=np.arange(10) % 2), "give 20 to 200,000 images"),
    (dict(x=np.zeros((30, 8, 8), np.int32), y=np.arange(30) % 2), "give uint8 pixels or floats"),
    (dict(x=np.zeros((30, 8, 8)), y=np.arange(30) % 2, classes=np.array(["a"])),
     "give 2 names, one per label"),
    (dict(x=np.zeros((30, 8, 8)), y=np.arange(30) % 15), "too few images of each class"),
    (dict(x=np.array([object()] * 30, dtype=object), y=np.zeros(30, int)), "object arrays"),
])  # fmt: skip
def test_bad_data_files_are_refused_with_a_sentence(arrays, words) -> None:
    with pytest.raises(ValueError) as e:
        userdata.load_npz(npz_bytes(**arrays))
    assert words in str(e.value), str(e.value)


def test_files_that_are_no_npz_are_refused() -> None:
    for data, words in [(b"", "not a NumPy .npz file"), (b"PK\x03\x04junk", "damaged"),
                        (torch_bytes(mlp_state()), "it needs x (the images)")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(words)):
            userdata.load_npz(data)


@settings(deadline=None, max_examples=40)
@given(st.data())
def test_fuzzed_npz_files_load_or_raise_value_error(data) -> None:
    import numpy as np

    good = npz_bytes(x=np.linspace(0, 1, 30 * 16, dtype=np.float32).reshape(30, 4, 4),
                     y=np.arange(30) % 3)  # fmt: skip
    b = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= 1 << data.draw(st.integers(0, 7))
    cut = data.draw(st.integers(1, len(b)))
    try:
        up = userdata.load_npz(bytes(b[:cut]))
    except ValueError as e:
        assert 0 < len(str(e)) < 600
        return
    for split in up.splits.values():
        assert split.x.dtype == torch.float32 and bool(torch.isfinite(split.x).all())


def _npz_with(member: str, body: bytes) -> bytes:
    """A valid small .npz whose ``member`` is replaced by ``body``."""
    good = npz_bytes(x=np.zeros((30, 4, 4), np.float32), y=np.arange(30) % 3)
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    return _zip({**entries, member: body}, zipfile.ZIP_STORED)


def test_crafted_npz_members_are_refused_with_a_sentence() -> None:
    # a member that is no .npy at all (numpy would hand back raw bytes)
    with pytest.raises(ValueError, match="could not be read as a .npz file"):
        userdata.load_npz(_npz_with("x.npy", b"hello"))
    # a header declaring a terabyte over no data: refused before numpy allocates it
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 37,)}
    )
    with pytest.raises(ValueError, match="declares 1,099,511,627,776 bytes but holds"):
        userdata.load_npz(_npz_with("x.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:]))
    # an encrypted member (the flag bit set): zipfile raises RuntimeError
    data = bytearray(_npz_with("x.npy", b"\x00" * 10))
    at = data.index(b"PK\x03\x04")
    data[at + 6] |= 1
    with pytest.raises(ValueError):
        userdata.load_npz(bytes(data))


def test_class_names_are_decoded_and_plain() -> None:
    x, y = np.zeros((30, 4, 4), np.float32), np.arange(30) % 2
    up = userdata.load_npz(npz_bytes(x=x, y=y, classes=np.array([b"cat", b"**dog**"])))
    assert up.splits["test"].classes == ("cat", "__dog__")


def test_an_archive_of_many_entries_is_refused_from_its_end_record() -> None:
    # the count is read from the end record before zipfile parses every entry (which took
    # seconds for 400,000 of them)
    data = _zip({f"e{i}": b"" for i in range(70_000)}, zipfile.ZIP_STORED)
    assert refused(data) == ("The archive has 65,535 or more entries; a state dict of these "
                             "architectures has a few hundred at most.")  # fmt: skip
    with pytest.raises(ValueError, match="The archive has 65,535 or more entries; a dataset"):
        userdata.load_npz(data)


def test_cli_data_file_is_read_like_the_known_dataset(tmp_path, capsys) -> None:
    from sklearn.datasets import load_digits

    from qcore.cli import main

    d = load_digits()
    path = tmp_path / "digits.npz"
    np.savez(path, x=(d.images / 16.0).astype(np.float32), y=d.target)
    assert main(["evaluate", "--model", "digits-mlp", "--data", str(path), "--bits", "4"]) == 0
    own = capsys.readouterr().out
    assert main(["evaluate", "--model", "digits-mlp", "--dataset", "digits", "--bits", "4"]) == 0
    assert own == capsys.readouterr().out  # the same splits, the same numbers


def test_cli_own_weights_on_own_data(tmp_path, capsys) -> None:
    from qcore.cli import main

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (60, 6, 6)).astype(np.float32)
    data = tmp_path / "toy.npz"
    np.savez(data, x=x, y=np.arange(60) % 3)
    up = userdata.load_npz(data.read_bytes(), filename=data.name)
    model = build_model("mlp", up.info.input_shape, up.info.num_classes)
    weights = tmp_path / "toy.pt"
    torch.save(model.state_dict(), weights)
    argv = ["evaluate", "--model", "digits-mlp", "--weights", str(weights), "--data", str(data)]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"float accuracy      {qcore.evaluate(model, up.splits['test']).accuracy:.4f}"
    assert main([*argv, "--dataset", "digits"]) == 2
    assert capsys.readouterr().err == "error: Give --dataset or --data, not both.\n"
    assert main(["evaluate", "--model", "digits-mlp", "--data", str(data)]) == 2
    assert "expects 1x8x8 inputs and 10 classes" in capsys.readouterr().err


def _understated(n: int) -> bytes:
    """An archive of ``n`` empty entries whose end record says it holds 3."""
    data = bytearray(_zip({f"e{i}": b"" for i in range(n)}, zipfile.ZIP_STORED))
    at = data.rindex(b"PK\x05\x06")
    data[at + 8 : at + 12] = (3).to_bytes(2, "little") * 2  # entries here, entries in all
    return bytes(data)


def test_an_end_record_that_understates_its_entries_is_refused_by_the_table_size(
    monkeypatch,
) -> None:
    # zipfile parses the whole directory whatever count the end record gives (a million
    # entries in 50 MB took 8.4 s and 500 MB); its size in bytes bounds the count instead,
    # before zipfile sees the file
    small, large = _understated(100), _understated(25_000)
    assert len(zipfile.ZipFile(io.BytesIO(small)).infolist()) == 100

    def never(*args, **kwargs):
        raise AssertionError("zipfile parsed the archive")

    monkeypatch.setattr(zipfile, "ZipFile", never)
    with pytest.raises(ValueError) as e:
        userdata.load_npz(small)
    assert str(e.value) == ("The archive's table of contents is 4,890 bytes, room for up to "
                            "106 entries; a dataset file holds x, y and perhaps classes.")
    msg = refused(large)
    assert msg.startswith("The archive's table of contents is 1,288,890 bytes, room for up "
                          "to 28,019 entries; a state dict of these architectures")


def test_uploaded_pixels_stay_uint8_and_are_normalised_per_batch() -> None:
    # the memory figure: one byte per value held, not float32's four (a 166 kB upload of 60
    # million values held 240 MB)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(400, 1, 28, 28), dtype=np.uint8)
    up = userdata.load_npz(npz_bytes(x=x, y=np.arange(400) % 4))
    pixels = sum(s.x.element_size() * s.x.nelement() for s in up.splits.values())
    assert pixels == x.size  # 313,600 bytes, not 1,254,400
    assert up.nbytes == x.size + 2 * 8 * 400  # plus int64 labels and indices
    test = up.splits["test"]
    whole = test.inputs()
    assert whole.dtype == torch.float32 and whole.shape == (80, 1, 28, 28)
    m, s = test.mean[0], test.std[0]
    assert torch.equal(whole, (torch.from_numpy(x[test.indices.numpy()]).float() / 255.0 - m) / s)
    assert torch.equal(test.inputs(slice(10, 20)), whole[10:20])  # a batch is the same rows
    # the mean and std are the train split's, as float32 would compute them
    raw = torch.from_numpy(x[up.splits["train"].indices.numpy()]).double() / 255.0
    assert m == pytest.approx(float(raw.mean()), abs=1e-12)
    assert s == pytest.approx(float(raw.std()), abs=1e-12)
    # and a model evaluates on them exactly as on the float images
    model = build_model("mlp", (1, 28, 28), 4).eval()
    as_float = qcore.Dataset(name="f", split="test", x=whole, y=test.y, classes=test.classes,
                             description="", mean=test.mean, std=test.std, indices=test.indices)
    a, b = qcore.evaluate(model, test), qcore.evaluate(model, as_float)
    assert a.accuracy == b.accuracy and a.loss == b.loss


def test_labels_with_empty_classes_are_refused() -> None:
    # labels 0 and 9 only: not a "10 classes" dataset with 8 of them empty
    x = np.zeros((40, 4, 4), np.uint8)
    with pytest.raises(ValueError) as e:
        userdata.load_npz(npz_bytes(x=x, y=np.where(np.arange(40) % 2, 9, 0)), filename="d.npz")
    assert str(e.value) == ("'d.npz''s labels run from 0 to 9 but 8 of those 10 classes have no "
                            "images (1, 2, 3, 4, 5, 6, 7, 8); number the classes that occur "
                            "0..K-1 without gaps.")
