"""Programmable attention: ``score_mod``, ``mask_mod``, ``create_block_mask``
and ``score_mod_vjp`` (torch FlexAttention's conventions, on any library).

What is checked:

* the index arrays the callables receive (shapes, global coordinates on
  every path, the query head under grouped-query attention, the flattened
  batch index, the absolute position with a layer cache);
* the forward on every backend of ``support/backends.py`` (JAX and Dask
  included: ``tests/conftest.py`` lists this file), dense and chunked,
  against a float64 NumPy evaluation of the same callables on the whole
  score matrix (``dense_ref``), itself checked against the loop reference
  of ``support/reference_variants.py``;
* every built-in option combined with the modifiers (mask, causal, window,
  soft-capping, bias, ALiBi, sinks, dropout, packed sequences), masks
  combining by AND; the built-ins rewritten as modifiers give the built-in
  option's numbers (ALiBi, tanh soft-capping with its ``score_mod_vjp``,
  window, causal and document masks as ``mask_mod``);
* ``create_block_mask``: the kinds against a brute-force classification,
  results equal to ``mask_mod``'s, the empty blocks skipped and
  ``mask_mod`` not evaluated on full ones, ``BLOCK_SIZE=``, ``B``/``H`` of
  1 broadcasting, the errors;
* the backward: additive modifiers against torch autograd through a dense
  torch evaluation of the same callables (written with array-API calls, so
  that one definition serves every library) and central differences; a
  learnable relative-bias table through ``score_mod_vjp``, whose gradient
  (``grads["score_mod"]["table"]``) is compared with autograd's; the
  refusal of a non-additive ``score_mod`` without ``score_mod_vjp``, on
  every backend; a non-additive ``score_mod`` with its vjp
  after the built-in soft-capping, bias and ALiBi; torch autograd through
  the forward; the parallel backward;
* the layer: modifiers with a KV cache (decoding step by step equals the
  full call, padded batches decode as if alone), ``block_mask=``, ``vjp``
  with ``score_mod_vjp`` against central differences;
* ``jax.jit`` with a ``score_mod`` closing over a ``jnp`` array (forward
  with a block mask, the vjp, ``jax.grad`` through the forward);
* torch FlexAttention (eager, on the CPU) on the modifiers both express; the
  worst errors are printed (``pytest -s``) and attached to the test report
  (``record_property``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from array_api_compat import array_namespace
from array_api_compat import device as array_device

import mha_xp
from support import assert_close, assert_preserved, make_backend, rel_err
from support.reference_variants import (
    central_differences,
    ref_alibi_slopes,
    ref_positions,
    ref_variants,
)

torch = pytest.importorskip("torch", reason="optional backend torch not installed")

sdpa = mha_xp.scaled_dot_product_attention
CHUNKS = [None, (3, 4)]
CHUNK_IDS = ["dense", "chunked34"]
# The tests on every backend use one size of inputs, (8 queries, 12 keys),
# and blocks that divide it: JAX compiles each operation anew for every new
# shape and dtype, and Dask schedules a graph per call. The uneven blocks
# run on NumPy (the blocks' logic is the same on every library).
BL, BS = 8, 12
B_CHUNKS = [None, (4, 4)]
B_CHUNK_IDS = ["dense", "chunked44"]
SLOW = {"jax", "dask"}


# Gradients against torch autograd (float64), relative to max(‖ref‖, 1).
GRAD_TOL = {"float32": 5e-5, "float64": 1e-12}


def _grad_err(g, ref):
    g, ref = np.asarray(g, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert g.shape == ref.shape, (g.shape, ref.shape)
    assert np.all(np.isfinite(g))
    return float(np.linalg.norm(g - ref) / max(np.linalg.norm(ref), 1.0))


# ------------------------------------------------------------ the callables
#
# Written once with array-API calls on the namespace of their arguments, so
# that the same function runs inside mha_xp on every backend (in a Dask task
# it sees NumPy blocks), in the NumPy reference and in the torch autograd
# reference. Captured arrays are given in the library of the call.


def _f(x, like):
    """An index array as the scores' dtype."""
    return array_namespace(like).astype(x, like.dtype)


def relpos_mod(s, b, h, q_idx, kv_idx):
    """Additive, depends on every index: a relative position, head and batch term."""
    return s + 0.1 * _f(q_idx - kv_idx, s) - 0.3 * _f(h, s) + 0.2 * _f(b, s)


def band_mask(b, h, q_idx, kv_idx):
    """Every third diagonal masked except on head 1; batch 0's row 2 masked
    entirely (an empty row); key 0 always visible to batch 1."""
    keep = ((q_idx - kv_idx) % 3 != 1) | (h == 1) | ((b == 1) & (kv_idx == 0))
    return keep & ~((b == 0) & (q_idx == 2))


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def table_mod(table):
    """A learnable relative-position bias (T5-style, clipped distances):
    ``score + table[h, clip(q - kv, -R, R) + R]``, with its ``score_mod_vjp``
    returning the table's gradient for the block (a one-hot sum: the array
    API has no scatter-add)."""
    H, W = table.shape
    R = W // 2

    def index(h, q_idx, kv_idx):
        xp = array_namespace(q_idx)
        return h * W + xp.clip(q_idx - kv_idx, -R, R) + R       # (1, H, Lb, Sb)

    def score_mod(s, b, h, q_idx, kv_idx):
        xp = array_namespace(s)
        idx = index(h, q_idx, kv_idx)
        flat = xp.take(xp.reshape(_as(table, xp), (-1,)), xp.reshape(idx, (-1,)), axis=0)
        return s + xp.reshape(flat, tuple(idx.shape))

    def score_mod_vjp(g, s, b, h, q_idx, kv_idx):
        xp = array_namespace(g)
        idx = xp.broadcast_to(index(h, q_idx, kv_idx), tuple(g.shape))
        hot = idx[..., None] == xp.arange(H * W, dtype=idx.dtype, device=array_device(g))
        zero = xp.zeros((), dtype=g.dtype, device=array_device(g))
        dt = xp.sum(xp.where(hot, g[..., None], zero), axis=tuple(range(g.ndim)))
        return g, {"table": xp.reshape(dt, (H, W))}

    return score_mod, score_mod_vjp


def capped_table_mod(table, cap):
    """A non-additive score_mod with a captured array: ``cap * tanh((score +
    table[...]) / cap)``, and its score_mod_vjp (the score's gradient and
    the table's)."""
    inner, inner_vjp = table_mod(table)

    def score_mod(s, *idx):
        return cap * array_namespace(s).tanh(inner(s, *idx) / cap)

    def score_mod_vjp(g, s, *idx):
        t = array_namespace(s).tanh(inner(s, *idx) / cap)
        return inner_vjp(g * (1 - t * t), s, *idx)

    return score_mod, score_mod_vjp


def _as(captured, xp):
    """A captured array in the namespace of the block: itself, except in a
    Dask task (NumPy blocks), where a captured Dask array is computed."""
    return captured if array_namespace(captured) is xp else xp.asarray(captured)


def doc_mask(doc):
    """Document masking from captured per-token document ids (causal inside
    each document), indexed with ``take``."""
    def mask_mod(b, h, q_idx, kv_idx):
        xp = array_namespace(q_idx)
        dq = xp.take(_as(doc, xp), xp.reshape(q_idx, (-1,)), axis=0)
        dk = xp.take(_as(doc, xp), xp.reshape(kv_idx, (-1,)), axis=0)
        same = xp.reshape(dq, tuple(q_idx.shape)) == xp.reshape(dk, tuple(kv_idx.shape))
        return same & (q_idx >= kv_idx)
    return mask_mod


def arith_doc_mask(b, h, q_idx, kv_idx):
    """Documents [0, 5), [5, 6), [6, 12), causal inside each: what
    ``doc_mask`` gives for those ids, from comparisons alone."""
    same = ((q_idx >= 5) == (kv_idx >= 5)) & ((q_idx >= 6) == (kv_idx >= 6))
    return same & (q_idx >= kv_idx)


def alibi_mod(slopes, L, S):
    """ALiBi as a score_mod: ``- slope_h * |i + S - L - j|`` (bottom-right)."""
    def score_mod(s, b, h, q_idx, kv_idx):
        xp = array_namespace(s)
        slope = xp.reshape(xp.take(_as(slopes, xp), xp.reshape(h, (-1,)), axis=0), tuple(h.shape))
        return s - slope * _f(xp.abs(q_idx + (S - L) - kv_idx), s)
    return score_mod


