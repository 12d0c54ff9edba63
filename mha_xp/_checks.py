"""Argument validation: every shape and value error a user sees is worded here."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, cast

from ._porting import mask_shape_hint
from ._lib._backends import host_readable
from ._lib._shapes import broadcasts_to
from ._lib._namespace import (
    Array,
    common_namespace,
    device_of,
    dtype_name,
    lib_name,
    require_bool,
    require_real_floating,
)
from ._config import num_threads
from ._spec import LayerCall

__all__ = [
    "check_cache_arrays",
    "check_cache_call",
    "check_cache_owner",
    "check_layer_call",
    "check_training",
    "check_weights_fit",
    "check_alibi",
    "check_alibi_slopes",
    "check_bias",
    "check_chunk_size",
    "check_cu_seqlens",
    "check_dropout",
    "check_dropout_p",
    "check_dtype",
    "check_flag",
    "check_gqa",
    "check_grad",
    "check_mask",
    "check_num_threads",
    "check_positive_int",
    "check_qk_norm_kind",
    "check_real",
    "check_rotary_base",
    "check_rotary_dim",
    "check_same_dtype",
    "check_scale",
    "check_sdpa_shapes",
    "check_seed",
    "check_sinks",
    "check_softcap",
    "check_window",
    "format_bytes",
]

MASK_MEANING = "True means 'may attend'"


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_num_threads(value: Any) -> int | None:
    """A call's ``num_threads=`` (None: the number in effect), checked as
    :func:`~mha_xp.num_threads` checks its own."""
    return None if value is None else num_threads.check("num_threads", value)


def check_chunk_size(chunk_size: Any) -> tuple[int, int] | None:
    """Return ``(query_block, key_block)`` from an int or a pair, or None."""
    if chunk_size is None:
        return None
    pair = chunk_size if isinstance(chunk_size, (tuple, list)) else (chunk_size, chunk_size)
    if len(pair) != 2:
        raise ValueError(
            f"chunk_size must be an int or a pair (query_block, key_block), got {chunk_size!r}"
        )
    return (check_positive_int("chunk_size", pair[0]), check_positive_int("chunk_size", pair[1]))


def check_scale(scale: Any, head_dim: int, dtype: Any = None,
                xp: ModuleType | None = None) -> float:
    """Return the softmax scale as a Python float (default ``1/sqrt(head_dim)``).

    With ``dtype`` (the compute dtype) and its namespace ``xp``, a scale
    beyond the dtype's largest finite value is refused: it would round to
    ``inf`` there and turn every score into ``inf`` or NaN."""
    if scale is None:
        if head_dim == 0:  # 1/sqrt(0): refuse rather than divide by zero
            raise ValueError(
                "query and key have an empty feature axis (D = 0), for which the default "
                "scale 1/sqrt(D) is undefined: pass scale= explicitly"
            )
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(
            f"scale must be a positive finite Python float or None, got {type(scale).__name__}"
        )
    scale = float(scale)  # also drops NumPy scalars, which would up-cast float32 (NEP 50)
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if dtype is not None and xp is not None:
        largest = float(xp.finfo(dtype).max)
        if scale > largest:
            raise ValueError(
                f"scale={scale:g} overflows {dtype_name(dtype)}, the dtype attention is "
                f"computed in, whose largest finite value is {largest:g}: every scaled score "
                f"would be inf or NaN. Pass a scale below {largest:g} (fold the rest into "
                f"the queries or keys), or compute in float64"
            )
    return scale


def _broadcast(shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    first, *rest = shapes.values()
    if all(s == first for s in rest):  # the common case, without the loop
        return tuple(first)
    ndim = max(len(s) for s in shapes.values())
    out = [1] * ndim
    for axis in range(-ndim, 0):
        for name, shape in shapes.items():
            if -axis > len(shape) or shape[axis] == 1:
                continue
            if out[axis] not in (1, shape[axis]):
                desc = ", ".join(f"{n} {s}" for n, s in shapes.items())
                raise ValueError(f"the leading (batch, head) dimensions do not broadcast: {desc}")
            out[axis] = shape[axis]
    return tuple(out)


def check_sdpa_shapes(query: Array, key: Array, value: Array) -> tuple[int, ...]:
    """Validate ``query (..., L, D)``, ``key (..., S, D)``, ``value (..., S, Dv)``.

    Returns the shape of the score tensor, ``(..., L, S)``, where ``...`` is
    the broadcast of the three leading shapes.
    """
    shapes = {"query": tuple(query.shape), "key": tuple(key.shape), "value": tuple(value.shape)}
    for name, shape in shapes.items():
        if len(shape) < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., heads, length, features), "
                f"got shape {shape}"
            )
    if not len(shapes["query"]) == len(shapes["key"]) == len(shapes["value"]):
        raise ValueError(
            "query, key and value must have the same number of dimensions, got shapes "
            f"{shapes['query']}, {shapes['key']} and {shapes['value']}"
        )
    if shapes["query"][-2] == 0 or shapes["key"][-2] == 0:
        raise ValueError(
            "query and key must have at least one position each (L >= 1, S >= 1) on "
            f"axis -2, got query {shapes['query']} and key {shapes['key']}"
        )
    if shapes["query"][-1] != shapes["key"][-1]:
        raise ValueError(
            f"query and key must have the same feature size (last axis), got query "
            f"{shapes['query']} and key {shapes['key']}"
        )
    if shapes["key"][-2] != shapes["value"][-2]:
        raise ValueError(
            f"key and value must have the same length (axis -2), got key {shapes['key']} "
            f"and value {shapes['value']}"
        )
    lead = _broadcast({n: s[:-2] for n, s in shapes.items()})
    return lead + (shapes["query"][-2], shapes["key"][-2])


def _check_broadcasts_to(name: str, shape: tuple[int, ...], target: tuple[int, ...], labels: str) -> None:
    if not broadcasts_to(tuple(shape), target):
        raise ValueError(
            f"{name} must broadcast to the attention scores {labels} = {target}, "
            f"got shape {tuple(shape)}"
        )


def check_mask(mask: Array, target: tuple[int, ...], xp: ModuleType, labels: str, *,
               layer: bool = False) -> None:
    """A ``mask`` must be boolean (True = may attend) and broadcast to ``target``.

    The layer (``layer=True``) also refuses, on batched input, a 3-D mask with
    more than one leading entry: Keras's ``(B, L, S)``, torch's
    ``(B*H, L, S)`` and a per-head ``(H, L, S)`` all have that rank, and with
    ``B == H`` a wrong reading would run. A mask that does not broadcast gets
    a guess at the convention it was written for (:mod:`._porting`)."""
    require_bool("mask", mask, xp, MASK_MEANING)
    shape = tuple(mask.shape)
    if layer and len(target) == 4 and len(shape) == 3 and shape[0] != 1:
        B, H, L, S = target
        raise ValueError(
            f"mask is a 3-D mask of shape {shape}, ambiguous on batched input: Keras's "
            f"(B, L, S), torch's (B*H, L, S) and a per-head (H, L, S) all have 3 axes; pass a "
            f"4-D mask broadcasting "
            f"to (B, H, L, S) = {target}: (B, 1, L, S) for one mask per batch entry "
            f"(mask[:, None]), (1, H, L, S) per head (mask[None]), (B, H, L, S) for both "
            f"(torch's attn_mask: ~attn_mask.reshape({B}, {H}, {L}, {S}))"
        )
    if not broadcasts_to(shape, target):
        raise ValueError(
            f"mask must broadcast to the attention scores {labels} = {target}, got shape "
            f"{shape}{mask_shape_hint(shape, target, padding_argument=layer)}"
        )


def check_bias(bias: Array, dtype: Any, target: tuple[int, ...], xp: ModuleType, labels: str) -> None:
    """A ``bias`` must be real floating, of the inputs' dtype, broadcasting to ``target``."""
    if xp.isdtype(bias.dtype, "bool"):
        raise TypeError(
            "bias must be a float array added to the scores, got a boolean array; "
            f"pass boolean masks as mask= ({MASK_MEANING})"
        )
    require_real_floating("bias", bias, xp)
    if bias.dtype != dtype:
        raise TypeError(
            f"bias has dtype {dtype_name(bias.dtype)} but the inputs are {dtype_name(dtype)}; "
            "mha_xp does not promote dtypes silently: cast bias to the inputs' dtype"
        )
    _check_broadcasts_to("bias", tuple(bias.shape), target, labels)


