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
