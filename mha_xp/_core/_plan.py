"""The planner: which executor computes a call, with which blocks.

Choosing is separate from computing. The dense path is taken while its
``(..., L, S)`` score tensor fits the memory budget (and, for large calls on
host memory, a quarter of the memory available); the chunked path otherwise,
or when ``chunk_size`` forces it; Dask arrays go to the Dask executor, whose
tasks plan their own blocks from the block's size and the budget resolved
here, without reading the system's memory again.
"""

from __future__ import annotations

import math
from types import ModuleType

from array_api_compat import device as device_of

from .._config import resolve_budget
from .._lib._backends import host_memory_available, is_dask
from .._lib._namespace import Array, compute_dtype
from .._lib._shapes import broadcast_lead
from .._spec import AttentionSpec, Plan, Request

__all__ = ["BLOCK_ELEMENTS", "K_BLOCK", "default_blocks", "plan_blocks", "plan_call",
           "plan_local", "weights_peak"]

# Default key block of the chunked path, and the size (elements) of one score
# block across all batch and head indices: 2**21 float32 = 8 MiB, which
# measured fastest here among 256..4096-wide blocks (within ~10 %), while
# keeping the Python loop short.
K_BLOCK = 512
BLOCK_ELEMENTS = 2**21
# Calls whose dense scores take less than this never consult the memory guard.
_GUARD_FROM_BYTES = 2**24


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
    within 7 % below to 15 % above the peak.
    """
    weights = math.prod(lead) * L * S * itemsize
    if blocks is None:
        return 3 * weights
    q_block, k_block = max(1, min(blocks[0], L)), max(1, min(blocks[1], S))
    rows, cols = -(-L // q_block), -(-S // k_block)
    row = math.prod(lead) * q_block * S * itemsize
    block = math.prod(lead) * q_block * k_block * itemsize
    held = 2 * weights if rows > 1 or cols > 1 else weights
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
    return plan_local(lead, L, S, itemsize, spec, request, budget, available)
