"""The backward pass of attention, FlashAttention-2 style, on the array API.

The forward keeps only its output ``O`` and the per-row softmax statistics
(the shift ``m`` and the sum ``l``, whose ``m + log l`` is the log-sum-exp).
The backward recomputes the probabilities block by block,
``P = exp(S - m) / l``, and with ``D = rowsum(dO * O)``:

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D),
    dQ = scale * dS' K,   dK = scale * dS'^T Q,   dBias = dS,

where ``dS' = dS`` or, with logit soft-capping ``c tanh(s / c)``,
``dS' = dS * (1 - tanh^2)``. ALiBi slopes get no gradient.

With dropout on the weights (``O = (P * Z / (1 - p)) V``, keep-mask ``Z``):

    dV = (P * Z / (1 - p))^T dO,   dP = (dO V^T) * Z / (1 - p),

and ``D = rowsum(dO * O)`` and ``dS = P * (dP - D)`` as they are. ``Z`` is
regenerated block by block from the seed (:func:`~mha_xp._core._positions.dropout_scale`),
never stored.

The extra memory is one score block, linear in the sequence lengths. The
loops run in a fixed order: repeated calls give bit-identical results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any, cast


from .._lib._backends import writes_in_place
from .._lib._inplace import gated_difference, multiply_into
from .._lib._namespace import Array, device_of
from .._lib._shapes import broadcast_lead, unbroadcast
from .._lib._softmax import probabilities
from .._spec import AttentionSpec, Block
from ._finite import finite_part
from ._modifiers import EMPTY, FULL, block_kind, modify_backward
from ._positions import diag_offset, dropout_scale, key_range, with_lead_index
from ._scores import block_scores

__all__ = ["Saved", "attention_backward"]


@dataclass(frozen=True)
class Saved:
    """What the forward keeps for the backward: its inputs (in the compute
    dtype), its output and the rows' softmax statistics ``(m, l)``."""

    query: Array
    key: Array
    value: Array
    out: Array
    stats: tuple[Array, Array]


def _bias_block(ds: Array, bias_shape: tuple[int, ...], *, xp: ModuleType) -> Array:
    """Reduce a score-gradient block to the broadcast shape of ``bias``."""
    lead = bias_shape[:-2] + (ds.shape[-2] if bias_shape[-2] != 1 else 1,
                              ds.shape[-1] if bias_shape[-1] != 1 else 1)
    return unbroadcast(ds, lead, xp=xp)


def _bias_zeros(bias: Array, rows: slice, cols: slice, *, xp: ModuleType) -> Array:
    """A zero gradient block for a bias block the causal mask skips."""
    shape = tuple(bias.shape)
    block = (rows.stop - rows.start if shape[-2] != 1 else 1,
             cols.stop - cols.start if shape[-1] != 1 else 1)
    return xp.zeros(shape[:-2] + block, dtype=bias.dtype, device=device_of(bias))


def _join(parts: list[Array], axis: int, full: bool, *, xp: ModuleType) -> Array:
    """Concatenate blocks along ``axis``, or sum them when the input was
    broadcast along that axis."""
    if full:
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=axis)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


class _Grads:
    """Per-block gradients of one backward pass, assembled at the end."""

    def __init__(self, n_k: int) -> None:
        self.dk: list[Any] = [None] * n_k
        self.dv: list[Any] = [None] * n_k
        self.dq: list[Any] = []
        self.bias_rows: list[list[Any]] = []


