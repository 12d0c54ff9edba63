"""Softmax and everything built on its row statistics, in one place.

A row's softmax is kept as two statistics: the shift ``m`` (the row
maximum, 0 for a row with nothing to attend to) and the sum ``l`` of
``exp(s - m)`` (0 for such a row). From them come the probabilities, the
log-sum-exp, and the merge of attention over disjoint key sets; a fully
masked row gives zeros, never the ``0/0 = NaN`` of the textbook formula, as
in torch's SDPA and FlashAttention.
"""

from __future__ import annotations

import math
from types import ModuleType


from ._backends import writes_in_place
from ._inplace import divide_into, shifted_exp
from ._namespace import Array, device_of
from ._shapes import unbroadcast

__all__ = [
    "add_sinks",
    "lse_from_stats",
    "masked_softmax",
    "merge_partials",
    "probabilities",
    "row_shift",
    "safe_divisor",
    "sink_gradient",
    "unnormalised_attention",
]


def safe_divisor(x: Array, /, *, xp: ModuleType) -> Array:
    """``x`` with its zeros replaced by ones: the divisor of a row sum that
    may be 0 (a row with nothing to attend to keeps its zeros)."""
    return xp.where(x == xp.asarray(0.0, dtype=x.dtype, device=device_of(x)),
                    xp.asarray(1.0, dtype=x.dtype, device=device_of(x)), x)


def row_shift(row_max: Array, /, *, xp: ModuleType) -> Array:
    """The softmax shift of a row from its maximum: 0 where the maximum is
    ``-inf`` (nothing allowed), so that ``exp(s - shift)`` gives 0, not NaN."""
    dev = device_of(row_max)
    neg_inf = xp.asarray(-math.inf, dtype=row_max.dtype, device=dev)
    return xp.where(row_max == neg_inf, xp.asarray(0.0, dtype=row_max.dtype, device=dev), row_max)


def masked_softmax(
    scores: Array,
    allowed: Array | None,
    /,
    *,
    xp: ModuleType,
    return_stats: bool = False,
    in_place: bool | None = None,
) -> Array | tuple[Array, tuple[Array, Array]]:
    """Softmax over the last axis, restricted to the ``allowed`` entries.

    NaN in ``scores`` at an allowed position propagates: it was in the input.

    Parameters
    ----------
    scores : array
        Real floating scores, ``(..., S)``.
    allowed : array of bool or None
        Broadcastable to ``scores``; True where a score takes part.
    xp : module
        The array namespace.
    return_stats : bool, default False
        Also return the statistics ``(m, l)`` of each row, ``(...,)`` each.
    in_place : bool, optional
        Overwrite ``scores`` (which must then be a temporary of the caller's);
        default: where the backend allows.

    Returns
    -------
    array
        Probabilities with the shape and dtype of ``scores``.
    stats : (array, array)
        Only with ``return_stats=True``.
    """
    if allowed is not None:
        # where, not multiplication: masked entries may hold NaN or Inf.
        scores = xp.where(allowed, scores, xp.asarray(-math.inf, dtype=scores.dtype,
                                                      device=device_of(scores)))
    row_max = row_shift(xp.max(scores, axis=-1, keepdims=True), xp=xp)
    if in_place is None:
        in_place = writes_in_place(xp)
    e = shifted_exp(scores, row_max, xp=xp, in_place=in_place)
    total = xp.sum(e, axis=-1, keepdims=True)
    probs = divide_into(e, safe_divisor(total, xp=xp), xp=xp, in_place=in_place)
    if not return_stats:
        return probs
    return probs, (row_max[..., 0], total[..., 0])


