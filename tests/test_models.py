"""Tests for qcore.models and qcore.train: checkpoints, manifest, tracing, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.optimization import fuse

from qcore.data import load_dataset
from qcore.models import (
    ARCHS,
    SAMPLE_DIR,
    build_model,
    check_fit,
    count_params,
    file_sha256,
    list_models,
    load_model,
    model_info,
)
from qcore.train import SAMPLE_SPECS, TrainConfig, random_shift, train_model

THRESHOLDS = {
    "mnist-cnn": 0.97,
    "mnist-lenet300": 0.94,
    "digits-mlp": 0.95,
    "mnist-dwsep": 0.96,
    "mnist-resnet": 0.96,
}


def _top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), 1000):
            correct += int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum())
    return correct / len(y)


def test_manifest_lists_all_samples() -> None:
    assert list_models() == [s.name for s in SAMPLE_SPECS]
    doc = json.loads((SAMPLE_DIR / "manifest.json").read_text())
    keys = {"name", "arch", "dataset", "input_shape", "num_classes", "params", "float_accuracy",
            "file", "sha256", "description", "train_recipe"}  # fmt: skip
    assert all(set(e) == keys for e in doc["models"])


@pytest.mark.parametrize("name", list(THRESHOLDS))
def test_sample_checkpoint(name: str) -> None:
    info = model_info(name)
    path = SAMPLE_DIR / info.file
    assert path.is_file() and file_sha256(path) == info.sha256
    model = load_model(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert count_params(model) == info.params
    assert model.qcore_spec == {
        "name": name,
        "arch": info.arch,
        "input_shape": list(info.input_shape),
        "num_classes": info.num_classes,
    }
    test = load_dataset(info.dataset, "test")
    check_fit(info, test)
    acc = _top1(model, test.x, test.y)
    assert round(acc, 4) == info.float_accuracy
    assert acc >= THRESHOLDS[name]
    assert load_model(name) is not model  # a new module per call


def test_load_model_rejects_changed_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    info = model_info("digits-mlp")
    (tmp_path / "manifest.json").write_text((SAMPLE_DIR / "manifest.json").read_text())
    data = bytearray((SAMPLE_DIR / info.file).read_bytes())
    data[-30] ^= 0xFF
    (tmp_path / info.file).write_bytes(bytes(data))
    monkeypatch.setattr("qcore.models.SAMPLE_DIR", tmp_path)
    with pytest.raises(ValueError, match="digits-mlp.pt"):
        load_model("digits-mlp")


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="Unknown model 'nope'.*mnist-cnn"):
        model_info("nope")
    with pytest.raises(ValueError, match="Unknown model"):
        load_model("nope")
    with pytest.raises(ValueError, match="Unknown architecture 'vgg'.*resnet"):
        build_model("vgg", (1, 28, 28), 10)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_archs_trace_and_fuse(arch: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(arch, shape, 10)
    x = torch.randn(16, *shape)
    model.train()
    model(x)  # give BatchNorm non-trivial running statistics
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    fused = fuse(model)
    with torch.inference_mode():
        ref = model(x)
        assert ref.shape == (16, 10)
        torch.testing.assert_close(traced(x), ref)
        torch.testing.assert_close(fused(x), ref, atol=1e-5, rtol=0)
    if arch in ("dwsep", "resnet"):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())


@pytest.mark.parametrize("name", ["mnist-dwsep", "mnist-resnet"])
def test_fuse_sample_models(name: str) -> None:
    model = load_model(name)
    x = load_dataset("mnist-5k", "test").x[:200]
    with torch.inference_mode():
        torch.testing.assert_close(fuse(model)(x), model(x), atol=1e-5, rtol=0)


def test_check_fit() -> None:
    info = model_info("mnist-cnn")
    digits = load_dataset("digits", "calib")
    msg = (
        "Model 'mnist-cnn' expects 1x28x28 inputs and 10 classes, but dataset 'digits' gives "
        "1x8x8 inputs; pick a 28x28 dataset such as mnist-5k."
    )
    with pytest.raises(ValueError, match=msg):
        check_fit(info, digits)
    with pytest.raises(ValueError, match="expects 1x8x8"):
        check_fit(load_model("digits-mlp"), load_dataset("mnist-5k", "calib"))
    check_fit(load_model("mnist-cnn"), load_dataset("mnist-5k", "calib"))


def test_random_shift_moves_pixels_within_bounds() -> None:
    x = torch.zeros(8, 1, 10, 10)
    x[:, :, 5, 5] = 1.0
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out.sum((1, 2, 3)), torch.ones(8))
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 10, pos % 10
    assert ((rows - 5).abs() <= 2).all() and ((cols - 5).abs() <= 2).all()


def test_training_is_deterministic_and_pure() -> None:
    train = load_dataset("digits", "train")
    torch.manual_seed(123)
    model = build_model("resnet", train.input_shape, train.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=128, shift=1, seed=7)
    seen: list[tuple[int, float, float]] = []
    a = train_model(model, train, cfg, lambda e, loss, acc: seen.append((e, loss, acc)))
    b = train_model(model, train, cfg)
    assert len(seen) == 1 and seen[0][0] == 1 and seen[0][1] > 0
    assert not a.training
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k
    assert not torch.equal(a.state_dict()["fc.weight"], before["fc.weight"])


def test_train_model_refuses_test_split() -> None:
    test = load_dataset("digits", "test")
    with pytest.raises(ValueError, match="train split"):
        train_model(build_model("mlp", test.input_shape, 10), test, TrainConfig(epochs=1))
