"""The core's two entry points: attention under a plan, and its backward.

A whole call that the array library's own kernel computes with the same
semantics goes to it (:mod:`._native`); otherwise grouped-query attention
is reshaped here (:mod:`._gqa`), then the plan's executor runs: the Dask
executor for Dask arrays, the dense or the chunked one for eager arrays
(:mod:`._execute`).
"""

from __future__ import annotations

from dataclasses import replace
from types import ModuleType
from typing import cast

from .._lib._namespace import Array, compute_dtype
from .._lib._shapes import broadcast_lead
from .._lib._softmax import add_sinks, sink_gradient
from .._spec import AttentionSpec, Block, Plan
from . import _dask, _execute
from ._backward import Saved
from ._finite import underflow_ignored
from ._native import native_attend
from ._gqa import gqa_groups, group_spec, split_heads, ungroup
from ._plan import default_blocks, plan_blocks

__all__ = ["attend", "attend_backward"]


def attend(query: Array, key: Array, value: Array, spec: AttentionSpec, plan: Plan, /, *,
           xp: ModuleType, block: Block | None = None,
           ) -> tuple[Array, Array | None, tuple[Array, Array] | None]:
    """``softmax(Q K^T * scale + bias, allowed) V`` on validated inputs.

    Returns ``(out, weights or None, stats or None)``: the output and weights
    in the inputs' dtype, the rows' softmax statistics ``(m, l)`` in the
    compute dtype (:mod:`mha_xp._lib._softmax`). With dropout, ``out`` is
    ``(P * Z / (1 - p)) V`` while ``weights`` and ``stats`` are those of the
    softmax ``P`` before dropout. Attention sinks (``spec.sinks``) join the
    whole call's result once, from its statistics
    (:func:`~mha_xp._lib._softmax.add_sinks`), whatever path computed it.
    """
    if spec.sinks is not None:
        out, weights, stats = attend(query, key, value, spec.replace(sinks=None),
                                     replace(plan, return_stats=True), xp=xp, block=Block())
        with underflow_ignored(xp):
            out, sunk, scale = add_sinks(out, cast("tuple[Array, Array]", stats), spec.sinks,
                                         xp=xp)
            if weights is not None:
                weights = weights * (scale if weights.dtype == scale.dtype
                                     else xp.astype(scale, weights.dtype))
        return out, weights, (sunk if plan.return_stats else None)
    if block is None:  # a whole call: the library's own kernel, where it computes the same
        out = native_attend(query, key, value, spec, plan, xp=xp, portable=lambda q, k, v: attend(
            q, k, v, spec, plan, xp=xp, block=Block())[0])
        if out is not None:
            return out, None, None
    block = Block() if block is None else block
    groups = gqa_groups(query, key, value)
    if groups is not None:
        gspec, gblock = group_spec(spec, block, groups, xp)
        out, weights, stats = attend(
            split_heads(query, groups, 2, xp), xp.expand_dims(key, axis=-3),
            xp.expand_dims(value, axis=-3), gspec, plan, xp=xp, block=gblock)
        return cast("tuple[Array, Array | None, tuple[Array, Array] | None]",
                    (ungroup(out, 2, xp), ungroup(weights, 2, xp),
                     None if stats is None else tuple(ungroup(t, 1, xp) for t in stats)))
    if plan.executor == "dask":
        return _dask.attend_blocks(query, key, value, spec, plan, xp=xp)
    return _execute.run(query, key, value, spec, block, plan, xp=xp)


def attend_backward(saved: Saved, grad_out: Array, spec: AttentionSpec,
                    chunk_size: tuple[int, int] | None, /, *, xp: ModuleType,
                    ) -> tuple[Array, Array, Array, Array | None, Array | None]:
    """Gradients ``(dq, dk, dv, dbias, dsinks)`` of :func:`attend` from what
    its forward saved (inputs in their own dtype, output, statistics);
    ``dsinks`` in the compute dtype, of ``spec.sinks``' shape (None without
    sinks). The statistics of a call with sinks include them, so the
    gradients of the rest are the usual ones.

    The blocks are those of the chunked path (``chunk_size`` when given),
    whatever path the forward took: the backward keeps four score-sized
    temporaries alive, and cache-sized blocks are faster than one big one.
    16-bit inputs are computed in float32 and the gradients cast back.
    Grouped-query attention is reshaped as in :func:`attend`; the key and
    value gradients sum over the query heads of their group.
    """
    if spec.sinks is not None:
        dq, dk, dv, dbias, _ = attend_backward(saved, grad_out, spec.replace(sinks=None),
                                               chunk_size, xp=xp)
        work = saved.stats[0].dtype
        out, g = (t if t.dtype == work else xp.astype(t, work) for t in (saved.out, grad_out))
        with underflow_ignored(xp):
            dsinks = sink_gradient(out, g, saved.stats, spec.sinks, xp=xp)
        return dq, dk, dv, dbias, dsinks
    query, key, value = saved.query, saved.key, saved.value
    groups = gqa_groups(query, key, value)
    if groups is not None:
        gspec, _ = group_spec(spec, Block(), groups, xp)
        grouped = Saved(split_heads(query, groups, 2, xp), xp.expand_dims(key, axis=-3),
                        xp.expand_dims(value, axis=-3), split_heads(saved.out, groups, 2, xp),
                        tuple(split_heads(t, groups, 1, xp) for t in saved.stats))
        dq, dk, dv, dbias, _ = attend_backward(grouped, split_heads(grad_out, groups, 2, xp),
                                               gspec, chunk_size, xp=xp)
        return (xp.reshape(dq, tuple(query.shape)), xp.reshape(dk, tuple(key.shape)),
                xp.reshape(dv, tuple(value.shape)),
                None if dbias is None else xp.reshape(dbias, tuple(cast(Array, spec.bias).shape)),
                None)
    L, S = query.shape[-2], key.shape[-2]
    lead = broadcast_lead(query, key, value)
    # Not None: a chunk_size forces plan_blocks onto the chunked path.
    blocks = cast("tuple[int, int]", plan_blocks(lead, L, S, 0, chunk_size, 0)
                  if chunk_size is not None else default_blocks(lead, L, S))
    bias_shape = None if spec.bias is None else tuple(spec.bias.shape)
    dtype = query.dtype
    work = compute_dtype(dtype, xp)
    with underflow_ignored(xp):  # as in the forward (_execute.run)
        if work != dtype:
            # mypy cannot count the starred generator's four items.
            saved = Saved(  # type: ignore[call-arg]
                *(xp.astype(t, work) for t in (query, key, value, saved.out)), saved.stats)
            grad_out = xp.astype(grad_out, work)
        grads: tuple[Array, Array, Array, Array | None] = _execute.backward(saved, grad_out, _execute.work_spec(spec, work, xp), Block(),
                                  blocks, xp=xp)
        # A bias (bias_shape) has a gradient (grads[3]).
        if bias_shape is not None and tuple(cast(Array, grads[3]).shape) != bias_shape:
            grads = (grads[0], grads[1], grads[2], xp.reshape(grads[3], bias_shape))
        if work != dtype:
            grads = cast("tuple[Array, Array, Array, Array | None]",
                         tuple(None if g is None else xp.astype(g, dtype) for g in grads))
    return grads[0], grads[1], grads[2], grads[3], None