def unnormalised_attention(
    scores: Array, value_ones: Array, /, *, xp: ModuleType, return_weights: bool = False,
    in_place: bool | None = None,
) -> tuple[Array, Array | None, tuple[Array, Array]]:
    """``softmax(scores) @ value`` without normalising the probabilities first.

    ``value_ones`` is the value with a column of ones appended
    (``(..., S, Dv + 1)``, :func:`with_ones_column`), so that one matmul of
    ``e = exp(scores - m)`` gives both ``e @ value`` and the row sums ``l`` of
    ``e``; the ``(..., L, Dv)`` result is then divided by ``l``. Against
    :func:`masked_softmax` followed by a matmul this saves the passes over the
    ``(..., L, S)`` scores that sum and divide them. With
    ``return_weights=True`` the probabilities are normalised after the
    matmul, so asking for them never changes ``out``.

    Returns
    -------
    out : array
        ``(..., L, Dv)``.
    weights : array or None
        The probabilities ``(..., L, S)``, with ``return_weights=True``.
    stats : (array, array)
        The rows' shift ``m`` and sum ``l``.
    """
    row_max = row_shift(xp.max(scores, axis=-1, keepdims=True), xp=xp)
    if in_place is None:
        in_place = writes_in_place(xp)
    e = shifted_exp(scores, row_max, xp=xp, in_place=in_place)
    out_sums = xp.matmul(e, value_ones)
    Dv = value_ones.shape[-1] - 1
    total = out_sums[..., Dv:]
    safe = safe_divisor(total, xp=xp)
    out = out_sums[..., :Dv] / safe
    weights = divide_into(e, safe, xp=xp, in_place=in_place) if return_weights else None
    return out, weights, (row_max[..., 0], total[..., 0])


def with_ones_column(value: Array, /, *, xp: ModuleType) -> Array:
    """``value`` with a column of ones appended, ``(..., S, Dv + 1)``: then
    ``P @ result`` holds ``P @ value`` and, in its last column, the row sums
    of ``P``, computed by the matmul rather than by a separate pass over ``P``."""
    ones = xp.ones(tuple(value.shape[:-1]) + (1,), dtype=value.dtype, device=device_of(value))
    return xp.concat([value, ones], axis=-1)


def probabilities(s: Array, stats: tuple[Array, Array], /, *, xp: ModuleType,
                  in_place: bool) -> Array:
    """Attention probabilities ``exp(s - m) / l`` of a score block, from the
    row statistics of the forward (``(..., rows, 1)`` each). Using ``m`` and
    ``l`` rather than ``exp(s - lse)`` keeps float32 exact to rounding even
    when scores are large (``lse`` rounded to float32 would cost ``|lse|·eps``).
    """
    m, l = stats
    return divide_into(shifted_exp(s, m, xp=xp, in_place=in_place), safe_divisor(l, xp=xp),
                       xp=xp, in_place=in_place)


def lse_from_stats(stats: tuple[Array, Array], /, *, xp: ModuleType) -> Array:
    """``log(sum exp(s))`` from the softmax statistics ``(m, l)`` of a row:
    ``m + log(l)``, or ``+inf`` for a row with nothing to attend to (``l = 0``),
    so that ``exp(s - lse)`` is 0 there, as in FlashAttention."""
    m, l = stats
    empty = l == xp.asarray(0.0, dtype=l.dtype, device=device_of(m))
    return xp.where(empty, xp.asarray(math.inf, dtype=l.dtype, device=device_of(m)),
                    m + xp.log(safe_divisor(l, xp=xp)))


def merge_partials(
    out1: Array, lse1: Array, out2: Array, lse2: Array, /, *, xp: ModuleType
) -> tuple[Array, Array]:
    """Merge attention over two disjoint key sets.

    ``lse = logaddexp(lse1, lse2)``, ``out = exp(lse1 - lse) out1 + exp(lse2 - lse) out2``,
    where an infinite ``lse`` marks a row that had no key (its output is
    ignored, its weight is 0): ``+inf`` as mha_xp and FlashAttention write
    it, or ``-inf``, the log of an empty sum, as other libraries do. A row
    empty on both sides gets ``out = 0`` and ``lse = +inf``; a NaN ``lse``
    gives NaN.
    """
    dtype, dev = out1.dtype, device_of(out1)
    w1, w2, lse, e1, e2 = _merge_weights(lse1, lse2, xp=xp)
    no_value = xp.zeros((), dtype=dtype, device=dev)
    return (w1 * xp.where(xp.expand_dims(e1, axis=-1), no_value, out1)
            + w2 * xp.where(xp.expand_dims(e2, axis=-1), no_value, out2)), lse


