"""The multi-head attention layer: parameters, projections, head split and merge."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device as device_of, is_array_api_obj

from ._attention import _host_readable, attend, attend_backward
from ._backward import unbroadcast
from ._cache import KVCache
from ._masks import Variants, combine
from ._norm import qk_layer_norm, qk_layer_norm_backward
from ._checks import (
    check_bias,
    check_chunk_size,
    check_dropout,
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
    compute_dtype,
    convert,
    dtype_name,
    lib_name,
    normalize_namespace,
    require_bool,
    require_real_floating,
)
from ._model._params import (
    LayerConfig,
    check_option_names,
    check_param_arrays,
    check_param_names,
    check_param_shapes,
    config_from_shapes,
    init_params,
    param_shapes,
)

__all__ = ["MultiHeadAttention"]

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


# Flax's LayerNorm epsilon, for normalize_qk.
_NORM_EPS = 1e-6


def _pad_last(x: Array, S: int, n: int, fill: Any, xp: ModuleType) -> Array:
    """A mask or bias over ``S`` keys (its last axis ``S`` or 1) extended by
    ``n`` keys that take ``fill`` (torch pads ``attn_mask`` and
    ``key_padding_mask`` the same way for ``add_bias_kv``/``add_zero_attn``)."""
    if x.ndim < 2:
        x = xp.reshape(x, (1,) * (2 - x.ndim) + tuple(x.shape))
    lead = tuple(x.shape[:-1])
    x = xp.broadcast_to(x, lead + (S,))
    pad = xp.full(lead + (n,), fill, dtype=x.dtype, device=device_of(x))
    return xp.concat([x, pad], axis=-1)


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
    add_bias_kv : bool, default False
        torch's option: learnable ``bias_k`` and ``bias_v`` of shape
        ``(1, 1, num_kv_heads * head_dim)`` are appended to the projected keys
        and values, one more key position that every query sees (masks and
        ``key_padding_mask`` are extended with "may attend", as torch does).
    add_zero_attn : bool, default False
        torch's option: one more key and value of zeros, appended after
        those of ``add_bias_kv``, visible to every query. Not a parameter, so
        not in :meth:`state_dict` (pass it again to :meth:`from_state_dict`),
        but in :attr:`config`, which :func:`save_weights` stores.
    num_kv_heads : int, optional
        Key/value heads for grouped-query attention (``1``: multi-query);
        must divide ``num_heads``; default ``num_heads``. The key and value
        projections then have ``num_kv_heads * head_dim`` rows
        (``k_proj_weight``, ``v_proj_weight``, never the packed
        ``in_proj_weight``; ``in_proj_bias`` has ``E + 2 * num_kv_heads *
        head_dim`` entries) and query head ``h`` attends with key/value head
        ``h // (num_heads // num_kv_heads)``, without copying keys or values
        per query head.
    rotary : bool, default False
        Rotary position embeddings (RoPE, see :func:`apply_rotary`) on the
        per-head queries and keys after projection (and normalisation).
        Keys sit at positions ``0 .. S - 1`` and queries are aligned
        bottom-right (query ``i`` at ``i + S - L``); with a cache, positions
        continue from the cache's length.
    rotary_base : float, default 10000.0
        RoPE's base (``rope_theta``).
    rotary_interleaved : bool, default False
        RoPE's pairing: False rotates feature halves (GPT-NeoX, Llama), True
        adjacent pairs (GPT-J).
    rotary_dim : int, optional
        Rotate only the first ``rotary_dim`` features of each head (even);
        default all.
    normalize_qk : bool, default False
        Flax's QK normalisation: a bias-free LayerNorm (epsilon ``1e-6``)
        with learnable scales ``q_norm.weight`` and ``k_norm.weight`` of shape
        ``(head_dim,)`` (initialised to ones) on the per-head queries and
        keys, before RoPE.
    window : (int or None, int or None), optional
        Sliding-window (local) attention as FlashAttention's
        ``window_size``: query ``i`` sees keys ``j`` with
        ``i + S - L - left <= j <= i + S - L + right``; None or any negative
        int leaves a side unbounded (as in
        :func:`scaled_dot_product_attention`). Composes with ``is_causal``.
    alibi : bool or sequence of float, default False
        ALiBi: True for the standard slopes of ``num_heads`` heads
        (:func:`alibi_slopes`), or one slope per query head; adds
        ``-slope * |i + S - L - j|`` to the scaled scores.
    softcap : float, optional
        Logit soft-capping (Gemma 2): scaled scores ``s`` become
        ``softcap * tanh(s / softcap)``, before any bias or ALiBi.
    dropout : float, default 0.0
        Dropout probability on the attention weights, as torch's
        constructor argument, but applied only to calls that ask for it with
        ``training=True`` and a ``dropout_seed`` (there is no train/eval
        state and no global random state). See
        :func:`scaled_dot_product_attention`'s ``dropout_p`` for the
        keep-mask and its bit-for-bit reproducibility across libraries.

    Attributes
    ----------
    config : LayerConfig
        Every size, flag and option, validated and normalised (read-only).
    embed_dim, num_heads, num_kv_heads, head_dim, kdim, vdim : int
        The layer's sizes (read-only).
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
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        num_kv_heads: int | None = None,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        rotary_interleaved: bool = False,
        rotary_dim: int | None = None,
        normalize_qk: bool = False,
        window: tuple[int | None, int | None] | None = None,
        alibi: bool | Sequence[float] = False,
        softcap: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        config = LayerConfig.from_options(
            embed_dim, num_heads, num_kv_heads=num_kv_heads, kdim=kdim, vdim=vdim, bias=bias,
            add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, normalize_qk=normalize_qk,
            rotary=rotary, rotary_base=rotary_base, rotary_interleaved=rotary_interleaved,
            rotary_dim=rotary_dim, window=window, alibi=alibi, softcap=softcap, dropout=dropout)
        seed = check_seed(seed)
        xp = normalize_namespace(np if xp is None else xp)
        if dtype is None:
            try:
                dtype = xp.__array_namespace_info__().default_dtypes(device=device)["real floating"]
            except Exception as exc:
                raise ValueError(f"device {device!r} is not a device of {lib_name(xp)} ({exc})") from exc
        else:
            dtype = check_dtype(dtype, xp, lib_name(xp))
        try:
            params = {
                name: xp.astype(xp.asarray(w, device=device), dtype)
                for name, w in init_params(config, seed).items()
            }
        except Exception as exc:  # an unknown device, in the library's own words
            raise ValueError(f"device {device!r} is not a device of {lib_name(xp)} ({exc})") from exc
        self._adopt(params, config, xp)

    # -- construction ------------------------------------------------------

    def _adopt(self, params: dict[str, Array], config: LayerConfig, xp: ModuleType) -> None:
        """Validate the arrays of a complete parameter dict (torch names)
        against ``config`` and adopt them, in torch's order."""
        self._device, self._dtype = check_param_arrays(params, xp)
        check_param_shapes(config, {name: tuple(w.shape) for name, w in params.items()})
        order = param_shapes(config, packed="in_proj_weight" in params)
        self._params = {name: params[name] for name in order}
        self._xp, self._config = xp, config

    @classmethod
    def _from_params(
        cls, params: dict[str, Array], num_heads: Any, xp: Any, device: Any,
        options: Mapping[str, Any] | None = None, num_kv_heads: Any = None,
        config: LayerConfig | None = None,
    ) -> MultiHeadAttention:
        """A layer of ``params`` (converted to ``xp`` and ``device``): with
        ``config``, checked against it; else with the configuration their
        names and shapes imply, ``num_heads`` and the non-parameter ``options``."""
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
        if config is None:
            check_param_names(params)  # first: the names explain most bad state dicts
            num_heads = check_positive_int("num_heads", num_heads)
            check_param_arrays(params, xp)
            shapes = {name: tuple(w.shape) for name, w in params.items()}
            config = config_from_shapes(shapes, num_heads, num_kv_heads=num_kv_heads,
                                        **(options or {}))
        self = cls.__new__(cls)
        self._adopt(params, config, xp)
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
        bias_k: Array | None = None,
        bias_v: Array | None = None,
        q_norm_weight: Array | None = None,
        k_norm_weight: Array | None = None,
        **options: Any,
    ) -> MultiHeadAttention:
        """Build a layer from projection weights in torch's ``Linear`` layout.

        Parameters
        ----------
        q_weight : array, shape (E, E)
            Query projection, ``q = query @ q_weight.T + q_bias``.
        k_weight : array, shape (E, kdim) or (num_kv_heads * head_dim, kdim)
            Key projection; fewer rows than ``E`` make a grouped-query layer.
        v_weight : array, shape (E, vdim) or (num_kv_heads * head_dim, vdim)
            Value projection.
        out_weight : array, shape (E, E)
            Output projection ``W_O``.
        q_bias, k_bias, v_bias, out_bias : array, optional
            Biases, of the length of their projection's rows. If any is given
            the layer has biases and the missing ones are zero; if none is
            given it has none.
        num_heads : int
            Number of heads; must divide ``E``.
        xp : module, optional
            Namespace for the layer; default that of ``q_weight``. Weights from
            another library are converted (this is an explicit request).
        device : optional
            Device for the layer; default that of ``q_weight`` (or the
            namespace's default when ``xp`` is given).
        bias_k, bias_v : array, shape (1, 1, num_kv_heads * head_dim), optional
            torch's ``add_bias_kv`` parameters (both or neither).
        q_norm_weight, k_norm_weight : array, shape (head_dim,), optional
            Scales of the QK normalisation (both or neither; ``normalize_qk``).
        **options
            The layer's other options, as in the constructor: ``add_zero_attn``,
            ``rotary``, ``rotary_base``, ``rotary_interleaved``, ``rotary_dim``,
            ``window``, ``alibi``, ``softcap``, ``dropout``.

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
        kv_dim = w["k_weight"].shape[0]
        H = num_heads if isinstance(num_heads, int) and not isinstance(num_heads, bool) else 0
        if kv_dim != E and H > 0 and E % H == 0:
            D = E // H
            if kv_dim == 0 or kv_dim % D or H % (kv_dim // D):
                raise ValueError(
                    f"k_weight must have {E} rows (out_features = embed_dim, from out_weight), "
                    f"or num_kv_heads * head_dim rows for a num_kv_heads dividing num_heads = "
                    f"{H} (head_dim = {D}), got shape {tuple(w['k_weight'].shape)}"
                )
        for name, rows, what in (("q_weight", E, "embed_dim, from out_weight"),
                                 ("k_weight", kv_dim, "from k_weight"),
                                 ("v_weight", kv_dim, "num_kv_heads * head_dim, from k_weight")):
            if w[name].shape[0] != rows:
                raise ValueError(
                    f"{name} must have {rows} rows (out_features = {what}), "
                    f"got shape {tuple(w[name].shape)}"
                )
        params: dict[str, Array] = {}
        same = (kv_dim == E and w["k_weight"].shape[1] == E and w["v_weight"].shape[1] == E
                and w["q_weight"].shape[1] == E)
        if same:
            params["in_proj_weight"] = layer_xp.concat(
                [w["q_weight"], w["k_weight"], w["v_weight"]], axis=0
            )
        else:
            params |= {"q_proj_weight": w["q_weight"], "k_proj_weight": w["k_weight"],
                       "v_proj_weight": w["v_weight"]}
        params["out_proj.weight"] = w["out_weight"]
        if any(a is not None for a in b.values()):
            sizes = {"q_bias": E, "k_bias": kv_dim, "v_bias": kv_dim, "out_bias": E}
            for name, a in b.items():
                if a is not None and a.shape != (sizes[name],):
                    raise ValueError(f"{name} must have shape ({sizes[name]},), got {tuple(a.shape)}")
            qb, kb, vb, ob = (
                layer_xp.zeros((sizes[n],), dtype=w["out_weight"].dtype,
                               device=device_of(w["out_weight"])) if a is None else a
                for n, a in b.items())
            params["in_proj_bias"] = layer_xp.concat([qb, kb, vb], axis=0)
            params["out_proj.bias"] = ob
        for name, a in (("bias_k", bias_k), ("bias_v", bias_v), ("q_norm.weight", q_norm_weight),
                        ("k_norm.weight", k_norm_weight)):
            if a is not None:
                if not is_array_api_obj(a):
                    raise TypeError(f"{name} must be an array or None, got {type(a).__name__}")
                params[name] = convert(a, layer_xp, dev)
        return cls._from_params(params, num_heads, layer_xp, dev, check_option_names(options))

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Array],
        *,
        num_heads: int,
        xp: ModuleType | None = None,
        device: Any = None,
        num_kv_heads: int | None = None,
        **options: Any,
    ) -> MultiHeadAttention:
        """Build a layer from a ``state_dict`` with torch's names.

        Parameters
        ----------
        state_dict : mapping of str to array
            ``in_proj_weight``, ``out_proj.weight`` (and ``in_proj_bias``,
            ``out_proj.bias`` with biases), or ``q_proj_weight``,
            ``k_proj_weight``, ``v_proj_weight`` in place of ``in_proj_weight``
            when ``kdim``/``vdim`` differ from ``embed_dim`` or with fewer
            key/value heads; ``bias_k`` and ``bias_v`` (``add_bias_kv``);
            ``q_norm.weight`` and ``k_norm.weight`` (``normalize_qk``). A
            ``torch.nn.MultiheadAttention(...).state_dict()`` loads unchanged.
        num_heads : int
            Number of query heads (a state dict does not record it).
        xp : module, optional
            Namespace for the layer; default that of the arrays.
        device : optional
            Device for the layer; default that of the arrays.
        num_kv_heads : int, optional
            Checked against the key projection's rows when given (the state
            dict determines it: ``k_proj_weight.shape[0] // head_dim``).
        **options
            The options that are not parameters, as in the constructor:
            ``add_zero_attn``, ``rotary``, ``rotary_base``,
            ``rotary_interleaved``, ``rotary_dim``, ``window``, ``alibi``,
            ``softcap``, ``dropout`` (``layer.config.options()`` of the layer
            the state dict came from rebuilds that layer).

        Returns
        -------
        MultiHeadAttention

        Raises
        ------
        ValueError
            Missing, unexpected or mis-shaped entries; an option value its
            validator refuses.
        TypeError
            Entries that are not floating arrays, or of different dtypes; an
            unknown option, or an option of the wrong type.

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
        return cls._from_params(dict(state_dict), num_heads, xp, device,
                                check_option_names(options), num_kv_heads)

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
            A layer whose call matches the module's in eval mode (dropout off
            unless a call passes ``training=True``; the module's ``dropout``
            probability carries over, its random masks do not).

        Raises
        ------
        TypeError
            If ``module`` is not a ``torch.nn.MultiheadAttention``.

        Notes
        -----
        The mha_xp layer is always batch-first: a module built with
        ``batch_first=False`` takes ``(L, B, E)``, the port takes ``(B, L, E)``.
        Its boolean ``mask`` means "may attend", the negation of torch's
        boolean ``attn_mask``; ``key_padding_mask`` means the same in both.
        ``add_bias_kv`` (the ``bias_k``, ``bias_v`` parameters) and
        ``add_zero_attn`` carry over.
        """
        if not (hasattr(module, "state_dict") and hasattr(module, "num_heads")
                and hasattr(module, "in_proj_weight")):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        # clone: the port must not share memory with a module that may train on
        params = {name: t.detach().clone() for name, t in module.state_dict().items()}
        options = dict(add_zero_attn=bool(getattr(module, "add_zero_attn", False)),
                       dropout=float(getattr(module, "dropout", 0.0)))
        return cls._from_params(params, module.num_heads, np if xp is None else xp, device, options)

    # -- the weights -------------------------------------------------------

    def state_dict(self) -> dict[str, Array]:
        """Return the weights under torch's ``nn.MultiheadAttention`` names.

        Returns
        -------
        dict of str to array
            ``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
            ``out_proj.bias`` (``q_proj_weight``, ``k_proj_weight``,
            ``v_proj_weight`` in place of ``in_proj_weight`` when
            ``kdim``/``vdim`` differ from ``embed_dim`` or ``num_kv_heads``
            from ``num_heads``, the key and value ones then of
            ``num_kv_heads * head_dim`` rows; no biases with ``bias=False``),
            then ``bias_k``, ``bias_v`` with ``add_bias_kv`` (after
            ``in_proj_bias``, in torch's order), and ``q_norm.weight``,
            ``k_norm.weight`` with ``normalize_qk``. Options that are not
            parameters (``add_zero_attn``, RoPE, window, ALiBi, softcap,
            dropout) are not included: they are in :attr:`config`. The arrays
            are the layer's own, not copies, as in torch.

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
        return type(self)._from_params(params, self.num_heads, target, device,
                                       config=self._config)

    @property
    def config(self) -> LayerConfig:
        """The layer's configuration: sizes, flags and options, validated.

        Everything that rebuilds the layer besides its weights, namespace,
        device and dtype, in normal form (``alibi=True`` as its slopes,
        ``window`` with None for an unbounded side), as a frozen dataclass;
        :func:`save_weights` stores it beside the weights, as JSON of
        ``config.to_dict()``.

        Examples
        --------
        >>> import mha_xp
        >>> config = mha_xp.MultiHeadAttention(8, 2, window=(-1, 0), seed=0).config
        >>> config.head_dim, config.window
        (4, (None, 0))
        """
        return self._config

    @property
    def embed_dim(self) -> int:
        """Model width ``E`` of queries and outputs."""
        return self._config.embed_dim

    @property
    def num_heads(self) -> int:
        """Number of query heads ``H``."""
        return self._config.num_heads

    @property
    def num_kv_heads(self) -> int:
        """Number of key/value heads (``num_heads`` unless grouped-query)."""
        return self._config.num_kv_heads

    @property
    def head_dim(self) -> int:
        """Features per head, ``embed_dim // num_heads``."""
        return self._config.head_dim

    @property
    def kdim(self) -> int:
        """Feature size of keys."""
        return self._config.kdim

    @property
    def vdim(self) -> int:
        """Feature size of values."""
        return self._config.vdim

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
        F = self.num_kv_heads * self.head_dim
        return b[:E], b[E:E + F], b[E + F:]

    def __repr__(self) -> str:
        return (
            f"MultiHeadAttention({self._config.repr_args()}, xp={lib_name(self._xp)}, "
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
        cache: KVCache | None = None,
        training: bool = False,
        dropout_seed: int | None = None,
    ) -> Array | tuple[Array, Array] | tuple[Array, KVCache] | tuple[Array, Array, KVCache]:
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
            Bottom-right causal mask: query ``i`` sees keys ``j <= i + S - L``
            (keys appended by ``add_bias_kv``/``add_zero_attn`` stay visible).
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
        cache : KVCache, optional
            Incremental decoding (self-attention only, with
            ``is_causal=True``; no ``key``, ``value``, masks or bias): the
            query's keys and values are written into the cache after those
            already there, and the query attends causally to all of them.
            Make one with :meth:`init_cache`. Prefill, single steps and
            chunks of any size give the outputs of causal self-attention over
            the whole sequence.
        training : bool, default False
            Apply the layer's ``dropout`` to the attention weights (as
            Keras's ``training`` argument and torch's ``train()`` mode). Off
            by default; without a constructor ``dropout`` it changes nothing.
        dropout_seed : int, optional
            The key of the dropout mask, in ``[0, 2**64)``; required with
            ``training=True`` when the layer has ``dropout > 0``, ignored
            otherwise. The same seed gives the same mask on every library;
            pass a new one per step. The mask's leading index is
            ``b * num_heads + h`` (batch ``b``, query head ``h``; ``b = 0``
            unbatched), as :func:`scaled_dot_product_attention` with the
            per-head arrays.

        Returns
        -------
        out : array, shape (B, L, E) or (L, E)
            In the inputs' namespace, device and dtype. A query with no key
            left to attend to gets the output projection's bias (zero
            attention), never NaN.
        weights : array
            Only with ``return_weights=True``: ``(B, L, S)`` averaged, or
            ``(B, H, L, S)`` per head; no batch axis for unbatched inputs.
            With dropout, the weights **before** dropout (as Keras and Flax;
            ``torch.nn.MultiheadAttention`` returns them after dropout).
            With ``add_bias_kv``/``add_zero_attn`` the appended keys are the
            last columns (as in torch); with a cache, ``S`` is its
            ``max_length``.
        cache : KVCache
            Only with ``cache``: the cache holding this call's keys and
            values too (the one passed in is unchanged).

        Raises
        ------
        TypeError
            Inputs from another library than the layer's, of another dtype,
            not floating; a non-boolean mask.
        ValueError
            Inputs on another device; wrong ranks or sizes; ``training=True``
            with ``dropout > 0`` and no ``dropout_seed``, or with a ``cache``.
        """
        call = self._check_call(query, key, value, key_padding_mask, mask, bias, chunk_size)
        return_weights = check_flag("return_weights", return_weights)
        average_weights = check_flag("average_weights", average_weights)
        is_causal = check_flag("is_causal", is_causal)
        dropout = self._check_dropout(training, dropout_seed)
        if cache is not None:
            if dropout is not None:
                raise ValueError("dropout (training=True) is not supported with a cache: "
                                 "decoding is inference; call without training=True")
            self._check_cache(cache, call, is_causal, key is not None or value is not None)
        out, weights, _, cache = self._forward(call, is_causal=is_causal,
                                               return_weights=return_weights,
                                               memory_budget=memory_budget, residuals=False,
                                               cache=cache, dropout=dropout)
        if return_weights:
            if average_weights:
                weights = self._xp.mean(weights, axis=1)
            weights = weights if call.batched else weights[0, ...]
        if cache is None:
            return (out, weights) if return_weights else out
        return (out, weights, cache) if return_weights else (out, cache)

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty key/value cache for incremental decoding with this layer.

        Parameters
        ----------
        batch_size : int
            The batch size ``B`` of the calls that will use it (use 1 for
            unbatched calls).
        max_length : int
            The most positions it will hold (prompt and generated tokens).

        Returns
        -------
        KVCache
            Zeros of shape ``(batch_size, num_kv_heads, max_length,
            head_dim)`` in the layer's namespace, device and dtype, with
            ``length`` 0.

        Examples
        --------
        Prefill with a prompt, then decode one position at a time; the
        outputs are those of causal self-attention over the whole sequence:

        >>> import numpy as np
        >>> import mha_xp
        >>> layer = mha_xp.MultiHeadAttention(16, 4, num_kv_heads=2, rotary=True, seed=0)
        >>> x = np.random.default_rng(1).standard_normal((2, 7, 16))
        >>> cache = layer.init_cache(batch_size=2, max_length=8)
        >>> y_prompt, cache = layer(x[:, :5], cache=cache, is_causal=True)
        >>> y5, cache = layer(x[:, 5:6], cache=cache, is_causal=True)
        >>> y6, cache = layer(x[:, 6:7], cache=cache, is_causal=True)
        >>> int(cache.length)
        7
        >>> full = layer(x, is_causal=True)
        >>> bool(np.allclose(np.concatenate([y_prompt, y5, y6], axis=1), full))
        True
        """
        batch_size = check_positive_int("batch_size", batch_size)
        max_length = check_positive_int("max_length", max_length)
        return KVCache.empty(batch_size, self.num_kv_heads, max_length, self.head_dim,
                             xp=self._xp, device=self._device, dtype=self._dtype)

    def _check_dropout(self, training: Any, dropout_seed: Any) -> tuple[float, int] | None:
        """``(p, seed)`` when this call applies dropout, else None."""
        training = check_flag("training", training)
        if not training:
            return None
        return check_dropout(self._config.dropout, dropout_seed, seed_name="dropout_seed",
                             p_name="dropout")

    def _check_cache(self, cache: Any, call: _Call, is_causal: bool, cross: bool) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from layer.init_cache(...), got "
                            f"{type(cache).__name__}")
        if not is_causal:
            raise ValueError("decoding with a cache is causal attention: pass is_causal=True")
        if cross:
            raise ValueError("a cache is for self-attention: pass only query (key and value "
                             "come from the cache)")
        for name, given in (("key_padding_mask", call.key_padding_mask), ("mask", call.mask),
                            ("bias", call.bias)):
            if given is not None:
                raise ValueError(f"{name} is not supported with a cache (the cache masks the "
                                 f"positions not yet filled itself)")
        B, L = call.query.shape[0], call.query.shape[1]
        want = (B, self.num_kv_heads, cache.max_length, self.head_dim)
        for name, a in (("cache.key", cache.key), ("cache.value", cache.value)):
            if tuple(a.shape) != want:
                raise ValueError(f"{name} must have shape (B, num_kv_heads, max_length, head_dim)"
                                 f" = {want} for this layer and query, got {tuple(a.shape)}")
            if a.dtype != self._dtype:
                raise TypeError(f"{name} has dtype {dtype_name(a.dtype)} but the layer's weights "
                                f"are {dtype_name(self._dtype)}")
        if L > cache.max_length:
            raise ValueError(f"query has {L} positions but the cache holds at most "
                             f"max_length = {cache.max_length}")
        # Where reading the filled length is free (an eager host array), an
        # overflow is an error; on GPU, lazy or traced arrays it cannot be
        # checked without a sync or a concrete value (documented on KVCache).
        if _host_readable(cache.length) and int(cache.length) + L > cache.max_length:
            raise ValueError(f"the cache holds {int(cache.length)} of its max_length = "
                             f"{cache.max_length} positions: {L} more do not fit; make the "
                             f"cache with layer.init_cache(batch_size, max_length) for the "
                             f"longest sequence")

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
        training: bool = False,
        dropout_seed: int | None = None,
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
            As in :meth:`__call__` (no cache: gradients are for training on
            whole sequences).
        training, dropout_seed
            As in :meth:`__call__`: with ``training=True`` the layer's
            ``dropout`` applies, and ``backward`` differentiates through the
            same mask, regenerated from ``dropout_seed``.

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
            :meth:`state_dict` name (``bias_k``, ``bias_v``,
            ``q_norm.weight``, ``k_norm.weight`` included).

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
        dropout = self._check_dropout(training, dropout_seed)
        out, _, res, _ = self._forward(call, is_causal=is_causal, return_weights=False,
                                       memory_budget=memory_budget, residuals=True,
                                       dropout=dropout)

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
        memory_budget: int | None, residuals: bool, cache: KVCache | None = None,
        dropout: tuple[float, int] | None = None,
    ) -> tuple[Array, Array | None, dict[str, Any] | None, KVCache | None]:
        xp, c, p, dev = self._xp, self._config, self._params, self._device
        query, key, value = call.query, call.key, call.value
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        key_keep = keep = None
        if call.key_padding_mask is not None:
            keep_bs = xp.logical_not(call.key_padding_mask)
            key_keep = xp.reshape(keep_bs, (B, 1, 1, S))
            # Padding must be inert even when it holds NaN or Inf: a zero weight
            # does not suffice (0 * NaN = NaN), so zero the padded inputs.
            keep = xp.reshape(keep_bs, (B, S, 1))
            zero = xp.zeros((), dtype=self._dtype, device=dev)
            same = value is key
            key = xp.where(keep, key, zero)
            value = key if same else xp.where(keep, value, zero)
        q_in, k_in, v = self._project(query, key, value)
        q, k = q_in, k_in
        if c.normalize_qk:
            q = qk_layer_norm(q, p["q_norm.weight"], eps=_NORM_EPS, xp=xp)
            k = qk_layer_norm(k, p["k_norm.weight"], eps=_NORM_EPS, xp=xp)
        # Positions: bottom-right aligned (query i sits at key position
        # i + S - L), and continuing from the cache's length when decoding.
        start = (S - L) if cache is None else cache.length
        pos_q = xp.arange(L, device=dev) + start
        pos_k = xp.arange(S, device=dev) + (0 if cache is None else cache.length)
        if c.rotary:
            q = self._rotate(q, pos_q, inverse=False)
            k = self._rotate(k, pos_k, inverse=False)
        mask, bias, causal = call.mask, call.bias, is_causal
        positional = c.window is not None or c.alibi is not None
        n_extra = c.add_bias_kv + c.add_zero_attn
        if cache is not None:
            cache = cache.append(k, v)
            k, v = cache.key, cache.value
            S = k.shape[2]
            keys = xp.arange(S, device=dev)
            pos_mask, pos_bias = self._position_terms(pos_q, keys, valid=keys < cache.length,
                                                      causal=True)
            mask, bias, causal, positional = pos_mask, pos_bias, False, False
        elif n_extra and (causal or positional):
            # The core aligns its causal/window/ALiBi terms to the last key; the
            # appended keys of add_bias_kv/add_zero_attn must stay outside
            # them (visible to every query, as in torch): build them here.
            pos_mask, pos_bias = self._position_terms(pos_q, pos_k, valid=None, causal=causal)
            mask = combine(mask, pos_mask, xp=xp)
            bias = pos_bias if bias is None else (bias if pos_bias is None else bias + pos_bias)
            causal, positional = False, False
        if n_extra:
            k, v = self._append_extras(k, v, B)
            mask = None if mask is None else _pad_last(mask, S, n_extra, True, xp)
            bias = None if bias is None else _pad_last(bias, S, n_extra, 0.0, xp)
            key_keep = None if key_keep is None else _pad_last(key_keep, S, n_extra, True, xp)
        core_kw = dict(mask=mask, key_keep=key_keep, bias=bias, is_causal=causal,
                       scale=1.0 / math.sqrt(self.head_dim),
                       variants=self._variants(positional, dropout))
        heads, weights, stats = attend(
            q, k, v, return_weights=return_weights, return_stats=residuals,
            chunk_size=call.chunk_size, memory_budget=memory_budget, xp=xp, **core_kw)
        merged = xp.reshape(xp.permute_dims(heads, (0, 2, 1, 3)), (B, L, self.embed_dim))
        out = _linear(merged, p["out_proj.weight"], p.get("out_proj.bias"), xp)
        if not call.batched:
            out = out[0, ...]
        res = None
        if residuals:
            res = dict(key=key, value=value, keep=keep, q_in=q_in, k_in=k_in, q=q, k=k, v=v,
                       heads=heads, stats=stats, merged=merged, core_kw=core_kw,
                       pos_q=pos_q, pos_k=pos_k, n_extra=n_extra, S=S)
        return out, weights, res, cache

    def _variants(self, positional: bool,
                  dropout: tuple[float, int] | None = None) -> Variants | None:
        """What the core applies itself: soft-capping and ``dropout`` always,
        the window and ALiBi when ``positional`` (aligned bottom-right to the
        keys given)."""
        c, xp = self._config, self._xp
        window = neg_slopes = None
        if positional and c.window is not None:
            window = tuple(-1 if n is None else n for n in c.window)
        if positional and c.alibi is not None:
            work = compute_dtype(self._dtype, xp)
            neg_slopes = xp.reshape(-xp.asarray(c.alibi, dtype=work, device=self._device),
                                    (self.num_heads, 1, 1))
        if window is None and neg_slopes is None and c.softcap is None and dropout is None:
            return None
        return Variants(window=window, softcap=c.softcap, neg_slopes=neg_slopes, dropout=dropout)

    def _position_terms(
        self, pos_q: Array, pos_k: Array, *, valid: Array | None, causal: bool,
    ) -> tuple[Array | None, Array | None]:
        """The causal, window and validity mask ``(L, S)`` and the ALiBi bias
        ``(H, L, S)`` from the positions of queries and keys (index
        arithmetic only, so that a cache's traced length works under
        ``jax.jit``)."""
        xp, c = self._xp, self._config
        i, j = xp.expand_dims(pos_q, axis=1), xp.expand_dims(pos_k, axis=0)
        mask = None if valid is None else xp.expand_dims(valid, axis=0)
        if causal:
            mask = combine(mask, j <= i, xp=xp)
        if c.window is not None:
            left, right = c.window
            if left is not None:
                mask = combine(mask, j >= i - left, xp=xp)
            if right is not None:
                mask = combine(mask, j <= i + right, xp=xp)
        bias = None
        if c.alibi is not None:
            slopes = xp.asarray(c.alibi, dtype=self._dtype, device=self._device)
            distance = xp.astype(xp.abs(i - j), self._dtype)
            bias = -xp.reshape(slopes, (self.num_heads, 1, 1)) * distance
        return mask, bias

    def _rotate(self, x: Array, positions: Array, *, inverse: bool) -> Array:
        from ._rotary import apply_rotary  # noqa: PLC0415 (a sibling module, imported when used)

        c = self._config
        return apply_rotary(x, positions, base=c.rotary_base, interleaved=c.rotary_interleaved,
                            rotary_dim=c.rotary_dim, inverse=inverse)

    def _append_extras(self, k: Array, v: Array, B: int) -> tuple[Array, Array]:
        """torch's ``add_bias_kv`` then ``add_zero_attn``: one key/value
        position each, appended after the real ones, for every head."""
        xp, p = self._xp, self._params
        shape = (B, self.num_kv_heads, 1, self.head_dim)
        extra_k, extra_v = [k], [v]
        if self._config.add_bias_kv:
            for dst, name in ((extra_k, "bias_k"), (extra_v, "bias_v")):
                dst.append(xp.broadcast_to(xp.reshape(p[name], (1, shape[1], 1, shape[3])), shape))
        if self._config.add_zero_attn:
            zeros = xp.zeros(shape, dtype=self._dtype, device=self._device)
            extra_k.append(zeros)
            extra_v.append(zeros)
        return xp.concat(extra_k, axis=2), xp.concat(extra_v, axis=2)

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
        if self._config.bias:
            grads["out_proj.bias"] = xp.sum(dy, axis=0)
        d_heads = _split_heads(xp.reshape(xp.matmul(dy, p["out_proj.weight"]), (B, L, E)), H, xp)
        dq, dk, dv, dbias = attend_backward(
            res["q"], res["k"], res["v"], res["heads"], res["stats"], d_heads,
            chunk_size=call.chunk_size, xp=xp, **res["core_kw"])
        S = res["S"]
        if res["n_extra"]:
            if self._config.add_bias_kv:
                Fkv = self.num_kv_heads * D
                grads["bias_k"] = xp.reshape(xp.sum(dk[:, :, S, :], axis=0), (1, 1, Fkv))
                grads["bias_v"] = xp.reshape(xp.sum(dv[:, :, S, :], axis=0), (1, 1, Fkv))
            dk, dv = dk[:, :, :S, :], dv[:, :, :S, :]
            if dbias is not None:
                dbias = dbias[..., :S]
        if call.bias is not None and tuple(dbias.shape) != tuple(call.bias.shape):
            dbias = unbroadcast(dbias, tuple(call.bias.shape), xp=xp)
        if self._config.rotary:
            dq = self._rotate(dq, res["pos_q"], inverse=True)
            dk = self._rotate(dk, res["pos_k"], inverse=True)
        if self._config.normalize_qk:
            dq, grads["q_norm.weight"] = qk_layer_norm_backward(
                dq, res["q_in"], p["q_norm.weight"], eps=_NORM_EPS, xp=xp)
            dk, grads["k_norm.weight"] = qk_layer_norm_backward(
                dk, res["k_in"], p["k_norm.weight"], eps=_NORM_EPS, xp=xp)
        inputs = (call.query, res["key"], res["value"])
        d_in, d_w, d_b = [], [], []
        for d, x, w in zip((dq, dk, dv), inputs, self._in_weights()):
            n, F = d.shape[2], d.shape[1] * D
            d2 = xp.reshape(xp.permute_dims(d, (0, 2, 1, 3)), (B * n, F))
            d_w.append(xp.matmul(xp.matrix_transpose(d2), xp.reshape(x, (B * n, x.shape[-1]))))
            d_b.append(xp.sum(d2, axis=0))
            d_in.append(xp.reshape(xp.matmul(d2, w), (B, n, x.shape[-1])))
        if "in_proj_weight" in p:
            grads["in_proj_weight"] = xp.concat(d_w, axis=0)
        else:
            grads["q_proj_weight"], grads["k_proj_weight"], grads["v_proj_weight"] = d_w
        if self._config.bias:
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
        """The three input projections, split into heads: ``(B, H, L, D)``
        queries, ``(B, num_kv_heads, S, D)`` keys and values."""
        xp, H, Hkv = self._xp, self.num_heads, self.num_kv_heads
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
            _split_heads(_linear(key, wk, bk, xp), Hkv, xp),
            _split_heads(_linear(value, wv, bv, xp), Hkv, xp),
        )
