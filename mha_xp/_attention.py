"""Scaled dot-product attention: the public functions and the shared core."""

from __future__ import annotations

import math
import numbers
from dataclasses import replace
from collections.abc import Callable, Sequence
from types import ModuleType, SimpleNamespace
from typing import Any

from array_api_compat import (
    array_namespace,
    device as device_of,
    is_array_api_strict_namespace,
    is_dask_namespace,
    is_numpy_array,
    is_torch_array,
)

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
    check_same_dtype,
    check_scale,
    check_sdpa_shapes,
    check_softcap,
    check_window,
)
from . import _config
from ._backward import attention_backward
from ._chunked import (
    block_scores,
    broadcast_lead,
    diag_offset,
    chunked_attention,
    chunked_weights,
    lse_from_stats,
    merge_partials,
    with_ones_column,
)
from ._config import resolve_budget
from ._lib._dask import attend_blocks
from ._lib._math import masked_softmax, unnormalised_attention
from ._lib._namespace import Array, common_namespace, compute_dtype, dtype_name
from ._lib._inplace import multiply_into, writes_in_place
from ._masks import Variants, dropout_scale, with_lead_index

__all__ = [
    "attend",
    "attention_vjp",
    "attend_backward",
    "attention_with_lse",
    "default_blocks",
    "merge_attention",
    "plan_blocks",
    "scaled_dot_product_attention",
]

# Default key block of the chunked path, and the size (elements) of one score
# block across all batch and head indices: 2**21 float32 = 8 MiB, which
# measured fastest here among 256..4096-wide blocks (within ~10 %), while
# keeping the Python loop short.
_K_BLOCK = 512
_BLOCK_ELEMENTS = 2**21
# Calls whose dense scores take less than this never consult the memory guard.
_GUARD_FROM_BYTES = 2**24


