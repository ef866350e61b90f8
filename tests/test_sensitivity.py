"""Tests for qcore.sensitivity: the cached way gives exactly the naive numbers."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from qcore.cli import main_sensitivity
from qcore.compress import compress
from qcore.config import CompressionConfig, PruneConfig, QuantConfig
from qcore.data import Dataset
from qcore.sensitivity import SENSITIVITY_COLUMNS, layer_sensitivity, sensitivity_matrix


def make_dataset(model: nn.Module, n: int = 48, shape=(1, 6, 6), classes: int = 3,
                 seed: int = 0) -> Dataset:
    """Random inputs labelled mostly by the float model, so quantization shows up."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    with torch.inference_mode():
        y = model(x).argmax(dim=1)
    flip = torch.rand(n, generator=g) < 0.2
    y = torch.where(flip, torch.randint(0, classes, (n,), generator=g), y).clone()
    return Dataset(name="synthetic", split="test", x=x, y=y,
                   classes=tuple(str(i) for i in range(classes)), description="synthetic",
                   mean=(0.0,), std=(1.0,), indices=torch.arange(n))


class ConvBN(nn.Module):
    """conv-BN-ReLU twice, pool, linear: folded to a GraphModule before analysis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.flatten(1))


class Branchy(nn.Module):
    """A skip connection, a layer used on two branches' inputs, and call_method nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4 * 36, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x).relu()
        h = torch.relu(self.a(s)) + self.b(s) + s  # (B, 4, 6, 6)
        z = self.head(h.reshape(h.shape[0], -1))
        return self.out(torch.tanh(z)) + 0.1 * z[:, :3]


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(36, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x.flatten(1))
        if h.sum() > 0:
            h = h.relu()
        return self.fc2(h)


def _model(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = cls()
    for mod in m.modules():  # non-trivial BN statistics so that folding matters
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return m.eval()


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


MODELS = {"mlp": _mlp, "convbn": lambda: _model(ConvBN), "branchy": lambda: _model(Branchy)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_equals_naive(name: str) -> None:
    model = MODELS[name]()
    data = make_dataset(model)
    kw = dict(bits=(1, 2, 3, 4, 8), prune_rates=(0.3, 0.8))
    fast = layer_sensitivity(model, data, **kw)
    slow = layer_sensitivity(model, data, naive=True, **kw)
    assert fast.attrs["method"] == "cached" and slow.attrs["method"] == "naive"
    pd.testing.assert_frame_equal(fast, slow, check_exact=True)
    assert list(fast.columns) == list(SENSITIVITY_COLUMNS)
    assert fast["layer"].nunique() * 7 == len(fast)


def test_cached_equals_naive_other_schemes_and_small_batches() -> None:
    model = _model(Branchy, seed=3)
    data = make_dataset(model, n=37)
    kw = dict(bits=(2, 5), prune_rates=(0.5,), batch_size=8,
              quant=QuantConfig(symmetric=False, per_channel=True, clip=3.0, clip_mode="sigma"),
              prune=PruneConfig(structured=True))
    naive = layer_sensitivity(model, data, naive=True, **kw)
    for cap in (1, 10**9):  # one batch per chunk (5 chunks), or all in one
        fast = layer_sensitivity(model, data, max_cache_bytes=cap, **kw)
        pd.testing.assert_frame_equal(fast, naive, check_exact=True)


def test_untraceable_model_is_refused_naming_the_operation() -> None:
    """Everything runs on the traced graph, so a model fx cannot trace gets a sentence
    that names the line it stopped at, from sensitivity and compress alike."""
    model = _model(Untraceable)
    data = make_dataset(model)
    with pytest.raises(ValueError, match=r"cannot be traced.*`if h\.sum\(\) > 0:`"):
        layer_sensitivity(model, data, bits=(2,), prune_rates=())
    with pytest.raises(ValueError, match=r"cannot be traced.*`if h\.sum\(\) > 0:`"):
        compress(model, CompressionConfig(quant=QuantConfig(bits=2)))


def test_rows_progress_and_no_mutation() -> None:
    model = _model(ConvBN)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = make_dataset(model)
    calls = []
    df = layer_sensitivity(model, data, bits=(2, 8), prune_rates=(0.5,), layers=["fc", "conv1"],
                           progress=lambda d, t, r: calls.append((d, t, r["layer"])))
    assert [c[:2] for c in calls] == [(i, 6) for i in range(1, 7)]
    assert df["layer"].tolist() == ["conv1"] * 3 + ["fc"] * 3  # model order
    assert df["kind"].tolist() == ["quant", "quant", "prune"] * 2
    assert (df["drop"] == df.attrs["float_accuracy"] - df["accuracy"]).all()
    pruned = df[df["kind"] == "prune"]
    assert (pruned["sparsity"] >= 0.5).all()
    q8 = df[(df["kind"] == "quant") & (df["setting"] == 8)]
    assert (q8["sqnr_db"] > 30).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    m = sensitivity_matrix(df)
    assert m.index.tolist() == ["conv1", "fc"] and m.columns.tolist() == [2, 8]
    assert sensitivity_matrix(df, "prune", "sqnr_db").shape == (2, 1)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(bits=(0,)), "bits"),
        (dict(prune_rates=(1.0,)), "pruning rate"),
        (dict(layers=["nope"]), "Unknown layer"),
        (dict(bits=(), prune_rates=()), "at least one"),
        (dict(quant=QuantConfig(rounding="stochastic")), "deterministic"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments(kwargs: dict, words: str) -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=words):
        layer_sensitivity(model, make_dataset(model), **kwargs)


def _sample(name: str, n: int):
    import qcore

    try:
        model = qcore.load_model(name)
        full = qcore.load_dataset(qcore.model_info(name).dataset, "test")
    except ValueError as exc:
        pytest.skip(f"sample model {name} not available: {exc}")
    data = Dataset(name=full.name, split="test", x=full.x[:n].clone(), y=full.y[:n].clone(),
                   classes=full.classes, description=full.description, mean=full.mean,
                   std=full.std, indices=full.indices[:n].clone())
    return model, data


@pytest.mark.parametrize(
    "name, n, bits, rates", [("mnist-cnn", 128, (2, 4), (0.7,)), ("mnist-resnet", 48, (3,), ())]
)
def test_cached_equals_naive_on_sample_models(name: str, n: int, bits, rates) -> None:
    model, data = _sample(name, n)
    kw = dict(bits=bits, prune_rates=rates)
    fast = layer_sensitivity(model, data, **kw)
    slow = layer_sensitivity(model, data, naive=True, **kw)
    assert fast.attrs["method"] == "cached"
    pd.testing.assert_frame_equal(fast, slow, check_exact=True)
    assert math.isclose(fast.attrs["float_accuracy"], slow.attrs["float_accuracy"])


def test_cli_writes_the_csv(tmp_path, capsys) -> None:
    _sample("digits-mlp", 1)
    out = tmp_path / "sens.csv"
    rc = main_sensitivity(["--model", "digits-mlp", "--bits", "2", "8", "--prune", "0.5",
                           "--out", str(out)])
    assert rc == 0
    df = pd.read_csv(out)
    assert list(df.columns) == list(SENSITIVITY_COLUMNS)
    assert len(df) == df["layer"].nunique() * 3
    assert "sensitivity [" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "no-such-model"],
        ["--model", "digits-mlp", "--bits", "0"],
        ["--model", "digits-mlp", "--dataset", "cifar10"],
        ["--model", "digits-mlp", "--bits", "two"],
    ],
)
def test_cli_bad_input(tmp_path, capsys, argv: list[str]) -> None:
    if argv[1] == "digits-mlp":
        _sample("digits-mlp", 1)
    rc = main_sensitivity([*argv, "--out", str(tmp_path / "x.csv")])
    assert rc == 2
    assert not (tmp_path / "x.csv").exists()
    assert "error" in capsys.readouterr().err


