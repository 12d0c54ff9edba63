"""The memory budget that decides between the dense and the chunked path.

No module-level mutable state: the process-wide default comes from the
``MHA_XP_MEMORY_BUDGET`` environment variable, a ``with memory_budget(...)``
block overrides it for the current thread or task (a ``contextvars`` value),
and every call may pass ``memory_budget=`` itself.
"""

from __future__ import annotations

import contextvars
import numbers
import os
from typing import Any

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "get_memory_budget",
    "memory_budget",
    "resolve_budget",
]

#: Default budget, in bytes, for the dense score tensor (128 MiB).
DEFAULT_MEMORY_BUDGET = 128 * 2**20

# The open ``with memory_budget(...)`` blocks of this context, oldest first:
# an immutable tuple, so that a block's exit removes its own entry wherever it
# is (see memory_budget's Notes) and other contexts never see the change.
_override: contextvars.ContextVar[tuple[memory_budget, ...]] = contextvars.ContextVar(
    "mha_xp_memory_budget", default=()
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
    blocks = _override.get()
    if blocks:
        return blocks[-1].nbytes
    env = os.environ.get("MHA_XP_MEMORY_BUDGET")
    if env:
        try:
            return _check("MHA_XP_MEMORY_BUDGET", int(env))
        except ValueError:
            raise ValueError(
                f"MHA_XP_MEMORY_BUDGET must be a non-negative int number of bytes, got {env!r}"
            ) from None
    return DEFAULT_MEMORY_BUDGET


class memory_budget:  # lower case: called like a function, as contextlib's context managers
    """Set the memory budget for the attention calls inside a ``with`` block.

    While the dense ``(..., H, L, S)`` score tensor, in the compute dtype,
    fits the budget, attention takes the dense path; above it, the chunked
    path, whose memory is linear in the sequence length. The setting is local
    to the current thread (or asyncio task) and undone on exit.

    Parameters
    ----------
    nbytes : int
        Budget in bytes; 0 always takes the chunked path.

    Raises
    ------
    ValueError
        If ``nbytes`` is not a non-negative int.

    Notes
    -----
    Every block's setting holds while the block is open, the most recently
    entered open block's winning; a block that exits removes its own setting
    only. Blocks normally exit innermost first, and then this is the usual
    nesting; but blocks held open by generators (``with memory_budget(n):
    yield``) may exit in any order, and then too each exit leaves the other
    open blocks' settings in force, and the last exit leaves none behind (a
    ``contextvars`` token reset out of order would restore a stale value).

    The budget is read when a call is planned, in Python. Under ``jax.jit``
    that is when the function is traced: the compiled function keeps the
    path chosen with the budget of its first trace, whatever budget is in
    effect when it is called again with inputs of the same shapes. To
    choose per call, pass ``memory_budget=`` (or ``chunk_size=``) to the
    attention call and make it a static argument of the jitted function
    (``jax.jit(f, static_argnames="budget")``), or jit one function per
    budget.

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

    __slots__ = ("_nbytes",)

    def __init__(self, nbytes: int) -> None:
        self._nbytes = _check("nbytes", nbytes)

    @property
    def nbytes(self) -> int:
        """The budget this block sets, in bytes."""
        return self._nbytes

    def __enter__(self) -> None:
        _override.set(_override.get() + (self,))

    def __exit__(self, *exc: object) -> None:
        # Remove this block's entry (the last one of this object: nested uses of
        # one object hold the same value) from this context's open blocks,
        # wherever it is; the others stay as they are. Nothing is kept on the
        # object, so one object may be entered in several threads at once.
        blocks = _override.get()
        for i in range(len(blocks) - 1, -1, -1):
            if blocks[i] is self:
                _override.set(blocks[:i] + blocks[i + 1:])
                return

    def __repr__(self) -> str:
        return f"memory_budget({self.nbytes})"


def resolve_budget(per_call: Any) -> int:
    """The budget for one call: its own argument, else the one in effect."""
    return get_memory_budget() if per_call is None else _check("memory_budget", per_call)
