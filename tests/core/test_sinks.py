"""Attention sinks (``sinks=``, one logit per query head, gpt-oss /
StreamingLLM): ``P_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij))``,
``out = P V``, zeros for a row with no key.

On every backend, dense and chunked, with grouped-query heads and every
score variant (mask, causal, window, softcap, ALiBi, bias, dropout, packed
sequences), float16, fully masked rows and extreme sinks: against a float64
reference (``ref_sinks``), against torch autograd through a dense torch
evaluation (the sink appended as one more score column, softmax, the column
dropped) and finite differences; the output equals
``merge_attention(*attention_with_lse(...), zeros, sink)`` bit for bit; the
log-sum-exp includes ``exp(sink)``; the weights are those over the keys.
JAX and Dask run in their own tests here (the ``backend`` fixture leaves
them out of this file by default, see ``tests/conftest.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mha_xp
from support import REL_TOL, assert_close, assert_preserved, make_backend, rel_err, selected_backends
from support.reference_variants import central_differences, ref_positions

torch = pytest.importorskip("torch", reason="optional backend torch not installed")

sdpa = mha_xp.scaled_dot_product_attention
CHUNKS = [None, (3, 5), (2, 3)]
CHUNK_IDS = ["dense", "chunked35", "chunked23"]
# Gradients against torch autograd (float64 reference), relative to
# max(‖ref‖, 1) (a gradient that is exactly 0 is compared absolutely).
GRAD_TOL = {"float32": 2e-5, "float64": 1e-12}


def _grad_err(g, ref):
    g, ref = np.asarray(g, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert g.shape == ref.shape, (g.shape, ref.shape)
    assert np.all(np.isfinite(g))
    return float(np.linalg.norm(g - ref) / max(np.linalg.norm(ref), 1.0))


# ----------------------------------------------------------------- references


def _scores(q, k, T, *, allowed, bias, is_causal, window, alibi, softcap, scale):
    """Scaled, capped, biased, masked scores ``(..., Hq, L, S)`` of array
    module ``T`` (numpy or torch), grouped-query keys repeated per head."""
    L, S = q.shape[-2], k.shape[-2]
    ok, rel = ref_positions(L, S, is_causal=is_causal, window=window)
    if allowed is not None:
        ok = ok & np.asarray(allowed)
    group = q.shape[-3] // k.shape[-3]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if T is np:
        kk = np.repeat(k, group, axis=-3)
        s = q @ np.swapaxes(kk, -1, -2) * scale
        tanh, tensor = np.tanh, np.asarray
    else:
        kk = k.repeat_interleave(group, dim=-3)
        s = q @ kk.transpose(-1, -2) * scale
        tanh, tensor = torch.tanh, torch.tensor
    if softcap is not None:
        s = softcap * tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if alibi is not None:
        s = s - tensor(np.asarray(alibi, np.float64)[..., None, None] * np.abs(rel))
    return s, ok, group


def ref_sinks(q, k, v, sinks, *, mask=None, bias=None, is_causal=False, window=None,
              alibi_slopes=None, softcap=None, scale=None):
    """float64 ``(out, weights over the keys, lse)`` of attention with a
    sink column: ``exp(sink_h)`` joins every row's sum and carries no value."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    s, ok, group = _scores(q, k, np, allowed=mask, bias=bias, is_causal=is_causal,
                           window=window, alibi=alibi_slopes, softcap=softcap, scale=scale)
    s = np.where(np.broadcast_to(ok, s.shape), s, -np.inf)
    sink = np.full(s.shape[:-1] + (1,), -np.inf)
    if sinks is not None:
        sink = np.broadcast_to(np.asarray(sinks, np.float64)[:, None, None], sink.shape)
    full = np.concatenate([s, sink], axis=-1)
    m = full.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(full - m)
    total = e.sum(axis=-1, keepdims=True)
    p = (e / np.where(total == 0, 1.0, total))[..., :-1]
    out = p @ np.repeat(v, group, axis=-3)
    lse = np.where(total[..., 0] == 0, np.inf, m[..., 0] + np.log(np.where(total == 0, 1, total)[..., 0]))
    return out, p, lse


