"""A key/value cache for incremental (autoregressive) decoding with the layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast


from .._checks import check_cache_arrays
from .._lib._backends import register_pytree
from .._lib._namespace import Array as AnyArray
from .._lib._namespace import namespace_and_device
from ..typing import Array

__all__ = ["CacheOwner", "KVCache"]


class CacheOwner:
    """Which layer made a cache: one per layer, compared by identity.

    It is the static part of the cache's JAX pytree (hashable, so one
    compiled step serves every cache of a layer). ``copy`` and ``deepcopy``
    keep it: a copied cache still belongs to its layer. A pickled cache
    does not (unpickled, it belongs to a new owner, which no layer is).
    """

    __slots__ = ()

    def __copy__(self) -> CacheOwner:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CacheOwner:
        return self

    def __repr__(self) -> str:
        return f"<CacheOwner {id(self):#x}>"


@dataclass(frozen=True)
class KVCache:
    """Keys and values of the positions decoded so far, pre-allocated.

    Make one with :meth:`MultiHeadAttention.init_cache`; each call
    ``y, cache = layer(x, cache=cache, is_causal=True)`` returns a new cache
    holding ``x``'s keys and values too. Nothing is modified in place, so a
    cache may be reused (e.g. to branch a beam).

    Parameters
    ----------
    key, value : array, shape (B, num_kv_heads, max_length, head_dim)
        Projected (normalised and rotated, where the layer does so) keys and
        values, one head per key/value head, of one library, device and
        real floating dtype; positions ``>= length`` hold zeros or stale
        entries and are never attended to.
    length : array of signed integers, 0-d or (B,), or int
        How many positions are filled, in ``[0, max_length]``: one length
        for the whole batch (0-d), or one per sequence ``(B,)``, which a
        call with ``key_padding_mask`` makes (each sequence's prompt and
        steps fill its own slots, so that left- or right-padded prompts and
        sequences that finish early decode as if run alone). An array of the
        keys' library and device rather than a Python int, so that one
        compiled decoding step serves every position under ``jax.jit``; a
        Python int is converted to one (the library's default integer
        dtype, on the keys' device).

    Attributes
    ----------
    owner : CacheOwner or None
        The layer whose :meth:`~MultiHeadAttention.init_cache` made the
        cache (the caches its calls return keep it); None for a cache made
        by hand. A layer refuses a cache another layer made, since the keys
        and values in it were projected with that layer's weights.

    Raises
    ------
    TypeError
        ``key`` or ``value`` not arrays of one library, not real floating,
        or of different dtypes; ``length`` neither an int nor a 0-d signed
        integer array of their library.
    ValueError
        Arrays on different devices; ``key`` and ``value`` not 4-D of one
        shape; a ``length`` outside ``[0, max_length]`` where its value can
        be read for free.

    Notes
    -----
    The design trades work for static shapes: every step attends over all
    ``max_length`` slots with a validity mask built by index arithmetic
    (``j < length``), and writes its new keys with ``take`` + ``where``
    rather than in place. Shapes never change, so ``jax.jit`` compiles one
    step for all positions and nothing is reallocated as the sequence
    grows; the price is ``O(max_length)`` rather than ``O(length)`` work per
    step, as in Flax's decode cache.

    Values of ``length`` are checked where the filled length can be read for
    free (NumPy, array-api-strict, torch on the CPU, and any Python int): a
    length outside ``[0, max_length]`` when the cache is made, and a write
    past ``max_length``, raise ``ValueError``. On CuPy, CUDA torch, JAX and
    Dask reading it would mean a device sync, or is impossible (under
    ``jax.jit``, on a lazy Dask array), so there positions beyond
    ``max_length`` are dropped (choose ``max_length`` for the longest
    sequence) and a negative length gives undefined results (the call
    writes nothing into the cache).

    A cache belongs to the layer that made it: ``layer.to(...)``,
    :meth:`~MultiHeadAttention.from_state_dict` and :func:`load_weights`
    make new layers, which start their own caches (converting the keys and
    values too would be a silent copy; rebuild a cache by hand,
    ``KVCache(key, value, length)``, to carry one over deliberately: a
    cache made by hand belongs to no layer and any layer of matching
    shapes, library, device and dtype accepts it). It is a JAX pytree of its
    three arrays, its owner the static part: it passes through ``jax.jit``
    and ``jax.lax.scan`` and keeps its owner.
    """

    key: Array
    value: Array
    length: Array | int  # an int is converted to an array by __post_init__
    owner: CacheOwner | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "length", check_cache_arrays(self.key, self.value, self.length))
        _register(self.key)

    @classmethod
    def _assemble(cls, key: AnyArray, value: AnyArray, length: AnyArray,
                  owner: CacheOwner | None) -> KVCache:
        """A cache of fields known to be valid, without checking them again:
        for :meth:`append` and for JAX, whose unflattening may pass any
        objects as the leaves (sentinels, tracers, ``None``) and must not
        check them."""
        self = object.__new__(cls)
        for name, x in (("key", key), ("value", value), ("length", length), ("owner", owner)):
            object.__setattr__(self, name, x)
        return self

    @property
    def max_length(self) -> int:
        """The number of positions the cache can hold."""
        return int(self.key.shape[-2])

    @property
    def batch_size(self) -> int:
        """The batch size ``B``."""
        return int(self.key.shape[0])

    @classmethod
    def empty(
        cls, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int, *,
        xp: Any, device: Any, dtype: Any, owner: CacheOwner | None = None,
    ) -> KVCache:
        """A cache with no position filled (zeros, ``length`` 0) that
        belongs to ``owner`` (the layer whose ``init_cache`` makes it)."""
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        zeros = xp.zeros(shape, dtype=dtype, device=device)
        length = xp.zeros((), dtype=xp.arange(1, device=device).dtype, device=device)
        _register(zeros)
        return cls._assemble(zeros, xp.zeros(shape, dtype=dtype, device=device), length, owner)

    def append(self, key: Array, value: Array, keep: Array | None = None) -> KVCache:
        """A cache with ``key`` and ``value`` (``(B, Hkv, n, D)``) written at
        positions ``length .. length + n - 1`` of each sequence.

        ``keep`` ``(B, n)``, bool, marks the entries that are not padding:
        only those are written, one after another from each sequence's own
        length (the padding of left- or right-padded prompts, and the steps
        of sequences that have finished, take no slot), and each length
        grows by its sequence's count. The write is a gather and a select
        (``take`` of the new entries at every slot, ``where`` the slot is
        being written), so it needs no in-place update and no
        data-dependent shape.
        """
        xp, dev = namespace_and_device(self.key)
        B, M, n = self.key.shape[0], self.key.shape[-2], key.shape[-2]
        length = cast(AnyArray, self.length)  # an array once __post_init__ has run
        if keep is None and length.ndim == 0:  # one length for the batch: one gather
            rel = xp.arange(M, device=dev) - length
            write = xp.logical_and(rel >= 0, rel < n)
            index = xp.where(write, rel, xp.zeros_like(rel))
            write = xp.reshape(write, (M, 1))
            return KVCache._assemble(
                xp.where(write, xp.take(key, index, axis=2), self.key),
                xp.where(write, xp.take(value, index, axis=2), self.value),
                length + n, self.owner,
            )
        lengths = xp.broadcast_to(length, (B,))
        if keep is None:
            count = xp.full((B,), n, dtype=lengths.dtype, device=dev)
            source = xp.broadcast_to(xp.arange(n, device=dev), (B, n))
        else:
            count = xp.astype(xp.sum(xp.astype(keep, lengths.dtype), axis=1), lengths.dtype)
            # The kept entries first, in order: a stable sort of "is padding".
            source = xp.argsort(xp.astype(xp.logical_not(keep), xp.int8), axis=1, stable=True)
        rel = xp.expand_dims(xp.arange(M, device=dev), axis=0) - xp.expand_dims(lengths, axis=1)
        write = xp.logical_and(rel >= 0, rel < xp.expand_dims(count, axis=1))  # (B, M)
        rank = xp.where(write, rel, xp.zeros_like(rel))
        rows = xp.expand_dims(xp.arange(B, device=dev) * n, axis=1)
        # The flat index (b * n + t) of the entry each slot takes.
        flat = xp.take(xp.reshape(xp.astype(source, rank.dtype) + rows, (-1,)),
                       xp.reshape(rank + rows, (-1,)), axis=0)
        write = xp.reshape(write, (B, 1, M, 1))
        return KVCache._assemble(_gather(key, flat, M, self.key, write, xp),
                                 _gather(value, flat, M, self.value, write, xp),
                                 lengths + count, self.owner)

    def positions(self, n: int, keep: Array | None = None) -> Array:
        """The absolute positions of a call's ``n`` entries: ``length + i``
        (``(n,)``), or with a length per sequence or ``keep`` (see
        :meth:`append`) ``length[b] + rank`` per sequence, ``(B, 1, n)``,
        ``rank`` counting the kept entries before (a padding entry takes
        the position of the last kept one before it, or ``length[b] - 1``)."""
        xp, dev = namespace_and_device(self.key)
        length = cast(AnyArray, self.length)  # an array once __post_init__ has run
        if keep is None:
            steps = xp.arange(n, device=dev)
            if length.ndim == 0:
                return steps + length
            return xp.expand_dims(xp.expand_dims(length, axis=1) + steps, axis=1)
        rank = xp.cumulative_sum(xp.astype(keep, length.dtype), axis=1) - 1
        return xp.expand_dims(xp.expand_dims(xp.broadcast_to(length, (keep.shape[0],)), axis=1)
                              + rank, axis=1)


def _gather(new: AnyArray, flat: AnyArray, M: int, old: AnyArray, write: AnyArray,
            xp: Any) -> AnyArray:
    """``old`` ``(B, Hkv, M, D)`` with the slots ``write`` taken from ``new``
    ``(B, Hkv, n, D)`` at the flat indices ``flat`` (``b * n + t``, ``(B * M,)``)."""
    B, H, n, D = new.shape
    rows = xp.reshape(xp.permute_dims(new, (0, 2, 1, 3)), (B * n, H, D))
    taken = xp.permute_dims(xp.reshape(xp.take(rows, flat, axis=0), (B, M, H, D)), (0, 2, 1, 3))
    return xp.where(write, taken, old)


def _register(like: AnyArray) -> None:
    """Make :class:`KVCache` a JAX pytree once JAX arrays are in use, so that
    a cache passes through ``jax.jit`` and ``jax.lax.scan``: its three arrays
    are the leaves, its owner the static part (a cache of another layer is
    another tree structure, never mistaken for this layer's)."""
    register_pytree(KVCache, lambda c: ((c.key, c.value, c.length), c.owner),
                    lambda owner, leaves: KVCache._assemble(
                        *cast("tuple[AnyArray, AnyArray, AnyArray]", leaves), owner), like)