def check_sinks(sinks: Array, dtype: Any, scores_shape: tuple[int, ...], xp: ModuleType) -> None:
    """Attention-sink logits: real floating, of the inputs' dtype, one per
    query head, ``(H,)`` for scores ``(..., H, L, S)``."""
    require_real_floating("sinks", sinks, xp)
    if sinks.dtype != dtype:
        raise TypeError(
            f"sinks has dtype {dtype_name(sinks.dtype)} but the inputs are {dtype_name(dtype)}; "
            "mha_xp does not promote dtypes silently: cast sinks to the inputs' dtype"
        )
    heads = scores_shape[-3] if len(scores_shape) >= 3 else 1
    if tuple(sinks.shape) != (heads,):
        raise ValueError(
            f"sinks must have shape (H,) = ({heads},), one logit per query head of the scores "
            f"{scores_shape} (..., H, L, S), got {tuple(sinks.shape)}"
        )


def check_same_dtype(xp: ModuleType, **arrays: Array) -> Any:
    """All arrays real floating and of one dtype; return that dtype."""
    dtype = first = None
    for name, x in arrays.items():
        require_real_floating(name, x, xp)
        if dtype is None:
            dtype, first = x.dtype, name
        elif x.dtype != dtype:
            raise TypeError(
                f"{name} has dtype {dtype_name(x.dtype)} but {first} has dtype "
                f"{dtype_name(dtype)}; mha_xp does not promote dtypes silently: cast one of them"
            )
    return dtype