def torch_sinks(q, k, v, sinks, go, *, mask=None, bias=None, is_causal=False, window=None,
                alibi_slopes=None, softcap=None, scale=None):
    """The dense torch evaluation, float64, and its autograd gradients: the
    sinks appended as a score column, softmax, the column dropped."""
    t = {n: torch.tensor(np.asarray(a, np.float64), requires_grad=True)
         for n, a in (("query", q), ("key", k), ("value", v), ("sinks", sinks), ("bias", bias))
         if a is not None}
    s, ok, group = _scores(t["query"], t["key"], torch, allowed=mask, bias=t.get("bias"),
                           is_causal=is_causal, window=window, alibi=alibi_slopes,
                           softcap=softcap, scale=scale)
    s = s.masked_fill(~torch.tensor(np.broadcast_to(ok, tuple(s.shape))), float("-inf"))
    col = t["sinks"][:, None, None].expand(*s.shape[:-1], 1)
    p = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)[..., :-1]
    out = p @ t["value"].repeat_interleave(group, dim=-3)
    out.backward(torch.tensor(go))
    return out.detach().numpy(), {n: x.grad.numpy() for n, x in t.items()}


def _inputs(rng, B=2, hq=4, hkv=2, L=7, S=9, D=4, Dv=3):
    q = rng.standard_normal((B, hq, L, D))
    k = rng.standard_normal((B, hkv, S, D))
    v = rng.standard_normal((B, hkv, S, Dv))
    # Sinks of both signs, one of them dominant: rows keep from ~10% to ~95%.
    sinks = np.array([-1.0, 0.5, 2.5, -3.0])[:hq] + 0.3 * rng.standard_normal(hq)
    return q, k, v, sinks


def _mask(rng, B=2, L=7, S=9):
    """A random mask with one fully masked row (batch 0, query 2)."""
    mask = rng.random((B, 1, L, S)) < 0.75
    mask[0, 0, 2, :] = False
    return mask


# name: keyword arguments of mha_xp ("mask"/"bias"/"alibi_slopes" filled in by _case)
VARIANTS = {
    "plain": {},
    "mask_causal": dict(mask=True, is_causal=True),
    "window": dict(window=(2, 1)),
    "softcap_bias": dict(softcap=2.0, bias=True),
    "alibi_causal": dict(alibi_slopes=True, is_causal=True),
    "scale": dict(scale=0.3),
    "all": dict(mask=True, is_causal=True, window=(3, 2), softcap=1.5, alibi_slopes=True,
                bias=True),
}


def _case(rng, name, **sizes):
    q, k, v, sinks = _inputs(rng, **sizes)
    kw = dict(VARIANTS[name])
    B, L, S = q.shape[0], q.shape[-2], k.shape[-2]
    if kw.get("mask"):
        kw["mask"] = _mask(rng, B, L, S)
    if kw.get("bias"):
        kw["bias"] = rng.standard_normal((q.shape[-3], L, S))
    if kw.get("alibi_slopes"):
        kw["alibi_slopes"] = np.array([0.5, 0.25, 0.125, 0.0625])
    return (q, k, v, sinks), kw


def _on(backend, kwargs, dtype):
    out = {}
    for n, a in kwargs.items():
        if n == "mask":
            a = backend.asarray(a)
        elif n in ("bias", "alibi_slopes"):
            a = backend.asarray(a, dtype)
        out[n] = a
    return out


def test_reference_agrees_with_torch_and_definition(rng):
    """The two references agree, and with the definition entry by entry."""
    (q, k, v, sinks), kw = _case(rng, "all")
    out, p, lse = ref_sinks(q, k, v, sinks, **kw)
    t_out, _ = torch_sinks(q, k, v, sinks, np.zeros(out.shape), **kw)
    assert rel_err(out, t_out) < 1e-14
    # The fully masked row: nothing, and its lse is the sink alone.
    assert np.all(out[0, :, 2] == 0) and np.all(p[0, :, 2] == 0)
    np.testing.assert_array_equal(lse[0, :, 2], sinks)
    # Rows sum to 1 - P_sink = 1 - exp(sink - lse).
    np.testing.assert_allclose(p.sum(-1) + np.exp(sinks[:, None] - lse), 1.0, rtol=1e-14)
    # One entry from the definition, with no sink: the plain softmax.
    out0, p0, _ = ref_sinks(q, k, v, None)
    s = q[1, 3] @ k[1, 1].T / 2.0
    np.testing.assert_allclose(p0[1, 3], np.exp(s) / np.exp(s).sum(-1, keepdims=True), rtol=1e-14)


