"""Bring your own model: trained weights for one of the sample architectures, read safely.
(Your own images and labels, a ``.npz`` file, are read by :mod:`qcore.userdata`.)

A user who trained one of our architectures (``qcore.models.ARCHS``: mlp, lenet300, cnn,
dwsep, resnet) on a dataset of their own shape hands us its weights file; we build that
architecture for the dataset's input shape and classes and load the weights strictly.

What is read, and how:

- **safetensors** (``.safetensors``): parsed by the ``safetensors`` library, which reads a
  JSON header and raw tensor bytes; nothing in the file is executed.
- **torch.save files** (``.pt``, ``.pth``, ``.bin``; the zip format of PyTorch 1.6 and
  later): read with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler, which
  rebuilds tensors and plain containers only. The zip's table is checked first (entries,
  bounded by the table's own size too; declared sizes) so a crafted archive cannot ask for
  more memory than the cap, and its pickle is bounded (1 MiB, 100,000 instructions) and
  walked before torch reads it. The old
  pre-1.6 pickle format, whole pickled modules and TorchScript are refused.

A checkpoint that holds the state dict under ``state_dict``, ``model_state_dict`` or
``model`` (with an optimizer beside it, say) is accepted, and a ``module.`` prefix left by
``DataParallel`` is removed. Then the check is strict: every tensor the architecture has,
no other, each of its exact shape, floating point and finite. Every refusal is one
sentence a user can act on; nothing is half-loaded.

The model is named by its content: ``up-`` and the first 12 hex digits of the SHA-256 of
its state (:func:`qcore.refs.state_sha256`), so the same weights uploaded twice are one
model in every cache.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qcore.data import DatasetInfo, dataset_info
from qcore.models import ARCHS, build_model, count_params
from qcore.refs import UPLOAD_PREFIX, session_model_name, state_sha256

__all__ = [
    "MAX_UPLOAD_MB", "MAX_UPLOAD_BYTES", "WEIGHT_SUFFIXES", "UploadedModel", "read_state_dict",
    "load_weights", "architectures", "check_size", "check_zip_table",
]  # fmt: skip

# The one upload cap, in the browser's megabytes (10^6 bytes): the sidebar's uploaders pass
# MAX_UPLOAD_MB to the browser, .streamlit/config.toml's maxUploadSize says the same (tested),
# and qcore checks MAX_UPLOAD_BYTES again for the command line and any other caller.
MAX_UPLOAD_MB = 50
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1_000_000
MAX_UNPACKED_BYTES = 100 * 2**20  # a weights archive's entries together, unpacked
MAX_ZIP_ENTRIES = 10_000  # a state dict of our architectures has well under 200 tensors
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
NESTED_KEYS = ("state_dict", "model_state_dict", "model")  # where checkpoints keep the weights
_SAFETENSORS_MAX_HEADER = 1024 * 1024  # a state dict of ours has a header of a few kB
# bounds on the pickle inside a torch.save file, checked before torch unpickles it: a state
# dict of these architectures nests its objects a few levels deep and counts a few
# thousand objects once memo references are expanded. Deeper nesting or larger expansion
# (a tuple nested a million deep, or one doubled through memo references) would make
# Python hash it recursively: a crash or hours of one core.
MAX_PICKLE_DEPTH = 32
MAX_PICKLE_OBJECTS = 1_000_000
# ... and before walking it, its size and instruction count: a state dict's pickle is a few
# kB of a few thousand instructions (resnet's: 6,412 bytes, 1,997; with an Adam optimizer
# beside it 14 kB, 4,798), while 98 MB of no-op instructions took 81 s to walk.
MAX_PICKLE_BYTES = 1024 * 1024
MAX_PICKLE_OPS = 100_000
ZIP_ENTRY_BYTES = 128  # a central directory entry: 46 bytes and the name (torch's: ~64)
# what PyTorch's restricted unpickler says when it refuses an object (a class, a function),
# as opposed to a damaged pickle ("Unsupported operand", "String is too long", ...)
_REFUSED_OBJECT = ("GLOBAL", "Can only build", "Can only create new object", "allowlisted")
_LISTED = 5  # names listed in a refusal before "and N more"


def check_size(n: int, label: str = "The file", what: str = "weights files") -> None:
    """Refuse an upload of ``n`` bytes over :data:`MAX_UPLOAD_BYTES`, before it is read."""
    if n > MAX_UPLOAD_BYTES:
        raise ValueError(
            f"{label} is {n:,} bytes; {what} are capped at {MAX_UPLOAD_BYTES:,} "
            f"bytes ({MAX_UPLOAD_BYTES / 1e6:g} MB)."
        )


def architectures() -> dict[str, str]:
    """The architectures weights can be uploaded for, with a line saying what each is."""
    return {name: (cls.__doc__ or name).strip().splitlines()[0] for name, cls in ARCHS.items()}


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object."""
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _end_record(data: bytes) -> tuple[int, int] | None:
    """The entry count and the central directory's size in bytes that an archive's end
    record states (None when there is no end record), read before zipfile parses anything."""
    at = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))  # 22 bytes + a comment
    if at < 0 or at + 22 > len(data):
        return None
    # 0xFFFF entries or 0xFFFFFFFF bytes: a ZIP64 archive, whose real figures are larger
    return int.from_bytes(data[at + 10 : at + 12], "little"), int.from_bytes(
        data[at + 12 : at + 16], "little"
    )


