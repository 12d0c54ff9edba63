"""Gradients: attention_vjp and MultiHeadAttention.vjp against torch autograd,
finite differences, and across every backend."""

from __future__ import annotations

import numpy as np
import pytest

import mha_xp
from support import REL_TOL, assert_close, assert_preserved, make_backend, rel_err

MHA = mha_xp.MultiHeadAttention

torch = pytest.importorskip("torch", reason="optional backend torch not installed")


def _grad_err(g, ref):
    """Relative error, against 1 when the exact gradient is 0 (a bias
    constant along a softmax row has zero gradient; both sides are rounding)."""
    g, ref = np.asarray(g, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert np.all(np.isfinite(g))
    return float(np.linalg.norm(g - ref) / max(np.linalg.norm(ref), 1.0))


def _torch_grads_sdpa(q, k, v, go, *, allowed, bias, scale=None):
    """torch autograd through its own SDPA, float64."""
    tq, tk, tv = (torch.tensor(t, requires_grad=True) for t in (q, k, v))
    tb = None if bias is None else torch.tensor(bias, requires_grad=True)
    attn = None
    if allowed is not None or tb is not None:
        shape = np.broadcast_shapes(q.shape[:-1] + (k.shape[-2],))
        attn = torch.zeros(shape, dtype=torch.float64) if tb is None else tb + torch.zeros(shape, dtype=torch.float64)
        if allowed is not None:
            attn = attn.masked_fill(~torch.tensor(np.broadcast_to(allowed, shape)), float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=attn, scale=scale)
    out.backward(torch.tensor(go))
    grads = {"query": tq.grad, "key": tk.grad, "value": tv.grad}
    if tb is not None:
        grads["bias"] = tb.grad
    return out.detach().numpy(), {n: g.numpy() for n, g in grads.items()}


class TestSDPAAgainstTorch:
    @pytest.mark.parametrize("chunk", [None, (2, 3)], ids=["dense", "chunked"])
    @pytest.mark.parametrize("L,S", [(5, 7), (7, 4), (6, 6)])
    @pytest.mark.parametrize("bias_shape", [None, (3, 1, 1), (2, 3, "L", "S"), (1, "S")])
    def test_float64(self, rng, chunk, L, S, bias_shape):
        q, k, v = (rng.standard_normal(s) for s in [(2, 3, L, 4), (2, 3, S, 4), (2, 3, S, 5)])
        mask = rng.random((2, 1, L, S)) < 0.8
        mask[..., 0] = True  # with L > S, the first L - S rows still see nothing (causal)
        causal = np.arange(S)[None, :] <= np.arange(L)[:, None] + S - L
        bias = None
        if bias_shape is not None:
            bias = rng.standard_normal(tuple(L if d == "L" else S if d == "S" else d for d in bias_shape))
        out, backward = mha_xp.attention_vjp(q, k, v, mask=mask, bias=bias, is_causal=True,
                                             chunk_size=chunk)
        go = rng.standard_normal(out.shape)
        grads = backward(go)
        ref_out, ref = _torch_grads_sdpa(q, k, v, go, allowed=mask & causal, bias=bias)
        assert rel_err(out, ref_out) <= 1e-12
        assert set(grads) == set(ref)
        for name, g in grads.items():
            assert g.shape == ref[name].shape, name
            assert _grad_err(g, ref[name]) <= 1e-10, name

    def test_scale(self, rng):
        q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
        out, backward = mha_xp.attention_vjp(q, k, v, scale=0.7)
        go = rng.standard_normal(out.shape)
        _, ref = _torch_grads_sdpa(q, k, v, go, allowed=None, bias=None, scale=0.7)
        for name, g in backward(go).items():
            assert rel_err(g, ref[name]) <= 1e-10


class TestLayerAgainstTorch:
    @pytest.mark.parametrize("mode,kdim", [("self", None), ("cross", None), ("cross", 5)])
    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize("unbatched", [False, True])
    @pytest.mark.parametrize("pad,causal,chunk", [(False, False, None), (True, False, None),
                                                  (True, True, (2, 3)), (False, True, None)])
    def test_all_gradients_float64(self, rng, mode, kdim, bias, unbatched, pad, causal, chunk):
        torch.manual_seed(int(rng.integers(2**31)))
        m = torch.nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim, bias=bias).double()
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "bias" in name:
                    p.normal_()
        layer = MHA.from_torch(m)
        B, L = 2, 5
        S = L if mode == "self" else 6
        x = rng.standard_normal((B, L, 8))
        kv = rng.standard_normal((B, S, kdim or 8))
        kw, tkw = {}, {}
        if pad:
            pm = rng.random((B, S)) < 0.3
            pm[:, -1] = False
            kw["key_padding_mask"], tkw["key_padding_mask"] = pm, torch.tensor(pm)
        if causal:
            kw["is_causal"] = True
            tkw["attn_mask"] = torch.tensor(~np.tril(np.ones((L, S), dtype=bool), k=S - L))
        args = (x,) if mode == "self" else (x, kv, kv)
        if unbatched:
            args = tuple(a[0] for a in args)
            if pad:
                kw["key_padding_mask"] = kw["key_padding_mask"][0]
                tkw["key_padding_mask"] = tkw["key_padding_mask"][0]
        y, backward = layer.vjp(*args, chunk_size=chunk, **kw)
        gy = rng.standard_normal(y.shape)
        grads = backward(gy)
        targs = [torch.tensor(a, requires_grad=True) for a in args]
        ty = m(*(targs * 3 if mode == "self" else targs), need_weights=False, **tkw)[0]
        ty.backward(torch.tensor(gy))
        assert rel_err(y, ty.detach().numpy()) <= 1e-12
        expected = {"query": targs[0].grad} if mode == "self" else dict(
            zip(("query", "key", "value"), (t.grad for t in targs)))
        expected |= {name: p.grad for name, p in m.named_parameters()}
        assert list(grads) == list(expected)
        for name, g in grads.items():
            assert g.shape == tuple(expected[name].shape), name
            assert rel_err(g, expected[name].numpy()) <= 1e-10, name


