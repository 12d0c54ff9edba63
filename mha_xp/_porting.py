"""What ported code gets wrong, and the errors that say how to fix it.

Two kinds of help for code ported from torch, Keras, Flax or ``jax.nn``:

- **Keywords of other libraries** (``attn_mask``, ``need_weights``,
  ``use_causal_mask``, ...) raise a ``TypeError`` that names mha_xp's
  argument, and the conversion where the meaning differs, instead of
  Python's bare "unexpected keyword argument". :func:`refuse_foreign` wraps a
  public function or method; the check costs one set comparison per call,
  and only calls with keywords at all.
- **Mask shapes**: :func:`mask_shape_hint` guesses, from a mask's shape and
  the scores', which convention a refused mask was written for.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["FUNCTION_KEYWORDS", "LAYER_CALL_KEYWORDS", "LAYER_INIT_KEYWORDS",
           "mask_shape_hint", "refuse_foreign"]

F = TypeVar("F", bound=Callable[..., Any])

_TORCH_MASK = ("mha_xp's boolean mask means True = may attend, the opposite of torch's "
               "attn_mask: pass mask=~attn_mask (a float attn_mask is bias=attn_mask)")
_WEIGHTS = "pass return_weights=True (mha_xp returns the weights only when asked)"
_KERAS_MASK = ("pass mask= (True = may attend, as Keras); a Keras (B, L, S) attention_mask "
               "needs a head axis: mask=attention_mask[:, None]")
_KERAS_CAUSAL = ("pass is_causal=True; note that Keras aligns the causal mask top-left when "
                 "L != S and mha_xp bottom-right (query i sees keys j <= i + S - L): "
                 "pass Keras's triangle as mask= to keep its numbers")

#: Foreign keywords of the attention functions, and what to pass instead.
FUNCTION_KEYWORDS: Mapping[str, str] = {
    "attn_mask": _TORCH_MASK,
    "need_weights": _WEIGHTS,
    "return_attention_scores": _WEIGHTS,
    "key_padding_mask": (
        "the attention functions take no key_padding_mask (the layer does): pass a mask, "
        "mask=~key_padding_mask[:, None, None, :] for (B, S) padding with True = padding"),
    "attention_mask": _KERAS_MASK,
    "use_causal_mask": _KERAS_CAUSAL,
    "implementation": "mha_xp chooses its own path; see memory_budget= and chunk_size=",
}

#: Foreign keywords of the layer's call and ``vjp``.
LAYER_CALL_KEYWORDS: Mapping[str, str] = {
    "attn_mask": _TORCH_MASK,
    "need_weights": _WEIGHTS,
    "return_attention_scores": _WEIGHTS,
    "average_attn_weights": "pass average_weights=",
    "attention_mask": _KERAS_MASK,
    "use_causal_mask": _KERAS_CAUSAL,
    "deterministic": ("pass training=True with a dropout_seed= to apply dropout "
                      "(deterministic=False in Flax); calls are deterministic by default"),
}

#: Foreign keywords of the layer's constructor.
LAYER_INIT_KEYWORDS: Mapping[str, str] = {
    "batch_first": ("the layer is always batch-first: drop batch_first= and transpose "
                    "(L, B, E) inputs to (B, L, E)"),
    "key_dim": "pass embed_dim= and num_heads= (Keras's key_dim is embed_dim // num_heads)",
    "qkv_features": "pass embed_dim= (Flax's qkv_features)",
}


def _accepted(func: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    """The keyword names ``func`` accepts, and whether it takes ``**kwargs``."""
    params = inspect.signature(func).parameters.values()
    names = frozenset(p.name for p in params
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def refuse_foreign(hints: Mapping[str, str], name: str | None = None) -> Callable[[F], F]:
    """Wrap ``func`` so that a keyword of ``hints`` it does not accept raises
    a ``TypeError`` naming the replacement.

    Parameters
    ----------
    hints : mapping of str to str
        Foreign keyword -> what to pass instead.
    name : str, optional
        The name used in the message (default: the function's qualified name).
    """
    def wrap(func: F) -> F:
        accepted, any_keyword = _accepted(func)
        foreign = frozenset(hints) - accepted
        label = name or func.__qualname__.replace(".__call__", "").replace(".__init__", "")
        if any_keyword or not foreign:
            return func

        @functools.wraps(func)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if kwargs and not foreign.isdisjoint(kwargs):
                bad = next(k for k in kwargs if k in foreign)
                raise TypeError(f"{label}() got an unexpected keyword argument {bad!r}: "
                                f"{hints[bad]}")
            return func(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return wrap


def mask_shape_hint(shape: tuple[int, ...], scores: tuple[int, ...], *,
                    padding_argument: bool) -> str:
    """A guess at what a mask of ``shape``, which does not broadcast to the
    ``scores`` shape ``(..., H, L, S)``, was meant to be, and the fix; "" when
    no convention explains it.

    ``padding_argument``: whether the caller takes ``key_padding_mask`` (the
    layer) or not (the functions).
    """
    if len(scores) < 3:
        return ""
    H, L, S = scores[-3:]
    lead = scores[:-3]
    B = lead[-1] if lead else None
    if len(shape) == 2 and B is not None and shape == (B, S):
        if padding_argument:
            return ("; it looks like (B, S) padding: pass key_padding_mask= (True = padding), "
                    "or mask=keep[:, None, None, :] with True = may attend")
        return ("; it looks like (B, S) key padding: a mask of (B, S) needs axes for heads "
                "and queries, mask=keep[:, None, None, :] (True = may attend)")
    if len(shape) == 3 and shape[1:] == (L, S):
        if B is not None and shape[0] == B * H and B * H != H:
            return (f"; torch's 3-D attn_mask is (B*H, L, S): pass "
                    f"~attn_mask.reshape({B}, {H}, {L}, {S})")
        if B is not None and shape[0] == B:
            return ("; a (B, L, S) mask, as Keras's attention_mask, needs a head axis: "
                    "pass mask[:, None]")
    if len(shape) >= 2 and shape[-2:] == (S, L) and L != S:
        return "; its last two axes look swapped: the mask is (..., L, S), queries then keys"
    return ""
