"""The memory budget that decides between the dense and the chunked path.

No module-level mutable state: the process-wide default comes from the
``MHA_XP_MEMORY_BUDGET`` environment variable, a ``with memory_budget(...)``
block overrides it for the current thread or task (a ``contextvars`` value),
and every call may pass ``memory_budget=`` itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
import os
from collections.abc import Iterator
from typing import Any

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "get_memory_budget",
    "memory_budget",
    "resolve_budget",
]

#: Default budget, in bytes, for the dense score tensor (128 MiB).
DEFAULT_MEMORY_BUDGET = 128 * 2**20

_override: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "mha_xp_memory_budget", default=None
)


def _check(name: str, nbytes: Any) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral) or nbytes < 0:
        raise ValueError(f"{name} must be a non-negative int number of bytes, got {nbytes!r}")
    return int(nbytes)


def get_memory_budget() -> int:
    """Return the memory budget in effect, in bytes.

    Returns
    -------
    int
        The innermost :func:`memory_budget` block's value, else the
        ``MHA_XP_MEMORY_BUDGET`` environment variable (bytes), else
        128 MiB.

    Examples
    --------
    >>> import mha_xp
    >>> with mha_xp.memory_budget(2**20):
    ...     mha_xp.get_memory_budget()
    1048576
    """
    value = _override.get()
    if value is not None:
        return value
    env = os.environ.get("MHA_XP_MEMORY_BUDGET")
    if env:
        try:
            return _check("MHA_XP_MEMORY_BUDGET", int(env))
        except ValueError:
            raise ValueError(
                f"MHA_XP_MEMORY_BUDGET must be a non-negative int number of bytes, got {env!r}"
            ) from None
    return DEFAULT_MEMORY_BUDGET


@contextlib.contextmanager
def memory_budget(nbytes: int) -> Iterator[None]:
    """Set the memory budget for the attention calls inside a ``with`` block.

    While the dense ``(..., H, L, S)`` score tensor, in the compute dtype,
    fits the budget, attention takes the dense path; above it, the chunked
    path, whose memory is linear in the sequence length. The setting is local
    to the current thread (or asyncio task) and restored on exit.

    Parameters
    ----------
    nbytes : int
        Budget in bytes; 0 always takes the chunked path.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> q = k = v = np.random.default_rng(0).standard_normal((2, 64, 8))
    >>> with mha_xp.memory_budget(0):   # force the chunked path
    ...     out = mha_xp.scaled_dot_product_attention(q, k, v)
    >>> bool(np.allclose(out, mha_xp.scaled_dot_product_attention(q, k, v)))
    True
    """
    token = _override.set(_check("nbytes", nbytes))
    try:
        yield
    finally:
        _override.reset(token)


def resolve_budget(per_call: Any) -> int:
    """The budget for one call: its own argument, else the one in effect."""
    return get_memory_budget() if per_call is None else _check("memory_budget", per_call)
