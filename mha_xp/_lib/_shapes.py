"""Shape bookkeeping shared by every path: leading (batch, head) broadcasting,
blocks of score-shaped arrays, and gradients summed back to their inputs."""

from __future__ import annotations

from types import ModuleType

from ._namespace import Array, device_of

__all__ = ["at_least_2d", "broadcast_lead", "broadcasts_to", "broadcast_shapes", "expand", "slice_block",
           "unbroadcast"]


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` broadcasts to ``target`` (without
    growing it: every axis 1 or equal, trailing-aligned, no extra axes)."""
    if shape == target:
        return True
    return len(shape) <= len(target) and all(
        s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast of shapes already known to broadcast (a size-0 axis stays 0)."""
    first = shapes[0]
    if all(s == first for s in shapes):  # the common case, without the loop
        return tuple(first)
    ndim = max(len(s) for s in shapes)
    out = []
    for axis in range(-ndim, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis} - {1}
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def broadcast_lead(*arrays: Array) -> tuple[int, ...]:
    """The broadcast of the leading (batch, head) shapes of ``(..., n, d)`` arrays."""
    return broadcast_shapes(*(tuple(a.shape[:-2]) for a in arrays))


def at_least_2d(x: Array | None, xp: ModuleType) -> Array | None:
    """A mask or bias with its (L, S) axes present (a 0-d or 1-d one
    broadcasts against them), so that blocks can be sliced from it."""
    if x is None or x.ndim >= 2:
        return x
    return xp.reshape(x, (1,) * (2 - x.ndim) + tuple(x.shape))


def expand(x: Array, shape: tuple[int, ...], xp: ModuleType) -> Array:
    """``x`` with the full broadcast shape (e.g. weights of a query that is
    shared across a batch of values), as a new array, not a read-only view."""
    if tuple(x.shape) == shape:
        return x
    return xp.broadcast_to(x, shape) + xp.zeros(shape, dtype=x.dtype, device=device_of(x))


def slice_block(x: Array | None, rows: slice, cols: slice) -> Array | None:
    """The ``(rows, cols)`` block of an array broadcastable to ``(..., L, S)``
    and at least 2-D. An axis of size 1 (broadcast) is kept whole, and so is
    an axis the block covers entirely (no copy on libraries that copy slices)."""
    if x is None:
        return None
    whole_r = x.shape[-2] == 1 or (rows.start == 0 and rows.stop == x.shape[-2])
    whole_c = x.shape[-1] == 1 or (cols.start == 0 and cols.stop == x.shape[-1])
    if whole_r and whole_c:
        return x
    return x[..., rows if not whole_r else slice(None), cols if not whole_c else slice(None)]


def unbroadcast(g: Array, shape: tuple[int, ...], /, *, xp: ModuleType) -> Array:
    """Sum ``g`` over the axes along which an array of ``shape`` was broadcast."""
    extra = g.ndim - len(shape)
    if extra > 0:
        g = xp.sum(g, axis=tuple(range(extra)))
    axes = tuple(i for i, (gs, s) in enumerate(zip(g.shape, shape)) if s == 1 and gs != 1)
    if axes:
        g = xp.sum(g, axis=axes, keepdims=True)
    if tuple(g.shape) != tuple(shape):  # g was itself broadcast smaller than the input
        g = expand(g, tuple(shape), xp)
    return g
