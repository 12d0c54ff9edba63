"""Non-finite inputs: computed on finite stand-ins, then put back as NaN
along the edges that see them.

A weight of exactly 0 does not stop a NaN or an infinity (``0 * NaN`` and
``0 * inf`` are NaN), so a masked key that holds one would reach every row
of the block's ``P V`` and ``dS K`` products, and which rows it reached
would depend on the blocks. Instead every path computes on copies of the
query, key, value (and, backward, the output and its gradient) whose
non-finite entries are replaced by 0 with ``where`` (finite entries keep
their bits: finite calls are bit for bit what they were), and notes which
rows held any. The matrix products then see finite numbers only (nothing
to warn about under ``np.errstate(all="raise")``), and the non-finite
entries come back as NaN where they were seen:

- forward: a row that gives a non-zero weight to a key or value that held
  one, or whose own query held one while it sees any key, is *poisoned*:
  its output, weights and log-sum-exp are NaN (all of its features: which
  feature would have held NaN or ±Inf is not tracked). Whether a row gave
  such a key weight comes out of the ``P V`` product itself, through one
  more column of values (1 for such keys, 0 otherwise): no pass over the
  scores. Poisoned rows keep their shift ``m`` and carry ``l = NaN`` in
  the statistics, so that ``lse = m + log l`` is NaN and the backward can
  tell them.
- all finite: when the inputs' values can be read for free (host memory,
  eager: :func:`~mha_xp._lib._backends.host_readable`) one check per input
  tells that none holds a non-finite entry, and then the executor sees the
  inputs as they are (the value with a flag column of zeros, which keeps
  the bits of the products) and nothing is poisoned: the same numbers,
  without the stand-ins' passes.
  Lazy, traced and device arrays always take the stand-ins.
- backward: a row whose output or upstream gradient is not finite (a
  poisoned row among them) gives NaN gradients to its query and to every
  key and value it gives a non-zero weight, and NaN bias gradients at those
  positions; every other gradient is computed from finite numbers, so
  that a masked position's is exactly 0.
"""

from __future__ import annotations

import contextlib
import math
from types import ModuleType
from typing import Any

from .._lib._backends import host_readable, writes_in_place
from .._lib._inplace import zero_unless, zero_unless_then
from .._lib._namespace import Array, device_of

__all__ = ["all_finite", "finite_part", "finite_values", "poison_rows", "stand_ins",
           "underflow_ignored"]


def underflow_ignored(xp: ModuleType) -> contextlib.AbstractContextManager[Any]:
    """NumPy's error state with underflow ignored, for the namespaces that
    have one (NumPy's; a no-op elsewhere: torch, JAX and CuPy keep no
    floating-point flags, array-api-strict exposes none).

    Underflow is the one flag that finite stand-ins cannot avoid: the
    softmax's ``exp(s - m)`` of a score far below its row's maximum, a small
    weight times a small value, a tiny result rounded to float16 are all
    correctly rounded to a subnormal number or 0, which IEEE 754 and NumPy's
    default settings treat as no error. Flushing them instead would change
    finite results and cost passes over every score block; so a user's
    ``np.errstate(under="raise")`` does not reach inside the call, while its
    overflow, invalid and divide flags do (the stand-ins keep those from
    being raised on valid input)."""
    errstate = getattr(xp, "errstate", None)
    return contextlib.nullcontext() if errstate is None else errstate(under="ignore")


def all_finite(*arrays: Array, xp: ModuleType) -> bool:
    """Whether every entry of ``arrays`` is finite, where that is free to
    read (:func:`~mha_xp._lib._backends.host_readable`); False where it is
    not (a lazy, traced or device array), so that the caller takes the
    stand-ins, which are right in every case.

    ``isfinite`` then ``all``, not a sum (finite only if every term is, but
    NumPy warns of ``inf - inf`` and of overflow, and a user's
    ``np.errstate(all="raise")`` would turn that into an error)."""
    if not all(host_readable(a) for a in arrays):
        return False
    return bool(finite_flag(*arrays, xp=xp))


def finite_flag(*arrays: Array, xp: ModuleType) -> Array:
    """Whether every entry of ``arrays`` is finite, as a 0-d boolean array
    (read it in Python only where that is free; under ``jax.jit`` it
    decides a ``lax.cond``)."""
    flag = None
    for a in arrays:
        ok = xp.all(xp.isfinite(a))
        flag = ok if flag is None else xp.logical_and(flag, ok)
    return flag


