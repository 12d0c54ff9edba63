"""Numerical extremes: huge and tiny scores, float16 overflow, -inf biases, inert padding.

Outputs must stay finite and match the float64 reference to the dtype's
tolerance (``REL_TOL``). Where softmax itself is ill-conditioned (scores of
1e4 and more, whose float32 rounding alone moves the weights), the inputs are
built so that the scores are exact in the dtype: integers, or powers of two
times integers; the comparison then tests mha_xp, not the rounding of its
inputs.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, note
from hypothesis import strategies as st

import mha_xp
from support import FLOAT16_BACKENDS, REL_TOL, assert_preserved
from support._hypothesis_profiles import budget
from support.reference import ref_attention, ref_mha

sdpa = mha_xp.scaled_dot_product_attention

seeds = st.integers(0, 2**32 - 1)
# The dense path, the chunked path with a drawn block, or a zero budget.
paths = st.sampled_from([{}, {"chunk_size": 1}, {"chunk_size": 2}, {"chunk_size": (3, 2)},
                         {"memory_budget": 0}])


def assert_matches(out, ref: np.ndarray, dtype: str) -> None:
    out = np.asarray(out, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.all(np.isfinite(out)), "non-finite values in the output"
    err, size = np.linalg.norm(out - ref), np.linalg.norm(ref)
    assert err <= REL_TOL[dtype] * size, f"relative error {err / (size or 1):.3g} ({dtype})"


def host_logsumexp(scores: np.ndarray) -> np.ndarray:
    """float64 log-sum-exp over the last axis; +inf for an all -inf row."""
    top = scores.max(axis=-1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # log(0) = -inf for an empty row, replaced below
        lse = (safe + np.log(np.exp(scores - safe).sum(axis=-1, keepdims=True)))[..., 0]
    return np.where(np.isneginf(top[..., 0]), np.inf, lse)


def call(backend, dtype, q, k, v, **kwargs):
    """mha_xp on the backend, host float64 results (out, weights)."""
    kwargs = {n: (backend.asarray(a, dtype) if isinstance(a, np.ndarray) and a.dtype != bool
                  else backend.asarray(a) if isinstance(a, np.ndarray) else a)
              for n, a in kwargs.items()}
    out, w = sdpa(*(backend.asarray(t, dtype) for t in (q, k, v)), return_weights=True, **kwargs)
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    assert_preserved(backend, out, dtype, lead + (q.shape[-2], v.shape[-1]))
    return (backend.to_numpy(out).astype(np.float64), backend.to_numpy(w).astype(np.float64))


def exact_score_inputs(row: np.ndarray, L: int, D: int, rng) -> tuple[np.ndarray, np.ndarray, float]:
    """``q (L, D)``, ``k (S, D)`` and a scale with ``(q * scale) @ k.T`` equal to
    ``row`` in every query row, exactly in float32 (for a ``row`` exact in
    float32): q's first feature is 1 and its others 0, k's first feature is
    ``row / scale`` with ``scale`` a power of two, k's others are random."""
    scale = float(rng.choice([0.5, 1.0, 2.0]))
    q = np.zeros((L, D))
    q[:, 0] = 1.0
    k = rng.standard_normal((row.size, D))
    k[:, 0] = row / scale
    return q, k, scale


