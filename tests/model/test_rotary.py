"""Rotary position embeddings: apply_rotary against a float64 reference per
layout, against the Hugging Face formulas in PyTorch, and its properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mha_xp
from support import REL_TOL, assert_close, assert_preserved, rel_err


def ref_rotary(x, positions, *, base=10000.0, interleaved=False, rotary_dim=None):
    """float64 reference, one feature pair at a time, from the RoFormer
    definition: pair p at position m turns by m * base**(-2p/d)."""
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1] if rotary_dim is None else rotary_dim
    pos = np.broadcast_to(np.asarray(positions, dtype=np.float64), x.shape[:-1])
    out = x.copy()
    for p in range(d // 2):
        theta = base ** (-2.0 * p / d)
        i, j = (2 * p, 2 * p + 1) if interleaved else (p, p + d // 2)
        c, s = np.cos(pos * theta), np.sin(pos * theta)
        out[..., i] = x[..., i] * c - x[..., j] * s
        out[..., j] = x[..., j] * c + x[..., i] * s
    return out


# --- Hugging Face's formulas (transformers' Llama/GPT-NeoX and GPT-J), in torch.

def hf_neox(x, positions, base, rotary_dim):
    import torch

    def rotate_half(t):
        t1, t2 = t[..., : t.shape[-1] // 2], t[..., t.shape[-1] // 2:]
        return torch.cat((-t2, t1), dim=-1)

    dt = x.dtype
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dt) / rotary_dim))
    freqs = positions.to(dt)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def hf_gptj(x, positions, base, rotary_dim):
    import torch

    def rotate_every_two(t):
        t1, t2 = t[..., ::2], t[..., 1::2]
        return torch.stack((-t2, t1), dim=-1).flatten(-2)

    dt = x.dtype
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dt) / rotary_dim))
    freqs = positions.to(dt)[..., None] * inv_freq
    sin = torch.repeat_interleave(freqs.sin(), 2, dim=-1)
    cos = torch.repeat_interleave(freqs.cos(), 2, dim=-1)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate_every_two(x_rot) * sin, x_pass), dim=-1)


LAYOUTS = pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])


@LAYOUTS
def test_reference_layouts_differ_and_agree_on_two_features(interleaved):
    """Sanity of the reference itself: with D = 2 both layouts are one pair."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2))
    pos = np.arange(3)
    np.testing.assert_allclose(ref_rotary(x, pos, interleaved=interleaved),
                               ref_rotary(x, pos, interleaved=not interleaved))
    x = rng.standard_normal((3, 4))
    assert not np.allclose(ref_rotary(x, pos, interleaved=True), ref_rotary(x, pos))


@LAYOUTS
def test_matches_reference(backend, dtype, rng, interleaved):
    x = rng.standard_normal((2, 3, 7, 16))
    out = mha_xp.apply_rotary(backend.asarray(x, dtype), interleaved=interleaved)
    assert_preserved(backend, out, dtype, x.shape)
    assert_close(backend.to_numpy(out), ref_rotary(x, np.arange(7), interleaved=interleaved), dtype)


@LAYOUTS
def test_float16(backend_f16, rng, interleaved):
    x = rng.standard_normal((2, 5, 8)).astype(np.float16)
    out = mha_xp.apply_rotary(backend_f16.asarray(x, "float16"), interleaved=interleaved)
    assert_preserved(backend_f16, out, "float16", x.shape)
    assert_close(backend_f16.to_numpy(out), ref_rotary(x, np.arange(5), interleaved=interleaved),
                 "float16")


@LAYOUTS
def test_positions_rotary_dim_and_base(backend, dtype, rng, interleaved):
    """Per-batch position offsets (a KV cache, packed sequences), partial
    rotary and another base, all at once."""
    B, H, L, D, rd = 2, 3, 5, 12, 8
    x = rng.standard_normal((B, H, L, D))
    pos = rng.integers(0, 512, size=(B, 1, L))
    out = mha_xp.apply_rotary(backend.asarray(x, dtype), backend.asarray(pos, "int64"),
                              base=500000.0, interleaved=interleaved, rotary_dim=rd)
    assert_preserved(backend, out, dtype, x.shape)
    got = backend.to_numpy(out)
    ref = ref_rotary(x, pos, base=500000.0, interleaved=interleaved, rotary_dim=rd)
    # Angles up to 512 rad are rounded to float32 (about 512 * 6e-8 = 3e-5 rad).
    tol = {"float32": 1e-4, "float64": REL_TOL["float64"]}[dtype]
    assert rel_err(got, ref) <= tol, rel_err(got, ref)
    # The features past rotary_dim pass through untouched, bit for bit.
    np.testing.assert_array_equal(got[..., rd:], backend.to_numpy(backend.asarray(x, dtype))[..., rd:])


