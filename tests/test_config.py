"""Configs that round-trip (to_dict / from_dict), their refusal of hostile input, and the one
mapping from flat settings (a link, the command line) to a config."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.config import (
    CLIP_MODES,
    CLIP_RANGES,
    MAX_PRUNE,
    MAX_SEED,
    ROUNDINGS,
    SCOPES,
    SETTING_KEYS,
    CompressionConfig,
    PruneConfig,
    QuantConfig,
    Settings,
    parse_bits,
    parse_flat,
    parse_layer_bits,
    parse_number,
)


def through_json(d: dict) -> dict:
    """What a file or a link gives back: the dict written as JSON and read again."""
    return json.loads(json.dumps(d, allow_nan=False))


# --- strategies: every valid config -----------------------------------------------------------

names = st.text(max_size=12)  # layer names: any text, even empty or odd unicode
finite = st.floats(allow_nan=False, allow_infinity=False)
clips = {
    "ratio": st.floats(0.0, 1.0, exclude_min=True),
    "absolute": st.floats(0.0, 1e300, exclude_min=True),
    "sigma": st.floats(0.0, 1e300, exclude_min=True),
    "percentile": st.floats(0.0, 100.0, exclude_min=True),
    "mse": finite,
}


@st.composite
def quant_configs(draw) -> QuantConfig:
    mode = draw(st.sampled_from(CLIP_MODES))
    return QuantConfig(
        bits=draw(st.integers(1, 16)),
        symmetric=draw(st.booleans()),
        per_channel=draw(st.booleans()),
        clip=draw(clips[mode]),
        clip_mode=mode,
        rounding=draw(st.sampled_from(ROUNDINGS)),
        seed=draw(st.integers(0, MAX_SEED)),
        layer_bits=draw(st.dictionaries(names, st.integers(1, 16), max_size=5)),
    )


prune_configs = st.builds(
    PruneConfig,
    rate=st.floats(0.0, 1.0, exclude_max=True),
    structured=st.booleans(),
    scope=st.sampled_from(SCOPES),
)
compression_configs = st.builds(
    CompressionConfig,
    quant=st.none() | quant_configs(),
    prune=st.none() | prune_configs,
    layers=st.none() | st.lists(names, max_size=6),
    fold_bn=st.booleans(),
)


# --- round trips ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(cfg=quant_configs())
def test_quant_config_round_trips_through_json(cfg: QuantConfig) -> None:
    d = cfg.to_dict()
    assert through_json(d) == d  # plain JSON values only
    assert QuantConfig.from_dict(through_json(d)) == cfg
    assert d == through_json(asdict(cfg))  # the same form as the packed file's header


@settings(max_examples=200, deadline=None)
@given(cfg=prune_configs)
def test_prune_config_round_trips_through_json(cfg: PruneConfig) -> None:
    d = cfg.to_dict()
    assert through_json(d) == d
    assert PruneConfig.from_dict(through_json(d)) == cfg


@settings(max_examples=300, deadline=None)
@given(cfg=compression_configs)
def test_compression_config_round_trips_through_json(cfg: CompressionConfig) -> None:
    d = cfg.to_dict()
    assert through_json(d) == d
    back = CompressionConfig.from_dict(through_json(d))
    assert back == cfg and hash(back) == hash(cfg)


def test_missing_keys_take_their_defaults() -> None:
    assert CompressionConfig.from_dict({}) == CompressionConfig()
    assert QuantConfig.from_dict({"bits": 4}) == QuantConfig(bits=4)
    assert CompressionConfig.from_dict({"quant": None}).quant is None
    # layer_bits may also come as an object {layer: bits}
    assert QuantConfig.from_dict({"layer_bits": {"b": 2, "a": 8}}).layer_bits == (
        ("a", 8),
        ("b", 2),
    )


# --- refusals: files and links are hostile input ---------------------------------------------

REFUSED = [
    (QuantConfig, [], "must be a mapping"),
    (QuantConfig, "bits=4", "must be a mapping"),
    (QuantConfig, {"bitz": 4}, "no setting 'bitz'.*bits, symmetric"),
    (QuantConfig, {"bits": "8"}, "whole number"),
    (QuantConfig, {"bits": 0}, "from 1 to 16"),
    (QuantConfig, {"bits": 4.5}, "whole number"),
    (QuantConfig, {"bits": True}, "whole number"),
    (QuantConfig, {"bits": 10**400}, "from 1 to 16"),
    (QuantConfig, {"bits": 10**5000}, "too long to show"),
    (QuantConfig, {"symmetric": "false"}, "symmetric must be true or false"),
    (QuantConfig, {"per_channel": 1}, "per_channel must be true or false"),
    (QuantConfig, {"clip": float("nan")}, "finite"),
    (QuantConfig, {"clip": "0.5"}, "finite"),
    (QuantConfig, {"clip": 2.0}, "clip ratio"),
    (QuantConfig, {"clip_mode": "max"}, "clip_mode must be one of"),
    (QuantConfig, {"clip_mode": ["ratio"]}, "clip_mode must be one of"),
    (QuantConfig, {"rounding": None}, "rounding must be one of"),
    (QuantConfig, {"seed": -1}, "seed must be from 0"),
    (QuantConfig, {"seed": 2**64}, "seed must be from 0"),
    (QuantConfig, {"seed": 1.0}, "seed must be a whole number"),
    (QuantConfig, {"layer_bits": 5}, "layer_bits must be a list"),
    (QuantConfig, {"layer_bits": "fc1:4"}, "layer_bits must be a list"),
    (QuantConfig, {"layer_bits": [["fc1"]]}, "layer_bits must be a list"),
    (QuantConfig, {"layer_bits": [[1, 4]]}, "layer_bits must be a list"),
    (QuantConfig, {"layer_bits": [["fc1", 17]]}, "bits for layer 'fc1'"),
    (QuantConfig, {"layer_bits": [["fc1", 4], ["fc1", 5]]}, "names layer 'fc1' twice"),
    (PruneConfig, {"rate": 1.0}, "below 1"),
    (PruneConfig, {"rate": -0.1}, "at least 0"),
    (PruneConfig, {"rate": "0.5"}, "finite"),
    (PruneConfig, {"structured": "yes"}, "structured must be true or false"),
    (PruneConfig, {"scope": "world"}, "scope must be one of layer, global"),
    (PruneConfig, {"amount": 0.5}, "no setting 'amount'"),
    (CompressionConfig, None, "must be a mapping"),
    (CompressionConfig, {"quant": 8}, "quant config must be a mapping"),
    (CompressionConfig, {"quant": {"bits": 0}}, "from 1 to 16"),
    (CompressionConfig, {"prune": [0.5]}, "prune config must be a mapping"),
    (CompressionConfig, {"layers": "fc1"}, "layers must be a list"),
    (CompressionConfig, {"layers": ["fc1", 2]}, "layers must be a list"),
    (CompressionConfig, {"fold_bn": "true"}, "fold_bn must be true or false"),
    (CompressionConfig, {"quant": None, "extra": 1}, "no setting 'extra'.*quant, prune"),
]


@pytest.mark.parametrize(("cls", "d", "message"), REFUSED, ids=[m for *_, m in REFUSED])
def test_from_dict_refuses_with_a_sentence(cls, d, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        cls.from_dict(d)
    text = str(info.value)
    assert text.endswith(".") and len(text) < 400  # a sentence, hostile input cut short


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
config_keys = st.sampled_from(
    "quant prune layers fold_bn bits symmetric clip clip_mode seed layer_bits rate scope".split()
)
near_configs = st.dictionaries(config_keys, json_values, max_size=4) | st.dictionaries(
    st.just("quant"), st.dictionaries(config_keys, json_values, max_size=4)
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(d=near_configs | json_values)
def test_from_dict_on_any_json_gives_a_config_or_a_value_error(d) -> None:
    for cls in (CompressionConfig, QuantConfig, PruneConfig):
        try:
            cfg = cls.from_dict(d)
        except ValueError:
            continue
        assert cls.from_dict(through_json(cfg.to_dict())) == cfg


# --- flat settings: the one mapping to a config ------------------------------------------------

LAYERS = ("conv1", "conv2", "fc1", "fc2")


@st.composite
def flat_settings(draw) -> Settings:
    """Settings a link can carry: in range, on the sliders' steps (``:g`` keeps 6 digits)."""
    mode = draw(st.sampled_from(CLIP_MODES))
    r = CLIP_RANGES[mode]
    clip = draw(st.integers(round(r.lo * 1000), round(r.hi * 1000))) / 1000
    picked = draw(st.none() | st.sets(st.sampled_from(LAYERS), min_size=1))
    overrides = draw(st.dictionaries(st.sampled_from(LAYERS), st.integers(1, 16)))
    return Settings(
        bits=draw(st.none() | st.integers(1, 16)),
        clip=clip,
        clip_mode=mode,
        prune=draw(st.integers(0, round(MAX_PRUNE * 100))) / 100,
        symmetric=draw(st.booleans()),
        per_channel=draw(st.booleans()),
        rounding=draw(st.sampled_from(ROUNDINGS)),
        structured=draw(st.booleans()),
        scope=draw(st.sampled_from(SCOPES)),
        fold_bn=draw(st.booleans()),
        layers=None if picked is None else tuple(n for n in LAYERS if n in picked),
        layer_bits=tuple((n, overrides[n]) for n in LAYERS if n in overrides),
    )