def check_zip_table(data: bytes, limit: int, why: str) -> None:
    """Refuse an archive of more than ``limit`` entries from its end record alone, before
    zipfile parses its central directory (a million entries cost seconds and 500 MB there).
    The count stated can lie, so the directory's size bounds it too: an entry takes at
    least 46 bytes, and :data:`ZIP_ENTRY_BYTES` is room for a long name."""
    end = _end_record(data)
    if end is None:
        return
    n, size = end
    if n > limit:
        more = " or more" if n == 0xFFFF else ""  # the field's largest value: ZIP64 has more
        raise ValueError(f"The archive has {n:,}{more} entries; {why}.")
    if size > limit * ZIP_ENTRY_BYTES:
        raise ValueError(
            f"The archive's table of contents is {size:,} bytes, room for up to "
            f"{size // 46:,} entries; {why}."
        )


def _check_zip(data: bytes, label: str = "The file", where: str = "the file") -> bytes:
    """Refuse an archive whose table asks for more than the cap (before torch reads it);
    return its pickle (``<archive>/data.pkl``) for :func:`_check_pickle`."""
    damaged = (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError)
    check_zip_table(data, MAX_ZIP_ENTRIES, "a state dict of these architectures has a few "
                    "hundred at most")  # fmt: skip
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except damaged as e:
        raise ValueError(f"{label} is a damaged zip archive ({e}); save it again.") from e
    if len(infos) > MAX_ZIP_ENTRIES:
        raise ValueError(
            f"The archive has {len(infos):,} entries; a state dict of these architectures "
            f"has a few hundred at most."
        )
    total = sum(i.file_size for i in infos)
    if total > MAX_UNPACKED_BYTES:
        raise ValueError(
            f"The archive unpacks to {total / 2**20:,.0f} MiB, more than the "
            f"{MAX_UNPACKED_BYTES // 2**20} MiB allowed for a weights file."
        )
    if any(i.filename.endswith("constants.pkl") or i.filename.endswith(".debug_pkl")
           or "/code/" in i.filename for i in infos):  # fmt: skip
        raise ValueError(
            "This is a TorchScript archive (torch.jit.save), which runs code when loaded; "
            "save the weights instead: torch.save(model.state_dict(), path)."
        )
    pickles = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ValueError(
            f"The archive holds {len(pickles)} pickles (data.pkl), not one: it is not a "
            "file torch.save wrote."
        )
    try:  # at most MAX_PICKLE_BYTES + 1 bytes, whatever the table says
        with zipfile.ZipFile(io.BytesIO(data)) as z, z.open(pickles[0]) as f:
            pkl = f.read(MAX_PICKLE_BYTES + 1)
    except damaged as e:
        raise ValueError(f"{label} is a damaged zip archive ({e}); save it again.") from e
    if len(pkl) > MAX_PICKLE_BYTES:
        raise ValueError(
            f"The pickle in {where} unpacks to more "
            f"than {MAX_PICKLE_BYTES:,} bytes; a state dict's takes a few kB (its tensors "
            "are stored beside it), so this is a crafted file. Save the weights with "
            "torch.save(model.state_dict(), path)."
        )
    return pkl


