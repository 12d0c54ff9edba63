"""Hugging Face transformers' own code, run in float64.

Hugging Face's rotary tables and norms cast to float32 (``torch.float``,
``.to(torch.float32)``, ``Tensor.float()``) whatever the model's dtype, so a
float64 model agrees with a float64 reference only to about 1e-7.
:func:`hf_in_float64` runs the shipped code with those casts turned into
float64 ones: the formulas stay Hugging Face's, only the dtype changes, and a
comparison can then be made at float64's rounding.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import pytest


@contextlib.contextmanager
def hf_in_float64(monkeypatch: pytest.MonkeyPatch, *modules: types.ModuleType) -> Iterator[None]:
    """Within the block, ``torch.float`` and ``torch.float32`` as ``modules``
    see them, ``Tensor.float()`` and torch's default dtype (that of
    ``int_tensor * python_float``) are all float64; undone on exit."""
    import torch

    class _Torch64(types.ModuleType):
        float = torch.float64
        float32 = torch.float64

        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    proxy = _Torch64("torch")
    default = torch.get_default_dtype()
    with monkeypatch.context() as m:
        for mod in modules:
            m.setattr(mod, "torch", proxy)
        m.setattr(torch.Tensor, "float", torch.Tensor.double)
        torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(default)


# -- tiny models and their attention modules -------------------------------------


class _Captured(Exception):
    """Raised by the hook of :func:`attention_kwargs` once it has what it needs."""


def tiny_causal_lm(config: Any, dtype: Any, seed: int = 0) -> Any:
    """A ``*ForCausalLM`` of ``config`` (eager attention) in ``dtype``, eval
    mode, its attention parameters redrawn by :func:`randomise_attention`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(dtype).eval()
    for i, layer in enumerate(model.model.layers):
        randomise_attention(layer.self_attn, seed + i)
    return model


def randomise_attention(module: Any, seed: int) -> None:
    """Redraw every parameter of ``module`` (the same values in every dtype:
    drawn in float64, then cast): matrices ``N(0, 1/fan_in)``, so that the
    scores are of order one and the softmax far from uniform; vectors (biases,
    norm scales, sinks) their value plus ``N(0, 0.3^2)``, so that biases
    initialised to zero and scales to one (or zero, Gemma's ``1 + w``) matter."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            noise = torch.randn(tuple(p.shape), generator=gen, dtype=torch.float64)
            if p.ndim >= 2:
                p.copy_((noise / p.shape[-1] ** 0.5).to(p.dtype))
            else:
                p.copy_((p.double() + 0.3 * noise).to(p.dtype))


def attention_kwargs(model: Any, layer_idx: int, x: Any,
                     attention_mask: Any = None) -> dict[str, Any]:
    """What the model passes layer ``layer_idx``'s attention on an input of
    ``x``'s shape: ``position_embeddings`` (the layer type's RoPE tables) and
    ``attention_mask`` (the additive mask of the layer type, sliding or full,
    of ``attention_mask``'s padding), as the model's own code builds them."""
    captured: dict[str, Any] = {}

    def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.update(position_embeddings=kwargs["position_embeddings"],
                        attention_mask=kwargs["attention_mask"])
        raise _Captured

    def skip(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        return hidden_states

    layers = model.model.layers
    handle = layers[layer_idx].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    for earlier in layers[:layer_idx]:  # not run: only their output's shape matters
        earlier.forward = skip
    try:
        model.model(inputs_embeds=x, attention_mask=attention_mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
        for earlier in layers[:layer_idx]:
            del earlier.forward
    if not captured:
        raise RuntimeError(f"the model did not reach layer {layer_idx}'s attention")
    return captured


def run_attention(model: Any, layer_idx: int, x: Any) -> Any:
    """The output (B, L, E) of layer ``layer_idx``'s attention module on the
    hidden states ``x`` (a torch tensor), with the positions ``0..L-1`` and
    the mask the model gives that layer, as a NumPy array."""
    import torch

    with torch.no_grad():
        kwargs = attention_kwargs(model, layer_idx, x)
        out = model.model.layers[layer_idx].self_attn(hidden_states=x, **kwargs)[0]
    return out.detach().numpy()
