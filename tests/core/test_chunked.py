"""The chunked (online-softmax) path: same numbers as the dense path on every
backend, log-sum-exp, merging, path selection and linear memory."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

import mha_xp
from support import assert_close, assert_preserved, rel_err
from support.reference import ref_attention

sdpa = mha_xp.scaled_dot_product_attention
MHA = mha_xp.MultiHeadAttention

# Dense vs chunked, relative, per dtype (the contract).
PATH_TOL = {"float32": 1e-6, "float64": 1e-12}

CHUNKS = [1, 3, (2, 5), (4, 64)]  # uneven last blocks; a block larger than S


def _ref_lse(q, k, *, allowed=None, bias=None, is_causal=False, scale=None):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    L, S = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ np.swapaxes(k, -1, -2) * scale + (0 if bias is None else bias)
    ok = np.ones(s.shape, dtype=bool) if allowed is None else np.broadcast_to(allowed, s.shape)
    if is_causal:
        ok = ok & (np.arange(S)[None, :] <= np.arange(L)[:, None] + S - L)
    with np.errstate(divide="ignore"):
        s = np.where(ok, s, -np.inf)
        top = np.max(s, axis=-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0)
        total = np.exp(s - top).sum(axis=-1)
        return np.where(total == 0, np.inf, top[..., 0] + np.log(np.where(total == 0, 1, total)))


class TestSameNumbersAsDense:
    @pytest.mark.parametrize("chunk", CHUNKS, ids=str)
    @pytest.mark.parametrize("L,S", [(7, 7), (5, 11), (9, 4)])
    def test_all_features(self, backend, dtype, rng, chunk, L, S):
        q, k, v = (rng.standard_normal(s) for s in [(2, 3, L, 4), (2, 3, S, 4), (2, 3, S, 6)])
        mask = rng.random((2, 1, L, S)) < 0.8
        mask[0, 0, 1, :] = False  # a fully masked row
        bias = rng.standard_normal((3, L, S))
        args = [backend.asarray(t, dtype) for t in (q, k, v)]
        kwargs = dict(mask=backend.asarray(mask), bias=backend.asarray(bias, dtype), is_causal=True,
                      return_weights=True)
        dense_out, dense_w = sdpa(*args, **kwargs)
        out, w = sdpa(*args, **kwargs, chunk_size=chunk)
        assert_preserved(backend, out, dtype, (2, 3, L, 6))
        assert_preserved(backend, w, dtype, (2, 3, L, S))
        out, w = backend.to_numpy(out), backend.to_numpy(w)
        assert rel_err(out, backend.to_numpy(dense_out)) <= PATH_TOL[dtype]
        assert rel_err(w, backend.to_numpy(dense_w)) <= PATH_TOL[dtype]
        assert np.all(out[0, 0, 1] == 0) and np.all(w[0, 0, 1] == 0)
        ref_out, ref_w = ref_attention(q, k, v, allowed=mask, bias=bias, is_causal=True)
        assert_close(out, ref_out, dtype)
        assert_close(w, ref_w, dtype)

    def test_weights_never_change_the_output(self, backend, dtype, rng):
        q, k, v = (backend.asarray(rng.standard_normal((2, 9, 4)), dtype) for _ in range(3))
        alone = sdpa(q, k, v, chunk_size=4, is_causal=True)
        with_w, _ = sdpa(q, k, v, chunk_size=4, is_causal=True, return_weights=True)
        np.testing.assert_array_equal(backend.to_numpy(alone), backend.to_numpy(with_w))

    def test_layer_with_padding_kdim_and_causal(self, backend, dtype, rng):
        layer = MHA(12, 3, kdim=5, vdim=7, xp=backend.xp, device=backend.device,
                    dtype=backend.dtype(dtype), seed=2)
        q, k, v = rng.standard_normal((2, 10, 12)), rng.standard_normal((2, 13, 5)), rng.standard_normal((2, 13, 7))
        pad = rng.random((2, 13)) < 0.3
        pad[:, -1] = False
        mask = rng.random((10, 13)) < 0.8
        args = [backend.asarray(t, dtype) for t in (q, k, v)]
        kwargs = dict(key_padding_mask=backend.asarray(pad), mask=backend.asarray(mask),
                      is_causal=True, return_weights=True, average_weights=False)
        dense = [backend.to_numpy(t) for t in layer(*args, **kwargs)]
        chunked = [backend.to_numpy(t) for t in layer(*args, **kwargs, chunk_size=(3, 4))]
        for a, b in zip(chunked, dense):
            assert rel_err(a, b) <= PATH_TOL[dtype]

    def test_float16(self, backend_f16, rng):
        b = backend_f16
        q, k, v = (b.asarray((30 * rng.standard_normal((2, 9, 16))).astype(np.float16)) for _ in range(3))
        out = sdpa(q, k, v, chunk_size=4, is_causal=True)
        assert out.dtype == b.dtype("float16")
        ref = ref_attention(*(b.to_numpy(t) for t in (q, k, v)), is_causal=True)[0]
        assert_close(b.to_numpy(out), ref, "float16")


class TestLogSumExp:
    @pytest.mark.parametrize("chunk", [None, 3], ids=["dense", "chunked"])
    def test_against_reference(self, backend, dtype, rng, chunk):
        q, k, v = (rng.standard_normal(s) for s in [(2, 6, 4), (2, 9, 4), (2, 9, 3)])
        mask = rng.random((6, 9)) < 0.7
        mask[2] = False
        bias = rng.standard_normal((6, 9))
        out, lse = mha_xp.attention_with_lse(
            *(backend.asarray(t, dtype) for t in (q, k, v)), mask=backend.asarray(mask),
            bias=backend.asarray(bias, dtype), is_causal=True, chunk_size=chunk)
        assert_preserved(backend, lse, dtype, (2, 6))
        lse = backend.to_numpy(lse)
        ref = _ref_lse(q, k, allowed=mask, bias=bias, is_causal=True)
        assert np.all(lse[:, 2] == np.inf) and np.all(ref[:, 2] == np.inf)
        finite = np.isfinite(ref)
        assert_close(lse[finite], ref[finite], dtype)
        assert_close(backend.to_numpy(out), ref_attention(q, k, v, allowed=mask, bias=bias, is_causal=True)[0], dtype)

    def test_merge_equals_attention_over_the_union(self, backend, dtype, rng):
        q, k, v = (rng.standard_normal(s) for s in [(3, 5, 4), (3, 12, 4), (3, 12, 6)])
        mask = rng.random((5, 12)) < 0.6
        mask[0, :7] = False   # row 0 has keys only in the second part
        mask[1, 7:] = False   # row 1 only in the first
        mask[2, :] = False    # row 2 in neither
        parts = []
        for cols in (slice(0, 7), slice(7, 12)):
            parts += mha_xp.attention_with_lse(
                *(backend.asarray(t, dtype) for t in (q, k[:, cols], v[:, cols])),
                mask=backend.asarray(mask[:, cols]))
        out, lse = mha_xp.merge_attention(*parts)
        full_out, full_lse = mha_xp.attention_with_lse(
            *(backend.asarray(t, dtype) for t in (q, k, v)), mask=backend.asarray(mask))
        out, full_out = backend.to_numpy(out), backend.to_numpy(full_out)
        lse, full_lse = backend.to_numpy(lse), backend.to_numpy(full_lse)
        assert np.all(np.isfinite(out)) and np.all(out[:, 2] == 0) and np.all(lse[:, 2] == np.inf)
        assert rel_err(out, full_out) <= PATH_TOL[dtype]
        finite = np.isfinite(full_lse)
        np.testing.assert_array_equal(finite, np.isfinite(lse))
        assert rel_err(lse[finite], full_lse[finite]) <= PATH_TOL[dtype]

    def test_merge_errors(self, rng):
        out, lse = mha_xp.attention_with_lse(*(rng.standard_normal((4, 3)) for _ in range(3)))
        with pytest.raises(ValueError, match=r"lse2 must have shape \(4,\)"):
            mha_xp.merge_attention(out, lse, out, lse[:3])
        with pytest.raises(ValueError, match="out1 and out2 must have the same shape"):
            mha_xp.merge_attention(out, lse, out[:3], lse[:3])


class TestSelection:
    def test_budget_chooses_the_path(self, rng, monkeypatch):
        from mha_xp._core import _plan

        seen = []
        real = _plan.plan_blocks
        monkeypatch.setattr(_plan, "plan_blocks", lambda *a: seen.append(real(*a)) or seen[-1])
        q = k = v = rng.standard_normal((2, 16, 4))  # dense scores: 2*16*16*8 = 4096 bytes
        sdpa(q, k, v)
        sdpa(q, k, v, memory_budget=4096)
        sdpa(q, k, v, memory_budget=4095)
        with mha_xp.memory_budget(0):
            sdpa(q, k, v)
            sdpa(q, k, v, memory_budget=10**9)  # the per-call argument wins
        monkeypatch.setenv("MHA_XP_MEMORY_BUDGET", "100")
        sdpa(q, k, v)
        sdpa(q, k, v, chunk_size=(3, 5))
        assert [s is None for s in seen] == [True, True, False, False, True, False, False]
        assert seen[-1] == (3, 5)

    def test_budget_context_is_restored(self):
        before = mha_xp.get_memory_budget()
        with mha_xp.memory_budget(123):
            assert mha_xp.get_memory_budget() == 123
        assert mha_xp.get_memory_budget() == before == mha_xp.DEFAULT_MEMORY_BUDGET

    @pytest.mark.parametrize("bad", [0, -1, (1, 2, 3), "8", 2.5])
    def test_bad_chunk_size(self, rng, bad):
        q = rng.standard_normal((4, 3))
        with pytest.raises((ValueError, TypeError), match="chunk_size"):
            sdpa(q, q, q, chunk_size=bad)

    @pytest.mark.parametrize("bad", [-1, 1.5, "big", True])
    def test_bad_budget(self, rng, bad):
        q = rng.standard_normal((4, 3))
        with pytest.raises(ValueError, match="memory_budget must be a non-negative int"):
            sdpa(q, q, q, memory_budget=bad)
        with pytest.raises(ValueError, match="nbytes must be a non-negative int"):
            with mha_xp.memory_budget(bad):
                pass

    def test_bad_env_budget(self, rng, monkeypatch):
        monkeypatch.setenv("MHA_XP_MEMORY_BUDGET", "lots")
        q = rng.standard_normal((4, 3))
        with pytest.raises(ValueError, match="MHA_XP_MEMORY_BUDGET must be a non-negative int"):
            sdpa(q, q, q)


class TestWorkAndMemory:
    def test_causal_skips_blocks_above_the_diagonal(self, rng):
        # Values of keys 4..7 are NaN. Query rows 0..3 may only see keys 0..3:
        # had the block (rows 0-3, keys 4-7) been computed, 0 * NaN would leak.
        q, k, v = (rng.standard_normal((8, 4)) for _ in range(3))
        v[4:] = np.nan
        out = sdpa(q, k, v, is_causal=True, chunk_size=4)
        assert np.all(np.isfinite(out[:4]))
        np.testing.assert_allclose(out[:4], ref_attention(q[:4], k[:4], v[:4], is_causal=True)[0],
                                   rtol=1e-12)

    def test_memory_is_linear_in_sequence_length(self, rng):
        def peak(L, D=16):
            q, k, v = (rng.standard_normal((1, L, D)) for _ in range(3))
            tracemalloc.start()
            try:
                sdpa(q, k, v, is_causal=True, memory_budget=0)
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

        small, large = peak(2048), peak(4096)
        dense_scores = 4096 * 4096 * 8  # float64: 128 MiB for the scores alone
        assert large < 0.6 * dense_scores, f"chunked path peaked at {large / 2**20:.0f} MiB"
        # Doubling L and S doubles the memory (quadratic would be 4x).
        assert large / small < 2.6, (small, large)


class TestInPlaceFastPath:
    """NumPy's in-place fast path against the portable path it replaces."""

    def test_chunked_bit_identical(self, rng):
        import array_api_compat.numpy as xp

        from mha_xp._core._chunked import chunked_attention
        from mha_xp._spec import AttentionSpec, Block

        q, k, v = (rng.standard_normal(s) for s in [(2, 3, 9, 4), (2, 3, 11, 4), (2, 3, 11, 5)])
        mask = rng.random((9, 11)) < 0.8
        bias = rng.standard_normal((3, 9, 11))
        keep = rng.random((2, 1, 1, 11)) < 0.8
        spec = AttentionSpec(scale=0.3, mask=mask, key_keep=keep, bias=bias, is_causal=True)
        fast = chunked_attention(q, k, v, spec, Block(), (4, 3), xp=xp, in_place=True)
        portable = chunked_attention(q, k, v, spec, Block(), (4, 3), xp=xp, in_place=False)
        np.testing.assert_array_equal(fast[0], portable[0])
        for a, b in zip(fast[1], portable[1]):
            np.testing.assert_array_equal(a, b)

    def test_softmax_bit_identical(self, rng):
        import array_api_compat.numpy as xp

        from mha_xp._lib._softmax import masked_softmax

        s = rng.standard_normal((3, 5, 7))
        allowed = rng.random((5, 7)) < 0.7
        allowed[2] = False
        portable = masked_softmax(s.copy(), allowed, xp=xp, return_stats=True, in_place=False)
        fast = masked_softmax(s.copy(), allowed, xp=xp, return_stats=True, in_place=True)
        np.testing.assert_array_equal(fast[0], portable[0])
        for a, b in zip(fast[1], portable[1]):
            np.testing.assert_array_equal(a, b)

    def test_caller_arrays_untouched(self, rng):
        q, k, v = (rng.standard_normal((2, 6, 4)) for _ in range(3))
        bias = rng.standard_normal((6, 6))
        copies = [t.copy() for t in (q, k, v, bias)]
        sdpa(q, k, v, bias=bias)
        sdpa(q, k, v, bias=bias, chunk_size=2)
        for a, b in zip((q, k, v, bias), copies):
            np.testing.assert_array_equal(a, b)


