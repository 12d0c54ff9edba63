"""The multi-head attention layer: parameters, projections, head split and merge."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, Literal, cast, overload

import numpy as np
from array_api_compat import array_namespace, device as device_of, is_array_api_obj

from ._blocks import BlockMask, block_chunks, check_modifiers
from ._checks import (
    check_cache_call,
    check_cache_owner,
    check_dtype,
    check_flag,
    check_grad,
    check_layer_call,
    check_num_threads,
    check_positive_int,
    check_seed,
    check_training,
)
from ._lib._namespace import (
    Array as AnyArray,
    compute_dtype,
    convert,
    dtype_name,
    lib_name,
    normalize_namespace,
)
from ._model._cache import CacheOwner, KVCache
from ._model._forward import LayerState, Residuals, layer_backward, layer_forward
from ._model._params import (
    LayerConfig,
    check_option_names,
    check_param_arrays,
    check_param_names,
    check_param_shapes,
    config_from_shapes,
    init_params,
    param_shapes,
    state_dict_from_weights,
)

from ._porting import LAYER_CALL_KEYWORDS, LAYER_INIT_KEYWORDS, refuse_foreign
from ._run import threads_for
from ._spec import Request
from .typing import Array, Device, DType, MaskMod, Namespace, ScoreMod, ScoreModVJP

__all__ = ["MultiHeadAttention"]

def _size(name: str, doc: str) -> property:
    """A read-only attribute of the layer that its configuration holds."""
    return property(lambda self: getattr(self._config, name), doc=doc)


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
        QK normalisation of the per-head queries and keys, before RoPE, with
        learnable scales ``q_norm.weight`` and ``k_norm.weight`` of shape
        ``(head_dim,)`` (initialised to ones). By default Flax's: a
        bias-free LayerNorm with epsilon ``1e-6``; the ``qk_norm_*``
        options give those of pretrained models (see :func:`qk_norm`).
    qk_norm : {"layer", "rms"}, default "layer"
        The normalisation: LayerNorm (mean-centred: Flax, Cohere, Phi) or
        RMSNorm (Qwen3, Gemma 3).
    qk_norm_eps : float, default 1e-6
        Its epsilon (a config's ``rms_norm_eps`` or ``layer_norm_eps``).
    qk_norm_offset : float, default 0.0
        Added to the scales: 1.0 for Gemma's ``(1 + weight)`` (the scales
        are then initialised to zeros).
    qk_norm_bias : bool, default False
        LayerNorm biases ``q_norm.bias`` and ``k_norm.bias`` (Phi).
    qk_norm_per_head : bool, default False
        One scale vector per head: ``q_norm.weight`` of shape
        ``(num_heads, head_dim)`` and ``k_norm.weight`` of shape
        ``(num_kv_heads, head_dim)`` (Cohere).
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
    head_dim : int, optional
        Features per head; default ``embed_dim // num_heads``. Another value
        (Gemma, gpt-oss) gives query and output projections of shapes
        ``(num_heads * head_dim, embed_dim)`` and ``(embed_dim, num_heads *
        head_dim)``, and key and value projections of ``num_kv_heads *
        head_dim`` rows.
    scale : float, optional
        The factor on ``Q K^T``; default ``1 / sqrt(head_dim)`` (Gemma's
        ``query_pre_attn_scalar ** -0.5``; 1.0 for T5).
    sinks : bool, default False
        Learnable attention sinks (gpt-oss, StreamingLLM): a parameter
        ``sinks`` of shape ``(num_heads,)`` (initialised to zeros), one logit
        per query head that joins every row's softmax and carries no value
        (see :func:`scaled_dot_product_attention`'s ``sinks``).
    rope_scaling : dict, optional
        RoPE's frequency scaling, in the form of a Hugging Face config's
        ``rope_parameters``: ``{"rope_type": "linear" | "dynamic" | "llama3"
        | "yarn" | "longrope", ...}`` with that scheme's keys (see
        :func:`rope_frequencies`); default plain RoPE.
    max_position_embeddings : int, optional
        The model's context length, which ``"dynamic"`` scaling and the
        fallbacks of ``"yarn"`` and ``"longrope"`` read.
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

    @refuse_foreign(LAYER_INIT_KEYWORDS, "MultiHeadAttention")
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        xp: Namespace | None = None,
        device: Device | None = None,
        dtype: DType | None = None,
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
        head_dim: int | None = None,
        scale: float | None = None,
        qk_norm: Literal["layer", "rms"] = "layer",
        qk_norm_eps: float = 1e-6,
        qk_norm_offset: float = 0.0,
        qk_norm_bias: bool = False,
        qk_norm_per_head: bool = False,
        sinks: bool = False,
        rope_scaling: Mapping[str, Any] | None = None,
        max_position_embeddings: int | None = None,
    ) -> None:
        config = LayerConfig.from_options(
            embed_dim, num_heads, num_kv_heads=num_kv_heads, kdim=kdim, vdim=vdim, bias=bias,
            add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, normalize_qk=normalize_qk,
            rotary=rotary, rotary_base=rotary_base, rotary_interleaved=rotary_interleaved,
            rotary_dim=rotary_dim, window=window, alibi=alibi, softcap=softcap, dropout=dropout,
            head_dim=head_dim, scale=scale, qk_norm=qk_norm, qk_norm_eps=qk_norm_eps,
            qk_norm_offset=qk_norm_offset, qk_norm_bias=qk_norm_bias,
            qk_norm_per_head=qk_norm_per_head, sinks=sinks,
            rope_scaling=None if rope_scaling is None else dict(rope_scaling),
            max_position_embeddings=max_position_embeddings)
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

    def _adopt(self, params: dict[str, AnyArray], config: LayerConfig, xp: ModuleType) -> None:
        """Validate the arrays of a complete parameter dict (torch names)
        against ``config`` and adopt them, in torch's order."""
        self._device, self._dtype = check_param_arrays(params, xp)
        check_param_shapes(config, {name: tuple(w.shape) for name, w in params.items()})
        order = param_shapes(config, packed="in_proj_weight" in params)
        self._params = {name: params[name] for name in order}
        self._xp, self._config = xp, config
        # What every call reads, made once: a layer never changes.
        self._prepared = LayerState.prepare(self._params, config, xp, self._device, self._dtype)
        # What this layer's caches carry: a layer accepts only its own (and
        # caches made by hand), since a cache holds keys projected with its weights.
        self._cache_owner = CacheOwner()

    @classmethod
    def _from_params(
        cls, params: dict[str, AnyArray], num_heads: Any, xp: Any, device: Any,
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
        xp: Namespace | None = None,
        device: Device | None = None,
        bias_k: Array | None = None,
        bias_v: Array | None = None,
        q_norm_weight: Array | None = None,
        k_norm_weight: Array | None = None,
        q_norm_bias: Array | None = None,
        k_norm_bias: Array | None = None,
        sinks: Array | None = None,
        **options: Any,
    ) -> MultiHeadAttention:
        """Build a layer from projection weights in torch's ``Linear`` layout.

        Parameters
        ----------
        q_weight : array, shape (num_heads * head_dim, E)
            Query projection, ``q = query @ q_weight.T + q_bias``; usually
            ``(E, E)``, with ``head_dim = E // num_heads``.
        k_weight : array, shape (E, kdim) or (num_kv_heads * head_dim, kdim)
            Key projection; fewer rows than ``E`` make a grouped-query layer.
        v_weight : array, shape (E, vdim) or (num_kv_heads * head_dim, vdim)
            Value projection.
        out_weight : array, shape (E, num_heads * head_dim)
            Output projection ``W_O``; its columns give ``head_dim``.
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
        q_norm_weight, k_norm_weight : array, optional
            Scales of the QK normalisation (both or neither; ``normalize_qk``):
            ``(head_dim,)`` shared by the heads, or ``(num_heads, head_dim)``
            and ``(num_kv_heads, head_dim)`` per head.
        q_norm_bias, k_norm_bias : array, optional
            Biases of a LayerNorm QK normalisation, shaped as its scales.
        sinks : array, shape (num_heads,), optional
            Attention-sink logits, one per query head (see ``sinks``).
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
        weights: dict[str, AnyArray] = {"q_weight": q_weight, "k_weight": k_weight,
                                        "v_weight": v_weight, "out_weight": out_weight}
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
        params = state_dict_from_weights(w, b, num_heads, layer_xp)
        for name, a in (("bias_k", bias_k), ("bias_v", bias_v), ("q_norm.weight", q_norm_weight),
                        ("k_norm.weight", k_norm_weight), ("q_norm.bias", q_norm_bias),
                        ("k_norm.bias", k_norm_bias), ("sinks", sinks)):
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
        xp: Namespace | None = None,
        device: Device | None = None,
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
        cls, module: Any, *, xp: Namespace | None = None, device: Device | None = None
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

    @classmethod
    def from_transformers(
        cls, module: Any, config: Any, *, xp: Namespace | None = None,
        device: Device | None = None, dtype: DType | None = None,
    ) -> MultiHeadAttention:
        """Port the attention module of a Hugging Face transformers model.

        Parameters
        ----------
        module : torch.nn.Module
            One layer's attention, e.g. ``model.model.layers[i].self_attn``
            (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi, gpt-oss),
            ``model.transformer.h[i].attn`` (GPT-2), ``.attention`` (GPT-NeoX)
            or ``.self_attention`` (BLOOM, Falcon), ``encoder.layer[i].attention``
            (BERT), a decoder layer's ``encoder_attn`` (Whisper, BART) or
            ``layer[1].EncDecAttention`` (T5); see :doc:`/user_guide/porting_hf` for the
            table of families.
        config : transformers.PretrainedConfig
            The model's configuration (``model.config``): it holds the head
            counts, RoPE and its scaling, the window of each layer, the
            soft-cap and the norms' epsilon, which the module does not.
        xp : module, optional
            Namespace for the layer; default NumPy. ``xp=torch`` keeps torch
            tensors.
        device : optional
            Device for the layer; default the namespace's default device.
        dtype : optional
            Floating dtype for the layer (of ``xp``); default the module's.

        Returns
        -------
        MultiHeadAttention
            A layer whose call on the module's hidden states gives the
            module's output, with ``is_causal=True`` for decoders'
            self-attention (and ``key=`` the encoder's states for
            cross-attention); its cache decodes as the model generates.

        Raises
        ------
        TypeError
            ``module`` is not an attention module of a supported family.
        ValueError
            ``config`` does not describe ``module`` (head counts that do not
            fit its weights), or options mha_xp cannot express.
        """
        from ._hf import port_module  # the families' ports; torch is imported only here

        ported = port_module(module, config)  # its tensors are detached copies already
        layer = cls._from_params(dict(ported.state_dict), ported.num_heads,
                                 np if xp is None else xp, device,
                                 check_option_names(ported.options), ported.num_kv_heads)
        return layer if dtype is None else layer.to(dtype=dtype)

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

    def to(self, *, xp: Namespace | None = None, device: Device | None = None,
           dtype: DType | None = None) -> MultiHeadAttention:
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
            never modifies weights in place). Caches of this layer do not
            carry over: make the new layer's own with :meth:`init_cache` (see
            :class:`KVCache` to carry one over by hand).

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

    embed_dim = _size("embed_dim", "Model width ``E`` of queries and outputs.")
    num_heads = _size("num_heads", "Number of query heads ``H``.")
    num_kv_heads = _size("num_kv_heads",
                         "Number of key/value heads (``num_heads`` unless grouped-query).")
    head_dim = _size("head_dim", "Features per head, ``embed_dim // num_heads``.")
    kdim = _size("kdim", "Feature size of keys.")
    vdim = _size("vdim", "Feature size of values.")

    @property
    def xp(self) -> Namespace:
        """The weights' array-API-compatible namespace."""
        return self._xp

    @property
    def device(self) -> Device:
        """The weights' device."""
        return self._device

    @property
    def dtype(self) -> DType:
        """The weights' dtype."""
        return self._dtype

    def __repr__(self) -> str:
        return (
            f"MultiHeadAttention({self._config.repr_args()}, xp={lib_name(self._xp)}, "
            f"device={self._device}, dtype={dtype_name(self._dtype)})"
        )

    # -- the call ----------------------------------------------------------

    @overload
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
        return_weights: Literal[False] = False,
        average_weights: bool = True,
        chunk_size: int | tuple[int, int] | None = None,
        memory_budget: int | None = None,
        num_threads: int | None = None,
        cache: None = None,
        training: bool = False,
        dropout_seed: int | None = None,
        score_mod: ScoreMod | None = None,
        mask_mod: MaskMod | None = None,
        block_mask: BlockMask | None = None,
    ) -> Array: ...

    @overload
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
        return_weights: Literal[True],
        average_weights: bool = True,
        chunk_size: int | tuple[int, int] | None = None,
        memory_budget: int | None = None,
        num_threads: int | None = None,
        cache: None = None,
        training: bool = False,
        dropout_seed: int | None = None,
        score_mod: ScoreMod | None = None,
        mask_mod: MaskMod | None = None,
        block_mask: BlockMask | None = None,
    ) -> tuple[Array, Array]: ...

    @overload
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
        return_weights: Literal[False] = False,
        average_weights: bool = True,
        chunk_size: int | tuple[int, int] | None = None,
        memory_budget: int | None = None,
        num_threads: int | None = None,
        cache: KVCache,
        training: bool = False,
        dropout_seed: int | None = None,
        score_mod: ScoreMod | None = None,
        mask_mod: MaskMod | None = None,
        block_mask: BlockMask | None = None,
    ) -> tuple[Array, KVCache]: ...

    @overload
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
        return_weights: Literal[True],
        average_weights: bool = True,
        chunk_size: int | tuple[int, int] | None = None,
        memory_budget: int | None = None,
        num_threads: int | None = None,
        cache: KVCache,
        training: bool = False,
        dropout_seed: int | None = None,
        score_mod: ScoreMod | None = None,
        mask_mod: MaskMod | None = None,
        block_mask: BlockMask | None = None,
    ) -> tuple[Array, Array, KVCache]: ...

    @overload
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
        num_threads: int | None = None,
        cache: KVCache | None = None,
        training: bool = False,
        dropout_seed: int | None = None,
        score_mod: ScoreMod | None = None,
        mask_mod: MaskMod | None = None,
        block_mask: BlockMask | None = None,
    ) -> Array | tuple[Array, Array] | tuple[Array, KVCache] | tuple[Array, Array, KVCache]: ...

    @refuse_foreign(LAYER_CALL_KEYWORDS, "MultiHeadAttention")
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
        num_threads: int | None = None,
        cache: KVCache | None = None,
        training: bool = False,
        dropout_seed: int | None = None,
        score_mod: ScoreMod | None = None,
        mask_mod: MaskMod | None = None,
        block_mask: BlockMask | None = None,
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
            NaN or Inf. With a ``cache``, see there.
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
        num_threads : int, optional
            Threads of the parallel CPU executor for the attention of large
            calls on NumPy arrays (1: serially); default
            :func:`get_num_threads`. See :func:`scaled_dot_product_attention`.
        cache : KVCache, optional
            Incremental decoding (self-attention only, with
            ``is_causal=True``; no ``key``, ``value``, ``mask`` or ``bias``):
            the query's keys and values are written into the cache after
            those already there, and the query attends causally to all of
            them. Make one with :meth:`init_cache`. Prefill, single steps and
            chunks of any size give the outputs of causal self-attention over
            the whole sequence. With ``key_padding_mask``, the padding takes
            no slot and each sequence keeps its own length
            (``cache.length`` becomes ``(B,)``) and RoPE positions: a batch
            of left- or right-padded prompts, and steps in which finished
            sequences are marked as padding, decode each sequence as if it
            ran alone (the outputs at padding positions are meaningless, as
            in any padded batch, but finite).
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
            not floating; a non-boolean mask; a ``cache`` that is not a
            :class:`KVCache`, or of another library or dtype.
        ValueError
            Inputs on another device; wrong ranks or sizes; ``training=True``
            with ``dropout > 0`` and no ``dropout_seed``, or with a ``cache``;
            a ``cache`` that another layer made (see :class:`KVCache`), on
            another device, of the wrong shape, or without room for the query
            (where its length can be read for free).
        MemoryError
            With ``return_weights=True``, before anything is computed, when
            the weights cannot fit in the host memory available: NumPy,
            array-api-strict, torch on the CPU and JAX on a CPU device, for
            score tensors over 16 MiB, against the least of the system's
            available memory, the process's cgroup limit and its
            address-space limit (``RLIMIT_AS``). The chunked path holds about
            twice the weights while it assembles them, and that is what is
            compared. Under ``jax.jit`` the check runs when the function is
            traced.
        """
        call = self._check_call(query, key, value, key_padding_mask, mask, bias, chunk_size)
        return_weights = check_flag("return_weights", return_weights)
        average_weights = check_flag("average_weights", average_weights)
        is_causal = check_flag("is_causal", is_causal)
        dropout = check_training(training, dropout_seed, self._config.dropout)
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache from layer.init_cache(...), got "
                                f"{type(cache).__name__}")
            check_cache_owner(cache, self._cache_owner, xp=self._xp, device=self._device)
            c = self._config
            check_cache_call(cache, call, is_causal=is_causal,
                             cross=key is not None or value is not None,
                             training=dropout is not None,
                             shape=(c.num_kv_heads, cache.max_length, c.head_dim),
                             dtype=self._dtype,
                             rope_type=None if c.rope_scaling is None
                             else c.rope_scaling["rope_type"])
        mods = self._modifiers(call, cache, score_mod, mask_mod, block_mask)
        out, weights, _, cache = layer_forward(
            self._state(), call, is_causal=is_causal, cache=cache, dropout=dropout, mods=mods,
            request=Request(return_weights=return_weights,
                            chunk_size=block_chunks(call.chunk_size, block_mask),
                            memory_budget=memory_budget,
                            num_threads=check_num_threads(num_threads)))
        if return_weights:
            if average_weights:
                weights = self._xp.mean(weights, axis=1)
            weights = weights if call.batched else cast(AnyArray, weights)[0, ...]
        # weights is not None where return_weights asked for it.
        if cache is None:
            return (out, cast(AnyArray, weights)) if return_weights else out
        return (out, cast(AnyArray, weights), cache) if return_weights else (out, cache)

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
            ``length`` 0. It belongs to this layer, as do the caches that
            calls with it return: another layer refuses them (also one made
            from this layer by :meth:`to`).

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
                             xp=self._xp, device=self._device, dtype=self._dtype,
                             owner=self._cache_owner)

    @refuse_foreign(LAYER_CALL_KEYWORDS, "MultiHeadAttention.vjp")
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
        num_threads: int | None = None,
        training: bool = False,
        dropout_seed: int | None = None,
        score_mod: ScoreMod | None = None,
        mask_mod: MaskMod | None = None,
        block_mask: BlockMask | None = None,
        score_mod_vjp: ScoreModVJP | None = None,
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
        num_threads
            As in :meth:`__call__`, for the forward and ``backward``.
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
        MemoryError
            Never from mha_xp's memory guard, which checks only the weights
            of ``return_weights=True`` (the forward keeps the per-row
            statistics, not the weights, and the planner keeps the dense
            path within a quarter of the host memory available); only the
            array library's own, when one of its allocations fails.

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
        dropout = check_training(training, dropout_seed, self._config.dropout)
        threads = check_num_threads(num_threads)
        state = self._state()
        mods = self._modifiers(call, None, score_mod, mask_mod, block_mask, score_mod_vjp,
                               vjp=True)
        chunks = block_chunks(call.chunk_size, block_mask)
        out, _, res, _ = layer_forward(
            state, call, is_causal=is_causal, dropout=dropout, mods=mods,
            request=Request(return_stats=True, chunk_size=chunks,
                            memory_budget=memory_budget, num_threads=threads))

        def backward(grad_out: Array) -> dict[str, Array]:
            check_grad(grad_out, out, xp=self._xp, name="grad_out")
            with threads_for(threads):
                return layer_backward(state, call, cast(Residuals, res), grad_out, chunks)

        return out, backward

    # -- internals of the call -----------------------------------------------

    def _state(self) -> LayerState:
        return self._prepared

    def _modifiers(self, call: Any, cache: KVCache | None, score_mod: Any, mask_mod: Any,
                   block_mask: Any, score_mod_vjp: Any = None, *,
                   vjp: bool = False) -> dict[str, Any]:
        """The spec's modifier fields of a call (see :func:`check_modifiers`)."""
        c = self._config
        B, L = call.query.shape[0], call.query.shape[1]
        S = (call.key.shape[1] if cache is None else cache.max_length) + (
            c.add_bias_kv + c.add_zero_attn)
        return check_modifiers(self._xp, self._device, compute_dtype(self._dtype, self._xp),
                               (B, c.num_heads, L, S), score_mod, mask_mod, block_mask,
                               score_mod_vjp, vjp=vjp)

    def _check_call(self, query: AnyArray, key: AnyArray | None, value: AnyArray | None,
                    key_padding_mask: AnyArray | None, mask: AnyArray | None,
                    bias: AnyArray | None, chunk_size: Any) -> Any:
        return check_layer_call(query, key, value, key_padding_mask, mask, bias, chunk_size,
                                xp=self._xp, device=self._device, dtype=self._dtype,
                                config=self._config)