# ------------------------------------------------------------------- forward


class TestForward:
    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    @pytest.mark.parametrize("name", list(VARIANTS))
    def test_variants_float64(self, rng, name, chunk):
        (q, k, v, sinks), kw = _case(rng, name)
        ref, ref_w, ref_lse = ref_sinks(q, k, v, sinks, **kw)
        out, w = sdpa(q, k, v, sinks=sinks, chunk_size=chunk, return_weights=True, **kw)
        assert rel_err(out, ref) < 1e-13
        assert rel_err(w, ref_w) < 1e-13
        out2, lse = mha_xp.attention_with_lse(q, k, v, sinks=sinks, chunk_size=chunk, **kw)
        np.testing.assert_array_equal(out, out2)
        assert rel_err(lse, ref_lse) < 1e-14
        # The lse includes exp(sink): logaddexp of the lse without sinks and the sink.
        _, lse0 = mha_xp.attention_with_lse(q, k, v, chunk_size=chunk, **kw)
        empty = np.isinf(lse0)
        joined = np.where(empty, sinks[:, None],
                          np.logaddexp(np.where(empty, -np.inf, lse0), sinks[:, None]))
        np.testing.assert_allclose(lse, joined, rtol=1e-14)
        # The weights are those over the keys: with the sink's they sum to 1.
        np.testing.assert_allclose(w.sum(-1) + np.exp(sinks[:, None] - lse), 1.0, rtol=1e-13)

    def test_varlen_and_memory_budget(self, rng):
        """Packed sequences, and the chunked path chosen by a small budget."""
        q, k, v, sinks = _inputs(rng, L=9, S=9)
        cu = [0, 3, 8, 9]
        ref = np.zeros((2, 4, 9, 3))
        for a, b in zip(cu, cu[1:]):  # attention within each sequence, with the sinks
            ref[:, :, a:b] = ref_sinks(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], sinks,
                                       is_causal=True)[0]
        out = sdpa(q, k, v, sinks=sinks, cu_seqlens_q=cu, is_causal=True)
        assert rel_err(out, ref) < 1e-13
        out_c = sdpa(q, k, v, sinks=sinks, cu_seqlens_q=cu, is_causal=True, memory_budget=64)
        assert rel_err(out_c, ref) < 1e-13

    def test_gqa_heads_have_their_own_sinks(self, rng):
        """Query heads of one group share keys, not sinks: identical queries
        of the two heads of a group give different outputs, as the reference."""
        q, k, v, sinks = _inputs(rng)
        q[:, 1] = q[:, 0]
        out = sdpa(q, k, v, sinks=sinks)
        assert rel_err(out[:, 0], out[:, 1]) > 1e-2
        assert rel_err(out, ref_sinks(q, k, v, sinks)[0]) < 1e-13
        same = sdpa(q, k, v, sinks=np.full(4, sinks[0]))
        np.testing.assert_array_equal(same[:, 0], same[:, 1])

    def test_unbatched_heads(self, rng):
        """(H, L, D) inputs: one sink per head."""
        q, k, v, sinks = _inputs(rng, hkv=4)
        out = sdpa(q[0], k[0], v[0], sinks=sinks)
        assert rel_err(out, ref_sinks(q[:1], k[:1], v[:1], sinks)[0][0]) < 1e-13

    # (L, D) inputs: one head, the sink a 0-d logit against the rows' (L,) statistics.
    def test_two_dimensional_inputs(self, rng):
        q, k, v, sinks = _inputs(rng, hq=1, hkv=1)
        out = sdpa(q[0, 0], k[0, 0], v[0, 0], sinks=sinks[:1])
        assert rel_err(out, ref_sinks(q[:1], k[:1], v[:1], sinks[:1])[0][0, 0]) < 1e-13

    def test_infinite_sink_takes_all_the_mass(self, rng):
        """A sink of +inf takes every row's whole weight: zero output, finite
        gradients (zero for the keys and values), not the no-sink result."""
        q, k, v, sinks = _inputs(rng, hq=2, hkv=2)
        sinks = np.array([np.inf, sinks[1]])
        out, backward = mha_xp.attention_vjp(q, k, v, sinks=sinks)
        assert not out[:, 0].any()
        assert rel_err(out[:, 1], ref_sinks(q, k, v, sinks[[1, 1]])[0][:, 1]) < 1e-13
        grads = backward(rng.standard_normal(out.shape))
        assert all(np.isfinite(g).all() for g in grads.values())
        assert not grads["value"][:, 0].any()

    def test_native_kernels_do_not_drop_the_sinks(self, rng):
        """With torch's own SDPA allowed, a call with sinks still has them."""
        q, k, v, sinks = _inputs(rng)
        t = [torch.tensor(a) for a in (q, k, v, sinks)]
        with mha_xp.native_kernels(True):
            out = sdpa(*t[:3], sinks=t[3], is_causal=True)
        assert rel_err(out.numpy(), ref_sinks(q, k, v, sinks, is_causal=True)[0]) < 1e-13


