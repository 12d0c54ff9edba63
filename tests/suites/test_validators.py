"""One validator per argument: the function API and the layer refuse a bad
value of an option they share with the same exception and the same message
(naming the argument as each API spells it), and read a good value the same
way.

The shared options: ``window``, ``softcap``, the dropout probability
(``dropout_p`` of :func:`mha_xp.scaled_dot_product_attention`, ``dropout`` of
the layer, after torch), ALiBi slopes where both take the same value, and
RoPE's base (``base`` of :func:`mha_xp.apply_rotary`, ``rotary_base`` of the
layer). ``scale`` is not an option of the layer (it always scales by
``1/sqrt(head_dim)``), so it has no case here.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import mha_xp

MHA = mha_xp.MultiHeadAttention
sdpa = mha_xp.scaled_dot_product_attention
E, H = 8, 2
D = E // H

# (the function API's argument, the layer's, a bad value)
BAD = [
    *[("window", "window", w) for w in [
        3, "3", (1,), (1, 2, 3), {1, 2}, np.array([1, 2]), (1.5, 2), (1, 2.0), ("a", 0),
        (True, 0), (0, False), (np.float64(1.0), 0)]],
    *[("softcap", "softcap", c) for c in [
        "1", True, [1.0], np.ones(1), 0.0, -1.0, math.nan, math.inf, -math.inf, 1j]],
    *[("dropout_p", "dropout", p) for p in [
        "0.1", True, None, [0.1], np.ones(()), -0.1, 1.5, math.nan, math.inf, 1j]],
    # Slopes given as a list are read on the host by both APIs.
    *[("alibi_slopes", "alibi", s) for s in ([math.nan, 0.5], [0.5, math.inf])],
]


def _ids(case) -> str:
    values = case.values if hasattr(case, "values") else case
    return f"{values[1]}={values[2]!r}"


def _error(call) -> tuple[type[BaseException], str]:
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return info.type, str(info.value)


@pytest.fixture
def qkv(rng):
    """Per-head inputs, as the layer's heads: (B, H, L, D)."""
    return [rng.standard_normal((2, H, 5, D)) for _ in range(3)]


@pytest.mark.parametrize("fn_name,layer_name,value", BAD, ids=[_ids(c) for c in BAD])
def test_same_error_from_both_apis(qkv, fn_name, layer_name, value):
    fn_type, fn_message = _error(lambda: sdpa(*qkv, **{fn_name: value}))
    expected = fn_message.replace(fn_name, layer_name)  # each API's name for the argument
    state = MHA(E, H, seed=0).state_dict()
    for build in (lambda: MHA(E, H, **{layer_name: value}),
                  lambda: MHA.from_state_dict(state, num_heads=H, **{layer_name: value})):
        layer_type, layer_message = _error(build)
        assert layer_type is fn_type, (layer_message, fn_message)
        assert layer_message == expected


@pytest.mark.parametrize("base", ["1e4", True, None, [1e4], 0.0, -1.0, math.nan, math.inf])
def test_rotary_base_same_error_as_apply_rotary(base, rng):
    x = rng.standard_normal((1, H, 5, D))
    fn_type, fn_message = _error(lambda: mha_xp.apply_rotary(x, base=base))
    layer_type, layer_message = _error(lambda: MHA(E, H, rotary=True, rotary_base=base))
    assert layer_type is fn_type
    assert layer_message == fn_message.replace("base", "rotary_base")


@pytest.mark.parametrize("alibi", ["yes", b"yes", 1, 0.5, {"a": 1.0}, [0.5, "a"], [0.5, True],
                                   np.ones((1, H)), [math.nan, 0.5], [0.5], [0.5] * (H + 1)])
def test_alibi_of_the_layer(alibi):
    """The layer's own bool-or-slopes option: strings, scalars and non-number
    slopes are a TypeError, NaN or a wrong count a ValueError, each naming
    ``alibi``."""
    with pytest.raises((TypeError, ValueError), match="^alibi must "):
        MHA(E, H, alibi=alibi)


# -- good values: both APIs read them the same way --------------------------------


