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
from ._qk_norm import qk_norm, qk_norm_backward
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
from ._rope import rope_frequencies
from ._rotary import apply_rotary

__all__ = ["LENGTH_DEPENDENT", "LayerState", "Residuals", "layer_backward", "layer_forward",
           "layer_spec"]

#: The RoPE scalings whose frequencies depend on the sequence's length.
LENGTH_DEPENDENT = ("dynamic", "longrope")


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
    rope : (array, float) or None
        RoPE's inverse frequencies (compute dtype) and attention factor, for
        a rotary layer whose frequencies do not depend on the sequence
        length (all but ``"dynamic"`` and ``"longrope"`` scaling).
    """

    params: dict[str, Array]
    config: LayerConfig
    xp: ModuleType
    device: Any
    dtype: Any
    neg_slopes: Array | None = None
    rope: tuple[Array, float] | None = None

    @classmethod
    def prepare(cls, params: dict[str, Array], config: LayerConfig, xp: ModuleType, device: Any,
                dtype: Any) -> LayerState:
        """The state of a layer of validated ``params`` in namespace ``xp``."""
        xp = compute_namespace(xp)
        neg_slopes = None
        if config.alibi is not None:
            neg_slopes = xp.reshape(-xp.asarray(config.alibi, dtype=compute_dtype(dtype, xp),
                                                device=device), (config.num_heads, 1, 1))
        rope = None
        scaling = config.rope_scaling
        if config.rotary and (scaling is None or scaling["rope_type"] not in LENGTH_DEPENDENT):
            rope = _layer_rope(config, None, xp, device, dtype)
        return cls(params, config, xp, device, dtype, neg_slopes, rope)

    def rope_at(self, seq_len: int) -> tuple[Array, float]:
        """RoPE's frequencies and attention factor for a call over ``seq_len``
        positions (only ``"dynamic"`` and ``"longrope"`` scaling depend on it)."""
        if self.rope is not None:
            return self.rope
        return _layer_rope(self.config, seq_len, self.xp, self.device, self.dtype)


def _layer_rope(config: LayerConfig, seq_len: int | None, xp: ModuleType, device: Any,
                     dtype: Any) -> tuple[Array, float]:
    """A rotary layer's inverse frequencies (in the compute dtype of
    ``dtype``) and attention factor."""
    return rope_frequencies(config.rotary_dim or config.head_dim, config.rotary_base,
                         scaling=config.rope_scaling, seq_len=seq_len,
                         max_position_embeddings=config.max_position_embeddings, xp=xp,
                         device=device, dtype=compute_dtype(dtype, xp))


@dataclass(frozen=True)
class Residuals:
    """What the forward keeps for the backward.

    ``key``/``value`` are the inputs after padding was zeroed (``keep`` the
    non-padding mask ``(B, S, 1)``, or None); ``q_in``/``k_in`` the per-head
    projections before QK norm; ``q``/``k``/``v`` what the core attended
    with (after norm, RoPE, the cache and the extra keys); ``heads`` and
    ``stats`` its output and row statistics; ``merged`` the heads merged
    back to ``(B, L, H * D)``; ``pos_q``/``pos_k`` the rotary positions and
    ``rope`` the frequencies and attention factor (None without RoPE); ``S``
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
    rope: tuple[Array, float] | None = None


def _rotate(state: LayerState, x: Array, positions: Array, rope: tuple[Array, float], *,
            inverse: bool) -> Array:
    c = state.config
    return apply_rotary(x, positions, interleaved=c.rotary_interleaved, rotary_dim=c.rotary_dim,
                        inverse=inverse, inv_freq=rope[0], attention_factor=rope[1])


def _normalise(state: LayerState, x: Array, which: str) -> Array:
    c, p = state.config, state.params
    return qk_norm(x, p[f"{which}_norm.weight"], p.get(f"{which}_norm.bias"), kind=c.qk_norm,
                   eps=c.qk_norm_eps, offset=c.qk_norm_offset, xp=state.xp)


def _normalise_backward(state: LayerState, grad: Array, x: Array, which: str,
                        grads: dict[str, Array]) -> Array:
    """The gradient through the QK norm of ``which`` ("q" or "k"), its
    parameters' gradients written into ``grads``."""
    c, p = state.config, state.params
    dx, dw, db = qk_norm_backward(x, p[f"{which}_norm.weight"], p.get(f"{which}_norm.bias"), grad,
                                  kind=c.qk_norm, eps=c.qk_norm_eps, offset=c.qk_norm_offset,
                                  xp=state.xp)
    grads[f"{which}_norm.weight"] = cast(Array, dw)
    if db is not None:
        grads[f"{which}_norm.bias"] = db
    return dx