class TestMemoryGuard:
    def test_weights_that_cannot_fit_raise_up_front(self, rng, monkeypatch):
        from mha_xp._core import _plan

        monkeypatch.setattr(_plan, "_GUARD_FROM_BYTES", 0)  # guard small calls too
        monkeypatch.setattr(_plan, "host_memory_available", lambda xp, device: 10_000)
        q = rng.standard_normal((2, 40, 8))  # weights: 2 * 40 * 40 * 8 bytes = 25.6 kB
        with pytest.raises(MemoryError, match=r"return_weights=True needs the \(2, 40, 40\) "
                                              r"attention weights, 25.0 KiB in float64"):
            sdpa(q, q, q, return_weights=True)
        with pytest.raises(MemoryError, match="call without return_weights"):
            MHA(8, 2, seed=0)(q, return_weights=True)

    def test_a_generous_budget_cannot_overrun_memory(self, rng, monkeypatch):
        from mha_xp._core import _plan

        monkeypatch.setattr(_plan, "_GUARD_FROM_BYTES", 0)
        monkeypatch.setattr(_plan, "host_memory_available", lambda xp, device: 40_000)
        seen = []
        real = _plan.plan_blocks
        monkeypatch.setattr(_plan, "plan_blocks", lambda *a: seen.append(real(*a)) or seen[-1])
        q = rng.standard_normal((2, 40, 8))
        out = sdpa(q, q, q, memory_budget=10**12)  # dense would need 25.6 kB x 3
        assert seen[-1] is not None  # took the chunked path
        monkeypatch.undo()
        np.testing.assert_allclose(out, sdpa(q, q, q), rtol=1e-12)

    def test_small_calls_skip_the_guard(self, rng, monkeypatch):
        from mha_xp._core import _plan

        def fail(xp, device):
            raise AssertionError("read /proc/meminfo for a tiny call")

        monkeypatch.setattr(_plan, "host_memory_available", fail)
        q = rng.standard_normal((2, 40, 8))
        sdpa(q, q, q, return_weights=True)

    def test_available_memory_is_read(self):
        import array_api_compat.numpy as xp

        from mha_xp._lib._backends import host_memory_available

        avail = host_memory_available(xp, "cpu")
        assert avail is None or avail > 0
