"""A key/value cache for incremental (autoregressive) decoding with the layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace, device as device_of

from .._lib._backends import register_pytree
from .._lib._namespace import Array

__all__ = ["KVCache"]


@dataclass(frozen=True)
class KVCache:
    """Keys and values of the positions decoded so far, pre-allocated.

    Make one with :meth:`MultiHeadAttention.init_cache`; each call
    ``y, cache = layer(x, cache=cache, is_causal=True)`` returns a new cache
    holding ``x``'s keys and values too. Nothing is modified in place, so a
    cache may be reused (e.g. to branch a beam) and passes through
    ``jax.jit`` (it is a JAX pytree of its three arrays).

    Parameters
    ----------
    key, value : array, shape (B, num_kv_heads, max_length, head_dim)
        Projected (normalised and rotated, where the layer does so) keys and
        values, one head per key/value head; positions ``>= length`` hold
        zeros or stale entries and are never attended to.
    length : array, 0-d, integer
        How many positions are filled. An array rather than a Python int, so
        that one compiled decoding step serves every position under
        ``jax.jit``.

    Notes
    -----
    The design trades work for static shapes: every step attends over all
    ``max_length`` slots with a validity mask built by index arithmetic
    (``j < length``), and writes its new keys with ``take`` + ``where``
    rather than in place. Shapes never change, so ``jax.jit`` compiles one
    step for all positions and nothing is reallocated as the sequence
    grows; the price is ``O(max_length)`` rather than ``O(length)`` work per
    step, as in Flax's decode cache. Writing past ``max_length`` raises
    ``ValueError`` where the filled length can be read for free (NumPy,
    array-api-strict, torch on the CPU); on CuPy, CUDA torch, JAX and Dask
    reading it would mean a device sync, or is impossible (under
    ``jax.jit``, on a lazy Dask array), so there positions beyond
    ``max_length`` are dropped: choose ``max_length`` for the longest
    sequence.
    """

    key: Array
    value: Array
    length: Array

    def __post_init__(self) -> None:
        # A JAX pytree of its three arrays, so that it passes through jax.jit
        # and jax.lax.scan (registered on first use with JAX arrays).
        register_pytree(KVCache, lambda c: ((c.key, c.value, c.length), None),
                        lambda _, children: KVCache(*children), self.key)

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
        xp: Any, device: Any, dtype: Any,
    ) -> KVCache:
        """A cache with no position filled (zeros, ``length`` 0)."""
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        zeros = xp.zeros(shape, dtype=dtype, device=device)
        length = xp.zeros((), dtype=xp.arange(1, device=device).dtype, device=device)
        return cls(zeros, xp.zeros(shape, dtype=dtype, device=device), length)

    def append(self, key: Array, value: Array) -> KVCache:
        """A cache with ``key`` and ``value`` (``(B, Hkv, n, D)``) written at
        positions ``length .. length + n - 1``.

        The write is a gather and a select (``take`` of the new entries at
        every slot, ``where`` the slot is being written), so it needs no
        in-place update and no data-dependent shape.
        """
        xp = array_namespace(self.key)
        M, n = self.key.shape[-2], key.shape[-2]
        rel = xp.arange(M, device=device_of(self.key)) - self.length
        write = xp.logical_and(rel >= 0, rel < n)
        index = xp.where(write, rel, xp.zeros_like(rel))
        write = xp.reshape(write, (M, 1))
        return KVCache(
            xp.where(write, xp.take(key, index, axis=2), self.key),
            xp.where(write, xp.take(value, index, axis=2), self.value),
            self.length + n,
        )