def check_grad(grad: Any, out: Array, *, xp: ModuleType, name: str) -> None:
    """An upstream gradient must match the output it belongs to exactly."""
    if grad is None:
        raise TypeError(f"{name} must be an array (the gradient of the loss with respect to the output), got None")
    common_namespace(out=out, **{name: grad})
    if grad.dtype != out.dtype:
        raise TypeError(
            f"{name} has dtype {dtype_name(grad.dtype)} but the output is "
            f"{dtype_name(out.dtype)}; pass the gradient in the output's dtype"
        )
    if tuple(grad.shape) != tuple(out.shape):
        raise ValueError(
            f"{name} must have the output's shape {tuple(out.shape)}, got {tuple(grad.shape)}"
        )


def check_flag(name: str, value: Any) -> bool:
    """A yes/no argument: a Python or NumPy bool, or the int 0 or 1; never an
    array, whose truth value would be ambiguous or force a computation."""
    if value is True or value is False:  # the common case, first
        return value
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    kind = "an array" if hasattr(value, "shape") else f"{type(value).__name__} {value!r}"
    raise TypeError(f"{name} must be a Python bool, got {kind}")


def check_seed(seed: Any) -> Any:
    """``seed``: None, a non-negative int or a ``numpy.random.Generator``."""
    import numpy as np

    if seed is None or isinstance(seed, (np.random.Generator, np.random.SeedSequence)):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"seed must be None, a non-negative int or a numpy.random.Generator, "
            f"got {type(seed).__name__} {seed!r}"
        )
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    return int(seed)


def check_dtype(dtype: Any, xp: ModuleType, lib: str) -> Any:
    """A real floating dtype of the namespace ``xp`` (named ``lib`` in errors)."""
    try:
        ok = xp.isdtype(dtype, "real floating")
    except Exception:  # e.g. a string, or NumPy's float32 given to torch
        ok = False
        if isinstance(dtype, str) and getattr(xp, dtype, None) is not None:
            hint = f" (use {lib}.{dtype})"
        else:
            hint = f" (use {lib}.float32 or {lib}.float64)"
    else:
        hint = ""
    if not ok:
        raise TypeError(
            f"dtype must be a real floating dtype of {lib}, got {dtype_name(dtype)!s}{hint}"
        )
    return dtype


def check_gqa(query: Array, key: Array, value: Array, enable_gqa: Any) -> tuple[int, int] | None:
    """Grouped-query attention from the head axes (-3) of the inputs.

    Returns ``(Hkv, G)`` when ``query`` has ``Hq = Hkv * G`` heads and
    ``key``/``value`` have ``Hkv`` (neither 1, where broadcasting already
    covers multi-query attention), None otherwise. ``enable_gqa`` is torch's
    flag: None infers from the shapes, False refuses grouped shapes.
    """
    if enable_gqa is not None:
        enable_gqa = check_flag("enable_gqa", enable_gqa)
    if query.ndim < 3 or key.ndim < 3 or value.ndim < 3:
        return None
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if hk != hv and 1 not in (hk, hv):
        raise ValueError(
            f"key and value must have the same number of heads (axis -3), got key "
            f"{tuple(key.shape)} and value {tuple(value.shape)}"
        )
    hkv = hk if hk != 1 else hv
    if hq == hkv or hkv == 1 or hq == 1:
        return None
    if enable_gqa is False:
        raise ValueError(
            f"query has {hq} heads (axis -3) but key and value have {hkv}: the head axes do "
            "not broadcast, and grouped-query attention needs enable_gqa=True (or None, to "
            "infer it from the shapes)"
        )
    if hq % hkv:
        raise ValueError(
            f"query has {hq} heads (axis -3) but key and value have {hkv}: the head axes do "
            f"not broadcast, and grouped-query attention needs the query heads to be a "
            f"multiple of the key/value heads ({hq} % {hkv} = {hq % hkv})"
        )
    return hkv, hq // hkv


