"""RoPE frequencies with the scaling schemes of long-context models, and their tables.

:func:`rope_frequencies` reproduces Hugging Face transformers'
``ROPE_INIT_FUNCTIONS`` (``modeling_rope_utils.py``: ``default``, ``linear``,
``dynamic``, ``llama3``, ``yarn``, ``longrope``) formula for formula, in
float64 on the host; :func:`apply_rotary` (``inv_freq=``, ``attention_factor=``) turns positions into the cosines and
sines that rotate queries and keys, scaled by the scheme's attention factor as
Hugging Face's rotary modules scale them.

The validators of the scaling dictionary live here until they move to
``_checks.py``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..typing import Namespace

from .._checks import check_dtype, check_positive_int, check_rotary_base
from .._lib._namespace import (
    Array,
    common_namespace,
    compute_dtype,
    compute_namespace,
    dtype_name,
    lib_name,
    normalize_namespace,
    require_real_floating,
)

__all__ = ["ROPE_TYPES", "check_rope_scaling", "rope_frequencies", "rope_tables"]

DEFAULT_BASE = 10000.0  # Hugging Face's ``default_theta``

# Keys every scheme accepts: the type (``type`` is its old name), the base, and
# the share of the head that is rotated (the caller's ``dim`` already says it).
_COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})

# Per scheme: (required keys, optional keys), as Hugging Face validates them.
_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "llama3": (frozenset({"factor", "low_freq_factor", "high_freq_factor"}),
               frozenset({"original_max_position_embeddings"})),
    "yarn": (frozenset(), frozenset({"factor", "original_max_position_embeddings",
                                      "attention_factor", "beta_fast", "beta_slow", "mscale",
                                      "mscale_all_dim", "truncate"})),
    "longrope": (frozenset({"short_factor", "long_factor"}),
                 frozenset({"factor", "original_max_position_embeddings", "attention_factor"})),
}
ROPE_TYPES = tuple(_KEYS)


# --- validators -------------------------------------------------------------

def _where(rope_type: str, key: str) -> str:
    return f"scaling[{key!r}] (rope_type {rope_type!r})"


def _real(rope_type: str, key: str, value: Any, *, positive: bool = True,
          minimum: float | None = None) -> float:
    """A finite real number from the dictionary, as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{_where(rope_type, key)} must be a real number, got {type(value).__name__} {value!r}"
        )
    v = float(value)  # drops NumPy scalars, which would up-cast float32 (NEP 50)
    if not math.isfinite(v) or (positive and v <= 0.0) or (minimum is not None and v < minimum):
        want = (f"a finite number >= {minimum:g}" if minimum is not None
                else "a positive finite number" if positive else "a finite number")
        raise ValueError(f"{_where(rope_type, key)} must be {want}, got {value!r}")
    return v


def _factor(rope_type: str, value: Any) -> float:
    # Hugging Face's validators ask for a factor >= 1 (they only warn otherwise).
    return _real(rope_type, "factor", value, minimum=1.0)


def _int(rope_type: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{_where(rope_type, key)} must be a positive int, got {type(value).__name__} {value!r}"
        )
    if value <= 0:
        raise ValueError(f"{_where(rope_type, key)} must be a positive int, got {value}")
    return int(value)


def _optional_int(name: str, value: Any) -> int | None:
    return None if value is None else check_positive_int(name, value)


def _original_max(rope_type: str, params: Mapping[str, Any], max_pos: int | None) -> int:
    """``original_max_position_embeddings``; Hugging Face fills a missing one
    with the config's ``max_position_embeddings``."""
    key = "original_max_position_embeddings"
    if params.get(key) is not None:
        return _int(rope_type, key, params[key])
    if max_pos is None:
        raise ValueError(
            f"rope_type {rope_type!r} needs scaling[{key!r}] (the context length of "
            f"pre-training) or max_position_embeddings= (which Hugging Face uses in its place)"
        )
    return max_pos


