"""Rotary position embeddings (RoPE; Su et al., "RoFormer", 2021)."""

from __future__ import annotations

from types import ModuleType
from typing import Any, cast

from .._checks import check_flag, check_rotary_base, check_rotary_dim
from .._lib._shapes import broadcasts_to
from .._lib._namespace import (
    Array as AnyArray,
    common_namespace,
    compute_dtype,
    dtype_name,
    require_real_floating,
)
from ..typing import Array
from ._rope import DEFAULT_BASE, rope_frequencies, rope_tables

__all__ = ["apply_rotary"]


def _check_rotary_dim(rotary_dim: Any, features: int) -> int:
    """The features rotated: all of an even feature axis, or ``rotary_dim``."""
    if rotary_dim is None:
        if features == 0 or features % 2:
            raise ValueError(
                f"x must have an even, non-zero number of features (last axis) to rotate "
                f"in pairs, got {features}; pass rotary_dim= (an even int) to rotate only "
                f"the first rotary_dim features"
            )
        return features
    # Not None: check_rotary_dim returns None only for rotary_dim=None, handled above.
    return cast(int, check_rotary_dim(rotary_dim, features, of="x's features"))


def _check_positions(positions: AnyArray, target: tuple[int, ...], xp: ModuleType) -> None:
    if not (xp.isdtype(positions.dtype, "integral")
            or xp.isdtype(positions.dtype, "real floating")):
        raise TypeError(
            f"positions must be an integer or real floating array, got dtype "
            f"{dtype_name(positions.dtype)}"
        )
    shape = tuple(positions.shape)
    if not broadcasts_to(shape, target):
        raise ValueError(
            f"positions must broadcast to x's shape without the feature axis, {target}, "
            f"got shape {shape}"
        )