def _merge_weights(lse1: Array, lse2: Array, /, *, xp: ModuleType,
                   ) -> tuple[Array, Array, Array, Array, Array]:
    """The weights ``(w1, w2)`` (``(..., L, 1)``) that :func:`merge_partials`
    gives the two sides, the merged ``lse``, and where each side is empty."""
    dev = device_of(lse1)
    pos_inf = xp.asarray(math.inf, dtype=lse1.dtype, device=dev)
    zero = xp.asarray(0.0, dtype=lse1.dtype, device=dev)
    e1, e2 = xp.isinf(lse1), xp.isinf(lse2)
    both = xp.logical_and(e1, e2)
    # Finite stand-ins for the empty sides: no inf - inf below.
    lse1, lse2 = xp.where(e1, zero, lse1), xp.where(e2, zero, lse2)
    # The larger of the two (ignoring empty sides) keeps exp() from overflowing.
    top = xp.where(e1, lse2, xp.where(e2, lse1, xp.maximum(lse1, lse2)))
    w1 = xp.where(e1, zero, xp.exp(lse1 - top))
    w2 = xp.where(e2, zero, xp.exp(lse2 - top))
    total = w1 + w2
    safe = xp.where(both, xp.ones_like(total), total)
    lse = xp.where(both, pos_inf, top + xp.log(safe))
    return (xp.expand_dims(w1 / safe, axis=-1), xp.expand_dims(w2 / safe, axis=-1), lse,
            e1, e2)


def add_sinks(out: Array, stats: tuple[Array, Array], sinks: Array, /, *, xp: ModuleType,
              ) -> tuple[Array, tuple[Array, Array], Array]:
    """Attention with one more term per row, ``exp(sink)``, that takes
    softmax mass and carries no value (gpt-oss's learnable sinks).

    ``out`` is attention over the keys, ``stats`` its rows' ``(m, l)`` in the
    compute dtype and ``sinks`` the logits, broadcastable to ``m``'s shape.
    The output is that of :func:`merge_partials` of ``(out, lse)`` with a
    zero output of log-sum-exp ``sink``, bit for bit: ``w * out`` with
    ``w = exp(lse - logaddexp(lse, sink))``. Returns ``(out, stats, w)``:
    the new statistics ``m' = max(m, sink)``, ``l' = l exp(m - m') +
    exp(sink - m')`` are those of the softmax over the keys and the sink (so
    that ``exp(s - m') / l'`` are the weights, and the backward is the
    usual one), and ``w`` ``(..., L, 1)`` rescales weights computed without
    the sink.
    """
    m, l = stats
    sink = xp.broadcast_to(_finite_sinks(sinks, xp=xp), tuple(m.shape))
    w1, _, _, e1, _ = _merge_weights(lse_from_stats(stats, xp=xp), sink, xp=xp)
    work = w1.dtype
    no_value = xp.zeros((), dtype=work, device=device_of(w1))
    scaled = w1 * xp.where(xp.expand_dims(e1, axis=-1), no_value,
                           out if out.dtype == work else xp.astype(out, work))
    top = xp.maximum(m, sink)
    total = l * xp.exp(m - top) + xp.exp(sink - top)
    return (scaled if out.dtype == work else xp.astype(scaled, out.dtype)), (top, total), w1


def _finite_sinks(sinks: Array, /, *, xp: ModuleType) -> Array:
    """``sinks`` with ``+inf`` as the largest finite value: a sink that takes
    all the mass (an infinite log-sum-exp would read as an empty side)."""
    big = xp.asarray(xp.finfo(sinks.dtype).max, dtype=sinks.dtype, device=device_of(sinks))
    return xp.where(sinks == xp.asarray(math.inf, dtype=sinks.dtype, device=device_of(sinks)),
                    big, sinks)


def sink_gradient(out: Array, grad_out: Array, stats: tuple[Array, Array], sinks: Array, /, *,
                  xp: ModuleType) -> Array:
    """The gradient of the sinks of :func:`add_sinks`, shaped as ``sinks``:
    ``-sum(P_sink * rowsum(dO * O))`` over the rows, with ``P_sink =
    exp(sink - m') / l'`` the sink's weight and ``out``, ``stats`` the
    results with the sinks (all in the compute dtype)."""
    m, l = stats
    p_sink = xp.exp(_finite_sinks(sinks, xp=xp) - m) / safe_divisor(l, xp=xp)
    delta = xp.sum(grad_out * out, axis=-1)
    return unbroadcast(-(p_sink * delta), tuple(sinks.shape), xp=xp)