@settings(max_examples=300, deadline=None)
@given(s=flat_settings())
def test_flat_settings_round_trip(s: Settings) -> None:
    flat = s.to_flat()
    assert all(isinstance(v, str) for v in flat.values()) and set(flat) <= set(SETTING_KEYS)
    assert Settings.from_flat(flat, LAYERS) == (s, [])


@settings(max_examples=300, deadline=None)
@given(s=flat_settings())
def test_settings_from_their_config_make_the_same_config(s: Settings) -> None:
    cfg = s.to_config()  # every setting a link can carry is a valid config
    back = Settings.from_config(cfg, LAYERS)
    assert back.to_config() == cfg
    assert CompressionConfig.from_dict(through_json(cfg.to_dict())) == cfg


def test_settings_from_config_keeps_model_order_and_refuses_a_seed() -> None:
    cfg = CompressionConfig(quant=QuantConfig(bits=6, layer_bits={"fc2": 3, "conv1": 8}))
    assert Settings.from_config(cfg, LAYERS).layer_bits == (("conv1", 8), ("fc2", 3))
    assert Settings.from_config(cfg).layer_bits == (("conv1", 8), ("fc2", 3))  # by name
    assert Settings.from_config(CompressionConfig(quant=None)) == Settings(bits=None)
    with pytest.raises(ValueError, match="seed 3"):
        Settings.from_config(CompressionConfig(quant=QuantConfig(seed=3)))


