"""Positional semantics, once: everything that depends on where a score
sits rather than on its value.

The causal triangle, the sliding window, the sequences of a packed batch,
the ALiBi distance, the positions of a KV cache, the position-free keys of
``add_bias_kv``/``add_zero_attn`` and the dropout keep-mask are computed
here from the *global* query and key indices of a block
(:func:`block_indices`), so that a block of any path (dense, chunked,
backward, a Dask task, a decoding step) gets the same answer.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, cast

from .._lib._namespace import Array
from .._lib._random import dropout_keep
from .._spec import AttentionSpec, Block

__all__ = [
    "block_indices",
    "combine",
    "diag_offset",
    "dropout_scale",
    "key_range",
    "positional",
    "rel_bounds",
    "standard_alibi_slopes",
    "with_lead_index",
]


def standard_alibi_slopes(n: int) -> list[float]:
    """The ALiBi slopes of ``n >= 1`` heads (Press et al.; BLOOM's reference):
    for a power of two the geometric sequence ``2**(-8 k / n)``, otherwise
    those of the closest smaller power of two ``c`` followed by the first
    ``n - c`` odd-numbered slopes of ``2 c`` heads."""
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


def diag_offset(L: int, S: int, spec: AttentionSpec, block: Block) -> int:
    """``diag(0)``: the key bottom-right aligned with the first row at hand
    (the last positional key, when position-free keys follow)."""
    if block.offset is not None:
        return block.offset
    return (S if spec.free_from is None else spec.free_from) - L


def key_range(i0: int, i1: int, S: int, offset: int, spec: AttentionSpec) -> tuple[int, int]:
    """``(j0, j1)``: query rows ``i0 .. i1 - 1`` see no key outside
    ``j0 <= j < j1`` (the causal triangle and the window; empty when
    ``j0 == j1``). With per-query diagonals or position-free keys nothing is
    known statically."""
    if spec.q_diag is not None or spec.free_from is not None:
        return 0, S
    lo, hi = rel_bounds(spec.is_causal, spec.window)
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


def _static_bounds(spec: AttentionSpec, rows: slice, cols: slice,
                   offset: int) -> tuple[int | None, int | None]:
    """The bounds on ``rel`` that the block ``(rows, cols)`` crosses (None:
    the block lies within that bound), for diagonals ``i + offset``."""
    lo, hi = rel_bounds(spec.is_causal, spec.window)
    last = cols.stop if spec.free_from is None else min(cols.stop, spec.free_from)
    if last <= cols.start:  # only position-free keys
        return None, None
    rel_min = rows.start + offset - (last - 1)
    rel_max = rows.stop - 1 + offset - cols.start
    lo = None if lo is not None and rel_min >= lo else lo
    hi = None if hi is not None and rel_max <= hi else hi
    return lo, hi


def positional(
    spec: AttentionSpec, rows: slice, cols: slice, offset: int, /, *, dtype: Any,
    xp: ModuleType, device: Any,
) -> tuple[Array | None, Array | None]:
    """The position-dependent part of a score block of rows ``rows`` (counted
    from the first row at hand, whose diagonal is ``offset``) and keys ``cols``.

    Returns ``(allowed, bias)``: the "may attend" mask of the causal
    triangle, the window and the packed sequences (None: all allowed), and
    the ALiBi bias ``-slope * |rel|`` (None without ALiBi).
    """
    if not spec.is_causal and spec.window is None and spec.neg_slopes is None \
            and spec.q_seg is None:  # nothing depends on positions: the common case, first
        return None, None
    if spec.q_diag is None:
        lo, hi = _static_bounds(spec, rows, cols, offset)
    else:
        lo, hi = rel_bounds(spec.is_causal, spec.window)
    slopes, segments = spec.neg_slopes, spec.q_seg is not None
    if lo is None and hi is None and slopes is None and not segments:
        return None, None
    i, j = block_indices(rows, cols, xp=xp, device=device)
    diag = i + offset if spec.q_diag is None else xp.expand_dims(spec.q_diag[..., rows], axis=-1)
    rel = diag - j
    allowed = None
    if lo is not None:
        allowed = rel >= lo
    if hi is not None:
        allowed = combine(allowed, rel <= hi, xp=xp)
    if segments:  # spec.q_seg is not None; packed batches give k_seg with it
        same = (xp.expand_dims(cast(Array, spec.q_seg)[rows], axis=1)
                == xp.expand_dims(cast(Array, spec.k_seg)[cols], axis=0))
        allowed = combine(allowed, same, xp=xp)
    bias = None
    if slopes is not None:
        bias = slopes * xp.abs(xp.astype(rel, dtype))
    if spec.free_from is not None and cols.stop > spec.free_from:
        free = j >= spec.free_from
        allowed = None if allowed is None else xp.logical_or(allowed, free)
        if bias is not None:
            bias = xp.where(free, xp.zeros((), dtype=dtype, device=device), bias)
    return allowed, bias


def with_lead_index(spec: AttentionSpec, block: Block, lead: tuple[int, ...], /, *,
                    xp: ModuleType, device: Any) -> Block:
    """``block`` with the leading index that dropout and the modifiers key
    on filled in: the C-order flattened index over the broadcast leading
    shape ``lead`` (made once per call, not once per block). Unchanged
    without dropout or modifiers, or when given."""
    if (spec.dropout is None and spec.score_mod is None and spec.mask_mod is None) \
            or block.lead_index is not None:
        return block
    index = xp.arange(math.prod(lead), dtype=xp.int32, device=device)
    return Block(block.row_start, block.offset, xp.reshape(index, lead))


def dropout_scale(
    spec: AttentionSpec, block: Block, rows: slice, cols: slice, /, *, dtype: Any,
    xp: ModuleType, device: Any,
) -> Array | None:
    """``Z / (1 - p)`` of a score block, in ``dtype``: the dropout keep-mask
    ``Z`` of rows ``rows`` (counted from ``block.row_start``) and keys
    ``cols``, over the leading positions ``block.lead_index`` (filled by
    :func:`with_lead_index`), of shape ``lead + (rows, cols)``; zeros for
    ``p = 1``. None without dropout. Regenerated from the seed by every path
    and by the backward; never stored."""
    if spec.dropout is None:
        return None
    p, seed = spec.dropout
    index = cast(Array, block.lead_index)  # filled by with_lead_index when dropout is on
    lead = tuple(index.shape)
    r0 = block.row_start
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
