"""Model architectures, the sample-model manifest, and loading checkpoints safely.

Every architecture is a plain ``nn.Module`` that ``torch.fx.symbolic_trace`` can trace, so
BatchNorm folding (``torch.fx.experimental.optimization.fuse``) works on all of them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.data import Dataset, DatasetInfo, dataset_info, list_datasets

__all__ = [
    "ARCHS",
    "SAMPLE_DIR",
    "ModelInfo",
    "build_model",
    "check_fit",
    "count_params",
    "file_sha256",
    "list_models",
    "load_model",
    "model_info",
]

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_models"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# Architectures. Shapes in comments are (B, C, H, W).


class MLP(nn.Module):
    """Flatten -> Linear(in, hidden) -> ReLU -> Linear(hidden, classes)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: int = 64):
        super().__init__()
        c, h, w = input_shape
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c * h * w, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


class LeNet300(nn.Module):
    """LeNet-300-100: Flatten -> 300 -> 100 -> classes, ReLU between."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c * h * w, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


class SmallCNN(nn.Module):
    """Two conv(3x3)-ReLU-maxpool stages, then Linear(64*(H/4)*(W/4), 100) -> classes."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * (h // 4) * (w // 4), 100)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))  # (B, 32, H/2, W/2)
        x = self.pool2(self.relu2(self.conv2(x)))  # (B, 64, H/4, W/4)
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class DWSepNet(nn.Module):
    """MobileNet-style net: 3x3 stem, then depthwise 3x3 + pointwise 1x1 blocks, avg pool."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c = input_shape[0]
        # (in, out, stride) of each depthwise-separable block
        plan = [(16, 32, 2), (32, 64, 2), (64, 128, 1)]
        self.stem = _conv_bn_relu(c, 16, 3)
        blocks = []
        for cin, cout, stride in plan:
            blocks.append(_conv_bn_relu(cin, cin, 3, stride=stride, groups=cin))  # depthwise
            blocks.append(_conv_bn_relu(cin, cout, 1))  # pointwise
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(plan[-1][1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))  # (B, 128, H/4, W/4)
        return self.fc(self.flatten(self.pool(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, plus a 1x1 conv+BN shortcut when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv+BN+ReLU, three basic blocks (16, 32/2, 64/2 channels), avg pool, Linear."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.stem = _conv_bn_relu(input_shape[0], 16, 3)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 64, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))  # (B, 64, H/4, W/4)
        return self.fc(self.flatten(self.pool(x)))


ARCHS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "lenet300": LeNet300,
    "cnn": SmallCNN,
    "dwsep": DWSepNet,
    "resnet": SmallResNet,
}


def build_model(arch: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A freshly initialised float32 model of architecture ``arch`` (in train mode)."""
    if arch not in ARCHS:
        raise ValueError(f"Unknown architecture {arch!r}; known ones are: {', '.join(ARCHS)}.")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1 or num_classes < 2:
        raise ValueError(
            f"Architecture {arch!r} needs an input shape (C, H, W) of positive sizes and at "
            f"least 2 classes; got {input_shape} and {num_classes}."
        )
    return ARCHS[arch](shape, int(num_classes))  # type: ignore[call-arg]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics not counted)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Manifest and loading.


