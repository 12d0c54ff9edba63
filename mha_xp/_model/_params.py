"""The layer's configuration, the state dict it implies, and its initialisation.

A :class:`LayerConfig` holds everything that rebuilds a layer besides its
weights, namespace, device and dtype: the sizes, the flags that decide which
parameters exist, and the options that are not parameters (RoPE, window,
ALiBi, soft-capping, dropout, ``add_zero_attn``). It is what
:func:`mha_xp.save_weights` stores beside the weights. Every option is
validated by the function of :mod:`mha_xp._checks` that validates the same
argument of the function API, so one bad value gets one error from both.

:func:`param_shapes` is the state-dict schema (torch's names, in torch's
order, and their shapes for a configuration); :func:`config_from_shapes`
reads a configuration back from a state dict's names and shapes; and
:func:`init_params` draws torch's initialisation of the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from array_api_compat import is_array_api_obj

from .._checks import (
    check_alibi,
    check_qk_norm_kind,
    check_real,
    check_scale,
    check_dropout_p,
    check_flag,
    check_positive_int,
    check_rotary_base,
    check_rotary_dim,
    check_softcap,
    check_window,
)
from .._lib._namespace import (Array, common_namespace, compute_namespace, device_of, dtype_name,
                               lib_name, require_real_floating)
from .._core._positions import standard_alibi_slopes as alibi_slopes
from ._rope import check_rope_scaling

__all__ = [
    "OPTIONS",
    "LayerConfig",
    "check_option_names",
    "check_param_arrays",
    "check_param_names",
    "check_param_shapes",
    "config_from_shapes",
    "init_params",
    "param_shapes",
    "state_dict_from_weights",
]

#: The options a state dict does not determine (they are not parameters).
OPTIONS = ("add_zero_attn", "rotary", "rotary_base", "rotary_interleaved", "rotary_dim",
           "window", "alibi", "softcap", "dropout", "scale", "qk_norm", "qk_norm_eps",
           "qk_norm_offset", "rope_scaling", "max_position_embeddings")
# The sizes a configuration derives when they are left None.
_DERIVED = ("num_kv_heads", "head_dim", "kdim", "vdim")
# Flags, each of which adds a pair of parameters.
_PAIRS = {"add_bias_kv": ("bias_k", "bias_v"), "normalize_qk": ("q_norm.weight", "k_norm.weight"),
          "qk_norm_bias": ("q_norm.bias", "k_norm.bias")}
# Parameters of their own: the attention sinks.
_SINGLES = {"sinks": "sinks"}
_PACKED = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight",
             "in_proj_bias", "out_proj.weight", "out_proj.bias")
_BIASES = ("in_proj_bias", "out_proj.bias")


def _head_dim(embed_dim: int, num_heads: int) -> int:
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), "
                         f"or pass head_dim= (the projections then have num_heads * head_dim "
                         f"rows)")
    return embed_dim // num_heads


def _sizes(raw: Mapping[str, Any]) -> dict[str, int]:
    """The validated sizes of a configuration, the derived ones filled in."""
    E = check_positive_int("embed_dim", raw["embed_dim"])
    H = check_positive_int("num_heads", raw["num_heads"])
    D = (_head_dim(E, H) if raw["head_dim"] is None
         else check_positive_int("head_dim", raw["head_dim"]))
    Hkv = H if raw["num_kv_heads"] is None else check_positive_int("num_kv_heads", raw["num_kv_heads"])
    if H % Hkv:
        raise ValueError(f"num_kv_heads ({Hkv}) must divide num_heads ({H})")
    kdim = E if raw["kdim"] is None else check_positive_int("kdim", raw["kdim"])
    vdim = E if raw["vdim"] is None else check_positive_int("vdim", raw["vdim"])
    return dict(embed_dim=E, num_heads=H, num_kv_heads=Hkv, head_dim=D, kdim=kdim, vdim=vdim)


def _normalised(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of a configuration validated and in its one normal form."""
    out: dict[str, Any] = _sizes(raw)
    H, D = out["num_heads"], out["head_dim"]
    for name in ("bias", "add_bias_kv", "add_zero_attn", "normalize_qk", "rotary",
                 "rotary_interleaved"):
        out[name] = check_flag(name, raw[name])
    out["rotary_base"] = check_rotary_base(raw["rotary_base"])
    out["rotary_dim"] = check_rotary_dim(raw["rotary_dim"], D)
    if out["rotary"] and D % 2 and out["rotary_dim"] is None:
        raise ValueError(f"rotary=True needs an even head_dim (or an even rotary_dim), got "
                         f"head_dim = {D}")
    window = check_window(raw["window"])
    # The layer's form: None for an unbounded side, and None for no bound at all.
    out["window"] = None if window is None or window == (-1, -1) else tuple(
        None if n < 0 else n for n in window)
    alibi = check_alibi(raw["alibi"], H)
    out["alibi"] = tuple(alibi_slopes(H)) if alibi is True else alibi or None
    out["softcap"] = check_softcap(raw["softcap"])
    out["dropout"] = check_dropout_p(raw["dropout"], "dropout")
    out["scale"] = None if raw["scale"] is None else check_scale(raw["scale"], D)
    for name in ("sinks", "qk_norm_bias", "qk_norm_per_head"):
        out[name] = check_flag(name, raw[name])
    out["qk_norm"] = check_qk_norm_kind(raw["qk_norm"], "qk_norm")
    out["qk_norm_eps"] = check_real("qk_norm_eps", raw["qk_norm_eps"], low=0.0,
                                    what="a non-negative finite number")
    out["qk_norm_offset"] = check_real("qk_norm_offset", raw["qk_norm_offset"],
                                       what="a finite number (1.0 for Gemma's 1 + weight)")
    for name in ("qk_norm_bias", "qk_norm_per_head"):
        if out[name] and not out["normalize_qk"]:
            raise ValueError(f"{name}=True shapes the QK normalisation's parameters: it needs "
                             f"normalize_qk=True")
    if out["qk_norm_bias"] and out["qk_norm"] == "rms":
        raise ValueError("qk_norm_bias=True is for qk_norm='layer' (a LayerNorm); an RMSNorm "
                         "has no bias")
    out["max_position_embeddings"] = (
        None if raw["max_position_embeddings"] is None
        else check_positive_int("max_position_embeddings", raw["max_position_embeddings"]))
    out["rope_scaling"] = check_rope_scaling(raw["rope_scaling"], out["rotary_dim"] or D,
                                             out["rotary_base"], out["max_position_embeddings"])
    return out


