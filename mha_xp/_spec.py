"""What one attention call asks for (:class:`AttentionSpec`), where a block of
it sits (:class:`Block`) and how it is to be computed (:class:`Plan`).

The public faces validate their arguments and build one ``AttentionSpec``;
the core computes from it and never re-validates. A new attention variant
is one field here plus its handling in one module of the core.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ._lib._namespace import Array

__all__ = ["AttentionSpec", "Block", "LayerCall", "Plan", "Request"]


@dataclass(frozen=True)
class AttentionSpec:
    """The validated semantics of one attention call.

    Positions are measured by ``rel = diag(i) - j``, the distance of key ``j``
    left of query ``i``'s diagonal, where ``diag(i)`` is the key bottom-right
    aligned with query ``i``: ``i + S - L`` (see :class:`Block` for blocks of
    rows), or ``q_diag[i]`` where given.

    Attributes
    ----------
    scale : float
        Factor on ``Q K^T``.
    mask : array of bool or None
        Broadcastable to ``(..., L, S)``, at least 2-D; True = may attend.
    key_keep : array of bool or None
        Broadcastable to ``(..., 1, S)``; False marks padding keys.
    bias : array or None
        Broadcastable to ``(..., L, S)``, at least 2-D, added to the scaled scores.
    is_causal : bool
        Keys with ``rel < 0`` are hidden.
    window : (int, int) or None
        ``(left, right)``: keys with ``-right <= rel <= left`` are seen; a
        negative entry is unbounded.
    softcap : float or None
        Scores ``s -> softcap * tanh(s / softcap)`` before any bias.
    neg_slopes : array or None
        Minus the ALiBi slopes, broadcastable to the leading (batch, head)
        shape followed by ``(1, 1)``, in the compute dtype; adds
        ``neg_slopes * |rel|``.
    q_seg, k_seg : array or None
        The sequence of each query ``(L,)`` and key ``(S,)`` of a packed batch.
    q_diag : array or None
        ``diag(i)`` per query ``(L,)``, when it is not ``i + S - L``: packed
        sequences with different query and key boundaries, or the absolute
        positions of a KV cache; ``(B, 1, L)`` (the leading shape with a
        head axis of 1, then ``L``) when each sequence of a batch has its
        own (a cache holding a length per sequence).
    dropout : (float, int) or None
        ``(p, seed)``: dropout on the attention weights with probability
        ``0 < p <= 1``, keyed by the global position of each weight.
    free_from : int or None
        Keys from this index on have no position: every query sees them, and
        the causal, window and ALiBi terms leave them out (the keys that
        torch's ``add_bias_kv`` and ``add_zero_attn`` append); the diagonal
        is aligned with the last key before them. None: every key has one.
    sinks : array or None
        Attention-sink logits in the compute dtype, broadcastable to the
        leading (batch, head) shape followed by ``(1,)`` (``(H, 1)``): one
        more term ``exp(sink)`` in every row's softmax sum, with no value.
        Applied once to a whole call's result (:mod:`._core._dispatch`),
        never to a block.
    score_mod, mask_mod : callable or None
        The caller's modifiers, torch FlexAttention's
        ``score_mod(score, b, h, q_idx, kv_idx)`` (after soft-capping, the
        bias and ALiBi) and ``mask_mod(b, h, q_idx, kv_idx)`` (True = may
        attend), evaluated block by block (:mod:`._core._modifiers`).
    score_mod_vjp : callable or None
        ``score_mod_vjp(grad, score, b, h, q_idx, kv_idx)``: the gradient
        with respect to ``score_mod``'s score, or ``(that, {name: gradient
        of a captured array})``; None: ``score_mod`` adds a term that does
        not depend on the score (its derivative is 1).
    mod_heads : int
        The query heads ``H`` of the call, from which the modifiers' ``b``
        and ``h`` are read off the flattened leading index.
    mod_groups : (int, int) or None
        ``(Hkv, G)`` when the core computes grouped-query blocks
        ``(..., Hkv, G, Lb, Sb)``; the modifiers see them as ``(..., H, Lb, Sb)``.
    mod_q_index : array or None
        The modifiers' ``q_idx`` per query when it is not the query's row:
        the absolute positions of a KV cache, ``(L,)`` or ``(B, 1, L)``.
    block_mask : BlockMask or None
        Which blocks of the scores the ``mask_mod`` leaves empty or full
        (:func:`mha_xp.create_block_mask`), for the chunked path to skip.
    mod_grads : dict or None
        Where a backward with a ``score_mod_vjp`` that returns gradients of
        captured arrays sums them, by name (a fresh dict per backward).
    """

    scale: float
    mask: Array | None = None
    key_keep: Array | None = None
    bias: Array | None = None
    is_causal: bool = False
    window: tuple[int, int] | None = None
    softcap: float | None = None
    neg_slopes: Array | None = None
    q_seg: Array | None = None
    k_seg: Array | None = None
    q_diag: Array | None = None
    dropout: tuple[float, int] | None = None
    free_from: int | None = None
    sinks: Array | None = None
    score_mod: Any = None
    mask_mod: Any = None
    score_mod_vjp: Any = None
    mod_heads: int = 1
    mod_groups: tuple[int, int] | None = None
    mod_q_index: Array | None = None
    block_mask: Any = None
    mod_grads: dict[str, Array] | None = None

    def replace(self, **changes: Any) -> AttentionSpec:
        """A copy with ``changes``."""
        return replace(self, **changes)


@dataclass(frozen=True)
class Block:
    """Where the rows at hand sit in the whole call (a Dask task's block of
    queries; the whole call by default).

    Attributes
    ----------
    row_start : int
        Global index of the first row at hand.
    offset : int or None
        ``diag(0)`` of the rows at hand; None: ``S - L`` of the arrays at hand.
    lead_index : array or None
        The global flattened index of each leading (batch, head) position,
        int32, of the broadcast leading shape (dropout's key); None: the
        C-order index over that shape.
    """

    row_start: int = 0
    offset: int | None = None
    lead_index: Array | None = None


@dataclass(frozen=True)
class Request:
    """What a call returns besides the output, and how it may be planned.

    Attributes
    ----------
    return_weights, return_stats : bool
        Also return the attention weights / the rows' softmax statistics.
    chunk_size : (int, int) or None
        Force the chunked path with these ``(query_block, key_block)``.
    memory_budget : int or None
        Bytes the dense score tensor may take; None: the budget in effect.
    num_threads : int or None
        Threads of the parallel CPU executor; None: the number in effect.
    """

    return_weights: bool = False
    return_stats: bool = False
    chunk_size: tuple[int, int] | None = None
    memory_budget: int | None = None
    num_threads: int | None = None


@dataclass(frozen=True)
class Plan:
    """How a call is computed, as the planner chose.

    Attributes
    ----------
    executor : str
        ``"dense"`` (one ``(..., L, S)`` score tensor), ``"chunked"`` (online
        softmax over blocks, memory linear in ``L`` and ``S``) or ``"dask"``
        (one task per block of queries, each planned from its block's size).
    blocks : (int, int) or None
        ``(query_block, key_block)`` of the chunked path (for ``"dask"``, the
        blocks its tasks are forced to, or None).
    return_weights, return_stats : bool
        As asked in the :class:`Request`.
    budget : int
        The memory budget the plan was made with (Dask tasks plan with it).
    weights_bytes : int
        Bytes a call that returns the weights takes at its peak (the weights
        and the path's temporaries; 0 when no weights are asked for).
    available : int or None
        Host memory available when the plan was made (None: not read).
    threads : int
        More than 1: the parallel executor (NumPy only) runs the dense or
        chunked path in tasks on this many threads; 1: serially.
    """

    executor: str
    blocks: tuple[int, int] | None
    budget: int
    return_weights: bool = False
    return_stats: bool = False
    weights_bytes: int = 0
    available: int | None = None
    threads: int = 1


@dataclass(frozen=True)
class LayerCall:
    """A validated call of the layer, in batched form.

    Attributes
    ----------
    query, key, value : array
        ``(B, L, E)``, ``(B, S, kdim)``, ``(B, S, vdim)`` (unbatched inputs
        get a batch axis of 1); key and value default to one another and to
        query, as the same arrays.
    key_padding_mask : array of bool or None
        ``(B, S)``; True marks padding.
    mask, bias : array or None
        As given (an unbatched ``(H, L, S)`` one broadcasts as it is).
    chunk_size : (int, int) or None
    batched : bool
        Whether the inputs had a batch axis.
    key_src, value_src : str
        The argument each of key and value came from (``"query"``,
        ``"key"`` or ``"value"``), to route their gradients.
    """

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
