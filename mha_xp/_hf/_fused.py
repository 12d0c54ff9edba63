"""Ports of Hugging Face attention with fused projections, and of encoders and encoder-decoders.

GPT-2 (``Conv1D`` layers: weights stored ``(in, out)``), GPT-NeoX, BLOOM and
Falcon (one fused ``query_key_value`` projection, laid out per head or per
group of heads), BERT (the self-attention and its output projection), and
the attention of Whisper, BART and T5 (self- or cross-attention). Each port
reads the module's weights and the options it does not hold (RoPE, ALiBi)
from the model config, as transformers 5 spells them, and splits the fused
weights into mha_xp's ``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight`` (Linear layout ``(out, in)``). Modules and configs are read
through their attributes only: nothing here imports torch or transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .._core._positions import standard_alibi_slopes
from .._lib._namespace import namespace_and_device
from ._common import Ported, config_value, rope_options, scale_option

__all__ = ["FAMILIES"]


# --- reading the module -------------------------------------------------------

def _layer(module: Any, name: str) -> tuple[Any, Any]:
    """``(weight, bias or None)`` of the layer ``module.<name>`` (Linear or
    Conv1D), detached."""
    layer = getattr(module, name, None)
    weight = getattr(layer, "weight", None)
    if weight is None or len(tuple(weight.shape)) != 2:
        raise TypeError(f"{type(module).__name__} has no projection {name!r}: it is not "
                        f"the attention module this port reads")
    bias = getattr(layer, "bias", None)
    return weight.detach(), None if bias is None else bias.detach()


def _conv1d(module: Any, name: str) -> tuple[Any, Any]:
    """A GPT-2 ``Conv1D`` (``y = x W + b``, W of shape ``(in, out)``) in
    Linear layout: ``(W^T, b)``."""
    weight, bias = _layer(module, name)
    xp, _ = namespace_and_device(weight)
    return xp.permute_dims(weight, (1, 0)), bias


def _state(weights: list[Any], biases: list[Any]) -> dict[str, Any]:
    """The state dict of the q, k, v and output projections (Linear layout);
    biases all or nothing (zeros where the module has none: exact)."""
    state = {"q_proj_weight": weights[0], "k_proj_weight": weights[1],
             "v_proj_weight": weights[2], "out_proj.weight": weights[3]}
    if any(b is not None for b in biases):
        xp, device = namespace_and_device(weights[0])
        full = [b if b is not None else xp.zeros((w.shape[0],), dtype=w.dtype, device=device)
                for w, b in zip(weights, biases)]
        state["in_proj_bias"] = xp.concat(full[:3])
        state["out_proj.bias"] = full[3]
    return {name: t.clone() for name, t in state.items()}


def _grouped_qkv(t: Any, groups: int, q_per_group: int, head_dim: int) -> list[Any]:
    """Split a fused projection's weight ``(rows, E)`` or bias ``(rows,)``
    whose rows are laid out as ``(groups, q_per_group + 2, head_dim)``: each
    group's query heads, then its key head, then its value head. BLOOM,
    GPT-NeoX and Falcon's classic layout are ``(H, 3, D)`` (groups = H, one
    query each); Falcon's multi-query ``(H + 2, D)`` is one group of H
    queries, its new decoder architecture ``(Hkv, H / Hkv + 2, D)``."""
    xp, _ = namespace_and_device(t)
    rest = tuple(t.shape[1:])
    r = xp.reshape(t, (groups, q_per_group + 2, head_dim) + rest)
    q = xp.reshape(r[:, :q_per_group, ...], (groups * q_per_group * head_dim,) + rest)
    k = xp.reshape(r[:, q_per_group, ...], (groups * head_dim,) + rest)
    v = xp.reshape(r[:, q_per_group + 1, ...], (groups * head_dim,) + rest)
    return [q, k, v]


def _fused_state(module: Any, qkv: str, out: str, groups: int, q_per_group: int,
                 head_dim: int, detail: str) -> dict[str, Any]:
    """The state dict of a module with one fused ``qkv`` Linear and an ``out``
    Linear, whose rows the config (``detail``) must account for."""
    weight, bias = _layer(module, qkv)
    _check_rows(module, qkv, int(weight.shape[0]), groups * (q_per_group + 2) * head_dim, detail)
    out_w, out_b = _layer(module, out)
    weights = _grouped_qkv(weight, groups, q_per_group, head_dim) + [out_w]
    biases = ([None] * 3 if bias is None else _grouped_qkv(bias, groups, q_per_group, head_dim))
    return _state(weights, biases + [out_b])


# --- checking the config against the module ----------------------------------

def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.{name} must be a positive int, got {value!r}")
    return value


def _config_heads(module: Any, config: Any, name: str, module_heads: Any,
                  default: Any = None) -> int:
    """The config's head count ``name``, which must equal the module's own
    (``module_heads``, where it records one)."""
    heads = _positive_int(name, config_value(config, name, default=default))
    if module_heads is not None and heads != module_heads:
        raise ValueError(f"the config does not describe this {type(module).__name__}: "
                         f"config.{name}={heads}, but the module has {module_heads} heads")
    return heads


def _check_rows(module: Any, what: str, rows: int, want: int, detail: str) -> None:
    if rows != want:
        raise ValueError(f"the config does not describe this {type(module).__name__}: "
                         f"{detail} need {what} of {want} rows, the weights have {rows}")


def _head_dim(module: Any, embed_dim: int, heads: int) -> int:
    if embed_dim % heads:
        raise ValueError(f"the config does not describe this {type(module).__name__}: "
                         f"{heads} heads do not divide its width {embed_dim}")
    return embed_dim // heads


# --- the families ----------------------------------------------------------------

def port_gpt2(module: Any, config: Any) -> Ported:
    """GPT-2 (``GPT2Attention``): ``Conv1D`` projections, weights stored
    ``(in, out)`` and transposed here; ``c_attn`` holds q, k, v one after the
    other (cross-attention: ``q_attn`` for q, ``c_attn`` for k, v). The scale
    is the module's ``scaling`` (``scale_attn_weights``,
    ``scale_attn_by_inverse_layer_idx``); causal unless cross-attention.
    No position encoding: GPT-2's is added to the embeddings, before any
    layer."""
    E = _positive_int("hidden_size", config_value(config, "hidden_size", "n_embd"))
    H = _config_heads(module, config, "num_attention_heads", getattr(module, "num_heads", None))
    D = _head_dim(module, E, H)
    cross = bool(getattr(module, "is_cross_attention", False))
    c_w, c_b = _conv1d(module, "c_attn")
    o_w, o_b = _conv1d(module, "c_proj")
    parts = 2 if cross else 3
    _check_rows(module, "c_attn", int(c_w.shape[0]), parts * E,
                f"hidden_size={E} ({'cross' if cross else 'self'}-attention)")
    ws = [c_w[i * E:(i + 1) * E, ...] for i in range(parts)]
    bs = [None] * parts if c_b is None else [c_b[i * E:(i + 1) * E] for i in range(parts)]
    if cross:
        q_w, q_b = _conv1d(module, "q_attn")
        ws, bs = [q_w] + ws, [q_b] + bs
    state = _state(ws + [o_w], bs + [o_b])
    return Ported("gpt2", state, H, H, scale_option(getattr(module, "scaling", None), D),
                  is_causal=not cross)


def port_gpt_neox(module: Any, config: Any) -> Ported:
    """GPT-NeoX (``GPTNeoXAttention``, Pythia): one fused ``query_key_value``
    whose rows are laid out per head as ``(H, 3, D)``, output ``dense``;
    RoPE (``rotate_half``) on the first ``rotary_ndims = int(D *
    partial_rotary_factor)`` features of each head (``rotary_pct``), with
    ``rope_theta`` (``rotary_emb_base``) and any ``rope_type``."""
    E = _positive_int("hidden_size", config_value(config, "hidden_size"))
    H = _config_heads(module, config, "num_attention_heads", None)
    D = _head_dim(module, E, H)
    if getattr(module, "head_size", D) != D:
        raise ValueError(f"the config does not describe this GPTNeoXAttention: "
                         f"num_attention_heads={H} gives heads of {D} features, the module's "
                         f"have {module.head_size}")
    state = _fused_state(module, "query_key_value", "dense", H, 1, D,
                         f"num_attention_heads={H} of {D} features")
    params = getattr(config, "rope_parameters", None) or {}
    rotated = getattr(module, "rotary_ndims",
                      int(D * params.get("partial_rotary_factor", 1.0)))
    if rotated % 2:
        raise ValueError(f"GPTNeoXAttention rotates {rotated} features per head "
                         f"(head_size {D} * partial_rotary_factor): mha_xp's rotary_dim "
                         f"must be even")
    options = scale_option(getattr(module, "scaling", None), D)
    if rotated:
        options |= rope_options(config, rotary_dim=rotated if rotated < D else None)
    return Ported("gpt_neox", state, H, H, options)


def port_bloom(module: Any, config: Any) -> Ported:
    """BLOOM (``BloomAttention``): fused ``query_key_value`` laid out per head
    as ``(H, 3, D)``, output ``dense``; ALiBi with the standard slopes
    (BLOOM's ``_get_alibi_slopes``), which BLOOM adds unscaled to the scaled
    scores (``alibi.baddbmm(q, k^T, beta=1, alpha=1/sqrt(D))``): mha_xp's
    ``alibi`` as it is. BLOOM's bias ``slope * j`` and mha_xp's
    ``-slope * (i - j)`` differ by a constant per query, which the causal
    softmax does not see. The module's forward adds ``residual`` to its
    output (``dropout_add``): the port is the attention without it."""
    E = _positive_int("hidden_size", config_value(config, "hidden_size"))
    H = _config_heads(module, config, "num_attention_heads", getattr(module, "num_heads", None))
    D = _head_dim(module, E, H)
    state = _fused_state(module, "query_key_value", "dense", H, 1, D,
                         f"num_attention_heads={H} of {D} features")
    beta = float(getattr(module, "beta", 1.0))
    options = {"alibi": [beta * s for s in standard_alibi_slopes(H)]}
    options |= scale_option(getattr(module, "inv_norm_factor", None), D)
    return Ported("bloom", state, H, H, options)


def _falcon_layout(module: Any, config: Any, H: int) -> tuple[int, int, int]:
    """``(num_kv_heads, groups, queries per group)`` of Falcon's fused projection."""
    if bool(config_value(config, "new_decoder_architecture", default=False)):
        Hkv = _config_heads(module, config, "num_kv_heads", getattr(module, "num_kv_heads", None),
                            default=H)
        if H % Hkv:
            raise ValueError(f"the config does not describe this {type(module).__name__}: "
                             f"num_kv_heads={Hkv} does not divide num_attention_heads={H}")
        return Hkv, Hkv, H // Hkv
    if bool(config_value(config, "multi_query", default=True)):
        return 1, 1, H
    return H, H, 1  # the classic layout has a key and a value head per query head


def port_falcon(module: Any, config: Any) -> Ported:
    """Falcon (``FalconAttention``): fused ``query_key_value``, laid out as
    ``new_decoder_architecture`` (``(num_kv_heads, H / num_kv_heads + 2, D)``:
    each group's queries, key, value), ``multi_query`` (``(H + 2, D)``: one
    key and value head) or neither (``(H, 3, D)``); output ``dense``; biases
    per ``config.bias``. RoPE (``rotate_half``, ``rope_parameters``), or with
    ``config.alibi`` ALiBi, which Falcon adds before the ``1/sqrt(D)`` scale
    (``(q k^T + alibi) / sqrt(D)``): slopes ``standard / sqrt(D)``. That is
    the module given a plain causal mask, and FalconModel's SDPA path (its
    default), which folds ``alibi / sqrt(D)`` into the mask; its eager path
    adds that mask to a module that adds ALiBi itself, so ALiBi twice."""
    E = _positive_int("hidden_size", config_value(config, "hidden_size"))
    H = _config_heads(module, config, "num_attention_heads", getattr(module, "num_heads", None))
    D = _head_dim(module, E, H)
    Hkv, groups, per = _falcon_layout(module, config, H)
    state = _fused_state(module, "query_key_value", "dense", groups, per, D,
                         f"num_attention_heads={H} and {Hkv} key/value heads of {D} features")
    if bool(config_value(config, "alibi", default=False)):
        inv_norm = float(getattr(module, "inv_norm_factor", 1.0 / math.sqrt(D)))
        options: dict[str, Any] = {"alibi": [s * inv_norm for s in standard_alibi_slopes(H)]}
    else:
        options = rope_options(config)
    return Ported("falcon", state, H, Hkv, options)


def port_bert(module: Any, config: Any) -> Ported:
    """BERT (``BertAttention``): ``self.query``, ``self.key``, ``self.value``
    and the output projection ``output.dense``. The port is
    ``attention.output.dense(attention.self(x)[0])``: BertSelfOutput's
    dropout, residual and LayerNorm, which follow, are not attention.
    Bidirectional (``is_causal`` as the module's, True in a decoder); a
    cross-attention ``BertAttention`` takes the encoder's states as ``key``."""
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    if inner is None or output is None:
        raise TypeError(f"{type(module).__name__} has no 'self' and 'output' submodules: "
                        f"it is not the BertAttention this port reads")
    H = _config_heads(module, config, "num_attention_heads",
                      getattr(inner, "num_attention_heads", None))
    layers = [_layer(inner, n) for n in ("query", "key", "value")] + [_layer(output, "dense")]
    D = int(getattr(inner, "attention_head_size", int(layers[0][0].shape[0]) // H))
    _check_rows(module, "query", int(layers[0][0].shape[0]), H * D,
                f"num_attention_heads={H} of {D} features")
    state = _state([w for w, _ in layers], [b for _, b in layers])
    options = scale_option(getattr(inner, "scaling", None), D)
    return Ported("bert", state, H, H, options, is_causal=bool(getattr(inner, "is_causal", False)))


def _seq2seq(module: Any, config: Any, family: str) -> Ported:
    """Whisper's and BART's attention: ``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``; heads per ``decoder_attention_heads`` in the decoder (its
    self- and cross-attention), ``encoder_attention_heads`` in the encoder."""
    name = ("decoder_attention_heads" if getattr(module, "is_decoder", False)
            else "encoder_attention_heads")
    H = _config_heads(module, config, name, getattr(module, "num_heads", None))
    layers = [_layer(module, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    E = int(layers[3][0].shape[0])
    D = int(getattr(module, "head_dim", 0) or _head_dim(module, E, H))
    for (w, _), n in zip(layers[:3], ("q_proj", "k_proj", "v_proj")):
        _check_rows(module, n, int(w.shape[0]), H * D, f"{name}={H} of {D} features")
    state = _state([w for w, _ in layers], [b for _, b in layers])
    return Ported(family, state, H, H, scale_option(getattr(module, "scaling", None), D),
                  is_causal=bool(getattr(module, "is_causal", False)))


def port_whisper(module: Any, config: Any) -> Ported:
    """Whisper (``WhisperAttention``): the decoder's cross-attention
    (``encoder_attn``: ``key`` = the encoder's states), the decoder's causal
    self-attention or the encoder's bidirectional one (``is_causal`` as the
    module's). ``k_proj`` has no bias (zeros here: exact). Whisper scales the
    projected queries by ``head_dim ** -0.5``, which is mha_xp's default
    scale on ``Q K^T``."""
    return _seq2seq(module, config, "whisper")


def port_bart(module: Any, config: Any) -> Ported:
    """BART (``BartAttention``): as Whisper's (cross-attention as
    ``encoder_attn``, causal decoder and bidirectional encoder
    self-attention), with biases on all four projections; scale
    ``head_dim ** -0.5``, mha_xp's default."""
    return _seq2seq(module, config, "bart")


def port_t5(module: Any, config: Any) -> Ported:
    """T5 (``T5Attention``): ``q``, ``k``, ``v``, ``o`` without biases, heads of
    ``d_kv`` features (``head_dim``, which may differ from ``d_model /
    num_heads``), and no scaling of ``Q K^T`` (``scale=1.0``). For the
    cross-attention (``layer[1].EncDecAttention``: ``key`` = the encoder's
    states), which has no position bias. A self-attention layer without its
    own relative bias still receives the first layer's ``position_bias`` in
    the model: pass it as ``bias=``. The relative position bias itself
    (``has_relative_attention_bias=True``) is not a layer option and is
    refused."""
    if getattr(module, "has_relative_attention_bias", False):
        raise ValueError(
            "this T5Attention has a relative position bias (has_relative_attention_bias=True), "
            "which is not a layer option of mha_xp yet: port a layer without one (the "
            "cross-attention, or a later layer's self-attention) and pass the position bias "
            "as the call's bias= (module.compute_bias(L, S) gives it, shape (1, H, L, S))")
    H = _config_heads(module, config, "num_heads", getattr(module, "n_heads", None))
    D = _positive_int("d_kv", config_value(config, "d_kv"))
    if getattr(module, "key_value_proj_dim", D) != D:
        raise ValueError(f"the config does not describe this T5Attention: config.d_kv={D}, "
                         f"the module's heads have {module.key_value_proj_dim} features")
    layers = [_layer(module, n) for n in ("q", "k", "v", "o")]
    for (w, _), n in zip(layers[:3], "qkv"):
        _check_rows(module, n, int(w.shape[0]), H * D, f"num_heads={H} of d_kv={D} features")
    state = _state([w for w, _ in layers], [b for _, b in layers])
    return Ported("t5", state, H, H, scale_option(getattr(module, "scaling", 1.0), D),
                  is_causal=bool(getattr(module, "is_causal", False)))


FAMILIES: dict[str, Callable[[Any, Any], Ported]] = {
    "GPT2Attention": port_gpt2,
    "GPTNeoXAttention": port_gpt_neox,
    "BloomAttention": port_bloom,
    "FalconAttention": port_falcon,
    "FalconFlashAttention2": port_falcon,  # the same weights; rotary only
    "BertAttention": port_bert,
    "WhisperAttention": port_whisper,
    "BartAttention": port_bart,
    "T5Attention": port_t5,
}
