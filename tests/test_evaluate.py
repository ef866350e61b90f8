"""Tests for qcore.evaluate: hand-computed accuracy and loss, confusion, agreement, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FakeDataset
from torch import nn
from torch.nn import functional as F

from qcore.compress import compress
from qcore.config import CompressionConfig, QuantConfig
from qcore.evaluate import agreement, evaluate


class Fixed(nn.Module):
    """Returns the logits stored for each example index (x holds the index)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.reshape(-1).long()]


def hand_case() -> tuple[Fixed, FakeDataset]:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    x = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1, 1)
    y = torch.tensor([0, 2, 2, 1])
    return Fixed(logits).eval(), FakeDataset(x, y, ("a", "b", "c"))


def test_hand_computed_accuracy_loss_confusion() -> None:
    model, ds = hand_case()
    m = evaluate(model, ds, batch_size=3)  # batches of 3 and 1
    assert m.n == 4
    assert m.accuracy == 0.5  # examples 0 and 2 right
    # cross-entropy: -log softmax(logits)[y] per example
    e2, e3, e1 = math.exp(2), math.exp(3), math.e
    losses = [-math.log(e2 / (e2 + 2)), -math.log(1 / (e1 + 2)), -math.log(e3 / (e3 + 2)),
              -math.log(1 / (e1 + 2))]
    assert m.loss == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert m.predictions.tolist() == [0, 1, 2, 0]
    assert m.confusion.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert m.confusion.sum() == m.n
    assert np.trace(m.confusion) / m.n == m.accuracy
    assert m.per_class_accuracy.tolist() == [1.0, 0.0, 0.5]


def test_accuracy_is_exact_fraction() -> None:
    logits = torch.tensor([[1.0, 0.0]] * 3)
    ds = FakeDataset(torch.arange(3.0).reshape(3, 1, 1, 1), torch.tensor([0, 0, 1]), ("a", "b"))
    assert evaluate(Fixed(logits).eval(), ds).accuracy == 2 / 3


def test_confusion_and_agreement_on_model(bn_model: nn.Module, fake_dataset) -> None:
    m = evaluate(bn_model, fake_dataset, batch_size=5)
    assert m.confusion.shape == (3, 3) and m.confusion.sum() == fake_dataset.y.numel()
    assert np.trace(m.confusion) / m.n == m.accuracy
    assert m.confusion.sum(axis=1).tolist() == np.bincount(fake_dataset.y.numpy(),
                                                           minlength=3).tolist()
    assert agreement(m, m) == 1.0
    assert agreement(m, evaluate(bn_model, fake_dataset)) == 1.0
    with torch.no_grad():
        assert m.predictions.tolist() == bn_model(fake_dataset.x).argmax(1).tolist()
    # a 3-bit model predicts some examples differently: agreement and accuracy against a
    # direct forward pass and counts made here
    c = compress(bn_model, CompressionConfig(quant=QuantConfig(bits=3)))
    mc = evaluate(c.model, fake_dataset, batch_size=5)
    with torch.no_grad():
        logits = c.model(fake_dataset.x)
    pred, truth, float_pred = logits.argmax(1).tolist(), fake_dataset.y.tolist(), m.predictions
    assert mc.predictions.tolist() == pred
    assert mc.accuracy == sum(p == t for p, t in zip(pred, truth, strict=True)) / len(truth)
    assert m.accuracy == sum(p == t for p, t in zip(float_pred, truth, strict=True)) / len(truth)
    same = sum(p == q for p, q in zip(pred, float_pred, strict=True))
    assert 0 < same < len(truth)  # not a trivial case
    assert agreement(m, mc) == agreement(mc, m) == same / len(truth)
    assert mc.loss == pytest.approx(float(F.cross_entropy(logits, fake_dataset.y)), rel=1e-6)


def test_agreement_counts() -> None:
    model, ds = hand_case()
    a = evaluate(model, ds)
    other = Fixed(torch.tensor([[2.0, 0, 0], [0, 0, 1], [0, 0, 3], [0, 1, 0]])).eval()
    assert agreement(a, evaluate(other, ds)) == 0.5
    short = FakeDataset(ds.x[:2], ds.y[:2], ds.classes)
    with pytest.raises(ValueError, match="different numbers"):
        agreement(a, evaluate(model, short))


def test_wrong_number_of_classes_raises(bn_model: nn.Module, fake_dataset) -> None:
    ds = FakeDataset(fake_dataset.x, fake_dataset.y, tuple("abcdefghij"))
    with pytest.raises(ValueError, match="10 classes"):
        evaluate(bn_model, ds)


def test_wrong_input_shape_raises(bn_model: nn.Module) -> None:
    ds = FakeDataset(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), ("a", "b", "c"))
    with pytest.raises(ValueError, match="cannot run on dataset 'fake'"):
        evaluate(bn_model, ds)


def test_training_mode_raises(fake_dataset) -> None:
    from conftest import make_bn_model

    with pytest.raises(ValueError, match="training mode"):
        evaluate(make_bn_model().train(), fake_dataset)


def test_evaluate_does_not_change_model(bn_model: nn.Module, fake_dataset) -> None:
    from conftest import state_hash

    before = state_hash(bn_model)
    evaluate(bn_model, fake_dataset)
    assert state_hash(bn_model) == before and not bn_model.training
