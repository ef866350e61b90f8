"""References that name a model or a dataset, and other small types shared across qcore.

Caches and background tasks are keyed by these records, never by a loaded module: a ref
is small, hashable and JSON-safe, and a worker process can rebuild the model or the data
from it. A model ref names a sample model, or a model made in a session (fine-tuned) by the
SHA-256 of its state; an uploaded model will be named by its content the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ModelRef", "DatasetRef", "Progress", "state_sha256", "session_model_name",
    "SESSION_PREFIX", "UPLOAD_PREFIX", "SESSION_PREFIXES", "DATA_PREFIX",
]  # fmt: skip

Progress = Callable[[int, int, dict], None]  # progress(done, total, row)


@dataclass(frozen=True)
class ModelRef:
    """A model by name (a sample model: ``ModelRef("mnist-cnn")``), or by content: a model
    made in a session is ``ModelRef("ft-<first 12 hex>", sha256=<64 hex>)`` when fine-tuned
    there and ``ModelRef("up-<first 12 hex>", sha256=...)`` when uploaded, named by the
    SHA-256 of its state (:func:`state_sha256`), so identical weights share every cache
    entry. Such a model lives with whoever made it; :meth:`load` cannot rebuild it.
    """

    name: str
    sha256: str | None = None  # None: a sample model, loaded by name

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"A model reference needs a model name; got {self.name!r}.")
        if self.sha256 is not None and (
            not isinstance(self.sha256, str) or not _HEX64.fullmatch(self.sha256)
        ):
            raise ValueError(
                f"A model reference's sha256 is 64 lowercase hex digits; got {self.sha256!r}."
            )
        if self.sha256 is not None and self.name not in (
            session_model_name(self.sha256, p) for p in SESSION_PREFIXES
        ):
            raise ValueError(
                f"A model made in a session is named {session_model_name(self.sha256)!r} "
                f"(fine-tuned) or {session_model_name(self.sha256, UPLOAD_PREFIX)!r} "
                f"(uploaded) after its SHA-256; got {self.name!r}."
            )

    @property
    def is_session(self) -> bool:
        """Whether the model was made in a session (named by content, not a sample)."""
        return self.sha256 is not None

    def load(self) -> Any:
        """The float model, in eval mode (sample models come from ``qcore.load_model``)."""
        if self.sha256 is not None:
            raise ValueError(
                f"{self.name} was made in a session (fine-tuned or uploaded there); only "
                "that session holds it, so it cannot be loaded by name."
            )
        from qcore.models import load_model

        return load_model(self.name)

    def to_dict(self) -> dict[str, str]:
        if self.sha256 is None:
            return {"name": self.name}
        return {"name": self.name, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> ModelRef:
        if not isinstance(d, dict) or set(d) not in ({"name"}, {"name", "sha256"}):
            raise ValueError(
                f"A model reference is {{'name': ...}} or {{'name': ..., 'sha256': ...}}; "
                f"got {d!r}."
            )
        return cls(d["name"], d.get("sha256"))


SESSION_PREFIX = "ft-"  # a model fine-tuned in a session: this, then 12 hex digits
UPLOAD_PREFIX = "up-"  # a model whose weights were uploaded: this, then 12 hex digits
SESSION_PREFIXES = (SESSION_PREFIX, UPLOAD_PREFIX)
DATA_PREFIX = "ud-"  # an uploaded dataset: this, then 12 hex digits of the file's SHA-256
_HEX64 = re.compile(r"[0-9a-f]{64}")


def session_model_name(sha256: str, prefix: str = SESSION_PREFIX) -> str:
    """The name of a session model: ``ft-`` (fine-tuned) or ``up-`` (uploaded) and the
    first 12 hex digits of its SHA-256.

    >>> session_model_name("0123456789ab" + "0" * 52)
    'ft-0123456789ab'
    >>> session_model_name("0123456789ab" + "0" * 52, UPLOAD_PREFIX)
    'up-0123456789ab'
    """
    if prefix not in SESSION_PREFIXES:
        raise ValueError(f"A session model's prefix is one of {SESSION_PREFIXES}; got {prefix!r}.")
    return prefix + sha256[:12]


def state_sha256(model: Any) -> str:
    """Hex SHA-256 of a module's state: every tensor of ``state_dict()`` in key order, each
    as its name, dtype, shape and bytes (float32 on the CPU), so equal weights give equal
    hashes and any changed value a different one. The module is not changed."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class DatasetRef:
    """A dataset split by name (``DatasetRef("mnist-5k", "test")``), or an uploaded dataset
    by content: ``DatasetRef("ud-<first 12 hex>", "test", sha256=<64 hex>)``, the SHA-256
    of the uploaded file. Such a dataset lives with the session that uploaded it."""

    name: str
    split: str = "test"
    sha256: str | None = None  # None: a known dataset, loaded by name

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"A dataset reference needs a dataset name; got {self.name!r}.")
        if self.split not in ("train", "calib", "test"):
            raise ValueError(f"split must be train, calib or test; got {self.split!r}.")
        if self.sha256 is not None and (
            not isinstance(self.sha256, str) or not _HEX64.fullmatch(self.sha256)
        ):
            raise ValueError(
                f"A dataset reference's sha256 is 64 lowercase hex digits; got {self.sha256!r}."
            )
        if self.sha256 is not None and self.name != DATA_PREFIX + self.sha256[:12]:
            raise ValueError(
                f"An uploaded dataset is named {DATA_PREFIX + self.sha256[:12]!r} after its "
                f"SHA-256; got {self.name!r}."
            )

    @property
    def is_session(self) -> bool:
        """Whether the dataset was uploaded in a session (named by content)."""
        return self.sha256 is not None

    def load(self) -> Any:
        """The split as a qcore Dataset."""
        if self.sha256 is not None:
            raise ValueError(
                f"{self.name} was uploaded in a session; only that session holds it, so it "
                "cannot be loaded by name."
            )
        from qcore.data import load_dataset

        return load_dataset(self.name, self.split)

    def to_dict(self) -> dict[str, str]:
        d = {"name": self.name, "split": self.split}
        return d if self.sha256 is None else {**d, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> DatasetRef:
        if not isinstance(d, dict) or not set(d) <= {"name", "split", "sha256"} or "name" not in d:
            raise ValueError(
                f"A dataset reference is {{'name': ..., 'split': ..., 'sha256': ...}}; got {d!r}."
            )
        return cls(**d)
