"""Layer variants: torch's add_bias_kv/add_zero_attn, grouped-query heads,
the KV cache, rotary, QK normalisation, window, ALiBi and soft-capping.

References: ``torch.nn.MultiheadAttention`` (outputs, per-head weights and
autograd gradients) where torch has the feature, and otherwise
``_torch_layer`` below, the layer written out in float64 torch operations
(independent of mha_xp) and differentiated by torch autograd.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mha_xp
from support import assert_close, assert_preserved, make_backend, rel_err

torch = pytest.importorskip("torch", reason="optional backend torch not installed")

MHA = mha_xp.MultiHeadAttention
# Gradients against torch autograd in float64 (measured worst: 8e-7 in
# float32, 3e-15 in float64).
GRAD_TOL = {"float32": 1e-5, "float64": 1e-12}


def _to_backend(layer, backend, dtype):
    return layer.to(xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype))


def _rotate_ref(x, pos, base, interleaved, rotary_dim=None):
    """RoPE in torch: GPT-NeoX halves or GPT-J interleaved pairs."""
    rd = x.shape[-1] if rotary_dim is None else rotary_dim
    half = rd // 2
    inv = torch.tensor([base ** (-2.0 * p / rd) for p in range(half)], dtype=torch.float64)
    ang = pos.to(torch.float64)[:, None] * inv
    cos, sin = torch.cos(ang), torch.sin(ang)
    xr, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = xr[..., :half], xr[..., half:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((out, rest), dim=-1)


def _torch_layer(p, x, H, *, causal=False, rotary=None, norm=False, window=None,
                 alibi=None, softcap=None):
    """The layer in float64 torch operations; ``p`` holds torch tensors under
    the state_dict names (separate q/k/v projections or the packed one)."""
    B, L, E = x.shape
    D = E // H
    if "in_proj_weight" in p:
        wq, wk, wv = p["in_proj_weight"].split(E)
    else:
        wq, wk, wv = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    F = wk.shape[0]
    Hkv = F // D
    bq, bk, bv = p["in_proj_bias"].split([E, F, F]) if "in_proj_bias" in p else (None,) * 3
    q = torch.nn.functional.linear(x, wq, bq).view(B, L, H, D).transpose(1, 2)
    k = torch.nn.functional.linear(x, wk, bk).view(B, L, Hkv, D).transpose(1, 2)
    v = torch.nn.functional.linear(x, wv, bv).view(B, L, Hkv, D).transpose(1, 2)
    if norm:
        q = torch.nn.functional.layer_norm(q, (D,), p["q_norm.weight"], None, eps=1e-6)
        k = torch.nn.functional.layer_norm(k, (D,), p["k_norm.weight"], None, eps=1e-6)
    pos = torch.arange(L)
    if rotary is not None:
        q = _rotate_ref(q, pos, *rotary)
        k = _rotate_ref(k, pos, *rotary)
    G = H // Hkv
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i, j = pos[:, None], pos[None, :]
    if alibi is not None:
        s = s - torch.tensor(alibi, dtype=torch.float64)[:, None, None] * (i - j).abs()
    allowed = torch.ones(L, L, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        left, right = window
        if left is not None:
            allowed &= j >= i - left
        if right is not None:
            allowed &= j <= i + right
    s = s.masked_fill(~allowed, float("-inf"))
    heads = torch.softmax(s, dim=-1) @ v
    merged = heads.transpose(1, 2).reshape(B, L, E)
    return torch.nn.functional.linear(merged, p["out_proj.weight"], p.get("out_proj.bias"))


def _random_biases(layer, rng):
    """torch's init zeroes the biases; draw them so that they are tested."""
    sd = {n: np.array(w, dtype=np.float64) for n, w in layer.state_dict().items()}
    for n in sd:
        if n.endswith("bias") or n.startswith(("q_norm", "k_norm")):
            sd[n] = rng.standard_normal(sd[n].shape)
    return sd


