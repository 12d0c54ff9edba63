"""Bugs the reliability campaign found, each pinned by a test."""

from __future__ import annotations

import numpy as np
import pytest

import mha_xp
from support import assert_close, rel_err
from support.reference import ref_attention

sdpa = mha_xp.scaled_dot_product_attention
MHA = mha_xp.MultiHeadAttention


class TestBroadcastShapes:
    @pytest.mark.parametrize("chunk", [None, 1])
    def test_weights_and_lse_have_the_full_shape(self, backend, dtype, rng, chunk):
        q, k = (rng.standard_normal((1, 1, 3, 2)) for _ in range(2))
        v = rng.standard_normal((2, 1, 3, 2))  # only value has the batch axis
        args = [backend.asarray(t, dtype) for t in (q, k, v)]
        out, w = sdpa(*args, return_weights=True, chunk_size=chunk)
        assert tuple(w.shape) == (2, 1, 3, 3) and tuple(out.shape) == (2, 1, 3, 2)
        out, lse = mha_xp.attention_with_lse(*args, chunk_size=chunk)
        assert tuple(lse.shape) == (2, 1, 3)
        merged, _ = mha_xp.merge_attention(out, lse, out, lse)
        assert_close(backend.to_numpy(merged), ref_attention(q, k, v)[0], dtype)

    @pytest.mark.parametrize("chunk", [None, 2])
    def test_zero_size_batch(self, rng, chunk):
        q = rng.standard_normal((0, 3, 4))
        out = sdpa(q, q, q, chunk_size=chunk)
        assert out.shape == (0, 3, 4)
        out, backward = mha_xp.attention_vjp(q, q, q, chunk_size=chunk)
        assert {n: g.shape for n, g in backward(out).items()} == {n: (0, 3, 4) for n in ("query", "key", "value")}
        y, layer_backward = MHA(4, 2, seed=0).vjp(q, chunk_size=chunk)
        grads = layer_backward(y)
        assert grads["query"].shape == (0, 3, 4) and not np.any(grads["in_proj_weight"])


class TestLowRankMasksAndBiases:
    @pytest.mark.parametrize("chunk", [None, 2])
    def test_0d_and_1d(self, backend, dtype, rng, chunk):
        x = rng.standard_normal((2, 3, 4))
        mask1 = np.array([True, False, True])
        bias1 = rng.standard_normal(3)
        args = [backend.asarray(x, dtype)] * 3
        out = sdpa(*args, mask=backend.asarray(mask1), bias=backend.asarray(bias1, dtype), chunk_size=chunk)
        ref = ref_attention(x, x, x, allowed=np.broadcast_to(mask1, (3, 3)), bias=np.broadcast_to(bias1, (3, 3)))[0]
        assert_close(backend.to_numpy(out), ref, dtype)
        out0 = sdpa(*args, mask=backend.asarray(np.array(True)),
                    bias=backend.asarray(np.array(0.5), dtype), chunk_size=chunk)
        assert_close(backend.to_numpy(out0), ref_attention(x, x, x)[0], dtype)

    def test_1d_bias_gradient(self, rng):
        x = rng.standard_normal((2, 3, 4))
        bias = rng.standard_normal(3)
        for chunk in (None, 2):
            out, backward = mha_xp.attention_vjp(x, x, x, bias=bias, chunk_size=chunk)
            grads = backward(np.ones_like(out) + x)
            assert grads["bias"].shape == (3,)
        dense = mha_xp.attention_vjp(x, x, x, bias=bias)[1](np.ones_like(out) + x)["bias"]
        np.testing.assert_allclose(grads["bias"], dense, rtol=1e-12, atol=1e-15)


class TestLargeScoresFloat32:
    def test_chunked_weights_and_gradients_exact_to_rounding(self):
        q = np.array([[1.0]], dtype=np.float32)
        k = np.array([[10005.0], [10002.0]], dtype=np.float32)
        v = np.eye(2, dtype=np.float32)
        _, dense = sdpa(q, k, v, scale=1.0, return_weights=True)
        _, chunked = sdpa(q, k, v, scale=1.0, return_weights=True, chunk_size=1)
        exact = np.array([[1 / (1 + np.exp(-3.0)), np.exp(-3.0) / (1 + np.exp(-3.0))]])
        assert rel_err(dense, exact) < 1e-6 and rel_err(chunked, exact) < 1e-6
        g_dense = mha_xp.attention_vjp(q, k, v, scale=1.0)[1](v[:1])
        g_chunk = mha_xp.attention_vjp(q, k, v, scale=1.0, chunk_size=1)[1](v[:1])
        for name in g_dense:
            assert rel_err(g_chunk[name], g_dense[name]) < 1e-5, name


class TestRejected:
    @pytest.mark.parametrize("shapes", [((2, 0, 4), (2, 3, 4)), ((2, 3, 4), (2, 0, 4))])
    def test_empty_sequences(self, shapes):
        q, k = (np.zeros(s) for s in shapes)
        with pytest.raises(ValueError, match="at least one position each"):
            sdpa(q, k, k)
        with pytest.raises(ValueError, match="at least one position each"):
            MHA(4, 2, seed=0)(q, k)

    @pytest.mark.parametrize("flag", ["is_causal", "return_weights"])
    def test_array_flags(self, flag, rng):
        x = rng.standard_normal((2, 3, 4))
        with pytest.raises(TypeError, match=f"{flag} must be a Python bool, got an array"):
            sdpa(x, x, x, **{flag: np.array([True, False])})
        with pytest.raises(TypeError, match="average_weights must be a Python bool"):
            MHA(4, 2, seed=0)(x, return_weights=True, average_weights=np.ones(2))

    def test_constructor_arguments(self):
        with pytest.raises(TypeError, match="seed must be None, a non-negative int"):
            MHA(4, 2, seed="abc")
        with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
            MHA(4, 2, seed=-1)
        with pytest.raises(TypeError, match="bias must be a Python bool, got an array"):
            MHA(4, 2, bias=np.ones(2))
        torch = pytest.importorskip("torch", reason="optional backend torch not installed")
        with pytest.raises(ValueError, match="device 'nonsense' is not a device of torch"):
            MHA(4, 2, xp=torch, device="nonsense")
        with pytest.raises(TypeError, match=r"dtype must be a real floating dtype of torch.*use torch.float32"):
            MHA(4, 2, xp=torch, dtype="float32")
        with pytest.raises(TypeError, match="dtype must be a real floating dtype of torch, got float32"):
            MHA(4, 2, xp=torch, dtype=np.float32)

    def test_merge_arguments(self, rng):
        out, lse = mha_xp.attention_with_lse(*(rng.standard_normal((3, 2)) for _ in range(3)))
        with pytest.raises(ValueError, match=r"must have shape \(\.\.\., L, Dv\)"):
            o, l = np.asarray(out[0, 0]), np.asarray(lse[0])  # 0-d arrays
            mha_xp.merge_attention(o, l, o, l)
        with pytest.raises(TypeError, match="lse1 and lse2 have dtype float32 but out1 and out2 are float64"):
            mha_xp.merge_attention(out, lse.astype(np.float32), out, lse.astype(np.float32))

    def test_backward_of_none(self, rng):
        x = rng.standard_normal((2, 3))
        with pytest.raises(TypeError, match="grad_out must be an array"):
            mha_xp.attention_vjp(x, x, x)[1](None)
