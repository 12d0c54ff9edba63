"""The layer's linear maps: input projections split into heads, the output
projection over the merged heads, and the extra key/value positions of
torch's ``add_bias_kv``/``add_zero_attn``; each forward beside its backward."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .._lib._namespace import Array, device_of
from .._lib._shapes import at_least_2d
from ._params import LayerConfig

__all__ = ["append_extras", "extras_backward", "in_biases", "in_weights", "linear", "merge_heads", "pad_last",
           "project", "project_backward", "split_heads"]


def linear(x: Array, weight: Array, bias: Array | None, xp: ModuleType) -> Array:
    """``x @ weight.T + bias`` over the last axis, as one 2-D matmul."""
    lead = x.shape[:-1]
    y = xp.matmul(xp.reshape(x, (-1, x.shape[-1])), xp.matrix_transpose(weight))
    if bias is not None:
        y = y + bias
    return xp.reshape(y, (*lead, weight.shape[0]))


def split_heads(x: Array, num_heads: int, xp: ModuleType) -> Array:
    """``(B, L, H*D)`` to ``(B, H, L, D)``."""
    B, L, E = x.shape
    return xp.permute_dims(xp.reshape(x, (B, L, num_heads, E // num_heads)), (0, 2, 1, 3))


def merge_heads(x: Array, xp: ModuleType) -> Array:
    """``(B, H, L, D)`` to ``(B, L, H*D)``."""
    B, H, L, D = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (B, L, H * D))


def in_weights(params: dict[str, Array], config: LayerConfig) -> tuple[Array, Array, Array]:
    """The query, key and value projection weights (views of a packed
    ``in_proj_weight``)."""
    E = config.embed_dim
    if "in_proj_weight" in params:
        w = params["in_proj_weight"]
        return w[:E, ...], w[E:2 * E, ...], w[2 * E:, ...]
    return params["q_proj_weight"], params["k_proj_weight"], params["v_proj_weight"]


def in_biases(params: dict[str, Array], config: LayerConfig,
              ) -> tuple[Array | None, Array | None, Array | None]:
    """The query, key and value projection biases (views of ``in_proj_bias``)."""
    b, Q = params.get("in_proj_bias"), config.num_heads * config.head_dim
    if b is None:
        return None, None, None
    F = config.num_kv_heads * config.head_dim
    return b[:Q], b[Q:Q + F], b[Q + F:]


def project(params: dict[str, Array], config: LayerConfig, query: Array, key: Array,
            value: Array, xp: ModuleType) -> tuple[Array, Array, Array]:
    """The three input projections, split into heads: ``(B, H, L, D)``
    queries, ``(B, num_kv_heads, S, D)`` keys and values."""
    H, Hkv = config.num_heads, config.num_kv_heads
    if "in_proj_weight" in params and key is query and value is query:
        # Self-attention: one matmul for all three projections.
        qkv = linear(query, params["in_proj_weight"], params.get("in_proj_bias"), xp)
        B, L, _ = qkv.shape
        qkv = xp.permute_dims(xp.reshape(qkv, (B, L, 3, H, config.head_dim)), (2, 0, 3, 1, 4))
        return qkv[0, ...], qkv[1, ...], qkv[2, ...]
    (wq, wk, wv), (bq, bk, bv) = in_weights(params, config), in_biases(params, config)
    return (split_heads(linear(query, wq, bq, xp), H, xp),
            split_heads(linear(key, wk, bk, xp), Hkv, xp),
            split_heads(linear(value, wv, bv, xp), Hkv, xp))


def project_backward(params: dict[str, Array], config: LayerConfig,
                     grads_heads: tuple[Array, Array, Array], inputs: tuple[Array, Array, Array],
                     xp: ModuleType) -> tuple[list[Array], dict[str, Array]]:
    """Gradients through :func:`project`: those of the three inputs, and of
    the projection weights and biases under their state-dict names."""
    d_in, d_w, d_b = [], [], []
    for d, x, w in zip(grads_heads, inputs, in_weights(params, config)):
        B, n, F = d.shape[0], d.shape[2], d.shape[1] * config.head_dim
        d2 = xp.reshape(xp.permute_dims(d, (0, 2, 1, 3)), (B * n, F))
        d_w.append(xp.matmul(xp.matrix_transpose(d2), xp.reshape(x, (B * n, x.shape[-1]))))
        d_b.append(xp.sum(d2, axis=0))
        d_in.append(xp.reshape(xp.matmul(d2, w), (B, n, x.shape[-1])))
    grads: dict[str, Array] = {}
    if "in_proj_weight" in params:
        grads["in_proj_weight"] = xp.concat(d_w, axis=0)
    else:
        grads["q_proj_weight"], grads["k_proj_weight"], grads["v_proj_weight"] = d_w
    if config.bias:
        grads["in_proj_bias"] = xp.concat(d_b, axis=0)
    return d_in, grads


def append_extras(params: dict[str, Array], config: LayerConfig, k: Array, v: Array,
                  xp: ModuleType) -> tuple[Array, Array]:
    """torch's ``add_bias_kv`` then ``add_zero_attn``: one key/value
    position each, appended after the real ones, for every head."""
    shape = (k.shape[0], config.num_kv_heads, 1, config.head_dim)
    extra_k, extra_v = [k], [v]
    if config.add_bias_kv:
        for dst, name in ((extra_k, "bias_k"), (extra_v, "bias_v")):
            dst.append(xp.broadcast_to(xp.reshape(params[name], (1, shape[1], 1, shape[3])),
                                       shape))
    if config.add_zero_attn:
        zeros = xp.zeros(shape, dtype=k.dtype, device=device_of(k))
        extra_k.append(zeros)
        extra_v.append(zeros)
    return xp.concat(extra_k, axis=2), xp.concat(extra_v, axis=2)


def extras_backward(config: LayerConfig, dk: Array, dv: Array, S: int,
                    xp: ModuleType) -> tuple[Array, Array, dict[str, Array]]:
    """Gradients through :func:`append_extras`: those of the ``S`` real keys
    and values, and of ``bias_k``/``bias_v``."""
    grads = {}
    if config.add_bias_kv:
        F = config.num_kv_heads * config.head_dim
        grads["bias_k"] = xp.reshape(xp.sum(dk[:, :, S, :], axis=0), (1, 1, F))
        grads["bias_v"] = xp.reshape(xp.sum(dv[:, :, S, :], axis=0), (1, 1, F))
    return dk[:, :, :S, :], dv[:, :, :S, :], grads


def pad_last(x: Array, S: int, n: int, fill: Any, xp: ModuleType) -> Array:
    """A mask or bias over ``S`` keys (its last axis ``S`` or 1) extended by
    ``n`` keys that take ``fill`` (torch pads ``attn_mask`` and
    ``key_padding_mask`` the same way for ``add_bias_kv``/``add_zero_attn``)."""
    x = at_least_2d(x, xp)
    lead = tuple(x.shape[:-1])
    x = xp.broadcast_to(x, lead + (S,))
    pad = xp.full(lead + (n,), fill, dtype=x.dtype, device=device_of(x))
    return xp.concat([x, pad], axis=-1)