def softcap_mods(cap):
    """tanh soft-capping as a score_mod and its score_mod_vjp."""
    def score_mod(s, b, h, q_idx, kv_idx):
        return cap * array_namespace(s).tanh(s / cap)

    def score_mod_vjp(g, s, b, h, q_idx, kv_idx):
        t = array_namespace(s).tanh(s / cap)
        return g * (1 - t * t)
    return score_mod, score_mod_vjp


def window_mask(left, right, L, S):
    def mask_mod(b, h, q_idx, kv_idx):
        rel = q_idx + (S - L) - kv_idx
        return (rel <= left) & (rel >= -right)
    return mask_mod


# ------------------------------------------------------------ the reference


def _repeat_heads(x, g, xp):
    if g == 1:
        return x
    if xp is np:
        return np.repeat(x, g, axis=-3)
    return x.repeat_interleave(g, dim=-3)


def dense_ref(q, k, v, *, score_mod=None, mask_mod=None, mask=None, bias=None,
              is_causal=False, window=None, alibi=None, softcap=None, scale=None,
              cu_q=None, cu_k=None, sinks=None):
    """``(out, weights, lse)`` of the whole score matrix at once, on NumPy or
    torch arrays (``q (..., H, L, D)``, ``k, v (..., Hkv, S, D)``): scaled
    scores, soft-capped, plus ``bias`` and ALiBi, through ``score_mod``
    called on the full index arrays, ``-inf`` where the built-in masks or
    ``mask_mod`` forbid, an optional sink column; zero output and ``lse =
    +inf`` (mha_xp's convention) for a row with nothing to attend to. On
    torch tensors it is differentiable (autograd's reference)."""
    xp = array_namespace(q)
    T = np if isinstance(q, np.ndarray) else torch
    L, S = q.shape[-2], k.shape[-2]
    H, g = q.shape[-3], q.shape[-3] // k.shape[-3]
    batch = tuple(q.shape[:-3])
    ok, rel = ref_positions(L, S, is_causal=is_causal, window=window, cu_q=cu_q, cu_k=cu_k)
    if mask is not None:
        ok = ok & np.asarray(mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kk, vv = _repeat_heads(k, g, T), _repeat_heads(v, g, T)
    s = xp.matmul(q, xp.matrix_transpose(kk)) * scale
    if softcap is not None:
        s = softcap * xp.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if alibi is not None:
        s = s - xp.asarray(np.asarray(alibi, np.float64)[..., None, None] * np.abs(rel),
                           dtype=s.dtype)
    nb = len(batch)
    pad = (1,) * nb
    idx = lambda a, shape: xp.reshape(xp.asarray(a), shape)  # noqa: E731
    b = (idx(np.arange(math.prod(batch)), batch + (1, 1, 1)) if nb
         else idx(np.zeros(1, int), (1, 1, 1)))
    h = idx(np.arange(H), pad + (H, 1, 1))
    qi = idx(np.arange(L), pad + (1, L, 1))
    kv = idx(np.arange(S), pad + (1, 1, S))
    if score_mod is not None:
        s = score_mod(s, b, h, qi, kv)
    allowed = xp.asarray(np.broadcast_to(ok, tuple(s.shape)).copy())
    if mask_mod is not None:
        allowed = allowed & mask_mod(b, h, qi, kv)
    s = xp.where(allowed, s, xp.asarray(-math.inf, dtype=s.dtype))
    if sinks is not None:
        col = xp.broadcast_to(xp.reshape(sinks, (H, 1, 1)), tuple(s.shape[:-1]) + (1,))
        s = xp.concat([s, col], axis=-1)
    m = xp.max(s, axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    e = xp.exp(s - m)
    total = xp.sum(e, axis=-1, keepdims=True)
    empty = total == 0
    p = e / xp.where(empty, xp.ones_like(total), total)
    if sinks is not None:
        p = p[..., :-1]
    out = xp.matmul(p, vv)
    lse = xp.where(empty[..., 0], xp.asarray(math.inf, dtype=s.dtype),
                   m[..., 0] + xp.log(xp.where(empty, xp.ones_like(total), total))[..., 0])
    return out, p, lse


def torch_grads(q, k, v, go, captured=(), **kw):
    """Autograd through ``dense_ref`` on float64 torch tensors: ``(out,
    {name: grad})`` for q, k, v and the captured arrays, which ``kw``'s
    callables are made from by ``make(**captured_tensors)``."""
    t = {n: torch.tensor(np.asarray(a, np.float64), requires_grad=True)
         for n, a in (("query", q), ("key", k), ("value", v), *captured)}
    make = kw.pop("make", None)
    if make is not None:
        kw.update(make(**{n: t[n] for n, _ in captured}))
        kw.pop("score_mod_vjp", None)  # autograd differentiates score_mod itself
    for name in ("bias", "sinks"):
        if name in t:
            kw[name] = t[name]
    out, _, _ = dense_ref(t["query"], t["key"], t["value"], **kw)
    out.backward(torch.tensor(go))
    return out.detach().numpy(), {n: x.grad.numpy() for n, x in t.items()}


def _inputs(rng, B=2, H=4, Hkv=2, L=7, S=9, D=5, Dv=3):
    return (rng.standard_normal((B, H, L, D)), rng.standard_normal((B, Hkv, S, D)),
            rng.standard_normal((B, Hkv, S, Dv)))


def _on(backend, dtype, *arrays):
    return [backend.asarray(np.asarray(a), dtype) for a in arrays]


def test_reference_agrees_with_the_loop_reference(rng):
    """``dense_ref`` without modifiers is ``ref_variants`` (every built-in);
    a score_mod adding a bias is ``bias=``; a mask_mod is ``mask=``; the
    torch evaluation is the NumPy one."""
    q, k, v = _inputs(rng)
    mask = rng.random((2, 1, 7, 9)) < 0.8
    bias = rng.standard_normal((4, 7, 9))
    kw = dict(mask=mask, bias=bias, is_causal=True, window=(4, 1), softcap=2.5,
              alibi=np.array([0.5, 0.25, 0.125, 0.0625]))
    out, w, _ = dense_ref(q, k, v, **kw)
    ref_out, ref_w = ref_variants(q, k, v, allowed=mask, bias=bias, is_causal=True,
                                  window=(4, 1), softcap=2.5, alibi=kw["alibi"])
    assert rel_err(out, ref_out) < 1e-14 and rel_err(w, ref_w) < 1e-14
    cu = [0, 3, 7]
    out, _, _ = dense_ref(q[..., :7, :], k[..., :7, :], v[..., :7, :], cu_q=cu, is_causal=True)
    assert rel_err(out, ref_variants(q[..., :7, :], k[..., :7, :], v[..., :7, :], cu_q=cu,
                                     is_causal=True)[0]) < 1e-14
    # The modifiers evaluated on the whole matrix, against plain arrays.
    qi, kv = np.arange(7)[:, None], np.arange(9)[None, :]
    b, h = np.arange(2)[:, None, None, None], np.arange(4)[None, :, None, None]
    extra = 0.1 * (qi - kv) - 0.3 * h + 0.2 * b
    allowed = np.broadcast_to(band_mask(b, h, qi, kv), (2, 4, 7, 9))
    out, w, _ = dense_ref(q, k, v, score_mod=relpos_mod, mask_mod=band_mask)
    ref_out, ref_w = ref_variants(q, k, v, allowed=allowed, bias=extra)
    assert rel_err(out, ref_out) < 1e-14 and rel_err(w, ref_w) < 1e-14
    assert np.all(out[0, :, 2] == 0)  # band_mask's empty row
    t_out, _, _ = dense_ref(*(torch.tensor(a) for a in (q, k, v)), score_mod=relpos_mod,
                            mask_mod=band_mask)
    assert rel_err(t_out.numpy(), out) < 1e-15


# ------------------------------------------------------------- the indices


class TestIndices:
    def test_shapes_and_global_coordinates(self, rng):
        """Each block gets (B,1,1,1), (1,H,1,1), (1,1,Lb,1), (1,1,1,Sb)
        integer arrays in the whole call's coordinates; together the blocks
        of the chunked path cover every (q, kv) pair once."""
        q, k, v = _inputs(rng)
        seen = []

        def spy(s, b, h, q_idx, kv_idx):
            seen.append((tuple(s.shape), b, h, q_idx, kv_idx))
            return s

        sdpa(q, k, v, score_mod=spy)
        shape, b, h, qi, kv = seen[-1]
        assert shape == (2, 4, 7, 9)  # GQA: ungrouped query heads
        np.testing.assert_array_equal(b, np.arange(2).reshape(2, 1, 1, 1))
        np.testing.assert_array_equal(h, np.arange(4).reshape(1, 4, 1, 1))
        np.testing.assert_array_equal(qi, np.arange(7).reshape(1, 1, 7, 1))
        np.testing.assert_array_equal(kv, np.arange(9).reshape(1, 1, 1, 9))
        assert all(np.issubdtype(a.dtype, np.integer) for a in (b, h, qi, kv))
        seen.clear()
        sdpa(q, k, v, score_mod=spy, chunk_size=(3, 4))
        seen = seen[1:]  # the validation's probe first
        covered = np.zeros((7, 9), int)
        for shape, b, h, qi, kv in seen:
            assert shape == (2, 4, qi.shape[2], kv.shape[3])
            assert b.shape == (2, 1, 1, 1) and h.shape == (1, 4, 1, 1)
            covered[np.ix_(qi.ravel(), kv.ravel())] += 1
        np.testing.assert_array_equal(covered, 1)

    @pytest.mark.parametrize("shape", [(4,), (2, 3, 4)], ids=["unbatched", "two_batch_axes"])
    def test_batch_axes(self, rng, shape):
        """``b`` is the flattened index over the batch axes (shaped as them);
        unbatched ``(H, L, D)`` inputs get ``b = 0``."""
        q = rng.standard_normal(shape + (5, 3))
        k, v = rng.standard_normal(shape + (6, 3)), rng.standard_normal(shape + (6, 2))
        seen = []

        def spy(s, b, h, q_idx, kv_idx):
            seen.append((b, h))
            return relpos_mod(s, b, h, q_idx, kv_idx)

        for chunk in CHUNKS:
            out = sdpa(q, k, v, score_mod=spy, mask_mod=band_mask, chunk_size=chunk)
            ref, _, _ = dense_ref(q, k, v, score_mod=relpos_mod, mask_mod=band_mask)
            assert rel_err(out, ref) < 1e-14
        b, h = seen[-1]
        batch = shape[:-1]
        assert b.shape == batch + (1, 1, 1) if batch else b.shape == (1, 1, 1)
        np.testing.assert_array_equal(np.ravel(b), np.arange(max(1, math.prod(batch))))
        np.testing.assert_array_equal(np.ravel(h), np.arange(4))

    def test_gqa_head_is_the_query_head(self, rng):
        """Under grouped-query attention the modifiers see query heads: the
        result equals the one with the keys repeated per query head."""
        q, k, v = _inputs(rng, H=6, Hkv=2)
        kr, vr = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
        table = rng.standard_normal((6, 5))
        sm, _ = table_mod(table)
        for chunk in CHUNKS:
            for kw in (dict(score_mod=sm, mask_mod=band_mask), dict(score_mod=relpos_mod)):
                got = sdpa(q, k, v, chunk_size=chunk, **kw)
                want = sdpa(q, kr, vr, chunk_size=chunk, **kw)
                np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
                assert rel_err(got, dense_ref(q, k, v, **kw)[0]) < 1e-14


# ------------------------------------------------------------------ forward


class TestForward:
    @pytest.mark.parametrize("chunk", B_CHUNKS, ids=B_CHUNK_IDS)
    def test_backends(self, backend, dtype, rng, chunk):
        """score_mod (additive, and a captured table) with mask_mod, GQA,
        on every backend: output, weights and lse against the reference."""
        q, k, v = _inputs(rng, L=BL, S=BS)
        table = rng.standard_normal((4, 5))
        args = _on(backend, dtype, q, k, v)

        def both(table):  # the captured table and the additive terms
            sm, _ = table_mod(table)
            return dict(score_mod=lambda s, *idx: relpos_mod(sm(s, *idx), *idx),
                        mask_mod=band_mask)

        for mods, ref_mods in ((both(backend.asarray(table, dtype)), both(table)),):
            ref, ref_w, ref_lse = dense_ref(q, k, v, **ref_mods)
            out, w = sdpa(*args, chunk_size=chunk, return_weights=True, **mods)
            assert_preserved(backend, out, dtype, ref.shape)
            assert_close(backend.to_numpy(out), ref, dtype)
            assert_close(backend.to_numpy(w), ref_w, dtype)
            out2, lse = mha_xp.attention_with_lse(*args, chunk_size=chunk, **mods)
            assert_close(backend.to_numpy(out2), ref, dtype)
            lse = backend.to_numpy(lse)
            np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
            assert_close(np.where(np.isinf(lse), 0, lse), np.where(np.isinf(ref_lse), 0, ref_lse),
                         dtype)

    @pytest.mark.parametrize("chunk", CHUNKS + [(2, 3)], ids=CHUNK_IDS + ["chunked23"])
    @pytest.mark.parametrize("name", ["mask_causal", "window_softcap", "bias_alibi", "sinks",
                                      "all"])
    def test_with_builtins(self, rng, name, chunk):
        """The modifiers combined with every built-in option (score_mod
        after soft-capping, bias and ALiBi; masks by AND), float64."""
        q, k, v = _inputs(rng)
        kw = {
            "mask_causal": dict(mask=rng.random((2, 1, 7, 9)) < 0.8, is_causal=True),
            "window_softcap": dict(window=(3, 2), softcap=1.5),
            "bias_alibi": dict(bias=rng.standard_normal((4, 7, 9)),
                               alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])),
            "sinks": dict(sinks=np.array([-1.0, 0.5, 2.0, 0.0]), is_causal=True),
            "all": dict(mask=rng.random((2, 1, 7, 9)) < 0.8, is_causal=True, window=(4, 1),
                        softcap=2.0, bias=rng.standard_normal((4, 7, 9)),
                        alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]),
                        sinks=np.array([-1.0, 0.5, 2.0, 0.0])),
        }[name]
        ref_kw = {("alibi" if n == "alibi_slopes" else n): a for n, a in kw.items()}
        sm, _ = table_mod(rng.standard_normal((4, 5)))
        for mods in (dict(score_mod=relpos_mod, mask_mod=band_mask), dict(score_mod=sm)):
            ref, ref_w, ref_lse = dense_ref(q, k, v, **mods, **ref_kw)
            out, w = sdpa(q, k, v, chunk_size=chunk, return_weights=True, **mods, **kw)
            assert rel_err(out, ref) < 1e-13
            assert rel_err(w, ref_w) < 1e-13
            _, lse = mha_xp.attention_with_lse(q, k, v, chunk_size=chunk, **mods, **kw)
            np.testing.assert_allclose(lse, ref_lse, rtol=1e-13)

    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    def test_packed_sequences(self, rng, chunk):
        """With cu_seqlens the indices are the packed tokens' (global) ones;
        mask_mod ANDs with the sequences' own masking."""
        q, k, v = _inputs(rng, L=10, S=10)
        cu = [0, 3, 7, 10]
        for kw in (dict(is_causal=True), dict(window=(2, 0)), {}):
            ref, _, _ = dense_ref(q, k, v, score_mod=relpos_mod, mask_mod=band_mask,
                                  cu_q=cu, **kw)
            out = sdpa(q, k, v, score_mod=relpos_mod, mask_mod=band_mask, cu_seqlens_q=cu,
                       chunk_size=chunk, **kw)
            assert rel_err(out, ref) < 1e-13
        # Sequence by sequence with shifted indices: the same numbers.
        parts = []
        for a, e in zip(cu, cu[1:]):
            shift = lambda f, a=a: (lambda s, b, h, i, j: f(s, b, h, i + a, j + a))  # noqa: E731
            parts.append(sdpa(q[..., a:e, :], k[..., a:e, :], v[..., a:e, :], is_causal=True,
                              score_mod=shift(relpos_mod)))
        out = sdpa(q, k, v, cu_seqlens_q=cu, is_causal=True, score_mod=relpos_mod,
                   chunk_size=chunk)
        assert rel_err(out, np.concatenate(parts, axis=-2)) < 1e-13

    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    def test_dropout(self, rng, chunk):
        """Dropout keeps its mask with modifiers: an additive score_mod is
        ``bias=`` and a mask_mod is ``mask=``, dropped out identically
        (forward and gradients)."""
        q, k, v = _inputs(rng)
        qi, kv = np.arange(7)[:, None], np.arange(9)[None, :]
        b, h = np.arange(2)[:, None, None, None], np.arange(4)[None, :, None, None]
        bias = 0.1 * (qi - kv) - 0.3 * h + 0.2 * b
        mask = np.broadcast_to(band_mask(b, h, qi, kv), (2, 4, 7, 9))
        go = rng.standard_normal((2, 4, 7, 3))
        for drop in (dict(dropout_p=0.3, seed=5), dict(dropout_p=0.5, seed=9, is_causal=True)):
            out, bw = mha_xp.attention_vjp(q, k, v, score_mod=relpos_mod, mask_mod=band_mask,
                                           chunk_size=chunk, **drop)
            ref, bw_ref = mha_xp.attention_vjp(q, k, v, bias=bias, mask=mask, chunk_size=chunk,
                                               **drop)
            np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-14)
            assert rel_err(out, sdpa(q, k, v, score_mod=relpos_mod, mask_mod=band_mask,
                                     **drop)) < 1e-13  # dense and chunked draw alike
            g, g_ref = bw(go), bw_ref(go)
            for n in ("query", "key", "value"):
                np.testing.assert_allclose(g[n], g_ref[n], rtol=1e-12, atol=1e-13)

    def test_dask_stays_lazy_and_splits(self, rng):
        """Dask: inputs split along batch and queries, the modifiers run in
        the tasks on NumPy blocks with the global indices."""
        backend = make_backend("dask")
        q, k, v = _inputs(rng, L=8, S=9)
        table = rng.standard_normal((4, 5))
        args = [backend.asarray(a).rechunk({0: 1, 2: 4}) for a in (q, k, v)]
        for chunk in CHUNKS:
            sm, _ = table_mod(backend.asarray(table))
            out = sdpa(*args, score_mod=sm, mask_mod=band_mask, chunk_size=chunk)
            assert out.numblocks[0] == 2 and out.numblocks[2] == 2
            ref, _, _ = dense_ref(q, k, v, score_mod=table_mod(table)[0], mask_mod=band_mask)
            assert rel_err(backend.to_numpy(out), ref) < 1e-14

    def test_native_kernels_never_take_modifiers(self, rng):
        """With torch's fused SDPA allowed, a call with modifiers still has them."""
        q, k, v = _inputs(rng, H=2)
        t = [torch.tensor(a) for a in (q, k, v)]
        with mha_xp.native_kernels(True):
            out = sdpa(*t, score_mod=relpos_mod, mask_mod=causal_mask)
        ref, _, _ = dense_ref(q, k, v, score_mod=relpos_mod, mask_mod=causal_mask)
        assert rel_err(out.numpy(), ref) < 1e-14

    def test_float32_with_float64_captures(self, rng):
        """A captured array of a wider dtype: the result keeps the scores' dtype."""
        q, k, v = (a.astype(np.float32) for a in _inputs(rng))
        sm, _ = table_mod(rng.standard_normal((4, 5)))  # float64 table
        for chunk in CHUNKS:
            out = sdpa(q, k, v, score_mod=sm, chunk_size=chunk)
            assert out.dtype == np.float32


