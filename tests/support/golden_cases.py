"""The configurations whose NumPy outputs ``tests/suites/test_golden.py`` pins bit for bit.

Each case returns a list of NumPy arrays (outputs, weights, gradients). They
cover masks, padding, causal with L != S, the chunked path, GQA, every
attention variant, dropout, the KV cache and both vector-Jacobian products.
``tests/golden/make_golden.py`` writes their values; change a case only
together with its golden file.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import mha_xp

sdpa = mha_xp.scaled_dot_product_attention
MHA = mha_xp.MultiHeadAttention


def _rng(n: int) -> np.random.Generator:
    return np.random.default_rng(1000 + n)


def _qkv(rng, lead, L, S, D, Dv=None, dtype=np.float64):
    Dv = D if Dv is None else Dv
    q = rng.standard_normal(lead + (L, D)).astype(dtype)
    k = rng.standard_normal(lead + (S, D)).astype(dtype)
    v = rng.standard_normal(lead + (S, Dv)).astype(dtype)
    return q, k, v


def mask_bias_causal() -> list[np.ndarray]:
    rng = _rng(0)
    q, k, v = _qkv(rng, (2, 3), 5, 7, 4, 6)
    mask = rng.random((2, 1, 5, 7)) < 0.7
    bias = rng.standard_normal((3, 5, 7))
    out, w = sdpa(q, k, v, mask=mask, bias=bias, is_causal=True, return_weights=True)
    out32 = sdpa(*(t.astype(np.float32) for t in (q, k, v)), mask=mask,
                 bias=bias.astype(np.float32), is_causal=True)
    return [out, w, out32]


def chunked_causal_l_ne_s() -> list[np.ndarray]:
    rng = _rng(1)
    q, k, v = _qkv(rng, (2, 2), 9, 13, 8)
    out, w = sdpa(q, k, v, is_causal=True, chunk_size=(4, 5), return_weights=True)
    out2, lse = mha_xp.attention_with_lse(q, k, v, is_causal=True, chunk_size=3)
    big = _qkv(rng, (1, 2), 600, 700, 8, dtype=np.float32)
    out3 = sdpa(*big, is_causal=True, memory_budget=0)
    return [out, w, out2, lse, out3]


def gqa_window_alibi_softcap() -> list[np.ndarray]:
    rng = _rng(2)
    q = rng.standard_normal((2, 4, 6, 8))
    k = rng.standard_normal((2, 2, 9, 8))
    v = rng.standard_normal((2, 2, 9, 5))
    slopes = mha_xp.alibi_slopes(4)
    kw = dict(window=(3, 1), alibi_slopes=slopes, softcap=2.5, is_causal=True)
    out, w = sdpa(q, k, v, return_weights=True, **kw)
    out_c = sdpa(q, k, v, chunk_size=(2, 4), **kw)
    out_lse = mha_xp.attention_with_lse(q, k, v, chunk_size=(4, 3), window=(-1, 2))
    return [out, w, out_c, *out_lse]


def packed_sequences() -> list[np.ndarray]:
    rng = _rng(3)
    q, k, v = _qkv(rng, (3,), 10, 12, 4)
    kw = dict(cu_seqlens_q=[0, 4, 10], cu_seqlens_k=np.array([0, 5, 12]), is_causal=True)
    out, w = sdpa(q, k, v, return_weights=True, **kw)
    out_c = sdpa(q, k, v, chunk_size=3, alibi_slopes=[0.5, 0.25, 0.125], **kw)
    out_s = sdpa(q, q, q, cu_seqlens_q=[0, 3, 3, 10], window=(2, 0))
    return [out, w, out_c, out_s]


def dropout() -> list[np.ndarray]:
    rng = _rng(4)
    q, k, v = _qkv(rng, (2, 2), 6, 8, 4)
    out, w = sdpa(q, k, v, dropout_p=0.3, seed=7, return_weights=True, is_causal=True)
    out_c = sdpa(q, k, v, dropout_p=0.3, seed=7, chunk_size=(2, 3), is_causal=True)
    y, backward = mha_xp.attention_vjp(q, k, v, dropout_p=0.25, seed=11, window=(2, 2))
    g = backward(rng.standard_normal(y.shape))
    return [out, w, out_c, y, g["query"], g["key"], g["value"]]


def vjp_mask_bias() -> list[np.ndarray]:
    rng = _rng(5)
    q, k, v = _qkv(rng, (2, 3), 5, 6, 4, 3)
    mask = rng.random((5, 6)) < 0.8
    bias = rng.standard_normal((2, 1, 5, 6))
    arrays = []
    for chunk in (None, (2, 4)):
        y, backward = mha_xp.attention_vjp(q, k, v, mask=mask, bias=bias, is_causal=True,
                                           chunk_size=chunk, softcap=3.0)
        g = backward(rng.standard_normal(y.shape))
        arrays += [y, g["query"], g["key"], g["value"], g["bias"]]
    return arrays


def layer_padding_masks() -> list[np.ndarray]:
    rng = _rng(6)
    layer = MHA(12, 3, kdim=5, vdim=7, seed=0)
    x = rng.standard_normal((2, 4, 12))
    kk, vv = rng.standard_normal((2, 6, 5)), rng.standard_normal((2, 6, 7))
    pad = np.array([[False] * 5 + [True], [False] * 6])
    mask = rng.random((4, 6)) < 0.8
    y, w = layer(x, kk, vv, key_padding_mask=pad, mask=mask, return_weights=True,
                 average_weights=False)
    y_self = MHA(12, 3, seed=1)(x, is_causal=True, chunk_size=2)
    y32 = MHA(12, 3, seed=1, dtype=np.float32)(x.astype(np.float32), is_causal=True)
    return [y, w, y_self, y32]


def layer_variants() -> list[np.ndarray]:
    rng = _rng(7)
    layer = MHA(16, 4, num_kv_heads=2, rotary=True, rotary_dim=2, normalize_qk=True,
                window=(3, None), alibi=True, softcap=4.0, seed=2)
    x = rng.standard_normal((2, 7, 16))
    y = layer(x, is_causal=True)
    y_c = layer(x, is_causal=True, chunk_size=(3, 2))
    layer2 = MHA(8, 2, add_bias_kv=True, add_zero_attn=True, rotary=True,
                 rotary_interleaved=True, seed=3)
    y2, w2 = layer2(x[..., :8], is_causal=True, return_weights=True)
    return [y, y_c, y2, w2]


def layer_extras_alibi_window() -> list[np.ndarray]:
    rng = _rng(8)
    layer = MHA(8, 2, add_bias_kv=True, alibi=True, window=(2, 0), seed=4)
    x = rng.standard_normal((3, 5, 8))
    y, w = layer(x, is_causal=True, return_weights=True, average_weights=False)
    return [y, w]


def layer_cache() -> list[np.ndarray]:
    rng = _rng(9)
    layer = MHA(16, 4, num_kv_heads=2, rotary=True, alibi=True, window=(4, 0), seed=5)
    x = rng.standard_normal((2, 9, 16))
    cache = layer.init_cache(2, 12)
    outs = []
    y, cache = layer(x[:, :4], cache=cache, is_causal=True)
    outs.append(y)
    for t in range(4, 9):
        y, w, cache = layer(x[:, t:t + 1], cache=cache, is_causal=True, return_weights=True)
        outs += [y, w]
    return outs + [cache.key, cache.value]


def layer_vjp() -> list[np.ndarray]:
    rng = _rng(10)
    arrays = []
    for kw in (dict(), dict(num_kv_heads=1, normalize_qk=True, rotary=True, add_bias_kv=True,
                             softcap=3.0)):
        layer = MHA(12, 3, seed=6, **kw)
        x = rng.standard_normal((2, 5, 12))
        y, backward = layer.vjp(x, is_causal=True, bias=rng.standard_normal((3, 5, 5)))
        g = backward(rng.standard_normal(y.shape))
        arrays += [y] + [g[n] for n in sorted(g)]
    layer = MHA(8, 2, kdim=3, vdim=4, dropout=0.2, seed=7)
    x, kv = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 6, 3))
    vv = rng.standard_normal((2, 6, 4))
    pad = np.array([[False] * 6, [False] * 4 + [True] * 2])
    y, backward = layer.vjp(x, kv, vv, key_padding_mask=pad, training=True, dropout_seed=3,
                            chunk_size=(2, 4))
    g = backward(rng.standard_normal(y.shape))
    return arrays + [y] + [g[n] for n in sorted(g)]


def float16() -> list[np.ndarray]:
    rng = _rng(11)
    q, k, v = _qkv(rng, (2,), 6, 6, 4, dtype=np.float16)
    out, w = sdpa(q, k, v, is_causal=True, return_weights=True)
    out_c = sdpa(q, k, v, chunk_size=2, softcap=5.0)
    return [out, w, out_c]


CASES: dict[str, Callable[[], list[np.ndarray]]] = {
    f.__name__: f for f in (
        mask_bias_causal, chunked_causal_l_ne_s, gqa_window_alibi_softcap, packed_sequences,
        dropout, vjp_mask_bias, layer_padding_masks, layer_variants, layer_extras_alibi_window,
        layer_cache, layer_vjp, float16)
}