def attention_backward(
    saved: Saved, grad_out: Array, spec: AttentionSpec, block: Block, blocks: tuple[int, int],
    /, *, xp: ModuleType, in_place: bool | None = None,
) -> tuple[Array, Array, Array, Array | None]:
    """Gradients of attention with respect to query, key, value and bias.

    All arrays are in the compute dtype; ``saved`` comes from the forward
    with the same ``spec``. Returns ``(dq, dk, dv, dbias)`` with the shapes
    of the query, key, value and ``spec.bias`` (``dbias`` None without a
    bias). Rows with nothing to attend to (``l = 0``) get zero gradients.
    ``in_place`` (default: where the backend allows) overwrites the score
    blocks, which are temporaries of this function.

    Non-finite inputs (``saved`` from a forward that poisoned rows, or a
    ``grad_out`` holding NaN or Inf) never reach a masked position: the
    blocks are computed on finite stand-ins, and NaN goes to the gradients
    of the rows whose output or upstream gradient is not finite, of the keys
    and values they give a non-zero weight, and of the bias there
    (:mod:`._finite`).
    """
    in_place = writes_in_place(xp) if in_place is None else in_place
    saved, grad_out, flagged, delta, bad = _finite_inputs(saved, grad_out, xp=xp)
    query, key, value = saved.query, saved.key, saved.value
    L, S = query.shape[-2], key.shape[-2]
    dev = device_of(query)
    offset = diag_offset(L, S, spec, block)
    block = with_lead_index(spec, block, broadcast_lead(query, key, value), xp=xp, device=dev)
    q_scaled = query * spec.scale
    m, l = (xp.expand_dims(t, axis=-1) for t in saved.stats)
    q_block, k_block = blocks
    n_k = -(-S // k_block) if S else 0
    grads = _Grads(n_k)
    for i0 in range(0, L, q_block):
        rows = slice(i0, min(i0 + q_block, L))
        dq = None
        bias_cols: list[Any] = []
        j_start, j_end = key_range(rows.start, rows.stop, S, offset, spec)
        for jb in range(n_k):
            cols = slice(jb * k_block, min((jb + 1) * k_block, S))
            if cols.start >= j_end or cols.stop <= j_start:  # outside the band: no gradient
                if spec.bias is not None:
                    bias_cols.append(_bias_zeros(spec.bias, rows, cols, xp=xp))
                continue
            kind = block_kind(spec, block, rows, cols)
            if kind == EMPTY:  # the block mask knows nothing is attended here
                if spec.bias is not None:
                    bias_cols.append(_bias_zeros(spec.bias, rows, cols, xp=xp))
                continue
            # A score_mod keeps the scores it was given: no writing over them.
            own = in_place and spec.score_mod is None
            s, t, before = cast("tuple[Array, Array | None, Array | None]", block_scores(q_scaled[..., rows, :], key, spec, rows, cols, offset,
                                        xp=xp, in_place=own, return_tanh=True, block=block,
                                        full=kind == FULL))
            p = probabilities(s, (m[..., rows, :], l[..., rows, :]), xp=xp, in_place=own)
            chain = None if before is None else partial(
                modify_backward, spec=spec, block=block, rows=rows, cols=cols, xp=xp,
                before=before)
            dq_j, dk, dv, dbias = _block_grads(
                p, t, dropout_scale(spec, block, rows, cols, dtype=query.dtype, xp=xp, device=dev),
                (grad_out[..., rows, :], flagged[..., rows, :], delta[..., rows, :],
                 q_scaled[..., rows, :]),
                (key[..., cols, :], value[..., cols, :]),
                None if spec.bias is None else tuple(spec.bias.shape), xp=xp, in_place=own,
                chain=chain)
            bias_cols.append(dbias)
            dq = dq_j if dq is None else dq + dq_j
            grads.dk[jb] = dk if grads.dk[jb] is None else grads.dk[jb] + dk
            grads.dv[jb] = dv if grads.dv[jb] is None else grads.dv[jb] + dv
        if dq is None:
            dq = xp.zeros(query.shape[:-2] + (rows.stop - rows.start, query.shape[-1]),
                          dtype=query.dtype, device=dev)
        grads.dq.append(dq * spec.scale)
        grads.bias_rows.append(bias_cols)
    return _assemble(grads, saved, spec, k_block, bad, xp=xp)


def _finite_inputs(saved: Saved, grad_out: Array, /, *, xp: ModuleType,
                   ) -> tuple[Saved, Array, Array, Array, Array]:
    """The backward's inputs with their non-finite entries replaced by 0:
    ``(saved, grad_out, flagged, delta, bad)``, where ``bad`` marks the rows
    (with a key to attend to) whose output or upstream gradient was not
    finite or that the forward poisoned (``l = NaN``, then read as 1),
    ``flagged`` is ``grad_out`` with ``bad`` as one more column (so that
    ``P^T @ flagged`` gives the weight the bad rows give each key) and
    ``delta = rowsum(grad_out * out)``."""
    query, key, value = (finite_part(t, xp=xp)[0] for t in (saved.query, saved.key, saved.value))
    out, out_bad = finite_part(saved.out, xp=xp)
    grad_out, grad_bad = finite_part(grad_out, xp=xp)
    m, l = saved.stats
    poisoned = xp.isnan(l)
    dev = device_of(l)
    l = xp.where(poisoned, xp.ones((), dtype=l.dtype, device=dev), l)
    bad = xp.logical_and(xp.logical_or(xp.logical_or(out_bad, grad_bad), poisoned),
                         l > xp.zeros((), dtype=l.dtype, device=dev))
    delta = xp.sum(grad_out * out, axis=-1, keepdims=True)
    return (Saved(query, key, value, out, (m, l)), grad_out,
            xp.concat([grad_out, xp.expand_dims(xp.astype(bad, grad_out.dtype), axis=-1)],
                      axis=-1), delta, bad)


def _block_grads(
    p: Array, t: Array | None, drop: Array | None, row_arrays: tuple[Array, Array, Array, Array],
    col_arrays: tuple[Array, Array], bias_shape: tuple[int, ...] | None, /, *,
    xp: ModuleType, in_place: bool, chain: Callable[[Array], Array] | None = None,
) -> tuple[Array, Array, Array, Array | None]:
    """``(dq, dk, dv, dbias)`` of one score block from its probabilities ``p``
    (and ``t = tanh(s / softcap)``, dropout's factors ``drop``), the rows'
    ``(dO, dO with the bad-row column, rowsum(dO * O), scaled Q)`` and the
    columns' ``(K, V)``. ``dv`` carries one more column: the weight that
    bad rows give each key (before dropout). ``chain`` takes the score
    gradient through a ``score_mod``."""
    do, flagged, d_i, q = row_arrays
    k_j, v_j = col_arrays
    dp = xp.matmul(do, xp.matrix_transpose(v_j))
    if drop is None:
        dv = xp.matmul(xp.matrix_transpose(p), flagged)
    else:
        dv = xp.concat([xp.matmul(xp.matrix_transpose(p * drop), do),
                        xp.matmul(xp.matrix_transpose(p), flagged[..., -1:])], axis=-1)
        dp = multiply_into(dp, drop, xp=xp, in_place=in_place)
    ds = gated_difference(dp, d_i, p, xp=xp, in_place=in_place)
    if chain is not None:  # through the caller's score_mod
        ds = chain(ds)
    dbias = None
    if bias_shape is not None:  # NaN where a bad row gives weight
        zero = xp.zeros((), dtype=p.dtype, device=device_of(p))
        seen = xp.logical_and(flagged[..., -1:] > zero, p > zero)
        dbias = _bias_block(xp.where(seen, xp.asarray(math.nan, dtype=ds.dtype,
                                                      device=device_of(ds)), ds),
                            bias_shape, xp=xp)
    if t is not None:  # through the soft-cap: d(c tanh(s / c))/ds = 1 - tanh^2
        ds = ds * (1.0 - t * t)
    dk = xp.matmul(xp.matrix_transpose(ds), q)  # q is already scaled
    return xp.matmul(ds, k_j), dk, dv, dbias


def _assemble(grads: _Grads, saved: Saved, spec: AttentionSpec, k_block: int, bad: Array,
              /, *, xp: ModuleType) -> tuple[Array, Array, Array, Array | None]:
    """Join the per-block gradients and sum them back to the inputs' shapes,
    with NaN for the bad rows' queries and the keys and values they see."""
    query, key, value = saved.query, saved.key, saved.value
    dev = device_of(query)
    S, Dv = key.shape[-2], value.shape[-1]
    nan = xp.asarray(math.nan, dtype=query.dtype, device=dev)
    dq = grads.dq[0] if len(grads.dq) == 1 else xp.concat(grads.dq, axis=-2)
    dq = unbroadcast(xp.where(xp.expand_dims(bad, axis=-1), nan, dq), tuple(query.shape), xp=xp)
    lead = broadcast_lead(query, key, value)
    dv = _fill(grads.dv, lead + (S, Dv + 1), k_block, query.dtype, dev, xp)
    seen = xp.expand_dims(dv[..., Dv] > xp.zeros((), dtype=dv.dtype, device=dev), axis=-1)
    dk = _fill(grads.dk, lead + (S, key.shape[-1]), k_block, query.dtype, dev, xp)
    dk = unbroadcast(xp.where(seen, nan, dk), tuple(key.shape), xp=xp)
    dv = unbroadcast(xp.where(seen, nan, dv[..., :Dv]), tuple(value.shape), xp=xp)
    dbias = None
    if spec.bias is not None:
        bshape = tuple(spec.bias.shape)
        row_grads = [_join(cols, -1, bshape[-1] != 1, xp=xp) for cols in grads.bias_rows]
        dbias = unbroadcast(_join(row_grads, -2, bshape[-2] != 1, xp=xp), bshape, xp=xp)
    return dq, dk, dv, dbias


def _fill(parts: list[Any], shape: tuple[int, ...], block: int, dtype: Any, dev: Any,
          xp: ModuleType) -> Array:
    """Join per-key-block gradients (None = zero) along the key axis."""
    filled = []
    for n, part in enumerate(parts):
        if part is None:
            size = min(block, shape[-2] - n * block)
            part = xp.zeros(shape[:-2] + (size, shape[-1]), dtype=dtype, device=dev)
        filled.append(part)
    return filled[0] if len(filled) == 1 else xp.concat(filled, axis=-2)
