"""Delegation to the array library's own attention kernel, where its
semantics coincide with mha_xp's (array-api-extra's pattern: validate, then
call the namespace's implementation where one exists and is equivalent).

torch tensors in host memory go to
``torch.nn.functional.scaled_dot_product_attention`` (its fused CPU flash
kernel), JAX arrays to ``jax.nn.dot_product_attention``. :func:`native_attend`
returns None wherever the call is not one they compute exactly as mha_xp
does, and the portable path runs. What was found by experiment (torch 2.13,
JAX 0.10) and decides the rules:

- both kernels align ``is_causal`` top-left (query ``i`` sees keys
  ``j <= i``), mha_xp bottom-right (``j <= i + S - L``): causal calls are
  delegated when ``L == S``, or ``L == 1`` (which then sees every key: not
  causal at all);
- a boolean mask means "may attend" in both, as in mha_xp; a float mask
  (torch) or ``bias`` (JAX) is added to the scaled scores, as mha_xp's bias;
- a fully masked row (by the mask or a row of ``-inf`` bias) gives zeros in
  torch, as in mha_xp, but the mean of the values (mask) or NaN (bias) in
  JAX: such rows are set to zero after JAX's kernel;
- a NaN or infinity in a key or value reaches every row in both kernels
  (``0 * NaN``), where mha_xp keeps it to the rows that see it
  (:mod:`._finite`): delegated only when every input is finite, checked
  as the stand-ins check it (in Python for torch on the CPU and eager JAX,
  with ``jax.lax.cond`` under tracing, which runs one branch);
- grouped-query heads: query head ``h`` uses key/value head ``h // G`` in
  both (torch with ``enable_gqa=True``); neither broadcasts a batch axis;
- JAX requires the value's feature size to be the query's, and computes
  float64 inputs to about 1e-7 only: float64 stays portable there; JAX's
  kernel materialises the scores, so it is used only where the planner
  chose the dense path; torch's flash kernel is memory-linear;
- 16-bit inputs are computed in float32, as mha_xp does, and cast back.

Never delegated: dropout (mha_xp's counter-based keep-mask), returned
weights or statistics (neither kernel returns them, so the backward stays
portable too), soft-capping, ALiBi, windows, packed sequences, a cache's
positions, position-free keys, broadcast batch axes; for torch, a mask or
bias together with ``is_causal``, or a mask with a bias (its one
``attn_mask`` takes either).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .._config import get_native_kernels
from .._lib._backends import is_traced, native_attention_library
from .._lib._namespace import Array, compute_dtype, device_of
from .._spec import AttentionSpec, Plan
from ._finite import finite_flag
from ._positions import combine

__all__ = ["native_attend"]


def native_attend(query: Array, key: Array, value: Array, spec: AttentionSpec, plan: Plan, /,
                  *, xp: ModuleType, portable: Callable[[Array, Array, Array], Array],
                  ) -> Array | None:
    """The output of attention computed by the library's native kernel, or
    None where it is not used (not applicable, or ``native_kernels(False)``).

    ``portable(query, key, value)`` computes the same call on mha_xp's own
    path: under JAX tracing the kernel's result is chosen against it at run
    time (``jax.lax.cond`` on the all-finite check)."""
    library = native_attention_library(query)
    if library is None or not _expressible(query, key, value, spec, plan, library):
        return None
    if not get_native_kernels():
        return None
    dtype = query.dtype
    work = compute_dtype(dtype, xp)
    if library == "jax" and work != xp.float32:
        return None
    allowed = combine(spec.mask, spec.key_keep, xp=xp)
    bias = spec.bias
    if library == "torch" and allowed is not None and bias is not None:
        return None
    causal = spec.is_causal and query.shape[-2] > 1

    def native(q: Array, k: Array, v: Array) -> Array:
        if work != dtype:
            q, k, v = (xp.astype(t, work) for t in (q, k, v))
        b = None if bias is None else xp.astype(bias, work)
        kernel = _torch if library == "torch" else _jax
        out = kernel(q, k, v, allowed, b, spec.scale, causal, xp=xp)
        return out if work == dtype else xp.astype(out, dtype)

    arrays = (query, key, value)
    if not any(is_traced(t) for t in arrays + (bias,)):
        return native(*arrays) if _finite(arrays, bias, xp=xp) else None
    import jax  # tracing: JAX arrays

    return jax.lax.cond(_finite_flag(arrays, bias, xp=xp), native, portable, *arrays)


def _expressible(query: Array, key: Array, value: Array, spec: AttentionSpec, plan: Plan,
                 library: str) -> bool:
    """Whether the call is one the native kernel of ``library`` computes with
    mha_xp's semantics, as far as shapes and options tell (the values are
    checked by :func:`native_attend`)."""
    if plan.return_weights or plan.return_stats:
        return False
    if (spec.dropout is not None or spec.softcap is not None or spec.neg_slopes is not None
            or spec.window is not None or spec.q_seg is not None or spec.q_diag is not None
            or spec.free_from is not None or spec.score_mod is not None
            or spec.mask_mod is not None):
        return False
    if not query.ndim == key.ndim == value.ndim == 4:
        return False
    (B, H, L, D), (Bk, Hkv, S, _), (Bv, Hv, _, Dv) = query.shape, key.shape, value.shape
    if not (B == Bk == Bv and Hkv == Hv and H % Hkv == 0):
        return False
    if 0 in query.shape or 0 in key.shape or 0 in value.shape:  # left to the portable path
        return False
    if spec.is_causal and L not in (1, S):
        return False
    if library == "torch":
        return not (spec.is_causal and (spec.mask is not None or spec.bias is not None
                                         or spec.key_keep is not None))
    return plan.executor == "dense" and D == Dv


def _finite(arrays: tuple[Array, ...], bias: Array | None, /, *, xp: ModuleType) -> bool:
    """Whether the inputs are all finite and the bias holds neither NaN nor
    ``+inf`` (``-inf`` masks, as in mha_xp), read in Python."""
    return bool(_finite_flag(arrays, bias, xp=xp))


def _finite_flag(arrays: tuple[Array, ...], bias: Array | None, /, *, xp: ModuleType) -> Array:
    """:func:`_finite` as a 0-d boolean array: the inputs all finite
    (:func:`~._finite.finite_flag`, the check of the non-finite stand-ins)
    and the bias's maximum below ``+inf`` (it is NaN where the bias holds
    one)."""
    flag = finite_flag(*arrays, xp=xp)
    if bias is not None:
        inf = xp.asarray(math.inf, dtype=bias.dtype, device=device_of(bias))
        flag = xp.logical_and(flag, xp.max(bias) < inf)
    return flag


def _torch(q: Array, k: Array, v: Array, allowed: Array | None, bias: Array | None,
           scale: float, causal: bool, /, *, xp: ModuleType) -> Array:
    """``torch.nn.functional.scaled_dot_product_attention`` (looked up per
    call, so that a test can watch it)."""
    import torch.nn.functional as F

    extra: dict[str, Any] = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_to_4d(allowed if bias is None
                                                                    else bias, xp),
                                          is_causal=causal, scale=scale, **extra)


def _to_4d(x: Array | None, xp: ModuleType) -> Array | None:
    """A mask or bias broadcastable to ``(B, H, L, S)`` with its four axes
    (the kernels' fast paths take 4-D masks only)."""
    if x is None or x.ndim == 4:
        return x
    return xp.reshape(x, (1,) * (4 - x.ndim) + tuple(x.shape))


def _jax(q: Array, k: Array, v: Array, allowed: Array | None, bias: Array | None,
         scale: float, causal: bool, /, *, xp: ModuleType) -> Array:
    """``jax.nn.dot_product_attention`` in its ``(B, L, H, D)`` layout, with
    the rows that see no key set to zero (JAX gives them the mean of the
    values, or NaN for a row of ``-inf`` bias)."""
    import jax

    allowed, bias = _to_4d(allowed, xp), _to_4d(bias, xp)
    heads_last = (0, 2, 1, 3)
    out = jax.nn.dot_product_attention(
        *(xp.permute_dims(t, heads_last) for t in (q, k, v)), bias=bias, mask=allowed,
        scale=scale, is_causal=causal)
    out = xp.permute_dims(out, heads_last)
    if allowed is None and bias is None:
        return out
    visible = allowed
    if bias is not None:
        neg_inf = xp.asarray(-math.inf, dtype=bias.dtype, device=device_of(bias))
        visible = combine(visible, bias > neg_inf, xp=xp)
    sees = xp.any(visible, axis=-1, keepdims=True)
    return xp.where(sees, out, xp.zeros((), dtype=out.dtype, device=device_of(out)))
