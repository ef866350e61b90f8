"""Bring your own model: trained weights for one of the sample architectures, read safely.

A user who trained one of our architectures (``qcore.models.ARCHS``: mlp, lenet300, cnn,
dwsep, resnet) on a dataset of their own shape hands us its weights file; we build that
architecture for the dataset's input shape and classes and load the weights strictly.

What is read, and how:

- **safetensors** (``.safetensors``): parsed by the ``safetensors`` library, which reads a
  JSON header and raw tensor bytes; nothing in the file is executed.
- **torch.save files** (``.pt``, ``.pth``, ``.bin``; the zip format of PyTorch 1.6 and
  later): read with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler, which
  rebuilds tensors and plain containers only. The zip's table is checked first (entries,
  declared sizes) so a crafted archive cannot ask for more memory than the cap. The old
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
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qcore.data import DatasetInfo, dataset_info
from qcore.models import ARCHS, build_model, count_params
from qcore.refs import UPLOAD_PREFIX, session_model_name, state_sha256

__all__ = [
    "MAX_UPLOAD_BYTES", "WEIGHT_SUFFIXES", "UploadedModel", "read_state_dict", "load_weights",
    "architectures",
]  # fmt: skip

MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # the server's upload cap (.streamlit/config.toml), again
MAX_ZIP_ENTRIES = 10_000  # a state dict of our architectures has well under 200 tensors
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
NESTED_KEYS = ("state_dict", "model_state_dict", "model")  # where checkpoints keep the weights
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
# what PyTorch's restricted unpickler says when it refuses an object (a class, a function),
# as opposed to a damaged pickle ("Unsupported operand", "String is too long", ...)
_REFUSED_OBJECT = ("GLOBAL", "Can only build", "Can only create new object", "allowlisted")
_LISTED = 5  # names listed in a refusal before "and N more"


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
    return 2 <= n <= min(len(data) - 8, _SAFETENSORS_MAX_HEADER) and data[8:9] == b"{"


def _check_zip(data: bytes) -> None:
    """Refuse an archive whose table asks for more than the cap (before torch reads it)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ValueError(f"The file is a damaged zip archive ({e}); save it again.") from e
    if len(infos) > MAX_ZIP_ENTRIES:
        raise ValueError(
            f"The archive has {len(infos):,} entries; a state dict of these architectures "
            f"has a few hundred at most."
        )
    total = sum(i.file_size for i in infos)
    if total > 2 * MAX_UPLOAD_BYTES:
        raise ValueError(
            f"The archive unpacks to {total / 2**20:,.0f} MiB, more than the "
            f"{2 * MAX_UPLOAD_BYTES // 2**20} MiB allowed for a weights file."
        )
    if any(i.filename.endswith("constants.pkl") or i.filename.endswith(".debug_pkl")
           or "/code/" in i.filename for i in infos):  # fmt: skip
        raise ValueError(
            "This is a TorchScript archive (torch.jit.save), which runs code when loaded; "
            "save the weights instead: torch.save(model.state_dict(), path)."
        )


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """The state dict inside what torch.load returned (a dict, or a checkpoint holding one)."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"The file holds a {type(obj).__name__}, not a state dict; save the weights with "
            "torch.save(model.state_dict(), path)."
        )
    for key in NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(
            isinstance(v, torch.Tensor) for v in inner.values()
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
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(
            f"{label} is {len(data):,} bytes; weights files are capped at "
            f"{MAX_UPLOAD_BYTES:,} bytes ({MAX_UPLOAD_BYTES / 2**20:g} MiB)."
        )
    if not data:
        raise ValueError(f"{label} is empty.")
    if _is_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            state: Mapping[str, Any] = load_safetensors(data)
        except Exception as e:  # the library's SafetensorsError and friends
            raise ValueError(f"{label} is not a readable safetensors file ({e}).") from e
    elif data[:4] == b"PK\x03\x04":
        _check_zip(data)
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
            raise ValueError(
                f"{label} could not be read as a torch.save file ({text[:200]})."
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
    out: dict[str, torch.Tensor] = {}
    strange = [str(k) for k, v in state.items()
               if not isinstance(k, str) or not isinstance(v, torch.Tensor)]  # fmt: skip
    if strange:
        raise ValueError(
            f"{label} holds entries that are not named tensors ({_some(strange)}); a state "
            "dict maps parameter names to tensors."
        )
    for key, t in state.items():
        out[key.removeprefix("module.")] = t
    if not out:
        raise ValueError(f"{label} holds no tensors.")
    return out


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
