"""QK normalisation: a bias-free LayerNorm over the features of each head.

Flax's ``MultiHeadDotProductAttention(normalize_qk=True)`` applies
``LayerNorm(use_bias=False)`` (learnable scale, epsilon 1e-6) to the per-head
queries and keys before the scores (Dehghani et al., "Scaling Vision
Transformers to 22 Billion Parameters", 2023). This module holds that
normalisation and its backward, for the layer's forward and ``vjp``.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any

from .._lib._shapes import broadcasts_to
from .._lib._namespace import (
    Array,
    common_namespace,
    compute_dtype,
    dtype_name,
    require_real_floating,
)

__all__ = ["qk_layer_norm", "qk_layer_norm_backward"]


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a non-negative Python float, got {type(eps).__name__} {eps!r}")
    eps = float(eps)  # drops NumPy scalars, which would up-cast float32 (NEP 50)
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be a non-negative finite number, got {eps}")
    return eps


def _check(x: Array, scale: Array | None, xp: ModuleType | None) -> ModuleType:
    ns, _ = common_namespace(x=x, scale=scale)
    xp = ns if xp is None else xp
    require_real_floating("x", x, xp)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(
            f"x must have a non-empty feature axis (the last) to normalise over, "
            f"got shape {tuple(x.shape)}"
        )
    if scale is not None:
        require_real_floating("scale", scale, xp)
        if scale.dtype != x.dtype:
            raise TypeError(
                f"scale has dtype {dtype_name(scale.dtype)} but x is {dtype_name(x.dtype)}; "
                "mha_xp does not promote dtypes silently: cast scale to x's dtype"
            )
        shape, target = tuple(scale.shape), tuple(x.shape)
        if not broadcasts_to(shape, target):
            raise ValueError(
                f"scale must broadcast to x's shape {target} (typically (D,) = "
                f"({target[-1]},)), got shape {shape}"
            )
    return xp


def _normalise(x: Array, eps: float, xp: ModuleType) -> tuple[Array, Array]:
    """``(x̂, 1/σ)`` in the compute dtype: ``x̂ = (x − mean) / σ``,
    ``σ = sqrt(var + eps)``, the (biased) variance taken about the mean
    (two passes, as torch; Flax's default ``mean(x²) − mean(x)²`` loses
    digits when the mean dominates)."""
    xc = xp.astype(x, compute_dtype(x.dtype, xp))
    centred = xc - xp.mean(xc, axis=-1, keepdims=True)
    var = xp.mean(centred * centred, axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    return centred * rstd, rstd


def qk_layer_norm(
    x: Array,
    scale: Array | None = None,
    *,
    eps: float = 1e-6,
    xp: ModuleType | None = None,
) -> Array:
    """LayerNorm without bias over the last axis: ``(x − mean) / sqrt(var + eps) * scale``.

    Parameters
    ----------
    x : array
        Real floating, ``(..., D)``; normalised over ``D``.
    scale : array, optional
        Learnable scale of ``x``'s dtype, broadcasting to ``x`` (Flax's is
        ``(D,)``); None for none.
    eps : float, default 1e-6
        Added to the variance (Flax's LayerNorm default).
    xp : module, optional
        The array namespace; inferred from ``x`` by default.

    Returns
    -------
    array
        The shape, dtype and device of ``x``. float16 is computed in float32
        and rounded once.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0, 2.0, 3.0, 6.0]])
    >>> y = qk_layer_norm(x)
    >>> np.round(y, 4)
    array([[-1.069 , -0.5345,  0.    ,  1.6036]])
    >>> bool(np.allclose(y.mean(-1), 0.0)), bool(np.allclose(y.var(-1), 1.0, atol=1e-5))
    (True, True)
    """
    xp = _check(x, scale, xp)
    eps = _check_eps(eps)
    xhat, _ = _normalise(x, eps, xp)
    if scale is not None:
        xhat = xhat * xp.astype(scale, xhat.dtype)
    return xp.astype(xhat, x.dtype)


def _sum_to_shape(t: Array, shape: tuple[int, ...], xp: ModuleType) -> Array:
    """Sum ``t`` over the axes along which an array of ``shape`` was broadcast."""
    extra = t.ndim - len(shape)
    if extra:
        t = xp.sum(t, axis=tuple(range(extra)))
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and t.shape[a] != 1)
    if axes:
        t = xp.sum(t, axis=axes, keepdims=True)
    return t


def qk_layer_norm_backward(
    grad: Array,
    x: Array,
    scale: Array | None = None,
    *,
    eps: float = 1e-6,
    xp: ModuleType | None = None,
) -> tuple[Array, Array | None]:
    """Gradients of :func:`qk_layer_norm` with respect to ``x`` and ``scale``.

    The statistics are recomputed from ``x`` (one pass over ``D``), so the
    forward stores nothing beyond its inputs.

    Parameters
    ----------
    grad : array
        Gradient of the loss with respect to the output, ``x``'s shape and dtype.
    x, scale, eps, xp
        As given to :func:`qk_layer_norm`.

    Returns
    -------
    dx : array
        ``x``'s shape and dtype.
    dscale : array or None
        ``scale``'s shape and dtype (summed over the axes it was broadcast
        along); None when ``scale`` is None.

    Notes
    -----
    With ``x̂ = (x − mean)/σ`` and ``g' = grad * scale``:
    ``dx = (g' − mean(g') − x̂ · mean(g' x̂)) / σ`` and
    ``dscale = Σ grad · x̂`` over the broadcast axes.
    """
    xp = _check(x, scale, xp)
    eps = _check_eps(eps)
    require_real_floating("grad", grad, xp)
    if grad.dtype != x.dtype or tuple(grad.shape) != tuple(x.shape):
        raise ValueError(
            f"grad must have x's shape {tuple(x.shape)} and dtype {dtype_name(x.dtype)}, "
            f"got shape {tuple(grad.shape)} and dtype {dtype_name(grad.dtype)}"
        )
    xhat, rstd = _normalise(x, eps, xp)
    g = xp.astype(grad, xhat.dtype)
    dscale = None
    if scale is not None:
        dscale = xp.astype(_sum_to_shape(g * xhat, tuple(scale.shape), xp), scale.dtype)
        g = g * xp.astype(scale, xhat.dtype)
    dx = rstd * (
        g
        - xp.mean(g, axis=-1, keepdims=True)
        - xhat * xp.mean(g * xhat, axis=-1, keepdims=True)
    )
    return xp.astype(dx, x.dtype), dscale