class TestHugeScores:
    @budget(25)
    @given(base=st.sampled_from([1e4, -1e4, 1e5, -1e6, 1e7]), seed=seeds, path=paths,
           L=st.integers(1, 4), S=st.integers(1, 9), D=st.integers(1, 8))
    def test_scores_of_1e4_to_1e7_are_exact_and_softmaxed_exactly(self, backend, base, seed,
                                                                   path, L, S, D):
        """Scores ``base + small integers`` (exact in float32): the shifted
        softmax sees exactly the float64 reference's differences."""
        rng = np.random.default_rng(seed)
        row = base + rng.integers(-6, 7, size=S)
        q, k, scale = exact_score_inputs(row, L, D, rng)
        v = rng.standard_normal((S, 3))
        note(f"scores={row}, scale={scale}")
        for dtype in ("float32", "float64"):
            out, w = call(backend, dtype, q, k, v, scale=scale, **path)
            ref_out, ref_w = ref_attention(q, k, v, scale=scale)
            assert_matches(out, ref_out, dtype)
            if not path:
                # Dense path only: the chunked path recomputes the weights as
                # exp(s - lse) with lse ~ 1e4 rounded to float32, which costs
                # |lse| * eps ~ 1e-3 relative (reported; its output is exact).
                assert_matches(w, ref_w, dtype)
            _, lse = mha_xp.attention_with_lse(*(backend.asarray(t, dtype) for t in (q, k, v)),
                                               scale=scale, **path)
            ref_lse = host_logsumexp((q * scale) @ k.T)
            np.testing.assert_allclose(backend.to_numpy(lse), ref_lse, rtol=REL_TOL[dtype])

    @budget(25)
    @given(magnitude=st.sampled_from([1e10, 1e20, 1e30, 1e37]), sign=st.sampled_from([1, -1]),
           seed=seeds, path=paths, L=st.integers(1, 4), S=st.integers(1, 9))
    def test_scores_far_beyond_1e4_give_the_top_key(self, backend, magnitude, sign, seed, path,
                                                    L, S):
        """Distinct scores of 1e10 .. 1e37 in float32: gaps of 1e-3 relative
        make softmax one-hot, so the output is exactly the top key's value."""
        rng = np.random.default_rng(seed)
        row = sign * magnitude * (1.0 + 1e-3 * rng.permutation(S))
        q = np.zeros((L, 2))
        q[:, 0] = 1.0
        k = np.zeros((S, 2))
        k[:, 0] = row
        v = rng.standard_normal((S, 4))
        for dtype in ("float32", "float64"):
            out, w = call(backend, dtype, q, k, v, scale=1.0, **path)
            top = int(np.argmax(row))
            expected = np.broadcast_to(np.float64(v[top].astype(dtype)), (L, 4))
            np.testing.assert_array_equal(out, expected)
            np.testing.assert_array_equal(w, np.broadcast_to(np.eye(S)[top], (L, S)))

    @budget(25)
    @given(seed=seeds, path=paths, S=st.integers(1, 64), value=st.sampled_from([0.0, 1e4, -1e4]),
           dtype=st.sampled_from(["float32", "float64"]))
    def test_all_equal_scores_give_the_mean_value(self, backend, seed, path, S, value, dtype):
        rng = np.random.default_rng(seed)
        q = np.zeros((3, 4))
        q[:, 0] = 1.0
        k = np.zeros((S, 4))
        k[:, 0] = value  # every key the same score, large or zero
        v = rng.standard_normal((S, 5))
        out, w = call(backend, dtype, q, k, v, scale=1.0, **path)
        v_d = v.astype(dtype).astype(np.float64)
        assert_matches(out, np.broadcast_to(v_d.mean(axis=0), (3, 5)), dtype)
        if not path or value == 0:  # the chunked weights at |lse| ~ 1e4: see above
            np.testing.assert_allclose(w, 1.0 / S, rtol=4 * np.finfo(dtype).eps)

    @budget(25)
    @given(scale=st.sampled_from([1e-8, 1e-30, 1e-45, 1e-300, 5e-324]), seed=seeds, path=paths,
           causal=st.booleans(), dtype=st.sampled_from(["float32", "float64"]))
    def test_tiny_scale_stays_finite_and_nearly_uniform(self, backend, scale, seed, path, causal,
                                                        dtype):
        rng = np.random.default_rng(seed)
        q, k, v = (rng.standard_normal(s) * 1e3 for s in [(2, 4, 8), (2, 6, 8), (2, 6, 3)])
        out, w = call(backend, dtype, q, k, v, scale=scale, is_causal=causal, **path)
        ref_out, ref_w = ref_attention(*(t.astype(dtype).astype(np.float64) for t in (q, k, v)),
                                       scale=scale, is_causal=causal)
        assert_matches(out, ref_out, dtype)
        assert_matches(w, ref_w, dtype)


