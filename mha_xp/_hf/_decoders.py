"""Ports of Hugging Face decoders' attention with separate q/k/v/o projections.

Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi and gpt-oss project
queries, keys and values with three ``nn.Linear`` layers (``q_proj``,
``k_proj``, ``v_proj``) and merge the heads with a fourth (``o_proj``; Phi's
``dense``), rotate the queries and keys with RoPE in the ``rotate_half``
convention, and differ in the rest: biases, QK norm, the scale, the soft-cap,
the window of each layer, the RoPE base and scaling of each layer, attention
sinks. Each port reads the module's weights and the options the module does
not hold (RoPE, the window, the norms' epsilon) from the model config, as
transformers 5 spells them (``rope_parameters``, ``layer_types``,
``sliding_window``, ``query_pre_attn_scalar``, ``attn_logit_softcapping``,
``partial_rotary_factor``). Modules and configs are read through their
attributes only: nothing here imports torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .._lib._namespace import namespace_and_device
from ._common import Ported, config_value, rope_options, scale_option

__all__ = ["FAMILIES"]

_SLIDING = "sliding_attention"


def _text_config(config: Any) -> Any:
    """The decoder's own config (a multimodal config's ``text_config``)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _linear(module: Any, name: str) -> tuple[Any, Any]:
    """``(weight, bias or None)`` of the ``nn.Linear`` ``module.<name>``, detached copies."""
    layer = getattr(module, name, None)
    weight = getattr(layer, "weight", None)
    if weight is None or len(tuple(weight.shape)) != 2:
        raise TypeError(f"{type(module).__name__} has no Linear layer {name!r}: it is not "
                        f"the attention module this port reads")
    bias = getattr(layer, "bias", None)
    return weight.detach().clone(), None if bias is None else bias.detach().clone()


def _projections(module: Any, out_name: str = "o_proj") -> dict[str, Any]:
    """The four projections under mha_xp's names; biases all or nothing
    (zeros where the module has none, which leaves its output unchanged)."""
    layers = [_linear(module, name) for name in ("q_proj", "k_proj", "v_proj", out_name)]
    weights = [w for w, _ in layers]
    state = {"q_proj_weight": weights[0], "k_proj_weight": weights[1],
             "v_proj_weight": weights[2], "out_proj.weight": weights[3]}
    if any(b is not None for _, b in layers):
        xp, device = namespace_and_device(weights[0])
        full = [b if b is not None else xp.zeros((w.shape[0],), dtype=w.dtype, device=device)
                for w, b in layers]
        state["in_proj_bias"] = xp.concat(full[:3])
        state["out_proj.bias"] = full[3]
    return state


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.{name} must be a positive int, got {value!r}")
    return value


def _heads(module: Any, config: Any, state: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)``: the config's head counts and
    the module's head size, checked against the weights' shapes."""
    H = _positive_int("num_attention_heads", getattr(config, "num_attention_heads", None))
    Hkv = _positive_int("num_key_value_heads",
                        config_value(config, "num_key_value_heads", default=H))
    D = getattr(module, "head_dim", None) or config_value(config, "head_dim")
    if D is None:
        D = getattr(config, "hidden_size", 0) // H
    q_rows, k_rows, v_rows = (int(state[f"{n}_proj_weight"].shape[0]) for n in "qkv")
    o_cols = int(state["out_proj.weight"].shape[1])
    if (H % Hkv or q_rows != H * D or o_cols != H * D or k_rows != Hkv * D
            or v_rows != Hkv * D):
        raise ValueError(
            f"the config does not describe this {type(module).__name__}: "
            f"num_attention_heads={H}, num_key_value_heads={Hkv} and head_dim={D} need "
            f"q_proj and o_proj of {H * D} rows/columns and k_proj, v_proj of {Hkv * D} rows "
            f"(num_key_value_heads dividing num_attention_heads); the weights have q_proj "
            f"{q_rows} rows, k_proj {k_rows}, v_proj {v_rows}, o_proj {o_cols} columns")
    return H, Hkv, int(D)


def _layer_type(module: Any, config: Any) -> str | None:
    """The module's layer type (``"sliding_attention"``, ``"full_attention"``)
    as the config's ``layer_types`` gives it for the module's layer."""
    types, idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if types is not None and isinstance(idx, int) and 0 <= idx < len(types):
        return str(types[idx])
    return getattr(module, "layer_type", None)


def _window(config: Any, sliding: bool, *, both_sides: bool = False) -> dict[str, Any]:
    """Hugging Face's ``sliding_window=W`` keeps the W keys up to and including
    the query's own position: mha_xp's ``window=(W - 1, 0)``."""
    W = getattr(config, "sliding_window", None) if sliding else None
    if W is None:
        return {}
    W = _positive_int("sliding_window", W)
    return {"window": (W - 1, W - 1 if both_sides else 0)}


def _norm_eps(module: Any, q_name: str, k_name: str) -> float:
    """The epsilon of the module's query and key norms (one for both)."""
    eps = []
    for name in (q_name, k_name):
        norm = getattr(module, name)
        eps.append(float(norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps))
    if eps[0] != eps[1]:
        raise ValueError(f"{type(module).__name__}: the query and key norms have different "
                         f"epsilons {eps[0]} and {eps[1]}; mha_xp's QK norm has one")
    return eps[0]


