"""Issue 18's qcore maths: SQNR with removed blocks, the per-layer table over kept
channels, the settings clash of k-means and per-channel scales, the weight label."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qcore
from qcore import report
from qcore.config import Settings


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    return net.eval()


def test_per_layer_row_describes_only_the_kept_channels() -> None:
    net = _conv_net()
    s = Settings(bits=4, per_channel=True, prune=0.5, structured=True)
    c = qcore.compress(net, s.to_config())
    conv = c.layer("0")
    kept = conv.mask.reshape(8, -1).any(dim=1)
    assert 0 < int(kept.sum()) < 8  # some channels removed whole
    row = report.layer_row(conv)
    # a removed channel's placeholder scale is 1: it must not show
    w = conv.float_weight.reshape(8, -1)[kept]
    assert row["channels"] == int(kept.sum())
    assert row["scale max"] == pytest.approx(float((w.abs().amax(dim=1) / 7).max()), rel=1e-6)
    assert row["scale max"] < 0.5 * float(w.abs().max())  # weight units, not 1
    assert row["grid high"] == pytest.approx(float(w.abs().max()), rel=1e-6)
    assert row["grid low"] == pytest.approx(-float(w.abs().max()), rel=1e-6)
    # unpruned per-channel rows count every channel, as before
    full = report.layer_row(qcore.compress(net, Settings(bits=4, per_channel=True)
                                           .to_config()).layer("0"))  # fmt: skip
    assert full["channels"] == 8


def test_kept_channel_table_as_the_playground_shows_it() -> None:
    from pages import tables

    net = _conv_net()
    c = qcore.compress(net, Settings(bits=4, per_channel=True, prune=0.5, structured=True)
                       .to_config())  # fmt: skip
    shown = tables.layer_display(tables.layer_table(c)).set_index("layer")
    n = int(c.layer("0").mask.reshape(8, -1).any(dim=1).sum())
    assert shown.loc["0", "grid range"].endswith(f" ({n} of 8 channels kept)")
    assert not shown.loc["0", "scale Δ"].endswith("… 1 over 8 channels")


class _Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.ReLU())  # keeps its input's shape
        self.head = nn.Linear(6, 3)
        self.qcore_spec = {"input_shape": [4], "num_classes": 3}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def test_whole_model_sqnr_counts_a_removed_block_as_all_error() -> None:
    torch.manual_seed(1)
    net = _Res().eval()
    c = qcore.compress(net, qcore.CompressionConfig(quant=None, drop=("block",)))
    # nothing else changed: the signal is every weight, the error the removed ones
    w = {n: p.detach().double() for n, p in net.named_parameters() if n.endswith("weight")}
    sig = sum(float((v**2).sum()) for v in w.values())
    gone = float((w["block.0.weight"] ** 2).sum())
    assert c.removed == ("block.0",)
    assert c.removed_energy == pytest.approx(gone)
    assert c.sqnr_db == pytest.approx(10 * math.log10(sig / gone))
    # without a removed block: unchanged (inf when nothing changed)
    assert qcore.compress(net, qcore.CompressionConfig(quant=None)).sqnr_db == math.inf
    q = qcore.compress(net, qcore.CompressionConfig(drop=("block",)))  # 8 bits as well
    s = sum(x.weight_energy for x in q.layers) + gone
    e = sum(x.error_energy for x in q.layers) + gone
    assert q.sqnr_db == pytest.approx(10 * math.log10(s / e)) and q.sqnr_db < 10 * math.log10(
        sig / gone) + 1e-9


def test_weight_label_and_text_say_what_is_stored() -> None:
    names = ["conv1", "conv2", "fc1", "fc2"]
    all4 = Settings(bits=8, layer_bits=tuple((n, 4) for n in names))
    assert all4.wa_label(names) == "W4A32" and all4.weight_bits_text(names) == "4 bits"
    mixed = Settings(bits=8, abits=8, layer_bits=(("conv1", 4), ("conv2", 6), ("fc1", 6),
                                                  ("fc2", 4)))  # fmt: skip
    assert mixed.wa_label(names) == "W4-6 mixed A8"
    assert mixed.weight_bits_text(names) == "4 to 6 bits (per layer)"
    # only some layers compressed: the widths of those
    part = Settings(bits=8, layers=("fc1",), layer_bits=(("fc1", 3),))
    assert part.wa_label(names) == "W3A32"
    assert Settings(bits=None).wa_label(names) == "W32A32"
    assert Settings(bits=4).wa_label() == "W4A32"


def test_kmeans_with_per_channel_resolves_the_same_way_in_the_cli(capsys) -> None:
    from qcore.cli import _config, _evaluate_parser

    net = _conv_net()
    args = _evaluate_parser().parse_args(
        ["--model", "mnist-cnn", "--bits", "4", "--per-channel", "--codebook", "kmeans"])
    cfg = _config(args, net)
    assert cfg.quant.codebook == "kmeans" and cfg.quant.per_channel is False


def test_two_bit_tip_describes_the_grid_shown() -> None:
    from qcore import teach

    sym = teach.trap_hint(2, "ratio", 1.0, 0.1, 0.6, symmetric=True)
    asym = teach.trap_hint(2, "ratio", 1.0, 0.1, 0.6, symmetric=False)
    assert "3 levels are -max|w|, 0 and +max|w|" in sym
    assert "4 levels" in asym and "-max|w|, 0 and +max|w|" not in asym


def test_absolute_clip_above_max_w_counts_the_empty_levels() -> None:
    from qcore import teach

    net = _conv_net()
    amaxes = [float(p.detach().abs().max()) for n, p in net.named_parameters() if "weight" in n]
    amax = max(amaxes)
    c = qcore.compress(net, Settings(bits=4, clip_mode="absolute", clip=3 * amax)
                       .to_config())  # fmt: skip
    for res in c.layers:  # brute force: the levels that no weight's code lands on
        used = {int(v) for v in res.codes.reshape(-1)}
        assert teach.empty_levels(res) == (15 - len(used), 15)
        assert teach.empty_levels(res)[0] > 0
    note = teach.clip_note(c)
    assert note.startswith(f"c = {3 * amax:g} is above the largest |w| of every quantized")
    # the error curve reaches the layer's c, and the caption says what lies past max|w|
    curve = teach.clip_error_curve(c, "0")
    assert curve.current[0] == pytest.approx(3 * amax)
    assert curve.table["c"].max() >= curve.current[0]
    assert curve.table["c"].is_monotonic_increasing
    from pages import tables

    caption = tables.clip_curve_caption(curve)
    assert "of the 15 levels hold no weight" in caption
    assert f"{curve.empty[0]} of the 15 levels" in caption
    # within max|w|: no note, and the curve ends at 1.25 max|w| as before
    inside = qcore.compress(net, Settings(bits=4, clip_mode="absolute", clip=min(amaxes) / 2)
                            .to_config())  # fmt: skip
    assert teach.clip_note(inside) == ""
    plain = teach.clip_error_curve(inside, "0")
    assert len(plain.table) == 60


# --- the teaching panels: fixed point, stochastic rounding, error and SQNR against bits ------


def test_fixed_point_reads_the_code_as_the_dequantized_value() -> None:
    from qcore import teach

    for v, bits, n in [(5, 4, 3), (-3, 4, 1), (3, 4, 6), (-7, 4, 2), (0, 3, 5), (6, 4, 0)]:
        m, n2, text = teach.fixed_point(v, bits, n)
        assert (m, n2) == (bits - 1 - n, n)
        whole, frac = text.split(".")
        # the digits, two's complement over their full width, equal v / 2^n
        digits = whole + frac
        value = int(digits, 2) - (1 << len(digits) if digits[0] == "1" else 0)
        assert value / 2**len(frac) == v / 2**n


def test_journey_shows_the_exponent_and_the_stochastic_draw() -> None:
    from pages import tables
    from qcore import teach

    net = _conv_net()
    c = qcore.compress(net, Settings(bits=4, scale="pow2", rounding="stochastic").to_config())
    res = c.layer("3")
    for index in (0, 7, 100, 500):
        j = teach.weight_journey(c, "3", index)
        assert j.scale == 2.0 ** -j.exponent  # a power of two: the exponent p
        # the draw u reproduces the stored code: floor(w / Δ + u) (zero point 0)
        assert j.draw is not None and 0 <= j.draw < 1
        assert j.code == max(-7, min(7, math.floor(j.scaled + j.draw)))
        lo, hi = j.neighbours
        assert lo <= j.scaled < hi and j.p_up == pytest.approx(j.scaled - lo)
        assert j.code in (lo, hi) or j.code in (-7, 7)
        text = tables.journey_markdown(j, stochastic=True)
        assert f"p = {j.exponent}: Δ = 2^−{j.exponent}" in text
        assert f"the draw u = {j.draw:.3f}" in text
        assert f"{1 - j.p_up:.0%}" in text and f"{j.p_up:.0%}" in text
        assert f". fixed point Q{3 - j.exponent}.{j.exponent} |" in text
        assert float(res.dequantized.reshape(-1)[index]) == j.dequantized
    # nearest rounding, float scales: no exponent, no draw
    j = teach.weight_journey(qcore.compress(net, Settings(bits=4).to_config()), "3", 7)
    assert j.exponent is None and j.draw is None


def test_error_histogram_splits_rounding_from_clipping() -> None:
    from qcore import teach

    net = _conv_net()
    c = qcore.compress(net, Settings(bits=4, clip=0.5).to_config())
    res = c.layer("3")
    h = teach.error_histogram(c, "3")
    w = res.float_weight.reshape(-1)
    err = (w - res.dequantized.reshape(-1)).double()
    lo, hi = (float(t[0]) for t in res.grid_range)
    out = (w < lo) | (w > hi)
    assert h.kept == w.numel() and h.clipped == int(out.sum()) > 0
    assert sum(h.rounding) == int((~out).sum()) and sum(h.clipping) == h.clipped
    assert h.half_step == pytest.approx(float(res.scales[0]) / 2)
    # rounding error stays within half a step; clipping error lies beyond it
    assert float(err[~out].abs().max()) <= h.half_step * (1 + 1e-5)
    # a clipped weight's error is its distance past the grid's nearest end
    past = torch.where(w > hi, w - hi, w - lo).double()
    assert torch.allclose(err[out], past[out], atol=1e-7)
    assert float(err[out].abs().max()) > 3 * h.half_step  # the tails reach far beyond


def test_sqnr_against_bits_rises_about_six_db_a_bit() -> None:
    from qcore import teach

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(256, 64)).eval()
    c = qcore.compress(net, Settings(bits=6).to_config())
    df = teach.sqnr_by_bits(c, "0", tuple(range(2, 13)))
    assert list(df["bits"]) == list(range(2, 13))
    assert teach.DB_PER_BIT == pytest.approx(6.0206, abs=1e-4)
    # the line passes through the layer's own width with slope 6.02 dB per bit
    at6 = float(df.loc[df["bits"] == 6, "sqnr_db"].iloc[0])
    assert at6 == pytest.approx(c.layer("0").sqnr_db)
    assert df["rule_db"].tolist() == pytest.approx([at6 + 6.0206 * (b - 6) for b in range(2, 13)],
                                                   rel=1e-4)  # fmt: skip
    # measured: from 6 bits up each bit adds close to 6.02 dB (uniform weights: exactly so)
    steps = df["sqnr_db"].diff().to_numpy()[5:]
    assert all(5.5 < d < 6.5 for d in steps), steps
    with pytest.raises(ValueError, match="no uniform grid"):
        teach.sqnr_by_bits(qcore.compress(net, Settings(bits=4, codebook="kmeans")
                                          .to_config()), "0")  # fmt: skip


def test_per_layer_view_puts_codebook_bytes_where_a_screen_shows_them() -> None:
    from pages import tables

    net = _conv_net()

    def order(settings: Settings) -> list[str]:
        c = qcore.compress(net, settings.to_config())
        shown = tables.layer_display(tables.layer_table(c), tables.size_table(c))
        cols = tables.layer_display_order(shown)
        assert set(cols) <= set(shown.columns) and len(cols) == len(set(cols))
        return cols

    shared = order(Settings(bits=4, codebook="kmeans", entropy="huffman"))
    # right after the bit width, before the wide text columns; no "none (codebook)" column
    assert shared[:6] == ["layer", "kind", "shape", "params", "bits", "code bits"]
    assert shared.index("codebook bytes") < shared.index("grid range")
    assert "scale Δ" not in shared and "zero point" not in shared
    plain = order(Settings(bits=4))
    # a uniform grid without Huffman: no codebook or table bytes to show, grid first
    assert "codebook bytes" not in plain and "table bytes" not in plain
    assert plain.index("grid range") < plain.index("packed bytes")
    assert {"scale Δ", "zero point", "code bits", "encoding"} <= set(plain)