class TestFloat16:
    @budget(25)
    @given(seed=seeds, path=paths, D=st.sampled_from([4, 16, 64]), L=st.integers(1, 5),
           S=st.integers(1, 7))
    def test_products_overflowing_float16_stay_finite_and_exact(self, backend_f16, seed, path,
                                                                D, L, S):
        """Integer queries and keys up to 255 (exact in float16): ``q @ k.T``
        reaches 255² · D > 65504, the float16 maximum, so a float16 score
        matmul would give inf; float32 accumulation keeps it exact."""
        rng = np.random.default_rng(seed)
        q = rng.integers(-255, 256, size=(2, L, D)).astype(np.float64)
        k = rng.integers(-255, 256, size=(2, S, D)).astype(np.float64)
        q[:, 0, :], k[:, 0, :] = 255.0, 255.0  # at least one product sum overflows float16
        v = rng.standard_normal((2, S, 6)).astype(np.float16).astype(np.float64)
        assert np.abs(q @ k.swapaxes(-1, -2)).max() > np.finfo(np.float16).max
        out, w = call(backend_f16, "float16", q, k, v, **path)
        ref_out, ref_w = ref_attention(q, k, v)
        assert_matches(out, ref_out, "float16")
        assert_matches(w, ref_w, "float16")
        _, lse = mha_xp.attention_with_lse(*(backend_f16.asarray(t, "float16") for t in (q, k, v)),
                                           **path)
        lse = backend_f16.to_numpy(lse)
        assert lse.dtype == np.float32 and np.all(np.isfinite(lse))
        ref_lse = host_logsumexp(q @ k.swapaxes(-1, -2) / math.sqrt(D))
        np.testing.assert_allclose(lse, ref_lse, rtol=REL_TOL["float32"])


class TestInfiniteBias:
    @budget(30)
    @given(seed=seeds, path=paths, p_inf=st.sampled_from([0.1, 0.5, 0.9]),
           dead_rows=st.integers(0, 3), causal=st.booleans(), data=st.data())
    def test_minus_inf_bias_masks_and_whole_rows_give_zeros(self, backend, seed, path, p_inf,
                                                            dead_rows, causal, data):
        dtypes = ["float32", "float64"] + (["float16"] if backend.name in FLOAT16_BACKENDS else [])
        dtype = data.draw(st.sampled_from(dtypes))
        rng = np.random.default_rng(seed)
        L, S = 5, 7
        q, k, v = (rng.standard_normal(s) for s in [(2, 3, L, 8), (2, 3, S, 8), (2, 3, S, 4)])
        q, k, v = (t.astype(dtype).astype(np.float64) for t in (q, k, v))
        bias = np.round(rng.standard_normal((3, L, S)) * 16) / 16
        bias[rng.random(bias.shape) < p_inf] = -np.inf
        bias[:, :dead_rows, :] = -np.inf  # a bias that masks whole rows
        out, w = call(backend, dtype, q, k, v, bias=bias, is_causal=causal, **path)
        ref_out, ref_w = ref_attention(q, k, v, bias=bias, is_causal=causal)
        assert_matches(out, ref_out, dtype)
        assert_matches(w, ref_w, dtype)
        assert np.all(out[:, :, :dead_rows] == 0) and np.all(w[:, :, :dead_rows] == 0)
        _, lse = mha_xp.attention_with_lse(*(backend.asarray(t, dtype) for t in (q, k, v)),
                                           bias=backend.asarray(bias, dtype), is_causal=causal,
                                           **path)
        assert np.all(np.isposinf(backend.to_numpy(lse)[:, :, :dead_rows]))


# -- padding is inert, bit for bit ---------------------------------------------------


