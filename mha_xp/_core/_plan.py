"""The planner: which executor computes a call, with which blocks.

Choosing is separate from computing. The dense path is taken while its
``(..., L, S)`` score tensor fits the memory budget (and, for large calls on
host memory, a quarter of the memory available); the chunked path otherwise,
or when ``chunk_size`` forces it; Dask arrays go to the Dask executor, whose
tasks plan their own blocks from the block's size and the budget resolved
here, without reading the system's memory again. Large calls on plain NumPy
arrays run either path in tasks on a pool of threads (the parallel
executor), when the thread count in effect is more than 1.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import ModuleType
from typing import Any


from .._config import resolve_budget, resolve_num_threads
from .._lib._backends import host_memory_available, is_dask, is_plain_numpy
from .._lib._namespace import Array, compute_dtype, device_of
from .._lib._shapes import broadcast_lead
from .._spec import AttentionSpec, Plan, Request

__all__ = ["BLOCK_ELEMENTS", "K_BLOCK", "PARALLEL_FROM", "TASKS_PER_THREAD", "TASK_WORK", "Task",
           "default_blocks", "forward_tasks", "parallel_threads", "plan_blocks", "plan_call",
           "plan_local", "split", "task_count", "weights_peak"]

# Default key block of the chunked path, and the size (elements) of one score
# block across all batch and head indices: 2**21 float32 = 8 MiB, which
# measured fastest here among 256..4096-wide blocks (within ~10 %), while
# keeping the Python loop short.
K_BLOCK = 512
BLOCK_ELEMENTS = 2**21
#: A task of the parallel executor: its leading slices by axis, and its query rows.
Task = tuple[dict[int, slice], slice]

# Calls whose dense scores take less than this never consult the memory guard.
_GUARD_FROM_BYTES = 2**24
#: Multiply-adds (a forward's ``B H L S (D + Dv)``; a backward counts 5/2 of
#: its forward's) from which a NumPy call runs on threads: about 15 ms of
#: serial work. Provisional, measured with benchmarks/parallel.py on a
#: shared 2-core machine: at 2**27 some runs lost (up to 1.36x the serial
#: time: the pool's start and the GIL's handovers cost 0.5 to 3 ms); from
#: 2**29 on, two threads took 0.3 to 1.0x the serial time (0.5 to 0.6x at
#: L = S = 4096), depending on the other jobs' load. Smaller calls never pay
#: for the pool, nor for the checks of the thread count's default.
PARALLEL_FROM = 2**28
#: Tasks per thread: more tasks than threads even out blocks of unequal cost
#: (the causal triangle's) at a small cost per task.
TASKS_PER_THREAD = 4
#: The least work of a task, in multiply-adds (``B H L S (D + Dv)`` of its
#: part): below it, handing the GIL between threads costs more than the
#: threads gain.
TASK_WORK = 2**25


def split(lead: tuple[int, ...], axes: list[int], L: int, align: int | None,
          n: int) -> list[Task]:
    """About ``n`` tasks: ``(leading slices by axis, query rows)``.

    The leading ``axes`` (of ``lead``) are split outermost first until there
    are ``n`` parts; when they give fewer, the ``L`` query rows are split too,
    at multiples of ``align`` (None: never).
    """
    parts: list[dict[int, slice]] = [{}]
    for axis in axes:
        if len(parts) >= n:
            break
        pieces = _ranges(lead[axis], min(lead[axis], -(-n // len(parts))), 1)
        parts = [{**p, axis: r} for p in parts for r in pieces]
    count = 1
    if align is not None and len(parts) < n:
        count = min(-(-n // len(parts)), -(-L // align))
    rows = _ranges(L, count, align or 1)
    return [(p, r) for p in parts for r in rows]


def task_count(lead: tuple[int, ...], L: int, S: int, D: int, threads: int) -> int:
    """How many tasks a call of these sizes is split into: ``TASKS_PER_THREAD``
    per thread, fewer where a task would do less than ``TASK_WORK``."""
    work = math.prod(lead) * L * S * D
    return max(2, min(threads * TASKS_PER_THREAD, work // TASK_WORK))


def _ranges(size: int, count: int, align: int) -> list[slice]:
    """``size`` split into ``count`` near-equal ranges, cut at multiples of ``align``."""
    units = -(-size // align)
    cuts = [min(size, align * (i * units // count)) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def forward_tasks(lead: tuple[int, ...], L: int, S: int, features: int,
                  blocks: tuple[int, int] | None, threads: int) -> list[Task]:
    """The parallel executor's tasks for a forward of these sizes (``features
    = D + Dv``) whose tasks run the dense path (``blocks`` None) or the
    chunked one: over every leading axis of size > 1, then over query rows
    at multiples of the chunked path's query block, so that each row sees
    the key blocks it sees in the serial path."""
    axes = [a for a, size in enumerate(lead) if size > 1]
    align = 1 if blocks is None else blocks[0]
    return split(lead, axes, L, align, task_count(lead, L, S, features, threads))


def parallel_threads(arrays: tuple[Array, ...], work: int, per_call: Any) -> int:
    """The parallel executor's threads for a call of ``work`` multiply-adds
    on ``arrays``: 1 (serial) unless they are all plain NumPy arrays and the
    work is at least :data:`PARALLEL_FROM`; else the call's ``num_threads``
    or the number in effect."""
    if work < PARALLEL_FROM or not all(is_plain_numpy(a) for a in arrays):
        return 1
    return resolve_num_threads(per_call)


def default_blocks(lead: tuple[int, ...], L: int, S: int) -> tuple[int, int]:
    """The chunked path's blocks: keys in blocks of 512, queries in blocks
    sized so that one score block holds about 2**21 elements in all."""
    k_block = max(1, min(S, K_BLOCK))
    q_block = max(1, min(L, BLOCK_ELEMENTS // max(1, math.prod(lead) * k_block)))
    return q_block, k_block


def plan_blocks(lead: tuple[int, ...], L: int, S: int, score_bytes: int,
                chunk_size: tuple[int, int] | None, budget: int) -> tuple[int, int] | None:
    """The dense path (``None``) while its scores fit ``budget``, else the
    chunked path's blocks; ``chunk_size`` forces the chunked path."""
    if chunk_size is not None:
        q_block, k_block = chunk_size
        return min(q_block, max(L, 1)), min(k_block, max(S, 1))
    if score_bytes <= budget:
        return None
    return default_blocks(lead, L, S)