def _directional_check(f, inputs, grads, rng, eps=1e-6):
    """Central differences of the scalar f along a random direction."""
    direction = {n: rng.standard_normal(np.shape(a)) for n, a in inputs.items()}
    plus = f({n: a + eps * direction[n] for n, a in inputs.items()})
    minus = f({n: a - eps * direction[n] for n, a in inputs.items()})
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(float(np.sum(grads[n] * direction[n])) for n in inputs)
    assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic)), (numeric, analytic)


class TestFiniteDifferences:
    @pytest.mark.parametrize("name", ["numpy", "array_api_strict"])
    @pytest.mark.parametrize("chunk", [None, 2])
    def test_sdpa(self, rng, name, chunk):
        b = make_backend(name)
        host = {"query": rng.standard_normal((2, 4, 3)), "key": rng.standard_normal((2, 5, 3)),
                "value": rng.standard_normal((2, 5, 2)), "bias": rng.standard_normal((4, 5))}
        mask = b.asarray(rng.random((4, 5)) < 0.8)
        weights = rng.standard_normal((2, 4, 2))

        def loss(arrays):
            a = {n: b.asarray(v) for n, v in arrays.items()}
            out = mha_xp.scaled_dot_product_attention(a["query"], a["key"], a["value"], bias=a["bias"],
                                                      mask=mask, is_causal=True, chunk_size=chunk)
            return float(np.sum(b.to_numpy(out) * weights))

        out, backward = mha_xp.attention_vjp(*(b.asarray(host[n]) for n in ("query", "key", "value")),
                                             bias=b.asarray(host["bias"]), mask=mask, is_causal=True,
                                             chunk_size=chunk)
        grads = {n: b.to_numpy(g) for n, g in backward(b.asarray(weights)).items()}
        _directional_check(loss, host, grads, rng)

    @pytest.mark.parametrize("name", ["numpy", "array_api_strict"])
    def test_layer_inputs_and_parameters(self, rng, name):
        b = make_backend(name)
        layer = MHA(6, 2, kdim=4, vdim=3, xp=b.xp, device=b.device, dtype=b.dtype("float64"), seed=0)
        params = {n: b.to_numpy(w) + 0.1 * rng.standard_normal(w.shape) for n, w in layer.state_dict().items()}
        inputs = {"query": rng.standard_normal((2, 3, 6)), "key": rng.standard_normal((2, 4, 4)),
                  "value": rng.standard_normal((2, 4, 3))}
        pad = b.asarray(np.array([[False, True, False, False], [False, False, False, True]]))
        weights = rng.standard_normal((2, 3, 6))

        def loss(arrays):
            lay = MHA.from_state_dict({n: b.asarray(arrays[n]) for n in params}, num_heads=2)
            out = lay(*(b.asarray(arrays[n]) for n in inputs), key_padding_mask=pad, is_causal=True)
            return float(np.sum(b.to_numpy(out) * weights))

        lay = MHA.from_state_dict({n: b.asarray(w) for n, w in params.items()}, num_heads=2)
        _, backward = lay.vjp(*(b.asarray(a) for a in inputs.values()), key_padding_mask=pad, is_causal=True)
        grads = {n: b.to_numpy(g) for n, g in backward(b.asarray(weights)).items()}
        assert set(grads) == set(inputs) | set(params)
        _directional_check(loss, inputs | params, grads, rng)