def default_blocks(lead: tuple[int, ...], L: int, S: int) -> tuple[int, int]:
    """The chunked path's blocks: keys in blocks of 512, queries in blocks
    sized so that one score block holds about 2**21 elements in all."""
    k_block = max(1, min(S, _K_BLOCK))
    q_block = max(1, min(L, _BLOCK_ELEMENTS // max(1, math.prod(lead) * k_block)))
    return q_block, k_block


def plan_blocks(
    lead: tuple[int, ...], L: int, S: int, itemsize: int, chunk_size: Any, budget: int
) -> tuple[int, int] | None:
    """Choose the dense path (``None``) or the chunked one with its blocks.

    The dense path is taken while its ``(..., L, S)`` score tensor fits the
    budget; ``chunk_size`` forces the chunked path with the given block.
    """
    if chunk_size is not None:
        q_block, k_block = chunk_size
        return min(q_block, max(L, 1)), min(k_block, max(S, 1))
    if math.prod(lead) * L * S * itemsize <= budget:
        return None
    return default_blocks(lead, L, S)


def attend(
    query: Array,
    key: Array,
    value: Array,
    /,
    *,
    mask: Array | None,
    key_keep: Array | None,
    bias: Array | None,
    is_causal: bool,
    scale: float,
    return_weights: bool,
    return_stats: bool,
    chunk_size: tuple[int, int] | None,
    memory_budget: int | None,
    xp: ModuleType,
    variants: Variants | None = None,
) -> tuple[Array, Array | None, tuple[Array, Array] | None]:
    """Attention on validated inputs: ``softmax(Q K^T * scale + bias, allowed) V``.

    ``allowed`` is the AND of ``mask``, ``key_keep`` (False on padding keys,
    broadcastable to ``(..., 1, S)``), the causal triangle and what
    ``variants`` (:class:`~mha_xp._masks.Variants`: window, soft-capping,
    ALiBi, packed sequences) add; with dropout in ``variants``, the output is
    ``(P * Z / (1 - p)) V`` while ``weights`` and ``stats`` are those of the
    softmax ``P`` before dropout. Returns
    ``(out, weights or None, stats or None)``, where ``stats = (m, l)`` are the
    rows' softmax shift and sum (see :func:`~mha_xp._chunked.lse_from_stats`).

    16-bit inputs are computed in float32 (the score matmul, the softmax sums
    and the weighted sum of values accumulate in float32); ``out`` and
    ``weights`` are cast back, ``stats`` stay float32.

    On Dask arrays this builds one lazy task per block of queries, each
    running this function on its block (:mod:`mha_xp._lib._dask`).

    Grouped-query attention (``Hq = Hkv * G`` query heads on axis -3 against
    ``Hkv`` key/value heads) runs as ordinary attention on queries reshaped to
    ``(..., Hkv, G, L, D)`` against keys and values with a size-1 group axis,
    which broadcasts: no copy of the keys and values per query head.
    """
    groups = gqa_groups(query, key, value)
    if groups is not None:
        out, weights, stats = attend(
            _split_heads(query, groups, 2, xp), xp.expand_dims(key, axis=-3),
            xp.expand_dims(value, axis=-3), mask=_group(mask, groups, xp),
            key_keep=_group(key_keep, groups, xp), bias=_group(bias, groups, xp),
            is_causal=is_causal, scale=scale, return_weights=return_weights,
            return_stats=return_stats, chunk_size=chunk_size, memory_budget=memory_budget, xp=xp,
            variants=_group_variants(variants, groups, xp))
        return (_ungroup(out, 2, xp), _ungroup(weights, 2, xp),
                None if stats is None else tuple(_ungroup(t, 1, xp) for t in stats))
    if is_dask_namespace(xp):
        return attend_blocks(
            attend, query, key, value, mask=mask, key_keep=key_keep, bias=bias,
            is_causal=is_causal, scale=scale, return_weights=return_weights,
            return_stats=return_stats, chunk_size=chunk_size,
            memory_budget=memory_budget, xp=xp, variants=variants)
    dtype = query.dtype
    work = compute_dtype(dtype, xp)
    if work != dtype:
        query, key, value = (xp.astype(t, work) for t in (query, key, value))
        bias = None if bias is None else xp.astype(bias, work)
    mask, bias = _at_least_2d(mask, xp), _at_least_2d(bias, xp)
    L, S = query.shape[-2], key.shape[-2]
    lead = broadcast_lead(query, key, value)
    itemsize = xp.finfo(work).bits // 8
    budget = resolve_budget(memory_budget)
    score_bytes = math.prod(lead) * L * S * itemsize
    # Reading the available memory costs a file read: only for calls large
    # enough for it to matter.
    available = None
    if score_bytes > _GUARD_FROM_BYTES and (return_weights or budget >= score_bytes):
        available = _config.host_memory_available(xp, device_of(query))
    if available is not None:
        if return_weights and score_bytes > available:
            raise MemoryError(
                f"return_weights=True needs the {lead + (L, S)} attention weights, "
                f"{score_bytes / 2**30:.1f} GiB in {dtype_name(work)}, but only "
                f"{available / 2**30:.1f} GiB of memory is available; call without "
                f"return_weights (attention itself takes the chunked path, whose memory "
                f"is linear in L and S)"
            )
        # The dense path keeps about three score-sized arrays alive: never let a
        # generous budget send it past the memory there is.
        budget = min(budget, available // 4)
    if variants is not None and variants.dropout is not None:
        # Generating the keep-mask of the whole score matrix takes about three
        # more score-sized temporaries (Threefry's words, the mask, the
        # factors), and is faster in cache-sized blocks: measured (NumPy,
        # float32, 8 heads, L = S = 512 to 1024) the chunked path took half the
        # dense path's time once the scores outgrew one block of 2**21.
        budget = min(budget // 2, _BLOCK_ELEMENTS * itemsize)
    blocks = plan_blocks(lead, L, S, itemsize, chunk_size, budget)
    variants = with_lead_index(variants, lead, xp=xp, device=device_of(query))
    weights = stats = None
    if blocks is None:
        # Scale Q (L x D) rather than the scores (L x S).
        scores = block_scores(
            query * scale, key, mask=mask, key_keep=key_keep, bias=bias, is_causal=is_causal,
            rows=slice(0, L), cols=slice(0, S), offset=diag_offset(L, S, variants), xp=xp,
            in_place=writes_in_place(xp), variants=variants)
        if variants is None or variants.dropout is None:
            # Leave exp(s - m) unnormalised, get its row sums from the P V
            # matmul and divide the (L, Dv) output rather than the (L, S)
            # probabilities: two passes over the scores fewer (the weights,
            # when asked for, are normalised after the matmul).
            out, weights, stats = unnormalised_attention(
                scores, with_ones_column(value, xp=xp), xp=xp, return_weights=return_weights)
            out = _expand(out, lead + (L, value.shape[-1]), xp)
            weights = _expand(weights, lead + (L, S), xp) if return_weights else None
            stats = tuple(_expand(t, lead + (L,), xp) for t in stats) if return_stats else None
            if work != dtype:
                out = xp.astype(out, dtype)
                weights = None if weights is None else xp.astype(weights, dtype)
            return out, weights, stats
        if return_stats:
            weights, stats = masked_softmax(scores, None, xp=xp, return_stats=True)
            stats = tuple(_expand(t, lead + (L,), xp) for t in stats)
        else:
            weights = masked_softmax(scores, None, xp=xp)
        drop = dropout_scale(slice(0, L), slice(0, S), variants=variants, dtype=work, xp=xp,
                             device=device_of(query))
        if drop is None:
            out = xp.matmul(weights, value)
        else:  # the weights go back undropped: only overwrite them when they do not
            out = xp.matmul(multiply_into(weights, drop, xp=xp, in_place=writes_in_place(xp)
                                          and not return_weights), value)
        out = _expand(out, lead + (L, value.shape[-1]), xp)
        weights = _expand(weights, lead + (L, S), xp) if return_weights else None
    else:
        q_block, k_block = blocks
        common = dict(mask=mask, key_keep=key_keep, bias=bias, is_causal=is_causal,
                      scale=scale, q_block=q_block, k_block=k_block, xp=xp, variants=variants)
        out, stats = chunked_attention(query, key, value, **common)
        if return_weights:
            weights = _expand(chunked_weights(query, key, stats, **common), lead + (L, S), xp)
    if work != dtype:
        out = xp.astype(out, dtype)
        weights = None if weights is None else xp.astype(weights, dtype)
    return out, weights, stats if return_stats else None


def gqa_groups(query: Array, key: Array, value: Array) -> tuple[int, int] | None:
    """``(Hkv, G)`` when the query heads (axis -3) are ``G > 1`` groups of the
    ``Hkv > 1`` key/value heads (grouped-query attention), else None (equal
    heads, or a head axis of 1 that broadcasts: multi-query attention)."""
    if min(query.ndim, key.ndim, value.ndim) < 3:
        return None
    hq = query.shape[-3]
    hkv = key.shape[-3] if key.shape[-3] != 1 else value.shape[-3]
    if hq == hkv or 1 in (hq, hkv):
        return None
    return hkv, hq // hkv


def _group_variants(variants: Variants | None, groups: tuple[int, int],
                    xp: ModuleType) -> Variants | None:
    """``variants`` with the ALiBi slopes, and the leading index of dropout,
    split into ``(Hkv, G)`` heads."""
    if variants is None:
        return variants
    if variants.lead_index is not None and variants.lead_index.ndim >= 1:
        index = variants.lead_index
        variants = replace(variants, lead_index=xp.reshape(
            index, tuple(index.shape[:-1]) + groups))
    if variants.neg_slopes is None:
        return variants
    return replace(variants, neg_slopes=_group(variants.neg_slopes, groups, xp))


def _group(x: Array | None, groups: tuple[int, int], xp: ModuleType) -> Array | None:
    """An array broadcastable to the ``(..., Hq, L, S)`` scores, reshaped to
    broadcast to ``(..., Hkv, G, L, S)`` (a reshape, never a copy per head)."""
    if x is None or x.ndim < 3:
        return x
    heads = groups if x.shape[-3] != 1 else (1, 1)
    return xp.reshape(x, tuple(x.shape[:-3]) + heads + tuple(x.shape[-2:]))


def _ungroup(x: Array | None, core: int, xp: ModuleType) -> Array | None:
    """Merge the ``(Hkv, G)`` axes in front of the last ``core`` axes back
    into one head axis."""
    if x is None:
        return None
    shape = tuple(x.shape)
    n = len(shape) - core
    return xp.reshape(x, shape[: n - 2] + (shape[n - 2] * shape[n - 1],) + shape[n:])


def _split_heads(x: Array, groups: tuple[int, int], core: int, xp: ModuleType) -> Array:
    """Split the head axis in front of the last ``core`` axes into ``(Hkv, G)``."""
    shape = tuple(x.shape)
    n = len(shape) - core
    return xp.reshape(x, shape[: n - 1] + groups + shape[n:])


def _at_least_2d(x: Array | None, xp: ModuleType) -> Array | None:
    """A mask or bias with its (L, S) axes present (a 0-d or 1-d one
    broadcasts against them), so that blocks can be sliced from it."""
    if x is None or x.ndim >= 2:
        return x
    return xp.reshape(x, (1,) * (2 - x.ndim) + tuple(x.shape))


def _expand(x: Array, shape: tuple[int, ...], xp: ModuleType) -> Array:
    """``x`` with the full broadcast shape (e.g. weights of a query that is
    shared across a batch of values), as a new array, not a read-only view."""
    if tuple(x.shape) == shape:
        return x
    return xp.broadcast_to(x, shape) + xp.zeros(shape, dtype=x.dtype, device=device_of(x))


def _validate(
    query: Array, key: Array, value: Array, mask: Array | None, bias: Array | None,
    scale: Any, chunk_size: Any, enable_gqa: Any = None, window: Any = None,
    alibi_slopes: Any = None, softcap: Any = None, cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None, dropout_p: Any = 0.0, seed: Any = None,
) -> tuple[ModuleType, float, tuple[int, int] | None, Variants | None]:
    """Shared validation of the public attention functions."""
    xp, dev = common_namespace(query=query, key=key, value=value, mask=mask, bias=bias)
    dtype = check_same_dtype(xp, query=query, key=key, value=value)
    groups = check_gqa(query, key, value, enable_gqa)
    if groups is None:
        scores_shape = check_sdpa_shapes(query, key, value)
    else:  # the shapes attend works on: (..., Hkv, G, L, D) against (..., Hkv, 1, S, D)
        q, k, v = (SimpleNamespace(shape=t.shape[:-3] + h + t.shape[-2:])
                   for t, h in ((query, groups), (key, (key.shape[-3], 1)),
                                (value, (value.shape[-3], 1))))
        scores_shape = check_sdpa_shapes(q, k, v)
        scores_shape = scores_shape[:-4] + (math.prod(scores_shape[-4:-2]),) + scores_shape[-2:]
    labels = "(..., H, L, S)"
    if mask is not None:
        check_mask(mask, scores_shape, xp, labels)
    if bias is not None:
        check_bias(bias, dtype, scores_shape, xp, labels)
    variants = _variants(xp, dev, dtype, scores_shape, window, alibi_slopes, softcap,
                         cu_seqlens_q, cu_seqlens_k)
    dropout = check_dropout(dropout_p, seed)
    if dropout is not None:
        variants = replace(Variants() if variants is None else variants, dropout=dropout)
    return xp, check_scale(scale, query.shape[-1]), check_chunk_size(chunk_size), variants


def _host_readable(x: Array) -> bool:
    """Whether reading values of ``x`` is free: an eager array in host memory
    (NumPy, array-api-strict, torch on the CPU), never a GPU, lazy or traced one."""
    if is_numpy_array(x) or is_array_api_strict_namespace(array_namespace(x)):
        return True
    return is_torch_array(x) and x.device.type == "cpu"


def _as_index_array(name: str, x: Any, xp: ModuleType, dev: Any) -> tuple[Array, bool, Any]:
    """``x`` as an integer array of ``xp`` on ``dev`` (a Python sequence of
    ints is converted), whether its values may be read for validation, and
    the Python ints themselves when it was a sequence (read on the host)."""
    if isinstance(x, (list, tuple)):
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in x):
            raise TypeError(f"{name} must be an integer array or a list of ints, got {x!r}")
        return xp.asarray(x, device=dev), True, list(x)
    common_namespace((xp, dev, "pass it with the inputs' library and device"), **{name: x})
    return x, _host_readable(x), None


def _variants(
    xp: ModuleType, dev: Any, dtype: Any, scores_shape: tuple[int, ...], window: Any,
    alibi_slopes: Any, softcap: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
) -> Variants | None:
    """Validate the score-level variants and put them in :class:`Variants` form."""
    window, softcap = check_window(window), check_softcap(softcap)
    L, S = scores_shape[-2:]
    work = compute_dtype(dtype, xp)
    neg_slopes = None
    if alibi_slopes is not None:
        if isinstance(alibi_slopes, (list, tuple)):
            alibi_slopes = xp.asarray(alibi_slopes, dtype=work, device=dev)
        else:
            common_namespace((xp, dev, "pass it with the inputs' library and device"),
                             alibi_slopes=alibi_slopes)
        check_alibi_slopes(alibi_slopes, dtype, scores_shape, xp)
        neg_slopes = -xp.astype(alibi_slopes, work)
        neg_slopes = xp.reshape(neg_slopes, tuple(neg_slopes.shape) + (1, 1))
    q_seg = k_seg = q_diag = None
    if cu_seqlens_q is None and cu_seqlens_k is not None:
        raise ValueError("cu_seqlens_k needs cu_seqlens_q (the queries' sequences)")
    if cu_seqlens_q is not None:
        same = cu_seqlens_k is None or cu_seqlens_k is cu_seqlens_q
        cu_q, readable, host = _as_index_array("cu_seqlens_q", cu_seqlens_q, xp, dev)
        if same and L != S:
            raise ValueError(
                f"cu_seqlens_k defaults to cu_seqlens_q, which needs as many keys as queries, "
                f"got L = {L} and S = {S}: pass cu_seqlens_k"
            )
        check_cu_seqlens("cu_seqlens_q", cu_q, L, xp, readable, host)
        cu_k = cu_q
        if not same:
            cu_k, readable, host = _as_index_array("cu_seqlens_k", cu_seqlens_k, xp, dev)
            check_cu_seqlens("cu_seqlens_k", cu_k, S, xp, readable, host)
            if cu_k.shape[0] != cu_q.shape[0]:
                raise ValueError(
                    f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got "
                    f"shapes {tuple(cu_q.shape)} and {tuple(cu_k.shape)}"
                )
            if cu_k.dtype != cu_q.dtype:
                cu_k = xp.astype(cu_k, cu_q.dtype)
        # On the device, by binary search: no host round trip.
        q_seg = xp.searchsorted(cu_q, xp.arange(L, dtype=cu_q.dtype, device=dev), side="right") - 1
        k_seg = q_seg if same else xp.searchsorted(
            cu_k, xp.arange(S, dtype=cu_k.dtype, device=dev), side="right") - 1
        if not same:
            # The key bottom-right aligned with query i of sequence n:
            # i - end_q(n) + end_k(n).
            q_diag = (xp.arange(L, dtype=cu_q.dtype, device=dev)
                      + xp.take(cu_k - cu_q, q_seg + 1, axis=0))
    if window is None and softcap is None and neg_slopes is None and q_seg is None:
        return None
    return Variants(window=window, softcap=softcap, neg_slopes=neg_slopes, q_seg=q_seg,
                    k_seg=k_seg, q_diag=q_diag)


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
    enable_gqa: bool | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Array | Sequence[float] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Array | Sequence[int] | None = None,
    cu_seqlens_k: Array | Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
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
        Positive finite factor on ``Q K^T``; default ``1 / sqrt(D)``.
    return_weights : bool, default False
        Also return the attention weights.
    chunk_size : int or (int, int), optional
        Force the chunked path with this block size (one int for queries and
        keys, or ``(query_block, key_block)``).
    memory_budget : int, optional
        Bytes the dense ``(..., H, L, S)`` score tensor may take before the
        chunked path is used instead; default :func:`get_memory_budget`
        (128 MiB unless configured).
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
        shape ``(N + 1,)``, starting at 0, non-decreasing, ending at ``L``.
        No query attends to a key of another sequence, and ``is_causal``,
        ``window`` and ALiBi are aligned bottom-right within each sequence:
        the result equals attention over each sequence on its own (a query
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
        positive and finite, a bad ``chunk_size`` or ``memory_budget``,
        ``alibi_slopes`` of a wrong shape, ``cu_seqlens_q``/``cu_seqlens_k``
        that are not cumulative lengths of the packed axis, ``dropout_p``
        outside ``[0, 1]``, ``dropout_p > 0`` without a ``seed``, a ``seed``
        outside ``[0, 2**64)``.

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
    xp, scale, chunk_size, variants = _validate(
        query, key, value, mask, bias, scale, chunk_size, enable_gqa, window, alibi_slopes,
        softcap, cu_seqlens_q, cu_seqlens_k, dropout_p, seed)
    is_causal = check_flag("is_causal", is_causal)
    return_weights = check_flag("return_weights", return_weights)
    out, weights, _ = attend(
        query, key, value, mask=mask, key_keep=None, bias=bias, is_causal=is_causal,
        scale=scale, return_weights=return_weights, return_stats=False,
        chunk_size=chunk_size, memory_budget=memory_budget, xp=xp, variants=variants,
    )
    return (out, weights) if return_weights else out


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
    enable_gqa: bool | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Array | Sequence[float] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Array | Sequence[int] | None = None,
    cu_seqlens_k: Array | Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> tuple[Array, Array]:
    """Attention output and the per-row log-sum-exp of the scores.

    The building block of split-key and distributed attention: attention over
    disjoint key sets, merged with :func:`merge_attention`, equals attention
    over their union.

    Parameters
    ----------
    query, key, value, mask, bias, is_causal, scale, chunk_size, memory_budget
        As in :func:`scaled_dot_product_attention`.
    enable_gqa, window, alibi_slopes, softcap, cu_seqlens_q, cu_seqlens_k
        As in :func:`scaled_dot_product_attention`.
    dropout_p, seed
        As in :func:`scaled_dot_product_attention`.

    Returns
    -------
    out : array, shape (..., H, L, Dv)
        As :func:`scaled_dot_product_attention` returns it (with dropout,
        ``(P * Z / (1 - dropout_p)) V``).
    lse : array, shape (..., H, L)
        ``log(sum_j exp(s_ij))`` over the allowed keys, with ``s`` the scaled,
        biased scores; ``+inf`` for a row with nothing to attend to (as in
        FlashAttention, so that ``exp(s - lse)`` is 0 there). float32 for
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
    xp, scale, chunk_size, variants = _validate(
        query, key, value, mask, bias, scale, chunk_size, enable_gqa, window, alibi_slopes,
        softcap, cu_seqlens_q, cu_seqlens_k, dropout_p, seed)
    is_causal = check_flag("is_causal", is_causal)
    out, _, stats = attend(
        query, key, value, mask=mask, key_keep=None, bias=bias, is_causal=is_causal,
        scale=scale, return_weights=False, return_stats=True,
        chunk_size=chunk_size, memory_budget=memory_budget, xp=xp, variants=variants,
    )
    return out, lse_from_stats(stats, xp=xp)


def merge_attention(out1: Array, lse1: Array, out2: Array, lse2: Array) -> tuple[Array, Array]:
    """Merge two attention results over disjoint key sets of the same queries.

    ``lse = logaddexp(lse1, lse2)`` and
    ``out = exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2``; a row whose
    ``lse`` is ``+inf`` on one side (no key there) takes the other side as it
    is, and stays ``out = 0, lse = +inf`` if both sides are empty.

    Parameters
    ----------
    out1, out2 : array, shape (..., L, Dv)
        Outputs of :func:`attention_with_lse` over the two key sets.
    lse1, lse2 : array, shape (..., L)
        Their log-sum-exps.

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
    if out1.dtype != work:  # 16-bit outputs come with float32 log-sum-exps
        out, lse = merge_partials(xp.astype(out1, work), lse1, xp.astype(out2, work), lse2, xp=xp)
        return xp.astype(out, out1.dtype), lse
    return merge_partials(out1, lse1, out2, lse2, xp=xp)


def attend_backward(
    query: Array,
    key: Array,
    value: Array,
    out: Array,
    stats: tuple[Array, Array],
    grad_out: Array,
    /,
    *,
    mask: Array | None,
    key_keep: Array | None,
    bias: Array | None,
    is_causal: bool,
    scale: float,
    chunk_size: tuple[int, int] | None,
    xp: ModuleType,
    variants: Variants | None = None,
) -> tuple[Array, Array, Array, Array | None]:
    """Gradients of :func:`attend` from its saved output and row statistics.

    The blocks are those of the chunked path (``chunk_size`` when given),
    whatever path the forward took. 16-bit inputs are computed in float32 and the
    gradients cast back to the inputs' dtype. Grouped-query attention is
    reshaped as in :func:`attend`; the key and value gradients sum over the
    query heads of their group.
    """
    groups = gqa_groups(query, key, value)
    if groups is not None:
        dq, dk, dv, dbias = attend_backward(
            _split_heads(query, groups, 2, xp), xp.expand_dims(key, axis=-3),
            xp.expand_dims(value, axis=-3), _split_heads(out, groups, 2, xp),
            tuple(_split_heads(t, groups, 1, xp) for t in stats),
            _split_heads(grad_out, groups, 2, xp), mask=_group(mask, groups, xp),
            key_keep=_group(key_keep, groups, xp), bias=_group(bias, groups, xp),
            is_causal=is_causal, scale=scale, chunk_size=chunk_size, xp=xp,
            variants=_group_variants(variants, groups, xp))
        return (xp.reshape(dq, tuple(query.shape)), xp.reshape(dk, tuple(key.shape)),
                xp.reshape(dv, tuple(value.shape)),
                None if dbias is None else xp.reshape(dbias, tuple(bias.shape)))
    dtype = query.dtype
    work = compute_dtype(dtype, xp)
    if work != dtype:
        query, key, value, out, grad_out = (
            xp.astype(t, work) for t in (query, key, value, out, grad_out))
        bias = None if bias is None else xp.astype(bias, work)
    L, S = query.shape[-2], key.shape[-2]
    lead = broadcast_lead(query, key, value)
    # Always blocked: the backward keeps four score-sized temporaries alive,
    # and cache-sized blocks are faster than one big one.
    q_block, k_block = (plan_blocks(lead, L, S, 0, chunk_size, 0) if chunk_size is not None
                        else default_blocks(lead, L, S))
    bias_shape = None if bias is None else tuple(bias.shape)
    mask, bias = _at_least_2d(mask, xp), _at_least_2d(bias, xp)
    grads = attention_backward(
        query, key, value, out, stats, grad_out, mask=mask, key_keep=key_keep, bias=bias,
        is_causal=is_causal, scale=scale, q_block=q_block, k_block=k_block, xp=xp,
        variants=variants)
    if bias_shape is not None and tuple(grads[3].shape) != bias_shape:
        grads = (*grads[:3], xp.reshape(grads[3], bias_shape))
    if work != dtype:
        grads = tuple(None if g is None else xp.astype(g, dtype) for g in grads)
    return grads


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
    enable_gqa: bool | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Array | Sequence[float] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Array | Sequence[int] | None = None,
    cu_seqlens_k: Array | Sequence[int] | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
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
    enable_gqa, window, alibi_slopes, softcap, cu_seqlens_q, cu_seqlens_k
        As in :func:`scaled_dot_product_attention`.
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
        to, get zero gradients. With grouped-query attention the key and
        value gradients sum over the query heads of each group; with
        ``softcap`` they include the cap's derivative ``1 - tanh(s / c)**2``;
        ``alibi_slopes``, ``cu_seqlens_q`` and ``cu_seqlens_k`` get none.

    Raises
    ------
    TypeError, ValueError
        As :func:`scaled_dot_product_attention`; ``backward`` raises them for
        a ``grad_out`` of the wrong library, device, dtype or shape.

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
    xp, scale, chunk_size, variants = _validate(
        query, key, value, mask, bias, scale, chunk_size, enable_gqa, window, alibi_slopes,
        softcap, cu_seqlens_q, cu_seqlens_k, dropout_p, seed)
    is_causal = check_flag("is_causal", is_causal)
    out, _, stats = attend(
        query, key, value, mask=mask, key_keep=None, bias=bias, is_causal=is_causal,
        scale=scale, return_weights=False, return_stats=True,
        chunk_size=chunk_size, memory_budget=memory_budget, xp=xp, variants=variants,
    )

    def backward(grad_out: Array) -> dict[str, Array]:
        check_grad(grad_out, out, xp=xp, name="grad_out")
        dq, dk, dv, dbias = attend_backward(
            query, key, value, out, stats, grad_out, mask=mask, key_keep=None, bias=bias,
            is_causal=is_causal, scale=scale, chunk_size=chunk_size, xp=xp,
            variants=variants)
        grads = {"query": dq, "key": dk, "value": dv}
        if bias is not None:
            grads["bias"] = dbias
        return grads

    return out, backward