def check_window(window: Any) -> tuple[int, int] | None:
    """``window``: None, or a pair ``(left, right)`` of which each side is an
    int ``>= 0`` (that many keys), or None or any negative int (unbounded, as
    FlashAttention's ``-1``). Returns the pair with ``-1`` for an unbounded
    side; the function API and the layer both validate with this."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(
            f"window must be None or a pair (left, right), got "
            f"{type(window).__name__} {window!r}"
        )
    for name, side in zip(("left", "right"), window):
        if side is not None and (isinstance(side, bool) or not isinstance(side, numbers.Integral)):
            raise TypeError(
                f"window must be a pair of ints (left, right), each >= 0, or None or a "
                f"negative int for an unbounded side; got {window!r}, whose {name} side is "
                f"{type(side).__name__}"
            )
    left, right = (-1 if side is None or side < 0 else int(side) for side in window)
    return left, right


def check_dropout_p(dropout_p: Any, name: str = "dropout_p") -> float:
    """A dropout probability: a real Python number in ``[0, 1]``, as a float."""
    if type(dropout_p) is float and 0.0 <= dropout_p <= 1.0:  # the common case, without ABCs
        return dropout_p
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(
            f"{name} must be a float in [0, 1], got {type(dropout_p).__name__} {dropout_p!r}"
        )
    p = float(dropout_p)  # drops NumPy scalars, which would up-cast float32 (NEP 50)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {dropout_p}")
    return p


def check_dropout(dropout_p: Any, seed: Any, *, seed_name: str = "seed",
                  p_name: str = "dropout_p") -> tuple[float, int] | None:
    """``(p, seed)`` for dropout on the attention weights, or None when it is off
    (``p == 0``). The keep-mask is a function of an explicit seed (there is no
    global random state), so ``p > 0`` without a seed is an error."""
    p = check_dropout_p(dropout_p, p_name)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(
                f"{seed_name} must be an int in [0, 2**64) keying the dropout mask, got "
                f"{type(seed).__name__} {seed!r}"
            )
        if not 0 <= cast(int, seed) < 2**64:
            raise ValueError(f"{seed_name} must be an int in [0, 2**64), got {seed}")
        seed = int(seed)
    if p == 0.0:
        return None
    if seed is None:
        raise ValueError(
            f"{p_name}={p} needs {seed_name}=<int>: the dropout mask is a function of an "
            f"explicit seed (mha_xp keeps no global random state); pass the same seed to "
            f"get the same mask"
        )
    return p, seed


def check_softcap(softcap: Any) -> float | None:
    """``softcap``: None or a positive finite Python number."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(
            f"softcap must be a positive finite Python float or None, got "
            f"{type(softcap).__name__} {softcap!r}"
        )
    cap = float(softcap)  # drops NumPy scalars, which would up-cast float32 (NEP 50)
    if not (math.isfinite(cap) and cap > 0.0):
        raise ValueError(f"softcap must be a positive finite number (or None), got {softcap}")
    return cap


def check_real(name: str, value: Any, *, low: float = -math.inf, strict: bool = False,
               what: str = "a finite number") -> float:
    """A finite real number ``>= low`` (``> low`` with ``strict``) as a Python
    float: NumPy scalars are dropped, since they would up-cast float32 (NEP 50)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__} {value!r}")
    v = float(value)
    if not (math.isfinite(v) and (v > low if strict else v >= low)):
        raise ValueError(f"{name} must be {what}, got {value}")
    return v


QK_NORM_KINDS = ("rms", "layer")


def check_qk_norm_kind(kind: Any, name: str = "kind") -> str:
    """The kind of a QK normalisation: ``"rms"`` or ``"layer"``."""
    if not isinstance(kind, str) or kind not in QK_NORM_KINDS:
        raise ValueError(
            f"{name} must be 'rms' (x / sqrt(mean(x**2) + eps), Qwen3, Gemma 3) or 'layer' "
            f"(mean-centred LayerNorm, Flax, Cohere, Phi), got {kind!r}"
        )
    return kind


def check_rotary_base(base: Any, name: str = "rotary_base") -> float:
    """RoPE's base (``rope_theta``): a positive finite real number, as a float."""
    if isinstance(base, bool) or not isinstance(base, numbers.Real):
        raise TypeError(f"{name} must be a positive Python float, got {type(base).__name__} {base!r}")
    value = float(base)  # drops NumPy scalars, which would up-cast float32 (NEP 50)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a positive finite number, got {base}")
    return value


