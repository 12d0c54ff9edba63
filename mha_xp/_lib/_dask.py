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
batch, head and query axes) is one task that runs ``attend`` on the block's
own arrays (NumPy, or CuPy under Dask), which chooses its path and blocks
from the block's size and the memory budget. No task holds more than one
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
from dataclasses import replace
from collections.abc import Callable
from types import ModuleType
from typing import Any

from array_api_compat import array_namespace, device as device_of

from .._config import resolve_budget
from .._masks import Variants, key_range
from ._namespace import Array, compute_dtype

__all__ = ["attend_blocks"]


def _block_task(
    q: Array, k: Array, v: Array, rows: Any, *optional: Array,
    names: tuple[str, ...], attend: Callable[..., Any], L: int, S: int, is_causal: bool,
    scale: float, return_weights: bool, chunk_size: tuple[int, int] | None, budget: int,
    window: tuple[int, int] | None = None, softcap: float | None = None,
    dropout: tuple[float, int] | None = None,
) -> tuple[Array, ...]:
    """Attention of one block of queries against all keys: ``(out, m, l[, weights])``.

    ``k`` and ``v`` carry a size-1 axis where the queries have theirs (the
    query axis is a loop axis of the gufunc, the key axis a core one);
    ``rows`` are the block's query indices. The optional arrays are those of
    ``names``: ``q_seg`` and ``q_diag`` run along the block's queries, the
    others along the keys.
    """
    xp = array_namespace(q)
    k, v = k[..., 0, :, :], v[..., 0, :, :]
    opt = dict(zip(names, optional))
    # The rows' indices (a tiny NumPy block): the causal triangle and the
    # window are aligned bottom-right over the *whole* query axis, i.e. row i
    # has its diagonal at key i + S - L. The block passes that global
    # alignment on (offset = i0 + S - L for its first row), and keys from the
    # block's last visible one on are dropped.
    i0, i1 = int(rows[0]), int(rows[-1]) + 1
    row_opt = {n: opt.pop(n) for n in ("q_seg", "q_diag") if n in opt}
    lead_index = opt.pop("lead_index", None)
    if lead_index is not None:  # (..., 1): the block's global (batch, head) indices
        lead_index = xp.asarray(lead_index[..., 0], device=device_of(q))
    variants = Variants(window=window, softcap=softcap, neg_slopes=opt.pop("neg_slopes", None),
                        q_seg=row_opt.get("q_seg"), k_seg=opt.get("k_seg"),
                        q_diag=row_opt.get("q_diag"), offset=i0 + S - L, dropout=dropout,
                        lead_index=lead_index, row_start=i0)
    s_end = key_range(i0, i1, S, S - L, is_causal, variants)[1]
    lead = tuple(int(n) for n in _broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    dtype, dev = q.dtype, device_of(q)
    n_rows = i1 - i0
    if s_end == 0:  # no row of the block sees any key
        work = compute_dtype(dtype, xp)
        parts = [xp.zeros(lead + (n_rows, v.shape[-1]), dtype=dtype, device=dev),
                 xp.zeros(lead + (n_rows,), dtype=work, device=dev),
                 xp.zeros(lead + (n_rows,), dtype=work, device=dev)]
        if return_weights:
            parts.append(xp.zeros(lead + (n_rows, S), dtype=dtype, device=dev))
        return tuple(parts)
    if s_end < S:
        k, v = k[..., :s_end, :], v[..., :s_end, :]
        opt = {n: a[..., :s_end] if a.shape[-1] != 1 else a for n, a in opt.items()}
        variants = replace(variants, k_seg=opt.get("k_seg"))
    out, weights, (m, l) = attend(
        q, k, v, mask=opt.get("mask"), key_keep=opt.get("key_keep"), bias=opt.get("bias"),
        is_causal=is_causal, scale=scale, return_weights=return_weights, return_stats=True,
        chunk_size=chunk_size, memory_budget=budget, xp=xp, variants=variants)
    if not return_weights:
        return out, m, l
    if s_end < S:
        pad = xp.zeros(tuple(weights.shape[:-1]) + (S - s_end,), dtype=weights.dtype, device=dev)
        weights = xp.concat([weights, pad], axis=-1)
    return out, m, l, weights


def _broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    ndim = max(len(s) for s in shapes)
    out = []
    for axis in range(-ndim, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis} - {1}
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _as_2d(x: Array | None) -> Array | None:
    """A mask or bias with its (L, S) axes present (0-d and 1-d ones broadcast)."""
    if x is None or x.ndim >= 2:
        return x
    return x.reshape((1,) * (2 - x.ndim) + tuple(x.shape))


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
    attend: Callable[..., tuple[Array, Array | None, tuple[Array, Array] | None]],
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
    return_weights: bool,
    return_stats: bool,
    chunk_size: tuple[int, int] | None,
    memory_budget: int | None,
    xp: ModuleType,
    variants: Variants | None = None,
) -> tuple[Array, Array | None, tuple[Array, Array] | None]:
    """``attend`` on Dask arrays, as one lazy task per block of queries.

    Takes and returns what ``mha_xp._attention.attend`` does (``attend`` is
    that function, passed in to avoid a circular import); the results are
    lazy Dask arrays chunked like ``query`` along its batch, head and query
    axes (after the merges described in the module docstring).

    The memory budget is resolved here, when the graph is built: a
    ``with mha_xp.memory_budget(...)`` block around the call applies to the
    tasks, wherever and whenever they run.
    """
    import dask.array as da

    budget = resolve_budget(memory_budget)
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
    v = Variants() if variants is None else variants
    for name, a in (("mask", _as_2d(mask)), ("key_keep", key_keep), ("bias", _as_2d(bias)),
                    ("neg_slopes", v.neg_slopes), ("k_seg", v.k_seg)):
        if a is not None:
            args.append(merge_core(a, 1))
            signature.append("(s)")
            names.append(name)
    for name, a in (("q_seg", v.q_seg), ("q_diag", v.q_diag)):
        if a is not None:  # along the queries, like the rows' indices
            args.append(a)
            signature.append("()")
            names.append(name)
    if v.dropout is not None:
        # The global flattened index of every leading (batch, head) position,
        # with a size-1 query axis: each task gets those of its block.
        lead = _broadcast_shapes(*(tuple(int(n) for n in t.shape[:-2])
                                   for t in (query, key, value)))
        index = da.arange(math.prod(lead), dtype=xp.int32)
        args.append(da.reshape(index, lead + (1,)))
        signature.append("()")
        names.append("lead_index")
    outputs = ["(e)", "()", "()"] + (["(s)"] if return_weights else [])
    dtypes = [query.dtype, work, work] + ([query.dtype] if return_weights else [])
    results = da.apply_gufunc(
        _block_task, ",".join(signature) + "->" + ",".join(outputs), *args,
        output_dtypes=dtypes,
        # A mask or bias broadcast along the keys has a core axis "s" of size 1:
        # the outputs' sizes must not be inferred from it.
        output_sizes={"s": S, "e": int(value.shape[-1])}, allow_rechunk=True,
        names=tuple(names), attend=attend, L=L, S=S, is_causal=is_causal, scale=scale,
        return_weights=return_weights, chunk_size=chunk_size, budget=budget,
        window=v.window, softcap=v.softcap, dropout=v.dropout,
    )
    out, m, l = results[:3]
    weights = results[3] if return_weights else None
    return out, weights, (m, l) if return_stats else None
