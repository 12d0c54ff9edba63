"""The layer's geometry and the options of pretrained models' attention:
``head_dim`` with ``num_heads * head_dim != embed_dim`` (Gemma, gpt-oss),
grouped-query heads, cross-attention sizes, ``scale=``, the QK-norm options
(``qk_norm``, ``qk_norm_eps``, ``qk_norm_offset``, ``qk_norm_bias``,
``qk_norm_per_head``) and learnable attention ``sinks``.

The reference (``ref_layer``) is the layer written out in float64 NumPy from
the definitions: project, split heads, normalise, rotate, attend (with the
sink in every row's softmax), merge, project out. Gradients: central
differences of the reference for every parameter and input, and torch
autograd through the layer's own forward on torch tensors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mha_xp
from support import REL_TOL, assert_close, assert_preserved, rel_err

MHA = mha_xp.MultiHeadAttention
# Gradients against float64 (measured worst: float32 ~3e-6).
GRAD_TOL = {"float32": 2e-5, "float64": 1e-12}

# ----------------------------------------------------------------- reference


def _ref_norm(x, w, b, kind, eps, offset):
    w = np.asarray(w)[:, None, :] if np.ndim(w) == 2 else w
    xc = x - x.mean(-1, keepdims=True) if kind == "layer" else x
    y = xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps) * (offset + w)
    if b is not None:
        y = y + (np.asarray(b)[:, None, :] if np.ndim(b) == 2 else b)
    return y


def _ref_rotate(x, pos, inv_freq, af, interleaved, rotary_dim):
    rd = rotary_dim or x.shape[-1]
    ang = pos[:, None] * inv_freq
    c, s = af * np.cos(ang), af * np.sin(ang)
    out = x.copy()
    if interleaved:
        a, b = x[..., 0:rd:2], x[..., 1:rd:2]
        out[..., 0:rd:2], out[..., 1:rd:2] = a * c - b * s, b * c + a * s
    else:
        h = rd // 2
        a, b = x[..., :h], x[..., h:rd]
        out[..., :h], out[..., h:rd] = a * c - b * s, b * c + a * s
    return out


def _ref_inv_freq(dim, base, scaling):
    inv = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    if scaling is not None:
        assert scaling["rope_type"] == "linear"
        inv = inv / scaling["factor"]
    return inv


def ref_layer(sd, H, cfg, x, kv=None, *, is_causal=False, key_padding_mask=None, mask=None):
    """The layer in float64 NumPy. ``sd``: torch-named parameters; ``cfg``:
    the constructor's options (head_dim, scale, normalize_qk, qk_norm*,
    rotary*, rope_scaling). Returns ``(out (B, L, E), weights (B, H, L, S))``."""
    p = {n: np.asarray(w, np.float64) for n, w in sd.items()}
    x = np.asarray(x, np.float64)
    kv = (x, x) if kv is None else tuple(np.asarray(t, np.float64) for t in kv)
    wo = p["out_proj.weight"]
    E, Q = wo.shape
    D = Q // H
    if "in_proj_weight" in p:
        wq, wk, wv = np.split(p["in_proj_weight"], 3)
    else:
        wq, wk, wv = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    F = wk.shape[0]
    Hkv = F // D
    bq, bk, bv = np.split(p.get("in_proj_bias", np.zeros(Q + 2 * F)), [Q, Q + F])
    B, L, S = x.shape[0], x.shape[1], kv[0].shape[1]

    def heads(t, w, b, n):
        return (t @ w.T + b).reshape(B, t.shape[1], n, D).transpose(0, 2, 1, 3)

    q, k, v = heads(x, wq, bq, H), heads(kv[0], wk, bk, Hkv), heads(kv[1], wv, bv, Hkv)
    if cfg.get("normalize_qk"):
        opts = (cfg.get("qk_norm", "layer"), cfg.get("qk_norm_eps", 1e-6),
                cfg.get("qk_norm_offset", 0.0))
        q = _ref_norm(q, p["q_norm.weight"], p.get("q_norm.bias"), *opts)
        k = _ref_norm(k, p["k_norm.weight"], p.get("k_norm.bias"), *opts)
    if cfg.get("rotary"):
        rd = cfg.get("rotary_dim")
        inv = _ref_inv_freq(rd or D, cfg.get("rotary_base", 10000.0), cfg.get("rope_scaling"))
        rot = (inv, 1.0, cfg.get("rotary_interleaved", False), rd)
        q = _ref_rotate(q, np.arange(L) + (S - L), *rot)
        k = _ref_rotate(k, np.arange(S), *rot)
    G = H // Hkv
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    scale = cfg.get("scale") or 1.0 / math.sqrt(D)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    i, j = np.arange(L)[:, None], np.arange(S)[None, :]
    ok = np.ones((B, H, L, S), bool)
    if is_causal:
        ok &= j <= i + S - L
    if key_padding_mask is not None:
        ok &= ~np.asarray(key_padding_mask)[:, None, None, :]
    if mask is not None:
        ok &= np.asarray(mask)
    s = np.where(ok, s, -np.inf)
    sink = np.full((B, H, L, 1), -np.inf)
    if "sinks" in p:
        sink = np.broadcast_to(p["sinks"][None, :, None, None], sink.shape)
    full = np.concatenate([s, sink], axis=-1)
    m = full.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(full - m)
    tot = e.sum(-1, keepdims=True)
    P = (e / np.where(tot == 0, 1.0, tot))[..., :S]
    merged = (P @ v).transpose(0, 2, 1, 3).reshape(B, L, H * D)
    return merged @ wo.T + p.get("out_proj.bias", np.zeros(E)), P


# ------------------------------------------------------------------- configs

# name: (E, H, options); the reference reads the same options.
CONFIGS = {
    "wide": (8, 2, dict(head_dim=6)),
    "narrow": (12, 4, dict(head_dim=2)),
    "gqa_odd": (8, 4, dict(num_kv_heads=2, head_dim=3)),
    "cross": (8, 2, dict(head_dim=5, kdim=5, vdim=7)),
    "gqa_rotary": (8, 4, dict(num_kv_heads=2, head_dim=6, rotary=True, rotary_dim=4,
                              rotary_interleaved=True)),
    "flax_qk_norm": (8, 2, dict(head_dim=6, normalize_qk=True)),
    "rms_shared_scale": (8, 2, dict(head_dim=4, normalize_qk=True, qk_norm="rms",
                                    qk_norm_eps=1e-5, scale=0.7)),
    "layer_bias_sinks": (8, 2, dict(head_dim=6, normalize_qk=True, qk_norm="layer",
                                    qk_norm_bias=True, qk_norm_eps=1e-3, sinks=True)),
    "sinks_gqa": (8, 4, dict(num_kv_heads=2, sinks=True)),
    "everything": (8, 4, dict(num_kv_heads=2, head_dim=6, rotary=True, rotary_base=100.0,
                              rope_scaling={"rope_type": "linear", "factor": 2.0},
                              normalize_qk=True, qk_norm="rms", qk_norm_per_head=True,
                              qk_norm_offset=1.0, sinks=True, scale=0.3)),
    "per_head_layer_bias": (8, 4, dict(num_kv_heads=2, head_dim=3, normalize_qk=True,
                                       qk_norm_per_head=True, qk_norm_bias=True)),
}
SELF = [n for n in CONFIGS if n != "cross"]


def _layer(rng, name, **extra):
    """The config's layer with every parameter random (biases, norm scales
    and sinks too), rebuilt from its state dict; and that state dict."""
    E, H, opts = CONFIGS[name]
    opts = dict(opts, **extra)
    layer = MHA(E, H, seed=int(rng.integers(2**31)), **opts)
    sd = {n: np.array(w, dtype=np.float64) for n, w in layer.state_dict().items()}
    for n in sd:
        if n.endswith("bias") or n.startswith(("q_norm", "k_norm")) or n == "sinks":
            base = 1.0 - opts.get("qk_norm_offset", 0.0) if n.endswith("norm.weight") else 0.0
            sd[n] = base + (0.3 if "norm" in n else 1.0) * rng.standard_normal(sd[n].shape)
    layer = MHA.from_state_dict(sd, num_heads=H, **layer.config.options())
    return layer, sd, H, opts


def _data(rng, name, B=2, L=5, S=6):
    E, _, opts = CONFIGS[name]
    x = rng.standard_normal((B, L, E))
    if name != "cross":
        return x, None
    return x, (rng.standard_normal((B, S, opts["kdim"])), rng.standard_normal((B, S, opts["vdim"])))


def _masks(rng, B, L, S):
    pad = rng.random((B, S)) < 0.25
    pad[:, -1] = False
    return pad, rng.random((L, S)) < 0.8


def _on(layer, backend, dtype):
    return layer.to(xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype))


# ------------------------------------------------------------------- shapes


class TestShapes:
    def test_state_dict_shapes(self):
        layer = MHA(8, 4, num_kv_heads=2, head_dim=3, kdim=5, vdim=7, seed=0, sinks=True,
                    normalize_qk=True, qk_norm_per_head=True, qk_norm_bias=True)
        shapes = {n: tuple(w.shape) for n, w in layer.state_dict().items()}
        assert shapes == {
            "q_proj_weight": (12, 8), "k_proj_weight": (6, 5), "v_proj_weight": (6, 7),
            "in_proj_bias": (12 + 2 * 6,), "out_proj.weight": (8, 12), "out_proj.bias": (8,),
            "q_norm.weight": (4, 3), "k_norm.weight": (2, 3), "q_norm.bias": (4, 3),
            "k_norm.bias": (2, 3), "sinks": (4,)}
        assert (layer.embed_dim, layer.num_heads, layer.num_kv_heads, layer.head_dim,
                layer.kdim, layer.vdim) == (8, 4, 2, 3, 5, 7)
        x = np.random.default_rng(0).standard_normal((2, 5, 8))
        kv = np.random.default_rng(1).standard_normal((2, 6, 5))
        vv = np.random.default_rng(2).standard_normal((2, 6, 7))
        y, w = layer(x, kv, vv, return_weights=True, average_weights=False)
        assert y.shape == (2, 5, 8) and w.shape == (2, 4, 5, 6)
        assert layer(x[0], kv[0], vv[0]).shape == (5, 8)  # unbatched

    def test_init_values(self):
        layer = MHA(8, 4, num_kv_heads=2, head_dim=6, seed=0, sinks=True, normalize_qk=True,
                    qk_norm_bias=True)
        sd = layer.state_dict()
        np.testing.assert_array_equal(sd["sinks"], np.zeros(4))
        np.testing.assert_array_equal(sd["q_norm.weight"], np.ones(6))
        np.testing.assert_array_equal(sd["k_norm.bias"], np.zeros(6))
        assert list(sd)[-1] == "sinks"
        gemma = MHA(8, 4, head_dim=6, seed=0, normalize_qk=True, qk_norm="rms",
                    qk_norm_offset=1.0, qk_norm_per_head=True).state_dict()
        np.testing.assert_array_equal(gemma["q_norm.weight"], np.zeros((4, 6)))  # 1 + 0
        # Initialised sinks of zero still take weight: exp(0) joins every row.
        x = np.random.default_rng(0).standard_normal((1, 3, 8))
        _, w = layer(x, return_weights=True)
        assert np.all(w.sum(-1) < 1.0)

    @pytest.mark.parametrize("name", list(CONFIGS))
    def test_from_state_dict_and_from_weights_infer_the_sizes(self, rng, name):
        layer, sd, H, opts = _layer(rng, name)
        options = layer.config.options()
        plain = MHA.from_state_dict(sd, num_heads=H, **options)
        assert plain.config == layer.config
        assert plain.head_dim == opts.get("head_dim", CONFIGS[name][0] // H)
        E, Q = sd["out_proj.weight"].shape
        if "in_proj_weight" in sd:
            wq, wk, wv = np.split(sd["in_proj_weight"], 3)
        else:
            wq, wk, wv = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
        F = wk.shape[0]
        bq, bk, bv = np.split(sd["in_proj_bias"], [Q, Q + F])
        norm = {f"{w}_norm_{t}": sd[f"{w}_norm.{t}"] for w in "qk" for t in ("weight", "bias")
                if f"{w}_norm.{t}" in sd}
        built = MHA.from_weights(q_weight=wq, k_weight=wk, v_weight=wv, out_weight=sd["out_proj.weight"],
                                 q_bias=bq, k_bias=bk, v_bias=bv, out_bias=sd["out_proj.bias"],
                                 num_heads=H, sinks=sd.get("sinks"), **norm,
                                 **{k: v for k, v in options.items()})
        assert built.config == layer.config
        x, kv = _data(rng, name)
        args = (x,) if kv is None else (x, *kv)
        np.testing.assert_array_equal(built(*args), layer(*args))

    def test_torch_compatible_layers_are_unchanged(self, rng):
        """H * D == E: the packed in_proj_weight, torch's names and numbers,
        whether head_dim is given or not."""
        torch = pytest.importorskip("torch")
        a, b = MHA(8, 2, seed=3), MHA(8, 2, head_dim=4, seed=3)
        assert a.config == b.config and repr(a) == repr(b) and "head_dim" not in repr(a)
        assert list(a.state_dict()) == ["in_proj_weight", "in_proj_bias", "out_proj.weight",
                                        "out_proj.bias"]
        for n, w in a.state_dict().items():
            np.testing.assert_array_equal(w, b.state_dict()[n])
        m = torch.nn.MultiheadAttention(8, 2, batch_first=True).double()
        with torch.no_grad():
            m.in_proj_bias.normal_()
            m.out_proj.bias.normal_()
        ported = MHA.from_torch(m)
        assert ported.head_dim == 4 and sorted(ported.state_dict()) == sorted(m.state_dict())
        x = rng.standard_normal((2, 5, 8))
        ref, _ = m(torch.tensor(x), torch.tensor(x), torch.tensor(x), need_weights=False)
        assert rel_err(ported(x), ref.detach().numpy()) < 1e-13
        # And a torch module loads the state dict of head_dim=E//H unchanged.
        m.load_state_dict({n: torch.tensor(w) for n, w in b.state_dict().items()})

    @pytest.mark.parametrize(
        ("kwargs", "exc", "match"),
        [
            (dict(head_dim=0), ValueError, "head_dim must be a positive int, got 0"),
            (dict(head_dim="3"), TypeError, "head_dim must be a positive int, got str"),
            (dict(head_dim=2.0), TypeError, "head_dim must be a positive int, got float"),
            (dict(head_dim=5, rotary=True), ValueError, "rotary=True needs an even head_dim"),
            (dict(scale=0.0), ValueError, "scale must be a positive finite number, got 0.0"),
            (dict(scale=-1.0), ValueError, "scale must be a positive finite number, got -1.0"),
            (dict(scale=float("inf")), ValueError, "scale must be a positive finite number"),
            (dict(scale="a"), TypeError, "scale must be a positive finite Python float or None"),
            (dict(scale=True), TypeError, "scale must be a positive finite Python float or None"),
            (dict(sinks="yes"), TypeError, "sinks must be a Python bool, got str"),
        ],
    )
    def test_errors(self, kwargs, exc, match):
        with pytest.raises(exc, match=match):
            MHA(8, 4, **kwargs)

    def test_not_divisible_asks_for_head_dim(self):
        with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads "
                                             r"\(4\), or pass head_dim="):
            MHA(10, 4)
        assert MHA(10, 4, head_dim=3, seed=0).state_dict()["q_proj_weight"].shape == (12, 10)

    def test_state_dict_errors(self):
        sd = dict(MHA(8, 4, num_kv_heads=2, head_dim=3, sinks=True, seed=0).state_dict())
        for name, shape, match in (
                ("sinks", (2,), r"sinks must have shape \(4,\).* got \(2,\)"),
                ("q_proj_weight", (10, 8), r"q_proj_weight must have shape \(12, 8\).* got \(10, 8\)"),
                ("k_proj_weight", (5, 8), r"k_proj_weight must have shape \(num_kv_heads \* head_dim"),
                ("in_proj_bias", (20,), r"in_proj_bias must have shape \(24,\).* got \(20,\)"),
                ("out_proj.weight", (8, 10), r"out_proj.weight.*num_heads")):
            bad = dict(sd, **{name: np.zeros(shape)})
            with pytest.raises(ValueError, match=match):
                MHA.from_state_dict(bad, num_heads=4)
        W = dict(q_weight=np.zeros((12, 8)), k_weight=np.zeros((6, 8)), v_weight=np.zeros((6, 8)),
                 out_weight=np.zeros((8, 12)))
        for name, shape, match in (
                ("q_weight", (10, 8), r"q_weight must have 12 rows"),
                ("k_weight", (5, 8), r"k_weight must have 12 rows .*num_kv_heads \* head_dim rows"),
                ("v_weight", (4, 8), r"v_weight must have 6 rows")):
            with pytest.raises(ValueError, match=match):
                MHA.from_weights(**dict(W, **{name: np.zeros(shape)}), num_heads=4)


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_reference(backend, dtype, rng, name):
    layer, sd, H, opts = _layer(rng, name)
    x, kv = _data(rng, name)
    B, L = x.shape[:2]
    S = L if kv is None else kv[0].shape[1]
    pad, mask = _masks(rng, B, L, S)
    ref, ref_w = ref_layer(sd, H, opts, x, kv, is_causal=True, key_padding_mask=pad, mask=mask)
    lb = _on(layer, backend, dtype)
    args = [backend.asarray(x, dtype)] + ([] if kv is None else [backend.asarray(t, dtype) for t in kv])
    y, w = lb(*args, is_causal=True, key_padding_mask=backend.asarray(pad),
              mask=backend.asarray(mask), return_weights=True, average_weights=False)
    assert_preserved(backend, y, dtype, ref.shape)
    assert_preserved(backend, w, dtype, ref_w.shape)
    assert_close(backend.to_numpy(y), ref, dtype)
    assert_close(backend.to_numpy(w), ref_w, dtype)
    if "sinks" in sd:  # the weights over the keys: rows short of 1 by the sink's share
        assert np.all(backend.to_numpy(w).sum(-1) < 1.0)
    # The chunked path computes the same.
    yc = lb(*args, is_causal=True, key_padding_mask=backend.asarray(pad),
            mask=backend.asarray(mask), chunk_size=(2, 3))
    assert_close(backend.to_numpy(yc), ref, dtype)


def test_reference_matches_support_reference(rng):
    """For torch-compatible layers the reference is support.reference.ref_mha."""
    from support.reference import ref_mha

    layer = MHA(8, 2, seed=0)
    sd = {n: np.array(w) for n, w in layer.state_dict().items()}
    sd["in_proj_bias"] = rng.standard_normal(24)
    x = rng.standard_normal((2, 4, 8))
    ours, ours_w = ref_layer(sd, 2, {}, x, is_causal=True)
    theirs, theirs_w = ref_mha(sd, 2, x, is_causal=True)
    assert rel_err(ours, theirs) < 1e-14 and rel_err(ours_w, theirs_w) < 1e-14


class TestScale:
    def test_default_is_one_over_sqrt_head_dim(self, rng):
        layer, sd, H, opts = _layer(rng, "wide")  # head_dim 6, E // H = 4
        x = rng.standard_normal((2, 5, 8))
        explicit = MHA.from_state_dict(sd, num_heads=H, scale=1 / math.sqrt(6))
        np.testing.assert_array_equal(layer(x), explicit(x))
        other = MHA.from_state_dict(sd, num_heads=H, scale=1 / math.sqrt(4))
        assert rel_err(other(x), layer(x)) > 1e-3
        assert layer.config.scale is None and explicit.config.scale == 1 / math.sqrt(6)

    @pytest.mark.parametrize("scale", [1.0, 0.05, 3.0])
    def test_against_reference(self, backend, dtype, rng, scale):
        layer, sd, H, opts = _layer(rng, "rms_shared_scale", scale=scale)
        x = rng.standard_normal((2, 5, 8))
        ref, _ = ref_layer(sd, H, opts, x, is_causal=True)
        y = _on(layer, backend, dtype)(backend.asarray(x, dtype), is_causal=True)
        assert_close(backend.to_numpy(y), ref, dtype)


# ---------------------------------------------------------------- gradients


def _fd_grads(sd, H, opts, x, kv, go, kw, eps=1e-6):
    """Central differences of the reference for every parameter and input."""
    arrays = dict(sd, query=x) | ({} if kv is None else {"key": kv[0], "value": kv[1]})

    def loss(a):
        k = None if kv is None else (a["key"], a["value"])
        return np.sum(ref_layer({n: a[n] for n in sd}, H, opts, a["query"], k, **kw)[0] * go)

    out = {}
    for name, arr in arrays.items():
        g = np.zeros_like(arr)
        flat, gflat = arr.reshape(-1), g.reshape(-1)
        for i in range(flat.size):
            keep = flat[i]
            flat[i] = keep + eps
            up = loss(arrays)
            flat[i] = keep - eps
            down = loss(arrays)
            flat[i] = keep
            gflat[i] = (up - down) / (2 * eps)
        out[name] = g
    return out


def _grad_err(g, ref):
    """Relative error, against 1 for a small gradient (the key projection's
    bias, and a LayerNorm's key bias, have none without sinks: both sides are
    rounding)."""
    g, ref = np.asarray(g, np.float64), np.asarray(ref, np.float64)
    assert g.shape == ref.shape and np.all(np.isfinite(g))
    return float(np.linalg.norm(g - ref) / max(np.linalg.norm(ref), 1.0))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vjp_against_finite_differences(rng, name):
    """float64 NumPy: every parameter's gradient and the inputs'."""
    layer, sd, H, opts = _layer(rng, name)
    x, kv = _data(rng, name, B=2, L=3, S=4)
    B, L = x.shape[:2]
    S = L if kv is None else kv[0].shape[1]
    pad, _ = _masks(rng, B, L, S)
    kw = dict(is_causal=True, key_padding_mask=pad)
    args = (x,) if kv is None else (x, *kv)
    y, backward = layer.vjp(*args, **kw)
    go = rng.standard_normal(y.shape)
    fd = _fd_grads(sd, H, opts, x, kv, go, kw)
    grads = backward(go)
    assert sorted(grads) == sorted(fd)
    for n, g in fd.items():
        assert _grad_err(grads[n], g) < 1e-7, n


@pytest.mark.parametrize("name", ["gqa_rotary", "layer_bias_sinks", "everything",
                                  "per_head_layer_bias", "cross"])
def test_vjp_against_torch_autograd(rng, name):
    """Autograd through the layer's own forward on torch tensors, float64,
    equals vjp's backward for every parameter (and with dropout: the same
    keep-mask from the same seed)."""
    torch = pytest.importorskip("torch")
    layer, sd, H, opts = _layer(rng, name, dropout=0.25)
    params = {n: torch.tensor(w, requires_grad=True) for n, w in sd.items()}
    tl = MHA.from_state_dict(params, num_heads=H, **layer.config.options())
    x, kv = _data(rng, name)
    inputs = [torch.tensor(t, requires_grad=True) for t in ((x,) if kv is None else (x, *kv))]
    kw = dict(is_causal=True, training=True, dropout_seed=5)
    y = tl(*inputs, **kw)
    go = torch.tensor(rng.standard_normal(tuple(y.shape)))
    (y * go).sum().backward()
    _, backward = tl.vjp(*(t.detach() for t in inputs), **kw)
    grads = backward(go)
    expected = {n: t.grad for n, t in params.items()}
    expected |= dict(zip(("query", "key", "value"), (t.grad for t in inputs)))
    assert sorted(grads) == sorted(expected)
    for n, g in expected.items():
        assert _grad_err(grads[n].detach().numpy(), g.numpy()) < 1e-12, n


@pytest.mark.parametrize("name", ["gqa_odd", "cross", "layer_bias_sinks", "everything"])
def test_vjp_on_backends(backend, dtype, rng, name):
    """Every backend's gradients equal NumPy float64's (which the finite
    differences above check)."""
    layer, sd, H, opts = _layer(rng, name)
    x, kv = _data(rng, name)
    args = (x,) if kv is None else (x, *kv)
    y64, back64 = layer.vjp(*args, is_causal=True)
    go = rng.standard_normal(y64.shape)
    expected = back64(go)
    lb = _on(layer, backend, dtype)
    y, backward = lb.vjp(*(backend.asarray(t, dtype) for t in args), is_causal=True)
    assert_close(backend.to_numpy(y), y64, dtype)
    grads = backward(backend.asarray(go, dtype))
    assert sorted(grads) == sorted(expected)
    for n, g in expected.items():
        assert_preserved(backend, grads[n], dtype, g.shape)
        assert _grad_err(backend.to_numpy(grads[n]), g) <= GRAD_TOL[dtype], n


# -------------------------------------------------------------------- cache


@pytest.mark.parametrize("name", ["gqa_rotary", "layer_bias_sinks", "sinks_gqa", "everything"])
def test_cache_decoding_equals_full_causal(backend, dtype, rng, name):
    layer, sd, H, opts = _layer(rng, name)
    lb = _on(layer, backend, dtype)
    x = rng.standard_normal((2, 7, 8))
    xb = backend.asarray(x, dtype)
    full = backend.to_numpy(lb(xb, is_causal=True))
    ref, _ = ref_layer(sd, H, opts, x, is_causal=True)
    assert_close(full, ref, dtype)
    cache = lb.init_cache(batch_size=2, max_length=8)
    outs = []
    for a, b in ((0, 3), (3, 4), (4, 5), (5, 7)):  # prefill, two steps, a chunk of two
        y, cache = lb(xb[:, a:b, :], cache=cache, is_causal=True)
        outs.append(backend.to_numpy(y))
    assert_close(np.concatenate(outs, axis=1), ref, dtype)
    assert tuple(cache.key.shape) == (2, layer.num_kv_heads, 8, layer.head_dim)


# ---------------------------------------------------------------- save/load


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("name", ["everything", "layer_bias_sinks", "per_head_layer_bias",
                                  "cross", "rms_shared_scale"])
def test_save_load_round_trip(tmp_path, rng, name, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    layer, sd, H, opts = _layer(rng, name)
    path = tmp_path / f"layer{suffix}"
    mha_xp.save_weights(layer, path)
    back = mha_xp.load_weights(path)
    assert back.config == layer.config and repr(back) == repr(layer)
    for n, w in layer.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[n], w)
    assert mha_xp.load_weights(path, num_heads=H).config == layer.config
    x, kv = _data(rng, name)
    args = (x,) if kv is None else (x, *kv)
    np.testing.assert_array_equal(back(*args, is_causal=True), layer(*args, is_causal=True))
    for key in ("head_dim", "scale", "qk_norm", "qk_norm_eps", "qk_norm_offset", "sinks"):
        assert getattr(back.config, key) == getattr(layer.config, key), key


# The flags that shape the QK norm's parameters need normalize_qk=True: alone
# they would be stored in a file whose weights disagree with them.
@pytest.mark.parametrize("flag", ["qk_norm_bias", "qk_norm_per_head"])
def test_norm_flags_need_normalize_qk(flag):
    with pytest.raises(ValueError, match=f"{flag}=True shapes the QK normalisation's "
                                         f"parameters: it needs normalize_qk=True"):
        MHA(8, 2, seed=0, **{flag: True})


# ---------------------------------------------------------------- QK norm


class TestQKNormOptions:
    @pytest.mark.parametrize(
        ("kwargs", "exc", "match"),
        [
            (dict(qk_norm="foo"), ValueError,
             r"qk_norm must be 'rms' .* or 'layer' .*, got 'foo'"),
            (dict(qk_norm="RMS"), ValueError, r"qk_norm must be 'rms'"),
            (dict(qk_norm="rms", qk_norm_bias=True), ValueError,
             r"qk_norm_bias=True is for qk_norm='layer' \(a LayerNorm\)"),
            (dict(qk_norm_eps=-1e-6), ValueError,
             "qk_norm_eps must be a non-negative finite number, got -1e-06"),
            (dict(qk_norm_eps=float("nan")), ValueError, "qk_norm_eps must be a non-negative"),
            (dict(qk_norm_eps="1e-6"), TypeError, "qk_norm_eps must be a Python float, got str"),
            (dict(qk_norm_offset=float("inf")), ValueError, "qk_norm_offset must be a finite number"),
            (dict(qk_norm_offset=None), TypeError, "qk_norm_offset must be a Python float"),
            (dict(qk_norm_bias="yes"), TypeError, "qk_norm_bias must be a Python bool"),
            (dict(qk_norm_per_head="yes"), TypeError, "qk_norm_per_head must be a Python bool"),
        ],
    )
    def test_errors(self, kwargs, exc, match):
        with pytest.raises(exc, match=match):
            MHA(8, 2, normalize_qk=True, **kwargs)

    def test_options_change_the_output(self, rng):
        """Each option reaches the computation (a silently ignored one fails here)."""
        x = rng.standard_normal((2, 5, 8))
        base = dict(head_dim=4, normalize_qk=True, seed=0)
        outs = {key: MHA(8, 2, **base, **opts)(x) for key, opts in {
            "layer": {}, "rms": dict(qk_norm="rms"), "eps": dict(qk_norm_eps=0.5),
            "offset": dict(qk_norm="rms", qk_norm_offset=1.0)}.items()}
        assert rel_err(outs["layer"], outs["rms"]) > 1e-3
        assert rel_err(outs["layer"], outs["eps"]) > 1e-3
        # offset 1 with weights initialised to 0 is the same as weights of 1.
        np.testing.assert_allclose(outs["offset"], outs["rms"], rtol=1e-13, atol=1e-15)

    def test_qk_norm_equals_public_function(self, rng):
        """The layer's queries and keys pass mha_xp.qk_norm with its options:
        the layer equals a pipeline of public functions."""
        layer, sd, H, opts = _layer(rng, "everything")
        x = rng.standard_normal((2, 5, 8))
        E, D = 8, 6
        q = (x @ sd["q_proj_weight"].T + sd["in_proj_bias"][:24]).reshape(2, 5, 4, D).transpose(0, 2, 1, 3)
        k = (x @ sd["k_proj_weight"].T + sd["in_proj_bias"][24:36]).reshape(2, 5, 2, D).transpose(0, 2, 1, 3)
        v = (x @ sd["v_proj_weight"].T + sd["in_proj_bias"][36:]).reshape(2, 5, 2, D).transpose(0, 2, 1, 3)
        kw = dict(kind="rms", eps=1e-6, offset=1.0)
        q, k = mha_xp.qk_norm(q, sd["q_norm.weight"], **kw), mha_xp.qk_norm(k, sd["k_norm.weight"], **kw)
        inv, af = mha_xp.rope_frequencies(D, 100.0, scaling={"rope_type": "linear", "factor": 2.0})
        q, k = (mha_xp.apply_rotary(t, np.arange(5), inv_freq=inv, attention_factor=af)
                for t in (q, k))
        o = mha_xp.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3,
                                                sinks=sd["sinks"])
        ref = o.transpose(0, 2, 1, 3).reshape(2, 5, 24) @ sd["out_proj.weight"].T + sd["out_proj.bias"]
        assert rel_err(layer(x, is_causal=True), ref) < 1e-13

    def test_float16(self, backend_f16, rng):
        layer, sd, H, opts = _layer(rng, "everything")
        x = rng.standard_normal((2, 5, 8))
        lh = _on(layer, backend_f16, "float16")
        sd16 = {n: np.asarray(w, np.float16) for n, w in sd.items()}
        ref, _ = ref_layer(sd16, H, opts, x.astype(np.float16), is_causal=True)
        y = lh(backend_f16.asarray(x, "float16"), is_causal=True)
        assert_preserved(backend_f16, y, "float16", ref.shape)
        # Each projection rounds to float16: a few roundings more than attention's.
        assert rel_err(backend_f16.to_numpy(y), ref) <= 5 * REL_TOL["float16"]