# ------------------------------------------------- built-ins as modifiers


class TestBuiltinsAsModifiers:
    """Each built-in option rewritten as a modifier gives its numbers."""

    @pytest.mark.parametrize("chunk", B_CHUNKS, ids=B_CHUNK_IDS)
    def test_backends(self, backend, rng, chunk):
        q, k, v = _inputs(rng, L=BL, S=BS)
        args = _on(backend, "float64", q, k, v)
        slopes = np.asarray(ref_alibi_slopes(4))
        sb = backend.asarray(slopes, "float64")
        go = backend.asarray(rng.standard_normal((2, 4, BL, 3)), "float64")
        sm_cap, vjp_cap = softcap_mods(1.7)
        pairs = [  # ALiBi with a window; tanh soft-capping with the causal mask
            (dict(alibi_slopes=sb, window=(3, 1)),
             dict(score_mod=alibi_mod(sb, BL, BS), mask_mod=window_mask(3, 1, BL, BS))),
            (dict(softcap=1.7, is_causal=True),
             dict(score_mod=sm_cap, score_mod_vjp=vjp_cap,
                  mask_mod=lambda b, h, i, j: i + (BS - BL) >= j)),
        ]
        for builtin, mods in pairs:
            out, bw = mha_xp.attention_vjp(*args, chunk_size=chunk, **builtin)
            got, bw_mod = mha_xp.attention_vjp(*args, chunk_size=chunk, **mods)
            assert rel_err(backend.to_numpy(got), backend.to_numpy(out)) < 1e-14, builtin
            g, g_mod = bw(go), bw_mod(go)
            for n in ("query", "key", "value"):
                assert _grad_err(backend.to_numpy(g_mod[n]), backend.to_numpy(g[n])) < 1e-13, \
                    (builtin, n)

    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    def test_document_mask_is_packed_sequences(self, rng, chunk):
        """Document masking (captured ids) as a mask_mod, and as a block
        mask, is ``cu_seqlens_q=`` with ``is_causal=True``."""
        q, k, v = _inputs(rng, L=12, S=12)
        cu = [0, 5, 6, 12]
        doc = np.repeat(np.arange(3), np.diff(cu))
        mm = doc_mask(doc)
        out, bw = mha_xp.attention_vjp(q, k, v, cu_seqlens_q=cu, is_causal=True, chunk_size=chunk)
        go = rng.standard_normal(out.shape)
        g = bw(go)
        bm = mha_xp.create_block_mask(mm, None, None, 12, 12, block_size=4)
        for kw in (dict(mask_mod=mm, chunk_size=chunk), dict(block_mask=bm)):
            got, bw_mod = mha_xp.attention_vjp(q, k, v, **kw)
            assert rel_err(got, out) < 1e-14
            for n, x in bw_mod(go).items():
                assert _grad_err(x, g[n]) < 1e-13, n


