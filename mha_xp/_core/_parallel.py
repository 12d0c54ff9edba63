"""The parallel CPU executor: one call's work in blocks on a pool of threads.

NumPy's ufuncs and its BLAS release the GIL, so blocks of a call run on
several cores from Python threads, where the serial path runs its
elementwise passes (the softmax's shift, exp, masks) on one core and only
its matmuls on all of them. The work is split into tasks over the leading
batch and head positions and, when those are too few, blocks of query rows
(``_plan.forward_tasks``); each task runs the serial executor the planner
chose (dense or chunked) on its part, with a :class:`Block` that gives its
rows' and leading positions' global coordinates, so that causal, window,
ALiBi, packed sequences and dropout mean what they mean in the undivided
call, and every row takes the serial path's operations in their order (to
the BLAS library's rounding of smaller products; see ``num_threads``'s
Notes). The backward splits over leading positions only, along which no
input is broadcast, so that no gradient needs summing across tasks.

For the duration of a call the BLAS library is held to one thread
(threadpoolctl, as scikit-learn's KMeans does around its own parallel
loops): otherwise each task's matmuls would start BLAS threads of their own
on cores the other tasks use. The pool is made per call (about 0.1 ms for
two threads, against the milliseconds of work of the calls the planner
sends here) and its threads see the caller's context (NumPy's error state,
mha_xp's settings).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from types import ModuleType
from typing import Any


from .._config import blas_controller
from .._lib._namespace import Array, device_of
from .._lib._shapes import broadcast_lead
from .._spec import AttentionSpec, Block, Plan
from . import _chunked, _dense
from ._backward import Saved, attention_backward
from ._plan import Task, forward_tasks, split, task_count
from ._positions import diag_offset, with_lead_index

__all__ = ["backward", "run"]

# A process-wide lock, as BLAS's thread count is process-wide: two
# calls that each limited it and restored it on exit could interleave and
# leave it limited. Calls that find the lock taken run serially instead: the
# call that holds it already uses the CPUs. (Never waited on: no deadlock.)
_cpus_in_use = threading.Lock()

# The spec's arrays with leading (batch, head) axes, and those along the queries only.
_LEAD_ARRAYS = ("mask", "key_keep", "bias", "neg_slopes")
_ROW_ARRAYS = ("q_seg", "q_diag", "mod_q_index")


def _index(shape: tuple[int, ...], lead: dict[int, slice], n_lead: int, core: int,
           rows: slice | None) -> tuple[slice, ...]:
    """The index of a task's part of an array of ``shape`` that broadcasts to
    ``lead + core axes`` (right-aligned; size-1 axes are kept whole), its
    first core axis along the query rows ``rows`` (None: kept whole)."""
    index = [slice(None)] * len(shape)
    for axis, sl in lead.items():
        ax = len(shape) - core - (n_lead - axis)
        if ax >= 0 and shape[ax] != 1:
            index[ax] = sl
    if rows is not None and core and shape[len(shape) - core] != 1:
        index[len(shape) - core] = rows
    return tuple(index)


def _take(x: Array | None, task: Task, n_lead: int, core: int, rows: bool = True) -> Any:
    if x is None:
        return None
    return x[_index(tuple(x.shape), task[0], n_lead, core, task[1] if rows else None)]


def _task_spec(spec: AttentionSpec, task: Task, n_lead: int) -> AttentionSpec:
    changes = {name: _take(getattr(spec, name), task, n_lead, 2) for name in _LEAD_ARRAYS
               if getattr(spec, name) is not None}
    changes.update({name: _take(getattr(spec, name), task, n_lead, 1) for name in _ROW_ARRAYS
                    if getattr(spec, name) is not None})
    return spec.replace(**changes) if changes else spec


@contextlib.contextmanager
def _threads_held() -> Iterator[bool]:
    """Whether this call may use the CPUs (see ``_cpus_in_use``); while it
    holds them, BLAS runs one thread per caller, restored on exit."""
    if not _cpus_in_use.acquire(blocking=False):
        yield False
        return
    try:
        with blas_controller().limit(limits=1, user_api="blas"):
            yield True
    finally:
        _cpus_in_use.release()


def _run_tasks(work: Callable[[Task], None], tasks: list[Task], threads: int) -> None:
    """``work`` on every task, on a pool of ``threads``, each in a copy of
    the caller's context; the first exception is re-raised here."""
    with ThreadPoolExecutor(max_workers=min(threads, len(tasks)),
                            thread_name_prefix="mha_xp") as pool:
        futures = [pool.submit(contextvars.copy_context().run, work, t) for t in tasks]
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:  # the tasks not yet started need not run
                f.cancel()
            raise


def _kernel(plan: Plan) -> Callable[..., Any]:
    return _dense.run if plan.executor == "dense" else _chunked.run


