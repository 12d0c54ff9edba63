"""From a validated call to its result: plan it, check that it fits, run the
core. Shared by the function API and the layer, which also run their
backward under :func:`threads_for`."""

from __future__ import annotations

import contextlib
from types import ModuleType

from ._checks import check_weights_fit
from ._config import num_threads
from ._core._dispatch import attend
from ._core._plan import plan_call
from ._lib._namespace import Array, compute_dtype
from ._lib._shapes import broadcast_shapes
from ._spec import AttentionSpec, Request

__all__ = ["run_attention", "threads_for"]


def run_attention(query: Array, key: Array, value: Array, spec: AttentionSpec,
                  request: Request, /, *, xp: ModuleType,
                  ) -> tuple[Array, Array | None, tuple[Array, Array] | None]:
    """Plan a validated call, check that what it returns fits in memory, and
    run it in the core: ``(out, weights or None, stats or None)``."""
    plan = plan_call(query, key, value, spec, request, xp=xp)
    if plan.weights_bytes:
        # plan.weights_bytes is the peak of the call that returns the weights
        # (for the chunked path about twice the weights: the blocks and their
        # concatenation), so that what cannot fit is refused before it starts.
        lead = broadcast_shapes(*(tuple(t.shape[:-2]) for t in (query, key, value)))
        work = compute_dtype(query.dtype, xp)
        check_weights_fit(plan.weights_bytes, plan.available,
                          lead + (query.shape[-2], key.shape[-2]), work,
                          xp.finfo(work).bits // 8)
    return attend(query, key, value, spec, plan, xp=xp)


def threads_for(per_call: int | None) -> contextlib.AbstractContextManager[None]:
    """The thread count a call's backward runs with: the forward's
    validated ``num_threads=``, else (None) the number in effect when the
    backward runs."""
    return contextlib.nullcontext() if per_call is None else num_threads(per_call)
