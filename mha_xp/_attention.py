"""Scaled dot-product attention: the public functions.

Each one validates its arguments (:mod:`mha_xp._checks`), builds one
:class:`~mha_xp._spec.AttentionSpec`, asks the planner how to compute it
(:mod:`mha_xp._core._plan`) and calls the core (:mod:`mha_xp._core`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from types import ModuleType, SimpleNamespace
from typing import Any, Literal, cast, overload

from ._blocks import BlockMask, block_chunks, check_modifiers
from ._checks import (
    check_alibi_slopes,
    check_bias,
    check_chunk_size,
    check_cu_seqlens,
    check_dropout,
    check_flag,
    check_gqa,
    check_grad,
    check_mask,
    check_num_threads,
    check_positive_int,
    check_same_dtype,
    check_scale,
    check_sdpa_shapes,
    check_sinks,
    check_softcap,
    check_window,
)
from ._core._backward import Saved
from ._core._dispatch import attend_backward as core_backward
from ._core._finite import underflow_ignored
from ._core._positions import standard_alibi_slopes
from ._lib._backends import host_readable
from ._lib._namespace import Array as AnyArray
from ._lib._namespace import common_namespace, compute_dtype, dtype_name
from ._lib._softmax import lse_from_stats, merge_partials
from ._porting import FUNCTION_KEYWORDS, refuse_foreign
from ._run import run_attention, threads_for
from ._spec import AttentionSpec, Request
from .typing import Array, MaskMod, ScoreMod, ScoreModVJP

__all__ = [
    "alibi_slopes",
    "attention_vjp",
    "attention_with_lse",
    "merge_attention",
    "scaled_dot_product_attention",
]


def alibi_slopes(num_heads: int) -> list[float]:
    """The standard ALiBi slopes for ``num_heads`` heads, as Python floats.

    For ``n`` a power of two, the geometric sequence ``2**(-8 k / n)``,
    ``k = 1 .. n``; otherwise the slopes of the closest smaller power of two
    ``c``, followed by the first ``n - c`` of the odd-numbered slopes for
    ``2 c`` heads (Press et al., "Train Short, Test Long", and the
    reference implementation of the paper and BLOOM).

    Parameters
    ----------
    num_heads : int
        The number of (query) heads, positive.

    Returns
    -------
    list of float
        ``num_heads`` slopes, largest first; a plain list, so that it goes to
        any library and device with ``xp.asarray(slopes, dtype=...,
        device=...)`` (the attention functions also take it as it is).

    Raises
    ------
    TypeError, ValueError
        ``num_heads`` that is not a positive int.

    Examples
    --------
    >>> import mha_xp
    >>> mha_xp.alibi_slopes(8)
    [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
    >>> [round(s, 4) for s in mha_xp.alibi_slopes(6)]
    [0.25, 0.0625, 0.0156, 0.0039, 0.5, 0.125]
    """
    return standard_alibi_slopes(check_positive_int("num_heads", num_heads))


def _index_array(name: str, x: Any, xp: ModuleType, dev: Any) -> tuple[AnyArray, bool, Any]:
    """``x`` as an integer array of ``xp`` on ``dev`` (a Python sequence of
    ints is converted), whether its values may be read for validation, and
    the Python ints themselves when it was a sequence (read on the host)."""
    if isinstance(x, (list, tuple)):
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in x):
            raise TypeError(f"{name} must be an integer array or a list of ints, got {x!r}")
        return xp.asarray(x, device=dev), True, list(x)
    common_namespace((xp, dev, "pass it with the inputs' library and device"), **{name: x})
    return x, host_readable(x), None


def _packed(xp: ModuleType, dev: Any, L: int, S: int, cu_seqlens_q: Any,
            cu_seqlens_k: Any) -> dict[str, AnyArray]:
    """The spec's ``q_seg``, ``k_seg`` and ``q_diag`` of packed sequences."""
    if cu_seqlens_q is None:
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k needs cu_seqlens_q (the queries' sequences)")
        return {}
    same = cu_seqlens_k is None or cu_seqlens_k is cu_seqlens_q
    cu_q, readable, host = _index_array("cu_seqlens_q", cu_seqlens_q, xp, dev)
    if same and L != S:
        raise ValueError(
            f"cu_seqlens_k defaults to cu_seqlens_q, which needs as many keys as queries, "
            f"got L = {L} and S = {S}: pass cu_seqlens_k"
        )
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_q, L, xp, readable, host)
    cu_k = cu_q
    if not same:
        cu_k, readable, host = _index_array("cu_seqlens_k", cu_seqlens_k, xp, dev)
        cu_k = check_cu_seqlens("cu_seqlens_k", cu_k, S, xp, readable, host)
        if cu_k.shape[0] != cu_q.shape[0]:
            raise ValueError(
                f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got "
                f"shapes {tuple(cu_q.shape)} and {tuple(cu_k.shape)}"
            )
        if cu_k.dtype != cu_q.dtype:
            cu_k = xp.astype(cu_k, cu_q.dtype)
    # On the device, by binary search: no host round trip.
    q_seg = xp.searchsorted(cu_q, xp.arange(L, dtype=cu_q.dtype, device=dev), side="right") - 1
    if same:
        return {"q_seg": q_seg, "k_seg": q_seg}
    k_seg = xp.searchsorted(cu_k, xp.arange(S, dtype=cu_k.dtype, device=dev), side="right") - 1
    # The key bottom-right aligned with query i of sequence n: i - end_q(n) + end_k(n).
    q_diag = xp.arange(L, dtype=cu_q.dtype, device=dev) + xp.take(cu_k - cu_q, q_seg + 1, axis=0)
    return {"q_seg": q_seg, "k_seg": k_seg, "q_diag": q_diag}


def _neg_slopes(xp: ModuleType, dev: Any, dtype: Any, scores_shape: tuple[int, ...],
                alibi_slopes: Any) -> AnyArray | None:
    """Minus the ALiBi slopes, in the compute dtype, shaped to broadcast
    against the leading shape followed by ``(1, 1)``."""
    if alibi_slopes is None:
        return None
    work = compute_dtype(dtype, xp)
    if isinstance(alibi_slopes, (list, tuple)):
        for i, a in enumerate(alibi_slopes):  # read on the host, as given
            if isinstance(a, numbers.Real) and not math.isfinite(a):
                raise ValueError(f"alibi_slopes must hold finite slopes, got {a} at index {i}")
        alibi_slopes = xp.asarray(alibi_slopes, dtype=work, device=dev)
    else:
        common_namespace((xp, dev, "pass it with the inputs' library and device"),
                         alibi_slopes=alibi_slopes)
    check_alibi_slopes(alibi_slopes, dtype, scores_shape, xp)
    neg = -xp.astype(alibi_slopes, work)
    return xp.reshape(neg, tuple(neg.shape) + (1, 1))


def _scores_shape(query: AnyArray, key: AnyArray, value: AnyArray, groups: tuple[int, int] | None,
                  ) -> tuple[int, ...]:
    """The validated shape of the scores, ``(..., H, L, S)``."""
    if groups is None:
        return check_sdpa_shapes(query, key, value)
    # The shapes the core works on: (..., Hkv, G, L, D) against (..., Hkv, 1, S, D).
    q, k, v = (SimpleNamespace(shape=t.shape[:-3] + h + t.shape[-2:])
               for t, h in ((query, groups), (key, (key.shape[-3], 1)),
                            (value, (value.shape[-3], 1))))
    shape = check_sdpa_shapes(q, k, v)
    return shape[:-4] + (math.prod(shape[-4:-2]),) + shape[-2:]


def _validate(
    query: AnyArray, key: AnyArray, value: AnyArray, mask: AnyArray | None, bias: AnyArray | None,
    is_causal: Any, scale: Any, enable_gqa: Any, window: Any, alibi_slopes: Any, softcap: Any,
    cu_seqlens_q: Any, cu_seqlens_k: Any, dropout_p: Any, seed: Any, sinks: Any = None,
    mods: tuple[Any, Any, Any, Any] = (None, None, None, None), vjp: bool = False,
) -> tuple[ModuleType, AttentionSpec]:
    """The public attention functions' validation: the namespace and the spec
    (``mods``: ``score_mod``, ``mask_mod``, ``block_mask``, ``score_mod_vjp``)."""
    xp, dev = common_namespace(query=query, key=key, value=value, mask=mask, bias=bias,
                               sinks=sinks)
    dtype = check_same_dtype(xp, query=query, key=key, value=value)
    scores_shape = _scores_shape(query, key, value, check_gqa(query, key, value, enable_gqa))
    labels = "(..., H, L, S)"
    if mask is not None:
        check_mask(mask, scores_shape, xp, labels)
    if bias is not None:
        check_bias(bias, dtype, scores_shape, xp, labels)
    window, softcap = check_window(window), check_softcap(softcap)
    neg_slopes = _neg_slopes(xp, dev, dtype, scores_shape, alibi_slopes)
    packed = _packed(xp, dev, scores_shape[-2], scores_shape[-1], cu_seqlens_q, cu_seqlens_k)
    work = compute_dtype(dtype, xp)
    if sinks is not None:
        check_sinks(sinks, dtype, scores_shape, xp)
        # (H, 1) against the rows' (..., H, L) statistics; 0-d for (L, D) inputs.
        sinks = xp.reshape(sinks if work == dtype else xp.astype(sinks, work),
                           (-1, 1) if len(scores_shape) >= 3 else ())
    modifiers = check_modifiers(xp, dev, work, scores_shape, *mods, vjp=vjp)
    spec = AttentionSpec(
        scale=check_scale(scale, query.shape[-1], work, xp),
        mask=mask, bias=bias, sinks=sinks, **modifiers,
        is_causal=check_flag("is_causal", is_causal), window=window, softcap=softcap,
        neg_slopes=neg_slopes, dropout=check_dropout(dropout_p, seed), **packed)
    return xp, spec


@overload
def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_weights: Literal[False] = False,
    chunk_size: int | tuple[int, int] | None = None,
    memory_budget: int | None = None,
    num_threads: int | None = None,
    enable_gqa: bool | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Array | Sequence[float] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Array | Sequence[int] | None = None,
    cu_seqlens_k: Array | Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    sinks: Array | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_mask: BlockMask | None = None,
) -> Array: ...


