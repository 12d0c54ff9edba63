"""Porting Hugging Face transformers' attention modules: :func:`port_module`.

Each supported module class has a port (a function of the module and the
model config returning a :class:`~mha_xp._hf._common.Ported`), registered
under the class's name: the decoders with separate q/k/v/o projections in
``_decoders``, the families with fused or encoder-decoder projections in
``_fused``. :meth:`mha_xp.MultiHeadAttention.from_transformers` builds the
layer from what the port returns. Nothing here imports torch or
transformers: modules and configs are read through their attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._common import Ported
from ._decoders import FAMILIES as _DECODERS
from ._fused import FAMILIES as _FUSED

__all__ = ["port_module"]

_REGISTRY: dict[str, Callable[[Any, Any], Ported]] = {**_DECODERS, **_FUSED}


def port_module(module: Any, config: Any) -> Ported:
    """Port one attention module of a supported family.

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (e.g. ``model.model.layers[i].self_attn``); its
        class name (``type(module).__name__``) selects the port.
    config : transformers.PretrainedConfig
        The model's configuration.

    Returns
    -------
    Ported
        The state dict under mha_xp's names, the head counts, the layer
        options and whether the module attends causally.

    Raises
    ------
    TypeError
        ``module``'s class is not one of the supported attention modules.
    ValueError
        ``config`` does not describe ``module``, or the module uses something
        mha_xp cannot express.
    """
    name = type(module).__name__
    port = _REGISTRY.get(name)
    if port is None:
        raise TypeError(f"cannot port a {name}: mha_xp ports the attention modules "
                        f"{', '.join(sorted(_REGISTRY))}")
    return port(module, config)