# ------------------------------------------------------ the merge identity


def _merged(backend, out0, lse0, sinks):
    """merge_attention of a result without sinks with a zero output of
    log-sum-exp ``sink`` (per query head)."""
    xp = backend.cxp
    sink = xp.broadcast_to(xp.reshape(xp.astype(sinks, lse0.dtype), (-1, 1)), lse0.shape)
    return mha_xp.merge_attention(out0, lse0, xp.zeros_like(out0), sink)


class TestBackends:
    """Every backend, dense and chunked, with every variant at once
    (grouped-query heads, mask with a fully masked row, causal, window,
    softcap, ALiBi, bias): the reference, the merge identity, the gradients."""

    def test_forward_merge_backward(self, backend, rng):
        # Blocks of (3, 5) that divide (L, S): fewer shapes for JAX to compile
        # (the ragged last blocks are the NumPy tests' below). JAX compiles
        # every operation anew per dtype (~15 s for this test): it and Dask,
        # whose code is the eager backends', run float32 only.
        (q, k, v, sinks), kw = _case(rng, "all", L=6, S=10)
        ref, ref_w, ref_lse = ref_sinks(q, k, v, sinks, **kw)
        go = rng.standard_normal(ref.shape)
        _, t_grads = torch_sinks(q, k, v, sinks, go, **kw)
        slow = backend.name in ("jax", "dask")
        for dtype, chunk in [(d, c) for d in (("float32",) if slow else ("float32", "float64"))
                             for c in (None, (3, 5))]:
            args = [backend.asarray(t, dtype) for t in (q, k, v)]
            sb, bkw = backend.asarray(sinks, dtype), _on(backend, kw, dtype)
            eps = float(np.finfo(dtype).eps)
            out, w = sdpa(*args, sinks=sb, chunk_size=chunk, return_weights=True, **bkw)
            assert_preserved(backend, out, dtype, ref.shape)
            assert_preserved(backend, w, dtype, ref_w.shape)
            o, wn = backend.to_numpy(out), backend.to_numpy(w)
            assert_close(o, ref, dtype)
            assert_close(wn, ref_w, dtype)
            assert np.all(wn.sum(-1) < 1.0)  # the weights over the keys
            assert np.all(o[0, :, 2] == 0) and np.all(wn[0, :, 2] == 0)  # the masked row
            out1, lse = mha_xp.attention_with_lse(*args, sinks=sb, chunk_size=chunk, **bkw)
            assert_preserved(backend, lse, dtype, ref_lse.shape)
            assert_close(backend.to_numpy(lse), ref_lse, dtype)
            # Bit for bit: the merge of the result without sinks with the sink.
            merged, merged_lse = _merged(backend, *mha_xp.attention_with_lse(
                *args, chunk_size=chunk, **bkw), sb)
            np.testing.assert_array_equal(o, backend.to_numpy(merged))
            np.testing.assert_array_equal(backend.to_numpy(out1), backend.to_numpy(merged))
            # The lse is logaddexp(lse, sink), to rounding (its formula differs from the merge's).
            np.testing.assert_allclose(backend.to_numpy(lse), backend.to_numpy(merged_lse),
                                       rtol=4 * eps, atol=4 * eps)
            out2, backward = mha_xp.attention_vjp(*args, sinks=sb, chunk_size=chunk, **bkw)
            np.testing.assert_array_equal(backend.to_numpy(out2), o)
            grads = backward(backend.asarray(go, dtype))
            assert sorted(grads) == sorted(t_grads)
            for n, tg in t_grads.items():
                assert_preserved(backend, grads[n], dtype, tg.shape)
                assert _grad_err(backend.to_numpy(grads[n]), tg) <= GRAD_TOL[dtype], n
            assert np.all(backend.to_numpy(grads["query"])[0, :, 2] == 0)

    def test_float16(self, backend_f16, rng):
        (q, k, v, sinks), kw = _case(rng, "mask_causal", L=6, S=10)
        q, k, v, sinks = (t.astype(np.float16) for t in (q, k, v, sinks))
        b = backend_f16
        ref, ref_w, ref_lse = ref_sinks(q, k, v, sinks, **kw)
        go = rng.standard_normal(ref.shape).astype(np.float16)
        _, t_grads = torch_sinks(q, k, v, sinks, go, **kw)
        args = [b.asarray(t, "float16") for t in (q, k, v)]
        sb, bkw = b.asarray(sinks, "float16"), _on(b, kw, "float16")
        # JAX and Dask: the dense path only (their chunked one is float32's, above).
        for chunk in (None,) if b.name in ("jax", "dask") else (None, (3, 5)):
            out, w = sdpa(*args, sinks=sb, chunk_size=chunk, return_weights=True, **bkw)
            assert_preserved(b, out, "float16", ref.shape)
            assert_close(b.to_numpy(out), ref, "float16")
            assert_close(b.to_numpy(w), ref_w, "float16")
            _, lse = mha_xp.attention_with_lse(*args, sinks=sb, chunk_size=chunk, **bkw)
            assert_preserved(b, lse, "float32", ref_lse.shape)  # 16-bit: a float32 lse
            assert_close(b.to_numpy(lse), ref_lse, "float32")
            merged, _ = _merged(b, *mha_xp.attention_with_lse(*args, chunk_size=chunk, **bkw), sb)
            np.testing.assert_array_equal(b.to_numpy(out), b.to_numpy(merged))
            _, backward = mha_xp.attention_vjp(*args, sinks=sb, chunk_size=chunk, **bkw)
            grads = backward(b.asarray(go, "float16"))
            for n, tg in t_grads.items():
                assert_preserved(b, grads[n], "float16", tg.shape)
                assert _grad_err(b.to_numpy(grads[n]), tg) <= 4 * REL_TOL["float16"], n

    def test_jax_jit_and_grad(self, rng):
        """Under jax.jit, and jax.grad through the forward (jitted) equals
        the hand-written backward; the case of test_forward_merge_backward,
        whose eager operations JAX has compiled already."""
        if "jax" not in selected_backends(("jax",)):
            pytest.skip("jax not selected (MHA_XP_BACKENDS)")
        b = make_backend("jax")
        import jax

        (q, k, v, sinks), kw = _case(rng, "all", L=6, S=10)
        ref = ref_sinks(q, k, v, sinks, **kw)[0]
        args = [b.asarray(t, "float32") for t in (q, k, v, sinks)]
        bkw = _on(b, kw, "float32")
        go = b.asarray(rng.standard_normal(ref.shape), "float32")
        f = jax.jit(lambda q_, k_, v_, s_: sdpa(q_, k_, v_, sinks=s_, **bkw))
        assert_close(b.to_numpy(f(*args)), ref, "float32")
        grad = jax.jit(jax.grad(lambda s_: (sdpa(*args[:3], sinks=s_, **bkw) * go).sum()))
        _, backward = mha_xp.attention_vjp(*args[:3], sinks=args[3], **bkw)
        assert rel_err(b.to_numpy(grad(args[3])), b.to_numpy(backward(go)["sinks"])) < 1e-5


    @pytest.mark.parametrize("name", selected_backends(("numpy", "array_api_strict",
                                                         "array_api_strict:device1", "torch")))
    def test_dropout(self, name, rng):
        """Dropout with sinks: the same keep-mask on every library (the output
        equals NumPy float64's to rounding), the merge identity, gradients."""
        b = make_backend(name)
        (q, k, v, sinks), kw = _case(rng, "mask_causal")
        kw |= dict(dropout_p=0.3, seed=2024)
        out64, back64 = mha_xp.attention_vjp(q, k, v, sinks=sinks, **kw)
        go = rng.standard_normal(out64.shape)
        g64 = back64(go)
        for dtype in ("float32", "float64"):
            args = [b.asarray(t, dtype) for t in (q, k, v)]
            sb, bkw = b.asarray(sinks, dtype), _on(b, kw, dtype)
            out, backward = mha_xp.attention_vjp(*args, sinks=sb, **bkw)
            assert_close(b.to_numpy(out), out64, dtype)
            merged, _ = _merged(b, *mha_xp.attention_with_lse(*args, **bkw), sb)
            np.testing.assert_array_equal(b.to_numpy(out), b.to_numpy(merged))
            grads = backward(b.asarray(go, dtype))
            for n, g in g64.items():
                assert _grad_err(b.to_numpy(grads[n]), g) <= GRAD_TOL[dtype], n


