"""Running a plan on eager arrays: the compute dtype, finite stand-ins for
non-finite inputs (:mod:`._finite`), then the executor the planner chose.
Executors share one interface, ``run(query, key, value, spec, block, plan,
*, xp) -> (out, weights, stats)``, in the compute dtype. The backward
(:func:`backward`) runs serially or, for large NumPy calls, in parallel
(:mod:`._parallel`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from types import ModuleType
from typing import Any

from .._lib._namespace import Array, compute_dtype
from .._lib._shapes import at_least_2d, broadcast_lead
from .._spec import AttentionSpec, Block, Plan
from . import _chunked, _dense, _parallel
from ._backward import Saved, attention_backward
from ._finite import poison_rows, stand_ins, underflow_ignored
from ._plan import parallel_threads

__all__ = ["EXECUTORS", "backward", "run", "work_spec"]

Executor = Callable[..., tuple[Array, Array | None, Any]]

EXECUTORS: dict[str, Executor] = {"dense": _dense.run, "chunked": _chunked.run,
                                  "parallel": _parallel.run}


def work_spec(spec: AttentionSpec, work: Any, xp: ModuleType) -> AttentionSpec:
    """``spec`` with its mask and bias at least 2-D (blocks are sliced from
    them) and the bias in the compute dtype ``work``."""
    mask, bias = at_least_2d(spec.mask, xp), at_least_2d(spec.bias, xp)
    if bias is not None and bias.dtype != work:
        bias = xp.astype(bias, work)
    if mask is spec.mask and bias is spec.bias:
        return spec
    return spec.replace(mask=mask, bias=bias)


def run(query: Array, key: Array, value: Array, spec: AttentionSpec, block: Block, plan: Plan,
        /, *, xp: ModuleType) -> tuple[Array, Array | None, tuple[Array, Array] | None]:
    """The plan's executor on eager arrays. 16-bit inputs are computed in
    float32 (the score matmul, the softmax sums and the weighted sum of
    values accumulate in float32); ``out`` and ``weights`` are cast back,
    ``stats`` stay float32.

    Unless they are all finite, the executor sees the inputs with their
    non-finite entries replaced by 0, and values with one more column
    marking the keys whose key or value held any; the rows that gave those
    keys weight (or whose query held any) come back poisoned
    (:mod:`._finite`). NumPy's underflow flag is
    ignored inside (:func:`~._finite.underflow_ignored`)."""
    with underflow_ignored(xp):
        dtype = query.dtype
        work = compute_dtype(dtype, xp)
        if work != dtype:
            query, key, value = (xp.astype(t, work) for t in (query, key, value))
        query, key, value, query_bad = stand_ins(query, key, value, xp=xp)
        out, weights, stats = EXECUTORS["parallel" if plan.threads > 1 else plan.executor](
            query, key, value, work_spec(spec, work, xp), block,
            plan if plan.return_stats else replace(plan, return_stats=True), xp=xp)
        out, weights, stats = poison_rows(out, weights, stats, query_bad, xp=xp)
        if not plan.return_stats:
            stats = None
        if work != dtype:
            out = xp.astype(out, dtype)
            weights = None if weights is None else xp.astype(weights, dtype)
    return out, weights, stats


def backward(saved: Saved, grad_out: Array, spec: AttentionSpec, block: Block,
             blocks: tuple[int, int], /, *, xp: ModuleType,
             ) -> tuple[Array, Array, Array, Array | None]:
    """:func:`~._backward.attention_backward` (arrays in the compute dtype),
    on threads where the planner's test for the forward passes
    (:func:`~._plan.parallel_threads`, with the number in effect)."""
    query, key, value = saved.query, saved.key, saved.value
    # Five matmuls per score block where the forward has two.
    work = (5 * math.prod(broadcast_lead(query, key, value)) * query.shape[-2] * key.shape[-2]
            * (query.shape[-1] + value.shape[-1]) // 2)
    threads = parallel_threads((query, key, value, grad_out), work, None)
    # The gradients of a score_mod's captured arrays are sums over blocks:
    # summed in one fixed order, serially, so that they are reproducible.
    if threads > 1 and spec.mod_grads is None:
        return _parallel.backward(saved, grad_out, spec, block, blocks, threads, xp=xp)
    return attention_backward(saved, grad_out, spec, block, blocks, xp=xp)
