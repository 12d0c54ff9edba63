"""What porting a Hugging Face attention module produces: :class:`Ported`.

A family's port reads the module's weights (torch tensors) and the model
config, and returns the state dict under mha_xp's names, the head counts
and the layer options; :meth:`mha_xp.MultiHeadAttention.from_transformers`
builds the layer from it. Nothing here imports transformers or torch: the
module and config are read through their attributes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Ported", "config_value", "rope_options", "scale_option"]


@dataclass(frozen=True)
class Ported:
    """A ported attention module.

    Attributes
    ----------
    family : str
        The model family, as the docs' table names it (``"llama"``, ...).
    state_dict : dict of str to tensor
        The weights under mha_xp's (torch ``nn.MultiheadAttention``'s) names:
        ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` (or a packed
        ``in_proj_weight``), ``in_proj_bias``, ``out_proj.weight``,
        ``out_proj.bias``, ``q_norm.weight``, ``k_norm.weight``,
        ``q_norm.bias``, ``k_norm.bias``, ``sinks``; tensors detached and
        cloned, in the module's dtype.
    num_heads : int
    num_kv_heads : int
    options : dict
        The layer options that are not parameters (``rotary``,
        ``rotary_base``, ``rope_scaling``, ``window``, ``softcap``,
        ``scale``, ``qk_norm``, ...), as the constructor takes them.
    is_causal : bool
        Whether the module attends causally (decoders' self-attention): the
        ported layer is then called with ``is_causal=True``.
    """

    family: str
    state_dict: dict[str, Any]
    num_heads: int
    num_kv_heads: int
    options: dict[str, Any] = field(default_factory=dict)
    is_causal: bool = True


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``config`` has and is not None, else ``default``."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def rope_options(config: Any, layer_type: str | None = None,
                 rotary_dim: int | None = None) -> dict[str, Any]:
    """The layer's RoPE options from ``config.rope_parameters`` (of
    ``layer_type`` where they are given per layer type, as Gemma 3's):
    ``rope_theta`` as ``rotary_base``, a ``rope_type`` other than
    ``"default"`` as ``rope_scaling`` with ``max_position_embeddings``."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), Mapping):
        params = params[layer_type]
    params = dict(params)
    theta = params.get("rope_theta", config_value(config, "rope_theta", default=10000.0))
    options: dict[str, Any] = {"rotary": True, "rotary_base": float(theta)}
    if params.get("rope_type", params.get("type", "default")) != "default":
        # partial_rotary_factor is rotary_dim's (the scaling is computed on those
        # features); rope_theta is rotary_base
        options["rope_scaling"] = {k: v for k, v in params.items()
                                   if k not in ("partial_rotary_factor", "rope_theta")}
        options["max_position_embeddings"] = config_value(config, "max_position_embeddings")
    if rotary_dim is not None:
        options["rotary_dim"] = rotary_dim
    return options


def scale_option(scaling: Any, head_dim: int) -> dict[str, Any]:
    """``scale`` where a module's factor on Q K^T is not mha_xp's default
    ``1 / sqrt(head_dim)`` (to the rounding of ``head_dim ** -0.5`` against
    ``1 / math.sqrt(head_dim)``, which modules spell either way)."""
    if scaling is None or math.isclose(float(scaling), head_dim ** -0.5, rel_tol=1e-14):
        return {}
    return {"scale": float(scaling)}
