"""The public building blocks of QK normalisation and RoPE:
``mha_xp.qk_norm``/``mha_xp.qk_norm_vjp`` (RMSNorm and LayerNorm, weights
shared or per head, bias, offset, eps), ``mha_xp.rope_frequencies`` (the
scaling schemes) and ``mha_xp.apply_rotary`` with float positions, a caller's
``inv_freq`` and an ``attention_factor``; on every backend against float64
references written from the definitions, and the layer's ``rope_scaling``
against the same pipeline written with these public functions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mha_xp
from support import REL_TOL, assert_close, assert_preserved, rel_err

# ----------------------------------------------------------------- qk_norm


def _full(p, x):
    """A parameter ``(D,)`` or ``(H, D)`` broadcast to ``x (..., H, L, D)``."""
    p = np.asarray(p, dtype=np.float64)
    return np.broadcast_to(p[:, None, :] if p.ndim == 2 else p, x.shape)


def ref_qk_norm(x, weight=None, bias=None, *, kind="rms", eps=1e-6, offset=0.0):
    """float64 from the definitions: ``x / sqrt(mean(x²) + eps)`` (rms) or
    ``(x − mean) / sqrt(var + eps)`` (layer), times ``offset + weight``, plus ``bias``."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=-1, keepdims=True) if kind == "layer" else x
    y = xc / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * (_full(weight, x) + offset)
    if bias is not None:
        y = y + _full(bias, x)
    return y


def _sum_to(t, p):
    if np.ndim(p) == 2:
        return t.sum(axis=tuple(a for a in range(t.ndim) if a not in (t.ndim - 3, t.ndim - 1)))
    return t.sum(axis=tuple(range(t.ndim - 1)))