def test_flat_warnings_name_the_source_and_keep_defaults() -> None:
    s, warnings = Settings.from_flat(
        {"bits": "99", "prune": "0.5", "colour": "red"}, source="command line"
    )
    assert s == Settings(prune=0.5)
    assert warnings == [
        "The command line has an unknown setting `colour`; it was ignored.",
        "The command line's `bits=99` is not valid (a whole number from 1 to 16, or float); "
        "using the default.",
    ]
    _, warnings = Settings.from_flat({"layers": "fc9"}, ["fc1"], model="digits-mlp")
    assert warnings == [
        "The link's `layers=fc9` is not valid (comma-separated layers of digits-mlp: fc1); "
        "using the default."
    ]


@pytest.mark.parametrize("text", ["٤", "²", "٣", "4٠", "１６", " ", "", "+4", "4.0", "0x4", "-1"])
def test_whole_numbers_are_ascii_digits_only_everywhere(text: str) -> None:
    with pytest.raises(ValueError, match="whole number from 1 to 16"):
        parse_bits(text)
    with pytest.raises(ValueError, match="pairs such as fc1:4"):
        parse_layer_bits(f"fc1:{text}", ["fc1"])
    values, warnings = parse_flat({"bits": text, "layer_bits": f"fc1:{text}"}, ["fc1"])
    assert values == {} and len(warnings) == 2


@pytest.mark.parametrize("text", ["٠.٥", "nan", "inf", "-inf", "half", ""])
def test_numbers_are_ascii_and_finite(text: str) -> None:
    with pytest.raises(ValueError, match="finite number"):
        parse_number(text)
    assert parse_flat({"prune": text})[0] == {}


def test_parsers_accept_what_the_links_have_always_carried() -> None:
    assert [parse_bits(t) for t in ("1", " 16 ", "08", "float", "FP32", "32", "none")] == [
        1, 16, 8, None, None, None, None]  # fmt: skip
    assert parse_number(" 0.5 ") == 0.5 and parse_number("1e-2") == 0.01
    assert parse_layer_bits("fc2:8, fc1 : 4", ["fc1", "fc2"]) == (("fc1", 4), ("fc2", 8))


# --- moved from test_app.py with the Settings class ------------------------------------------