@dataclass(frozen=True)
class LayerConfig:
    """Everything that rebuilds a :class:`~mha_xp.MultiHeadAttention` but its
    weights, namespace, device and dtype; validated and normalised.

    Build one with :meth:`from_options` (the constructor's arguments) or
    :meth:`from_dict` (what :meth:`to_dict` wrote); any construction, also
    ``dataclasses.replace``, validates every field and brings it to its
    normal form, so that two configurations that build the same layer are
    equal.

    Attributes
    ----------
    embed_dim, num_heads, num_kv_heads, head_dim, kdim, vdim : int
        The sizes; ``head_dim = embed_dim // num_heads``.
    bias, add_bias_kv, normalize_qk : bool
        Which parameters exist besides the projection weights.
    add_zero_attn, rotary, rotary_interleaved : bool
        Flags that are not parameters.
    rotary_base : float
    rotary_dim : int or None
        None: all ``head_dim`` features are rotated.
    window : (int or None, int or None) or None
        None for an unbounded side (whatever negative int or None was
        given), and None altogether when both sides are unbounded.
    alibi : tuple of float or None
        One slope per query head (``alibi=True`` becomes the standard
        slopes), or None without ALiBi.
    softcap : float or None
    dropout : float
    scale : float or None
        The factor on ``Q K^T``; None: ``1 / sqrt(head_dim)``.
    qk_norm : {"layer", "rms"}
        The QK normalisation of ``normalize_qk``: a LayerNorm (mean-centred)
        or an RMSNorm.
    qk_norm_eps, qk_norm_offset : float
        Its epsilon, and the offset added to its scales (1.0 for Gemma's
        ``1 + weight``).
    qk_norm_bias, qk_norm_per_head : bool
        Whether it has biases (``q_norm.bias``, ``k_norm.bias``; LayerNorm
        only), and scales per head (``(num_heads, head_dim)`` and
        ``(num_kv_heads, head_dim)``) rather than shared ``(head_dim,)``.
    sinks : bool
        A learnable attention-sink logit per query head (parameter ``sinks``).
    rope_scaling : dict or None
        RoPE's scaling, in the form of Hugging Face's ``rope_parameters``
        (``"rope_type"`` and that scheme's keys); None: plain RoPE.
    max_position_embeddings : int or None
        The model's context length, which some scalings read.
    """

    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kdim: int
    vdim: int
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    normalize_qk: bool = False
    rotary: bool = False
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    rotary_dim: int | None = None
    window: tuple[int | None, int | None] | None = None
    alibi: tuple[float, ...] | None = None
    softcap: float | None = None
    dropout: float = 0.0
    scale: float | None = None
    qk_norm: str = "layer"
    qk_norm_eps: float = 1e-6
    qk_norm_offset: float = 0.0
    qk_norm_bias: bool = False
    qk_norm_per_head: bool = False
    sinks: bool = False
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        for name, value in _normalised(self._fields()).items():
            object.__setattr__(self, name, value)

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_options(cls, embed_dim: Any, num_heads: Any, **options: Any) -> LayerConfig:
        """Validate and normalise a layer's arguments, as the user gave them.

        Parameters
        ----------
        embed_dim, num_heads : int
            As in :class:`~mha_xp.MultiHeadAttention`.
        **options
            Any other field, as the layer's constructor takes it (``alibi``
            a bool or slopes, ``window`` with None or negative sides, ...);
            ``num_kv_heads``, ``head_dim``, ``kdim`` and ``vdim`` default to
            the sizes they derive from.

        Returns
        -------
        LayerConfig

        Raises
        ------
        TypeError, ValueError
            An unknown option, or a value that the option's validator in
            :mod:`mha_xp._checks` refuses.
        """
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unexpected option(s) {unknown}; a layer configuration has "
                            f"{[f.name for f in fields(cls)]}")
        derived: dict[str, Any] = dict.fromkeys(_DERIVED)
        return cls(embed_dim=embed_dim, num_heads=num_heads, **(derived | options))

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain Python values (ints, floats, bools, None
        and lists), ready for ``json.dumps``; :meth:`from_dict` reads it back.

        Returns
        -------
        dict
            One entry per field, in field order.
        """
        out = self._fields()
        for name in ("window", "alibi"):
            out[name] = None if out[name] is None else list(out[name])
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = {k: list(v) if isinstance(v, tuple) else v
                                   for k, v in out["rope_scaling"].items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerConfig:
        """Read a configuration written by :meth:`to_dict` (e.g. from JSON).

        Parameters
        ----------
        data : mapping
            Field names to values; ``embed_dim`` and ``num_heads`` are
            required, missing fields take their defaults.

        Returns
        -------
        LayerConfig

        Raises
        ------
        TypeError
            ``data`` is not a mapping, or a value of the wrong type.
        ValueError
            Unknown or missing keys, or a value its validator refuses.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a layer configuration must be a mapping (a JSON object) of field "
                            f"names to values, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted((k for k in data if k not in names), key=str)
        if unknown:
            raise ValueError(f"unknown layer configuration key(s) {unknown} (written by a newer "
                             f"mha_xp?); the keys are {names}")
        missing = [n for n in ("embed_dim", "num_heads") if n not in data]
        if missing:
            raise ValueError(f"a layer configuration needs {missing}, got the keys {sorted(data)}")
        return cls.from_options(**data)

    def options(self) -> dict[str, Any]:
        """The options that a state dict does not determine, by name: the
        keyword arguments of :meth:`~mha_xp.MultiHeadAttention.from_state_dict`
        that rebuild this configuration from the state dict."""
        return {name: getattr(self, name) for name in OPTIONS}

    def repr_args(self) -> str:
        """The arguments of the layer's repr: the sizes, every field that
        differs from its default (derived sizes included), then ``bias``."""
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if not self.kdim == self.vdim == self.embed_dim:
            parts += [f"kdim={self.kdim}", f"vdim={self.vdim}"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"num_kv_heads={self.num_kv_heads}")
        defaults = {f.name: f.default for f in fields(self)}
        if self.head_dim * self.num_heads != self.embed_dim:
            parts.append(f"head_dim={self.head_dim}")
        for name in ("add_bias_kv", "normalize_qk", "qk_norm_bias", "qk_norm_per_head", "sinks",
                     *OPTIONS):
            value = getattr(self, name)
            if value != defaults[name]:
                parts.append(f"{name}={value!r}")
        return ", ".join([*parts, f"bias={self.bias}"])


