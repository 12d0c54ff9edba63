"""QK normalisation as a LayerNorm (``mha_xp.qk_norm(..., kind="layer")``,
Flax's bias-free LayerNorm with epsilon 1e-6 that the layer's
``normalize_qk=True`` applies by default): forward and backward
(``mha_xp.qk_norm_vjp``) against a float64 reference, finite differences and
torch.nn.functional.layer_norm with autograd, on every backend.

(This file replaces the tests of the removed ``mha_xp._model._norm``.)
"""

from __future__ import annotations

import numpy as np
import pytest

import mha_xp
from support import REL_TOL, assert_close, assert_preserved, rel_err

EPS = 1e-6
KIND = "layer"


def _full(p, x):
    """A weight or bias ``(D,)`` or ``(H, D)`` broadcast to ``x (..., H, L, D)``."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 2:
        p = p[:, None, :]
    return np.broadcast_to(p, x.shape)


def ref_norm(x, weight=None, bias=None, eps=EPS, offset=0.0):
    """float64, one row at a time, from the definition
    ``(x - mean) / sqrt(var + eps) * (offset + weight) + bias``."""
    x = np.asarray(x, dtype=np.float64)
    w = np.ones(x.shape) if weight is None else _full(weight, x) + offset
    b = np.zeros(x.shape) if bias is None else _full(bias, x)
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        mu = sum(row) / len(row)
        var = sum((r - mu) ** 2 for r in row) / len(row)
        out[idx] = (row - mu) / np.sqrt(var + eps) * w[idx] + b[idx]
    return out


def _sum_to(t, p):
    """Sum a full-shape ``t`` to the parameter shape ``(D,)`` or ``(H, D)``."""
    if np.ndim(p) == 2:
        return t.sum(axis=tuple(a for a in range(t.ndim) if a not in (t.ndim - 3, t.ndim - 1)))
    return t.sum(axis=tuple(range(t.ndim - 1)))


def ref_backward(grad, x, weight=None, bias=None, eps=EPS, offset=0.0):
    """float64 gradients ``(dx, dweight, dbias)`` through the explicit
    Jacobian of each row: ``d y_i / d x_j = w_i (δ_ij − 1/D − x̂_i x̂_j / D) / σ``."""
    x, g = (np.asarray(t, dtype=np.float64) for t in (x, grad))
    D = x.shape[-1]
    w = np.ones(x.shape) if weight is None else _full(weight, x) + offset
    dx = np.empty_like(x)
    xhat_full = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        sigma = np.sqrt(row.var() + eps)
        xhat = (row - row.mean()) / sigma
        J = w[idx][:, None] * (np.eye(D) - 1.0 / D - np.outer(xhat, xhat) / D) / sigma
        dx[idx] = J.T @ g[idx]
        xhat_full[idx] = xhat
    dw = None if weight is None else _sum_to(g * xhat_full, weight)
    db = None if bias is None else _sum_to(g, bias)
    return dx, dw, db


def _inputs(rng, shape, weight_shape, with_bias=False):
    # An offset mean and unequal spreads per row, as real activations have.
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, size=shape[:-1] + (1,)) + 2.0
    weight = None if weight_shape is None else 1.0 + 0.3 * rng.standard_normal(weight_shape)
    bias = 0.2 * rng.standard_normal(weight_shape) if with_bias and weight_shape else None
    grad = rng.standard_normal(shape)
    return x, weight, bias, grad


# x is (B, H, L, D) = (2, 3, 5, 8): a weight shared by the heads or one per head.
WEIGHTS = pytest.mark.parametrize("weight_shape", [None, (8,), (3, 8)],
                                  ids=["no-weight", "weight-D", "weight-per-head"])


def test_reference_backward_matches_finite_differences():
    """The reference Jacobian is right (central differences, float64), with a
    weight, a bias and an offset."""
    rng = np.random.default_rng(1)
    x, w, b, grad = _inputs(rng, (2, 3, 2, 5), (3, 5), with_bias=True)
    dx, dw, db = ref_backward(grad, x, w, b, offset=0.5)
    h = 1e-6

    def f(x_, w_, b_):
        return np.sum(grad * ref_norm(x_, w_, b_, offset=0.5))

    for arr, ref in ((0, dx), (1, dw), (2, db)):
        args = [x, w, b]
        num = np.zeros_like(args[arr])
        for idx in np.ndindex(*num.shape):
            up, down = [a.copy() for a in args], [a.copy() for a in args]
            up[arr][idx] += h
            down[arr][idx] -= h
            num[idx] = (f(*up) - f(*down)) / (2 * h)
        np.testing.assert_allclose(ref, num, rtol=1e-6, atol=1e-8)


@WEIGHTS
def test_forward_matches_reference(backend, dtype, rng, weight_shape):
    x, w, _, _ = _inputs(rng, (2, 3, 5, 8), weight_shape)
    wb = None if w is None else backend.asarray(w, dtype)
    out = mha_xp.qk_norm(backend.asarray(x, dtype), wb, kind=KIND)
    assert_preserved(backend, out, dtype, x.shape)
    assert_close(backend.to_numpy(out), ref_norm(x, w), dtype)


@WEIGHTS
def test_backward_matches_reference(backend, dtype, rng, weight_shape):
    x, w, _, grad = _inputs(rng, (2, 3, 5, 8), weight_shape)
    wb = None if w is None else backend.asarray(w, dtype)
    y, backward = mha_xp.qk_norm_vjp(backend.asarray(x, dtype), wb, kind=KIND, eps=EPS)
    assert_close(backend.to_numpy(y), ref_norm(x, w), dtype)
    grads = backward(backend.asarray(grad, dtype))
    assert sorted(grads) == (["x"] if w is None else ["weight", "x"])
    rdx, rdw, _ = ref_backward(grad, x, w)
    assert_preserved(backend, grads["x"], dtype, x.shape)
    # dx cancels three terms of size |g|/σ: allow a few more ulps than the forward.
    assert rel_err(backend.to_numpy(grads["x"]), rdx) <= 10 * REL_TOL[dtype]
    if w is not None:
        assert_preserved(backend, grads["weight"], dtype, w.shape)
        assert_close(backend.to_numpy(grads["weight"]), rdw, dtype)


def test_bias_and_offset(backend, dtype, rng):
    """kind="layer" with Phi's bias and an offset on the weight, per head."""
    x, w, b, grad = _inputs(rng, (2, 3, 5, 8), (3, 8), with_bias=True)
    args = [backend.asarray(t, dtype) for t in (x, w, b)]
    y, backward = mha_xp.qk_norm_vjp(*args, kind=KIND, eps=1e-5, offset=1.0)
    assert_preserved(backend, y, dtype, x.shape)
    assert_close(backend.to_numpy(y), ref_norm(x, w, b, eps=1e-5, offset=1.0), dtype)
    grads = backward(backend.asarray(grad, dtype))
    assert sorted(grads) == ["bias", "weight", "x"]
    rdx, rdw, rdb = ref_backward(grad, x, w, b, eps=1e-5, offset=1.0)
    assert rel_err(backend.to_numpy(grads["x"]), rdx) <= 10 * REL_TOL[dtype]
    assert_close(backend.to_numpy(grads["weight"]), rdw, dtype)
    assert_close(backend.to_numpy(grads["bias"]), rdb, dtype)