def test_canonical_settings_drop_unused_options() -> None:
    float_a = Settings(bits=None, clip=0.5, symmetric=False, prune=0.0, scope="global")
    assert float_a.canonical() == Settings(bits=None)
    assert Settings(clip_mode="mse", clip=0.3).canonical() == Settings(clip_mode="mse")
    kept = Settings(bits=4, clip=0.5, prune=0.2, scope="global")
    assert kept.canonical() == kept
    for s in (float_a, kept):
        assert s.canonical().to_config() == s.to_config()  # the same compression


def test_settings_to_config_and_bad_combinations() -> None:
    cfg = Settings(bits=4, prune=0.5, structured=True).to_config()
    assert cfg.quant.bits == 4 and cfg.prune.rate == 0.5 and cfg.prune.structured
    assert Settings(bits=None).to_config().quant is None
    assert Settings(prune=0.0).to_config().prune is None
    with pytest.raises(ValueError, match="at least one layer"):
        Settings(layers=()).to_config()
    with pytest.raises(ValueError, match="clip"):
        Settings(clip=0.0).to_config()
    assert re.fullmatch(r"4bit-prune0.5", Settings(bits=4, prune=0.5).slug())


def test_flat_activation_and_scale_settings_round_trip() -> None:
    from qcore.config import ActQuantConfig, QuantConfig

    s, warnings = Settings.from_flat({"bits": "4", "abits": "8", "aobs": "entropy",
                                      "scale": "pow2"})
    assert warnings == []
    cfg = s.to_config()
    assert cfg.quant == QuantConfig(bits=4, scale="pow2")
    assert cfg.act == ActQuantConfig(bits=8, observer="entropy", scale="pow2")
    assert s.to_flat() == {"bits": "4", "clip": "1", "clip_mode": "ratio", "prune": "0",
                           "scale": "pow2", "aobs": "entropy", "abits": "8"}
    assert Settings.from_flat(s.to_flat())[0] == s
    assert Settings.from_config(cfg) == s
    assert s.wa_label() == "W4A8" and Settings().wa_label() == "W8A32"
    assert Settings(bits=None).to_config().act is None
    for bad in ({"abits": "1"}, {"abits": "٨"}, {"aobs": "kl"}, {"scale": "log"}):
        t, warnings = Settings.from_flat(bad)
        assert t == Settings() and len(warnings) == 1, bad
    assert Settings(abits=None, aobs="entropy").canonical() == Settings()


def test_numbers_are_plain_ascii_everywhere() -> None:
    from qcore.config import parse_number

    for bad in ("9_9.5", "inf", "nan", "0.\u0665", "\uff10.5", "1e", "--1", "0x10", ""):
        with pytest.raises(ValueError):
            parse_number(bad)
    s, warnings = Settings.from_flat({"clip": "9_9.5", "prune": "9" * 5000})
    assert s == Settings() and len(warnings) == 2
    assert all(len(w) < 200 for w in warnings)  # a long value is quoted cut short
    # at 1 bit the range and rounding choices change nothing: one cache key
    assert Settings(bits=1, symmetric=False, rounding="stochastic").canonical() == \
        Settings(bits=1).canonical()


# --------------------------------------------------------------- codebook and entropy coding


@st.composite
def deep_settings(draw) -> Settings:
    """Flat settings with a codebook and entropy coding drawn too."""
    from dataclasses import replace

    s = draw(flat_settings())
    codebook = draw(st.sampled_from(("uniform", "kmeans")))
    entropy = draw(st.sampled_from(("none", "huffman")))
    per_channel = s.per_channel and codebook == "uniform"  # k-means is per tensor
    return replace(s, codebook=codebook, entropy=entropy, per_channel=per_channel)


@settings(max_examples=200, deadline=None)
@given(s=deep_settings())
def test_codebook_and_entropy_settings_round_trip(s: Settings) -> None:
    flat = s.to_flat()
    assert Settings.from_flat(flat, LAYERS) == (s, [])
    assert ("codebook" in flat) == (s.codebook != "uniform")
    assert ("entropy" in flat) == (s.entropy != "none")
    cfg = s.to_config()
    assert cfg.entropy == (None if s.entropy == "none" else "huffman")
    if cfg.quant is not None:
        assert cfg.quant.codebook == s.codebook
    back = Settings.from_config(cfg, LAYERS)
    assert back.to_config() == cfg
    assert CompressionConfig.from_dict(through_json(cfg.to_dict())) == cfg
    c = s.canonical()
    assert c.canonical() == c and c.entropy == s.entropy
    if s.bits is not None and s.codebook == "kmeans":  # what k-means ignores is reset
        d = Settings()
        assert (c.clip, c.clip_mode, c.symmetric, c.rounding) == (
            d.clip, d.clip_mode, d.symmetric, d.rounding)
        assert c.codebook == "kmeans"


