"""Ported code meets errors that say what to write, not silent wrong answers.

- other libraries' keywords (torch, Keras, Flax) raise a ``TypeError`` that
  names mha_xp's argument, on every public entry point that could receive
  them;
- masks written for another convention (a ``(B, S)`` padding mask, Keras's
  ``(B, L, S)``, torch's ``(B·H, L, S)``) get an error that says which shape
  to pass;
- the layer refuses a 3-D mask whose reading would be ambiguous.
"""

from __future__ import annotations

import numpy as np
import pytest

import mha_xp
from mha_xp._porting import mask_shape_hint

RNG = np.random.default_rng(20261202)
Q = RNG.standard_normal((2, 4, 6, 8))
LAYER = mha_xp.MultiHeadAttention(32, 4, seed=0)
X = RNG.standard_normal((2, 6, 32))

FUNCTIONS = {
    "scaled_dot_product_attention": lambda **kw: mha_xp.scaled_dot_product_attention(Q, Q, Q, **kw),
    "attention_with_lse": lambda **kw: mha_xp.attention_with_lse(Q, Q, Q, **kw),
    "attention_vjp": lambda **kw: mha_xp.attention_vjp(Q, Q, Q, **kw),
}
LAYER_CALLS = {
    "MultiHeadAttention": lambda **kw: LAYER(X, **kw),
    "MultiHeadAttention.vjp": lambda **kw: LAYER.vjp(X, **kw),
}


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("keyword, fix", [
    ("attn_mask", "mask=~attn_mask"),
    ("need_weights", "return_weights=True"),
    ("key_padding_mask", "mask=~key_padding_mask[:, None, None, :]"),
    ("use_causal_mask", "is_causal=True"),
    ("attention_mask", "mask=attention_mask[:, None]"),
])
def test_functions_name_the_replacement_of_foreign_keywords(name, keyword, fix):
    with pytest.raises(TypeError) as err:
        FUNCTIONS[name](**{keyword: None})
    message = str(err.value)
    assert f"{name}() got an unexpected keyword argument {keyword!r}" in message
    assert fix in message


@pytest.mark.parametrize("name", LAYER_CALLS)
@pytest.mark.parametrize("keyword, fix", [
    ("attn_mask", "mask=~attn_mask"),
    ("need_weights", "return_weights=True"),
    ("average_attn_weights", "average_weights="),
    ("return_attention_scores", "return_weights=True"),
    ("deterministic", "training=True"),
])
def test_layer_calls_name_the_replacement_of_foreign_keywords(name, keyword, fix):
    with pytest.raises(TypeError) as err:
        LAYER_CALLS[name](**{keyword: None})
    assert f"got an unexpected keyword argument {keyword!r}" in str(err.value)
    assert fix in str(err.value)


@pytest.mark.parametrize("keyword, fix", [("batch_first", "always batch-first"),
                                          ("key_dim", "embed_dim="),
                                          ("qkv_features", "embed_dim=")])
def test_layer_constructor_names_the_replacement_of_foreign_keywords(keyword, fix):
    with pytest.raises(TypeError, match=fix):
        mha_xp.MultiHeadAttention(32, 4, **{keyword: True})


def test_unknown_keywords_keep_pythons_message():
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_option'"):
        mha_xp.scaled_dot_product_attention(Q, Q, Q, no_such_option=1)


def test_wrapped_entry_points_keep_their_signature_and_docs():
    import inspect
    for func in (mha_xp.scaled_dot_product_attention, mha_xp.MultiHeadAttention.__call__):
        assert "mask" in inspect.signature(func).parameters
        assert func.__doc__ and "Parameters" in func.__doc__


def test_torch_attn_mask_converted_as_the_message_says():
    torch = pytest.importorskip("torch", reason="optional backend torch unavailable")
    m = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    layer = mha_xp.MultiHeadAttention.from_torch(m, xp=np)
    x = torch.randn(2, 6, 32, dtype=torch.float32)
    attn_mask = torch.rand(6, 6) < 0.3
    attn_mask[:, 0] = False
    with torch.no_grad():
        ref, _ = m(x, x, x, attn_mask=attn_mask, need_weights=False)
    out = layer(x.numpy(), mask=~attn_mask.numpy())
    assert np.linalg.norm(out - ref.numpy()) / np.linalg.norm(ref.numpy()) < 1e-6


class TestMaskShapes:
    def test_padding_passed_as_mask_on_the_layer(self):
        keep = RNG.random((2, 6)) < 0.5
        with pytest.raises(ValueError, match=r"\(B, S\) padding: pass key_padding_mask="):
            LAYER(RNG.standard_normal((2, 5, 32)), RNG.standard_normal((2, 6, 32)), mask=keep)

    def test_padding_passed_as_mask_on_the_function(self):
        k = RNG.standard_normal((2, 4, 7, 8))
        with pytest.raises(ValueError, match=r"mask=keep\[:, None, None, :\]"):
            mha_xp.scaled_dot_product_attention(Q, k, k, mask=np.ones((2, 7), dtype=bool))

    def test_torch_3d_mask_on_the_layer(self):
        with pytest.raises(ValueError, match=r"reshape\(2, 4, 6, 6\)"):
            LAYER(X, mask=np.ones((8, 6, 6), dtype=bool))

    def test_keras_3d_mask_on_the_function(self):
        k = RNG.standard_normal((2, 4, 7, 8))
        with pytest.raises(ValueError, match=r"mask\[:, None\]"):
            mha_xp.scaled_dot_product_attention(Q, k, k, mask=np.ones((2, 6, 7), dtype=bool))

    def test_swapped_axes(self):
        assert "swapped" in mask_shape_hint((7, 6), (2, 4, 6, 7), padding_argument=False)

    def test_no_guess_for_an_unrelated_shape(self):
        assert mask_shape_hint((5, 5), (2, 4, 6, 7), padding_argument=False) == ""


class TestAmbiguous3DMaskOnTheLayer:
    @pytest.mark.parametrize("lead", [2, 4])   # B and H: both readings would run
    def test_refused_with_the_4d_shapes_to_pass(self, lead):
        with pytest.raises(ValueError) as err:
            LAYER(X, mask=np.ones((lead, 6, 6), dtype=bool))
        message = str(err.value)
        assert "3-D mask" in message and "(B, 1, L, S)" in message and "(1, H, L, S)" in message

    def test_leading_one_and_4d_masks_accepted(self):
        mask = RNG.random((6, 6)) < 0.7
        mask[:, 0] = True
        y = LAYER(X, mask=mask)
        assert np.array_equal(LAYER(X, mask=mask[None]), y)
        assert np.array_equal(LAYER(X, mask=mask[None, None]), y)
        per_batch = np.stack([mask, mask])[:, None]                # (B, 1, L, S)
        assert np.array_equal(LAYER(X, mask=per_batch), y)

    def test_unbatched_input_takes_a_per_head_3d_mask(self):
        mask = RNG.random((4, 6, 6)) < 0.7
        mask[..., 0] = True
        y = LAYER(X[0], mask=mask)
        assert np.allclose(y, LAYER(X[:1], mask=mask[None])[0], rtol=0, atol=1e-12)