def _check_keys(rope_type: str, params: Mapping[str, Any]) -> None:
    required, optional = _KEYS[rope_type]
    received = set(params)
    missing = sorted(required - received)
    if missing:
        raise ValueError(
            f"scaling of rope_type {rope_type!r} must have the keys {sorted(required)}; "
            f"missing: {missing}"
        )
    unknown = sorted(received - required - optional - _COMMON_KEYS)
    if unknown:
        allowed = sorted(required | optional | {"rope_type", "rope_theta"})
        raise ValueError(
            f"scaling of rope_type {rope_type!r} has unknown keys {unknown}; it takes {allowed} "
            f"(a misspelt key would otherwise be ignored silently)"
        )


def _check_scaling(scaling: Any) -> tuple[str, Mapping[str, Any]]:
    """``(rope_type, parameters)`` from None, a scheme's name or a dictionary in
    Hugging Face's ``rope_scaling`` / ``rope_parameters`` form."""
    if scaling is None:
        return "default", {}
    if isinstance(scaling, str):
        scaling = {"rope_type": scaling}
    if not isinstance(scaling, Mapping):
        raise TypeError(
            f"scaling must be None, a rope_type name or a dict such as "
            f"{{'rope_type': 'linear', 'factor': 2.0}}, got {type(scaling).__name__}"
        )
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in _KEYS:
        raise ValueError(f"scaling['rope_type'] must be one of {list(ROPE_TYPES)}, got {rope_type!r}")
    if "type" in scaling and "rope_type" in scaling and scaling["type"] != rope_type:
        raise ValueError(
            f"scaling['type'] ({scaling['type']!r}, the old name of 'rope_type') differs from "
            f"scaling['rope_type'] ({rope_type!r}): give one of them"
        )
    _check_keys(rope_type, scaling)
    return rope_type, scaling


def _check_base(base: Any, params: Mapping[str, Any]) -> float:
    theta = params.get("rope_theta")
    if base is None:
        return DEFAULT_BASE if theta is None else check_rotary_base(theta, "scaling['rope_theta']")
    base = check_rotary_base(base, "base")
    if theta is not None and check_rotary_base(theta, "scaling['rope_theta']") != base:
        raise ValueError(
            f"base={base} differs from scaling['rope_theta']={theta}: give one of them"
        )
    return base


def _check_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be a positive even int, got {type(dim).__name__} {dim!r}")
    if dim <= 0 or dim % 2:
        raise ValueError(
            f"dim (the number of rotated features) must be a positive even int, got {dim}"
        )
    return int(dim)


# --- the schemes, each a function of Python floats --------------------------
# Each returns (inv_freq as a list of dim // 2 floats, attention factor) and
# keeps Hugging Face's order of operations, so that the results agree to the
# rounding of a pow or log.

def _default_freqs(dim: int, base: float) -> list[float]:
    # 1 / base ** (2i / dim): Hugging Face's form (not base ** (-2i / dim)).
    return [1.0 / (base ** (float(i) / dim)) for i in range(0, dim, 2)]


def _linear(dim: int, base: float, p: Mapping[str, Any], seq_len: int | None,
            max_pos: int | None) -> tuple[list[float], float]:
    factor = _factor("linear", p["factor"])
    return [f / factor for f in _default_freqs(dim, base)], 1.0


def _dynamic(dim: int, base: float, p: Mapping[str, Any], seq_len: int | None,
             max_pos: int | None) -> tuple[list[float], float]:
    factor = _factor("dynamic", p["factor"])
    if max_pos is None:
        raise ValueError(
            "rope_type 'dynamic' needs max_position_embeddings= (the config's "
            "max_position_embeddings, beyond which the base grows with seq_len)"
        )
    if dim == 2:
        raise ValueError("rope_type 'dynamic' needs dim >= 4 (its exponent is dim / (dim - 2))")
    seq = max_pos if seq_len is None else max(seq_len, max_pos)
    base = base * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _default_freqs(dim, base), 1.0


