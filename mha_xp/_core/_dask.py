"""Dask: attention mapped over blocks of queries, one task per block.

The portable code runs on ``dask.array`` inputs as it is, lazily, but it
chooses badly there: the dense-or-chunked decision and the chunked path's
blocks depend on the shape of the *whole* array, not of a chunk. A large
batch thus takes the chunked path with one-row query blocks, and the graph
grows with the sequence length times the number of chunks (measured: a
``(2048, 8, 128, 16)`` self-attention in 32 batch chunks built 69 731 tasks
and computed in 25 s; mapped over the blocks, 129 tasks and 2 s).

:func:`attend_blocks` maps attention over the blocks instead, with
:func:`dask.array.apply_gufunc`: every block of queries (one chunk along the
batch, head and query axes) is one task that plans its path and blocks from
the block's size and the memory budget resolved when the graph was built
(never from the memory of the machine it runs on), then runs the executor
on the block's own arrays (NumPy, or CuPy under Dask). No task holds more than one
block's scores, and with the budget's chunked path not even that.

Each task needs all the keys of its rows, so chunks along the key axis
(``S``) and along the feature axes (``D``, ``Dv``) are merged into one
(:func:`merge_core`), never refused: the merged keys of a block are linear
in ``S``, and nothing quadratic is ever assembled from several chunks. A
merge that would make a block larger than both the input's largest block and
Dask's ``array.chunk-size`` (128 MiB by default) splits the batch, head or
query axes of that array instead; the chunks of the other arguments follow
(blockwise unifies the loop axes).

Position-dependent terms use *global* indices, so that a task computes the
same as the undivided call: the causal and window diagonals shift with the
block's first row, and dropout's keep-mask is keyed by the block's global
rows and by the global flattened (batch, head) index of each of its leading
positions, passed in as one more blocked argument (``lead_index``).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, cast

from array_api_compat import array_namespace, device as device_of

from .._lib._namespace import Array, compute_dtype
from .._lib._shapes import at_least_2d, broadcast_shapes
from .._spec import AttentionSpec, Block, Plan, Request
from . import _execute
from ._plan import plan_local
from ._positions import diag_offset, key_range

__all__ = ["attend_blocks", "merge_core"]

# The spec's arrays, by the axis they run along in a task: the keys (a core
# axis) or the queries (a loop axis, like the rows' indices).
_KEY_ARRAYS = ("mask", "key_keep", "bias", "neg_slopes", "k_seg")
_ROW_ARRAYS = ("q_seg", "q_diag", "mod_q_index")


def _block_task(
    q: Array, k: Array, v: Array, rows: Any, *optional: Array, names: tuple[str, ...],
    static: AttentionSpec, plan: Plan, L: int, S: int,
) -> tuple[Array, ...]:
    """Attention of one block of queries against all keys: ``(out, m, l[, weights])``.

    ``k`` and ``v`` carry a size-1 axis where the queries have theirs (the
    query axis is a loop axis of the gufunc, the key axis a core one);
    ``rows`` are the block's query indices; ``optional`` the spec's arrays
    (and dropout's ``lead_index``) named by ``names``; ``static`` the spec
    without its arrays.
    """
    xp = array_namespace(q)
    k, v = k[..., 0, :, :], v[..., 0, :, :]
    opt = dict(zip(names, optional))
    lead_index = opt.pop("lead_index", None)
    if lead_index is not None:  # (..., 1): the block's global (batch, head) indices
        lead_index = xp.asarray(lead_index[..., 0], device=device_of(q))
    spec = static.replace(**opt)
    # The causal triangle and the window are aligned over the *whole* query
    # axis: the block passes that global alignment on, and keys from the
    # block's last visible one on are dropped.
    i0, i1 = int(rows[0]), int(rows[-1]) + 1
    offset = i0 + diag_offset(L, S, spec, Block())
    block = Block(row_start=i0, offset=offset, lead_index=lead_index)
    s_end = key_range(i0, i1, S, offset, spec)[1]
    lead = broadcast_shapes(*(tuple(int(n) for n in t.shape[:-2]) for t in (q, k, v)))
    if s_end == 0:  # no row of the block sees any key
        return _empty_block(q, v, lead, i1 - i0, S, plan.return_weights, xp)
    if s_end < S:
        k, v = k[..., :s_end, :], v[..., :s_end, :]
        spec = spec.replace(**{n: (a[..., :s_end] if a.shape[-1] != 1 else a)
                               for n, a in opt.items() if n in _KEY_ARRAYS})
    work = compute_dtype(q.dtype, xp)
    local = plan_local(lead, i1 - i0, s_end, xp.finfo(work).bits // 8, spec,
                       Request(plan.return_weights, True, plan.blocks), plan.budget)
    # The local plan asks for the statistics (Request(..., True, ...)), so they are not None.
    out, weights, (m, l) = cast("tuple[Array, Array | None, tuple[Array, Array]]",
                                _execute.run(q, k, v, spec, block, local, xp=xp))
    if not plan.return_weights:
        return out, m, l
    weights = cast(Array, weights)  # asked for by plan.return_weights
    if s_end < S:
        # Zeros for the keys dropped above; NaN for a poisoned row (l = NaN,
        # see _finite), whose weights are NaN throughout.
        pad = xp.zeros(tuple(weights.shape[:-1]) + (S - s_end,), dtype=weights.dtype,
                       device=device_of(q))
        pad = xp.where(xp.expand_dims(xp.isnan(l), axis=-1),
                       xp.asarray(math.nan, dtype=weights.dtype, device=device_of(q)), pad)
        weights = xp.concat([weights, pad], axis=-1)
    return out, m, l, weights


def _empty_block(q: Array, v: Array, lead: tuple[int, ...], n_rows: int, S: int,
                 return_weights: bool, xp: ModuleType) -> tuple[Array, ...]:
    """The results of a block of queries that sees no key: zeros."""
    dtype, dev = q.dtype, device_of(q)
    work = compute_dtype(dtype, xp)
    parts = [xp.zeros(lead + (n_rows, v.shape[-1]), dtype=dtype, device=dev),
             xp.zeros(lead + (n_rows,), dtype=work, device=dev),
             xp.zeros(lead + (n_rows,), dtype=work, device=dev)]
    if return_weights:
        parts.append(xp.zeros(lead + (n_rows, S), dtype=dtype, device=dev))
    return tuple(parts)


def _block_bytes(x: Array) -> int:
    """Bytes of the largest block of a Dask array."""
    return math.prod(max(c, default=0) for c in x.chunks) * x.dtype.itemsize


def merge_core(x: Array, n_core: int) -> Array:
    """``x`` with its last ``n_core`` axes in one chunk each.

    A merge that would make a block larger than both the largest block of
    ``x`` and Dask's ``array.chunk-size`` setting (128 MiB by default) splits
    the leading axes instead, outermost (batch) first, so that blocks stay
    within that size where the leading axes allow it.
    """
    import dask
    from dask.utils import parse_bytes

    core = range(x.ndim - n_core, x.ndim)
    if all(len(x.chunks[ax]) <= 1 for ax in core):
        return x
    limit = max(_block_bytes(x), parse_bytes(dask.config.get("array.chunk-size")))
    new: dict[int, Any] = {ax: -1 for ax in core}
    block = [max(c, default=0) for c in x.chunks[: x.ndim - n_core]]
    core_bytes = math.prod(x.shape[ax] for ax in core) * x.dtype.itemsize
    for ax, size in enumerate(block):
        excess = math.prod(block) * core_bytes / limit
        if excess <= 1:
            break
        block[ax] = new[ax] = max(1, int(size / excess))
    return x.rechunk(new)


def attend_blocks(
    query: Array, key: Array, value: Array, spec: AttentionSpec, plan: Plan, /, *,
    xp: ModuleType,
) -> tuple[Array, Array | None, tuple[Array, Array] | None]:
    """Attention on Dask arrays, as one lazy task per block of queries.

    Returns ``(out, weights or None, stats or None)`` as lazy Dask arrays
    chunked like ``query`` along its batch, head and query axes (after the
    merges described in the module docstring). The memory budget was
    resolved when the plan was made, with the graph: a
    ``with mha_xp.memory_budget(...)`` block around the call applies to the
    tasks, wherever and whenever they run.
    """
    import dask.array as da

    L, S = int(query.shape[-2]), int(key.shape[-2])
    work = compute_dtype(query.dtype, xp)
    # The query axis is a loop axis (blocks of queries are independent), the
    # key and feature axes are core axes (one chunk each, see merge_core):
    # keys and values get a size-1 axis where the queries have theirs. The
    # loop axes' chunks are then unified across the arguments by blockwise.
    query = merge_core(query, 1)
    key, value = merge_core(key, 2), merge_core(value, 2)
    args = [query, da.expand_dims(key, axis=-3), da.expand_dims(value, axis=-3),
            da.arange(L, chunks=(query.chunks[-2],))]
    signature = ["(d)", "(s,d)", "(s,e)", "()"]
    names = []
    for name in _KEY_ARRAYS + _ROW_ARRAYS:
        a = getattr(spec, name)
        if a is None:
            continue
        if name in _KEY_ARRAYS:
            args.append(merge_core(at_least_2d(a, xp) if name in ("mask", "bias") else a, 1))
            signature.append("(s)")
        else:  # along the queries, like the rows' indices
            args.append(a)
            signature.append("()")
        names.append(name)
    if spec.dropout is not None or spec.score_mod is not None or spec.mask_mod is not None:
        # The global flattened index of every leading (batch, head) position,
        # with a size-1 query axis: each task gets those of its block.
        lead = broadcast_shapes(*(tuple(int(n) for n in t.shape[:-2])
                                  for t in (query, key, value)))
        index = da.arange(math.prod(lead), dtype=xp.int32)
        args.append(da.reshape(index, lead + (1,)))
        signature.append("()")
        names.append("lead_index")
    outputs = ["(e)", "()", "()"] + (["(s)"] if plan.return_weights else [])
    dtypes = [query.dtype, work, work] + ([query.dtype] if plan.return_weights else [])
    static = spec.replace(**{n: None for n in _KEY_ARRAYS + _ROW_ARRAYS})
    results = da.apply_gufunc(
        _block_task, ",".join(signature) + "->" + ",".join(outputs), *args,
        output_dtypes=dtypes,
        # A mask or bias broadcast along the keys has a core axis "s" of size 1:
        # the outputs' sizes must not be inferred from it.
        output_sizes={"s": S, "e": int(value.shape[-1])}, allow_rechunk=True,
        names=tuple(names), static=static, plan=plan, L=L, S=S,
    )
    out, m, l = results[:3]
    return out, results[3] if plan.return_weights else None, (m, l) if plan.return_stats else None