def check_rotary_dim(rotary_dim: Any, features: int, *, of: str = "head_dim") -> int | None:
    """How many leading features RoPE rotates: None (all of them) or an even
    int in ``[2, features]``; ``of`` names what ``features`` counts."""
    if rotary_dim is None:
        return None
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, numbers.Integral):
        raise TypeError(
            f"rotary_dim must be an even int or None, got {type(rotary_dim).__name__} "
            f"{rotary_dim!r}"
        )
    if not (0 < cast(int, rotary_dim) <= features and rotary_dim % 2 == 0):
        raise ValueError(
            f"rotary_dim must be an even int in [2, {features}] ({of} = {features}), "
            f"got {rotary_dim}"
        )
    return int(rotary_dim)


def check_alibi(alibi: Any, num_heads: int, name: str = "alibi") -> bool | tuple[float, ...]:
    """The layer's ALiBi option: None or False (off), True (the standard slopes
    of ``num_heads`` heads, which the caller computes), or a sequence of
    ``num_heads`` finite real numbers, returned as a tuple of floats."""
    import numpy as np

    if alibi is None:
        return False
    if isinstance(alibi, (bool, np.bool_)):
        return bool(alibi)
    expected = f"a bool or a sequence of num_heads = {num_heads} slopes (Python floats)"
    if isinstance(alibi, (str, bytes, Mapping)) or not isinstance(alibi, Iterable) or (
            hasattr(alibi, "ndim") and alibi.ndim != 1):
        raise TypeError(f"{name} must be {expected}, got {type(alibi).__name__} {alibi!r}")
    values = list(alibi)
    for i, a in enumerate(values):
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, numbers.Real):
            raise TypeError(
                f"{name} must be {expected}, got {type(a).__name__} {a!r} at index {i}"
            )
    slopes = tuple(float(a) for a in values)  # Python floats: NumPy scalars would up-cast
    if len(slopes) != num_heads:
        raise ValueError(
            f"{name} must hold num_heads = {num_heads} slopes (one per query head), got "
            f"{len(slopes)}: {slopes}"
        )
    for i, a in enumerate(slopes):
        if not math.isfinite(a):
            raise ValueError(f"{name} must hold finite slopes, got {a} at index {i}")
    return slopes


def check_alibi_slopes(slopes: Any, dtype: Any, target: tuple[int, ...], xp: ModuleType) -> None:
    """ALiBi slopes: an array of shape ``(H,)`` or ``(B, H)`` (the query heads
    and batch of the scores ``target``), of the inputs' dtype or float32."""
    require_real_floating("alibi_slopes", slopes, xp)
    if slopes.dtype not in (dtype, xp.float32):
        raise TypeError(
            f"alibi_slopes has dtype {dtype_name(slopes.dtype)}; it must be float32 or the "
            f"inputs' dtype {dtype_name(dtype)}"
        )
    shape, lead = tuple(slopes.shape), target[:-2]
    ok = slopes.ndim in (1, 2) and len(lead) >= slopes.ndim and all(
        s in (1, t) for s, t in zip(reversed(shape), reversed(lead)))
    if not ok:
        raise ValueError(
            f"alibi_slopes must have shape (H,) or (B, H) for the query heads H and batch B, "
            f"i.e. broadcast to {lead[-2:] if len(lead) >= 2 else lead}, got shape {shape}"
        )
    # Values are read only where that is free (host arrays): on a GPU, lazy or
    # traced array it would cost a synchronisation or a computation.
    if host_readable(slopes) and not bool(xp.all(xp.isfinite(slopes))):
        raise ValueError("alibi_slopes must hold finite slopes, got NaN or an infinity")


def check_cu_seqlens(name: str, cu: Array, length: int, xp: ModuleType,
                     check_values: bool, host: Any = None) -> Array:
    """Cumulative sequence lengths: 1-d integer ``(N + 1,)``, from 0 to ``length``,
    non-decreasing. The values are read only when ``check_values`` (host
    arrays: reading them costs no device synchronisation or computation), from
    ``host`` (the Python ints the array was made from) when given.

    Returns ``cu`` in the namespace's default integer dtype (int64; int32
    where that is the default, as in JAX without x64): the differences of
    query and key boundaries taken from it are signed, and unsigned dtypes
    would wrap around (torch has no comparisons for uint16 to uint64 either)."""
    if xp.isdtype(cu.dtype, "bool") or not xp.isdtype(cu.dtype, "integral"):
        raise TypeError(f"{name} must be an integer array, got dtype {dtype_name(cu.dtype)}")
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(
            f"{name} must be 1-d of shape (N + 1,) with N >= 1 sequences, got shape "
            f"{tuple(cu.shape)}"
        )
    index = xp.arange(1, device=device_of(cu)).dtype
    if cu.dtype != index:
        cu = xp.astype(cu, index)
    if not check_values:
        return cu
    if host is not None:
        first, last = int(host[0]), int(host[-1])
        increasing = all(a <= b for a, b in zip(host[:-1], host[1:]))
    else:
        first, last = int(cu[0]), int(cu[-1])
        increasing = bool(xp.all(cu[1:] >= cu[:-1]))
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {first}")
    if last != length:
        raise ValueError(
            f"{name} must end at the length of the packed axis (-2), {length}, got {last}"
        )
    if not increasing:
        raise ValueError(f"{name} must be non-decreasing (cumulative lengths)")
    return cu


