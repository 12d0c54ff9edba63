"""Running a plan on eager arrays: the compute dtype, then the executor the
planner chose. Executors share one interface, ``run(query, key, value, spec,
block, plan, *, xp) -> (out, weights, stats)``, in the compute dtype."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from .._lib._namespace import Array, compute_dtype
from .._lib._shapes import at_least_2d
from .._spec import AttentionSpec, Block, Plan
from . import _chunked, _dense

__all__ = ["EXECUTORS", "run", "work_spec"]

Executor = Callable[..., tuple[Array, Array | None, Any]]

EXECUTORS: dict[str, Executor] = {"dense": _dense.run, "chunked": _chunked.run}


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
    ``stats`` stay float32."""
    dtype = query.dtype
    work = compute_dtype(dtype, xp)
    if work != dtype:
        query, key, value = (xp.astype(t, work) for t in (query, key, value))
    out, weights, stats = EXECUTORS[plan.executor](
        query, key, value, work_spec(spec, work, xp), block, plan, xp=xp)
    if work != dtype:
        out = xp.astype(out, dtype)
        weights = None if weights is None else xp.astype(weights, dtype)
    return out, weights, stats