def ref_qk_norm_grads(g, x, weight=None, bias=None, *, kind="rms", eps=1e-6, offset=0.0):
    """float64 gradients through each row's explicit Jacobian:
    ``w_i (δ_ij − [1/D] − x̂_i x̂_j / D) / σ`` (the ``1/D`` for layer only)."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    D = x.shape[-1]
    w = np.ones(x.shape) if weight is None else _full(weight, x) + offset
    dx, xhat_all = np.empty_like(x), np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx] - (x[idx].mean() if kind == "layer" else 0.0)
        sigma = np.sqrt((row * row).mean() + eps)
        xhat = row / sigma
        J = np.eye(D) - np.outer(xhat, xhat) / D - (1.0 / D if kind == "layer" else 0.0)
        dx[idx] = (w[idx][:, None] * J / sigma).T @ g[idx]
        xhat_all[idx] = xhat
    return {"x": dx,
            **({} if weight is None else {"weight": _sum_to(g * xhat_all, weight)}),
            **({} if bias is None else {"bias": _sum_to(g, bias)})}


# name: (kind, weight shape, bias, offset, eps) on x (B, H, L, D) = (2, 3, 4, 8)
NORMS = {
    "rms_plain": ("rms", None, False, 0.0, 1e-6),
    "rms_shared": ("rms", (8,), False, 0.0, 1e-6),
    "rms_gemma": ("rms", (8,), False, 1.0, 1e-6),
    "rms_per_head_eps": ("rms", (3, 8), False, 0.0, 1e-2),
    "layer_plain": ("layer", None, False, 0.0, 1e-5),
    "layer_phi": ("layer", (8,), True, 0.0, 1e-5),
    "layer_per_head_bias_offset": ("layer", (3, 8), True, 1.0, 0.1),
}


def _norm_case(rng, name, shape=(2, 3, 4, 8)):
    kind, wshape, has_bias, offset, eps = NORMS[name]
    if wshape is not None:  # the sizes of x: (D,) or (H, D)
        wshape = shape[-1:] if len(wshape) == 1 else (shape[-3], shape[-1])
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, shape[:-1] + (1,)) + 0.7
    w = None if wshape is None else 0.3 * rng.standard_normal(wshape) + (1.0 - offset)
    b = 0.2 * rng.standard_normal(wshape) if has_bias else None
    return x, w, b, dict(kind=kind, eps=eps, offset=offset)


def test_reference_jacobians_match_finite_differences(rng):
    x, w, b, opts = _norm_case(rng, "layer_per_head_bias_offset", (1, 3, 2, 5))
    g = rng.standard_normal(x.shape)
    for kind in ("rms", "layer"):
        bb = b if kind == "layer" else None
        ref = ref_qk_norm_grads(g, x, w, bb, kind=kind, eps=opts["eps"], offset=opts["offset"])
        args = {"x": x, "weight": w} | ({} if bb is None else {"bias": bb})
        h = 1e-6
        for name, a in args.items():
            num = np.zeros_like(a)
            for idx in np.ndindex(*a.shape):
                up, down = {n: v.copy() for n, v in args.items()}, {n: v.copy() for n, v in args.items()}
                up[name][idx] += h
                down[name][idx] -= h
                f = [np.sum(g * ref_qk_norm(d["x"], d["weight"], d.get("bias"), kind=kind,
                                            eps=opts["eps"], offset=opts["offset"]))
                     for d in (up, down)]
                num[idx] = (f[0] - f[1]) / (2 * h)
            np.testing.assert_allclose(ref[name], num, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("name", list(NORMS))
def test_qk_norm_forward_and_vjp(backend, dtype, rng, name):
    x, w, b, opts = _norm_case(rng, name)
    g = rng.standard_normal(x.shape)
    xb, wb, bb = (None if t is None else backend.asarray(t, dtype) for t in (x, w, b))
    ref = ref_qk_norm(x, w, b, **opts)
    y = mha_xp.qk_norm(xb, wb, bb, **opts)
    assert_preserved(backend, y, dtype, x.shape)
    assert_close(backend.to_numpy(y), ref, dtype)
    y2, backward = mha_xp.qk_norm_vjp(xb, wb, bb, **opts)
    assert_close(backend.to_numpy(y2), ref, dtype)
    grads = backward(backend.asarray(g, dtype))
    expected = ref_qk_norm_grads(g, x, w, b, **opts)
    assert sorted(grads) == sorted(expected)
    for n, e in expected.items():
        assert_preserved(backend, grads[n], dtype, e.shape)
        # dx cancels terms of size |g|/σ: a few more ulps than the forward.
        assert rel_err(backend.to_numpy(grads[n]), e) <= 10 * REL_TOL[dtype], n


@pytest.mark.parametrize("name", ["rms_gemma", "layer_per_head_bias_offset"])
def test_qk_norm_float16(backend_f16, rng, name):
    x, w, b, opts = _norm_case(rng, name)
    x, w = x.astype(np.float16), w.astype(np.float16)
    b = None if b is None else b.astype(np.float16)
    g = rng.standard_normal(x.shape).astype(np.float16)
    bk = backend_f16
    args = [None if t is None else bk.asarray(t, "float16") for t in (x, w, b)]
    y, backward = mha_xp.qk_norm_vjp(*args, **opts)
    assert_preserved(bk, y, "float16", x.shape)
    assert_close(bk.to_numpy(y), ref_qk_norm(x, w, b, **opts), "float16")
    grads = backward(bk.asarray(g, "float16"))
    for n, e in ref_qk_norm_grads(g, x, w, b, **opts).items():
        assert_preserved(bk, grads[n], "float16", e.shape)
        assert rel_err(bk.to_numpy(grads[n]), e) <= 2 * REL_TOL["float16"], n


def test_qk_norm_autograd_through_forward(rng):
    """torch autograd through qk_norm itself equals qk_norm_vjp's backward."""
    torch = pytest.importorskip("torch")
    for name in ("rms_per_head_eps", "layer_per_head_bias_offset"):
        x, w, b, opts = _norm_case(rng, name)
        g = torch.tensor(rng.standard_normal(x.shape))
        ts = {n: torch.tensor(a, requires_grad=True) for n, a in
              (("x", x), ("weight", w), ("bias", b)) if a is not None}
        (mha_xp.qk_norm(ts["x"], ts["weight"], ts.get("bias"), **opts) * g).sum().backward()
        _, backward = mha_xp.qk_norm_vjp(*(None if t is None else t.detach() for t in
                                           (ts["x"], ts["weight"], ts.get("bias"))), **opts)
        grads = backward(g)
        assert sorted(grads) == sorted(ts)
        for n, t in ts.items():
            assert rel_err(grads[n].numpy(), t.grad.numpy()) <= 1e-13, (name, n)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(kind="foo"), ValueError, "kind must be 'rms' .* or 'layer' .*, got 'foo'"),
        (dict(kind=None), ValueError, "kind must be 'rms'"),
        (dict(bias=np.zeros(8)), ValueError, "bias is for kind='layer'"),
        (dict(eps=-1e-6), ValueError, "eps must be a non-negative finite number, got -1e-06"),
        (dict(eps="x"), TypeError, "eps must be a Python float, got str"),
        (dict(offset=1.0), ValueError, "offset=1.0 applies to a weight"),
        (dict(weight=np.ones(8), offset=float("nan")), ValueError, "offset must be a finite number"),
        (dict(weight=np.ones(8), offset="1"), TypeError, "offset must be a Python float, got str"),
        (dict(weight=np.ones((2, 8))), ValueError, r"\(H, D\) = \(3, 8\) per head.*got \(2, 8\)"),
        (dict(weight=np.ones(8, dtype=np.float32)), TypeError, "weight has dtype float32 but x is float64"),
        (dict(weight=np.ones(8, dtype=np.int64)), TypeError, "weight must have a real floating dtype"),
    ],
)
def test_qk_norm_errors(kwargs, exc, match):
    args = dict(x=np.ones((2, 3, 4, 8))) | kwargs
    with pytest.raises(exc, match=match):
        mha_xp.qk_norm(**args)
    with pytest.raises(exc, match=match):
        mha_xp.qk_norm_vjp(**args)


