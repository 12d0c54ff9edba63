"""Delegation to torch's and JAX's native attention kernels (``mha_xp/_core/_native.py``).

Every case that is delegated must give what the portable path gives (with
``native_kernels(False)``) to the dtype's tolerance, and the native kernel
must really have run (a counting wrapper replaces it); every case that must
not be delegated must not reach it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

import mha_xp

sdpa = mha_xp.scaled_dot_product_attention
TOL = {"float16": (2e-3, 2e-3), "float32": (1e-5, 1e-6), "float64": (1e-10, 1e-12)}


def portable(*args: Any, **kwargs: Any) -> Any:
    with mha_xp.native_kernels(False):
        return sdpa(*args, **kwargs)


def arrays(shapes: tuple[tuple[int, ...], ...], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def close(a: np.ndarray, b: np.ndarray, dtype: str) -> None:
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


# Shapes (query, key, value) and keyword arguments of the calls that are
# delegated, and of those that must not be. "mask" and "bias" are made by
# the test: a random mask with one fully masked row, a bias with a row of -inf.
DELEGATED = {
    "plain": (((2, 4, 6, 8), (2, 4, 9, 8), (2, 4, 9, 8)), {}),
    "causal L == S": (((2, 4, 7, 8), (2, 4, 7, 8), (2, 4, 7, 8)), {"is_causal": True}),
    "causal L == 1": (((2, 4, 1, 8), (2, 4, 9, 8), (2, 4, 9, 8)), {"is_causal": True}),
    "mask": (((2, 4, 6, 8), (2, 4, 9, 8), (2, 4, 9, 8)), {"mask": True}),
    "bias": (((2, 4, 6, 8), (2, 4, 9, 8), (2, 4, 9, 8)), {"bias": True}),
    "scale": (((1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8)), {"scale": 0.3}),
    "GQA": (((2, 6, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8)), {}),
    "GQA causal mask-free": (((2, 4, 7, 8), (2, 1, 7, 8), (2, 1, 7, 8)), {"is_causal": True}),
    "GQA mask": (((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8)), {"mask": True}),
}
NOT_DELEGATED = {
    "causal L != S": (((1, 2, 4, 8), (1, 2, 9, 8), (1, 2, 9, 8)), {"is_causal": True}),
    "dropout": (((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), {"dropout_p": 0.5, "seed": 3}),
    "return_weights": (((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), {"return_weights": True}),
    "window": (((1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)), {"window": (2, 0)}),
    "softcap": (((1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)), {"softcap": 5.0}),
    "alibi": (((1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)), {"alibi_slopes": [0.5, 0.25]}),
    "packed": (((1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)), {"cu_seqlens_q": [0, 2, 6]}),
    "broadcast batch": (((2, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), {}),
    "3-D": (((2, 4, 8), (2, 4, 8), (2, 4, 8)), {}),
}
TORCH_NOT_DELEGATED = {
    "causal and mask": (((1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)), {"is_causal": True, "mask": True}),
    "mask and bias": (((1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)), {"mask": True, "bias": True}),
}
JAX_NOT_DELEGATED = {
    "Dv != D": (((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 5)), {}),
    "chunked plan": (((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), {"memory_budget": 0}),
}


def masks(shapes: tuple[tuple[int, ...], ...], kwargs: dict[str, Any], seed: int = 1
          ) -> dict[str, Any]:
    """``kwargs`` with ``mask=True`` / ``bias=True`` replaced by arrays (NumPy)
    of the scores' shape, with a fully masked row each."""
    out = dict(kwargs)
    if out.get("mask") is not True and out.get("bias") is not True:
        return out
    (B, H, L, _), (_, _, S, _) = shapes[0], shapes[1]
    rng = np.random.default_rng(seed)
    if kwargs.get("mask") is True:
        mask = rng.random((B, H, L, S)) > 0.4
        mask[0, 0, min(1, L - 1)] = False
        out["mask"] = mask
    if kwargs.get("bias") is True:
        bias = rng.standard_normal((B, H, L, S))
        bias[-1, -1, 0] = -np.inf
        bias[0, 0, -1, ::2] = -np.inf
        out["bias"] = bias
    return out


# -- torch -------------------------------------------------------------------------


@pytest.fixture
def torch_spy(monkeypatch):
    """torch, with ``F.scaled_dot_product_attention`` counting its calls."""
    torch = pytest.importorskip("torch", reason="torch is not installed: no torch delegation to test")
    F = torch.nn.functional
    original, calls = F.scaled_dot_product_attention, []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return torch, calls


def to_torch(torch, values: dict[str, Any], dtype: str) -> dict[str, Any]:
    dt = getattr(torch, dtype)
    return {n: (torch.asarray(v, dtype=torch.bool if v.dtype == bool else dt)
                if isinstance(v, np.ndarray) else v) for n, v in values.items()}


def as_numpy(x: Any) -> np.ndarray:
    x = x[0] if isinstance(x, tuple) else x
    return np.asarray(x.detach().float().numpy() if hasattr(x, "detach") else x)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("case", sorted(DELEGATED))