def test_codebook_and_entropy_defaults_leave_links_and_labels_as_they_were() -> None:
    s = Settings(bits=4, prune=0.5)
    assert s.to_flat() == {"bits": "4", "clip": "1", "clip_mode": "ratio", "prune": "0.5"}
    assert s.label() == "4 bits · clip 1 · symmetric · per-tensor · prune 0.5"
    assert s.slug() == "4bit-prune0.5"
    assert "entropy" not in s.to_config().to_dict()
    deep = Settings(bits=5, prune=0.9, scope="global", codebook="kmeans", entropy="huffman")
    assert deep.label() == "5 bits · k-means codebook · Huffman coded · prune 0.9"
    assert deep.slug() == "5bit-kmeans-huffman-prune0.9"
    assert deep.to_flat() == {"bits": "5", "clip": "1", "clip_mode": "ratio", "prune": "0.9",
                              "scope": "global", "codebook": "kmeans", "entropy": "huffman"}
    cfg = deep.to_config()
    assert cfg.quant.codebook == "kmeans" and cfg.entropy == "huffman"
    assert Settings.from_config(cfg) == deep


def test_codebook_settings_canonical_and_refusals() -> None:
    # k-means ignores the range, rounding and scale settings
    a = Settings(bits=4, codebook="kmeans", clip=0.3, clip_mode="sigma", symmetric=False,
                 rounding="stochastic", scale="pow2")
    assert a.canonical() == Settings(bits=4, codebook="kmeans")
    assert Settings(bits=None, codebook="kmeans").canonical() == Settings(bits=None)
    # per-channel scales with a codebook (issue 18 item 4): resolved one way everywhere,
    # one codebook per layer, and a sentence says so (the config itself still refuses it)
    clash = Settings(bits=4, codebook="kmeans", per_channel=True)
    assert clash.to_config() == Settings(bits=4, codebook="kmeans").to_config()
    assert clash.canonical() == Settings(bits=4, codebook="kmeans")
    assert clash.notes() == ("A k-means codebook is shared by a whole layer, so per-channel "
                             "scales do not apply: each layer gets one codebook (per-tensor).",)
    assert Settings(bits=4, per_channel=True).notes() == ()
    with pytest.raises(ValueError, match="entropy must be one of none, huffman"):
        Settings(entropy="zip").to_config()
    for bad in ({"codebook": "lloyd"}, {"entropy": "gzip"}):
        t, warnings = Settings.from_flat(bad)
        assert t == Settings() and len(warnings) == 1, bad


def test_cli_codebook_and_entropy_flags() -> None:
    from qcore.cli import _config, _evaluate_parser
    from qcore.models import build_model

    model = build_model("mlp", (1, 8, 8), 10)
    args = _evaluate_parser().parse_args(
        ["--bits", "4", "--codebook", "kmeans", "--entropy", "huffman", "--prune", "0.9",
         "--scope", "global"])  # fmt: skip
    cfg = _config(args, model)
    assert cfg.quant.codebook == "kmeans" and cfg.entropy == "huffman"
    assert cfg == Settings(bits=4, prune=0.9, scope="global", codebook="kmeans",
                           entropy="huffman").to_config()  # fmt: skip
    plain = _config(_evaluate_parser().parse_args(["--bits", "4"]), model)
    assert plain.quant.codebook == "uniform" and plain.entropy is None


def test_canonical_is_idempotent_when_overrides_name_only_float_layers() -> None:
    # found by hypothesis: the 1-bit rule ran before the overrides of uncompressed layers
    # were dropped, so a second canonical() reset the range again
    s = Settings(bits=1, symmetric=False, layers=("conv1",), layer_bits=(("conv2", 1),))
    c = s.canonical()
    assert c.layer_bits == () and c.symmetric is True
    assert c.canonical() == c


def test_keeps_float_only_when_nothing_changes_the_model() -> None:
    assert Settings(bits=None).to_config().keeps_float
    assert Settings(bits=None, fold_bn=False).to_config().keeps_float
    for s in (Settings(bits=8), Settings(bits=None, prune=0.5), Settings(bits=None, abits=8),
              Settings(bits=None, drop=("layer1",))):
        assert not s.to_config().keeps_float, s
