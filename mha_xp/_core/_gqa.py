"""Grouped-query attention as ordinary attention on reshaped arrays.

``Hq = Hkv * G`` query heads on axis -3 against ``Hkv`` key/value heads run
as queries reshaped to ``(..., Hkv, G, L, D)`` against keys and values with a
size-1 group axis, which broadcasts: no copy of the keys and values per
query head. Score-shaped arrays of the spec are reshaped the same way.
"""

from __future__ import annotations

from types import ModuleType

from .._lib._namespace import Array
from .._spec import AttentionSpec, Block

__all__ = ["gqa_groups", "group", "group_spec", "split_heads", "ungroup"]


def gqa_groups(query: Array, key: Array, value: Array) -> tuple[int, int] | None:
    """``(Hkv, G)`` when the query heads (axis -3) are ``G > 1`` groups of the
    ``Hkv > 1`` key/value heads, else None (equal heads, or a head axis of 1
    that broadcasts: multi-query attention)."""
    if min(query.ndim, key.ndim, value.ndim) < 3:
        return None
    hq = query.shape[-3]
    hkv = key.shape[-3] if key.shape[-3] != 1 else value.shape[-3]
    if hq == hkv or 1 in (hq, hkv):
        return None
    return hkv, hq // hkv


def group(x: Array | None, groups: tuple[int, int], xp: ModuleType) -> Array | None:
    """An array broadcastable to the ``(..., Hq, L, S)`` scores, reshaped to
    broadcast to ``(..., Hkv, G, L, S)`` (a reshape, never a copy per head)."""
    if x is None or x.ndim < 3:
        return x
    heads = groups if x.shape[-3] != 1 else (1, 1)
    return xp.reshape(x, tuple(x.shape[:-3]) + heads + tuple(x.shape[-2:]))


def group_spec(spec: AttentionSpec, block: Block, groups: tuple[int, int],
               xp: ModuleType) -> tuple[AttentionSpec, Block]:
    """``spec`` and ``block`` with their per-head arrays (mask, padding,
    bias, ALiBi slopes, dropout's leading index) split into ``(Hkv, G)``
    heads; per-sequence diagonals ``(B, 1, L)`` get a second size-1 head axis."""
    if block.lead_index is not None and block.lead_index.ndim >= 1:
        index = block.lead_index
        block = Block(block.row_start, block.offset,
                      xp.reshape(index, tuple(index.shape[:-1]) + groups))
    spec = spec.replace(mask=group(spec.mask, groups, xp), key_keep=group(spec.key_keep, groups, xp),
                        bias=group(spec.bias, groups, xp),
                        neg_slopes=group(spec.neg_slopes, groups, xp))
    for name in ("q_diag", "mod_q_index"):
        rows = getattr(spec, name)
        if rows is not None and rows.ndim >= 2:  # (..., 1, L): one more size-1 head axis
            shape = tuple(rows.shape)
            spec = spec.replace(**{name: xp.reshape(rows, shape[:-2] + (1, 1) + shape[-1:])})
    if spec.score_mod is not None or spec.mask_mod is not None:
        spec = spec.replace(mod_groups=groups)
    return spec, block


def ungroup(x: Array | None, core: int, xp: ModuleType) -> Array | None:
    """Merge the ``(Hkv, G)`` axes in front of the last ``core`` axes back
    into one head axis."""
    if x is None:
        return None
    shape = tuple(x.shape)
    n = len(shape) - core
    return xp.reshape(x, shape[: n - 2] + (shape[n - 2] * shape[n - 1],) + shape[n:])


def split_heads(x: Array, groups: tuple[int, int], core: int, xp: ModuleType) -> Array:
    """Split the head axis in front of the last ``core`` axes into ``(Hkv, G)``."""
    shape = tuple(x.shape)
    n = len(shape) - core
    return xp.reshape(x, shape[: n - 1] + groups + shape[n:])