class TestMergeIdentity:
    """out(sinks) == merge_attention(*attention_with_lse(no sinks), 0, sink),
    bit for bit (array_equal ignores the sign of zeros), beyond the variants
    of TestBackends."""

    @pytest.mark.parametrize("chunk", [None, (3, 5)], ids=["dense", "chunked"])
    def test_dropout_and_varlen(self, rng, chunk):
        q, k, v, sinks = _inputs(rng, L=9, S=9)
        np_backend = make_backend("numpy")
        for kw in (dict(dropout_p=0.3, seed=7, is_causal=True),
                   dict(cu_seqlens_q=[0, 4, 9], is_causal=True, window=(2, 0)),
                   dict(dropout_p=0.5, seed=11, cu_seqlens_q=[0, 4, 9], softcap=3.0)):
            out = sdpa(q, k, v, sinks=sinks, chunk_size=chunk, **kw)
            merged, _ = _merged(np_backend, *mha_xp.attention_with_lse(
                q, k, v, chunk_size=chunk, **kw), sinks)
            np.testing.assert_array_equal(out, merged)


# --------------------------------------------------------- rows and limits


class TestRowsAndLimits:
    def test_everything_masked(self, rng):
        """No key anywhere: zeros, lse = sink, zero gradients (the sink too)."""
        q, k, v, sinks = _inputs(rng)
        mask = np.zeros((7, 9), dtype=bool)
        for chunk in (None, (3, 5)):
            out, lse = mha_xp.attention_with_lse(q, k, v, sinks=sinks, mask=mask, chunk_size=chunk)
            assert np.all(out == 0)
            np.testing.assert_allclose(lse, np.broadcast_to(sinks[:, None], lse.shape), rtol=1e-15,
                                       atol=1e-15)
            _, backward = mha_xp.attention_vjp(q, k, v, sinks=sinks, mask=mask, chunk_size=chunk)
            for n, g in backward(rng.standard_normal(out.shape)).items():
                assert np.all(g == 0), n

    def test_minus_inf_sink_is_no_sink(self, rng):
        (q, k, v, _), kw = _case(rng, "mask_causal")
        none = np.full(4, -np.inf)
        for chunk in (None, (3, 5)):
            out, w = sdpa(q, k, v, sinks=none, chunk_size=chunk, return_weights=True, **kw)
            out0, w0 = sdpa(q, k, v, chunk_size=chunk, return_weights=True, **kw)
            np.testing.assert_array_equal(out, out0)
            np.testing.assert_array_equal(w, w0)
            go = rng.standard_normal(out.shape)
            _, b = mha_xp.attention_vjp(q, k, v, sinks=none, chunk_size=chunk, **kw)
            _, b0 = mha_xp.attention_vjp(q, k, v, chunk_size=chunk, **kw)
            g, g0 = b(go), b0(go)
            np.testing.assert_array_equal(g["sinks"], np.zeros(4))
            for n in ("query", "key", "value"):
                np.testing.assert_array_equal(g[n], g0[n])

    @pytest.mark.parametrize("name", selected_backends(("numpy", "array_api_strict", "torch")))
    def test_large_sinks_do_not_overflow(self, name, rng):
        """A sink far above every score takes all the weight: zeros, finite
        gradients; exp(sink) alone would overflow float32 (exp(100))."""
        backend, dtype = make_backend(name), "float32"
        q, k, v, _ = _inputs(rng)
        sinks = np.array([100.0, 80.0, 0.0, -100.0])
        args = [backend.asarray(t, dtype) for t in (q, k, v, sinks)]
        out, lse = mha_xp.attention_with_lse(*args[:3], sinks=args[3])
        ref, _, ref_lse = ref_sinks(q, k, v, sinks)
        o = backend.to_numpy(out)
        assert np.all(np.isfinite(o)) and np.all(np.abs(o[:, :2]) < 1e-30)
        assert_close(o, ref, dtype)
        assert_close(backend.to_numpy(lse), ref_lse, dtype)
        _, backward = mha_xp.attention_vjp(*args[:3], sinks=args[3])
        go = rng.standard_normal(ref.shape)
        grads = backward(backend.asarray(go, dtype))
        _, t_grads = torch_sinks(q, k, v, sinks, go)
        for n in ("query", "key", "value", "sinks"):
            assert _grad_err(backend.to_numpy(grads[n]), t_grads[n]) <= GRAD_TOL[dtype], n