def _via_sdpa(layer, x, **kw):
    """The layer's output computed with the function API on its projections."""
    sd = layer.state_dict()
    q, k, v = np.split(x @ sd["in_proj_weight"].T + sd["in_proj_bias"], 3, axis=-1)
    B, L, _ = x.shape
    heads = [t.reshape(B, L, H, D).transpose(0, 2, 1, 3) for t in (q, k, v)]
    merged = sdpa(*heads, **kw).transpose(0, 2, 1, 3).reshape(B, L, E)
    return merged @ sd["out_proj.weight"].T + sd["out_proj.bias"]


def _unbounded_as(side, none):
    return none if side is None or side < 0 else int(side)


@pytest.mark.parametrize("window", [
    None, (0, 0), (3, 1), [2, 1], (3, None), (None, 2), (-1, 2), (-7, 2), (-3, None),
    (np.int64(2), np.int32(1)), (None, None), (-1, -1)], ids=repr)
@pytest.mark.parametrize("is_causal", [False, True])
def test_window_means_the_same(window, is_causal, qkv, rng):
    fn_form = None if window is None else tuple(_unbounded_as(s, -1) for s in window)
    layer_form = None if fn_form in (None, (-1, -1)) else tuple(
        _unbounded_as(s, None) for s in fn_form)
    np.testing.assert_array_equal(sdpa(*qkv, window=window, is_causal=is_causal),
                                  sdpa(*qkv, window=fn_form, is_causal=is_causal))
    layer = MHA(E, H, window=window, seed=0)
    assert layer.config.window == layer_form
    assert repr(layer) == repr(MHA(E, H, window=layer_form, seed=0))
    x = rng.standard_normal((2, 6, E))
    np.testing.assert_allclose(layer(x, is_causal=is_causal),
                               _via_sdpa(layer, x, window=window, is_causal=is_causal),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("softcap", [None, 1, 2.5, np.float64(0.5), np.float32(0.5),
                                     Fraction(1, 2)], ids=repr)
def test_softcap_means_the_same(softcap, qkv, rng):
    plain = None if softcap is None else float(softcap)
    np.testing.assert_array_equal(sdpa(*qkv, softcap=softcap), sdpa(*qkv, softcap=plain))
    layer = MHA(E, H, softcap=softcap, seed=0)
    assert layer.config.softcap == plain and type(layer.config.softcap) is type(plain)
    x = rng.standard_normal((2, 6, E))
    np.testing.assert_allclose(layer(x), _via_sdpa(layer, x, softcap=softcap),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("p", [0, 0.0, 0.25, np.float64(0.25), np.float32(0.5), Fraction(1, 4),
                               1], ids=repr)
def test_dropout_means_the_same(p, qkv, rng):
    np.testing.assert_array_equal(sdpa(*qkv, dropout_p=p, seed=3),
                                  sdpa(*qkv, dropout_p=float(p), seed=3))
    layer = MHA(E, H, dropout=p, seed=0)
    assert layer.config.dropout == float(p) and type(layer.config.dropout) is float
    x = rng.standard_normal((2, 6, E))
    np.testing.assert_allclose(layer(x, training=True, dropout_seed=3),
                               _via_sdpa(layer, x, dropout_p=p, seed=3), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alibi", [True, mha_xp.alibi_slopes(H), tuple(mha_xp.alibi_slopes(H)),
                                   np.asarray(mha_xp.alibi_slopes(H))], ids=repr)
def test_alibi_means_the_same(alibi, rng):
    layer = MHA(E, H, alibi=alibi, seed=0)
    assert layer.config.alibi == tuple(mha_xp.alibi_slopes(H))
    assert all(type(s) is float for s in layer.config.alibi)
    assert repr(layer) == repr(MHA(E, H, alibi=True, seed=0))
    x = rng.standard_normal((2, 6, E))
    np.testing.assert_allclose(layer(x, is_causal=True),
                               _via_sdpa(layer, x, alibi_slopes=mha_xp.alibi_slopes(H),
                                         is_causal=True), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alibi", [None, False, np.False_])
def test_alibi_off(alibi):
    assert MHA(E, H, alibi=alibi).config.alibi is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_alibi_slope_arrays_refused_on_host_backends(qkv, bad):
    # Host arrays are read for free; a GPU, lazy or traced array is not read.
    slopes = np.array([0.5, bad])
    with pytest.raises(ValueError, match="alibi_slopes must hold finite slopes"):
        sdpa(*qkv, alibi_slopes=slopes)
