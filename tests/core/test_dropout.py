"""Dropout on the attention weights: ``out = (P * Z / (1 - p)) V``.

The reference builds the whole keep-mask ``Z`` with ``dropout_keep`` (the
generator, checked bit for bit in ``tests/lib/test_random.py``) over the full
``(lead, L, S)`` score matrix, at the documented global positions (C-order
flattened leading index of the output, query row, key column), takes the
softmax weights ``P`` from the float64 loop reference of the variants, and
multiplies in plain NumPy. Gradients are checked against torch autograd
through that reference with the same mask, and against central differences.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mha_xp
from mha_xp._lib._random import dropout_keep
from support import REL_TOL, assert_close, assert_preserved, make_backend, rel_err
from support.reference_variants import central_differences, ref_positions, ref_variants

SDPA = mha_xp.scaled_dot_product_attention
MHA = mha_xp.MultiHeadAttention

# Uneven blocks: neither divides L = 9 or S = 11 (and the dense path).
CHUNKS = [None, (4, 5), (2, 3)]
CHUNK_IDS = ["dense", "chunk4x5", "chunk2x3"]

# name: (mha_xp keywords, reference keywords, query heads, key/value heads)
CASES = {
    "plain": ({}, {}, 4, 4),
    "causal": ({"is_causal": True}, {"is_causal": True}, 4, 4),
    "mask": ({"mask": True}, {"allowed": True}, 4, 4),
    "gqa_causal": ({"is_causal": True}, {"is_causal": True}, 4, 2),
    "mqa": ({}, {}, 4, 1),
    "window_causal": ({"window": (3, -1), "is_causal": True},
                      {"window": (3, -1), "is_causal": True}, 4, 2),
    "window_2_1": ({"window": (2, 1)}, {"window": (2, 1)}, 4, 4),
    "softcap_alibi": ({"softcap": 2.0, "alibi_slopes": [0.5, 0.25, 0.125, 0.0625]},
                      {"softcap": 2.0, "alibi": [0.5, 0.25, 0.125, 0.0625]}, 4, 4),
}


def ref_keep(seed, lead, L, S, p):
    """The full keep-mask ``(lead..., L, S)``: position ``(n, i, j)`` with ``n``
    the C-order flattened index over ``lead``."""
    import array_api_compat.numpy as cnp

    keep = dropout_keep(seed, range(math.prod(lead)), range(L), range(S), p, xp=cnp)
    return np.asarray(keep).reshape(tuple(lead) + (L, S))


def ref_dropout(q, k, v, *, p, seed, **kw):
    """``(out, weights before dropout, Z / (1 - p))`` in float64."""
    _, w = ref_variants(q, k, v, **kw)
    lead, (L, S) = w.shape[:-2], w.shape[-2:]
    keep = ref_keep(seed, lead, L, S, p)
    drop = np.zeros(keep.shape) if p == 1.0 else np.where(keep, 1.0 / (1.0 - p), 0.0)
    group = q.shape[-3] // k.shape[-3]
    vv = np.broadcast_to(np.repeat(np.asarray(v, np.float64), group, axis=-3), lead + v.shape[-2:])
    return (w * drop) @ vv, w, drop


def _inputs(rng, B=2, hq=4, hkv=4, L=9, S=11, D=4, Dv=3):
    return (rng.standard_normal((B, hq, L, D)), rng.standard_normal((B, hkv, S, D)),
            rng.standard_normal((B, hkv, S, Dv)))


def _case(rng, name, **sizes):
    ours, theirs, hq, hkv = CASES[name]
    ours, theirs = dict(ours), dict(theirs)
    q, k, v = _inputs(rng, hq=hq, hkv=hkv, **sizes)
    if ours.get("mask"):
        ours["mask"] = theirs["allowed"] = rng.random((2, 1, q.shape[-2], k.shape[-2])) < 0.7
    return (q, k, v), ours, theirs


def _on(backend, kwargs, dtype):
    out = dict(kwargs)
    if "mask" in out:
        out["mask"] = backend.asarray(out["mask"])
    return out


def _grad_err(g, ref):
    g, ref = np.asarray(g, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert np.all(np.isfinite(g))
    return float(np.linalg.norm(g - ref) / max(np.linalg.norm(ref), 1.0))


def _torch_autograd(q, k, v, go, drop, *, allowed=None, is_causal=False, window=None,
                    softcap=None, alibi=None):
    """torch autograd through the reference written in torch ops, float64,
    with the same dropout factors ``drop`` as a constant tensor."""
    torch = pytest.importorskip("torch", reason="optional backend torch not installed")
    L, S = q.shape[-2], k.shape[-2]
    ok, rel = ref_positions(L, S, is_causal=is_causal, window=window)
    if allowed is not None:
        ok = ok & allowed
    tq, tk, tv = (torch.tensor(t, requires_grad=True) for t in (q, k, v))
    group = q.shape[-3] // k.shape[-3]
    kk, vv = tk.repeat_interleave(group, dim=-3), tv.repeat_interleave(group, dim=-3)
    s = tq @ kk.transpose(-1, -2) / np.sqrt(q.shape[-1])
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        s = s - torch.tensor(np.asarray(alibi))[..., None, None] * torch.tensor(np.abs(rel))
    s = s.masked_fill(~torch.tensor(ok), float("-inf"))
    P = torch.softmax(s, dim=-1)
    out = (P * torch.tensor(drop)) @ vv
    out.backward(torch.tensor(go))
    return out.detach().numpy(), [t.grad.numpy() for t in (tq, tk, tv)]


class TestReferenceFloat64:
    """NumPy float64 against the reference and torch autograd, dense and chunked."""

    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    @pytest.mark.parametrize("name", list(CASES))
    def test_forward_backward(self, rng, name, chunk):
        (q, k, v), ours, theirs = _case(rng, name)
        p, seed = 0.3, 1234
        ref, ref_w, drop = ref_dropout(q, k, v, p=p, seed=seed, **theirs)
        out, w = SDPA(q, k, v, dropout_p=p, seed=seed, chunk_size=chunk, return_weights=True,
                      **ours)
        assert rel_err(out, ref) < 1e-13
        assert rel_err(w, ref_w) < 1e-13  # the weights before dropout
        go = rng.standard_normal(ref.shape)
        t_out, t_grads = _torch_autograd(q, k, v, go, drop, **theirs)
        assert rel_err(t_out, ref) < 1e-13  # the torch graph is the reference
        out2, backward = mha_xp.attention_vjp(q, k, v, dropout_p=p, seed=seed, chunk_size=chunk,
                                              **ours)
        np.testing.assert_array_equal(out2, out)
        grads = backward(go)
        for name_, t in zip(("query", "key", "value"), t_grads):
            assert _grad_err(grads[name_], t) < 1e-12, name_

    def test_central_differences(self, rng):
        q, k, v = _inputs(rng, B=1, hq=2, hkv=1, L=3, S=5, D=2, Dv=2)
        go = rng.standard_normal((1, 2, 3, 2))
        kw = dict(dropout_p=0.4, seed=99, is_causal=True, chunk_size=(2, 2))

        def f(q_, k_, v_):
            return SDPA(q_, k_, v_, **kw)

        fd = central_differences(f, [q, k, v], go)
        grads = mha_xp.attention_vjp(q, k, v, **kw)[1](go)
        for name, g in zip(("query", "key", "value"), fd):
            assert _grad_err(grads[name], g) < 1e-8, name

    def test_lse_is_before_dropout(self, rng):
        q, k, v = _inputs(rng)
        out, lse = mha_xp.attention_with_lse(q, k, v, is_causal=True, dropout_p=0.5, seed=3)
        plain_out, plain_lse = mha_xp.attention_with_lse(q, k, v, is_causal=True)
        # Equal to rounding: without dropout the row sums come out of the P V
        # matmul, with dropout from a separate sum of the undropped P.
        np.testing.assert_allclose(lse, plain_lse, rtol=1e-14, atol=0)
        ref, _, _ = ref_dropout(q, k, v, p=0.5, seed=3, is_causal=True)
        assert rel_err(out, ref) < 1e-13
        assert rel_err(plain_out, ref) > 1e-2  # dropout did change the output


class TestSemantics:
    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    def test_p0_is_no_dropout_bit_for_bit(self, rng, chunk):
        q, k, v = _inputs(rng, hkv=2)
        for seed in (None, 5):
            out, w = SDPA(q, k, v, is_causal=True, chunk_size=chunk, return_weights=True,
                          dropout_p=0.0, seed=seed)
            plain, plain_w = SDPA(q, k, v, is_causal=True, chunk_size=chunk, return_weights=True)
            np.testing.assert_array_equal(out, plain)
            np.testing.assert_array_equal(w, plain_w)
        go = rng.standard_normal(out.shape)
        a = mha_xp.attention_vjp(q, k, v, is_causal=True, chunk_size=chunk, dropout_p=0.0,
                                 seed=5)[1](go)
        b = mha_xp.attention_vjp(q, k, v, is_causal=True, chunk_size=chunk)[1](go)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])

    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    def test_p1_gives_zeros(self, rng, chunk):
        q, k, v = _inputs(rng, hkv=2)
        out, w = SDPA(q, k, v, dropout_p=1.0, seed=0, chunk_size=chunk, return_weights=True)
        assert np.all(out == 0.0)
        np.testing.assert_allclose(w.sum(axis=-1), 1.0)  # weights before dropout
        grads = mha_xp.attention_vjp(q, k, v, dropout_p=1.0, seed=0, chunk_size=chunk)[1](
            rng.standard_normal(out.shape))
        for g in grads.values():
            assert np.all(g == 0.0)

    def test_same_seed_same_output_different_seeds_differ(self, rng):
        q, k, v = _inputs(rng)
        a = SDPA(q, k, v, dropout_p=0.2, seed=11)
        np.testing.assert_array_equal(a, SDPA(q, k, v, dropout_p=0.2, seed=11))
        b = SDPA(q, k, v, dropout_p=0.2, seed=12)
        assert rel_err(b, a) > 1e-2
        big = SDPA(q, k, v, dropout_p=0.2, seed=11 + 2**40)  # the high word of the seed counts
        assert rel_err(big, a) > 1e-2

    def test_expectation_over_seeds(self, rng):
        # E[Z / (1 - p)] = 1, so the mean over N seeds of the output tends to the
        # undropped output. Per entry, Var(out_il) = p / (1 - p) * sum_j P_ij^2 v_jl^2,
        # so the standardised error z = (mean - expected) / sqrt(Var / N) is about
        # N(0, 1): we require every |z| < 5 and the mean of z^2 within [0.3, 2]
        # (the seeds are fixed: the check is deterministic).
        q, k, v = _inputs(rng, B=1, hq=2, hkv=2, L=5, S=7, D=4, Dv=3)
        p, N = 0.3, 400
        plain, w = SDPA(q, k, v, return_weights=True)
        mean = sum(SDPA(q, k, v, dropout_p=p, seed=s) for s in range(N)) / N
        var = p / (1 - p) * ((w**2) @ (v**2))
        z = (mean - plain) / np.sqrt(var / N)
        assert np.max(np.abs(z)) < 5.0, np.max(np.abs(z))
        assert 0.3 < np.mean(z**2) < 2.0, np.mean(z**2)
        assert rel_err(mean, plain) < 0.05

    def test_in_place_bit_identical(self, rng):
        # NumPy's in-place fast path (probabilities and dP scaled in place) against
        # the portable one, forward and backward.
        import array_api_compat.numpy as xp

        from mha_xp._core._backward import Saved, attention_backward
        from mha_xp._core._chunked import chunked_attention
        from mha_xp._spec import AttentionSpec, Block

        q, k, v = (rng.standard_normal(s) for s in [(2, 3, 9, 4), (1, 3, 11, 4), (2, 3, 11, 5)])
        spec = AttentionSpec(scale=0.4, is_causal=True, dropout=(0.25, 8))
        fast = chunked_attention(q, k, v, spec, Block(), (4, 5), xp=xp, in_place=True)
        portable = chunked_attention(q, k, v, spec, Block(), (4, 5), xp=xp, in_place=False)
        np.testing.assert_array_equal(fast[0], portable[0])
        go = rng.standard_normal(fast[0].shape)
        saved = Saved(q, k, v, *fast)
        g_fast = attention_backward(saved, go, spec, Block(), (4, 5), xp=xp, in_place=True)
        g_port = attention_backward(saved, go, spec, Block(), (4, 5), xp=xp, in_place=False)
        for a, b in zip(g_fast, g_port):
            np.testing.assert_array_equal(a, b)

    def test_large_calls_take_the_chunked_path(self, rng, monkeypatch):
        # With dropout the dense path is kept for score tensors of one block at
        # most (the mask is faster to generate in blocks): shrink the block.
        import mha_xp._core._plan as core

        monkeypatch.setattr(core, "BLOCK_ELEMENTS", 16)
        q, k, v = _inputs(rng)
        blocks = core.default_blocks((2, 4), 9, 11)
        out = SDPA(q, k, v, dropout_p=0.3, seed=2, memory_budget=2**30)
        np.testing.assert_array_equal(out, SDPA(q, k, v, dropout_p=0.3, seed=2, chunk_size=blocks))

    def test_broadcast_leading_index(self, rng):
        # A query shared across the batch: the mask's leading index is over the
        # output's broadcast (batch, head) shape, so every batch entry differs.
        q = rng.standard_normal((1, 2, 6, 4))
        k, v = rng.standard_normal((3, 2, 8, 4)), rng.standard_normal((3, 2, 8, 5))
        out = SDPA(q, k, v, dropout_p=0.5, seed=4, chunk_size=(4, 3))
        ref, _, _ = ref_dropout(np.broadcast_to(q, (3, 2, 6, 4)), k, v, p=0.5, seed=4)
        assert out.shape == (3, 2, 6, 5)
        assert rel_err(out, ref) < 1e-13

    def test_unbatched_leading_index_is_the_head(self, rng):
        q, k, v = _inputs(rng, B=1)
        out = SDPA(q[0], k[0], v[0], dropout_p=0.5, seed=4)
        np.testing.assert_allclose(out, SDPA(q, k, v, dropout_p=0.5, seed=4)[0], rtol=1e-14)
        two_d = SDPA(q[0, 0], k[0, 0], v[0, 0], dropout_p=0.5, seed=4)  # lead () is index 0
        np.testing.assert_allclose(two_d, out[0], rtol=1e-14)


def _mask_via_identity(backend, q, k, *, chunk, **kw):
    """The keep-mask a backend applied, read off the output: with ``V = I``
    (Dv = S) the output is ``P * Z / (1 - p)``, and P > 0 wherever allowed."""
    S = k.shape[-2]
    eye = np.broadcast_to(np.eye(S), k.shape[:-1] + (S,))
    out = SDPA(backend.asarray(q, "float64"), backend.asarray(k, "float64"),
               backend.asarray(np.ascontiguousarray(eye), "float64"), chunk_size=chunk, **kw)
    return backend.to_numpy(out) != 0.0


class TestBackends:
    @pytest.mark.parametrize("chunk", [None, (4, 5)], ids=["dense", "chunked"])
    @pytest.mark.parametrize("name", ["plain", "gqa_causal", "window_causal", "mask"])
    def test_forward(self, backend, dtype, rng, name, chunk):
        (q, k, v), ours, theirs = _case(rng, name)
        ref, ref_w, _ = ref_dropout(q, k, v, p=0.25, seed=77, **theirs)
        out, w = SDPA(backend.asarray(q, dtype), backend.asarray(k, dtype),
                      backend.asarray(v, dtype), dropout_p=0.25, seed=77, chunk_size=chunk,
                      return_weights=True, **_on(backend, ours, dtype))
        assert_preserved(backend, out, dtype, ref.shape)
        assert_close(backend.to_numpy(out), ref, dtype)
        assert_close(backend.to_numpy(w), ref_w, dtype)

    def test_backward(self, backend, dtype, rng):
        (q, k, v), ours, theirs = _case(rng, "gqa_causal")
        _, _, drop = ref_dropout(q, k, v, p=0.25, seed=77, **theirs)
        go = rng.standard_normal(q.shape[:-1] + (v.shape[-1],))
        _, t_grads = _torch_autograd(q, k, v, go, drop, **theirs)
        out, backward = mha_xp.attention_vjp(
            backend.asarray(q, dtype), backend.asarray(k, dtype), backend.asarray(v, dtype),
            dropout_p=0.25, seed=77, chunk_size=(4, 5), **ours)
        grads = backward(backend.asarray(go, dtype))
        tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
        for name, t, x in zip(("query", "key", "value"), t_grads, (q, k, v)):
            assert_preserved(backend, grads[name], dtype, x.shape)
            assert _grad_err(backend.to_numpy(grads[name]), t) < tol, name

    @pytest.mark.parametrize("chunk", [None, (4, 5)], ids=["dense", "chunked"])
    def test_same_mask_bit_for_bit(self, backend, rng, chunk):
        # The mask a backend applies, read off the output with V = I, equals the
        # reference mask exactly (every backend, dense and chunked, GQA heads).
        q, k, _ = _inputs(rng, hq=4, hkv=2, L=9, S=11)
        z = _mask_via_identity(backend, q, k, chunk=chunk, dropout_p=0.4, seed=2**33 + 9)
        np.testing.assert_array_equal(z, ref_keep(2**33 + 9, (2, 4), 9, 11, 0.4))

    def test_float16(self, backend_f16, rng):
        q, k, v = _inputs(rng, hkv=2)
        ref, _, _ = ref_dropout(q, k, v, p=0.25, seed=5, is_causal=True)
        out = SDPA(*(backend_f16.asarray(t, "float16") for t in (q, k, v)), is_causal=True,
                   dropout_p=0.25, seed=5, chunk_size=(4, 5))
        assert_preserved(backend_f16, out, "float16", ref.shape)
        assert_close(backend_f16.to_numpy(out), ref, "float16")


class TestPathsAgree:
    def test_dense_chunked_dask_masks_and_outputs(self, rng):
        # The mask of the dense path, of the chunked path with uneven blocks and
        # of Dask tasks over uneven blocks of batch, heads and query rows are the
        # same bits; the outputs agree to rounding.
        da = pytest.importorskip("dask.array", reason="optional backend dask not installed")
        q, k, v = _inputs(rng, B=3, hq=4, hkv=2, L=10, S=13)
        np_backend = make_backend("numpy")
        kw = dict(dropout_p=0.35, seed=21, is_causal=True, window=(6, -1))
        ref_z = ref_keep(21, (3, 4), 10, 13, 0.35)
        for chunk in (None, (3, 4), (7, 13), (1, 1)):
            z = _mask_via_identity(np_backend, q, k, chunk=chunk, **kw)
            allowed, _ = ref_positions(10, 13, is_causal=True, window=(6, -1))
            np.testing.assert_array_equal(z, ref_z & allowed)
        dense = SDPA(q, k, v, **kw)
        for chunk in ((3, 4), (7, 13), (1, 1)):
            assert rel_err(SDPA(q, k, v, chunk_size=chunk, **kw), dense) < 1e-14
        eye = np.ascontiguousarray(np.broadcast_to(np.eye(13), (3, 2, 13, 13)))
        dq = da.from_array(q, chunks=((1, 2), (3, 1), (4, 3, 3), 4))
        dk = da.from_array(k, chunks=((2, 1), 1, 5, 4))
        z = SDPA(dq, dk, da.from_array(eye, chunks=(1, 2, 13, 7)), **kw)
        assert isinstance(z, da.Array) and z.numblocks[-2] == 3  # three blocks of rows
        np.testing.assert_array_equal(z.compute() != 0.0, ref_z & allowed)
        out = SDPA(dq, dk, da.from_array(v, chunks=(2, 1, 13, 3)), **kw)
        assert rel_err(out.compute(), dense) < 1e-14
        # and the gradients of the lazy graph
        go = rng.standard_normal(dense.shape)
        ref_g = mha_xp.attention_vjp(q, k, v, **kw)[1](go)
        _, backward = mha_xp.attention_vjp(dq, dk, da.from_array(v, chunks=(2, 1, 13, 3)), **kw)
        g = backward(da.from_array(go, chunks=(1, 2, 5, 3)))
        for name in ref_g:
            assert rel_err(g[name].compute(), ref_g[name]) < 1e-13, name

    def test_backends_same_output(self, rng):
        # numpy, torch, jax, array_api_strict and dask give the same outputs to
        # rounding for the same seed (float64).
        q, k, v = _inputs(rng, hkv=2)
        kw = dict(dropout_p=0.3, seed=2024, is_causal=True, chunk_size=(4, 5))
        ref = SDPA(q, k, v, **kw)
        for name in ("array_api_strict", "torch", "jax", "dask"):
            try:
                b = make_backend(name)
            except pytest.skip.Exception:
                continue  # an optional backend that is not installed
            out = SDPA(*(b.asarray(t, "float64") for t in (q, k, v)), **kw)
            assert rel_err(b.to_numpy(out), ref) < 1e-14, name

    def test_jax_jit(self, rng):
        jax = pytest.importorskip("jax", reason="optional backend jax not installed")
        make_backend("jax")
        q, k, v = (jax.numpy.asarray(t) for t in _inputs(rng, hkv=2))
        f = jax.jit(lambda a, b, c: SDPA(a, b, c, dropout_p=0.3, seed=6, chunk_size=(4, 5)))
        ref = SDPA(*(np.asarray(t) for t in (q, k, v)), dropout_p=0.3, seed=6)
        assert rel_err(np.asarray(f(q, k, v)), ref) < 1e-13


class TestErrors:
    def test_messages(self, rng):
        q, k, v = _inputs(rng)
        cases = [
            (dict(dropout_p=0.1), ValueError, "needs seed=<int>"),
            (dict(dropout_p=-0.1, seed=1), ValueError, r"dropout_p must be a probability in \[0, 1\]"),
            (dict(dropout_p=1.5, seed=1), ValueError, "dropout_p must be a probability"),
            (dict(dropout_p=float("nan"), seed=1), ValueError, "dropout_p must be a probability"),
            (dict(dropout_p="0.1", seed=1), TypeError, "dropout_p must be a float in"),
            (dict(dropout_p=True, seed=1), TypeError, "dropout_p must be a float in"),
            (dict(dropout_p=0.1, seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
            (dict(dropout_p=0.1, seed=2**64), ValueError, "seed must be an int in"),
            (dict(dropout_p=0.1, seed=1.5), TypeError, "seed must be an int in"),
            (dict(dropout_p=0.1, seed=np.random.default_rng(0)), TypeError, "seed must be an int"),
            (dict(dropout_p=0.0, seed="x"), TypeError, "seed must be an int"),
        ]
        for f in (SDPA, mha_xp.attention_with_lse, mha_xp.attention_vjp):
            for kw, exc, msg in cases:
                with pytest.raises(exc, match=msg):
                    f(q, k, v, **kw)

    def test_layer_messages(self, rng):
        with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\]"):
            MHA(8, 2, dropout=1.5)
        with pytest.raises(TypeError, match="dropout must be a float"):
            MHA(8, 2, dropout="0.1")
        layer = MHA(8, 2, dropout=0.1, seed=0)
        x = rng.standard_normal((2, 5, 8))
        with pytest.raises(ValueError, match="dropout=0.1 needs dropout_seed=<int>"):
            layer(x, training=True)
        with pytest.raises(ValueError, match="dropout=0.1 needs dropout_seed=<int>"):
            layer.vjp(x, training=True)
        with pytest.raises(TypeError, match="training"):
            layer(x, training="yes", dropout_seed=1)
        with pytest.raises(TypeError, match="dropout_seed must be an int"):
            layer(x, training=True, dropout_seed=0.5)
        with pytest.raises(ValueError, match="not supported with a cache"):
            layer(x, cache=layer.init_cache(2, 8), is_causal=True, training=True, dropout_seed=1)


def _ref_layer(layer, x, *, p, seed, is_causal):
    """The layer in float64 NumPy from its state dict, with the reference's
    dropout on the per-head attention."""
    sd = {n: np.asarray(w, dtype=np.float64) for n, w in layer.state_dict().items()}
    E, H, Hkv, D = layer.embed_dim, layer.num_heads, layer.num_kv_heads, layer.head_dim
    if "in_proj_weight" in sd:
        wq, wk, wv = np.split(sd["in_proj_weight"], 3)
    else:
        wq, wk, wv = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
    bq, bk, bv = np.split(sd["in_proj_bias"], [E, E + Hkv * D])
    B, L, _ = x.shape

    def heads(t, n):
        return t.reshape(B, L, n, D).transpose(0, 2, 1, 3)

    q, k, v = heads(x @ wq.T + bq, H), heads(x @ wk.T + bk, Hkv), heads(x @ wv.T + bv, Hkv)
    o, w, _ = ref_dropout(q, k, v, p=p, seed=seed, is_causal=is_causal)
    merged = o.transpose(0, 2, 1, 3).reshape(B, L, E)
    return merged @ sd["out_proj.weight"].T + sd["out_proj.bias"], w


class TestLayer:
    @pytest.mark.parametrize("num_kv_heads", [4, 2])
    def test_forward_against_reference(self, rng, num_kv_heads):
        layer = MHA(16, 4, num_kv_heads=num_kv_heads, dropout=0.3, seed=0)
        x = rng.standard_normal((2, 7, 16))
        ref, ref_w = _ref_layer(layer, x, p=0.3, seed=8, is_causal=True)
        for chunk in (None, (3, 4)):
            y, w = layer(x, training=True, dropout_seed=8, is_causal=True, chunk_size=chunk,
                         return_weights=True, average_weights=False)
            assert rel_err(y, ref) < 1e-13
            assert rel_err(w, ref_w) < 1e-13  # the weights before dropout
        plain = layer(x, is_causal=True)
        assert rel_err(plain, ref) > 1e-2

    def test_off_by_default_and_unless_asked(self, rng):
        x = rng.standard_normal((2, 7, 16))
        with_p = MHA(16, 4, dropout=0.5, seed=0)
        without = MHA(16, 4, seed=0)
        ref = without(x)
        np.testing.assert_array_equal(with_p(x), ref)
        np.testing.assert_array_equal(with_p(x, dropout_seed=3), ref)  # seed alone: no dropout
        np.testing.assert_array_equal(with_p(x, training=False, dropout_seed=3), ref)
        np.testing.assert_array_equal(without(x, training=True), ref)  # p = 0: no seed needed
        np.testing.assert_array_equal(without(x, training=True, dropout_seed=3), ref)
        assert rel_err(with_p(x, training=True, dropout_seed=3), ref) > 1e-2
        assert "dropout=0.5" in repr(with_p)
        moved = with_p.to(dtype=np.float32)  # the option travels with the layer
        assert rel_err(moved(x.astype(np.float32), training=True, dropout_seed=3),
                       with_p(x, training=True, dropout_seed=3)) < 1e-5
        same = MHA.from_state_dict(with_p.state_dict(), num_heads=4, dropout=0.5)
        np.testing.assert_array_equal(same(x, training=True, dropout_seed=3),
                                      with_p(x, training=True, dropout_seed=3))

    def test_unbatched(self, rng):
        layer = MHA(16, 4, dropout=0.5, seed=0)
        x = rng.standard_normal((7, 16))
        np.testing.assert_allclose(layer(x, training=True, dropout_seed=3),
                                   layer(x[None], training=True, dropout_seed=3)[0], rtol=1e-13)

    def test_vjp_central_differences(self, rng):
        layer = MHA(8, 2, num_kv_heads=1, dropout=0.4, seed=0)
        x = rng.standard_normal((1, 4, 8))
        kw = dict(training=True, dropout_seed=17, is_causal=True)
        y, backward = layer.vjp(x, **kw)
        np.testing.assert_array_equal(y, layer(x, **kw))
        go = rng.standard_normal(y.shape)
        grads = backward(go)
        fd = central_differences(lambda x_: layer(x_, **kw), [x], go)[0]
        assert _grad_err(grads["query"], fd) < 1e-8
        sd = layer.state_dict()
        name = "q_proj_weight"

        def f(w):
            return MHA.from_state_dict(sd | {name: w}, num_heads=2, dropout=0.4)(x, **kw)

        assert _grad_err(grads[name], central_differences(f, [sd[name]], go)[0]) < 1e-8
        # without training=True, the gradients are those without dropout
        plain = layer.vjp(x, is_causal=True)[1](go)
        ref = MHA(8, 2, num_kv_heads=1, seed=0).vjp(x, is_causal=True)[1](go)
        for n in ref:
            np.testing.assert_array_equal(plain[n], ref[n])

    def test_backends(self, backend, dtype, rng):
        layer = MHA(16, 4, num_kv_heads=2, dropout=0.3, seed=0)
        x = rng.standard_normal((2, 7, 16))
        ref, _ = _ref_layer(layer, x, p=0.3, seed=8, is_causal=True)
        moved = layer.to(xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype))
        y = moved(backend.asarray(x, dtype), training=True, dropout_seed=8, is_causal=True)
        assert_preserved(backend, y, dtype, ref.shape)
        assert_close(backend.to_numpy(y), ref, dtype)