# ------------------------------------------------------------------ backward


class TestBackward:
    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    @pytest.mark.parametrize("name", list(VARIANTS))
    def test_against_torch_autograd(self, rng, name, chunk):
        (q, k, v, sinks), kw = _case(rng, name)
        out, backward = mha_xp.attention_vjp(q, k, v, sinks=sinks, chunk_size=chunk, **kw)
        go = rng.standard_normal(out.shape)
        t_out, t_grads = torch_sinks(q, k, v, sinks, go, **kw)
        assert rel_err(out, t_out) < 1e-13
        grads = backward(go)
        assert sorted(grads) == sorted(t_grads)
        for n, tg in t_grads.items():
            assert grads[n].shape == tg.shape and grads[n].dtype == np.float64, n
            assert _grad_err(grads[n], tg) < 1e-12, n
        # Deterministic.
        again = backward(go)
        for n in grads:
            np.testing.assert_array_equal(grads[n], again[n])

    @pytest.mark.parametrize("name", ["mask_causal", "all"])
    def test_finite_differences(self, rng, name):
        """Every gradient, the sinks' included, against central differences
        of the forward itself (float64)."""
        (q, k, v, sinks), kw = _case(rng, name, B=1, L=3, S=4, D=2, Dv=2)
        go = rng.standard_normal((1, 4, 3, 2))
        names = ["query", "key", "value", "sinks"] + (["bias"] if "bias" in kw else [])
        arrays = [q, k, v, sinks] + ([kw.pop("bias")] if "bias" in kw else [])

        def f(q_, k_, v_, s_, b_=None):
            return sdpa(q_, k_, v_, sinks=s_, **({} if b_ is None else {"bias": b_}), **kw)

        fd = central_differences(f, arrays, go)
        for chunk in (None, (2, 3)):
            bias = {"bias": arrays[4]} if len(arrays) == 5 else {}
            _, backward = mha_xp.attention_vjp(q, k, v, sinks=sinks, chunk_size=chunk, **bias,
                                               **kw)
            grads = backward(go)
            for n, g in zip(names, fd):
                assert _grad_err(grads[n], g) < 1e-8, (n, chunk)

    @pytest.mark.parametrize("chunk", [None, (3, 5)], ids=["dense", "chunked"])
    def test_dropout(self, rng, chunk):
        """With dropout the gradients are those of the same keep-mask (the
        seed fixes it): central differences of the forward; the weights
        returned are before dropout."""
        q, k, v, sinks = _inputs(rng, B=1, L=4, S=5, D=2, Dv=2)
        kw = dict(dropout_p=0.4, seed=123, is_causal=True)
        go = rng.standard_normal((1, 4, 4, 2))
        fd = central_differences(lambda *a: sdpa(*a[:3], sinks=a[3], chunk_size=chunk, **kw),
                                 [q, k, v, sinks], go)
        out, backward = mha_xp.attention_vjp(q, k, v, sinks=sinks, chunk_size=chunk, **kw)
        grads = backward(go)
        for n, g in zip(("query", "key", "value", "sinks"), fd):
            assert _grad_err(grads[n], g) < 1e-8, n
        _, w = sdpa(q, k, v, sinks=sinks, chunk_size=chunk, return_weights=True, **kw)
        assert rel_err(w, ref_sinks(q, k, v, sinks, is_causal=True)[1]) < 1e-13
        assert rel_err(out, sdpa(q, k, v, sinks=sinks, is_causal=True)) > 1e-3  # it drops

    def test_autograd_through_the_torch_forward(self, rng):
        """torch autograd through mha_xp's own forward on torch tensors agrees
        with attention_vjp's backward (the sinks' gradient included)."""
        (q, k, v, sinks), kw = _case(rng, "window")
        t = [torch.tensor(a, requires_grad=True) for a in (q, k, v, sinks)]
        go = torch.tensor(rng.standard_normal((2, 4, 7, 3)))
        (sdpa(*t[:3], sinks=t[3], **kw) * go).sum().backward()
        _, backward = mha_xp.attention_vjp(*(x.detach() for x in t[:3]), sinks=t[3].detach(), **kw)
        grads = backward(go)
        for n, x in zip(("query", "key", "value", "sinks"), t):
            assert rel_err(grads[n].numpy(), x.grad.numpy()) < 1e-12, n

    # L < S once made the parallel backward slice the keys by the query rows.
    @pytest.mark.parametrize("L,S", [(9, 7), (8, 8), (7, 9)])
    def test_parallel_executor(self, rng, monkeypatch, L, S):
        """NumPy calls split over threads give the serial results (to rounding)."""
        from mha_xp._core import _plan

        (q, k, v, sinks), kw = _case(rng, "mask_causal", B=3, L=L, S=S)
        go = rng.standard_normal((3, 4, L, 3))
        serial, sb = mha_xp.attention_vjp(q, k, v, sinks=sinks, num_threads=1, **kw)
        monkeypatch.setattr(_plan, "PARALLEL_FROM", 0)
        monkeypatch.setattr(_plan, "TASK_WORK", 1)
        for chunk in (None, (2, 3)):
            out, backward = mha_xp.attention_vjp(q, k, v, sinks=sinks, num_threads=2,
                                                 chunk_size=chunk, **kw)
            assert rel_err(out, serial) < 1e-14
            g, g0 = backward(go), sb(go)
            for n in g0:
                assert _grad_err(g[n], g0[n]) < 1e-13, n
            o2 = sdpa(q, k, v, sinks=sinks, num_threads=2, chunk_size=chunk, **kw)
            assert rel_err(o2, ref_sinks(q, k, v, sinks, **kw)[0]) < 1e-13


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("sinks", "exc", "match"),
    [
        (np.zeros(2), ValueError,
         r"sinks must have shape \(H,\) = \(4,\), one logit per query head of the scores "
         r"\(2, 4, 7, 9\) \(\.\.\., H, L, S\), got \(2,\)"),
        (np.zeros((1, 4)), ValueError, r"sinks must have shape \(H,\) = \(4,\).*got \(1, 4\)"),
        (np.zeros(()), ValueError, r"sinks must have shape \(H,\).*got \(\)"),
        (np.zeros(4, dtype=np.float32), TypeError,
         "sinks has dtype float32 but the inputs are float64; .* cast sinks to the inputs' dtype"),
        (np.zeros(4, dtype=np.int64), TypeError, "sinks must have a real floating dtype"),
        ([0.0] * 4, TypeError, "sinks must be an array"),
        (0.5, TypeError, "sinks must be an array"),
    ],
)
def test_errors(rng, sinks, exc, match):
    q, k, v, _ = _inputs(rng)
    for f in (sdpa, mha_xp.attention_with_lse, mha_xp.attention_vjp):
        with pytest.raises(exc, match=match):
            f(q, k, v, sinks=sinks)


def test_errors_libraries_and_devices(rng):
    q, k, v, _ = _inputs(rng)
    with pytest.raises(TypeError, match="sinks is a torch array but query is a numpy array"):
        sdpa(q, k, v, sinks=torch.zeros(4, dtype=torch.float64))
    strict = make_backend("array_api_strict:device1")
    args = [strict.asarray(t) for t in (q, k, v)]
    other = make_backend("array_api_strict").asarray(np.zeros(4))
    with pytest.raises(ValueError, match="sinks is on device .* but query is on device"):
        sdpa(*args, sinks=other)
