"""Masks built from index arithmetic, never from user-sized Python loops."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ._lib._namespace import Array

__all__ = ["causal_mask", "combine"]


def causal_mask(L: int, S: int, /, *, xp: ModuleType, device: Any) -> Array:
    """Boolean ``(L, S)`` mask, True where query ``i`` may attend key ``j``.

    The triangle is aligned bottom-right, as in FlashAttention: query ``i``
    sees keys ``j <= i + S - L``, so the last query always sees the last key
    (right for queries that are the tail of a longer key sequence). For
    ``L == S`` this is the usual lower triangle.
    """
    i = xp.arange(L, device=device)
    j = xp.arange(S, device=device)
    return xp.expand_dims(i + (S - L), axis=1) >= xp.expand_dims(j, axis=0)


def combine(a: Array | None, b: Array | None, /, *, xp: ModuleType) -> Array | None:
    """Logical AND of two optional "may attend" masks (None means all True)."""
    if a is None:
        return b
    if b is None:
        return a
    return xp.logical_and(a, b)