def check_weights_fit(peak: int, available: int | None, shape: tuple[int, ...],
                      work: Any, itemsize: int) -> None:
    """The memory guard: a call whose attention weights (``shape``, computed
    in ``work``, of ``itemsize`` bytes an entry) need ``peak`` bytes at their
    peak, more than the memory ``available`` (None: unknown), is refused up
    front, rather than by the operating system's OOM killer."""
    if available is None or peak <= available:
        return
    weights = math.prod(shape) * itemsize
    at_peak = (f" ({format_bytes(peak)} at the peak, while they are assembled block by block)"
               if peak > weights else "")
    raise MemoryError(
        f"return_weights=True needs the {shape} attention weights, "
        f"{format_bytes(weights)} in {dtype_name(work)}{at_peak}, but only "
        f"{format_bytes(available)} of memory is available (the least of the system's, "
        f"the cgroup's and the address-space limit); call without return_weights "
        f"(attention itself takes the chunked path, whose memory is linear in L and S), "
        f"or ask for the weights of fewer queries or heads at a time"
    )


def _move_hint(xp: ModuleType, device: Any) -> Callable[[], str]:
    """How to move a layer to its inputs, for an error message: worded only
    when there is an error (a call without one never formats it)."""
    return lambda: (f"move the layer with layer.to(xp=..., device=...) (it holds "
                    f"{lib_name(xp)} arrays on {device})")


def _layer_inputs(query: Array, key: Array | None, value: Array | None, *, xp: ModuleType,
                  device: Any, dtype: Any, config: Any) -> tuple[Array, Array, str, str]:
    """The layer's key and value (defaulted), checked against the layer's
    namespace, device, dtype and sizes; and the arguments they came from."""
    key_src = "key" if key is not None else "value" if value is not None else "query"
    value_src = "value" if value is not None else key_src
    if key is None:
        key = query if value is None else value
    if value is None:
        value = key
    common_namespace((xp, device, _move_hint(xp, device)), query=query, key=key, value=value)
    for name, x in (("query", query), ("key", key), ("value", value)):
        require_real_floating(name, x, xp)
        if x.dtype != dtype:
            raise TypeError(
                f"{name} has dtype {dtype_name(x.dtype)} but the layer's weights are "
                f"{dtype_name(dtype)}; mha_xp does not promote silently: cast the "
                f"input to {dtype_name(dtype)}, or convert the layer with layer.to(dtype=...)"
            )
    if query.ndim not in (2, 3):
        raise ValueError(f"query must be (B, L, E) or unbatched (L, E), got shape {tuple(query.shape)}")
    batched = query.ndim == 3
    for name, x in (("key", key), ("value", value)):
        if x.ndim != query.ndim:
            raise ValueError(
                f"{name} must have the rank of query ({query.ndim}-D, "
                f"{'batched' if batched else 'unbatched'}), got shape {tuple(x.shape)}"
            )
    for name, x, size, what in (("query", query, config.embed_dim, "embed_dim"),
                                 ("key", key, config.kdim, "kdim"),
                                 ("value", value, config.vdim, "vdim")):
        if x.shape[-1] != size:
            raise ValueError(f"{name} must have {size} features ({what}) on its last axis, "
                             f"got shape {tuple(x.shape)}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"key and value must have the same batch size and length, got key "
                         f"{tuple(key.shape)} and value {tuple(value.shape)}")
    if batched and key.shape[0] != query.shape[0]:
        raise ValueError(f"query and key must have the same batch size, got query "
                         f"{tuple(query.shape)} and key {tuple(key.shape)}")
    if query.shape[-2] == 0 or key.shape[-2] == 0:
        raise ValueError("query and key must have at least one position each (L >= 1, S >= 1), "
                         f"got query {tuple(query.shape)} and key {tuple(key.shape)}")
    return key, value, key_src, value_src