@overload
def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_weights: Literal[True],
    chunk_size: int | tuple[int, int] | None = None,
    memory_budget: int | None = None,
    num_threads: int | None = None,
    enable_gqa: bool | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Array | Sequence[float] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Array | Sequence[int] | None = None,
    cu_seqlens_k: Array | Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    sinks: Array | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_mask: BlockMask | None = None,
) -> tuple[Array, Array]: ...


@overload
def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    chunk_size: int | tuple[int, int] | None = None,
    memory_budget: int | None = None,
    num_threads: int | None = None,
    enable_gqa: bool | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Array | Sequence[float] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Array | Sequence[int] | None = None,
    cu_seqlens_k: Array | Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    sinks: Array | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_mask: BlockMask | None = None,
) -> Array | tuple[Array, Array]: ...


@refuse_foreign(FUNCTION_KEYWORDS)
def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    chunk_size: int | tuple[int, int] | None = None,
    memory_budget: int | None = None,
    num_threads: int | None = None,
    enable_gqa: bool | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Array | Sequence[float] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Array | Sequence[int] | None = None,
    cu_seqlens_k: Array | Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    sinks: Array | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_mask: BlockMask | None = None,
) -> Array | tuple[Array, Array]:
    r"""Scaled dot-product attention on any array API library.

    Computes :math:`\mathrm{softmax}(Q K^T \cdot \mathrm{scale} + \mathrm{bias})\, V`
    over the keys that ``mask`` and ``is_causal`` allow, for every leading
    (batch, head) index at once. The result is an array of the inputs'
    library, on their device, with their dtype.

    Parameters
    ----------
    query : array, shape (..., H, L, D)
        Queries, real floating (float16, float32 or float64).
    key : array, shape (..., Hkv, S, D)
        Keys, same library, device and dtype as ``query``. ``Hkv`` may divide
        the query heads ``H`` (grouped-query attention, see ``enable_gqa``).
    value : array, shape (..., Hkv, S, Dv)
        Values, same library, device and dtype as ``query``.
    mask : array of bool, optional
        Broadcastable to ``(..., H, L, S)``. **True means "may attend"**, as in
        torch's SDPA, JAX, Flax and Keras (the opposite of
        ``torch.nn.MultiheadAttention``'s boolean ``attn_mask``).
    bias : array, optional
        Float array added to the scaled scores, broadcastable to
        ``(..., H, L, S)``, with the inputs' dtype. ``-inf`` entries mask.
    is_causal : bool, default False
        Causal masking aligned **bottom-right**: query ``i`` sees keys
        ``j <= i + S - L`` (FlashAttention's convention); for ``L == S`` the
        usual lower triangle. Combined with ``mask`` by logical AND.
    scale : float, optional
        Positive finite factor on ``Q K^T``, at most the largest finite
        value of the dtype attention is computed in (float32 for 16-bit
        inputs); default ``1 / sqrt(D)``.
    return_weights : bool, default False
        Also return the attention weights.
    chunk_size : int or (int, int), optional
        Force the chunked path with this block size (one int for queries and
        keys, or ``(query_block, key_block)``).
    memory_budget : int, optional
        Bytes the dense ``(..., H, L, S)`` score tensor may take before the
        chunked path is used instead; default :func:`get_memory_budget`
        (128 MiB unless configured).
    num_threads : int, optional
        Threads of the parallel CPU executor, which runs large calls on plain
        NumPy arrays in blocks on a pool of threads (1: serially); default
        :func:`get_num_threads`. The result is the serial one to rounding
        (see :func:`num_threads`), and the same on every run.
        Ignored by other libraries and by calls too small to gain.
    enable_gqa : bool, optional
        Grouped-query (and multi-query) attention, as torch's SDPA and
        FlashAttention: with ``H = G * Hkv`` query heads and ``Hkv`` key/value
        heads, query head ``h`` attends with key/value head ``h // G``. None
        (the default) infers it from the shapes; False makes such shapes an
        error, as in torch; True allows them. The keys and values are never
        copied per query head (the queries are reshaped to
        ``(..., Hkv, G, L, D)``); ``mask`` and ``bias`` refer to the query
        heads, ``(..., H, L, S)``.
    window : (int, int), optional
        Sliding-window (local) attention, FlashAttention's ``window_size``:
        ``(left, right)`` aligned bottom-right, so that query ``i`` sees key
        ``j`` iff ``i + S - L - left <= j <= i + S - L + right``; ``-1`` (any
        negative) leaves that side unbounded. Combined with ``is_causal`` and
        ``mask`` by logical AND; the chunked path skips the key blocks
        outside the window.
    alibi_slopes : array or sequence of float, optional
        ALiBi: adds ``-slope * |i + S - L - j|`` to the scaled scores, one
        slope per query head, shape ``(H,)``, or per batch entry and head,
        ``(B, H)``; an array of the inputs' library, device and dtype (or
        float32), or a list such as :func:`alibi_slopes` returns. No gradient
        is computed for the slopes.
    softcap : float, optional
        Logit soft-capping (Gemma 2, FlashAttention): the scaled scores
        ``s`` become ``softcap * tanh(s / softcap)`` before ``bias``, ALiBi
        and masking. Positive.
    cu_seqlens_q : array of int or sequence of int, optional
        Packed variable-length sequences (FlashAttention's varlen API): the
        queries on axis -2 are ``N`` sequences one after the other, sequence
        ``n`` taking positions ``cu_seqlens_q[n]`` to ``cu_seqlens_q[n+1]``;
        shape ``(N + 1,)``, starting at 0, non-decreasing, ending at ``L``;
        any integer dtype, signed or unsigned (cast to the namespace's
        default integer dtype first, so that the differences of query and
        key boundaries cannot wrap around). No query attends to a key of
        another sequence, and ``is_causal``, ``window`` and ALiBi are
        aligned bottom-right within each sequence: the result equals
        attention over each sequence on its own (a query
        whose sequence has no key gets zeros). The sequence of every
        position is found on the device (``searchsorted``). The values are
        validated for NumPy, array-api-strict and CPU torch arrays; on GPU,
        lazy (Dask) or traced (JAX) arrays reading them would synchronise or
        compute, so there only dtype and shape are checked and invalid
        values give undefined results.
    cu_seqlens_k : array of int or sequence of int, optional
        The keys' sequences, as ``cu_seqlens_q`` (ending at ``S``); default
        ``cu_seqlens_q`` (then ``L`` must equal ``S``).
    dropout_p : float, default 0.0
        Dropout on the attention weights, off by default: each weight is
        dropped with probability ``dropout_p`` and the kept ones are scaled
        by ``1 / (1 - dropout_p)``, ``out = (P * Z / (1 - dropout_p)) V``.
        The keep-mask ``Z`` is a counter-based random function
        (Threefry-2x32) of ``seed`` and the global position ``(n, i, j)`` of
        each weight: ``n`` is the C-order flattened index over the broadcast
        leading shape of the output ``(..., H)`` (with grouped-query
        attention, over the query heads), ``i`` the query row and ``j`` the
        key column. The same seed thus drops the same entries, bit for bit,
        on every library and device, on the dense and the chunked paths and
        in every Dask block; the backward regenerates the mask instead of
        storing it. ``1.0`` drops everything (the output is zero); ``0.0``
        is attention without dropout, exactly. The mask is generated faster
        in blocks, so with dropout the dense path is taken only for score
        tensors of at most 2**21 elements that fit half of
        ``memory_budget``; larger calls take the chunked path.
    seed : int, optional
        The key of the dropout mask, in ``[0, 2**64)``; required when
        ``dropout_p > 0``, since mha_xp keeps no global random state. Pass a
        new seed for every training step.
    sinks : array, shape (H,), optional
        Attention sinks (gpt-oss; "StreamingLLM", Xiao et al. 2023): one
        logit per query head that joins every row's softmax and contributes
        no value, ``P_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij))``, so
        that a row may give less than all of its weight to the keys (a row
        with no key left gives all of it to the sink: zeros). Of the
        inputs' library, device and dtype. The result equals
        :func:`merge_attention` of :func:`attention_with_lse`'s result with
        a zero output of log-sum-exp ``sink``, bit for bit (up to the sign
        of zeros); the weights returned are those over the keys.

    Returns
    -------
    out : array, shape (..., H, L, Dv)
        The attention output. A query row with no key left to attend to gives
        zeros (never NaN).
    weights : array, shape (..., H, L, S)
        Only with ``return_weights=True``: the softmax weights; each row sums
        to 1, or is all zero for a fully masked row. With dropout, the
        weights **before** dropout, as Keras and Flax return them
        (``torch.nn.MultiheadAttention`` returns them after dropout).

    Raises
    ------
    TypeError
        Non-array inputs, mixed array libraries, non-floating or mixed dtypes,
        a non-boolean ``mask``, a non-float ``bias``, a non-numeric ``scale``,
        a non-bool ``enable_gqa``, a ``window`` that is not a pair of ints,
        ``alibi_slopes`` of a wrong dtype, non-integer ``cu_seqlens_q`` or
        ``cu_seqlens_k``, a non-real ``dropout_p`` or a non-int ``seed``.
    ValueError
        Arrays on different devices, wrong ranks, mismatched shapes (query
        heads that are not a multiple of the key/value heads), a mask or
        bias that does not broadcast, a ``scale`` or ``softcap`` that is not
        positive and finite, a ``scale`` beyond the largest finite value of
        the compute dtype (it would make every score infinite: the message
        names that value), a bad ``chunk_size`` or ``memory_budget``,
        ``alibi_slopes`` of a wrong shape, ``cu_seqlens_q``/``cu_seqlens_k``
        that are not cumulative lengths of the packed axis, ``dropout_p``
        outside ``[0, 1]``, ``dropout_p > 0`` without a ``seed``, a ``seed``
        outside ``[0, 2**64)``.
    MemoryError
        With ``return_weights=True``, before anything is computed, when the
        weights cannot fit in the host memory available: for NumPy,
        array-api-strict, torch on the CPU and JAX on a CPU device, and score
        tensors over 16 MiB, the bytes the call holds at its peak (on the
        chunked path about twice the weights, which it assembles block by
        block) against the least of the system's available memory, the
        process's cgroup limit (less its usage) and its address-space limit
        (``RLIMIT_AS``). Under ``jax.jit`` the check runs when the function
        is traced; on GPUs and Dask there is none.

    See Also
    --------
    attention_with_lse : The same, returning the per-row log-sum-exp.
    memory_budget : Set the budget for a block of code.

    Notes
    -----
    Two paths give the same numbers (to rounding): the dense one materialises
    the ``(..., H, L, S)`` scores; the chunked one (FlashAttention-2's
    online softmax over key blocks) needs memory linear in ``L`` and ``S`` and
    skips key blocks above the causal diagonal. The dense path is taken while
    its score tensor fits ``memory_budget``. With ``return_weights=True`` the
    chunked path recomputes the weights block by block from the log-sum-exp,
    so the output is the same whether or not weights are asked for. 16-bit
    inputs are computed in float32 and the results cast back.

    A key hidden from a query (by ``mask``, causal masking, ``window``,
    packed sequences or a ``-inf`` bias) never influences that query,
    whatever its key and value hold, NaN and infinities included, on every
    path: every path computes on copies whose non-finite entries are zero
    (finite entries keep their bits). A query that gives a non-zero weight
    to a key or value holding NaN or ±Inf, or whose own query holds one
    while it sees a key, gets NaN in its whole output row (and weights and
    log-sum-exp), rather than IEEE's mix of NaN and ±Inf in some features.
    Valid input raises no floating-point warning, also under
    ``np.errstate(all="raise")``; NumPy's underflow flag is ignored inside
    the call (underflow to a subnormal or zero is correctly rounded).

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 5, 8))   # (batch, heads, L, D)
    >>> k = rng.standard_normal((2, 4, 7, 8))   # (batch, heads, S, D)
    >>> v = rng.standard_normal((2, 4, 7, 16))
    >>> out, w = mha_xp.scaled_dot_product_attention(q, k, v, is_causal=True,
    ...                                              return_weights=True)
    >>> out.shape, w.shape
    ((2, 4, 5, 16), (2, 4, 5, 7))
    >>> bool(np.allclose(w.sum(axis=-1), 1.0))
    True
    >>> chunked = mha_xp.scaled_dot_product_attention(q, k, v, is_causal=True, chunk_size=3)
    >>> bool(np.allclose(chunked, out))
    True
    """
    xp, spec = _validate(query, key, value, mask, bias, is_causal, scale, enable_gqa, window,
                         alibi_slopes, softcap, cu_seqlens_q, cu_seqlens_k, dropout_p, seed,
                         sinks, (score_mod, mask_mod, block_mask, None))
    return_weights = check_flag("return_weights", return_weights)
    request = Request(return_weights=return_weights,
                      chunk_size=block_chunks(check_chunk_size(chunk_size), block_mask),
                      memory_budget=memory_budget, num_threads=check_num_threads(num_threads))
    out, weights, _ = run_attention(query, key, value, spec, request, xp=xp)
    # weights is not None: asked for by return_weights.
    return (out, cast(AnyArray, weights)) if return_weights else out


