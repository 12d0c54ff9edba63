"""The multi-head attention layer: parameters, projections, head split and merge."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device as device_of, is_array_api_obj

from ._attention import attend, attend_backward
from ._checks import (
    check_bias,
    check_chunk_size,
    check_dtype,
    check_flag,
    check_grad,
    check_mask,
    check_positive_int,
    check_seed,
)
from ._lib._namespace import (
    Array,
    common_namespace,
    convert,
    dtype_name,
    lib_name,
    normalize_namespace,
    require_bool,
    require_real_floating,
)

__all__ = ["MultiHeadAttention"]

_PACKED = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_SEPARATE = (
    "q_proj_weight", "k_proj_weight", "v_proj_weight",
    "in_proj_bias", "out_proj.weight", "out_proj.bias",
)
_BIASES = ("in_proj_bias", "out_proj.bias")


def _init_params(
    embed_dim: int, kdim: int, vdim: int, bias: bool, seed: Any
) -> dict[str, np.ndarray]:
    """torch's initialisation, drawn in float64 on the host so that one seed
    gives the same weights on every backend: Xavier-uniform in-projections,
    ``U(-1/sqrt(E), 1/sqrt(E))`` output projection (torch's Linear default),
    zero biases."""
    rng = np.random.default_rng(seed)

    def xavier(fan_out: int, fan_in: int) -> np.ndarray:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, size=(fan_out, fan_in))

    E = embed_dim
    params: dict[str, np.ndarray] = {}
    if kdim == E and vdim == E:
        params["in_proj_weight"] = xavier(3 * E, E)
    else:
        params["q_proj_weight"] = xavier(E, E)
        params["k_proj_weight"] = xavier(E, kdim)
        params["v_proj_weight"] = xavier(E, vdim)
    bound = 1.0 / math.sqrt(E)
    params["out_proj.weight"] = rng.uniform(-bound, bound, size=(E, E))
    if bias:
        params["in_proj_bias"] = np.zeros(3 * E)
        params["out_proj.bias"] = np.zeros(E)
    return params


def _linear(x: Array, weight: Array, bias: Array | None, xp: ModuleType) -> Array:
    """``x @ weight.T + bias`` over the last axis, as one 2-D matmul."""
    lead = x.shape[:-1]
    y = xp.matmul(xp.reshape(x, (-1, x.shape[-1])), xp.matrix_transpose(weight))
    if bias is not None:
        y = y + bias
    return xp.reshape(y, (*lead, weight.shape[0]))


def _split_heads(x: Array, num_heads: int, xp: ModuleType) -> Array:
    """``(B, L, H*D)`` to ``(B, H, L, D)``."""
    B, L, E = x.shape
    return xp.permute_dims(xp.reshape(x, (B, L, num_heads, E // num_heads)), (0, 2, 1, 3))


@dataclass(frozen=True)
class _Call:
    """A validated call, in batched form; ``*_src`` name the argument each of
    key and value came from (they default to one another and to query)."""

    query: Array
    key: Array
    value: Array
    key_padding_mask: Array | None
    mask: Array | None
    bias: Array | None
    chunk_size: tuple[int, int] | None
    batched: bool
    key_src: str
    value_src: str


class MultiHeadAttention:
    """Multi-head attention ("Attention Is All You Need") on any array API library.

    Queries, keys and values pass their own linear projections, are split into
    ``num_heads`` heads of size ``embed_dim // num_heads``, attend with scaled
    dot-product attention on every head at once, are concatenated back to
    ``embed_dim`` and pass the output projection ``W_O``.

    The weights live in one namespace, on one device, with one dtype; inputs
    must match all three (nothing is converted, moved or promoted
    silently). Calling the layer never changes it, so one layer may be shared
    between threads.

    Parameters
    ----------
    embed_dim : int
        Model width ``E`` of queries and outputs.
    num_heads : int
        Number of heads ``H``; must divide ``embed_dim``.
    kdim, vdim : int, optional
        Feature sizes of keys and values; default ``embed_dim``.
    bias : bool, default True
        Whether the projections have biases.
    xp : module, optional
        Array namespace of the weights (``numpy``, ``cupy``, ``torch``,
        ``array_api_strict``, ...); default NumPy.
    device : optional
        Device of the weights; default the namespace's default device.
    dtype : optional
        Floating dtype of the weights; default the namespace's default real
        floating dtype on that device (float64 for NumPy and CuPy, float32 for
        torch).
    seed : int or numpy.random.Generator, optional
        Seed of the initialisation (torch's scheme: Xavier-uniform
        in-projections, ``U(-1/sqrt(E), 1/sqrt(E))`` output projection, zero
        biases). The weights are drawn in float64 on the host, then cast, so
        one seed gives the same weights on every backend.

    Attributes
    ----------
    embed_dim, num_heads, head_dim, kdim, vdim : int
        The layer's sizes.
    xp : module
        The weights' (array-API-compatible) namespace.
    device, dtype
        The weights' device and dtype.

    See Also
    --------
    scaled_dot_product_attention : The attention core on per-head arrays.

    Notes
    -----
    Weights use PyTorch's ``Linear`` layout, ``weight`` of shape
    ``(out_features, in_features)`` and ``y = x @ weight.T + bias``, and
    :meth:`state_dict` uses the names of ``torch.nn.MultiheadAttention``, so a
    torch ``state_dict`` loads unchanged. Inputs are always batch-first,
    ``(B, L, E)``, whatever ``batch_first`` a ported torch module had.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> layer = mha_xp.MultiHeadAttention(16, 4, seed=0)
    >>> x = np.random.default_rng(1).standard_normal((2, 10, 16))
    >>> y, w = layer(x, return_weights=True)     # self-attention
    >>> y.shape, w.shape
    ((2, 10, 16), (2, 10, 10))
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        xp: ModuleType | None = None,
        device: Any = None,
        dtype: Any = None,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        embed_dim = check_positive_int("embed_dim", embed_dim)
        num_heads = check_positive_int("num_heads", num_heads)
        kdim = embed_dim if kdim is None else check_positive_int("kdim", kdim)
        vdim = embed_dim if vdim is None else check_positive_int("vdim", vdim)
        bias = check_flag("bias", bias)
        seed = check_seed(seed)
        xp = normalize_namespace(np if xp is None else xp)
        if dtype is None:
            try:
                dtype = xp.__array_namespace_info__().default_dtypes(device=device)["real floating"]
            except Exception as exc:
                raise ValueError(f"device {device!r} is not a device of {lib_name(xp)} ({exc})") from exc
        else:
            dtype = check_dtype(dtype, xp, lib_name(xp))
        host = _init_params(embed_dim, kdim, vdim, bias, seed)
        try:
            params = {
                name: xp.astype(xp.asarray(w, device=device), dtype) for name, w in host.items()
            }
        except Exception as exc:  # an unknown device, in the library's own words
            raise ValueError(f"device {device!r} is not a device of {lib_name(xp)} ({exc})") from exc
        self._setup(params, num_heads, xp)

    # -- construction ------------------------------------------------------

    def _setup(self, params: dict[str, Array], num_heads: Any, xp: ModuleType) -> None:
        """Validate a complete parameter dict (torch names) and adopt it."""
        packed = "in_proj_weight" in params
        names = _PACKED if packed else _SEPARATE
        has_bias = "in_proj_bias" in params or "out_proj.bias" in params
        expected = set(names) if has_bias else set(names) - set(_BIASES)
        missing, extra = expected - set(params), set(params) - expected
        if missing or extra:
            msg = "state_dict does not describe a torch.nn.MultiheadAttention:"
            if missing:
                msg += f" missing {sorted(missing)}"
            if extra:
                msg += f"{';' if missing else ''} unexpected {sorted(extra)}"
                if extra & {"bias_k", "bias_v"}:
                    msg += " (add_bias_kv is not supported yet)"
            raise ValueError(msg)
        num_heads = check_positive_int("num_heads", num_heads)

        for name, w in params.items():
            if not is_array_api_obj(w):
                raise TypeError(f"{name} must be an array, got {type(w).__name__}")
        params_xp, dev = common_namespace(**params)
        if params_xp is not xp:
            raise TypeError(f"the weights are {lib_name(params_xp)} arrays, expected {lib_name(xp)}")
        out_w = params["out_proj.weight"]
        dtype = out_w.dtype
        for name, w in params.items():
            require_real_floating(name, w, xp)
            if w.dtype != dtype:
                raise TypeError(
                    f"{name} has dtype {dtype_name(w.dtype)} but out_proj.weight has "
                    f"{dtype_name(dtype)}; all weights must share one dtype"
                )
        if out_w.ndim != 2 or out_w.shape[0] != out_w.shape[1]:
            raise ValueError(f"out_proj.weight must have shape (E, E), got {tuple(out_w.shape)}")
        E = out_w.shape[0]
        if E % num_heads:
            raise ValueError(
                f"embed_dim ({E}) must be divisible by num_heads ({num_heads})"
            )
        if packed:
            shapes = {"in_proj_weight": (3 * E, E)}
            kdim = vdim = E
        else:
            kdim = params["k_proj_weight"].shape[-1]
            vdim = params["v_proj_weight"].shape[-1]
            shapes = {"q_proj_weight": (E, E), "k_proj_weight": (E, kdim), "v_proj_weight": (E, vdim)}
        if has_bias:
            shapes |= {"in_proj_bias": (3 * E,), "out_proj.bias": (E,)}
        for name, shape in shapes.items():
            if tuple(params[name].shape) != shape:
                raise ValueError(
                    f"{name} must have shape {shape} for embed_dim={E}, got "
                    f"{tuple(params[name].shape)}"
                )
        self._params = {name: params[name] for name in names if name in params}
        self._xp, self._device, self._dtype = xp, dev, dtype
        self.embed_dim, self.num_heads, self.head_dim = E, num_heads, E // num_heads
        self.kdim, self.vdim = kdim, vdim

    @classmethod
    def _from_params(
        cls, params: dict[str, Array], num_heads: Any, xp: Any, device: Any
    ) -> MultiHeadAttention:
        arrays = [w for w in params.values() if is_array_api_obj(w)]
        if xp is None:
            if not arrays:
                raise TypeError("no weight arrays were given")
            xp = array_namespace(arrays[0])
            if device is None:
                device = device_of(arrays[0])
        else:
            xp = normalize_namespace(xp)
        params = {
            name: convert(w, xp, device) if is_array_api_obj(w) or hasattr(w, "__array__") else w
            for name, w in params.items()
        }
        self = cls.__new__(cls)
        self._setup(params, num_heads, xp)
        return self

    @classmethod
    def from_weights(
        cls,
        *,
        q_weight: Array,
        k_weight: Array,
        v_weight: Array,
        out_weight: Array,
        q_bias: Array | None = None,
        k_bias: Array | None = None,
        v_bias: Array | None = None,
        out_bias: Array | None = None,
        num_heads: int,
        xp: ModuleType | None = None,
        device: Any = None,
    ) -> MultiHeadAttention:
        """Build a layer from projection weights in torch's ``Linear`` layout.

        Parameters
        ----------
        q_weight : array, shape (E, E)
            Query projection, ``q = query @ q_weight.T + q_bias``.
        k_weight : array, shape (E, kdim)
            Key projection.
        v_weight : array, shape (E, vdim)
            Value projection.
        out_weight : array, shape (E, E)
            Output projection ``W_O``.
        q_bias, k_bias, v_bias, out_bias : array, shape (E,), optional
            Biases. If any is given the layer has biases and the missing ones
            are zero; if none is given it has none.
        num_heads : int
            Number of heads; must divide ``E``.
        xp : module, optional
            Namespace for the layer; default that of ``q_weight``. Weights from
            another library are converted (this is an explicit request).
        device : optional
            Device for the layer; default that of ``q_weight`` (or the
            namespace's default when ``xp`` is given).

        Returns
        -------
        MultiHeadAttention
            A layer with the weights' dtype.

        Raises
        ------
        TypeError
            Non-array or non-floating weights, or weights of different dtypes.
        ValueError
            Shapes that do not fit together, or ``E % num_heads != 0``.

        Notes
        -----
        Arrays already in the layer's namespace and on its device are used as
        they are (``q_weight``, ``k_weight`` and ``v_weight`` are concatenated
        into one ``in_proj_weight`` when all are ``(E, E)``); arrays from
        another library are copied.

        Examples
        --------
        >>> import numpy as np
        >>> import mha_xp
        >>> rng = np.random.default_rng(0)
        >>> W = [rng.standard_normal((8, 8)) for _ in range(4)]
        >>> layer = mha_xp.MultiHeadAttention.from_weights(
        ...     q_weight=W[0], k_weight=W[1], v_weight=W[2], out_weight=W[3], num_heads=2)
        >>> layer.embed_dim, layer.head_dim
        (8, 4)
        """
        weights = {"q_weight": q_weight, "k_weight": k_weight, "v_weight": v_weight,
                   "out_weight": out_weight}
        biases = {"q_bias": q_bias, "k_bias": k_bias, "v_bias": v_bias, "out_bias": out_bias}
        for name, w in weights.items():
            if not is_array_api_obj(w):
                raise TypeError(f"{name} must be an array, got {type(w).__name__}")
            if w.ndim != 2:
                raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
        layer_xp = array_namespace(q_weight) if xp is None else normalize_namespace(xp)
        dev = device if device is not None or xp is not None else device_of(q_weight)
        w = {n: convert(a, layer_xp, dev) for n, a in weights.items()}
        b = {n: None if a is None else convert(a, layer_xp, dev) for n, a in biases.items()}
        for name, a in biases.items():
            if a is not None and not is_array_api_obj(a):
                raise TypeError(f"{name} must be an array or None, got {type(a).__name__}")
        for name, a in b.items():
            if a is not None and a.ndim != 1:
                raise ValueError(f"{name} must be 1-D (E,), got shape {tuple(a.shape)}")
        E = w["out_weight"].shape[0]
        for name in ("q_weight", "k_weight", "v_weight"):
            if w[name].shape[0] != E:
                raise ValueError(
                    f"{name} must have {E} rows (out_features = embed_dim, from out_weight), "
                    f"got shape {tuple(w[name].shape)}"
                )
        params: dict[str, Array] = {}
        same = w["k_weight"].shape[1] == E and w["v_weight"].shape[1] == E and w["q_weight"].shape[1] == E
        if same:
            params["in_proj_weight"] = layer_xp.concat(
                [w["q_weight"], w["k_weight"], w["v_weight"]], axis=0
            )
        else:
            params |= {"q_proj_weight": w["q_weight"], "k_proj_weight": w["k_weight"],
                       "v_proj_weight": w["v_weight"]}
        params["out_proj.weight"] = w["out_weight"]
        if any(a is not None for a in b.values()):
            for name, a in b.items():
                if a is not None and a.shape != (E,):
                    raise ValueError(f"{name} must have shape ({E},), got {tuple(a.shape)}")
            zeros = layer_xp.zeros((E,), dtype=w["out_weight"].dtype, device=device_of(w["out_weight"]))
            qb, kb, vb, ob = (zeros if a is None else a for a in b.values())
            params["in_proj_bias"] = layer_xp.concat([qb, kb, vb], axis=0)
            params["out_proj.bias"] = ob
        return cls._from_params(params, num_heads, layer_xp, dev)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Array],
        *,
        num_heads: int,
        xp: ModuleType | None = None,
        device: Any = None,
    ) -> MultiHeadAttention:
        """Build a layer from a ``state_dict`` with torch's names.

        Parameters
        ----------
        state_dict : mapping of str to array
            ``in_proj_weight``, ``out_proj.weight`` (and ``in_proj_bias``,
            ``out_proj.bias`` with biases), or ``q_proj_weight``,
            ``k_proj_weight``, ``v_proj_weight`` in place of ``in_proj_weight``
            when ``kdim``/``vdim`` differ from ``embed_dim``. A
            ``torch.nn.MultiheadAttention(...).state_dict()`` loads unchanged.
        num_heads : int
            Number of heads (a state dict does not record it).
        xp : module, optional
            Namespace for the layer; default that of the arrays.
        device : optional
            Device for the layer; default that of the arrays.

        Returns
        -------
        MultiHeadAttention

        Raises
        ------
        ValueError
            Missing, unexpected or mis-shaped entries.
        TypeError
            Entries that are not floating arrays, or of different dtypes.

        Notes
        -----
        Arrays already in the layer's namespace and on its device are used as
        they are, without a copy; arrays from another library are copied.

        Examples
        --------
        >>> import mha_xp
        >>> layer = mha_xp.MultiHeadAttention(8, 2, seed=0)
        >>> same = mha_xp.MultiHeadAttention.from_state_dict(layer.state_dict(), num_heads=2)
        >>> sorted(same.state_dict())
        ['in_proj_bias', 'in_proj_weight', 'out_proj.bias', 'out_proj.weight']
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
        return cls._from_params(dict(state_dict), num_heads, xp, device)

    @classmethod
    def from_torch(
        cls, module: Any, *, xp: ModuleType | None = None, device: Any = None
    ) -> MultiHeadAttention:
        """Port a ``torch.nn.MultiheadAttention`` (its weights, copied).

        Parameters
        ----------
        module : torch.nn.MultiheadAttention
            The module; its dtype is kept.
        xp : module, optional
            Namespace for the layer; default NumPy (a port out of torch). Pass
            ``xp=torch`` to keep the weights as torch tensors.
        device : optional
            Device for the layer; default the namespace's default device.

        Returns
        -------
        MultiHeadAttention
            A layer whose call matches the module's in eval mode (dropout off).

        Raises
        ------
        TypeError
            If ``module`` is not a ``torch.nn.MultiheadAttention``.
        ValueError
            If it uses ``add_bias_kv`` or ``add_zero_attn`` (not supported yet).

        Notes
        -----
        The mha_xp layer is always batch-first: a module built with
        ``batch_first=False`` takes ``(L, B, E)``, the port takes ``(B, L, E)``.
        Its boolean ``mask`` means "may attend", the negation of torch's
        boolean ``attn_mask``; ``key_padding_mask`` means the same in both.
        """
        if not (hasattr(module, "state_dict") and hasattr(module, "num_heads")
                and hasattr(module, "in_proj_weight")):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if getattr(module, "bias_k", None) is not None or getattr(module, "add_zero_attn", False):
            raise ValueError("module uses add_bias_kv or add_zero_attn, which mha_xp does not support yet")
        # clone: the port must not share memory with a module that may train on
        params = {name: t.detach().clone() for name, t in module.state_dict().items()}
        return cls._from_params(params, module.num_heads, np if xp is None else xp, device)

    # -- the weights -------------------------------------------------------

    def state_dict(self) -> dict[str, Array]:
        """Return the weights under torch's ``nn.MultiheadAttention`` names.

        Returns
        -------
        dict of str to array
            ``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
            ``out_proj.bias`` (``q_proj_weight``, ``k_proj_weight``,
            ``v_proj_weight`` in place of ``in_proj_weight`` when
            ``kdim``/``vdim`` differ from ``embed_dim``; no biases with
            ``bias=False``). The arrays are the layer's own, not copies, as in
            torch.

        Examples
        --------
        >>> import mha_xp
        >>> sd = mha_xp.MultiHeadAttention(8, 2, kdim=4, seed=0).state_dict()
        >>> {name: w.shape for name, w in sd.items()}   # doctest: +NORMALIZE_WHITESPACE
        {'q_proj_weight': (8, 8), 'k_proj_weight': (8, 4), 'v_proj_weight': (8, 8),
         'in_proj_bias': (24,), 'out_proj.weight': (8, 8), 'out_proj.bias': (8,)}
        """
        return dict(self._params)

    def to(self, *, xp: ModuleType | None = None, device: Any = None, dtype: Any = None) -> MultiHeadAttention:
        """Return the layer in another namespace, device or dtype.

        Parameters
        ----------
        xp : module, optional
            Target namespace; default the layer's.
        device : optional
            Target device; default the layer's (or the target namespace's
            default device when ``xp`` changes).
        dtype : optional
            Target floating dtype (of the target namespace); default the layer's.

        Returns
        -------
        MultiHeadAttention
            A new layer; this one is unchanged. Weights that move to another
            library are copied; weights that need no change are shared (mha_xp
            never modifies weights in place).

        Examples
        --------
        >>> import numpy as np
        >>> import mha_xp
        >>> layer = mha_xp.MultiHeadAttention(8, 2, seed=0)
        >>> layer.to(dtype=np.float32).dtype
        dtype('float32')
        """
        target = self._xp if xp is None else normalize_namespace(xp)
        if device is None and target is self._xp:
            device = self._device
        params = {n: convert(w, target, device) for n, w in self._params.items()}
        if dtype is not None:
            check_dtype(dtype, target, lib_name(target))
            params = {n: target.astype(w, dtype) for n, w in params.items()}
        return type(self)._from_params(params, self.num_heads, target, device)

    @property
    def xp(self) -> ModuleType:
        """The weights' array-API-compatible namespace."""
        return self._xp

    @property
    def device(self) -> Any:
        """The weights' device."""
        return self._device

    @property
    def dtype(self) -> Any:
        """The weights' dtype."""
        return self._dtype

    def _in_weights(self) -> tuple[Array, Array, Array]:
        p, E = self._params, self.embed_dim
        if "in_proj_weight" in p:
            w = p["in_proj_weight"]
            return w[:E, ...], w[E:2 * E, ...], w[2 * E:, ...]
        return p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]

    def _in_biases(self) -> tuple[Array | None, Array | None, Array | None]:
        b, E = self._params.get("in_proj_bias"), self.embed_dim
        if b is None:
            return None, None, None
        return b[:E], b[E:2 * E], b[2 * E:]

    def __repr__(self) -> str:
        extra = "" if self.kdim == self.vdim == self.embed_dim else f", kdim={self.kdim}, vdim={self.vdim}"
        return (
            f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}{extra}, "
            f"bias={'in_proj_bias' in self._params}, xp={lib_name(self._xp)}, "
            f"device={self._device}, dtype={dtype_name(self._dtype)})"
        )

    # -- the call ----------------------------------------------------------

    def __call__(
        self,
        query: Array,
        key: Array | None = None,
        value: Array | None = None,
        *,
        key_padding_mask: Array | None = None,
        mask: Array | None = None,
        bias: Array | None = None,
        is_causal: bool = False,
        return_weights: bool = False,
        average_weights: bool = True,
        chunk_size: int | tuple[int, int] | None = None,
        memory_budget: int | None = None,
    ) -> Array | tuple[Array, Array]:
        """Apply multi-head attention.

        Parameters
        ----------
        query : array, shape (B, L, E) or (L, E)
            Queries; batch-first, or unbatched.
        key : array, shape (B, S, kdim) or (S, kdim), optional
            Keys; default ``value`` if given, else ``query`` (self-attention).
        value : array, shape (B, S, vdim) or (S, vdim), optional
            Values; default ``key``.
        key_padding_mask : array of bool, shape (B, S) or (S,), optional
            **True marks padding keys**, which are ignored (as in torch).
            Padding keys and values never reach the output, even if they hold
            NaN or Inf.
        mask : array of bool, optional
            Broadcastable to ``(B, H, L, S)`` (``(H, L, S)`` unbatched).
            **True means "may attend"** (the negation of torch's boolean
            ``attn_mask``).
        bias : array, optional
            Float array added to the scaled scores, broadcastable to
            ``(B, H, L, S)``, with the layer's dtype.
        is_causal : bool, default False
            Bottom-right causal mask: query ``i`` sees keys ``j <= i + S - L``.
        return_weights : bool, default False
            Also return the attention weights.
        average_weights : bool, default True
            Return weights averaged over heads ``(B, L, S)`` rather than per
            head ``(B, H, L, S)``.
        chunk_size : int or (int, int), optional
            Force the chunked attention path with this block size; see
            :func:`scaled_dot_product_attention`.
        memory_budget : int, optional
            Bytes the dense ``(B, H, L, S)`` score tensor may take before the
            chunked path (memory linear in ``L`` and ``S``) is used instead;
            default :func:`get_memory_budget`.

        Returns
        -------
        out : array, shape (B, L, E) or (L, E)
            In the inputs' namespace, device and dtype. A query with no key
            left to attend to gets the output projection's bias (zero
            attention), never NaN.
        weights : array
            Only with ``return_weights=True``: ``(B, L, S)`` averaged, or
            ``(B, H, L, S)`` per head; no batch axis for unbatched inputs.

        Raises
        ------
        TypeError
            Inputs from another library than the layer's, of another dtype,
            not floating; a non-boolean mask.
        ValueError
            Inputs on another device; wrong ranks or sizes.
        """
        call = self._check_call(query, key, value, key_padding_mask, mask, bias, chunk_size)
        return_weights = check_flag("return_weights", return_weights)
        average_weights = check_flag("average_weights", average_weights)
        out, weights, _ = self._forward(call, is_causal=check_flag("is_causal", is_causal),
                                        return_weights=return_weights,
                                        memory_budget=memory_budget, residuals=False)
        if not return_weights:
            return out
        if average_weights:
            weights = self._xp.mean(weights, axis=1)
        return out, weights if call.batched else weights[0, ...]

    def vjp(
        self,
        query: Array,
        key: Array | None = None,
        value: Array | None = None,
        *,
        key_padding_mask: Array | None = None,
        mask: Array | None = None,
        bias: Array | None = None,
        is_causal: bool = False,
        chunk_size: int | tuple[int, int] | None = None,
        memory_budget: int | None = None,
    ) -> tuple[Array, Callable[[Array], dict[str, Array]]]:
        """Apply the layer and return a function computing its gradients.

        Gradients for libraries without autodiff (NumPy, CuPy): the forward
        keeps its inputs, projections, attention output and per-row
        log-sum-exp; ``backward`` recomputes the attention probabilities block
        by block (FlashAttention-2), so its extra memory is linear in the
        sequence lengths. Repeated calls give bit-identical gradients.

        Parameters
        ----------
        query, key, value, key_padding_mask, mask, bias, is_causal, chunk_size, memory_budget
            As in :meth:`__call__`.

        Returns
        -------
        out : array
            The layer's output, as :meth:`__call__` returns it.
        backward : callable
            ``backward(grad_out)`` takes the gradient of a scalar loss with
            respect to ``out`` and returns a dict of gradients, each with the
            shape and dtype of what it differentiates: one entry per input
            argument that was passed (``"query"``, and ``"key"``, ``"value"``
            when given; an argument that defaulted to another, as in
            self-attention, adds its gradient to that one's), ``"bias"`` when
            a bias was passed, and every parameter under its
            :meth:`state_dict` name.

        Raises
        ------
        TypeError, ValueError
            As :meth:`__call__`; ``backward`` raises them for a ``grad_out``
            of the wrong library, device, dtype or shape.

        Examples
        --------
        One step of gradient descent on a least-squares loss, in plain NumPy:

        >>> import numpy as np
        >>> import mha_xp
        >>> layer = mha_xp.MultiHeadAttention(8, 2, seed=0)
        >>> rng = np.random.default_rng(1)
        >>> x, target = rng.standard_normal((4, 6, 8)), rng.standard_normal((4, 6, 8))
        >>> y, backward = layer.vjp(x, is_causal=True)
        >>> grads = backward(2 * (y - target))          # d/dy of ((y - target)**2).sum()
        >>> sorted(grads)
        ['in_proj_bias', 'in_proj_weight', 'out_proj.bias', 'out_proj.weight', 'query']
        >>> params = {n: w - 1e-2 * grads[n] for n, w in layer.state_dict().items()}
        >>> stepped = mha_xp.MultiHeadAttention.from_state_dict(params, num_heads=2)
        >>> bool(((stepped(x, is_causal=True) - target) ** 2).sum() < ((y - target) ** 2).sum())
        True
        """
        call = self._check_call(query, key, value, key_padding_mask, mask, bias, chunk_size)
        is_causal = check_flag("is_causal", is_causal)
        out, _, res = self._forward(call, is_causal=is_causal, return_weights=False,
                                    memory_budget=memory_budget, residuals=True)

        def backward(grad_out: Array) -> dict[str, Array]:
            check_grad(grad_out, out, xp=self._xp, name="grad_out")
            return self._backward(call, res, grad_out, is_causal=is_causal)

        return out, backward

    # -- internals of the call -----------------------------------------------

    def _check_call(
        self, query: Array, key: Array | None, value: Array | None,
        key_padding_mask: Array | None, mask: Array | None, bias: Array | None,
        chunk_size: Any,
    ) -> _Call:
        """Validate a call and bring it to batched form."""
        key_src = "key" if key is not None else "value" if value is not None else "query"
        value_src = "value" if value is not None else key_src
        if key is None:
            key = query if value is None else value
        if value is None:
            value = key
        xp = self._xp
        hint = (f"move the layer with layer.to(xp=..., device=...) (it holds "
                f"{lib_name(xp)} arrays on {self._device})")
        common_namespace((xp, self._device, hint), query=query, key=key, value=value,
                         key_padding_mask=key_padding_mask, mask=mask, bias=bias)
        for name, x in (("query", query), ("key", key), ("value", value)):
            require_real_floating(name, x, xp)
            if x.dtype != self._dtype:
                raise TypeError(
                    f"{name} has dtype {dtype_name(x.dtype)} but the layer's weights are "
                    f"{dtype_name(self._dtype)}; mha_xp does not promote silently: cast the "
                    f"input to {dtype_name(self._dtype)}, or convert the layer with "
                    f"layer.to(dtype=...)"
                )
        batched = query.ndim == 3
        if query.ndim not in (2, 3):
            raise ValueError(f"query must be (B, L, E) or unbatched (L, E), got shape {tuple(query.shape)}")
        for name, x in (("key", key), ("value", value)):
            if x.ndim != query.ndim:
                raise ValueError(
                    f"{name} must have the rank of query ({query.ndim}-D, "
                    f"{'batched' if batched else 'unbatched'}), got shape {tuple(x.shape)}"
                )
        for name, x, size, what in (("query", query, self.embed_dim, "embed_dim"),
                                     ("key", key, self.kdim, "kdim"),
                                     ("value", value, self.vdim, "vdim")):
            if x.shape[-1] != size:
                raise ValueError(f"{name} must have {size} features ({what}) on its last axis, got shape {tuple(x.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"key and value must have the same batch size and length, got key "
                f"{tuple(key.shape)} and value {tuple(value.shape)}"
            )
        if batched and key.shape[0] != query.shape[0]:
            raise ValueError(
                f"query and key must have the same batch size, got query {tuple(query.shape)} "
                f"and key {tuple(key.shape)}"
            )
        chunk_size = check_chunk_size(chunk_size)
        L, S, H = query.shape[-2], key.shape[-2], self.num_heads
        if L == 0 or S == 0:
            raise ValueError(
                "query and key must have at least one position each (L >= 1, S >= 1), "
                f"got query {tuple(query.shape)} and key {tuple(key.shape)}"
            )
        scores_shape = ((query.shape[0],) if batched else ()) + (H, L, S)
        labels = "(B, H, L, S)" if batched else "(H, L, S)"
        if mask is not None:
            check_mask(mask, scores_shape, xp, labels)
        if bias is not None:
            check_bias(bias, self._dtype, scores_shape, xp, labels)
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
        return _Call(query, key, value, key_padding_mask, mask, bias, chunk_size, batched,
                     key_src, value_src)

    def _forward(
        self, call: _Call, *, is_causal: bool, return_weights: bool,
        memory_budget: int | None, residuals: bool,
    ) -> tuple[Array, Array | None, dict[str, Any] | None]:
        xp = self._xp
        query, key, value = call.query, call.key, call.value
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        key_keep = keep = None
        if call.key_padding_mask is not None:
            keep_bs = xp.logical_not(call.key_padding_mask)
            key_keep = xp.reshape(keep_bs, (B, 1, 1, S))
            # Padding must be inert even when it holds NaN or Inf: a zero weight
            # does not suffice (0 * NaN = NaN), so zero the padded inputs.
            keep = xp.reshape(keep_bs, (B, S, 1))
            zero = xp.zeros((), dtype=self._dtype, device=self._device)
            same = value is key
            key = xp.where(keep, key, zero)
            value = key if same else xp.where(keep, value, zero)
        q, k, v = self._project(query, key, value)
        heads, weights, stats = attend(
            q, k, v, mask=call.mask, key_keep=key_keep, bias=call.bias, is_causal=is_causal,
            scale=1.0 / math.sqrt(self.head_dim), return_weights=return_weights,
            return_stats=residuals, chunk_size=call.chunk_size, memory_budget=memory_budget,
            xp=xp,
        )
        merged = xp.reshape(xp.permute_dims(heads, (0, 2, 1, 3)), (B, L, self.embed_dim))
        out = _linear(merged, self._params["out_proj.weight"], self._params.get("out_proj.bias"), xp)
        if not call.batched:
            out = out[0, ...]
        res = None
        if residuals:
            res = dict(key=key, value=value, keep=keep, key_keep=key_keep, q=q, k=k, v=v,
                       heads=heads, stats=stats, merged=merged)
        return out, weights, res

    def _backward(
        self, call: _Call, res: dict[str, Any], grad_out: Array, *, is_causal: bool,
    ) -> dict[str, Array]:
        xp, E, H, D = self._xp, self.embed_dim, self.num_heads, self.head_dim
        if not call.batched:
            grad_out = xp.expand_dims(grad_out, axis=0)
        B, L, _ = grad_out.shape
        p = self._params
        grads: dict[str, Array] = {}
        dy = xp.reshape(grad_out, (B * L, E))
        grads["out_proj.weight"] = xp.matmul(
            xp.matrix_transpose(dy), xp.reshape(res["merged"], (B * L, E)))
        if "out_proj.bias" in p:
            grads["out_proj.bias"] = xp.sum(dy, axis=0)
        d_heads = _split_heads(xp.reshape(xp.matmul(dy, p["out_proj.weight"]), (B, L, E)), H, xp)
        dq, dk, dv, dbias = attend_backward(
            res["q"], res["k"], res["v"], res["heads"], res["stats"], d_heads, mask=call.mask,
            key_keep=res["key_keep"], bias=call.bias, is_causal=is_causal,
            scale=1.0 / math.sqrt(D), chunk_size=call.chunk_size, xp=xp)
        inputs = (call.query, res["key"], res["value"])
        d_in, d_w, d_b = [], [], []
        for d, x, w in zip((dq, dk, dv), inputs, self._in_weights()):
            n = d.shape[2]
            d2 = xp.reshape(xp.permute_dims(d, (0, 2, 1, 3)), (B * n, E))
            d_w.append(xp.matmul(xp.matrix_transpose(d2), xp.reshape(x, (B * n, x.shape[-1]))))
            d_b.append(xp.sum(d2, axis=0))
            d_in.append(xp.reshape(xp.matmul(d2, w), (B, n, x.shape[-1])))
        if "in_proj_weight" in p:
            grads["in_proj_weight"] = xp.concat(d_w, axis=0)
        else:
            grads["q_proj_weight"], grads["k_proj_weight"], grads["v_proj_weight"] = d_w
        if "in_proj_bias" in p:
            grads["in_proj_bias"] = xp.concat(d_b, axis=0)
        if res["keep"] is not None:  # padded keys and values do not reach the output
            zero = xp.zeros((), dtype=self._dtype, device=self._device)
            d_in[1] = xp.where(res["keep"], d_in[1], zero)
            d_in[2] = xp.where(res["keep"], d_in[2], zero)
        by_source: dict[str, Array] = {"query": d_in[0]}
        for src, d in ((call.key_src, d_in[1]), (call.value_src, d_in[2])):
            by_source[src] = by_source[src] + d if src in by_source else d
        if not call.batched:
            by_source = {n: g[0, ...] for n, g in by_source.items()}
        if call.bias is not None:
            grads["bias"] = dbias
        ordered = {n: by_source[n] for n in ("query", "key", "value") if n in by_source}
        return ordered | {n: grads[n] for n in ("bias", *p) if n in grads}

    def _project(self, query: Array, key: Array, value: Array) -> tuple[Array, Array, Array]:
        """The three input projections, split into heads ``(B, H, ·, D)``."""
        xp, H = self._xp, self.num_heads
        wq, wk, wv = self._in_weights()
        bq, bk, bv = self._in_biases()
        if "in_proj_weight" in self._params and key is query and value is query:
            # Self-attention: one matmul for all three projections.
            qkv = _linear(query, self._params["in_proj_weight"], self._params.get("in_proj_bias"), xp)
            B, L, _ = qkv.shape
            qkv = xp.permute_dims(xp.reshape(qkv, (B, L, 3, H, self.head_dim)), (2, 0, 3, 1, 4))
            return qkv[0, ...], qkv[1, ...], qkv[2, ...]
        return (
            _split_heads(_linear(query, wq, bq, xp), H, xp),
            _split_heads(_linear(key, wk, bk, xp), H, xp),
            _split_heads(_linear(value, wv, bv, xp), H, xp),
        )
