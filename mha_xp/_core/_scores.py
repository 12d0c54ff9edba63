"""The scores of one block, as every path computes them (dense, chunked,
backward, a Dask task): one function, so that masks, biases and variants
mean the same everywhere."""

from __future__ import annotations

import math
from types import ModuleType

from .._lib._inplace import add_into, softcap_into
from .._lib._namespace import Array, device_of
from .._lib._shapes import slice_block
from .._spec import AttentionSpec, Block
from ._modifiers import has_modifiers, modify
from ._positions import combine, positional

__all__ = ["block_scores"]


def block_scores(
    q: Array, key: Array, spec: AttentionSpec, rows: slice, cols: slice, offset: int, /, *,
    xp: ModuleType, in_place: bool = False, return_tanh: bool = False,
    block: Block | None = None, full: bool = False,
) -> Array | tuple[Array, Array | None] | tuple[Array, Array | None, Array | None]:
    """Scores of the query block ``q`` (already scaled) against keys ``cols``:
    soft-capped, plus ``spec.bias`` and ALiBi, through the caller's
    ``score_mod``, with ``-inf`` where the mask, padding, causal triangle,
    window, packed sequences or ``mask_mod`` forbid.

    ``rows`` and ``cols`` are the block's indices, ``offset`` the diagonal of
    its first row (:func:`~mha_xp._core._positions.diag_offset`), ``block``
    where the rows sit in the whole call (the modifiers' coordinates).
    ``full``: the block mask knows every score of the block allowed, so
    ``mask_mod`` is not evaluated. With ``return_tanh=True`` also returns
    ``tanh(s / softcap)`` (None without soft-capping) and, with a
    ``score_mod``, the scores it was given (None otherwise), which the
    backward needs. ``in_place`` overwrites the block's own temporaries
    where the backend allows.
    """
    s = xp.matmul(q, xp.matrix_transpose(key[..., cols, :] if cols.stop - cols.start
                                         != key.shape[-2] else key))
    cap = spec.softcap
    t = None
    if cap is not None:
        if return_tanh:  # kept apart from s: the backward needs it
            t = xp.tanh(s / cap)
            s = t * cap
        else:
            s = softcap_into(s, cap, xp=xp, in_place=in_place)
    if spec.bias is not None:
        s = add_into(s, slice_block(spec.bias, rows, cols), xp=xp, in_place=in_place)
    allowed = slice_block(spec.mask, rows, cols)
    key_keep = spec.key_keep
    if key_keep is not None:
        keep = key_keep if cols.stop - cols.start == key_keep.shape[-1] else key_keep[..., cols]
        allowed = keep if allowed is None else xp.logical_and(allowed, keep)
    where, alibi = positional(spec, rows, cols, offset, dtype=s.dtype, xp=xp, device=device_of(q))
    if alibi is not None:
        s = add_into(s, alibi, xp=xp, in_place=in_place)
    allowed = combine(allowed, where, xp=xp)
    before = None
    if has_modifiers(spec):
        before = s if spec.score_mod is not None else None
        s, by_mod = modify(s, spec, Block() if block is None else block, rows, cols, xp=xp,
                           skip_mask=full)
        allowed = combine(allowed, by_mod, xp=xp)
    if allowed is not None:
        s = xp.where(allowed, s, xp.asarray(-math.inf, dtype=s.dtype, device=device_of(s)))
    elif spec.score_mod is not None:
        # What a score_mod returns may be a view or one of its captured
        # arrays: the paths overwrite the scores, so they get their own.
        s = s * 1.0  # a new array (asarray(copy=True) warns on torch tensors with grad)
    return (s, t, before) if return_tanh else s