def _check_grads(grads, expected, dtype):
    assert sorted(grads) == sorted(expected)
    for name, g in expected.items():
        assert tuple(grads[name].shape) == tuple(g.shape), name
        err = rel_err(grads[name], g)
        assert err <= GRAD_TOL[dtype], (name, err)


class TestBiasKVZeroAttn:
    """torch's add_bias_kv and add_zero_attn against torch.nn.MultiheadAttention."""

    @pytest.mark.parametrize("bias_kv,zero_attn", [(True, False), (False, True), (True, True)])
    @pytest.mark.parametrize("cross", [False, True])
    def test_against_torch(self, backend, dtype, rng, bias_kv, zero_attn, cross):
        torch.manual_seed(int(rng.integers(2**31)))
        kdim = 5 if cross else None
        m = torch.nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim,
                                        add_bias_kv=bias_kv, add_zero_attn=zero_attn).double()
        with torch.no_grad():
            m.in_proj_bias.normal_()
            m.out_proj.bias.normal_()
        layer = _to_backend(MHA.from_torch(m), backend, dtype)
        assert sorted(layer.state_dict()) == sorted(m.state_dict())
        B, L, S = 2, 5, (6 if cross else 5)
        x = rng.standard_normal((B, L, 8))
        kv = rng.standard_normal((B, S, kdim or 8)) if cross else x
        pad = rng.random((B, S)) < 0.3
        pad[:, -1] = False
        mask = rng.random((L, S)) < 0.8
        causal = np.tril(np.ones((L, S), dtype=bool), k=S - L)
        args = (backend.asarray(x, dtype),) + ((backend.asarray(kv, dtype),) * 2 if cross else ())
        kw = dict(key_padding_mask=backend.asarray(pad), mask=backend.asarray(mask), is_causal=True)
        y, w = layer(*args, return_weights=True, average_weights=False, **kw)
        n = S + bias_kv + zero_attn
        assert_preserved(backend, y, dtype, (B, L, 8))
        assert_preserved(backend, w, dtype, (B, 2, L, n))
        tx, tkv = torch.tensor(x, requires_grad=True), torch.tensor(kv, requires_grad=True)
        ty, tw = m(tx, tkv if cross else tx, tkv if cross else tx,
                   key_padding_mask=torch.tensor(pad), attn_mask=torch.tensor(~(mask & causal)),
                   need_weights=True, average_attn_weights=False)
        assert_close(backend.to_numpy(y), ty.detach().numpy(), dtype)
        assert_close(backend.to_numpy(w), tw.detach().numpy(), dtype)
        # gradients, with torch autograd through the module
        y2, backward = layer.vjp(*args, **kw)
        gy = rng.standard_normal((B, L, 8))
        grads = backward(backend.asarray(gy, dtype))
        ty.backward(torch.tensor(gy))
        expected = {"query": tx.grad.numpy()}
        if cross:
            expected["key"] = expected["value"] = None  # key and value are one array in torch
        expected |= {name: prm.grad.numpy() for name, prm in m.named_parameters()}
        host = {k: backend.to_numpy(g) for k, g in grads.items()}
        if cross:
            host["key"] = host["key"] + host.pop("value")
            expected["key"] = tkv.grad.numpy()
            del expected["value"]
        assert list(grads)[-len(list(m.named_parameters())):] == [n for n, _ in m.named_parameters()]
        _check_grads(host, expected, dtype)

    def test_state_dict_round_trip_and_init(self, rng):
        layer = MHA(8, 2, add_bias_kv=True, add_zero_attn=True, seed=1)
        sd = layer.state_dict()
        assert list(sd) == ["in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
                            "out_proj.weight", "out_proj.bias"]
        assert sd["bias_k"].shape == sd["bias_v"].shape == (1, 1, 8)
        assert np.std(sd["bias_k"]) > 0
        again = MHA.from_state_dict(sd, num_heads=2, add_zero_attn=True)
        x = rng.standard_normal((2, 4, 8))
        assert np.array_equal(again(x), layer(x))
        # without add_zero_attn the output differs: the option is not in the state dict
        assert rel_err(MHA.from_state_dict(sd, num_heads=2)(x), layer(x)) > 1e-3
        assert "add_bias_kv=True" in repr(layer) and "add_zero_attn=True" in repr(layer)

    def test_torch_loads_our_state_dict(self, rng):
        layer = MHA(8, 4, add_bias_kv=True, seed=2)
        m = torch.nn.MultiheadAttention(8, 4, batch_first=True, add_bias_kv=True).double()
        m.load_state_dict({n: torch.tensor(w) for n, w in layer.state_dict().items()})
        x = rng.standard_normal((3, 6, 8))
        assert rel_err(layer(x), m(*(torch.tensor(x),) * 3)[0].detach().numpy()) <= 1e-12

    def test_lone_bias_k_is_refused(self):
        sd = MHA(8, 2, seed=0).state_dict() | {"bias_k": np.zeros((1, 1, 8))}
        with pytest.raises(ValueError, match=r"unexpected \['bias_k'\].*add_bias_kv needs both"):
            MHA.from_state_dict(sd, num_heads=2)