# ------------------------------------------------------- rope_frequencies


def _hf_default(dim, base):
    return 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def ref_rope_frequencies(dim, base, scaling=None, seq_len=None, max_pos=None):
    """float64 inverse frequencies and attention factor, written from the
    schemes' definitions (Hugging Face's ``_compute_*_parameters``)."""
    if scaling is None:
        return _hf_default(dim, base), 1.0
    t = scaling["rope_type"]
    f = scaling.get("factor")
    if t == "linear":
        return _hf_default(dim, base) / f, 1.0
    if t == "dynamic":
        seq = max_pos if seq_len is None else max(seq_len, max_pos)
        new_base = base * ((f * seq / max_pos) - (f - 1)) ** (dim / (dim - 2))
        return _hf_default(dim, new_base), 1.0
    if t == "llama3":
        inv = _hf_default(dim, base)
        old = scaling["original_max_position_embeddings"]
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * np.pi / inv
        out = np.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, (1 - smooth) * out / f + smooth * out, out), 1.0
    if t == "yarn":
        old = scaling["original_max_position_embeddings"]
        fast, slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

        def corr(rot):
            return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = max(math.floor(corr(fast)), 0), min(math.ceil(corr(slow)), dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = np.clip((np.arange(dim // 2) - lo) / (hi - lo), 0.0, 1.0)
        extrap = 1 - ramp
        pos_freqs = base ** (np.arange(0, dim, 2) / dim)
        inv = (1.0 / (f * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
        af = scaling.get("attention_factor") or 0.1 * math.log(f) + 1.0
        return inv, af
    if t == "longrope":
        old = scaling["original_max_position_embeddings"]
        f = f if f is not None else max_pos / old
        ext = np.asarray(scaling["long_factor"] if seq_len is not None and seq_len > old
                         else scaling["short_factor"], dtype=np.float64)
        af = 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(old))
        return 1.0 / (ext * base ** (np.arange(0, dim, 2) / dim)), af
    raise AssertionError(t)


DIM = 8
SCALINGS = {
    "default": (None, {}),
    "linear": ({"rope_type": "linear", "factor": 2.0}, {}),
    "dynamic_short": ({"rope_type": "dynamic", "factor": 3.0}, dict(seq_len=4, max_pos=16)),
    "dynamic_long": ({"rope_type": "dynamic", "factor": 3.0}, dict(seq_len=40, max_pos=16)),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, {}),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, {}),
    "yarn_af": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                 "attention_factor": 1.3, "beta_fast": 16, "beta_slow": 2}, {}),
    "longrope_short": ({"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                        "long_factor": [2.0, 4.0, 6.0, 9.0],
                        "original_max_position_embeddings": 8},
                       dict(seq_len=6, max_pos=32)),
    "longrope_long": ({"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                       "long_factor": [2.0, 4.0, 6.0, 9.0],
                       "original_max_position_embeddings": 8},
                      dict(seq_len=12, max_pos=32)),
}


@pytest.mark.parametrize("name", list(SCALINGS))
def test_rope_frequencies(backend, dtype, name):
    scaling, extra = SCALINGS[name]
    ref, ref_af = ref_rope_frequencies(DIM, 500.0, scaling, extra.get("seq_len"),
                                       extra.get("max_pos"))
    inv, af = mha_xp.rope_frequencies(
        DIM, 500.0, scaling=scaling, seq_len=extra.get("seq_len"),
        max_position_embeddings=extra.get("max_pos"), xp=backend.xp, device=backend.device,
        dtype=backend.dtype(dtype))
    assert_preserved(backend, inv, dtype, (DIM // 2,))
    assert isinstance(af, float)
    assert af == pytest.approx(ref_af, rel=1e-15)
    assert_close(backend.to_numpy(inv), ref, dtype)
    # Rounded once from float64.
    inv64, _ = mha_xp.rope_frequencies(DIM, 500.0, scaling=scaling, seq_len=extra.get("seq_len"),
                                       max_position_embeddings=extra.get("max_pos"))
    assert inv64.dtype == np.float64
    np.testing.assert_array_equal(backend.to_numpy(inv), inv64.astype(dtype))


def test_rope_frequencies_defaults_and_theta():
    inv, af = mha_xp.rope_frequencies(8)
    np.testing.assert_allclose(inv, _hf_default(8, 10000.0), rtol=1e-15)
    assert af == 1.0 and inv.dtype == np.float64
    a, _ = mha_xp.rope_frequencies(8, scaling={"rope_type": "linear", "factor": 2.0,
                                               "rope_theta": 50.0})
    np.testing.assert_allclose(a, _hf_default(8, 50.0) / 2, rtol=1e-15)
    # The old key name "type", and a scheme's name alone.
    b, _ = mha_xp.rope_frequencies(8, 50.0, scaling={"type": "linear", "factor": 2.0})
    np.testing.assert_array_equal(a, b)
    c, _ = mha_xp.rope_frequencies(8, 50.0, scaling="default")
    np.testing.assert_array_equal(c, mha_xp.rope_frequencies(8, 50.0)[0])
    # yarn and longrope fill their factor from max_position_embeddings.
    y1, af1 = mha_xp.rope_frequencies(8, scaling={"rope_type": "yarn",
                                                   "original_max_position_embeddings": 16},
                                      max_position_embeddings=64)
    y2, af2 = mha_xp.rope_frequencies(8, scaling={"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 16})
    np.testing.assert_array_equal(y1, y2)
    assert af1 == af2 == pytest.approx(0.1 * math.log(4.0) + 1.0)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((7,), {}, ValueError, "dim .* must be a positive even int, got 7"),
        ((True,), {}, TypeError, "dim must be a positive even int, got bool"),
        ((8, -1.0), {}, ValueError, "base must be a positive finite number"),
        ((8,), dict(scaling={"rope_type": "foo"}), ValueError, "scaling\\['rope_type'\\] must be one of"),
        ((8, 5.0), dict(scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 6.0}),
         ValueError, "base=5.0 differs from scaling\\['rope_theta'\\]=6.0"),
        ((8,), dict(scaling={"rope_type": "dynamic", "factor": 2.0}), ValueError,
         "needs max_position_embeddings="),
        ((8,), dict(scaling={"rope_type": "linear", "factor": 2.0, "facter": 1}), ValueError,
         "unknown keys \\['facter'\\]"),
        ((8,), dict(scaling={"rope_type": "linear"}), ValueError, "missing: \\['factor'\\]"),
        ((8,), dict(scaling={"rope_type": "linear", "factor": 0.5}), ValueError,
         "factor.* must be a finite number >= 1"),
        ((8,), dict(seq_len=0), ValueError, "seq_len must be a positive int, got 0"),
        ((8,), dict(dtype=np.int32), TypeError, "dtype must be a real floating dtype of numpy"),
        ((8,), dict(scaling=3), TypeError, "scaling must be None, a rope_type name or a dict"),
    ],
)
def test_rope_frequencies_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mha_xp.rope_frequencies(*args, **kwargs)


# ------------------------------------------------------------ apply_rotary


def ref_rotary(x, pos, inv_freq, af=1.0, *, interleaved=False, rotary_dim=None, inverse=False):
    """RoPE in float64 from the definition: pair ``p`` at position ``m``
    turns by ``m * inv_freq[p]`` (the opposite with ``inverse``), scaled by ``af``."""
    x = np.asarray(x, np.float64)
    rd = x.shape[-1] if rotary_dim is None else rotary_dim
    pos = np.broadcast_to(np.asarray(pos, np.float64), x.shape[:-1])
    ang = pos[..., None] * np.asarray(inv_freq, np.float64)
    c, s = af * np.cos(ang), af * np.sin(ang) * (-1 if inverse else 1)
    out = x.copy()
    if interleaved:
        a, b = x[..., 0:rd:2], x[..., 1:rd:2]
        out[..., 0:rd:2], out[..., 1:rd:2] = a * c - b * s, b * c + a * s
    else:
        h = rd // 2
        a, b = x[..., :h], x[..., h:rd]
        out[..., :h], out[..., h:rd] = a * c - b * s, b * c + a * s
    return out


ROTARY = pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])