def _rms_qk_norm(module: Any, state: dict[str, Any], offset: float) -> dict[str, Any]:
    """Qwen 3's and Gemma 3's per-head-dim RMSNorm of the queries and keys
    (before RoPE): ``x / sqrt(mean(x^2) + eps) * (offset + w)``."""
    state["q_norm.weight"] = module.q_norm.weight.detach().clone()
    state["k_norm.weight"] = module.k_norm.weight.detach().clone()
    return {"qk_norm": "rms", "qk_norm_eps": _norm_eps(module, "q_norm", "k_norm"),
            "qk_norm_offset": offset}


def _decoder(module: Any, config: Any, *, sliding: bool,
             out_name: str = "o_proj") -> tuple[dict[str, Any], int, int, dict[str, Any]]:
    """What every family shares: the weights, the head counts, the scale,
    RoPE (of the layer's type) and the window (``sliding``: this layer's)."""
    state = _projections(module, out_name)
    H, Hkv, D = _heads(module, config, state)
    options = (scale_option(getattr(module, "scaling", None), D)
               | rope_options(config, _layer_type(module, config)) | _window(config, sliding))
    return state, H, Hkv, options


def _is_sliding(module: Any, config: Any) -> bool:
    return _layer_type(module, config) == _SLIDING


def port_llama(module: Any, config: Any) -> Ported:
    """Llama: RoPE (any ``rope_type``), optional biases (``attention_bias``)."""
    config = _text_config(config)
    state, H, Hkv, options = _decoder(module, config, sliding=False)
    return Ported("llama", state, H, Hkv, options)


def port_mistral(module: Any, config: Any) -> Ported:
    """Mistral: Llama with ``sliding_window`` on every layer (when set)."""
    config = _text_config(config)
    state, H, Hkv, options = _decoder(module, config, sliding=True)
    return Ported("mistral", state, H, Hkv, options)


def port_qwen2(module: Any, config: Any) -> Ported:
    """Qwen2: biases on q, k, v (none on o), a window on the layers that
    ``layer_types`` marks sliding (``use_sliding_window``, ``max_window_layers``)."""
    config = _text_config(config)
    state, H, Hkv, options = _decoder(module, config,
                                      sliding=_is_sliding(module, config))
    return Ported("qwen2", state, H, Hkv, options)


def port_qwen3(module: Any, config: Any) -> Ported:
    """Qwen3: Qwen2's layout (biases per ``attention_bias``) with an RMSNorm of
    each head's queries and keys before RoPE."""
    config = _text_config(config)
    state, H, Hkv, options = _decoder(module, config,
                                      sliding=_is_sliding(module, config))
    return Ported("qwen3", state, H, Hkv, options | _rms_qk_norm(module, state, 0.0))


