"""The one backend-specific fast path: in-place elementwise updates.

The portable path allocates a new array per elementwise step, as it must
(JAX arrays are immutable). NumPy and CuPy can overwrite a temporary that
mha_xp itself created, which saves an allocation and a pass through memory
per step on the score blocks. Tests run both paths against each other
(``tests/test_chunked.py``).
"""

from __future__ import annotations

from types import ModuleType

from ._backends import writes_in_place
from ._namespace import Array
from ._shapes import broadcasts_to

__all__ = [
    "add_into",
    "divide_into",
    "gated_difference",
    "multiply_into",
    "shifted_exp",
    "softcap_into",
    "writes_in_place",
]


def _fits(b: Array, s: Array) -> bool:
    """Whether ``b`` broadcasts into ``s``'s shape (so ``s`` can hold the result)."""
    return broadcasts_to(tuple(b.shape), tuple(s.shape))


def add_into(s: Array, b: Array, /, *, xp: ModuleType, in_place: bool) -> Array:
    """``s + b``, overwriting ``s`` (a temporary of ours) when allowed."""
    if in_place and _fits(b, s):
        return xp.add(s, b, out=s)
    return s + b


def shifted_exp(s: Array, shift: Array, /, *, xp: ModuleType, in_place: bool) -> Array:
    """``exp(s - shift)``, overwriting ``s`` (a temporary of ours) when allowed."""
    if in_place and _fits(shift, s):
        xp.subtract(s, shift, out=s)
        return xp.exp(s, out=s)
    return xp.exp(s - shift)


def divide_into(e: Array, d: Array, /, *, xp: ModuleType, in_place: bool) -> Array:
    """``e / d``, overwriting ``e`` when allowed."""
    if in_place and _fits(d, e):
        return xp.divide(e, d, out=e)
    return e / d


def multiply_into(a: Array, b: Array, /, *, xp: ModuleType, in_place: bool) -> Array:
    """``a * b``, overwriting ``a`` (a temporary of ours) when allowed (e.g. a
    block of probabilities times its dropout factors ``Z / (1 - p)``)."""
    if in_place and _fits(b, a):
        return xp.multiply(a, b, out=a)
    return a * b


def gated_difference(dp: Array, d: Array, p: Array, /, *, xp: ModuleType, in_place: bool) -> Array:
    """``p * (dp - d)`` (the softmax backward), overwriting ``dp`` when allowed."""
    if in_place and _fits(d, dp) and _fits(p, dp):
        xp.subtract(dp, d, out=dp)
        return xp.multiply(dp, p, out=dp)
    return p * (dp - d)


def softcap_into(s: Array, cap: float, /, *, xp: ModuleType, in_place: bool) -> Array:
    """``tanh(s / cap) * cap`` (logit soft-capping), overwriting ``s`` when allowed."""
    if in_place:
        xp.divide(s, cap, out=s)
        xp.tanh(s, out=s)
        return xp.multiply(s, cap, out=s)
    return xp.tanh(s / cap) * cap