def apply_rotary(
    x: Array,
    positions: Array | None = None,
    *,
    base: float = 10000.0,
    interleaved: bool = False,
    rotary_dim: int | None = None,
    inverse: bool = False,
    inv_freq: Array | None = None,
    attention_factor: float = 1.0,
) -> Array:
    """Rotate the features of queries or keys by their positions (RoPE).

    Feature pair ``p`` (of ``rotary_dim / 2``) at position ``m`` is rotated by
    the angle ``m * inv_freq[p]``, by default ``inv_freq[p] = 1 / base **
    (2 p / rotary_dim)``, so that the dot product of a rotated query at
    position ``m`` with a rotated key at position ``n`` depends on ``m - n``
    only.

    Parameters
    ----------
    x : array
        Real floating, ``(..., L, D)``: queries or keys, one head per
        ``(..., L)`` slice (the layout ``(B, H, L, D)`` of
        :func:`scaled_dot_product_attention`; for ``(B, L, H, D)`` pass
        positions shaped ``(B, L, 1)`` or ``(L, 1)``).
    positions : array of int or float, optional
        The position of each vector, broadcasting to ``x.shape[:-1]``; by
        default ``0, 1, ..., L - 1`` along axis ``-2``. Offsets for a KV cache
        or packed sequences go here, and a row per sequence (``(B, 1, L)``
        for ``(B, H, L, D)``) for left-padded batches; fractional positions
        are allowed.
    base : float, default 10000.0
        The base of the geometric sequence of frequencies (``rope_theta`` in
        Hugging Face configurations).
    interleaved : bool, default False
        Which features form a pair: ``False`` rotates ``(p, p + rotary_dim/2)``
        (GPT-NeoX, Llama, Hugging Face's ``rotate_half``); ``True`` rotates
        ``(2p, 2p + 1)`` (GPT-J, the RoFormer paper).
    rotary_dim : int, optional
        Rotate only the first ``rotary_dim`` features (even) and pass the rest
        through unchanged (GPT-NeoX's partial rotary); default: all ``D``,
        which must then be even.
    inverse : bool, default False
        Rotate by the opposite angles. This undoes the forward rotation, and
        since a rotation is orthogonal it is also the backward:
        ``apply_rotary(grad, positions, inverse=True, ...)`` (same options) is
        the gradient with respect to ``x`` of a loss whose gradient with
        respect to the output is ``grad``. With an ``attention_factor``
        ``a != 1`` it is the transpose (the backward), which multiplies by
        ``a`` too, not the inverse.
    inv_freq : array, optional
        The inverse frequencies, ``(rotary_dim // 2,)``, real floating, of
        ``x``'s library and device: those of RoPE's scalings, from
        :func:`rope_frequencies`, or the caller's own. Default: from
        ``base``; giving both is an error unless ``base`` is left at its
        default.
    attention_factor : float, default 1.0
        Multiplies the rotated features (Hugging Face multiplies its cosine
        and sine tables by it: YaRN's and LongRoPE's ``attention_scaling``,
        from :func:`rope_frequencies`).

    Returns
    -------
    array
        The rotated ``x``: same shape, dtype, namespace and device.

    Raises
    ------
    TypeError
        If ``x`` is not real floating, ``positions`` is not an integer array
        of the same library, or an option has the wrong type.
    ValueError
        If the shapes do not fit, or ``rotary_dim`` or ``base`` is out of range.

    Notes
    -----
    The angles, their sines and cosines and the rotation are computed in
    float32 (float64 for float64 inputs; float16 inputs are computed in
    float32 and rounded back once). The angle ``m * theta`` is rounded to the
    compute dtype, so its absolute error grows with the position: about
    ``m * 6e-8`` in float32, ``1e-4`` at ``m = 2048``.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 6, 8))    # (batch, heads, L, head_dim)
    >>> k = rng.standard_normal((2, 4, 6, 8))
    >>> q_rot, k_rot = mha_xp.apply_rotary(q), mha_xp.apply_rotary(k)
    >>> q_rot.shape, q_rot.dtype
    ((2, 4, 6, 8), dtype('float64'))
    >>> bool(np.allclose(mha_xp.apply_rotary(q_rot, inverse=True), q))
    True
    """
    xp, dev = common_namespace(x=x, positions=positions, inv_freq=inv_freq)
    require_real_floating("x", x, xp)
    if x.ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (..., L, D), got shape {tuple(x.shape)}"
        )
    base = check_rotary_base(base, "base")
    interleaved = check_flag("interleaved", interleaved)
    inverse = check_flag("inverse", inverse)
    lead = tuple(x.shape[:-1])
    features = x.shape[-1]
    rd = _check_rotary_dim(rotary_dim, features)
    if positions is None:
        positions = xp.arange(x.shape[-2], device=dev)
    else:
        _check_positions(positions, lead, xp)

    ct = compute_dtype(x.dtype, xp)
    half = rd // 2
    if inv_freq is None:
        inv_freq, _ = rope_frequencies(rd, base, xp=xp, device=dev, dtype=ct)
    elif base != DEFAULT_BASE:
        raise ValueError(f"give base (here {base}) or inv_freq, not both: inv_freq sets the "
                         f"frequencies that base would")
    elif tuple(inv_freq.shape) != (half,):
        raise ValueError(f"inv_freq must have shape (rotary_dim // 2,) = ({half},), got "
                         f"{tuple(inv_freq.shape)}")
    cos, sin = rope_tables(positions, inv_freq, attention_factor, xp=xp, dtype=ct)
    if inverse:
        sin = -sin

    xr = xp.astype(cast(AnyArray, x)[..., :rd], ct)  # the Array protocol has no indexing
    if interleaved:
        pairs = xp.reshape(xr, lead + (half, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = xp.reshape(xp.stack((a * cos - b * sin, b * cos + a * sin), axis=-1), lead + (rd,))
    else:
        a, b = xr[..., :half], xr[..., half:]
        rotated = xp.concat((a * cos - b * sin, b * cos + a * sin), axis=-1)
    rotated = xp.astype(rotated, x.dtype)
    if rd < features:
        rotated = xp.concat((rotated, cast(AnyArray, x)[..., rd:]), axis=-1)
    return rotated