def _gqa_ref(params, x, H, causal):
    """float64 NumPy reference of grouped-query self-attention: head h uses
    key/value head h // (H // Hkv)."""
    from support.reference import ref_attention

    E = params["out_proj.weight"].shape[0]
    D = E // H
    Hkv = params["k_proj_weight"].shape[0] // D
    F = Hkv * D
    b = params.get("in_proj_bias", np.zeros(E + 2 * F))
    q = x @ params["q_proj_weight"].T + b[:E]
    k = x @ params["k_proj_weight"].T + b[E:E + F]
    v = x @ params["v_proj_weight"].T + b[E + F:]
    B, L, _ = x.shape
    heads = []
    for h in range(H):
        g = h // (H // Hkv)
        o, _ = ref_attention(q[..., h * D:(h + 1) * D], k[..., g * D:(g + 1) * D],
                             v[..., g * D:(g + 1) * D], is_causal=causal)
        heads.append(o)
    return np.concatenate(heads, axis=-1) @ params["out_proj.weight"].T + params["out_proj.bias"]


class TestGroupedQuery:
    @pytest.mark.parametrize("num_kv_heads", [1, 2])
    def test_against_reference_and_torch_sdpa(self, backend, dtype, rng, num_kv_heads):
        H, E = 4, 16
        base = MHA(E, H, num_kv_heads=num_kv_heads, seed=5)
        sd = _random_biases(base, rng)
        assert sd["k_proj_weight"].shape == (num_kv_heads * 4, E)
        assert sd["in_proj_bias"].shape == (E + 2 * num_kv_heads * 4,)
        layer = _to_backend(MHA.from_state_dict(sd, num_heads=H), backend, dtype)
        assert layer.num_kv_heads == num_kv_heads
        x = rng.standard_normal((2, 7, E))
        y = layer(backend.asarray(x, dtype), is_causal=True)
        assert_preserved(backend, y, dtype, (2, 7, E))
        assert_close(backend.to_numpy(y), _gqa_ref(sd, x, H, True), dtype)
        # torch: the same projections, then SDPA with enable_gqa=True
        t = {n: torch.tensor(w) for n, w in sd.items()}
        tx = torch.tensor(x)
        F = num_kv_heads * 4
        q = (tx @ t["q_proj_weight"].T + t["in_proj_bias"][:E]).view(2, 7, H, 4).transpose(1, 2)
        k = (tx @ t["k_proj_weight"].T + t["in_proj_bias"][E:E + F]).view(2, 7, -1, 4).transpose(1, 2)
        v = (tx @ t["v_proj_weight"].T + t["in_proj_bias"][E + F:]).view(2, 7, -1, 4).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        ty = o.transpose(1, 2).reshape(2, 7, E) @ t["out_proj.weight"].T + t["out_proj.bias"]
        assert_close(backend.to_numpy(y), ty.numpy(), dtype)

    def test_gradients_against_torch_autograd(self, backend, dtype, rng):
        sd = _random_biases(MHA(12, 6, num_kv_heads=2, seed=6), rng)
        layer = _to_backend(MHA.from_state_dict(sd, num_heads=6), backend, dtype)
        x = rng.standard_normal((3, 5, 12))
        y, backward = layer.vjp(backend.asarray(x, dtype), is_causal=True)
        gy = rng.standard_normal(y.shape)
        grads = {n: backend.to_numpy(g) for n, g in backward(backend.asarray(gy, dtype)).items()}
        t = {n: torch.tensor(w, requires_grad=True) for n, w in sd.items()}
        tx = torch.tensor(x, requires_grad=True)
        ty = _torch_layer(t, tx, 6, causal=True)
        assert_close(backend.to_numpy(y), ty.detach().numpy(), dtype)
        ty.backward(torch.tensor(gy))
        _check_grads(grads, {"query": tx.grad.numpy()} | {n: w.grad.numpy() for n, w in t.items()},
                     dtype)

    def test_cross_attention_and_errors(self, rng):
        layer = MHA(8, 4, num_kv_heads=2, kdim=3, vdim=5, seed=0)
        assert layer.state_dict()["k_proj_weight"].shape == (4, 3)
        assert layer.state_dict()["v_proj_weight"].shape == (4, 5)
        q, k, v = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 6, 5))
        assert layer(q, k, v).shape == (2, 4, 8)
        with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
            MHA(8, 4, num_kv_heads=3)
        with pytest.raises(ValueError, match="num_kv_heads=4 does not match"):
            MHA.from_state_dict(layer.state_dict(), num_heads=4, num_kv_heads=4)
        assert "num_kv_heads=2" in repr(layer)