# opcodes that add to the container below them on the stack instead of making a new object
_FILLS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def _check_pickle(pkl: bytes, where: str = "the file") -> None:
    """Walk the pickle's opcodes (iteratively, without building anything) and refuse one
    that nests objects deeper than :data:`MAX_PICKLE_DEPTH` or expands, memo references
    followed, to more than :data:`MAX_PICKLE_OBJECTS` objects."""
    stack: list[tuple[int, int] | None] = []  # (depth, expanded objects); None = a mark
    memo: dict[int, tuple[int, int]] = {}
    objects = 0
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(pkl)):
            if count >= MAX_PICKLE_OPS:
                raise _TooBig(False, long=True)
            name = op.name
            if name in _MEMO_PUT:
                if not stack or stack[-1] is None:
                    raise ValueError("memo of nothing")
                memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1]
                continue
            if name in _MEMO_GET:
                if arg not in memo:
                    raise ValueError("memo key missing")
                stack.append(memo[arg])
            elif name == "MARK":
                stack.append(None)
            elif name in ("POP", "POP_MARK", "DUP", "STOP", "PROTO", "FRAME"):
                if name == "POP" and stack:
                    stack.pop()
                elif name == "POP_MARK":
                    while stack and stack.pop() is not None:
                        pass
                elif name == "DUP" and stack:
                    stack.append(stack[-1])
            else:
                before = op.stack_before
                items: list[tuple[int, int]] = []  # popped, top first
                if pickletools.markobject in before:
                    while stack and stack[-1] is not None:
                        items.append(stack.pop())  # type: ignore[arg-type]
                    if not stack:
                        raise ValueError("no mark")
                    stack.pop()
                    below = before.index(pickletools.markobject)  # objects under the mark
                else:
                    below = len(before)
                for _ in range(below):
                    if not stack or stack[-1] is None:
                        raise ValueError("stack underflow")
                    items.append(stack.pop())  # type: ignore[arg-type]
                if name in _FILLS:  # the container is the deepest of the popped objects
                    if not items:
                        raise ValueError("nothing to fill")
                    container, added = items[-1], items[:-1]
                    depth = max([container[0]] + [d + 1 for d, _ in added])
                    size = container[1] + sum(n for _, n in added)
                    stack.append((depth, size))
                else:
                    depth = max((d for d, _ in items), default=-1) + 1
                    size = 1 + sum(n for _, n in items)
                    stack.extend([(depth, size)] * len(op.stack_after))
                    objects += 1
                if depth > MAX_PICKLE_DEPTH or size > MAX_PICKLE_OBJECTS:
                    raise _TooBig(depth > MAX_PICKLE_DEPTH)
            if len(stack) > MAX_PICKLE_OBJECTS or objects > MAX_PICKLE_OBJECTS:
                raise _TooBig(False)
    except _TooBig as e:
        if e.long:
            raise ValueError(
                f"The pickle in {where} has more than {MAX_PICKLE_OPS:,} instructions; a "
                "state dict's has a few thousand, so this is a crafted file. Save the weights "
                "with torch.save(model.state_dict(), path)."
            ) from None
        raise ValueError(
            f"The pickle in {where} "
            + ("nests objects deeper" if e.deep else "expands to more objects")
            + " than any state dict (a crafted file, which could stall or crash the server "
            "when read); save the weights with torch.save(model.state_dict(), path)."
        ) from None
    except ValueError as e:
        raise ValueError(
            f"The pickle in {where} is damaged ({e}); save the weights again."
        ) from None


