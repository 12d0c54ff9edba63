"""QK normalisation (Flax's bias-free LayerNorm): forward and backward against
a float64 reference and torch.nn.functional.layer_norm with autograd."""

from __future__ import annotations

import numpy as np
import pytest

from support import REL_TOL, assert_close, assert_preserved, rel_err
from mha_xp._model._norm import qk_layer_norm, qk_layer_norm_backward

EPS = 1e-6


def ref_norm(x, scale=None, eps=EPS):
    """float64, one row at a time, from the definition."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    s = np.ones(x.shape[-1:]) if scale is None else None
    sc = None if scale is None else np.broadcast_to(np.asarray(scale, dtype=np.float64), x.shape)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        mu = sum(row) / len(row)
        var = sum((r - mu) ** 2 for r in row) / len(row)
        out[idx] = (row - mu) / np.sqrt(var + eps) * (s if sc is None else sc[idx])
    return out


def ref_backward(grad, x, scale=None, eps=EPS):
    """float64 gradients through the explicit Jacobian of each row:
    d y_i / d x_j = s_i (δ_ij − 1/D − x̂_i x̂_j / D) / σ."""
    x, g = (np.asarray(t, dtype=np.float64) for t in (x, grad))
    D = x.shape[-1]
    sc = np.ones(x.shape) if scale is None else np.broadcast_to(np.asarray(scale, np.float64), x.shape)
    dx = np.empty_like(x)
    dscale_full = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        sigma = np.sqrt(row.var() + eps)
        xhat = (row - row.mean()) / sigma
        J = sc[idx][:, None] * (np.eye(D) - 1.0 / D - np.outer(xhat, xhat) / D) / sigma
        dx[idx] = J.T @ g[idx]
        dscale_full[idx] = g[idx] * xhat
    if scale is None:
        return dx, None
    shape = np.shape(scale)
    ds = dscale_full.sum(axis=tuple(range(x.ndim - len(shape))))
    ds = ds.sum(axis=tuple(a for a, n in enumerate(shape) if n == 1), keepdims=True)
    return dx, ds


def _inputs(rng, shape, scale_shape):
    # An offset mean and unequal spreads per row, as real activations have.
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, size=shape[:-1] + (1,)) + 2.0
    scale = None if scale_shape is None else 1.0 + 0.3 * rng.standard_normal(scale_shape)
    grad = rng.standard_normal(shape)
    return x, scale, grad


SCALES = pytest.mark.parametrize("scale_shape", [None, (8,), (3, 1, 8)],
                                 ids=["no-scale", "scale-D", "scale-per-head"])


def test_reference_backward_matches_finite_differences():
    """The reference Jacobian is right (central differences, float64)."""
    rng = np.random.default_rng(1)
    x, scale, grad = _inputs(rng, (2, 5), (5,))
    dx, ds = ref_backward(grad, x, scale)
    h = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        num[idx] = np.sum(grad * (ref_norm(x + e, scale) - ref_norm(x - e, scale))) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)
    num_s = np.array([np.sum(grad * (ref_norm(x, scale + h * np.eye(5)[i])
                                     - ref_norm(x, scale - h * np.eye(5)[i]))) / (2 * h)
                      for i in range(5)])
    np.testing.assert_allclose(ds, num_s, rtol=1e-6, atol=1e-8)


@SCALES
def test_forward_matches_reference(backend, dtype, rng, scale_shape):
    x, scale, _ = _inputs(rng, (2, 3, 5, 8), scale_shape)
    sb = None if scale is None else backend.asarray(scale, dtype)
    out = qk_layer_norm(backend.asarray(x, dtype), sb)
    assert_preserved(backend, out, dtype, x.shape)
    assert_close(backend.to_numpy(out), ref_norm(x, scale), dtype)


@SCALES
def test_backward_matches_reference(backend, dtype, rng, scale_shape):
    x, scale, grad = _inputs(rng, (2, 3, 5, 8), scale_shape)
    sb = None if scale is None else backend.asarray(scale, dtype)
    dx, ds = qk_layer_norm_backward(backend.asarray(grad, dtype), backend.asarray(x, dtype), sb)
    rdx, rds = ref_backward(grad, x, scale)
    assert_preserved(backend, dx, dtype, x.shape)
    # dx cancels three terms of size |g|/σ: allow a few more ulps than the forward.
    assert rel_err(backend.to_numpy(dx), rdx) <= 10 * REL_TOL[dtype]
    if scale is None:
        assert ds is None
    else:
        assert_preserved(backend, ds, dtype, scale.shape)
        assert_close(backend.to_numpy(ds), rds, dtype)


def test_float16(backend_f16, rng):
    x, scale, grad = _inputs(rng, (3, 4, 16), (16,))
    x, scale, grad = (a.astype(np.float16) for a in (x, scale, grad))
    b = backend_f16
    out = qk_layer_norm(b.asarray(x, "float16"), b.asarray(scale, "float16"))
    assert_preserved(b, out, "float16", x.shape)
    assert_close(b.to_numpy(out), ref_norm(x, scale), "float16")
    dx, ds = qk_layer_norm_backward(b.asarray(grad, "float16"), b.asarray(x, "float16"),
                                    b.asarray(scale, "float16"))
    rdx, rds = ref_backward(grad, x, scale)
    assert rel_err(b.to_numpy(dx), rdx) <= 2 * REL_TOL["float16"]
    assert rel_err(b.to_numpy(ds), rds) <= 2 * REL_TOL["float16"]


@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("torch_dtype", ["float32", "float64"])
def test_parity_with_torch_layer_norm(rng, with_scale, torch_dtype):
    """torch.nn.functional.layer_norm(bias=None), values and autograd gradients."""
    torch = pytest.importorskip("torch")
    x, scale, grad = _inputs(rng, (2, 4, 6, 16), (16,) if with_scale else None)
    dt = getattr(torch, torch_dtype)
    xt = torch.tensor(x, dtype=dt, requires_grad=True)
    st = None if scale is None else torch.tensor(scale, dtype=dt, requires_grad=True)
    gt = torch.tensor(grad, dtype=dt)
    yt = torch.nn.functional.layer_norm(xt, (16,), weight=st, bias=None, eps=EPS)
    yt.backward(gt)
    with torch.no_grad():
        ours = qk_layer_norm(xt.detach(), None if st is None else st.detach())
        dx, ds = qk_layer_norm_backward(gt, xt.detach(), None if st is None else st.detach())
    tol = {"float32": 2e-6, "float64": 1e-14}[torch_dtype]
    assert rel_err(ours.numpy(), yt.detach().numpy()) <= tol
    assert rel_err(dx.numpy(), xt.grad.numpy()) <= 5 * tol
    if with_scale:
        assert rel_err(ds.numpy(), st.grad.numpy()) <= 5 * tol


def test_autograd_through_forward_equals_backward(rng):
    """On torch, autograd through qk_layer_norm itself agrees with the
    hand-written backward."""
    torch = pytest.importorskip("torch")
    x, scale, grad = _inputs(rng, (3, 5, 8), (8,))
    xt = torch.tensor(x, requires_grad=True)
    st = torch.tensor(scale, requires_grad=True)
    (qk_layer_norm(xt, st) * torch.tensor(grad)).sum().backward()
    dx, ds = qk_layer_norm_backward(torch.tensor(grad), xt.detach(), st.detach())
    assert rel_err(dx.numpy(), xt.grad.numpy()) <= 1e-13
    assert rel_err(ds.numpy(), st.grad.numpy()) <= 1e-13


def test_eps_and_constant_rows(backend):
    """A constant row normalises to zeros (not NaN) thanks to eps; eps enters
    under the square root."""
    x = np.stack([np.full(8, 3.0), np.random.default_rng(0).standard_normal(8)])
    out = backend.to_numpy(qk_layer_norm(backend.asarray(x, "float64"), eps=0.5))
    np.testing.assert_array_equal(out[0], np.zeros(8))
    assert_close(out[1], ref_norm(x[1:], eps=0.5)[0], "float64")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(eps=-1.0), ValueError, "eps must be a non-negative finite number, got -1.0"),
        (dict(eps="1e-6"), TypeError, "eps must be a non-negative Python float, got str"),
        (dict(scale=np.ones(8, dtype=np.float32)), TypeError,
         "scale has dtype float32 but x is float64; .* cast scale to x's dtype"),
        (dict(scale=np.ones(5)), ValueError, "scale must broadcast to x's shape \\(3, 8\\) .* got shape \\(5,\\)"),
        (dict(x=np.zeros((3, 8), dtype=np.int64)), TypeError, "x must have a real floating dtype"),
        (dict(x=np.zeros((3, 0))), ValueError, "x must have a non-empty feature axis"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be an array"),
    ],
)
def test_errors(kwargs, exc, match):
    args = dict(x=np.ones((3, 8))) | kwargs
    with pytest.raises(exc, match=match):
        qk_layer_norm(**args)


def test_backward_errors():
    x = np.ones((3, 8))
    with pytest.raises(ValueError, match="grad must have x's shape \\(3, 8\\) and dtype float64, got shape \\(3, 7\\)"):
        qk_layer_norm_backward(np.ones((3, 7)), x)
    with pytest.raises(ValueError, match="grad must have x's shape .* got shape \\(3, 8\\) and dtype float32"):
        qk_layer_norm_backward(np.ones((3, 8), dtype=np.float32), x)
