"""Deep Compression: the recipe, the pipeline's stages, centroid fine-tuning, the export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcore
from qcore import deep
from qcore.config import CompressionConfig, PruneConfig, QuantConfig
from qcore.export import PREFIX_BYTES
from qcore.finetune import FinetuneConfig, finetune, shared_weight
from qcore.graph import graph_of, param_key
from qcore.kmeans import kmeans_codebook
from qcore.prune import prune_count

needs_sample = pytest.mark.skipif(
    "digits-mlp" not in qcore.list_models(), reason="sample models not trained yet"
)


@pytest.fixture(scope="module")
def digits():
    return {s: qcore.load_dataset("digits", s) for s in ("train", "calib", "test")}


@pytest.fixture(scope="module")
def mlp():
    return qcore.load_model("digits-mlp")


@pytest.fixture(scope="module")
def result(mlp, digits):
    """The default pipeline on digits-mlp, one epoch per retraining (a few seconds)."""
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    res = qcore.deep_compression(mlp, digits["train"], digits["calib"], epochs=1,
                                 test=digits["test"])  # fmt: skip
    for k, v in mlp.state_dict().items():  # the model handed in is never changed
        assert torch.equal(v, before[k]), k
    return res


# --- the recipe -------------------------------------------------------------------------------


@needs_sample
def test_default_recipe_is_the_papers_for_lenet300_and_lenet5() -> None:
    lenet = qcore.load_model("mnist-lenet300")
    # Table 2: 8 %, 9 % and 26 % of the weights kept, 6-bit codebooks
    assert deep.default_prune_rates(lenet) == {"fc1": 0.92, "fc2": 0.91, "fc3": 0.74}
    assert deep.default_bits(lenet) == {"fc1": 6, "fc2": 6, "fc3": 6}
    cnn = qcore.load_model("mnist-cnn")
    # Table 3 (LeNet-5): 66 %, 12 %, 8 %, 19 % kept; 8 bits for convolutions, 5 for fc
    assert deep.default_prune_rates(cnn) == {"conv1": 0.34, "conv2": 0.88, "fc1": 0.92,
                                             "fc2": 0.81}  # fmt: skip
    assert deep.default_bits(cnn) == {"conv1": 8, "conv2": 8, "fc1": 5, "fc2": 5}


@needs_sample
def test_default_rule_for_other_models(mlp) -> None:
    # digits-mlp: fc1 64x64 (4,096 weights), fc2 10x64 (640): small layers keep more
    assert deep.default_prune_rates(mlp) == {"fc1": 0.5, "fc2": 0.3}
    assert deep.default_bits(mlp) == {"fc1": 6, "fc2": 6}


def test_paper_numbers_agree_with_themselves() -> None:
    # Table 1's sizes give its ratios (1070 KB / 27 KB = 39.6, printed 40x; 1720 / 44 = 39.1)
    for name, table in deep.PAPER.items():
        sizes, ratios = table["size_kb"], table["ratio"]
        assert round(sizes.iloc[0] / sizes.iloc[-1]) == ratios.iloc[-1], name
        assert list(table["stage"]) == list(deep.STAGES)
        assert table["error"].iloc[-1] < table["error"].iloc[0]  # the paper's error fell


# --- the pipeline -----------------------------------------------------------------------------


@needs_sample
def test_stages_in_order_and_sizes_never_increase(result) -> None:
    s = result.stages
    assert list(s["stage"]) == list(deep.STAGES)
    sizes = list(s["size_bytes"])
    assert all(b <= a for a, b in zip(sizes, sizes[1:], strict=False)), sizes
    assert sizes[0] == 4 * 4810  # float32: 4 bytes per parameter of digits-mlp
    for _, row in s.iterrows():
        assert row["ratio"] == pytest.approx(sizes[0] / row["size_bytes"])
        assert 0.0 <= row["accuracy"] <= 1.0
    assert s["applied"].all()
    assert sizes[-1] < sizes[2] < sizes[1] < sizes[0]  # here every stage saves bytes
    assert result.split == "test" and result.n == 359  # digits' test split
    assert result.compressed.size_bytes == sizes[-1]
    # Huffman coding is lossless: the same accuracy as the shared stage
    assert s["accuracy"].iloc[3] == s["accuracy"].iloc[2]


@needs_sample
def test_each_layer_keeps_exactly_its_share_and_shares_its_values(result, mlp) -> None:
    w = {r.name: r.dequantized for r in result.compressed.layers}
    for name, rate in result.prune_rates.items():
        n = w[name].numel()
        # exactly floor(rate * n) weights pruned, at exactly zero
        assert int((w[name] == 0).sum()) == prune_count(rate, n), name
        distinct = torch.unique(w[name][w[name] != 0])
        assert 0 < distinct.numel() <= 2 ** result.bits[name], name
    kept = result.layers.set_index(["stage", "layer"])["kept"]
    assert kept[("float", "fc1")] == 1.0
    assert kept[("huffman", "fc1")] == pytest.approx(1 - prune_count(0.5, 4096) / 4096)


@needs_sample
def test_layers_table_bits_per_weight(result) -> None:
    t = result.layers
    assert set(t["stage"]) == set(deep.STAGES)
    assert len(t) == 2 * len(deep.STAGES)
    for _, row in t.iterrows():
        parts = row[["code_bytes", "index_bytes", "codebook_bytes", "table_bytes",
                     "scale_bytes"]].sum()  # fmt: skip
        assert row["bits_per_weight"] == pytest.approx(8 * parts / row["weights"])
        assert parts + row["bias_bytes"] == row["size_bytes"]
    float_rows = t[t["stage"] == "float"]
    assert (float_rows["bits_per_weight"] == 32.0).all()
    fc1 = t[t["layer"] == "fc1"].set_index("stage")["bits_per_weight"]
    assert fc1["float"] > fc1["pruned"] > fc1["shared"] >= fc1["huffman"]


@needs_sample
def test_export_round_trip_is_bit_exact(result, digits, tmp_path: Path) -> None:
    c = result.compressed
    path = tmp_path / "deep.qpk"
    n = qcore.export_packed(c, path)
    data = path.read_bytes()
    header = int.from_bytes(data[8:12], "little")
    assert n == len(data) == c.size_bytes + PREFIX_BYTES + header  # payload = size shown
    loaded = qcore.load_packed(path).model
    x = digits["test"].x
    with torch.no_grad():
        assert torch.equal(loaded(x), c.model(x))
    # the accuracy in the table is that of the file
    acc = qcore.evaluate(loaded, digits["test"]).accuracy
    assert acc == result.stages["accuracy"].iloc[-1]


@needs_sample
def test_history_and_progress(mlp, digits) -> None:
    calls = []
    res = qcore.deep_compression(
        mlp, digits["train"], digits["calib"], prune_rate=0.5, bits=4, epochs=1,
        progress=lambda d, t, row: calls.append((d, t, row.get("stage"))),
    )  # fmt: skip
    assert res.split == "calib"  # no test split given: measured on the calibration split
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1]
    assert {s for _, _, s in calls} == set(deep.STAGES)
    assert set(res.history["stage"]) == {"pruned", "shared"}
    assert res.prune_rates == {"fc1": 0.5, "fc2": 0.5}
    assert res.bits == {"fc1": 4, "fc2": 4}


@needs_sample
def test_should_stop_ends_training_but_finishes_the_stages(mlp, digits) -> None:
    res = qcore.deep_compression(mlp, digits["train"], digits["calib"], epochs=1,
                                 should_stop=lambda: True)  # fmt: skip
    assert res.stopped
    assert list(res.stages["stage"]) == list(deep.STAGES)
    sizes = list(res.stages["size_bytes"])
    assert all(b <= a for a, b in zip(sizes, sizes[1:], strict=False))


@needs_sample
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"prune_rate": 1.0}, "below 1"),
        ({"prune_rate": -0.1}, "at least 0"),
        ({"prune_rate": float("nan")}, "prune_rate"),
        ({"bits": 0}, "bits"),
        ({"bits": 17}, "bits"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_arguments_are_refused_with_a_sentence(mlp, digits, kwargs, words) -> None:
    with pytest.raises(ValueError, match=words):
        qcore.deep_compression(mlp, digits["train"], digits["calib"], **kwargs)


@needs_sample
def test_no_split_to_measure_on_is_refused(mlp, digits) -> None:
    with pytest.raises(ValueError, match="test split"):
        qcore.deep_compression(mlp, digits["train"], None)


# --- centroid fine-tuning (the codebook branch of qcore.finetune) -----------------------------


def _tiny_data(n: int = 96):
    from qcore.data import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = (x.flatten(1)[:, :3].argmax(1)).long()
    return Dataset(name="tiny", split="train", x=x, y=y, classes=("a", "b", "c"),
                   description="", mean=(0.0,), std=(1.0,), indices=torch.arange(n))  # fmt: skip


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def test_centroid_finetuning_keeps_the_sharing_and_moves_the_centroids() -> None:
    model = _tiny_model()
    cfg = CompressionConfig(quant=QuantConfig(bits=2, codebook="kmeans"),
                            prune=PruneConfig(rate=0.25))  # fmt: skip
    start = qcore.compress(model, cfg)
    res = finetune(model, _tiny_data(), cfg, FinetuneConfig(epochs=3, lr=1e-2))
    graph = graph_of(res.model)
    after = qcore.compress(res.model, cfg)
    moved = False
    for r0, r1 in zip(start.layers, after.layers, strict=True):
        w = graph.params[param_key(r0.name, "weight")]
        # pruned weights stay exactly zero, the same ones
        assert torch.equal(w == 0, r0.dequantized == 0), r0.name
        # weights that shared a centroid still share one value: the assignments are fixed
        w0 = r0.dequantized
        for v in torch.unique(w0[w0 != 0]):
            assert torch.unique(w[w0 == v]).numel() == 1, r0.name
        assert torch.unique(w[w != 0]).numel() <= 4
        # compress re-derives exactly the trained shared weights
        assert torch.equal(r1.dequantized, w), r0.name
        moved |= not torch.equal(w, w0)
    assert moved  # training changed the centroids


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(1, 4), rows=st.integers(1, 8),
       cols=st.integers(1, 8), keep=st.floats(0.2, 1.0))  # fmt: skip
def test_shared_weight_gradient_is_the_sum_over_its_weights(seed, bits, rows, cols, keep) -> None:
    # the paper's update: dL/dc_k = sum of dL/dw over the weights assigned to centroid k
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) < keep
    cb = kmeans_codebook(w, bits, mask)
    centroids = cb.codebook.clone().requires_grad_(True)
    shared = shared_weight(centroids, cb.codes, mask)
    assert torch.equal(shared.detach(), cb.values)
    assert bool((shared[~mask] == 0).all())  # pruned weights exactly zero
    if not mask.any():  # everything pruned: no centroid, nothing to train
        assert centroids.numel() == 0 and not bool(shared.any())
        return
    x = torch.randn(5, cols, generator=g)
    (x @ shared.T).square().sum().backward()
    # the same gradient computed the other way: per weight, then summed per centroid
    wv = cb.values.clone().requires_grad_(True)
    (x @ wv.T).square().sum().backward()
    expected = torch.zeros_like(centroids).index_add_(0, cb.codes[mask].long(), wv.grad[mask])
    assert torch.allclose(centroids.grad, expected, rtol=1e-5, atol=1e-4)


@needs_sample
def test_no_pruning_means_no_retraining_stage(mlp, digits) -> None:
    res = qcore.deep_compression(mlp, digits["train"], digits["calib"], prune_rate=0.0,
                                 bits=4, epochs=1, test=digits["test"])  # fmt: skip
    pruned = res.stages.set_index("stage").loc["pruned"]
    float_row = res.stages.set_index("stage").loc["float"]
    # the float model goes on untouched: same bytes, same accuracy, nothing trained
    assert pruned["size_bytes"] == float_row["size_bytes"]
    assert pruned["accuracy"] == float_row["accuracy"] and pruned["kept"] == 1.0
    assert set(res.history["stage"]) == {"shared"}


# ------------------------------------------------------------------ command line


def test_cli_deep_prints_the_stages_and_writes_the_final_file(result, tmp_path: Path,
                                                              capsys) -> None:  # fmt: skip
    from qcore.cli import main

    out = tmp_path / "deep.qpk"
    assert main(["deep", "--model", "digits-mlp", "--epochs", "1", "--quiet",
                 "--out", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    api = result  # the same call, through the API
    ours = text.split("the paper's")[0]  # our stages; the paper's table follows
    rows = {ln.split("  ")[1].strip(): ln for ln in ours.splitlines() if ln.startswith("  ")
            and any(ln.strip().startswith(lb) for lb in deep.STAGE_LABELS.values())}  # fmt: skip
    assert set(rows) == set(api.stages["label"])
    for _, r in api.stages.iterrows():  # the same numbers as the API, stage by stage
        assert f"{r['size_bytes']:,}" in rows[r["label"]]
        assert f"{r['accuracy']:.2%}" in rows[r["label"]]
    size = api.compressed.size_bytes
    assert out.read_bytes() == qcore.export.packed_bytes(api.compressed)  # byte for byte
    assert f"({size:,} packed + " in text
    test = qcore.load_dataset("digits", "test")
    loaded = qcore.evaluate(qcore.load_packed(out).model, test).accuracy
    assert loaded == pytest.approx(float(api.stages["accuracy"].iloc[-1]), abs=1e-9)


@pytest.mark.parametrize("argv, words", [
    (["--prune-rate", "1"], ["prune_rate"]),
    (["--bits", "0"], ["bits"]),
    (["--epochs", "0"], ["epochs"]),
    (["--model", "nope"], ["nope"]),
])  # fmt: skip
def test_cli_deep_bad_arguments_are_one_error_line(argv, words, tmp_path: Path, capsys) -> None:
    from qcore.cli import main

    out = tmp_path / "x.qpk"
    assert main(["deep", "--model", "digits-mlp", *argv, "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not out.exists()
