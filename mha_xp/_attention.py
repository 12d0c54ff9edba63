"""Scaled dot-product attention: the public function and the shared core."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ._checks import check_bias, check_mask, check_same_dtype, check_scale, check_sdpa_shapes
from ._lib._math import masked_softmax
from ._lib._namespace import Array, common_namespace, compute_dtype
from ._masks import causal_mask, combine

__all__ = ["attend", "scaled_dot_product_attention"]


def attend(
    query: Array,
    key: Array,
    value: Array,
    /,
    *,
    allowed: Array | None,
    bias: Array | None,
    scale: float,
    return_weights: bool,
    xp: ModuleType,
) -> Array | tuple[Array, Array]:
    """Attention on validated inputs: ``softmax(Q K^T * scale + bias, allowed) V``.

    16-bit inputs are computed in float32 and the results cast back, so the
    score matmul, the softmax sums and the weighted sum of values accumulate
    in float32.
    """
    dtype = query.dtype
    work = compute_dtype(dtype, xp)
    if work != dtype:
        query, key, value = (xp.astype(t, work) for t in (query, key, value))
        bias = None if bias is None else xp.astype(bias, work)
    scores = xp.matmul(query, xp.matrix_transpose(key)) * scale
    if bias is not None:
        scores = scores + bias
    weights = masked_softmax(scores, allowed, xp=xp)
    out = xp.matmul(weights, value)
    if work != dtype:
        out, weights = xp.astype(out, dtype), xp.astype(weights, dtype)
    return (out, weights) if return_weights else out


def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    r"""Scaled dot-product attention on any array API library.

    Computes :math:`\mathrm{softmax}(Q K^T \cdot \mathrm{scale} + \mathrm{bias})\, V`
    over the keys that ``mask`` and ``is_causal`` allow, for every leading
    (batch, head) index at once. The result is an array of the inputs'
    library, on their device, with their dtype.

    Parameters
    ----------
    query : array, shape (..., H, L, D)
        Queries, real floating (float16, float32 or float64).
    key : array, shape (..., H, S, D)
        Keys, same library, device and dtype as ``query``.
    value : array, shape (..., H, S, Dv)
        Values, same library, device and dtype as ``query``.
    mask : array of bool, optional
        Broadcastable to ``(..., H, L, S)``. **True means "may attend"**, as in
        torch's SDPA, JAX, Flax and Keras (the opposite of
        ``torch.nn.MultiheadAttention``'s boolean ``attn_mask``).
    bias : array, optional
        Float array added to the scaled scores, broadcastable to
        ``(..., H, L, S)``, with the inputs' dtype. ``-inf`` entries mask.
    is_causal : bool, default False
        Causal masking aligned **bottom-right**: query ``i`` sees keys
        ``j <= i + S - L`` (FlashAttention's convention); for ``L == S`` the
        usual lower triangle. Combined with ``mask`` by logical AND.
    scale : float, optional
        Positive finite factor on ``Q K^T``; default ``1 / sqrt(D)``.
    return_weights : bool, default False
        Also return the attention weights.

    Returns
    -------
    out : array, shape (..., H, L, Dv)
        The attention output. A query row with no key left to attend to gives
        zeros (never NaN).
    weights : array, shape (..., H, L, S)
        Only with ``return_weights=True``: the softmax weights; each row sums
        to 1, or is all zero for a fully masked row.

    Raises
    ------
    TypeError
        Non-array inputs, mixed array libraries, non-floating or mixed dtypes,
        a non-boolean ``mask``, a non-float ``bias``, a non-numeric ``scale``.
    ValueError
        Arrays on different devices, wrong ranks, mismatched shapes, a mask or
        bias that does not broadcast, a ``scale`` that is not positive and
        finite.

    Notes
    -----
    This is the dense formulation: it materialises the ``(..., H, L, S)``
    scores. 16-bit inputs are computed in float32 and the results cast back.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 5, 8))   # (batch, heads, L, D)
    >>> k = rng.standard_normal((2, 4, 7, 8))   # (batch, heads, S, D)
    >>> v = rng.standard_normal((2, 4, 7, 16))
    >>> out, w = mha_xp.scaled_dot_product_attention(q, k, v, is_causal=True,
    ...                                              return_weights=True)
    >>> out.shape, w.shape
    ((2, 4, 5, 16), (2, 4, 5, 7))
    >>> bool(np.allclose(w.sum(axis=-1), 1.0))
    True
    """
    xp, dev = common_namespace(query=query, key=key, value=value, mask=mask, bias=bias)
    dtype = check_same_dtype(xp, query=query, key=key, value=value)
    scores_shape = check_sdpa_shapes(query, key, value)
    labels = "(..., H, L, S)"
    if mask is not None:
        check_mask(mask, scores_shape, xp, labels)
    if bias is not None:
        check_bias(bias, dtype, scores_shape, xp, labels)
    scale = check_scale(scale, query.shape[-1])
    L, S = scores_shape[-2:]
    allowed = combine(mask, causal_mask(L, S, xp=xp, device=dev) if is_causal else None, xp=xp)
    return attend(
        query, key, value, allowed=allowed, bias=bias, scale=scale,
        return_weights=bool(return_weights), xp=xp,
    )