# ------------------------------------------------------------- block masks


def brute_kinds(mask_mod, B, H, L, S, bq, bk):
    """The kinds by looking at every block of the whole evaluated mask."""
    b, h = np.arange(B).reshape(B, 1, 1, 1), np.arange(H).reshape(1, H, 1, 1)
    full = np.broadcast_to(mask_mod(b, h, np.arange(L).reshape(1, 1, L, 1),
                                    np.arange(S).reshape(1, 1, 1, S)), (B, H, L, S))
    nq, nk = -(-L // bq), -(-S // bk)
    kinds = np.zeros((B, H, nq, nk), np.int8)
    for i in range(nq):
        for j in range(nk):
            part = full[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            kinds[:, :, i, j] = np.where(part.all(axis=(2, 3)), 2,
                                         np.where(part.any(axis=(2, 3)), 1, 0))
    return kinds


MASKS = {
    "causal": (causal_mask, None, None),
    "document": (doc_mask(np.repeat(np.arange(4), [5, 9, 3, 13])), None, None),
    "window": (window_mask(6, 0, 30, 30), None, None),
    "prefix_lm": (lambda b, h, i, j: (j < 8) | (i >= j), None, None),
    "per_head_batch": (lambda b, h, i, j: ((i >= j) & (h == 0)) | ((j <= 10 + 4 * b) & (h > 0)),
                       2, 3),
}


class TestBlockMask:
    @pytest.mark.parametrize("name", list(MASKS))
    @pytest.mark.parametrize("block", [4, (8, 5), (30, 7)], ids=["4", "8x5", "30x7"])
    def test_kinds_against_brute_force(self, name, block):
        mm, B, H = MASKS[name]
        bq, bk = block if isinstance(block, tuple) else (block, block)
        bm = mha_xp.create_block_mask(mm, B, H, 30, 30, block_size=block)
        want = brute_kinds(mm, B or 1, H or 1, 30, 30, bq, bk)
        np.testing.assert_array_equal(bm.kinds, want)
        assert bm.shape == (B or 1, H or 1, 30, 30) and bm.block_size == (bq, bk)
        host = np.where((want == 0).all(axis=(0, 1)), 0,
                        np.where((want == 2).all(axis=(0, 1)), 2, 1))
        np.testing.assert_array_equal(bm.host_kinds, host)
        assert bm.sparsity() == pytest.approx((host == 0).mean())

    def test_torch_names_and_alias(self):
        """torch's positional order (…, device, BLOCK_SIZE) and keyword
        BLOCK_SIZE= are block_size=."""
        a = mha_xp.create_block_mask(causal_mask, None, None, 20, 20, None, 8)
        b = mha_xp.create_block_mask(causal_mask, None, None, 20, 20, BLOCK_SIZE=(8, 8))
        c = mha_xp.create_block_mask(causal_mask, 1, 1, 20, 20, block_size=8)
        for x in (a, b):
            np.testing.assert_array_equal(x.kinds, c.kinds)
            assert x.block_size == (8, 8)
        assert mha_xp.create_block_mask(causal_mask, None, None, 300, 300).block_size == (128, 128)
        assert isinstance(a, mha_xp.BlockMask) and a.EMPTY == 0 and a.PARTIAL == 1 and a.FULL == 2

    @pytest.mark.parametrize("name", list(MASKS))
    def test_results_equal_mask_mod(self, rng, name):
        """block_mask= gives mask_mod='s output, lse and gradients, whatever
        the chunk size, with B/H of 1 broadcasting over the call's."""
        mm, B, H = MASKS[name]
        q, k, v = _inputs(rng, B=2, H=3, Hkv=3, L=30, S=30)
        go = rng.standard_normal((2, 3, 30, 3))
        ref, bw_ref = mha_xp.attention_vjp(q, k, v, mask_mod=mm, score_mod=relpos_mod)
        g_ref = bw_ref(go)
        assert rel_err(ref, dense_ref(q, k, v, mask_mod=mm, score_mod=relpos_mod)[0]) < 1e-14
        _, lse_ref = mha_xp.attention_with_lse(q, k, v, mask_mod=mm)
        _, w_ref = sdpa(q, k, v, mask_mod=mm, return_weights=True)
        for block in (4, (8, 5)):
            bm = mha_xp.create_block_mask(mm, B, H, 30, 30, block_size=block)
            for chunk in (None, (6, 7)):
                out, bw = mha_xp.attention_vjp(q, k, v, block_mask=bm, score_mod=relpos_mod,
                                               chunk_size=chunk)
                assert rel_err(out, ref) < 1e-14
                g = bw(go)
                for n in g:
                    assert _grad_err(g[n], g_ref[n]) < 1e-13, n
                _, lse = mha_xp.attention_with_lse(q, k, v, block_mask=bm, mask_mod=mm,
                                                   chunk_size=chunk)
                np.testing.assert_allclose(lse, lse_ref, rtol=1e-13)
                _, w = sdpa(q, k, v, block_mask=bm, chunk_size=chunk, return_weights=True)
                assert rel_err(w, w_ref) < 1e-14

    def test_backends(self, backend, dtype, rng):
        q, k, v = _inputs(rng, L=BL, S=BS)
        mm = doc_mask(np.repeat(np.arange(3), [5, 1, 6]))
        # A block mask made with NumPy, of a mask_mod that captures nothing
        # (the chunked path evaluates it on the backend's arrays).
        bm = mha_xp.create_block_mask(arith_doc_mask, None, None, BL, BS, block_size=4)
        args = _on(backend, dtype, q, k, v)
        doc = backend.asarray(np.repeat(np.arange(3), [5, 1, 6]), "int64")
        ref, _, _ = dense_ref(q, k, v, mask_mod=mm, score_mod=relpos_mod)
        # create_block_mask evaluating mask_mod in the backend's library, on
        # its device: NumPy's kinds, in that library; read on the host (for
        # skipping) where that is free.
        own = mha_xp.create_block_mask(doc_mask(doc), None, 4, BL, BS, device=backend.device,
                                       block_size=(4, 3), xp=backend.cxp)
        want = brute_kinds(mm, 1, 4, BL, BS, 4, 3)
        assert_preserved(backend, own.kinds, "int8", want.shape)
        np.testing.assert_array_equal(backend.to_numpy(own.kinds), want)
        if backend.name in ("numpy", "torch") or backend.name.startswith("array_api_strict"):
            np.testing.assert_array_equal(own.host_kinds, want[0, 0])
        else:  # JAX, Dask: no host copy, no block skipped, the same results
            assert own.host_kinds is None and math.isnan(own.sparsity())
        for mask in (bm, own):
            out = sdpa(*args, block_mask=mask, score_mod=relpos_mod)
            assert_preserved(backend, out, dtype, ref.shape)
            assert_close(backend.to_numpy(out), ref, dtype)

    def test_empty_blocks_skipped_full_blocks_unmasked(self, rng):
        """The chunked path (the block mask's blocks) evaluates mask_mod on
        partial blocks only and score_mod on non-empty ones, forward and
        backward."""
        calls = {"mask": [], "score": []}

        def record(name, i, j):
            # The validation's probe evaluates one query against keys 0 and S - 1.
            probe = j.shape[-1] == 2 and int(j[0, 0, 0, 0]) == 0 and int(j[0, 0, 0, 1]) == 29
            if not probe:
                calls[name].append((int(i[0, 0, 0, 0]) // 4, int(j[0, 0, 0, 0]) // 4))

        def mm(b, h, i, j):
            record("mask", i, j)
            return MASKS["document"][0](b, h, i, j)

        def sm(s, b, h, i, j):
            record("score", i, j)
            return relpos_mod(s, b, h, i, j)

        bm = mha_xp.create_block_mask(mm, None, None, 30, 30, block_size=4)
        kinds = brute_kinds(MASKS["document"][0], 1, 1, 30, 30, 4, 4)[0, 0]
        partial = {tuple(x) for x in np.argwhere(kinds == 1)}
        nonempty = {tuple(x) for x in np.argwhere(kinds > 0)}
        q, k, v = _inputs(rng, B=1, H=2, Hkv=2, L=30, S=30)
        for run in (lambda: sdpa(q, k, v, block_mask=bm, score_mod=sm),
                    lambda: mha_xp.attention_vjp(q, k, v, block_mask=bm, score_mod=sm)[1](
                        np.ones((1, 2, 30, 3)))):
            calls["mask"].clear()
            calls["score"].clear()
            run()
            assert calls["mask"] and set(calls["mask"]) == partial
            assert set(calls["score"]) == nonempty
            assert len(calls["mask"]) <= 2 * len(partial)  # the vjp: forward and backward
        assert bm.sparsity() == pytest.approx((kinds == 0).mean())

    def test_head_dependent_kinds_skip_only_where_all_agree(self, rng):
        mm, B, H = MASKS["per_head_batch"]
        bm = mha_xp.create_block_mask(mm, B, H, 30, 30, block_size=4)
        full = brute_kinds(mm, 2, 3, 30, 30, 4, 4)
        assert np.all((bm.host_kinds == 0) == (full == 0).all(axis=(0, 1)))
        q, k, v = _inputs(rng, B=2, H=3, Hkv=1, L=30, S=30)
        assert rel_err(sdpa(q, k, v, block_mask=bm), dense_ref(q, k, v, mask_mod=mm)[0]) < 1e-14

    def test_errors(self, rng):
        q, k, v = _inputs(rng, B=2, H=3, Hkv=3, L=12, S=12)
        bm = mha_xp.create_block_mask(causal_mask, None, None, 12, 12, block_size=4)
        with pytest.raises(ValueError, match="does not fit scores of shape"):
            sdpa(q[..., :10, :], k, v, block_mask=bm)
        with pytest.raises(ValueError, match="does not fit scores of shape"):
            sdpa(q, k, v, block_mask=mha_xp.create_block_mask(causal_mask, 3, None, 12, 12))
        with pytest.raises(ValueError, match="does not fit scores of shape"):
            sdpa(q, k, v, block_mask=mha_xp.create_block_mask(causal_mask, None, 2, 12, 12))
        with pytest.raises(ValueError, match="mask_mod differs from the block mask's own"):
            sdpa(q, k, v, block_mask=bm, mask_mod=lambda *a: causal_mask(*a))
        sdpa(q, k, v, block_mask=bm, mask_mod=causal_mask)  # the same one: fine
        with pytest.raises(TypeError, match="block_mask must be a BlockMask"):
            sdpa(q, k, v, block_mask=causal_mask)
        with pytest.raises(TypeError, match="mask_mod must return a boolean array"):
            sdpa(q, k, v, mask_mod=lambda b, h, i, j: _f(i - j, q))
        with pytest.raises(TypeError, match="mask_mod must return a boolean array"):
            mha_xp.create_block_mask(lambda b, h, i, j: i - j, None, None, 12, 12)
        with pytest.raises(TypeError, match="score_mod must be callable"):
            sdpa(q, k, v, score_mod=3.0)
        with pytest.raises(TypeError, match="mask_mod must be callable"):
            mha_xp.attention_with_lse(q, k, v, mask_mod="causal")
        with pytest.raises(TypeError, match="mask_mod must be callable"):
            mha_xp.create_block_mask(None, None, None, 12, 12)
        with pytest.raises(TypeError, match="score_mod must return a real floating array"):
            sdpa(q, k, v, score_mod=lambda s, b, h, i, j: s > 0)
        with pytest.raises(ValueError, match="not both"):
            mha_xp.create_block_mask(causal_mask, None, None, 12, 12, BLOCK_SIZE=4, block_size=4)
        with pytest.raises(ValueError, match="block_size must be an int or a pair"):
            mha_xp.create_block_mask(causal_mask, None, None, 12, 12, block_size=(4, 4, 4))
        for bad in (dict(Q_LEN=0), dict(block_size=0), dict(B=-1)):
            kw = dict(B=None, H=None, Q_LEN=12, KV_LEN=12) | bad
            with pytest.raises(ValueError, match="positive int"):
                mha_xp.create_block_mask(causal_mask, **kw)
        # A mask_mod whose result does not broadcast to the block.
        with pytest.raises(ValueError):
            mha_xp.create_block_mask(lambda b, h, i, j: np.ones((2, 2), bool), None, None, 12, 12)
        with pytest.raises(ValueError):
            sdpa(q, k, v, mask_mod=lambda b, h, i, j: np.ones((5, 5), bool))


# ------------------------------------------------------------------ backward


def _captured_case(rng, H=4):
    table = 0.5 * rng.standard_normal((H, 5))
    return table, lambda table: dict(zip(("score_mod", "score_mod_vjp"), table_mod(table)))


class TestBackward:
    @pytest.mark.parametrize("chunk", B_CHUNKS, ids=B_CHUNK_IDS)
    def test_additive_vs_torch_autograd(self, backend, dtype, rng, chunk):
        """An additive score_mod (no score_mod_vjp) with mask_mod: the
        gradients of q, k, v against autograd through the dense torch
        evaluation of the same callables."""
        q, k, v = _inputs(rng, L=BL, S=BS)
        go = rng.standard_normal((2, 4, BL, 3))
        t_out, t_grads = torch_grads(q, k, v, go, score_mod=relpos_mod, mask_mod=band_mask)
        args = _on(backend, dtype, q, k, v)
        out, bw = mha_xp.attention_vjp(*args, score_mod=relpos_mod, mask_mod=band_mask,
                                       chunk_size=chunk)
        assert_close(backend.to_numpy(out), t_out, dtype)
        grads = bw(backend.asarray(go, dtype))
        assert sorted(grads) == ["key", "query", "value"]
        for n in ("query", "key", "value"):
            assert_preserved(backend, grads[n], dtype, t_grads[n].shape)
            assert _grad_err(backend.to_numpy(grads[n]), t_grads[n]) <= GRAD_TOL[dtype], n

    @pytest.mark.parametrize("chunk", B_CHUNKS, ids=B_CHUNK_IDS)
    def test_learnable_table_vs_torch_autograd(self, backend, dtype, rng, chunk):
        """score_mod_vjp returning the table's gradient: summed over blocks
        into grads["score_mod"]["table"], as autograd's through the table."""
        q, k, v = _inputs(rng, L=BL, S=BS)
        table, make = _captured_case(rng)
        go = rng.standard_normal((2, 4, BL, 3))
        _, t_grads = torch_grads(q, k, v, go, captured=[("table", table)], make=make,
                                 mask_mod=band_mask)
        args = _on(backend, dtype, q, k, v)
        mods = make(backend.asarray(table, dtype))
        out, bw = mha_xp.attention_vjp(*args, mask_mod=band_mask, chunk_size=chunk, **mods)
        grads = bw(backend.asarray(go, dtype))
        assert sorted(grads) == ["key", "query", "score_mod", "value"]
        assert sorted(grads["score_mod"]) == ["table"]
        assert_preserved(backend, grads["score_mod"]["table"], dtype, (4, 5))
        for n in ("query", "key", "value"):
            assert _grad_err(backend.to_numpy(grads[n]), t_grads[n]) <= GRAD_TOL[dtype], n
        got = backend.to_numpy(grads["score_mod"]["table"])
        assert _grad_err(got, t_grads["table"]) <= GRAD_TOL[dtype]
        # A second backward sums afresh.
        again = backend.to_numpy(bw(backend.asarray(go, dtype))["score_mod"]["table"])
        np.testing.assert_allclose(again, got, rtol=1e-6 if dtype == "float32" else 1e-14)

    @pytest.mark.parametrize("chunk", CHUNKS + [(2, 3)], ids=CHUNK_IDS + ["chunked23"])
    def test_with_builtins_and_sinks_float64(self, rng, chunk):
        """Every built-in with the learnable table and a mask_mod: q, k, v,
        bias, sinks and table gradients against autograd."""
        q, k, v = _inputs(rng)
        table, make = _captured_case(rng)
        bias = rng.standard_normal((4, 7, 9))
        sinks = np.array([-1.0, 0.5, 2.0, 0.0])
        mask = rng.random((2, 1, 7, 9)) < 0.85
        kw = dict(mask=mask, is_causal=True, window=(5, 1), softcap=2.0)
        slopes = np.array([0.5, 0.25, 0.125, 0.0625])
        go = rng.standard_normal((2, 4, 7, 3))
        _, t_grads = torch_grads(q, k, v, go, captured=[("table", table), ("bias", bias),
                                                        ("sinks", sinks)],
                                 make=lambda table, bias, sinks: make(table),
                                 mask_mod=band_mask, alibi=slopes, **kw)
        out, bw = mha_xp.attention_vjp(q, k, v, bias=bias, sinks=sinks, alibi_slopes=slopes,
                                       mask_mod=band_mask, chunk_size=chunk, **make(table), **kw)
        grads = bw(go)
        for n in ("query", "key", "value", "bias", "sinks"):
            assert _grad_err(grads[n], t_grads[n]) < 1e-12, n
        assert _grad_err(grads["score_mod"]["table"], t_grads["table"]) < 1e-12
        # A non-additive score_mod (a cap over the table's bias) after the
        # built-in soft-capping, bias and ALiBi: the chain through both.
        capped = lambda table: dict(zip(("score_mod", "score_mod_vjp"),  # noqa: E731
                                        capped_table_mod(table, 1.5)))
        _, t_grads = torch_grads(q, k, v, go, captured=[("table", table), ("bias", bias),
                                                        ("sinks", sinks)],
                                 make=lambda table, bias, sinks: capped(table),
                                 mask_mod=band_mask, alibi=slopes, **kw)
        _, bw = mha_xp.attention_vjp(q, k, v, bias=bias, sinks=sinks, alibi_slopes=slopes,
                                     mask_mod=band_mask, chunk_size=chunk, **capped(table), **kw)
        grads = bw(go)
        for n in ("query", "key", "value", "bias", "sinks"):
            assert _grad_err(grads[n], t_grads[n]) < 1e-12, n
        assert _grad_err(grads["score_mod"]["table"], t_grads["table"]) < 1e-12

    def test_central_differences(self, rng):
        """Additive score_mod with mask_mod, and the table through
        score_mod_vjp: against central differences of the forward."""
        q, k, v = _inputs(rng, B=1, H=2, Hkv=1, L=4, S=5, D=3, Dv=2)
        table, make = _captured_case(rng, H=2)
        go = rng.standard_normal((1, 2, 4, 2))
        for chunk in CHUNKS:
            f = lambda q, k, v, table: sdpa(q, k, v, mask_mod=band_mask, chunk_size=chunk,  # noqa: E731
                                            score_mod=table_mod(table)[0])
            fd = central_differences(f, [q, k, v, table], go)
            _, bw = mha_xp.attention_vjp(q, k, v, mask_mod=band_mask, chunk_size=chunk,
                                         **make(table))
            g = bw(go)
            for got, want in zip((g["query"], g["key"], g["value"], g["score_mod"]["table"]), fd):
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
            f2 = lambda q, k, v: sdpa(q, k, v, score_mod=relpos_mod, chunk_size=chunk)  # noqa: E731
            _, bw2 = mha_xp.attention_vjp(q, k, v, score_mod=relpos_mod, chunk_size=chunk)
            g2 = bw2(go)
            for got, want in zip((g2["query"], g2["key"], g2["value"]),
                                 central_differences(f2, [q, k, v], go)):
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)

    def test_non_additive_refused_on_every_backend(self, backend, rng):
        """The refusal of a non-additive score_mod without score_mod_vjp
        does not depend on the library: without it the gradients would be
        silently wrong (those of s -> s)."""
        q, k, v = _on(backend, "float64", *_inputs(rng, B=1, H=1, Hkv=1, L=2, S=3))
        with pytest.raises(ValueError, match="pass score_mod_vjp="):
            mha_xp.attention_vjp(q, k, v, score_mod=lambda s, b, h, i, j: 2.0 * s)

    def test_non_additive_needs_its_vjp(self, rng):
        q, k, v = _inputs(rng)
        for f in (lambda s, b, h, i, j: 2.0 * s, softcap_mods(2.0)[0],
                  lambda s, b, h, i, j: s * _f(j + 1, s)):
            with pytest.raises(ValueError, match="pass score_mod_vjp="):
                mha_xp.attention_vjp(q, k, v, score_mod=f)
            sdpa(q, k, v, score_mod=f)  # the forward needs no derivative
        with pytest.raises(ValueError, match="pass score_mod too"):
            mha_xp.attention_vjp(q, k, v, score_mod_vjp=lambda g, *a: g)
        with pytest.raises(TypeError, match="score_mod_vjp must be callable"):
            mha_xp.attention_vjp(q, k, v, score_mod=relpos_mod, score_mod_vjp=1)
        # A non-additive score_mod with its vjp: right gradients (s -> 2 s).
        _, bw = mha_xp.attention_vjp(q, k, v, score_mod=lambda s, b, h, i, j: 2.0 * s,
                                     score_mod_vjp=lambda g, s, b, h, i, j: 2.0 * g)
        _, bw_ref = mha_xp.attention_vjp(q, k, v, scale=2.0 / math.sqrt(5))
        go = rng.standard_normal((2, 4, 7, 3))
        g, g_ref = bw(go), bw_ref(go)
        for n in g_ref:
            assert _grad_err(g[n], g_ref[n]) < 1e-13, n

    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    def test_torch_autograd_through_the_forward(self, rng, chunk):
        """On torch the forward with modifiers stays differentiable by
        autograd, captured tensors included: the same gradients as
        mha_xp's backward with score_mod_vjp."""
        q, k, v = _inputs(rng)
        table, make = _captured_case(rng)
        go = rng.standard_normal((2, 4, 7, 3))
        _, bw = mha_xp.attention_vjp(q, k, v, chunk_size=chunk, **make(table))
        want = bw(go)
        t = [torch.tensor(a, requires_grad=True) for a in (q, k, v, table)]
        out = sdpa(*t[:3], score_mod=table_mod(t[3])[0], chunk_size=chunk)
        out.backward(torch.tensor(go))
        for x, n in zip(t, ("query", "key", "value")):
            assert _grad_err(x.grad.numpy(), want[n]) < 1e-13, n
        assert _grad_err(t[3].grad.numpy(), want["score_mod"]["table"]) < 1e-13

    def test_parallel_backward(self, rng, monkeypatch):
        """On several threads: the same gradients; with captured gradients
        the backward stays serial (one fixed summation order)."""
        from mha_xp._core import _plan

        monkeypatch.setattr(_plan, "PARALLEL_FROM", 0)
        monkeypatch.setattr(_plan, "TASK_WORK", 1)
        q, k, v = _inputs(rng, L=16, S=16)
        table, make = _captured_case(rng)
        go = rng.standard_normal((2, 4, 16, 3))
        results = {}
        for threads in (1, 2):
            with mha_xp.num_threads(threads):
                for name, kw in (("additive", dict(score_mod=relpos_mod, mask_mod=band_mask)),
                                 ("table", make(table))):
                    for chunk in CHUNKS:
                        out, bw = mha_xp.attention_vjp(q, k, v, chunk_size=chunk, **kw)
                        results[threads, name, chunk] = (out, bw(go))
        for (threads, name, chunk), (out, g) in results.items():
            ref_out, ref_g = results[1, name, chunk]
            np.testing.assert_allclose(out, ref_out, rtol=1e-13, atol=1e-14)
            for n in ("query", "key", "value"):
                np.testing.assert_allclose(g[n], ref_g[n], rtol=1e-12, atol=1e-13)
            if name == "table":
                np.testing.assert_array_equal(g["score_mod"]["table"],
                                              ref_g["score_mod"]["table"])


# ------------------------------------------------------------------- layer


class TestLayer:
    @staticmethod
    def _layer(backend, dtype, **kw):
        layer = mha_xp.MultiHeadAttention(16, 4, num_kv_heads=2, seed=0, dtype=np.float64, **kw)
        return layer.to(xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype))

    def test_cache_decoding_equals_full(self, backend, rng):
        """With a cache, q_idx is the absolute position: prefill plus steps
        equal the full causal call, for score_mod and mask_mod."""
        layer = self._layer(backend, "float64", rotary=True)
        x = backend.asarray(rng.standard_normal((2, 9, 16)), "float64")
        seen = []

        def sm(s, b, h, q_idx, kv_idx):
            seen.append(q_idx)
            return relpos_mod(s, b, h, q_idx, kv_idx)

        mods = dict(score_mod=sm, mask_mod=band_mask)
        full = lambda x: layer(x, is_causal=True, **mods)  # noqa: E731
        step = lambda x, cache: layer(x, cache=cache, is_causal=True, **mods)  # noqa: E731
        if backend.name == "jax":  # as JAX decodes: one compiled step (eager JAX compiles
            import jax             # every operation of every new shape)

            full, step = jax.jit(full), jax.jit(step)
        want = backend.to_numpy(full(x))
        y, cache = step(x[:, :5, ...], layer.init_cache(batch_size=2, max_length=12))
        steps = [backend.to_numpy(y)]
        for t in range(5, 9):
            if backend.name not in SLOW:
                seen.clear()
            y, cache = step(x[:, t:t + 1, ...], cache)
            steps.append(backend.to_numpy(y))
            if backend.name not in SLOW:  # the step's query index: its absolute position
                assert {int(backend.to_numpy(s).ravel()[-1]) for s in seen[1:]} == {t}
        assert rel_err(np.concatenate(steps, axis=1), want) < 1e-13

    @pytest.mark.parametrize("chunk", [None, (2, 3)], ids=["dense", "chunked23"])
    def test_padded_batch_decoding(self, rng, chunk):
        """A padded batch: each sequence's q_idx and kv_idx are its own
        positions and slots, so it decodes as if it ran alone."""
        layer = mha_xp.MultiHeadAttention(16, 4, seed=3, dtype=np.float64, rotary=True)
        x = rng.standard_normal((2, 8, 16))
        mods = dict(score_mod=relpos_mod, mask_mod=band_mask)
        padding = np.array([[False] * 6, [True] * 2 + [False] * 4])  # sequence 1: 4 tokens
        cache = layer.init_cache(batch_size=2, max_length=12)
        y, cache = layer(x[:, :6], key_padding_mask=padding, cache=cache, is_causal=True,
                         chunk_size=chunk, **mods)
        y_t, cache = layer(x[:, 6:7], cache=cache, is_causal=True, chunk_size=chunk, **mods)
        # Alone, sequence 1 is batch entry 0: b differs, so give it b = 1.
        alone = layer(np.concatenate([x[1:, 2:6], x[1:, 6:7]], axis=1), is_causal=True,
                      score_mod=lambda s, b, *a: relpos_mod(s, b + 1, *a),
                      mask_mod=lambda b, *a: band_mask(b + 1, *a))
        assert rel_err(y_t[1, 0], alone[0, -1]) < 1e-13
        assert rel_err(y[1, 2:], alone[0, :4]) < 1e-13
        first = layer(x[:1, :7], is_causal=True, **mods)
        assert rel_err(y_t[0, 0], first[0, -1]) < 1e-13

    def test_layer_matches_functions(self, rng):
        """The layer's modifiers are the functions' on its projected heads
        (block_mask and cache, its own max_length as KV_LEN)."""
        layer = mha_xp.MultiHeadAttention(16, 4, seed=1, dtype=np.float64)
        x = rng.standard_normal((2, 10, 16))
        bm = mha_xp.create_block_mask(causal_mask, None, None, 10, 10, block_size=4)
        a = layer(x, mask_mod=causal_mask, score_mod=relpos_mod)
        b = layer(x, block_mask=bm, score_mod=relpos_mod)
        c = layer(x, is_causal=True, score_mod=relpos_mod)
        assert rel_err(b, a) < 1e-14 and rel_err(c, a) < 1e-14
        # A block mask for the cache's keys: (B, H, L, max_length).
        cache = layer.init_cache(batch_size=2, max_length=16)
        bm16 = mha_xp.create_block_mask(causal_mask, None, None, 10, 16, block_size=4)
        y, _ = layer(x, cache=cache, is_causal=True, block_mask=bm16, score_mod=relpos_mod)
        assert rel_err(y, c) < 1e-13
        with pytest.raises(ValueError, match="does not fit"):
            layer(x, cache=layer.init_cache(batch_size=2, max_length=16), is_causal=True,
                  block_mask=bm)

    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    def test_vjp_table_central_differences(self, rng, chunk):
        """layer.vjp with score_mod_vjp: grads["score_mod"]["table"] against
        central differences of the layer's output."""
        layer = mha_xp.MultiHeadAttention(8, 2, seed=2, dtype=np.float64)
        x = rng.standard_normal((1, 5, 8))
        table, make = _captured_case(rng, H=2)
        go = rng.standard_normal((1, 5, 8))
        out, bw = layer.vjp(x, chunk_size=chunk, mask_mod=band_mask, **make(table))
        grads = bw(go)
        f = lambda table: layer(x, chunk_size=chunk, mask_mod=band_mask,  # noqa: E731
                                score_mod=table_mod(table)[0])
        fd, = central_differences(f, [table], go)
        np.testing.assert_allclose(grads["score_mod"]["table"], fd, rtol=1e-6, atol=1e-8)
        _, bw0 = layer.vjp(x, chunk_size=chunk, mask_mod=band_mask,
                           score_mod=table_mod(table)[0])
        g0 = bw0(go)  # additive: no score_mod_vjp needed, same input gradients
        assert "score_mod" not in g0
        np.testing.assert_allclose(g0["query"], grads["query"], rtol=1e-12, atol=1e-13)
        with pytest.raises(ValueError, match="pass score_mod_vjp="):
            layer.vjp(x, score_mod=softcap_mods(2.0)[0])


# --------------------------------------------------------------------- jax


class TestJaxJit:
    def test_score_mod_closing_over_a_jnp_array(self, rng):
        """Under jax.jit: a score_mod capturing a traced jnp table, with a
        block mask made with NumPy (chunked), and the vjp with the table's
        gradient (dense)."""
        jax = pytest.importorskip("jax")
        backend = make_backend("jax")
        jnp = backend.xp
        q, k, v = _inputs(rng, L=BL, S=BS)
        table, make = _captured_case(rng)
        go = rng.standard_normal((2, 4, BL, 3))
        mm = lambda b, h, i, j: i + (BS - BL) >= j  # noqa: E731
        bm = mha_xp.create_block_mask(mm, None, None, BL, BS, block_size=4)

        @jax.jit
        def forward(q, k, v, table):
            return sdpa(q, k, v, score_mod=table_mod(table)[0], block_mask=bm)

        @jax.jit
        def grads(q, k, v, table, go):
            _, bw = mha_xp.attention_vjp(q, k, v, mask_mod=band_mask, **make(table))
            return bw(go)

        args = [jnp.asarray(a) for a in (q, k, v, table)]
        out = forward(*args)
        ref, _, _ = dense_ref(q, k, v, score_mod=table_mod(table)[0], mask_mod=mm)
        assert rel_err(backend.to_numpy(out), ref) < 1e-14
        g = grads(*args, jnp.asarray(go))
        _, t_grads = torch_grads(q, k, v, go, captured=[("table", table)], make=make,
                                 mask_mod=band_mask)
        for n in ("query", "key", "value"):
            assert _grad_err(backend.to_numpy(g[n]), t_grads[n]) < 1e-12, n
        assert _grad_err(backend.to_numpy(g["score_mod"]["table"]), t_grads["table"]) < 1e-12
        # jax.grad through the forward: the table's gradient by JAX's autodiff.
        loss = jax.jit(jax.grad(lambda table, q: jnp.sum(
            sdpa(q, args[1], args[2], mask_mod=band_mask, score_mod=table_mod(table)[0])
            * jnp.asarray(go))))
        assert _grad_err(backend.to_numpy(loss(args[3], args[0])), t_grads["table"]) < 1e-12


# --------------------------------------------------------- torch FlexAttention

# The worst relative error of each case against FlexAttention, over its runs.
WORST: dict[str, float] = {}


@pytest.fixture(scope="module")
def flex():
    """torch's FlexAttention, run eagerly on the CPU (small inputs); skip
    when this torch build cannot."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # pragma: no cover - old or CPU-less builds
        pytest.skip(f"torch FlexAttention unavailable: {type(exc).__name__}: {exc}")
    q = torch.zeros((1, 1, 4, 4), dtype=torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex_attention(q, q, q, score_mod=lambda s, b, h, i, j: s + (i - j))
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"torch FlexAttention does not run eagerly on this CPU build: "
                    f"{type(exc).__name__}: {exc}")
    yield flex_attention, create_block_mask
    if WORST:
        print("\nworst relative errors (output and lse) against torch FlexAttention:")
        for name, err in sorted(WORST.items()):
            print(f"  {name:40s} {err:.2e}")


def _flex_cases(rng, L, S, H, convert):
    """``{name: modifiers}`` for mha_xp and for torch (the captured arrays
    ``convert``-ed to tensors): the same callables, which both libraries
    can express, a score_mod and a mask_mod per case."""
    slopes = np.asarray(ref_alibi_slopes(H))
    sm_cap, _ = softcap_mods(3.0)
    doc = np.repeat(np.arange(3), [L // 3, L // 3, L - 2 * (L // 3)])
    table = 0.5 * rng.standard_normal((H, 5))

    def cases(t):
        return {
            "relative_position+causal": dict(
                score_mod=relpos_mod, mask_mod=lambda b, h, i, j: i + (S - L) >= j),
            "alibi+sliding_window": dict(score_mod=alibi_mod(t(slopes), L, S),
                                         mask_mod=window_mask(3, 0, L, S)),
            "tanh_softcap+prefix_lm": dict(
                score_mod=sm_cap, mask_mod=lambda b, h, i, j: (j < 4) | (i + (S - L) >= j)),
            "bias_table+" + ("document" if L == S else "band"): dict(
                score_mod=table_mod(t(table))[0],
                mask_mod=doc_mask(t(doc)) if L == S else lambda b, h, i, j: (i - j) % 3 != 1),
        }
    return cases(lambda a: a), cases(convert)


@pytest.mark.parametrize("sizes,dtype", [((2, 4, 2, 8, 8), "float32"), ((2, 4, 2, 8, 8), "float64"),
                                         ((1, 4, 4, 7, 11), "float64")],
                         ids=["gqa_8x8-float32", "gqa_8x8-float64", "7x11-float64"])
def test_against_torch_flex_attention(flex, rng, dtype, sizes, record_property):
    """Output and log-sum-exp against FlexAttention (eager, CPU, with its
    own block mask), mha_xp dense, chunked and with its block mask, on
    NumPy; and mha_xp on the torch tensors with the torch captures."""
    flex_attention, torch_block_mask = flex
    B, H, Hkv, L, S = sizes
    q, k, v = (a.astype(dtype) for a in _inputs(rng, B=B, H=H, Hkv=Hkv, L=L, S=S, D=8, Dv=8))
    tdt = getattr(torch, dtype)
    tq, tk, tv = (torch.tensor(a) for a in (q, k, v))
    ours, theirs = _flex_cases(rng, L, S, H, lambda a: torch.tensor(
        a, dtype=tdt if np.asarray(a).dtype.kind == "f" else torch.int64))
    tol = {"float32": 2e-6, "float64": 1e-14}[dtype]
    for name, mods in ours.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
            bm = torch_block_mask(theirs[name]["mask_mod"], None, None, L, S, device="cpu",
                                  BLOCK_SIZE=4)
            ref, ref_lse = flex_attention(tq, tk, tv, score_mod=theirs[name]["score_mod"],
                                          block_mask=bm, enable_gqa=Hkv != H, return_lse=True)
        ref, ref_lse = ref.numpy(), ref_lse.numpy()
        ours_bm = mha_xp.create_block_mask(mods["mask_mod"], None, None, L, S, block_size=4)
        runs = {"dense": dict(mods), "chunked": dict(mods, chunk_size=(3, 4)),
                "block_mask": dict(score_mod=mods["score_mod"], block_mask=ours_bm)}
        errs = {}
        for run, kw in runs.items():
            out, lse = mha_xp.attention_with_lse(q, k, v, **kw)
            errs[run] = max(rel_err(out, ref), rel_err(lse, ref_lse))
        out, lse = mha_xp.attention_with_lse(tq, tk, tv, **theirs[name])
        errs["torch_tensors"] = max(rel_err(out.numpy(), ref), rel_err(lse.numpy(), ref_lse))
        key = f"{name}/{dtype}"
        WORST[key] = max(WORST.get(key, 0.0), *errs.values())
        record_property(f"{name}/{'x'.join(map(str, sizes))}/{dtype}", max(errs.values()))
        assert max(errs.values()) < tol, (name, errs)
    with pytest.raises(TypeError, match="block_mask must be a BlockMask"):  # torch's own
        mha_xp.scaled_dot_product_attention(tq, tk, tv, block_mask=bm)
