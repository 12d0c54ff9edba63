"""``attention_statistics``: the key mass, the entropy and the pooled weights,
computed block by block, against the same reductions of the dense weights
(the float64 reference of ``support/reference_variants.py``, and the weights
``scaled_dot_product_attention(..., return_weights=True)`` returns) on every
backend and dtype, with every variant, forced small blocks and pooling cells
that divide neither ``L`` nor ``S``; non-finite inputs, Dask's laziness,
``jax.jit``, the memory held and the errors."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

import mha_xp
from mha_xp._statistics import attention_statistics
from support import REL_TOL, assert_close, assert_preserved, make_backend, rel_err
from support.reference_variants import ref_variants

sdpa = mha_xp.scaled_dot_product_attention
NAMES = ("key_mass", "entropy", "pooled")
SLOPES4 = [0.5, 0.25, 0.125, 0.0625]


# ------------------------------------------------------------ the reference


def reductions(w, pool, p_sink=None):
    """The statistics of float64 weights ``w (..., L, S)``, in plain NumPy:
    ``(key_mass, entropy, pooled)``; ``p_sink (..., L)`` the sink's weights."""
    w = np.asarray(w, dtype=np.float64)
    L, S = w.shape[-2:]
    logs = np.log(np.where(w > 0, w, 1.0))
    entropy = -np.sum(w * logs, axis=-1)
    if p_sink is not None:
        entropy = entropy - p_sink * np.log(np.where(p_sink > 0, p_sink, 1.0))
    pq, pk = pool
    pooled = np.zeros(w.shape[:-2] + (-(-L // pq), -(-S // pk)))
    for r in range(pooled.shape[-2]):
        for c in range(pooled.shape[-1]):
            pooled[..., r, c] = w[..., r * pq:(r + 1) * pq, c * pk:(c + 1) * pk].mean(axis=(-2, -1))
    return w.sum(axis=-2), entropy, pooled


def ref_sink_weights(q, k, allowed, sinks):
    """Reference weights with attention sinks (``allowed`` broadcasting to the
    scores, query heads a multiple of the key heads), and the sinks' own."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    group = q.shape[-3] // k.shape[-3]
    k = np.repeat(k, group, axis=-3)
    s = np.where(allowed, q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1]), -np.inf)
    sink = np.asarray(sinks, np.float64)[:, None, None]
    top = np.maximum(s.max(axis=-1, keepdims=True), sink)
    e = np.exp(s - top)
    total = e.sum(axis=-1, keepdims=True) + np.exp(sink - top)
    return e / total, (np.exp(sink - top) / total)[..., 0]


def _inputs(rng, B=2, hq=4, hkv=2, L=9, S=11, D=4):
    return rng.standard_normal((B, hq, L, D)), rng.standard_normal((B, hkv, S, D))


def _mask_with_empty_rows(rng, L, S):
    mask = rng.random((2, 1, L, S)) < 0.7
    mask[0, 0, 1] = False  # rows with nothing to attend to
    mask[1, 0, L - 1] = False
    return mask


# name: (mha_xp's keyword arguments, the reference's, (hq, hkv), (L, S))
CASES = {
    "plain": (dict(), dict(), (3, 3), (9, 11)),
    "mask_rows": (dict(mask="rows", is_causal=True), dict(allowed="rows", is_causal=True),
                  (4, 2), (9, 11)),
    "causal_more_keys": (dict(is_causal=True), dict(is_causal=True), (2, 2), (7, 13)),
    "causal_more_queries": (dict(is_causal=True), dict(is_causal=True), (2, 1), (13, 7)),
    "window": (dict(window=(2, 1)), dict(window=(2, 1)), (4, 4), (9, 11)),
    "window_causal": (dict(window=(3, -1), is_causal=True), dict(window=(3, -1), is_causal=True),
                      (4, 2), (11, 11)),
    "gqa_bias": (dict(bias=True), dict(bias=True), (6, 2), (9, 11)),
    "alibi_causal": (dict(alibi_slopes=SLOPES4, is_causal=True),
                     dict(alibi=SLOPES4, is_causal=True), (4, 2), (9, 11)),
    "softcap_bias": (dict(softcap=0.7, bias=True), dict(softcap=0.7, bias=True), (4, 2), (9, 11)),
    "varlen": (dict(cu_seqlens_q=[0, 4, 4, 9], cu_seqlens_k=[0, 6, 7, 11], is_causal=True),
               dict(cu_q=[0, 4, 4, 9], cu_k=[0, 6, 7, 11], is_causal=True), (4, 2), (9, 11)),
    "varlen_self": (dict(cu_seqlens_q=[0, 3, 8, 10]), dict(cu_q=[0, 3, 8, 10]), (2, 2), (10, 10)),
    "all": (dict(cu_seqlens_q=[0, 5, 9], cu_seqlens_k=[0, 4, 11], window=(2, 1), softcap=1.5,
                 alibi_slopes=SLOPES4, mask="rows"),
            dict(cu_q=[0, 5, 9], cu_k=[0, 4, 11], window=(2, 1), softcap=1.5, alibi=SLOPES4,
                 allowed="rows"), (4, 2), (9, 11)),
}
# Blocks: the default (one block here), several on each axis, single rows and keys.
CHUNKS = {"default": None, "3x5": (3, 5), "2x2": (2, 2), "4x3": (4, 3), "1x1": (1, 1)}
# Pooling cells: dividing neither L nor S, larger than the blocks, larger than the axes.
POOLS = [(2, 3), (4, 4), (3, 20), (1, 1)]


def _case(rng, name):
    """Inputs (NumPy float64), mha_xp's keyword arguments and the reference's."""
    ours, theirs, (hq, hkv), (L, S) = CASES[name]
    ours, theirs = dict(ours), dict(theirs)
    q, k = _inputs(rng, hq=hq, hkv=hkv, L=L, S=S)
    if ours.get("bias"):
        ours["bias"] = theirs["bias"] = rng.standard_normal((hq, L, S))
    if ours.get("mask") == "rows":
        ours["mask"] = theirs["allowed"] = _mask_with_empty_rows(rng, L, S)
    return (q, k), ours, theirs


def _on(backend, kwargs, dtype):
    """mha_xp's keyword arguments moved to a backend."""
    out = {}
    for n, a in kwargs.items():
        if n == "alibi_slopes":
            a = backend.asarray(np.asarray(a), "float32")
        elif n in ("cu_seqlens_q", "cu_seqlens_k"):
            a = backend.cxp.asarray(np.asarray(a), device=backend.device)
        elif n == "mask":
            a = backend.asarray(a)
        elif n in ("bias", "sinks"):
            a = backend.asarray(a, dtype)
        out[n] = a
    return out


def _stats(*args, pool=(2, 3), **kwargs):
    return attention_statistics(*args, key_mass=True, entropy=True, pool=pool, **kwargs)


def _dense(q, k, pool, **kwargs):
    """The same reductions of the weights scaled_dot_product_attention returns."""
    _, w = sdpa(q, k, k, return_weights=True, **kwargs)
    return reductions(w, pool)


# ---------------------------------------------------- float64, every variant


class TestFloat64:
    @pytest.mark.parametrize("chunk", list(CHUNKS.values()), ids=list(CHUNKS))
    @pytest.mark.parametrize("name", list(CASES))
    def test_against_reference(self, rng, name, chunk):
        (q, k), ours, theirs = _case(rng, name)
        _, ref_w = ref_variants(q, k, k, **theirs)
        for pool in POOLS:
            out = _stats(q, k, pool=pool, chunk_size=chunk, **ours)
            assert list(out) == list(NAMES)
            for n, ref, dense in zip(NAMES, reductions(ref_w, pool), _dense(q, k, pool, **ours)):
                assert out[n].dtype == np.float64 and out[n].shape == ref.shape, n
                assert rel_err(out[n], ref) < 1e-12, (n, pool)
                assert rel_err(out[n], dense) < 1e-13, (n, pool)

    def test_only_what_is_asked(self, rng):
        q, k = _inputs(rng)
        full = _stats(q, k, pool=(2, 2), chunk_size=3)
        for kw, names in [(dict(key_mass=True), ["key_mass"]), (dict(entropy=True), ["entropy"]),
                          (dict(pool=(2, 2)), ["pooled"]),
                          (dict(entropy=True, pool=(2, 2)), ["entropy", "pooled"])]:
            out = attention_statistics(q, k, chunk_size=3, **kw)
            assert list(out) == names
            for n in names:
                np.testing.assert_allclose(out[n], full[n], rtol=1e-14, atol=1e-15)

    def test_without_heads(self, rng):
        q, k = rng.standard_normal((7, 3)), rng.standard_normal((10, 3))
        out = _stats(q, k, pool=(3, 4), is_causal=True, chunk_size=(2, 3))
        assert [out[n].shape for n in NAMES] == [(10,), (7,), (3, 3)]
        for n, ref in zip(NAMES, _dense(q, k, (3, 4), is_causal=True)):
            assert rel_err(out[n], ref) < 1e-13

    def test_broadcast_batch(self, rng):
        # A query shared by a batch of keys: the statistics have the broadcast shape.
        q, k = rng.standard_normal((1, 2, 5, 4)), rng.standard_normal((3, 2, 6, 4))
        out = _stats(q, k, chunk_size=2)
        assert out["key_mass"].shape == (3, 2, 6) and out["pooled"].shape == (3, 2, 3, 2)
        for n, ref in zip(NAMES, _dense(q, k, (2, 3))):
            assert rel_err(out[n], ref) < 1e-13

    def test_fully_masked_rows(self, rng):
        q, k = _inputs(rng, L=6, S=8)
        mask = np.ones((6, 8), bool)
        mask[2] = mask[5] = False
        for chunk in (None, 2):
            out = _stats(q, k, mask=mask, chunk_size=chunk)
            assert np.all(out["entropy"][..., [2, 5]] == 0)
            assert np.all(np.isfinite(out["entropy"])) and np.all(out["entropy"] >= 0)
            np.testing.assert_allclose(out["key_mass"].sum(axis=-1), 4.0)  # 4 rows see keys
        # Nothing to attend to anywhere.
        out = _stats(q[..., :3, :], k, mask=np.zeros((3, 8), bool))
        for n in NAMES:
            assert np.all(out[n] == 0)

    def test_uniform_entropy(self, rng):
        # Equal scores: the entropy of the uniform distribution over the keys seen.
        q, k = np.zeros((1, 6, 4)), rng.standard_normal((1, 9, 4))
        out = attention_statistics(q, k, is_causal=True, entropy=True, chunk_size=(2, 2))
        np.testing.assert_allclose(out["entropy"][0], np.log(np.arange(4, 10)), rtol=1e-13)

    def test_skips_key_blocks(self, rng, monkeypatch):
        # A narrow window and the causal band: blocks outside are never computed,
        # and none is larger than the blocks asked for.
        import mha_xp._core._statistics as core

        blocks = []
        real = core.block_scores

        def counting(*args, **kwargs):
            blocks.append((args[3], args[4]))
            return real(*args, **kwargs)

        monkeypatch.setattr(core, "block_scores", counting)
        q, k = rng.standard_normal((2, 16, 4)), rng.standard_normal((2, 16, 4))
        out = _stats(q, k, window=(3, 0), pool=(4, 4), chunk_size=4)
        assert 0 < len(blocks) <= 7  # of 16
        assert all(r.stop - r.start <= 4 and c.stop - c.start <= 4 for r, c in blocks)
        for n, ref in zip(NAMES, _dense(q, k, (4, 4), window=(3, 0))):
            assert rel_err(out[n], ref) < 1e-13

    def test_mqa(self, rng):
        # One key head for all the query heads: per query head.
        q, k = _inputs(rng, hq=4, hkv=1)
        out = _stats(q, k, chunk_size=(3, 4))
        assert out["key_mass"].shape == (2, 4, 11)
        for n, ref in zip(NAMES, _dense(q, k, (2, 3))):
            assert rel_err(out[n], ref) < 1e-13


# --------------------------------------------------------------- backends


BACKEND_CASES = ["mask_rows", "causal_more_queries", "gqa_bias", "alibi_causal", "all"]
BACKEND_CHUNKS = {"default": None, "3x5": (3, 5), "2x4": (2, 4)}


class TestBackends:
    @pytest.mark.parametrize("chunk", list(BACKEND_CHUNKS.values()), ids=list(BACKEND_CHUNKS))
    @pytest.mark.parametrize("name", BACKEND_CASES)
    def test_against_reference(self, backend, dtype, rng, name, chunk):
        (q, k), ours, theirs = _case(rng, name)
        _, ref_w = ref_variants(q, k, k, **theirs)
        args = [backend.asarray(t, dtype) for t in (q, k)]
        kw = _on(backend, ours, dtype)
        pool = (2, 3) if chunk != (3, 5) else (4, 4)  # cells in pieces along the queries
        out = _stats(*args, pool=pool, chunk_size=chunk, **kw)
        _, w = sdpa(*args, args[1], return_weights=True, **kw)
        for n, ref, dense in zip(NAMES, reductions(ref_w, pool),
                                 reductions(backend.to_numpy(w), pool)):
            assert_preserved(backend, out[n], dtype, ref.shape)
            got = backend.to_numpy(out[n])
            assert_close(got, ref, dtype)
            assert_close(got, dense, dtype)

    def test_sinks(self, backend, dtype, rng):
        q, k = _inputs(rng, hq=4, hkv=2)
        mask = _mask_with_empty_rows(rng, 9, 11)
        sinks = rng.standard_normal(4)
        w, p_sink = ref_sink_weights(q, k, mask, sinks)
        args = [backend.asarray(t, dtype) for t in (q, k)]
        kw = _on(backend, dict(mask=mask, sinks=sinks), dtype)
        for chunk in (None, (3, 5)):
            out = _stats(*args, chunk_size=chunk, is_causal=False, **kw)
            for n, ref in zip(NAMES, reductions(w, (2, 3), p_sink)):
                assert_preserved(backend, out[n], dtype, ref.shape)
                assert_close(backend.to_numpy(out[n]), ref, dtype)

    def test_float16(self, backend_f16, rng):
        (q, k), ours, theirs = _case(rng, "all")
        q, k = (t.astype(np.float16).astype(np.float64) for t in (q, k))
        _, ref_w = ref_variants(q, k, k, **theirs)
        args = [backend_f16.asarray(t, "float16") for t in (q, k)]
        kw = _on(backend_f16, ours, "float16")
        for chunk in (None, (3, 5)):
            out = _stats(*args, chunk_size=chunk, **kw)
            for n, ref in zip(NAMES, reductions(ref_w, (2, 3))):
                # Computed in float32, and returned in it, as attention_with_lse's lse.
                assert_preserved(backend_f16, out[n], "float32", ref.shape)
                assert_close(backend_f16.to_numpy(out[n]), ref, "float16")


class TestSinks:
    def test_against_dense_weights(self, rng):
        # The weights scaled_dot_product_attention returns with sinks are those over
        # the keys: the sink has what they leave, 1 - rowsum.
        q, k = _inputs(rng, hq=4, hkv=2)
        mask = _mask_with_empty_rows(rng, 9, 11)
        sinks = rng.standard_normal(4)
        _, w = sdpa(q, k, k, mask=mask, sinks=sinks, is_causal=True, return_weights=True)
        ref = reductions(w, (4, 4), 1.0 - w.sum(axis=-1))
        for chunk in (None, (3, 5), (2, 2)):
            out = _stats(q, k, mask=mask, sinks=sinks, is_causal=True, pool=(4, 4),
                         chunk_size=chunk)
            for n, r in zip(NAMES, ref):
                assert rel_err(out[n], r) < 1e-12, n

    def test_empty_rows_give_all_to_the_sink(self, rng):
        q, k = _inputs(rng, hq=2, hkv=2, L=4, S=5)
        out = _stats(q, k, mask=np.zeros((4, 5), bool), sinks=np.array([0.5, -3.0]))
        for n in NAMES:
            assert np.all(out[n] == 0), n

    def test_large_sink_takes_the_mass(self, rng):
        q, k = _inputs(rng, hq=2, hkv=2, L=4, S=5)
        out = _stats(q, k, sinks=np.array([60.0, 60.0]))
        assert np.all(out["key_mass"] < 1e-20) and np.all(out["entropy"] < 1e-20)


# ------------------------------------------------------- non-finite inputs


class TestNonFinite:
    @pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf])
    @pytest.mark.parametrize("chunk", [None, (2, 3), (4, 4)], ids=["default", "2x3", "4x4"])
    def test_nan_rows_as_the_dense_weights(self, rng, garbage, chunk):
        # A key holding a non-finite entry poisons the rows that see it (NaN weights
        # throughout, as attention_with_lse's NaN lse): the same reductions of the
        # dense weights, NaN where they are NaN, the rest equal.
        q, k = _inputs(rng, hq=2, hkv=2, L=9, S=11)
        k[0, 1, 6, 2] = garbage
        q[1, 0, 2, 1] = garbage
        out = _stats(q, k, is_causal=True, chunk_size=chunk, pool=(2, 3))
        dense = _dense(q, k, (2, 3), is_causal=True)
        for n, ref in zip(NAMES, dense):
            np.testing.assert_array_equal(np.isnan(out[n]), np.isnan(ref), err_msg=n)
            ok = ~np.isnan(ref)
            np.testing.assert_allclose(out[n][ok], ref[ok], rtol=1e-12, atol=1e-15)
        assert np.isnan(out["entropy"][0, 1, 4:]).all()  # rows i >= 4 see key 6 = i + 2
        assert not np.isnan(out["entropy"][0, 1, :4]).any()
        assert not np.isnan(out["entropy"][0, 0]).any()
        assert np.isnan(out["key_mass"][0, 1]).all() and not np.isnan(out["key_mass"][0, 0]).any()

    def test_backends(self, backend, dtype, rng):
        # NaN where NumPy has NaN (lazy, traced and device arrays always take the
        # finite stand-ins), with grouped heads, sinks and skipped key blocks.
        q, k = _inputs(rng, hq=4, hkv=2)
        k[0, 1, 6, 2] = np.nan
        q[1, 3, 2, 0] = np.inf
        sinks = rng.standard_normal(4)
        kw = dict(is_causal=True, chunk_size=(2, 3), pool=(2, 3))
        ref = _stats(q.astype(dtype), k.astype(dtype), sinks=sinks.astype(dtype), **kw)
        args = [backend.asarray(t, dtype) for t in (q, k)]
        out = _stats(*args, sinks=backend.asarray(sinks, dtype), **kw)
        for n in NAMES:
            got = backend.to_numpy(out[n])
            np.testing.assert_array_equal(np.isnan(got), np.isnan(ref[n]), err_msg=n)
            assert np.isnan(got).any() and not np.isnan(got).all()
            ok = ~np.isnan(ref[n])
            np.testing.assert_allclose(got[ok], ref[n][ok], rtol=10 * REL_TOL[dtype],
                                       atol=10 * REL_TOL[dtype])

    def test_hidden_keys_change_nothing(self, rng):
        q, k = _inputs(rng, hq=2, hkv=2, L=6, S=8)
        mask = np.ones((6, 8), bool)
        mask[:, 3] = False
        clean = _stats(q, k, mask=mask, chunk_size=(2, 3))
        k[..., 3, :] = np.nan
        with np.errstate(all="raise"):
            dirty = _stats(q, k, mask=mask, chunk_size=(2, 3))
        for n in NAMES:
            np.testing.assert_array_equal(dirty[n], clean[n])

    def test_no_floating_point_warnings(self, rng):
        q, k = _inputs(rng)
        mask = _mask_with_empty_rows(rng, 9, 11)
        with np.errstate(all="raise"):
            for chunk in (None, (2, 3)):
                _stats(q, k, mask=mask, is_causal=True, sinks=np.zeros(4), chunk_size=chunk,
                       softcap=1.0)


# ------------------------------------------------------------ Dask and JAX


class TestLazyAndTraced:
    def test_dask_stays_lazy(self, rng):
        be = make_backend("dask")
        da = be.xp
        (q, k), ours, theirs = _case(rng, "all")
        _, ref_w = ref_variants(q, k, k, **theirs)
        kw = _on(be, ours, "float64")
        dq = da.from_array(q, chunks=(1, 2, 4, 4))  # blocks of queries starting past row 0
        dk = da.from_array(k, chunks=(1, 1, 5, 4))
        for chunk in (None, (3, 5)):
            out = _stats(dq, dk, chunk_size=chunk, **kw)
            for n, ref in zip(NAMES, reductions(ref_w, (2, 3))):
                assert isinstance(out[n], da.Array), n
                assert rel_err(out[n].compute(), ref) < 1e-12, n

    def test_jax_jit(self, rng):
        be = make_backend("jax")
        import jax

        jnp = be.xp
        (q, k), ours, theirs = _case(rng, "all")
        _, ref_w = ref_variants(q, k, k, **theirs)
        cu_q, cu_k = (jnp.asarray(ours.pop(n)) for n in ("cu_seqlens_q", "cu_seqlens_k"))
        mask, slopes = jnp.asarray(ours.pop("mask")), jnp.asarray(ours.pop("alibi_slopes"))
        sinks = jnp.asarray(rng.standard_normal(4))

        @jax.jit
        def f(q, k, cu_q, cu_k, mask, slopes):
            return _stats(q, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, mask=mask,
                          alibi_slopes=slopes, chunk_size=(3, 5), **ours)

        out = f(jnp.asarray(q), jnp.asarray(k), cu_q, cu_k, mask, slopes)
        for n, ref in zip(NAMES, reductions(ref_w, (2, 3))):
            assert rel_err(np.asarray(out[n]), ref) < 1e-12, n
        # With sinks and a poisoned row, traced: NaN where the eager call has NaN.
        k_bad = k.copy()
        k_bad[0, 0, 3, 0] = np.nan
        g = jax.jit(lambda q, k, s: _stats(q, k, sinks=s, is_causal=True, chunk_size=(4, 4)))
        traced = g(jnp.asarray(q), jnp.asarray(k_bad), sinks)
        eager = _stats(q, k_bad, sinks=np.asarray(sinks), is_causal=True, chunk_size=(4, 4))
        for n in NAMES:
            np.testing.assert_allclose(np.asarray(traced[n]), eager[n], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ memory


def test_memory_is_linear(rng):
    # Far less than the L x S weights (16 MiB here) at any time.
    L = S = 2048
    q, k = (rng.standard_normal((1, n, 16)).astype(np.float32) for n in (L, S))
    weights = L * S * 4
    tracemalloc.start()
    try:
        out = _stats(q, k, pool=(64, 64), chunk_size=(256, 256), is_causal=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < weights / 8, (peak, weights)
    small = _stats(q[:, :256], k[:, :256], pool=(64, 64), is_causal=True)
    np.testing.assert_allclose(out["pooled"][:, :4, :4], small["pooled"], rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------ errors


class TestErrors:
    def test_nothing_asked(self, rng):
        q, k = _inputs(rng)
        with pytest.raises(ValueError, match="computes nothing unless asked"):
            attention_statistics(q, k)
        with pytest.raises(ValueError, match="computes nothing unless asked"):
            attention_statistics(q, k, key_mass=False, entropy=False, pool=None)

    @pytest.mark.parametrize("pool,exc", [
        (0, TypeError), (4, TypeError), ((2,), TypeError), ((1, 2, 3), TypeError),
        ((2.0, 3), TypeError), ((True, 2), TypeError), ("ab", TypeError), ((2, None), TypeError),
        ((0, 2), ValueError), ((2, -1), ValueError)])
    def test_bad_pool(self, rng, pool, exc):
        q, k = _inputs(rng)
        with pytest.raises(exc, match="pool must be"):
            attention_statistics(q, k, pool=pool)

    def test_other_arguments(self, rng):
        q, k = _inputs(rng)
        cases = [
            (dict(key_mass="yes"), TypeError, "key_mass must be a Python bool"),
            (dict(entropy=np.ones(2)), TypeError, "entropy must be a Python bool"),
            (dict(key_mass=True, chunk_size=0), ValueError, "chunk_size must be a positive"),
            (dict(key_mass=True, mask=np.ones((3, 9, 11), bool)), ValueError, "mask"),
            (dict(key_mass=True, window=3), TypeError, "window must be None or a pair"),
            (dict(key_mass=True, softcap=-1.0), ValueError, "softcap"),
            (dict(key_mass=True, attn_mask=np.ones((9, 11), bool)), TypeError, "mask=~attn_mask"),
        ]
        for kw, exc, match in cases:
            with pytest.raises(exc, match=match):
                attention_statistics(q, k, **kw)
        with pytest.raises(TypeError, match="value"):
            attention_statistics(q, k, value=k, key_mass=True)
        with pytest.raises(TypeError, match="dtype"):
            attention_statistics(q, k.astype(np.float32), key_mass=True)
        with pytest.raises(ValueError, match="multiple"):
            attention_statistics(q, k[:, :1].repeat(3, axis=1), key_mass=True)


def test_public_name():
    assert mha_xp.attention_statistics is attention_statistics
    assert "attention_statistics" in mha_xp.__all__