class TestKVCache:
    """Prefill, one-token steps and chunked prefill equal full causal attention."""

    @pytest.mark.parametrize("options", [
        dict(),
        dict(num_kv_heads=2, rotary=True),
        dict(num_kv_heads=1, rotary=True, rotary_interleaved=True, add_bias_kv=True),
    ], ids=["plain", "gqa-rotary", "mqa-rotary-interleaved-bias_kv"])
    def test_decoding_equals_full_causal(self, backend, dtype, rng, options):
        base = MHA(16, 4, seed=7, **options)
        sd = _random_biases(base, rng)
        extra = {k: v for k, v in options.items() if k.startswith("rotary")}
        layer = _to_backend(MHA.from_state_dict(sd, num_heads=4, **extra), backend, dtype)
        x = rng.standard_normal((2, 9, 16))
        full = backend.to_numpy(layer(backend.asarray(x, dtype), is_causal=True))
        cache = layer.init_cache(batch_size=2, max_length=12)
        assert_preserved(backend, cache.key, dtype, (2, layer.num_kv_heads, 12, 4))
        pieces = []
        # prefill 4, two single steps, a chunk of 3 (chunked prefill)
        for a, b in ((0, 4), (4, 5), (5, 6), (6, 9)):
            y, cache = layer(backend.asarray(x[:, a:b], dtype), cache=cache, is_causal=True)
            assert_preserved(backend, y, dtype, (2, b - a, 16))
            pieces.append(backend.to_numpy(y))
        assert int(backend.to_numpy(cache.length)) == 9
        stepped = np.concatenate(pieces, axis=1)
        assert rel_err(stepped, full) <= (1e-6 if dtype == "float32" else 1e-13)
        if not options.get("add_bias_kv"):
            t = {n: torch.tensor(w) for n, w in sd.items()}
            rotary = (10000.0, options.get("rotary_interleaved", False)) if options.get("rotary") else None
            ref = _torch_layer(t, torch.tensor(x), 4, causal=True, rotary=rotary).numpy()
            assert_close(stepped, ref, dtype)

    def test_weights_and_unbatched(self, rng):
        layer = MHA(8, 2, seed=3)
        x = rng.standard_normal((5, 8))
        cache = layer.init_cache(1, 6)
        y, w, cache = layer(x[:3], cache=cache, is_causal=True, return_weights=True)
        assert y.shape == (3, 8) and w.shape == (3, 6)
        assert np.all(w[:, 3:] == 0) and np.allclose(w.sum(-1), 1)
        y2, cache = layer(x[3:], cache=cache, is_causal=True)
        assert rel_err(np.concatenate([y, y2]), layer(x, is_causal=True)) <= 1e-13

    @pytest.mark.parametrize("name", ["numpy", "array_api_strict", "torch"])
    def test_overflow_is_an_error_where_length_is_readable(self, rng, name):
        from support import make_backend

        backend = make_backend(name)
        layer = _to_backend(MHA(8, 2, seed=3), backend, "float64")
        x = backend.asarray(rng.standard_normal((1, 3, 8)), "float64")
        _, cache = layer(x, cache=layer.init_cache(1, 5), is_causal=True)
        with pytest.raises(ValueError, match=r"holds 3 of its max_length = 5 positions: 3 more"):
            layer(x, cache=cache, is_causal=True)
        _, cache = layer(x[:, :2, :], cache=cache, is_causal=True)  # exactly full is fine
        assert int(backend.to_numpy(cache.length)) == 5

    def test_cache_is_not_modified(self, rng):
        layer = MHA(8, 2, seed=3)
        x = rng.standard_normal((1, 4, 8))
        c0 = layer.init_cache(1, 4)
        _, c1 = layer(x[:, :2], cache=c0, is_causal=True)
        k1 = np.array(c1.key)
        _, c2a = layer(x[:, 2:3], cache=c1, is_causal=True)
        _, c2b = layer(x[:, 3:4], cache=c1, is_causal=True)  # branch from the same cache
        assert np.array_equal(c1.key, k1) and int(c1.length) == 2 and not np.any(c0.key)
        assert not np.array_equal(c2a.key, c2b.key)

    def test_one_step_under_jax_jit(self, rng):
        jax = pytest.importorskip("jax", reason="optional backend jax not installed")
        jax.config.update("jax_enable_x64", True)
        jnp = jax.numpy
        layer = MHA(16, 4, num_kv_heads=2, rotary=True, seed=8)
        x = rng.standard_normal((2, 6, 16))
        full = layer(x, is_causal=True)
        lj = layer.to(xp=jnp)
        step = jax.jit(lambda xs, c: lj(xs, cache=c, is_causal=True))
        cache, pieces = lj.init_cache(2, 8), []
        y, cache = lj(jnp.asarray(x[:, :2]), cache=cache, is_causal=True)
        pieces.append(np.asarray(y))
        for t in range(2, 6):
            y, cache = step(jnp.asarray(x[:, t:t + 1]), cache)
            pieces.append(np.asarray(y))
        assert step._cache_size() == 1  # one compilation serves every position
        assert rel_err(np.concatenate(pieces, axis=1), full) <= 1e-13

    def test_errors(self, rng):
        layer = MHA(8, 2, seed=0)
        x = rng.standard_normal((2, 3, 8))
        cache = layer.init_cache(2, 4)
        with pytest.raises(ValueError, match="pass is_causal=True"):
            layer(x, cache=cache)
        with pytest.raises(ValueError, match="self-attention"):
            layer(x, x, cache=cache, is_causal=True)
        # key_padding_mask is allowed (per-sequence lengths); a mask is not.
        with pytest.raises(ValueError, match="mask is not supported with a cache"):
            layer(x, cache=cache, is_causal=True, mask=np.ones((3, 3), dtype=bool))
        dynamic = MHA(8, 2, rotary=True, rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                      max_position_embeddings=8, seed=0)
        with pytest.raises(ValueError, match="rope_scaling 'dynamic' changes the frequencies"):
            dynamic(x, cache=dynamic.init_cache(2, 4), is_causal=True)
        with pytest.raises(ValueError, match=r"cache.key must have shape \(B, num_kv_heads"):
            layer(x[:1], cache=cache, is_causal=True)
        with pytest.raises(ValueError, match="at most max_length = 2"):
            layer(x, cache=layer.init_cache(2, 2), is_causal=True)
        with pytest.raises(TypeError, match="cache must be a KVCache"):
            layer(x, cache=(1, 2), is_causal=True)