def layer_spec(state: LayerState, call: LayerCall, *, is_causal: bool, key_keep: Array | None,
               n_keys: int, q_diag: Array | None, dropout: tuple[float, int] | None,
               ) -> AttentionSpec:
    """The spec of the layer's attention over ``n_keys`` keys with
    positions (the cache's slots, or the call's keys), followed by the extra
    keys of ``add_bias_kv``/``add_zero_attn``, which have none; ``q_diag``
    the queries' absolute positions in a cache (each sees the slots up to
    its own)."""
    c, xp = state.config, state.xp
    n_extra = c.add_bias_kv + c.add_zero_attn
    mask, bias = call.mask, call.bias
    if n_extra:
        mask = None if mask is None else pad_last(mask, n_keys, n_extra, True, xp)
        bias = None if bias is None else pad_last(bias, n_keys, n_extra, 0.0, xp)
        key_keep = None if key_keep is None else pad_last(key_keep, n_keys, n_extra, True, xp)
    window = (None if c.window is None
              else cast("tuple[int, int]", tuple(-1 if n is None else n for n in c.window)))
    sinks = None
    if c.sinks:
        sinks = state.params["sinks"]
        work = compute_dtype(state.dtype, xp)
        sinks = xp.reshape(sinks if work == state.dtype else xp.astype(sinks, work), (-1, 1))
    return AttentionSpec(
        scale=1.0 / math.sqrt(c.head_dim) if c.scale is None else c.scale, sinks=sinks,
        mask=mask, key_keep=key_keep, bias=bias,
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
    mods: dict[str, Any] | None = None,
) -> tuple[Array, Array | None, Residuals | None, KVCache | None]:
    """``(out, weights or None, residuals or None, cache or None)`` of one
    validated call (residuals with ``request.return_stats``); ``mods`` the
    spec's validated ``score_mod``/``mask_mod`` fields."""
    xp, c, p = state.xp, state.config, state.params
    L, S = call.query.shape[1], call.key.shape[1]
    key, value, key_keep, keep = _zero_padding(state, call)
    q_in, k_in, v = project(p, c, call.query, key, value, xp)
    q, k = q_in, k_in
    if c.normalize_qk:
        q, k = _normalise(state, q, "q"), _normalise(state, k, "k")
    # Positions: bottom-right aligned (query i sits at key position
    # i + S - L), and continuing from the cache's length(s) when decoding.
    pos_q = pos_k = rope = q_diag = None
    call_keep = None if keep is None else xp.reshape(keep, tuple(keep.shape[:2]))
    if cache is not None:  # self-attention: the call's queries are its keys
        pos_q = pos_k = q_diag = cache.positions(L, call_keep)
    if c.rotary:
        if cache is None:
            pos_q = xp.arange(L, device=state.device) + (S - L)
            pos_k = xp.arange(S, device=state.device)
        rope = state.rope_at(S)
        q = _rotate(state, q, cast(Array, pos_q), rope, inverse=False)
        k = _rotate(state, k, cast(Array, pos_k), rope, inverse=False)
    if cache is not None:
        # Padding takes no slot of the cache: the slots a query sees are its
        # sequence's own (q_diag), so the padding mask has done its work.
        new_cache = cache.append(k, v, call_keep)
        k, v, S, key_keep = new_cache.key, new_cache.value, new_cache.max_length, None
    spec = layer_spec(state, call, is_causal=is_causal, key_keep=key_keep, n_keys=S,
                      q_diag=q_diag, dropout=dropout)
    if mods:  # the modifiers' q_idx: with a cache, each query's absolute position
        spec = spec.replace(mod_q_index=q_diag, **mods)
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
                        cast("tuple[Array, Array]", stats), merged, spec, pos_q, pos_k, S, rope)
    return out, weights, res, (new_cache if cache is not None else None)


def layer_backward(state: LayerState, call: LayerCall, res: Residuals, grad_out: Array,
                   chunk_size: tuple[int, int] | None = None) -> dict[str, Array]:
    """Gradients of the layer's output with respect to its inputs (one entry
    per input argument given), the bias given, and every parameter (and,
    under ``"score_mod"``, of the arrays a ``score_mod_vjp`` names), with
    the backward's blocks ``chunk_size`` (default the call's)."""
    xp, c, p = state.xp, state.config, state.params
    if not call.batched:
        grad_out = xp.expand_dims(grad_out, axis=0)
    B, L, E = grad_out.shape
    Q = c.num_heads * c.head_dim
    grads: dict[str, Array] = {}
    dy = xp.reshape(grad_out, (B * L, E))
    grads["out_proj.weight"] = xp.matmul(xp.matrix_transpose(dy),
                                         xp.reshape(res.merged, (B * L, Q)))
    if c.bias:
        grads["out_proj.bias"] = xp.sum(dy, axis=0)
    d_heads = split_heads(xp.reshape(xp.matmul(dy, p["out_proj.weight"]), (B, L, Q)),
                          c.num_heads, xp)
    # A fresh sum, per call, for the gradients of a score_mod's captured arrays.
    spec = res.spec if res.spec.score_mod_vjp is None else res.spec.replace(mod_grads={})
    dq, dk, dv, dbias, dsinks = attend_backward(
        Saved(res.q, res.k, res.v, res.heads, res.stats), d_heads, spec,
        call.chunk_size if chunk_size is None else chunk_size, xp=xp)
    if spec.mod_grads:
        grads["score_mod"] = dict(spec.mod_grads)
    if c.sinks:
        grads["sinks"] = xp.reshape(cast(Array, dsinks), (c.num_heads,))
    if c.add_bias_kv or c.add_zero_attn:
        dk, dv, extra = extras_backward(c, dk, dv, res.S, xp)
        grads |= extra
        dbias = None if dbias is None else dbias[..., :res.S]
    # A bias given: attend_backward returned its gradient.
    if call.bias is not None and tuple(cast(Array, dbias).shape) != tuple(call.bias.shape):
        dbias = unbroadcast(dbias, tuple(call.bias.shape), xp=xp)
    if c.rotary:
        rope = cast("tuple[Array, float]", res.rope)
        dq = _rotate(state, dq, cast(Array, res.pos_q), rope, inverse=True)
        dk = _rotate(state, dk, cast(Array, res.pos_k), rope, inverse=True)
    if c.normalize_qk:
        dq = _normalise_backward(state, dq, res.q_in, "q", grads)
        dk = _normalise_backward(state, dk, res.k_in, "k", grads)
    d_in, proj_grads = project_backward(p, c, (dq, dk, dv), (call.query, res.key, res.value), xp)
    grads |= proj_grads
    out = _input_grads(state, call, res, d_in, dbias) | {n: grads[n] for n in p if n in grads}
    if "score_mod" in grads:
        out["score_mod"] = grads["score_mod"]
    return out


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
