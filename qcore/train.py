"""Reproducible training of the sample models (``python -m qcore train-samples``).

Training uses only a dataset's train split; accuracy is measured on its test split.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qcore.data import Dataset, load_dataset
from qcore.evaluate import evaluate
from qcore.models import (
    SAMPLE_DIR,
    ModelInfo,
    build_model,
    count_params,
    file_sha256,
    read_manifest,
    write_manifest,
)

__all__ = [
    "SAMPLE_SPECS",
    "SampleSpec",
    "TrainConfig",
    "random_shift",
    "train_model",
    "train_samples",
]

ProgressFn = Callable[[int, float, float], None]  # (epoch, mean loss, train accuracy)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimiser, schedule and augmentation."""

    epochs: int = 10
    lr: float = 1e-3  # peak learning rate of the one-cycle schedule
    batch_size: int = 64
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    shift: int = 0  # random shift of up to this many pixels (pad + random crop); 0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.shift < 0:
            raise ValueError("epochs and batch_size must be >= 1, lr > 0 and shift >= 0.")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {self.optimizer!r}.")

    def recipe(self) -> str:
        """One-line summary for the manifest."""
        aug = f", shift {self.shift}px" if self.shift else ""
        return (
            f"{self.epochs} epochs, {self.optimizer} one-cycle lr {self.lr:g}, batch "
            f"{self.batch_size}, wd {self.weight_decay:g}{aug}, seed {self.seed}, CPU"
        )


@dataclass(frozen=True)
class SampleSpec:
    """A sample model: architecture, dataset and recipe."""

    name: str
    arch: str
    dataset: str
    description: str
    config: TrainConfig


SAMPLE_SPECS: tuple[SampleSpec, ...] = (
    SampleSpec(
        "digits-mlp", "mlp", "digits",
        "64-64-10 MLP on 8x8 scikit-learn digits, as in the seed article.",
        TrainConfig(epochs=40, lr=3e-3, batch_size=32, weight_decay=1e-4),
    ),
    SampleSpec(
        "mnist-lenet300", "lenet300", "mnist-5k",
        "LeNet-300-100 fully connected net (784-300-100-10) on MNIST.",
        TrainConfig(epochs=30, lr=2e-3, weight_decay=5e-2, shift=1),
    ),
    SampleSpec(
        "mnist-cnn", "cnn", "mnist-5k",
        "Two-conv CNN (32 and 64 channels, max pooling) with a 100-unit head on MNIST.",
        TrainConfig(epochs=20, lr=2e-3, weight_decay=1e-4, shift=2),
    ),
    SampleSpec(
        "mnist-dwsep", "dwsep", "mnist-5k",
        "MobileNet-style depthwise-separable CNN with BatchNorm on MNIST.",
        TrainConfig(epochs=20, lr=5e-3, weight_decay=1e-4, shift=2),
    ),
    SampleSpec(
        "mnist-resnet", "resnet", "mnist-5k",
        "Small ResNet (three basic blocks, BatchNorm, 1x1 shortcuts) on MNIST.",
        TrainConfig(epochs=15, lr=5e-3, weight_decay=1e-4, shift=2),
    ),
)  # fmt: skip


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``shift`` pixels (replicate-pad, then a random crop)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, mode="replicate")  # (B, C, H+2s, W+2s)
    oy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    out = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def train_model(
    model: nn.Module,
    train: Dataset,
    config: TrainConfig = TrainConfig(),  # noqa: B008 (frozen dataclass)
    progress: ProgressFn | None = None,
) -> nn.Module:
    """Train a copy of ``model`` on ``train`` with cross-entropy; return it in eval mode.

    The input model is not modified. With the same seed, data and thread count the result
    is bitwise identical (deterministic algorithms are switched on while training).
    """
    if train.split in ("test", "calib"):
        raise ValueError(f"Train on a train split, not on the {train.split!r} split.")
    model = copy.deepcopy(model).float().train()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        if config.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(
                params, lr=config.lr, weight_decay=config.weight_decay
            )
        else:
            opt = torch.optim.SGD(
                params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True
            )
        n = len(train)
        steps = (n + config.batch_size - 1) // config.batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=config.epochs * steps, pct_start=0.2
        )
        for epoch in range(1, config.epochs + 1):
            order = torch.randperm(n, generator=gen)
            total_loss, correct = 0.0, 0
            for i in range(0, n, config.batch_size):
                idx = order[i : i + config.batch_size]
                x, y = train.inputs(idx), train.y[idx]
                if config.shift:
                    x = random_shift(x, config.shift, gen)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == y).sum())
            if progress is not None:
                progress(epoch, total_loss / n, correct / n)
    finally:
        torch.use_deterministic_algorithms(prev_det)
    return model.eval()


def train_samples(
    out_dir: Path = SAMPLE_DIR,
    names: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = print,
) -> list[ModelInfo]:
    """Train the sample models, save ``<name>.pt`` and update ``manifest.json`` in ``out_dir``.

    ``names`` picks a subset (default all); entries of other models already in the manifest
    are kept. Returns the new entries.
    """
    specs = {s.name: s for s in SAMPLE_SPECS}
    names = list(specs) if names is None else list(names)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"Unknown sample model(s) {unknown}; known ones are: {', '.join(specs)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    new: list[ModelInfo] = []
    for name in names:
        spec = specs[name]
        t0 = time.perf_counter()
        train = load_dataset(spec.dataset, "train")
        test = load_dataset(spec.dataset, "test")
        torch.manual_seed(spec.config.seed)  # the initial weights are part of the recipe
        model = build_model(spec.arch, train.input_shape, train.num_classes)

        def log(epoch: int, loss: float, acc: float, name: str = name) -> None:
            say(f"{name}: epoch {epoch} loss {loss:.4f} train acc {acc:.4f}")

        model = train_model(model, train, spec.config, log)
        acc = evaluate(model, test).accuracy
        path = out_dir / f"{name}.pt"
        torch.save(model.state_dict(), path)
        info = ModelInfo(
            name=name,
            arch=spec.arch,
            dataset=spec.dataset,
            params=count_params(model),
            float_accuracy=round(acc, 4),
            input_shape=train.input_shape,
            num_classes=train.num_classes,
            file=path.name,
            sha256=file_sha256(path),
            description=spec.description,
            train_recipe=spec.config.recipe(),
        )
        new.append(info)
        say(f"{name}: test accuracy {acc:.4f}, {info.params} params, "
            f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    merged = {i.name: i for i in read_manifest(out_dir)}
    merged.update({i.name: i for i in new})
    order = [s.name for s in SAMPLE_SPECS] + sorted(set(merged) - set(specs))
    write_manifest([merged[n] for n in order if n in merged], out_dir)
    return new