def plan_local(lead: tuple[int, ...], L: int, S: int, itemsize: int, spec: AttentionSpec,
               request: Request, budget: int, available: int | None = None) -> Plan:
    """The plan for eager arrays of these sizes, from a resolved ``budget``
    (and the memory ``available``, when it was read)."""
    score_bytes = math.prod(lead) * L * S * itemsize
    if available is not None:
        # The dense path keeps about three score-sized arrays alive: never let a
        # generous budget send it past the memory there is.
        budget = min(budget, available // 4)
    if spec.dropout is not None:
        # Generating the keep-mask of the whole score matrix takes about three
        # more score-sized temporaries (Threefry's words, the mask, the
        # factors), and is faster in cache-sized blocks: measured (NumPy,
        # float32, 8 heads, L = S = 512 to 1024) the chunked path took half the
        # dense path's time once the scores outgrew one block of 2**21.
        budget = min(budget // 2, BLOCK_ELEMENTS * itemsize)
    blocks = plan_blocks(lead, L, S, score_bytes, request.chunk_size, budget)
    peak = weights_peak(lead, L, S, itemsize, blocks) if request.return_weights else 0
    return Plan("dense" if blocks is None else "chunked", blocks, budget,
                request.return_weights, request.return_stats, peak, available)


def weights_peak(lead: tuple[int, ...], L: int, S: int, itemsize: int,
                 blocks: tuple[int, int] | None) -> int:
    """Bytes a call returning the weights holds at its peak, in the compute
    dtype (``blocks`` None: the dense path).

    The dense path keeps about three score-sized arrays alive (the planner
    takes it only while they fit the memory available). The chunked path
    holds every block of weights and, once there is more than one block,
    their concatenation (twice the weights), the last row's blocks while the
    rows are concatenated, and about 1.5 blocks of temporaries; a tenth more
    for the scaled queries, the output and the statistics. Measured with
    tracemalloc (NumPy, float16 to float64, 1 to 32 heads, L = S = 512 to
    8192, default, forced and single blocks: scores of 16 MiB and more, which
    the guard checks), the chunked path peaked at 2.3 to 2.6 times the
    weights (the guard used to count them once), and this estimate was
    within 7 % below to 15 % above the peak. A single block (``chunk_size``
    covering the whole call) holds the weights and a third more.
    """
    weights = math.prod(lead) * L * S * itemsize
    if blocks is None:
        return 3 * weights
    q_block, k_block = max(1, min(blocks[0], L)), max(1, min(blocks[1], S))
    rows, cols = -(-L // q_block), -(-S // k_block)
    row = math.prod(lead) * q_block * S * itemsize
    block = math.prod(lead) * q_block * k_block * itemsize
    if rows == 1 and cols == 1:
        # One block is the weights themselves: measured at 1.3 times them
        # (finite inputs; non-finite ones add a copy for their stand-ins).
        return (weights + weights // 3) * 11 // 10
    held = 2 * weights
    if rows > 1 and cols > 1:
        held += row
    return (held + 3 * block // 2) * 11 // 10


def plan_call(query: Array, key: Array, value: Array, spec: AttentionSpec, request: Request,
              /, *, xp: ModuleType) -> Plan:
    """The plan of a whole call on validated inputs (the memory guard's
    check of ``plan.weights_bytes`` against ``plan.available`` is the
    caller's)."""
    budget = resolve_budget(request.memory_budget)
    if is_dask(xp):
        return Plan("dask", request.chunk_size, budget, request.return_weights,
                    request.return_stats)
    work = compute_dtype(query.dtype, xp)
    L, S = query.shape[-2], key.shape[-2]
    lead = broadcast_lead(query, key, value)
    itemsize = xp.finfo(work).bits // 8
    score_bytes = math.prod(lead) * L * S * itemsize
    # Reading the available memory costs a file read: only for calls large
    # enough for it to matter.
    available = None
    if score_bytes > _GUARD_FROM_BYTES and (request.return_weights or budget >= score_bytes):
        available = host_memory_available(xp, device_of(query))
    plan = plan_local(lead, L, S, itemsize, spec, request, budget, available)
    if request.return_weights and score_bytes > _GUARD_FROM_BYTES:
        # The memory guard's peak estimates (weights_peak) are measured on
        # the serial paths: weights it checks are computed there.
        return plan
    work = math.prod(lead) * L * S * (query.shape[-1] + value.shape[-1])
    threads = parallel_threads((query, key, value), work, request.num_threads)
    return plan if threads == 1 else replace(plan, threads=threads)
