"""Statistics of the attention weights in memory linear in the sequence
lengths: each key's attention mass, each query's entropy, and the weights
averaged over blocks of positions, without the ``(..., L, S)`` weights.

Two passes over blocks of the scores, as the chunked path and the backward
make them (:func:`~mha_xp._core._scores.block_scores`):

1. the rows' softmax statistics ``(m, l)``, from the core's own attention
   (:func:`~mha_xp._core._dispatch.attend` with a value of one feature, all
   zeros: Dask's gufuncs refuse an empty one; forced onto the chunked path
   with the blocks of this call), so that
   grouped heads, Dask, threads, sinks and non-finite inputs are handled
   as for any attention call;
2. the probabilities ``P = exp(s - m) / l`` of every block recomputed from
   them (:func:`~mha_xp._lib._softmax.probabilities`) and reduced at once:
   summed over the rows (key mass), ``sum_j P_ij (m_i - s_ij)`` per row (the
   entropy is that plus ``log l_i``: a sum of non-negative terms, no
   cancellation), and summed over blocks of ``pool`` positions. Key blocks
   outside the causal band or the window are skipped
   (:func:`~mha_xp._core._positions.key_range`).

With pooling, the blocks of each axis are cut on the pooling grid: a block
holds whole pooling cells (the last one at the end of the axis may be
partial), or lies within one cell, whose pieces are added up. What is held
at once is one score block and its temporaries, the rows' statistics, and
the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

from .._lib._backends import writes_in_place
from .._lib._inplace import multiply_into
from .._lib._namespace import Array, compute_dtype, device_of
from .._lib._shapes import broadcast_lead
from .._lib._softmax import probabilities, safe_divisor
from .._spec import AttentionSpec, Block, Request
from ._dispatch import attend
from ._execute import work_spec
from ._finite import all_finite, finite_part, underflow_ignored
from ._gqa import gqa_groups, group_spec, split_heads, ungroup
from ._plan import default_blocks, plan_blocks, plan_call
from ._positions import diag_offset, key_range, with_lead_index
from ._modifiers import EMPTY, FULL, block_kind
from ._scores import block_scores

__all__ = ["Wanted", "attention_statistics", "pool_sum", "segments"]


@dataclass(frozen=True)
class Wanted:
    """The statistics asked for: the key mass, the entropy, and the pooling
    sizes ``(pq, pk)`` (None: no pooling)."""

    key_mass: bool = False
    entropy: bool = False
    pool: tuple[int, int] | None = None


def attention_statistics(query: Array, key: Array, spec: AttentionSpec, want: Wanted,
                         chunk_size: tuple[int, int] | None, /, *, xp: ModuleType,
                         ) -> dict[str, Array]:
    """The statistics ``want`` asks for, of the attention weights of validated
    inputs, in the compute dtype: ``"key_mass"`` ``(..., H, S)``,
    ``"entropy"`` ``(..., H, L)`` (nats; the sink's own term included) and
    ``"pooled"`` ``(..., H, ceil(L / pq), ceil(S / pk))``.

    The blocks are those of the chunked path (``chunk_size`` when given). A
    row whose weights are NaN (a poisoned row, ``l = NaN``: see
    :mod:`._finite`) has NaN entropy and makes NaN the key mass of every key
    of its head and its pooled cells, as the reductions of the dense weights
    would be.
    """
    L, S = query.shape[-2], key.shape[-2]
    lead = broadcast_lead(query, key)
    # Not None: a chunk_size forces plan_blocks onto the chunked path.
    blocks = cast("tuple[int, int]", plan_blocks(lead, L, S, 0, chunk_size, 0)
                  if chunk_size is not None else default_blocks(lead, L, S))
    with underflow_ignored(xp):
        value = xp.zeros(tuple(key.shape[:-1]) + (1,), dtype=key.dtype, device=device_of(key))
        plan = plan_call(query, key, value, spec, Request(return_stats=True, chunk_size=blocks),
                         xp=xp)
        _, _, stats = attend(query, key, value, spec, plan, xp=xp)
        stats = cast("tuple[Array, Array]", stats)  # asked for: return_stats
        sums = _second_pass(query, key, spec, stats, blocks, want, xp=xp)
        return _finish(sums, spec, stats, want, (L, S), xp=xp)


def _second_pass(query: Array, key: Array, spec: AttentionSpec, stats: tuple[Array, Array],
                 blocks: tuple[int, int], want: Wanted, /, *, xp: ModuleType,
                 ) -> dict[str, Array]:
    """The block sums of :func:`_sweep` on the inputs in the compute dtype,
    their non-finite entries replaced by 0 (as the first pass saw them),
    grouped heads split as the core splits them, and merged back."""
    work = compute_dtype(query.dtype, xp)
    if work != query.dtype:
        query, key = xp.astype(query, work), xp.astype(key, work)
    if not all_finite(query, key, xp=xp):
        query, key = finite_part(query, xp=xp)[0], finite_part(key, xp=xp)[0]
    spec = work_spec(spec.replace(sinks=None), work, xp)
    groups = gqa_groups(query, key, key)
    if groups is None:
        return _sweep(query * spec.scale, key, spec, stats, blocks, want, xp=xp)
    spec = group_spec(spec, Block(), groups, xp)[0]
    m, l = (split_heads(t, groups, 1, xp) for t in stats)
    sums = _sweep(split_heads(query, groups, 2, xp) * spec.scale, xp.expand_dims(key, axis=-3),
                  spec, (m, l), blocks, want, xp=xp)
    return {name: cast(Array, ungroup(x, 2 if name == "pooled" else 1, xp))
            for name, x in sums.items()}


def segments(n: int, block: int, pool: int | None) -> list[slice]:
    """The blocks of an axis of ``n`` positions: of ``block`` positions, or,
    with pooling cells of ``pool`` positions, cut on the cells' grid: as many
    whole cells as fit in ``block`` (at least one), or, for cells larger than
    ``block``, each cell in pieces of at most ``block``."""
    if pool is None or block >= pool:
        step = block if pool is None else block // pool * pool
        return [slice(a, min(a + step, n)) for a in range(0, n, step)]
    return [slice(a, min(a + block, c + pool, n)) for c in range(0, n, pool)
            for a in range(c, min(c + pool, n), block)]


def pool_sum(x: Array, axis: int, size: int, /, *, xp: ModuleType) -> Array:
    """Sums of ``x`` over consecutive groups of ``size`` positions along
    ``axis`` (-1 or -2), the last group holding what is left; ``x`` starts
    on a group boundary or lies within one group."""
    n = x.shape[axis]
    if n <= size:
        return xp.sum(x, axis=axis, keepdims=True)
    full = n // size * size
    shape = tuple(x.shape)
    if axis == -1:
        main = xp.sum(xp.reshape(x[..., :full], shape[:-1] + (full // size, size)), axis=-1)
        tail = x[..., full:]
    else:
        main = xp.sum(xp.reshape(x[..., :full, :], shape[:-2] + (full // size, size, shape[-1])),
                      axis=-2)
        tail = x[..., full:, :]
    if full == n:
        return main
    return xp.concat([main, xp.sum(tail, axis=axis, keepdims=True)], axis=axis)


def _cells(seg: slice, pool: int) -> tuple[int, int]:
    """The first pooling cell of a block and how many cells it touches."""
    first = seg.start // pool
    return first, -(-seg.stop // pool) - first


class _Cells:
    """Pooled sums along one axis, block by block: a block that continues
    the cell where the last one ended (a piece of a cell larger than the
    blocks) is added to it, any other is appended."""

    def __init__(self) -> None:
        self.parts: list[Array] = []
        self.firsts: list[int] = []

    def push(self, part: Array, first: int) -> None:
        if self.firsts and self.firsts[-1] == first:
            self.parts[-1] = self.parts[-1] + part
        else:
            self.parts.append(part)
            self.firsts.append(first)

    def join(self, axis: int, xp: ModuleType) -> Array:
        return self.parts[0] if len(self.parts) == 1 else xp.concat(self.parts, axis=axis)


@dataclass
class _Sweep:
    """What :func:`_sweep` shares with its blocks."""

    q: Array
    key: Array
    spec: AttentionSpec
    offset: int
    want: Wanted
    lead: tuple[int, ...]
    in_place: bool
    big: Array  # the largest finite value, standing in for m - s = inf where s = -inf
    block: Block  # the leading index of the modifiers


def _sweep(q: Array, key: Array, spec: AttentionSpec, stats: tuple[Array, Array],
           blocks: tuple[int, int], want: Wanted, /, *, xp: ModuleType) -> dict[str, Array]:
    """The second pass over the blocks of the (already scaled) queries ``q``:
    the unnormalised entropy sums ``sum_j P_ij (m_i - s_ij)`` ``(..., L)``,
    the key mass ``(..., S)`` and the pooled sums ``(..., ceil(L/pq),
    ceil(S/pk))``, as ``want`` asks."""
    L, S = q.shape[-2], key.shape[-2]
    dtype, dev = q.dtype, device_of(q)
    lead = broadcast_lead(q, key)
    sw = _Sweep(q, key, spec, diag_offset(L, S, spec, Block()), want, lead, writes_in_place(xp),
                xp.asarray(xp.finfo(dtype).max, dtype=dtype, device=dev),
                # the leading index that the modifiers' b and h are read from
                with_lead_index(spec, Block(), lead, xp=xp, device=dev))
    m, l = (xp.expand_dims(t, axis=-1) for t in stats)
    pq, pk = want.pool or (0, 0)  # 0: no pooling
    col_segs = segments(S, blocks[1], pk or None)
    mass: list[Any] = [None] * len(col_segs)
    entropy, pooled = [], _Cells()
    for rows in segments(L, blocks[0], pq or None):
        ent, row_cells = _row_block(sw, rows, col_segs, (m[..., rows, :], l[..., rows, :]), mass,
                                    xp=xp)
        if ent is not None:
            entropy.append(ent)
        if row_cells is not None:
            pooled.push(row_cells.join(-1, xp), _cells(rows, pq)[0])
    # L, S >= 1 (validated): every list below has an entry.
    out = {}
    if want.entropy:
        out["entropy"] = _concat(entropy, xp)
    if want.key_mass:
        out["key_mass"] = _concat([xp.zeros(lead + (c.stop - c.start,), dtype=dtype, device=dev)
                                   if p is None else p for p, c in zip(mass, col_segs)], xp)
    if pq:
        out["pooled"] = pooled.join(-2, xp)
    return out


def _concat(parts: list[Array], xp: ModuleType) -> Array:
    """The blocks of a result joined along the last axis."""
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=-1)


def _row_block(sw: _Sweep, rows: slice, col_segs: list[slice], row_stats: tuple[Array, Array],
               mass: list[Any], /, *, xp: ModuleType) -> tuple[Array | None, _Cells | None]:
    """One block of rows against the key blocks it sees: its entropy sums
    ``(..., rows)`` (None when not asked), its pooled sums along the keys
    (None without pooling); the key mass is added into ``mass``, by key block."""
    want = sw.want
    S = sw.key.shape[-2]
    j0, j1 = key_range(rows.start, rows.stop, S, sw.offset, sw.spec)
    dtype, dev = sw.q.dtype, device_of(sw.q)
    n_rows = rows.stop - rows.start
    pq, pk = want.pool or (0, 0)  # 0: no pooling
    n_cells = _cells(rows, pq)[1] if pq else 0
    ent = None
    cells = _Cells() if pk else None
    q = sw.q[..., rows, :]
    for jb, cols in enumerate(col_segs):
        kind = block_kind(sw.spec, sw.block, rows, cols)
        if cols.start >= j1 or cols.stop <= j0 or kind == EMPTY:  # weights 0
            if cells is not None:
                first, count = _cells(cols, pk)
                cells.push(xp.zeros(sw.lead + (n_cells, count), dtype=dtype, device=dev), first)
            continue
        s = cast(Array, block_scores(q, sw.key, sw.spec, rows, cols, sw.offset, xp=xp,
                                     in_place=sw.in_place, block=sw.block, full=kind == FULL))
        e, col_mass, pooled = _block(sw, s, row_stats, xp=xp)
        if e is not None:
            ent = e if ent is None else ent + e
        if col_mass is not None:
            mass[jb] = col_mass if mass[jb] is None else mass[jb] + col_mass
        if cells is not None:
            cells.push(cast(Array, pooled), _cells(cols, pk)[0])
    if want.entropy and ent is None:  # no key block seen: no weights
        ent = xp.zeros(sw.lead + (n_rows,), dtype=dtype, device=dev)
    return ent, cells


def _block(sw: _Sweep, s: Array, row_stats: tuple[Array, Array], /, *, xp: ModuleType,
           ) -> tuple[Array | None, Array | None, Array | None]:
    """The reductions of one score block ``s`` (overwritten where the backend
    allows): its rows' entropy sums, its columns' mass and its pooled sums."""
    want = sw.want
    m, l = row_stats
    # m - s >= 0 where a key is seen, +inf where not: there P = 0, and the
    # largest finite value keeps 0 * inf (NaN, and NumPy's invalid flag) out.
    d = xp.minimum(m - s, sw.big) if want.entropy else None
    p = probabilities(s, (m, l), xp=xp, in_place=sw.in_place)
    ent = None if d is None else xp.sum(multiply_into(d, p, xp=xp, in_place=sw.in_place),
                                        axis=-1)
    if want.pool is None:
        return ent, (xp.sum(p, axis=-2) if want.key_mass else None), None
    rows_pooled = pool_sum(p, -2, want.pool[0], xp=xp)  # (..., cells, cols): small
    col_mass = xp.sum(rows_pooled, axis=-2) if want.key_mass else None
    return ent, col_mass, pool_sum(rows_pooled, -1, want.pool[1], xp=xp)


def _finish(sums: dict[str, Array], spec: AttentionSpec, stats: tuple[Array, Array],
            want: Wanted, sizes: tuple[int, int], /, *, xp: ModuleType) -> dict[str, Array]:
    """The statistics from the block sums: the entropy with ``log l`` and the
    sink's term added, the pooled sums divided by the positions each cell
    holds, and NaN where a row's weights are NaN."""
    m, l = stats
    dtype, dev = l.dtype, device_of(l)
    nan = xp.asarray(math.nan, dtype=dtype, device=dev)
    bad = xp.isnan(l)  # the poisoned rows (NaN weights throughout)
    out = {}
    if want.key_mass:
        seen_bad = xp.expand_dims(xp.any(bad, axis=-1), axis=-1)
        out["key_mass"] = xp.where(seen_bad, nan, sums["key_mass"])
    if want.entropy:
        ent = sums["entropy"] + xp.log(safe_divisor(l, xp=xp))
        if spec.sinks is not None:
            # The sink's -p log p is p (m - sink) + p log l; log l above already
            # counts it (the weights and the sink's share add up to 1).
            p_sink = xp.exp(spec.sinks - m) / safe_divisor(l, xp=xp)
            ent = ent + p_sink * (m - spec.sinks)
        out["entropy"] = ent
    if want.pool is not None:
        (pq, pk), (L, S) = want.pool, sizes
        rows = xp.asarray([min(pq, L - a) for a in range(0, L, pq)], dtype=dtype, device=dev)
        cols = xp.asarray([min(pk, S - a) for a in range(0, S, pk)], dtype=dtype, device=dev)
        pooled = sums["pooled"] / (xp.expand_dims(rows, axis=-1) * cols)
        bad_cells = pool_sum(xp.astype(bad, dtype), -1, pq, xp=xp) > xp.zeros(
            (), dtype=dtype, device=dev)
        out["pooled"] = xp.where(xp.expand_dims(bad_cells, axis=-1), nan, pooled)
    return {name: out[name] for name in ("key_mass", "entropy", "pooled") if name in out}