@dataclass(frozen=True)
class ModelInfo:
    """A sample model as recorded in sample_models/manifest.json."""

    name: str
    arch: str
    dataset: str  # the dataset it was trained on
    params: int
    float_accuracy: float  # top-1 on the dataset's test split
    input_shape: tuple[int, int, int]
    num_classes: int
    file: str  # checkpoint file name inside sample_models/
    sha256: str
    description: str
    train_recipe: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest entry)."""
        d = dict(self.__dict__)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelInfo:
        """Parse a manifest entry."""
        d = dict(d)
        d["input_shape"] = tuple(int(s) for s in d["input_shape"])
        return cls(**d)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: Path | None = None) -> list[ModelInfo]:
    """Entries of ``<directory>/manifest.json`` (default sample_models/; empty if none)."""
    path = Path(SAMPLE_DIR if directory is None else directory) / MANIFEST
    if not path.is_file():
        return []
    stat = path.stat()
    return list(_parse_manifest(path, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _parse_manifest(path: Path, mtime_ns: int, size: int) -> tuple[ModelInfo, ...]:
    """The parsed manifest, read again only when the file changes (the UI asks often)."""
    del mtime_ns, size  # part of the cache key only
    try:
        entries = json.loads(path.read_text())["models"]
        return tuple(ModelInfo.from_json(e) for e in entries)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"The manifest {path} is corrupt ({e}).") from e


def write_manifest(infos: list[ModelInfo], directory: Path | None = None) -> Path:
    """Write ``<directory>/manifest.json`` (default sample_models/)."""
    path = Path(SAMPLE_DIR if directory is None else directory) / MANIFEST
    doc = {"models": [i.to_json() for i in infos]}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def list_models() -> list[str]:
    """Names of the sample models in the manifest."""
    return [i.name for i in read_manifest()]


def model_info(name: str) -> ModelInfo:
    """Manifest entry of a sample model."""
    infos = {i.name: i for i in read_manifest()}
    if name not in infos:
        known = ", ".join(infos) or "(none: run `python -m qcore train-samples`)"
        raise ValueError(f"Unknown model {name!r}; known models are: {known}.")
    return infos[name]


def load_model(name: str) -> nn.Module:
    """A new float32 model in eval mode with the sample checkpoint's weights.

    The file's SHA-256 is checked against the manifest, the state dict is read with
    ``torch.load(weights_only=True)`` and loaded strictly. The module gets a plain attribute
    ``qcore_spec`` (name, arch, input_shape, num_classes) so it can be rebuilt.
    """
    info = model_info(name)
    path = SAMPLE_DIR / info.file
    if not path.is_file():
        raise ValueError(f"The checkpoint {path} for model {name!r} is missing.")
    if file_sha256(path) != info.sha256:
        raise ValueError(
            f"The checkpoint {path} does not match its SHA-256 in the manifest; it is corrupt "
            f"or was changed. Re-run `python -m qcore train-samples --only {name}`."
        )
    model = build_model(info.arch, info.input_shape, info.num_classes)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # unpickling or key/shape mismatch
        raise ValueError(f"Could not load the checkpoint {path}: {e}") from e
    model = model.float().eval()
    model.qcore_spec = {  # type: ignore[assignment]
        "name": info.name,
        "arch": info.arch,
        "input_shape": list(info.input_shape),
        "num_classes": info.num_classes,
    }
    return model


def _shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def check_fit(model: ModelInfo | nn.Module, dataset: Dataset | DatasetInfo) -> None:
    """Raise ValueError unless ``dataset`` has the input shape and class count ``model`` expects.

    ``model`` is a ModelInfo or a module from :func:`load_model` (with ``qcore_spec``);
    ``dataset`` a loaded split or a :class:`DatasetInfo`, so a fit is checked before loading.
    """
    if isinstance(model, ModelInfo):
        name, shape, classes = model.name, tuple(model.input_shape), model.num_classes
    else:
        spec = getattr(model, "qcore_spec", None)
        if spec is None:
            raise ValueError("This model has no qcore_spec; load it with qcore.load_model.")
        name, shape, classes = spec["name"], tuple(spec["input_shape"]), spec["num_classes"]
    d_shape, d_classes = dataset.input_shape, dataset.num_classes
    if tuple(d_shape) == shape and d_classes == classes:
        return
    problems = []
    if tuple(d_shape) != shape:
        problems.append(f"{_shape_str(d_shape)} inputs")
    if d_classes != classes:
        problems.append(f"{d_classes} classes")
    fits = [
        n for n in list_datasets()
        if dataset_info(n).input_shape == shape and dataset_info(n).num_classes == classes
    ]  # fmt: skip
    hint = (
        f"pick a {_shape_str(shape[1:])} dataset such as {fits[0]}."
        if fits
        else "no known dataset fits it."
    )
    raise ValueError(
        f"Model {name!r} expects {_shape_str(shape)} inputs and {classes} classes, but dataset "
        f"{dataset.name!r} gives {' and '.join(problems)}; {hint}"
    )
