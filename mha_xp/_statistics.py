"""Statistics of the attention weights without the weights: the public
function. It validates its arguments as the attention functions do
(:func:`mha_xp._attention._validate`), then the core computes the
statistics in two passes over blocks of the scores
(:mod:`mha_xp._core._statistics`)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from ._attention import _validate
from ._blocks import BlockMask, block_chunks
from ._checks import check_chunk_size, check_flag
from ._core._statistics import Wanted
from ._core._statistics import attention_statistics as core_statistics
from ._porting import FUNCTION_KEYWORDS, refuse_foreign
from .typing import Array, MaskMod, ScoreMod

__all__ = ["attention_statistics"]

# The foreign keywords that name masks; those about returning the weights
# or the path (hints towards return_weights= and memory_budget=) do not apply.
_KEYWORDS = {k: FUNCTION_KEYWORDS[k] for k in
             ("attn_mask", "key_padding_mask", "attention_mask", "use_causal_mask")}


def _check_pool(pool: Any) -> tuple[int, int] | None:
    """``pool`` as ``(pq, pk)``: None, or a pair of positive ints."""
    if pool is None:
        return None
    if not isinstance(pool, (tuple, list)) or len(pool) != 2:
        raise TypeError(f"pool must be None or a pair of positive ints (pq, pk), got {pool!r}")
    for n in pool:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"pool must be a pair of positive ints (pq, pk), got {pool!r}")
        if n <= 0:
            raise ValueError(f"pool must be a pair of positive ints (pq, pk), got {pool!r}")
    return int(pool[0]), int(pool[1])


@refuse_foreign(_KEYWORDS)
def attention_statistics(
    query: Array,
    key: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Array | Sequence[float] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Array | Sequence[int] | None = None,
    cu_seqlens_k: Array | Sequence[int] | None = None,
    sinks: Array | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_mask: BlockMask | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    key_mass: bool = False,
    entropy: bool = False,
    pool: tuple[int, int] | None = None,
) -> dict[str, Array]:
    r"""Statistics of the attention weights, in memory linear in ``L`` and ``S``.

    Reductions of the weights ``P`` (``(..., H, L, S)``) that
    :func:`scaled_dot_product_attention` returns with
    ``return_weights=True``, computed block by block without ever holding
    them: where the weights of long sequences do not fit in memory, what is
    usually read off them (which keys draw attention, how spread out each
    query's attention is, an attention map at a coarser resolution) still
    does.

    Parameters
    ----------
    query : array, shape (..., H, L, D)
        Queries, real floating (float16, float32 or float64).
    key : array, shape (..., Hkv, S, D)
        Keys, same library, device and dtype as ``query``; ``Hkv`` may divide
        ``H`` (grouped-query attention, see ``enable_gqa``).
    mask, bias, is_causal, scale, enable_gqa, window, alibi_slopes, softcap
        As in :func:`scaled_dot_product_attention`.
    cu_seqlens_q, cu_seqlens_k, sinks
        As in :func:`scaled_dot_product_attention`: with ``sinks`` the
        weights are those it returns, over the keys, each row's summing to
        ``1 - p_sink`` (the sink takes the rest of the mass).
    score_mod, mask_mod, block_mask
        As in :func:`scaled_dot_product_attention` (the block mask's blocks
        become the default ``chunk_size``, and its empty blocks are skipped).
    chunk_size : int or (int, int), optional
        The blocks ``(query_block, key_block)`` (one int for both) that the
        scores are computed in; default those of the chunked path of
        :func:`scaled_dot_product_attention` (about ``2**21`` scores per
        block). With ``pool``, blocks are cut on the pooling grid: a query
        block holds ``query_block // pq`` whole cells of ``pq`` rows (at
        least one), or, for cells of more rows than a block, a piece of one;
        likewise along the keys.
    key_mass : bool, default False
        Return ``"key_mass"``: the attention each key receives, summed over
        the queries, ``P.sum(axis=-2)``.
    entropy : bool, default False
        Return ``"entropy"``: each query's attention entropy in nats,
        ``-sum_j P_ij log P_ij`` (``0 log 0 = 0``).
    pool : (int, int), optional
        Return ``"pooled"``: the weights averaged over blocks of ``pq``
        queries by ``pk`` keys, ``pool=(pq, pk)``; the blocks at the end of
        each axis hold what is left (``L % pq`` rows, ``S % pk`` keys) and
        are averaged over the positions they hold.

    Returns
    -------
    dict of str to array
        The statistics asked for, in this order:

        ``"key_mass"`` : array, shape (..., H, S)
        ``"entropy"`` : array, shape (..., H, L)
        ``"pooled"`` : array, shape (..., H, ceil(L / pq), ceil(S / pk))

        Arrays of the inputs' library, on their device, in the dtype
        attention is computed in: float32 for 16-bit inputs, the inputs'
        dtype otherwise (the dtype of :func:`attention_with_lse`'s ``lse``).
        With grouped-query attention, per query head. A query with nothing
        to attend to has weights 0: entropy 0, and nothing to give.

    Raises
    ------
    TypeError, ValueError
        As :func:`scaled_dot_product_attention` for the arguments they share
        (the messages may name ``value``, which stands for ``key`` there);
        a ``key_mass`` or ``entropy`` that is not a bool, a ``pool`` that is
        not a pair of positive ints (TypeError for the type, ValueError for
        a size below 1).
    ValueError
        When no statistic is asked for.

    See Also
    --------
    scaled_dot_product_attention : The weights themselves (``return_weights=True``).
    attention_with_lse : The rows' log-sum-exp, the first pass here.

    Notes
    -----
    Two passes over blocks of the scores, FlashAttention's way: the first
    computes each row's softmax statistics (its maximum ``m`` and sum ``l``
    of ``exp(s - m)``, as :func:`attention_with_lse` does), the second
    recomputes the weights of each block, ``exp(s - m) / l``, and reduces
    them at once. The entropy is accumulated as
    ``sum_j P_ij (m_i - s_ij) + log l_i``, a sum of non-negative terms. Key
    blocks outside the causal band or the window are skipped. Memory: one
    score block and its temporaries, the inputs in the compute dtype, the
    rows' statistics and the results (``O(L + S)`` per leading index, plus
    the ``ceil(L / pq) ceil(S / pk)`` pooled cells), never the ``L S``
    weights. On Dask the results are lazy Dask arrays (the first pass runs
    as one task per block of queries, the second as a graph of blocks);
    under ``jax.jit`` every shape is static.

    With ``sinks``, the sink is one more outcome of each row's softmax: it
    takes its share ``p_sink = exp(sink) / (exp(sink) + sum_j exp(s_ij))``
    of the mass, which the key mass and the pooled weights do not count and
    the entropy does, ``-sum_j P_ij log P_ij - p_sink log p_sink`` (a row
    with no key gives everything to the sink: entropy 0).

    Non-finite inputs are treated as by :func:`attention_with_lse`: a key
    hidden from a query never influences it, whatever it holds; a query
    that gives weight to a key holding NaN or ±Inf, or whose own query holds
    one while it sees a key, has NaN weights throughout (NaN ``lse``), so
    that, as the reductions of those weights would, its entropy is NaN, and
    so are the key mass of every key of its head and the pooled blocks of
    its rows.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 10, 8))   # (heads, L, D)
    >>> k = rng.standard_normal((2, 12, 8))   # (heads, S, D)
    >>> stats = mha_xp.attention_statistics(q, k, is_causal=True, key_mass=True,
    ...                                     entropy=True, pool=(4, 4), chunk_size=3)
    >>> {name: x.shape for name, x in stats.items()}
    {'key_mass': (2, 12), 'entropy': (2, 10), 'pooled': (2, 3, 3)}
    >>> _, w = mha_xp.scaled_dot_product_attention(q, k, k, is_causal=True,
    ...                                            return_weights=True)
    >>> bool(np.allclose(stats["key_mass"], w.sum(axis=-2)))
    True
    >>> h = -np.sum(w * np.log(np.where(w > 0, w, 1.0)), axis=-1)
    >>> bool(np.allclose(stats["entropy"], h))
    True
    """
    want = Wanted(key_mass=check_flag("key_mass", key_mass),
                  entropy=check_flag("entropy", entropy), pool=_check_pool(pool))
    if not (want.key_mass or want.entropy or want.pool is not None):
        raise ValueError("attention_statistics computes nothing unless asked: pass "
                         "key_mass=True, entropy=True or pool=(pq, pk)")
    # key stands in for the value: it has the leading and S axes a value must have.
    xp, spec = _validate(query, key, key, mask, bias, is_causal, scale, enable_gqa, window,
                         alibi_slopes, softcap, cu_seqlens_q, cu_seqlens_k, 0.0, None, sinks,
                         (score_mod, mask_mod, block_mask, None))
    return core_statistics(query, key, spec, want,
                           block_chunks(check_chunk_size(chunk_size), block_mask), xp=xp)
