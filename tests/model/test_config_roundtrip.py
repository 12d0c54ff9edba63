"""save_weights stores the layer's whole configuration, so load_weights gives
back a layer with an equal repr and bit-identical outputs for every option,
in both formats; files of mha_xp 0.1.0 (parameters and ``num_heads`` only)
still load, with the options passed to load_weights; an option that
contradicts the file, and a malformed configuration, are clear errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import mha_xp
from mha_xp._model._params import LayerConfig

MHA = mha_xp.MultiHeadAttention
E, H = 16, 4
FORMATS = ["npz", pytest.param("safetensors", marks=pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None,
    reason="the optional safetensors package is not installed"))]

CASES = {
    "plain": {},
    "rotary": dict(rotary=True),
    "rotary_base": dict(rotary=True, rotary_base=500.0),
    "rotary_interleaved": dict(rotary=True, rotary_interleaved=True),
    "rotary_dim": dict(rotary=True, rotary_dim=2),
    "window": dict(window=(2, 0)),
    "window-unbounded-side": dict(window=(-1, 1)),
    "alibi-true": dict(alibi=True),
    "alibi-slopes": dict(alibi=[0.3, -0.1, 0.2, 0.05]),
    "softcap": dict(softcap=0.7),
    "add_zero_attn": dict(add_zero_attn=True),
    "add_bias_kv": dict(add_bias_kv=True),
    "normalize_qk": dict(normalize_qk=True),
    "num_kv_heads": dict(num_kv_heads=2),
    "kdim-vdim": dict(kdim=5, vdim=3),
    "no-bias": dict(bias=False),
    "dropout": dict(dropout=0.3),
    "everything": dict(num_kv_heads=2, rotary=True, rotary_base=100.0, rotary_dim=2,
                       normalize_qk=True, window=(3, None), alibi=True, softcap=2.0,
                       add_bias_kv=True, add_zero_attn=True, dropout=0.1),
}


def _inputs(layer, rng, B=2, L=5, S=6):
    x = rng.standard_normal((B, L, layer.embed_dim))
    if layer.kdim == layer.vdim == layer.embed_dim:
        return (x,)
    return x, rng.standard_normal((B, S, layer.kdim)), rng.standard_normal((B, S, layer.vdim))


def _outputs(layer, inputs, convert=lambda a: a):
    """Every way of calling that an option changes: causal or not, dropout on."""
    args = [convert(a) for a in inputs]
    return [layer(*args, is_causal=causal, training=True, dropout_seed=5)
            for causal in (False, True)]


def assert_same_layer(loaded, layer, inputs, convert=lambda a: a, to_numpy=np.asarray):
    assert repr(loaded) == repr(layer)
    assert loaded.config == layer.config
    assert list(loaded.state_dict()) == list(layer.state_dict())
    for got, want in zip(_outputs(loaded, inputs, convert), _outputs(layer, inputs, convert)):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


def _save(layer, tmp_path: Path, fmt: str, name: str = "w") -> Path:
    path = tmp_path / f"{name}.{fmt}"
    mha_xp.save_weights(layer, path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_per_option(case, fmt, tmp_path, rng):
    layer = MHA(E, H, seed=0, **CASES[case])
    loaded = mha_xp.load_weights(_save(layer, tmp_path, fmt))
    assert_same_layer(loaded, layer, _inputs(layer, rng))
    options = set(CASES[case]) & set(layer.config.options())
    if options:  # not parameters: a state dict alone rebuilds another layer
        plain = MHA.from_state_dict(layer.state_dict(), num_heads=H)
        assert repr(plain) != repr(layer)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["everything", "kdim-vdim", "no-bias"])
def test_round_trip_on_every_backend(backend, dtype, case, fmt, tmp_path, rng):
    layer = MHA(E, H, seed=0, xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype),
                **CASES[case])
    loaded = mha_xp.load_weights(_save(layer, tmp_path, fmt), xp=backend.xp,
                                 device=backend.device)
    assert loaded.xp is layer.xp and loaded.device == layer.device
    assert loaded.dtype == layer.dtype
    assert_same_layer(loaded, layer, _inputs(layer, rng),
                      convert=lambda a: backend.asarray(a, dtype), to_numpy=backend.to_numpy)


def test_repr_shows_every_option_and_equal_configs_print_alike():
    layer = MHA(E, H, seed=0, **CASES["everything"])
    for name, value in CASES["everything"].items():
        assert f"{name}=" in repr(layer), name
    same = MHA.from_state_dict(layer.state_dict(), num_heads=H, **layer.config.options())
    assert repr(same) == repr(layer) and same.config == layer.config
    slopes = MHA(E, H, alibi=mha_xp.alibi_slopes(H), window=(-5, 0), seed=1)
    assert repr(slopes) == repr(MHA(E, H, alibi=True, window=(None, 0), seed=2))


# -- files without a configuration: mha_xp 0.1.0 -------------------------------------


def _old_npz(layer, tmp_path: Path) -> Path:
    path = tmp_path / "old.npz"
    np.savez(path, **layer.state_dict(), num_heads=np.asarray(layer.num_heads))
    return path


def _old_safetensors(layer, tmp_path: Path) -> Path:
    from safetensors.numpy import save_file

    path = tmp_path / "old.safetensors"
    save_file(dict(layer.state_dict()), path, metadata={"num_heads": str(layer.num_heads)})
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_of_version_0_1_0_loads(fmt, tmp_path, rng):
    layer = MHA(E, H, seed=0, **CASES["everything"])
    path = (_old_npz if fmt == "npz" else _old_safetensors)(layer, tmp_path)
    inputs = _inputs(layer, rng)
    plain = mha_xp.load_weights(path)  # the parameters alone: add_bias_kv, normalize_qk, GQA
    assert plain.config == dataclasses.replace(
        layer.config, **{n: f.default for n, f in LayerConfig.__dataclass_fields__.items()
                         if n in layer.config.options()})
    assert not np.array_equal(_outputs(plain, inputs)[1], _outputs(layer, inputs)[1])
    options = {n: CASES["everything"][n] for n in layer.config.options() if n in CASES["everything"]}
    assert_same_layer(mha_xp.load_weights(path, **options), layer, inputs)


def test_options_of_a_0_1_0_file_are_validated_as_arguments(tmp_path):
    path = _old_npz(MHA(E, H, seed=0), tmp_path)
    for bad in (dict(softcap="a"), dict(window=(1.5, 0)), dict(alibi=[0.5]), dict(dropout=2.0)):
        with pytest.raises((TypeError, ValueError)) as from_file:
            mha_xp.load_weights(path, **bad)
        with pytest.raises(from_file.type) as from_layer:
            MHA(E, H, **bad)
        assert str(from_file.value) == str(from_layer.value)  # the argument's error, not the file's
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['rotery'\]"):
        mha_xp.load_weights(path, rotery=True)
    with pytest.raises(TypeError, match="unexpected option"):
        mha_xp.load_weights(path, kdim=E)  # a size: the weights decide it


# -- options passed to load_weights -------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_agreeing_options_are_fine(fmt, tmp_path, rng):
    layer = MHA(E, H, seed=0, rotary=True, window=(None, 0), alibi=True, softcap=1.0)
    path = _save(layer, tmp_path, fmt)
    loaded = mha_xp.load_weights(path, rotary=True, window=(-3, 0), alibi=mha_xp.alibi_slopes(H),
                                 softcap=1, dropout=0.0)
    assert_same_layer(loaded, layer, _inputs(layer, rng))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name,given,stored", [
    ("rotary", False, "True"), ("rotary_base", 500.0, "10000.0"), ("window", (1, 0), "(None, 0)"),
    ("alibi", False, "(0.25, 0.0625, 0.015625, 0.00390625)"), ("softcap", None, "1.0"),
    ("dropout", 0.5, "0.0"), ("add_zero_attn", True, "False"),
])
def test_conflicting_option_is_an_error(fmt, name, given, stored, tmp_path):
    layer = MHA(E, H, seed=0, rotary=True, window=(None, 0), alibi=True, softcap=1.0)
    path = _save(layer, tmp_path, fmt)
    with pytest.raises(ValueError) as info:
        mha_xp.load_weights(path, **{name: given})
    message = str(info.value)
    for fragment in (str(path), f"stores {name}={stored}", f"given {name}={given!r}"):
        assert fragment in message, message


def test_bad_option_value_for_a_file_with_a_configuration(tmp_path):
    path = _save(MHA(E, H, seed=0), tmp_path, "npz")
    with pytest.raises(TypeError, match="softcap must be a positive finite Python float"):
        mha_xp.load_weights(path, softcap="a")


# -- malformed configurations ---------------------------------------------------------


def _with_config(layer, tmp_path: Path, fmt: str, config) -> Path:
    """A file of ``layer`` whose configuration member is ``config`` (a str
    goes in as it is, anything else as JSON)."""
    if fmt == "npz":
        path = tmp_path / "bad.npz"
        member = config if isinstance(config, np.ndarray) else np.asarray(
            config if isinstance(config, str) else json.dumps(config))
        np.savez(path, **layer.state_dict(), num_heads=np.asarray(layer.num_heads),
                 mha_xp_config=member)
        return path
    from safetensors.numpy import save_file

    path = tmp_path / "bad.safetensors"
    text = config if isinstance(config, str) else json.dumps(config)
    save_file(dict(layer.state_dict()), path,
              metadata={"num_heads": str(layer.num_heads), "mha_xp_config": text})
    return path


def _good(**changes):
    return MHA(E, H, seed=0).config.to_dict() | changes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("config,fragments", [
    ("{not json", ["malformed layer configuration", "JSONDecodeError"]),
    ("", ["malformed layer configuration"]),
    ([1, 2], ["malformed layer configuration", "mapping", "list"]),
    (_good(rotery=True), ["malformed", "unknown layer configuration key", "rotery"]),
    ({"num_heads": H}, ["malformed", "needs ['embed_dim']"]),
    (_good(rotary_base=-1.0), ["malformed", "rotary_base must be a positive finite"]),
    (_good(window=[1.5, 0]), ["malformed", "window must be a pair of ints"]),
    (_good(alibi=[0.5]), ["malformed", "alibi must hold num_heads = 4"]),
    # head_dim is free (num_heads * head_dim need not be embed_dim): a wrong one is
    # a configuration that does not match the weights.
    (_good(head_dim=2), ["inconsistent", "head_dim=2", "head_dim=4"]),
    (_good(kdim=5), ["inconsistent", "kdim=5", "kdim=16"]),
    (_good(embed_dim=8, head_dim=2), ["inconsistent", "embed_dim=8", "embed_dim=16"]),
    (_good(add_bias_kv=True), ["inconsistent", "add_bias_kv=True"]),
    (_good(num_heads=2, num_kv_heads=2, head_dim=8), ["records num_heads=4", "num_heads=2"]),
], ids=["not-json", "empty", "not-an-object", "unknown-key", "missing-key", "bad-value",
        "bad-window", "alibi-count", "head_dim", "kdim", "embed_dim", "flag", "num_heads"])
def test_malformed_configuration(fmt, config, fragments, tmp_path):
    path = _with_config(MHA(E, H, seed=0), tmp_path, fmt, config)
    with pytest.raises(ValueError) as info:
        mha_xp.load_weights(path)
    message = str(info.value)
    for fragment in (str(path), *fragments):
        assert fragment in message, message


@pytest.mark.parametrize("member", [np.asarray(3), np.asarray(["{}", "{}"]),
                                    np.zeros(2)], ids=["int", "vector", "floats"])
def test_npz_configuration_must_be_a_unicode_scalar(member, tmp_path):
    path = _with_config(MHA(E, H, seed=0), tmp_path, "npz", member)
    with pytest.raises(ValueError, match="mha_xp_config must be a 0-d unicode array"):
        mha_xp.load_weights(path)


# -- the configuration object ---------------------------------------------------------


def test_config_to_dict_is_plain_json_and_reads_back():
    config = MHA(E, H, seed=0, **CASES["everything"]).config
    data = config.to_dict()
    assert list(data) == [f.name for f in dataclasses.fields(LayerConfig)]
    assert json.loads(json.dumps(data)) == data
    assert LayerConfig.from_dict(json.loads(json.dumps(data))) == config
    assert LayerConfig.from_dict({"embed_dim": E, "num_heads": H}) == MHA(E, H).config


def test_config_is_frozen_and_always_valid():
    config = MHA(E, H, seed=0).config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rotary = True  # type: ignore[misc]
    assert dataclasses.replace(config, window=(-1, 2)).window == (None, 2)
    with pytest.raises(TypeError, match="softcap must be"):
        dataclasses.replace(config, softcap="a")
    with pytest.raises(TypeError, match="a layer configuration must be a mapping"):
        LayerConfig.from_dict([("embed_dim", E)])
    with pytest.raises(TypeError, match="unexpected option"):
        LayerConfig.from_options(E, H, rotery=True)
