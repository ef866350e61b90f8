"""References that name a model or a dataset, and other small types shared across qcore.

Caches and background tasks are keyed by these records, never by a loaded module: a ref
is small, hashable and JSON-safe, and a worker process can rebuild the model or the data
from it. Today a model ref names a sample model; an uploaded model will be named by the
SHA-256 of its file's content.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelRef", "DatasetRef", "Progress"]

Progress = Callable[[int, int, dict], None]  # progress(done, total, row)


@dataclass(frozen=True)
class ModelRef:
    """A model by name (a sample model: ``ModelRef("mnist-cnn")``)."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"A model reference needs a model name; got {self.name!r}.")

    def load(self) -> Any:
        """The float model, in eval mode (sample models come from ``qcore.load_model``)."""
        from qcore.models import load_model

        return load_model(self.name)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> ModelRef:
        if not isinstance(d, dict) or set(d) != {"name"}:
            raise ValueError(f"A model reference is {{'name': ...}}; got {d!r}.")
        return cls(d["name"])


@dataclass(frozen=True)
class DatasetRef:
    """A dataset split by name (``DatasetRef("mnist-5k", "test")``)."""

    name: str
    split: str = "test"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"A dataset reference needs a dataset name; got {self.name!r}.")
        if self.split not in ("train", "calib", "test"):
            raise ValueError(f"split must be train, calib or test; got {self.split!r}.")

    def load(self) -> Any:
        """The split as a qcore Dataset."""
        from qcore.data import load_dataset

        return load_dataset(self.name, self.split)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "split": self.split}

    @classmethod
    def from_dict(cls, d: dict) -> DatasetRef:
        if not isinstance(d, dict) or not set(d) <= {"name", "split"} or "name" not in d:
            raise ValueError(f"A dataset reference is {{'name': ..., 'split': ...}}; got {d!r}.")
        return cls(**d)