def test_positions_default_is_arange(backend, rng):
    x = backend.asarray(rng.standard_normal((4, 6)), "float64")
    pos = backend.asarray(np.arange(4), "int32")
    np.testing.assert_array_equal(backend.to_numpy(mha_xp.apply_rotary(x)),
                                  backend.to_numpy(mha_xp.apply_rotary(x, pos)))


def test_sequence_first_layout(backend, rng):
    """(B, L, H, D), as before the head transpose, with positions (L, 1)."""
    x = rng.standard_normal((2, 5, 3, 8))
    pos = np.arange(5)[:, None]
    out = mha_xp.apply_rotary(backend.asarray(x, "float64"), backend.asarray(pos, "int64"))
    ref = np.swapaxes(ref_rotary(np.swapaxes(x, 1, 2), np.arange(5)), 1, 2)
    assert_close(backend.to_numpy(out), ref, "float64")


@LAYOUTS
@pytest.mark.parametrize("torch_dtype", ["float32", "float64"])
def test_parity_with_huggingface_torch(rng, interleaved, torch_dtype):
    torch = pytest.importorskip("torch")
    B, H, L, D, rd = 2, 4, 9, 16, 12
    x = rng.standard_normal((B, H, L, D))
    pos = rng.integers(0, 64, size=(B, 1, L))
    xt = torch.tensor(x, dtype=getattr(torch, torch_dtype))
    pt = torch.tensor(pos)
    hf = (hf_gptj if interleaved else hf_neox)(xt, pt, 10000.0, rd)
    ours = mha_xp.apply_rotary(xt, pt, interleaved=interleaved, rotary_dim=rd)
    err = rel_err(ours.numpy(), hf.numpy())
    # HF computes its frequencies in the working dtype; ours are rounded once
    # from float64, so float32 differs by a few ulp of the angle.
    assert err <= {"float32": 2e-6, "float64": 1e-13}[torch_dtype], err
    ref = ref_rotary(x, pos, interleaved=interleaved, rotary_dim=rd)
    assert rel_err(hf.numpy(), ref) <= {"float32": 5e-6, "float64": 1e-13}[torch_dtype]


@LAYOUTS
def test_relative_position_property(backend, rng, interleaved):
    """q_m · k_n depends on m − n only."""
    D = 16
    q, k = rng.standard_normal((2, D))
    m = np.array([3, 10, 25, 40, 7])
    n = m - 3  # same offset everywhere
    qs = backend.asarray(np.broadcast_to(q, (5, D)).copy(), "float64")
    ks = backend.asarray(np.broadcast_to(k, (5, D)).copy(), "float64")
    qr = backend.to_numpy(mha_xp.apply_rotary(qs, backend.asarray(m, "int64"), interleaved=interleaved))
    kr = backend.to_numpy(mha_xp.apply_rotary(ks, backend.asarray(n, "int64"), interleaved=interleaved))
    dots = np.sum(qr * kr, axis=-1)
    np.testing.assert_allclose(dots, dots[0], rtol=1e-12, atol=1e-12)
    # ... and equals rotating q alone by the offset.
    q3 = ref_rotary(q[None], np.array([3]), interleaved=interleaved)[0]
    assert math.isclose(dots[0], float(q3 @ k), rel_tol=1e-12)
    # A different offset gives a different score.
    assert not math.isclose(dots[0], float(q @ k), rel_tol=1e-6)


