"""Tests for qcore.sweep: the grid, the sweep table, the Pareto front and the CLI."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest
import torch
from torch import nn

from qcore.cli import main_sweep
from qcore.compress import compress
from qcore.config import CompressionConfig, PruneConfig, QuantConfig
from qcore.data import Dataset
from qcore.evaluate import evaluate
from qcore.sweep import SWEEP_COLUMNS, SweepGrid, pareto_front, sweep


def _setup() -> tuple[nn.Module, Dataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[::5] = torch.randint(0, 4, (8,), generator=g)
    data = Dataset(name="synthetic", split="test", x=x, y=y, classes=("a", "b", "c", "d"),
                   description="synthetic", mean=(0.0,), std=(1.0,), indices=torch.arange(40))
    return model, data


# ----------------------------------------------------------------------------- pareto_front


def test_pareto_hand_made() -> None:
    d = pd.DataFrame({
        "size_bytes": [100, 50, 50, 80, 200, 50, 120, 10],
        "accuracy": [0.90, 0.80, 0.70, 0.90, 0.95, 0.80, 0.90, float("nan")],
        "label": list("abcdefgh"),
    })  # fmt: skip
    front = pareto_front(d)
    # b (50, .8) beats c; f duplicates b (first kept); d (80, .9) beats a and g; h has no y
    assert front["label"].tolist() == ["b", "d", "e"]
    assert front.index.tolist() == [1, 3, 4]
    assert front["size_bytes"].is_monotonic_increasing
    assert front["accuracy"].is_monotonic_increasing


def test_pareto_other_columns_and_direction() -> None:
    d = pd.DataFrame({"x": [1, 2, 3], "loss": [0.5, 0.4, 0.6]})
    assert pareto_front(d, "x", "loss").index.tolist() == [0, 2]
    assert pareto_front(d, "x", "loss", maximize_y=False).index.tolist() == [0, 1]
    assert pareto_front(d.iloc[:0], "x", "loss").empty
    with pytest.raises(ValueError, match="No column 'size_bytes'"):
        pareto_front(d)


def test_pareto_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 25)
        d = pd.DataFrame({"size_bytes": [rng.randint(0, 6) for _ in range(n)],
                          "accuracy": [rng.randint(0, 6) / 6 for _ in range(n)]},
                         index=[rng.randint(0, 3) for _ in range(n)])  # repeated labels too
        pts = list(zip(d["size_bytes"], d["accuracy"], strict=True))

        def dominated(p, pts=pts):
            return any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in pts)

        expected = sorted({p for p in pts if not dominated(p)})
        got = list(zip(*(pareto_front(d)[c] for c in ("size_bytes", "accuracy")), strict=True))
        assert got == expected


# ----------------------------------------------------------------------------- SweepGrid


def test_grid_from_lists() -> None:
    g = SweepGrid(bits=[8, 2, None, 2], prune_rates=[0, 0.5], symmetric=[True, False],
                  per_channel=[False, True])
    assert g.bits == (8, 2, None) and g.prune_rates == (0, 0.5)
    # 2 bit widths x 2 rates x 2 schemes x 2 granularities, plus one float row per rate
    assert len(g) == 2 * 2 * 2 * 2 + 2
    assert g == SweepGrid(bits=(8, 2, None), prune_rates=(0, 0.5), symmetric=(True, False),
                          per_channel=(False, True))
    assert hash(g) == hash(SweepGrid(bits=(8, 2, None), prune_rates=(0, 0.5),
                                     symmetric=(True, False), per_channel=(False, True)))
    assert len(SweepGrid()) == 5


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(bits=[0]), "bits"),
        (dict(bits=[]), "at least one value for bits"),
        (dict(prune_rates=[1.0]), "pruning rate"),
        (dict(clips=[1.5]), "clip ratio"),
        (dict(clip_mode="median"), "clip_mode"),
        (dict(prune_scope="everything"), "prune_scope"),
    ],
)
def test_grid_rejects_bad_values(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        SweepGrid(**kwargs)


# ----------------------------------------------------------------------------- sweep


def test_sweep_rows_match_compress_and_evaluate() -> None:
    model, data = _setup()
    grid = SweepGrid(bits=[None, 2, 4], prune_rates=[0.0, 0.5], clips=[1.0, 0.8],
                     symmetric=[True, False])
    calls = []
    df = sweep(model, data, grid, progress=lambda d, t, r: calls.append((d, t, r["bits"])))
    assert list(df.columns) == list(SWEEP_COLUMNS)
    assert len(df) == len(grid) == 2 + 2 * 2 * 2 * 2
    assert [c[:2] for c in calls] == [(i, len(grid)) for i in range(1, len(grid) + 1)]
    ref = evaluate(model, data)
    for row, cfg in zip(df.to_dict("records"), grid.configs(), strict=True):
        c = compress(model, cfg)
        m = evaluate(c.model, data)
        assert row["accuracy"] == m.accuracy and row["loss"] == m.loss
        assert row["size_bytes"] == c.size_bytes and row["ratio"] == c.ratio
        assert row["agreement"] == float((m.predictions == ref.predictions).mean())
        assert row["sparsity"] == c.sparsity
    floats = df[df["bits"].isna()]
    assert floats["scheme"].tolist() == ["float", "float"]
    first = floats.iloc[0]
    assert first["agreement"] == 1.0 and first["ratio"] == 1.0 and math.isinf(first["mean_sqnr_db"])
    assert first["accuracy"] == df.attrs["float_accuracy"]
    assert set(df["scheme"]) == {"float", "symmetric", "asymmetric"}
    assert set(df["granularity"]) == {"none", "per-tensor"}
    # deterministic
    again = sweep(model, data, grid)
    pd.testing.assert_frame_equal(df.drop(columns="seconds"), again.drop(columns="seconds"))


def test_sweep_bits_column_and_pareto() -> None:
    model, data = _setup()
    df = sweep(model, data, SweepGrid(bits=[2, 3, 8], per_channel=[False, True]))
    assert str(df["bits"].dtype) == "Int64"
    assert df["granularity"].tolist() == ["per-tensor", "per-channel"] * 3
    front = pareto_front(df)
    assert not front.empty and set(front.index) <= set(df.index)


def test_sweep_rejects_a_bad_grid() -> None:
    model, data = _setup()
    with pytest.raises(ValueError, match="SweepGrid"):
        sweep(model, data, [2, 4])  # type: ignore[arg-type]


def test_sweep_does_not_change_the_model() -> None:
    model, data = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sweep(model, data, SweepGrid(bits=[2], prune_rates=[0.5]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_configs_are_plain_compression_configs() -> None:
    g = SweepGrid(bits=[4], prune_rates=[0.25], structured=True)
    (cfg,) = g.configs()
    assert cfg == CompressionConfig(quant=QuantConfig(bits=4),
                                    prune=PruneConfig(rate=0.25, structured=True))


# ----------------------------------------------------------------------------- CLI


def _need(name: str) -> None:
    import qcore

    try:
        qcore.load_model(name)
    except ValueError as exc:
        pytest.skip(f"sample model {name} not available: {exc}")


def test_cli_writes_the_csv(tmp_path, capsys) -> None:
    _need("digits-mlp")
    out = tmp_path / "sweep.csv"
    rc = main_sweep(["--model", "digits-mlp", "--bits", "2", "8", "float", "--prune", "0", "0.5",
                     "--asymmetric", "--per-channel", "--out", str(out)])
    assert rc == 0
    df = pd.read_csv(out)
    assert list(df.columns) == list(SWEEP_COLUMNS)
    assert len(df) == 6
    assert df["bits"].isna().sum() == 2
    assert set(df["scheme"]) == {"asymmetric", "float"}
    err = capsys.readouterr().err
    assert "sweep [" in err and "6/6" in err and "Wrote 6 rows" in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "no-such-model"], "Unknown model"),
        (["--model", "digits-mlp", "--bits", "17"], "bits"),
        (["--model", "digits-mlp", "--prune", "1.2"], "pruning rate"),
        (["--model", "digits-mlp", "--dataset", "mnist-5k"], "expects"),
        (["--model", "digits-mlp", "--clip-mode", "median"], "invalid choice"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, argv: list[str], words: str) -> None:
    if "digits-mlp" in argv:
        _need("digits-mlp")
    out = tmp_path / "x.csv"
    assert main_sweep([*argv, "--out", str(out)]) == 2
    assert not out.exists()
    assert words in capsys.readouterr().err


def test_cli_missing_output_folder(tmp_path, capsys) -> None:
    _need("digits-mlp")
    rc = main_sweep(["--model", "digits-mlp", "--out", str(tmp_path / "no" / "x.csv")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_grid_round_trips_and_builds_configs_through_the_flat_mapping() -> None:
    import json

    from qcore.config import Settings

    grid = SweepGrid(bits=[None, 2, 4], prune_rates=[0.0, 0.5], clips=[1.0, 0.8],
                     symmetric=[True, False], structured=True, prune_scope="global")
    back = SweepGrid.from_dict(json.loads(json.dumps(grid.to_dict())))
    assert back == grid and back.configs() == grid.configs()
    assert grid.configs()[0] == Settings(bits=None, prune=0.0, structured=True,
                                         scope="global").to_config()
    assert len(grid) == 2 + 2 * 2 * 2 * 2  # float rows do not vary with clip or scheme
    with pytest.raises(ValueError, match="keys"):
        SweepGrid.from_dict({"bits": [2], "evil": 1})


def test_sweep_over_activation_widths_calibrates_on_the_calib_split() -> None:
    import qcore

    model = qcore.load_model("digits-mlp")
    test, calib = qcore.load_dataset("digits", "test"), qcore.load_dataset("digits", "calib")
    grid = SweepGrid(bits=[8], act_bits=[None, 3, 8], act_observer="percentile")
    df = sweep(model, test, grid, calib=calib)
    assert df["act_bits"].tolist()[1:] == [3, 8] and df["act_bits"].isna().tolist()[0]
    assert df["act_observer"].tolist()[1:] == ["percentile", "percentile"]
    float_acts, a3, a8 = df["accuracy"].tolist()
    assert a3 < a8 and abs(a8 - float_acts) <= 0.01
    with pytest.raises(ValueError, match="calibration data"):
        sweep(model, test, grid)