def run(query: Array, key: Array, value: Array, spec: AttentionSpec, block: Block, plan: Plan,
        /, *, xp: ModuleType) -> tuple[Array, Array | None, tuple[Array, Array] | None]:
    """The executor's interface: ``(out, weights or None, stats or None)`` in
    the compute dtype, with the full broadcast leading shape: the tasks run
    ``plan.executor`` (dense or chunked) on ``plan.threads`` threads."""
    L, S = query.shape[-2], key.shape[-2]
    lead = broadcast_lead(query, key, value)
    inner = replace(plan, threads=1)
    kernel = _kernel(plan)
    tasks = forward_tasks(lead, L, S, query.shape[-1] + value.shape[-1], plan.blocks,
                          plan.threads)
    with _threads_held() as held:
        if not held or len(tasks) < 2:
            return kernel(query, key, value, spec, block, inner, xp=xp)
        dev, n = device_of(query), len(lead)
        block = with_lead_index(spec, block, lead, xp=xp, device=dev)
        offset = diag_offset(L, S, spec, block)
        dtype, Dv = query.dtype, value.shape[-1]
        # Every task writes its rows of the results: no concatenation after.
        # The arrays are plain NumPy arrays (the planner's condition), ours.
        out = xp.empty(lead + (L, Dv), dtype=dtype, device=dev)
        weights = xp.empty(lead + (L, S), dtype=dtype, device=dev) if plan.return_weights else None
        m, l = (xp.empty(lead + (L,), dtype=dtype, device=dev) for _ in range(2))

        def work(task: Task) -> None:
            rows = task[1]
            part = Block(block.row_start + rows.start, offset + rows.start,
                         _take(block.lead_index, task, n, 0))
            o, w, (mt, lt) = kernel(_take(query, task, n, 2), _take(key, task, n, 2, False),
                                    _take(value, task, n, 2, False), _task_spec(spec, task, n),
                                    part, inner, xp=xp)
            out[_index(tuple(out.shape), task[0], n, 2, rows)] = o
            if weights is not None:
                weights[_index(tuple(weights.shape), task[0], n, 2, rows)] = w
            m[_index(tuple(m.shape), task[0], n, 1, rows)] = mt
            l[_index(tuple(l.shape), task[0], n, 1, rows)] = lt

        _run_tasks(work, tasks, plan.threads)
    return out, weights, (m, l) if plan.return_stats else None


def _unbroadcast_axes(lead: tuple[int, ...], arrays: list[Array], cores: list[int]) -> list[int]:
    """The leading axes of size > 1 along which every array has its full size."""
    n = len(lead)
    out = []
    for axis, size in enumerate(lead):
        full = True
        for x, core in zip(arrays, cores):
            ax = x.ndim - core - (n - axis)
            full = full and ax >= 0 and x.shape[ax] == size
        if size > 1 and full:
            out.append(axis)
    return out


def backward(saved: Saved, grad_out: Array, spec: AttentionSpec, block: Block,
             blocks: tuple[int, int], threads: int, /, *, xp: ModuleType,
             ) -> tuple[Array, Array, Array, Array | None]:
    """:func:`~._backward.attention_backward` in tasks over the leading
    positions along which no input (nor the bias) is broadcast, on
    ``threads`` threads; serial when there are no two such positions."""
    query, key, value = saved.query, saved.key, saved.value
    lead = broadcast_lead(query, key, value)
    arrays = [query, key, value, saved.out, grad_out, *saved.stats]
    cores = [2, 2, 2, 2, 2, 1, 1]
    if spec.bias is not None:
        arrays, cores = arrays + [spec.bias], cores + [2]
    L, S = query.shape[-2], key.shape[-2]
    tasks = split(lead, _unbroadcast_axes(lead, arrays, cores), L, None,
                  task_count(lead, L, S, query.shape[-1] + value.shape[-1], threads))
    with _threads_held() as held:
        if not held or len(tasks) < 2:
            return attention_backward(saved, grad_out, spec, block, blocks, xp=xp)
        dev, n = device_of(query), len(lead)
        block = with_lead_index(spec, block, lead, xp=xp, device=dev)
        grads = [xp.empty(tuple(x.shape), dtype=query.dtype, device=dev)
                 for x in (query, key, value)]
        dbias = (None if spec.bias is None
                 else xp.empty(tuple(spec.bias.shape), dtype=spec.bias.dtype, device=dev))

        def work(task: Task) -> None:
            m, l = (_take(t, task, n, 1) for t in saved.stats)
            part = Saved(_take(query, task, n, 2), _take(key, task, n, 2, False),
                         _take(value, task, n, 2, False), _take(saved.out, task, n, 2), (m, l))
            got = attention_backward(part, _take(grad_out, task, n, 2), _task_spec(spec, task, n),
                                     Block(block.row_start, block.offset,
                                           _take(block.lead_index, task, n, 0)),
                                     blocks, xp=xp)
            for dest, g in zip((*grads, dbias), got):
                if dest is not None:
                    dest[_index(tuple(dest.shape), task[0], n, 2, None)] = g

        _run_tasks(work, tasks, threads)
    return grads[0], grads[1], grads[2], dbias

