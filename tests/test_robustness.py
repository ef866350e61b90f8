"""qcore.robustness: input noise, FGSM / PGD, weight noise and bit flips (digits-mlp: fast)."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcore
from qcore import cli
from qcore.robustness import PERTURBATIONS, _predict, valid_range


@pytest.fixture(scope="module")
def model():
    return qcore.load_model("digits-mlp")


@pytest.fixture(scope="module")
def data():
    return qcore.load_dataset("digits", "test")


@pytest.fixture(scope="module")
def calib():
    return qcore.load_dataset("digits", "calib")


@pytest.fixture(scope="module")
def c4(model):
    return qcore.compress(model, qcore.CompressionConfig(quant=qcore.QuantConfig(bits=4, clip=0.5)))


def _hash(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _target(perturbation, model, comp):
    return comp if perturbation == "bitflip" else model


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_strength_zero_is_the_clean_accuracy_exactly(perturbation, model, data, c4):
    float_c = qcore.compress(model, qcore.CompressionConfig(quant=None))
    for m, comp in ((model, float_c), (c4.model, c4)):
        df = qcore.robustness(_target(perturbation, m, comp), data, perturbation, [0.0])
        assert df["accuracy"].iloc[0] == qcore.evaluate(m, data).accuracy
        assert df["agreement"].iloc[0] == 1.0
        assert df["n"].iloc[0] == len(data.y)
        assert df.attrs["clean_accuracy"] == qcore.evaluate(m, data).accuracy


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_same_seed_same_rows_and_the_model_untouched(perturbation, model, data, c4):
    before, codes = _hash(model), [r.codes.clone() for r in c4.layers]
    target = _target(perturbation, c4.model, c4)
    strengths = [0.0, 0.01, 0.1] if perturbation != "bitflip" else [0.0, 0.001, 0.01]
    a = qcore.robustness(target, data, perturbation, strengths, seed=3, steps=3, seeds=2)
    b = qcore.robustness(target, data, perturbation, strengths, seed=3, steps=3, seeds=2)
    assert a.equals(b)
    assert list(a["strength"]) == strengths
    assert ((a["accuracy"] >= 0) & (a["accuracy"] <= 1)).all()
    assert _hash(model) == before
    assert all(torch.equal(r.codes, c) for r, c in zip(c4.layers, codes, strict=True))


def test_another_seed_draws_other_noise(model, data):
    a = qcore.perturb_inputs(model, data, "gaussian", 0.5, seed=0)
    b = qcore.perturb_inputs(model, data, "gaussian", 0.5, seed=1)
    assert not torch.equal(a, b)
    assert torch.equal(a, qcore.perturb_inputs(model, data, "gaussian", 0.5, seed=0))


@pytest.mark.parametrize("perturbation", ["gaussian", "fgsm", "pgd"])
@pytest.mark.parametrize("strength", [0.05, 0.3, 1.0])
def test_perturbed_inputs_stay_in_range_and_within_eps(perturbation, strength, model, data):
    lo, hi, std = valid_range(data)
    x = data.x[:64]
    adv = qcore.perturb_inputs(model, data, perturbation, strength, indices=range(64), steps=4)
    assert adv.shape == x.shape
    assert (adv >= lo).all() and (adv <= hi).all()
    assert not torch.equal(adv, x)
    if perturbation != "gaussian":  # epsilon is in pixel units: |delta pixel| <= eps
        assert float(((adv - x).abs() * std).max()) <= strength + 1e-5
        # FGSM moves every pixel by eps unless the range stops it
        if perturbation == "fgsm" and strength == 0.05:
            moved = (adv - x).abs() * std
            assert float(moved.max()) == pytest.approx(0.05, abs=1e-5)


def test_the_valid_range_holds_the_clean_images(data):
    lo, hi, _ = valid_range(data)
    assert (data.x >= lo).all() and (data.x <= hi).all()
    assert float(data.x.min()) == pytest.approx(float(lo.min()), abs=1e-6)


def test_pgd_is_at_least_as_strong_as_fgsm(model, data):
    for eps in (0.05, 0.1):
        fgsm = qcore.robustness(model, data, "fgsm", [eps])["accuracy"].iloc[0]
        pgd = qcore.robustness(model, data, "pgd", [eps], seed=0)["accuracy"].iloc[0]
        assert pgd <= fgsm


def test_attacks_reach_through_fake_quantized_activations(model, data, calib):
    cfg = qcore.Settings(bits=4, abits=4).to_config()
    comp = qcore.compress(model, cfg, calib=calib)
    assert comp.model.points  # activations are fake-quantized: rounding has no gradient
    adv = qcore.perturb_inputs(comp, data, "fgsm", 0.1, indices=range(64))
    moved = ((adv - data.x[:64]).abs() > 0).float().mean()
    assert float(moved) > 0.5  # the straight-through gradient is not zero
    df = qcore.robustness(comp, data, "fgsm", [0.0, 0.1])
    assert df["accuracy"].iloc[1] < df["accuracy"].iloc[0]


def test_weight_noise_is_multiplicative(model, c4):
    zero = qcore.noisy_weights(model, 0.0)
    w = dict(qcore.graph_of(model, fold_bn=False).params)
    assert set(zero) == {f"{n}.weight" for n in qcore.weight_layers(model)}
    assert all(torch.equal(zero[k], w[k]) for k in zero)
    noisy = qcore.noisy_weights(model, 0.2, seed=1)
    for k, v in noisy.items():
        rel = (v - w[k])[w[k] != 0] / w[k][w[k] != 0]
        assert float(rel.std()) == pytest.approx(0.2, rel=0.2)
    # a compressed model's noise sits on its dequantized weights: zeros stay zero
    deq = c4.replacements()
    for k, v in qcore.noisy_weights(c4, 0.5).items():
        assert torch.equal(v[deq[k] == 0], deq[k][deq[k] == 0])


def _popcount(t: torch.Tensor) -> int:
    t = t.to(torch.int64) & 0xFFFFFFFF
    return int(sum(((t >> b) & 1).sum() for b in range(32)))


def test_bitflip_flips_exactly_that_fraction_of_code_bits(c4):
    total = sum(r.codes.numel() * r.bits for r in c4.layers)
    flipped = qcore.flip_bits(c4, 0.01, seed=5)
    diff = 0
    for r in c4.layers:
        new = flipped.get(f"{r.name}.weight", r.dequantized)
        codes = torch.round(new / r.qparams.scale).to(torch.int64)
        half = 2 ** (r.bits - 1)
        assert int(codes.min()) >= -half and int(codes.max()) <= half - 1
        full = (1 << r.bits) - 1
        diff += _popcount((codes & full) ^ (r.codes.to(torch.int64) & full))
    assert diff == round(0.01 * total)


def test_bitflip_of_float_words_and_nan_counts_as_wrong(model, data):
    fc = qcore.compress(model, qcore.CompressionConfig(quant=None))
    total = sum(r.float_weight.numel() * 32 for r in fc.layers)
    flipped = qcore.flip_bits(fc, 0.001, seed=0)
    diff = sum(
        _popcount(flipped[f"{r.name}.weight"].view(torch.int32) ^ r.float_weight.view(torch.int32))
        for r in fc.layers if f"{r.name}.weight" in flipped
    )  # fmt: skip
    assert diff == round(0.001 * total)
    logits = torch.tensor([[0.0, 2.0], [float("nan"), 1.0], [float("inf"), 0.0]])
    assert _predict(logits).tolist() == [1, -1, -1]
    df = qcore.robustness(fc, data, "bitflip", [0.0, 0.01], seeds=2)
    # one float32 bit in a hundred flipped hits exponents: the float model falls apart
    assert df["accuracy"].iloc[1] < df["accuracy"].iloc[0] - 0.5


def test_bitflip_of_a_kmeans_layer_flips_its_b_bit_indices(model, data):
    comp = qcore.compress(model, qcore.Settings(bits=2, codebook="kmeans").to_config())
    assert all(r.codebook.numel() == 4 and r.bits == 2 for r in comp.layers)
    total = sum(r.codes.numel() * 2 for r in comp.layers)  # 2 bits per weight, not 32
    flipped = qcore.flip_bits(comp, 0.01, seed=3)
    diff = 0
    for r in comp.layers:
        new = flipped.get(f"{r.name}.weight", r.dequantized)
        # each weight is still one of the layer's 4 centroids: which one is its new index
        hits = new.reshape(-1, 1) == r.codebook.reshape(1, -1)
        assert bool((hits.sum(dim=1) == 1).all())
        index = hits.to(torch.int64).argmax(dim=1)
        diff += _popcount(index ^ r.codes.reshape(-1).to(torch.int64))
    assert diff == round(0.01 * total)
    df = qcore.robustness(comp, data, "bitflip", [0.0, 0.01], seeds=2)
    assert df["accuracy"].iloc[1] > df["accuracy"].iloc[0] - 0.1  # a flip moves one centroid


def test_pruned_weights_keep_no_bits(model):
    comp = qcore.compress(model, qcore.Settings(bits=4, prune=0.5).to_config())
    flipped = qcore.flip_bits(comp, 0.5, seed=0)
    for r in comp.layers:
        new = flipped[f"{r.name}.weight"]
        assert (new[~r.mask] == 0).all()


def test_bad_arguments_are_sentences(model, data, c4):
    with pytest.raises(ValueError, match="Unknown perturbation"):
        qcore.robustness(model, data, "rain", [0.1])
    with pytest.raises(ValueError, match="at least one strength"):
        qcore.robustness(model, data, "fgsm", [])
    with pytest.raises(ValueError, match="from 0 to 1"):
        qcore.robustness(model, data, "pgd", [1.5])
    with pytest.raises(ValueError, match="0 or more"):
        qcore.robustness(model, data, "gaussian", [float("nan")])
    with pytest.raises(ValueError, match="pass the qcore.Compressed"):
        qcore.robustness(model, data, "bitflip", [0.01])
    with pytest.raises(ValueError, match="PGD steps"):
        qcore.robustness(model, data, "pgd", [0.1], steps=0)
    with pytest.raises(ValueError, match="seeds"):
        qcore.robustness(c4, data, "bitflip", [0.1], seeds=0)


def test_cli_prints_the_table(capsys):
    rc = cli.main(["robustness", "--model", "digits-mlp", "--bits", "4", "--clip", "0.5",
                   "--perturbation", "fgsm", "--strengths", "0", "0.1", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "digits-mlp (4 bits · clip 0.5 · symmetric · per-tensor · prune 0)" in out
    assert "epsilon (pixel units" in out
    comp = qcore.compress(qcore.load_model("digits-mlp"),
                          qcore.Settings(bits=4, clip=0.5).to_config())  # fmt: skip
    clean = qcore.evaluate(comp.model, qcore.load_dataset("digits")).accuracy
    assert f"{clean:.4f}" in out.splitlines()[2]


def test_cli_csv_without_bits_is_the_float_model(capsys):
    rc = cli.main(["robustness", "--model", "digits-mlp", "--perturbation", "weight_noise",
                   "--strengths", "0", "0.1", "--csv", "--quiet", "--limit", "50"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert lines[0].startswith("variant,perturbation,strength,accuracy,agreement")
    assert lines[1].startswith("float32,weight_noise,0.0,")
    assert len(lines) == 3 and lines[1].split(",")[-1] == "50"


@pytest.mark.parametrize("argv", [
    ["--perturbation", "rain"],
    ["--strengths", "0", "abc"],
    ["--strengths", "2", "--perturbation", "fgsm"],
])  # fmt: skip
def test_cli_bad_argument_is_one_error_line(argv, capsys):
    rc = cli.main(["robustness", "--model", "digits-mlp", "--quiet", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ")


def test_accuracy_is_the_mean_over_draws(c4, data):
    df = qcore.robustness(c4, data, "weight_noise", [0.3], seeds=3)
    row = df.iloc[0]
    assert row["draws"] == 3
    assert row["accuracy_min"] <= row["accuracy"] <= row["accuracy_max"]
    assert np.isfinite(row["agreement"])


@settings(max_examples=15, deadline=None)
@given(
    perturbation=st.sampled_from(["gaussian", "fgsm", "pgd"]),
    strength=st.floats(0.0, 1.0, allow_nan=False),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_strength_and_seed_stays_in_range_and_within_eps(perturbation, strength, seed):
    model, data = _MLP(), _DIGITS()
    lo, hi, std = valid_range(data)
    adv = qcore.perturb_inputs(model, data, perturbation, strength, indices=range(16),
                               seed=seed, steps=2)  # fmt: skip
    assert (adv >= lo).all() and (adv <= hi).all()
    if perturbation != "gaussian":
        assert float(((adv - data.x[:16]).abs() * std).max()) <= strength + 1e-5
    if strength == 0:
        assert torch.equal(adv, data.x[:16])


_MLP = functools.cache(lambda: qcore.load_model("digits-mlp"))
_DIGITS = functools.cache(lambda: qcore.load_dataset("digits", "test"))


def test_a_curve_gives_each_strength_what_it_gives_alone(model, data, c4):
    """FGSM's gradient is computed once per batch for the whole curve: the rows must equal
    one-strength runs."""
    for target in (model, c4.model):
        curve = qcore.robustness(target, data, "fgsm", [0.05, 0.1, 0.3])
        for s, acc in zip(curve["strength"], curve["accuracy"], strict=True):
            assert qcore.robustness(target, data, "fgsm", [s])["accuracy"].iloc[0] == acc
