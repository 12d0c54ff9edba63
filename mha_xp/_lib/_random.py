"""A counter-based random generator in array-API integer operations.

Dropout on the attention weights must drop the same entries, bit for bit, on
every backend, and the backward must regenerate the mask instead of storing
it. A counter-based generator gives both: each random word is a pure function
of an explicit ``seed`` and the global position ``(batch*head index, row,
column)`` of the score it belongs to, so any block of the score matrix can be
regenerated on its own, in any order, on any library.

The generator is Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011; the Random123 library and the core of
``jax.random``), which needs only 32-bit addition, rotation and exclusive or.

Representation: 32-bit words are held in **int32** arrays, two's complement,
whose bits are those of the uint32 word. PyTorch implements almost no
arithmetic on uint32 (``add``, shifts and comparisons raise
``NotImplementedError`` in torch 2.x), and JAX without ``jax_enable_x64`` has
no 64-bit integers, so int32 is the one integer dtype whose addition,
shifts, and bitwise operations every backend implements. Additions wrap
modulo 2**32 on every backend mha_xp supports (NumPy and array-api-strict
silently for arrays, torch, JAX/XLA and CuPy by two's complement); the
logical right shift of a rotation is the arithmetic shift followed by a mask;
and unsigned comparisons flip the sign bit first. ``tests/lib/test_random.py``
checks the bits against ``jax.random``'s threefry and the Random123
known-answer vectors on every backend.

NumPy warns on overflow of *scalar* integer arithmetic (not of arrays), so the
words are kept at least one-dimensional until the end.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any, cast

from array_api_compat import device as array_device

from ._namespace import Array, dtype_name

__all__ = ["dropout_keep", "random_words", "threefry2x32"]

# Rotation constants of Threefry-2x32 (Random123's R_32x2_*), four per round group.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
# Threefish's key-schedule parity constant, 32-bit version.
_PARITY = 0x1BD11BDA
_INT32_MIN = -(2**31)
# Indices (rows, columns, batch*head) are stored in int32.
_INDEX_LIMIT = 2**31

Key = tuple[Any, Any]  # two Python ints (signed int32 range) or two int32 arrays


def _i32(v: int) -> int:
    """The int32 (two's complement) reading of the low 32 bits of ``v``."""
    v &= 0xFFFFFFFF
    return v - 2**32 if v >= 2**31 else v


def _add(x: Array, k: Any, c: int = 0) -> Array:
    """``x + k + c`` modulo 2**32 for an int32 array ``x``, where ``k`` is a
    Python int or an int32 array."""
    if isinstance(k, int):
        return x + _i32(k + c)  # folded on the host: k + c could leave int32
    return x + k + c if c else x + k


def _rotl(x: Array, r: int) -> Array:
    """Rotate the 32-bit words of ``x`` left by ``r``: the right shift is
    arithmetic on int32, so the sign bits it brings in are masked off."""
    return (x << r) | ((x >> (32 - r)) & ((1 << r) - 1))


def threefry2x32(key: Key, counter: tuple[Array, Array]) -> tuple[Array, Array]:
    """Threefry-2x32, 20 rounds, on int32 arrays holding 32-bit words.

    Parameters
    ----------
    key : pair of int or of int32 array
        The 64-bit key as two 32-bit words ``(k0, k1)``: Python ints (any
        value, read modulo 2**32) or int32 arrays broadcasting with the
        counter.
    counter : pair of int32 array
        The 64-bit counter as two 32-bit words ``(x0, x1)``; they broadcast
        together.

    Returns
    -------
    (array, array)
        The two 32-bit output words, int32 arrays of the broadcast shape;
        ``numpy.asarray(y).view(numpy.uint32)`` reads them unsigned.

    Examples
    --------
    The first Random123 known-answer vector (key 0, counter 0):

    >>> import numpy as np
    >>> zero = np.zeros(1, dtype=np.int32)
    >>> y0, y1 = threefry2x32((0, 0), (zero, zero))
    >>> [hex(int(w)) for w in (y0.view(np.uint32)[0], y1.view(np.uint32)[0])]
    ['0x6b200159', '0x99ba4efe']
    """
    k0, k1 = key
    if isinstance(k0, int) and isinstance(k1, int):
        k0, k1 = _i32(k0), _i32(k1)
        k2: Any = _i32(k0 ^ k1 ^ _PARITY)
    else:
        k2 = k0 ^ k1 ^ _i32(_PARITY)
    ks = (k0, k1, k2)
    x0, x1 = counter
    x0, x1 = _add(x0, k0), _add(x1, k1)
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        # Key injection after every four rounds.
        x0 = _add(x0, ks[(group + 1) % 3])
        x1 = _add(x1, ks[(group + 2) % 3], group + 1)
    return x0, x1


def _index(name: str, value: Any, xp: ModuleType, device: Any) -> Array:
    """An int, a ``range`` or an integer array of indices, as an int32 array."""
    if isinstance(value, range):
        if len(value) and (min(value) < 0 or max(value) >= _INDEX_LIMIT):
            raise ValueError(
                f"{name} must hold indices in [0, 2**31), got {value!r}"
            )
        return xp.arange(value.start, value.stop, value.step, dtype=xp.int32, device=device)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if not 0 <= cast(int, value) < _INDEX_LIMIT:
            raise ValueError(f"{name} must be an index in [0, 2**31), got {value}")
        return xp.asarray([int(value)], dtype=xp.int32, device=device)
    if not hasattr(value, "dtype") or not hasattr(value, "shape"):
        raise TypeError(
            f"{name} must be an int, a range or an integer array, got {type(value).__name__}"
        )
    if not xp.isdtype(value.dtype, "integral"):
        raise TypeError(
            f"{name} must be an integer array of indices, got dtype {dtype_name(value.dtype)}"
        )
    return value if value.dtype == xp.int32 else xp.astype(value, xp.int32)


def _check_seed64(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        # check_seed also takes None and Generators, which cannot key a mask
        # that every backend and the backward must regenerate.
        raise TypeError(
            "seed must be a non-negative int for dropout (the mask is a function of "
            f"the seed and the positions), got {type(seed).__name__} {seed!r}"
        )
    if cast(int, seed) < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    if cast(int, seed) >= 2**64:
        raise ValueError(f"seed must be below 2**64, got {seed}")
    return int(seed)


def random_words(
    seed: int,
    batch_head_index: int | range | Array,
    rows: int | range | Array,
    cols: int | range | Array,
    *,
    xp: ModuleType,
    device: Any = None,
) -> Array:
    """One random 32-bit word per ``(batch*head, row, column)`` position.

    The word at global position ``(b, i, j)`` under ``seed`` is output word
    ``j % 2`` of Threefry-2x32 keyed by ``key_b`` on the counter
    ``(i, j // 2)``, where ``key_b`` is both output words of Threefry-2x32
    keyed by ``seed`` (low 32 bits, high 32 bits) on the counter ``(b, 0)``.
    It depends on nothing else, so any block of positions can be generated
    alone. Each hash gives the words of two neighbouring columns: when
    ``cols`` is a ``range`` of step 1, each pair is hashed once (half the work
    of one hash per entry); for other ``cols``, each entry hashes its pair and
    keeps its word.

    Parameters
    ----------
    seed : int
        In ``[0, 2**64)``.
    batch_head_index : int, range or integer array
        Flattened ``batch * heads`` indices, any shape ``lead``; an int gives
        ``lead = ()``, a range a 1-d ``lead``.
    rows, cols : int, range or 1-d integer array
        Global row (query) and column (key) indices, of lengths ``n`` and
        ``m``; an int is one index. All indices must lie in ``[0, 2**31)``
        (checked for ints and ranges; for arrays it is the caller's duty).
    xp : module
        The array-API-compatible namespace.
    device : optional
        Where the int and range indices are created; by default on the
        device of the index arrays given, if any, else the default device.

    Returns
    -------
    array
        int32 of shape ``lead + (n, m)``, two's complement of the uint32 words.
    """
    seed = _check_seed64(seed)
    if device is None:  # ranges go where the array indices are
        device = next(
            (array_device(v) for v in (batch_head_index, rows, cols) if hasattr(v, "shape")), None
        )
    b = _index("batch_head_index", batch_head_index, xp, device)
    i = _index("rows", rows, xp, device)
    j = _index("cols", cols, xp, device)
    for name, a in (("rows", i), ("cols", j)):
        if a.ndim != 1:
            raise ValueError(
                f"{name} must be an int, a range or a 1-d array, got shape {tuple(a.shape)}"
            )
    lead = () if isinstance(batch_head_index, numbers.Integral) else tuple(b.shape)
    if not lead:  # an int or a 0-d array: one leading axis of length 1, dropped below
        b = xp.reshape(b, (1,))
    b = xp.reshape(b, tuple(b.shape) + (1, 1))
    kb0, kb1 = threefry2x32((seed, seed >> 32), (b, xp.zeros_like(b)))
    i = xp.reshape(i, (-1, 1))
    if isinstance(cols, range) and cols.step == 1 and len(cols) > 0:
        first_pair, last_pair = cols.start // 2, (cols.stop + 1) // 2
        pairs = xp.arange(first_pair, last_pair, dtype=xp.int32, device=device)
        y0, y1 = threefry2x32((kb0, kb1), (i, pairs))
        # Interleave: columns 2q and 2q + 1 come from pair q.
        shape = tuple(y0.shape)
        words = xp.reshape(xp.stack((y0, y1), axis=-1), shape[:-1] + (2 * shape[-1],))
        start = cols.start - 2 * first_pair
        words = words[..., start : start + len(cols)]
    else:
        y0, y1 = threefry2x32((kb0, kb1), (i, j >> 1))
        words = xp.where((j & 1) == 0, y0, y1)
    if not lead:  # an int batch_head_index: drop its axis of length 1
        words = xp.reshape(words, tuple(words.shape)[1:])
    return words


def dropout_keep(
    seed: int,
    batch_head_index: int | range | Array,
    rows: int | range | Array,
    cols: int | range | Array,
    p: float,
    *,
    xp: ModuleType,
    device: Any = None,
) -> Array:
    """The dropout keep-mask of a block of the attention scores.

    ``True`` where the attention weight at global position ``(b, i, j)``
    (flattened batch*head index ``b``, query row ``i``, key column ``j``) is
    kept. The mask of rows ``i0:i1`` and columns ``j0:j1`` equals that slice
    of the full mask, and the same seed gives the same bits on every backend.

    Resolution: with the threshold ``t = round(p * 2**32)``, an entry is kept
    when its 32-bit word (read unsigned) is ``>= t``, so the keep probability
    is exactly ``1 - t / 2**32``, within ``2**-33`` of ``1 - p``. ``p = 0``
    keeps everything and ``p = 1`` drops everything.

    Parameters
    ----------
    seed : int
        In ``[0, 2**64)``.
    batch_head_index : int, range or integer array
        Flattened ``batch * heads`` indices, any shape ``lead``.
    rows, cols : int, range or 1-d integer array
        Global query and key indices in ``[0, 2**31)``, lengths ``n`` and ``m``.
    p : float
        Dropout probability, in ``[0, 1]``.
    xp : module
        The array-API-compatible namespace.
    device : optional
        Where the int and range indices are created; by default on the
        device of the index arrays given, if any.

    Returns
    -------
    array
        Boolean, of shape ``lead + (n, m)``.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> full = dropout_keep(7, range(6), range(5), range(9), 0.25, xp=xp)
    >>> full.shape
    (6, 5, 9)
    >>> block = dropout_keep(7, range(2, 4), range(1, 3), range(4, 9), 0.25, xp=xp)
    >>> bool(np.all(block == full[2:4, 1:3, 4:9]))
    True
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a Python float in [0, 1], got {type(p).__name__} {p!r}")
    p = float(p)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"p must be a dropout probability in [0, 1], got {p}")
    words = random_words(seed, batch_head_index, rows, cols, xp=xp, device=device)
    threshold = round(p * 2**32)
    if threshold >= 2**32:
        return xp.zeros(tuple(words.shape), dtype=xp.bool, device=array_device(words))
    # Unsigned comparison on int32: flipping the sign bit maps [0, 2**32) onto
    # [-2**31, 2**31) in order.
    return (words ^ _INT32_MIN) >= threshold + _INT32_MIN