def test_torch_delegated_equals_portable(torch_spy, case, dtype):
    torch, calls = torch_spy
    shapes, kwargs = DELEGATED[case]
    q, k, v = to_torch(torch, dict(zip("qkv", arrays(shapes))), dtype).values()
    kw = to_torch(torch, masks(shapes, kwargs), dtype)
    out = sdpa(q, k, v, **kw)
    assert len(calls) == 1, f"{case}: torch's kernel was not used"
    assert (calls[0]["attn_mask"] is None) == ("mask" not in kw and "bias" not in kw)
    want = portable(q, k, v, **kw)
    assert len(calls) == 1, "native_kernels(False) still delegated"
    assert out.dtype == q.dtype and out.shape == want.shape
    close(as_numpy(out), as_numpy(want), dtype)


@pytest.mark.parametrize("case", sorted(NOT_DELEGATED | TORCH_NOT_DELEGATED))
def test_torch_not_delegated(torch_spy, case):
    torch, calls = torch_spy
    shapes, kwargs = (NOT_DELEGATED | TORCH_NOT_DELEGATED)[case]
    q, k, v = to_torch(torch, dict(zip("qkv", arrays(shapes))), "float32").values()
    kw = to_torch(torch, masks(shapes, kwargs), "float32")
    out = sdpa(q, k, v, **kw)
    assert calls == [], f"{case}: delegated to torch's kernel"
    np.testing.assert_array_equal(as_numpy(out), as_numpy(portable(q, k, v, **kw)))


@pytest.mark.parametrize("bad", ["nan in a hidden value", "inf in a key", "nan in the query",
                                 "+inf in the bias", "nan in the bias"])