def port_gemma2(module: Any, config: Any) -> Ported:
    """Gemma 2: scale ``query_pre_attn_scalar**-0.5``, tanh soft-cap of the
    scores (``attn_logit_softcapping``), a window on the sliding layers."""
    config = _text_config(config)
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("Gemma2Attention with use_bidirectional_attention: its eager mask stays "
                         "causal while sdpa and flash attend both ways; mha_xp does not port it")
    state, H, Hkv, options = _decoder(module, config,
                                      sliding=_is_sliding(module, config))
    softcap = getattr(module, "attn_logit_softcapping", None)
    if softcap is not None:
        options["softcap"] = float(softcap)
    return Ported("gemma2", state, H, Hkv, options)


def port_gemma3(module: Any, config: Any) -> Ported:
    """Gemma 3: scale ``query_pre_attn_scalar**-0.5``, a ``(1 + w)`` RMSNorm of
    queries and keys, per-layer-type RoPE (the sliding layers' base is
    ``rope_local_base_freq``), a window on the sliding layers; no soft-cap
    (the module does not apply ``attn_logit_softcapping``). With
    ``use_bidirectional_attention`` it attends both ways: all keys on the
    full layers, those less than ``sliding_window`` away on the sliding ones."""
    config = _text_config(config)
    both = bool(getattr(config, "use_bidirectional_attention", False))
    state = _projections(module)
    H, Hkv, D = _heads(module, config, state)
    layer_type = _layer_type(module, config)
    options = (scale_option(getattr(module, "scaling", None), D) | rope_options(config, layer_type)
               | _window(config, layer_type == _SLIDING, both_sides=both)
               | _rms_qk_norm(module, state, 1.0))
    return Ported("gemma3", state, H, Hkv, options, is_causal=not both)


def port_phi(module: Any, config: Any) -> Ported:
    """Phi: biases everywhere, output projection ``dense``, RoPE on the first
    ``int(head_dim * partial_rotary_factor)`` features of each head, optional
    LayerNorm (with bias) of the queries and keys (``qk_layernorm``)."""
    config = _text_config(config)
    state = _projections(module, "dense")
    H, Hkv, D = _heads(module, config, state)
    rotary_dim = int(getattr(module, "rotary_ndims", D))
    if rotary_dim % 2:
        raise ValueError(f"PhiAttention rotates {rotary_dim} features (head_dim {D} times "
                         f"partial_rotary_factor): RoPE needs an even number")
    options = scale_option(getattr(module, "scaling", None), D)
    if rotary_dim:
        options |= rope_options(config, rotary_dim=rotary_dim if rotary_dim != D else None)
    if getattr(module, "qk_layernorm", False):
        for which in ("q", "k"):
            norm = getattr(module, f"{which}_layernorm")
            if norm.weight is None:
                raise ValueError("PhiAttention's QK LayerNorm has no weight; mha_xp's needs one")
            state[f"{which}_norm.weight"] = norm.weight.detach().clone()
            if norm.bias is not None:
                state[f"{which}_norm.bias"] = norm.bias.detach().clone()
        options |= {"qk_norm": "layer", "qk_norm_eps": _norm_eps(module, "q_layernorm",
                                                                   "k_layernorm")}
    return Ported("phi", state, H, Hkv, options)


def port_gpt_oss(module: Any, config: Any) -> Ported:
    """gpt-oss: biases, one learned sink logit per head (``sinks``), YaRN RoPE,
    a window on the sliding layers (every other one)."""
    config = _text_config(config)
    state, H, Hkv, options = _decoder(module, config,
                                      sliding=_is_sliding(module, config))
    sinks = getattr(module, "sinks", None)
    if sinks is None or tuple(sinks.shape) != (H,):
        raise ValueError(f"GptOssAttention needs sinks of shape ({H},) (one per query head), got "
                         f"{None if sinks is None else tuple(sinks.shape)}")
    state["sinks"] = sinks.detach().clone()
    return Ported("gpt-oss", state, H, Hkv, options)


FAMILIES: dict[str, Callable[[Any, Any], Ported]] = {
    "LlamaAttention": port_llama,
    "MistralAttention": port_mistral,
    "Qwen2Attention": port_qwen2,
    "Qwen3Attention": port_qwen3,
    "Gemma2Attention": port_gemma2,
    "Gemma3Attention": port_gemma3,
    "PhiAttention": port_phi,
    "GptOssAttention": port_gpt_oss,
}