# (layer options, _torch_layer options) of the combinations tested
_VARIANTS = {
    "rotary": (dict(rotary=True, rotary_base=500.0), dict(rotary=(500.0, False))),
    "rotary-gptj-partial": (dict(rotary=True, rotary_interleaved=True, rotary_dim=2),
                            dict(rotary=(10000.0, True, 2))),
    "norm": (dict(normalize_qk=True), dict(norm=True)),
    "window": (dict(window=(2, 1)), dict(window=(2, 1))),
    "alibi": (dict(alibi=True), dict(alibi=mha_xp.alibi_slopes(4))),
    "softcap": (dict(softcap=0.7), dict(softcap=0.7)),
    "all-gqa": (dict(num_kv_heads=2, rotary=True, normalize_qk=True, window=(3, None),
                     alibi=[0.3, -0.1, 0.2, 0.05], softcap=2.0),
                dict(rotary=(10000.0, False), norm=True, window=(3, None),
                     alibi=[0.3, -0.1, 0.2, 0.05], softcap=2.0)),
}


def _variant_layer(name, backend, dtype, rng):
    options, ref_options = _VARIANTS[name]
    params = {k: v for k, v in options.items() if k in ("num_kv_heads", "normalize_qk")}
    rest = {k: v for k, v in options.items() if k not in params}
    sd = _random_biases(MHA(16, 4, seed=9, **params), rng)
    layer = _to_backend(MHA.from_state_dict(sd, num_heads=4, **rest), backend, dtype)
    return layer, sd, ref_options


