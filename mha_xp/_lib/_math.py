"""Portable math the array API standard does not provide."""

from __future__ import annotations

import math
from types import ModuleType

from array_api_compat import device

from ._inplace import divide_into, shifted_exp, writes_in_place
from ._namespace import Array

__all__ = ["masked_softmax", "unnormalised_attention"]


def masked_softmax(
    scores: Array,
    allowed: Array | None,
    /,
    *,
    xp: ModuleType,
    return_stats: bool = False,
    in_place: bool | None = None,
) -> Array | tuple[Array, Array]:
    """Softmax over the last axis, restricted to the ``allowed`` entries.

    A row with no allowed entry (or whose scores are all ``-inf``) gives all
    zeros instead of the ``0/0 = NaN`` of the textbook formula, as torch's
    SDPA and FlashAttention do. NaN in ``scores`` at an allowed position still
    propagates: it was in the input.

    Parameters
    ----------
    scores : array
        Real floating scores, ``(..., S)``.
    allowed : array of bool or None
        Broadcastable to ``scores``; True where a score takes part.
    xp : module
        The array namespace.
    return_stats : bool, default False
        Also return the statistics ``(m, l)`` of each row, ``(...,)`` each:
        the shift (row maximum, 0 for a row with nothing allowed) and the sum
        of ``exp(s - m)`` (0 for such a row).
    in_place : bool, optional
        Overwrite ``scores`` (which must then be a temporary of the caller's)
        where the backend allows; default: where the backend allows.

    Returns
    -------
    array
        Probabilities with the shape and dtype of ``scores``.
    stats : (array, array)
        Only with ``return_stats=True``.
    """
    dev = device(scores)
    neg_inf = xp.asarray(-math.inf, dtype=scores.dtype, device=dev)
    zero = xp.asarray(0.0, dtype=scores.dtype, device=dev)
    if allowed is not None:
        # where, not multiplication: masked entries may hold NaN or Inf.
        scores = xp.where(allowed, scores, neg_inf)
    row_max = xp.max(scores, axis=-1, keepdims=True)
    # A fully masked row has max -inf; shift by 0 instead so exp gives 0, not NaN.
    row_max = xp.where(row_max == neg_inf, zero, row_max)
    if in_place is None:
        in_place = writes_in_place(xp)
    e = shifted_exp(scores, row_max, xp=xp, in_place=in_place)
    total = xp.sum(e, axis=-1, keepdims=True)
    empty = total == zero
    safe = xp.where(empty, xp.ones_like(total), total)
    probs = divide_into(e, safe, xp=xp, in_place=in_place)
    if not return_stats:
        return probs
    return probs, (row_max[..., 0], total[..., 0])


def unnormalised_attention(
    scores: Array, value_ones: Array, /, *, xp: ModuleType, return_weights: bool = False,
    in_place: bool | None = None,
) -> tuple[Array, Array | None, tuple[Array, Array]]:
    """``softmax(scores) @ value`` without normalising the probabilities first.

    ``value_ones`` is the value with a column of ones appended
    (``(..., S, Dv + 1)``), so that one matmul of ``e = exp(scores - m)``
    gives both ``e @ value`` and the row sums ``l`` of ``e``; the ``(..., L,
    Dv)`` result is then divided by ``l``. Against :func:`masked_softmax`
    followed by a matmul this saves the passes over the ``(..., L, S)``
    scores that sum and divide them. Rows with nothing allowed (all scores
    ``-inf``) give zeros. With ``return_weights=True`` the probabilities are
    normalised after the matmul, so asking for them never changes ``out``.

    Returns
    -------
    out : array
        ``(..., L, Dv)``.
    weights : array or None
        The probabilities ``(..., L, S)``, with ``return_weights=True``.
    stats : (array, array)
        The rows' shift ``m`` and sum ``l``, as :func:`masked_softmax` returns
        them with ``return_stats=True``.
    """
    dev = device(scores)
    neg_inf = xp.asarray(-math.inf, dtype=scores.dtype, device=dev)
    zero = xp.asarray(0.0, dtype=scores.dtype, device=dev)
    row_max = xp.max(scores, axis=-1, keepdims=True)
    row_max = xp.where(row_max == neg_inf, zero, row_max)
    if in_place is None:
        in_place = writes_in_place(xp)
    e = shifted_exp(scores, row_max, xp=xp, in_place=in_place)
    out_sums = xp.matmul(e, value_ones)
    Dv = value_ones.shape[-1] - 1
    total = out_sums[..., Dv:]
    safe = xp.where(total == zero, xp.ones_like(total), total)
    out = out_sums[..., :Dv] / safe
    weights = divide_into(e, safe, xp=xp, in_place=in_place) if return_weights else None
    return out, weights, (row_max[..., 0], total[..., 0])