@refuse_foreign(FUNCTION_KEYWORDS)
def attention_with_lse(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    memory_budget: int | None = None,
    num_threads: int | None = None,
    enable_gqa: bool | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Array | Sequence[float] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Array | Sequence[int] | None = None,
    cu_seqlens_k: Array | Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    sinks: Array | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_mask: BlockMask | None = None,
) -> tuple[Array, Array]:
    """Attention output and the per-row log-sum-exp of the scores.

    The building block of split-key and distributed attention: attention over
    disjoint key sets, merged with :func:`merge_attention`, equals attention
    over their union.

    Parameters
    ----------
    query, key, value, mask, bias, is_causal, scale, chunk_size, memory_budget
        As in :func:`scaled_dot_product_attention`.
    num_threads
        As in :func:`scaled_dot_product_attention`.
    enable_gqa, window, alibi_slopes, softcap, cu_seqlens_q, cu_seqlens_k
        As in :func:`scaled_dot_product_attention`.
    dropout_p, seed, sinks
        As in :func:`scaled_dot_product_attention`.

    Returns
    -------
    out : array, shape (..., H, L, Dv)
        As :func:`scaled_dot_product_attention` returns it (with dropout,
        ``(P * Z / (1 - dropout_p)) V``).
    lse : array, shape (..., H, L)
        ``log(sum_j exp(s_ij))`` over the allowed keys, with ``s`` the scaled,
        biased scores (with ``sinks``, ``exp(sink)`` joins the sum: merge a
        result with sinks only with results computed without them); ``+inf`` for a row with nothing to attend to (as in
        FlashAttention, so that ``exp(s - lse)`` is 0 there); NaN for a row
        whose output is NaN (one that gives weight to a key or value holding
        NaN or ±Inf, see :func:`scaled_dot_product_attention`). float32 for
        16-bit inputs, the inputs' dtype otherwise. With dropout it is still
        the softmax's, before dropout (``P = exp(s - lse)``; dropout
        rescales the kept weights by ``1 / (1 - dropout_p)`` rather than
        renormalising them), so :func:`merge_attention` of results over
        disjoint key sets computes dropout attention over their union, with
        each part's mask keyed by its own key indices.

    Raises
    ------
    TypeError, ValueError
        As :func:`scaled_dot_product_attention`.
    MemoryError
        Never from mha_xp's memory guard, which checks only the weights of
        ``return_weights=True`` (the planner keeps the dense path within a
        quarter of the host memory available); only the array library's
        own, when one of its allocations fails.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((3, 6, 8)) for _ in range(3))
    >>> out, lse = mha_xp.attention_with_lse(q, k, v)
    >>> s = q @ k.swapaxes(-1, -2) / np.sqrt(8)
    >>> bool(np.allclose(lse, np.log(np.exp(s).sum(axis=-1))))
    True
    """
    xp, spec = _validate(query, key, value, mask, bias, is_causal, scale, enable_gqa, window,
                         alibi_slopes, softcap, cu_seqlens_q, cu_seqlens_k, dropout_p, seed,
                         sinks, (score_mod, mask_mod, block_mask, None))
    request = Request(return_stats=True,
                      chunk_size=block_chunks(check_chunk_size(chunk_size), block_mask),
                      memory_budget=memory_budget, num_threads=check_num_threads(num_threads))
    out, _, stats = run_attention(query, key, value, spec, request, xp=xp)
    return out, lse_from_stats(cast("tuple[AnyArray, AnyArray]", stats), xp=xp)


