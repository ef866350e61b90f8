"""Layer removal: removable blocks, the model without them, and what compress and the packed
file make of ``CompressionConfig(drop=...)``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcore
from qcore.blocks import removable_blocks, without_blocks
from qcore.config import CompressionConfig, QuantConfig, Settings, parse_flat
from tests.conftest import state_hash

needs_sample = pytest.mark.skipif(
    "mnist-resnet" not in qcore.list_models(), reason="sample models not trained yet"
)


class Chain(nn.Module):
    """conv (1->4), a residual block (4->4), a shape-changing conv, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, padding=1))  # fmt: skip
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 3 * 3, 3)
        self.qcore_spec = {"input_shape": [1, 6, 6]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.block(h)
        return self.head(torch.relu(self.down(h)).flatten(1))


def chain() -> nn.Module:
    torch.manual_seed(0)
    return Chain().eval()


def test_removable_blocks_keep_their_input_shape_and_hold_weights() -> None:
    m = chain()
    top = removable_blocks(m)
    # block keeps 4x6x6; stem (1 -> 4), down (4x6x6 -> 8x3x3) and head change the shape
    assert list(top) == ["block"]
    assert top["block"].shape == (4, 6, 6)
    assert top["block"].layers == ("block.0", "block.2")
    assert top["block"].params == 2 * (4 * 4 * 9 + 4)
    assert list(removable_blocks(m, nested=True)) == ["block", "block.0", "block.2"]


def test_without_a_block_runs_the_identity_in_its_place_and_changes_nothing_given() -> None:
    m = chain()
    before = state_hash(m)
    d = without_blocks(m, ["block"])
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        h = torch.relu(m.stem(x))
        expected = m.head(torch.relu(m.down(h + h)).flatten(1))  # h + identity(h)
        assert torch.equal(d(x), expected)
    assert isinstance(m.block, nn.Sequential) and isinstance(d.block, nn.Identity)
    assert d.stem is m.stem and d.down.weight is m.down.weight  # shared, not copied
    assert state_hash(m) == before
    assert without_blocks(m, ["block"]) is d  # made once per (model, names)
    assert without_blocks(m, []) is m


def test_a_nested_block_copies_only_its_parents() -> None:
    m = chain()
    d = without_blocks(m, ["block.2"])
    assert isinstance(d.block[2], nn.Identity) and isinstance(m.block[2], nn.Conv2d)
    assert d.block is not m.block and d.block[0] is m.block[0]


def test_bad_block_names_are_refused_with_the_removable_ones() -> None:
    m = chain()
    with pytest.raises(ValueError, match=r"Cannot remove 'down'.*removable blocks: block"):
        without_blocks(m, ["down"])
    with pytest.raises(ValueError, match="inside another removed block"):
        without_blocks(m, ["block", "block.0"])
    with pytest.raises(ValueError, match="list of block names"):
        CompressionConfig(drop="block")


def test_compress_without_a_block_drops_exactly_its_bytes() -> None:
    m = chain()
    q = QuantConfig(bits=8)
    full = qcore.compress(m, CompressionConfig(quant=q))
    less = qcore.compress(m, CompressionConfig(quant=q, drop=("block",)))
    gone = {k: enc.nbytes() for k, _, enc in full.packed_tensors() if k.startswith("block.")}
    assert set(gone) == {"block.0.weight", "block.0.bias", "block.2.weight", "block.2.bias"}
    assert full.size_bytes - less.size_bytes == sum(gone.values())
    assert less.float_size_bytes == full.float_size_bytes  # measured against the whole model
    assert [r.name for r in less.layers] == ["stem", "down", "head"]
    # the compressed variant runs the model without the block
    x = torch.randn(4, 1, 6, 6)
    d = without_blocks(m, ["block"])
    ref = qcore.compress(d, CompressionConfig(quant=q))
    assert torch.equal(less.model(x), ref.model(x))


def test_layers_named_inside_a_removed_block_are_gone_not_unknown() -> None:
    m = chain()
    c = qcore.compress(m, CompressionConfig(layers=("block.0", "head"), drop=("block",)))
    assert [r.name for r in c.layers] == ["head"]
    with pytest.raises(ValueError, match="lies in a removed block"):
        qcore.compress(m, CompressionConfig(layers=("block.0",), drop=("block",)))
    with pytest.raises(ValueError, match="Unknown layer"):
        qcore.compress(m, CompressionConfig(layers=("nope",), drop=("block",)))


def test_configs_and_settings_round_trip_drop() -> None:
    cfg = CompressionConfig(quant=QuantConfig(bits=4), drop=("layer1", "layer3.conv2"))
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg
    assert "drop" not in CompressionConfig().to_dict()  # old files read the same
    with pytest.raises(ValueError, match="drop must be a list"):
        CompressionConfig.from_dict({"drop": "layer1"})
    s = Settings(bits=4, drop=("layer1",))
    assert Settings.from_flat(s.to_flat())[0] == s
    assert Settings.from_config(s.to_config()) == s
    assert "without layer1" in s.label()
    assert Settings(drop=("b", "a")).canonical().drop == ("a", "b")


def test_a_linked_drop_must_name_a_removable_block() -> None:
    values, warnings = parse_flat({"drop": "layer9"}, blocks=["layer1"], model="mnist-resnet")
    assert values == {} and "removable blocks of mnist-resnet: layer1" in warnings[0]
    values, warnings = parse_flat({"drop": "layer1"}, blocks=["layer1"])
    assert values == {"drop": ("layer1",)} and warnings == []
    values, warnings = parse_flat({"drop": "x;y"})  # no block list: names checked later
    assert values == {} and warnings


@needs_sample
def test_sample_resnet_loses_layer1_bytes_and_the_file_agrees(tmp_path) -> None:
    m = qcore.load_model("mnist-resnet")
    assert list(removable_blocks(m)) == ["layer1", "layer2.conv2", "layer3.conv2"]
    assert removable_blocks(qcore.load_model("mnist-lenet300")) == {}
    cfg = CompressionConfig(quant=QuantConfig(bits=8), drop=("layer1",))
    c = qcore.compress(m, cfg)
    full = qcore.compress(m, CompressionConfig(quant=QuantConfig(bits=8)))
    assert c.size_bytes < full.size_bytes
    path = tmp_path / "drop.qpk"
    qcore.export_packed(c, path)
    packed = qcore.load_packed(path)
    assert packed.config.drop == ("layer1",)
    x = qcore.load_dataset("mnist-5k").x[:32]
    assert torch.equal(packed.model(x), c.model(x))


@needs_sample
def test_playground_removes_a_linked_block_and_shows_the_smaller_size() -> None:
    from streamlit.testing.v1 import AppTest

    from tests.test_playground import APP, ok

    def packed_kb(at: AppTest) -> str:
        return next(m.value for m in at.metric if m.label == "Packed size")

    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"model": "mnist-resnet", "bits": "8"})
    at.run()
    ok(at)
    full = packed_kb(at)
    picker = next(w for w in at.multiselect if w.label == "Remove blocks (fewer layers)")
    assert picker.options == ["layer1 (16x28x28, 4,736 parameters)",
                              "layer2.conv2 (32x14x14, 9,216 parameters)",
                              "layer3.conv2 (64x7x7, 36,864 parameters)"]  # fmt: skip
    picker.set_value(["layer1"]).run()
    ok(at)
    assert packed_kb(at) != full
    assert any("Removed: layer1" in c.value for c in at.caption)
    assert any(c.value.startswith("Removed with their block: layer1.conv1, layer1.conv2.")
               for c in at.caption)  # fmt: skip
    c = qcore.compress(qcore.load_model("mnist-resnet"),
                       Settings(bits=8, drop=("layer1",)).to_config())  # fmt: skip
    from pages.tables import format_bytes

    assert packed_kb(at) == format_bytes(c.size_bytes)


