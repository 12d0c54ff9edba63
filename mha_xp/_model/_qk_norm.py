"""QK normalisation as pretrained models apply it, forward and backward.

Per-head queries and keys ``(..., H, L, D)`` are normalised over their
features ``D`` before RoPE and the scores:

=================  =====  =============  ======  ====  ====  ==============
model              kind   weight         offset  bias  eps   16-bit rounds
=================  =====  =============  ======  ====  ====  ==============
Qwen3              rms    (D,)           0       no    1e-6  before weight
Gemma 3            rms    (D,)           1       no    1e-6  once
OLMo 2, OLMoE      rms    (H * D,)       0       no    1e-5  once
Cohere             layer  (H, D)         0       no    1e-5  once
Phi                layer  (D,)           0       yes   1e-5  once
Chameleon          layer  (H, D)         0       yes   1e-5  before weight
=================  =====  =============  ======  ====  ====  ==============

The last column says where a 16-bit input is rounded back from the float32
it is computed in: once, at the end (``Gemma3RMSNorm``, ``CohereLayerNorm``,
``torch.nn.LayerNorm``, OLMo 2's RMSNorm), or before the weight
(``round_before_weight=True``): the normalised features rounded to the
input's dtype, then multiplied by the weight (and the bias added) in that
dtype, rounded again (``LlamaRMSNorm`` and its copies: Qwen3, Mistral, Qwen2;
``ChameleonLayerNorm``). The eps column gives the configs' defaults. OLMo
2 normalises the whole ``H * D`` projection, not each head: reshape it to
``(..., 1, L, H * D)`` for these functions.

"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from .._checks import QK_NORM_KINDS, check_flag, check_qk_norm_kind, check_real
from .._lib._namespace import (
    Array,
    common_namespace,
    compute_dtype,
    compute_namespace,
    dtype_name,
    normalize_namespace,
    require_real_floating,
)

__all__ = ["QK_NORM_KINDS", "qk_norm", "qk_norm_backward", "qk_norm_vjp"]

def _check_param(name: str, p: Array | None, x: Array, xp: ModuleType) -> None:
    """A weight or bias: ``x``'s dtype, shape ``(D,)`` or ``(H, D)``."""
    if p is None:
        return
    require_real_floating(name, p, xp)
    if p.dtype != x.dtype:
        raise TypeError(
            f"{name} has dtype {dtype_name(p.dtype)} but x is {dtype_name(x.dtype)}; mha_xp "
            f"does not promote dtypes silently: cast {name} to x's dtype"
        )
    shape, d = tuple(p.shape), x.shape[-1]
    heads = x.shape[-3] if x.ndim >= 3 else None
    if shape == (d,) or (heads is not None and shape == (heads, d)):
        return
    per_head = f" or (H, D) = ({heads}, {d}) per head" if heads is not None else ""
    raise ValueError(
        f"{name} must have shape (D,) = ({d},), shared by the heads{per_head}, "
        f"for x of shape {tuple(x.shape)} (..., H, L, D); got {shape}"
    )


def _check(x: Array, weight: Array | None, bias: Array | None, kind: Any, eps: Any, offset: Any,
           round_before_weight: Any, xp: ModuleType | None) -> tuple[ModuleType, str, float, float, bool]:
    ns, _ = common_namespace(x=x, weight=weight, bias=bias)
    xp = ns if xp is None else compute_namespace(normalize_namespace(xp))
    require_real_floating("x", x, xp)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(
            f"x must have a non-empty feature axis (the last) to normalise over, "
            f"got shape {tuple(x.shape)}"
        )
    _check_param("weight", weight, x, xp)
    _check_param("bias", bias, x, xp)
    kind = check_qk_norm_kind(kind)
    eps = check_real("eps", eps, low=0.0, what="a non-negative finite number")
    offset = check_real("offset", offset,
                        what="a finite number (1.0 for Gemma's 1 + weight)")
    if offset != 0.0 and weight is None:
        raise ValueError(f"offset={offset} applies to a weight (offset + weight): pass weight=")
    if bias is not None and kind == "rms":
        raise ValueError("bias is for kind='layer' (LayerNorm); Hugging Face's RMSNorms have none")
    return xp, kind, eps, offset, check_flag("round_before_weight", round_before_weight)


def _per_head(p: Array, x: Array, ct: Any, xp: ModuleType) -> Array:
    """``p`` in the compute dtype, ``(H, D)`` made ``(H, 1, D)`` to meet ``(..., H, L, D)``."""
    p = xp.astype(p, ct)
    return xp.reshape(p, (p.shape[0], 1, p.shape[1])) if p.ndim == 2 else p