def test_torch_non_finite_not_delegated(torch_spy, bad):
    torch, calls = torch_spy
    q, k, v = (torch.asarray(a, dtype=torch.float32) for a in arrays(((1, 2, 4, 8),) * 3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[:, 2] = False
    bias = None
    if bad == "nan in a hidden value":
        v[0, 0, 2, 1] = torch.nan
    elif bad == "inf in a key":
        k[0, 1, 0, 0] = torch.inf
    elif bad == "nan in the query":
        q[0, 0, 3, 0] = torch.nan
    else:
        bias, mask = torch.zeros(4, 4), None
        bias[1, 1] = torch.inf if bad.startswith("+inf") else torch.nan
    out = sdpa(q, k, v, mask=mask, bias=bias)
    assert calls == []
    want = portable(q, k, v, mask=mask, bias=bias)
    np.testing.assert_array_equal(as_numpy(out), as_numpy(want))  # NaN where NaN


def test_torch_switches(torch_spy, monkeypatch):
    """``native_kernels(False)`` and ``MHA_XP_NATIVE_KERNELS=0`` turn it off;
    functions returning statistics or gradients never use it."""
    torch, calls = torch_spy
    q, k, v = (torch.asarray(a, dtype=torch.float32) for a in arrays(((1, 2, 4, 8),) * 3))
    with mha_xp.native_kernels(False):
        sdpa(q, k, v)
    mha_xp.attention_with_lse(q, k, v)
    _, backward = mha_xp.attention_vjp(q, k, v)
    backward(torch.ones_like(q))
    monkeypatch.setenv("MHA_XP_NATIVE_KERNELS", "0")
    sdpa(q, k, v)
    assert calls == []
    monkeypatch.setenv("MHA_XP_NATIVE_KERNELS", "1")
    sdpa(q, k, v)
    assert len(calls) == 1


def test_torch_layer(torch_spy):
    """The layer's attention on torch tensors is delegated (padding and a
    grouped-query layer included; a decoding step with a cache is not, as its
    positions are absolute), and gives the portable result."""
    torch, calls = torch_spy
    layer = mha_xp.MultiHeadAttention(16, 4, num_kv_heads=2, xp=torch, dtype=torch.float64, seed=0)
    x = torch.asarray(arrays(((2, 5, 16),))[0])
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    for kw in ({}, {"is_causal": True}, {"key_padding_mask": pad}):
        calls.clear()
        out = layer(x, **kw)
        assert len(calls) == 1, kw
        with mha_xp.native_kernels(False):
            want = layer(x, **kw)
        close(out.numpy(), want.numpy(), "float64")
    calls.clear()
    cache = layer.init_cache(2, 8)
    layer(x[:, :1], cache=cache, is_causal=True)
    assert calls == []


def test_torch_autograd_through_delegation(torch_spy):
    """Gradients by torch's autograd through the delegated call match those
    through the portable path."""
    torch, calls = torch_spy
    grads = []
    for native in (True, False):
        q, k, v = (torch.asarray(a, dtype=torch.float64).requires_grad_(True)
                   for a in arrays(((1, 2, 5, 8),) * 3))
        with mha_xp.native_kernels(native):
            sdpa(q, k, v, is_causal=True).sum().backward()
        grads.append([t.grad.numpy() for t in (q, k, v)])
    assert len(calls) == 1
    for a, b in zip(*grads):
        close(a, b, "float64")


# -- JAX ---------------------------------------------------------------------------


@pytest.fixture
def jax_spy(monkeypatch):
    """jax, with ``jax.nn.dot_product_attention`` counting its calls (under
    ``jax.jit``, the calls while tracing)."""
    jax = pytest.importorskip("jax", reason="jax is not installed: no JAX delegation to test")
    original, calls = jax.nn.dot_product_attention, []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", counting)
    return jax, calls


def to_jax(jnp, values: dict[str, Any]) -> dict[str, Any]:
    return {n: (jnp.asarray(v, dtype=jnp.bool_ if v.dtype == bool else jnp.float32)
                if isinstance(v, np.ndarray) else v) for n, v in values.items()}


def jit_sdpa(jax, kw: dict[str, Any]):
    """``sdpa`` under ``jax.jit``, arrays traced and the other options static."""
    names = [n for n, v in kw.items() if hasattr(v, "shape")]
    static = {n: v for n, v in kw.items() if n not in names}
    return jax.jit(lambda q, k, v, *a: sdpa(q, k, v, **dict(zip(names, a)), **static)), \
        [kw[n] for n in names]


# Eager JAX compiles every operation of the portable path on first use:
# a few cases eagerly, every case under jax.jit.
JAX_CASES = [(case, True) for case in sorted(DELEGATED)] + [
    (case, False) for case in ("plain", "causal L == S", "mask", "bias")]


@pytest.mark.parametrize(("case", "jit"), JAX_CASES,
                         ids=[f"{c}-{'jit' if j else 'eager'}" for c, j in JAX_CASES])
def test_jax_delegated_equals_portable(jax_spy, case, jit):
    jax, calls = jax_spy
    jnp = jax.numpy
    shapes, kwargs = DELEGATED[case]
    q, k, v = to_jax(jnp, dict(zip("qkv", arrays(shapes)))).values()
    kw = to_jax(jnp, masks(shapes, kwargs))
    if jit:
        f, traced = jit_sdpa(jax, kw)
        out = f(q, k, v, *traced)
    else:
        out = sdpa(q, k, v, **kw)
    assert len(calls) == 1, f"{case}: JAX's kernel was not used"
    assert (calls[0]["mask"] is None) == ("mask" not in kw)
    assert (calls[0]["bias"] is None) == ("bias" not in kw)
    want = portable(q, k, v, **kw)
    assert len(calls) == 1
    assert out.dtype == q.dtype and out.shape == want.shape
    close(np.asarray(out), np.asarray(want), "float32")


@pytest.mark.parametrize("case", sorted(NOT_DELEGATED | JAX_NOT_DELEGATED))
def test_jax_not_delegated(jax_spy, case):
    jax, calls = jax_spy
    jnp = jax.numpy
    shapes, kwargs = (NOT_DELEGATED | JAX_NOT_DELEGATED)[case]
    q, k, v = to_jax(jnp, dict(zip("qkv", arrays(shapes)))).values()
    kw = to_jax(jnp, masks(shapes, kwargs))
    out = sdpa(q, k, v, **kw)
    assert calls == [], f"{case}: delegated to JAX's kernel"
    np.testing.assert_array_equal(np.asarray(out[0] if isinstance(out, tuple) else out),
                                  np.asarray((lambda r: r[0] if isinstance(r, tuple) else r)(
                                      portable(q, k, v, **kw))))


def test_jax_non_finite(jax_spy):
    """Non-finite inputs get mha_xp's semantics: eagerly the kernel is not
    called; under ``jax.jit`` it is traced, but the portable branch runs
    (``jax.lax.cond`` on the all-finite check)."""
    jax, calls = jax_spy
    jnp = jax.numpy
    q, k, v = (jnp.asarray(a, dtype=jnp.float32) for a in arrays(((1, 2, 4, 8),) * 3))
    v = v.at[0, 0, 2, 1].set(jnp.nan)
    mask = jnp.ones((4, 4), dtype=bool).at[:, 2].set(False)
    want = np.asarray(portable(q, k, v, mask=mask))
    assert np.isfinite(want).all()  # the NaN is hidden from every query
    np.testing.assert_array_equal(np.asarray(sdpa(q, k, v, mask=mask)), want)
    assert calls == []
    out = jax.jit(lambda q, k, v, m: sdpa(q, k, v, mask=m))(q, k, v, mask)
    assert len(calls) == 1
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)


def test_jax_float64_not_delegated(jax_spy):
    """JAX's kernel computes float64 to about 1e-7 only (measured): float64
    stays on the portable path."""
    jax, calls = jax_spy
    if not jax.config.jax_enable_x64:
        pytest.skip("JAX without x64: no float64 arrays")
    q = jax.numpy.asarray(arrays(((1, 2, 4, 8),))[0])
    sdpa(q, q, q)
    assert calls == []