def _llama3(dim: int, base: float, p: Mapping[str, Any], seq_len: int | None,
            max_pos: int | None) -> tuple[list[float], float]:
    factor = _factor("llama3", p["factor"])
    low = _real("llama3", "low_freq_factor", p["low_freq_factor"])
    high = _real("llama3", "high_freq_factor", p["high_freq_factor"])
    if high <= low:
        raise ValueError(
            f"scaling['high_freq_factor'] ({high}) must be greater than "
            f"scaling['low_freq_factor'] ({low}) for rope_type 'llama3'"
        )
    old = _original_max("llama3", p, max_pos)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for inv in _default_freqs(dim, base):
        wavelen = 2 * math.pi / inv
        scaled = inv / factor if wavelen > low_wavelen else inv
        if not (wavelen < high_wavelen) and not (wavelen > low_wavelen):
            smooth = (old / wavelen - low) / (high - low)
            scaled = (1 - smooth) * scaled / factor + smooth * scaled
        out.append(scaled)
    return out, 1.0


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_factor(p: Mapping[str, Any], factor: float) -> float:
    if p.get("attention_factor") is not None:
        return _real("yarn", "attention_factor", p["attention_factor"])
    ms = p.get("mscale")
    ms_all = p.get("mscale_all_dim")
    ms = None if ms is None else _real("yarn", "mscale", ms, positive=False)
    ms_all = None if ms_all is None else _real("yarn", "mscale_all_dim", ms_all, positive=False)
    if ms and ms_all:  # Hugging Face's truth test: a zero counts as absent
        return float(_mscale(factor, ms) / _mscale(factor, ms_all))
    return _mscale(factor)