def merge_attention(out1: Array, lse1: Array, out2: Array, lse2: Array) -> tuple[Array, Array]:
    """Merge two attention results over disjoint key sets of the same queries.

    ``lse = logaddexp(lse1, lse2)`` and
    ``out = exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2``; a row whose
    ``lse`` is infinite on one side (no key there) takes the other side as
    it is, whatever the empty side's output holds, and gets ``out = 0,
    lse = +inf`` if both sides are empty. An empty side may be marked
    ``+inf``, as :func:`attention_with_lse` and FlashAttention write it, or
    ``-inf``, the log of an empty sum, as other libraries do. A NaN ``lse``
    gives NaN.

    Parameters
    ----------
    out1, out2 : array, shape (..., L, Dv)
        Outputs of :func:`attention_with_lse` over the two key sets.
    lse1, lse2 : array, shape (..., L)
        Their log-sum-exps; ``+inf`` or ``-inf`` for a row with no key.

    Returns
    -------
    out : array, shape (..., L, Dv)
    lse : array, shape (..., L)

    Raises
    ------
    TypeError
        Arrays from different libraries or of non-floating dtypes.
    ValueError
        Shapes that do not match.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((4, 8)), rng.standard_normal((10, 8)), rng.standard_normal((10, 3))
    >>> first = mha_xp.attention_with_lse(q, k[:6], v[:6])
    >>> second = mha_xp.attention_with_lse(q, k[6:], v[6:])
    >>> out, lse = mha_xp.merge_attention(*first, *second)
    >>> bool(np.allclose(out, mha_xp.scaled_dot_product_attention(q, k, v)))
    True
    """
    for name, x in (("out1", out1), ("lse1", lse1), ("out2", out2), ("lse2", lse2)):
        if x is None:
            raise TypeError(f"{name} must be an array, got None")
    xp, _ = common_namespace(out1=out1, lse1=lse1, out2=out2, lse2=lse2)
    check_same_dtype(xp, out1=out1, out2=out2)
    check_same_dtype(xp, lse1=lse1, lse2=lse2)
    if out1.ndim < 2:
        raise ValueError(f"out1 and out2 must have shape (..., L, Dv), got {tuple(out1.shape)}")
    if lse1.dtype != compute_dtype(out1.dtype, xp):
        raise TypeError(
            f"lse1 and lse2 have dtype {dtype_name(lse1.dtype)} but out1 and out2 are "
            f"{dtype_name(out1.dtype)}; pass the log-sum-exps attention_with_lse returned "
            f"with them (float32 for 16-bit outputs, the outputs' dtype otherwise)"
        )
    if tuple(out1.shape) != tuple(out2.shape):
        raise ValueError(f"out1 and out2 must have the same shape, got {tuple(out1.shape)} and {tuple(out2.shape)}")
    for name, lse in (("lse1", lse1), ("lse2", lse2)):
        if tuple(lse.shape) != tuple(out1.shape[:-1]):
            raise ValueError(
                f"{name} must have shape {tuple(out1.shape[:-1])} (out1's without the last axis), "
                f"got {tuple(lse.shape)}"
            )
    work = lse1.dtype
    with underflow_ignored(xp):  # as attention itself (mha_xp._core._finite)
        if out1.dtype != work:  # 16-bit outputs come with float32 log-sum-exps
            out, lse = merge_partials(xp.astype(out1, work), lse1, xp.astype(out2, work), lse2,
                                      xp=xp)
            return xp.astype(out, out1.dtype), lse
        return merge_partials(out1, lse1, out2, lse2, xp=xp)