@LAYOUTS
def test_inverse_undoes_forward(backend, dtype, rng, interleaved):
    x = rng.standard_normal((3, 6, 10))
    pos = rng.integers(0, 100, size=(3, 6))
    xb, pb = backend.asarray(x, dtype), backend.asarray(pos, "int64")
    y = mha_xp.apply_rotary(xb, pb, interleaved=interleaved, rotary_dim=6)
    back = mha_xp.apply_rotary(y, pb, interleaved=interleaved, rotary_dim=6, inverse=True)
    assert_preserved(backend, back, dtype, x.shape)
    assert_close(backend.to_numpy(back), x, dtype)
    # The inverse is the rotation by -m (a norm-preserving map).
    np.testing.assert_allclose(np.linalg.norm(backend.to_numpy(y), axis=-1),
                               np.linalg.norm(x, axis=-1), rtol=10 * REL_TOL[dtype])


@LAYOUTS
def test_inverse_is_the_vjp(rng, interleaved):
    """torch autograd through apply_rotary equals apply_rotary(grad, inverse=True)."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(rng.standard_normal((2, 5, 8)), requires_grad=True)
    pos = torch.tensor(rng.integers(0, 50, size=(2, 5)))
    g = torch.tensor(rng.standard_normal((2, 5, 8)))
    (mha_xp.apply_rotary(x, pos, interleaved=interleaved, rotary_dim=6) * g).sum().backward()
    vjp = mha_xp.apply_rotary(g, pos, interleaved=interleaved, rotary_dim=6, inverse=True)
    assert rel_err(vjp.numpy(), x.grad.numpy()) <= 1e-15


def test_under_jax_jit(rng):
    jax = pytest.importorskip("jax")
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    pos = np.arange(5, 10)
    f = jax.jit(lambda a, p: mha_xp.apply_rotary(a, p, interleaved=True))
    got = np.asarray(f(jax.numpy.asarray(x), jax.numpy.asarray(pos)))
    assert_close(got, ref_rotary(x, pos, interleaved=True), "float32")


@pytest.mark.parametrize(
    ("x_shape", "kwargs", "exc", "match"),
    [
        ((4, 5), {}, ValueError, "x must have an even, non-zero number of features .* got 5; pass rotary_dim="),
        ((4, 6), dict(rotary_dim=3), ValueError, "rotary_dim must be an even int in \\[2, 6\\] .* got 3"),
        ((4, 6), dict(rotary_dim=8), ValueError, "rotary_dim must be an even int in \\[2, 6\\]"),
        ((4, 6), dict(rotary_dim=4.0), TypeError, "rotary_dim must be an even int or None, got float"),
        ((4, 6), dict(base=-1.0), ValueError, "base must be a positive finite number, got -1.0"),
        ((4, 6), dict(base="1e4"), TypeError, "base must be a positive Python float, got str"),
        ((4, 6), dict(interleaved="yes"), TypeError, "interleaved must be a Python bool"),
        ((4, 6), dict(inverse=None), TypeError, "inverse must be a Python bool"),
        ((6,), {}, ValueError, "x must have at least 2 dimensions \\(..., L, D\\), got shape \\(6,\\)"),
        ((4, 6), dict(positions=np.zeros(4, dtype=bool)), TypeError, "positions must be an integer or real floating array, got dtype bool"),
        ((4, 6), dict(inv_freq=np.ones(2)), ValueError, "inv_freq must have shape \\(rotary_dim // 2,\\) = \\(3,\\), got \\(2,\\)"),
        ((4, 6), dict(inv_freq=np.ones(3), base=500.0), ValueError, "give base \\(here 500.0\\) or inv_freq, not both"),
        ((4, 6), dict(attention_factor=0.0), ValueError, "attention_factor must be a positive finite number"),
        ((4, 6), dict(positions=np.arange(5)), ValueError, "positions must broadcast to x's shape without the feature axis, \\(4,\\), got shape \\(5,\\)"),
        ((4, 6), dict(positions=[0, 1, 2, 3]), TypeError, "positions must be an array"),
    ],
)
def test_errors(x_shape, kwargs, exc, match):
    x = np.zeros(x_shape)
    with pytest.raises(exc, match=match):
        mha_xp.apply_rotary(x, **kwargs)


def test_errors_dtype_and_libraries():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="x must have a real floating dtype .* got int64"):
        mha_xp.apply_rotary(np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="positions is a torch array but x is a numpy array"):
        mha_xp.apply_rotary(np.zeros((3, 4)), torch.arange(3))
