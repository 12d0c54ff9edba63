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
regenerated block by block from the seed (:func:`~mha_xp._masks.dropout_scale`),
never stored.

The extra memory is one score block, linear in the sequence lengths. The
loops run in a fixed order: repeated calls give bit-identical results.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from array_api_compat import device as device_of

from ._chunked import block_scores, broadcast_lead, diag_offset, probabilities
from ._masks import Variants, dropout_scale, key_range, with_lead_index
from ._lib._inplace import gated_difference, multiply_into, writes_in_place
from ._lib._namespace import Array

__all__ = ["attention_backward", "unbroadcast"]


def unbroadcast(g: Array, shape: tuple[int, ...], /, *, xp: ModuleType) -> Array:
    """Sum ``g`` over the axes along which an array of ``shape`` was broadcast."""
    extra = g.ndim - len(shape)
    if extra > 0:
        g = xp.sum(g, axis=tuple(range(extra)))
    axes = tuple(i for i, (gs, s) in enumerate(zip(g.shape, shape)) if s == 1 and gs != 1)
    if axes:
        g = xp.sum(g, axis=axes, keepdims=True)
    if tuple(g.shape) != tuple(shape):  # g was itself broadcast smaller than the input
        g = xp.broadcast_to(g, shape) + xp.zeros(shape, dtype=g.dtype, device=device_of(g))
    return g


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


def attention_backward(
    query: Array,
    key: Array,
    value: Array,
    out: Array,
    stats: tuple[Array, Array],
    grad_out: Array,
    /,
    *,
    mask: Array | None,
    key_keep: Array | None,
    bias: Array | None,
    is_causal: bool,
    scale: float,
    q_block: int,
    k_block: int,
    xp: ModuleType,
    in_place: bool | None = None,
    variants: Variants | None = None,
) -> tuple[Array, Array, Array, Array | None]:
    """Gradients of attention with respect to query, key, value and bias.

    All arrays are in the compute dtype; ``out`` and ``stats`` come from the
    forward with the same arguments. Returns ``(dq, dk, dv, dbias)`` with the
    shapes of ``query``, ``key``, ``value`` and ``bias`` (``dbias`` None
    without a bias). Rows with nothing to attend to (``l = 0``) get zero
    gradients. ``in_place`` (default: where the backend allows) overwrites
    the score blocks, which are temporaries of this function.
    """
    if in_place is None:
        in_place = writes_in_place(xp)
    L, S = query.shape[-2], key.shape[-2]
    dev = device_of(query)
    offset = diag_offset(L, S, variants)
    variants = with_lead_index(variants, broadcast_lead(query, key, value), xp=xp, device=dev)
    q_scaled = query * scale
    delta = xp.sum(grad_out * out, axis=-1, keepdims=True)
    m, l = (xp.expand_dims(t, axis=-1) for t in stats)
    n_k = -(-S // k_block) if S else 0
    dk_parts: list[Any] = [None] * n_k
    dv_parts: list[Any] = [None] * n_k
    dq_parts = []
    bias_rows = []
    for i0 in range(0, L, q_block):
        rows = slice(i0, min(i0 + q_block, L))
        q, do = q_scaled[..., rows, :], grad_out[..., rows, :]
        d_i, row_stats = delta[..., rows, :], (m[..., rows, :], l[..., rows, :])
        dq = None
        bias_cols = []
        j_start, j_end = key_range(rows.start, rows.stop, S, offset, is_causal, variants)
        for jb in range(n_k):
            cols = slice(jb * k_block, min((jb + 1) * k_block, S))
            if cols.start >= j_end or cols.stop <= j_start:  # outside the band: no gradient
                if bias is not None:
                    bias_cols.append(_bias_zeros(bias, rows, cols, xp=xp))
                continue
            s, t = block_scores(q, key, mask=mask, key_keep=key_keep, bias=bias,
                                is_causal=is_causal, rows=rows, cols=cols, offset=offset, xp=xp,
                                in_place=in_place, variants=variants, return_tanh=True)
            p = probabilities(s, row_stats, xp=xp, in_place=in_place)
            k_j, v_j = key[..., cols, :], value[..., cols, :]
            dp = xp.matmul(do, xp.matrix_transpose(v_j))
            drop = dropout_scale(rows, cols, variants=variants, dtype=query.dtype, xp=xp,
                                 device=dev)
            if drop is None:
                dv = xp.matmul(xp.matrix_transpose(p), do)
            else:
                dv = xp.matmul(xp.matrix_transpose(p * drop), do)
                dp = multiply_into(dp, drop, xp=xp, in_place=in_place)
            ds = gated_difference(dp, d_i, p, xp=xp, in_place=in_place)
            bias_cols.append(None if bias is None else _bias_block(ds, tuple(bias.shape), xp=xp))
            if t is not None:  # through the soft-cap: d(c tanh(s / c))/ds = 1 - tanh^2
                ds = ds * (1.0 - t * t)
            dk = xp.matmul(xp.matrix_transpose(ds), q)  # q is already scaled
            dq_j = xp.matmul(ds, k_j)
            dq = dq_j if dq is None else dq + dq_j
            dk_parts[jb] = dk if dk_parts[jb] is None else dk_parts[jb] + dk
            dv_parts[jb] = dv if dv_parts[jb] is None else dv_parts[jb] + dv
        if dq is None:
            dq = xp.zeros(query.shape[:-2] + (rows.stop - rows.start, query.shape[-1]),
                          dtype=query.dtype, device=dev)
        dq_parts.append(dq * scale)
        bias_rows.append(bias_cols)

    def assemble(parts: list[Any], like: Array, axis: int, full: bool, block: int) -> Array:
        """Join per-block gradients (None = zero) along ``axis``, or sum them
        when the input was broadcast along it."""
        filled = []
        for n, part in enumerate(parts):
            if part is None:
                size = min(block, like.shape[axis] - n * block) if full else 1
                shape = list(like.shape)
                shape[axis] = size
                part = xp.zeros(tuple(shape), dtype=like.dtype, device=dev)
            filled.append(part)
        if not full:
            total = filled[0]
            for part in filled[1:]:
                total = total + part
            return total
        return filled[0] if len(filled) == 1 else xp.concat(filled, axis=axis)

    dq = unbroadcast(dq_parts[0] if len(dq_parts) == 1 else xp.concat(dq_parts, axis=-2),
                     tuple(query.shape), xp=xp)
    lead = broadcast_lead(query, key, value)
    like_k = xp.zeros(lead + (S, key.shape[-1]), dtype=query.dtype, device=dev)
    like_v = xp.zeros(lead + (S, value.shape[-1]), dtype=query.dtype, device=dev)
    dk = unbroadcast(assemble(dk_parts, like_k, -2, True, k_block), tuple(key.shape), xp=xp)
    dv = unbroadcast(assemble(dv_parts, like_v, -2, True, k_block), tuple(value.shape), xp=xp)
    dbias = None
    if bias is not None:
        bshape = tuple(bias.shape)
        row_grads = [_join(cols, -1, bshape[-1] != 1, xp=xp) for cols in bias_rows]
        dbias = unbroadcast(_join(row_grads, -2, bshape[-2] != 1, xp=xp), bshape, xp=xp)
    return dq, dk, dv, dbias