def test_float16(backend_f16, rng):
    x, w, _, grad = _inputs(rng, (3, 4, 16), (16,))
    x, w, grad = (a.astype(np.float16) for a in (x, w, grad))
    b = backend_f16
    y, backward = mha_xp.qk_norm_vjp(b.asarray(x, "float16"), b.asarray(w, "float16"), kind=KIND)
    assert_preserved(b, y, "float16", x.shape)
    assert_close(b.to_numpy(y), ref_norm(x, w), "float16")
    assert_close(b.to_numpy(mha_xp.qk_norm(b.asarray(x, "float16"), b.asarray(w, "float16"),
                                           kind=KIND)), ref_norm(x, w), "float16")
    grads = backward(b.asarray(grad, "float16"))
    rdx, rdw, _ = ref_backward(grad, x, w)
    assert_preserved(b, grads["x"], "float16", x.shape)
    assert_preserved(b, grads["weight"], "float16", w.shape)
    assert rel_err(b.to_numpy(grads["x"]), rdx) <= 2 * REL_TOL["float16"]
    assert rel_err(b.to_numpy(grads["weight"]), rdw) <= 2 * REL_TOL["float16"]


@pytest.mark.parametrize("with_weight,with_bias", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("torch_dtype", ["float32", "float64"])
def test_parity_with_torch_layer_norm(rng, with_weight, with_bias, torch_dtype):
    """torch.nn.functional.layer_norm, values and autograd gradients."""
    torch = pytest.importorskip("torch")
    x, w, b, grad = _inputs(rng, (2, 4, 6, 16), (16,) if with_weight else None, with_bias)
    dt = getattr(torch, torch_dtype)
    xt = torch.tensor(x, dtype=dt, requires_grad=True)
    wt = None if w is None else torch.tensor(w, dtype=dt, requires_grad=True)
    bt = None if b is None else torch.tensor(b, dtype=dt, requires_grad=True)
    gt = torch.tensor(grad, dtype=dt)
    yt = torch.nn.functional.layer_norm(xt, (16,), weight=wt, bias=bt, eps=EPS)
    yt.backward(gt)
    detached = [None if t is None else t.detach() for t in (xt, wt, bt)]
    with torch.no_grad():
        ours, backward = mha_xp.qk_norm_vjp(*detached, kind=KIND, eps=EPS)
        grads = backward(gt)
    tol = {"float32": 2e-6, "float64": 1e-14}[torch_dtype]
    assert rel_err(ours.numpy(), yt.detach().numpy()) <= tol
    assert rel_err(grads["x"].numpy(), xt.grad.numpy()) <= 5 * tol
    if with_weight:
        assert rel_err(grads["weight"].numpy(), wt.grad.numpy()) <= 5 * tol
    if with_bias:
        assert rel_err(grads["bias"].numpy(), bt.grad.numpy()) <= 5 * tol


def test_autograd_through_forward_equals_backward(rng):
    """On torch, autograd through qk_norm itself agrees with the hand-written
    backward (per-head weight and bias)."""
    torch = pytest.importorskip("torch")
    x, w, b, grad = _inputs(rng, (2, 3, 5, 8), (3, 8), with_bias=True)
    xt, wt, bt = (torch.tensor(t, requires_grad=True) for t in (x, w, b))
    (mha_xp.qk_norm(xt, wt, bt, kind=KIND) * torch.tensor(grad)).sum().backward()
    _, backward = mha_xp.qk_norm_vjp(xt.detach(), wt.detach(), bt.detach(), kind=KIND)
    grads = backward(torch.tensor(grad))
    assert rel_err(grads["x"].numpy(), xt.grad.numpy()) <= 1e-13
    assert rel_err(grads["weight"].numpy(), wt.grad.numpy()) <= 1e-13
    assert rel_err(grads["bias"].numpy(), bt.grad.numpy()) <= 1e-13


def test_eps_and_constant_rows(backend):
    """A constant row normalises to zeros (not NaN) thanks to eps, and its
    gradient is finite; eps enters under the square root."""
    x = np.stack([np.full(8, 3.0), np.random.default_rng(0).standard_normal(8)])
    xb = backend.asarray(x, "float64")
    y, backward = mha_xp.qk_norm_vjp(xb, kind=KIND, eps=0.5)
    out = backend.to_numpy(y)
    np.testing.assert_array_equal(out[0], np.zeros(8))
    assert_close(out[1], ref_norm(x[1:], eps=0.5)[0], "float64")
    g = np.random.default_rng(1).standard_normal(x.shape)
    dx = backend.to_numpy(backward(backend.asarray(g, "float64"))["x"])
    assert np.all(np.isfinite(dx))
    assert_close(dx, ref_backward(g, x, eps=0.5)[0], "float64")
    # eps=0 is allowed; a non-constant row does not need it.
    out0 = backend.to_numpy(mha_xp.qk_norm(xb[1:, ...], kind=KIND, eps=0.0))
    assert_close(out0, ref_norm(x[1:], eps=0.0), "float64")


def test_default_is_rms_not_layer(rng):
    """kind defaults to "rms": kind="layer" must be asked for (the layer asks)."""
    x = rng.standard_normal((2, 3, 4, 8)) + 1.0
    assert rel_err(mha_xp.qk_norm(x), ref_norm(x)) > 1e-3
    np.testing.assert_array_equal(mha_xp.qk_norm(x, kind="layer"),
                                  mha_xp.qk_norm(x, kind="layer", eps=1e-6))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(eps=-1.0), ValueError, "eps must be a non-negative finite number, got -1.0"),
        (dict(eps=float("nan")), ValueError, "eps must be a non-negative finite number, got nan"),
        (dict(eps="1e-6"), TypeError, "eps must be a Python float, got str '1e-6'"),
        (dict(eps=True), TypeError, "eps must be a Python float, got bool True"),
        (dict(weight=np.ones(8, dtype=np.float32)), TypeError,
         "weight has dtype float32 but x is float64; .* cast weight to x's dtype"),
        (dict(bias=np.ones(8, dtype=np.float32)), TypeError,
         "bias has dtype float32 but x is float64; .* cast bias to x's dtype"),
        (dict(weight=np.ones(5)), ValueError,
         r"weight must have shape \(D,\) = \(8,\), shared by the heads, for x of shape \(3, 8\)"
         r" .*; got \(5,\)"),
        (dict(x=np.ones((2, 3, 4, 8)), weight=np.ones((4, 8))), ValueError,
         r"weight must have shape .* or \(H, D\) = \(3, 8\) per head, .*got \(4, 8\)"),
        (dict(bias=np.ones(7)), ValueError, r"bias must have shape \(D,\) = \(8,\)"),
        (dict(x=np.zeros((3, 8), dtype=np.int64)), TypeError, "x must have a real floating dtype"),
        (dict(x=np.zeros((3, 0))), ValueError, "x must have a non-empty feature axis"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be an array"),
        (dict(kind="foo"), ValueError, "kind must be 'rms' .* or 'layer' .*, got 'foo'"),
        (dict(offset=1.0), ValueError, r"offset=1.0 applies to a weight .*pass weight="),
        (dict(weight=np.ones(8), offset=float("inf")), ValueError,
         "offset must be a finite number"),
    ],
)
def test_errors(kwargs, exc, match):
    args = dict(x=np.ones((3, 8)), kind=KIND) | kwargs
    with pytest.raises(exc, match=match):
        mha_xp.qk_norm(**args)
    with pytest.raises(exc, match=match):
        mha_xp.qk_norm_vjp(**args)


def test_mixed_libraries_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="weight is a numpy array but x is a torch array"):
        mha_xp.qk_norm(torch.ones(3, 8, dtype=torch.float64), np.ones(8), kind=KIND)


def test_backward_errors():
    x = np.ones((3, 8))
    _, backward = mha_xp.qk_norm_vjp(x, kind=KIND)
    with pytest.raises(ValueError, match=r"grad_y must have x's shape \(3, 8\) and dtype float64, "
                                         r"got shape \(3, 7\)"):
        backward(np.ones((3, 7)))
    with pytest.raises(ValueError, match=r"grad_y must have x's shape .* got shape \(3, 8\) and "
                                         r"dtype float32"):
        backward(np.ones((3, 8), dtype=np.float32))
    with pytest.raises(TypeError, match="grad_y must be an array"):
        backward([1.0] * 8)
