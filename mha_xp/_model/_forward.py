"""The layer's forward and backward: padding, projections, QK norm, RoPE,
the cache, the extra keys, attention through the core, and the output
projection; the backward retraces them from the residuals the forward kept.

Every positional term (causal, window, ALiBi, a cache's absolute positions,
the position-free keys of ``add_bias_kv``/``add_zero_attn``) reaches the
core as fields of one :class:`~mha_xp._spec.AttentionSpec`
(:func:`layer_spec`), so that the layer and the function API mean the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

from .._core._backward import Saved
from .._core._dispatch import attend_backward
from .._lib._namespace import Array, compute_dtype, compute_namespace
from .._lib._shapes import unbroadcast
from .._run import run_attention
from .._spec import AttentionSpec, LayerCall, Request
from ._cache import KVCache
from ._norm import qk_layer_norm, qk_layer_norm_backward
from ._params import LayerConfig
from ._projections import (
    append_extras,
    extras_backward,
    linear,
    merge_heads,
    pad_last,
    project,
    project_backward,
    split_heads,
)
from ._rotary import apply_rotary

__all__ = ["LayerState", "Residuals", "layer_backward", "layer_forward", "layer_spec"]

# Flax's LayerNorm epsilon, for normalize_qk.
NORM_EPS = 1e-6


@dataclass(frozen=True)
class LayerState:
    """A layer's weights and configuration, as the forward reads them: made
    once per layer (:meth:`prepare`), since a layer never changes.

    Attributes
    ----------
    params : dict of str to array
        The weights, under their state-dict names.
    config : LayerConfig
    xp : module
        The namespace to compute with
        (:func:`~mha_xp._lib._namespace.compute_namespace` of the layer's).
    device, dtype
        The weights' device and dtype.
    neg_slopes : array or None
        Minus the ALiBi slopes ``(H, 1, 1)`` in the compute dtype, for an
        ALiBi layer.
    """

    params: dict[str, Array]
    config: LayerConfig
    xp: ModuleType
    device: Any
    dtype: Any
    neg_slopes: Array | None = None

    @classmethod
    def prepare(cls, params: dict[str, Array], config: LayerConfig, xp: ModuleType, device: Any,
                dtype: Any) -> LayerState:
        """The state of a layer of validated ``params`` in namespace ``xp``."""
        xp = compute_namespace(xp)
        neg_slopes = None
        if config.alibi is not None:
            neg_slopes = xp.reshape(-xp.asarray(config.alibi, dtype=compute_dtype(dtype, xp),
                                                device=device), (config.num_heads, 1, 1))
        return cls(params, config, xp, device, dtype, neg_slopes)


@dataclass(frozen=True)
class Residuals:
    """What the forward keeps for the backward.

    ``key``/``value`` are the inputs after padding was zeroed (``keep`` the
    non-padding mask ``(B, S, 1)``, or None); ``q_in``/``k_in`` the per-head
    projections before QK norm; ``q``/``k``/``v`` what the core attended
    with (after norm, RoPE, the cache and the extra keys); ``heads`` and
    ``stats`` its output and row statistics; ``merged`` the heads merged
    back to ``(B, L, E)``; ``pos_q``/``pos_k`` the rotary positions (None without RoPE); ``S``
    the number of real keys.
    """

    key: Array
    value: Array
    keep: Array | None
    q_in: Array
    k_in: Array
    q: Array
    k: Array
    v: Array
    heads: Array
    stats: tuple[Array, Array]
    merged: Array
    spec: AttentionSpec
    pos_q: Array | None
    pos_k: Array | None
    S: int


def _rotate(config: LayerConfig, x: Array, positions: Array, *, inverse: bool) -> Array:
    return apply_rotary(x, positions, base=config.rotary_base,
                        interleaved=config.rotary_interleaved, rotary_dim=config.rotary_dim,
                        inverse=inverse)


def layer_spec(state: LayerState, call: LayerCall, *, is_causal: bool, key_keep: Array | None,
               n_keys: int, cache: KVCache | None, dropout: tuple[float, int] | None,
               ) -> AttentionSpec:
    """The spec of the layer's attention over ``n_keys`` keys with
    positions (the cache's slots, or the call's keys), followed by the extra
    keys of ``add_bias_kv``/``add_zero_attn``, which have none."""
    c, xp = state.config, state.xp
    n_extra = c.add_bias_kv + c.add_zero_attn
    mask, bias = call.mask, call.bias
    if n_extra:
        mask = None if mask is None else pad_last(mask, n_keys, n_extra, True, xp)
        bias = None if bias is None else pad_last(bias, n_keys, n_extra, 0.0, xp)
        key_keep = None if key_keep is None else pad_last(key_keep, n_keys, n_extra, True, xp)
    q_diag = None
    if cache is not None:  # query i sits at the cache's length + i: it sees the slots up to it
        q_diag = xp.arange(call.query.shape[1], device=state.device) + cache.length
    window = (None if c.window is None
              else cast("tuple[int, int]", tuple(-1 if n is None else n for n in c.window)))
    return AttentionSpec(
        scale=1.0 / math.sqrt(c.head_dim), mask=mask, key_keep=key_keep, bias=bias,
        is_causal=is_causal, window=window, softcap=c.softcap, neg_slopes=state.neg_slopes,
        q_diag=q_diag, dropout=dropout, free_from=n_keys if n_extra else None)


def _zero_padding(state: LayerState, call: LayerCall) -> tuple[Array, Array, Array | None,
                                                               Array | None]:
    """``(key, value, key_keep, keep)``: padding keys and values zeroed, so
    that they stay inert even when they hold NaN or Inf (a zero weight does
    not suffice: 0 * NaN = NaN); ``key_keep`` ``(B, 1, 1, S)`` for the core."""
    xp, key, value = state.xp, call.key, call.value
    if call.key_padding_mask is None:
        return key, value, None, None
    B, S = key.shape[0], key.shape[1]
    keep_bs = xp.logical_not(call.key_padding_mask)
    keep = xp.reshape(keep_bs, (B, S, 1))
    zero = xp.zeros((), dtype=state.dtype, device=state.device)
    same = value is key
    key = xp.where(keep, key, zero)
    value = key if same else xp.where(keep, value, zero)
    return key, value, xp.reshape(keep_bs, (B, 1, 1, S)), keep


def layer_forward(
    state: LayerState, call: LayerCall, *, is_causal: bool, request: Request,
    cache: KVCache | None = None, dropout: tuple[float, int] | None = None,
) -> tuple[Array, Array | None, Residuals | None, KVCache | None]:
    """``(out, weights or None, residuals or None, cache or None)`` of one
    validated call (residuals with ``request.return_stats``)."""
    xp, c, p = state.xp, state.config, state.params
    L, S = call.query.shape[1], call.key.shape[1]
    key, value, key_keep, keep = _zero_padding(state, call)
    q_in, k_in, v = project(p, c, call.query, key, value, xp)
    q, k = q_in, k_in
    if c.normalize_qk:
        q = qk_layer_norm(q, p["q_norm.weight"], eps=NORM_EPS, xp=xp)
        k = qk_layer_norm(k, p["k_norm.weight"], eps=NORM_EPS, xp=xp)
    # Positions: bottom-right aligned (query i sits at key position
    # i + S - L), and continuing from the cache's length when decoding.
    pos_q = pos_k = None
    if c.rotary:
        start = (S - L) if cache is None else cache.length
        pos_q = xp.arange(L, device=state.device) + start
        pos_k = xp.arange(S, device=state.device) + (0 if cache is None else cache.length)
        q, k = _rotate(c, q, pos_q, inverse=False), _rotate(c, k, pos_k, inverse=False)
    if cache is not None:
        new_cache = cache.append(k, v)
        k, v, S = new_cache.key, new_cache.value, new_cache.max_length
    spec = layer_spec(state, call, is_causal=is_causal, key_keep=key_keep, n_keys=S,
                      cache=cache, dropout=dropout)
    if c.add_bias_kv or c.add_zero_attn:
        k, v = append_extras(p, c, k, v, xp)
    heads, weights, stats = run_attention(q, k, v, spec, request, xp=xp)
    merged = merge_heads(heads, xp)
    out = linear(merged, p["out_proj.weight"], p.get("out_proj.bias"), xp)
    if not call.batched:
        out = out[0, ...]
    res = None
    if request.return_stats:
        # return_stats: run_attention returned the statistics.
        res = Residuals(key, value, keep, q_in, k_in, q, k, v, heads,
                        cast("tuple[Array, Array]", stats), merged, spec, pos_q, pos_k, S)
    return out, weights, res, (new_cache if cache is not None else None)


def layer_backward(state: LayerState, call: LayerCall, res: Residuals,
                   grad_out: Array) -> dict[str, Array]:
    """Gradients of the layer's output with respect to its inputs (one entry
    per input argument given), the bias given, and every parameter."""
    xp, c, p = state.xp, state.config, state.params
    if not call.batched:
        grad_out = xp.expand_dims(grad_out, axis=0)
    B, L, E = grad_out.shape
    grads: dict[str, Array] = {}
    dy = xp.reshape(grad_out, (B * L, E))
    grads["out_proj.weight"] = xp.matmul(xp.matrix_transpose(dy),
                                         xp.reshape(res.merged, (B * L, E)))
    if c.bias:
        grads["out_proj.bias"] = xp.sum(dy, axis=0)
    d_heads = split_heads(xp.reshape(xp.matmul(dy, p["out_proj.weight"]), (B, L, E)),
                          c.num_heads, xp)
    dq, dk, dv, dbias = attend_backward(Saved(res.q, res.k, res.v, res.heads, res.stats),
                                        d_heads, res.spec, call.chunk_size, xp=xp)
    if c.add_bias_kv or c.add_zero_attn:
        dk, dv, extra = extras_backward(c, dk, dv, res.S, xp)
        grads |= extra
        dbias = None if dbias is None else dbias[..., :res.S]
    # A bias given: attend_backward returned its gradient.
    if call.bias is not None and tuple(cast(Array, dbias).shape) != tuple(call.bias.shape):
        dbias = unbroadcast(dbias, tuple(call.bias.shape), xp=xp)
    if c.rotary:
        dq, dk = _rotate(c, dq, res.pos_q, inverse=True), _rotate(c, dk, res.pos_k, inverse=True)
    if c.normalize_qk:
        dq, grads["q_norm.weight"] = qk_layer_norm_backward(
            dq, res.q_in, p["q_norm.weight"], eps=NORM_EPS, xp=xp)
        dk, grads["k_norm.weight"] = qk_layer_norm_backward(
            dk, res.k_in, p["k_norm.weight"], eps=NORM_EPS, xp=xp)
    d_in, proj_grads = project_backward(p, c, (dq, dk, dv), (call.query, res.key, res.value), xp)
    grads |= proj_grads
    return _input_grads(state, call, res, d_in, dbias) | {
        n: grads[n] for n in p if n in grads}


def _input_grads(state: LayerState, call: LayerCall, res: Residuals, d_in: list[Array],
                 dbias: Array | None) -> dict[str, Array]:
    """The gradients of the input arguments (an argument that defaulted to
    another adds its gradient to that one's) and of the bias."""
    xp = state.xp
    if res.keep is not None:  # padded keys and values do not reach the output
        zero = xp.zeros((), dtype=state.dtype, device=state.device)
        d_in[1] = xp.where(res.keep, d_in[1], zero)
        d_in[2] = xp.where(res.keep, d_in[2], zero)
    by_source: dict[str, Array] = {"query": d_in[0]}
    for src, d in ((call.key_src, d_in[1]), (call.value_src, d_in[2])):
        by_source[src] = by_source[src] + d if src in by_source else d
    if not call.batched:
        by_source = {n: g[0, ...] for n, g in by_source.items()}
    out: dict[str, Array] = {n: by_source[n] for n in ("query", "key", "value") if n in by_source}
    if call.bias is not None:
        out["bias"] = dbias
    return out