def test_activation_rows_quantize_one_edge_at_a_time() -> None:
    import qcore
    from qcore.config import ActQuantConfig

    model = qcore.load_model("mnist-cnn")
    test, calib = qcore.load_dataset("mnist-5k", "test"), qcore.load_dataset("mnist-5k", "calib")
    seen = []
    df = layer_sensitivity(model, test, bits=(), prune_rates=(), act_bits=(2, 8),
                           act=ActQuantConfig(observer="percentile"), calib=calib,
                           progress=lambda d, t, r: seen.append((d, t)))  # fmt: skip
    edges = ["input", "relu1", "relu2", "relu3"]  # where an int8 engine stores tensors
    assert df["layer"].tolist() == edges * 2 and set(df["kind"]) == {"act"}
    assert seen == [(i, 8) for i in range(1, 9)]
    m = sensitivity_matrix(df, "act")
    assert list(m.columns) == [2, 8] and list(m.index) == edges
    assert (m[8] >= m[2]).all()  # 4 levels cost more than 256 on every edge
    # the 8-bit row of one edge is that edge alone quantized, everything else float
    from qcore.activations import calibrate
    from qcore.graph import graph_of

    graph = graph_of(model)
    r = calibrate(graph, calib, ActQuantConfig(bits=8, observer="percentile"), edges)
    with torch.inference_mode():
        logits = torch.cat([graph.run(test.x[i : i + 256], None,
                                      {"relu2": r["relu2"].fake_quantize})
                            for i in range(0, len(test.x), 256)])  # fmt: skip
    acc = int((logits.argmax(1) == test.y).sum()) / len(test.y)
    assert df[(df.layer == "relu2") & (df.setting == 8)]["accuracy"].item() == acc
    with pytest.raises(ValueError, match="calibration data"):
        layer_sensitivity(model, test, bits=(), prune_rates=(), act_bits=(8,))
