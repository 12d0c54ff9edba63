"""Attention in memory linear in the sequence length: the FlashAttention-2
forward (online softmax over key blocks), written against the array API.

For each block of queries, a running row maximum ``m``, a running sum ``l``
of ``exp(s - m)`` and an unnormalised output ``acc`` are carried over the key
blocks; when a block raises the maximum, the old sum and output are rescaled
by ``exp(m_old - m_new)``. Only one ``(..., q_block, k_block)`` score block
is alive at a time. Key blocks entirely above the causal diagonal or outside
the window are skipped (:func:`~mha_xp._core._positions.key_range`).

With dropout, the running sum ``l`` adds the undropped ``exp(s - m)`` (the
softmax's normaliser), and only the product with the values uses
``exp(s - m) * Z / (1 - p)``, with the keep-mask ``Z`` of the block regenerated
from the seed and the block's global position
(:func:`~mha_xp._core._positions.dropout_scale`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, cast


from .._lib._backends import writes_in_place
from .._lib._inplace import multiply_into, shifted_exp
from .._lib._namespace import Array, device_of
from .._lib._shapes import broadcast_lead, expand
from .._lib._softmax import probabilities, row_shift, safe_divisor, with_ones_column
from .._spec import AttentionSpec, Block, Plan
from ._modifiers import EMPTY, FULL, block_kind
from ._positions import diag_offset, dropout_scale, key_range, with_lead_index
from ._scores import block_scores

__all__ = ["chunked_attention", "chunked_weights", "run"]


def run(query: Array, key: Array, value: Array, spec: AttentionSpec, block: Block, plan: Plan,
        /, *, xp: ModuleType) -> tuple[Array, Array | None, tuple[Array, Array] | None]:
    """The chunked executor: ``(out, weights or None, stats or None)`` in the
    compute dtype (the weights recomputed block by block from the statistics,
    so that asking for them never changes the output)."""
    blocks = cast("tuple[int, int]", plan.blocks)  # a chunked plan has its blocks
    out, stats = chunked_attention(query, key, value, spec, block, blocks, xp=xp)
    weights = None
    if plan.return_weights:
        lead = broadcast_lead(query, key, value)
        weights = expand(chunked_weights(query, key, stats, spec, block, blocks, xp=xp),
                         lead + (query.shape[-2], key.shape[-2]), xp)
    return out, weights, stats if plan.return_stats else None


class _Rows:
    """The online-softmax state of one block of query rows."""

    def __init__(self) -> None:
        self.m: Any = None
        self.l: Any = None
        self.acc: Any = None


def chunked_attention(
    query: Array, key: Array, value: Array, spec: AttentionSpec, block: Block,
    blocks: tuple[int, int], /, *, xp: ModuleType, in_place: bool | None = None,
) -> tuple[Array, tuple[Array, Array]]:
    """Blocked attention on validated inputs in the compute dtype.

    ``blocks`` are ``(query_block, key_block)``; ``in_place`` overwrites score
    blocks where the backend allows (default), False forces the portable path.
    Returns ``out`` ``(..., L, Dv)`` (zero for rows with nothing to attend to;
    with dropout ``(P * Z / (1 - p)) V``) and the rows' softmax statistics
    ``(m, l)``, ``(..., L)`` each (:mod:`mha_xp._lib._softmax`).
    """
    L, S = query.shape[-2], key.shape[-2]
    dtype, dev = query.dtype, device_of(query)
    lead = broadcast_lead(query, key, value)
    offset = diag_offset(L, S, spec, block)  # query i sees keys j <= i + offset
    query = query * spec.scale  # once per query, not once per score
    in_place = writes_in_place(xp) if in_place is None else in_place
    block = with_lead_index(spec, block, lead, xp=xp, device=dev)
    Dv = value.shape[-1]
    # Without dropout, the row sums of exp(s - m) come out of the P V matmul
    # (BLAS, all cores) through a column of ones appended to V, instead of a
    # separate single-threaded pass over every score block.
    sums_in_matmul = spec.dropout is None
    if sums_in_matmul:
        value = with_ones_column(value, xp=xp)
    outs, maxes, sums = [], [], []
    q_block, k_block = blocks
    for i0 in range(0, L, q_block):
        rows = slice(i0, min(i0 + q_block, L))
        state = _Rows()
        j_start, j_end = key_range(rows.start, rows.stop, S, offset, spec)
        for j0 in range(j_start, j_end, k_block):
            cols = slice(j0, min(j0 + k_block, j_end))
            kind = block_kind(spec, block, rows, cols)
            if kind == EMPTY:  # the block mask knows the mask_mod allows nothing here
                continue
            s = block_scores(query[..., rows, :], key, spec, rows, cols, offset, xp=xp,
                             in_place=in_place, block=block, full=kind == FULL)
            drop = dropout_scale(spec, block, rows, cols, dtype=dtype, xp=xp, device=dev)
            _accumulate(state, s, value[..., cols, :], drop, xp=xp, in_place=in_place)
        rows_lead = lead + (rows.stop - rows.start,)
        if state.m is None:  # every key block lies outside the diagonal band: nothing to attend to
            outs.append(xp.zeros(rows_lead + (Dv,), dtype=dtype, device=dev))
            maxes.append(xp.zeros(rows_lead, dtype=dtype, device=dev))
            sums.append(xp.zeros(rows_lead, dtype=dtype, device=dev))
            continue
        acc, l = state.acc, state.l
        if sums_in_matmul:
            acc, l = acc[..., :Dv], acc[..., Dv:]
        outs.append(xp.broadcast_to(acc / safe_divisor(l, xp=xp), rows_lead + (Dv,)))
        maxes.append(xp.broadcast_to(row_shift(state.m, xp=xp)[..., 0], rows_lead))
        sums.append(xp.broadcast_to(l[..., 0], rows_lead))
    if len(outs) == 1:
        return outs[0], (maxes[0], sums[0])
    return xp.concat(outs, axis=-2), (xp.concat(maxes, axis=-1), xp.concat(sums, axis=-1))


def _accumulate(state: _Rows, s: Array, v_block: Array, drop: Array | None, /, *,
                xp: ModuleType, in_place: bool) -> None:
    """Fold one score block ``s`` into the rows' state, with the block's
    values ``v_block`` and dropout factors ``drop``. Without dropout the
    values carry a column of ones, whose product gives the row sums."""
    block_max = xp.max(s, axis=-1, keepdims=True)
    m_new = block_max if state.m is None else xp.maximum(state.m, block_max)
    # A row with nothing allowed yet has max -inf: shift by 0 so exp gives 0.
    shift = row_shift(m_new, xp=xp)
    p = shifted_exp(s, shift, xp=xp, in_place=in_place)
    if drop is None:
        pv = xp.matmul(p, v_block)  # (..., rows, Dv + 1): sums last
        alpha = None if state.m is None else xp.exp(state.m - shift)
        state.acc = pv if state.m is None else alpha * state.acc + pv
        state.m = m_new
        return
    p_sum = xp.sum(p, axis=-1, keepdims=True)  # undropped: the softmax's normaliser
    pv = xp.matmul(multiply_into(p, drop, xp=xp, in_place=in_place), v_block)
    if state.m is None:
        state.l, state.acc = p_sum, pv
    else:
        alpha = xp.exp(state.m - shift)  # rescales what the earlier blocks summed
        state.l = alpha * state.l + p_sum
        state.acc = alpha * state.acc + pv
    state.m = m_new


def chunked_weights(
    query: Array, key: Array, stats: tuple[Array, Array], spec: AttentionSpec, block: Block,
    blocks: tuple[int, int], /, *, xp: ModuleType, in_place: bool | None = None,
) -> Array:
    """The attention weights ``exp(s - m) / l``, recomputed block by block
    from the forward's row statistics, so that asking for them never changes
    the output. Rows with nothing to attend to are all zero."""
    L, S = query.shape[-2], key.shape[-2]
    block = with_lead_index(spec, block, broadcast_lead(query, key, key), xp=xp,
                            device=device_of(query))
    offset = diag_offset(L, S, spec, block)
    query = query * spec.scale
    in_place = writes_in_place(xp) if in_place is None else in_place
    m, l = (xp.expand_dims(t, axis=-1) for t in stats)
    q_block, k_block = blocks
    rows_out = []
    for i0 in range(0, L, q_block):
        rows = slice(i0, min(i0 + q_block, L))
        q, row_stats = query[..., rows, :], (m[..., rows, :], l[..., rows, :])
        parts = [
            probabilities(block_scores(q, key, spec, rows, slice(j0, min(j0 + k_block, S)),
                                       offset, xp=xp, in_place=in_place, block=block),
                          row_stats, xp=xp, in_place=in_place)
            for j0 in range(0, S, k_block)
        ]
        rows_out.append(parts[0] if len(parts) == 1 else xp.concat(parts, axis=-1))
    return rows_out[0] if len(rows_out) == 1 else xp.concat(rows_out, axis=-2)


