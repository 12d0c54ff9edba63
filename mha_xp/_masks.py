"""Masks built from index arithmetic, never from user-sized Python loops.

Everything that depends on where a score sits, rather than on its value (the
causal triangle, the sliding window, the sequences of a packed batch, the
ALiBi distance, the dropout keep-mask), is computed here from the *global*
query and key indices of a block (:func:`block_indices`), so that a block of
any path (dense, chunked, backward, a Dask task) gets the same answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

from ._checks import check_positive_int
from ._lib._namespace import Array
from ._random import dropout_keep

__all__ = [
    "Variants",
    "alibi_slopes",
    "block_indices",
    "combine",
    "dropout_scale",
    "key_range",
    "positional",
    "rel_bounds",
    "with_lead_index",
]


@dataclass(frozen=True)
class Variants:
    """The score-level variants of one attention call, validated.

    Positions are measured by ``rel = diag(i) - j``, the distance of key ``j``
    left of query ``i``'s diagonal, where ``diag(i)`` is the key bottom-right
    aligned with query ``i``: ``i + offset`` (``offset = S - L`` unless given,
    and shifted for a block of rows that does not start at 0), or, for packed
    sequences with different query and key boundaries, ``q_diag[i]``.

    Attributes
    ----------
    window : (int, int) or None
        ``(left, right)``: keys with ``-right <= rel <= left`` are seen; a
        negative entry is unbounded.
    softcap : float or None
        Scores ``s -> softcap * tanh(s / softcap)`` before any bias.
    neg_slopes : array or None
        Minus the ALiBi slopes, broadcastable to the leading (batch, head)
        shape followed by ``(1, 1)``, in the compute dtype; adds
        ``neg_slopes * |rel|``.
    q_seg, k_seg : array or None
        The sequence of each query ``(L,)`` and key ``(S,)`` of a packed batch.
    q_diag : array or None
        ``diag(i)`` per query ``(L,)``, when it is not ``i + offset``.
    offset : int or None
        ``diag(0)`` of the rows at hand (default ``S - L``).
    dropout : (float, int) or None
        ``(p, seed)``: dropout on the attention weights with probability
        ``0 < p <= 1``, its keep-mask from :func:`~mha_xp._random.dropout_keep`
        at the global position (flattened leading index, query row, key
        column) under ``seed``.
    lead_index : array or None
        The global flattened index of each leading (batch, head) position of
        the rows at hand, int32, of the broadcast leading shape; None: the
        C-order index over that shape (``arange(prod(lead))`` reshaped).
    row_start : int
        Global index of the first row at hand (a Dask task's block of rows).
    """

    window: tuple[int, int] | None = None
    softcap: float | None = None
    neg_slopes: Array | None = None
    q_seg: Array | None = None
    k_seg: Array | None = None
    q_diag: Array | None = None
    offset: int | None = None
    dropout: tuple[float, int] | None = None
    lead_index: Array | None = None
    row_start: int = 0

    def positional(self) -> bool:
        """Whether a mask or bias depends on the positions beyond the causal triangle."""
        return self.window is not None or self.neg_slopes is not None or self.q_seg is not None


def alibi_slopes(num_heads: int) -> list[float]:
    """The standard ALiBi slopes for ``num_heads`` heads, as Python floats.

    For ``n`` a power of two, the geometric sequence ``2**(-8 k / n)``,
    ``k = 1 .. n``; otherwise the slopes of the closest smaller power of two
    ``c``, followed by the first ``n - c`` of the odd-numbered slopes for
    ``2 c`` heads (Press et al., "Train Short, Test Long", and the
    reference implementation of the paper and BLOOM).

    Parameters
    ----------
    num_heads : int
        The number of (query) heads, positive.

    Returns
    -------
    list of float
        ``num_heads`` slopes, largest first; a plain list, so that it goes to
        any library and device with ``xp.asarray(slopes, dtype=...,
        device=...)`` (the attention functions also take it as it is).

    Raises
    ------
    TypeError, ValueError
        ``num_heads`` that is not a positive int.

    Examples
    --------
    >>> import mha_xp
    >>> mha_xp.alibi_slopes(8)
    [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
    >>> [round(s, 4) for s in mha_xp.alibi_slopes(6)]
    [0.25, 0.0625, 0.0156, 0.0039, 0.5, 0.125]
    """
    n = check_positive_int("num_heads", num_heads)
    closest = 2 ** (n.bit_length() - 1)
    # One correctly rounded power per slope, where the reference multiplies
    # start * start**k (they agree to about 1e-14 relative).
    slopes = [2.0 ** (-8.0 * (k + 1) / closest) for k in range(closest)]
    return slopes + [2.0 ** (-4.0 * (2 * k + 1) / closest) for k in range(n - closest)]


def rel_bounds(is_causal: bool, window: tuple[int, int] | None) -> tuple[int | None, int | None]:
    """``(lo, hi)``: the keys seen have ``lo <= rel <= hi`` (None: unbounded)."""
    lo = 0 if is_causal else None
    hi = None
    if window is not None:
        left, right = window
        if right >= 0:
            lo = -right if lo is None else max(lo, -right)
        if left >= 0:
            hi = left
    return lo, hi


def key_range(i0: int, i1: int, S: int, offset: int, is_causal: bool,
              variants: Variants | None) -> tuple[int, int]:
    """``(j0, j1)``: query rows ``i0 .. i1 - 1`` see no key outside
    ``j0 <= j < j1`` (the causal triangle and the window; empty when
    ``j0 == j1``). With per-sequence diagonals nothing is known statically."""
    if variants is not None and variants.q_diag is not None:
        return 0, S
    lo, hi = rel_bounds(is_causal, None if variants is None else variants.window)
    j1 = S if lo is None else max(0, min(S, i1 + offset - lo))
    j0 = 0 if hi is None else max(0, min(S, i0 + offset - hi))
    return j0, max(j0, j1)


def block_indices(rows: slice, cols: slice, /, *, xp: ModuleType, device: Any) -> tuple[Array, Array]:
    """The global query indices ``(rows, 1)`` and key indices ``(1, cols)`` of
    a score block: the one place where a block's coordinates are made (a
    counter-based random generator keyed by position starts from these)."""
    i = xp.arange(rows.start, rows.stop, device=device)
    j = xp.arange(cols.start, cols.stop, device=device)
    return xp.expand_dims(i, axis=1), xp.expand_dims(j, axis=0)


def positional(
    rows: slice, cols: slice, /, *, offset: int, is_causal: bool, variants: Variants | None,
    dtype: Any, xp: ModuleType, device: Any,
) -> tuple[Array | None, Array | None]:
    """The position-dependent part of a score block of rows ``rows`` (indices
    counted from the first row of the call) and keys ``cols``.

    Returns ``(allowed, bias)``: the "may attend" mask of the causal
    triangle, the window and the packed sequences (None: all allowed), and
    the ALiBi bias ``-slope * |rel|`` (None without ALiBi).
    """
    q_diag = None if variants is None else variants.q_diag
    lo, hi = rel_bounds(is_causal, None if variants is None else variants.window)
    if q_diag is None:
        # Static diagonals: the triangle and the window only where the block crosses them.
        rel_min = rows.start + offset - (cols.stop - 1)
        rel_max = rows.stop - 1 + offset - cols.start
        lo = None if lo is not None and rel_min >= lo else lo
        hi = None if hi is not None and rel_max <= hi else hi
    slopes = None if variants is None else variants.neg_slopes
    segments = variants is not None and variants.q_seg is not None
    if lo is None and hi is None and slopes is None and not segments:
        return None, None
    i, j = block_indices(rows, cols, xp=xp, device=device)
    diag = i + offset if q_diag is None else xp.expand_dims(q_diag[rows], axis=1)
    rel = diag - j
    allowed = None
    if lo is not None:
        allowed = rel >= lo
    if hi is not None:
        allowed = combine(allowed, rel <= hi, xp=xp)
    if segments:
        same = (xp.expand_dims(variants.q_seg[rows], axis=1)
                == xp.expand_dims(variants.k_seg[cols], axis=0))
        allowed = combine(allowed, same, xp=xp)
    bias = None
    if slopes is not None:
        bias = slopes * xp.abs(xp.astype(rel, dtype))
    return allowed, bias


def with_lead_index(variants: Variants | None, lead: tuple[int, ...], /, *, xp: ModuleType,
                    device: Any) -> Variants | None:
    """``variants`` with the leading index of dropout filled in: the C-order
    flattened index over the broadcast leading shape ``lead`` (made once per
    call, not once per block). Unchanged without dropout or when given."""
    if variants is None or variants.dropout is None or variants.lead_index is not None:
        return variants
    index = xp.arange(math.prod(lead), dtype=xp.int32, device=device)
    return replace(variants, lead_index=xp.reshape(index, lead))


def dropout_scale(
    rows: slice, cols: slice, /, *, variants: Variants | None, dtype: Any, xp: ModuleType,
    device: Any,
) -> Array | None:
    """``Z / (1 - p)`` of a score block, in ``dtype``: the dropout keep-mask
    ``Z`` of rows ``rows`` (counted from ``variants.row_start``) and keys
    ``cols``, over the leading positions ``variants.lead_index`` (filled by
    :func:`with_lead_index`), of shape ``lead + (rows, cols)``; zeros for
    ``p = 1``. None without dropout. Regenerated from the seed by every path
    and by the backward; never stored."""
    if variants is None or variants.dropout is None:
        return None
    p, seed = variants.dropout
    index = variants.lead_index
    lead = tuple(index.shape)
    r0 = variants.row_start
    n, m = rows.stop - rows.start, cols.stop - cols.start
    if p >= 1.0:
        return xp.zeros(lead + (n, m), dtype=dtype, device=device)
    # dropout_keep reads a 0-d index array as a leading axis; give it one of size 1.
    keep = dropout_keep(seed, xp.reshape(index, (-1,)) if not lead else index,
                        range(r0 + rows.start, r0 + rows.stop), range(cols.start, cols.stop),
                        p, xp=xp, device=device)
    if not lead:
        keep = xp.reshape(keep, (n, m))
    return xp.where(keep, xp.asarray(1.0 / (1.0 - p), dtype=dtype, device=device),
                    xp.asarray(0.0, dtype=dtype, device=device))


def combine(a: Array | None, b: Array | None, /, *, xp: ModuleType) -> Array | None:
    """Logical AND of two optional "may attend" masks (None means all True)."""
    if a is None:
        return b
    if b is None:
        return a
    return xp.logical_and(a, b)