@ROTARY
@pytest.mark.parametrize("rotary_dim", [None, 4], ids=["full", "partial"])
def test_apply_rotary_float_positions_inv_freq_factor(backend, dtype, rng, interleaved, rotary_dim):
    """Fractional positions, one row per sequence; the caller's inv_freq and
    an attention factor; forward and inverse (the transpose, times the factor)."""
    x = rng.standard_normal((2, 3, 5, 8))
    pos = rng.uniform(0.0, 20.0, (2, 1, 5))
    rd = rotary_dim or 8
    inv = rng.uniform(0.01, 1.0, rd // 2)
    af = 0.7
    kw = dict(interleaved=interleaved, rotary_dim=rotary_dim)
    xb, pb = backend.asarray(x, dtype), backend.asarray(pos, dtype)
    ib = backend.asarray(inv, dtype)
    for inverse in (False, True):
        out = mha_xp.apply_rotary(xb, pb, inv_freq=ib, attention_factor=af, inverse=inverse, **kw)
        assert_preserved(backend, out, dtype, x.shape)
        ref = ref_rotary(x, pos, inv, af, inverse=inverse, **kw)
        assert_close(backend.to_numpy(out), ref, dtype)
    # float64 positions with float32 features (and the other way round) are allowed:
    # the angles are computed in the features' compute dtype.
    other = "float64" if dtype == "float32" else "float32"
    out = mha_xp.apply_rotary(xb, backend.asarray(pos, other), inv_freq=ib, attention_factor=af,
                              **kw)
    assert_close(backend.to_numpy(out), ref_rotary(x, pos.astype(other), inv, af, **kw), dtype)


def test_apply_rotary_inverse_is_transpose(rng):
    """<R x, y> = <x, R^T y> with R^T = apply_rotary(inverse=True), also with
    an attention factor a ≠ 1; inverse ∘ forward = a² (identity for a = 1)."""
    x, y = rng.standard_normal((2, 4, 6, 8)), rng.standard_normal((2, 4, 6, 8))
    pos = rng.uniform(-5.0, 30.0, (6,))
    inv, af = mha_xp.rope_frequencies(8, 100.0, scaling={"rope_type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 8})
    assert af != 1.0
    for interleaved in (False, True):
        kw = dict(inv_freq=inv, attention_factor=af, interleaved=interleaved)
        fx = mha_xp.apply_rotary(x, pos, **kw)
        ty = mha_xp.apply_rotary(y, pos, inverse=True, **kw)
        assert abs(np.sum(fx * y) - np.sum(x * ty)) <= 1e-12 * np.abs(x).sum()
        np.testing.assert_allclose(mha_xp.apply_rotary(fx, pos, inverse=True, **kw), af**2 * x,
                                   rtol=1e-12, atol=1e-13)
        plain = mha_xp.apply_rotary(mha_xp.apply_rotary(x, pos, inv_freq=inv), pos, inv_freq=inv,
                                    inverse=True)
        np.testing.assert_allclose(plain, x, rtol=1e-12, atol=1e-13)


def test_apply_rotary_inverse_is_the_vjp_with_factor(rng):
    """On torch, autograd through apply_rotary with an attention factor equals
    apply_rotary(grad, inverse=True) with the same options."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(rng.standard_normal((2, 3, 5, 8)), requires_grad=True)
    pos = torch.tensor(rng.uniform(0, 9, (5,)))
    inv = torch.tensor(rng.uniform(0.05, 1.0, 3))
    g = torch.tensor(rng.standard_normal((2, 3, 5, 8)))
    kw = dict(inv_freq=inv, attention_factor=1.25, rotary_dim=6, interleaved=True)
    (mha_xp.apply_rotary(x, pos, **kw) * g).sum().backward()
    back = mha_xp.apply_rotary(g, pos, inverse=True, **kw)
    assert rel_err(back.numpy(), x.grad.numpy()) <= 1e-14


def test_apply_rotary_default_inv_freq_is_base(backend, rng):
    """Without inv_freq, rope_frequencies(rotary_dim, base)'s; integer
    positions and their float equivalents give the same result."""
    x = rng.standard_normal((3, 7, 8))
    xb = backend.asarray(x, "float64")
    pos = backend.cxp.asarray(np.arange(7) + 3, device=backend.device)
    a = mha_xp.apply_rotary(xb, pos, base=500.0)
    inv, _ = mha_xp.rope_frequencies(8, 500.0, xp=backend.xp, device=backend.device)
    b = mha_xp.apply_rotary(xb, backend.asarray(np.arange(7.0) + 3, "float64"), inv_freq=inv)
    np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    assert_close(backend.to_numpy(a), ref_rotary(x, np.arange(7) + 3, _hf_default(8, 500.0)),
                 "float64")


def test_apply_rotary_float16(backend_f16, rng):
    x = rng.standard_normal((2, 5, 8)).astype(np.float16)
    pos = rng.uniform(0, 10, (5,))
    inv = rng.uniform(0.05, 1.0, 4)
    b = backend_f16
    out = mha_xp.apply_rotary(b.asarray(x, "float16"), b.asarray(pos, "float32"),
                              inv_freq=b.asarray(inv, "float32"), attention_factor=1.1)
    assert_preserved(b, out, "float16", x.shape)
    assert_close(b.to_numpy(out), ref_rotary(x, pos, inv, 1.1), "float16")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(base=500.0, inv_freq=np.ones(4)), ValueError, r"give base \(here 500.0\) or inv_freq, not both"),
        (dict(inv_freq=np.ones(3)), ValueError, r"inv_freq must have shape \(rotary_dim // 2,\) = \(4,\), got \(3,\)"),
        (dict(inv_freq=np.ones(4), rotary_dim=4), ValueError, r"= \(2,\), got \(4,\)"),
        (dict(inv_freq=np.ones((4, 1))), ValueError, r"got \(4, 1\)"),
        (dict(inv_freq=np.ones(4, dtype=np.int64)), TypeError, "inv_freq must have a real floating dtype"),
        (dict(attention_factor=0.0), ValueError, "attention_factor must be a positive finite number, got 0.0"),
        (dict(attention_factor=float("inf")), ValueError, "attention_factor must be a positive finite number"),
        (dict(attention_factor=True), TypeError, "attention_factor must be a positive Python float, got bool"),
        (dict(attention_factor="1"), TypeError, "attention_factor must be a positive Python float, got str"),
        (dict(positions=np.ones(4, dtype=bool)), TypeError, "positions must be an integer or real floating array"),
        (dict(positions=np.ones(3)), ValueError, "positions must broadcast to x's shape"),
    ],
)
def test_apply_rotary_errors(kwargs, exc, match):
    args = dict(positions=np.arange(4)) | kwargs
    with pytest.raises(exc, match=match):
        mha_xp.apply_rotary(np.ones((2, 4, 8)), **args)


def test_apply_rotary_mixed_libraries_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="inv_freq is a torch array but x is a numpy array"):
        mha_xp.apply_rotary(np.ones((2, 4, 8)), np.arange(4), inv_freq=torch.ones(4))


# ----------------------------------------------- the layer's rope_scaling


def _pipeline(sd, x, H, base, scaling, max_pos, *, interleaved=False, rotary_dim=None):
    """The rotary layer's causal self-attention written with the public
    functions: projections, heads, apply_rotary with rope_frequencies'
    output over the sequence's length, scaled_dot_product_attention, merge."""
    B, L, E = x.shape
    D = E // H
    wq, wk, wv = np.split(sd["in_proj_weight"], 3)
    bq, bk, bv = np.split(sd["in_proj_bias"], 3)

    def heads(w, b):
        return (x @ w.T + b).reshape(B, L, H, D).transpose(0, 2, 1, 3)

    q, k, v = heads(wq, bq), heads(wk, bk), heads(wv, bv)
    inv, af = mha_xp.rope_frequencies(rotary_dim or D, base, scaling=scaling, seq_len=L,
                                      max_position_embeddings=max_pos)
    kw = dict(inv_freq=inv, attention_factor=af, interleaved=interleaved, rotary_dim=rotary_dim)
    pos = np.arange(L)
    q, k = mha_xp.apply_rotary(q, pos, **kw), mha_xp.apply_rotary(k, pos, **kw)
    o = mha_xp.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(0, 2, 1, 3).reshape(B, L, E) @ sd["out_proj.weight"].T + sd["out_proj.bias"]


LAYER_SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 2.0}, None, {}),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 4, {}),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, None, {}),
    "yarn_partial_interleaved": ({"rope_type": "yarn", "factor": 4.0,
                                  "original_max_position_embeddings": 4}, None,
                                 dict(rotary_interleaved=True, rotary_dim=4)),
    "longrope_short": ({"rope_type": "longrope", "short_factor": [1.0, 2.0],
                        "long_factor": [3.0, 5.0], "original_max_position_embeddings": 16},
                       64, {}),
    "longrope_long": ({"rope_type": "longrope", "short_factor": [1.0, 2.0],
                       "long_factor": [3.0, 5.0], "original_max_position_embeddings": 4},
                      64, {}),
}