def check_option_names(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` as a dict, if every name is one of :data:`OPTIONS`."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unexpected option(s) {sorted(unknown)}; the layer's options are "
                        f"{sorted(OPTIONS)}")
    return dict(options)


def param_shapes(config: LayerConfig, *, packed: bool | None = None) -> dict[str, tuple[int, ...]]:
    """The state dict of a layer with ``config``: torch's names, in torch's
    order, with their shapes. ``packed``: one ``in_proj_weight`` rather than
    three projections (default: packed where the sizes allow it, as torch)."""
    E, D, H = config.embed_dim, config.head_dim, config.num_heads
    Q, F = H * D, config.num_kv_heads * D
    if packed is None:
        packed = config.kdim == config.vdim == F == Q == E
    shapes: dict[str, tuple[int, ...]] = {}
    if packed:
        shapes["in_proj_weight"] = (3 * E, E)
    else:
        shapes |= {"q_proj_weight": (Q, E), "k_proj_weight": (F, config.kdim),
                   "v_proj_weight": (F, config.vdim)}
    if config.bias:
        shapes["in_proj_bias"] = (Q + 2 * F,)
    if config.add_bias_kv:
        shapes |= {"bias_k": (1, 1, F), "bias_v": (1, 1, F)}
    shapes["out_proj.weight"] = (E, Q)
    if config.bias:
        shapes["out_proj.bias"] = (E,)
    if config.normalize_qk:
        q_shape, k_shape = ((H, D), (config.num_kv_heads, D)) if config.qk_norm_per_head else ((D,), (D,))
        shapes |= {"q_norm.weight": q_shape, "k_norm.weight": k_shape}
        if config.qk_norm_bias:
            shapes |= {"q_norm.bias": q_shape, "k_norm.bias": k_shape}
    if config.sinks:
        shapes["sinks"] = (H,)
    return shapes


def check_param_names(names: Iterable[str]) -> None:
    """The names of a torch ``nn.MultiheadAttention`` state dict (with
    mha_xp's optional ``q_norm.weight``/``k_norm.weight``), else ValueError."""
    names = set(names)
    layout = _PACKED if "in_proj_weight" in names else _SEPARATE
    has_bias = "in_proj_bias" in names or "out_proj.bias" in names
    expected = set(layout) if has_bias else set(layout) - set(_BIASES)
    for pair in _PAIRS.values():
        if all(n in names for n in pair):
            expected |= set(pair)
    expected |= names & set(_SINGLES.values())
    missing, extra = expected - names, names - expected
    if missing or extra:
        msg = "state_dict does not describe a torch.nn.MultiheadAttention:"
        if missing:
            msg += f" missing {sorted(missing)}"
        if extra:
            msg += f"{';' if missing else ''} unexpected {sorted(extra)}"
            for option, pair in _PAIRS.items():
                if extra & set(pair):
                    msg += f" ({option} needs both {pair[0]} and {pair[1]})"
        raise ValueError(msg)


def check_param_arrays(params: Mapping[str, Any], xp: Any) -> tuple[Any, Any]:
    """Every parameter an array of ``xp``, real floating, of one dtype, on one
    device; return that device and dtype."""
    for name, w in params.items():
        if not is_array_api_obj(w):
            raise TypeError(f"{name} must be an array, got {type(w).__name__}")
    params_xp, dev = common_namespace(**params)
    if params_xp is not compute_namespace(xp):
        raise TypeError(f"the weights are {lib_name(params_xp)} arrays, expected {lib_name(xp)}")
    dtype = params["out_proj.weight"].dtype
    for name, w in params.items():
        require_real_floating(name, w, xp)
        if w.dtype != dtype:
            raise TypeError(
                f"{name} has dtype {dtype_name(w.dtype)} but out_proj.weight has "
                f"{dtype_name(dtype)}; all weights must share one dtype"
            )
    return dev, dtype


def check_param_shapes(config: LayerConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The names and shapes of a state dict are those :func:`param_shapes`
    gives ``config`` (in either layout of the input projections)."""
    packed = "in_proj_weight" in shapes
    F, Q = config.num_kv_heads * config.head_dim, config.num_heads * config.head_dim
    if packed and not config.kdim == config.vdim == F == Q == config.embed_dim:
        raise ValueError(
            f"in_proj_weight packs the three input projections, which needs kdim = vdim = "
            f"num_kv_heads * head_dim = num_heads * head_dim = embed_dim = "
            f"{config.embed_dim}, but the layer has kdim={config.kdim}, vdim={config.vdim}, "
            f"num_kv_heads={config.num_kv_heads}, head_dim={config.head_dim}: give "
            f"q_proj_weight, k_proj_weight and v_proj_weight instead"
        )
    expected = param_shapes(config, packed=packed)
    missing, extra = set(expected) - set(shapes), set(shapes) - set(expected)
    if missing or extra:
        raise ValueError(f"the state dict does not match the layer configuration "
                         f"({config.repr_args()}): missing {sorted(missing)}, unexpected "
                         f"{sorted(extra)}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"{name} must have shape {shape} for embed_dim={config.embed_dim}, "
                             f"got {tuple(shapes[name])}")


def config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]], num_heads: Any, *, num_kv_heads: Any = None,
    **options: Any,
) -> LayerConfig:
    """The configuration of a state dict with these names and shapes and
    ``num_heads`` heads (which a state dict does not record), with the
    non-parameter ``options``; ``num_kv_heads``, when given, must agree
    with the key projection."""
    check_param_names(shapes)
    out_w = tuple(shapes["out_proj.weight"])
    H = check_positive_int("num_heads", num_heads)
    if len(out_w) != 2 or out_w[1] == 0:
        raise ValueError(f"out_proj.weight must have shape (embed_dim, num_heads * head_dim), "
                         f"got {out_w}")
    if out_w[1] % H:
        raise ValueError(f"the {out_w[1]} columns of out_proj.weight (num_heads * head_dim; "
                         f"embed_dim in a torch layer) must be divisible by num_heads ({H})")
    E, D = out_w[0], out_w[1] // H
    if "in_proj_weight" in shapes:
        kv_dim = kdim = vdim = E
    else:
        kw, vw = tuple(shapes["k_proj_weight"]), tuple(shapes["v_proj_weight"])
        if len(kw) != 2 or kw[0] == 0 or kw[0] % D or H % max(1, kw[0] // D):
            raise ValueError(
                f"k_proj_weight must have shape (num_kv_heads * head_dim, kdim) with "
                f"head_dim = {D} and num_kv_heads dividing num_heads = {H}, got {kw}"
            )
        if len(vw) != 2:
            raise ValueError(f"v_proj_weight must have shape (num_kv_heads * head_dim, vdim), "
                             f"got {vw}")
        (kv_dim, kdim), vdim = kw, vw[-1]
    if num_kv_heads is not None and check_positive_int("num_kv_heads", num_kv_heads) * D != kv_dim:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} does not match the key projection, which has "
            f"{kv_dim} rows = {kv_dim // D} heads of head_dim {D}"
        )
    config = LayerConfig.from_options(
        E, H, num_kv_heads=kv_dim // D, kdim=kdim, vdim=vdim,
        bias="in_proj_bias" in shapes, add_bias_kv="bias_k" in shapes,
        normalize_qk="q_norm.weight" in shapes, qk_norm_bias="q_norm.bias" in shapes,
        qk_norm_per_head=len(shapes.get("q_norm.weight", ())) == 2, sinks="sinks" in shapes,
        head_dim=D, **check_option_names(options))
    check_param_shapes(config, shapes)
    return config


def init_params(config: LayerConfig, seed: Any) -> dict[str, np.ndarray]:
    """torch's initialisation, drawn in float64 on the host so that one seed
    gives the same weights on every backend: Xavier-uniform in-projections,
    ``U(-1/sqrt(E), 1/sqrt(E))`` output projection (torch's Linear default),
    zero biases, Xavier-normal ``bias_k``/``bias_v``; QK-norm scales are ones
    (Flax's ``LayerNorm`` default). In :func:`param_shapes` order."""
    rng = np.random.default_rng(seed)

    def xavier(fan_out: int, fan_in: int) -> np.ndarray:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, size=(fan_out, fan_in))

    shapes = param_shapes(config)
    E, Q = config.embed_dim, config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    params: dict[str, Array] = {}
    # The draws keep torch's order (in-projections, bias_k, bias_v, output
    # projection), so that a seed's weights never change.
    if "in_proj_weight" in shapes:
        params["in_proj_weight"] = xavier(3 * E, E)
    else:
        params["q_proj_weight"] = xavier(Q, E)
        params["k_proj_weight"] = xavier(kv_dim, config.kdim)
        params["v_proj_weight"] = xavier(kv_dim, config.vdim)
    if config.bias:
        params["in_proj_bias"] = np.zeros(Q + 2 * kv_dim)
    if config.add_bias_kv:
        # torch: xavier_normal_ on a (1, 1, kv_dim) tensor, fan_in = fan_out = kv_dim
        std = math.sqrt(1.0 / kv_dim)
        params["bias_k"] = rng.normal(0.0, std, size=(1, 1, kv_dim))
        params["bias_v"] = rng.normal(0.0, std, size=(1, 1, kv_dim))
    bound = 1.0 / math.sqrt(Q)  # torch's Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    params["out_proj.weight"] = rng.uniform(-bound, bound, size=(E, Q))
    if config.bias:
        params["out_proj.bias"] = np.zeros(E)
    # QK-norm scales are ones (Flax's and Hugging Face's default; zeros with
    # Gemma's offset 1, whose scale is 1 + weight), biases and sinks zeros.
    ones = 1.0 - config.qk_norm_offset
    for name in ("q_norm.weight", "k_norm.weight", "q_norm.bias", "k_norm.bias", "sinks"):
        if name in shapes:
            params[name] = np.full(shapes[name], ones if name.endswith("weight") else 0.0)
    return params


def state_dict_from_weights(w: Mapping[str, Array], b: Mapping[str, Array | None],
                            num_heads: Any, xp: Any) -> dict[str, Array]:
    """The torch-named parameters of
    :meth:`~mha_xp.MultiHeadAttention.from_weights`' projection weights ``w``
    (``q_weight``, ``k_weight``, ``v_weight``, ``out_weight``: 2-D, in the
    layer's namespace) and biases ``b`` (1-D or None; a missing one is zero
    when any is given): one packed ``in_proj_weight`` when all projections
    are ``(E, E)``."""
    E, Q = w["out_weight"].shape
    kv_dim = w["k_weight"].shape[0]
    H = num_heads if isinstance(num_heads, int) and not isinstance(num_heads, bool) else 0
    if kv_dim != Q and H > 0 and Q % H == 0:
        D = Q // H
        if kv_dim == 0 or kv_dim % D or H % (kv_dim // D):
            raise ValueError(
                f"k_weight must have {Q} rows (out_features = num_heads * head_dim, from "
                f"out_weight's columns), or num_kv_heads * head_dim rows for a num_kv_heads "
                f"dividing num_heads = {H} (head_dim = {D}), got shape "
                f"{tuple(w['k_weight'].shape)}"
            )
    for name, rows, what in (("q_weight", Q, "num_heads * head_dim, from out_weight's columns"),
                             ("k_weight", kv_dim, "from k_weight"),
                             ("v_weight", kv_dim, "num_kv_heads * head_dim, from k_weight")):
        if w[name].shape[0] != rows:
            raise ValueError(
                f"{name} must have {rows} rows (out_features = {what}), "
                f"got shape {tuple(w[name].shape)}"
            )
    params: dict[str, Array] = {}
    same = (kv_dim == E == Q and w["k_weight"].shape[1] == E and w["v_weight"].shape[1] == E
            and w["q_weight"].shape[1] == E)
    if same:
        params["in_proj_weight"] = xp.concat(
            [w["q_weight"], w["k_weight"], w["v_weight"]], axis=0
        )
    else:
        params |= {"q_proj_weight": w["q_weight"], "k_proj_weight": w["k_weight"],
                   "v_proj_weight": w["v_weight"]}
    params["out_proj.weight"] = w["out_weight"]
    if any(a is not None for a in b.values()):
        sizes = {"q_bias": Q, "k_bias": kv_dim, "v_bias": kv_dim, "out_bias": E}
        for name, a in b.items():
            if a is not None and a.shape != (sizes[name],):
                raise ValueError(f"{name} must have shape ({sizes[name]},), got {tuple(a.shape)}")
        qb, kb, vb, ob = (
            xp.zeros((sizes[n],), dtype=w["out_weight"].dtype,
                           device=device_of(w["out_weight"])) if a is None else a
            for n, a in b.items())
        params["in_proj_bias"] = xp.concat([qb, kb, vb], axis=0)
        params["out_proj.bias"] = ob
    return params
