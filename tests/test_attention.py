"""scaled_dot_product_attention against the float64 reference, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import mha_xp
from support import REL_TOL, assert_close, assert_preserved, make_backend, rel_err
from support.reference import ref_attention

sdpa = mha_xp.scaled_dot_product_attention

# (name, query shape, key shape, value shape): (..., H, L, D), (..., H, S, D), (..., H, S, Dv)
SHAPES = [
    ("square", (2, 3, 6, 8), (2, 3, 6, 8), (2, 3, 6, 8)),
    ("L<S, Dv!=D", (2, 2, 4, 5), (2, 2, 9, 5), (2, 2, 9, 7)),
    ("L>S", (1, 2, 7, 4), (1, 2, 3, 4), (1, 2, 3, 4)),
    ("no batch axis", (3, 5, 4), (3, 6, 4), (3, 6, 4)),
    ("broadcast batch", (2, 3, 5, 4), (1, 3, 6, 4), (1, 3, 6, 4)),
    ("L=S=1", (2, 1, 1, 3), (2, 1, 1, 3), (2, 1, 1, 3)),
]


def _inputs(rng, shapes):
    return [rng.standard_normal(s) for s in shapes]


class TestAgainstReference:
    @pytest.mark.parametrize("case", SHAPES, ids=[c[0] for c in SHAPES])
    @pytest.mark.parametrize("is_causal", [False, True])
    def test_plain_and_causal(self, backend, dtype, rng, case, is_causal):
        q, k, v = _inputs(rng, case[1:])
        out, w = sdpa(*(backend.asarray(t, dtype) for t in (q, k, v)),
                      is_causal=is_causal, return_weights=True)
        ref_out, ref_w = ref_attention(q, k, v, is_causal=is_causal)
        lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        assert_preserved(backend, out, dtype, lead + (q.shape[-2], v.shape[-1]))
        assert_preserved(backend, w, dtype, lead + (q.shape[-2], k.shape[-2]))
        if np.any(ref_out):
            assert_close(backend.to_numpy(out), ref_out, dtype)
        assert_close(backend.to_numpy(w), ref_w, dtype)

    def test_mask_bias_causal_scale(self, backend, dtype, rng):
        q, k, v = _inputs(rng, [(2, 3, 5, 4), (2, 3, 8, 4), (2, 3, 8, 6)])
        mask = rng.random((2, 1, 5, 8)) < 0.7  # broadcasts over heads
        bias = rng.standard_normal((3, 5, 8))  # broadcasts over batch
        out, w = sdpa(*(backend.asarray(t, dtype) for t in (q, k, v)),
                      mask=backend.asarray(mask), bias=backend.asarray(bias, dtype),
                      is_causal=True, scale=0.37, return_weights=True)
        ref_out, ref_w = ref_attention(q, k, v, allowed=mask, bias=bias, is_causal=True, scale=0.37)
        assert_close(backend.to_numpy(out), ref_out, dtype)
        assert_close(backend.to_numpy(w), ref_w, dtype)

    def test_default_scale_is_inverse_sqrt_head_dim(self, backend, dtype, rng):
        q, k, v = _inputs(rng, [(2, 4, 16), (2, 5, 16), (2, 5, 3)])
        args = [backend.asarray(t, dtype) for t in (q, k, v)]
        assert_close(backend.to_numpy(sdpa(*args)),
                     backend.to_numpy(sdpa(*args, scale=0.25)), dtype)
        assert rel_err(backend.to_numpy(sdpa(*args)), backend.to_numpy(sdpa(*args, scale=1.0))) > 1e-3

    def test_bias_minus_inf_masks(self, backend, dtype, rng):
        q, k, v = _inputs(rng, [(2, 4, 3), (2, 6, 3), (2, 6, 3)])
        allowed = rng.random((4, 6)) < 0.5
        allowed[:, 0] = True
        bias = np.where(allowed, 0.0, -np.inf)
        out = sdpa(*(backend.asarray(t, dtype) for t in (q, k, v)), bias=backend.asarray(bias, dtype))
        assert_close(backend.to_numpy(out), ref_attention(q, k, v, allowed=allowed)[0], dtype)


class TestFullyMaskedRows:
    def test_zero_output_and_weights_never_nan(self, backend, dtype, rng):
        q, k, v = _inputs(rng, [(2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 4)])
        mask = rng.random((2, 2, 5, 6)) < 0.6
        mask[0, 1, 2, :] = False  # one row with nothing to attend to
        mask[1, :, 4, :] = False
        out, w = sdpa(*(backend.asarray(t, dtype) for t in (q, k, v)),
                      mask=backend.asarray(mask), return_weights=True)
        out, w = backend.to_numpy(out), backend.to_numpy(w)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(w))
        assert np.all(out[0, 1, 2] == 0) and np.all(out[1, :, 4] == 0)
        assert np.all(w[0, 1, 2] == 0) and np.all(w[1, :, 4] == 0)
        row_sums = w.sum(axis=-1)
        live = mask.any(axis=-1)
        np.testing.assert_allclose(row_sums[live], 1.0, rtol=REL_TOL[dtype] * 10)
        assert_close(out, ref_attention(q, k, v, allowed=mask)[0], dtype)

    def test_causal_with_more_queries_than_keys(self, backend, dtype, rng):
        # bottom-right alignment: with L=5, S=3 the first two queries see no key
        q, k, v = _inputs(rng, [(1, 5, 4), (1, 3, 4), (1, 3, 4)])
        out, w = sdpa(*(backend.asarray(t, dtype) for t in (q, k, v)), is_causal=True,
                      return_weights=True)
        out, w = backend.to_numpy(out), backend.to_numpy(w)
        assert np.all(out[0, :2] == 0) and np.all(w[0, :2] == 0)
        np.testing.assert_allclose(w[0, 2], [1.0, 0.0, 0.0], atol=1e-7)
        assert_close(out, ref_attention(q, k, v, is_causal=True)[0], dtype)


class TestDeterminismAndAgreement:
    def test_repeated_calls_bit_identical(self, backend, dtype, rng):
        q, k, v = (backend.asarray(t, dtype) for t in _inputs(rng, [(2, 3, 7, 8)] * 3))
        mask = backend.asarray(rng.random((7, 7)) < 0.8)
        first = backend.to_numpy(sdpa(q, k, v, mask=mask, is_causal=True))
        for _ in range(3):
            np.testing.assert_array_equal(backend.to_numpy(sdpa(q, k, v, mask=mask, is_causal=True)), first)

    def test_numpy_and_strict_bit_identical(self, dtype, rng):
        np_b, strict = make_backend("numpy"), make_backend("array_api_strict")
        arrays = _inputs(rng, [(2, 3, 5, 8), (2, 3, 9, 8), (2, 3, 9, 4), (3, 5, 9)])
        mask = rng.random((2, 1, 5, 9)) < 0.8
        results = []
        for b in (np_b, strict):
            q, k, v, bias = (b.asarray(t, dtype) for t in arrays)
            out, w = sdpa(q, k, v, mask=b.asarray(mask), bias=bias, is_causal=True, return_weights=True)
            results.append((b.to_numpy(out), b.to_numpy(w)))
        np.testing.assert_array_equal(results[0][0], results[1][0])
        np.testing.assert_array_equal(results[0][1], results[1][1])

    def test_backend_agrees_with_numpy(self, backend, dtype, rng):
        arrays = _inputs(rng, [(2, 4, 6, 8), (2, 4, 10, 8), (2, 4, 10, 8)])
        mask = rng.random((6, 10)) < 0.8
        np_b = make_backend("numpy")
        here = sdpa(*(backend.asarray(t, dtype) for t in arrays), mask=backend.asarray(mask))
        there = sdpa(*(np_b.asarray(t, dtype) for t in arrays), mask=np_b.asarray(mask))
        assert_close(backend.to_numpy(here), np_b.to_numpy(there), dtype)


class TestFloat16:
    def test_products_overflowing_float16_stay_finite(self, backend_f16, rng):
        b = backend_f16
        # |q . k| reaches ~1e6, far beyond float16's 65504: must accumulate in float32
        q, k = (300 * rng.standard_normal((2, 2, 5, 16)) for _ in range(2))
        v = rng.standard_normal((2, 2, 5, 16))
        q16, k16, v16 = (t.astype(np.float16) for t in (q, k, v))
        out, w = sdpa(*(b.asarray(t) for t in (q16, k16, v16)), scale=1e-3, return_weights=True)
        assert_preserved(b, out, "float16", (2, 2, 5, 16))
        ref_out, ref_w = ref_attention(q16, k16, v16, scale=1e-3)
        assert_close(b.to_numpy(out), ref_out, "float16")
        assert_close(b.to_numpy(w), ref_w, "float16")

    def test_float16_matches_reference(self, backend_f16, rng):
        b = backend_f16
        q, k, v = (t.astype(np.float16) for t in _inputs(rng, [(3, 6, 8), (3, 9, 8), (3, 9, 8)]))
        out = sdpa(*(b.asarray(t) for t in (q, k, v)), is_causal=True)
        assert_close(b.to_numpy(out), ref_attention(q, k, v, is_causal=True)[0], "float16")


class TestTorchParity:
    """mha_xp on torch tensors against torch's own SDPA, float32, ≤ 1e-5 relative."""

    torch = pytest.importorskip("torch", reason="optional backend torch not installed")

    def _run(self, rng, *, mask=None, bias=None, scale=None, is_causal=False, shapes=None):
        torch = self.torch
        q, k, v = (torch.asarray(t, dtype=torch.float32) for t in
                   _inputs(rng, shapes or [(2, 4, 7, 8), (2, 4, 7, 8), (2, 4, 7, 8)]))
        ours = sdpa(q, k, v, mask=None if mask is None else torch.asarray(mask),
                    bias=None if bias is None else torch.asarray(bias, dtype=torch.float32),
                    scale=scale, is_causal=is_causal)
        if bias is not None:
            attn_mask = torch.asarray(bias, dtype=torch.float32)
            if mask is not None:
                attn_mask = attn_mask.masked_fill(~torch.asarray(mask), float("-inf"))
        else:
            attn_mask = None if mask is None else torch.asarray(mask)
        theirs = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        return rel_err(ours.numpy(), theirs.numpy())

    def test_plain(self, rng):
        assert self._run(rng) <= 1e-5

    def test_causal_square(self, rng):
        assert self._run(rng, is_causal=True) <= 1e-5

    def test_bool_mask_and_scale(self, rng):
        mask = rng.random((2, 1, 7, 7)) < 0.7
        mask[..., 0] = True  # torch gives NaN for fully masked rows in some kernels
        assert self._run(rng, mask=mask, scale=0.2) <= 1e-5

    def test_float_bias_and_mask(self, rng):
        mask = rng.random((7, 7)) < 0.7
        mask[:, 0] = True
        assert self._run(rng, mask=mask, bias=rng.standard_normal((4, 7, 7))) <= 1e-5

    def test_cross_attention_bottom_right_causal(self, rng):
        # torch's is_causal is top-left for L != S; ours is bottom-right: compare with the mask
        L, S = 4, 9
        mask = np.tril(np.ones((L, S), dtype=bool), k=S - L)
        shapes = [(2, 3, L, 8), (2, 3, S, 8), (2, 3, S, 5)]
        torch = self.torch
        q, k, v = (torch.asarray(t, dtype=torch.float32) for t in _inputs(rng, shapes))
        ours = sdpa(q, k, v, is_causal=True)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.asarray(mask))
        assert rel_err(ours.numpy(), theirs.numpy()) <= 1e-5
