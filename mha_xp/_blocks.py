"""Block masks: which blocks of the scores a ``mask_mod`` leaves empty, full
or partial, classified once and reused by every call (torch FlexAttention's
``create_block_mask``, on any array library)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._checks import check_positive_int
from ._core._modifiers import EMPTY, FULL, PARTIAL
from ._lib._backends import block_namespace, host_readable
from ._lib._namespace import Array as AnyArray
from ._lib._namespace import convert, normalize_namespace
from .typing import Array, Device, Namespace

__all__ = ["BlockMask", "block_chunks", "check_modifiers", "create_block_mask"]


@dataclass(frozen=True)
class BlockMask:
    """The block structure of a ``mask_mod``, from :func:`create_block_mask`.

    Attributes
    ----------
    mask_mod : callable
        ``mask_mod(b, h, q_idx, kv_idx)``, True where a query may attend.
    shape : (int, int, int, int)
        ``(B, H, Q_LEN, KV_LEN)`` it was made for; ``B`` or ``H`` of 1
        broadcasts.
    block_size : (int, int)
        ``(query_block, key_block)``.
    kinds : array of int8
        ``(B, H, ceil(Q_LEN / query_block), ceil(KV_LEN / key_block))`` in the
        library and on the device it was made with: 0 where a block is empty
        (``mask_mod`` False throughout), 2 where it is full (True
        throughout), 1 where it is partial.
    host_kinds : numpy.ndarray or None
        ``(nq, nk)``: a block's kind where every leading position agrees
        (else partial), read once on the host where that is free; None
        elsewhere (then no block is skipped).
    """

    mask_mod: Callable[..., Any]
    shape: tuple[int, int, int, int]
    block_size: tuple[int, int]
    kinds: Array
    host_kinds: np.ndarray | None = field(default=None, repr=False, compare=False)

    EMPTY = EMPTY
    PARTIAL = PARTIAL
    FULL = FULL

    def sparsity(self) -> float:
        """The share of blocks that the chunked path skips: those empty for
        every leading position (NaN where the kinds could not be read for
        free when the mask was made)."""
        if self.host_kinds is None:
            return math.nan
        return float((self.host_kinds == EMPTY).mean())


def create_block_mask(
    mask_mod: Callable[..., Any],
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: Device | None = None,
    BLOCK_SIZE: int | tuple[int, int] | None = None,
    *,
    block_size: int | tuple[int, int] | None = None,
    xp: Namespace | None = None,
) -> BlockMask:
    """Classify the blocks of the scores as empty, full or partial, once.

    Parameters
    ----------
    mask_mod : callable
        ``mask_mod(b, h, q_idx, kv_idx)`` returning a boolean array, True
        where query ``q_idx`` may attend to key ``kv_idx`` (torch
        FlexAttention's convention), written with broadcasting array
        operations: ``b`` ``(B, 1, 1, 1)``, ``h`` ``(1, H, 1, 1)``, ``q_idx``
        ``(1, 1, Lb, 1)``, ``kv_idx`` ``(1, 1, 1, Sb)``.
    B, H : int or None
        Batch size and query heads; None or 1 for a mask that is the same
        for every batch entry or head (it then broadcasts, and is evaluated
        once).
    Q_LEN, KV_LEN : int
        Query and key lengths.
    device : optional
        The device of the index arrays (and of ``kinds``); default the
        namespace's default.
    BLOCK_SIZE : int or (int, int), optional
        torch's name for ``block_size``.
    block_size : int or (int, int), optional
        ``(query_block, key_block)``, or one int for both; default 128. The
        chunked path then uses these blocks.
    xp : module, optional
        The array namespace to evaluate ``mask_mod`` with; default NumPy.

    Returns
    -------
    BlockMask
        Pass it as ``block_mask=`` to :func:`scaled_dot_product_attention`,
        :func:`attention_with_lse`, :func:`attention_vjp` or the layer's
        call, with any inputs of matching lengths (and ``B``, ``H`` or 1):
        the chunked path skips the empty blocks, and evaluates ``mask_mod``
        only on the partial ones. Its memory is one byte per block.

    Raises
    ------
    TypeError, ValueError
        A ``mask_mod`` that is not callable or does not return a boolean
        array that broadcasts to a block; sizes that are not positive ints;
        both ``block_size`` and ``BLOCK_SIZE``.

    Notes
    -----
    ``mask_mod`` is evaluated on one block row (``query_block`` queries
    against all keys) at a time. The chunked path skips a block only where
    every leading (batch, head) position agrees that it is empty (or full),
    and only where the kinds can be read for free (NumPy, array-api-strict,
    torch on the CPU); elsewhere the mask is computed in every block, with
    the same result.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    >>> bm = mha_xp.create_block_mask(causal, None, None, 256, 256, block_size=64)
    >>> bm.kinds[0, 0]           # 0 empty, 1 partial, 2 full
    array([[1, 0, 0, 0],
           [2, 1, 0, 0],
           [2, 2, 1, 0],
           [2, 2, 2, 1]], dtype=int8)
    >>> bm.sparsity()
    0.375
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
    if block_size is not None and BLOCK_SIZE is not None:
        raise ValueError("give block_size or torch's BLOCK_SIZE, not both")
    given = block_size if block_size is not None else BLOCK_SIZE
    pair = (128, 128) if given is None else (given if isinstance(given, (tuple, list))
                                             else (given, given))
    if len(pair) != 2:
        raise ValueError(f"block_size must be an int or a pair (query_block, key_block), got {given!r}")
    bq, bk = (check_positive_int("block_size", n) for n in pair)
    Bn = 1 if B is None else check_positive_int("B", B)
    Hn = 1 if H is None else check_positive_int("H", H)
    L, S = check_positive_int("Q_LEN", Q_LEN), check_positive_int("KV_LEN", KV_LEN)
    ns = normalize_namespace(np if xp is None else xp)
    kinds = _classify(mask_mod, ns, device, (Bn, Hn, L, S), (bq, bk))
    host = None
    if host_readable(kinds):
        full = np.asarray(convert(kinds, np, None))
        # EMPTY only where every position is empty; FULL only where every one is full.
        host = np.where((full == EMPTY).all(axis=(0, 1)), EMPTY,
                        np.where((full == FULL).all(axis=(0, 1)), FULL, PARTIAL)).astype(np.int8)
    return BlockMask(mask_mod, (Bn, Hn, L, S), (bq, bk), kinds, host)


def _classify(mask_mod: Callable[..., Any], xp: Any, device: Any,
              shape: tuple[int, int, int, int], block: tuple[int, int]) -> AnyArray:
    """The kinds ``(B, H, nq, nk)``, int8, one block row at a time."""
    Bn, Hn, L, S = shape
    bq, bk = block
    nq, nk = -(-L // bq), -(-S // bk)
    b = xp.reshape(xp.arange(Bn, device=device), (Bn, 1, 1, 1))
    h = xp.reshape(xp.arange(Hn, device=device), (1, Hn, 1, 1))
    kv = xp.reshape(xp.arange(S, device=device), (1, 1, 1, S))
    pad = nk * bk - S
    rows = []
    for i in range(nq):
        q = xp.reshape(xp.arange(i * bq, min((i + 1) * bq, L), device=device), (1, 1, -1, 1))
        allowed = mask_mod(b, h, q, kv)
        if not hasattr(allowed, "dtype") or not xp.isdtype(allowed.dtype, "bool"):
            raise TypeError(f"mask_mod must return a boolean array, got "
                            f"{getattr(allowed, 'dtype', type(allowed).__name__)}")
        allowed = xp.broadcast_to(allowed, (Bn, Hn, q.shape[2], S))
        if pad:  # a short last block: its missing keys count as neither
            allowed_any = xp.concat([allowed, xp.zeros((Bn, Hn, q.shape[2], pad), dtype=xp.bool,
                                                       device=device)], axis=-1)
            allowed_all = xp.concat([allowed, xp.ones((Bn, Hn, q.shape[2], pad), dtype=xp.bool,
                                                      device=device)], axis=-1)
        else:
            allowed_any = allowed_all = allowed
        some = xp.any(xp.reshape(allowed_any, (Bn, Hn, q.shape[2], nk, bk)), axis=(2, 4))
        every = xp.all(xp.reshape(allowed_all, (Bn, Hn, q.shape[2], nk, bk)), axis=(2, 4))
        one, two = (xp.asarray(k, dtype=xp.int8, device=device) for k in (PARTIAL, FULL))
        zero = xp.asarray(EMPTY, dtype=xp.int8, device=device)
        rows.append(xp.where(every, two, xp.where(some, one, zero)))
    return xp.stack(rows, axis=2)


def check_modifiers(
    xp: Any, device: Any, dtype: Any, scores_shape: tuple[int, ...], score_mod: Any,
    mask_mod: Any, block_mask: Any, score_mod_vjp: Any = None, *, vjp: bool = False,
) -> dict[str, Any]:
    """The spec's modifier fields of a call, validated (shared by the
    functions and the layer): the callables, a block mask that fits the
    scores ``(..., H, L, S)``, and one evaluation of each callable on a
    probe block, so that a wrong return type is an error here rather than
    inside the computation. With ``vjp``, a ``score_mod`` without
    ``score_mod_vjp`` must add a term that does not depend on the score."""
    for name, f in (("score_mod", score_mod), ("mask_mod", mask_mod),
                    ("score_mod_vjp", score_mod_vjp)):
        if f is not None and not callable(f):
            raise TypeError(f"{name} must be callable, got {type(f).__name__}")
    if score_mod_vjp is not None and score_mod is None:
        raise ValueError("score_mod_vjp is the gradient of a score_mod: pass score_mod too")
    if block_mask is not None:
        mask_mod = _check_block_mask(block_mask, mask_mod, scores_shape)
    if score_mod is None and mask_mod is None:
        return {}
    heads = scores_shape[-3] if len(scores_shape) >= 3 else 1
    ns, other = block_namespace(xp)  # the callables see the blocks' arrays (Dask: NumPy)
    _probe(ns, None if other else device, dtype, score_mod, mask_mod,
           vjp and score_mod_vjp is None, scores_shape)
    return dict(score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
                score_mod_vjp=score_mod_vjp, mod_heads=heads)


def _check_block_mask(block_mask: Any, mask_mod: Any, scores_shape: tuple[int, ...]) -> Any:
    """The ``mask_mod`` of a call with a block mask (its own, or the same one given)."""
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask from mha_xp.create_block_mask(...), "
                        f"got {type(block_mask).__name__}")
    if mask_mod is not None and mask_mod is not block_mask.mask_mod:
        raise ValueError("mask_mod differs from the block mask's own: pass one of them "
                         "(the block mask carries its mask_mod)")
    Bm, Hm, Lm, Sm = block_mask.shape
    L, S = scores_shape[-2], scores_shape[-1]
    heads = scores_shape[-3] if len(scores_shape) >= 3 else 1
    batch = math.prod(scores_shape[:-3])
    if (Lm, Sm) != (L, S) or Hm not in (1, heads) or Bm not in (1, batch):
        raise ValueError(
            f"block_mask was made for (B, H, Q_LEN, KV_LEN) = {block_mask.shape}, which does "
            f"not fit scores of shape {scores_shape} (..., H, L, S) (B or H of 1 broadcasts): "
            f"make it with create_block_mask(mask_mod, B, H, {L}, {S})")
    return block_mask.mask_mod


def _probe(xp: Any, device: Any, dtype: Any, score_mod: Any, mask_mod: Any,
           additive: bool, scores_shape: tuple[int, ...]) -> None:
    """Evaluate the callables once on a ``(1, 1, 1, 2)`` block: the last
    batch entry and head, the last query, the first and last keys."""
    L, S = scores_shape[-2], scores_shape[-1]
    heads = scores_shape[-3] if len(scores_shape) >= 3 else 1
    batch = math.prod(scores_shape[:-3])
    index = xp.arange(1, device=device).dtype
    b, h, zero = (xp.full((1, 1, 1, 1), n, dtype=index, device=device)
                  for n in (batch - 1, heads - 1, L - 1))
    kv = xp.reshape(xp.asarray([0, S - 1], dtype=index, device=device), (1, 1, 1, 2))
    if mask_mod is not None:
        got = mask_mod(b, h, zero, kv)
        if not hasattr(got, "dtype") or not xp.isdtype(got.dtype, "bool"):
            raise TypeError(f"mask_mod must return a boolean array (True = may attend), got "
                            f"{getattr(got, 'dtype', type(got).__name__)}")
    if score_mod is None:
        return
    s = xp.asarray([[[[0.5, -1.25]]]], dtype=dtype, device=device)
    got = score_mod(s, b, h, zero, kv)
    if not hasattr(got, "dtype") or not xp.isdtype(got.dtype, "real floating"):
        raise TypeError(f"score_mod must return a real floating array (the modified scores), "
                        f"got {getattr(got, 'dtype', type(got).__name__)}")
    if additive:
        shifted = score_mod(s + 1.0, b, h, zero, kv)
        try:  # two numbers, read once per attention_vjp (a sync on a GPU)
            step = [float(shifted[0, 0, 0, i]) - float(got[0, 0, 0, i]) for i in range(2)]
        except Exception as exc:  # traced values (jax.jit): nothing to read
            raise ValueError(
                "attention_vjp cannot check here that score_mod adds a term independent of "
                "the score (its values are traced): pass score_mod_vjp= (for an additive "
                "score_mod, lambda grad, *args: grad)") from exc
        if any(not math.isclose(d, 1.0, rel_tol=1e-3) for d in step):
            raise ValueError(
                "score_mod changes with the score other than by adding a term (its "
                "derivative is not 1): pass score_mod_vjp=, the gradient with respect to the "
                "score (see attention_vjp), for the backward")


def block_chunks(chunk_size: tuple[int, int] | None,
                 block_mask: Any) -> tuple[int, int] | None:
    """The blocks of a call: those asked for, else a block mask's own (the
    chunked path then skips its empty blocks)."""
    if chunk_size is not None or block_mask is None:
        return chunk_size
    bq, bk = block_mask.block_size
    return bq, bk