# LongRoPE's factors, like dynamic NTK's base, depend on the sequence's length:
# the layer recomputes them per call ("longrope_long" is past the original length).
@pytest.mark.parametrize("name", list(LAYER_SCALINGS))
def test_layer_rope_scaling_matches_public_pipeline(backend, dtype, rng, name):
    scaling, max_pos, extra = LAYER_SCALINGS[name]
    layer = mha_xp.MultiHeadAttention(8, 2, rotary=True, rotary_base=100.0, rope_scaling=scaling,
                                      max_position_embeddings=max_pos, seed=0, **extra)
    sd = {n: np.array(w) for n, w in layer.state_dict().items()}
    sd["in_proj_bias"] = rng.standard_normal(sd["in_proj_bias"].shape)
    sd["out_proj.bias"] = rng.standard_normal(sd["out_proj.bias"].shape)
    layer = mha_xp.MultiHeadAttention.from_state_dict(sd, num_heads=2, **layer.config.options())
    x = rng.standard_normal((2, 6, 8))
    ref = _pipeline(sd, x, 2, 100.0, scaling, max_pos,
                    interleaved=extra.get("rotary_interleaved", False),
                    rotary_dim=extra.get("rotary_dim"))
    # The scaling changes the result (the test would not see a scaling ignored).
    plain = _pipeline(sd, x, 2, 100.0, None, None,
                      interleaved=extra.get("rotary_interleaved", False),
                      rotary_dim=extra.get("rotary_dim"))
    assert rel_err(plain, ref) > 1e-3
    lb = layer.to(xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype))
    out = lb(backend.asarray(x, dtype), is_causal=True)
    assert_preserved(backend, out, dtype, x.shape)
    assert_close(backend.to_numpy(out), ref, dtype)