def stand_ins(query: Array, key: Array, value: Array, /, *, xp: ModuleType,
              ) -> tuple[Array, Array, Array, Array | None]:
    """``(query, key, value, query_bad)`` as an executor sees them: when
    they are all finite (:func:`all_finite`), the query and key as they are,
    the value with a flag column of zeros and ``query_bad`` None; else their
    finite stand-ins (:func:`finite_part`), the value with its flag column
    (:func:`finite_values`) and the rows of the query that held a
    non-finite entry, for :func:`poison_rows`."""
    if all_finite(query, key, value, xp=xp):
        # The flag column all zeros, so that the matrix products have the
        # shapes, and so the bits, of the stand-ins' (a row that sees no
        # non-finite entry must not change when another row does).
        flags = xp.zeros(tuple(value.shape[:-1]) + (1,), dtype=value.dtype,
                         device=device_of(value))
        return query, key, xp.concat([value, flags], axis=-1), None
    query, query_bad = finite_part(query, xp=xp)
    key, key_bad = finite_part(key, xp=xp)
    return query, key, finite_values(value, key_bad, xp=xp), query_bad


def finite_part(x: Array, /, *, xp: ModuleType, in_place: bool | None = None,
                ) -> tuple[Array, Array]:
    """``x`` with its non-finite entries replaced by 0 (finite entries keep
    their bits), a new array, and whether each row (the last axis) held
    any, ``x.shape[:-1]``. ``in_place`` (default: where the backend allows)
    writes the copy in place (:func:`~mha_xp._lib._inplace.zero_unless`)."""
    finite = xp.isfinite(x)
    in_place = writes_in_place(xp) if in_place is None else in_place
    return (zero_unless(x, finite, xp=xp, in_place=in_place),
            xp.logical_not(xp.all(finite, axis=-1)))


def finite_values(value: Array, key_bad: Array, /, *, xp: ModuleType,
                  in_place: bool | None = None) -> Array:
    """``value (..., S, Dv)`` with its non-finite entries replaced by 0 and
    one more column, 1 for the keys whose value or key (``key_bad (..., S)``)
    held any and 0 for the others, leading shapes broadcast: ``P @ result``
    holds ``P @ value`` and, last, the weight each row gives such keys.
    ``in_place`` (default: where the backend allows) writes it in one pass
    (:func:`~mha_xp._lib._inplace.zero_unless_then`)."""
    finite = xp.isfinite(value)
    flag = xp.logical_or(key_bad, xp.logical_not(xp.all(finite, axis=-1)))
    in_place = writes_in_place(xp) if in_place is None else in_place
    column = xp.expand_dims(xp.astype(flag, value.dtype), axis=-1)
    return zero_unless_then(value, finite, column, xp=xp, in_place=in_place)


def poison_rows(out: Array, weights: Array | None, stats: tuple[Array, Array],
                query_bad: Array | None, /, *, xp: ModuleType,
                ) -> tuple[Array, Array | None, tuple[Array, Array]]:
    """Split the flag column off ``out (..., L, Dv + 1)`` (from values made by
    :func:`finite_values`) and poison the rows that saw a non-finite
    key or value, or whose query (``query_bad``, broadcastable to the rows)
    held one while they see a key: NaN output and weights, ``l = NaN``.
    ``query_bad`` None (:func:`stand_ins` found every input finite): the
    flag column is split off, nothing is poisoned."""
    Dv = out.shape[-1] - 1
    if query_bad is None:
        return out[..., :Dv], weights, stats
    m, l = stats
    dev = device_of(l)
    zero = xp.zeros((), dtype=l.dtype, device=dev)
    poisoned = xp.logical_or(out[..., Dv] > zero, xp.logical_and(query_bad, l > zero))
    # A factor of 1 or NaN per row: x * 1.0 is x, bit for bit, and one
    # multiplication is about twice as fast as where() on NumPy.
    factor = xp.where(poisoned, xp.asarray(math.nan, dtype=l.dtype, device=dev),
                      xp.ones((), dtype=l.dtype, device=dev))
    rows = xp.expand_dims(factor, axis=-1)
    out = out[..., :Dv] * xp.astype(rows, out.dtype)
    if weights is not None:
        weights = weights * xp.astype(rows, weights.dtype)
    return out, weights, (m, l * factor)

