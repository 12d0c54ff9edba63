"""What porting a Hugging Face attention module produces: :class:`Ported`.

A family's port reads the module's weights (torch tensors) and the model
config, and returns the state dict under mha_xp's names, the head counts
and the layer options; :meth:`mha_xp.MultiHeadAttention.from_transformers`
builds the layer from it. Nothing here imports transformers or torch: the
module and config are read through their attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Ported", "config_value"]


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
