"""Programmable attention: the caller's ``score_mod`` and ``mask_mod``
evaluated on a block of scores, and the block kinds of a block mask.

The callables take torch FlexAttention's arguments in its order,
``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx,
kv_idx)``, with integer index arrays that broadcast against the block's
scores ``(B, H, Lb, Sb)``: ``b`` ``(B, 1, 1, 1)``, ``h`` ``(1, H, 1, 1)``,
``q_idx`` ``(1, 1, Lb, 1)``, ``kv_idx`` ``(1, 1, 1, Sb)``, in the
coordinates of the whole call (a block of a chunked, parallel or Dask path
sees the same indices as the dense path would). They are made here from the
block's global rows and columns and from the global flattened index of each
leading position (``Block.lead_index``, which dropout also keys on), so that
every path and every block gets the same answer.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, cast

from .._lib._namespace import Array, device_of
from .._spec import AttentionSpec, Block

__all__ = ["EMPTY", "FULL", "PARTIAL", "block_kind", "has_modifiers", "indices", "modify",
           "modify_backward"]

# The kinds of a block of a block mask.
EMPTY, PARTIAL, FULL = 0, 1, 2


def has_modifiers(spec: AttentionSpec) -> bool:
    """Whether the call has a ``score_mod`` or a ``mask_mod``."""
    return spec.score_mod is not None or spec.mask_mod is not None


def _ungrouped(x: Array, groups: tuple[int, int] | None, core: int, xp: ModuleType) -> Array:
    """A grouped-query block ``(..., Hkv, G, *core)`` as ``(..., H, *core)``."""
    if groups is None:
        return x
    shape = tuple(x.shape)
    n = len(shape) - core
    return xp.reshape(x, shape[: n - 2] + (shape[n - 2] * shape[n - 1],) + shape[n:])


def indices(spec: AttentionSpec, block: Block, rows: slice, cols: slice, ndim: int, /, *,
            xp: ModuleType, device: Any) -> tuple[Array, Array, Array, Array]:
    """``(b, h, q_idx, kv_idx)`` of the score block ``(rows, cols)`` (rows
    counted from ``block.row_start``), for ungrouped scores of ``ndim`` axes:
    ``b`` the flattened index over the batch axes, shaped as them followed
    by ``(1, 1, 1)``; ``h`` ``(1, ..., H, 1, 1)``; ``q_idx`` the query's
    global row (with a cache, its absolute position); ``kv_idx`` the key's."""
    lead = cast(Array, block.lead_index)  # filled by with_lead_index for modifiers
    lead = _ungrouped(lead, spec.mod_groups, 0, xp)
    heads = max(1, spec.mod_heads)
    flat = xp.reshape(lead, tuple(lead.shape) + (1, 1))
    while flat.ndim < ndim:
        flat = xp.expand_dims(flat, axis=0)
    n_batch = ndim - 3
    b = (flat // heads)[..., 0:1, :, :] if ndim >= 3 else flat // heads
    h = flat % heads
    if n_batch > 0:
        h = h[(slice(0, 1),) * n_batch + (Ellipsis,)]
    pad = (1,) * (ndim - 2)
    if spec.mod_q_index is not None:
        q = spec.mod_q_index[..., slice(rows.start, rows.stop)]
        q_idx = xp.expand_dims(q, axis=-1)
        while q_idx.ndim < ndim:
            q_idx = xp.expand_dims(q_idx, axis=0)
    else:
        start = block.row_start + rows.start
        q_idx = xp.reshape(xp.arange(start, start + rows.stop - rows.start, device=device),
                           pad + (rows.stop - rows.start, 1))
    kv_idx = xp.reshape(xp.arange(cols.start, cols.stop, device=device),
                        pad + (1, cols.stop - cols.start))
    dtype = q_idx.dtype
    return (xp.astype(b, dtype), xp.astype(h, dtype), q_idx, kv_idx)


def modify(s: Array, spec: AttentionSpec, block: Block, rows: slice, cols: slice, /, *,
           xp: ModuleType, skip_mask: bool = False) -> tuple[Array, Array | None]:
    """``(s', allowed)``: the block's scores through ``score_mod`` and the
    "may attend" mask of ``mask_mod`` (None: no ``mask_mod``, or
    ``skip_mask``, a block the block mask knows to be full)."""
    groups = spec.mod_groups
    flat = _ungrouped(s, groups, 2, xp)
    b, h, q_idx, kv_idx = indices(spec, block, rows, cols, flat.ndim, xp=xp,
                                  device=device_of(s))
    allowed = None
    if spec.mask_mod is not None and not skip_mask:
        allowed = spec.mask_mod(b, h, q_idx, kv_idx)
        allowed = xp.broadcast_to(allowed, tuple(flat.shape)) if groups is not None else allowed
        allowed = _regroup(allowed, s, groups, xp)
    if spec.score_mod is not None:
        out = spec.score_mod(flat, b, h, q_idx, kv_idx)
        if out.dtype != s.dtype:  # a captured array of a wider dtype: the scores' own
            out = xp.astype(out, s.dtype)
        if tuple(out.shape) != tuple(flat.shape):
            out = xp.broadcast_to(out, tuple(flat.shape))
        s = _regroup(out, s, groups, xp)
    return s, allowed


def modify_backward(ds: Array, /, *, before: Array, spec: AttentionSpec, block: Block,
                    rows: slice, cols: slice, xp: ModuleType) -> Array:
    """The gradient with respect to the scores ``before`` that ``score_mod``
    was given, from ``ds``, the one with respect to its result: through
    ``spec.score_mod_vjp``, whose gradients of captured arrays (when it
    returns them) are summed into ``spec.mod_grads``; ``ds`` itself when
    there is none (a ``score_mod`` that adds a term that does not depend on
    the score)."""
    if spec.score_mod_vjp is None:
        return ds
    groups = spec.mod_groups
    flat = _ungrouped(ds, groups, 2, xp)
    b, h, q_idx, kv_idx = indices(spec, block, rows, cols, flat.ndim, xp=xp,
                                  device=device_of(ds))
    got = spec.score_mod_vjp(flat, _ungrouped(before, groups, 2, xp), b, h, q_idx, kv_idx)
    if isinstance(got, tuple):
        got, captured = got
        sums = cast("dict[str, Array]", spec.mod_grads)
        for name, g in captured.items():
            sums[name] = g if name not in sums else sums[name] + g
    if got.dtype != ds.dtype:
        got = xp.astype(got, ds.dtype)
    return _regroup(xp.broadcast_to(got, tuple(flat.shape)), ds, groups, xp)


def _regroup(x: Array, like: Array, groups: tuple[int, int] | None, xp: ModuleType) -> Array:
    """An ungrouped block back in the grouped layout of ``like``."""
    if groups is None:
        return x
    return xp.reshape(xp.broadcast_to(x, tuple(_shape_ungrouped(like))), tuple(like.shape))


def _shape_ungrouped(like: Array) -> tuple[int, ...]:
    shape = tuple(like.shape)
    n = len(shape) - 2
    return shape[: n - 2] + (shape[n - 2] * shape[n - 1],) + shape[n:]


def block_kind(spec: AttentionSpec, block: Block, rows: slice, cols: slice) -> int:
    """What the block mask knows of the score block ``(rows, cols)`` (rows
    counted from ``block.row_start``) for every leading position: ``EMPTY``
    (skip it), ``FULL`` (every score allowed: no ``mask_mod`` to evaluate) or
    ``PARTIAL``. Without a block mask, or one whose kinds could not be read
    on the host, every block is ``PARTIAL``. Positions of a cache (a query
    index that is not its row) are not what the block mask was made for:
    ``PARTIAL`` too."""
    bm = spec.block_mask
    kinds = None if bm is None else bm.host_kinds
    if kinds is None or spec.mod_q_index is not None:
        return PARTIAL
    bq, bk = bm.block_size
    r0, r1 = block.row_start + rows.start, block.row_start + rows.stop
    if r0 % bq == 0 and r1 - r0 <= bq and cols.start % bk == 0 and cols.stop - cols.start <= bk:
        return int(kinds[r0 // bq, cols.start // bk])  # one block of the mask: no reduction
    part = kinds[r0 // bq: -(-r1 // bq), cols.start // bk: -(-cols.stop // bk)]
    if part.size == 0:
        return PARTIAL
    if (part == EMPTY).all():
        return EMPTY
    if (part == FULL).all():
        return FULL
    return PARTIAL