class _TooBig(Exception):
    def __init__(self, deep: bool, long: bool = False) -> None:
        self.deep, self.long = deep, long


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """The state dict inside what torch.load returned (a dict, or a checkpoint holding one)."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"The file holds a {type(obj).__name__}, not a state dict; save the weights with "
            "torch.save(model.state_dict(), path)."
        )
    for key in NESTED_KEYS:
        inner = obj.get(key)
        if (
            isinstance(inner, Mapping)
            and inner
            and all(isinstance(v, torch.Tensor) for v in inner.values())
        ):
            return inner
    return obj


def read_state_dict(data: bytes, filename: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a weights file's bytes: safetensors or a ``torch.save`` zip, read
    without running anything in the file. Raises ValueError with a sentence otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"Weights must be given as bytes; got {type(data).__name__}.")
    data = bytes(data)
    label = f"{filename!r}" if filename else "The file"
    where = f"{filename!r}" if filename else "the file"  # inside a sentence
    check_size(len(data), label)
    if not data:
        raise ValueError(f"{label} is empty.")
    if _is_safetensors(data):
        from safetensors.torch import load as load_safetensors

        header = int.from_bytes(data[:8], "little")
        if header > _SAFETENSORS_MAX_HEADER:  # each tensor listed costs memory to parse
            raise ValueError(
                f"The safetensors header of {where} is {header:,} bytes; a state dict of these "
                f"architectures needs a few kB (at most {_SAFETENSORS_MAX_HEADER:,} read)."
            )
        try:
            state: Mapping[str, Any] = load_safetensors(data)
        except Exception as e:  # the library's SafetensorsError and friends
            raise ValueError(f"{label} is not a readable safetensors file ({e}).") from e
    elif data[:4] == b"PK\x03\x04":
        _check_pickle(_check_zip(data, label, where), where)
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # the restricted unpickler refusing, or a damaged archive
            text = " ".join(str(e).split())
            if any(m in text for m in _REFUSED_OBJECT):  # not a damaged file: an object
                raise ValueError(
                    f"{label} holds more than weights (a pickled object such as a whole "
                    "model), which is never loaded here since unpickling can run code; "
                    "save the weights with torch.save(model.state_dict(), path)."
                ) from e
            reason = text.split("WeightsUnpickler error:")[-1]  # past torch's advice
            reason = reason.split(" Check the documentation")[0].strip()
            if reason.startswith("Unsupported operand"):  # e.g. FRAME, from protocol 4
                raise ValueError(
                    f"{label} uses a pickle instruction PyTorch's safe loader does not read "
                    f"({reason}); save it with torch.save's default pickle protocol, or as "
                    "safetensors."
                ) from e
            raise ValueError(
                f"{label} could not be read as a torch.save file ({reason[:200]}); it is "
                "damaged or was not written by torch.save."
            ) from e
        state = _unwrap(obj)
    elif data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise ValueError(
            f"{label} is a plain pickle (PyTorch's format before 1.6, or pickle.dump), which "
            "is never loaded here; save it again with a current torch.save, or as safetensors."
        )
    else:
        raise ValueError(
            f"{label} is neither a safetensors file nor a torch.save file; upload the "
            f"weights as one of: {', '.join(WEIGHT_SUFFIXES)}."
        )
    strange = []  # at most a few, each shown short: a crafted key can be huge
    for k, v in state.items():
        if not isinstance(k, str) or type(v) not in (torch.Tensor, nn.Parameter):
            strange.append(_short(k))
            if len(strange) > _LISTED:
                break
    if strange:
        raise ValueError(
            f"{label} holds entries that are not named tensors ({', '.join(strange[:_LISTED])}"
            f"{', ...' if len(strange) > _LISTED else ''}); a state dict maps parameter names "
            "to tensors."
        )
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        # before anything reads a shape: meta, nested, sparse and quantized tensors have
        # none that can be trusted (or none at all)
        if (t.device.type != "cpu" or t.is_nested or t.layout != torch.strided
                or t.is_quantized or t.is_complex()):  # fmt: skip
            raise ValueError(
                f"Tensor {key[:60]} of {where} is not a plain dense "
                "real tensor in memory; save the weights of a model on the CPU."
            )
        name = key.removeprefix("module.")
        if name in out:
            raise ValueError(
                f"{label} holds {name[:60]} twice (with and without the 'module.' prefix)."
            )
        out[name] = t
    if not out:
        raise ValueError(f"{label} holds no tensors.")
    return out


def _short(key: Any) -> str:
    """A key as shown in a sentence: its repr, cut to 60 characters."""
    import reprlib

    if isinstance(key, str):
        return repr(key[:60])
    short = reprlib.Repr()  # bounded however deep or long the key is
    short.maxlevel, short.maxstring, short.maxother, short.maxtuple = 2, 60, 60, 4
    return short.repr(key)


class UploadedModel:
    """An uploaded model: the float module (eval mode), its name and where it came from."""

    __slots__ = ("module", "name", "sha256", "arch", "dataset", "filename", "params")

    def __init__(self, module: nn.Module, arch: str, dataset: str, filename: str) -> None:
        self.module = module
        self.sha256 = state_sha256(module)
        self.name = session_model_name(self.sha256, UPLOAD_PREFIX)
        self.arch, self.dataset, self.filename = arch, dataset, filename
        self.params = count_params(module)
        module.qcore_spec["name"] = self.name  # type: ignore[index]

    def __repr__(self) -> str:
        return f"UploadedModel({self.name!r}, arch={self.arch!r}, dataset={self.dataset!r})"


def load_weights(
    data: bytes, arch: str, dataset: str | DatasetInfo, *, filename: str = ""
) -> UploadedModel:
    """Build architecture ``arch`` for ``dataset``'s input shape and classes and load the
    weights file ``data`` into it strictly (see the module's docstring for what is read).

    Raises ValueError, with a sentence naming what does not fit, for an unknown
    architecture or dataset, an unreadable or hostile file, missing or extra tensors, a
    wrong shape (usually weights trained for another input size or class count), a
    non-floating or non-finite tensor.
    """
    if arch not in ARCHS:
        raise ValueError(f"Unknown architecture {arch!r}; known ones are: {', '.join(ARCHS)}.")
    info = dataset if isinstance(dataset, DatasetInfo) else dataset_info(dataset)
    state = read_state_dict(data, filename)
    label = f"{filename!r}" if filename else "The file"
    where = f"{filename!r}" if filename else "the file"  # inside a sentence
    model = build_model(arch, info.input_shape, info.num_classes)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"it lacks {len(missing)} of the {len(expected)} tensors "
                         f"({_some(missing)})")  # fmt: skip
        if extra:
            parts.append(f"it has {len(extra)} the architecture does not ({_some(extra)})")
        raise ValueError(
            f"{label} does not hold the weights of architecture {arch!r}: {'; '.join(parts)}. "
            f"Pick the architecture it was trained as."
        )
    wrong = [f"{k} is {_shape(state[k])}, not {_shape(v)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]  # fmt: skip
    if wrong:
        raise ValueError(
            f"The tensors of {where} do not fit {arch!r} on {info.name} "
            f"({_shape(info.input_shape)} inputs, {info.num_classes} classes): "
            f"{_some(wrong)}. Pick the dataset the weights were trained on (its input size "
            "and number of classes)."
        )
    clean: dict[str, torch.Tensor] = {}
    for k, v in expected.items():
        t = state[k]
        if t.is_sparse or t.is_quantized or t.is_complex() or t.layout != torch.strided:
            raise ValueError(f"Tensor {k} of {where} is not a plain dense real tensor.")
        if v.is_floating_point():
            if not t.is_floating_point():
                raise ValueError(
                    f"Tensor {k} of {where} holds {t.dtype}, not floating-point values."
                )
            t = t.detach().to(torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"Tensor {k} of {where} holds NaN or infinite values.")
        else:  # BatchNorm's num_batches_tracked: an integer count
            if t.is_floating_point() or t.dtype == torch.bool:
                raise ValueError(f"Tensor {k} of {where} holds {t.dtype}, not an integer count.")
            t = t.detach().to(v.dtype)
        clean[k] = t.clone()  # our own memory, whatever buffer the file's tensors shared
    model.load_state_dict(clean, strict=True)
    model = model.float().eval()
    model.qcore_spec = {  # type: ignore[assignment]
        "name": "",  # set by UploadedModel: the name is the content's hash
        "arch": arch,
        "input_shape": list(info.input_shape),
        "num_classes": info.num_classes,
    }
    return UploadedModel(model, arch, info.name, filename)


def _shape(shape: Any) -> str:
    dims = tuple(shape.shape) if isinstance(shape, torch.Tensor) else tuple(shape)
    return "x".join(str(d) for d in dims) if dims else "a scalar"