@needs_sample
def test_robustness_command_runs_a_float_setting_without_its_block(capsys) -> None:
    from qcore import cli

    assert cli.main(["robustness", "--model", "digits-mlp", "--bits", "float", "--drop", "fc1",
                     "--perturbation", "gaussian", "--strengths", "0", "--quiet",
                     "--csv"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    m = qcore.load_model("digits-mlp")
    c = qcore.compress(m, Settings(bits=None, drop=("fc1",)).to_config())
    acc = qcore.evaluate(c.model, qcore.load_dataset("digits")).accuracy
    assert f"0.0,{acc}," in out.replace(" ", "") or f"{acc:.4f}" in out
    assert acc < 0.5 < qcore.evaluate(m, qcore.load_dataset("digits")).accuracy


@needs_sample
def test_fine_tune_page_takes_a_setting_that_only_removes_a_block() -> None:
    from streamlit.testing.v1 import AppTest

    from tests.test_playground import APP

    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"model": "digits-mlp", "dataset": "digits", "bits": "float",
                            "drop": "fc1"})  # fmt: skip
    at.run()
    at = at.switch_page("pages/views/finetune.py").run()
    at.button(key="ft_train").click().run()
    for _ in range(600):  # the run is a background job: redraw until it is done
        if at.dataframe or at.error or at.exception:
            break
        at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (df,) = [d.value for d in at.dataframe]
    rows = {r["model"].split(" (")[0]: r for r in df.to_dict("records")}
    assert rows["post-training"]["size_bytes"] < rows["float"]["size_bytes"]
