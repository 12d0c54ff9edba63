"""Score-level attention variants: grouped-query attention, sliding window,
ALiBi, logit soft-capping and packed variable-length sequences, against the
float64 reference of ``support/reference_variants.py`` on every backend, dense and
chunked, forward and backward, and against torch where torch has them."""

from __future__ import annotations

import numpy as np
import pytest

import mha_xp
from support import REL_TOL, assert_close, assert_preserved, rel_err
from support.reference_variants import (
    central_differences,
    ref_alibi_slopes,
    ref_positions,
    ref_variants,
)

torch = pytest.importorskip("torch", reason="optional backend torch not installed")

CHUNKS = [None, (3, 5), (2, 3)]
CHUNK_IDS = ["dense", "chunked35", "chunked23"]


def _grad_err(g, ref):
    """Relative error, against 1 when the exact gradient is 0 (a query that
    sees a single key has none: both sides are rounding)."""
    g, ref = np.asarray(g, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert np.all(np.isfinite(g))
    return float(np.linalg.norm(g - ref) / max(np.linalg.norm(ref), 1.0))


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


# ---------------------------------------------------------------- the variants

SLOPES4 = [0.5, 0.25, 0.125, 0.0625]
# name: (keyword arguments of mha_xp, of the reference, (L, S))
VARIANTS = {
    "window_2_1": (dict(window=(2, 1)), dict(window=(2, 1)), (9, 11)),
    "window_left_causal": (dict(window=(3, -1), is_causal=True),
                           dict(window=(3, -1), is_causal=True), (9, 11)),
    "window_right_only": (dict(window=(-1, 0)), dict(window=(-1, 0)), (11, 7)),
    "window_0_0": (dict(window=(0, 0)), dict(window=(0, 0)), (9, 11)),
    "alibi_heads": (dict(alibi_slopes="H"), dict(alibi="H"), (9, 11)),
    "alibi_batch_causal": (dict(alibi_slopes="BH", is_causal=True),
                           dict(alibi="BH", is_causal=True), (9, 11)),
    "softcap_small": (dict(softcap=0.5), dict(softcap=0.5), (9, 11)),
    "softcap_bias": (dict(softcap=5.0, bias=True), dict(softcap=5.0, bias=True), (9, 11)),
    "varlen_causal": (dict(cu_seqlens_q=[0, 4, 4, 9], cu_seqlens_k=[0, 6, 7, 11], is_causal=True),
                      dict(cu_q=[0, 4, 4, 9], cu_k=[0, 6, 7, 11], is_causal=True), (9, 11)),
    "varlen_self": (dict(cu_seqlens_q=[0, 3, 8, 9], is_causal=True),
                    dict(cu_q=[0, 3, 8, 9], is_causal=True), (9, 9)),
    "all": (dict(cu_seqlens_q=[0, 5, 9], cu_seqlens_k=[0, 4, 11], window=(2, 1), softcap=1.5,
                 alibi_slopes="H", mask=True),
            dict(cu_q=[0, 5, 9], cu_k=[0, 4, 11], window=(2, 1), softcap=1.5, alibi="H",
                 allowed=True), (9, 11)),
}


def _case(rng, name, hq=4, hkv=2):
    """Inputs, mha_xp's keyword arguments (NumPy) and the reference's, of a variant."""
    ours, theirs, (L, S) = VARIANTS[name]
    ours, theirs = dict(ours), dict(theirs)
    q, k, v = _inputs(rng, hq=hq, hkv=hkv, L=L, S=S)
    # Slopes representable in float32, so that float32 slopes with float64 inputs are exact.
    slopes = {"H": np.array(SLOPES4),
              "BH": rng.uniform(0.05, 1.0, (2, hq)).astype(np.float32).astype(np.float64)}
    if "alibi_slopes" in ours:
        ours["alibi_slopes"] = theirs["alibi"] = slopes[ours["alibi_slopes"]]
    if ours.get("bias"):
        ours["bias"] = theirs["bias"] = rng.standard_normal((hq, L, S))
    if ours.get("mask"):
        ours["mask"] = theirs["allowed"] = rng.random((2, 1, L, S)) < 0.8
    return (q, k, v), ours, theirs


def _on(backend, kwargs, dtype):
    """mha_xp's keyword arguments moved to a backend (slopes as float32 arrays)."""
    out = {}
    for n, a in kwargs.items():
        if n == "alibi_slopes":
            a = backend.asarray(a, "float32")
        elif n in ("cu_seqlens_q", "cu_seqlens_k"):
            a = backend.cxp.asarray(np.asarray(a), device=backend.device)
        elif n == "mask":
            a = backend.asarray(a)
        elif n == "bias":
            a = backend.asarray(a, dtype)
        out[n] = a
    return out


def _torch_autograd(q, k, v, go, *, allowed=None, bias=None, is_causal=False, window=None,
                    alibi=None, softcap=None, cu_q=None, cu_k=None):
    """torch autograd through attention written out in torch ops, float64,
    with the variants as a mask and a bias built from ``ref_positions``."""
    L, S = q.shape[-2], k.shape[-2]
    ok, rel = ref_positions(L, S, is_causal=is_causal, window=window, cu_q=cu_q, cu_k=cu_k)
    if allowed is not None:
        ok = ok & allowed
    tq, tk, tv = (torch.tensor(t, requires_grad=True) for t in (q, k, v))
    group = q.shape[-3] // k.shape[-3]
    kk, vv = tk.repeat_interleave(group, dim=-3), tv.repeat_interleave(group, dim=-3)
    s = tq @ kk.transpose(-1, -2) / np.sqrt(q.shape[-1])
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + torch.tensor(bias)
    if alibi is not None:
        slopes = torch.tensor(np.asarray(alibi, dtype=np.float64))[..., None, None]
        s = s - slopes * torch.tensor(np.abs(rel))
    s = s.masked_fill(~torch.tensor(ok), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    total = e.sum(dim=-1, keepdim=True)
    out = (e / torch.where(total == 0, torch.ones_like(total), total)) @ vv
    out.backward(torch.tensor(go))
    return out.detach().numpy(), [t.grad.numpy() for t in (tq, tk, tv)]


class TestVariantsFloat64:
    """NumPy float64 against the reference and torch autograd, dense and chunked."""

    @pytest.mark.parametrize("chunk", CHUNKS, ids=CHUNK_IDS)
    @pytest.mark.parametrize("name", list(VARIANTS))
    def test_forward_backward(self, rng, name, chunk):
        (q, k, v), ours, theirs = _case(rng, name)
        ref, ref_w = ref_variants(q, k, v, **theirs)
        out, w = mha_xp.scaled_dot_product_attention(q, k, v, chunk_size=chunk,
                                                     return_weights=True, **ours)
        assert rel_err(out, ref) < 1e-13
        assert rel_err(w, ref_w) < 1e-13
        out2, lse = mha_xp.attention_with_lse(q, k, v, chunk_size=chunk, **ours)
        assert rel_err(out2, ref) < 1e-13
        go = rng.standard_normal(out.shape)
        t_out, t_grads = _torch_autograd(q, k, v, go, **theirs)
        assert rel_err(out, t_out) < 1e-13
        out3, backward = mha_xp.attention_vjp(q, k, v, chunk_size=chunk, **ours)
        assert rel_err(out3, ref) < 1e-13
        grads = backward(go)
        for n, tg in zip(("query", "key", "value"), t_grads):
            assert _grad_err(grads[n], tg) < 1e-12, n
        if "bias" in ours:
            assert grads["bias"].shape == ours["bias"].shape

    @pytest.mark.parametrize("name", ["window_2_1", "alibi_heads", "varlen_self"])
    def test_torch_sdpa(self, rng, name):
        # The variants as torch SDPA's float attn_mask, with enable_gqa=True
        # (inputs whose every query row sees a key: torch gives NaN otherwise).
        (q, k, v), ours, theirs = _case(rng, name)
        ok, rel = ref_positions(q.shape[-2], k.shape[-2], is_causal=theirs.get("is_causal", False),
                                window=theirs.get("window"), cu_q=theirs.get("cu_q"),
                                cu_k=theirs.get("cu_k"))
        assert ok.any(axis=-1).all()
        attn = np.where(ok, 0.0, -np.inf)
        if "alibi" in theirs:
            attn = attn - np.asarray(theirs["alibi"])[:, None, None] * np.abs(rel)
        go = rng.standard_normal((2, 4, q.shape[-2], 3))
        t_out, t_grads = _torch_sdpa(q, k, v, go, attn=attn, enable_gqa=True)
        for chunk in CHUNKS:
            out, backward = mha_xp.attention_vjp(q, k, v, chunk_size=chunk, **ours)
            assert rel_err(out, t_out) < 1e-13
            grads = backward(go)
            for n, tg in zip(("query", "key", "value"), t_grads):
                assert _grad_err(grads[n], tg) < 1e-12, n

    def test_central_differences(self, rng):
        # Every variant at once, gradients against central differences of the reference.
        kw = dict(cu_q=[0, 2, 5], cu_k=[0, 3, 6], window=(1, 0), softcap=0.8,
                  alibi=[0.5, 0.25])
        q, k, v = (rng.standard_normal(s) for s in [(2, 5, 3), (1, 6, 3), (1, 6, 2)])
        go = rng.standard_normal((2, 5, 2))
        cd = central_differences(lambda *a: ref_variants(*a, **kw)[0], [q, k, v], go)
        _, backward = mha_xp.attention_vjp(
            q, k, v, cu_seqlens_q=[0, 2, 5], cu_seqlens_k=[0, 3, 6], window=(1, 0), softcap=0.8,
            alibi_slopes=[0.5, 0.25], chunk_size=(2, 2))
        grads = backward(go)
        for n, g in zip(("query", "key", "value"), cd):
            assert _grad_err(grads[n], g) < 1e-8, n


class TestVariantsBackends:
    @pytest.mark.parametrize("chunk", [None, (3, 5)], ids=["dense", "chunked"])
    @pytest.mark.parametrize("name", ["window_left_causal", "alibi_batch_causal", "softcap_bias",
                                      "varlen_causal", "varlen_self", "all"])
    def test_forward(self, backend, dtype, rng, name, chunk):
        (q, k, v), ours, theirs = _case(rng, name)
        ref, ref_w = ref_variants(q, k, v, **theirs)
        args = [backend.asarray(t, dtype) for t in (q, k, v)]
        kw = _on(backend, ours, dtype)
        out, w = mha_xp.scaled_dot_product_attention(*args, chunk_size=chunk,
                                                     return_weights=True, **kw)
        assert_preserved(backend, out, dtype, ref.shape)
        assert_close(backend.to_numpy(out), ref, dtype)
        assert_close(backend.to_numpy(w), ref_w, dtype)
        out2, _ = mha_xp.attention_with_lse(*args, chunk_size=chunk, **kw)
        assert_close(backend.to_numpy(out2), ref, dtype)

    @pytest.mark.parametrize("name", ["window_2_1", "alibi_heads", "softcap_small", "all"])
    def test_backward(self, backend, dtype, rng, name):
        (q, k, v), ours, theirs = _case(rng, name)
        go = rng.standard_normal((2, 4, q.shape[-2], 3))
        _, t_grads = _torch_autograd(q, k, v, go, **theirs)
        args = [backend.asarray(t, dtype) for t in (q, k, v)]
        out, backward = mha_xp.attention_vjp(*args, chunk_size=(3, 5), **_on(backend, ours, dtype))
        grads = backward(backend.asarray(go, dtype))
        for n, tg, x in zip(("query", "key", "value"), t_grads, args):
            assert_preserved(backend, grads[n], dtype, tuple(x.shape))
            assert _grad_err(backend.to_numpy(grads[n]), tg) <= 10 * REL_TOL[dtype], n

    def test_float16(self, backend_f16, rng):
        (q, k, v), ours, theirs = _case(rng, "all")
        ref, _ = ref_variants(q, k, v, **theirs)
        args = [backend_f16.asarray(t, "float16") for t in (q, k, v)]
        kw = _on(backend_f16, ours, "float16")
        for chunk in (None, (3, 5)):
            out = mha_xp.scaled_dot_product_attention(*args, chunk_size=chunk, **kw)
            assert_preserved(backend_f16, out, "float16", ref.shape)
            assert_close(backend_f16.to_numpy(out), ref, "float16")


class TestVarlenEqualsSeparate:
    @pytest.mark.parametrize("chunk", [None, (2, 3)], ids=["dense", "chunked"])
    def test_each_sequence_on_its_own(self, rng, chunk):
        cu_q, cu_k = [0, 3, 3, 10, 12], [0, 5, 6, 9, 15]
        q, k, v = _inputs(rng, B=1, hq=4, hkv=2, L=12, S=15)
        slopes = np.array(SLOPES4)
        common = dict(is_causal=True, window=(4, -1), alibi_slopes=slopes, softcap=2.0)
        packed = mha_xp.scaled_dot_product_attention(
            q, k, v, cu_seqlens_q=np.array(cu_q), cu_seqlens_k=np.array(cu_k), chunk_size=chunk,
            **common)
        for n in range(4):
            rows, cols = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
            if rows.stop == rows.start:
                continue
            alone = mha_xp.scaled_dot_product_attention(
                q[..., rows, :], k[..., cols, :], v[..., cols, :], **common)
            np.testing.assert_allclose(packed[..., rows, :], alone, rtol=1e-13, atol=1e-15)


class TestAlibiSlopes:
    def test_reference(self):
        for n in range(1, 130):
            ours, ref = mha_xp.alibi_slopes(n), ref_alibi_slopes(n)
            assert len(ours) == n and all(isinstance(s, float) for s in ours)
            np.testing.assert_allclose(ours, ref, rtol=1e-13)
        assert mha_xp.alibi_slopes(8) == [2.0**-k for k in range(1, 9)]

    def test_errors(self):
        with pytest.raises(ValueError, match="num_heads must be a positive int"):
            mha_xp.alibi_slopes(0)
        with pytest.raises(TypeError, match="num_heads"):
            mha_xp.alibi_slopes(2.0)


class TestVariantErrors:
    def test_messages(self, rng):
        q, k, v = _inputs(rng, hq=4, hkv=2)
        sdpa = mha_xp.scaled_dot_product_attention
        cases = [
            (dict(window=3), TypeError, "window must be None or a pair"),
            (dict(window=(1.5, 2)), TypeError, "window must be a pair of ints"),
            (dict(softcap=0.0), ValueError, "softcap must be a positive finite"),
            (dict(softcap="1"), TypeError, "softcap must be a positive finite Python float"),
            (dict(alibi_slopes=np.ones(3)), ValueError, "alibi_slopes must have shape"),
            (dict(alibi_slopes=np.ones((2, 4), dtype=np.float16)), TypeError, "alibi_slopes has dtype"),
            (dict(cu_seqlens_q=np.array([0.0, 9.0]), cu_seqlens_k=[0, 11]), TypeError,
             "cu_seqlens_q must be an integer"),
            (dict(cu_seqlens_q=np.array([0, 9]), cu_seqlens_k=np.array([[0, 11]])), ValueError,
             "cu_seqlens_k must be 1-d"),
            (dict(cu_seqlens_q=np.array([1, 9]), cu_seqlens_k=[0, 11]), ValueError, "must start at 0"),
            (dict(cu_seqlens_q=[0, 8], cu_seqlens_k=[0, 11]), ValueError, "must end at .* 9, got 8"),
            (dict(cu_seqlens_q=[0, 5, 4, 9], cu_seqlens_k=[0, 1, 2, 11]), ValueError,
             "non-decreasing"),
            (dict(cu_seqlens_q=[0, 9]), ValueError, "cu_seqlens_k defaults to cu_seqlens_q"),
            (dict(cu_seqlens_k=[0, 11]), ValueError, "cu_seqlens_k needs cu_seqlens_q"),
            (dict(cu_seqlens_q=[0, 4, 9], cu_seqlens_k=[0, 11]), ValueError, "as many sequences"),
        ]
        for kw, exc, match in cases:
            with pytest.raises(exc, match=match):
                sdpa(q, k, v, **kw)

    def test_torch_arrays_are_validated(self, rng):
        q, k, v = (torch.tensor(t) for t in _inputs(rng, hq=4, hkv=2))
        with pytest.raises(ValueError, match="non-decreasing"):
            mha_xp.scaled_dot_product_attention(
                q, k, v, cu_seqlens_q=torch.tensor([0, 5, 4, 9]),
                cu_seqlens_k=torch.tensor([0, 1, 2, 11]))
        with pytest.raises(TypeError, match="cu_seqlens_q"):
            mha_xp.scaled_dot_product_attention(q, k, v, cu_seqlens_q=np.array([0, 9]),
                                                cu_seqlens_k=torch.tensor([0, 11]))
        # int32 cumulative lengths, as FlashAttention takes them
        (qn, kn, vn), ours, theirs = _case(rng, "varlen_causal")
        ref, _ = ref_variants(qn, kn, vn, **theirs)
        out = mha_xp.scaled_dot_product_attention(
            *(torch.tensor(t) for t in (qn, kn, vn)), is_causal=True, chunk_size=(3, 5),
            cu_seqlens_q=torch.tensor(ours["cu_seqlens_q"], dtype=torch.int32),
            cu_seqlens_k=torch.tensor(ours["cu_seqlens_k"], dtype=torch.int32))
        assert rel_err(out.numpy(), ref) < 1e-13


class TestDaskQueryBlocks:
    """Dask tasks over blocks of queries that do not start at row 0: the
    window, ALiBi and packed sequences must use the global row indices."""

    @pytest.mark.parametrize("name", ["window_2_1", "window_left_causal", "alibi_batch_causal",
                                      "varlen_causal", "varlen_self", "all"])
    def test_query_chunks(self, rng, name):
        da = pytest.importorskip("dask.array", reason="optional backend dask not installed")
        (q, k, v), ours, theirs = _case(rng, name)
        ref, ref_w = ref_variants(q, k, v, **theirs)
        arrays = ("alibi_slopes", "cu_seqlens_q", "cu_seqlens_k", "mask")
        kw = {n: da.from_array(np.asarray(a), chunks=2) if n in arrays else a
              for n, a in ours.items()}
        dq = da.from_array(q, chunks=(1, 2, 4, 4))  # query blocks of rows 0-3, 4-7, 8
        out, w = mha_xp.scaled_dot_product_attention(
            dq, da.from_array(k, chunks=(1, 1, 5, 4)), da.from_array(v), return_weights=True, **kw)
        assert isinstance(out, da.Array)
        assert rel_err(out.compute(), ref) < 1e-13
        assert rel_err(w.compute(), ref_w) < 1e-13


class TestInternals:
    def _variants(self, rng, xp):
        slopes = -xp.reshape(xp.asarray(SLOPES4[:3]), (3, 1, 1))
        return dict(window=(4, 2), softcap=1.3, neg_slopes=slopes)

    def test_in_place_bit_identical(self, rng):
        # NumPy's in-place fast path (soft-cap, ALiBi added into the score
        # block) against the portable path, forward and backward.
        import array_api_compat.numpy as xp

        from mha_xp._core._backward import Saved, attention_backward
        from mha_xp._core._chunked import chunked_attention
        from mha_xp._spec import AttentionSpec, Block

        q, k, v = (rng.standard_normal(s) for s in [(2, 3, 9, 4), (2, 3, 11, 4), (2, 3, 11, 5)])
        bias = rng.standard_normal((3, 9, 11))
        spec = AttentionSpec(scale=0.3, mask=rng.random((9, 11)) < 0.8, bias=bias,
                             is_causal=True, **self._variants(rng, xp))
        fast = chunked_attention(q, k, v, spec, Block(), (4, 3), xp=xp, in_place=True)
        portable = chunked_attention(q, k, v, spec, Block(), (4, 3), xp=xp, in_place=False)
        np.testing.assert_array_equal(fast[0], portable[0])
        for a, b in zip(fast[1], portable[1]):
            np.testing.assert_array_equal(a, b)
        go = rng.standard_normal(fast[0].shape)
        saved = Saved(q, k, v, *fast)
        g_fast = attention_backward(saved, go, spec, Block(), (4, 3), xp=xp, in_place=True)
        g_port = attention_backward(saved, go, spec, Block(), (4, 3), xp=xp, in_place=False)
        for a, b in zip(g_fast, g_port):
            np.testing.assert_array_equal(a, b)

    @pytest.mark.parametrize("window,causal,expected", [((2, 1), False, 12), ((3, -1), True, 10),
                                                        ((-1, -1), True, 10)])
    def test_window_skips_key_blocks(self, rng, monkeypatch, window, causal, expected):
        # 16 queries in blocks of 4 against 16 keys in blocks of 4: a narrow
        # window touches at most 3 key blocks per query block, not 4.
        import mha_xp._core._backward as backward_mod
        import mha_xp._core._chunked as chunked_mod

        calls = []
        real = chunked_mod.block_scores

        def counting(*args, **kwargs):
            calls.append(args[4])  # (q, key, spec, rows, cols, offset)
            return real(*args, **kwargs)

        monkeypatch.setattr(chunked_mod, "block_scores", counting)
        monkeypatch.setattr(backward_mod, "block_scores", counting)
        q, k, v = (rng.standard_normal((1, 16, 4)) for _ in range(3))
        ref, _ = ref_variants(q[None], k[None], v[None], window=window, is_causal=causal)
        out, backward = mha_xp.attention_vjp(q, k, v, window=window, is_causal=causal,
                                             chunk_size=4)
        assert len(calls) <= expected
        n_forward = len(calls)
        backward(np.ones_like(out))
        assert len(calls) - n_forward <= expected
        assert rel_err(out, ref[0]) < 1e-13

    def test_jax_jit(self, rng):
        jax = pytest.importorskip("jax", reason="optional backend jax not installed")
        jnp = jax.numpy
        jax.config.update("jax_enable_x64", True)
        (q, k, v), ours, theirs = _case(rng, "all")
        ref, _ = ref_variants(q, k, v, **theirs)
        cu_q, cu_k = (jnp.asarray(ours.pop(n)) for n in ("cu_seqlens_q", "cu_seqlens_k"))
        mask, slopes = jnp.asarray(ours.pop("mask")), jnp.asarray(ours.pop("alibi_slopes"))

        @jax.jit
        def f(q, k, v, cu_q, cu_k, mask, slopes):
            return mha_xp.scaled_dot_product_attention(
                q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, mask=mask, alibi_slopes=slopes,
                chunk_size=(3, 5), **ours)

        out = f(*(jnp.asarray(t) for t in (q, k, v)), cu_q, cu_k, mask, slopes)
        assert rel_err(np.asarray(out), ref) < 1e-13