@st.composite
def padded_cases(draw, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(seeds))
    H, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    E = H * head_dim
    B, L, S = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 8))
    kdim = draw(st.sampled_from([None, 3]))
    pad = rng.random((B, S)) < draw(st.sampled_from([0.2, 0.5, 1.0]))
    huge = float(np.finfo(dtype).max)
    garbage = rng.choice([np.nan, np.inf, -np.inf, huge, -huge], size=(B, S, kdim or E))
    return dict(
        dtype=dtype, H=H, E=E, kdim=kdim, pad=pad, garbage=garbage,
        q=rng.standard_normal((B, L, E)), kv=rng.standard_normal((B, S, kdim or E)),
        same_kv=draw(st.booleans()), is_causal=draw(st.booleans()),
        mask=(rng.random((L, S)) < 0.8) if draw(st.booleans()) else None,
        path=draw(paths), unbatched=B == 1 and draw(st.booleans()), seed=draw(seeds),
    )


class TestPaddingIsInert:
    @budget(30)
    @given(data=st.data())
    def test_nan_and_inf_in_padded_keys_and_values(self, backend, data):
        """The layer's output for every query is bit-identical whether the
        padded keys and values hold zeros or NaN, Inf and float max, on the
        dense and the chunked path, batched or not, with causal and boolean masks."""
        dtypes = ["float32", "float64"] + (["float16"] if backend.name in FLOAT16_BACKENDS else [])
        c = data.draw(padded_cases(dtypes))
        note({n: getattr(a, "shape", a) for n, a in c.items() if n != "garbage"})
        dt, pad = c["dtype"], c["pad"]
        layer = mha_xp.MultiHeadAttention(c["E"], c["H"], kdim=c["kdim"], vdim=c["kdim"],
                                          xp=backend.xp, device=backend.device,
                                          dtype=backend.dtype(dt), seed=c["seed"] % 1000)
        clean = np.where(pad[..., None], 0.0, c["kv"])
        dirty = np.where(pad[..., None], c["garbage"], c["kv"])
        one = (lambda a: a[0]) if c["unbatched"] else (lambda a: a)
        mask = None if c["mask"] is None else backend.asarray(c["mask"])

        def run(kv):
            with np.errstate(over="ignore"):  # float max rounds to inf in float16: on purpose
                kv_b = backend.asarray(one(kv), dt)
                other = kv_b if c["same_kv"] else backend.asarray(one(kv[..., ::-1]).copy(), dt)
            out, w = layer(backend.asarray(one(c["q"]), dt), kv_b, other,
                           key_padding_mask=backend.asarray(one(pad)), mask=mask,
                           is_causal=c["is_causal"], return_weights=True, **c["path"])
            return backend.to_numpy(out), backend.to_numpy(w)

        out_clean, w_clean = run(clean)
        out_dirty, w_dirty = run(dirty)
        np.testing.assert_array_equal(out_dirty, out_clean)
        np.testing.assert_array_equal(w_dirty, w_clean)
        assert np.all(np.isfinite(out_dirty)) and np.all(np.isfinite(w_dirty))
        assert np.all(w_dirty[np.broadcast_to(one(pad)[..., None, :], w_dirty.shape)] == 0)

    def test_fully_padded_rows_give_the_output_bias(self, backend, dtype, rng):
        E, H = 8, 2
        sd = {"in_proj_weight": rng.standard_normal((3 * E, E)),
              "in_proj_bias": rng.standard_normal(3 * E),
              "out_proj.weight": rng.standard_normal((E, E)),
              "out_proj.bias": rng.standard_normal(E)}
        layer = mha_xp.MultiHeadAttention.from_state_dict(
            {n: backend.asarray(w, dtype) for n, w in sd.items()}, num_heads=H)
        pad = np.zeros((2, 5), dtype=bool)
        pad[1] = True  # the second sequence is all padding
        kv = rng.standard_normal((2, 5, E))
        kv[1] = np.nan
        for path in ({}, {"chunk_size": 2}):
            out = backend.to_numpy(layer(backend.asarray(rng.standard_normal((2, 3, E)), dtype),
                                         backend.asarray(kv, dtype),
                                         key_padding_mask=backend.asarray(pad), **path))
            ref, _ = ref_mha(sd, H, np.zeros((1, 3, E)), np.zeros((1, 5, E)),
                             key_padding_mask=np.ones((1, 5), dtype=bool))
            np.testing.assert_allclose(out[1], ref[0], rtol=REL_TOL[dtype], atol=REL_TOL[dtype])