def check_layer_call(
    query: Array, key: Array | None, value: Array | None, key_padding_mask: Array | None,
    mask: Array | None, bias: Array | None, chunk_size: Any, *, xp: ModuleType, device: Any,
    dtype: Any, config: Any,
) -> LayerCall:
    """Validate a call of the layer (``config`` its sizes: ``embed_dim``,
    ``kdim``, ``vdim``, ``num_heads``) and bring it to batched form."""
    key, value, key_src, value_src = _layer_inputs(query, key, value, xp=xp, device=device,
                                                   dtype=dtype, config=config)
    if key_padding_mask is not None or mask is not None or bias is not None:
        common_namespace((xp, device, _move_hint(xp, device)),
                         key_padding_mask=key_padding_mask, mask=mask, bias=bias)
    batched = query.ndim == 3
    chunk_size = check_chunk_size(chunk_size)
    L, S = query.shape[-2], key.shape[-2]
    scores_shape = ((query.shape[0],) if batched else ()) + (config.num_heads, L, S)
    labels = "(B, H, L, S)" if batched else "(H, L, S)"
    if mask is not None:
        check_mask(mask, scores_shape, xp, labels, layer=True)
    if bias is not None:
        check_bias(bias, dtype, scores_shape, xp, labels)
    if key_padding_mask is not None:
        require_bool("key_padding_mask", key_padding_mask, xp, "True marks padding keys")
        want = scores_shape[:-3] + (S,)
        if tuple(key_padding_mask.shape) != want:
            raise ValueError(
                f"key_padding_mask must have shape {'(B, S)' if batched else '(S,)'} = "
                f"{want}, got {tuple(key_padding_mask.shape)}"
            )
    if not batched:
        # Expand each distinct array once, so self-attention keeps its fused projection.
        q1 = xp.expand_dims(query, axis=0)
        k1 = q1 if key is query else xp.expand_dims(key, axis=0)
        value = k1 if value is key else q1 if value is query else xp.expand_dims(value, axis=0)
        query, key = q1, k1
        if key_padding_mask is not None:
            key_padding_mask = xp.expand_dims(key_padding_mask, axis=0)
    # An unbatched (H, L, S) mask or bias broadcasts against (1, H, L, S) as it is.
    return LayerCall(query, key, value, key_padding_mask, mask, bias, chunk_size, batched,
                     key_src, value_src)


def check_training(training: Any, dropout_seed: Any, p: float) -> tuple[float, int] | None:
    """``(p, seed)`` when a layer call applies its dropout ``p``, else None."""
    if not check_flag("training", training):
        return None
    return check_dropout(p, dropout_seed, seed_name="dropout_seed", p_name="dropout")


def check_cache_call(cache: Any, call: LayerCall, *, is_causal: bool, cross: bool,
                     training: bool, shape: tuple[int, int, int], dtype: Any,
                     rope_type: str | None = None) -> None:
    """A decoding call with a cache (``shape`` the layer's ``(num_kv_heads,
    max_length, head_dim)`` expectations but the length; ``rope_type`` its
    RoPE scaling): causal self-attention, no masks, a cache that fits the
    layer and has room."""
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"rope_scaling {rope_type!r} changes the frequencies with the "
                         f"sequence's length, which a cache's keys were rotated with before: "
                         f"decode without a cache, or use a scaling that does not depend on "
                         f"the length ('linear', 'llama3', 'yarn')")
    if training:
        raise ValueError("dropout (training=True) is not supported with a cache: "
                         "decoding is inference; call without training=True")
    if not is_causal:
        raise ValueError("decoding with a cache is causal attention: pass is_causal=True")
    if cross:
        raise ValueError("a cache is for self-attention: pass only query (key and value "
                         "come from the cache)")
    for name, given in (("mask", call.mask), ("bias", call.bias)):
        if given is not None:
            raise ValueError(f"{name} is not supported with a cache (the cache masks the "
                             f"positions not yet filled itself; mark padding with "
                             f"key_padding_mask)")
    B, L = call.query.shape[0], call.query.shape[1]
    want = (B, shape[0], cache.max_length, shape[2])
    for name, a in (("cache.key", cache.key), ("cache.value", cache.value)):
        if tuple(a.shape) != want:
            raise ValueError(f"{name} must have shape (B, num_kv_heads, max_length, head_dim)"
                             f" = {want} for this layer and query, got {tuple(a.shape)}")
        if a.dtype != dtype:
            raise TypeError(f"{name} has dtype {dtype_name(a.dtype)} but the layer's weights "
                            f"are {dtype_name(dtype)}")
    if L > cache.max_length:
        raise ValueError(f"query has {L} positions but the cache holds at most "
                         f"max_length = {cache.max_length}")
    # Where reading the filled length is free (an eager host array), an
    # overflow is an error; on GPU, lazy or traced arrays it cannot be
    # checked without a sync or a concrete value (documented on KVCache).
    if host_readable(cache.length):
        filled = max(_host_ints(cache.length), default=0)
        if filled + L > cache.max_length:
            raise ValueError(f"the cache holds {filled} of its max_length = "
                             f"{cache.max_length} positions: {L} more do not fit; make the "
                             f"cache with layer.init_cache(batch_size, max_length) for the "
                             f"longest sequence")


