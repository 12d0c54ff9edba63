"""Score-level attention variants: grouped-query attention, sliding window,
ALiBi, logit soft-capping and packed variable-length sequences, against the
float64 reference of ``reference_variants.py`` on every backend, dense and
chunked, forward and backward, and against torch where torch has them."""

from __future__ import annotations

import numpy as np
import pytest

import mha_xp
from conftest import REL_TOL, assert_close, assert_preserved, rel_err
from reference_variants import central_differences, ref_alibi_slopes, ref_variants

torch = pytest.importorskip("torch", reason="optional backend torch not installed")

CHUNKS = [None, (3, 5), (2, 3)]
CHUNK_IDS = ["dense", "chunked35", "chunked23"]


def _grad_err(g, ref):
    g, ref = np.asarray(g, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert np.all(np.isfinite(g))
    return float(np.linalg.norm(g - ref) / max(np.linalg.norm(ref), 1e-300))


def _inputs(rng, B=2, hq=6, hkv=2, L=9, S=11, D=4, Dv=3):
    return (rng.standard_normal((B, hq, L, D)), rng.standard_normal((B, hkv, S, D)),
            rng.standard_normal((B, hkv, S, Dv)))


def _torch_sdpa(q, k, v, go, *, attn=None, enable_gqa=False, scale=None):
    """torch SDPA and its autograd gradients, float64."""
    tq, tk, tv = (torch.tensor(t, requires_grad=True) for t in (q, k, v))
    ta = None if attn is None else torch.tensor(attn)
    out = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=ta, enable_gqa=enable_gqa, scale=scale)
    out.backward(torch.tensor(go))
    return out.detach().numpy(), [t.grad.numpy() for t in (tq, tk, tv)]


class TestGQA:
    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    @pytest.mark.parametrize("hq,hkv", [(6, 2), (6, 3), (4, 1), (4, 4)])
    def test_forward_backward_vs_torch(self, rng, chunk, hq, hkv):
        q, k, v = _inputs(rng, hq=hq, hkv=hkv)
        mask = rng.random((2, 1, 9, 11)) < 0.8
        go = rng.standard_normal((2, hq, 9, 3))
        attn = np.where(mask, 0.0, -np.inf)
        t_out, t_grads = _torch_sdpa(q, k, v, go, attn=attn, enable_gqa=True)
        out, backward = mha_xp.attention_vjp(q, k, v, mask=mask, chunk_size=chunk)
        assert rel_err(out, t_out) < 1e-13
        grads = backward(go)
        for name, tg in zip(("query", "key", "value"), t_grads):
            assert grads[name].shape == tg.shape
            assert _grad_err(grads[name], tg) < 1e-12, name
        ref, _ = ref_variants(q, k, v, allowed=mask)
        assert rel_err(out, ref) < 1e-13

    def test_no_copy_of_keys_per_head(self, rng):
        # The key gradient of a group is the sum over its query heads: with the
        # query heads of one group identical, it is G times one head's.
        q, k, v = _inputs(rng, hq=4, hkv=2)
        q[:, 1] = q[:, 0]
        go = rng.standard_normal((2, 4, 9, 3))
        go[:, 1] = go[:, 0]
        _, backward = mha_xp.attention_vjp(q, k, v)
        dk = backward(go)["key"]
        _, single = mha_xp.attention_vjp(q[:, :1], k[:, :1], v[:, :1])
        np.testing.assert_allclose(dk[:, 0], 2 * single(go[:, :1])["key"][:, 0], rtol=1e-12)

    @pytest.mark.parametrize("chunk", [None, (3, 5)], ids=["dense", "chunked"])
    def test_backends(self, backend, dtype, rng, chunk):
        q, k, v = _inputs(rng, hq=6, hkv=2)
        bias = rng.standard_normal((6, 9, 11))
        ref, ref_w = ref_variants(q, k, v, bias=bias, is_causal=True)
        args = [backend.asarray(t, dtype) for t in (q, k, v)]
        out, w = mha_xp.scaled_dot_product_attention(
            *args, bias=backend.asarray(bias, dtype), is_causal=True, chunk_size=chunk,
            return_weights=True)
        assert_preserved(backend, out, dtype, (2, 6, 9, 3))
        assert_close(backend.to_numpy(out), ref, dtype)
        assert_close(backend.to_numpy(w), ref_w, dtype)
        out2, lse = mha_xp.attention_with_lse(*args, is_causal=True, chunk_size=chunk,
                                              bias=backend.asarray(bias, dtype))
        assert tuple(lse.shape) == (2, 6, 9)
        assert_close(backend.to_numpy(out2), ref, dtype)

    def test_float16(self, backend_f16, rng):
        q, k, v = _inputs(rng, hq=4, hkv=2)
        ref, _ = ref_variants(q, k, v, is_causal=True)
        out = mha_xp.scaled_dot_product_attention(
            *(backend_f16.asarray(t, "float16") for t in (q, k, v)), is_causal=True)
        assert_preserved(backend_f16, out, "float16", (2, 4, 9, 3))
        assert_close(backend_f16.to_numpy(out), ref, "float16")

    def test_errors(self, rng):
        q, k, v = _inputs(rng, hq=6, hkv=4)
        with pytest.raises(ValueError, match="query has 6 heads.*key and value have 4.*multiple"):
            mha_xp.scaled_dot_product_attention(q, k, v)
        q, k, v = _inputs(rng, hq=6, hkv=2)
        with pytest.raises(ValueError, match="enable_gqa=True"):
            mha_xp.scaled_dot_product_attention(q, k, v, enable_gqa=False)
        with pytest.raises(TypeError, match="enable_gqa must be a Python bool"):
            mha_xp.scaled_dot_product_attention(q, k, v, enable_gqa="yes")
        with pytest.raises(ValueError, match="same number of heads"):
            mha_xp.scaled_dot_product_attention(q, k, v[:, :1].repeat(3, axis=1))
        out = mha_xp.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert out.shape == (2, 6, 9, 3)