class TestEveryBackend:
    def test_layer_gradients_agree_with_numpy_float64(self, backend, dtype, rng):
        ref_layer = MHA(8, 2, kdim=5, seed=1)
        layer = ref_layer.to(xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype))
        x, kv = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 6, 5))
        kv_v = rng.standard_normal((2, 6, 8))
        pad = np.array([[False] * 5 + [True], [False] * 6])
        gy = rng.standard_normal((2, 4, 8))
        _, ref_bw = ref_layer.vjp(x, kv, kv_v, key_padding_mask=pad, is_causal=True)
        ref = ref_bw(gy)
        y, backward = layer.vjp(*(backend.asarray(t, dtype) for t in (x, kv, kv_v)),
                                key_padding_mask=backend.asarray(pad), is_causal=True, chunk_size=(3, 4))
        grads = backward(backend.asarray(gy, dtype))
        again = backward(backend.asarray(gy, dtype))
        assert list(grads) == list(ref)
        for name, g in grads.items():
            assert_preserved(backend, g, dtype, ref[name].shape)
            assert_close(backend.to_numpy(g), ref[name], dtype)
            np.testing.assert_array_equal(backend.to_numpy(again[name]), backend.to_numpy(g))

    def test_fully_masked_rows_zero_gradients(self, backend, dtype, rng):
        q, k, v = (backend.asarray(rng.standard_normal((2, 4, 3)), dtype) for _ in range(3))
        mask = np.ones((4, 4), dtype=bool)
        mask[1] = False
        out, backward = mha_xp.attention_vjp(q, k, v, mask=backend.asarray(mask))
        grads = {n: backend.to_numpy(g) for n, g in backward(backend.asarray(np.ones((2, 4, 3)), dtype)).items()}
        for g in grads.values():
            assert np.all(np.isfinite(g))
        assert np.all(grads["query"][:, 1] == 0)

    def test_float16(self, backend_f16, rng):
        b = backend_f16
        q, k, v = (rng.standard_normal((2, 5, 8)).astype(np.float16) for _ in range(3))
        go = rng.standard_normal((2, 5, 8)).astype(np.float16)
        _, ref_bw = mha_xp.attention_vjp(*(t.astype(np.float64) for t in (q, k, v)), is_causal=True)
        ref = ref_bw(go.astype(np.float64))
        _, backward = mha_xp.attention_vjp(*(b.asarray(t) for t in (q, k, v)), is_causal=True)
        for name, g in backward(b.asarray(go)).items():
            assert g.dtype == b.dtype("float16")
            assert_close(b.to_numpy(g), ref[name], "float16")


class TestErrors:
    def test_grad_out_checked(self, rng):
        q = rng.standard_normal((2, 4, 3))
        out, backward = mha_xp.attention_vjp(q, q, q)
        with pytest.raises(ValueError, match=r"grad_out must have the output's shape \(2, 4, 3\)"):
            backward(np.ones((2, 4)))
        with pytest.raises(TypeError, match="grad_out has dtype float32 but the output is float64"):
            backward(np.ones((2, 4, 3), dtype=np.float32))
        with pytest.raises(TypeError, match="grad_out is a torch array but out is a numpy array"):
            backward(torch.ones(2, 4, 3, dtype=torch.float64))
        _, layer_bw = MHA(4, 2, seed=0).vjp(rng.standard_normal((3, 4)))
        with pytest.raises(ValueError, match="grad_out must have the output's shape"):
            layer_bw(np.ones((1, 3, 4)))


class TestTorchAutogradThroughForward:
    def test_torch_differentiates_mha_xp(self, rng):
        layer = MHA(8, 2, seed=3, dtype=np.float64)
        x = rng.standard_normal((2, 5, 8))
        gy = rng.standard_normal((2, 5, 8))
        _, backward = layer.vjp(x, is_causal=True)
        ours = backward(gy)
        params = {n: torch.tensor(w, requires_grad=True) for n, w in layer.state_dict().items()}
        tx = torch.tensor(x, requires_grad=True)
        tlayer = MHA.from_state_dict(params, num_heads=2)
        tlayer(tx, is_causal=True).backward(torch.tensor(gy))
        assert rel_err(tx.grad.numpy(), ours["query"]) <= 1e-12
        for name, p in params.items():
            assert rel_err(p.grad.numpy(), ours[name]) <= 1e-12, name


class TestInPlaceBackward:
    def test_bit_identical_to_portable(self, rng):
        import array_api_compat.numpy as xp

        from mha_xp._core._backward import Saved, attention_backward
        from mha_xp._core._chunked import chunked_attention
        from mha_xp._spec import AttentionSpec, Block

        q, k, v = (rng.standard_normal(s) for s in [(2, 3, 7, 4), (2, 3, 9, 4), (2, 3, 9, 5)])
        bias = rng.standard_normal((3, 7, 9))
        spec = AttentionSpec(scale=0.5, mask=rng.random((7, 9)) < 0.8, bias=bias, is_causal=True)
        out, stats = chunked_attention(q, k, v, spec, Block(), (3, 4), xp=xp)
        go = rng.standard_normal(out.shape)
        saved = Saved(q, k, v, out, stats)
        fast = attention_backward(saved, go, spec, Block(), (3, 4), xp=xp, in_place=True)
        portable = attention_backward(saved, go, spec, Block(), (3, 4), xp=xp, in_place=False)
        for a, b in zip(fast, portable):
            np.testing.assert_array_equal(a, b)