def format_bytes(nbytes: int) -> str:
    """A size for a message, with three significant digits: ``"512 bytes"``,
    ``"25.0 KiB"``, ``"1.50 GiB"``."""
    if nbytes < 1024:
        return f"{nbytes} bytes"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{value:.{digits}f} {unit}"


_CACHE_FIX = "make one with layer.init_cache(batch_size, max_length)"


def check_cache_arrays(key: Any, value: Any, length: Any) -> Array:
    """A :class:`KVCache`'s fields: key and value arrays of one library,
    device and real floating dtype, 4-D of one shape; ``length`` a 0-d signed
    integer array of theirs, or a Python int (returned as such an array), in
    ``[0, max_length]`` where its value can be read for free."""
    arrays = {"cache.key": key, "cache.value": value}
    given_int = isinstance(length, numbers.Integral) and not isinstance(length, bool)
    if not given_int:
        if isinstance(length, bool) or not hasattr(length, "shape"):
            raise TypeError(f"cache.length must be an integer array (0-d or (B,)) or an int, got "
                            f"{type(length).__name__} {length!r}; {_CACHE_FIX}")
        arrays["cache.length"] = length
    xp, dev = common_namespace(**arrays)
    for name, a in (("cache.key", key), ("cache.value", value)):
        require_real_floating(name, a, xp)
        if a.ndim != 4:
            raise ValueError(f"{name} must be 4-D (B, num_kv_heads, max_length, head_dim), "
                             f"got shape {tuple(a.shape)}; {_CACHE_FIX}")
    if key.dtype != value.dtype:
        raise TypeError(f"cache.key has dtype {dtype_name(key.dtype)} but cache.value has "
                        f"{dtype_name(value.dtype)}; pass both in one dtype")
    if tuple(key.shape) != tuple(value.shape):
        raise ValueError(f"cache.key and cache.value must have one shape, got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if given_int:
        _check_cache_length(int(length), key.shape[-2])
        return xp.asarray(int(length), dtype=xp.arange(1, device=dev).dtype, device=dev)
    if not xp.isdtype(length.dtype, "signed integer"):
        raise TypeError(f"cache.length must be a signed integer array (or an int), got "
                        f"dtype {dtype_name(length.dtype)}")
    if tuple(length.shape) not in ((), (key.shape[0],)):
        raise ValueError(f"cache.length must be 0-d (one length for the batch) or of shape "
                         f"(B,) = ({key.shape[0]},) (one per sequence), got shape "
                         f"{tuple(length.shape)}")
    # Read only where it is free (KVCache documents the rest).
    if host_readable(length):
        for n in _host_ints(length):
            _check_cache_length(n, key.shape[-2])
    return length


def _host_ints(x: Any) -> list[int]:
    """The values of a 0-d or 1-d integer array that :func:`host_readable` allows reading."""
    return [int(x)] if x.ndim == 0 else [int(x[i]) for i in range(x.shape[0])]


def _check_cache_length(n: int, max_length: Any) -> None:
    if n < 0 or (isinstance(max_length, numbers.Integral) and n > max_length):
        raise ValueError(f"cache.length must be in [0, max_length] = [0, {max_length}] "
                         f"(the positions filled), got {n}")


def check_cache_owner(cache: Any, owner: Any, *, xp: ModuleType, device: Any) -> None:
    """A cache passed to a layer: in its namespace and on its device, and made
    by that layer's ``init_cache`` (or by hand: ``cache.owner`` None)."""
    common_namespace((xp, device, f"{_CACHE_FIX} of this layer"), **{"cache.key": cache.key})
    if cache.owner is not None and cache.owner is not owner:
        raise ValueError(
            "cache belongs to another layer (its init_cache made it, or the cache was "
            "unpickled): it holds keys and values projected with that layer's weights; "
            "make this layer's with layer.init_cache(batch_size, max_length) "
            "(layer.to(...) and from_state_dict(...) make new layers, whose caches start "
            "afresh), or rebuild it by hand, KVCache(cache.key, cache.value, cache.length), "
            "to use it on purpose"
        )