@refuse_foreign(FUNCTION_KEYWORDS)
def attention_vjp(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    memory_budget: int | None = None,
    num_threads: int | None = None,
    enable_gqa: bool | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Array | Sequence[float] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Array | Sequence[int] | None = None,
    cu_seqlens_k: Array | Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    sinks: Array | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_mask: BlockMask | None = None,
    score_mod_vjp: ScoreModVJP | None = None,
) -> tuple[Array, Callable[[Array], dict[str, Array]]]:
    """Attention and a function computing its gradients (vector-Jacobian product).

    For libraries without autodiff (NumPy, CuPy): the forward keeps only its
    output and the per-row log-sum-exp, and the returned ``backward``
    recomputes the attention probabilities block by block (FlashAttention-2),
    so its extra memory is linear in the sequence lengths. The result is
    deterministic: calling ``backward`` twice gives bit-identical gradients.

    Parameters
    ----------
    query, key, value, mask, bias, is_causal, scale, chunk_size, memory_budget
        As in :func:`scaled_dot_product_attention`.
    num_threads
        As in :func:`scaled_dot_product_attention`.
    enable_gqa, window, alibi_slopes, softcap, cu_seqlens_q, cu_seqlens_k
        As in :func:`scaled_dot_product_attention`.
    sinks
        As in :func:`scaled_dot_product_attention`; ``backward`` returns their
        gradient as ``"sinks"``.
    dropout_p, seed
        As in :func:`scaled_dot_product_attention`: ``backward`` differentiates
        through the same keep-mask, regenerated block by block from ``seed``
        (never stored): ``dV = (P * Z / (1 - p))^T dO`` and
        ``dP = (dO V^T) * Z / (1 - p)``.

    Returns
    -------
    out : array, shape (..., H, L, Dv)
        The attention output, as :func:`scaled_dot_product_attention`.
    backward : callable
        ``backward(grad_out)`` takes the gradient of a scalar loss with
        respect to ``out`` (same shape, library, device and dtype) and returns
        a dict with the gradients ``"query"``, ``"key"``, ``"value"`` (and
        ``"bias"`` when a bias was given), each with its input's shape and
        dtype. Masked and padded positions, and rows with nothing to attend
        to, get zero gradients and pass none on, whatever the masked keys
        and values hold (NaN and infinities included). A row whose output
        or ``grad_out`` is not finite gets NaN gradients for its query and
        gives NaN to the keys and values it attends to (and to the bias
        there), and to nothing else. With grouped-query attention the key and
        value gradients sum over the query heads of each group; with
        ``softcap`` they include the cap's derivative ``1 - tanh(s / c)**2``;
        ``alibi_slopes``, ``cu_seqlens_q`` and ``cu_seqlens_k`` get none.

    Raises
    ------
    TypeError, ValueError
        As :func:`scaled_dot_product_attention`; ``backward`` raises them for
        a ``grad_out`` of the wrong library, device, dtype or shape.
    MemoryError
        Never from mha_xp's memory guard, which checks only the weights of
        ``return_weights=True`` (the forward keeps the per-row statistics,
        ``backward`` works in blocks, and the planner keeps the dense path
        within a quarter of the host memory available); only the array
        library's own, when one of its allocations fails.

    See Also
    --------
    MultiHeadAttention.vjp : The same for the layer and its parameters.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    >>> out, backward = mha_xp.attention_vjp(q, k, v, is_causal=True)
    >>> grads = backward(np.ones_like(out))       # gradient of out.sum()
    >>> sorted(grads), grads["query"].shape
    (['key', 'query', 'value'], (2, 5, 4))
    >>> eps = 1e-6                               # check one entry numerically
    >>> dq = np.zeros_like(q); dq[0, 1, 2] = eps
    >>> up = mha_xp.scaled_dot_product_attention(q + dq, k, v, is_causal=True).sum()
    >>> down = mha_xp.scaled_dot_product_attention(q - dq, k, v, is_causal=True).sum()
    >>> bool(np.isclose((up - down) / (2 * eps), grads["query"][0, 1, 2]))
    True
    """
    xp, spec = _validate(query, key, value, mask, bias, is_causal, scale, enable_gqa, window,
                         alibi_slopes, softcap, cu_seqlens_q, cu_seqlens_k, dropout_p, seed,
                         sinks, (score_mod, mask_mod, block_mask, score_mod_vjp), vjp=True)
    chunk_size = block_chunks(check_chunk_size(chunk_size), block_mask)
    threads = check_num_threads(num_threads)
    request = Request(return_stats=True, chunk_size=chunk_size, memory_budget=memory_budget,
                      num_threads=threads)
    out, _, stats = run_attention(query, key, value, spec, request, xp=xp)
    saved = Saved(query, key, value, out, cast("tuple[AnyArray, AnyArray]", stats))

    def backward(grad_out: Array) -> dict[str, Array]:
        check_grad(grad_out, out, xp=xp, name="grad_out")
        # A fresh sum, per call, for the gradients of a score_mod's captured arrays.
        run = spec if score_mod_vjp is None else spec.replace(mod_grads={})
        with threads_for(threads):
            dq, dk, dv, dbias, dsinks = core_backward(saved, grad_out, run, chunk_size, xp=xp)
        grads = {"query": dq, "key": dk, "value": dv}
        if run.mod_grads:
            grads["score_mod"] = dict(run.mod_grads)
        if bias is not None:
            grads["bias"] = dbias
        if sinks is not None:
            ds = xp.reshape(cast(AnyArray, dsinks), tuple(sinks.shape))
            grads["sinks"] = ds if ds.dtype == sinks.dtype else xp.astype(ds, sinks.dtype)
        return grads

    return out, backward