def _yarn_ramp(p: Mapping[str, Any], dim: int, base: float, old: int) -> list[float]:
    """The share of each frequency kept unscaled (1: extrapolated, 0: interpolated)."""
    # Hugging Face's "or": None and 0 both take the paper's defaults.
    fast = _real("yarn", "beta_fast", p.get("beta_fast") or 32)
    slow = _real("yarn", "beta_slow", p.get("beta_slow") or 1)
    if fast < slow:
        raise ValueError(
            f"scaling['beta_fast'] ({fast:g}) must not be less than scaling['beta_slow'] "
            f"({slow:g}) for rope_type 'yarn'"
        )
    # Hugging Face reads p.get("truncate", True) and tests its truth, so an
    # explicit None (JSON null) does not truncate.
    truncate = p.get("truncate", True)
    if truncate is not None and not isinstance(truncate, bool):
        raise TypeError(f"{_where('yarn', 'truncate')} must be a bool, got {truncate!r}")

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(fast), correction_dim(slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # Hugging Face's guard against a zero-width ramp
    return [1 - min(max((i - lo) / (hi - lo), 0.0), 1.0) for i in range(dim // 2)]


def _context_factor(rope_type: str, p: Mapping[str, Any], max_pos: int | None,
                    ) -> tuple[int, float]:
    """``(original_max_position_embeddings, factor)`` of YaRN and LongRoPE; a
    missing factor is ``max_position_embeddings / original``, as Hugging
    Face fills it."""
    old = _original_max(rope_type, p, max_pos)
    if p.get("factor") is not None:
        return old, _factor(rope_type, p["factor"])
    if max_pos is None:
        raise ValueError(
            f"rope_type {rope_type!r} needs scaling['factor'] or max_position_embeddings= "
            f"(Hugging Face then takes max_position_embeddings / original_max_position_embeddings)"
        )
    return old, max_pos / old


def _yarn(dim: int, base: float, p: Mapping[str, Any], seq_len: int | None,
          max_pos: int | None) -> tuple[list[float], float]:
    old, factor = _context_factor("yarn", p, max_pos)
    attention_factor = _yarn_attention_factor(p, factor)
    keep = _yarn_ramp(p, dim, base, old)
    out = []
    for i, k in zip(range(0, dim, 2), keep):
        pos_freq = base ** (float(i) / dim)
        out.append((1.0 / (factor * pos_freq)) * (1 - k) + (1.0 / pos_freq) * k)
    return out, attention_factor


def _factors(key: str, value: Any, half: int) -> list[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{_where('longrope', key)} must be a list of {half} numbers, got {type(value).__name__}"
        )
    if len(value) != half:
        raise ValueError(
            f"{_where('longrope', key)} must have dim // 2 = {half} entries, got {len(value)}"
        )
    return [_real("longrope", f"{key}[{i}]", v) for i, v in enumerate(value)]


def _longrope(dim: int, base: float, p: Mapping[str, Any], seq_len: int | None,
              max_pos: int | None) -> tuple[list[float], float]:
    half = dim // 2
    short, long = _factors("short_factor", p["short_factor"], half), _factors(
        "long_factor", p["long_factor"], half)
    old, factor = _context_factor("longrope", p, max_pos)
    if p.get("attention_factor") is not None:
        attention_factor = _real("longrope", "attention_factor", p["attention_factor"])
    elif factor <= 1.0:
        attention_factor = 1.0
    else:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(old))
    ext = long if seq_len is not None and seq_len > old else short
    return [1.0 / (e * base ** (float(i) / dim)) for e, i in zip(ext, range(0, dim, 2))], \
        attention_factor


_SCHEMES: dict[str, Callable[..., tuple[list[float], float]]] = {
    "linear": _linear, "dynamic": _dynamic, "llama3": _llama3, "yarn": _yarn,
    "longrope": _longrope,
}


def rope_frequencies(
    dim: int,
    base: float | None = None,
    *,
    scaling: Mapping[str, Any] | str | None = None,
    seq_len: int | None = None,
    max_position_embeddings: int | None = None,
    xp: Namespace | None = None,
    device: Any = None,
    dtype: Any = None,
) -> tuple[Array, float]:
    """Compute RoPE's inverse frequencies and attention factor, with Hugging Face's scaling.

    Feature pair ``p`` of ``dim / 2`` turns by ``position * inv_freq[p]``;
    unscaled, ``inv_freq[p] = 1 / base ** (2 p / dim)``. The schemes of
    long-context models change these frequencies, and YaRN and LongRoPE also
    scale the cosines and sines by an attention factor (pass both to
    :func:`apply_rotary` (``inv_freq=``, ``attention_factor=``)).

    Parameters
    ----------
    dim : int
        The number of rotated features, even: the head dimension, or
        ``int(head_dim * partial_rotary_factor)`` for a partial rotary.
    base : float, optional
        RoPE's base, ``rope_theta``; by default ``scaling["rope_theta"]``,
        else 10000.0. Giving both with different values is an error.
    scaling : dict or str, optional
        None or ``"default"`` for plain RoPE, or a dictionary in the form of a
        Hugging Face config's ``rope_parameters`` (formerly ``rope_scaling``),
        whose ``"rope_type"`` (or ``"type"``) is one of:

        ``"linear"``
            ``factor``: every frequency divided by it (position interpolation;
            Gemma 3's global layers).
        ``"dynamic"``
            ``factor``: NTK-aware; the base grows once ``seq_len`` passes
            ``max_position_embeddings``.
        ``"llama3"``
            ``factor``, ``low_freq_factor``, ``high_freq_factor``,
            ``original_max_position_embeddings`` (Llama 3.1 and later).
        ``"yarn"``
            ``factor``, ``original_max_position_embeddings`` and optionally
            ``beta_fast`` (32), ``beta_slow`` (1), ``mscale``,
            ``mscale_all_dim``, ``attention_factor``, ``truncate`` (True)
            (gpt-oss, Qwen's long-context variants, DeepSeek).
        ``"longrope"``
            ``short_factor``, ``long_factor`` (``dim // 2`` numbers each),
            ``original_max_position_embeddings`` and optionally ``factor``,
            ``attention_factor`` (Phi-3).

        ``rope_theta`` and ``partial_rotary_factor`` may be present (the
        latter is ignored: ``dim`` says how many features turn); any other
        key is an error, so that a misspelt one is not ignored.
    seq_len : int, optional
        The length of the sequence being computed (Hugging Face's
        ``max(position_ids) + 1``): ``"dynamic"`` grows its base with it and
        ``"longrope"`` takes its long factors when it exceeds
        ``original_max_position_embeddings``. None: as at initialisation.
    max_position_embeddings : int, optional
        The config's ``max_position_embeddings``: needed by ``"dynamic"``,
        and in place of a missing ``original_max_position_embeddings`` or
        (YaRN, LongRoPE) ``factor``, as Hugging Face fills them in.
    xp : module, optional
        The array namespace of the result (``numpy``, ``torch``, ...);
        default NumPy.
    device : device, optional
        The device of the result (the namespace's default when None).
    dtype : dtype, optional
        A real floating dtype of ``xp``; default float64.

    Returns
    -------
    inv_freq : array
        Shape ``(dim // 2,)``, computed in float64 on the host and rounded
        once to ``dtype``.
    attention_factor : float
        The factor Hugging Face multiplies the cosines and sines by (1.0 but
        for YaRN and LongRoPE).

    Raises
    ------
    TypeError
        If an argument or a value of ``scaling`` has the wrong type.
    ValueError
        If a value is out of range, a key is missing or unknown, or a needed
        argument (``max_position_embeddings``) is absent.

    Notes
    -----
    Hugging Face computes these in float32 (``torch.float``); in float64 the
    two agree to a few units in the last place. Its ``"dynamic"`` module is
    stateful: it keeps the frequencies of the longest sequence seen beyond
    ``max_position_embeddings`` until a shorter-than-original one resets
    them, so to reproduce a run pass the longest ``seq_len`` so far.

    Examples
    --------
    >>> import numpy as np
    >>> from mha_xp import rope_frequencies
    >>> inv, af = rope_frequencies(8, 10000.0)
    >>> [round(float(f), 6) for f in inv], af
    ([1.0, 0.1, 0.01, 0.001], 1.0)
    >>> inv, af = rope_frequencies(8, 10000.0, scaling={"rope_type": "linear", "factor": 4.0})
    >>> [round(float(f), 6) for f in inv], af
    ([0.25, 0.025, 0.0025, 0.00025], 1.0)
    """
    ns = compute_namespace(normalize_namespace(np if xp is None else xp))
    dim = _check_dim(dim)
    rope_type, params = _check_scaling(scaling)
    base = _check_base(base, params)
    seq_len = _optional_int("seq_len", seq_len)
    max_pos = _optional_int("max_position_embeddings", max_position_embeddings)
    dtype = ns.float64 if dtype is None else check_dtype(dtype, ns, lib_name(ns))
    if rope_type == "default":
        freqs, attention_factor = _default_freqs(dim, base), 1.0
    else:
        freqs, attention_factor = _SCHEMES[rope_type](dim, base, params, seq_len, max_pos)
    return ns.asarray(freqs, dtype=dtype, device=device), float(attention_factor)


def check_rope_scaling(scaling: Any, dim: int, base: float,
                       max_position_embeddings: int | None) -> dict[str, Any] | None:
    """A layer's ``rope_scaling`` in normal form: None for plain RoPE, else a
    dict with ``"rope_type"`` and the scheme's keys (lists as tuples, no
    ``rope_theta``, which must then equal the layer's ``base``), checked by
    computing the frequencies once, so that every error appears when the
    layer is made rather than at its first call."""
    rope_type, params = _check_scaling(scaling)
    _check_base(base, params)  # a rope_theta in the dict must be the layer's rotary_base
    if rope_type == "default":
        return None
    rope_frequencies(dim, base, scaling=params, max_position_embeddings=max_position_embeddings,
                  xp=np)
    out: dict[str, Any] = {"rope_type": rope_type}
    out |= {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")}
    return out


def _check_tables(positions: Array, inv_freq: Array, attention_factor: Any,
                  xp: ModuleType | None) -> tuple[ModuleType, float]:
    ns, _ = common_namespace(positions=positions, inv_freq=inv_freq)
    xp = ns if xp is None else compute_namespace(normalize_namespace(xp))
    if not (xp.isdtype(positions.dtype, "integral") or xp.isdtype(positions.dtype, "real floating")):
        raise TypeError(
            f"positions must be an integer or real floating array, got dtype "
            f"{dtype_name(positions.dtype)}"
        )
    require_real_floating("inv_freq", inv_freq, xp)
    if inv_freq.ndim != 1:
        raise ValueError(
            f"inv_freq must be 1-d, (dim // 2,), got shape {tuple(inv_freq.shape)}"
        )
    if isinstance(attention_factor, bool) or not isinstance(attention_factor, numbers.Real):
        raise TypeError(
            f"attention_factor must be a positive Python float, got "
            f"{type(attention_factor).__name__} {attention_factor!r}"
        )
    af = float(attention_factor)  # a NumPy scalar would up-cast float32 (NEP 50)
    if not (math.isfinite(af) and af > 0.0):
        raise ValueError(f"attention_factor must be a positive finite number, got {attention_factor}")
    return xp, af


def rope_tables(
    positions: Array,
    inv_freq: Array,
    attention_factor: float = 1.0,
    *,
    xp: ModuleType | None = None,
    dtype: Any = None,
) -> tuple[Array, Array]:
    """Compute the cosines and sines of RoPE's angles ``positions * inv_freq``, scaled.

    Parameters
    ----------
    positions : array
        Integer or real floating, any shape: ``(L,)``, or ``(B, L)`` with a
        row of positions per sequence (left-padded prompts in a batch), or
        fractional positions.
    inv_freq : array
        ``(dim // 2,)``, real floating, from :func:`rope_frequencies` or the
        caller; of ``positions``' library and device.
    attention_factor : float, default 1.0
        Multiplies both tables, as Hugging Face's rotary modules do (their
        ``attention_scaling``); from :func:`rope_frequencies`.
    xp : module, optional
        The array namespace; inferred from the arrays by default.
    dtype : dtype, optional
        The tables' real floating dtype; default ``inv_freq``'s. 16-bit
        dtypes are computed in float32 and rounded once.

    Returns
    -------
    cos : array
        ``attention_factor * cos(positions * inv_freq)``, of shape
        ``positions.shape + (dim // 2,)``: one entry per feature pair.
        Hugging Face's tables repeat them, ``concat((cos, cos), axis=-1)``,
        for its ``rotate_half`` layout.
    sin : array
        Likewise with the sine.

    Raises
    ------
    TypeError
        If an array has the wrong dtype or the arrays come from different
        libraries, or ``attention_factor`` is not a real number.
    ValueError
        If ``inv_freq`` is not 1-d, ``attention_factor`` not positive and
        finite, or the arrays are on different devices.

    Notes
    -----
    The angle is rounded once to the compute dtype, so its absolute error
    grows with the position (about ``m * 6e-8`` in float32, as in Hugging
    Face's float32 tables); integer positions beyond ``2**24`` are not exact
    in float32.

    Examples
    --------
    >>> import numpy as np
    >>> inv, af = rope_frequencies(4, 100.0, xp=np)
    >>> cos, sin = rope_tables(np.arange(3), inv, af)
    >>> cos.shape, np.round(sin[2], 4)
    ((3, 2), array([0.9093, 0.1987]))
    """
    xp, af = _check_tables(positions, inv_freq, attention_factor, xp)
    dtype = inv_freq.dtype if dtype is None else check_dtype(dtype, xp, lib_name(xp))
    ct = compute_dtype(dtype, xp)
    angle = xp.astype(positions, ct)[..., None] * xp.astype(inv_freq, ct)
    cos, sin = xp.cos(angle), xp.sin(angle)
    if af != 1.0:
        cos, sin = cos * af, sin * af
    return xp.astype(cos, dtype), xp.astype(sin, dtype)