def _normalise(x: Array, kind: str, eps: float, xp: ModuleType) -> tuple[Array, Array]:
    """``(x̂, 1/σ)`` in the compute dtype. σ is the root mean square (rms) or
    the standard deviation about the mean, taken in two passes as torch does
    (layer)."""
    xc = xp.astype(x, compute_dtype(x.dtype, xp))
    if kind == "layer":
        xc = xc - xp.mean(xc, axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(xp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    return xc * rstd, rstd


def qk_norm(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    kind: str = "rms",
    eps: float = 1e-6,
    offset: float = 0.0,
    round_before_weight: bool = False,
    xp: ModuleType | None = None,
) -> Array:
    """Normalise per-head queries or keys over their features: RMSNorm or LayerNorm.

    ``kind="rms"``: ``y = x / sqrt(mean(x**2) + eps) * (offset + weight)``;
    ``kind="layer"``: ``y = (x - mean) / sqrt(var + eps) * (offset + weight) + bias``.

    Parameters
    ----------
    x : array
        Real floating, ``(..., H, L, D)`` (any ``(..., D)`` when the weight
        and bias are shared by the heads); normalised over ``D``.
    weight : array, optional
        The learned scale, of ``x``'s dtype: ``(D,)`` shared by the heads, or
        ``(H, D)``, one per head (Cohere). None: no scale.
    bias : array, optional
        Added after the scale, ``(D,)`` or ``(H, D)`` (Phi's LayerNorm);
        ``kind="layer"`` only.
    kind : {"rms", "layer"}, default "rms"
        RMSNorm (Qwen3, Gemma 3) or the mean-centred LayerNorm (Cohere, Phi).
    eps : float, default 1e-6
        Added to the mean square or variance (the config's ``rms_norm_eps``
        or ``layer_norm_eps``).
    offset : float, default 0.0
        Added to the weight: 1.0 for Gemma's ``(1 + weight)``.
    round_before_weight : bool, default False
        For 16-bit ``x``: round the normalised features to ``x``'s dtype
        before the weight multiplies them in that dtype, as ``LlamaRMSNorm``
        and Qwen3's copy do; by default the result is rounded once, as
        ``Gemma3RMSNorm``, ``CohereLayerNorm`` and ``torch.nn.LayerNorm``
        do. No effect on float32 and float64.
    xp : module, optional
        The array namespace; inferred from the arrays by default.

    Returns
    -------
    array
        ``x``'s shape, dtype and device. 16-bit inputs are computed in
        float32, as Hugging Face's norms do; float64 in float64.

    Raises
    ------
    TypeError
        If an array is not real floating, a dtype differs from ``x``'s, the
        arrays come from different libraries, or an option has the wrong type.
    ValueError
        If a shape does not fit, an option is out of range, ``bias`` is given
        with ``kind="rms"`` or ``offset`` without ``weight``.

    Notes
    -----
    Hugging Face's norms cast to float32 unconditionally, so on float64
    models they compute in float32 and agree with this function to about
    1e-7, not to float64's rounding.

    Examples
    --------
    >>> import numpy as np
    >>> from mha_xp import qk_norm
    >>> x = np.array([[[[3.0, 4.0]]]])                 # (B, H, L, D)
    >>> qk_norm(x, np.array([1.0, 2.0]), eps=0.0)       # rms = sqrt(12.5)
    array([[[[0.84852814, 2.2627417 ]]]])
    >>> qk_norm(x, np.zeros(2), offset=1.0, eps=0.0)    # Gemma: (1 + 0) * x / rms
    array([[[[0.84852814, 1.13137085]]]])
    >>> qk_norm(x, kind="layer", eps=0.0)
    array([[[[-1.,  1.]]]])
    """
    xp, kind, eps, offset, early = _check(x, weight, bias, kind, eps, offset,
                                         round_before_weight, xp)
    y, _ = _normalise(x, kind, eps, xp)
    ct = y.dtype
    if early and ct != x.dtype:  # LlamaRMSNorm: weight * xhat.to(input_dtype)
        ct = x.dtype
        y = xp.astype(y, ct)
    if weight is not None:
        w = _per_head(weight, x, ct, xp)
        y = y * (w + offset if offset != 0.0 else w)
    if bias is not None:
        y = y + _per_head(bias, x, ct, xp)
    return xp.astype(y, x.dtype)


def _sum_to(t: Array, p: Array, xp: ModuleType) -> Array:
    """Sum ``t (..., H, L, D)`` to the shape of the parameter ``p``, ``(D,)``
    or ``(H, D)``, in ``p``'s dtype."""
    if p.ndim == 2:
        t = xp.sum(t, axis=-2)  # (..., H, D)
    lead = tuple(range(t.ndim - p.ndim))
    if lead:
        t = xp.sum(t, axis=lead)
    return xp.astype(t, p.dtype)


def qk_norm_backward(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    grad_y: Array,
    *,
    kind: str = "rms",
    eps: float = 1e-6,
    offset: float = 0.0,
    xp: ModuleType | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """Compute the gradients of :func:`qk_norm` with respect to ``x``, ``weight`` and ``bias``.

    The statistics are recomputed from ``x``, so the forward stores nothing
    beyond its inputs.

    Parameters
    ----------
    x : array
        As given to :func:`qk_norm`.
    weight : array or None
        As given to :func:`qk_norm`.
    bias : array or None
        As given to :func:`qk_norm`.
    grad_y : array
        Gradient of the loss with respect to the output: ``x``'s shape and
        dtype.
    kind : {"rms", "layer"}, default "rms"
        As given to :func:`qk_norm`.
    eps : float, default 1e-6
        As given to :func:`qk_norm`.
    offset : float, default 0.0
        As given to :func:`qk_norm`.
    xp : module, optional
        The array namespace; inferred from the arrays by default.

    Returns
    -------
    dx : array
        ``x``'s shape and dtype.
    dweight : array or None
        ``weight``'s shape and dtype (summed over the batch, and over the
        heads for a shared weight); None when ``weight`` is None.
    dbias : array or None
        Likewise for ``bias``.

    Raises
    ------
    TypeError, ValueError
        As :func:`qk_norm`, and if ``grad_y`` does not match ``x``.

    Notes
    -----
    With ``x̂`` the normalised features, ``σ`` their scale and
    ``g' = grad_y * (offset + weight)``:
    ``dx = (g' - x̂ · mean(g' x̂)) / σ`` (rms) and
    ``dx = (g' - mean(g') - x̂ · mean(g' x̂)) / σ`` (layer);
    ``dweight = Σ grad_y · x̂``, ``dbias = Σ grad_y``. 16-bit inputs are
    computed in float32 and each gradient rounded once (the rounding of
    ``round_before_weight`` has no gradient).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[[[3.0, 4.0]]]])
    >>> dx, dw, db = qk_norm_backward(x, np.ones(2), None, np.ones_like(x), eps=0.0)
    >>> np.round(dx, 4), np.round(dw, 4), db
    (array([[[[ 0.0453, -0.0339]]]]), array([0.8485, 1.1314]), None)
    """
    xp, kind, eps, offset, _ = _check(x, weight, bias, kind, eps, offset, False, xp)
    require_real_floating("grad_y", grad_y, xp)
    if grad_y.dtype != x.dtype or tuple(grad_y.shape) != tuple(x.shape):
        raise ValueError(
            f"grad_y must have x's shape {tuple(x.shape)} and dtype {dtype_name(x.dtype)}, "
            f"got shape {tuple(grad_y.shape)} and dtype {dtype_name(grad_y.dtype)}"
        )
    xhat, rstd = _normalise(x, kind, eps, xp)
    g = xp.astype(grad_y, xhat.dtype)
    dweight = None if weight is None else _sum_to(g * xhat, weight, xp)
    dbias = None if bias is None else _sum_to(g, bias, xp)
    if weight is not None:
        w = _per_head(weight, x, xhat.dtype, xp)
        g = g * (w + offset if offset != 0.0 else w)
    inner = g - xhat * xp.mean(g * xhat, axis=-1, keepdims=True)
    if kind == "layer":
        inner = inner - xp.mean(g, axis=-1, keepdims=True)
    return xp.astype(rstd * inner, x.dtype), dweight, dbias


def qk_norm_vjp(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    kind: str = "rms",
    eps: float = 1e-6,
    offset: float = 0.0,
) -> tuple[Array, Callable[[Array], dict[str, Array]]]:
    """:func:`qk_norm` and a function computing its gradients (vector-Jacobian product).

    Parameters
    ----------
    x, weight, bias, kind, eps, offset
        As in :func:`qk_norm`.

    Returns
    -------
    y : array
        ``qk_norm(x, weight, bias, kind=kind, eps=eps, offset=offset)``.
    backward : callable
        ``backward(grad_y)`` takes the gradient of a scalar loss with
        respect to ``y`` (``x``'s shape and dtype) and returns a dict with
        the gradients ``"x"``, and ``"weight"`` and ``"bias"`` when they
        were given, each with its argument's shape and dtype (a shared
        weight's gradient sums over the heads and the batch). The
        statistics are recomputed from ``x``: nothing is stored but the
        inputs.

    Raises
    ------
    TypeError, ValueError
        As :func:`qk_norm`; ``backward`` raises them for a ``grad_y`` that
        does not match ``x``.

    Notes
    -----
    With ``x̂`` the normalised features, ``σ`` their scale and
    ``g' = grad_y * (offset + weight)``:
    ``dx = (g' - x̂ · mean(g' x̂)) / σ`` (rms) and
    ``dx = (g' - mean(g') - x̂ · mean(g' x̂)) / σ`` (layer);
    ``dweight = Σ grad_y · x̂``, ``dbias = Σ grad_y``. 16-bit inputs are
    computed in float32 and each gradient rounded once.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> x = np.random.default_rng(0).standard_normal((2, 4, 5, 8))   # (B, H, L, D)
    >>> y, backward = mha_xp.qk_norm_vjp(x, np.ones(8))
    >>> grads = backward(np.ones_like(y))
    >>> sorted(grads), grads["weight"].shape
    (['weight', 'x'], (8,))
    """
    y = qk_norm(x, weight, bias, kind=kind, eps=eps, offset=offset)

    def backward(grad_y: Array) -> dict[str, Array]:
        dx, dw, db = qk_norm_backward(x, weight, bias, grad_y, kind=kind, eps=eps, offset=offset)
        grads = {"x": dx}
        if dw is not None:
            grads["weight"] = dw
        if db is not None:
            grads["bias"] = db
        return grads

    return y, backward
