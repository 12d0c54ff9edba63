"""Attention in memory linear in the sequence length: the FlashAttention-2
forward (online softmax over key blocks), written against the array API.

For each block of queries, a running row maximum ``m``, a running sum ``l``
of ``exp(s - m)`` and an unnormalised output ``acc`` are carried over the key
blocks; when a block raises the maximum, the old sum and output are rescaled
by ``exp(m_old - m_new)``. Only one ``(..., q_block, k_block)`` score block
is alive at a time. Masks from ``is_causal``, the sliding window, packed
sequences and padding, and the ALiBi bias, are built per block from index
arithmetic (:func:`block_scores`); key blocks entirely above the causal
diagonal or outside the window are skipped.

With dropout, the running sum ``l`` adds the undropped ``exp(s - m)`` (the
softmax's normaliser), and only the product with the values uses
``exp(s - m) * Z / (1 - p)``, with the keep-mask ``Z`` of the block regenerated
from the seed and the block's global position
(:func:`~mha_xp._masks.dropout_scale`).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from array_api_compat import device as device_of

from ._lib._inplace import (
    add_into,
    divide_into,
    multiply_into,
    shifted_exp,
    softcap_into,
    writes_in_place,
)
from ._masks import Variants, combine, dropout_scale, key_range, positional, with_lead_index
from ._lib._namespace import Array

__all__ = [
    "block_scores",
    "broadcast_lead",
    "diag_offset",
    "chunked_attention",
    "chunked_weights",
    "lse_from_stats",
    "merge_partials",
    "probabilities",
    "slice_block",
]


def slice_block(x: Array | None, rows: slice, cols: slice) -> Array | None:
    """The ``(rows, cols)`` block of an array broadcastable to ``(..., L, S)``
    and at least 2-D. An axis of size 1 (broadcast) is kept whole, and so is
    an axis the block covers entirely (no copy on libraries that copy slices)."""
    if x is None:
        return None
    whole_r = x.shape[-2] == 1 or (rows.start == 0 and rows.stop == x.shape[-2])
    whole_c = x.shape[-1] == 1 or (cols.start == 0 and cols.stop == x.shape[-1])
    if whole_r and whole_c:
        return x
    return x[..., rows if not whole_r else slice(None), cols if not whole_c else slice(None)]


def block_scores(
    q: Array,
    key: Array,
    /,
    *,
    mask: Array | None,
    key_keep: Array | None,
    bias: Array | None,
    is_causal: bool,
    rows: slice,
    cols: slice,
    offset: int,
    xp: ModuleType,
    in_place: bool = False,
    variants: Variants | None = None,
    return_tanh: bool = False,
) -> Array | tuple[Array, Array | None]:
    """Scores of the query block ``q`` (already scaled) against keys ``cols``:
    soft-capped, plus ``bias`` and ALiBi, with ``-inf`` where the block's
    mask, padding, causal triangle, window or packed sequences forbid.

    Every path (dense, chunked, backward, a Dask task) computes its scores
    here. ``rows`` and ``cols`` are the block's indices; the positions of its
    entries come from :func:`~mha_xp._masks.positional`. With
    ``return_tanh=True`` also returns ``tanh(s / softcap)`` (None without
    soft-capping), which the backward needs.
    """
    s = xp.matmul(q, xp.matrix_transpose(key[..., cols, :] if cols.stop - cols.start
                                         != key.shape[-2] else key))
    cap = None if variants is None else variants.softcap
    t = None
    if cap is not None:
        if return_tanh:  # kept apart from s: the backward needs it
            t = xp.tanh(s / cap)
            s = t * cap
        else:
            s = softcap_into(s, cap, xp=xp, in_place=in_place)
    if bias is not None:
        s = add_into(s, slice_block(bias, rows, cols), xp=xp, in_place=in_place)
    allowed = slice_block(mask, rows, cols)
    if key_keep is not None:
        keep = key_keep if cols.stop - cols.start == key_keep.shape[-1] else key_keep[..., cols]
        allowed = keep if allowed is None else xp.logical_and(allowed, keep)
    where, alibi = positional(rows, cols, offset=offset, is_causal=is_causal,
                              variants=variants, dtype=s.dtype, xp=xp, device=device_of(q))
    if alibi is not None:
        s = add_into(s, alibi, xp=xp, in_place=in_place)
    allowed = combine(allowed, where, xp=xp)
    if allowed is not None:
        s = xp.where(allowed, s, xp.asarray(-math.inf, dtype=s.dtype, device=device_of(s)))
    return (s, t) if return_tanh else s


def chunked_attention(
    query: Array,
    key: Array,
    value: Array,
    /,
    *,
    mask: Array | None,
    key_keep: Array | None,
    bias: Array | None,
    is_causal: bool,
    scale: float,
    q_block: int,
    k_block: int,
    xp: ModuleType,
    in_place: bool | None = None,
    variants: Variants | None = None,
) -> tuple[Array, tuple[Array, Array]]:
    """Blocked attention on validated, already up-cast inputs.

    Parameters
    ----------
    query, key, value : array
        ``(..., L, D)``, ``(..., S, D)``, ``(..., S, Dv)`` in the compute dtype.
    mask : array of bool or None
        Broadcastable to ``(..., L, S)``; True = may attend.
    key_keep : array of bool or None
        Broadcastable to ``(..., 1, S)``; False marks padding keys.
    bias : array or None
        Broadcastable to ``(..., L, S)``, in the compute dtype.
    is_causal : bool
        Bottom-right causal masking.
    scale : float
        Factor on the scores.
    q_block, k_block : int
        Block sizes along queries and keys.
    xp : module
        The namespace.
    in_place : bool, optional
        Overwrite score blocks in place (default: where the backend allows;
        False forces the portable path).
    variants : Variants, optional
        Window, soft-capping, ALiBi, packed sequences and dropout
        (:class:`~mha_xp._masks.Variants`).

    Returns
    -------
    out : array
        ``(..., L, Dv)`` in the compute dtype; zero for fully masked rows.
        With dropout, ``(P * Z / (1 - p)) V``.
    stats : (array, array)
        The softmax statistics of each row, ``(..., L)`` each: the shift
        ``m`` (the row maximum, 0 for a row with nothing to attend to) and the
        sum ``l`` of ``exp(s - m)`` (0 for such a row). See
        :func:`lse_from_stats` and :func:`probabilities`.
    """
    L, S = query.shape[-2], key.shape[-2]
    dtype, dev = query.dtype, device_of(query)
    lead = broadcast_lead(query, key, value)
    neg_inf = xp.asarray(-math.inf, dtype=dtype, device=dev)
    zero = xp.asarray(0.0, dtype=dtype, device=dev)
    one = xp.asarray(1.0, dtype=dtype, device=dev)
    offset = diag_offset(L, S, variants)  # bottom-right alignment: query i sees keys j <= i + offset
    query = query * scale  # once per query, not once per score
    if in_place is None:
        in_place = writes_in_place(xp)
    variants = with_lead_index(variants, lead, xp=xp, device=dev)

    outs, maxes, sums = [], [], []
    Dv = value.shape[-1]
    # Without dropout, the row sums of exp(s - m) come out of the P V matmul
    # (BLAS, all cores) through a column of ones appended to V, instead of a
    # separate single-threaded pass over every score block.
    sums_in_matmul = variants is None or variants.dropout is None
    if sums_in_matmul:
        value = with_ones_column(value, xp=xp)
    for i0 in range(0, L, q_block):
        i1 = min(i0 + q_block, L)
        rows = slice(i0, i1)
        q = query[..., rows, :]
        m = l = acc = None
        # Key blocks beyond the causal diagonal or outside the window are skipped.
        j_start, j_end = key_range(i0, i1, S, offset, is_causal, variants)
        for j0 in range(j_start, j_end, k_block):
            j1 = min(j0 + k_block, j_end)
            cols = slice(j0, j1)
            s = block_scores(q, key, mask=mask, key_keep=key_keep, bias=bias,
                             is_causal=is_causal, rows=rows, cols=cols, offset=offset, xp=xp,
                             in_place=in_place, variants=variants)
            block_max = xp.max(s, axis=-1, keepdims=True)
            m_new = block_max if m is None else xp.maximum(m, block_max)
            # A row with nothing allowed yet has max -inf: shift by 0 so exp gives 0.
            shift = xp.where(m_new == neg_inf, zero, m_new)
            p = shifted_exp(s, shift, xp=xp, in_place=in_place)
            if sums_in_matmul:
                pv = xp.matmul(p, value[..., cols, :])  # (..., rows, Dv + 1): sums last
                alpha = None if m is None else xp.exp(m - shift)
                acc = pv if m is None else alpha * acc + pv
                m = m_new
                continue
            p_sum = xp.sum(p, axis=-1, keepdims=True)  # undropped: the softmax's normaliser
            drop = dropout_scale(rows, cols, variants=variants, dtype=dtype, xp=xp, device=dev)
            if drop is not None:
                p = multiply_into(p, drop, xp=xp, in_place=in_place)
            pv = xp.matmul(p, value[..., cols, :])
            if m is None:
                l, acc = p_sum, pv
            else:
                alpha = xp.exp(m - shift)  # rescales what the earlier blocks summed
                l = alpha * l + p_sum
                acc = alpha * acc + pv
            m = m_new
        rows_lead = lead + (i1 - i0,)
        if m is None:  # every key block lies outside the diagonal band: nothing to attend to
            outs.append(xp.zeros(rows_lead + (Dv,), dtype=dtype, device=dev))
            maxes.append(xp.zeros(rows_lead, dtype=dtype, device=dev))
            sums.append(xp.zeros(rows_lead, dtype=dtype, device=dev))
            continue
        if sums_in_matmul:
            acc, l = acc[..., :Dv], acc[..., Dv:]
        outs.append(xp.broadcast_to(acc / xp.where(l == zero, one, l), rows_lead + (Dv,)))
        maxes.append(xp.broadcast_to(xp.where(m == neg_inf, zero, m)[..., 0], rows_lead))
        sums.append(xp.broadcast_to(l[..., 0], rows_lead))
    if len(outs) == 1:
        return outs[0], (maxes[0], sums[0])
    return xp.concat(outs, axis=-2), (xp.concat(maxes, axis=-1), xp.concat(sums, axis=-1))


def with_ones_column(value: Array, /, *, xp: ModuleType) -> Array:
    """``value`` with a column of ones appended, ``(..., S, Dv + 1)``: then
    ``P @ result`` holds ``P @ value`` and, in its last column, the row sums
    of ``P``, computed by the matmul rather than by a separate pass over
    ``P``."""
    ones = xp.ones(tuple(value.shape[:-1]) + (1,), dtype=value.dtype, device=device_of(value))
    return xp.concat([value, ones], axis=-1)


def diag_offset(L: int, S: int, variants: Variants | None) -> int:
    """``diag(0)``: the key bottom-right aligned with the first query row."""
    if variants is not None and variants.offset is not None:
        return variants.offset
    return S - L


def lse_from_stats(stats: tuple[Array, Array], /, *, xp: ModuleType) -> Array:
    """``log(sum exp(s))`` from the softmax statistics ``(m, l)`` of a row:
    ``m + log(l)``, or ``+inf`` for a row with nothing to attend to (``l = 0``),
    so that ``exp(s - lse)`` is 0 there, as in FlashAttention."""
    m, l = stats
    dev = device_of(m)
    empty = l == xp.asarray(0.0, dtype=l.dtype, device=dev)
    safe = xp.where(empty, xp.asarray(1.0, dtype=l.dtype, device=dev), l)
    return xp.where(empty, xp.asarray(math.inf, dtype=l.dtype, device=dev), m + xp.log(safe))


def probabilities(s: Array, stats: tuple[Array, Array], /, *, xp: ModuleType,
                  in_place: bool) -> Array:
    """Attention probabilities ``exp(s - m) / l`` of a score block, from the
    row statistics of the forward (``(..., rows, 1)`` each). Using ``m`` and
    ``l`` rather than ``exp(s - lse)`` keeps float32 exact to rounding even
    when scores are large (``lse`` rounded to float32 would cost ``|lse|·eps``).
    """
    m, l = stats
    safe = xp.where(l == xp.asarray(0.0, dtype=l.dtype, device=device_of(l)), xp.ones_like(l), l)
    return divide_into(shifted_exp(s, m, xp=xp, in_place=in_place), safe, xp=xp,
                       in_place=in_place)


def merge_partials(
    out1: Array, lse1: Array, out2: Array, lse2: Array, /, *, xp: ModuleType
) -> tuple[Array, Array]:
    """Merge attention over two disjoint key sets.

    ``lse = logaddexp(lse1, lse2)``, ``out = exp(lse1 - lse) out1 + exp(lse2 - lse) out2``,
    where an ``lse`` of ``+inf`` marks a row that had no key (its output is
    ignored, its weight is 0).
    """
    dtype, dev = out1.dtype, device_of(out1)
    pos_inf = xp.asarray(math.inf, dtype=lse1.dtype, device=dev)
    zero = xp.asarray(0.0, dtype=lse1.dtype, device=dev)
    e1, e2 = lse1 == pos_inf, lse2 == pos_inf
    both = xp.logical_and(e1, e2)
    # The larger of the two (ignoring empty sides) keeps exp() from overflowing.
    top = xp.where(e1, lse2, xp.where(e2, lse1, xp.maximum(lse1, lse2)))
    top = xp.where(both, zero, top)
    w1 = xp.where(e1, zero, xp.exp(lse1 - top))
    w2 = xp.where(e2, zero, xp.exp(lse2 - top))
    total = w1 + w2
    lse = xp.where(both, pos_inf, top + xp.log(xp.where(both, xp.ones_like(total), total)))
    safe = xp.where(both, xp.ones_like(total), total)
    w1, w2 = xp.expand_dims(w1 / safe, axis=-1), xp.expand_dims(w2 / safe, axis=-1)
    out = w1 * xp.where(xp.expand_dims(e1, axis=-1), xp.zeros((), dtype=dtype, device=dev), out1) \
        + w2 * xp.where(xp.expand_dims(e2, axis=-1), xp.zeros((), dtype=dtype, device=dev), out2)
    return out, lse


def chunked_weights(
    query: Array,
    key: Array,
    stats: tuple[Array, Array],
    /,
    *,
    mask: Array | None,
    key_keep: Array | None,
    bias: Array | None,
    is_causal: bool,
    scale: float,
    q_block: int,
    k_block: int,
    xp: ModuleType,
    in_place: bool | None = None,
    variants: Variants | None = None,
) -> Array:
    """The attention weights ``exp(s - m) / l``, recomputed block by block
    from the forward's row statistics, so that asking for them never changes
    the output. Rows with nothing to attend to are all zero."""
    L, S = query.shape[-2], key.shape[-2]
    offset = diag_offset(L, S, variants)
    query = query * scale
    if in_place is None:
        in_place = writes_in_place(xp)
    m, l = (xp.expand_dims(t, axis=-1) for t in stats)
    rows_out = []
    for i0 in range(0, L, q_block):
        rows = slice(i0, min(i0 + q_block, L))
        q, row_stats = query[..., rows, :], (m[..., rows, :], l[..., rows, :])
        blocks = [
            probabilities(
                block_scores(q, key, mask=mask, key_keep=key_keep, bias=bias, is_causal=is_causal,
                             rows=rows, cols=slice(j0, min(j0 + k_block, S)), offset=offset,
                             xp=xp, in_place=in_place, variants=variants),
                row_stats, xp=xp, in_place=in_place)
            for j0 in range(0, S, k_block)
        ]
        rows_out.append(blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=-1))
    return rows_out[0] if len(rows_out) == 1 else xp.concat(rows_out, axis=-2)


def broadcast_lead(*arrays: Array) -> tuple[int, ...]:
    """The broadcast of the leading (batch, head) shapes of ``(..., n, d)``
    arrays, already validated as broadcastable (a size-0 axis stays 0)."""
    shapes = [tuple(a.shape[:-2]) for a in arrays]
    ndim = max(len(shape) for shape in shapes)
    lead = []
    for axis in range(-ndim, 0):
        sizes = {shape[axis] for shape in shapes if len(shape) >= -axis} - {1}
        lead.append(sizes.pop() if sizes else 1)
    return tuple(lead)