class TestOptions:
    """RoPE, QK norm, window, ALiBi and softcap: forward and every gradient
    against the layer in float64 torch operations and torch autograd."""

    @pytest.mark.parametrize("name", list(_VARIANTS))
    @pytest.mark.parametrize("causal", [False, True])
    def test_forward_and_gradients(self, backend, dtype, rng, name, causal):
        layer, sd, ref_options = _variant_layer(name, backend, dtype, rng)
        x = rng.standard_normal((2, 7, 16))
        y, backward = layer.vjp(backend.asarray(x, dtype), is_causal=causal)
        assert_preserved(backend, y, dtype, (2, 7, 16))
        # vjp's forward is the portable path (it keeps the softmax statistics,
        # which torch's and JAX's native kernels do not return): bit for bit
        # the call's portable path, and the delegated call to the dtype's tolerance.
        with mha_xp.native_kernels(False):
            portable = layer(backend.asarray(x, dtype), is_causal=causal)
        assert rel_err(backend.to_numpy(portable), backend.to_numpy(y)) == 0.0
        assert rel_err(backend.to_numpy(layer(backend.asarray(x, dtype), is_causal=causal)),
                       backend.to_numpy(y)) <= 1e-6
        gy = rng.standard_normal(y.shape)
        grads = {n: backend.to_numpy(g) for n, g in backward(backend.asarray(gy, dtype)).items()}
        t = {n: torch.tensor(w, requires_grad=True) for n, w in sd.items()}
        tx = torch.tensor(x, requires_grad=True)
        ty = _torch_layer(t, tx, 4, causal=causal, **ref_options)
        assert_close(backend.to_numpy(y), ty.detach().numpy(), dtype)
        ty.backward(torch.tensor(gy))
        _check_grads(grads, {"query": tx.grad.numpy()} | {n: w.grad.numpy() for n, w in t.items()},
                     dtype)

    @pytest.mark.parametrize("name", ["all-gqa", "window", "alibi"])
    def test_chunked_path(self, rng, name):
        layer, sd, ref_options = _variant_layer(name, make_backend("numpy"), "float64", rng)
        x = rng.standard_normal((2, 9, 16))
        y, backward = layer.vjp(x, is_causal=True, chunk_size=(2, 3))
        t = {n: torch.tensor(w, requires_grad=True) for n, w in sd.items()}
        tx = torch.tensor(x, requires_grad=True)
        ty = _torch_layer(t, tx, 4, causal=True, **ref_options)
        assert rel_err(y, ty.detach().numpy()) <= 1e-12
        gy = rng.standard_normal(y.shape)
        grads = backward(gy)
        ty.backward(torch.tensor(gy))
        _check_grads(grads, {"query": tx.grad.numpy()} | {n: w.grad.numpy() for n, w in t.items()},
                     "float64")

    @pytest.mark.parametrize("name", ["all-gqa", "window", "alibi", "softcap", "norm"])
    def test_cache_matches_full(self, backend, dtype, rng, name):
        """The cache builds the causal, window and ALiBi terms from positions
        itself; the full call leaves them to the core."""
        layer, _, _ = _variant_layer(name, backend, dtype, rng)
        x = rng.standard_normal((2, 8, 16))
        full = backend.to_numpy(layer(backend.asarray(x, dtype), is_causal=True))
        cache, pieces = layer.init_cache(2, 10), []
        for a, b in ((0, 3), (3, 4), (4, 8)):
            y, cache = layer(backend.asarray(x[:, a:b], dtype), cache=cache, is_causal=True)
            pieces.append(backend.to_numpy(y))
        assert rel_err(np.concatenate(pieces, axis=1), full) <= (1e-6 if dtype == "float32" else 1e-13)

    def test_bias_kv_with_window_and_alibi(self, rng):
        """The appended keys stay outside the causal, window and ALiBi terms:
        equal to torch's module with those terms as a float attn_mask."""
        torch.manual_seed(int(rng.integers(2**31)))
        m = torch.nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True,
                                        add_zero_attn=True).double()
        slopes = [0.5, 0.25]
        layer = MHA.from_state_dict({n: w.detach().numpy() for n, w in m.state_dict().items()},
                                    num_heads=2, add_zero_attn=True, window=(1, 0), alibi=slopes)
        x = rng.standard_normal((3, 5, 8))
        i, j = np.arange(5)[:, None], np.arange(5)[None, :]
        bias = -np.asarray(slopes)[:, None, None] * np.abs(i - j)
        bias = np.where((j <= i) & (j >= i - 1), bias, -np.inf)
        attn = torch.tensor(np.broadcast_to(bias, (3, 2, 5, 5)).reshape(6, 5, 5).copy())
        tx = torch.tensor(x, requires_grad=True)
        ty = m(tx, tx, tx, attn_mask=attn, need_weights=False)[0]
        y, backward = layer.vjp(x, is_causal=True)
        assert rel_err(y, ty.detach().numpy()) <= 1e-12
        gy = rng.standard_normal(y.shape)
        ty.backward(torch.tensor(gy))
        _check_grads(backward(gy), {"query": tx.grad.numpy()} | {
            n: p.grad.numpy() for n, p in m.named_parameters()}, "float64")

    def test_option_errors(self):
        with pytest.raises(ValueError, match="rotary_dim must be an even int"):
            MHA(8, 2, rotary=True, rotary_dim=3)
        # Any negative side is unbounded, as in scaled_dot_product_attention.
        assert MHA(8, 2, window=(-2, 0)).config.window == (None, 0)
        with pytest.raises(TypeError, match="window must be a pair of ints"):
            MHA(8, 2, window=(1.5, 0))
        with pytest.raises(ValueError, match="alibi must hold num_heads = 2"):
            MHA(8, 2, alibi=[0.5])
        with pytest.raises(ValueError, match="softcap must be a positive"):
            MHA(8, 2, softcap=0.0)
        with pytest.raises(TypeError, match="unexpected option"):
            MHA.from_state_dict(MHA(8, 2, seed=0).state_dict(), num_heads=2, rotery=True)
